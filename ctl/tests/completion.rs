//! `ambitctl completion bash`, sourced into a real bash, completes subcommands and
//! flags as a user typing them gets them.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn complete(words: &[&str]) -> Vec<String> {
    let bin = env!("CARGO_BIN_EXE_ambitctl");
    let script = format!(
        "source <('{bin}' completion bash) || exit 9; COMP_WORDS=({words}); COMP_CWORD={cword}; \
         _ambitctl ambitctl '{last}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words = words.join(" "),
        cword = words.len() - 1,
        last = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completes_subcommands_and_flags() {
    assert_eq!(complete(&["ambitctl", "ana"]), ["analyze"]);
    let flags = complete(&["ambitctl", "authz", "explain", "--f"]);
    assert!(flags.contains(&"--from".to_owned()), "{flags:?}");
    let waypoint = complete(&["ambitctl", "waypoint", "l"]);
    assert_eq!(waypoint, ["list"]);
    let bad = Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tcsh"));
}
