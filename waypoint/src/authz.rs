//! Authorization of each request, and how a denial is answered.
//!
//! [`authorize`] is the one place a request is decided; `ambit_core::l7::evaluate`
//! (L7 AuthorizationPolicy attached to this waypoint) is called here once it lands.
//! Until then no L7 policy reaches the waypoint, and every request is allowed; a test
//! marks that. [`authorize_tcp`] is the same for a plain TCP connection on a bound
//! service (the L4 projection of the same policies).
//!
//! A denial is answered as Envoy's RBAC filter answers it: 403 with the body
//! `RBAC: access denied`; to gRPC clients, a trailers-only response with
//! `grpc-status: 7` (PERMISSION_DENIED).

use std::net::SocketAddr;

use ambit_core::SpiffeId;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

use crate::http::Body;

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
    /// The path, without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// What authorization sees of one plain TCP connection.
#[derive(Debug)]
pub struct ConnectionInfo<'a> {
    pub peer: &'a SpiffeId,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Why a request was denied: the policy and rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied by {policy}")]
pub struct Denial {
    pub policy: String,
}

/// Decides one request. Allows every request until L7 policies reach the waypoint
/// (`ambit_core::l7::evaluate`).
pub fn authorize(_request: &RequestInfo<'_>) -> Result<(), Denial> {
    Ok(())
}

/// Decides one plain TCP connection. Allows every connection until L7 policies (and
/// their L4 projection) reach the waypoint.
pub fn authorize_tcp(_connection: &ConnectionInfo<'_>) -> Result<(), Denial> {
    Ok(())
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

    #[test]
    fn every_request_is_allowed_until_l7_policies_reach_the_waypoint() {
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        let headers = HeaderMap::new();
        let request = RequestInfo {
            peer: &peer,
            source: "10.1.0.5:40000".parse().unwrap(),
            destination: "10.96.0.10:80".parse().unwrap(),
            host: "cart.shop.svc.cluster.local",
            method: "POST",
            path: "/admin",
            headers: &headers,
        };
        assert_eq!(authorize(&request), Ok(()));
        let connection = ConnectionInfo {
            peer: &peer,
            source: request.source,
            destination: request.destination,
        };
        assert_eq!(authorize_tcp(&connection), Ok(()));
    }

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
