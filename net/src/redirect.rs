//! The pod redirect rule set: the iptables rules, one nftables rule and the policy
//! routes that, inside an
//! enrolled pod's network namespace, hand the pod's TCP traffic to the node's ztunnel
//! listening in that same namespace (in-pod mode, like Istio ambient). One
//! implementation, used by the CNI node agent and the local mesh.
//!
//! - Outbound TCP goes to [`OUTBOUND_PORT`] on loopback: a new connection gets
//!   [`CAPTURED_MARK`] as connmark and packet mark, the mark routes it to `lo`, and an
//!   nftables `tproxy` rule there hands it to the listener without rewriting the
//!   destination, so the accepted socket's local address is the original destination
//!   and its 4-tuple is the app's own (no NAT: see
//!   `docs/decisions/0005-outbound-capture-is-tproxy.md`). With no listener the packet
//!   goes on to local delivery and is answered with a reset: refused, never leaked.
//! - Inbound plaintext TCP goes to [`INBOUND_PLAINTEXT_PORT`] (mangle `TPROXY`, so the
//!   accepted socket's local address is the original destination). Inbound to
//!   [`HBONE_PORT`] is delivered normally: ztunnel listens on it in the namespace.
//! - ztunnel's own sockets carry [`ZTUNNEL_MARK`] and are never captured. Connections it
//!   opens to the app from the original source address get [`CAPTURED_MARK`] as
//!   connmark; the app's replies get it back as packet mark, and an `ip rule` sends
//!   them to a `local` default route (table [`RedirectConfig::route_table`]) so they
//!   reach ztunnel instead of the network.
//! - Never captured: traffic from the probe sources (kubelet health probes), loopback
//!   and the pod's traffic to itself, UDP (DNS included).
//! - IPv6 is captured the same way, or with [`Ipv6Mode::Drop`] its TCP is dropped;
//!   it is never left to pass in plaintext.
//!
//! The rules are pure functions of the config and of what the namespace holds now
//! ([`rules`], [`routing`]), table-tested; [`install`] and [`remove`] only run
//! `iptables-save`, `iptables-restore`, `nft`, `ip` and `sysctl` inside the namespace
//! with `nsenter`. [`install`] also sets `net.ipv4.tcp_migrate_req`, so a ztunnel
//! upgrade hands queued connections over instead of resetting them.
//!
//! This module must not: touch any chain not prefixed `AMBIT_`, any nftables table
//! but its own ([`rules::NFT_TABLE`]), or flush a built-in chain (the namespace's other
//! rules belong to the CNI and the runtime); decide which
//! pods are captured (the node agent does); leave a half-installed rule set behind
//! after a failed install; enter a namespace in-process (no `unsafe`, no `setns`).

pub mod node;
pub mod routing;
pub mod rules;

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

pub use ambit_core::hbone::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use routing::IpCommand;
use rules::{NetfilterState, RuleSet};

/// `SO_MARK` on every socket ztunnel creates in a pod's namespace (within [`MARK_MASK`]).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// Connmark and packet mark of the connections ztunnel opens to the app, whose replies
/// must come back to ztunnel (within [`MARK_MASK`]).
pub const CAPTURED_MARK: u32 = 0x111;
/// The mark bits this rule set reads and writes; other bits are left alone.
pub const MARK_MASK: u32 = 0xfff;
/// The route table holding the `local` default route for [`CAPTURED_MARK`].
pub const DEFAULT_ROUTE_TABLE: u32 = 100;

/// What to redirect in one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Sources never captured, and the pod's connections to them neither: by default
    /// the node's SNAT addresses for its own connections ([`node`]), so that kubelet
    /// probes pass while traffic the node forwards is captured.
    pub probe_sources: Vec<IpAddr>,
    pub ipv6: Ipv6Mode,
    /// Route table for the captured mark's `local` route; change it only if the pod's
    /// namespace already uses the default for something else.
    pub route_table: u32,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        RedirectConfig {
            probe_sources: node::probe_sources(),
            ipv6: Ipv6Mode::Capture,
            route_table: DEFAULT_ROUTE_TABLE,
        }
    }
}

/// What the pod's IPv6 TCP traffic gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv6Mode {
    /// Captured like IPv4. If that cannot be set up (ip6tables or IPv6 routing unusable
    /// in the namespace), [`install`] fails, rolls back and says so
    /// ([`RedirectError::failed_family`] is `Some(IpFamily::V6)`); the caller decides
    /// whether to install again with [`Ipv6Mode::Drop`].
    #[default]
    Capture,
    /// Not captured: IPv6 TCP is dropped inbound and reset outbound (filter table), so
    /// it never passes in plaintext. Only loopback and the probe sources are let
    /// through; the pod has no IPv6 TCP otherwise, ztunnel's included. Needs only the
    /// ip6tables filter table; if even that fails, [`install`] fails.
    Drop,
}

/// An address family, for which the rules are written with `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    fn save_program(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-save",
            IpFamily::V6 => "ip6tables-save",
        }
    }

    fn restore_program(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// Installs (or brings up to date) the redirect rule set in the network namespace
/// `netns` (`/run/netns/NAME` or `/proc/PID/ns/net`). Idempotent: installing again
/// leaves one copy of everything, and a changed config replaces the old rules.
///
/// Each family's netfilter part is written by one `iptables-restore --noflush` (one
/// transaction per table). If any step fails, everything of ours is removed from the
/// namespace again and the error names the step; if that removal fails too, the
/// error is [`RedirectError::RollbackFailed`].
///
/// Concurrent installs or removals in the same namespace must be serialized by the
/// caller: each step reads the current state, then writes.
pub fn install(netns: &Path, config: &RedirectConfig) -> Result<(), RedirectError> {
    let ns = Netns::open(netns)?;
    let Err(failure) = ns.install(config) else {
        tracing::debug!(netns = %netns.display(), ?config, "pod redirection installed");
        return Ok(());
    };
    match ns.remove(Some(config.route_table)) {
        Ok(()) => Err(failure),
        Err(rollback) => Err(RedirectError::RollbackFailed {
            netns: netns.to_owned(),
            install: Box::new(failure),
            rollback: Box::new(rollback),
        }),
    }
}

/// Removes every rule, chain, `ip rule` and route of ours from the network namespace
/// `netns`, whatever config installed them. Succeeds on a namespace holding none; fails
/// with [`RedirectError::NetnsUnavailable`] if the namespace itself is gone.
pub fn remove(netns: &Path) -> Result<(), RedirectError> {
    Netns::open(netns)?.remove(None)
}

/// Why installing or removing the rule set failed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("network namespace {} cannot be used: {source}", netns.display())]
    NetnsUnavailable {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{step} in network namespace {}: cannot run `{command}`: {source}", netns.display())]
    Spawn {
        netns: PathBuf,
        step: Step,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{step} in network namespace {}: `{command}` failed ({status}): {stderr}", netns.display())]
    CommandFailed {
        netns: PathBuf,
        step: Step,
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(
        "{install}; removing the partial install from network namespace {} failed too, \
         so rules may be left in it: {rollback}",
        netns.display()
    )]
    RollbackFailed {
        netns: PathBuf,
        install: Box<RedirectError>,
        rollback: Box<RedirectError>,
    },
}

impl RedirectError {
    /// The family whose rules could not be set up (for an install, the first failure).
    pub fn failed_family(&self) -> Option<IpFamily> {
        match self {
            RedirectError::NetnsUnavailable { .. } => None,
            RedirectError::Spawn { step, .. } | RedirectError::CommandFailed { step, .. } => {
                step.family()
            }
            RedirectError::RollbackFailed { install, .. } => install.failed_family(),
        }
    }
}

/// The step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    ReadRules(IpFamily),
    WriteRules(IpFamily),
    ReadRouting(IpFamily),
    WriteRouting(IpFamily),
    WriteTproxy(IpFamily),
    /// `net.ipv4.tcp_migrate_req` (both families' TCP).
    MigrateQueued,
}

impl Step {
    pub fn family(self) -> Option<IpFamily> {
        match self {
            Step::ReadRules(family)
            | Step::WriteRules(family)
            | Step::ReadRouting(family)
            | Step::WriteRouting(family)
            | Step::WriteTproxy(family) => Some(family),
            Step::MigrateQueued => None,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::ReadRules(family) => write!(f, "reading the {family} netfilter rules"),
            Step::WriteRules(family) => write!(f, "writing the {family} netfilter rules"),
            Step::ReadRouting(family) => write!(f, "reading the {family} routing rules"),
            Step::WriteRouting(family) => write!(f, "writing the {family} routes"),
            Step::WriteTproxy(family) => {
                write!(f, "writing the {family} outbound TPROXY rule (nftables)")
            }
            Step::MigrateQueued => write!(f, "setting net.ipv4.tcp_migrate_req"),
        }
    }
}

/// Adds the node's SNAT of its own connections ([`node`]) for the pod addresses `add`
/// and removes it for `remove`, in the network namespace at `netns` (the node's: the
/// agent's own, or the one the local mesh gives a node). Other pods' rules stay.
pub fn node_snat(
    netns: &Path,
    add: &std::collections::BTreeSet<IpAddr>,
    remove: &std::collections::BTreeSet<IpAddr>,
) -> Result<(), RedirectError> {
    let ns = Netns::open(netns)?;
    for family in IpFamily::ALL {
        let save = ns.run(
            Step::ReadRules(family),
            family.save_program(),
            &["-t", "nat"],
            None,
        )?;
        let input = node::restore_input(family, add, remove, &save);
        if input.is_empty() {
            continue;
        }
        ns.run(
            Step::WriteRules(family),
            family.restore_program(),
            &["-w", "--noflush"],
            Some(&input),
        )?;
    }
    Ok(())
}

/// A network namespace the tools are run in.
struct Netns<'a> {
    path: &'a Path,
}

impl<'a> Netns<'a> {
    fn open(path: &'a Path) -> Result<Self, RedirectError> {
        std::fs::metadata(path).map_err(|source| RedirectError::NetnsUnavailable {
            netns: path.to_owned(),
            source,
        })?;
        Ok(Netns { path })
    }

    /// Per family: the return route and the outbound TPROXY rule first, then the
    /// iptables rules that start capturing.
    fn install(&self, config: &RedirectConfig) -> Result<(), RedirectError> {
        // When a ztunnel closes a listener another one holds too (an upgrade: both
        // listen with SO_REUSEPORT), the connections queued on it move to the other
        // instead of being reset. Not fatal: without it (a kernel before 5.14) the
        // pod is served as well, and only an upgrade may reset a connection queued
        // at that instant.
        if let Err(e) = self.run(
            Step::MigrateQueued,
            "sysctl",
            &["-q", "-w", "net.ipv4.tcp_migrate_req=1"],
            None,
        ) {
            tracing::warn!(netns = %self.path.display(), error = %e, "a ztunnel upgrade may reset connections queued in this pod");
        }
        for family in IpFamily::ALL {
            let set = RuleSet::for_family(family, config);
            let capture = set == RuleSet::Capture;
            self.apply_routing(family, capture.then_some(config.route_table), None)?;
            self.apply_tproxy(family, capture)?;
            self.apply_rules(family, Some(set), config)?;
        }
        Ok(())
    }

    /// Per family: stop capturing first, then drop the routes. `table`, if given, is
    /// a route table that may hold our route without a rule pointing at it (an
    /// install that failed between the two).
    /// A family that fails does not stop the other from being cleaned; the first
    /// failure is returned.
    fn remove(&self, table: Option<u32>) -> Result<(), RedirectError> {
        let mut first_failure = None;
        for family in IpFamily::ALL {
            let removed = self
                .apply_rules(family, None, &RedirectConfig::default())
                .and_then(|()| self.apply_tproxy(family, false))
                .and_then(|()| self.apply_routing(family, None, table));
            if let Err(e) = removed {
                first_failure.get_or_insert(e);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    fn apply_rules(
        &self,
        family: IpFamily,
        set: Option<RuleSet>,
        config: &RedirectConfig,
    ) -> Result<(), RedirectError> {
        let save = self.run(Step::ReadRules(family), family.save_program(), &[], None)?;
        let current = NetfilterState::parse(&save);
        let input = rules::restore_input(family, set, config, &current);
        if input.is_empty() {
            return Ok(());
        }
        let args = ["-w", "--noflush"];
        self.run(
            Step::WriteRules(family),
            family.restore_program(),
            &args,
            Some(&input),
        )?;
        Ok(())
    }

    fn apply_tproxy(&self, family: IpFamily, capture: bool) -> Result<(), RedirectError> {
        let input = rules::nft_input(family, capture);
        self.run(Step::WriteTproxy(family), "nft", &["-f", "-"], Some(&input))?;
        Ok(())
    }

    fn apply_routing(
        &self,
        family: IpFamily,
        table: Option<u32>,
        also_clear: Option<u32>,
    ) -> Result<(), RedirectError> {
        let list = self.ip(Step::ReadRouting(family), &routing::list_rules(family))?;
        let mut current = routing::capture_tables(&list);
        if let Some(extra) = also_clear.filter(|t| !current.contains(t)) {
            current.push(extra);
        }
        for command in routing::commands(family, table, &current) {
            self.ip(Step::WriteRouting(family), &command)?;
        }
        Ok(())
    }

    fn ip(&self, step: Step, command: &IpCommand) -> Result<String, RedirectError> {
        let args: Vec<&str> = command.args().iter().map(String::as_str).collect();
        match self.run(step, "ip", &args, None) {
            Err(RedirectError::CommandFailed { stderr, .. })
                if command.absent_ok() && routing::says_absent(&stderr) =>
            {
                Ok(String::new())
            }
            other => other,
        }
    }

    /// Runs `program args` in the namespace, feeding it `input`; returns its stdout.
    fn run(
        &self,
        step: Step,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, RedirectError> {
        let mut net = OsString::from("--net=");
        net.push(self.path);
        let command = format!(
            "nsenter --net={} {program} {}",
            self.path.display(),
            args.join(" ")
        );
        tracing::debug!(%command, "pod redirection");
        let spawn_error = |source| RedirectError::Spawn {
            netns: self.path.to_owned(),
            step,
            command: command.trim_end().to_owned(),
            source,
        };
        let mut child = Command::new("nsenter")
            .arg(net)
            .arg(program)
            .args(args)
            // `ip` prints strerror(), which routing::says_absent reads.
            .env("LC_ALL", "C")
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A tool that dies before reading all of it fails with a status and stderr,
            // which say more than the broken pipe.
            let _ = stdin.write_all(input.as_bytes());
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        if !output.status.success() {
            return Err(RedirectError::CommandFailed {
                netns: self.path.to_owned(),
                step,
                command: command.trim_end().to_owned(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
