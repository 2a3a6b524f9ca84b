//! `ambitctl local` driven as a user drives it: a state directory of its own per test
//! (`AMBITCTL_STATE_DIR`), `local down` when the test ends, passed or not, and the
//! mesh's `mesh.json` to find pods, services and processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::bin;

/// A state directory of its own, and `local down` when the test ends, passed or not.
pub struct Ctl {
    pub state: tempfile::TempDir,
}

impl Ctl {
    pub fn new() -> Ctl {
        Ctl {
            state: tempfile::Builder::new()
                .prefix("ambitctl-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin("ambitctl"))
            .args(args)
            .env("AMBITCTL_STATE_DIR", self.state.path())
            .output()
            .unwrap()
    }

    /// Runs with more environment (e.g. `SECRET_TTL` for the mesh's proxies).
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(bin("ambitctl"))
            .args(args)
            .env("AMBITCTL_STATE_DIR", self.state.path())
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// Runs and asserts success; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ambitctl {args:?} failed ({}):\n{}{}\nsupervisor log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.state.path().join("supervisor.log")).unwrap_or_default()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The running mesh as `up` recorded it.
    pub fn mesh(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state.path().join("mesh.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The network namespace (a path) of pod `name` of the running mesh.
    pub fn netns(&self, name: &str) -> PathBuf {
        let mesh = self.mesh();
        let pod = mesh["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no pod {name} in {mesh}"));
        PathBuf::from(pod["netns"].as_str().unwrap())
    }

    /// The Cluster IP of service `name`.
    pub fn vip(&self, name: &str) -> String {
        let mesh = self.mesh();
        mesh["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no service {name} in {mesh}"))["vip"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The process of the mesh's running in pod `name`'s network namespace (a
    /// waypoint's).
    pub fn process_in(&self, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(self.netns(name)).unwrap().ino();
        let want = format!("net:[{ino}]");
        self.mesh()["pids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .find(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == want)
            })
            .unwrap_or_else(|| panic!("no process of the mesh in pod {name}"))
    }

    /// Every log of the mesh's processes, for failure messages.
    pub fn logs(&self) -> String {
        let mut out =
            std::fs::read_to_string(self.state.path().join("supervisor.log")).unwrap_or_default();
        let Some(dir) = self.mesh()["dir"]
            .as_str()
            .map(|d| Path::new(d).join("logs"))
        else {
            return out;
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            // The tail: what went wrong is at the end.
            let tail: String = text
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            out.push_str(&format!("--- {} ---\n{tail}\n", file.display()));
        }
        out
    }
}

impl Default for Ctl {
    fn default() -> Ctl {
        Ctl::new()
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.run(&["local", "down"]);
    }
}

/// A client that keeps one TCP connection to the echo at argv[1]:argv[2] and sends a
/// line every 100 ms until the file argv[3] exists; any error or wrong echo fails it.
pub const LONG_LIVED_ECHO: &str = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
n = 0
buf = b""
while not os.path.exists(sys.argv[3]):
    line = b"ping %d\n" % n
    s.sendall(line)
    while b"\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            print("FAILED: connection closed after %d echoes" % n, flush=True)
            sys.exit(1)
        buf += chunk
    got, buf = buf.split(b"\n", 1)
    if got + b"\n" != line:
        print("FAILED: echo %r for %r" % (got, line), flush=True)
        sys.exit(1)
    n += 1
    time.sleep(0.1)
print("OK %d echoes" % n, flush=True)
"#;

/// A client that opens a new TCP connection to the echo at argv[1]:argv[2] every
/// 10 ms (each in its own thread, so a slow one never delays the next), sends a line,
/// reads it back and closes, until the file argv[3] exists. It writes how many it has
/// made to argv[4] as it goes, and when it stops prints `made N failed M` and one
/// line per failure (refused, reset, timed out, closed early, wrong echo).
pub const CHURN_ECHO: &str = r#"
import os, socket, sys, threading, time
host, port, stop, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock()
made = 0
failures = []
def one(n):
    global made
    line = b"conn %d\n" % n
    try:
        s = socket.create_connection((host, port), timeout=10)
        try:
            s.sendall(line)
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise EOFError("closed after %r" % buf)
                buf += chunk
            if buf != line:
                raise ValueError("echo %r for %r" % (buf, line))
        finally:
            s.close()
        with lock:
            made += 1
    except Exception as e:
        with lock:
            failures.append("connection %d: %s: %s" % (n, type(e).__name__, e))
threads = []
start = time.monotonic()
n = 0
while not os.path.exists(stop):
    t = threading.Thread(target=one, args=(n,))
    t.start()
    threads.append(t)
    n += 1
    if n % 10 == 0:
        with lock:
            done = made
        with open(progress + ".tmp", "w") as f:
            f.write(str(done))
        os.replace(progress + ".tmp", progress)
    delay = start + n * 0.01 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
for t in threads:
    t.join()
print("made %d failed %d" % (made, len(failures)), flush=True)
for f in failures:
    print(f, flush=True)
"#;

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}
