//! Processes the mesh runs inside its namespaces (apps, and later ztunnel, the CA, the
//! control plane): started through `nsenter`, their output captured to a log file,
//! killed when their handle or their mesh goes away, and when this process dies.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often log files and exit statuses are polled while waiting for them.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How much of a log an error message quotes.
const LOG_TAIL: usize = 4000;

/// A process running in one of the mesh's namespaces. Clones share it; dropping the
/// last one stops it: `SIGTERM`, then `SIGKILL` if it has not exited within the mesh's
/// stop grace period.
#[derive(Debug, Clone)]
pub struct Process {
    inner: Arc<ProcessInner>,
}

#[derive(Debug)]
pub(crate) struct ProcessInner {
    label: String,
    pid: u32,
    netns: PathBuf,
    log_path: PathBuf,
    grace: Duration,
    child: Mutex<Child>,
    /// Set once the child has been reaped.
    status: Mutex<Option<ExitStatus>>,
}

/// Why waiting on a process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{label}: `{pattern}` did not appear in its log within {waited:?}; log:\n{log}")]
    LogTimeout {
        label: String,
        pattern: String,
        waited: Duration,
        log: String,
    },
    #[error("{label} exited ({status}) before `{pattern}` appeared in its log; log:\n{log}")]
    ExitedBeforeLog {
        label: String,
        pattern: String,
        status: ExitStatus,
        log: String,
    },
    #[error("{label} still running after {waited:?}; log:\n{log}")]
    StillRunning {
        label: String,
        waited: Duration,
        log: String,
    },
    #[error("{label}: waiting for exit: {source}")]
    Wait {
        label: String,
        #[source]
        source: io::Error,
    },
}

impl Process {
    /// Starts `program` inside the network namespace `netns` with its output appended
    /// to `log_path`.
    pub(crate) fn spawn(
        label: String,
        netns: &Path,
        program: &std::ffi::OsStr,
        args: Vec<std::ffi::OsString>,
        env: &[(&str, &str)],
        log_path: PathBuf,
        grace: Duration,
    ) -> io::Result<Process> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        ambit_net::process::die_with_parent(&mut cmd);
        let child = spawn_on_spawner_thread(cmd)?;
        Ok(Process {
            inner: Arc::new(ProcessInner {
                label,
                pid: child.id(),
                netns: netns.to_owned(),
                log_path,
                grace,
                child: Mutex::new(child),
                status: Mutex::new(None),
            }),
        })
    }

    pub(crate) fn inner(&self) -> &Arc<ProcessInner> {
        &self.inner
    }

    /// A short name for messages: the program and where it runs.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The network namespace it runs in.
    pub fn netns(&self) -> &Path {
        &self.inner.netns
    }

    /// The file holding its standard output and standard error.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// Everything it has written so far (invalid UTF-8 replaced).
    pub fn log(&self) -> String {
        read_log(&self.inner.log_path)
    }

    /// Polls the log until a line contains `pattern` and returns that line. Fails if
    /// the deadline passes or the process exits first; the error quotes the log.
    pub fn wait_for_log(&self, pattern: &str, deadline: Duration) -> Result<String, ProcessError> {
        let start = Instant::now();
        // Complete lines before this offset have been searched already.
        let mut searched = 0;
        loop {
            // Read the exit status first: a process that wrote the line and then
            // exited must still count as a match.
            let status = self.try_wait()?;
            let chunk = read_from(&self.inner.log_path, searched);
            if let Some(line) = String::from_utf8_lossy(&chunk)
                .lines()
                .find(|l| l.contains(pattern))
            {
                return Ok(line.to_owned());
            }
            // Search a line still being written again next time, whole.
            searched += chunk.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if let Some(status) = status {
                let log = self.log();
                return Err(ProcessError::ExitedBeforeLog {
                    label: self.inner.label.clone(),
                    pattern: pattern.to_owned(),
                    status,
                    log: tail(&log),
                });
            }
            if start.elapsed() >= deadline {
                return Err(ProcessError::LogTimeout {
                    label: self.inner.label.clone(),
                    pattern: pattern.to_owned(),
                    waited: deadline,
                    log: tail(&self.log()),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits up to `deadline` for `ready` to hold (checked every poll interval),
    /// failing as [`Process::wait_for_log`] does, `what` naming the wait, if the
    /// process exits first or the deadline passes.
    pub fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), ProcessError> {
        let start = Instant::now();
        loop {
            let status = self.try_wait()?;
            if status.is_none() && ready() {
                return Ok(());
            }
            if let Some(status) = status {
                return Err(ProcessError::ExitedBeforeLog {
                    label: self.inner.label.clone(),
                    pattern: what.to_owned(),
                    status,
                    log: tail(&self.log()),
                });
            }
            if start.elapsed() >= deadline {
                return Err(ProcessError::LogTimeout {
                    label: self.inner.label.clone(),
                    pattern: what.to_owned(),
                    waited: deadline,
                    log: tail(&self.log()),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, ProcessError> {
        self.inner.try_wait().map_err(|source| ProcessError::Wait {
            label: self.inner.label.clone(),
            source,
        })
    }

    /// Waits up to `deadline` for it to exit on its own.
    pub fn wait(&self, deadline: Duration) -> Result<ExitStatus, ProcessError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() >= deadline {
                return Err(ProcessError::StillRunning {
                    label: self.inner.label.clone(),
                    waited: deadline,
                    log: tail(&self.log()),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `signal` (for example `SIGTERM`, to test a graceful drain). Does nothing
    /// once the process has been reaped.
    pub fn signal(&self, signal: Signal) {
        self.inner.signal(signal);
    }

    /// Stops it now: `SIGTERM`, then `SIGKILL` after the grace period. Returns how it
    /// ended.
    pub fn stop(&self) -> Result<ExitStatus, ProcessError> {
        stop_all(&[&*self.inner]);
        self.try_wait()?.ok_or_else(|| ProcessError::StillRunning {
            label: self.inner.label.clone(),
            waited: self.inner.grace,
            log: tail(&self.log()),
        })
    }
}

impl Drop for ProcessInner {
    fn drop(&mut self) {
        // The last handle is gone (the mesh holds only weak references).
        stop_all(&[&*self]);
    }
}

impl ProcessInner {
    pub(crate) fn netns(&self) -> &Path {
        &self.netns
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        // A Child stays usable whatever panicked while it was locked.
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn exited(&self) -> Option<ExitStatus> {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.exited() {
            return Ok(Some(status));
        }
        let status = self.child().try_wait()?;
        if let Some(status) = status {
            *self.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
        }
        Ok(status)
    }

    fn signal(&self, signal: Signal) {
        // Hold the child while signalling so it cannot be reaped (and its pid reused)
        // in between.
        let _child = self.child();
        if self.exited().is_none() {
            let Ok(pid) = i32::try_from(self.pid) else {
                return;
            };
            // ESRCH (already a zombie being reaped elsewhere) is harmless.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Stops every process in `processes` together: `SIGTERM` to all, then waits for them
/// up to the longest grace period, then `SIGKILL` to the rest, and reaps them all.
pub(crate) fn stop_all(processes: &[&ProcessInner]) {
    let running: Vec<&ProcessInner> = processes
        .iter()
        .copied()
        .filter(|p| matches!(p.try_wait(), Ok(None)))
        .collect();
    for p in &running {
        p.signal(Signal::SIGTERM);
    }
    let grace = running.iter().map(|p| p.grace).max().unwrap_or_default();
    let start = Instant::now();
    loop {
        let still: Vec<_> = running
            .iter()
            .filter(|p| matches!(p.try_wait(), Ok(None)))
            .collect();
        if still.is_empty() {
            return;
        }
        if start.elapsed() >= grace {
            for p in still {
                p.signal(Signal::SIGKILL);
                // SIGKILL cannot be ignored: this wait returns promptly.
                let mut child = p.child();
                if let Ok(status) = child.wait() {
                    *p.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
                }
            }
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Children die with the thread that forked them (`PR_SET_PDEATHSIG`), so every
/// long-running child is forked by one thread that lives as long as this process: a
/// test's thread ending, or a mesh being used from several threads, never kills a
/// process early, while this process dying kills them all.
fn spawn_on_spawner_thread(cmd: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<io::Result<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("localmesh-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| tx)
    });
    let spawner = match spawner {
        Ok(tx) => tx,
        Err(e) => return Err(io::Error::new(e.kind(), format!("spawner thread: {e}"))),
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let gone = || io::Error::other("the spawner thread is gone");
    spawner.send((cmd, reply_tx)).map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}

/// The log from byte `offset` on (nothing if it cannot be read: the caller keeps
/// polling, and its error quotes [`read_log`]).
fn read_from(path: &Path, offset: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset as u64)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    bytes
}

pub(crate) fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The end of a log, for error messages.
pub(crate) fn tail(log: &str) -> String {
    if log.len() <= LOG_TAIL {
        return log.to_owned();
    }
    let mut start = log.len() - LOG_TAIL;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &log[start..])
}
