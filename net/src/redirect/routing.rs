//! The policy-routing half of the pod rule set: packets carrying the captured mark
//! (the app's replies to connections ztunnel opened from a spoofed source) are
//! delivered locally through a `local` default route in a table of their own.
//!
//! As with the netfilter half, the commands depend on what is there now: the rules of
//! ours are found by priority and mark in `ip rule list` ([`capture_tables`]), so a
//! reinstall adds nothing twice and a removal needs no config.

use std::fmt;

use super::{IpFamily, CAPTURED_MARK, MARK_MASK};

/// Priority of our `ip rule`: just before the main table (32766), after anything a CNI
/// put at the usual low priorities.
pub const RULE_PRIORITY: u32 = 32764;

/// One `ip` invocation (the arguments after `ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpCommand {
    args: Vec<String>,
    absent_ok: bool,
}

impl IpCommand {
    fn new(family: IpFamily, args: &str, absent_ok: bool) -> IpCommand {
        let flag = match family {
            IpFamily::V4 => "-4",
            IpFamily::V6 => "-6",
        };
        IpCommand {
            args: std::iter::once(flag)
                .chain(args.split_whitespace())
                .map(str::to_owned)
                .collect(),
            absent_ok,
        }
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// A deletion whose object may already be gone: failing because it does not exist
    /// counts as success.
    pub fn absent_ok(&self) -> bool {
        self.absent_ok
    }
}

impl fmt::Display for IpCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ip {}", self.args.join(" "))
    }
}

/// Whether `ip`'s stderr says the object to delete was not there (with `LC_ALL=C`).
pub fn says_absent(stderr: &str) -> bool {
    [
        "No such file or directory",
        "No such process",
        "FIB table does not exist",
    ]
    .iter()
    .any(|m| stderr.contains(m))
}

/// The `ip rule list` arguments whose output [`capture_tables`] reads (numeric tables).
pub fn list_rules(family: IpFamily) -> IpCommand {
    let mut command = IpCommand::new(family, "rule list", false);
    command.args.insert(0, "-N".to_owned());
    command
}

/// The route tables of our rules in `ip -N rule list` output, one entry per rule.
pub fn capture_tables(rule_list: &str) -> Vec<u32> {
    let mark = format!("fwmark {CAPTURED_MARK:#x}/{MARK_MASK:#x}");
    let priority = format!("{RULE_PRIORITY}:");
    rule_list
        .lines()
        .filter(|line| line.trim_start().starts_with(&priority))
        .filter(|line| line.contains(&mark))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "lookup")?;
            words.next()?.parse().ok()
        })
        .collect()
}

/// Commands that leave exactly our rule and route for `table` in `family` (or, with
/// `None`, none of ours), given the tables of our rules found now.
pub fn commands(family: IpFamily, table: Option<u32>, current: &[u32]) -> Vec<IpCommand> {
    let local = match family {
        IpFamily::V4 => "local 0.0.0.0/0 dev lo",
        IpFamily::V6 => "local ::/0 dev lo",
    };
    let rule = |t: u32| {
        format!("fwmark {CAPTURED_MARK:#x}/{MARK_MASK:#x} pref {RULE_PRIORITY} lookup {t}")
    };

    let mut out = Vec::new();
    let mut kept = false;
    let mut stale_tables: Vec<u32> = Vec::new();
    for &t in current {
        if Some(t) == table && !kept {
            kept = true;
            continue;
        }
        out.push(IpCommand::new(
            family,
            &format!("rule del {}", rule(t)),
            true,
        ));
        if Some(t) != table && !stale_tables.contains(&t) {
            stale_tables.push(t);
        }
    }
    for t in stale_tables {
        out.push(IpCommand::new(
            family,
            &format!("route del {local} table {t}"),
            true,
        ));
    }
    if let Some(t) = table {
        // The route before the rule, so the rule never points at an empty table.
        out.push(IpCommand::new(
            family,
            &format!("route replace {local} table {t}"),
            false,
        ));
        if !kept {
            out.push(IpCommand::new(
                family,
                &format!("rule add {}", rule(t)),
                false,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(commands: &[IpCommand]) -> Vec<String> {
        commands.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn capture_tables_reads_our_rules_only() {
        let list = "0:\tfrom all lookup 255\n\
                    100:\tfrom all fwmark 0x111/0xfff lookup 7\n\
                    32764:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                    32764:\tfrom all fwmark 0x222/0xfff lookup 101\n\
                    32764:\tfrom all fwmark 0x111/0xfff lookup 102\n\
                    32766:\tfrom all lookup 254\n";
        assert_eq!(capture_tables(list), [100, 102]);
        assert_eq!(capture_tables(""), Vec::<u32>::new());
    }

    #[test]
    fn install_into_a_clean_namespace_adds_route_then_rule() {
        assert_eq!(
            lines(&commands(IpFamily::V4, Some(100), &[])),
            [
                "ip -4 route replace local 0.0.0.0/0 dev lo table 100",
                "ip -4 rule add fwmark 0x111/0xfff pref 32764 lookup 100",
            ]
        );
        assert_eq!(
            lines(&commands(IpFamily::V6, Some(100), &[])),
            [
                "ip -6 route replace local ::/0 dev lo table 100",
                "ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100",
            ]
        );
    }

    #[test]
    fn reinstall_keeps_the_rule_and_replaces_the_route() {
        assert_eq!(
            lines(&commands(IpFamily::V4, Some(100), &[100])),
            ["ip -4 route replace local 0.0.0.0/0 dev lo table 100"]
        );
    }

    #[test]
    fn a_changed_table_moves_rule_and_route_and_duplicates_go() {
        let commands = commands(IpFamily::V4, Some(200), &[100, 200, 200]);
        assert_eq!(
            lines(&commands),
            [
                "ip -4 rule del fwmark 0x111/0xfff pref 32764 lookup 100",
                "ip -4 rule del fwmark 0x111/0xfff pref 32764 lookup 200",
                "ip -4 route del local 0.0.0.0/0 dev lo table 100",
                "ip -4 route replace local 0.0.0.0/0 dev lo table 200",
            ]
        );
        assert!(commands[..3].iter().all(IpCommand::absent_ok));
        assert!(!commands[3].absent_ok());
    }

    #[test]
    fn removal_deletes_each_rule_and_its_route_tolerating_absence() {
        let commands = commands(IpFamily::V6, None, &[100]);
        assert_eq!(
            lines(&commands),
            [
                "ip -6 rule del fwmark 0x111/0xfff pref 32764 lookup 100",
                "ip -6 route del local ::/0 dev lo table 100",
            ]
        );
        assert!(commands.iter().all(IpCommand::absent_ok));
        assert!(super::commands(IpFamily::V4, None, &[]).is_empty());
    }

    #[test]
    fn absence_is_recognised_from_ip_error_messages() {
        assert!(says_absent(
            "RTNETLINK answers: No such file or directory\n"
        ));
        assert!(says_absent("RTNETLINK answers: No such process\n"));
        assert!(says_absent("Error: FIB table does not exist.\n"));
        assert!(!says_absent("Error: IPv6 is disabled on nexthop device.\n"));
    }
}
