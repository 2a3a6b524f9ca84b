//! CSRs come from any caller of the CA. Parsing and signature verification must never
//! panic on any bytes, DER or PEM.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ambit_ca::csr::parse_csr_der(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ambit_ca::csr::parse_csr(text);
    }
});
