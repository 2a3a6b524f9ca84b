//! `ambitctl authz explain` offline on the bookshop example, as a user runs it: the
//! decision, the hops that enforce it, the policies and what decided, and the exit
//! status. (`tests/tests/ambitctl.rs` checks it against real traffic in a local mesh.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn explain(args: &[&str]) -> (i32, String, String) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookshop");
    let out = Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(["authz", "explain", "-f", examples.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn through_the_waypoint_a_get_is_allowed_by_its_rule_and_a_post_denied_with_403() {
    let (status, out, err) = explain(&[
        "--from",
        "bookshop/frontend",
        "--to",
        "bookshop/orders",
        "--port",
        "80",
        "--method",
        "GET",
        "--path",
        "/orders",
        "-o",
        "json",
    ]);
    assert_eq!(status, 0, "{out}{err}");
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["allowed"], true);
    assert_eq!(e["destination"], "bookshop/orders");
    let hops = e["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 2, "{e:#}");
    assert_eq!(hops[0]["enforcer"], "waypoint bookshop/waypoint");
    assert_eq!(
        hops[0]["peer"],
        "spiffe://cluster.local/ns/bookshop/sa/frontend"
    );
    assert_eq!(
        hops[0]["reason"],
        "allowed by bookshop/orders-read-only rule 0"
    );
    // The destination's ztunnel sees the waypoint, not the client.
    assert_eq!(
        hops[1]["peer"],
        "spiffe://cluster.local/ns/bookshop/sa/waypoint"
    );

    let (status, out, _) = explain(&[
        "--from",
        "bookshop/frontend",
        "--to",
        "bookshop/orders",
        "--port",
        "80",
        "--method",
        "POST",
        "--path",
        "/orders",
    ]);
    assert_eq!(status, 3, "{out}");
    assert!(
        out.starts_with("DENIED bookshop/frontend → bookshop/orders:80 (POST /orders)"),
        "{out}"
    );
    assert!(
        out.contains("waypoint bookshop/waypoint") && out.contains("(403)"),
        "{out}"
    );
    assert!(
        out.contains("policies, in order: bookshop/orders-read-only"),
        "{out}"
    );
}

#[test]
fn a_client_outside_the_mesh_is_refused_around_the_waypoint_and_let_through_elsewhere() {
    let (status, out, _) = explain(&[
        "--from",
        "legacy/batch",
        "--to",
        "bookshop/orders",
        "--port",
        "80",
    ]);
    assert_eq!(status, 3, "{out}");
    assert!(
        out.contains("peer plaintext") && out.contains("must connect through it"),
        "{out}"
    );
    let (status, out, _) = explain(&[
        "--from",
        "legacy/batch",
        "--to",
        "bookshop/catalog",
        "--port",
        "80",
    ]);
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("ztunnel on node-b (peer plaintext): allow"),
        "{out}"
    );
}

#[test]
fn bad_input_names_what_is_wrong() {
    let (status, _, err) = explain(&[
        "--from",
        "bookshop/nobody",
        "--to",
        "bookshop/catalog",
        "--port",
        "80",
    ]);
    assert_ne!(status, 0);
    assert!(
        err.contains("--from bookshop/nobody") && err.contains("no pod"),
        "{err}"
    );
    let (status, _, err) = explain(&[
        "--from",
        "bookshop/frontend",
        "--to",
        "bookshop/catalog",
        "--port",
        "81",
    ]);
    assert_ne!(status, 0);
    assert!(
        err.contains("--port 81: Service bookshop/catalog has ports 80, 9000"),
        "{err}"
    );
    let (status, _, err) = explain(&[
        "--from",
        "bookshop/frontend",
        "--to",
        "svc/bookshop/frontend",
        "--port",
        "80",
    ]);
    assert_ne!(status, 0);
    assert!(err.contains("no Service bookshop/frontend"), "{err}");
    let (status, _, err) = explain(&[
        "--from",
        "frontend",
        "--to",
        "bookshop/catalog",
        "--port",
        "80",
    ]);
    assert_ne!(status, 0);
    assert!(err.contains("--from \"frontend\""), "{err}");
}

#[test]
fn all_prints_the_namespaces_matrix_without_the_waypoints_themselves() {
    let (status, out, err) = explain(&[
        "--all", "-n", "bookshop", "--method", "POST", "--path", "/orders", "-o", "json",
    ]);
    assert_eq!(status, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let row = |from: &str, to: &str| {
        rows.iter()
            .find(|r| r["from"] == from && r["to"] == to)
            .unwrap_or_else(|| panic!("no row {from} → {to}: {out}"))
            .clone()
    };
    assert_eq!(
        row("bookshop/frontend", "bookshop/orders:80")["allowed"],
        false
    );
    assert_eq!(
        row("bookshop/frontend", "bookshop/catalog:80")["allowed"],
        true
    );
    assert!(
        rows.iter()
            .all(|r| !r["from"].as_str().unwrap().contains("waypoint")
                && !r["to"].as_str().unwrap().starts_with("bookshop/waypoint:")),
        "{out}"
    );
    // Each row is what a single explain says.
    for r in &rows {
        let to = r["to"].as_str().unwrap();
        let (service, port) = to.rsplit_once(':').unwrap();
        let (status, _, _) = explain(&[
            "--from",
            r["from"].as_str().unwrap(),
            "--to",
            service,
            "--port",
            port,
            "--method",
            "POST",
            "--path",
            "/orders",
        ]);
        assert_eq!(status == 0, r["allowed"] == true, "{r}");
    }
}
