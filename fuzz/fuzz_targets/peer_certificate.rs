//! A peer's certificate is read for its identity and validity; that must never panic,
//! whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let _ = ambit_net::tls::identity_of(&CertificateDer::from(data));
});
