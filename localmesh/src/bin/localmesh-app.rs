//! The local mesh's test application, run inside pods:
//!
//! - `echo --port P`: TCP echo server, on IPv4 and IPv6. Logs `listening on ADDR` once bound and
//!   `accepted from PEER` for each connection, so tests can check the source address
//!   the app saw.
//! - `http --port P [--name NAME]`: minimal HTTP/1.1 server answering every request
//!   `200` with the body `pod=NAME client=PEER`, then closing.
//! - `send --to ADDR --bytes N [--connections C]`: opens C connections (default 1),
//!   sends N bytes on each, reads them back and checks them. Exit 0 when every byte came
//!   back intact, 1 on a mismatch, 2 when a connection failed.
//! - `get --to ADDR [--count K] [--path PATH]`: K HTTP GETs of PATH (default `/`), one
//!   per connection, printing each body.
//!   Exit 0 when all answered 200, 1 otherwise, 2 when a connection failed.
//! - `hold --to ADDR --connections C`: opens C connections to an echo server (at most
//!   100 connecting at once), checks one echoed byte on each, prints
//!   `holding C connections` and keeps them open and idle until killed. Exit 2 when a
//!   connection failed.
//! - `stream --to ADDR [--every-ms MS]`: one connection to an echo server, on which it
//!   sends 97 bytes every MS milliseconds (default 20), reads them back and checks them,
//!   printing `round N` after each. Exit 1 on a mismatch (a corrupted stream), 2 when
//!   the connection fails or ends.
//!
//! Raises its open-file limit to the hard limit, for thousands of connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: localmesh-app echo --port P | http --port P [--name NAME] \
                     | send --to ADDR --bytes N [--connections C] | get --to ADDR [--count K] [--path PATH] \
                     | hold --to ADDR --connections C | stream --to ADDR [--every-ms MS]";

/// The bytes `send` writes: position-dependent, so a reordered or shifted stream fails
/// the check, and not a multiple of common buffer sizes.
fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, flags)) = parse(&args) else {
        return usage();
    };
    // Thousands of concurrent connections need more than the default 1024 files. If
    // raising fails, the connections past the limit fail and say why.
    let _ = ambit_localmesh::raise_nofile_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(run(&mode, &flags))
}

async fn run(mode: &str, flags: &HashMap<String, String>) -> ExitCode {
    match mode {
        "echo" => match port(flags) {
            Some(port) => served(echo(port).await),
            None => usage(),
        },
        "http" => match port(flags) {
            Some(port) => {
                let name = flags
                    .get("name")
                    .cloned()
                    .unwrap_or_else(|| "unknown".into());
                served(http(port, name).await)
            }
            None => usage(),
        },
        "send" => match (
            addr(flags),
            number(flags, "bytes", None),
            number(flags, "connections", Some(1)),
        ) {
            (Some(to), Some(bytes), Some(connections)) => send(to, bytes, connections).await,
            _ => usage(),
        },
        "get" => match (addr(flags), number(flags, "count", Some(1))) {
            (Some(to), Some(count)) => {
                let path = flags.get("path").map_or("/", String::as_str);
                get(to, count, path).await
            }
            _ => usage(),
        },
        "stream" => match (addr(flags), number(flags, "every-ms", Some(20))) {
            (Some(to), Some(every)) => stream(to, std::time::Duration::from_millis(every)).await,
            _ => usage(),
        },
        "hold" => match (addr(flags), number(flags, "connections", None)) {
            (Some(to), Some(connections)) => hold(to, connections).await,
            _ => usage(),
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(64)
}

/// A server only returns when it failed.
fn served(result: std::io::Result<()>) -> ExitCode {
    if let Err(e) = result {
        eprintln!("{e}");
    }
    ExitCode::from(2)
}

/// `MODE --key value ...`
fn parse(args: &[String]) -> Option<(String, HashMap<String, String>)> {
    let (mode, rest) = args.split_first()?;
    if rest.len() % 2 != 0 {
        return None;
    }
    let mut flags = HashMap::new();
    for pair in rest.chunks(2) {
        let key = pair[0].strip_prefix("--")?;
        flags.insert(key.to_owned(), pair[1].clone());
    }
    Some((mode.clone(), flags))
}

fn port(flags: &HashMap<String, String>) -> Option<u16> {
    flags.get("port")?.parse().ok()
}

fn addr(flags: &HashMap<String, String>) -> Option<SocketAddr> {
    flags.get("to")?.parse().ok()
}

fn number(flags: &HashMap<String, String>, key: &str, default: Option<u64>) -> Option<u64> {
    match flags.get(key) {
        Some(v) => v.parse().ok(),
        None => default,
    }
}

/// Listens on `port` for IPv4 and IPv6 (a dual-stack socket), or IPv4 only where the
/// namespace has no IPv6.
async fn bind(port: u16) -> std::io::Result<TcpListener> {
    let listener = match TcpListener::bind(("::", port)).await {
        Ok(listener) => listener,
        Err(_) => TcpListener::bind(("0.0.0.0", port)).await?,
    };
    println!("listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// `peer` as the client sent from: an IPv4 client of a dual-stack listener shows as an
/// IPv4-mapped IPv6 address, printed here as the IPv4 address it is.
fn client(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

async fn echo(port: u16) -> std::io::Result<()> {
    let listener = bind(port).await?;
    loop {
        let (mut stream, peer) = listener.accept().await?;
        let peer = client(peer);
        println!("accepted from {peer}");
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.split();
            if let Err(e) = tokio::io::copy(&mut rd, &mut wr).await {
                println!("connection from {peer}: {e}");
            }
            let _ = wr.shutdown().await;
        });
    }
}

async fn http(port: u16, name: String) -> std::io::Result<()> {
    let listener = bind(port).await?;
    let name: Arc<str> = name.into();
    loop {
        let (mut stream, peer) = listener.accept().await?;
        let peer = client(peer);
        let name = name.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            println!("request from {peer}");
            let body = format!("pod={name} client={peer}\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Why one `send` connection failed: the exit code says which.
enum SendFailure {
    Connect(String),
    Mismatch(String),
}

async fn send(to: SocketAddr, bytes: u64, connections: u64) -> ExitCode {
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(send_one(to, bytes)))
        .collect();
    let (mut ok, mut mismatches, mut failures) = (0u64, 0u64, 0u64);
    for task in tasks {
        match task.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(SendFailure::Mismatch(e))) => {
                mismatches += 1;
                println!("mismatch: {e}");
            }
            Ok(Err(SendFailure::Connect(e))) => {
                failures += 1;
                println!("failed: {e}");
            }
            Err(e) => {
                failures += 1;
                println!("failed: {e}");
            }
        }
    }
    println!("{ok} of {connections} connections echoed {bytes} bytes intact to {to}");
    if mismatches > 0 {
        ExitCode::from(1)
    } else if failures > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

async fn send_one(to: SocketAddr, bytes: u64) -> Result<(), SendFailure> {
    let io = |what: &str, e: std::io::Error| SendFailure::Connect(format!("{what} {to}: {e}"));
    let stream = TcpStream::connect(to).await.map_err(|e| io("connect", e))?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern_byte(sent + j as u64);
            }
            wr.write_all(&buf[..n]).await?;
            sent += n as u64;
        }
        wr.shutdown().await
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        let n = rd.read(&mut buf).await.map_err(|e| io("read from", e))?;
        if n == 0 {
            break;
        }
        for (j, b) in buf[..n].iter().enumerate() {
            let at = received + j as u64;
            if at >= bytes || *b != pattern_byte(at) {
                return Err(SendFailure::Mismatch(format!(
                    "byte {at} from {to} is {b}, expected {}",
                    if at >= bytes {
                        "nothing".to_owned()
                    } else {
                        pattern_byte(at).to_string()
                    }
                )));
            }
        }
        received += n as u64;
    }
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io("write to", e)),
        Err(e) => return Err(SendFailure::Connect(format!("writer: {e}"))),
    }
    if received != bytes {
        return Err(SendFailure::Mismatch(format!(
            "{to} echoed {received} of {bytes} bytes"
        )));
    }
    Ok(())
}

async fn stream(to: SocketAddr, every: std::time::Duration) -> ExitCode {
    const CHUNK: u64 = 97;
    let mut connection = match TcpStream::connect(to).await {
        Ok(c) => c,
        Err(e) => {
            println!("ended: connect {to}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut sent = 0u64;
    let mut buf = [0u8; CHUNK as usize];
    for round in 1u64.. {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(sent + j as u64);
        }
        if let Err(e) = connection.write_all(&buf).await {
            println!("ended: write to {to} in round {round}: {e}");
            return ExitCode::from(2);
        }
        let mut back = [0u8; CHUNK as usize];
        if let Err(e) = connection.read_exact(&mut back).await {
            println!("ended: read from {to} in round {round}: {e}");
            return ExitCode::from(2);
        }
        if let Some(j) = (0..CHUNK as usize).find(|&j| back[j] != buf[j]) {
            println!(
                "mismatch: byte {} from {to} is {}, expected {}",
                sent + j as u64,
                back[j],
                buf[j]
            );
            return ExitCode::from(1);
        }
        sent += CHUNK;
        println!("round {round}");
        tokio::time::sleep(every).await;
    }
    ExitCode::SUCCESS
}

async fn get(to: SocketAddr, count: u64, path: &str) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for _ in 0..count {
        match get_one(to, path).await {
            Ok((status, body)) => {
                println!("{status} {}", body.trim_end());
                if status != 200 {
                    code = ExitCode::from(1);
                }
            }
            Err(e) => {
                println!("failed: GET {to}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    code
}

async fn get_one(to: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(to).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

async fn hold(to: SocketAddr, connections: u64) -> ExitCode {
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                let mut stream = TcpStream::connect(to).await?;
                stream.write_all(b"h").await?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                if &byte != b"h" {
                    return Err(std::io::Error::other("wrong byte echoed"));
                }
                Ok::<_, std::io::Error>(stream)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => {
                println!("failed: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                println!("failed: {e}");
                return ExitCode::from(2);
            }
        }
    }
    println!("holding {} connections", held.len());
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
