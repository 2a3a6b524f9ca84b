//! The waypoint benchmark (issue 13): one L7 hop, Ambit's waypoint against Envoy,
//! in the same run. A client pod on node-a sends 1 KB GETs over keep-alive to nginx
//! on node-b by three Services, each with an nginx pod of its own on node-b:
//!
//! - (a) `web-direct`: through the two ztunnels only;
//! - (b) `web-ambit`: bound to Gateway `ambit-wp`, Ambit's `waypoint` in its pod;
//! - (c) `web-envoy`: bound to Gateway `envoy-wp`, Envoy in its pod as the same hop;
//! - (d) `web-ambit-rt`: bound to `ambit-wp`, with a 10-rule HTTPRoute per port and a
//!   JWT policy (RequestAuthentication, and `requestPrincipals` in its
//!   AuthorizationPolicy): issue 14's benchmark;
//! - (e) `web-envoy-rt`: bound to `envoy-wp`, the same routes as Envoy routes and the
//!   same JWT policy as its `jwt_authn` filter before RBAC.
//!
//! (d) and (e) send every request with the same valid token; the run checks first that
//! the routes and the JWT policy are in force on both, the same way.
//!
//! Both waypoints are real waypoints of the mesh: the client's ztunnel sends HBONE
//! to the waypoint's pod, and the destination's ztunnel admits only that waypoint (an
//! AuthorizationPolicy is attached to each Service, so the waypoint enforces it). Both
//! hold the same policy (GET only, never under `/admin`).
//!
//! Envoy is configured as Istio configures its waypoint: a listener on 15008 with
//! mTLS (TLS 1.3, a client certificate from the mesh's CA required, any identity of
//! the trust domain) and an HTTP/2 connection manager that terminates HBONE (CONNECT,
//! routed by the CONNECT authority: the bound Service's VIP and port) into an internal
//! listener; there an HTTP connection manager (path normalization, Istio's `BASE`; an
//! access log and a 10 s request-headers timeout, as ours) with the RBAC filter
//! holding the policy routes to a round-robin cluster whose
//! endpoint is a second internal listener that tunnels each upstream connection over
//! HBONE (`tcp_proxy` `tunneling_config`: HTTP/2 CONNECT over mTLS to the endpoint's
//! `podIP:15008`, as `envoy-wp`'s identity, the endpoint's identity required). Its
//! certificate is signed by the local mesh's CA. It runs as many worker threads as our
//! waypoint's runtime (one per core). What it omits (Istio's stats and metadata
//! exchange filters, tracing) is listed in the report ([`ENVOY_MIRRORS`]).
//!
//! The run proves each path is what it claims, or fails: each waypoint counts every
//! request hey sends through it (Ambit's `istio_requests_total`, Envoy's `/stats`) and
//! none of (a)'s, and denies `POST /admin` with 403, counting and logging the denial.
//!
//! Figures, each path in turn within a round, several rounds, medians and ranges:
//! at a fixed 1,000 requests/s (`hey -c 10 -q 100`) the proxy's CPU (utime + stime
//! from `/proc`) per 1,000 requests/s, its resident set, p50/p99 latency added over
//! (a); at saturation, requests/s of `wrk` (HTTP/1.1 keep-alive) and `h2load`
//! (HTTP/2, prior knowledge, to port 81).
//!
//! Run: `scripts/bench.sh waypoint` (`scripts/bench.sh waypoint quick`: one short
//! round; `scripts/bench.sh waypoint profile [envoy|routed|envoy-routed]`: load on
//! one path, (b) by default, only, 20 s at the fixed rate, 20 s of wrk and 20 s of h2load, to attach a
//! profiler to the pid it prints). The report is printed and written to
//! `target/bench-waypoint-report.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ambit_localmesh::{Pod, PodSpec, Process, Protocol, ServiceAccount, WaypointConfig};

use super::support::{bin, poll_until, two_nodes, Harness, DEADLINE};
use super::{
    number_after, process_ticks, rss_bytes, run, spread, start_nginx_with, ticks_per_second,
    FIXED_RATE_EACH, FIXED_WORKERS,
};

const NS: &str = "bench";
const AMBIT_WP: &str = "ambit-wp";
const ENVOY_WP: &str = "envoy-wp";
/// The Services' VIPs: each waypoint's own, and the three paths'.
const AMBIT_WP_VIP: &str = "10.96.1.1";
const ENVOY_WP_VIP: &str = "10.96.1.2";
const DIRECT_VIP: &str = "10.96.1.10";
const AMBIT_VIP: &str = "10.96.1.11";
const ENVOY_VIP: &str = "10.96.1.12";
const AMBIT_ROUTED_VIP: &str = "10.96.1.13";
const ENVOY_ROUTED_VIP: &str = "10.96.1.14";
/// The end-user token's issuer, subject and audience on (d) and (e).
const ISSUER: &str = "https://idp.bench.example";
const SUBJECT: &str = "user-1";
const AUDIENCE: &str = "web";
/// nginx's ports: HTTP/1.1, and HTTP/2 with prior knowledge (nginx 1.22 cannot serve
/// both on one plain port). The Services map 80 and 81 to them.
const NGINX_H1: u16 = 8080;
const NGINX_H2: u16 = 8081;

/// How long each measurement runs, and how many rounds.
struct Plan {
    rounds: usize,
    fixed: Duration,
    saturation: Duration,
}

/// Which proxy carries a path's L7 hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Ambit,
    Envoy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Direct,
    Ambit,
    Envoy,
    /// (d): Ambit's waypoint with the 10-rule routes and the JWT policy (issue 14).
    AmbitRouted,
    /// (e): Envoy with the same routes and its `jwt_authn` filter.
    EnvoyRouted,
}

const PATHS: [Path3; 5] = [
    Path3::Direct,
    Path3::Ambit,
    Path3::Envoy,
    Path3::AmbitRouted,
    Path3::EnvoyRouted,
];
/// The paths through a waypoint.
const WAYPOINT_PATHS: [Path3; 4] = [
    Path3::Ambit,
    Path3::Envoy,
    Path3::AmbitRouted,
    Path3::EnvoyRouted,
];

impl Path3 {
    fn vip(self) -> &'static str {
        match self {
            Path3::Direct => DIRECT_VIP,
            Path3::Ambit => AMBIT_VIP,
            Path3::Envoy => ENVOY_VIP,
            Path3::AmbitRouted => AMBIT_ROUTED_VIP,
            Path3::EnvoyRouted => ENVOY_ROUTED_VIP,
        }
    }

    /// The bound Service (and its nginx pod).
    fn service(self) -> &'static str {
        match self {
            Path3::Direct => "web-direct",
            Path3::Ambit => "web-ambit",
            Path3::Envoy => "web-envoy",
            Path3::AmbitRouted => "web-ambit-rt",
            Path3::EnvoyRouted => "web-envoy-rt",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Path3::Direct => "(a) ztunnel only",
            Path3::Ambit => "(b) Ambit waypoint",
            Path3::Envoy => "(c) Envoy 1.40",
            Path3::AmbitRouted => "(d) Ambit, routes + JWT",
            Path3::EnvoyRouted => "(e) Envoy, routes + JWT",
        }
    }

    fn proxy(self) -> Option<Proxy> {
        match self {
            Path3::Direct => None,
            Path3::Ambit | Path3::AmbitRouted => Some(Proxy::Ambit),
            Path3::Envoy | Path3::EnvoyRouted => Some(Proxy::Envoy),
        }
    }

    /// Whether the path holds the 10-rule routes and the JWT policy: its requests
    /// carry the token.
    fn routed(self) -> bool {
        matches!(self, Path3::AmbitRouted | Path3::EnvoyRouted)
    }

    fn index(self) -> usize {
        PATHS.iter().position(|p| *p == self).unwrap()
    }
}

/// One path's figures in one round.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// Requests/s hey reached at the fixed rate.
    fixed_rps: f64,
    /// The proxy's CPU during it, millicores per 1,000 requests/s (0 on (a)).
    cpu_per_1k: f64,
    /// The proxy's resident set at its end, MB (0 on (a)).
    rss_mb: f64,
    /// Of which anonymous memory (heap, stacks: not the binary's mapped pages), MB.
    anon_mb: f64,
    p50_ms: f64,
    p99_ms: f64,
    wrk_rps: f64,
    h2_rps: f64,
}

pub async fn main(mode: Option<&str>) {
    let profile = mode == Some("profile");
    let plan = if mode == Some("quick") || profile {
        Plan {
            rounds: 1,
            fixed: Duration::from_secs(5),
            saturation: Duration::from_secs(3),
        }
    } else {
        Plan {
            rounds: 4,
            fixed: Duration::from_secs(10),
            saturation: Duration::from_secs(10),
        }
    };
    let envoy_bin = std::env::var_os("AMBIT_BENCH_ENVOY")
        .map(PathBuf::from)
        .expect("AMBIT_BENCH_ENVOY names the Envoy binary (scripts/bench.sh waypoint sets it)");
    let token = Token::new();
    let mesh = two_nodes();
    mesh.declare_kubernetes(objects(&token.jwks));
    let client = mesh
        .add_pod(
            "node-a",
            PodSpec::new(NS, "client").service_account("client"),
        )
        .unwrap();
    let servers: Vec<Pod> = PATHS
        .iter()
        .map(|path| {
            mesh.add_pod(
                "node-b",
                PodSpec::new(NS, path.service())
                    .service_account("web")
                    .label("app", path.service()),
            )
            .unwrap()
        })
        .collect();
    let waypoint_pod = |gateway: &str| {
        mesh.add_pod(
            "node-a",
            PodSpec::new(NS, &format!("{gateway}-0"))
                .service_account(gateway)
                .label("gateway.networking.k8s.io/gateway-name", gateway),
        )
        .unwrap()
    };
    let ambit_pod = waypoint_pod(AMBIT_WP);
    let envoy_pod = waypoint_pod(ENVOY_WP);
    for pod in std::iter::once(&client).chain(&servers) {
        mesh.set_protocol(pod, Protocol::Hbone).unwrap();
    }
    let account = |name: &str| ServiceAccount {
        namespace: NS.into(),
        name: name.into(),
    };
    // ztunnel's and the waypoint's default log level, as a user runs them.
    let h = Harness::start_with_accounts(mesh, "info", &[], vec![account(AMBIT_WP)]);
    h.enrol(&client).await;
    let mut nginx = Vec::new();
    for pod in &servers {
        h.enrol(pod).await;
        nginx.push(start_nginx_with(&h, pod, |dir| {
            let www = dir.join("www");
            std::fs::create_dir_all(&www).unwrap();
            std::fs::write(www.join("1k"), vec![b'x'; 1024]).unwrap();
            format!(
                "listen {NGINX_H1} backlog=4096; listen {NGINX_H2} http2 backlog=4096;\n    \
                 keepalive_requests 1000000;\n    root {};",
                www.display()
            )
        }));
    }
    let ambit = ambit_localmesh::ambient::start_waypoint(
        &h.mesh,
        &ambit_pod,
        &WaypointConfig {
            binary: bin("waypoint"),
            gateway: account(AMBIT_WP),
            account: account(AMBIT_WP),
            log: "info".into(),
            log_format: ambit_net::process::LogFormat::Text,
        },
        DEADLINE,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    let envoy = start_envoy(
        &h,
        &envoy_pod,
        &servers[Path3::Envoy.index()],
        &servers[Path3::EnvoyRouted.index()],
        &token.jwks,
        &envoy_bin,
    );
    let load = Load {
        h: &h,
        client: &client,
        bearer: format!("Authorization: Bearer {}", token.valid),
    };
    for path in PATHS {
        until_served(&load, path, &envoy);
    }
    let proxies = Proxies {
        ambit: &ambit_pod,
        envoy: &envoy_pod,
    };
    // The same policy holds on both waypoints: a POST /admin is denied by each, and
    // each counts its denial and writes its access-log line (so the request did go
    // through it, and both keep an access log).
    for path in WAYPOINT_PATHS {
        let (process, line) = match path.proxy() {
            Some(Proxy::Ambit) => (&ambit, vec!["path=/admin", "response_code=403"]),
            _ => (&envoy, vec!["\"POST /admin HTTP/1.1\" 403"]),
        };
        let before = proxies.counts(&h, path);
        let admin = format!("http://{}:80/admin", path.vip());
        let code = curl(&load, path, &["-X", "POST"], &admin);
        assert_eq!(code, "403", "{}: POST /admin not denied", path.name());
        proxies.until_counted(&h, path, before, |now| now.denied >= before.denied + 1.0);
        until_logged(process, &line, path);
    }
    // The routes and the JWT policy are in force on (d) and (e), the same on both.
    for path in [Path3::AmbitRouted, Path3::EnvoyRouted] {
        check_routed(&load, &proxies, path, &token);
    }
    let pid = |path: Path3| match path.proxy() {
        None => None,
        Some(Proxy::Ambit) => Some(ambit.pid()),
        Some(Proxy::Envoy) => Some(envoy.pid()),
    };
    if profile {
        // Load on one waypoint only, to profile it: 20 s at the fixed rate, 20 s of
        // wrk, 20 s of h2load, each phase announced on stderr with the pid.
        let which = match std::env::args().nth(3).as_deref() {
            Some("envoy") => Path3::Envoy,
            Some("routed") => Path3::AmbitRouted,
            Some("envoy-routed") => Path3::EnvoyRouted,
            _ => Path3::Ambit,
        };
        let pid = pid(which).expect("a waypoint");
        let long = Plan {
            rounds: 1,
            fixed: Duration::from_secs(20),
            saturation: Duration::from_secs(20),
        };
        let mut s = Sample::default();
        eprintln!("==> {} pid {pid}: 20 s at 1,000 requests/s", which.name());
        fixed_rate(&load, which, Some(pid), &proxies, &long, &mut s);
        eprintln!("==> {} pid {pid}: 20 s of wrk", which.name());
        s.wrk_rps = wrk(&load, which, &long);
        eprintln!("==> {} pid {pid}: 20 s of h2load", which.name());
        s.h2_rps = h2load(&load, which, &long);
        println!("{s:?}");
        return;
    }
    let mut samples: Vec<[Sample; 5]> = Vec::new();
    for round in 0..plan.rounds {
        eprintln!("==> round {} of {}", round + 1, plan.rounds);
        // Each round starts with another path, so none always goes first.
        let order: Vec<usize> = (0..PATHS.len())
            .map(|i| (i + round) % PATHS.len())
            .collect();
        let mut s = [Sample::default(); 5];
        for &i in &order {
            fixed_rate(&load, PATHS[i], pid(PATHS[i]), &proxies, &plan, &mut s[i]);
        }
        for &i in &order {
            s[i].wrk_rps = wrk(&load, PATHS[i], &plan);
        }
        for &i in &order {
            s[i].h2_rps = h2load(&load, PATHS[i], &plan);
        }
        samples.push(s);
    }
    let report = report(&samples, &plan);
    print!("{report}");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-waypoint-report.md");
    std::fs::write(&file, &report).unwrap();
    eprintln!("report written to {}", file.display());
    drop(envoy);
    drop(ambit);
    for (process, dir) in nginx {
        drop(process);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The end user's signing key (ES256), its JWKS, and tokens signed with it.
struct Token {
    jwks: String,
    /// Valid for a day: issuer, subject, audience as the policies ask.
    valid: String,
    /// `valid` with its signature's first character changed.
    tampered: String,
}

impl Token {
    fn new() -> Token {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key = EncodingKey::from_ec_der(doc.as_ref());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("bench-1".into());
        let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": SUBJECT, "aud": AUDIENCE,
            "iat": now, "nbf": now - 60, "exp": now + 86_400,
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("bench-1".into());
        let valid = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        // The signature's first character changed: other bytes, whatever the decoder
        // (the last one's low bits may be padding a lenient decoder ignores).
        let at = valid.rfind('.').unwrap() + 1;
        let first = valid.as_bytes()[at];
        let tampered = format!(
            "{}{}{}",
            &valid[..at],
            if first == b'A' { 'B' } else { 'A' },
            &valid[at + 1..]
        );
        Token {
            jwks,
            valid,
            tampered,
        }
    }
}

/// What sends the load: the client pod, and the header the routed paths' requests
/// carry.
struct Load<'a> {
    h: &'a Harness,
    client: &'a Pod,
    bearer: String,
}

impl Load<'_> {
    /// `-H <the token>` on a routed path.
    fn header(&self, path: Path3) -> Vec<&str> {
        if path.routed() {
            vec!["-H", &self.bearer]
        } else {
            Vec::new()
        }
    }

    fn run(&self, path: Path3, program: &str, args: &[&str]) -> String {
        let mut all = self.header(path);
        all.extend(args);
        run(self.h, self.client, program, &all)
    }
}

/// The routed path's rules and JWT policy at work, the same through Ambit and Envoy:
/// the benchmark's request is answered by the last rule (its response header), a
/// redirect rule answers 301, no token is no principal (403 by the policy), a
/// tampered token is 401.
fn check_routed(load: &Load, proxies: &Proxies, path: Path3, token: &Token) {
    let before = proxies.counts(load.h, path);
    let with = |token: &str| format!("Authorization: Bearer {token}");
    let ok = curl_out(
        load,
        &["-o", "/dev/null", "-D", "-", "-H", &with(&token.valid)],
        &url(path, 80),
    );
    assert!(
        ok.lines().next().is_some_and(|l| l.contains(" 200"))
            && ok.to_ascii_lowercase().contains("x-route: catch-all"),
        "{}: GET /1k with the token was not answered by the catch-all rule:\n{ok}",
        path.name()
    );
    for (what, args, url, want) in [
        (
            "a redirect rule",
            vec!["-H", &with(&token.valid) as &str],
            format!("http://{}:80/old", path.vip()),
            "301",
        ),
        ("no token", vec![], self::url(path, 80), "403"),
        (
            "a tampered token",
            vec!["-H", &with(&token.tampered)],
            self::url(path, 80),
            "401",
        ),
        (
            "HTTP/2, the token",
            vec!["--http2-prior-knowledge", "-H", &with(&token.valid)],
            self::url(path, 81),
            "200",
        ),
    ] {
        let mut all = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}"];
        all.extend(args);
        let code = curl_out(load, &all, &url);
        assert_eq!(code.trim(), want, "{}: {what}: {url}", path.name());
    }
    // All five counted (a request is counted an instant after its response), so the
    // measurements that follow see none of them.
    proxies.until_counted(load.h, path, before, |now| {
        now.requests >= before.requests + 5.0
    });
}

fn url(path: Path3, port: u16) -> String {
    format!("http://{}:{port}/1k", path.vip())
}

/// The Kubernetes objects of the benchmark: the two waypoints (Gateway and Service),
/// the five Services, the same policy attached to each waypoint's Service, and on
/// (d)'s Service the 10-rule routes ([`ROUTE_RULES`], one HTTPRoute per port), a
/// RequestAuthentication with `jwks` inline, and a policy that also asks for the
/// token's principal. (e)'s Service holds the same objects, for Envoy to mirror
/// ([`envoy_config`]); Ambit's control plane sends them to no waypoint, as (e) is
/// bound to Envoy's.
fn objects(jwks: &str) -> Vec<serde_json::Value> {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {AMBIT_WP}, namespace: {NS}}}\n"
    );
    for (gateway, vip) in [(AMBIT_WP, AMBIT_WP_VIP), (ENVOY_WP, ENVOY_WP_VIP)] {
        yaml += &format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {{name: {gateway}, namespace: {NS}}}\n\
             spec:\n  gatewayClassName: istio-waypoint\n  \
             listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n\
             ---\napiVersion: v1\nkind: Service\n\
             metadata: {{name: {gateway}, namespace: {NS}, labels: {{gateway.networking.k8s.io/gateway-name: {gateway}}}}}\n\
             spec:\n  clusterIP: {vip}\n  \
             selector: {{gateway.networking.k8s.io/gateway-name: {gateway}}}\n  \
             ports: [{{name: mesh, port: 15008}}]\n"
        );
    }
    for path in PATHS {
        let name = path.service();
        let vip = path.vip();
        let waypoint = path.proxy().map(|p| match p {
            Proxy::Ambit => AMBIT_WP,
            Proxy::Envoy => ENVOY_WP,
        });
        let labels = waypoint.map_or(String::new(), |w| {
            format!(", labels: {{istio.io/use-waypoint: {w}}}")
        });
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}{labels}}}\n\
             spec:\n  clusterIP: {vip}\n  selector: {{app: {name}}}\n  \
             ports: [{{name: http, port: 80, targetPort: {NGINX_H1}}}, {{name: http2, port: 81, targetPort: {NGINX_H2}}}]\n"
        );
        if waypoint.is_none() {
            continue;
        }
        let from = if path.routed() {
            format!("from: [{{source: {{requestPrincipals: [\"{ISSUER}/{SUBJECT}\"]}}}}], ")
        } else {
            String::new()
        };
        yaml += &format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}-read-only, namespace: {NS}}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: {name}}}]\n  action: ALLOW\n  \
             rules: [{{{from}to: [{{operation: {{methods: [GET], notPaths: [/admin, /admin/*]}}}}]}}]\n"
        );
        if !path.routed() {
            continue;
        }
        yaml += &format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata: {{name: {name}-jwt, namespace: {NS}}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: {name}}}]\n  \
             jwtRules: [{{issuer: \"{ISSUER}\", audiences: [{AUDIENCE}], jwks: '{jwks}'}}]\n"
        );
        for port in [80, 81] {
            let rules: Vec<String> = ROUTE_RULES
                .iter()
                .map(|r| r.http_route(name, port))
                .collect();
            yaml += &format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{name: {name}-{port}, namespace: {NS}}}\n\
                 spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: {port}}}]\n  \
                 rules:\n{}\n",
                rules.join("\n")
            );
        }
    }
    serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

/// One rule of the routed paths' route table, written once and rendered both as an
/// HTTPRoute rule (Ambit) and as an Envoy route (in the Gateway API's precedence
/// order, which is this list's: Envoy takes the first route that matches).
struct RouteRule {
    /// `Exact`, `PathPrefix` or `RegularExpression`, and the value.
    path: (&'static str, &'static str),
    header: Option<(&'static str, &'static str)>,
    query: Option<(&'static str, &'static str)>,
    /// What the rule does besides forwarding to the Service.
    action: RuleAction,
}

enum RuleAction {
    Forward,
    /// A 301 to this path.
    Redirect(&'static str),
    /// A request header added.
    AddRequestHeader(&'static str, &'static str),
    /// A response header added.
    AddResponseHeader(&'static str, &'static str),
}

/// The 10 rules: the benchmark's `GET /1k` misses the first nine and is answered by
/// the last, which marks its response (checked before the run).
const ROUTE_RULES: [RouteRule; 10] = {
    const fn rule(kind: &'static str, value: &'static str) -> RouteRule {
        RouteRule {
            path: (kind, value),
            header: None,
            query: None,
            action: RuleAction::Forward,
        }
    }
    [
        RouteRule {
            action: RuleAction::Redirect("/new"),
            ..rule("Exact", "/old")
        },
        rule("Exact", "/healthz"),
        RouteRule {
            header: Some(("x-version", "v2")),
            ..rule("PathPrefix", "/api/v2")
        },
        rule("PathPrefix", "/api/v2"),
        RouteRule {
            action: RuleAction::AddRequestHeader("x-api", "v1"),
            ..rule("PathPrefix", "/api/v1")
        },
        rule("PathPrefix", "/static"),
        rule("RegularExpression", "/users/[0-9]+"),
        RouteRule {
            header: Some(("x-canary", "true")),
            ..rule("PathPrefix", "/")
        },
        RouteRule {
            query: Some(("debug", "1")),
            ..rule("PathPrefix", "/")
        },
        RouteRule {
            action: RuleAction::AddResponseHeader("x-route", "catch-all"),
            ..rule("PathPrefix", "/")
        },
    ]
};

impl RouteRule {
    /// The rule in an HTTPRoute whose backend is `service`'s `port`.
    fn http_route(&self, service: &str, port: u16) -> String {
        let (kind, value) = self.path;
        let mut matches = format!("path: {{type: {kind}, value: \"{value}\"}}");
        if let Some((name, value)) = self.header {
            matches += &format!(", headers: [{{name: {name}, value: \"{value}\"}}]");
        }
        if let Some((name, value)) = self.query {
            matches += &format!(", queryParams: [{{name: {name}, value: \"{value}\"}}]");
        }
        let backend = format!("backendRefs: [{{name: {service}, port: {port}}}]");
        let rest = match self.action {
            RuleAction::Forward => backend,
            RuleAction::Redirect(to) => format!(
                "filters: [{{type: RequestRedirect, requestRedirect: \
                 {{path: {{type: ReplaceFullPath, replaceFullPath: {to}}}, statusCode: 301}}}}]"
            ),
            RuleAction::AddRequestHeader(name, value) => format!(
                "filters: [{{type: RequestHeaderModifier, requestHeaderModifier: \
                 {{add: [{{name: {name}, value: {value}}}]}}}}], {backend}"
            ),
            RuleAction::AddResponseHeader(name, value) => format!(
                "filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: \
                 {{add: [{{name: {name}, value: {value}}}]}}}}], {backend}"
            ),
        };
        format!("  - {{matches: [{{{matches}}}], {rest}}}")
    }

    /// The same rule as an Envoy route to `cluster` (Istio's translation: `PathPrefix`
    /// is `path_separated_prefix`, but `/` a plain prefix).
    fn envoy_route(&self, cluster: &str) -> String {
        let (kind, value) = self.path;
        let mut m = match (kind, value) {
            ("Exact", v) => format!("path: \"{v}\""),
            ("PathPrefix", "/") => "prefix: /".to_owned(),
            ("PathPrefix", v) => format!("path_separated_prefix: \"{v}\""),
            (_, v) => format!("safe_regex: {{regex: \"{v}\"}}"),
        };
        if let Some((name, value)) = self.header {
            m += &format!(", headers: [{{name: {name}, string_match: {{exact: \"{value}\"}}}}]");
        }
        if let Some((name, value)) = self.query {
            m += &format!(
                ", query_parameters: [{{name: {name}, string_match: {{exact: \"{value}\"}}}}]"
            );
        }
        let route = format!("route: {{cluster: {cluster}}}");
        let rest = match self.action {
            RuleAction::Forward => route,
            RuleAction::Redirect(to) => {
                format!("redirect: {{path_redirect: {to}, response_code: MOVED_PERMANENTLY}}")
            }
            RuleAction::AddRequestHeader(name, value) => format!(
                "{route}, request_headers_to_add: [{{header: {{key: {name}, value: {value}}}}}]"
            ),
            RuleAction::AddResponseHeader(name, value) => format!(
                "{route}, response_headers_to_add: [{{header: {{key: {name}, value: {value}}}}}]"
            ),
        };
        format!("{{match: {{{m}}}, {rest}}}")
    }
}

/// What `curl -s -m 5 <extra> <url>` printed in the client pod.
fn curl_out(load: &Load, extra: &[&str], url: &str) -> String {
    let mut args = vec!["-s", "-m", "5"];
    args.extend(extra);
    args.push(url);
    let out = load
        .h
        .mesh
        .run_in(load.client.netns(), "curl", &args, Duration::from_secs(10))
        .unwrap();
    out.log
}

/// The HTTP status `curl` gets on `path` for `url` (`extra`: more flags; on a routed
/// path, with the token).
fn curl(load: &Load, path: Path3, extra: &[&str], url: &str) -> String {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    args.extend(load.header(path));
    args.extend(extra);
    curl_out(load, &args, url).trim().to_owned()
}

/// Polls until `path` serves the 1 KB file over HTTP/1.1 and HTTP/2.
fn until_served(load: &Load, path: Path3, envoy: &Process) {
    let got = std::cell::RefCell::new((String::new(), String::new()));
    poll_until(
        DEADLINE,
        || {
            let now = (
                curl(load, path, &[], &url(path, 80)),
                curl(load, path, &["--http2-prior-knowledge"], &url(path, 81)),
            );
            let served = now.0 == "200" && now.1 == "200";
            *got.borrow_mut() = now;
            served
        },
        || {
            let got = got.borrow();
            format!(
                "{} never served: HTTP/1.1 {}, HTTP/2 {}\n--- envoy ---\n{}\n{}",
                path.name(),
                got.0,
                got.1,
                envoy.log(),
                load.h.logs()
            )
        },
    );
}

/// The two waypoints' pods, to read what each has counted.
struct Proxies<'a> {
    ambit: &'a Pod,
    envoy: &'a Pod,
}

/// Requests a waypoint has served, and how many of them it denied.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    requests: f64,
    denied: f64,
}

impl Proxies<'_> {
    /// What the waypoint of `path` has counted for that path's Service: Ambit's from
    /// its `istio_requests_total` (reporter `waypoint`, the Service's
    /// `destination_service_name`), Envoy's from the path's HTTP connection managers'
    /// `downstream_rq_completed` and their RBAC filter's `rbac.denied`.
    fn counts(&self, h: &Harness, path: Path3) -> Counts {
        let get = |pod: &Pod, url: &str| {
            let out = h
                .mesh
                .run_in(
                    pod.netns(),
                    "curl",
                    ["-sf", "-m", "5", url],
                    Duration::from_secs(10),
                )
                .unwrap();
            assert!(
                out.status.success(),
                "curl {url} in {}: {}",
                pod.name(),
                out.log
            );
            out.log
        };
        let value = |line: &str| -> f64 {
            line.rsplit([' ', ':'])
                .next()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no value in {line:?}"))
        };
        match path.proxy() {
            None => panic!("(a) has no waypoint"),
            Some(Proxy::Ambit) => {
                let text = get(self.ambit, "http://127.0.0.1:15020/metrics");
                let service = format!("destination_service_name=\"{}\"", path.service());
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("istio_requests_total{")
                            && l.contains("reporter=\"waypoint\"")
                            && l.contains(&service)
                    })
                    .collect();
                Counts {
                    requests: lines.iter().map(|l| value(l)).sum(),
                    denied: lines
                        .iter()
                        .filter(|l| l.contains("response_code=\"403\""))
                        .map(|l| value(l))
                        .sum(),
                }
            }
            Some(Proxy::Envoy) => {
                let text = get(
                    self.envoy,
                    "http://127.0.0.1:15000/stats?filter=^http\\.inbound_",
                );
                let prefix = if path.routed() {
                    "http.inbound_rt_"
                } else {
                    "http.inbound_8"
                };
                let sum = |suffix: &str| {
                    text.lines()
                        .filter(|l| {
                            l.split(':')
                                .next()
                                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
                        })
                        .map(value)
                        .sum()
                };
                Counts {
                    requests: sum(".downstream_rq_completed"),
                    denied: sum(".rbac.denied"),
                }
            }
        }
    }

    /// Polls until the waypoint of `path` has counted what `done` asks for since
    /// `before` (a request is counted when its response has ended, an instant after
    /// the client has it).
    fn until_counted(
        &self,
        h: &Harness,
        path: Path3,
        before: Counts,
        done: impl Fn(Counts) -> bool,
    ) {
        let now = std::cell::Cell::new(before);
        poll_until(
            Duration::from_secs(10),
            || {
                now.set(self.counts(h, path));
                done(now.get())
            },
            || {
                format!(
                    "{}: the waypoint did not count the requests sent through it: \
                     before {before:?}, now {:?}",
                    path.name(),
                    now.get()
                )
            },
        );
    }
}

/// Polls `process`'s log until a line holds every one of `needles` (Envoy flushes its
/// access log every second).
fn until_logged(process: &Process, needles: &[&str], path: Path3) {
    poll_until(
        Duration::from_secs(10),
        || {
            process
                .log()
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
        },
        || {
            format!(
                "{}: no access-log line with {needles:?}:\n{}",
                path.name(),
                process.log()
            )
        },
    );
}

/// hey at 1,000 requests/s for `plan.fixed`: requests/s reached, latency, and the
/// proxy's CPU and resident set.
fn fixed_rate(
    load: &Load,
    path: Path3,
    pid: Option<u32>,
    proxies: &Proxies,
    plan: &Plan,
    s: &mut Sample,
) {
    let h = load.h;
    let counted = WAYPOINT_PATHS.map(|p| proxies.counts(h, p));
    let before = pid.map(process_ticks);
    let started = std::time::Instant::now();
    let (workers, rate) = (FIXED_WORKERS.to_string(), FIXED_RATE_EACH.to_string());
    let duration = format!("{}s", plan.fixed.as_secs());
    let out = load.run(
        path,
        "hey",
        &["-z", &duration, "-c", &workers, "-q", &rate, &url(path, 80)],
    );
    let wall = started.elapsed().as_secs_f64();
    let codes: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with('['))
        .collect();
    assert!(
        codes.len() == 1 && codes[0].contains("[200]") && !out.contains("Error distribution"),
        "{}: hey got answers other than 200:\n{out}",
        path.name()
    );
    // Every request went through the path's waypoint, and none of another path's.
    let answered = number_after(&out, "[200]");
    for (i, other) in WAYPOINT_PATHS.into_iter().enumerate() {
        let before = counted[i];
        if other == path {
            proxies.until_counted(h, other, before, |now| {
                now.requests >= before.requests + answered
            });
        } else {
            let now = proxies.counts(h, other);
            assert_eq!(
                now,
                before,
                "{}: traffic went through {}",
                path.name(),
                other.name()
            );
        }
    }
    s.fixed_rps = number_after(&out, "Requests/sec:");
    s.p50_ms = number_after(&out, "50% in") * 1000.0;
    s.p99_ms = number_after(&out, "99% in") * 1000.0;
    if let (Some(pid), Some(before)) = (pid, before) {
        let cores = (process_ticks(pid) - before) as f64 / ticks_per_second() / wall;
        s.cpu_per_1k = cores * 1000.0 * 1000.0 / s.fixed_rps;
        s.rss_mb = rss_bytes(pid) as f64 / 1e6;
        s.anon_mb = anon_rss_bytes(pid) as f64 / 1e6;
    }
}

/// wrk, one thread, 16 keep-alive connections: requests/s.
fn wrk(load: &Load, path: Path3, plan: &Plan) -> f64 {
    let duration = format!("{}s", plan.saturation.as_secs());
    let out = load.run(
        path,
        "wrk",
        &["-t", "1", "-c", "16", "-d", &duration, &url(path, 80)],
    );
    assert!(
        !out.contains("Non-2xx") && !out.contains("Socket errors"),
        "{}: wrk saw errors:\n{out}",
        path.name()
    );
    number_after(&out, "Requests/sec:")
}

/// h2load, one thread, 4 connections of 16 concurrent streams: requests/s.
fn h2load(load: &Load, path: Path3, plan: &Plan) -> f64 {
    let duration = plan.saturation.as_secs().to_string();
    let out = load.run(
        path,
        "h2load",
        &[
            "-D",
            &duration,
            "-t",
            "1",
            "-c",
            "4",
            "-m",
            "16",
            &url(path, 81),
        ],
    );
    assert!(
        out.contains(" 0 failed, 0 errored") && out.contains(" 0 4xx, 0 5xx"),
        "{}: h2load saw errors:\n{out}",
        path.name()
    );
    // "finished in 5.00s, 12345.60 req/s, 13.50MB/s"
    let finished = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .unwrap_or_else(|| panic!("no `finished in` in h2load output:\n{out}"));
    number_after(finished, ",")
}

/// The anonymous part of `pid`'s resident set in bytes (`RssAnon`): what it allocated,
/// without the pages of its binary and libraries (Envoy's binary is about 100 MB).
fn anon_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no RssAnon in /proc/{pid}/status"));
    kb * 1024
}

/// Starts Envoy in `pod` as waypoint `envoy-wp` of two Services: (c)'s, whose only
/// endpoint is `server`, and (e)'s (routes and JWT, `jwks`), whose only endpoint is
/// `routed`.
fn start_envoy(
    h: &Harness,
    pod: &Pod,
    server: &Pod,
    routed: &Pod,
    jwks: &str,
    envoy: &Path,
) -> Process {
    let dir = h.mesh.dir().join("envoy");
    std::fs::create_dir_all(&dir).unwrap();
    let identity = ServiceAccount {
        namespace: NS.into(),
        name: ENVOY_WP.into(),
    }
    .identity();
    certificate(&h.mesh.dir().join("ca"), &dir, &identity);
    let identity_of = |pod: &Pod| {
        ServiceAccount {
            namespace: NS.into(),
            name: pod.service_account().into(),
        }
        .identity()
    };
    let bound = [
        Bound {
            path: Path3::Envoy,
            server_ip: server.ip(),
            server_identity: identity_of(server),
        },
        Bound {
            path: Path3::EnvoyRouted,
            server_ip: routed.ip(),
            server_identity: identity_of(routed),
        },
    ];
    let config = envoy_config(&dir, &bound, jwks);
    let config_path = dir.join("envoy.yaml");
    std::fs::write(&config_path, config).unwrap();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();
    let process = h
        .mesh
        .spawn_in(
            pod.netns(),
            envoy,
            [
                "-c",
                config_path.to_str().unwrap(),
                "--concurrency",
                &workers,
                "--disable-hot-restart",
                "--log-level",
                "info",
            ],
            &[],
        )
        .unwrap();
    process
        .wait_for_log("starting main dispatch loop", DEADLINE)
        .unwrap_or_else(|e| panic!("envoy did not start: {e}\n{}", process.log()));
    process
}
/// A key and certificate for `identity` signed by the mesh's CA (in `ca`), as the
/// CA issues them (one URI SAN, client and server use), and the root, in `dir`.
fn certificate(ca: &Path, dir: &Path, identity: &str) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let c = |name: &str| ca.join(name).to_string_lossy().into_owned();
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{identity}\n"
        ),
    )
    .unwrap();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("key.pem"),
        "-out",
        &p("csr.pem"),
        "-subj",
        "/O=cluster.local",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("csr.pem"),
        "-CA",
        &c("ca-cert.pem"),
        "-CAkey",
        &c("ca-key.pem"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("leaf.pem"),
    ]);
    // The chain: the leaf, the signing certificate unless it is the root, its chain.
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let (signer, root) = (
        read(&ca.join("ca-cert.pem")),
        read(&ca.join("root-cert.pem")),
    );
    let mut chain = read(&dir.join("leaf.pem"));
    if signer != root {
        chain += &signer;
        chain += &read(&ca.join("cert-chain.pem"));
    }
    std::fs::write(dir.join("chain.pem"), chain).unwrap();
    std::fs::write(dir.join("root.pem"), root).unwrap();
}

/// A Service bound to Envoy's waypoint: its path, and its one endpoint.
struct Bound {
    path: Path3,
    server_ip: std::net::Ipv4Addr,
    server_identity: String,
}

/// Envoy's bootstrap: Istio's waypoint shape for the `bound` Services (ports 80 and
/// 81 each, one endpoint each). On a routed path the inner listener also holds the
/// `jwt_authn` filter (the provider's keys: `jwks`) before RBAC, whose policy then
/// asks for the token's issuer and subject, and the route table of [`ROUTE_RULES`].
fn envoy_config(dir: &Path, bound: &[Bound], jwks: &str) -> String {
    let d = dir.display();
    let tls_common = format!(
        "tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3, \
         ecdh_curves: [X25519MLKEM768, X25519]}}\n\
         tls_certificates: [{{certificate_chain: {{filename: {d}/chain.pem}}, private_key: {{filename: {d}/key.pem}}}}]"
    );
    let indent = |text: &str, n: usize| {
        text.lines()
            .map(|l| format!("{}{l}", " ".repeat(n)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // A bound Service's names: `80`, `81` on (c), `rt_80`, `rt_81` on (e).
    let tag = |b: &Bound, port: u16| {
        if b.path.routed() {
            format!("rt_{port}")
        } else {
            port.to_string()
        }
    };
    let hbone_name = |b: &Bound| {
        if b.path.routed() {
            "hbone_rt"
        } else {
            "hbone"
        }
    };
    let jwt_filter = format!(
        "- name: envoy.filters.http.jwt_authn\n  typed_config:\n    \
         \"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication\n    \
         providers:\n      bench:\n        issuer: \"{ISSUER}\"\n        audiences: [{AUDIENCE}]\n        \
         local_jwks: {{inline_string: '{jwks}'}}\n        payload_in_metadata: payload\n        \
         jwt_cache_config: {{jwt_cache_size: 1024}}\n    \
         rules:\n    - match: {{prefix: /}}\n      \
         requires: {{requires_any: {{requirements: [{{provider_name: bench}}, {{allow_missing: {{}}}}]}}}}\n"
    );
    let jwt_principal = |claim: &str, value: &str| {
        format!(
            "{{metadata: {{filter: envoy.filters.http.jwt_authn, path: [{{key: payload}}, {{key: {claim}}}], \
             value: {{string_match: {{exact: \"{value}\"}}}}}}}}"
        )
    };
    // The inner listener of one port: HTTP with the policy, to that port's cluster.
    let inner = |b: &Bound, port: u16, codec: &str| {
        let t = tag(b, port);
        let (routes, jwt, principals) = if b.path.routed() {
            let routes: Vec<String> = ROUTE_RULES
                .iter()
                .map(|r| format!("- {}", r.envoy_route(&format!("web_{t}"))))
                .collect();
            (
                routes.join("\n"),
                jwt_filter.clone(),
                format!(
                    "[{{and_ids: {{ids: [{}, {}]}}}}]",
                    jwt_principal("iss", ISSUER),
                    jwt_principal("sub", SUBJECT)
                ),
            )
        } else {
            (
                format!("- {{match: {{prefix: /}}, route: {{cluster: web_{t}}}}}"),
                String::new(),
                "[{any: true}]".to_owned(),
            )
        };
        format!(
            "- name: inner_{t}\n  internal_listener: {{}}\n  filter_chains:\n  - filters:\n    \
             - name: envoy.filters.network.http_connection_manager\n      typed_config:\n        \
             \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n        \
             stat_prefix: inbound_{t}\n        codec_type: {codec}\n        normalize_path: true\n        \
             request_headers_timeout: 10s\n        \
             access_log: [{{name: envoy.access_loggers.file, typed_config: {{\"@type\": \
             type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: /dev/stdout}}}}]\n        \
             route_config:\n          name: web_{t}\n          virtual_hosts:\n          \
             - name: web\n            domains: [\"*\"]\n            routes:\n{routes}\n        \
             http_filters:\n{jwt}        - name: envoy.filters.http.rbac\n          typed_config:\n            \
             \"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n            \
             rules:\n              action: ALLOW\n              policies:\n                \
             ns[{NS}]-policy[{service}-read-only]-rule[0]:\n                  \
             permissions:\n                  - and_rules:\n                      rules:\n                      \
             - or_rules: {{rules: [{{header: {{name: \":method\", string_match: {{exact: GET}}}}}}]}}\n                      \
             - not_rule: {{or_rules: {{rules: [{{url_path: {{path: {{exact: /admin}}}}}}, {{url_path: {{path: {{prefix: /admin/}}}}}}]}}}}\n                  \
             principals: {principals}\n        \
             - name: envoy.filters.http.router\n          typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n\
             - name: originate_{t}\n  internal_listener: {{}}\n  filter_chains:\n  - filters:\n    \
             - name: envoy.filters.network.tcp_proxy\n      typed_config:\n        \
             \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n        \
             stat_prefix: originate_{t}\n        cluster: {hbone}\n        \
             tunneling_config: {{hostname: \"{server_ip}:{target}\"}}\n",
            routes = indent(&routes, 12),
            jwt = indent(&jwt, 8) + if jwt.is_empty() { "" } else { "\n" },
            service = b.path.service(),
            hbone = hbone_name(b),
            server_ip = b.server_ip,
            target = if port == 80 { NGINX_H1 } else { NGINX_H2 },
        )
    };
    let internal_cluster = |name: &str, listener: &str, extra: &str| {
        format!(
            "- name: {name}\n  lb_policy: ROUND_ROBIN\n{extra}  load_assignment:\n    cluster_name: {name}\n    \
             endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{envoy_internal_address: {{server_listener_name: {listener}}}}}}}}}]}}]\n"
        )
    };
    let h2_upstream = "  typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n      \
                       \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n      \
                       explicit_http_config: {http2_protocol_options: {}}\n";
    // One HBONE cluster per bound Service, both ports' (its endpoint's podIP:15008,
    // its identity required).
    let hbone = |b: &Bound| {
        format!(
            "- name: {t}\n  type: STATIC\n{h2_upstream}  \
             load_assignment:\n    cluster_name: {t}\n    \
             endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: 15008}}}}}}}}]}}]\n  \
             transport_socket:\n    name: envoy.transport_sockets.tls\n    typed_config:\n      \
             \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n      \
             common_tls_context:\n{common}\n        alpn_protocols: [h2]\n        \
             validation_context:\n          trusted_ca: {{filename: {d}/root.pem}}\n          \
             match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{identity}\"}}}}]\n",
            t = hbone_name(b),
            ip = b.server_ip,
            identity = b.server_identity,
            common = indent(&tls_common, 8),
        )
    };
    let mut virtual_hosts = String::new();
    let mut listeners = String::new();
    let mut clusters = String::new();
    for b in bound {
        for (port, codec) in [(80, "AUTO"), (81, "HTTP2")] {
            let t = tag(b, port);
            virtual_hosts += &format!(
                "            - name: {service}-{port}\n              domains: [\"{vip}:{port}\"]\n              \
                 routes: [{{match: {{connect_matcher: {{}}}}, route: {{cluster: inner_{t}, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}}}]\n",
                service = b.path.service(),
                vip = b.path.vip(),
            );
            listeners += &(indent(&inner(b, port, codec), 2) + "\n");
            let upstream = if port == 81 { h2_upstream } else { "" };
            clusters += &(indent(
                &internal_cluster(&format!("inner_{t}"), &format!("inner_{t}"), ""),
                2,
            ) + "\n");
            clusters += &(indent(
                &internal_cluster(&format!("web_{t}"), &format!("originate_{t}"), upstream),
                2,
            ) + "\n");
        }
        clusters += &(indent(&hbone(b), 2) + "\n");
    }
    format!(
        "node: {{id: {ENVOY_WP}, cluster: {ENVOY_WP}}}\n\
         admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}\n\
         bootstrap_extensions:\n- name: envoy.bootstrap.internal_listener\n  typed_config:\n    \
         \"@type\": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener\n\
         static_resources:\n  listeners:\n  \
         - name: connect_terminate\n    address: {{socket_address: {{address: 0.0.0.0, port_value: 15008}}}}\n    \
         filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \
         \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          \
         require_client_certificate: true\n          common_tls_context:\n{common}\n            alpn_protocols: [h2]\n            \
         validation_context:\n              trusted_ca: {{filename: {d}/root.pem}}\n              \
         match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: \"spiffe://cluster.local/\"}}}}]\n      \
         filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \
         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          \
         stat_prefix: connect_terminate\n          codec_type: HTTP2\n          \
         http2_protocol_options: {{allow_connect: true}}\n          upgrade_configs: [{{upgrade_type: CONNECT}}]\n          \
         http_filters:\n          - name: envoy.filters.http.router\n            \
         typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n          \
         route_config:\n            name: connect_terminate\n            virtual_hosts:\n\
         {virtual_hosts}{listeners}  clusters:\n{clusters}",
        common = indent(&tls_common, 12),
    )
}

/// How Envoy's configuration mirrors the waypoint's work, and what it omits.
const ENVOY_MIRRORS: &str = "\
Envoy's hop does what Ambit's waypoint does per request: HBONE terminated on 15008 \
(TLS 1.3 only, a client certificate chaining to the mesh root with a URI SAN of the trust \
domain required, ALPN h2, HTTP/2 CONNECT routed by its authority, only the bound Service's \
VIP:port accepted), then an internal listener with an HTTP connection manager (HTTP/1.1 or \
HTTP/2 by the port, as ours; path normalization as Istio's `BASE`: `normalize_path`; \
Envoy's default header limits, 60 KiB; a 10 s request-headers timeout, as ours; \
`x-request-id` generated when absent, as ours; one access-log line per request, to its \
stdout, as ours writes one to stderr), the RBAC filter holding the same policy (ALLOW \
`GET` and not `/admin`, `/admin/*`, any principal), a round-robin cluster over the \
Service's endpoint, and each upstream connection tunnelled over pooled HBONE (HTTP/2 \
CONNECT to the endpoint's `podIP:15008` with authority `podIP:targetPort`, mTLS as its \
own identity, the endpoint's identity required). Worker threads: one per core \
(`--concurrency` = cores), as the waypoint's tokio runtime. \
It omits, all in Envoy's favour: Istio's stats filter (ours records \
`istio_requests_total`, the duration and size histograms with Istio's labels per \
request; Envoy keeps only its own counters and histograms), the peer metadata from \
`baggage` and the `forwarded` and `baggage` headers ours puts on its upstream CONNECT, \
`traceparent` continuation with a new span per hop (no tracer configured), the xDS \
subscription and certificate rotation (Envoy's configuration and certificate are static \
files, its certificate signed with the mesh CA's key by openssl). Both access logs are \
buffered and flushed every second.\n";

fn report(samples: &[[Sample; 5]], plan: &Plan) -> String {
    let fmt = |v: Vec<f64>, digits: usize| {
        let (m, lo, hi) = spread(v);
        if samples.len() == 1 {
            format!("{m:.digits$}")
        } else {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
    };
    // An added latency, with its sign (the noise can make it negative).
    let signed = |v: Vec<f64>| {
        let (m, lo, hi) = spread(v);
        if samples.len() == 1 {
            format!("{m:+.3}")
        } else {
            format!("{m:+.3} ({lo:+.3}–{hi:+.3})")
        }
    };
    let col = |i: usize, f: &dyn Fn(&Sample) -> f64| samples.iter().map(|s| f(&s[i])).collect();
    let added = |i: usize, f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
        samples.iter().map(|s| f(&s[i]) - f(&s[0])).collect()
    };
    let ratio = |a: Vec<f64>, b: Vec<f64>| {
        let (a, b) = (spread(a).0, spread(b).0);
        a / b
    };
    let mark = |ok: bool| if ok { "yes" } else { "**no**" };
    let mut out = format!(
        "# Waypoint benchmark (local mesh, client on node-a, nginx on node-b, 1 KB GETs)\n\n\
         {} round(s), interleaved; median (range). Fixed rate: hey -c {FIXED_WORKERS} -q {FIXED_RATE_EACH} for {} s; \
         saturation: wrk -t1 -c16 and h2load -t1 -c4 -m16 for {} s each.\n\n\
         | figure | (a) ztunnel only | (b) Ambit waypoint | (c) Envoy 1.40 | (b)/(c) | target | met |\n\
         |---|---|---|---|---|---|---|\n",
        samples.len(),
        plan.fixed.as_secs(),
        plan.saturation.as_secs()
    );
    let cpu = |s: &Sample| s.cpu_per_1k;
    let rss = |s: &Sample| s.rss_mb;
    let (cpu_b, cpu_c) = (spread(col(1, &cpu)).0, spread(col(2, &cpu)).0);
    let (rss_b, rss_c) = (spread(col(1, &rss)).0, spread(col(2, &rss)).0);
    out += &format!(
        "| proxy CPU per 1,000 req/s (millicores) | - | {} | {} | {:.2} | ≤ 0.5×, ≤ 100 | {} |\n",
        fmt(col(1, &cpu), 1),
        fmt(col(2, &cpu), 1),
        cpu_b / cpu_c,
        mark(cpu_b <= 0.5 * cpu_c && cpu_b <= 100.0)
    );
    out += &format!(
        "| proxy RSS at 1,000 req/s (MB) | - | {} | {} | {:.2} | ≤ 0.5×, ≤ 20 | {} |\n",
        fmt(col(1, &rss), 1),
        fmt(col(2, &rss), 1),
        rss_b / rss_c,
        mark(rss_b <= 0.5 * rss_c && rss_b <= 20.0)
    );
    let anon = |s: &Sample| s.anon_mb;
    out += &format!(
        "| of which anonymous (RssAnon, MB) | - | {} | {} | {:.2} | - | - |\n",
        fmt(col(1, &anon), 1),
        fmt(col(2, &anon), 1),
        ratio(col(1, &anon), col(2, &anon)),
    );
    let p50 = |s: &Sample| s.p50_ms;
    let p99 = |s: &Sample| s.p99_ms;
    out += &format!(
        "| p50 latency (ms); added over (a) in (b), (c) | {} | {} | {} | {:.2} | - | - |\n",
        fmt(col(0, &p50), 3),
        signed(added(1, &p50)),
        signed(added(2, &p50)),
        ratio(added(1, &p50), added(2, &p50)),
    );
    let (p99_b, p99_c) = (spread(added(1, &p99)).0, spread(added(2, &p99)).0);
    out += &format!(
        "| p99 latency (ms); added over (a) in (b), (c) | {} | {} | {} | {:.2} | ≤ 1× | {} |\n",
        fmt(col(0, &p99), 3),
        signed(added(1, &p99)),
        signed(added(2, &p99)),
        p99_b / p99_c,
        mark(p99_b <= p99_c)
    );
    let fixed = |s: &Sample| s.fixed_rps;
    out += &format!(
        "| hey requests/s reached | {} | {} | {} | - | 1,000 | - |\n",
        fmt(col(0, &fixed), 0),
        fmt(col(1, &fixed), 0),
        fmt(col(2, &fixed), 0),
    );
    for (name, f) in [
        (
            "wrk requests/s (HTTP/1.1, saturation)",
            &(|s: &Sample| s.wrk_rps) as &dyn Fn(&Sample) -> f64,
        ),
        ("h2load requests/s (HTTP/2, saturation)", &|s: &Sample| {
            s.h2_rps
        }),
    ] {
        let r = ratio(col(1, f), col(2, f));
        out += &format!(
            "| {name} | {} | {} | {} | {r:.2} | ≥ 1.5× | {} |\n",
            fmt(col(0, f), 0),
            fmt(col(1, f), 0),
            fmt(col(2, f), 0),
            mark(r >= 1.5)
        );
    }
    // Issue 14: what the 10-rule routes and the JWT policy cost, on each proxy.
    let (b, c, d, e) = (1, 2, 3, 4);
    out += "\n## Routes and JWT (issue 14): (d) and (e) hold the 10-rule routes and the JWT policy\n\n\
            | figure | (b) Ambit | (d) Ambit, routes + JWT | (d)/(b) | (c) Envoy | (e) Envoy, routes + JWT | (d)/(e) | target | met |\n\
            |---|---|---|---|---|---|---|---|---|\n";
    let cpu_d = spread(col(d, &cpu)).0;
    let cpu_e = spread(col(e, &cpu)).0;
    out += &format!(
        "| proxy CPU per 1,000 req/s (millicores) | {} | {} | {:.2} | {} | {} | {:.2} | (d)/(b) ≤ 1.2, (d)/(e) ≤ 0.5 | {} |\n",
        fmt(col(b, &cpu), 1),
        fmt(col(d, &cpu), 1),
        cpu_d / cpu_b,
        fmt(col(c, &cpu), 1),
        fmt(col(e, &cpu), 1),
        cpu_d / cpu_e,
        mark(cpu_d <= 1.2 * cpu_b && cpu_d <= 0.5 * cpu_e)
    );
    let (p99_d, p99_e) = (spread(added(d, &p99)).0, spread(added(e, &p99)).0);
    out += &format!(
        "| p99 added over (a) (ms) | {} | {} | - | {} | {} | {:.2} | (d)/(e) ≤ 1 | {} |\n",
        signed(added(b, &p99)),
        signed(added(d, &p99)),
        signed(added(c, &p99)),
        signed(added(e, &p99)),
        p99_d / p99_e,
        mark(p99_d <= p99_e)
    );
    out += &format!(
        "| p50 added over (a) (ms) | {} | {} | - | {} | {} | {:.2} | - | - |\n",
        signed(added(b, &p50)),
        signed(added(d, &p50)),
        signed(added(c, &p50)),
        signed(added(e, &p50)),
        ratio(added(d, &p50), added(e, &p50)),
    );
    out += &format!(
        "| proxy RSS (MB) | {} | {} | - | {} | {} | {:.2} | - | - |\n",
        fmt(col(b, &rss), 1),
        fmt(col(d, &rss), 1),
        fmt(col(c, &rss), 1),
        fmt(col(e, &rss), 1),
        ratio(col(d, &rss), col(e, &rss)),
    );
    for (name, f) in [
        (
            "wrk requests/s (HTTP/1.1)",
            &(|s: &Sample| s.wrk_rps) as &dyn Fn(&Sample) -> f64,
        ),
        ("h2load requests/s (HTTP/2)", &|s: &Sample| s.h2_rps),
    ] {
        out += &format!(
            "| {name} | {} | {} | {:.2} | {} | {} | {:.2} | - | - |\n",
            fmt(col(b, f), 0),
            fmt(col(d, f), 0),
            ratio(col(d, f), col(b, f)),
            fmt(col(c, f), 0),
            fmt(col(e, f), 0),
            ratio(col(d, f), col(e, f)),
        );
    }
    out += "\nThe route table (one HTTPRoute per port on (d); Envoy's routes on (e), in the \
            Gateway API's precedence order): `Exact /old` → 301 redirect, `Exact /healthz`, \
            `PathPrefix /api/v2` with header `x-version: v2`, `PathPrefix /api/v2`, \
            `PathPrefix /api/v1` adding a request header, `PathPrefix /static`, \
            `RegularExpression /users/[0-9]+`, `PathPrefix /` with header `x-canary: true`, \
            `PathPrefix /` with query `debug=1`, and `PathPrefix /` adding response header \
            `x-route: catch-all`; the benchmark's `GET /1k` misses the first nine. The JWT \
            policy: a RequestAuthentication (issuer, audience, an ES256 key in an inline \
            JWKS; Envoy: `jwt_authn` with the same provider, missing tokens allowed through \
            to RBAC, as Istio writes it) and the ALLOW policy also asking for the token's \
            principal (`requestPrincipals`; Envoy: RBAC metadata matchers on the verified \
            payload's `iss` and `sub`). Every request carries the same valid token. \
            Both remember verified tokens, so a token's signature is checked once (Ambit: \
            1,024 tokens per key set, the claims still checked at each request; Envoy: \
            `jwt_cache_config` with 1,024 entries, which Envoy leaves off by default).\n";
    out += "\nChecked in this run (the run fails otherwise): every request hey sent on (b) to \
            (e) was counted by that path's waypoint for that path's Service (Ambit: \
            `istio_requests_total`, reporter `waypoint`, by `destination_service_name`; Envoy: \
            the path's connection managers' `downstream_rq_completed` in `/stats`), none by \
            another path's; `POST /admin` got 403 on each, counted as a denial (Ambit: \
            `response_code` 403; Envoy: `rbac.denied`) and written to the access log. On (d) \
            and (e): `GET /1k` with the token is answered by the last rule (its response \
            header), `/old` by the redirect (301), no token is 403 and a tampered token 401, \
            and HTTP/2 with the token is 200. The destination's ztunnel admits only the bound \
            waypoint.\n\n";
    out += ENVOY_MIRRORS;
    out
}
