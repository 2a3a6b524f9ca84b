//! `ambitctl install`, `verify-install`, `uninstall` and `precheck`, the real binary
//! against the fake API server (`ambit_kubefake`) through a kubeconfig, as a user runs
//! them; and the bad inputs: an unknown `--set` key, a kubeconfig pointing at a closed
//! port, a 403 midway, a rollout that does not finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;

use ambit_kubefake::FakeApi;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{json, Value};

const NS: &str = "ambit-system";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs ambitctl with KUBECONFIG set, off the runtime the fake serves on.
async fn ambitctl(kubeconfig: &Path, args: &[&str]) -> Run {
    let kubeconfig = kubeconfig.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let shown = args.join(" ");
    let out: Output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ambitctl"))
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("HOME")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ ambitctl {}\n{}{}(exit {})",
        shown, run.stdout, run.stderr, run.code
    );
    run
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{server}\"}}}}]\n\
             users: [{{name: fake, user: {{token: test}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .unwrap();
    path
}

/// What `manifest generate -o json` prints, the objects install applies.
async fn generated(kubeconfig: &Path, sets: &[&str]) -> Vec<Value> {
    let mut args = vec!["manifest", "generate", "-o", "json"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let run = ambitctl(kubeconfig, &args).await;
    assert_eq!(run.code, 0);
    let list: Value = serde_json::from_str(&run.stdout).unwrap();
    list["items"].as_array().unwrap().clone()
}

fn name_of(o: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    (
        s(&o["apiVersion"]),
        s(&o["kind"]),
        s(&o["metadata"]["namespace"]),
        s(&o["metadata"]["name"]),
    )
}

fn stored(fake: &FakeApi, o: &Value) -> Option<Value> {
    let (api_version, kind, ns, name) = name_of(o);
    fake.get(&api_version, &kind, &ns, &name)
}

/// The stored object without what the server adds.
fn as_applied(mut o: Value) -> Value {
    let meta = o["metadata"].as_object_mut().unwrap();
    for k in [
        "resourceVersion",
        "uid",
        "generation",
        "creationTimestamp",
        "managedFields",
    ] {
        meta.remove(k);
    }
    o.as_object_mut().unwrap().remove("status");
    o
}

async fn cluster(nodes: usize) -> (FakeApi, tempfile::TempDir, PathBuf) {
    let fake = FakeApi::start().await;
    fake.simulate_controllers();
    for i in 0..nodes {
        fake.put(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{i}}}\n"
        ));
    }
    fake.put("apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n");
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    (fake, dir, kc)
}

/// What ambit-control does once it runs: publish the root in every namespace (and
/// make its Secret and the waypoint class), with its field manager; and what the
/// endpoints controller does for its ready pods.
async fn control_plane_runs(fake: &FakeApi) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    let root = params.self_signed(&key).unwrap().pem();
    let client = fake.client();
    let apply = PatchParams::apply("ambit-control").force();
    let configmaps = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("", "v1", "ConfigMap"),
        "configmaps",
    );
    for ns in fake.all("v1", "Namespace") {
        let ns = ns["metadata"]["name"].as_str().unwrap().to_owned();
        let api: kube::Api<DynamicObject> =
            kube::Api::namespaced_with(client.clone(), &ns, &configmaps);
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "labels": {"istio.io/config": "true"}},
            "data": {"root-cert.pem": root}});
        api.patch("istio-ca-root-cert", &apply, &Patch::Apply(&body))
            .await
            .unwrap();
    }
    fake.put(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: istio-ca-secret, namespace: {NS}, \
         labels: {{app.kubernetes.io/managed-by: ambit-control}}}}\n"
    ));
    // A waypoint for the user's Gateway shop/waypoint.
    for (group, version, kind, plural) in [
        ("", "v1", "ServiceAccount", "serviceaccounts"),
        ("", "v1", "Service", "services"),
        ("apps", "v1", "Deployment", "deployments"),
    ] {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: kube::Api<DynamicObject> =
            kube::Api::namespaced_with(client.clone(), "shop", &resource);
        let body = json!({"apiVersion": resource.api_version, "kind": kind,
            "metadata": {"name": "waypoint",
                         "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}}});
        api.patch("waypoint", &apply, &Patch::Apply(&body))
            .await
            .unwrap();
    }
    let classes = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GatewayClass"),
        "gatewayclasses",
    );
    let api: kube::Api<DynamicObject> = kube::Api::all_with(client, &classes);
    let class = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": "istio-waypoint"},
        "spec": {"controllerName": "istio.io/mesh-controller"}});
    api.patch("istio-waypoint", &apply, &Patch::Apply(&class))
        .await
        .unwrap();
    fake.put(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ambit-control-x1, \
         namespace: {NS}, labels: {{kubernetes.io/service-name: ambit-control}}}}\n\
         addressType: IPv4\nports: [{{name: grpc-xds, port: 15012, protocol: TCP}}]\n\
         endpoints:\n- {{addresses: [10.0.0.5], conditions: {{ready: true}}}}\n\
         - {{addresses: [10.0.1.7], conditions: {{ready: true}}}}\n"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_then_verify_then_uninstall_leaves_nothing_behind() {
    let (fake, _dir, kc) = cluster(3).await;
    // Someone else's objects, which uninstall must not touch.
    fake.put("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    fake.put("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: shop}\n");
    fake.put(
        "apiVersion: v1\nkind: Service\nmetadata: {name: own, namespace: shop, \
         labels: {gateway.networking.k8s.io/gateway-name: own}}\n",
    );
    let sets = ["trustDomain=example.org", "control.replicas=3"];
    let objects = generated(&kc, &sets).await;

    let install = ambitctl(
        &kc,
        &[
            "install",
            "--set",
            sets[0],
            "--set",
            sets[1],
            "--wait",
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert_eq!(install.code, 0, "{}", install.stderr);
    let created = install
        .stdout
        .lines()
        .filter(|l| l.starts_with("created "))
        .count();
    assert_eq!(created, objects.len(), "one line per object");
    assert!(install
        .stdout
        .contains("ready      DaemonSet ambit-system/ztunnel"));
    assert!(install.stdout.contains("ready      everything"));

    // Read back: each object is what manifest generate printed, applied by ambitctl.
    for o in &objects {
        let got = stored(&fake, o).unwrap_or_else(|| panic!("{:?} not made", name_of(o)));
        let managers: Vec<&str> = got["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["ambitctl"], "{:?}", name_of(o));
        assert_eq!(&as_applied(got), o, "{:?}", name_of(o));
    }

    // Applying again changes nothing.
    let again = ambitctl(&kc, &["install", "--set", sets[0], "--set", sets[1]]).await;
    assert_eq!(again.code, 0);
    assert_eq!(
        again
            .stdout
            .lines()
            .filter(|l| l.starts_with("unchanged "))
            .count(),
        objects.len(),
        "{}",
        again.stdout
    );

    // Before the control plane has published anything, verify-install says what is
    // missing.
    let early = ambitctl(&kc, &["verify-install", "--set", sets[0], "--set", sets[1]]).await;
    assert_eq!(early.code, 1);
    assert!(early
        .stdout
        .contains("FAIL  ca-endpoints: Service ambit-system/ambit-control has no ready endpoint"));
    assert!(early
        .stdout
        .contains("FAIL  mesh-root: ConfigMap ambit-system/istio-ca-root-cert is missing"));

    control_plane_runs(&fake).await;
    let verify = ambitctl(
        &kc,
        &[
            "verify-install",
            "--set",
            sets[0],
            "--set",
            sets[1],
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(verify.code, 0, "{}", verify.stdout);
    let report: Value = serde_json::from_str(&verify.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let findings = report["findings"].as_array().unwrap();
    let message = |check: &str| {
        findings
            .iter()
            .filter(|f| f["check"] == check)
            .map(|f| f["message"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        message("ztunnel-on-every-node"),
        ["3 ready of 3 scheduled, 3 nodes"]
    );
    assert!(
        message("ca-endpoints")[0].contains("2 ready endpoints (10.0.0.5:15012, 10.0.1.7:15012)")
    );
    assert!(message("mesh-root").contains(&"published in all 3 namespaces".to_owned()));
    assert_eq!(message("object").len(), objects.len());

    // verify-install without the --set of the install sees the difference.
    let wrong = ambitctl(&kc, &["verify-install"]).await;
    assert_eq!(wrong.code, 1);
    assert!(wrong.stdout.contains(
        "FAIL  object: Deployment ambit-system/ambit-control: differs at spec.replicas: 3 in the cluster, 2 in this install"
    ), "{}", wrong.stdout);

    let uninstall = ambitctl(&kc, &["uninstall", "--wait", "--timeout", "20s"]).await;
    assert_eq!(uninstall.code, 0, "{}", uninstall.stderr);
    assert!(uninstall
        .stdout
        .contains("kept the 10 CustomResourceDefinitions"));
    for o in &objects {
        let left = stored(&fake, o);
        if o["kind"] == "CustomResourceDefinition" {
            assert!(left.is_some());
        } else {
            assert!(left.is_none(), "{:?} left behind", name_of(o));
        }
    }
    for ns in ["default", "shop", NS] {
        assert!(fake
            .get("v1", "ConfigMap", ns, "istio-ca-root-cert")
            .is_none());
    }
    assert!(fake.get("v1", "Secret", NS, "istio-ca-secret").is_none());
    assert!(fake
        .get(
            "gateway.networking.k8s.io/v1",
            "GatewayClass",
            "",
            "istio-waypoint"
        )
        .is_none());
    assert!(fake.get("v1", "ConfigMap", "shop", "settings").is_some());
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "ServiceAccount"),
    ] {
        assert!(
            fake.get(api_version, kind, "shop", "waypoint").is_none(),
            "{kind}"
        );
    }
    assert!(
        fake.get("v1", "Service", "shop", "own").is_some(),
        "not ambit-control's"
    );
    assert!(fake.get("v1", "Namespace", "", "shop").is_some());

    let purge = ambitctl(&kc, &["uninstall", "--purge"]).await;
    assert_eq!(purge.code, 0, "{}", purge.stderr);
    assert!(fake
        .all("apiextensions.k8s.io/v1", "CustomResourceDefinition")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_naming_the_daemon_set_that_is_not_ready() {
    let (fake, _dir, kc) = cluster(3).await;
    fake.stall("DaemonSet", NS, "ztunnel");
    let start = std::time::Instant::now();
    let run = ambitctl(&kc, &["install", "--wait", "--timeout", "2s"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(
            "timed out after 2s waiting for DaemonSet ambit-system/ztunnel (2 of 3 nodes' pods ready, 2 available, 3 updated)"
        ),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("ambit-cni"), "only what is not ready");
    assert!(start.elapsed() < std::time::Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_set_key_is_refused_before_anything_is_asked() {
    let (fake, _dir, kc) = cluster(1).await;
    let before = fake.requests().len();
    let run = ambitctl(&kc, &["install", "--set", "ztunnel.replicas=2"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("--set ztunnel.replicas: not a value of the chart"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("control.replicas, "), "lists the keys");
    assert_eq!(fake.requests().len(), before, "nothing asked of the server");
    let bad = ambitctl(
        &kc,
        &["manifest", "generate", "--set", "control.replicas=two"],
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(bad
        .stderr
        .contains("--set control.replicas=two: give a whole number"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_pointing_at_a_closed_port_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = format!("http://{closed}");
    let kc = kubeconfig(dir.path(), &server);
    for command in [
        &["install"][..],
        &["uninstall"],
        &["verify-install"],
        &["precheck"],
    ] {
        let run = ambitctl(&kc, command).await;
        assert_eq!(run.code, 1, "{command:?}");
        assert!(
            run.stderr.contains(&format!(
                "cannot reach the API server {server}/ (context fake of kubeconfig {})",
                kc.display()
            )),
            "{command:?}: {}",
            run.stderr
        );
        assert!(run.stderr.contains("Connection refused"), "{}", run.stderr);
    }
    let missing = ambitctl(&dir.path().join("none"), &["install"]).await;
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("none"), "{}", missing.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_midway_says_what_was_applied_and_what_was_not() {
    let (fake, _dir, kc) = cluster(1).await;
    fake.forbid("patch", "clusterroles");
    let objects = generated(&kc, &[]).await;
    let run = ambitctl(&kc, &["install"]).await;
    assert_eq!(run.code, 1);
    let at = objects
        .iter()
        .position(|o| o["kind"] == "ClusterRole")
        .unwrap();
    assert!(at > 0);
    assert!(
        run.stderr.contains(
            "install stopped at ClusterRole ambit-control: applying ClusterRole ambit-control: the API server answered 403 Forbidden: "
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("answered 403 Forbidden"),
        "{}",
        run.stderr
    );
    assert!(run
        .stderr
        .contains("cannot patch resource \"clusterroles\""));
    let applied = run
        .stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("applied before it (in the cluster now): ")
        })
        .unwrap();
    let not_applied = run
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("not applied: "))
        .unwrap();
    assert_eq!(applied.split(", ").count(), at, "{applied}");
    assert!(applied.starts_with("Namespace ambit-system, "));
    assert_eq!(not_applied.split(", ").count(), objects.len() - at - 1);
    assert!(not_applied.ends_with("Deployment ambit-system/ambit-control"));
    // The cluster holds exactly what the message says.
    for (i, o) in objects.iter().enumerate() {
        assert_eq!(stored(&fake, o).is_some(), i < at, "{:?}", name_of(o));
    }
    // Each made object had its progress line.
    assert_eq!(run.stdout.lines().count(), at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precheck_finds_istio_and_foreign_crds_and_an_old_server() {
    let (fake, _dir, kc) = cluster(2).await;
    let clean = ambitctl(&kc, &["precheck"]).await;
    assert_eq!(clean.code, 0, "{}", clean.stdout);
    assert!(clean.stdout.contains("ok    kubernetes-version: v1.32.0"));
    assert!(
        clean.stdout.contains(
            "ok    permissions: the kubeconfig's user may get, patch and delete every kind"
        ),
        "{}",
        clean.stdout
    );

    fake.put(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: istiod, namespace: istio-system, labels: {app: istiod}}\nspec: {replicas: 1}\n",
    );
    fake.put(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: authorizationpolicies.security.istio.io, \
         annotations: {meta.helm.sh/release-name: istio-base, meta.helm.sh/release-namespace: istio-system}}\nspec: {group: security.istio.io}\n",
    );
    fake.put(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-k3s}\nstatus: {nodeInfo: {kubeletVersion: v1.31.4+k3s1}}\n",
    );
    fake.set_version("1", "28");
    fake.forbid("patch", "clusterroles");
    let run = ambitctl(&kc, &["precheck", "-o", "json"]).await;
    assert_eq!(run.code, 1);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let findings = report["findings"].as_array().unwrap();
    let find = |check: &str| {
        findings
            .iter()
            .find(|f| f["check"] == check && f["level"] != "ok")
            .unwrap_or_else(|| panic!("no {check} finding in {findings:?}"))
    };
    assert_eq!(find("kubernetes-version")["level"], "fail");
    let istio = find("istio");
    assert!(istio["message"]
        .as_str()
        .unwrap()
        .contains("Deployment istio-system/istiod"));
    assert!(istio["action"]
        .as_str()
        .unwrap()
        .contains("uninstall Istio"));
    let crds = find("crds");
    assert!(crds["message"].as_str().unwrap().contains(
        "authorizationpolicies.security.istio.io (Helm release istio-system/istio-base)"
    ));
    assert!(crds["action"]
        .as_str()
        .unwrap()
        .contains("--set crds.enabled=false"));
    assert_eq!(
        find("permissions")["message"],
        "the kubeconfig's user may not: patch clusterroles.rbac.authorization.k8s.io"
    );
    let cni = find("cni-directories");
    assert!(cni["action"]
        .as_str()
        .unwrap()
        .contains("--set cni.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d"));
    fake.put("apiVersion: v1\nkind: Namespace\nmetadata: {name: ambit-system}\n");
    let namespace = ambitctl(&kc, &["precheck"]).await;
    assert!(
        namespace
            .stdout
            .contains("WARN  namespace: ambit-system exists and is not Ambit's"),
        "{}",
        namespace.stdout
    );
    assert!(namespace.stdout.contains("--set namespace.create=false"));
    // With the CRDs left to Istio's chart, that finding goes.
    let kept = ambitctl(&kc, &["precheck", "--set", "crds.enabled=false"]).await;
    assert!(!kept.stdout.contains("FAIL  crds"), "{}", kept.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_another_manager_owns_conflicts_until_forced() {
    let (fake, _dir, kc) = cluster(1).await;
    fake.put(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
         metadata:\n  name: authorizationpolicies.security.istio.io\n  managedFields:\n  \
         - {manager: helm, operation: Update, apiVersion: apiextensions.k8s.io/v1, fieldsType: FieldsV1,\n     \
         fieldsV1: {'f:spec': {'f:group': {}, 'f:versions': {}}}}\n\
         spec: {group: security.istio.io, versions: []}\n",
    );
    let run = ambitctl(&kc, &["install"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(
            "install stopped at CustomResourceDefinition authorizationpolicies.security.istio.io: \
             applying CustomResourceDefinition authorizationpolicies.security.istio.io: the API server answered 409 Conflict: \
             Apply failed with 1 conflict: conflict with \"helm\" using apiextensions.k8s.io/v1: .spec.versions"
        ),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--force-conflicts"));
    let forced = ambitctl(&kc, &["install", "--force-conflicts"]).await;
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert!(forced
        .stdout
        .contains("configured CustomResourceDefinition authorizationpolicies.security.istio.io"));
    let crd = fake
        .get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "",
            "authorizationpolicies.security.istio.io",
        )
        .unwrap();
    let fields = &crd["metadata"]["managedFields"];
    // helm keeps the field whose value did not change; the list moved to ambitctl.
    assert_eq!(fields[0]["manager"], "helm");
    assert_eq!(fields[0]["fieldsV1"], json!({"f:spec": {"f:group": {}}}));
    assert_eq!(fields[1]["manager"], "ambitctl");
    assert!(fields[1]["fieldsV1"]["f:spec"]["f:versions"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinstalling_with_other_values_changes_only_what_they_change() {
    let (fake, _dir, kc) = cluster(1).await;
    let first = ambitctl(&kc, &["install", "--set", "control.resources.limits.cpu=2"]).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    // Another tool annotates the Deployment (its own field manager).
    let deployments = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apps", "v1", "Deployment"),
        "deployments",
    );
    let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(fake.client(), NS, &deployments);
    let note = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "ambit-control", "annotations": {"example.org/owner": "ops"}}});
    api.patch(
        "ambit-control",
        &PatchParams::apply("ops"),
        &Patch::Apply(&note),
    )
    .await
    .unwrap();

    let upgrade = ambitctl(&kc, &["install", "--set", "control.replicas=3"]).await;
    assert_eq!(upgrade.code, 0, "{}", upgrade.stderr);
    let changed: Vec<&str> = upgrade
        .stdout
        .lines()
        .filter(|l| !l.starts_with("unchanged "))
        .collect();
    assert_eq!(
        changed,
        ["configured Deployment ambit-system/ambit-control"],
        "only the Deployment changes"
    );
    let deployment = fake
        .get("apps/v1", "Deployment", NS, "ambit-control")
        .unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    let resources = &deployment["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert!(
        resources["limits"].get("cpu").is_none(),
        "the limit the first install set and this one does not is gone: {resources}"
    );
    assert_eq!(resources["limits"]["memory"], "1Gi");
    assert_eq!(
        deployment["metadata"]["annotations"]["example.org/owner"], "ops",
        "another manager's field stays"
    );
    // The annotation left the generation alone; the new spec bumped it.
    assert_eq!(deployment["metadata"]["generation"], 2);
}
