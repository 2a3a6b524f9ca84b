//! Fails when the checked-in generated code no longer matches `proto/*.proto`, so a
//! `.proto` edit can never ship without its code (users build without `protoc`).
#[path = "../codegen.rs"]
mod codegen;

#[test]
fn generated_code_matches_proto_files() {
    let tmp = tempfile::tempdir().unwrap();
    codegen::generate(tmp.path()).unwrap();
    let checked_in = codegen::crate_dir().join("src/gen");
    let mut generated: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    generated.sort();
    assert!(!generated.is_empty(), "code generation produced no files");
    for name in generated {
        let fresh = std::fs::read_to_string(tmp.path().join(&name)).unwrap();
        let old = std::fs::read_to_string(checked_in.join(&name)).unwrap_or_default();
        assert!(
            fresh == old,
            "proto/src/gen/{} is out of date with the .proto files; run \
             `cargo run -p ambit-proto --example regenerate` and commit the result",
            name.to_string_lossy()
        );
    }
}
