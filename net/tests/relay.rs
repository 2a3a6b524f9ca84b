//! The relay between two byte streams: bytes intact both ways, half-closes passed on,
//! counts kept when it ends in an error.

use std::time::Duration;

use ambit_net::relay::relay_streams;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

const DEADLINE: Duration = Duration::from_secs(10);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A client end, the relay's two ends, and a server end.
fn pairs(buffer: usize) -> (DuplexStream, DuplexStream, DuplexStream, DuplexStream) {
    let (client, relay_a) = duplex(buffer);
    let (relay_b, server) = duplex(buffer);
    (client, relay_a, relay_b, server)
}

#[tokio::test]
async fn bytes_cross_intact_both_ways_and_half_closes_pass_on() {
    let (client, mut a, mut b, mut server) = pairs(64 << 10);
    let relay = tokio::spawn(async move { relay_streams(&mut a, &mut b).await });
    let up = pattern(3 << 20, 1);
    let down = pattern(1 << 20, 7);

    let up_sent = up.clone();
    let down_sent = down.clone();
    let client_task = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(client);
        let writer = async {
            w.write_all(&up_sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = r.read_to_end(&mut got);
        let ((), n) = tokio::join!(writer, reader);
        n.unwrap();
        got
    });
    let server_task = tokio::spawn(async move {
        // The server reads the whole request (up to the client's half-close) before
        // answering: the relay must keep the other direction open meanwhile.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&down_sent).await.unwrap();
        server.shutdown().await.unwrap();
        got
    });

    let at_server = tokio::time::timeout(DEADLINE, server_task)
        .await
        .unwrap()
        .unwrap();
    let at_client = tokio::time::timeout(DEADLINE, client_task)
        .await
        .unwrap()
        .unwrap();
    let relayed = tokio::time::timeout(DEADLINE, relay)
        .await
        .unwrap()
        .unwrap();
    assert!(at_server == up, "request bytes differ");
    assert!(at_client == down, "response bytes differ");
    assert_eq!(relayed.forward, up.len() as u64);
    assert_eq!(relayed.backward, down.len() as u64);
    assert!(relayed.error.is_none(), "{:?}", relayed.error);
}

#[tokio::test]
async fn many_small_writes_arrive_in_order() {
    let (mut client, mut a, mut b, mut server) = pairs(1 << 10);
    let relay = tokio::spawn(async move { relay_streams(&mut a, &mut b).await });
    let writer = tokio::spawn(async move {
        for i in 0..2000u32 {
            client.write_all(&i.to_be_bytes()).await.unwrap();
        }
        client.shutdown().await.unwrap();
        client
    });
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let expected: Vec<u8> = (0..2000u32).flat_map(|i| i.to_be_bytes()).collect();
    assert!(got == expected, "bytes differ");
    // The server's half-close ends the relay's other direction, and so the relay.
    server.shutdown().await.unwrap();
    let relayed = tokio::time::timeout(DEADLINE, relay)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(relayed.forward, 8000);
    assert_eq!(relayed.backward, 0);
    drop(writer);
}

#[tokio::test]
async fn an_end_that_vanishes_ends_the_relay_keeping_the_counts() {
    let (mut client, mut a, mut b, server) = pairs(64 << 10);
    let relay = tokio::spawn(async move { relay_streams(&mut a, &mut b).await });
    client.write_all(b"hello").await.unwrap();
    // The server end goes away without reading: writing to it fails.
    drop(server);
    client.write_all(b" world").await.unwrap();
    let relayed = tokio::time::timeout(DEADLINE, relay)
        .await
        .unwrap()
        .unwrap();
    assert!(relayed.error.is_some(), "{relayed:?}");
    assert!(relayed.forward <= 11, "{relayed:?}");
    // The relay dropped its ends: the client sees the connection close.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(DEADLINE, client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(n.is_err() || rest.is_empty());
}
