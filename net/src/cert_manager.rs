//! Keeps one certificate per workload identity fresh.
//!
//! Each identity gets a worker task: it makes an ECDSA P-256 key and CSR, asks the
//! [`CertificateSource`] (the CA) for a chain, and renews at half-life with jitter
//! (`ambit_core::renewal`). A failed request is retried with capped exponential
//! backoff; meanwhile the old certificate keeps being served for as long as it is
//! valid. At most `max_concurrent` requests are in flight, so a node adding hundreds
//! of pods at once does not flood the CA.
//!
//! Time comes from a [`Clock`] and waits are tokio sleeps, so tests drive renewal with
//! tokio's paused clock instead of waiting.
//!
//! The jitter is ± 5 % of the half-life; `max_concurrent` defaults to 8.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ambit_core::renewal::{self, RenewalPolicy};
use ambit_core::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::ca_client::{CertificateSource, FetchError, FetchRequest};
use crate::tls::WorkloadCert;

/// Source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("certificate request for {identity} failed: {source}")]
    Fetch {
        identity: SpiffeId,
        source: FetchError,
    },
    #[error("cannot make a key and CSR for {identity}: {reason}")]
    Csr { identity: SpiffeId, reason: String },
    #[error("CA answer for {identity} is unusable: {reason}")]
    BadChain { identity: SpiffeId, reason: String },
    #[error("certificate for {0} is no longer managed")]
    Forgotten(SpiffeId),
}

/// Settings of a [`CertificateManager`].
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Lifetime to ask the CA for.
    pub requested_ttl: Duration,
    pub policy: RenewalPolicy,
    /// Most CA requests in flight at once.
    pub max_concurrent: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            requested_ttl: Duration::from_secs(24 * 3600),
            policy: RenewalPolicy::default(),
            max_concurrent: 8,
        }
    }
}

/// The state of one identity's certificate, as watchers see it.
#[derive(Debug, Clone, Default)]
pub struct CertState {
    /// The certificate to serve, while it is valid.
    pub cert: Option<WorkloadCert>,
    /// The most recent failure since the last success.
    pub last_error: Option<CertError>,
    /// Requests made so far (successful or not).
    pub attempts: u64,
}

#[derive(Debug)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    source: Arc<dyn CertificateSource>,
    clock: Arc<dyn Clock>,
    config: ManagerConfig,
    permits: Semaphore,
    workers: Mutex<HashMap<SpiffeId, Worker>>,
}

#[derive(Debug)]
struct Worker {
    state: watch::Receiver<CertState>,
    task: JoinHandle<()>,
}

impl Drop for CertificateManager {
    fn drop(&mut self) {
        for (_, w) in self
            .inner
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            w.task.abort();
        }
    }
}

impl CertificateManager {
    pub fn new(
        source: Arc<dyn CertificateSource>,
        clock: Arc<dyn Clock>,
        config: ManagerConfig,
    ) -> Self {
        let permits = Semaphore::new(config.max_concurrent.max(1));
        CertificateManager {
            inner: Arc::new(Inner {
                source,
                clock,
                config,
                permits,
                workers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The certificate for `identity`, requesting it first if needed. Once managed,
    /// an identity stays managed (renewed in the background) until [`forget`]. When
    /// there is no certificate and the latest attempt failed, returns that error at
    /// once; the worker keeps retrying in the background.
    ///
    /// [`forget`]: CertificateManager::forget
    pub async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCert, CertError> {
        let mut rx = self.watch(identity);
        loop {
            {
                let state = rx.borrow_and_update();
                if let Some(cert) = &state.cert {
                    return Ok(cert.clone());
                }
                if let Some(e) = &state.last_error {
                    return Err(e.clone());
                }
            }
            if rx.changed().await.is_err() {
                return Err(CertError::Forgotten(identity.clone()));
            }
        }
    }

    /// Starts managing `identity` (if not already) and returns a watch on its state;
    /// servers use it to pick up rotated certificates.
    pub fn watch(&self, identity: &SpiffeId) -> watch::Receiver<CertState> {
        let mut workers = self.inner.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = workers.get(identity) {
            return w.state.clone();
        }
        let (tx, rx) = watch::channel(CertState::default());
        let task = tokio::spawn(run_worker(self.inner.clone(), identity.clone(), tx));
        workers.insert(
            identity.clone(),
            Worker {
                state: rx.clone(),
                task,
            },
        );
        rx
    }

    /// The current certificate for `identity` if one is held and valid now.
    pub fn cached(&self, identity: &SpiffeId) -> Option<WorkloadCert> {
        let workers = self.inner.workers.lock().unwrap_or_else(|p| p.into_inner());
        let cert = workers.get(identity)?.state.borrow().cert.clone()?;
        let now = self.inner.clock.now();
        renewal::usable(now, cert.not_before(), cert.not_after()).then_some(cert)
    }

    /// Stops managing `identity` and drops its certificate.
    pub fn forget(&self, identity: &SpiffeId) {
        let removed = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(identity);
        if let Some(w) = removed {
            w.task.abort();
        }
    }

    /// Identities currently managed.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let workers = self.inner.workers.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<_> = workers.keys().cloned().collect();
        ids.sort();
        ids
    }
}

async fn run_worker(inner: Arc<Inner>, identity: SpiffeId, tx: watch::Sender<CertState>) {
    let policy = inner.config.policy;
    let mut failures: u32 = 0;
    loop {
        let current = tx.borrow().cert.clone();
        let now = inner.clock.now();
        let wait = match (&current, failures) {
            (None, 0) => Duration::ZERO,
            (Some(cert), 0) => policy
                .renew_at(cert.not_before(), cert.not_after(), rand::random())
                .duration_since(now)
                .unwrap_or(Duration::ZERO),
            (_, n) => policy.backoff(n, rand::random()),
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let result = {
            // The semaphore lives as long as `inner`, which this task holds.
            let Ok(_permit) = inner.permits.acquire().await else {
                return;
            };
            request_once(&inner, &identity, current.clone()).await
        };
        let now = inner.clock.now();
        tx.send_modify(|state| {
            state.attempts += 1;
            match result {
                Ok(cert) => {
                    tracing::info!(%identity, not_after = ?cert.not_after(), "certificate issued");
                    state.cert = Some(cert);
                    state.last_error = None;
                    failures = 0;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let still_valid = state
                        .cert
                        .as_ref()
                        .is_some_and(|c| renewal::usable(now, c.not_before(), c.not_after()));
                    if still_valid {
                        tracing::warn!(%identity, error = %e, attempt = failures, "certificate renewal failed; serving the current certificate meanwhile");
                    } else {
                        if state.cert.take().is_some() {
                            tracing::error!(%identity, "certificate expired and could not be renewed");
                        }
                        tracing::warn!(%identity, error = %e, attempt = failures, "certificate request failed");
                    }
                    state.last_error = Some(e);
                }
            }
        });
    }
}

async fn request_once(
    inner: &Inner,
    identity: &SpiffeId,
    current: Option<WorkloadCert>,
) -> Result<WorkloadCert, CertError> {
    let (key_pem, csr_pem) = new_key_and_csr(identity).map_err(|reason| CertError::Csr {
        identity: identity.clone(),
        reason,
    })?;
    let chain = inner
        .source
        .fetch(FetchRequest {
            identity: identity.clone(),
            csr_pem,
            validity: inner.config.requested_ttl,
            current,
        })
        .await
        .map_err(|source| CertError::Fetch {
            identity: identity.clone(),
            source,
        })?;
    let bad = |reason: String| CertError::BadChain {
        identity: identity.clone(),
        reason,
    };
    let cert = WorkloadCert::from_pem(&chain, &key_pem, None).map_err(|e| bad(e.to_string()))?;
    if cert.identity() != identity {
        return Err(bad(format!(
            "leaf is for {}, not {identity}",
            cert.identity()
        )));
    }
    Ok(cert)
}

/// A fresh ECDSA P-256 key and a CSR for `identity` (empty subject, one URI SAN), PEM.
pub fn new_key_and_csr(identity: &SpiffeId) -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    Ok((key.serialize_pem(), csr.pem().map_err(|e| e.to_string())?))
}
