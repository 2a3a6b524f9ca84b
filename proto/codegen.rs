// Shared by the drift test and the `regenerate` example: compiles `proto/*.proto` with
// protox (a pure-Rust protobuf compiler, so no system `protoc` is needed) and
// generates prost/tonic code into `out_dir`.
use std::path::{Path, PathBuf};

pub const PROTOS: &[&str] = &[
    "ca.proto",
    "handoff.proto",
    "istio_authorization.proto",
    "istio_workload.proto",
    "nodeagent.proto",
    "workload.proto",
    "xds.proto",
];

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn generate(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let include = crate_dir().join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| include.join(p)).collect();
    let fds = protox::compile(&files, [&include])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_fds(fds)?;
    Ok(())
}
