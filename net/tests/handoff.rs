//! The pod hand-off protocol over a real Unix SEQPACKET socket: a network namespace
//! descriptor crosses the socket, every message is acknowledged, snapshots replayed by
//! a restarted node agent reconcile what ztunnel serves, and bad messages get an error
//! Ack without breaking the connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ambit_net::handoff::{
    serve, HandoffClient, HandoffError, HandoffHandler, PacketConn, PacketListener,
};
use ambit_proto::handoff::{
    node_agent_message::Payload, AddWorkload, Hello, NodeAgentMessage, WorkloadInfo, ZtunnelMessage,
};
use prost::Message;

/// Records what ztunnel was asked to serve, with the namespace each descriptor names.
#[derive(Clone, Default)]
struct Served {
    pods: Arc<Mutex<BTreeMap<String, (WorkloadInfo, String)>>>,
    /// Snapshots completed.
    complete: Arc<std::sync::atomic::AtomicUsize>,
}

fn ns_of(fd: &impl AsRawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

impl HandoffHandler for Served {
    async fn add(&self, uid: &str, info: &WorkloadInfo, netns: OwnedFd) -> Result<(), String> {
        let ns = ns_of(&netns);
        if uid.starts_with("refuse") {
            return Err(format!("{uid}: cannot listen"));
        }
        if !ns.starts_with("net:[") {
            return Err(format!("descriptor is not a network namespace: {ns}"));
        }
        self.pods
            .lock()
            .unwrap()
            .insert(uid.to_string(), (info.clone(), ns));
        Ok(())
    }

    async fn remove(&self, uid: &str) -> Result<(), String> {
        self.pods.lock().unwrap().remove(uid);
        Ok(())
    }

    fn served(&self) -> BTreeSet<String> {
        self.pods.lock().unwrap().keys().cloned().collect()
    }

    fn snapshot_complete(&self) {
        self.complete
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A snapshot is complete only when every pod it named is served: a ztunnel that
/// could not take one (it cannot listen in the pod) must not say it serves the node.
#[tokio::test]
async fn a_snapshot_with_a_refused_pod_is_not_complete() {
    use std::sync::atomic::Ordering;
    let s = start();
    let own_ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let client = HandoffClient::connect(&s.path).await.unwrap();
    client
        .add("uid-a", info("a"), own_ns.as_fd())
        .await
        .unwrap();
    client.snapshot_sent().await.unwrap();
    assert_eq!(s.served.complete.load(Ordering::SeqCst), 1);

    let again = HandoffClient::connect(&s.path).await.unwrap();
    again.add("uid-a", info("a"), own_ns.as_fd()).await.unwrap();
    let refused = again.add("refuse-b", info("b"), own_ns.as_fd()).await;
    assert!(refused.is_err(), "{refused:?}");
    again.snapshot_sent().await.unwrap();
    assert_eq!(
        s.served.complete.load(Ordering::SeqCst),
        1,
        "a snapshot with a refused pod counted as complete"
    );
    assert_eq!(s.served.served(), BTreeSet::from(["uid-a".to_string()]));
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "shop".into(),
        service_account: "cart".into(),
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    served: Served,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let listener = PacketListener::bind(&path).unwrap();
    let served = Served::default();
    let handler = served.clone();
    tokio::spawn(async move { serve(listener, &handler).await });
    Setup {
        _dir: dir,
        path,
        served,
    }
}

#[tokio::test]
async fn namespace_descriptors_cross_the_socket_and_each_message_is_acked() {
    let s = start();
    let own_ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let client = HandoffClient::connect(&s.path).await.unwrap();
    client
        .add("uid-a", info("a"), own_ns.as_fd())
        .await
        .unwrap();
    client
        .add("uid-b", info("b"), own_ns.as_fd())
        .await
        .unwrap();
    client.snapshot_sent().await.unwrap();
    {
        let pods = s.served.pods.lock().unwrap();
        let (i, ns) = &pods["uid-a"];
        assert_eq!(i, &info("a"));
        assert_eq!(
            ns,
            &ns_of(&own_ns),
            "ztunnel received the very namespace that was sent"
        );
    }
    client.remove("uid-a").await.unwrap();
    assert_eq!(s.served.served(), BTreeSet::from(["uid-b".to_string()]));
}

#[tokio::test]
async fn a_restarted_node_agent_replays_its_snapshot_and_stale_pods_are_dropped() {
    let s = start();
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    {
        let first = HandoffClient::connect(&s.path).await.unwrap();
        for uid in ["a", "b"] {
            first.add(uid, info(uid), ns.as_fd()).await.unwrap();
        }
        first.snapshot_sent().await.unwrap();
    }
    // The agent restarts: it keeps b, adds c, and no longer has a.
    let second = HandoffClient::connect(&s.path).await.unwrap();
    second.keep("b").await.unwrap();
    second.add("c", info("c"), ns.as_fd()).await.unwrap();
    assert_eq!(
        s.served.served().len(),
        3,
        "nothing is dropped before the snapshot ends"
    );
    second.snapshot_sent().await.unwrap();
    assert_eq!(
        s.served.served(),
        BTreeSet::from(["b".to_string(), "c".to_string()])
    );
}

#[tokio::test]
async fn bad_messages_get_an_error_ack_and_the_connection_keeps_working() {
    let s = start();
    let client = HandoffClient::connect(&s.path).await.unwrap();
    match client.keep("unknown").await {
        Err(HandoffError::Refused { what, error }) => {
            assert_eq!(what, "keep unknown");
            assert!(error.contains("not served here"), "{error}");
        }
        other => panic!("{other:?}"),
    }

    // Raw packets a broken node agent might send.
    let raw = PacketConn::connect(&s.path).unwrap();
    let hello = NodeAgentMessage {
        payload: Some(Payload::Hello(Hello { version: 99 })),
    };
    let add_without_fd = NodeAgentMessage {
        payload: Some(Payload::Add(AddWorkload {
            uid: "x".into(),
            workload_info: None,
        })),
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (hello.encode_to_vec(), "protocol version 99 not supported"),
        (vec![0xff, 0xff, 0xff], "malformed message"),
        // Only an unknown field (99, varint 1): decodes, but carries no payload. (An
        // empty packet cannot be sent: on SEQPACKET it reads as the peer closing.)
        (vec![0x98, 0x06, 0x01], "no payload"),
        (
            add_without_fd.encode_to_vec(),
            "add x: no network namespace descriptor attached",
        ),
    ];
    for (packet, want) in cases {
        raw.send(&packet, None).await.unwrap();
        let (answer, _) = raw.recv().await.unwrap().unwrap();
        let ambit_proto::handoff::ztunnel_message::Payload::Ack(ack) =
            ZtunnelMessage::decode(answer.as_slice())
                .unwrap()
                .payload
                .unwrap();
        assert!(ack.error.contains(want), "{want}: got {:?}", ack.error);
    }
    assert!(s.served.served().is_empty());
}

#[tokio::test]
async fn a_new_connection_replaces_a_hung_one() {
    let s = start();
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    // The first agent connects and then never speaks again, nor closes.
    let _hung = HandoffClient::connect(&s.path).await.unwrap();
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let c = HandoffClient::connect(&s.path).await.unwrap();
        c.add("a", info("a"), ns.as_fd()).await.unwrap();
        c.snapshot_sent().await.unwrap();
    })
    .await;
    assert!(
        next.is_ok(),
        "the successor was locked out by the hung connection"
    );
    assert_eq!(s.served.served(), BTreeSet::from(["a".to_string()]));
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.sock");
    let e = HandoffClient::connect(&path).await.unwrap_err().to_string();
    assert!(e.contains("nope.sock"), "{e}");
}
