//! `ambitctl local`: `up` starts a supervisor process that builds the mesh and owns it
//! (its processes die with it, and the mesh's names carry its pid, so a later sweep
//! removes whatever a killed supervisor left); `exec`, `status` and `down` find it
//! through the state directory ([`state`]).

mod live;
mod requests;
mod rotate;
mod routes;
mod state;
mod supervisor;
pub(crate) mod waypoints;

use std::fs;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use state::{MeshState, NodeState, PodState};

use crate::config::LocalCommand;

/// How often `up` and `down` look at the supervisor.
const POLL: Duration = Duration::from_millis(50);

pub fn run(state_dir: &Path, command: LocalCommand) -> anyhow::Result<ExitCode> {
    match command {
        LocalCommand::Up {
            dir,
            bin_dir,
            timeout,
            log_format,
        } => up(state_dir, &dir, bin_dir, timeout, log_format),
        LocalCommand::Down { timeout } => down(state_dir, timeout),
        LocalCommand::Exec { pod, command } => exec(state_dir, &pod, &command),
        LocalCommand::Status => {
            let mesh = running(state_dir)?;
            crate::out!("{}", describe(&mesh, &waypoints_of(&mesh), &live_of(&mesh)))?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Apply { file } => apply(state_dir, &file),
        LocalCommand::Delete { file } => delete(state_dir, &file),
        LocalCommand::RotateRoot {
            overlap,
            wait,
            timeout,
        } => {
            let mesh = running(state_dir)?;
            Ok(match rotate::rotate_root(&mesh, overlap, wait, timeout)? {
                true => ExitCode::SUCCESS,
                false => ExitCode::FAILURE,
            })
        }
        LocalCommand::UpgradeZtunnel { node, binary, wait } => {
            upgrade_ztunnel(state_dir, node, binary, wait)
        }
        LocalCommand::Supervise {
            dir,
            bin_dir,
            log_format,
        } => supervisor::run(state_dir, &dir, &bin_dir, log_format),
    }
}

/// Kinds `local apply` takes: those the control plane reads that need nothing of the
/// mesh, written for it; and ([`live::MESH_KINDS`]) a waypoint Gateway, which the
/// supervisor starts, and the waypoint labels of a running Namespace, Service or Pod
/// (pods, services and namespaces themselves come from the directory `up` ran).
const APPLY_KINDS: [&str; 8] = [
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
    "ServiceEntry",
    "HTTPRoute",
    "GRPCRoute",
    "VirtualService",
    "DestinationRule",
];

/// How long the supervisor may take to answer (a waypoint has to start).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// A document for the supervisor, with where it was written (`file:line`).
type MeshDocument = (String, serde_json::Value);

/// The documents of `file` for the supervisor ([`live::MESH_KINDS`]), and the text of
/// the others for the control plane (`text` itself when there are no mesh documents,
/// so its comments stay; `None` when there are no others).
fn split_for_mesh(file: &Path, text: &str) -> anyhow::Result<(Vec<MeshDocument>, Option<String>)> {
    let documents = crate::manifest::parse_documents(file, text)?;
    let is_mesh = |v: &serde_json::Value| {
        v["kind"]
            .as_str()
            .is_some_and(|k| live::MESH_KINDS.contains(&k))
    };
    if !documents.iter().any(|(_, v)| is_mesh(v)) {
        return Ok((Vec::new(), Some(text.to_owned())));
    }
    let mut mesh = Vec::new();
    let mut rest = Vec::new();
    for (at, value) in documents {
        if is_mesh(&value) {
            mesh.push((at.to_string(), value));
        } else {
            rest.push(serde_yaml_ng::to_string(&value)?);
        }
    }
    Ok((mesh, (!rest.is_empty()).then(|| rest.join("---\n"))))
}

/// Asks the running mesh's supervisor for what only it can do; prints what it did.
fn ask_supervisor(
    state_dir: &Path,
    delete: bool,
    objects: Vec<(String, serde_json::Value)>,
) -> anyhow::Result<()> {
    let mesh = running(state_dir)?;
    let reply = requests::send(
        state_dir,
        mesh.supervisor,
        &requests::Request {
            delete,
            objects,
            upgrade: None,
        },
        REQUEST_TIMEOUT,
    )?;
    if !reply.ok {
        for line in &reply.lines {
            crate::output::stderr(format_args!("{line}"));
        }
        anyhow::bail!(
            "refused by the running mesh ({} line(s) above){}",
            reply.lines.len(),
            if reply.lines.len() > 1 {
                "; what the lines before the last say was done stays done"
            } else {
                ", nothing changed"
            }
        );
    }
    for line in &reply.lines {
        crate::outln!("{line}")?;
    }
    Ok(())
}

/// `local upgrade-ztunnel`: asks the supervisor to replace the nodes' ztunnels one
/// node at a time (each new one serves every pod before the old one stops); with
/// `wait`, returns once the old ones have drained and exited.
fn upgrade_ztunnel(
    state_dir: &Path,
    nodes: Vec<String>,
    binary: Option<PathBuf>,
    wait: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let mesh = running(state_dir)?;
    for node in &nodes {
        if !mesh.nodes.iter().any(|n| &n.name == node) {
            anyhow::bail!(
                "--node {node}: the running mesh has no such node (it has {})",
                mesh.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let binary = match binary {
        Some(b) => Some(fs::canonicalize(&b).with_context(|| format!("--binary {}", b.display()))?),
        None => None,
    };
    let reply = requests::send(
        state_dir,
        mesh.supervisor,
        &requests::Request {
            delete: false,
            objects: Vec::new(),
            upgrade: Some(requests::UpgradeRequest { nodes, binary }),
        },
        REQUEST_TIMEOUT,
    )?;
    if !reply.ok {
        for line in &reply.lines {
            crate::output::stderr(format_args!("{line}"));
        }
        anyhow::bail!("the upgrade did not complete (the lines above say how far it got)");
    }
    for line in &reply.lines {
        crate::outln!("{line}")?;
    }
    if let Some(timeout) = wait {
        let start = Instant::now();
        loop {
            let left: Vec<u32> = reply
                .draining
                .iter()
                .copied()
                .filter(|p| state::pid_alive(*p))
                .collect();
            if left.is_empty() {
                crate::outln!("the replaced ztunnels have drained and exited")?;
                break;
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "ztunnel pid(s) {left:?} still draining after {timeout:?} (they exit at their drain deadline)"
                );
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the control plane of the running mesh reads what `file` applies.
fn applied_path(state_dir: &Path, file: &Path) -> anyhow::Result<PathBuf> {
    let mesh = running(state_dir)?;
    Ok(mesh.dir.join("k8s").join(applied_name(file)?))
}

/// The name of `file`'s copy in the mesh's directory: its stem and a hash of where it
/// is (its directory resolved), so two files of one name in two directories never
/// replace each other, and the same file applied again replaces itself.
fn applied_name(file: &Path) -> anyhow::Result<String> {
    let name = file
        .file_name()
        .with_context(|| format!("{}: not a file name", file.display()))?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = fs::canonicalize(&parent)
        .or_else(|_| std::path::absolute(&parent))
        .with_context(|| format!("{}", parent.display()))?;
    let hash = ambit_core::fnv1a(dir.as_os_str().as_encoded_bytes());
    let path = Path::new(name);
    let stem = path.file_stem().unwrap_or(name).to_string_lossy();
    let extension = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    Ok(format!("applied-{stem}-{:08x}{extension}", hash as u32))
}

/// What `ambitctl analyze` finds about the objects of `applied` (a copy of `file` in
/// the mesh's directory `k8s`), read with everything else the mesh runs: printed, not
/// refused (what could not be enforced as written was refused already).
fn report_findings(k8s: &Path, applied: &Path, file: &Path) -> anyhow::Result<()> {
    let mut input = ambit_k8s::analyze::Input::default();
    for path in crate::manifest::yaml_files(k8s)? {
        let text = fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        input.add_file(&path, &text);
    }
    let prefix = format!("{}:", applied.display());
    for f in ambit_k8s::analyze::analyze(&input, ambit_k8s::DEFAULT_ROOT_NAMESPACE) {
        let Some(line) = f.place.as_deref().and_then(|p| p.strip_prefix(&prefix)) else {
            continue;
        };
        crate::output::stderr(format_args!(
            "{}: {} [{}] {} {} {} ({}:{line}): {}\n    fix: {}",
            f.severity.as_str().to_lowercase(),
            f.severity,
            f.code,
            f.name,
            f.kind,
            f.object,
            file.display(),
            f.message,
            f.fix
        ));
    }
    Ok(())
}

pub(crate) fn apply(state_dir: &Path, file: &Path) -> anyhow::Result<ExitCode> {
    let text = fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let checked = check(file, &text, true);
    for note in &checked.notes {
        crate::output::stderr(format_args!("note: {note}"));
    }
    if !checked.refusals.is_empty() {
        for refusal in &checked.refusals {
            crate::output::stderr(format_args!("{refusal}"));
        }
        anyhow::bail!(
            "{}: refused, nothing applied: the control plane would not enforce it as written ({} problem(s) above)",
            file.display(),
            checked.refusals.len()
        );
    }
    anyhow::ensure!(
        !checked.applied.is_empty(),
        "{}: no object in it",
        file.display()
    );
    let (for_mesh, for_control) = split_for_mesh(file, &text)?;
    let target = applied_path(state_dir, file)?;
    if !for_mesh.is_empty() {
        ask_supervisor(state_dir, false, for_mesh)?;
    }
    if let Some(for_control) = for_control {
        let temporary = target.with_extension("tmp");
        fs::write(&temporary, &for_control).with_context(|| format!("{}", temporary.display()))?;
        fs::rename(&temporary, &target).with_context(|| format!("{}", target.display()))?;
        if let Some(k8s) = target.parent() {
            report_findings(k8s, &target, file)?;
        }
    }
    for object in checked.applied {
        crate::outln!("{object} applied")?;
    }
    crate::outln!("(the control plane picks it up within a second; ambit-control's log and each ztunnel's /config_dump say how it is enforced)")?;
    Ok(ExitCode::SUCCESS)
}

/// Refuses a directory for `up` with a document the control plane could not read or a
/// policy it would not enforce as written, as `apply` refuses a file.
fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let mut refusals = Vec::new();
    for path in crate::manifest::yaml_files(dir)? {
        let text = fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let checked = check(&path, &text, false);
        for note in &checked.notes {
            crate::outln!("    note: {note}")?;
        }
        refusals.extend(checked.refusals);
    }
    for refusal in &refusals {
        crate::output::stderr(format_args!("{refusal}"));
    }
    anyhow::ensure!(
        refusals.is_empty(),
        "{}: refused, nothing started: the control plane would not enforce it as written ({} problem(s) above)",
        dir.display(),
        refusals.len()
    );
    Ok(())
}

/// What `local apply` makes of a file.
#[derive(Debug, Default)]
struct Checked {
    /// `Kind namespace/name` of each object it applies.
    applied: Vec<String>,
    /// Why it is refused, each naming the file, the document and the field.
    refusals: Vec<String>,
    /// Enforced, but not exactly as written (the control plane says the same).
    notes: Vec<String>,
}

/// Reads `text` with the control plane's own reader and validates each security
/// policy with its own translation (`ambit_k8s`): a document it could not read, a
/// policy that fails validation (the control plane would enforce it closed, not as
/// written) or, for `apply`, a kind it does not take, is refused.
fn check(file: &Path, text: &str, apply: bool) -> Checked {
    use ambit_k8s::Object;
    let parsed = ambit_k8s::read::parse_file(file, text);
    let mut checked = Checked {
        refusals: parsed.errors.iter().map(ToString::to_string).collect(),
        ..Checked::default()
    };
    let root = ambit_k8s::DEFAULT_ROOT_NAMESPACE;
    for (object, (document, line)) in parsed.objects.iter().zip(&parsed.places) {
        let key = object.key();
        let at = format!("{}:{line}: document {document}", file.display());
        let acceptance = match object {
            // Already refused above, as the reader's error.
            Object::AuthorizationPolicy(p) if p.unreadable.is_some() => continue,
            Object::PeerAuthentication(p) if p.unreadable.is_some() => continue,
            Object::RequestAuthentication(p) if p.unreadable.is_some() => continue,
            Object::RequestAuthentication(p) => {
                Some(ambit_k8s::request_authn::translate(&key, p, root).acceptance)
            }
            Object::AuthorizationPolicy(p) => {
                Some(ambit_k8s::authz::translate(&key, p, root).acceptance)
            }
            Object::PeerAuthentication(p) => {
                Some(ambit_k8s::peer_authn::read_object(&key, p).acceptance)
            }
            Object::ServiceEntry(_)
            | Object::HttpRoute(_)
            | Object::GrpcRoute(_)
            | Object::VirtualService(_) => None,
            Object::DestinationRule(r) => {
                if let Err(e) = ambit_k8s::destination_rule::read(&key, r) {
                    checked
                        .refusals
                        .push(format!("{at}: DestinationRule {key}: {e}"));
                    continue;
                }
                None
            }
            _ if !apply => None,
            Object::Gateway(g) if g.spec.gateway_class_name != crate::manifest::WAYPOINT_CLASS => {
                checked.refusals.push(format!(
                    "{at}: Gateway {key}: spec.gatewayClassName is {:?}: the local mesh runs Gateways of class {} (waypoints) only",
                    g.spec.gateway_class_name,
                    crate::manifest::WAYPOINT_CLASS
                ));
                continue;
            }
            // The supervisor checks these against the running mesh.
            Object::Gateway(_) | Object::Namespace(_) | Object::Service(_) | Object::Pod(_) => None,
            other => {
                checked.refusals.push(format!(
                    "{at}: kind {:?}: `local apply` takes {}, a Gateway of class {} (a waypoint), and the waypoint labels ({}) of a running Namespace, Service or Pod",
                    other.kind(),
                    APPLY_KINDS.join(", "),
                    crate::manifest::WAYPOINT_CLASS,
                    live::WAYPOINT_LABELS.join(", ")
                ));
                continue;
            }
        };
        let kind = object.kind();
        match acceptance {
            Some(a) if a.reason == "InvalidValue" => {
                checked
                    .refusals
                    .push(format!("{at}: {kind} {key}: {}", a.message));
            }
            Some(a) if !a.accepted => {
                checked
                    .notes
                    .push(format!("{at}: {kind} {key}: {}", a.message));
            }
            _ => {}
        }
        checked.applied.push(format!("{kind} {key}"));
    }
    checked
}

pub(crate) fn delete(state_dir: &Path, file: &Path) -> anyhow::Result<ExitCode> {
    let target = applied_path(state_dir, file)?;
    // The mesh's part (a waypoint, waypoint labels) from the file as it is now.
    let for_mesh = match fs::read_to_string(file) {
        Ok(text) => split_for_mesh(file, &text)?.0,
        Err(_) => Vec::new(),
    };
    let had_mesh = !for_mesh.is_empty();
    if had_mesh {
        ask_supervisor(state_dir, true, for_mesh)?;
    }
    match fs::remove_file(&target) {
        Ok(()) => {
            crate::outln!("what {} applied is deleted", file.display())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && had_mesh => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "nothing applied from {} (see `local apply -f`)",
                file.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("{}", target.display())),
    }
}

/// The running mesh, or an error saying none runs.
pub(crate) fn running(state_dir: &Path) -> anyhow::Result<MeshState> {
    match state::read_pid(state_dir) {
        Some(pid) if state::pid_alive(pid) => MeshState::read(state_dir).with_context(|| {
            format!("the local mesh (supervisor pid {pid}) is still starting or stopping")
        }),
        _ => anyhow::bail!("no local mesh is running (start one with `ambitctl local up <dir>`)"),
    }
}

fn up(
    state_dir: &Path,
    dir: &Path,
    bin_dir: Option<PathBuf>,
    timeout: Duration,
    log_format: ambit_net::process::LogFormat,
) -> anyhow::Result<ExitCode> {
    if let Some(pid) = state::read_pid(state_dir).filter(|pid| state::pid_alive(*pid)) {
        let from = MeshState::read(state_dir)
            .map(|m| format!(" from {}", m.app.display()))
            .unwrap_or_default();
        anyhow::bail!(
            "a local mesh is already running{from} (supervisor pid {pid}); stop it first with `ambitctl local down`"
        );
    }
    // Bad YAML is reported before anything is made.
    let app = crate::manifest::load_dir(dir)?;
    check_dir(dir)?;
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the local mesh creates network namespaces and firewall rules: run ambitctl local up as root"
    );
    let exe = std::env::current_exe().context("finding ambitctl's own path")?;
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => exe
            .parent()
            .map(Path::to_path_buf)
            .context("ambitctl's directory")?,
    };
    for bin in ["ambit-control", "ztunnel", "ambit-cni"] {
        let path = bin_dir.join(bin);
        anyhow::ensure!(
            path.is_file(),
            "{} not found: build the binaries first (cargo build --bins), or give --bin-dir",
            path.display()
        );
    }
    let dir = fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    fs::create_dir_all(state_dir).with_context(|| format!("{}", state_dir.display()))?;
    // A pid file whose process is gone is a supervisor that was killed.
    state::clear(state_dir);
    let log_path = state_dir.join(state::LOG_FILE);
    let log = fs::File::create(&log_path).with_context(|| format!("{}", log_path.display()))?;
    crate::outln!(
        "==> starting the local mesh for {} ({} nodes, {} pods, {} services)",
        dir.display(),
        app.nodes.len(),
        app.pods.len(),
        app.services.len()
    )?;
    for note in &app.notes {
        crate::outln!("    note: {note}")?;
    }
    let mut supervisor = Command::new(&exe)
        .arg("local")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("supervise")
        .arg(&dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--log-format")
        .arg(log_format.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: Ctrl-C on `up` does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the supervisor")?;
    let start = Instant::now();
    let mut follow = Follow::new(&log_path);
    loop {
        if follow.print_new()? {
            break;
        }
        if let Some(status) = supervisor.try_wait()? {
            follow.print_new()?;
            // Whatever it made carries its pid, which is dead now.
            let _ = ambit_localmesh::sweep_stale();
            anyhow::bail!(
                "the local mesh did not start (supervisor pid {}: {status}); it removed what it had made. Its log is {}",
                supervisor.id(),
                log_path.display()
            );
        }
        if start.elapsed() > timeout {
            let _ = kill(pid_of(supervisor.id()), Signal::SIGTERM);
            let _ = supervisor.wait();
            let _ = ambit_localmesh::sweep_stale();
            anyhow::bail!(
                "the local mesh did not start within {timeout:?}; stopped it. Its log is {}",
                log_path.display()
            );
        }
        std::thread::sleep(POLL);
    }
    let mesh = MeshState::read(state_dir)?;
    crate::outln!()?;
    crate::out!("{}", describe(&mesh, &waypoints_of(&mesh), &live_of(&mesh)))?;
    crate::outln!()?;
    crate::outln!("Try (as root):")?;
    let client = mesh.pods.iter().find(|p| p.enrolled).or(mesh.pods.first());
    let target = mesh
        .services
        .iter()
        .map(|s| format!("http://{}.{}:{}/", s.name, s.namespace, s.ports[0].0))
        .next()
        .or_else(|| {
            mesh.pods.last().and_then(|p| {
                p.http_ports
                    .first()
                    .map(|port| format!("http://{}:{port}/", p.ip))
            })
        });
    if let (Some(client), Some(target)) = (client, target) {
        crate::outln!(
            "  ambitctl local exec {} -- ambitctl app get {target}",
            client.uid()
        )?;
    }
    crate::outln!(
        "  ambitctl local exec <pod> -- <command>      # any command, in the pod's network"
    )?;
    crate::outln!("  ambitctl local status")?;
    crate::outln!("  ambitctl local down                          # removes everything")?;
    crate::outln!("Logs: {}/logs", mesh.dir.display())?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a log file's lines as they are written.
struct Follow {
    path: PathBuf,
    offset: u64,
}

impl Follow {
    fn new(path: &Path) -> Follow {
        Follow {
            path: path.to_owned(),
            offset: 0,
        }
    }

    /// Prints the complete lines written since last time; true once the ready line
    /// was among them.
    fn print_new(&mut self) -> anyhow::Result<bool> {
        let mut file = fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                return Ok(false);
            }
            self.offset += n as u64;
            if line.trim_end() == state::READY_LINE {
                return Ok(true);
            }
            crate::out!("{line}")?;
        }
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

fn down(state_dir: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    // Without root neither the signal nor the sweep can work: say so at once, and
    // leave the state of a mesh that may well still be running alone.
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the local mesh's processes and network namespaces belong to root: run ambitctl local down as root (nothing was stopped)"
    );
    let Some(pid) = state::read_pid(state_dir).filter(|pid| state::pid_alive(*pid)) else {
        state::clear(state_dir);
        let swept = ambit_localmesh::sweep_stale()?;
        if swept.namespaces.is_empty() {
            crate::outln!("no local mesh is running")?;
        } else {
            crate::outln!(
                "no local mesh is running; removed what a stopped one left: {}",
                swept.namespaces.join(" ")
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let id = MeshState::read(state_dir).map(|m| m.id).ok();
    crate::outln!("==> stopping the local mesh (supervisor pid {pid})")?;
    let signal = |signal: Signal| {
        kill(pid_of(pid), signal).or_else(|e| match e {
            // It exited meanwhile.
            nix::errno::Errno::ESRCH => Ok(()),
            e => Err(anyhow::anyhow!(
                "cannot send {signal} to the supervisor (pid {pid}): {e}; the mesh is left running and its state kept"
            )),
        })
    };
    signal(Signal::SIGTERM)?;
    let start = Instant::now();
    while state::pid_alive(pid) {
        if start.elapsed() > timeout {
            crate::outln!("    it did not stop within {timeout:?}: killing it")?;
            signal(Signal::SIGKILL)?;
            while state::pid_alive(pid) && start.elapsed() < timeout + Duration::from_secs(5) {
                std::thread::sleep(POLL);
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    anyhow::ensure!(
        !state::pid_alive(pid),
        "the supervisor (pid {pid}) is still running after SIGKILL; its state is kept"
    );
    // Its processes died with it; its namespaces carry its (now dead) pid.
    let swept = ambit_localmesh::sweep_stale()?;
    let left: Vec<String> = match &id {
        Some(id) => fs::read_dir("/run/netns")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&format!("{id}-")))
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    anyhow::ensure!(
        left.is_empty() && swept.remaining.is_empty(),
        "network namespaces left behind: {}",
        left.into_iter()
            .chain(swept.remaining)
            .collect::<Vec<_>>()
            .join(" ")
    );
    state::clear(state_dir);
    crate::outln!("==> the local mesh is gone: no namespace, rule or process of it is left")?;
    Ok(ExitCode::SUCCESS)
}

fn exec(state_dir: &Path, pod: &str, command: &[std::ffi::OsString]) -> anyhow::Result<ExitCode> {
    let mesh = running(state_dir)?;
    let pod = mesh.pod(pod)?;
    let (program, args) = command.split_first().context("no command given")?;
    let program = if program == "ambitctl" {
        std::env::current_exe()?.into_os_string()
    } else {
        program.clone()
    };
    let status = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns.display()))
        .arg("--")
        .arg(&program)
        .args(args)
        .env("AMBIT_LOCAL_HOSTS", state_dir.join(state::HOSTS_FILE))
        .status()
        .with_context(|| format!("running nsenter for pod {}", pod.uid()))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// The mesh's waypoints as its control plane binds them; what could not be read is a
/// note, not a failure of `status`.
fn waypoints_of(mesh: &MeshState) -> waypoints::Waypoints {
    waypoints::read(mesh, &mesh.dir.join("k8s")).unwrap_or_else(|e| waypoints::Waypoints {
        waypoints: Vec::new(),
        problems: vec![format!("cannot read the control plane's objects: {e:#}")],
    })
}

/// What each node's ztunnel says now, for `local status`: its state, and the pods
/// its model holds as HBONE workloads.
#[derive(Debug, Default)]
struct Live {
    /// node → `serving model version N`, or why it did not answer.
    ztunnels: std::collections::BTreeMap<String, String>,
    /// uid → HBONE in some answering ztunnel's model.
    hbone: std::collections::BTreeMap<String, bool>,
}

fn live_of(mesh: &MeshState) -> Live {
    let mut live = Live::default();
    for node in &mesh.nodes {
        match crate::ztunnel_config::config_dump(node) {
            Ok(dump) => {
                live.ztunnels.insert(
                    node.name.clone(),
                    format!("serving, model version {}", dump["modelVersion"]),
                );
                for w in dump["model"]["workloads"].as_array().into_iter().flatten() {
                    if let Some(uid) = w["uid"].as_str() {
                        live.hbone
                            .insert(uid.to_owned(), w["protocol"].as_str() == Some("HBONE"));
                    }
                }
            }
            Err(e) => {
                live.ztunnels
                    .insert(node.name.clone(), format!("not answering ({e:#})"));
            }
        }
    }
    live
}

/// The mesh as a few tables.
fn describe(mesh: &MeshState, waypoints: &waypoints::Waypoints, live: &Live) -> String {
    let mut out = format!(
        "local mesh {} running {} (supervisor pid {})\ncontrol plane: ambit-control on {} (namespace {})\n\n",
        mesh.id,
        mesh.app.display(),
        mesh.supervisor,
        mesh.control,
        mesh.fabric_netns.display()
    );
    let mut table = vec![vec![
        "NODE".to_owned(),
        "ADDRESS".to_owned(),
        "NETWORK NAMESPACE (ztunnel admin on its localhost:15000)".to_owned(),
        "ZTUNNEL (now)".to_owned(),
    ]];
    for n in &mesh.nodes {
        table.push(vec![
            n.name.clone(),
            n.ip.to_string(),
            n.netns.display().to_string(),
            live.ztunnels
                .get(&n.name)
                .cloned()
                .unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    out.push_str(&columns(&table));
    out.push('\n');
    let mut table = vec![vec![
        "POD".to_owned(),
        "NODE".to_owned(),
        "IP".to_owned(),
        "MODE".to_owned(),
        "IDENTITY".to_owned(),
        "DEMO APP".to_owned(),
    ]];
    for p in &mesh.pods {
        let ports: Vec<String> = p
            .http_ports
            .iter()
            .map(|port| format!("http {port}"))
            .chain(p.tcp_ports.iter().map(|port| format!("tcp echo {port}")))
            .collect();
        let identity = format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            p.namespace, p.service_account
        );
        let (mode, identity, app) = match &p.waypoint {
            Some(gateway) => (
                "waypoint (HBONE 15008)".to_owned(),
                identity,
                format!("waypoint of Gateway {}/{gateway}", p.namespace),
            ),
            // As the ztunnels' models say now, else as enrolled at `up`.
            None if live.hbone.get(&p.uid()).copied().unwrap_or(p.enrolled) => {
                ("ambient (HBONE)".to_owned(), identity, ports.join(", "))
            }
            None => ("plaintext".to_owned(), "-".to_owned(), ports.join(", ")),
        };
        table.push(vec![
            p.uid(),
            p.node.clone(),
            p.ip.to_string(),
            mode,
            identity,
            app,
        ]);
    }
    out.push_str(&columns(&table));
    if !mesh.services.is_empty() {
        out.push('\n');
        let mut table = vec![vec![
            "SERVICE".to_owned(),
            "NAME IN PODS".to_owned(),
            "CLUSTER IP".to_owned(),
            "PORTS".to_owned(),
            "ENDPOINTS".to_owned(),
        ]];
        for s in &mesh.services {
            table.push(vec![
                format!("{}/{}", s.namespace, s.name),
                format!("{}.{}", s.name, s.namespace),
                s.vip.to_string(),
                s.ports
                    .iter()
                    .map(|(p, t)| format!("{p}->{t}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                s.endpoints.join(", "),
            ]);
        }
        out.push_str(&columns(&table));
    }
    if !waypoints.waypoints.is_empty() {
        out.push('\n');
        let mut table = vec![vec![
            "WAYPOINT".to_owned(),
            "POD".to_owned(),
            "READY".to_owned(),
            "IDENTITY".to_owned(),
            "SERVES (istio.io/use-waypoint)".to_owned(),
        ]];
        for w in &waypoints.waypoints {
            table.push(vec![
                w.gateway.clone(),
                w.pod.clone().unwrap_or_else(|| "-".to_owned()),
                w.readiness.clone(),
                w.identity.clone(),
                if w.serves.is_empty() {
                    "nothing bound".to_owned()
                } else {
                    w.serves.join(", ")
                },
            ]);
        }
        out.push_str(&columns(&table));
    }
    for problem in &waypoints.problems {
        out.push_str(&format!("waypoint binding: {problem}\n"));
    }
    match routes::read(&mesh.dir.join(ambit_localmesh::STATUS_FILE)) {
        Ok(rows) if rows.is_empty() => {}
        Ok(rows) => {
            out.push('\n');
            let mut table = vec![vec![
                "ROUTE".to_owned(),
                "PARENT".to_owned(),
                "ACCEPTED".to_owned(),
                "RESOLVED REFS".to_owned(),
            ]];
            for r in &rows {
                table.push(vec![
                    r.route.clone(),
                    r.parent.clone(),
                    r.accepted.clone(),
                    r.resolved_refs.clone(),
                ]);
            }
            out.push_str(&columns(&table));
            for problem in rows.iter().flat_map(|r| &r.problems) {
                out.push_str(&format!("route: {problem}\n"));
            }
        }
        Err(e) => out.push_str(&format!("routes: cannot read their status: {e:#}\n")),
    }
    for note in &mesh.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_of_one_name_in_two_directories_are_applied_side_by_side() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (in_a, in_b) = (a.path().join("policy.yaml"), b.path().join("policy.yaml"));
        let name = applied_name(&in_a).unwrap();
        assert!(
            name.starts_with("applied-policy-") && name.ends_with(".yaml"),
            "{name}"
        );
        assert_ne!(name, applied_name(&in_b).unwrap());
        // The same file, however it is named, replaces its own copy.
        let dotted = a.path().join(".").join("policy.yaml");
        assert_eq!(name, applied_name(&dotted).unwrap());
    }

    #[test]
    fn the_examples_pass_the_control_planes_own_checks() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for entry in fs::read_dir(examples).unwrap() {
            let dir = entry.unwrap().path();
            if dir.is_dir() {
                check_dir(&dir).unwrap();
            }
        }
    }

    #[test]
    fn apply_refuses_unreadable_and_invalid_policies_and_other_kinds_and_notes_the_rest() {
        let text = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: p}\n---\n\
            apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {name: a, namespace: shop}\nspec: {action: MAYBE}\n---\n\
            apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {name: l7, namespace: shop}\n\
            spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}\n---\n\
            apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
            metadata: {name: pa, namespace: shop, annotations: [x]}\nspec: {}\n";
        let checked = check(Path::new("f.yaml"), text, true);
        let all = checked.refusals.join("\n");
        assert_eq!(checked.refusals.len(), 3, "{all}");
        assert!(
            all.contains("f.yaml:1: document 1: kind \"GatewayClass\""),
            "{all}"
        );
        assert!(
            all.contains("f.yaml:5: document 2: AuthorizationPolicy shop/a: spec.action"),
            "{all}"
        );
        assert!(
            all.contains("f.yaml:15: document 4") && all.contains("metadata.annotations"),
            "{all}"
        );
        assert_eq!(checked.notes.len(), 1, "{:?}", checked.notes);
        assert!(checked.notes[0].contains("methods"), "{:?}", checked.notes);
        // Routes are the control plane's; a waypoint Gateway and running objects are
        // the supervisor's to check; another Gateway class is refused here.
        let routes = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
            metadata: {name: r, namespace: shop}\n\
            spec: {parentRefs: [{group: \"\", kind: Service, name: s}]}\n---\n\
            apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
            metadata: {name: g, namespace: shop}\n\
            spec: {parentRefs: [{group: \"\", kind: Service, name: s}]}\n---\n\
            apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
            metadata: {name: wp, namespace: shop}\nspec: {gatewayClassName: istio-waypoint, listeners: []}\n---\n\
            apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
            metadata: {name: in, namespace: shop}\nspec: {gatewayClassName: istio, listeners: []}\n";
        let checked = check(Path::new("r.yaml"), routes, true);
        assert_eq!(
            checked.applied,
            ["HTTPRoute shop/r", "GRPCRoute shop/g", "Gateway shop/wp"]
        );
        assert_eq!(checked.refusals.len(), 1, "{:?}", checked.refusals);
        assert!(
            checked.refusals[0].contains("Gateway shop/in: spec.gatewayClassName is \"istio\""),
            "{:?}",
            checked.refusals
        );
        let (mesh, control) = split_for_mesh(Path::new("r.yaml"), routes).unwrap();
        let kinds: Vec<&str> = mesh
            .iter()
            .map(|(_, v)| v["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["Gateway", "Gateway"]);
        let control = control.unwrap();
        assert!(
            control.contains("kind: HTTPRoute")
                && control.contains("kind: GRPCRoute")
                && !control.contains("kind: Gateway\n"),
            "{control}"
        );
        // For `up`, any kind; the same policies refused.
        assert_eq!(check(Path::new("f.yaml"), text, false).refusals.len(), 2);
    }
}
