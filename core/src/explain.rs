//! Why a connection (or an HTTP request) from one workload to another is allowed or
//! denied, decided by the functions the proxies run on the same model: the source
//! ztunnel's path ([`crate::outbound::route`]), the waypoint's L7 policies
//! ([`crate::l7::evaluate`]), the destination ztunnel's waypoint check
//! ([`crate::inbound::waypoint_peer`]), the client address it believes
//! ([`crate::inbound::client_source`]) and its L4 policies ([`crate::authz::evaluate`]).
//! `ambitctl authz explain` prints it.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::authz;
use crate::hbone::{Forwarded, HboneTarget};
use crate::identity::SpiffeId;
use crate::inbound;
use crate::l7;
use crate::model::{MeshState, Workload};
use crate::outbound::{self, OrigDst, OutboundRoute};

/// Who opens the connection.
#[derive(Debug, Clone)]
pub struct Source {
    /// Its mesh identity when its traffic is captured (it speaks HBONE): `None` for a
    /// client outside the mesh, whose traffic arrives as plaintext.
    pub identity: Option<SpiffeId>,
    pub ip: IpAddr,
}

impl Source {
    /// `workload` as a client: captured (with its identity) when it speaks HBONE.
    pub fn of(workload: &Workload, ip: IpAddr) -> Source {
        Source {
            identity: workload.is_hbone().then(|| workload.identity.clone()),
            ip,
        }
    }
}

/// An HTTP request's attributes (none: plain TCP).
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
}

/// One place that decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    /// `ztunnel on node-b`, `waypoint shop/waypoint`, `source ztunnel`.
    pub enforcer: String,
    /// The identity the enforcer saw (`plaintext` when none).
    pub peer: String,
    /// The policies that applied there, in the order evaluated.
    pub policies: Vec<String>,
    pub allowed: bool,
    /// What decided: the policy (and rule at a waypoint), or why none applied.
    pub reason: String,
}

/// The decision and every hop on the way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub allowed: bool,
    /// The destination workload the connection reaches (or would).
    pub destination: Option<String>,
    pub hops: Vec<Hop>,
}

fn peer_text(peer: Option<&SpiffeId>) -> String {
    peer.map_or_else(|| "plaintext".to_owned(), ToString::to_string)
}

fn deny(hops: Vec<Hop>, destination: Option<String>) -> Explanation {
    Explanation {
        allowed: false,
        destination,
        hops,
    }
}

/// Explains `source` connecting to `dst` (a Service VIP or a workload address, and
/// the port), with `request` when it is HTTP.
pub fn explain(
    state: &MeshState,
    source: &Source,
    dst: SocketAddr,
    request: Option<&HttpRequest>,
) -> Explanation {
    let mut hops = Vec::new();
    let Some(identity) = source.identity.as_ref() else {
        // Not captured: plaintext straight to an endpoint (kube-proxy's pick).
        let Some(workload) = endpoint(state, dst) else {
            return Explanation {
                allowed: true,
                destination: None,
                hops: vec![Hop {
                    enforcer: "none".into(),
                    peer: "plaintext".into(),
                    policies: Vec::new(),
                    allowed: true,
                    reason: format!("{dst} is no workload of the mesh: nothing enforces policy"),
                }],
            };
        };
        let (w, port) = workload;
        return inbound_hop(state, &w, None, source.ip, port, hops);
    };
    let route = match outbound::route(state, OrigDst(dst), 0) {
        Ok(r) => r,
        Err(e) => {
            hops.push(Hop {
                enforcer: "source ztunnel".into(),
                peer: identity.to_string(),
                policies: Vec::new(),
                allowed: false,
                reason: format!("refused: {e}"),
            });
            return deny(hops, None);
        }
    };
    let path = match route {
        OutboundRoute::Passthrough { dst, workload, .. } => {
            hops.push(Hop {
                enforcer: "none".into(),
                peer: identity.to_string(),
                policies: Vec::new(),
                allowed: true,
                reason: format!("{dst} is outside the mesh: sent as plaintext, no policy applies"),
            });
            return Explanation {
                allowed: true,
                destination: workload.map(|w| w.uid().to_owned()),
                hops,
            };
        }
        OutboundRoute::Hbone(path) => path,
    };
    let Some(waypoint_key) = path.waypoint.clone() else {
        return inbound_hop(
            state,
            &path.workload,
            Some(identity),
            source.ip,
            path.target.addr().port(),
            hops,
        );
    };
    // Through the waypoint: its L7 policies for the Service (or the workload).
    let Some(waypoint) = state.waypoint(&waypoint_key).cloned() else {
        hops.push(Hop {
            enforcer: format!("waypoint {waypoint_key}"),
            peer: identity.to_string(),
            policies: Vec::new(),
            allowed: false,
            reason: "the model has no such waypoint: refused".into(),
        });
        return deny(hops, None);
    };
    let service = path
        .service
        .as_ref()
        .map(|s| (s.spec.namespace.as_str(), s.spec.name.as_str()));
    let policies: Vec<&l7::Policy> = state
        .l7_policies_for(
            (
                waypoint.spec.namespace.as_str(),
                waypoint.spec.name.as_str(),
            ),
            service,
        )
        .collect();
    let connection = l7::Connection {
        peer: Some(identity),
        source_ip: source.ip,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        sni: None,
    };
    let verdict = match request {
        Some(r) => {
            let normalized = match l7::normalize_path(&r.path) {
                Ok(p) => p,
                Err(e) => {
                    hops.push(Hop {
                        enforcer: format!("waypoint {waypoint_key}"),
                        peer: identity.to_string(),
                        policies: policies.iter().map(|p| p.key()).collect(),
                        allowed: false,
                        reason: format!("path {:?} refused with 400: {e}", r.path),
                    });
                    return deny(hops, None);
                }
            };
            let headers: Vec<(&str, &str)> = r
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let headers: &[(&str, &str)] = &headers;
            l7::evaluate(
                policies.iter().copied(),
                &l7::Request {
                    connection,
                    remote_ip: source.ip,
                    host: &r.host,
                    method: &r.method,
                    path: &normalized,
                    headers: &headers,
                    auth: None,
                },
            )
        }
        None => l7::evaluate_tcp(policies.iter().copied(), &connection),
    };
    let (allowed, reason) = match (&verdict.decision, &verdict.allowed_by) {
        (Ok(()), Some(rule)) => (true, format!("allowed by {rule}")),
        (Ok(()), None) => (true, "no ALLOW policy applies, none denies".to_owned()),
        (Err(denial), _) => (false, format!("{denial} (403)")),
    };
    hops.push(Hop {
        enforcer: format!("waypoint {waypoint_key}"),
        peer: identity.to_string(),
        policies: policies.iter().map(|p| p.key()).collect(),
        allowed,
        reason,
    });
    if !allowed {
        return deny(hops, None);
    }
    // Then from the waypoint to an endpoint, as the waypoint's own identity, the
    // client's address claimed in `forwarded`.
    let Some((workload, port)) = endpoint(state, dst) else {
        hops.push(Hop {
            enforcer: format!("waypoint {waypoint_key}"),
            peer: identity.to_string(),
            policies: Vec::new(),
            allowed: false,
            reason: format!("no endpoint for {dst}"),
        });
        return deny(hops, None);
    };
    let waypoint_addr = SocketAddr::new(
        path.workload
            .ip_like(source.ip)
            .unwrap_or(path.hbone_addr.ip()),
        0,
    );
    let (client, _) = inbound::client_source(
        state,
        &waypoint.identity,
        waypoint_addr,
        Some(&Forwarded {
            for_addr: SocketAddr::new(source.ip, 0),
            host: None,
        }),
    );
    inbound_hop(
        state,
        &workload,
        Some(&waypoint.identity),
        client.ip(),
        port,
        hops,
    )
}

/// The workload `dst` reaches (a Service's first healthy endpoint), with the port.
fn endpoint(state: &MeshState, dst: SocketAddr) -> Option<(std::sync::Arc<Workload>, u16)> {
    if let Some(service) = state.service_by_vip(dst.ip()) {
        let port = service.spec.ports.iter().find(|p| p.port == dst.port())?;
        return service.spec.endpoints.iter().find_map(|ep| {
            let w = state.workload(&ep.workload_uid)?;
            let target = ep
                .ports
                .iter()
                .find(|p| p.port == port.port)
                .map_or(port.target_port, |p| p.target_port);
            w.spec.healthy.then(|| (w.clone(), target))
        });
    }
    state
        .workload_by_ip(dst.ip())
        .map(|w| (w.clone(), dst.port()))
}

/// The destination ztunnel: the waypoint check, then the L4 policies.
fn inbound_hop(
    state: &MeshState,
    workload: &std::sync::Arc<Workload>,
    peer: Option<&SpiffeId>,
    source_ip: IpAddr,
    port: u16,
    mut hops: Vec<Hop>,
) -> Explanation {
    let destination = Some(workload.uid().to_owned());
    let enforcer = format!("ztunnel on {}", workload.spec.node);
    if !workload.is_hbone() {
        hops.push(Hop {
            enforcer: "none".into(),
            peer: peer_text(peer),
            policies: Vec::new(),
            allowed: true,
            reason: format!("{} is not in the mesh: no policy applies", workload.uid()),
        });
        return Explanation {
            allowed: true,
            destination,
            hops,
        };
    }
    let Some(ip) = workload.spec.ips.first().copied() else {
        return deny(hops, destination);
    };
    let target = HboneTarget::new(SocketAddr::new(ip, port));
    if let Err(refusal) = inbound::waypoint_peer(state, workload, peer, target) {
        hops.push(Hop {
            enforcer,
            peer: peer_text(peer),
            policies: Vec::new(),
            allowed: false,
            reason: format!("refused: {refusal}"),
        });
        return deny(hops, destination);
    }
    let policies: Vec<&authz::Policy> = state.policies_for(&workload.spec).collect();
    let verdict = authz::evaluate(
        policies.iter().copied(),
        &authz::Connection {
            peer,
            source_ip,
            destination_ip: ip,
            destination_port: port,
        },
    );
    let (allowed, reason) = match (&verdict.decision, &verdict.allowed_by) {
        (Ok(()), Some(policy)) => (true, format!("allowed by {policy}")),
        (Ok(()), None) => (true, "no ALLOW policy applies, none denies".to_owned()),
        (Err(denial), _) => (false, denial.to_string()),
    };
    hops.push(Hop {
        enforcer,
        peer: peer_text(peer),
        policies: policies.iter().map(|p| p.key()).collect(),
        allowed,
        reason,
    });
    Explanation {
        allowed,
        destination,
        hops,
    }
}
