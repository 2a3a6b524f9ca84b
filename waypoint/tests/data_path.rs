//! The waypoint's data path over real sockets: a client ztunnel's HBONE tunnel to a
//! Service VIP through the waypoint to the endpoints' ztunnels and the app behind
//! them, with real HTTP/1.1 and HTTP/2 clients (hyper) inside the tunnels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use ambit_net::hbone::client::TunnelError;
use ambit_waypoint::http::Limits;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Service bound to the waypoint with an L7 DENY policy attached.
const GUARDED_VIP: &str = "10.96.0.40:80";

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "echo.shop.svc.cluster.local")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn http1_requests_are_balanced_round_robin_over_keep_alive_as_the_waypoint() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, ECHO_VIP).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        client.ready().await.unwrap();
        let mut request = get("/name");
        request.headers_mut().insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = text(response).await;
        assert!(
            body.contains("HTTP/1.1 host=echo.shop.svc.cluster.local")
                && body.ends_with("xff=10.1.0.5"),
            "{body}"
        );
        // The same trace, a new span; a request id added.
        let tp = body
            .split(" tp=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-")
                && !tp.contains("b7ad6b7169203331"),
            "{body}"
        );
        let rid = body
            .split(" rid=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        assert_eq!(rid.len(), 36, "{body}");
        names.push(body.split(' ').next().unwrap().to_owned());
    }
    assert_eq!(names, ["echo-1", "echo-2", "echo-1", "echo-2"]);
    // Upstream: the waypoint's own identity, :authority = podIP:targetPort, and one
    // tunnel per endpoint (keep-alive) for the four requests.
    let peers = mesh.upstream_peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2, "{peers:?}");
    for (peer, target) in &peers {
        assert_eq!(peer.as_str(), WAYPOINT);
        assert_eq!(target.port(), APP_PORT);
        assert!(mesh.ips[..2].contains(&target.ip()), "{target}");
    }
    let (status, metrics) = http_get(mesh.metrics, "/metrics").await;
    assert_eq!(status, 200);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    for label in [
        "reporter=\"waypoint\"",
        "destination_service_name=\"echo\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/echo\"",
        "request_protocol=\"http\"",
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }
    // Two series (one per endpoint), four requests in all.
    let served: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(served, 4.0, "{metrics}");
    for histogram in [
        "istio_request_duration_milliseconds_count{",
        "istio_request_bytes_count{",
        "istio_response_bytes_sum{",
    ] {
        let total: f64 = metrics
            .lines()
            .filter(|l| l.starts_with(histogram))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert!(total >= 4.0, "{histogram} {total}\n{metrics}");
    }
}

#[tokio::test]
async fn l7_policy_denies_by_normalized_path_and_method_with_403_and_grpc_status_7() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, GUARDED_VIP).await;
    // (method, path as sent, status, path the backend receives)
    for (method, path, status, received) in [
        ("GET", "/name", 200, Some("/name")),
        ("GET", "/x/./y/../name?q=1", 200, Some("/x/name?q=1")),
        ("GET", "/admin", 403, None),
        ("GET", "/admin/users", 403, None),
        ("GET", "/public/../admin/users", 403, None),
        ("GET", "/%61dmin", 403, None),
        ("GET", "/admin%2fusers", 200, Some("/admin%2fusers")),
        ("DELETE", "/name", 403, None),
    ] {
        client.ready().await.unwrap();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "guarded.shop.svc.cluster.local")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let body = text(response).await;
        match received {
            Some(p) => assert!(
                body.contains(&format!(" path={p} ")),
                "{method} {path}: {body}"
            ),
            None => assert_eq!(body, "RBAC: access denied", "{method} {path}"),
        }
    }

    let conn = mesh.client().await;
    let mut client = http2_client::<Full<Bytes>>(&conn, GUARDED_VIP).await;
    // The port declares `http`: an HTTP/2 client's request goes upstream as HTTP/1.1.
    let request = Request::get("http://guarded.shop.svc.cluster.local/name")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = text(response).await;
    assert!(
        body.contains("HTTP/1.1 host=guarded.shop.svc.cluster.local"),
        "{body}"
    );
    let request = Request::post("http://guarded.shop.svc.cluster.local/admin/Reset")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "gRPC denials are trailers-only 200s"
    );
    assert_eq!(response.headers()["grpc-status"], "7");
    let (status, metrics) = http_get(mesh.metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"403\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn http2_and_grpc_with_trailers_pass_with_prior_knowledge() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http2_client::<Full<Bytes>>(&conn, ECHO_VIP).await;
    let request = Request::get("http://echo.shop.svc.cluster.local/name")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = text(response).await;
    assert!(
        body.contains("HTTP/2.0") && body.contains("authority=echo.shop.svc.cluster.local"),
        "{body}"
    );

    let request = Request::post("http://echo.shop.svc.cluster.local/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("gRPC trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x02hi");
}

#[tokio::test]
async fn a_10_mb_body_streams_both_ways() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http2_client::<
        StreamBody<
            futures::stream::Iter<
                std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
            >,
        >,
    >(&conn, ECHO_VIP)
    .await;
    let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 + i / 7) as u8).collect();
    let frames: Vec<_> = (0..160)
        .map(|_| Ok(Frame::data(Bytes::from(chunk.clone()))))
        .collect();
    let request = Request::post("http://echo.shop.svc.cluster.local/echo")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut total, mut frames_seen) = (0usize, 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(
                data.iter()
                    .enumerate()
                    .all(|(i, b)| *b == chunk[(total + i) % chunk.len()]),
                "bytes differ after {total}"
            );
            total += data.len();
            frames_seen += 1;
        }
    }
    assert_eq!(total, 160 * 64 * 1024);
    assert!(frames_seen > 1, "the body arrived in one piece");

    // HTTP/1.1 too, chunked.
    let mut client = http1_client(&conn, ECHO_VIP).await;
    let big = Bytes::from(vec![7u8; 10 << 20]);
    let response = client
        .send_request(
            Request::post("/echo")
                .header("host", "echo")
                .body(Full::new(big.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    let back = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        back == big,
        "HTTP/1.1 echo differs ({} bytes back)",
        back.len()
    );
}

#[tokio::test]
async fn an_upgrade_joins_client_and_server() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, ECHO_VIP).await;
    let request = Request::get("/ws")
        .header("host", "echo")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut upgraded = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    upgraded.write_all(b"ping over the upgrade").await.unwrap();
    let mut back = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), upgraded.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping over the upgrade");
}

#[tokio::test]
async fn targets_not_bound_to_the_waypoint_are_refused_with_400() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    for target in [
        FREE_VIP.to_owned(),
        "192.0.2.1:80".to_owned(),
        "10.96.0.10:81".to_owned(),
        format!("{}:{APP_PORT}", mesh.ips[0]),
    ] {
        match connect(&conn, &target).await {
            Err(TunnelError::Refused { status, reason, .. }) => {
                assert_eq!(
                    (status, reason.as_deref()),
                    (400, Some("bad_target")),
                    "{target}"
                );
            }
            other => panic!("{target}: {other:?}"),
        }
    }
    // A workload bound to the waypoint is served, forwarded to that pod.
    let mut client = http1_client(&conn, &format!("{}:{APP_PORT}", mesh.ips[2])).await;
    let response = client.send_request(get("/name")).await.unwrap();
    assert!(text(response).await.starts_with("direct-0 "));
    // An endpoint outside the mesh is reached in plaintext.
    let mut client = http1_client(&conn, "10.96.0.30:80").await;
    let response = client.send_request(get("/name")).await.unwrap();
    assert!(text(response).await.starts_with("legacy-0 "));
}

/// Sends raw bytes in a tunnel to the bound Service; returns the response's first
/// line.
async fn raw(mesh: &Mesh, bytes: Vec<u8>) -> String {
    let conn = mesh.client().await;
    let mut tunnel = connect(&conn, ECHO_VIP).await.unwrap();
    tunnel.stream.write_all(&bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = tunnel.stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    text.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn bad_requests_are_refused_like_envoy() {
    let mesh = Mesh::start(Limits::default()).await;
    // 100 KiB of headers.
    let mut big = b"GET /name HTTP/1.1\r\nHost: echo\r\n".to_vec();
    for i in 0..100 {
        big.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    assert_eq!(
        raw(&mesh, big).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Both Content-Length and Transfer-Encoding, in either order.
    for head in [
        "POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /echo HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ] {
        assert_eq!(raw(&mesh, head.as_bytes().to_vec()).await, "HTTP/1.1 400 Bad Request", "{head:?}");
    }
    // An encoded NUL in the path.
    assert_eq!(
        raw(&mesh, b"GET /a%00b HTTP/1.1\r\nHost: echo\r\n\r\n".to_vec()).await,
        "HTTP/1.1 400 Bad Request"
    );
    // A well-formed request on the same path passes.
    assert_eq!(
        raw(&mesh, b"GET /name HTTP/1.1\r\nHost: echo\r\n\r\n".to_vec()).await,
        "HTTP/1.1 200 OK"
    );
    // HTTP/2: oversized headers get 431 too.
    let conn = mesh.client().await;
    let mut client = http2_client::<Empty<Bytes>>(&conn, ECHO_VIP).await;
    let mut request = Request::get("http://echo/name").body(Empty::new()).unwrap();
    for i in 0..100 {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
            "a".repeat(1000).parse().unwrap(),
        );
    }
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 431);
    // The heads hyper refused before a request existed are counted and logged like
    // any other answer, with Envoy's flag for a downstream protocol error.
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    let refused = |code: &str| {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
                    && l.contains("response_flags=\"DPE\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert!(refused("431") >= 1.0, "{metrics}");
}

#[tokio::test]
async fn a_client_that_sends_nothing_first_is_relayed_as_tcp() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut tunnel = connect(&conn, ECHO_VIP).await.unwrap();
    // Past the detection timeout, the bytes are not HTTP to the waypoint: they reach
    // the app as they are, and its HTTP answer comes back as bytes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    tunnel
        .stream
        .write_all(b"GET /name HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        tunnel.stream.read_to_string(&mut out),
    )
    .await
    .unwrap()
    .unwrap();
    // Not through the waypoint's HTTP: no x-forwarded-for was added.
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("host=raw") && out.ends_with("xff=-"),
        "{out}"
    );
}

#[tokio::test]
async fn admin_shows_what_the_waypoint_serves_and_readiness_is_200() {
    let mesh = Mesh::start(Limits::default()).await;
    let (status, body) = http_get(mesh.admin, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["waypoint"]["gateway"], "shop/waypoint");
    assert_eq!(
        dump["waypoint"]["services"],
        serde_json::json!([
            "shop/canary",
            "shop/echo",
            "shop/guarded",
            "shop/legacy",
            "shop/reviews"
        ])
    );
    assert_eq!(
        dump["waypoint"]["workloads"],
        serde_json::json!(["shop/direct-0"])
    );
    assert_eq!(dump["certificates"][0]["identity"], WAYPOINT);
    assert_eq!(dump["certificates"][0]["state"], "valid");
    assert_eq!(http_get(mesh.readiness, "/healthz/ready").await.0, 200);
}

#[tokio::test]
async fn a_client_slow_with_its_headers_is_cut_off_and_others_are_served_meanwhile() {
    let mesh = Mesh::start(Limits {
        header_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;
    let conn = mesh.client().await;
    let mut slow = connect(&conn, ECHO_VIP).await.unwrap();
    slow.stream
        .write_all(b"GET /name HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut fast = http1_client(&conn, ECHO_VIP).await;
    let response = fast.send_request(get("/name")).await.unwrap();
    assert_eq!(response.status(), 200);
    // One header byte at a time, slower than the timeout allows in total.
    let mut closed = false;
    for b in b"Host: echo\r\n\r\n" {
        if slow.stream.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 256];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(1), slow.stream.read(&mut buf)).await
        {
            let n = read.unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow client was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_without_a_mesh_certificate_is_refused() {
    let mesh = Mesh::start(Limits::default()).await;
    let roots = mesh.ca.issue(CLIENT).roots().to_vec();
    let config = ambit_net::tls::client_config(
        None,
        &roots,
        [ambit_core::SpiffeId::parse(WAYPOINT).unwrap()],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.hbone).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("waypoint.invalid").unwrap(),
            tcp,
        )
        .await;
    // TLS 1.3: the refusal arrives with the first read after the handshake.
    let refused = match tls {
        Err(_) => true,
        Ok(stream) => match ambit_net::hbone::client::HboneConnection::handshake(
            stream,
            ambit_net::hbone::H2Settings::default(),
        )
        .await
        {
            Err(_) => true,
            Ok(conn) => connect(&conn, ECHO_VIP).await.is_err(),
        },
    };
    assert!(refused, "a client without a certificate got through");
}

#[tokio::test]
async fn an_httproute_splits_by_weight_matches_headers_and_answers_404_and_500_like_envoy() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, "10.96.0.50:80").await;
    let mut send = async |path: &str, tag: Option<&str>| {
        client.ready().await.unwrap();
        let mut request = get(path);
        if let Some(tag) = tag {
            request.headers_mut().insert("x-tag", tag.parse().unwrap());
        }
        let response = client.send_request(request).await.unwrap();
        let status = response.status();
        (status, text(response).await)
    };
    // Tagged requests go to v2, except under /split, whose longer prefix takes
    // precedence over the header rule's `/` (the Gateway API's order).
    for _ in 0..5 {
        let (status, body) = send("/reviews/1", Some("v2")).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("echo-2 "), "{body}");
    }
    let mut tagged_v1 = 0;
    for _ in 0..40 {
        let (_, body) = send("/split/a", Some("v2")).await;
        tagged_v1 += usize::from(body.starts_with("echo-1 "));
    }
    assert!(tagged_v1 > 0, "the /split rule takes tagged requests too");
    // 3:1 over 400 requests: within a 99.99 % binomial interval (300 +- 34).
    let mut v1 = 0;
    for _ in 0..400 {
        let (status, body) = send("/split/b", None).await;
        assert_eq!(status, 200);
        if body.starts_with("echo-1 ") {
            v1 += 1;
        } else {
            assert!(body.starts_with("echo-2 "), "{body}");
        }
    }
    assert!((266..=334).contains(&v1), "{v1} of 400 to v1");
    // No rule matches: 404, as Envoy's `NR`; weights all 0 or a backend that does not
    // exist: 500.
    assert_eq!(send("/other", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        send("/zero", None).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send("/ghost", None).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // The rule's timeout (300 ms): 504 instead of the app's answer after 2 s, and the
    // client's connection still serves the next request.
    let (status, body) = send("/slow", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
    );
    assert_eq!(send("/split/c", None).await.0, StatusCode::OK);
    // A Service without routes is balanced over its own endpoints as before.
    let mut plain = http1_client(&conn, ECHO_VIP).await;
    plain.ready().await.unwrap();
    assert_eq!(
        plain.send_request(get("/other")).await.unwrap().status(),
        200
    );
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"404\"")
                && l.contains("response_flags=\"NR\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn route_filters_modify_headers_rewrite_redirect_and_mirror() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, "10.96.0.50:80").await;
    // Header modifiers both ways, and a rewrite of path and host.
    client.ready().await.unwrap();
    let mut request = get("/modified/headers?q=1");
    let headers = request.headers_mut();
    headers.insert("x-set", "old".parse().unwrap());
    headers.insert("x-add", "mine".parse().unwrap());
    headers.insert("x-gone", "secret".parse().unwrap());
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-served-by"], "waypoint");
    assert!(
        !response.headers().contains_key("x-app"),
        "{:?}",
        response.headers()
    );
    let seen = text(response).await;
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.contains(&"x-set: new"), "{seen}");
    assert!(!lines.contains(&"x-set: old"), "{seen}");
    assert!(
        lines.contains(&"x-add: mine") && lines.contains(&"x-add: added"),
        "{seen}"
    );
    assert!(!seen.contains("x-gone"), "{seen}");
    assert!(lines.contains(&"host: rewritten.internal"), "{seen}");
    // ReplacePrefixMatch `/modified` -> `/` reached the app's `/headers`; the query
    // is kept (the app answers `/headers` by path alone).
    // A redirect is answered by the waypoint, no backend involved.
    client.ready().await.unwrap();
    let response = client.send_request(get("/old/page?x=1")).await.unwrap();
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()["location"],
        "https://echo.shop.svc.cluster.local/new/page?x=1"
    );
    // A mirror gets a copy of the request with its body and the `-shadow` host; the
    // original's answer is the primary's.
    let body = vec![b'm'; 300_000];
    client.ready().await.unwrap();
    let mut request = Request::post("/mirrored/x")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    request
        .headers_mut()
        .insert("host", "canary.shop".parse().unwrap());
    let response = client.send_request(request).await.unwrap();
    assert_eq!(text(response).await, "got Ok(300000)");
    let log = |client: &mut Sender1, path: &'static str, tag: Option<&'static str>| {
        let mut request = get(path);
        if let Some(tag) = tag {
            request.headers_mut().insert("x-tag", tag.parse().unwrap());
        }
        let sent = client.send_request(request);
        async move { text(sent.await.unwrap()).await }
    };
    let mut copy_seen = String::new();
    for _ in 0..50 {
        client.ready().await.unwrap();
        copy_seen = log(&mut client, "/seen", Some("v2")).await;
        if copy_seen.contains("body=Ok(300000)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        copy_seen.contains("echo-2 POST /sink host=canary.shop-shadow body=Ok(300000)"),
        "the mirror's log: {copy_seen}"
    );
    client.ready().await.unwrap();
    let primary_seen = log(&mut client, "/modified/seen", None).await;
    assert!(
        primary_seen.contains("echo-1 POST /sink host=canary.shop body=Ok(300000)"),
        "the primary's log: {primary_seen}"
    );
    // A mirror whose upstream never reads does not slow the original: 8 MB pass
    // while the copy stalls, and the copy is abandoned.
    let started = std::time::Instant::now();
    client.ready().await.unwrap();
    let mut request = Request::post("/mirrored/x")
        .body(Full::new(Bytes::from(vec![b's'; 8 << 20])))
        .unwrap();
    request
        .headers_mut()
        .insert("host", "canary.shop".parse().unwrap());
    request
        .headers_mut()
        .insert("x-stall-shadow", "1".parse().unwrap());
    let response = tokio::time::timeout(Duration::from_secs(20), client.send_request(request))
        .await
        .expect("the original waited for its stalled copy")
        .unwrap();
    assert_eq!(text(response).await, format!("got Ok({})", 8 << 20));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn failed_tries_are_retried_on_another_endpoint_by_default_and_as_a_route_says() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, "10.96.0.50:80").await;
    let mut send = async |path: &str| {
        client.ready().await.unwrap();
        let response = client.send_request(get(path)).await.unwrap();
        let status = response.status();
        (status, text(response).await)
    };
    // Half the endpoints answer 503: the mesh's default retry (503 is retriable)
    // hides it from the client. The same for 500 with a route's retry on 500.
    for path in ["/flaky/503", "/flaky/500"] {
        for _ in 0..20 {
            let (status, body) = send(path).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "echo-2"),
                "{path}"
            );
        }
    }
    // Every endpoint failing: the route's 2 retries, then the upstream's own 500.
    let (status, _) = send("/always/500").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    // The apps' logs: the failing endpoint did take its turns (the retries were
    // real), and the failing request was tried three times in all.
    let mut log = String::new();
    for (path, tag) in [("/modified/seen", None), ("/seen", Some("v2"))] {
        client.ready().await.unwrap();
        let mut request = get(path);
        if let Some(tag) = tag {
            request.headers_mut().insert("x-tag", tag.parse().unwrap());
        }
        log.push_str(&text(client.send_request(request).await.unwrap()).await);
        log.push('\n');
    }
    let count = |line: &str| log.lines().filter(|l| *l == line).count();
    assert!(count("echo-1 /flaky/503") >= 5, "{log}");
    assert!(count("echo-1 /flaky/500") >= 5, "{log}");
    assert_eq!(
        count("echo-1 /always/500") + count("echo-2 /always/500"),
        3,
        "{log}"
    );
    // The retries ran out: Envoy's flag `URX` on the upstream's own 500.
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"500\"")
                && l.contains("response_flags=\"URX\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_virtual_service_routes_in_order_splits_90_10_retries_and_injects_faults() {
    let mesh = Mesh::start(Limits::default()).await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, "10.96.0.60:80").await;
    let mut send = async |path: &str, canary: Option<&str>| {
        client.ready().await.unwrap();
        let mut request = get(path);
        if let Some(c) = canary {
            request.headers_mut().insert("x-canary", c.parse().unwrap());
        }
        let started = std::time::Instant::now();
        let response = client.send_request(request).await.unwrap();
        let status = response.status();
        (status, text(response).await, started.elapsed())
    };
    // A header prefix match (written first) takes only tagged requests to v2.
    for _ in 0..20 {
        let (status, body, _) = send("/fault/abort", Some("true")).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("echo-2 "), "{body}");
    }
    // 90/10 over 2,000 requests: within the binomial 99.9 % interval (200 +- 44).
    let mut v2 = 0;
    for _ in 0..2000 {
        let (status, body, _) = send("/reviews/1", Some("false")).await;
        assert_eq!(status, 200, "{body}");
        v2 += usize::from(body.starts_with("echo-2 "));
    }
    assert!((156..=244).contains(&v2), "{v2} of 2000 to v2");
    // An abort at 50 % over 400 requests: 503 `fault filter abort`, never retried
    // (200 +- 33 at 99.9 %).
    let mut aborted = 0;
    for _ in 0..400 {
        let (status, body, _) = send("/fault/abort", None).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(body, "fault filter abort");
            aborted += 1;
        } else {
            assert_eq!(status, 200, "{body}");
        }
    }
    assert!((167..=233).contains(&aborted), "{aborted} of 400 aborted");
    // A delay of 150 ms at 50 % over 100 requests (50 +- 17); a delayed request
    // took at least the delay.
    let before = delayed_count(&mesh).await;
    let mut slow = 0;
    for _ in 0..100 {
        let (status, _, took) = send("/fault/delay", None).await;
        assert_eq!(status, 200);
        slow += usize::from(took >= Duration::from_millis(150));
    }
    let delayed = delayed_count(&mesh).await - before;
    assert!((33..=67).contains(&delayed), "{delayed} of 100 delayed");
    assert!(slow >= delayed, "{slow} took 150 ms, {delayed} flagged DI");
    // `retryOn: 5xx`: half the endpoints answer 500, the client never sees it.
    for _ in 0..20 {
        let (status, body, _) = send("/flaky/500", None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "echo-2"));
    }
    // The route's timeout: 504.
    assert_eq!(send("/slow", None).await.0, StatusCode::GATEWAY_TIMEOUT);
    // A gRPC abort: HTTP 200 with grpc-status 14 and no body.
    let mut h2 = http2_client::<Full<Bytes>>(&conn, "10.96.0.60:80").await;
    let request = Request::post("http://reviews.shop/fault/grpc")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "14");
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"503\"")
                && l.contains("response_flags=\"FI\"")),
        "{metrics}"
    );
}

/// Requests the waypoint's metrics count with response flag `DI`.
async fn delayed_count(mesh: &Mesh) -> usize {
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_flags=\"DI\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

#[tokio::test]
async fn a_consumer_route_applies_to_its_own_namespaces_clients_only() {
    let mesh = Mesh::start(Limits::default()).await;
    // From namespace `other`: its consumer route sends everything to v1, even a
    // request the producer's route would send to v2.
    let other = mesh
        .client_as("spiffe://cluster.local/ns/other/sa/client")
        .await;
    let mut client = http1_client(&other, "10.96.0.50:80").await;
    for _ in 0..10 {
        client.ready().await.unwrap();
        let mut request = get("/reviews/1");
        request.headers_mut().insert("x-tag", "v2".parse().unwrap());
        let body = text(client.send_request(request).await.unwrap()).await;
        assert!(body.starts_with("echo-1 "), "{body}");
    }
    // From the Service's own namespace: the producer's routes, as before.
    let shop = mesh.client().await;
    let mut client = http1_client(&shop, "10.96.0.50:80").await;
    client.ready().await.unwrap();
    let mut request = get("/reviews/1");
    request.headers_mut().insert("x-tag", "v2".parse().unwrap());
    let body = text(client.send_request(request).await.unwrap()).await;
    assert!(body.starts_with("echo-2 "), "{body}");
}
