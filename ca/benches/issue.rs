//! Certificates issued per second: CSR parsing, signature verification, authorization,
//! leaf signing and PEM encoding, i.e. `CertificateAuthority::create_certificate` as
//! the gRPC service calls it. CSRs are made beforehand (that is the client's cost).
//!
//! `cargo bench -p ambit-ca --bench issue`; criterion reports time per certificate
//! ("single_thread") and per certificate with both cores issuing ("two_threads").
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambit_ca::authority::CertificateAuthority;
use ambit_core::certificate::{Caller, ValidityLimits};
use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::cert_manager::new_key_and_csr;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn setup() -> (Arc<CertificateAuthority>, Caller, Vec<String>) {
    let td = TrustDomain::default();
    let now = SystemTime::now();
    let material = CertificateAuthority::generate_root(&td, now).unwrap();
    let ca =
        CertificateAuthority::from_material(&material, td, ValidityLimits::default(), now).unwrap();
    let identity = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
    let caller = Caller {
        identity: identity.clone(),
        node_agent: false,
        node: None,
    };
    let csrs = (0..64)
        .map(|_| new_key_and_csr(&identity).unwrap().1)
        .collect();
    (Arc::new(ca), caller, csrs)
}

fn issue(c: &mut Criterion) {
    let (ca, caller, csrs) = setup();
    let mut group = c.benchmark_group("issue");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));

    let mut i = 0;
    group.bench_function("single_thread", |b| {
        b.iter(|| {
            i = (i + 1) % csrs.len();
            ca.create_certificate(&caller, &csrs[i], 0, None, SystemTime::now())
                .unwrap()
        })
    });

    // Both cores issuing, as the CA's multi-threaded runtime does under load; the
    // reported time is wall time per certificate.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(2);
    group.bench_function("two_threads", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(threads as u64);
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (ca, caller, csrs) = (&ca, &caller, &csrs);
                    s.spawn(move || {
                        for k in 0..per_thread {
                            let csr = &csrs[(k as usize + t * 7) % csrs.len()];
                            ca.create_certificate(caller, csr, 0, None, SystemTime::now())
                                .unwrap();
                        }
                    });
                }
            });
            start
                .elapsed()
                .mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
        })
    });
    group.finish();
}

criterion_group!(benches, issue);
criterion_main!(benches);
