//! `ambitctl waypoint` against a cluster (the fake API server), as istioctl waypoint
//! is used: apply with the namespace enrolled, list and status from the Gateway's
//! Programmed condition as the control plane writes it, --overwrite, delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use ambit_kubefake::FakeApi;

fn kubeconfig(dir: &Path, api: &FakeApi) -> String {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: fake, user: {{token: test}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
            api.addr()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn ambitctl(kc: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        "waypoint".to_owned(),
        "--kubeconfig".to_owned(),
        kc.to_owned(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ambitctl"))
            .args(&all)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn apply_list_status_and_delete_on_a_cluster() {
    let api = FakeApi::start().await;
    api.put("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n");
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &api);

    let (status, out, err) = ambitctl(&kc, &["list", "-n", "shop"]).await;
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("No waypoints found."), "{out}");

    let (status, out, err) = ambitctl(
        &kc,
        &[
            "apply",
            "-n",
            "shop",
            "--name",
            "wp",
            "--for",
            "all",
            "--enroll-namespace",
        ],
    )
    .await;
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("waypoint shop/wp applied"), "{out}");
    let gateway = api
        .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")
        .expect("the Gateway");
    assert_eq!(gateway["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(gateway["spec"]["listeners"][0]["port"], 15008);
    assert_eq!(
        gateway["metadata"]["labels"]["istio.io/waypoint-for"],
        "all"
    );
    let ns = api.get("v1", "Namespace", "", "shop").unwrap();
    assert_eq!(ns["metadata"]["labels"]["istio.io/use-waypoint"], "wp");
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/dataplane-mode"],
        "ambient"
    );

    // Not programmed until the control plane says so.
    let (status, out, _) = ambitctl(&kc, &["status", "-n", "shop"]).await;
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("no Programmed condition yet"), "{out}");
    let (status, _, err) = ambitctl(
        &kc,
        &[
            "apply",
            "-n",
            "shop",
            "--name",
            "wp",
            "--wait",
            "--timeout",
            "1s",
        ],
    )
    .await;
    assert_ne!(status, 0);
    assert!(err.contains("not programmed within 1s"), "{err}");
    api.put(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: wp, namespace: shop, labels: {istio.io/waypoint-for: all}}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n\
         status: {conditions: [{type: Programmed, status: \"True\", reason: Programmed, message: a waypoint pod is ready}]}\n",
    );
    let (status, out, err) = ambitctl(&kc, &["list", "-A"]).await;
    assert_eq!(status, 0, "{err}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("shop "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, ["shop", "wp", "default", "all", "True"], "{out}");
    let (status, out, _) = ambitctl(&kc, &["status", "-n", "shop", "-o", "json"]).await;
    assert_eq!(status, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["programmed"], true);

    let (status, _, err) = ambitctl(
        &kc,
        &[
            "apply",
            "-n",
            "shop",
            "--name",
            "other",
            "--enroll-namespace",
        ],
    )
    .await;
    assert_ne!(status, 0);
    assert!(
        err.contains("already uses waypoint wp") && err.contains("--overwrite"),
        "{err}"
    );

    let (status, out, err) = ambitctl(&kc, &["delete", "-n", "shop", "wp"]).await;
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("waypoint shop/wp deleted"), "{out}");
    assert!(api
        .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")
        .is_none());
    let (status, _, err) = ambitctl(&kc, &["delete", "-n", "shop", "nope"]).await;
    assert_ne!(status, 0);
    assert!(err.contains("no waypoint shop/nope"), "{err}");
}
