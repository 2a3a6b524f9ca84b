//! `ambitctl analyze -f PATH...`: the findings of [`ambit_k8s::analyze`] on files, as a
//! table (or JSON, or YAML), with istioctl's exit status 79 when one reaches the
//! failure threshold.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ambit_k8s::analyze::{Finding, Input, Severity, CODES};
use anyhow::Context;

/// The exit status when findings reach the failure threshold (istioctl analyze's).
pub const FOUND_ISSUES: u8 = 79;

#[derive(Debug)]
pub struct Options {
    pub files: Vec<PathBuf>,
    pub root_namespace: String,
    pub output: String,
    pub failure_threshold: String,
    pub output_threshold: String,
    pub list_codes: bool,
}

pub fn run(o: Options) -> anyhow::Result<ExitCode> {
    let severity = |flag: &str, value: &str| {
        Severity::parse(value)
            .with_context(|| format!("{flag} {value:?}: expected error, warning or info"))
    };
    let failure = severity("--failure-threshold", &o.failure_threshold)?;
    let shown = severity("--output-threshold", &o.output_threshold)?;
    anyhow::ensure!(
        matches!(o.output.as_str(), "table" | "json" | "yaml"),
        "-o {:?}: expected table, json or yaml",
        o.output
    );
    if o.list_codes {
        crate::outln!("{:<8} {:<8} {:<32} MEANING", "CODE", "SEVERITY", "NAME")?;
        for (code, name, severity, meaning) in CODES {
            crate::outln!("{code:<8} {:<8} {name:<32} {meaning}", severity.as_str())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut input = Input::default();
    let mut read = 0;
    for path in &o.files {
        for file in files_of(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            input.add_file(&file, &text);
            read += 1;
        }
    }
    anyhow::ensure!(
        read > 0,
        "no .yaml, .yml or .json file in {}",
        o.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let findings: Vec<Finding> = ambit_k8s::analyze::analyze(&input, &o.root_namespace)
        .into_iter()
        .filter(|f| f.severity <= shown)
        .collect();
    match o.output.as_str() {
        "json" => crate::outln!("{}", serde_json::to_string_pretty(&findings)?)?,
        "yaml" => crate::out!("{}", serde_yaml_ng::to_string(&findings)?)?,
        _ => print_table(&findings, read)?,
    }
    if findings.iter().any(|f| f.severity <= failure) {
        Ok(ExitCode::from(FOUND_ISSUES))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

fn print_table(findings: &[Finding], files: usize) -> std::io::Result<()> {
    if findings.is_empty() {
        return crate::outln!("✔ No findings in {files} file(s).");
    }
    for f in findings {
        let object = if f.object.is_empty() {
            String::new()
        } else {
            format!(" {} {}", f.kind, f.object)
        };
        let place = f
            .place
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        crate::outln!(
            "{} [{}] {}{object}{place}: {}",
            f.severity,
            f.code,
            f.name,
            f.message
        )?;
        crate::outln!("    fix: {}", f.fix)?;
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    crate::outln!(
        "{} error(s), {} warning(s), {} info in {files} file(s).",
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Info)
    )
}

/// `path` itself, or every YAML/JSON file below it (sorted, so findings are stable).
pub(crate) fn files_of(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let p = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}
