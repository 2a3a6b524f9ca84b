#!/usr/bin/env python3
"""The Kubernetes manifests and the Helm chart they come from.

    manifests.py render   writes deploy/ambit.yaml: the chart (deploy/helm/ambit/)
                          rendered by Helm's own library with its default values,
                          release "ambit" in namespace ambit-system
    manifests.py check    fails unless: the chart lints; it renders to exactly
                          deploy/ambit.yaml; every object validates (strictly) against
                          the Kubernetes 1.32 OpenAPI schemas; `kubectl kustomize
                          deploy/` gives the same objects; the custom objects of
                          examples/ validate against the CRDs' schemas; and
                          `ambitctl manifest generate --set ...` (target/debug/ambitctl,
                          or $AMBITCTL) prints what Helm renders for the same --set, for
                          each --set list of DRIFT

Helm's library comes from the helm-sdkpy wheel, which can install but not render
client-only: the install runs against a small in-process stand-in for the API server
(discovery of the kinds the chart uses; every create accepted, nothing kept) with the
release kept in memory (HELM_DRIVER=memory), and the release's manifest is the
rendering. Needs Python >= 3.12 and deploy/requirements.txt (scripts/test.sh makes the
venv).
"""
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

# Helm's library reads the process's environment as it was when the process started:
# keep releases in memory, never in the stand-in's Secrets.
if os.environ.get("HELM_DRIVER") != "memory":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "HELM_DRIVER": "memory"})

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "ambit"
MANIFESTS = ROOT / "deploy" / "ambit.yaml"
RELEASE = "ambit"
NAMESPACE = "ambit-system"
KUBERNETES = "1.32.0"
HEADER = (
    "# Generated: deploy/helm/ambit/ rendered with its default values (release ambit,\n"
    "# namespace ambit-system) by `scripts/manifests.py render`. Edit the chart, not\n"
    "# this file; scripts/manifests.py check (in scripts/test.sh) fails when they differ.\n"
    "# Install: kubectl apply --server-side -f deploy/ambit.yaml (or -k deploy/).\n"
)

# What the stand-in API server serves: group/version -> [(plural, kind, namespaced)].
RESOURCES = {
    "v1": [
        ("namespaces", "Namespace", False),
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("pods", "Pod", True),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    "apiextensions.k8s.io/v1": [
        ("customresourcedefinitions", "CustomResourceDefinition", False)
    ],
}


class StandIn(BaseHTTPRequestHandler):
    """Discovery, 404 for every read, 201 for every create: enough for `helm install`."""

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def not_found(self):
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                         "status": "Failure", "reason": "NotFound", "code": 404,
                         "message": f"{self.path} not found"})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0",
                                    "platform": "linux/amd64"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for gv in RESOURCES:
                if "/" in gv:
                    group, version = gv.split("/")
                    v = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [v], "preferredVersion": v})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                    "groups": groups})
        gv = path.removeprefix("/api/") if path.startswith("/api/") else path.removeprefix("/apis/")
        if gv in RESOURCES:
            return self.reply(200, {
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": [{"name": p, "singularName": k.lower(), "kind": k,
                               "namespaced": ns,
                               "verbs": ["create", "delete", "get", "list", "patch",
                                         "update", "watch"]}
                              for p, k, ns in RESOURCES[gv]]})
        self.not_found()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            obj = json.loads(body or b"{}")
        except ValueError:
            return self.reply(415, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                    "status": "Failure", "code": 415,
                                    "message": "the stand-in reads JSON only"})
        self.reply(201, obj)

    do_PUT = do_POST
    do_PATCH = do_POST

    def do_DELETE(self):
        self.not_found()


def helm_config(server):
    import helm_sdkpy

    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {
            "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "stand-in", "user": {}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in",
                                                      "user": "stand-in",
                                                      "namespace": NAMESPACE}}],
    }
    return helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=yaml.safe_dump(kubeconfig))


def render(values=None):
    """The chart as Helm renders it, with `values` over the defaults."""
    import helm_sdkpy

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = helm_config(server)
        release = asyncio.run(helm_sdkpy.Install(config).run(
            RELEASE, str(CHART), values=values or None, wait=False, timeout=60))
        return release.get("manifest", "")
    finally:
        server.shutdown()


def lint():
    import helm_sdkpy

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = asyncio.run(helm_sdkpy.Lint(helm_config(server)).run(str(CHART)))
    finally:
        server.shutdown()
    # Severity 1 is INFO, 2 WARNING, 3 ERROR (the library does not carry the text).
    # The one warning expected: the Namespace object of the release's own namespace
    # (templates/namespace.yaml), which the plain manifests need and Helm users turn
    # off with namespace.create=false.
    problems = [m for m in result.get("Messages") or []
                if m.get("Severity", 0) >= 3
                or (m.get("Severity") == 2 and m.get("Path") != "templates/namespace.yaml")]
    if result.get("Errors"):
        problems.append({"Errors": result["Errors"]})
    return result, problems


def objects(text):
    return [d for d in yaml.safe_load_all(text) if d]


def key(obj):
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def check():
    failures = []

    result, problems = lint()
    if problems:
        failures.append(f"helm lint: {json.dumps(problems)} (render the chart to see why)")
    else:
        print("ok: helm lint deploy/helm/ambit")

    try:
        rendered = HEADER + render()
    except Exception as e:  # helm_sdkpy's InstallError: the template's own message
        rendered = None
        failures.append(f"the chart does not render: {e}")
    if rendered is None:
        pass
    elif rendered != MANIFESTS.read_text():
        failures.append("deploy/ambit.yaml is not the chart rendered with its defaults: "
                        "run scripts/manifests.py render (and commit it)")
    else:
        print("ok: deploy/ambit.yaml is the chart rendered with its default values")

    import kubernetes_validate

    docs = objects(MANIFESTS.read_text())
    for obj in docs:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except Exception as e:  # the library's ValidationError and SchemaNotFoundError
            failures.append(f"{'/'.join(key(obj))}: {str(e).splitlines()[0]} "
                            f"(at {'.'.join(map(str, getattr(e, 'path', [])))})")
    if not failures:
        kinds = ", ".join(sorted({o["kind"] for o in docs}))
        print(f"ok: {len(docs)} objects ({kinds}) validate strictly against "
              f"Kubernetes {KUBERNETES}'s OpenAPI schemas")

    # A null is always a slip (an unquoted ", " in a flow mapping makes keys of the
    # words after it, which validation of a CRD's own schema does not catch).
    def nulls(value, path):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from ([f"{path}.{k}"] if v is None else nulls(v, f"{path}.{k}"))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from nulls(v, f"{path}[{i}]")
    for obj in docs:
        failures += [f"{'/'.join(key(obj))}: null at {p}" for p in nulls(obj, "")]

    # Every object of the manifests carries the labels.
    wanted = {f"app.kubernetes.io/{k}" for k in
              ("name", "instance", "component", "part-of", "version", "managed-by")}
    for obj in docs:
        missing = wanted - set((obj["metadata"].get("labels") or {}))
        if missing:
            failures.append(f"{'/'.join(key(obj))}: labels missing: {sorted(missing)}")

    kustomized = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy")],
                                capture_output=True, text=True)
    if kustomized.returncode != 0:
        failures.append(f"kubectl kustomize deploy/: {kustomized.stderr}")
    else:
        want = {key(o): o for o in docs}
        got = {key(o): o for o in objects(kustomized.stdout)}
        if want != got:
            failures.append("kubectl kustomize deploy/ differs from deploy/ambit.yaml: "
                            f"only there {sorted(set(got) - set(want))}, "
                            f"only here {sorted(set(want) - set(got))}, "
                            f"changed {sorted(k for k in want if k in got and want[k] != got[k])}")
        else:
            print("ok: kubectl kustomize deploy/ renders the same objects")

    failures += check_custom_objects(docs)

    # Values that change what is rendered, rendered too (a template error in a branch
    # the defaults skip fails here).
    for values in ({"crds": {"enabled": False}, "namespace": {"create": False},
                    "control": {"enabled": False}, "ztunnel": {"enabled": False},
                    "cni": {"enabled": False}},
                   {"image": {"registry": "registry.example/mesh", "tag": "9.9.9"},
                    "trustDomain": "example.org", "log": {"level": "debug", "format": "json"}}):
        try:
            out = objects(render(values))
        except Exception as e:
            failures.append(f"render with {values}: {e}")
            continue
        if values.get("crds") is not None and out:
            failures.append(f"render with everything disabled still makes {[key(o) for o in out]}")
        if "image" in values:
            text = yaml.safe_dump_all(out)
            for needle in ("registry.example/mesh/ztunnel:9.9.9", "example.org", '"json"'):
                if needle not in text and needle.strip('"') not in text:
                    failures.append(f"render with {values}: {needle} not in the output")
    if not failures:
        print("ok: the chart renders with components disabled and with values changed")

    failures += check_drift()

    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


# --set lists for which `ambitctl manifest generate` must print what Helm renders
# (docs/decisions/0016): every key ambitctl transforms, each at least once.
DRIFT = [
    [],
    ["image.registry=ghcr.io/example/ambit", "image.tag=1.2.3", "image.pullPolicy=Always"],
    ["image.tag=7"],
    ["trustDomain=example.org", "rootNamespace=mesh-root", "log.level=ambit_net=debug\\,info",
     "log.format=json"],
    ["control.replicas=3", "control.resources.requests.cpu=1",
     "control.resources.limits.cpu=2,ztunnel.resources.limits.memory=2Gi",
     "cni.resources.requests.ephemeral-storage=1Gi", "ztunnel.resources.requests.cpu=250m",
     "ztunnel.terminationGracePeriodSeconds=3600"],
    ["cni.binDir=/var/lib/rancher/k3s/data/current/bin",
     "cni.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d"],
    ["crds.enabled=false", "namespace.create=false"],
    ["control.enabled=false"],
    ["ztunnel.enabled=false,cni.enabled=false", "trustDomain=mesh.example"],
]


def helm_typed(text):
    """A --set value as Helm's strvals types it: true/false, an integer without a
    leading zero (or 0), else a string."""
    if text in ("true", "false"):
        return text == "true"
    digits = text[1:] if text.startswith("-") else text
    if text == "0" or (digits.isdigit() and not digits.startswith("0")):
        return int(text)
    return text


def helm_values(sets):
    """--set strings (comma-separated pairs, \\, a comma) as Helm's values tree."""
    values = {}
    for s in sets:
        pairs, current, escaped = [], "", False
        for c in s:
            if escaped:
                current, escaped = current + c, False
            elif c == "\\":
                escaped = True
            elif c == ",":
                pairs.append(current)
                current = ""
            else:
                current += c
        pairs.append(current)
        for pair in pairs:
            key, value = pair.split("=", 1)
            node = values
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = helm_typed(value)
    return values


def first_difference(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k} (only in {'Helm' if k in a else 'ambitctl'})"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: Helm {a!r}, ambitctl {b!r}"


def check_drift():
    """`ambitctl manifest generate --set ...` against the chart rendered by Helm with
    the same values."""
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    ambitctl = pathlib.Path(os.environ.get("AMBITCTL", target / "debug" / "ambitctl"))
    if not ambitctl.exists():
        return [f"{ambitctl} is not built (cargo build -p ambit-ctl): it cannot be compared "
                "with the chart"]
    failures = []
    for sets in DRIFT:
        args = [str(ambitctl), "manifest", "generate", "-o", "json"]
        for s in sets:
            args += ["--set", s]
        run = subprocess.run(args, capture_output=True, text=True)
        if run.returncode != 0:
            failures.append(f"ambitctl manifest generate {sets}: {run.stderr.strip()}")
            continue
        ours = json.loads(run.stdout)["items"]
        try:
            helms = objects(render(helm_values(sets)))
        except Exception as e:
            failures.append(f"render with {sets}: {e}")
            continue
        if [key(o) for o in helms] != [key(o) for o in ours]:
            failures.append(f"--set {sets}: Helm renders {[key(o) for o in helms]}, "
                            f"ambitctl {[key(o) for o in ours]}")
            continue
        for h, o in zip(helms, ours):
            d = first_difference(h, o)
            if d:
                failures.append(f"--set {sets}: {'/'.join(key(h))} differs at {d}")
    if not failures:
        print(f"ok: ambitctl manifest generate prints what Helm renders, for {len(DRIFT)} "
              "--set lists")
    return failures


def check_custom_objects(docs):
    """The custom objects in examples/ against the schemas of the CRDs in the manifests
    (types, enums, patterns, sizes; CEL rules are the API server's and not run here)."""
    import jsonschema

    schemas = {}
    for crd in (o for o in docs if o["kind"] == "CustomResourceDefinition"):
        spec = crd["spec"]
        for version in spec["versions"]:
            schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = \
                version["schema"]["openAPIV3Schema"]
    failures, checked = [], 0
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for obj in objects(path.read_text()):
            schema = schemas.get((obj.get("apiVersion"), obj.get("kind")))
            if schema is None:
                continue
            checked += 1
            body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
            try:
                jsonschema.validate(body, {**schema, "properties": {
                    k: v for k, v in schema.get("properties", {}).items()
                    if k not in ("apiVersion", "kind", "metadata")}})
            except jsonschema.ValidationError as e:
                failures.append(f"{path.relative_to(ROOT)}: {obj['kind']} "
                                f"{obj['metadata']['name']}: {e.message}")
    if not failures:
        print(f"ok: {checked} custom objects of examples/ validate against their CRDs")
    return failures


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "render":
        MANIFESTS.write_text(HEADER + render())
        print(f"wrote {MANIFESTS.relative_to(ROOT)}")
        return 0
    if command == "check":
        return check()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
