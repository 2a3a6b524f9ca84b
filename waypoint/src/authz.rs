//! Authorization of each request, and how a denial is answered.
//!
//! [`authorize`] is the one place a request is decided: `ambit_core::l7::evaluate`
//! over the L7 AuthorizationPolicies attached to this waypoint's Gateway, its class,
//! or the Service the request is for (`MeshState::l7_policies_for`). Selector and
//! namespace-wide policies never apply here (they are ztunnel's), as in Istio.
//! [`authorize_tcp`] decides a plain TCP connection on a bound service with the same
//! policies' TCP projection (`ambit_core::l7::evaluate_tcp`).
//!
//! A denial is answered as Envoy's RBAC filter answers it: 403 with the body
//! `RBAC: access denied`; to gRPC clients, a trailers-only response with
//! `grpc-status: 7` (PERMISSION_DENIED).

use std::net::SocketAddr;

use ambit_core::l7::{self, NormalizedPath};
use ambit_core::model::MeshState;
use ambit_core::waypoint::{BoundTarget, GatewayRef};
use ambit_core::SpiffeId;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

use crate::http::Body;

pub use ambit_core::l7::Denial;

/// What authorization sees of one HTTP request.
#[derive(Debug)]
pub struct RequestInfo<'a> {
    /// The client's identity, from its mTLS certificate (the client ztunnel's tunnel
    /// carries the source workload's identity).
    pub peer: &'a SpiffeId,
    /// The original client's address.
    pub source: SocketAddr,
    /// The original destination: the CONNECT target (VIP:port or podIP:port).
    pub destination: SocketAddr,
    pub host: &'a str,
    pub method: &'a str,
    /// The normalized path (Istio's `BASE`), without the query.
    pub path: &'a NormalizedPath,
    pub headers: &'a HeaderMap,
    /// The end user's identity from an accepted JWT ([`crate::authn`]).
    pub auth: Option<&'a l7::RequestAuth>,
}

/// What authorization sees of one plain TCP connection.
#[derive(Debug)]
pub struct ConnectionInfo<'a> {
    pub peer: &'a SpiffeId,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// The policies that apply to traffic for `target` at waypoint `gateway`.
fn policies<'a>(
    state: &'a MeshState,
    gateway: &'a GatewayRef,
    target: &'a BoundTarget,
) -> impl Iterator<Item = &'a l7::Policy> + 'a {
    let service = match target {
        BoundTarget::Service { service, .. } => {
            Some((service.spec.namespace.as_str(), service.spec.name.as_str()))
        }
        BoundTarget::Workload { .. } => None,
    };
    state.l7_policies_for((gateway.namespace.as_str(), gateway.name.as_str()), service)
}

fn connection<'a>(
    peer: &'a SpiffeId,
    source: SocketAddr,
    destination: SocketAddr,
) -> l7::Connection<'a> {
    l7::Connection {
        peer: Some(peer),
        source_ip: source.ip(),
        destination_ip: destination.ip(),
        destination_port: destination.port(),
        sni: None,
    }
}

/// Decides one request against the policies attached to this waypoint and the
/// Service it is for.
pub fn authorize(
    state: &MeshState,
    gateway: &GatewayRef,
    target: &BoundTarget,
    request: &RequestInfo<'_>,
) -> l7::Verdict {
    let request = l7::Request {
        connection: connection(request.peer, request.source, request.destination),
        // No trusted proxies in front of a waypoint: the remote client is the source.
        remote_ip: request.source.ip(),
        host: request.host,
        method: request.method,
        path: request.path,
        headers: request.headers,
        auth: request.auth,
    };
    l7::evaluate(policies(state, gateway, target), &request)
}

/// Decides one plain TCP connection with the policies' TCP projection.
pub fn authorize_tcp(
    state: &MeshState,
    gateway: &GatewayRef,
    target: &BoundTarget,
    c: &ConnectionInfo<'_>,
) -> l7::Verdict {
    l7::evaluate_tcp(
        policies(state, gateway, target),
        &connection(c.peer, c.source, c.destination),
    )
}

/// Whether a request is gRPC (`content-type: application/grpc`, `+proto` and the
/// like).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The answer to a denied request.
pub fn denied(grpc: bool) -> Response<Body> {
    if grpc {
        // Trailers-only: the status is in the only HEADERS frame, with END_STREAM.
        let mut response = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("RBAC: access denied"),
        );
        return response;
    }
    let mut response = Response::new(
        Full::new(Bytes::from_static(b"RBAC: access denied"))
            .map_err(|n| match n {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_denial_is_403_rbac_access_denied_or_grpc_status_7() {
        let plain = denied(false);
        assert_eq!(plain.status(), 403);
        let body = plain.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"RBAC: access denied");

        let grpc = denied(true);
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()["grpc-status"], "7");
        assert_eq!(grpc.headers()["content-type"], "application/grpc");
        assert!(hyper::body::Body::is_end_stream(grpc.body()));

        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
    }
}
