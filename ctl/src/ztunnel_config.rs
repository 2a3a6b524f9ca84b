//! `ambitctl ztunnel-config workloads|services|policies|certificates|all [--node N]`:
//! what each ztunnel of the running local mesh holds, read from its own admin
//! endpoint (`/config_dump` on the node's loopback, port 15000), not from the files
//! the control plane reads: so it shows what ztunnel enforces.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::local::waypoints::http_get;

const ADMIN_PORT: u16 = 15000;

pub fn run(
    state_dir: &Path,
    what: &str,
    node: Option<&str>,
    output: &str,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        matches!(output, "table" | "json"),
        "-o {output:?}: expected table or json"
    );
    let mesh = crate::local::running(state_dir)?;
    let nodes: Vec<_> = mesh
        .nodes
        .iter()
        .filter(|n| node.is_none_or(|want| want == n.name))
        .collect();
    if let Some(want) = node {
        anyhow::ensure!(
            !nodes.is_empty(),
            "--node {want}: the mesh's nodes are {}",
            mesh.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut dumps = Vec::new();
    for n in &nodes {
        dumps.push((n.name.clone(), config_dump(n)?));
    }
    let sections: &[&str] = match what {
        "all" => &["workloads", "services", "policies", "certificates"],
        "workloads" => &["workloads"],
        "services" => &["services"],
        "policies" => &["policies"],
        _ => &["certificates"],
    };
    if output == "json" {
        let out: Vec<Value> = dumps
            .iter()
            .map(|(node, d)| {
                let mut o = json!({"node": node});
                for s in sections {
                    o[*s] = section(d, s).clone();
                }
                o
            })
            .collect();
        crate::outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for (node, d) in &dumps {
        for s in sections {
            crate::outln!("== ztunnel on {node}: {s}")?;
            table(s, section(d, s))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `node`'s ztunnel's `/config_dump`.
pub(crate) fn config_dump(node: &crate::local::NodeState) -> anyhow::Result<Value> {
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT);
    let (status, body) = http_get(&node.netns, addr, "/config_dump", Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("ztunnel on {}: admin {addr}: {e}", node.name))?;
    anyhow::ensure!(
        status == 200,
        "ztunnel on {}: /config_dump answered {status}: {body}",
        node.name
    );
    serde_json::from_str(&body)
        .with_context(|| format!("ztunnel on {}: /config_dump is not JSON", node.name))
}

fn section<'a>(dump: &'a Value, name: &str) -> &'a Value {
    match name {
        "certificates" => &dump["certificates"],
        other => &dump["model"][other],
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The first string of a list (an address of `ips` or `vips`).
fn first(v: &Value) -> &str {
    v.as_array()
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn waypoint(v: &Value) -> String {
    if v.is_null() {
        "None".to_owned()
    } else {
        format!("{}/{}", s(&v["namespace"]), s(&v["name"]))
    }
}

fn table(section: &str, rows: &Value) -> std::io::Result<()> {
    let rows = rows.as_array().cloned().unwrap_or_default();
    match section {
        "workloads" => {
            crate::outln!(
                "{:<14} {:<24} {:<16} {:<10} {:<20} PROTOCOL",
                "NAMESPACE",
                "POD NAME",
                "ADDRESS",
                "NODE",
                "WAYPOINT"
            )?;
            for w in &rows {
                crate::outln!(
                    "{:<14} {:<24} {:<16} {:<10} {:<20} {}",
                    s(&w["namespace"]),
                    s(&w["name"]),
                    first(&w["ips"]),
                    s(&w["node"]),
                    waypoint(&w["waypoint"]),
                    if s(&w["protocol"]).is_empty() {
                        "TCP"
                    } else {
                        s(&w["protocol"])
                    }
                )?;
            }
        }
        "services" => {
            crate::outln!(
                "{:<14} {:<20} {:<16} {:<20} ENDPOINTS",
                "NAMESPACE",
                "SERVICE NAME",
                "SERVICE VIP",
                "WAYPOINT"
            )?;
            for v in &rows {
                crate::outln!(
                    "{:<14} {:<20} {:<16} {:<20} {}",
                    s(&v["namespace"]),
                    s(&v["name"]),
                    first(&v["vips"]),
                    waypoint(&v["waypoint"]),
                    v["endpoints"].as_array().map_or(0, Vec::len)
                )?;
            }
        }
        "policies" => {
            crate::outln!(
                "{:<14} {:<24} {:<8} {:<18} CONDITION",
                "NAMESPACE",
                "POLICY NAME",
                "ACTION",
                "SCOPE"
            )?;
            for p in &rows {
                crate::outln!(
                    "{:<14} {:<24} {:<8} {:<18} {}",
                    s(&p["namespace"]),
                    s(&p["name"]),
                    p["action"].as_str().unwrap_or("Allow"),
                    p["scope"].as_str().unwrap_or(""),
                    p["condition"]["reason"].as_str().unwrap_or("")
                )?;
            }
        }
        _ => {
            crate::outln!(
                "{:<52} {:<8} {:<34} NOT AFTER",
                "IDENTITY",
                "STATE",
                "SERIAL"
            )?;
            for c in &rows {
                let not_after = c["notAfter"].as_u64().map(rfc3339);
                crate::outln!(
                    "{:<52} {:<8} {:<34} {}",
                    s(&c["identity"]),
                    s(&c["state"]),
                    s(&c["serial"]),
                    not_after.unwrap_or_default()
                )?;
            }
        }
    }
    Ok(())
}

/// RFC 3339 in UTC, e.g. `2026-12-03T19:52:00Z`.
fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (seconds since 1970)"))
}
