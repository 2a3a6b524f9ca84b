//! The CA while it runs: its material may change under it without a restart.
//!
//! [`LiveAuthority`] holds the current [`CertificateAuthority`] and hands it to the
//! gRPC service and the TLS server through a watch channel. New material (a plug-in
//! `cacerts` changed on disk or in its Secret, or a step of a root rotation) is
//! [`LiveAuthority::offer`]ed: it is validated whole first, and when it is unusable
//! (a half-written directory, a key that does not match, an expired chain) it is
//! refused with an error naming the file, and the current CA keeps signing.
//!
//! [`watch_directory`] drives this for a directory store: it reads the directory
//! again every interval, runs a root rotation that `ambitctl local rotate-root` asked
//! for (decisions in `ambit_core::rotation`, state in `rotation.json`), and keeps the
//! `issued-until` mark that says how long certificates signed by the current root may
//! still be valid.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ambit_core::rotation::{self, Rotation, Step};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::authority::CertificateAuthority;
use crate::store::{CaMaterial, DirectoryStore, RootStore};

/// Builds a CA from material (the configured lifetimes and node authorization).
pub type Build =
    Box<dyn Fn(&CaMaterial, SystemTime) -> anyhow::Result<CertificateAuthority> + Send + Sync>;

/// The CA in use and the material it was built from.
pub struct LiveAuthority {
    current: watch::Sender<Arc<CertificateAuthority>>,
    material: Mutex<CaMaterial>,
    /// The last material refused, so a broken file is logged once, not every read.
    refused: Mutex<Option<CaMaterial>>,
    build: Build,
}

impl std::fmt::Debug for LiveAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveAuthority").finish_non_exhaustive()
    }
}

impl LiveAuthority {
    pub fn new(material: CaMaterial, ca: CertificateAuthority, build: Build) -> Arc<Self> {
        Arc::new(LiveAuthority {
            current: watch::channel(Arc::new(ca)).0,
            material: Mutex::new(material),
            refused: Mutex::new(None),
            build,
        })
    }

    /// The CA signing now.
    pub fn current(&self) -> Arc<CertificateAuthority> {
        self.current.borrow().clone()
    }

    /// The CA signing now, and each one that replaces it.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CertificateAuthority>> {
        self.current.subscribe()
    }

    /// The material last refused, if any: what was found unusable while the current
    /// CA kept signing.
    pub fn refused(&self) -> Option<CaMaterial> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The material in use.
    pub fn material(&self) -> CaMaterial {
        self.material
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Uses `material` (read from `location`) from now on if it differs from the
    /// current one and is usable; returns whether it was taken. Unusable material is
    /// refused with the reason (naming the file), and the current CA keeps signing.
    pub fn offer(
        &self,
        material: CaMaterial,
        location: &str,
        now: SystemTime,
    ) -> Result<bool, String> {
        let mut current = self.material.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == material {
            return Ok(false);
        }
        let ca = match (self.build)(&material, now) {
            Ok(ca) => ca,
            Err(e) => {
                let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
                let first = refused.as_ref() != Some(&material);
                *refused = Some(material);
                let reason = format!("{e:#}");
                if first {
                    tracing::error!(%location, error = %reason, "new CA material refused; the current CA keeps signing");
                }
                return Err(reason);
            }
        };
        let previous = self.current();
        let ca = if ca.same_signer(&previous) {
            ca.share_issued_with(&previous.issued_tracker())
        } else {
            ca
        };
        tracing::info!(
            %location,
            roots = ca.bundle().len(),
            new_signer = !ca.same_signer(&previous),
            "CA material reloaded"
        );
        *current = material;
        self.current.send_replace(Arc::new(ca));
        Ok(true)
    }
}

/// Asked by `ambitctl local rotate-root`: a JSON [`RotateRequest`].
pub const ROTATE_REQUEST: &str = "rotate-root.request";
/// The CA's answer to it: a JSON [`RotateReply`].
pub const ROTATE_REPLY: &str = "rotate-root.reply";
/// A rotation in progress ([`RotationFile`]), mode 0600: it holds the new root's key
/// until signing switches to it.
pub const ROTATION_FILE: &str = "rotation.json";
/// How long certificates signed by the current root may be valid: [`IssuedMark`].
pub const ISSUED_MARK: &str = "issued-until.json";

/// A request to rotate the CA's self-signed root.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RotateRequest {
    /// Switch signing after this many seconds instead of once every certificate issued
    /// before the rotation has expired.
    #[serde(default)]
    pub overlap_secs: Option<u64>,
}

/// The CA's answer to a [`RotateRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateReply {
    pub ok: bool,
    pub lines: Vec<String>,
}

/// A rotation in progress, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationFile {
    /// Seconds since the Unix epoch, like every time here.
    pub started: u64,
    pub unaware_until: u64,
    pub overlap_secs: Option<u64>,
    pub switched: Option<u64>,
    pub old_signed_until: u64,
    /// `overlap`, `switched` or `done`, for `ambitctl`.
    pub phase: String,
    /// When signing switches, then when the old root goes.
    pub next_step_at: u64,
    /// The new root and its key, until signing switches to them.
    #[serde(default)]
    pub new_root_pem: Option<String>,
    #[serde(default)]
    pub new_key_pem: Option<String>,
    /// The old root, PEM.
    pub old_root_pem: String,
}

/// The latest NotAfter (rounded up) the root `root_sha256` has put on a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedMark {
    pub root_sha256: String,
    pub until: u64,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Hex SHA-256 of the PEM text's first certificate.
pub fn fingerprint(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .unwrap_or_else(|_| pem.as_bytes().to_vec());
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl RotationFile {
    fn rotation(&self) -> Rotation {
        Rotation {
            started: time(self.started),
            unaware_until: time(self.unaware_until),
            overlap: self.overlap_secs.map(Duration::from_secs),
            switched: self.switched.map(time),
            old_signed_until: time(self.old_signed_until),
        }
    }

    fn update(&mut self, r: &Rotation, now: SystemTime) {
        self.switched = r.switched.map(secs);
        self.old_signed_until = secs(r.old_signed_until);
        self.phase = match r.phase(now) {
            rotation::Phase::Overlap => "overlap",
            rotation::Phase::Switched => "switched",
            rotation::Phase::Done => "done",
        }
        .into();
        self.next_step_at = match r.next_step(now) {
            Step::Wait { until } => secs(until),
            _ => secs(now),
        };
    }
}

/// Reads the directory store again every `interval`, offering what changed, and runs
/// a rotation asked for in it. `max_ttl` bounds how long a certificate issued before
/// this process started (whose lifetime it cannot know without a mark) may be valid.
pub async fn watch_directory(
    live: Arc<LiveAuthority>,
    store: DirectoryStore,
    dir: PathBuf,
    max_ttl: Duration,
    generated: bool,
    interval: Duration,
) {
    let mut driver = Driver {
        live,
        store,
        dir,
        mark: None,
        store_error: None,
    };
    driver.start(max_ttl, generated, SystemTime::now());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        driver.step(SystemTime::now());
    }
}

struct Driver {
    live: Arc<LiveAuthority>,
    store: DirectoryStore,
    dir: PathBuf,
    /// The stored `issued-until` mark for the current signing root.
    mark: Option<SystemTime>,
    /// The directory's last problem, so it is logged once.
    store_error: Option<String>,
}

impl Driver {
    /// Seeds the current root's issued-until from its mark; without one, a root found
    /// stored (not generated now) may have signed certificates valid up to `max_ttl`.
    fn start(&mut self, max_ttl: Duration, generated: bool, now: SystemTime) {
        let ca = self.live.current();
        let root = fingerprint(ca.root_pem());
        let stored = read_json::<IssuedMark>(&self.dir.join(ISSUED_MARK))
            .ok()
            .flatten()
            .filter(|m| m.root_sha256 == root)
            .map(|m| time(m.until));
        let seed = match (stored, generated) {
            (Some(t), _) => Some(t),
            (None, true) => None,
            (None, false) => {
                tracing::info!(assumed_until = ?now + max_ttl, "no issued-until mark for the stored root: certificates it signed before may be valid up to --max-ttl from now");
                Some(now + max_ttl)
            }
        };
        self.mark = stored;
        if let Some(seed) = seed {
            let tracker = ca.issued_tracker();
            let mut t = tracker.lock().unwrap_or_else(PoisonError::into_inner);
            *t = Some(t.map_or(seed, |v| v.max(seed)));
        }
    }

    fn step(&mut self, now: SystemTime) {
        self.keep_mark();
        if let Some(request) = take_request(&self.dir) {
            let reply = self.start_rotation(request, now);
            for line in &reply.lines {
                tracing::info!(ok = reply.ok, "{line}");
            }
            if let Err(e) = write_file(
                &self.dir.join(ROTATE_REPLY),
                &serde_json::to_string(&reply).unwrap_or_default(),
                0o644,
            ) {
                tracing::warn!(error = %e, "cannot answer the rotation request");
            }
        }
        self.advance_rotation(now);
        let location = self.store.location();
        match self.store.load() {
            Ok(Some(material)) => {
                let _ = self.live.offer(material, &location, now);
            }
            Ok(None) => {}
            Err(e) => {
                let e = e.to_string();
                if self.store_error.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "CA material unreadable; the current CA keeps signing");
                    self.store_error = Some(e);
                }
                return;
            }
        }
        self.store_error = None;
    }

    /// Writes the `issued-until` mark when the current root signed past it.
    fn keep_mark(&mut self) {
        let ca = self.live.current();
        let Some(until) = ca.issued_until() else {
            return;
        };
        if let Some(mark) = rotation::issued_mark(self.mark, until) {
            let text = serde_json::to_string(&IssuedMark {
                root_sha256: fingerprint(ca.root_pem()),
                until: secs(mark),
            })
            .unwrap_or_default();
            match write_file(&self.dir.join(ISSUED_MARK), &text, 0o644) {
                Ok(()) => self.mark = Some(mark),
                Err(e) => tracing::warn!(error = %e, "cannot write the issued-until mark"),
            }
        }
    }

    fn start_rotation(
        &mut self,
        request: Result<RotateRequest, String>,
        now: SystemTime,
    ) -> RotateReply {
        let refuse = |line: String| RotateReply {
            ok: false,
            lines: vec![line],
        };
        let request = match request {
            Ok(r) => r,
            Err(e) => return refuse(format!("{ROTATE_REQUEST}: {e}")),
        };
        if let Ok(Some(r)) = read_json::<RotationFile>(&self.dir.join(ROTATION_FILE)) {
            return refuse(format!(
                "a rotation is already in progress (phase {}); it must finish first",
                r.phase
            ));
        }
        let ca = self.live.current();
        let material = self.live.material();
        if material.ca_cert_pem.trim() != material.root_cert_pem.trim() {
            return refuse(
                "the CA signs with a plug-in intermediate (cacerts) or already trusts several roots: rotate it by changing its files (docs/operations.md)".into(),
            );
        }
        let new = match CertificateAuthority::generate_root(ca.trust_domain(), now) {
            Ok(m) => m,
            Err(e) => return refuse(format!("cannot generate a new root: {e}")),
        };
        let issued_until = ca.issued_until().unwrap_or(now);
        let r = Rotation::start(
            now,
            issued_until,
            request.overlap_secs.map(Duration::from_secs),
        );
        let mut file = RotationFile {
            started: secs(now),
            unaware_until: secs(issued_until),
            overlap_secs: request.overlap_secs,
            switched: None,
            old_signed_until: secs(issued_until),
            phase: String::new(),
            next_step_at: 0,
            new_root_pem: Some(new.root_cert_pem.clone()),
            new_key_pem: Some(new.ca_key_pem.clone()),
            old_root_pem: material.root_cert_pem.clone(),
        };
        file.update(&r, now);
        let overlapping = CaMaterial {
            root_cert_pem: bundle(&[&material.root_cert_pem, &new.root_cert_pem]),
            ..material
        };
        if let Err(e) = self.commit(&file, &overlapping, now) {
            let _ = std::fs::remove_file(self.dir.join(ROTATION_FILE));
            return refuse(format!("cannot start the rotation: {e}"));
        }
        RotateReply {
            ok: true,
            lines: vec![
                format!(
                    "new root {} added to the trust bundle; the old root {} still signs",
                    &fingerprint(&new.root_cert_pem)[..16],
                    &fingerprint(&file.old_root_pem)[..16]
                ),
                format!(
                    "signing switches to the new root at {} (unix time; in {} s)",
                    secs(r.switch_at()),
                    secs(r.switch_at()).saturating_sub(secs(now))
                ),
            ],
        }
    }

    fn advance_rotation(&mut self, now: SystemTime) {
        let path = self.dir.join(ROTATION_FILE);
        let mut file = match read_json::<RotationFile>(&path) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "rotation state unreadable; the rotation does not advance");
                return;
            }
        };
        let mut r = file.rotation();
        let material = self.live.material();
        match r.next_step(now) {
            Step::Wait { .. } => {}
            Step::SwitchSigning => {
                let (Some(cert), Some(key)) = (file.new_root_pem.clone(), file.new_key_pem.clone())
                else {
                    tracing::error!(file = %path.display(), "rotation state has no new root to switch to");
                    return;
                };
                if let Some(until) = self.live.current().issued_until() {
                    r.record_issued(until);
                }
                r.switched = Some(now);
                file.update(&r, now);
                file.new_key_pem = None;
                let switched = CaMaterial {
                    ca_cert_pem: cert.clone(),
                    ca_key_pem: key,
                    cert_chain_pem: String::new(),
                    root_cert_pem: bundle(&[&cert, &file.old_root_pem]),
                };
                match self.commit(&file, &switched, now) {
                    Ok(()) => {
                        self.mark = None;
                        tracing::info!(old_root_until = ?r.old_signed_until, "root rotation: signing switched to the new root; the old root stays trusted until the certificates it signed have expired");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "root rotation: cannot switch signing; trying again")
                    }
                }
            }
            Step::DropOldRoot => {
                let done = CaMaterial {
                    root_cert_pem: material.ca_cert_pem.clone(),
                    ..material
                };
                match self.store.save(&done) {
                    Ok(()) => {
                        if let Err(e) = self.live.offer(done, &self.store.location(), now) {
                            tracing::error!(error = %e, "root rotation: cannot drop the old root");
                            return;
                        }
                        let _ = std::fs::remove_file(&path);
                        tracing::info!("root rotation done: the old root left the trust bundle");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "root rotation: cannot drop the old root; trying again")
                    }
                }
            }
        }
        // Progress for `ambitctl`, while the rotation lasts.
        if path.exists() {
            file.update(&r, now);
            let text = serde_json::to_string_pretty(&file).unwrap_or_default();
            // Written when it says something new, not every second.
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                let _ = write_file(&path, &text, 0o600);
            }
        }
    }

    /// Stores the rotation state, then the material, then uses it.
    fn commit(
        &self,
        file: &RotationFile,
        material: &CaMaterial,
        now: SystemTime,
    ) -> Result<(), String> {
        // Checked before anything is written: a step that cannot be used changes nothing.
        (self.live.build)(material, now).map_err(|e| format!("{e:#}"))?;
        write_file(
            &self.dir.join(ROTATION_FILE),
            &serde_json::to_string_pretty(file).map_err(|e| e.to_string())?,
            0o600,
        )?;
        self.store.save(material).map_err(|e| e.to_string())?;
        self.live
            .offer(material.clone(), &self.store.location(), now)
            .map(|_| ())
    }
}

/// PEM certificates one after the other, each ending in a newline.
fn bundle(pems: &[&str]) -> String {
    pems.iter()
        .map(|p| {
            let p = p.trim_end();
            format!("{p}\n")
        })
        .collect()
}

/// The rotation request waiting in `dir`, taken (its file removed).
fn take_request(dir: &Path) -> Option<Result<RotateRequest, String>> {
    let path = dir.join(ROTATE_REQUEST);
    let text = std::fs::read_to_string(&path).ok()?;
    std::fs::remove_file(&path).ok()?;
    Some(serde_json::from_str(&text).map_err(|e| format!("not a rotation request: {e}")))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `text` to `path` through a temporary file (mode `mode`) renamed into place.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let err = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
