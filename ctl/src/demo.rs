//! The demo app `ambitctl local up` runs in every pod (`ambitctl app serve`) and its
//! clients (`ambitctl app get`, `ambitctl app send`), meant for `ambitctl local exec`.
//!
//! The HTTP echo answers every request with who called: the source address it saw
//! and, when the connection came over HBONE, the caller's SPIFFE identity. The app
//! cannot see that identity itself (ztunnel terminated the mutual TLS and connected to
//! it from the caller's IP), so it asks its node's ztunnel: `GET /inbound_caller` on
//! the admin port, which listens on the node's loopback, reached from a socket made in
//! the node's network namespace. The TCP echo sends back what it receives.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_net::netns::NetnsHandle;
use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// ztunnel's admin port on the node's loopback.
const ZTUNNEL_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// How long a client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one pod's demo app serves.
#[derive(Debug, Clone)]
pub struct Serve {
    /// `namespace/name`, for the replies.
    pub pod: String,
    pub node: String,
    pub http_ports: Vec<u16>,
    pub tcp_ports: Vec<u16>,
    /// The node's network namespace, where its ztunnel's admin port is.
    pub node_netns: Option<PathBuf>,
}

/// Serves until a listener fails.
pub async fn serve(config: Serve) -> anyhow::Result<()> {
    let ztunnel = match &config.node_netns {
        Some(path) => Some(NetnsHandle::from_path(path)?),
        None => None,
    };
    let config = Arc::new(config);
    let mut tasks = tokio::task::JoinSet::new();
    for &port in &config.http_ports {
        let listener = bind(port).await?;
        crate::outln!("HTTP echo listening on {}", listener.local_addr()?)?;
        tasks.spawn(http_echo(listener, config.clone(), ztunnel.clone()));
    }
    for &port in &config.tcp_ports {
        let listener = bind(port).await?;
        crate::outln!("TCP echo listening on {}", listener.local_addr()?)?;
        tasks.spawn(tcp_echo(listener));
    }
    crate::outln!("listening")?;
    match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

/// Dual stack where the namespace has IPv6, else IPv4.
async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("cannot listen on port {port}")),
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

async fn tcp_echo(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (mut stream, peer) = listener.accept().await?;
        crate::outln!("TCP connection from {}", canonical(peer))?;
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
    }
}

async fn http_echo(
    listener: TcpListener,
    config: Arc<Serve>,
    ztunnel: Option<NetnsHandle>,
) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let (config, ztunnel) = (config.clone(), ztunnel.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, peer, &config, ztunnel.as_ref()).await {
                let _ = crate::outln!("request from {}: {e}", canonical(peer));
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &Serve,
    ztunnel: Option<&NetnsHandle>,
) -> anyhow::Result<()> {
    let (peer, local) = (canonical(peer), canonical(stream.local_addr()?));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 65536, "request head too large");
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before a whole request");
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    // Asked after the request arrived: ztunnel registers a tunnel's caller before it
    // answers the CONNECT, so before any byte of the request can reach us.
    let identity = match ztunnel {
        Some(ns) => caller_identity(ns, peer, local).await,
        None => Ok(None),
    };
    let identity_line = match &identity {
        Ok(Some(id)) => format!(
            "{id} (mutual TLS over HBONE, as {}'s ztunnel saw it)",
            config.node
        ),
        Ok(None) => "none: plaintext, not over HBONE".to_owned(),
        Err(e) => format!("unknown: cannot ask {}'s ztunnel: {e}", config.node),
    };
    crate::outln!(
        "{request_line:?} from {peer} identity={}",
        match &identity {
            Ok(Some(id)) => id.as_str(),
            _ => "none",
        }
    )?;
    let body = format!(
        "hello from {} on {} ({local})\ncaller: {peer}\ncaller identity: {identity_line}\n",
        config.pod, config.node
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// The identity of the open inbound HBONE tunnel `peer` → `local`, from the node's
/// ztunnel; `None` when ztunnel has none (a plaintext connection).
async fn caller_identity(
    node: &NetnsHandle,
    peer: SocketAddr,
    local: SocketAddr,
) -> anyhow::Result<Option<String>> {
    // Only the socket is made in the node's namespace; the exchange runs here.
    let socket = node
        .run(|| std::net::TcpStream::connect_timeout(&ZTUNNEL_ADMIN, Duration::from_secs(2)))
        .await?;
    socket.set_nonblocking(true)?;
    let stream = TcpStream::from_std(socket)?;
    // Brackets of IPv6 addresses are not allowed bare in a query.
    let encode = |a: SocketAddr| a.to_string().replace('[', "%5B").replace(']', "%5D");
    let path = format!(
        "/inbound_caller?client={}&app={}",
        encode(peer),
        encode(local)
    );
    let (status, body) = tokio::time::timeout(
        CLIENT_TIMEOUT,
        exchange(stream, "GET", "localhost", &path, ""),
    )
    .await
    .context("ztunnel's admin endpoint did not answer")??;
    match status {
        200 => {
            let json: serde_json::Value = serde_json::from_str(&body)?;
            Ok(json["identity"].as_str().map(str::to_owned))
        }
        404 => Ok(None),
        other => anyhow::bail!("ztunnel answered {other}: {}", body.trim()),
    }
}

/// One HTTP/1.1 GET on `stream`: status and body.
async fn exchange(
    mut stream: TcpStream,
    method: &str,
    host: &str,
    path: &str,
    headers: &str,
) -> anyhow::Result<(u16, String)> {
    // A body-less request: no Content-Length for GET, `0` for the rest, as curl does.
    let length = if method == "GET" || method == "HEAD" {
        ""
    } else {
        "content-length: 0\r\n"
    };
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: {host}\r\n{headers}{length}connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response).await {
        if e.kind() == std::io::ErrorKind::ConnectionReset && response.is_empty() {
            anyhow::bail!("connection reset by the mesh before any response: denied by policy, or refused on the way (`ambitctl authz explain` says which; the client node's ztunnel logs why)");
        }
        return Err(e.into());
    }
    if response.is_empty() {
        anyhow::bail!("connection closed by the mesh before any response: denied by policy, or refused on the way (`ambitctl authz explain` says which; the client node's ztunnel logs why)");
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Names the local mesh knows (services and pods), read from a hosts file
/// (`IP name...` per line) since the local mesh has no DNS.
pub fn read_hosts(path: Option<&Path>) -> BTreeMap<String, IpAddr> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return BTreeMap::new();
    };
    let mut hosts = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        for name in words {
            hosts.insert(name.to_owned(), ip);
        }
    }
    hosts
}

/// `host:port` (an IP or a name from `hosts`) as an address.
pub fn resolve(
    host_port: &str,
    default_port: Option<u16>,
    hosts: &BTreeMap<String, IpAddr>,
) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = host_port.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .with_context(|| format!("{host_port}: {p:?} is not a port"))?,
        ),
        _ => (
            host_port,
            default_port.with_context(|| format!("{host_port}: give a port"))?,
        ),
    };
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if hosts.is_empty() => anyhow::bail!(
            "{host}: not an address, and no names are known here: run it through \
             `ambitctl local exec`, which gives the local mesh's names (or give --hosts)"
        ),
        Err(_) => *hosts.get(host).with_context(|| {
            format!(
                "{host}: not an address, and the local mesh knows no such name (names: {})",
                hosts.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// `GET url` (`http://host[:port]/path`), `count` times, one connection each; prints
/// each status and body. Ok(false) when one was not 200.
pub async fn get(
    method: &str,
    url: &str,
    count: u32,
    headers: &[String],
    hosts: &BTreeMap<String, IpAddr>,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()),
        "{method:?}: a method is upper-case letters (GET, POST, DELETE)"
    );
    let mut extra = String::new();
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("-H {h:?}: give a header as `name: value`"))?;
        let (name, value) = (name.trim(), value.trim());
        anyhow::ensure!(
            http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && http::HeaderValue::from_str(value).is_ok(),
            "-H {h:?}: not a valid header name and value"
        );
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let to = resolve(authority, Some(80), hosts)?;
    let mut all_ok = true;
    for _ in 0..count {
        let stream = tokio::time::timeout(CLIENT_TIMEOUT, TcpStream::connect(to))
            .await
            .with_context(|| format!("connecting to {to}: timed out"))?
            .map_err(|e| connect_error(to, e))?;
        let (status, body) = tokio::time::timeout(
            CLIENT_TIMEOUT,
            exchange(stream, method, authority, path, &extra),
        )
        .await
        .with_context(|| format!("{method} {url}: no answer"))??;
        if status != 200 {
            all_ok = false;
            crate::outln!("HTTP {status}")?;
        }
        // A body without a final newline (a proxy's local reply: `RBAC: access
        // denied`) still ends its line, so the next output or prompt starts on its own.
        if body.is_empty() || body.ends_with('\n') {
            crate::out!("{body}")?;
        } else {
            crate::outln!("{body}")?;
        }
    }
    Ok(all_ok)
}

/// A failed connect, said as a user of the mesh needs it: a reset is the mesh
/// refusing the connection (a policy, or a destination that takes traffic only
/// through its waypoint), not a network fault.
fn connect_error(to: SocketAddr, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => anyhow::anyhow!(
            "connecting to {to}: connection refused by the mesh (reset): denied by policy, or the destination takes traffic only through its waypoint (`ambitctl authz explain` says which)"
        ),
        _ => anyhow::Error::new(e).context(format!("connecting to {to}")),
    }
}

/// Sends `message` to the TCP echo at `to`, prints what came back; Ok(false) when it
/// differs.
pub async fn send(
    to: &str,
    message: &str,
    hosts: &BTreeMap<String, IpAddr>,
) -> anyhow::Result<bool> {
    let to = resolve(to, None, hosts)?;
    let mut stream = tokio::time::timeout(CLIENT_TIMEOUT, TcpStream::connect(to))
        .await
        .with_context(|| format!("connecting to {to}: timed out"))?
        .map_err(|e| connect_error(to, e))?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, stream.read_to_end(&mut back))
        .await
        .with_context(|| format!("{to}: no echo"))??;
    let back = String::from_utf8_lossy(&back);
    crate::outln!("{back}")?;
    Ok(back == message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_through_the_hosts_file() {
        let hosts = BTreeMap::from([("web.shop".to_owned(), IpAddr::from([10, 96, 0, 10]))]);
        assert_eq!(
            resolve("web.shop", Some(80), &hosts).unwrap(),
            "10.96.0.10:80".parse().unwrap()
        );
        assert_eq!(
            resolve("web.shop:8080", None, &hosts).unwrap(),
            "10.96.0.10:8080".parse().unwrap()
        );
        assert_eq!(
            resolve("10.1.0.2:9000", None, &hosts).unwrap(),
            "10.1.0.2:9000".parse().unwrap()
        );
        assert_eq!(
            resolve("[fd00::1]:80", None, &hosts).unwrap(),
            "[fd00::1]:80".parse().unwrap()
        );
        let err = resolve("nope.shop:80", None, &hosts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such name"), "{err}");
    }
}
