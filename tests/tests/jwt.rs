//! RequestAuthentication (JWT) end to end in the local mesh (`ambitctl local up`,
//! needs root): curl in the client pod on node-a, the standard library's HTTP echo
//! server (`tests/interop/mesh_app.py`) in `web` on node-b behind the waypoint, and a
//! real HTTPS JWKS server (Python's `http.server` with `ssl`, its certificate made
//! here with rcgen) in a pod of a namespace outside the mesh. Tokens are signed here
//! with ES256 keys made at test time.
//!
//! What a user sees: no token passes with no identity; a valid token passes (stripped,
//! its `sub` copied into a header) and meets `requestPrincipals` and
//! `request.auth.claims[groups]`; expired, not yet valid, wrong issuer, wrong audience
//! and tampered tokens get 401 with Envoy's words and challenge; a key the JWKS did
//! not have makes the waypoint fetch it again; with the JWKS server down the last keys
//! still verify; a 1 MiB token is refused and the waypoint keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::ctl::Ctl;
use support::poll_until;

const ISSUER: &str = "https://idp.example.com";

const SHOP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: idp}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, ports: [{name: echo, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: jwks, namespace: idp, labels: {app: jwks}}
spec: {nodeName: node-b, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-access, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: web}]
  action: ALLOW
  rules:
  - to: [{operation: {paths: [/public]}}]
  - from: [{source: {requestPrincipals: [\"https://idp.example.com/*\"]}}]
    to: [{operation: {paths: [/me]}}]
  - to: [{operation: {paths: [/admin]}}]
    when: [{key: \"request.auth.claims[groups]\", values: [admins]}]
";

/// The JWKS server: serves `jwks.json` of its directory (read at each request, so a
/// test can rotate keys) over TLS, and logs each request.
const JWKS_SERVER: &str = r#"
import http.server, ssl, sys, os
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open(os.path.join(d, "jwks.json"), "rb").read()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print("fetched", self.path, flush=True)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", 8443), H)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
s.socket = c.wrap_socket(s.socket, server_side=True)
print("listening", flush=True)
s.serve_forever()
"#;

/// A signing key and its JWK.
struct Key {
    key: EncodingKey,
    jwk: Jwk,
}

fn key(kid: &str) -> Key {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .unwrap();
    let key = EncodingKey::from_ec_der(doc.as_ref());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    Key { key, jwk }
}

impl Key {
    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = self.jwk.common.key_id.clone();
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, groups: &[&str]) -> Value {
    json!({"iss": ISSUER, "sub": sub, "aud": "web", "exp": now() + 3600,
           "nbf": now() - 5, "groups": groups})
}

/// A process in a pod's network namespace, killed when dropped.
struct InPod {
    child: Child,
    log: PathBuf,
}

impl InPod {
    fn start(netns: &Path, log: PathBuf, program: &str, args: &[&str]) -> InPod {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let p = InPod { child, log };
        poll_until(
            Duration::from_secs(30),
            || p.output().contains("listening"),
            || format!("{program} never listened: {}", p.errors()),
        );
        p
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for InPod {
    fn drop(&mut self) {
        self.stop();
    }
}

/// curl in the client pod: (status, headers, body).
fn curl(ctl: &Ctl, args: &[&str]) -> (String, String, String) {
    let mut all = vec![
        "local",
        "exec",
        "client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "20",
        "-D",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    all.extend_from_slice(args);
    let out = ctl.run(&all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (status.to_owned(), head.to_lowercase(), body.to_owned())
}

#[test]
fn request_authentication_at_the_waypoint_with_a_real_jwks_server() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    // The JWKS server's CA, trusted by the waypoint through its flag's environment.
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(files.join("ca.pem"), ca.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    std::fs::write(files.join("shop.yaml"), SHOP).unwrap();
    let ctl = Ctl::new();
    let up = Command::new(support::bin("ambitctl"))
        .args(["local", "up", files.to_str().unwrap()])
        .env("AMBITCTL_STATE_DIR", ctl.state.path())
        .env("AMBIT_JWKS_CA_BUNDLE", files.join("ca.pem"))
        .env("AMBIT_JWKS_REFETCH_MIN_INTERVAL", "1s")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let pod_ip = |name: &str| -> IpAddr {
        ctl.mesh()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let jwks_ip = pod_ip("jwks");

    // The server's certificate for its pod's address, and its first key set.
    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(jwks_ip)];
    let cert = params.signed_by(&server_key, &issuer).unwrap();
    let jwks_dir = files.join("jwks");
    std::fs::create_dir(&jwks_dir).unwrap();
    std::fs::write(jwks_dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(jwks_dir.join("key.pem"), server_key.serialize_pem()).unwrap();
    let (k1, k2, k3) = (key("k1"), key("k2"), key("k3"));
    let write_jwks = |keys: &[&Key]| {
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        std::fs::write(
            jwks_dir.join("jwks.json"),
            serde_json::to_string(&set).unwrap(),
        )
        .unwrap();
    };
    write_jwks(&[&k1]);
    let mut jwks_server = InPod::start(
        &ctl.netns("jwks"),
        files.join("jwks.log"),
        "python3",
        &["-u", "-c", JWKS_SERVER, jwks_dir.to_str().unwrap()],
    );
    let _web = InPod::start(
        &ctl.netns("web"),
        files.join("web.log"),
        "python3",
        &[
            "-u",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("interop/mesh_app.py")
                .to_str()
                .unwrap(),
            "http",
            "8080",
        ],
    );

    let policy = files.join("jwt.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata: {{name: jwt, namespace: shop}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n\
             \x20 jwtRules:\n  - issuer: {ISSUER}\n    audiences: [web]\n\
             \x20   jwksUri: https://{jwks_ip}:8443/jwks.json\n\
             \x20   outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n"
        ),
    )
    .unwrap();
    ctl.ok(&["local", "apply", "-f", policy.to_str().unwrap()]);

    let web = ctl.vip("web");
    let url = |path: &str| format!("http://{web}{path}");
    let bearer = |t: &str| format!("authorization: Bearer {t}");
    let alice = k1.sign(&claims("alice", &["dev"]));

    // The policy reaches the waypoint: a valid token opens /me.
    poll_until(
        Duration::from_secs(20),
        || curl(&ctl, &["-H", &bearer(&alice), &url("/me")]).0 == "200",
        || {
            format!(
                "{:?}\n{}",
                curl(&ctl, &["-H", &bearer(&alice), &url("/me")]),
                ctl.logs()
            )
        },
    );
    let (_, _, body) = curl(&ctl, &["-H", &bearer(&alice), &url("/me")]);
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert!(
        seen["headers"].get("authorization").is_none(),
        "the token was forwarded: {body}"
    );
    assert_eq!(seen["headers"]["x-jwt-sub"], "alice", "{body}");
    assert_eq!(
        jwks_server.output().matches("fetched").count(),
        1,
        "{}",
        jwks_server.output()
    );

    // No token: passes with no identity, so /public is open and /me is not.
    assert_eq!(curl(&ctl, &[&url("/public")]).0, "200");
    let (status, _, body) = curl(&ctl, &[&url("/me")]);
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );

    // Refused tokens: 401 with Envoy's words and challenge.
    let mut tampered: Vec<String> = alice.split('.').map(str::to_owned).collect();
    let mut evil = claims("mallory", &["admins"]);
    evil["iss"] = json!(ISSUER);
    // The payload replaced, the signature kept.
    tampered[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(evil.to_string());
    let with = |patch: Value| {
        let mut c = claims("alice", &["dev"]);
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        k1.sign(&c)
    };
    for (name, token, want) in [
        (
            "expired",
            with(json!({"exp": now() - 3600})),
            "Jwt is expired",
        ),
        (
            "not yet valid",
            with(json!({"nbf": now() + 3600})),
            "Jwt not yet valid",
        ),
        (
            "wrong issuer",
            with(json!({"iss": "https://evil.example.com"})),
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            with(json!({"aud": "billing"})),
            "Audiences in Jwt are not allowed",
        ),
        ("tampered", tampered.join("."), "Jwt verification fails"),
        (
            "malformed",
            "not-a-jwt".to_owned(),
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ] {
        let (status, head, body) = curl(&ctl, &["-H", &bearer(&token), &url("/public")]);
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("401", want),
            "{name}: {head}"
        );
        assert!(
            head.contains(&format!(
                "www-authenticate: bearer realm=\"http://{web}/public\", error=\"invalid_token\""
            )),
            "{name}: {head}"
        );
    }

    // Claims in AuthorizationPolicy: only a token whose groups hold admins opens /admin.
    let admin = k1.sign(&claims("bob", &["dev", "admins"]));
    assert_eq!(
        curl(&ctl, &["-H", &bearer(&admin), &url("/admin")]).0,
        "200"
    );
    assert_eq!(
        curl(&ctl, &["-H", &bearer(&alice), &url("/admin")]).0,
        "403"
    );

    // A key the waypoint's keys lack: the JWKS is fetched again, the token accepted.
    write_jwks(&[&k1, &k2]);
    let carol = k2.sign(&claims("carol", &[]));
    // (At most one refetch per --jwks-refetch-min-interval, 1 s here: a request before
    // then is refused.)
    poll_until(
        Duration::from_secs(20),
        || curl(&ctl, &["-H", &bearer(&carol), &url("/me")]).0 == "200",
        || {
            format!(
                "{:?}\n{}",
                curl(&ctl, &["-H", &bearer(&carol), &url("/me")]),
                ctl.logs()
            )
        },
    );
    assert_eq!(
        jwks_server.output().matches("fetched").count(),
        2,
        "one fetch, then one for the unknown key: {}",
        jwks_server.output()
    );

    // The JWKS server down: the last keys still verify; an unknown key is refused.
    jwks_server.stop();
    let dave = k3.sign(&claims("dave", &[]));
    poll_until(
        Duration::from_secs(20),
        || {
            let (status, _, body) = curl(&ctl, &["-H", &bearer(&dave), &url("/me")]);
            assert_eq!(
                (status.as_str(), body.as_str()),
                ("401", "Jwks doesn't have key to match kid or alg from Jwt")
            );
            // Once past the refetch interval, the unknown key made a fetch that failed.
            ctl.logs().contains("JWKS fetch failed")
        },
        || format!("no failed JWKS fetch logged:\n{}", ctl.logs()),
    );
    for token in [&alice, &carol] {
        assert_eq!(curl(&ctl, &["-H", &bearer(token), &url("/me")]).0, "200");
    }

    // A 1 MiB token: refused at the header limit, and the waypoint serves on. (curl
    // will not send a header this large: a raw socket in the client pod does.)
    let raw = format!(
        "import socket\n\
         s = socket.create_connection(('{web}', 80), timeout=20)\n\
         try:\n    s.sendall(b'GET /public HTTP/1.1\\r\\nhost: {web}\\r\\nauthorization: Bearer ' + b'a' * (1 << 20) + b'\\r\\n\\r\\n')\n\
         except OSError as e:\n    print('send:', e)\n\
         try:\n    print(s.recv(100).split(b'\\r\\n')[0].decode())\n\
         except OSError as e:\n    print('recv:', e)\n"
    );
    let out = ctl.run(&["local", "exec", "client", "--", "python3", "-c", &raw]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    // The waypoint answers 431 and closes; a client still sending its megabyte may see
    // the close before the answer. Either way nothing reached the server.
    assert!(
        said.contains("HTTP/1.1 431") || said.contains("reset") || said.contains("Broken pipe"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = || {
        let out = ctl.run(&[
            "local",
            "exec",
            "waypoint-0",
            "--",
            "curl",
            "-s",
            "--max-time",
            "10",
            "http://127.0.0.1:15020/metrics",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    poll_until(
        Duration::from_secs(10),
        || metrics().contains("response_code=\"431\""),
        || format!("the waypoint counted no 431:\n{}", metrics()),
    );
    assert!(
        !std::fs::read_to_string(files.join("web.log"))
            .unwrap_or_default()
            .contains("aaaaaaaa"),
        "the big token reached the server"
    );
    assert_eq!(curl(&ctl, &["-H", &bearer(&alice), &url("/me")]).0, "200");

    // The policy replaced by one whose JWKS is not JSON: every token is refused,
    // requests without one still pass (Istio's semantics for an invalid JWKS).
    std::fs::write(
        &policy,
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata: {{name: jwt, namespace: shop}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n\
             \x20 jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{{not json'\n"
        ),
    )
    .unwrap();
    ctl.ok(&["local", "apply", "-f", policy.to_str().unwrap()]);
    poll_until(
        Duration::from_secs(20),
        || curl(&ctl, &["-H", &bearer(&alice), &url("/me")]).0 == "401",
        || {
            format!(
                "{:?}\n{}",
                curl(&ctl, &["-H", &bearer(&alice), &url("/me")]),
                ctl.logs()
            )
        },
    );
    let (_, _, body) = curl(&ctl, &["-H", &bearer(&alice), &url("/public")]);
    assert_eq!(body, "Jwt verification fails");
    assert_eq!(curl(&ctl, &[&url("/public")]).0, "200");
}
