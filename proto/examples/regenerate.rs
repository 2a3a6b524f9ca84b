//! Rewrites the checked-in generated code from `proto/*.proto`:
//! `cargo run -p ambit-proto --example regenerate`.
#[path = "../codegen.rs"]
mod codegen;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = codegen::crate_dir().join("src/gen");
    codegen::generate(&out)?;
    println!("regenerated {}", out.display());
    Ok(())
}
