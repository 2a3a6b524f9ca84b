//! The CA's material replaced while it runs (`ambit_ca::live`): a plug-in directory
//! changed on disk is taken, a half-written or invalid one refused while the current
//! CA keeps signing, and a root rotation asked for in the directory runs through its
//! three phases with certificates living 2 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_ca::app;
use ambit_ca::config::Config;
use ambit_ca::live::{self, LiveAuthority};
use ambit_ca::store::{DirectoryStore, RootStore};
use clap::Parser;
use support::*;

fn config(dir: &Path) -> Config {
    Config::try_parse_from(["ambit-ca", "--root-dir", dir.to_str().unwrap()]).unwrap()
}

/// A CA on `dir` (a root generated there) whose directory is read every 50 ms.
fn start(dir: &Path) -> (Arc<LiveAuthority>, tokio::task::JoinHandle<()>) {
    let config = config(dir);
    let store = DirectoryStore::new(dir);
    let (material, ca, generated) = app::load_or_create_material(&store, &config, now()).unwrap();
    let live = LiveAuthority::new(material, ca, app::builder(&config, store.location(), None));
    let task = tokio::spawn(live::watch_directory(
        live.clone(),
        store,
        dir.to_owned(),
        config.max_ttl,
        generated,
        Duration::from_millis(50),
    ));
    (live, task)
}

async fn until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < deadline,
            "not within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until the watcher has read what `dir` holds now and refused it.
async fn until_refused(live: &LiveAuthority, dir: &Path) {
    let on_disk = DirectoryStore::new(dir).load().unwrap().unwrap();
    until(
        "the directory's material to be refused",
        Duration::from_secs(5),
        || live.refused().as_ref() == Some(&on_disk),
    )
    .await;
}

/// Certificates in a PEM text.
fn count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

#[tokio::test]
async fn a_changed_directory_is_taken_and_a_broken_one_refused_while_the_old_ca_signs() {
    let dir = tempfile::tempdir().unwrap();
    let (live, task) = start(dir.path());
    let first = live.current().root_pem().to_owned();

    // Half-written: a new certificate whose key has not arrived yet.
    let next = root_material();
    std::fs::write(dir.path().join("ca-cert.pem"), &next.ca_cert_pem).unwrap();
    until_refused(&live, dir.path()).await;
    assert_eq!(
        live.current().root_pem(),
        first,
        "refused, the old CA signs"
    );
    // It still issues, under the old root.
    let cert = issue_at(&live.current(), CART, 3600, now());
    assert_eq!(
        cert.issuing_root().map(|r| r.to_vec()),
        Some(der(&first).to_vec())
    );

    // The rest arrives: taken without a restart.
    std::fs::write(dir.path().join("ca-key.pem"), &next.ca_key_pem).unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), &next.root_cert_pem).unwrap();
    until(
        "the new material to be used",
        Duration::from_secs(5),
        || live.current().root_pem() == next.root_cert_pem,
    )
    .await;

    // Garbage in a file: refused, naming it; the CA keeps the last good material.
    std::fs::write(
        dir.path().join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    until_refused(&live, dir.path()).await;
    assert_eq!(live.current().root_pem(), next.root_cert_pem);
    let err = live
        .offer(
            DirectoryStore::new(dir.path()).load().unwrap().unwrap(),
            "test",
            now(),
        )
        .unwrap_err();
    assert!(err.contains("root-cert.pem"), "{err}");
    task.abort();
}

#[tokio::test]
async fn a_rotation_overlaps_switches_and_drops_the_old_root_by_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (live, task) = start(dir.path());
    let old = live.current().root_pem().to_owned();
    // A workload certificate living 2 s, issued before the rotation.
    issue_at(&live.current(), CART, 2, now());

    std::fs::write(dir.path().join(live::ROTATE_REQUEST), "{}").unwrap();
    let reply_path = dir.path().join(live::ROTATE_REPLY);
    until(
        "the rotation to be answered",
        Duration::from_secs(5),
        || reply_path.exists(),
    )
    .await;
    let reply: live::RotateReply =
        serde_json::from_str(&std::fs::read_to_string(&reply_path).unwrap()).unwrap();
    assert!(reply.ok, "{reply:?}");

    // Overlap: both roots trusted, the old one signs.
    let ca = live.current();
    assert_eq!(count(ca.bundle_pem()), 2);
    assert_eq!(ca.root_pem(), old);
    let during = issue_at(&ca, PAY, 2, now());
    assert_eq!(during.roots().len(), 2, "certificates carry both roots");
    assert_eq!(
        during.issuing_root().map(|r| r.to_vec()),
        Some(der(&old).to_vec())
    );
    // A second request is refused while this one runs.
    std::fs::write(dir.path().join(live::ROTATE_REQUEST), "{}").unwrap();
    until(
        "the second request to be answered",
        Duration::from_secs(5),
        || std::fs::read_to_string(&reply_path).is_ok_and(|t| t.contains("already in progress")),
    )
    .await;

    // Switched once the certificates from before have expired (2 s).
    until("signing to switch", Duration::from_secs(6), || {
        live.current().root_pem() != old
    })
    .await;
    let ca = live.current();
    assert_eq!(count(ca.bundle_pem()), 2, "the old root is still trusted");
    let after = issue_at(&ca, PAY, 60, now());
    assert_eq!(
        after.issuing_root().map(|r| r.to_vec()),
        Some(der(ca.root_pem()).to_vec())
    );

    // Done once what the old root signed during the overlap has expired too.
    until("the old root to go", Duration::from_secs(6), || {
        count(live.current().bundle_pem()) == 1
    })
    .await;
    let on_disk = std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap();
    assert_eq!(on_disk.trim(), live.current().root_pem().trim());
    assert!(!dir.path().join(live::ROTATION_FILE).exists());
    task.abort();
}

#[tokio::test]
async fn a_rotation_survives_a_restart_of_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (live, task) = start(dir.path());
    let old = live.current().root_pem().to_owned();
    issue_at(&live.current(), CART, 2, now());
    // The issued-until mark is on disk before the rotation starts.
    let mark = dir.path().join(live::ISSUED_MARK);
    until("the issued-until mark", Duration::from_secs(5), || {
        mark.exists()
    })
    .await;
    std::fs::write(dir.path().join(live::ROTATE_REQUEST), "{}").unwrap();
    let reply_path = dir.path().join(live::ROTATE_REPLY);
    until(
        "the rotation to be answered",
        Duration::from_secs(5),
        || reply_path.exists(),
    )
    .await;
    task.abort();

    // A new CA process on the same directory: both roots trusted, the old one signs,
    // and the rotation goes on from rotation.json.
    let (live, task) = start(dir.path());
    assert_eq!(count(live.current().bundle_pem()), 2);
    assert_eq!(live.current().root_pem(), old);
    until(
        "signing to switch after the restart",
        Duration::from_secs(6),
        || live.current().root_pem() != old,
    )
    .await;
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(live::ROTATION_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(state["phase"], "switched", "{state}");
    // The old root stays as long as the mark says its certificates may live: the
    // restarted CA knows no better than the mark (rounded up a minute).
    let stored: live::IssuedMark =
        serde_json::from_str(&std::fs::read_to_string(&mark).unwrap()).unwrap();
    assert_eq!(stored.root_sha256, live::fingerprint(&old));
    assert!(
        state["old_signed_until"].as_u64().unwrap() >= stored.until,
        "the old root must stay until the mark: {state} {stored:?}"
    );
    assert_eq!(state["phase"], "switched");
    assert!(
        state.get("new_key_pem").is_none_or(|k| k.is_null()),
        "the new key left rotation.json at the switch"
    );
    task.abort();
}
