//! The certificate manager's timing, driven by tokio's paused clock: renewal at
//! half-life, backoff while the CA fails, the old certificate served until it
//! expires, bounded concurrency. No test waits in real time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::SpiffeId;
use ambit_net::ca_client::{CertificateSource, FetchError, FetchRequest};
use ambit_net::cert_manager::{CertificateManager, Clock, ManagerConfig};
use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::time::{sleep, Instant};

/// Wall time that follows tokio's (paused) clock.
#[derive(Debug)]
struct PausedClock {
    base: SystemTime,
    start: Instant,
}

impl PausedClock {
    fn new() -> Arc<Self> {
        Arc::new(PausedClock {
            base: SystemTime::now(),
            start: Instant::now(),
        })
    }
}

impl Clock for PausedClock {
    fn now(&self) -> SystemTime {
        self.base + (Instant::now() - self.start)
    }
}

/// A CA in miniature: signs CSRs for whatever identity they name, valid from the
/// clock's now for the requested lifetime; can be told to fail or to be slow.
#[derive(Debug)]
struct FakeCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    clock: Arc<PausedClock>,
    failing: AtomicBool,
    delay: Duration,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl FakeCa {
    fn new(clock: Arc<PausedClock>, delay: Duration) -> Arc<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).unwrap();
        Arc::new(FakeCa {
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
            clock,
            failing: AtomicBool::new(false),
            delay,
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CertificateSource for FakeCa {
    fn fetch(&self, request: FetchRequest) -> BoxFuture<'_, Result<Vec<String>, FetchError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now_in = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now_in, Ordering::SeqCst);
            if !self.delay.is_zero() {
                sleep(self.delay).await;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(FetchError::Connect {
                    address: "fake".into(),
                    reason: "CA down".into(),
                });
            }
            let mut csr = CertificateSigningRequestParams::from_pem(&request.csr_pem).unwrap();
            let now = self.clock.now();
            csr.params.not_before = now.into();
            csr.params.not_after = (now + request.validity).into();
            let leaf = csr.signed_by(&self.issuer).unwrap();
            Ok(vec![leaf.pem(), self.root_pem.clone()])
        })
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const MIN: Duration = Duration::from_secs(60);

fn manager(
    ca: &Arc<FakeCa>,
    clock: &Arc<PausedClock>,
    max_concurrent: usize,
) -> CertificateManager {
    CertificateManager::new(
        ca.clone(),
        clock.clone(),
        ManagerConfig {
            requested_ttl: 60 * MIN,
            max_concurrent,
            ..ManagerConfig::default()
        },
    )
}

#[tokio::test(start_paused = true)]
async fn renews_around_half_life_and_not_before() {
    let clock = PausedClock::new();
    let ca = FakeCa::new(clock.clone(), Duration::ZERO);
    let m = manager(&ca, &clock, 8);
    let first = m.fetch(&id(CART)).await.unwrap();
    assert_eq!(ca.calls(), 1);
    // Fetching again is served from the cache.
    m.fetch(&id(CART)).await.unwrap();
    assert_eq!(ca.calls(), 1);

    // One-hour certificate: renewal lands between 27 and 33 minutes (50% +- 5%).
    sleep(26 * MIN).await;
    assert_eq!(ca.calls(), 1, "renewed too early");
    sleep(8 * MIN).await;
    assert_eq!(ca.calls(), 2, "not renewed by 34 minutes");
    let second = m.cached(&id(CART)).unwrap();
    assert!(second.not_after() > first.not_after());
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_the_old_certificate_while_renewal_fails_then_recovers() {
    let clock = PausedClock::new();
    let ca = FakeCa::new(clock.clone(), Duration::ZERO);
    let m = manager(&ca, &clock, 8);
    let first = m.fetch(&id(CART)).await.unwrap();
    ca.failing.store(true, Ordering::SeqCst);

    sleep(40 * MIN).await;
    let calls_at_40 = ca.calls();
    assert!(
        calls_at_40 >= 3,
        "renewal should have been tried and retried: {calls_at_40}"
    );
    let held = m
        .cached(&id(CART))
        .expect("old certificate still served while valid");
    assert_eq!(held.not_after(), first.not_after());
    assert!(m.watch(&id(CART)).borrow().last_error.is_some());

    // Backoff is capped at 30s: over 10 minutes, between 10 and 10*60/15 + a few retries.
    sleep(10 * MIN).await;
    let retries = ca.calls() - calls_at_40;
    assert!(
        (10..=45).contains(&retries),
        "{retries} retries in 10 minutes"
    );

    // Past expiry there is nothing left to serve.
    sleep(11 * MIN).await;
    assert!(
        m.cached(&id(CART)).is_none(),
        "expired certificate must not be served"
    );
    assert!(
        m.fetch(&id(CART)).await.is_err(),
        "fetch reports the failure"
    );

    // The CA comes back: within one capped backoff a new certificate arrives.
    ca.failing.store(false, Ordering::SeqCst);
    sleep(Duration::from_secs(31)).await;
    let fresh = m.cached(&id(CART)).expect("recovered");
    assert!(fresh.not_after() > first.not_after());
}

#[tokio::test(start_paused = true)]
async fn first_fetch_failure_is_reported_and_retried_in_background() {
    let clock = PausedClock::new();
    let ca = FakeCa::new(clock.clone(), Duration::ZERO);
    ca.failing.store(true, Ordering::SeqCst);
    let m = manager(&ca, &clock, 8);
    let err = m.fetch(&id(CART)).await.unwrap_err().to_string();
    assert!(
        err.contains("certificate request for spiffe://cluster.local/ns/shop/sa/cart failed")
            && err.contains("CA down"),
        "{err}"
    );
    ca.failing.store(false, Ordering::SeqCst);
    sleep(Duration::from_secs(2)).await;
    assert!(m.cached(&id(CART)).is_some());
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_are_bounded() {
    let clock = PausedClock::new();
    let ca = FakeCa::new(clock.clone(), Duration::from_secs(1));
    let m = Arc::new(manager(&ca, &clock, 2));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            m.fetch(&id(&format!("spiffe://cluster.local/ns/shop/sa/w{i}")))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(ca.calls(), 10);
    assert_eq!(ca.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn forgotten_identities_are_no_longer_renewed() {
    let clock = PausedClock::new();
    let ca = FakeCa::new(clock.clone(), Duration::ZERO);
    let m = manager(&ca, &clock, 8);
    m.fetch(&id(CART)).await.unwrap();
    m.forget(&id(CART));
    assert!(m.cached(&id(CART)).is_none());
    assert!(m.identities().is_empty());
    sleep(120 * MIN).await;
    assert_eq!(ca.calls(), 1);
}
