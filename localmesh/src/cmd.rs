//! Running the short-lived tools the mesh is built with (`ip`, `iptables-restore`,
//! `sysctl`, CNI plugins), each to completion, its failure described by the command
//! line and what it printed.

use std::ffi::OsStr;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::MeshError;

/// A command line to run, with what to feed its standard input.
#[derive(Debug)]
pub(crate) struct Cmd {
    cmd: Command,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub(crate) fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            cmd: Command::new(program),
            stdin: None,
        }
    }

    /// `program` run inside the network namespace `netns` (a path) with `nsenter`.
    pub(crate) fn in_netns(netns: &Path, program: impl AsRef<OsStr>) -> Cmd {
        let mut cmd = Cmd::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    pub(crate) fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Cmd {
        self.cmd.arg(arg);
        self
    }

    pub(crate) fn args<I, S>(&mut self, args: I) -> &mut Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub(crate) fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Cmd {
        self.cmd.env(key, value);
        self
    }

    pub(crate) fn stdin(&mut self, input: impl Into<Vec<u8>>) -> &mut Cmd {
        self.stdin = Some(input.into());
        self
    }

    pub(crate) fn display(&self) -> String {
        let mut line = self.cmd.get_program().to_string_lossy().into_owned();
        for arg in self.cmd.get_args() {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    /// Runs it to completion; its standard output on success.
    pub(crate) fn run(&mut self) -> Result<String, MeshError> {
        let out = self.output()?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(MeshError::CommandFailed {
            command: self.display(),
            status: out.status,
            output: format!("{}{}", out.stderr.trim(), out.stdout.trim()),
        })
    }

    /// Runs it to completion whatever its exit status.
    pub(crate) fn output(&mut self) -> Result<Output, MeshError> {
        let command = self.display();
        let spawn_error = |source| MeshError::Spawn {
            command: command.clone(),
            source,
        };
        self.cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The child runs only while this thread waits for it.
        ambit_net::process::die_with_parent(&mut self.cmd);
        let mut child = self.cmd.spawn().map_err(spawn_error)?;
        // Written from another thread: an input larger than the pipe must not block
        // us while the child blocks writing output we are not reading yet. A child
        // that exits without reading shows up as its own failure, so a write error
        // is not the story.
        let writer = match (self.stdin.take(), child.stdin.take()) {
            (Some(input), Some(mut pipe)) => Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            })),
            _ => None,
        };
        let out = child.wait_with_output().map_err(spawn_error)?;
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        Ok(Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

#[derive(Debug)]
pub(crate) struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `script` (one `ip` command per line, without the leading `ip`) in the network
/// namespace named `netns` (or the current one for `None`) with a single `ip -batch`.
pub(crate) fn ip_batch(netns: Option<&str>, script: &str) -> Result<(), MeshError> {
    let mut cmd = Cmd::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]).stdin(script);
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(MeshError::CommandFailed {
        command: format!("{} <<EOF\n{script}EOF", cmd.display()),
        status: out.status,
        output: format!("{}{}", out.stderr.trim(), out.stdout.trim()),
    })
}

/// Applies `rules` (iptables-restore format) in the namespace at `netns` without
/// touching anything they do not name; waits for the xtables lock.
pub(crate) fn iptables_restore(netns: &Path, rules: &str) -> Result<(), MeshError> {
    let mut cmd = Cmd::in_netns(netns, "iptables-restore");
    cmd.args(["-w", "--noflush"]).stdin(rules);
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(MeshError::CommandFailed {
        command: format!("{} <<EOF\n{rules}EOF", cmd.display()),
        status: out.status,
        output: format!("{}{}", out.stderr.trim(), out.stdout.trim()),
    })
}
