//! Process-level helpers: tying a child's life to its parent's (the local mesh, later
//! the node agent), raising the open-file limit for processes that hold many
//! connections and telling when it has run out, and the shutdown signal every Ambit
//! binary waits for.
//!
//! This module must not: start processes itself or decide which ones to start.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};

/// Makes the child that `cmd` starts get `SIGKILL` when its parent dies, so a killed
/// test run leaves no processes behind (`PR_SET_PDEATHSIG`, kept across `exec` of
/// programs that are not set-user-ID).
///
/// Linux delivers the signal when the *thread* that forked the child exits, not only
/// when the whole process does: spawn from a thread that lives as long as the child
/// should (not, for example, from a tokio blocking-pool thread, which exits when idle).
///
/// If the parent is already gone by the time the child sets the signal, the child
/// does not run the program: spawning fails with `ESRCH`.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe work is allowed: it makes two system calls (prctl, getppid),
    // allocates nothing (errors are raw OS codes) and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died between fork and prctl: the signal would
            // never come, since we were already reparented.
            if getppid() != parent {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        })
    }
}

/// Raises this process's soft limit of open files to its hard limit (processes that
/// open thousands of connections, such as load tests, need more than the usual 1024).
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Whether `error`, or any error it was caused by (its `source` chain, and the error an
/// `io::Error` wraps), is this process (EMFILE) or the whole system (ENFILE) out of
/// file descriptors. Proxies refuse a connection for this reason explicitly, and count
/// it apart from an upstream that failed: it is their own limit, not the far side.
pub fn out_of_descriptors(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(code) if code == Errno::EMFILE as i32 || code == Errno::ENFILE as i32)
            {
                return true;
            }
            // `io::Error::source` skips the error it wraps and goes to that one's
            // source: look at the wrapped one itself too.
            if let Some(inner) = io.get_ref() {
                if out_of_descriptors(inner) {
                    return true;
                }
            }
        }
        next = e.source();
    }
    false
}

/// Completes on SIGTERM (how Kubernetes and the local mesh stop a process) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How a proxy writes its log lines: `text` (human, one line per event) or `json`
/// (one JSON object per line, the event's fields at the top level beside
/// `timestamp`, `level`, `target` and `message`, for log collectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: the log format is text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// What every proxy binary's `main` does before its runtime: logs to stderr filtered
/// by `filter`, as text (colours only on a terminal) or JSON lines, with a handle that
/// changes the filter at run time (admin `/logging`), and the open-file limit raised
/// (every proxied connection holds descriptors; the default soft limit of 1024 would
/// cap a node at a few hundred connections).
pub fn init_proxy_process(
    filter: &str,
    format: LogFormat,
) -> Result<crate::admin::SetLogFilter, String> {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{reload, EnvFilter};
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("--log {filter:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(LogWriter)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(LogWriter)
    });
    std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| loop {
            std::thread::sleep(ACCESS_LOG_FLUSH);
            flush_logs();
        })
        .map_err(|e| format!("cannot start the log flusher: {e}"))?;
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    match raise_nofile_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    Ok(Box::new(move |f: &str| {
        let new = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(new).map_err(|e| e.to_string())
    }))
}

/// How long an access-log line may wait in memory (Envoy's access log flushes
/// every second too).
const ACCESS_LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// Buffered access-log bytes beyond which they are written at once.
const ACCESS_LOG_BUFFER: usize = 64 << 10;

/// Access-log lines (target `access`, one per request) not yet written to stderr.
static ACCESS_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Writes what the access log holds to stderr. The proxies call it as they exit;
/// a thread calls it every [`ACCESS_LOG_FLUSH`].
pub fn flush_logs() {
    let mut buffer = ACCESS_LOG.lock().unwrap_or_else(|p| p.into_inner());
    write_stderr(&mut buffer);
}

fn write_stderr(buffer: &mut Vec<u8>) {
    use std::io::Write;
    if !buffer.is_empty() {
        // Nowhere to report a failure to write the log.
        let _ = std::io::stderr().lock().write_all(buffer);
        buffer.clear();
    }
}

/// The proxies' log writer: the access log (per request, so on the hot path) is
/// buffered and written in batches, as Envoy's is, which saves a `write(2)` per
/// request; every other line is written at once, after what the buffer holds, so
/// lines stay in order.
#[derive(Debug, Clone, Copy)]
struct LogWriter;

/// Where one event's line goes. The formatting layer writes a line in one call.
struct LogLine {
    access: bool,
}

impl io::Write for LogLine {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut buffer = ACCESS_LOG.lock().unwrap_or_else(|p| p.into_inner());
        if self.access {
            buffer.extend_from_slice(bytes);
            if buffer.len() >= ACCESS_LOG_BUFFER {
                write_stderr(&mut buffer);
            }
        } else {
            write_stderr(&mut buffer);
            // Nowhere to report a failure to write the log.
            let _ = std::io::stderr().lock().write_all(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine { access: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogLine {
        LogLine {
            access: meta.target() == "access",
        }
    }
}

/// Parses a duration flag of the proxies: `250ms`, `5s` or plain milliseconds;
/// zero is refused.
pub fn parse_millis(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms or 5s"))?;
    if n == 0 {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(std::time::Duration::from_millis(n * mult))
}

/// Parses a certificate lifetime flag: `90s`, `30m`, `24h` or `2d`; under 10 s is
/// refused (renewal at half-life would hammer the CA).
pub fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a lifetime like 90s, 30m or 24h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    if secs < 10 {
        return Err(format!("{s:?}: a certificate must live at least 10s"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_lifetimes_parse_with_their_unit() {
        assert_eq!(parse_ttl("24h"), Ok(std::time::Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("90s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_ttl("2d"), Ok(std::time::Duration::from_secs(172_800)));
        assert!(parse_ttl("5s").unwrap_err().contains("at least 10s"));
        assert!(parse_ttl("24").unwrap_err().contains("unit"));
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn child_with_parent_death_signal_runs_normally() {
        let mut cmd = Command::new("true");
        let status = die_with_parent(&mut cmd).status().unwrap();
        assert!(status.success());
    }

    #[test]
    fn child_is_killed_when_the_thread_that_spawned_it_exits() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            die_with_parent(&mut cmd).spawn().unwrap()
        })
        .join()
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status:?}");
    }

    #[test]
    fn running_out_of_descriptors_is_told_apart_however_deep_it_is_wrapped() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed: {source}")]
        struct Wrapper {
            #[source]
            source: io::Error,
        }
        let emfile = || io::Error::from_raw_os_error(Errno::EMFILE as i32);
        let enfile = io::Error::from_raw_os_error(Errno::ENFILE as i32);
        let wrapped = io::Error::other(Wrapper { source: emfile() });
        let twice = Wrapper {
            source: io::Error::new(io::ErrorKind::InvalidData, Wrapper { source: emfile() }),
        };
        for (error, want) in [
            (&emfile() as &(dyn std::error::Error + 'static), true),
            (&enfile, true),
            (&wrapped, true),
            (&twice, true),
            (&io::Error::from(io::ErrorKind::ConnectionRefused), false),
            (
                &io::Error::other(Wrapper {
                    source: io::Error::from_raw_os_error(Errno::ECONNREFUSED as i32),
                }),
                false,
            ),
        ] {
            assert_eq!(out_of_descriptors(error), want, "{error}");
        }
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let raised = raise_nofile_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, hard), (raised, raised));
    }
}
