//! HTTP inside a terminated tunnel: hyper's HTTP/1.1 or HTTP/2 server (prior
//! knowledge) with Envoy's limits, and the request path, a short fixed sequence:
//!
//! 1. **check** the request: both `Content-Length` and `Transfer-Encoding` (HTTP/1,
//!    [`crate::h1_guard`]) or `%00` in the path → 400;
//! 2. **authenticate** it ([`crate::authn`], RequestAuthentication) → 401 for a token
//!    no rule accepts, and **authorize** it ([`crate::authz::authorize`]) → 403
//!    `RBAC: access denied`;
//! 3. **route**: a Service's request goes by the HTTPRoutes attached to it on its port
//!    (`ambit_core::route`: rule by precedence → 404 `NR` when none matches; backend by
//!    weight → 500 `NC` when none has weight or it does not exist), else to the Service
//!    itself; a workload's goes to the workload;
//! 4. **balance** over the chosen Service's (subset's) healthy endpoints that are not
//!    ejected: round robin, or as its DestinationRule says ([`crate::balance`]) → 503
//!    `UH` `no healthy upstream`; a subset the rule does not define → 503 `NC`;
//! 5. **forward** over a pooled upstream connection ([`crate::upstream`]), as the
//!    rule's connection pool admits (→ 503 `UO` on overflow), each try's outcome
//!    reported to its outlier detection → 503 when it cannot be reached.
//!
//! Bodies stream both ways frame by frame (trailers included, so gRPC works) and are
//! never held whole; an HTTP/1.1 `Upgrade` (WebSocket) answered 101 joins the two
//! upgraded connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_core::hbone::TraceParent;
use ambit_core::route::RequestView as RouteView;
use ambit_core::route::{AbortWith, Injected};
use ambit_core::waypoint::{BoundTarget, Endpoint, NoEndpoint};
use ambit_core::SpiffeId;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::authz::{self, ConnectionInfo, RequestInfo};
use crate::balance::{HashInput, PickFor};
use crate::h1_guard::{Guarded, Verdict, Verdicts};
use crate::io::{idle, Activity, Watched};
use crate::metrics::Counted;
use crate::mirror::Outbound;
use crate::proxy::Shared;
use crate::upstream::{HttpVersion, UpstreamKey};

/// A response body to the client.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A request body sent upstream, counted for `istio_request_bytes`.
pub type RequestBody = Counted<Outbound>;

/// Envoy-like limits on the client side.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request header section, bytes (431 above).
    pub max_request_headers: u32,
    /// How long a client may take to send an HTTP/1 request's headers.
    pub header_timeout: Duration,
    /// A connection that moves no byte this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// Envoy's: 60 KiB of headers; a 10 s header timeout; connections idle for 5
    /// minutes closed (Envoy's stream idle timeout).
    fn default() -> Self {
        Limits {
            max_request_headers: 60 << 10,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// One tunnel's HTTP: what every request on it shares.
#[derive(Debug)]
pub struct TunnelContext {
    pub shared: Arc<Shared>,
    pub target: BoundTarget,
    /// The CONNECT target, the original destination.
    pub destination: SocketAddr,
    pub peer: SpiffeId,
    /// The original client.
    pub client: SocketAddr,
    /// The client's workload metadata from the CONNECT's `baggage`.
    pub baggage: ambit_core::hbone::Baggage,
    /// What the target's port declares: it decides the upstream protocol (HTTP/1.1
    /// for `http`, HTTP/2 for `http2`/`grpc`, the client's own when sniffed), as
    /// Envoy's clusters in Istio do.
    pub declared: ambit_core::waypoint::Declared,
}

/// Serves HTTP of `version` on the tunnel `io` until the client is done, the
/// connection idles out or the waypoint drains.
pub async fn serve<IO>(context: Arc<TunnelContext>, io: IO, version: HttpVersion)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = context.shared.limits;
    let activity = Activity::default();
    let drained = context.shared.drained();
    match version {
        HttpVersion::Http1 => {
            let verdicts = Verdicts::default();
            let context_for_errors = context.clone();
            let io = Watched::new(Guarded::new(io, verdicts.clone()), activity.clone());
            let service = hyper::service::service_fn(move |request| {
                let context = context.clone();
                let verdict = verdicts.next();
                async move { Ok::<_, Infallible>(handle(context, request, verdict).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_request_headers as usize)
                .keep_alive(true);
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = idle(activity, limits.idle_timeout) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = drained => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP/1 connection ended");
                // hyper answers a head it cannot parse itself, before a request
                // exists for the handler: count and log that answer too.
                if let Some(status) = answered_by_hyper(&e) {
                    refused_head(&context_for_errors, status);
                }
            }
        }
        HttpVersion::Http2 => {
            let io = Watched::new(io, activity.clone());
            let service = hyper::service::service_fn(move |request| {
                let context = context.clone();
                async move { Ok::<_, Infallible>(handle(context, request, Verdict::Ok).await) }
            });
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_request_headers)
                .keep_alive_interval(Duration::from_secs(30));
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = idle(activity, limits.idle_timeout) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = drained => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
        }
    }
}

/// The status hyper's HTTP/1 server wrote for a head it refused before any request
/// reached the handler, as Envoy answers the same heads: 431 for a head over the
/// limit, 400 for one it could not parse. `None`: nothing was answered.
fn answered_by_hyper(error: &hyper::Error) -> Option<StatusCode> {
    if error.is_parse_too_large() {
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    } else if error.is_parse() {
        Some(StatusCode::BAD_REQUEST)
    } else {
        None
    }
}

/// Records a head hyper refused with `status` (metrics and the access log), with
/// response flag `DPE` (downstream protocol error) as Envoy's.
fn refused_head(context: &Arc<TunnelContext>, status: StatusCode) {
    let summary = RequestSummary {
        method: "-".into(),
        authority: context.destination.to_string(),
        path: "-".into(),
        protocol: "http",
        version: "HTTP/1.1",
        trace_id: String::new(),
        request_id: String::new(),
        started: Instant::now(),
    };
    let mut response = Response::new(Body::default());
    *response.status_mut() = status;
    // The body is dropped unread: dropping it records the request.
    drop(finish(
        context,
        &summary,
        response,
        "DPE",
        None,
        Arc::new(AtomicU64::new(0)),
    ));
}

/// The request path: check, authorize, route, balance, forward.
async fn handle(
    context: Arc<TunnelContext>,
    mut request: Request<Incoming>,
    verdict: Verdict,
) -> Response<Body> {
    let started = Instant::now();
    let shared = &context.shared;
    let grpc = authz::is_grpc(request.headers());
    let trace_id = propagate_trace(request.headers_mut());
    let summary = request_summary(&request, trace_id, started);
    let request_bytes = Arc::new(AtomicU64::new(0));
    let respond = |response: Response<Body>, flag: &str, endpoint: Option<&Endpoint>| {
        finish(
            &context,
            &summary,
            response,
            flag,
            endpoint,
            request_bytes.clone(),
        )
    };
    if verdict == Verdict::LengthAndChunked {
        let mut response = local_reply(
            StatusCode::BAD_REQUEST,
            "both Content-Length and Transfer-Encoding",
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return respond(response, "DPE", None);
    }
    // Istio's BASE normalization: policies match the normalized path, and the backend
    // receives it. `%00` and other malformed paths are 400.
    let path = match ambit_core::l7::normalize_path(
        request.uri().path_and_query().map_or("/", |p| p.as_str()),
    ) {
        Ok(path) => path,
        Err(e) => {
            tracing::info!(peer = %context.peer, dst = %context.destination, reason = e.reason(), error = %e, "request refused: malformed path");
            return respond(
                local_reply(StatusCode::BAD_REQUEST, "Bad Request"),
                "DPE",
                None,
            );
        }
    };
    if !request
        .method()
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        // Envoy answers a method that is not upper case with 400.
        return respond(
            local_reply(StatusCode::BAD_REQUEST, "Bad Request"),
            "DPE",
            None,
        );
    }
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    // Authenticate (RequestAuthentication): a token no rule accepts is 401; none at
    // all is no request identity.
    let state = shared.model.borrow().state.clone();
    let auth = match shared
        .authn
        .authenticate(
            &state,
            &shared.gateway,
            &context.target,
            request.headers_mut(),
            path.query(),
        )
        .await
    {
        crate::authn::Outcome::Anonymous => None,
        crate::authn::Outcome::Authenticated(auth) => Some(auth),
        crate::authn::Outcome::Rejected(e) => {
            tracing::info!(peer = %context.peer, dst = %context.destination, method = %request.method(), path = path.path(), reason = e.reason(), error = %e, "request refused: JWT not accepted");
            let response = crate::authn::unauthorized(&e, &host, path.path(), grpc);
            return respond(response, "", None);
        }
    };
    let verdict = {
        authz::authorize(
            &state,
            &shared.gateway,
            &context.target,
            &RequestInfo {
                peer: &context.peer,
                source: context.client,
                destination: context.destination,
                host: &host,
                method: request.method().as_str(),
                path: &path,
                headers: request.headers(),
                auth: auth.as_ref(),
            },
        )
    };
    for (rule, action) in &verdict.dry_run_matches {
        tracing::info!(peer = %context.peer, dst = %context.destination, method = %request.method(), path = path.path(), policy = %rule.policy, rule = rule.rule, ?action, "dry-run policy matched; not enforced");
    }
    if let Err(denial) = &verdict.decision {
        tracing::info!(peer = %context.peer, dst = %context.destination, method = %request.method(), path = path.path(), details = %denial.response_details(), %denial, "request denied by authorization policy");
        return respond(authz::denied(grpc), "", None);
    }
    // The backend receives the normalized path.
    if let Ok(uri) = http::Uri::builder()
        .path_and_query(path.to_request_target())
        .build()
    {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = uri.into_parts().path_and_query;
        if let Ok(rebuilt) = http::Uri::from_parts(parts) {
            *request.uri_mut() = rebuilt;
        }
    }
    let routed = route_request(
        &context,
        &RouteView {
            method: request.method().as_str(),
            path: path.path(),
            query: path.query(),
            headers: request.headers(),
            authority: &host,
        },
        &host,
    );
    let (endpoint, overall, per_try, retry_policy, actions, fault) = match routed {
        Ok(Routed::Forward {
            endpoint,
            overall,
            per_try,
            retry,
            actions,
            fault,
        }) => (endpoint, overall, per_try, retry, actions, fault),
        Ok(Routed::Redirect {
            status,
            location,
            response_headers,
        }) => {
            let mut response = Response::new(Body::default());
            *response.status_mut() = status;
            if let Ok(location) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            if let Some(modifier) = response_headers {
                modifier.apply(response.headers_mut());
            }
            return respond(response, "", None);
        }
        Err((status, body, flag)) => {
            tracing::info!(dst = %context.destination, method = %request.method(), path = path.path(), flag, body, "request not routed");
            return respond(local_reply(status, body), flag, None);
        }
    };
    // A VirtualService's fault injection, before anything is sent: the delay, then
    // the abort (Envoy's fault filter: flags `DI` and `FI`).
    let mut fault_flag = "";
    if let Some(delay) = fault.delay {
        tracing::debug!(dst = %context.destination, delay_ms = delay.as_millis(), "fault injection: delaying the request");
        tokio::time::sleep(delay).await;
        fault_flag = "DI";
    }
    if let Some(abort) = fault.abort {
        let flag = if fault_flag.is_empty() { "FI" } else { "DI,FI" };
        return respond(fault_abort(abort), flag, None);
    }
    // From here on, a delayed request's flags carry `DI` too.
    let respond = |response: Response<Body>, flag: &str, endpoint: Option<&Endpoint>| match (
        fault_flag, flag,
    ) {
        ("", flag) | (flag, "") => respond(response, flag, endpoint),
        (delayed, flag) => respond(response, &format!("{delayed},{flag}"), endpoint),
    };
    let mut response_headers = None;
    let mut mirrors = Vec::new();
    if let Some(actions) = actions {
        let RuleActions {
            filters,
            matched_prefix,
            mirrors: copies_to,
        } = *actions;
        if let Some(modifier) = &filters.request_headers {
            modifier.apply(request.headers_mut());
        }
        if let Some(rewrite) = &filters.rewrite {
            apply_rewrite(
                &mut request,
                rewrite,
                path.path(),
                path.query(),
                matched_prefix.as_deref(),
            );
        }
        response_headers = filters.response_headers;
        mirrors = copies_to;
    }
    let version = match context.declared {
        ambit_core::waypoint::Declared::Http => HttpVersion::Http1,
        ambit_core::waypoint::Declared::Http2 => HttpVersion::Http2,
        _ if request.version() == Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    };
    translate_version(&mut request, version);
    let upgrade = version == HttpVersion::Http1
        && request.version() == Version::HTTP_11
        && wants_upgrade(request.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    strip_hop_by_hop(request.headers_mut(), upgrade);
    append_forwarded_for(request.headers_mut(), context.client);
    if upgrade {
        mirrors.clear();
    }
    let (head, body) = request.into_parts();
    // A body the retry can send again: none, or a small one with a length, read
    // whole first (as Envoy buffers a request for retries). A longer or streamed
    // body is sent as it comes and never retried; so is an upgrade.
    let replay_body = |bytes: &Option<Bytes>| match bytes {
        None => Outbound::Empty,
        Some(b) => Outbound::Full(Some(b.clone())),
    };
    let copies = mirrors.len();
    let replayable = !upgrade
        && (body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT));
    let (replay, first, copy_bodies) = if !replayable {
        let (body, copy_bodies) = Outbound::tee(body, copies);
        (None, body, copy_bodies)
    } else {
        let bytes = if body.is_end_stream() {
            None
        } else {
            match body.collect().await {
                Ok(collected) => Some(collected.to_bytes()),
                Err(e) => {
                    tracing::debug!(error = %e, "client's request body failed");
                    return respond(
                        local_reply(StatusCode::BAD_REQUEST, "request body failed"),
                        "DPE",
                        None,
                    );
                }
            }
        };
        let first = replay_body(&bytes);
        let copy_bodies = (0..copies).map(|_| replay_body(&bytes)).collect();
        (Some(bytes), first, copy_bodies)
    };
    for (mirror, copy_body) in mirrors.into_iter().zip(copy_bodies) {
        send_mirror(shared, &head, mirror, copy_body, version);
    }
    let policy = retry_policy.as_ref().map_or(&*DEFAULT_RETRY, |r| r);
    // What a retry sends again: the head and the body read whole. None when the
    // request cannot be retried.
    let again = replay
        .filter(|_| policy.retries > 0)
        .map(|bytes| (head_copy(&head), bytes));
    let counted = |body: Outbound| {
        let counter = request_bytes.clone();
        Counted::new(body, None, move |n, _| counter.store(n, Ordering::Relaxed))
    };
    let deadline = overall.map(|limit| started + limit);
    let _in_flight = InFlight::new(&shared.requests_in_flight);
    let mut next = Request::from_parts(head, counted(first));
    let mut endpoint = endpoint;
    // The endpoints tried so far: a retry goes to another one where there is one.
    let mut visited = vec![endpoint.addr];
    let mut tries = 0u32;
    let mut retrying = None;
    let exhausted;
    // Held with the response's body: the request counts in its cluster until then.
    let mut permit = crate::balance::Permit::default();
    let tried = loop {
        tries += 1;
        let key = UpstreamKey {
            addr: endpoint.addr,
            identity: endpoint.workload.identity.clone(),
            version,
            hbone: endpoint.workload.is_hbone(),
        };
        // This try's time: its own (`backendRequest`), within what is left of the
        // request's (`request`).
        let left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
        let limit = match (per_try, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The DestinationRule's connection pool: 503 `UO` when it overflows.
        let http2 = version == HttpVersion::Http2;
        let Ok(admitted) = shared.balancer.admit(&endpoint, http2).await else {
            exhausted = false;
            break Err((key, Failure::Overflow));
        };
        let per_connection = shared.balancer.requests_per_connection(&endpoint);
        let send = shared.upstreams.send_limited(&key, next, per_connection);
        let sent = match limit {
            None => Ok(send.await),
            Some(limit) => tokio::time::timeout(limit, send).await.map_err(|_| limit),
        };
        permit = admitted;
        let outcome = match &sent {
            Ok(Ok(response)) => ambit_core::retry::Outcome::Response {
                status: response.status().as_u16(),
                grpc: response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            },
            Ok(Err(e)) => outcome_of(e),
            Err(_) => ambit_core::retry::Outcome::Timeout,
        };
        shared.balancer.report(&endpoint, outcome);
        let retry = again.as_ref().filter(|_| {
            deadline.is_none_or(|at| Instant::now() < at)
                && policy.retries(outcome, tries)
                && ambit_core::retry::budget_allows(
                    shared.requests_in_flight.load(Ordering::Relaxed),
                    shared.retries_in_flight.load(Ordering::Relaxed),
                )
        });
        let Some((head, bytes)) = retry else {
            // Envoy's `URX`: the last try failed as the policy retries, but the retries
            // ran out.
            exhausted = tries > 1 && policy.retries(outcome, 1) && !policy.retries(outcome, tries);
            break match sent {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err((key, Failure::Upstream(e))),
                Err(limit) => Err((key, Failure::Timeout(limit))),
            };
        };
        if let Ok(Ok(response)) = sent {
            // A response that is retried is read to its end and dropped, so its
            // connection can serve again.
            tokio::spawn(crate::mirror::drain(response));
        }
        tracing::debug!(dst = %context.destination, upstream = %key.addr, try_ = tries, ?outcome, "retrying");
        // Counted from the first retry until the request's last try ends.
        retrying.get_or_insert_with(|| InFlight::new(&shared.retries_in_flight));
        tokio::time::sleep(policy.backoff(tries, rand::random())).await;
        let view = RouteView {
            method: head.method.as_str(),
            path: path.path(),
            query: path.query(),
            headers: &head.headers,
            authority: &host,
        };
        // Another endpoint than those tried, as Envoy's `previous_hosts` retry
        // predicate (Istio's default): up to 5 picks, else what the last one gave (a
        // random or least-request balancer can pick a tried one again).
        for _ in 0..RETRY_HOST_PICKS {
            let Ok(Routed::Forward { endpoint: e, .. }) = route_request(&context, &view, &host)
            else {
                break;
            };
            let fresh = !visited.contains(&e.addr);
            endpoint = e;
            if fresh {
                break;
            }
        }
        visited.push(endpoint.addr);
        next = Request::from_parts(head_copy(head), counted(replay_body(bytes)));
    };
    drop(retrying);
    let respond =
        |response: Response<Body>, flag: &str, endpoint: Option<&Endpoint>| match (exhausted, flag)
        {
            (false, flag) => respond(response, flag, endpoint),
            (true, "") => respond(response, "URX", endpoint),
            (true, flag) => respond(response, &format!("{flag},URX"), endpoint),
        };
    let mut response = match tried {
        Ok(response) => response,
        Err((key, Failure::Timeout(limit))) => {
            tracing::info!(dst = %context.destination, upstream = %key.addr, timeout_ms = limit.as_millis(), tries, "upstream request timed out (route timeout)");
            return respond(
                local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                "UT",
                Some(&endpoint),
            );
        }
        Err((key, Failure::Overflow)) => {
            tracing::debug!(dst = %context.destination, upstream = %key.addr, tries, "request refused: connection pool overflow (DestinationRule connectionPool)");
            return respond(
                local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                ),
                "UO",
                Some(&endpoint),
            );
        }
        Err((key, Failure::Upstream(e))) => {
            tracing::info!(dst = %context.destination, upstream = %key.addr, error = %e, tries, "upstream request failed");
            let reply = local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("upstream connect error or disconnect/reset before headers. reason: {e}"),
            );
            return respond(reply, e.response_flag(), Some(&endpoint));
        }
    };
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(downstream)) = (switched, downstream_upgrade) {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    strip_hop_by_hop(response.headers_mut(), switched);
    if let Some(modifier) = &response_headers {
        modifier.apply(response.headers_mut());
    }
    let response = response.map(|body| crate::balance::Held::new(body, permit).boxed());
    respond(response, "", Some(&endpoint))
}

/// The largest request body read whole before the first try so a retry can send it
/// again (Envoy buffers up to its connection buffer limit, 1 MiB, for the same).
const REPLAY_LIMIT: u64 = 64 << 10;

/// The mesh's default retry, for requests whose route has no `retry`.
static DEFAULT_RETRY: std::sync::LazyLock<ambit_core::retry::RetryPolicy> =
    std::sync::LazyLock::new(ambit_core::retry::RetryPolicy::default);

/// How the last try failed.
enum Failure {
    Upstream(crate::upstream::UpstreamError),
    /// The try's time ran out (its own, or what was left of the request's): the
    /// limit it had.
    Timeout(Duration),
    /// The endpoint's connection pool refused it.
    Overflow,
}

/// What a failed send means for the retry policy.
fn outcome_of(e: &crate::upstream::UpstreamError) -> ambit_core::retry::Outcome {
    use crate::upstream::UpstreamError;
    use ambit_core::retry::Outcome;
    match e {
        UpstreamError::Request { source, .. } => {
            let refused = std::error::Error::source(source)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .and_then(h2::Error::reason)
                == Some(h2::Reason::REFUSED_STREAM);
            if refused {
                Outcome::RefusedStream
            } else {
                Outcome::Reset
            }
        }
        _ => Outcome::ConnectFailure,
    }
}

/// A request head, again (`http::request::Parts` has no `Clone`: its extensions).
fn head_copy(head: &http::request::Parts) -> http::request::Parts {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = head.method.clone();
    copy.uri = head.uri.clone();
    copy.version = head.version;
    copy.headers = head.headers.clone();
    copy
}

/// Counts itself in a gauge while it lives.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `URLRewrite`: the backend receives the new path (the query kept) and host.
fn apply_rewrite<B>(
    request: &mut Request<B>,
    rewrite: &ambit_core::route::Rewrite,
    path: &str,
    query: Option<&str>,
    matched_prefix: Option<&str>,
) {
    let mut parts = request.uri().clone().into_parts();
    if let Some(modifier) = &rewrite.path {
        let mut target = modifier.apply(path, matched_prefix);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        match target.parse::<http::uri::PathAndQuery>() {
            Ok(p) => parts.path_and_query = Some(p),
            Err(e) => {
                tracing::info!(path = target, error = %e, "URLRewrite made an invalid path; sent unchanged")
            }
        }
    }
    if let Some(hostname) = &rewrite.hostname {
        if let Ok(value) = HeaderValue::from_str(hostname) {
            // Origin form with the new `Host`: the upstream's version decides
            // later whether it travels as `Host` or `:authority`.
            parts.scheme = None;
            parts.authority = None;
            request.headers_mut().insert(header::HOST, value);
        }
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// Sends a copy of the request `head` (as it goes upstream) to `endpoint`, with the
/// `-shadow` host, on its own task; its response is dropped, its failure logged.
fn send_mirror(
    shared: &Arc<Shared>,
    head: &http::request::Parts,
    endpoint: Endpoint,
    body: Outbound,
    version: HttpVersion,
) {
    let mut copy = Request::from_parts(head_copy(head), Counted::new(body, None, |_, _| {}));
    let mut uri = head.uri.clone().into_parts();
    if let Some(authority) = uri.authority.take() {
        let shadow = ambit_core::route::shadow_authority(authority.as_str());
        uri.authority = shadow.parse().ok();
    }
    if let Some(host) = copy
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        if let Ok(shadow) = HeaderValue::from_str(&ambit_core::route::shadow_authority(host)) {
            copy.headers_mut().insert(header::HOST, shadow);
        }
    }
    if let Ok(uri) = http::Uri::from_parts(uri) {
        *copy.uri_mut() = uri;
    }
    let key = UpstreamKey {
        addr: endpoint.addr,
        identity: endpoint.workload.identity.clone(),
        version,
        hbone: endpoint.workload.is_hbone(),
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(MIRROR_TIMEOUT, shared.upstreams.send(&key, copy)).await {
            Ok(Ok(response)) => {
                let _ = tokio::time::timeout(MIRROR_TIMEOUT, crate::mirror::drain(response)).await;
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %key.addr, error = %e, "mirrored request failed")
            }
            Err(_) => tracing::debug!(upstream = %key.addr, "mirrored request timed out"),
        }
    });
}

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Rewrites a request for an upstream that speaks `version`: HTTP/1.1 takes the
/// origin form with a `Host` header, HTTP/2 the absolute form (`:authority`).
fn translate_version<B>(request: &mut Request<B>, version: HttpVersion) {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    match version {
        HttpVersion::Http1 if request.version() == Version::HTTP_2 => {
            *request.version_mut() = Version::HTTP_11;
            if let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                request.headers_mut().insert(header::HOST, value);
            }
            if let Ok(uri) = path.parse() {
                *request.uri_mut() = uri;
            }
        }
        HttpVersion::Http2 if request.version() != Version::HTTP_2 => {
            *request.version_mut() = Version::HTTP_2;
            if let Some(authority) = authority {
                if let Ok(uri) = http::Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(path)
                    .build()
                {
                    *request.uri_mut() = uri;
                    request.headers_mut().remove(header::HOST);
                }
            }
        }
        _ => {}
    }
}

/// Records an answered request once its response ends: its metrics and its
/// access-log line.
fn finish(
    context: &TunnelContext,
    summary: &RequestSummary,
    response: Response<Body>,
    flag: &str,
    endpoint: Option<&Endpoint>,
    request_bytes: Arc<AtomicU64>,
) -> Response<Body> {
    let metrics = &context.shared.metrics;
    metrics.request(context, summary, response, flag, endpoint, request_bytes)
}

/// Continues the client's W3C trace with a new span for this hop (a new trace when
/// it sent none or a malformed one), and adds `x-request-id` when absent. Returns
/// the trace id, for the access log.
fn propagate_trace(headers: &mut HeaderMap) -> String {
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceParent>().ok());
    let ours = match incoming {
        Some(parent) => parent.child(rand::random()),
        None => TraceParent::from_random(rand::random(), rand::random()),
    };
    let value = ours.header_value();
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("traceparent", v);
    }
    if !headers.contains_key("x-request-id") {
        let id: [u8; 16] = rand::random();
        if let Ok(v) = HeaderValue::from_str(&request_id(id)) {
            headers.insert("x-request-id", v);
        }
    }
    // `00-<trace id>-<span id>-<flags>`
    value.split('-').nth(1).unwrap_or("").to_owned()
}

/// A UUID (version 4) from random bytes.
fn request_id(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// An HTTP request's endpoint: through the HTTPRoutes attached to its Service on its
/// port when there are any (`ambit_core::route`: rule by precedence, backend by
/// weight, then round robin over the backend's endpoints), else the Service's own
/// endpoints; with the rule's timeout (`timeouts`: 504 `UT` when the upstream's
/// response headers take longer). Failing, the local reply and Envoy's response flag: no rule matches →
/// 404 `NR`; the rule has no backend with weight, or its backend Service or port does
/// not exist → 500 `NC`; no healthy endpoint → 503 `UH`.
fn route_request(
    context: &TunnelContext,
    request: &RouteView<'_>,
    host: &str,
) -> Result<Routed, (StatusCode, &'static str, &'static str)> {
    let plain = |endpoint| Routed::Forward {
        endpoint,
        overall: None,
        per_try: None,
        retry: None,
        actions: None,
        fault: Injected::default(),
    };
    let hash = Some(request.headers);
    let BoundTarget::Service { service, port, vip } = &context.target else {
        return route(context, hash).map(plain).map_err(no_endpoint);
    };
    let state = context.shared.model.borrow().state.clone();
    let Some(table) = state.routes_for(service, port.port, context.peer.namespace()) else {
        return route(context, hash).map(plain).map_err(no_endpoint);
    };
    let no_backend = (
        StatusCode::INTERNAL_SERVER_ERROR,
        "no healthy upstream",
        "NC",
    );
    let selected = table
        .select(request)
        .ok_or((StatusCode::NOT_FOUND, "route not found", "NR"))?;
    let rule = selected.rule;
    if let Some(redirect) = &rule.filters.redirect {
        let host = ambit_core::route::split_host_port(host).0;
        let location = redirect.location(&ambit_core::route::RedirectFrom {
            scheme: "http",
            host,
            port: port.port,
            path: request.path,
            query: request.query,
            matched_prefix: selected.matched_prefix,
        });
        return Ok(Routed::Redirect {
            status: StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND),
            location,
            response_headers: rule.filters.response_headers.clone(),
        });
    }
    // The endpoint of `backend` (a Service, on its port or the request's; its subset).
    let endpoint_of = |backend: &ambit_core::route::Backend| {
        let target = state.service(&backend.namespace, &backend.name)?;
        let wanted = backend.port.unwrap_or(port.port);
        let target_port = target.spec.ports.iter().find(|p| p.port == wanted)?;
        let hash = HashInput {
            headers: Some(request.headers),
            client: context.client.ip(),
        };
        let to = PickFor {
            service: target,
            port: target_port,
            vip: *vip,
            subset: backend.subset.as_deref(),
        };
        Some(context.shared.balancer.pick(&state, to, hash, || {
            context.shared.next_turn(&target.key(), target_port.port)
        }))
    };
    let backend = ambit_core::route::pick_backend(rule, rand::random()).ok_or(no_backend)?;
    let endpoint = endpoint_of(backend)
        .ok_or(no_backend)?
        .map_err(no_endpoint)?;
    let actions = (!rule.filters.is_empty()).then(|| {
        Box::new(RuleActions {
            mirrors: rule
                .filters
                .mirrors
                .iter()
                .filter(|m| m.sampled(rand::random()))
                .filter_map(|m| endpoint_of(&m.backend)?.ok())
                .collect(),
            filters: rule.filters.clone(),
            matched_prefix: selected.matched_prefix.map(str::to_owned),
        })
    });
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    Ok(Routed::Forward {
        endpoint,
        overall: ms(rule.request_timeout_ms),
        per_try: ms(rule.backend_timeout_ms),
        retry: rule.retry.as_ref().map(|r| r.policy()),
        actions,
        fault: rule
            .fault
            .as_ref()
            .map(|f| f.decide(rand::random(), rand::random()))
            .unwrap_or_default(),
    })
}

/// How many times a retry picks an endpoint to find one not tried yet (Istio's
/// `host_selection_retry_max_attempts`).
const RETRY_HOST_PICKS: usize = 5;

/// Where a request goes.
enum Routed {
    Forward {
        endpoint: Endpoint,
        /// The rule's `timeouts`: the whole request's, one try's.
        overall: Option<Duration>,
        per_try: Option<Duration>,
        /// The rule's `retry`; `None`: the mesh's default.
        retry: Option<ambit_core::retry::RetryPolicy>,
        /// What the rule's filters ask; `None`: nothing.
        actions: Option<Box<RuleActions>>,
        /// The faults drawn for this request (a VirtualService's `fault`).
        fault: Injected,
    },
    /// A `RequestRedirect`, answered by the waypoint.
    Redirect {
        status: StatusCode,
        location: String,
        response_headers: Option<ambit_core::route::HeaderModifier>,
    },
}

/// A forwarded request's filters, and the endpoints its copies go to.
struct RuleActions {
    filters: ambit_core::route::Filters,
    matched_prefix: Option<String>,
    mirrors: Vec<Endpoint>,
}

/// The local reply for a Service (subset) without an endpoint: no healthy one, or
/// every one ejected → 503 `UH`; a subset its DestinationRule does not define → 503
/// `NC`.
fn no_endpoint(why: NoEndpoint) -> (StatusCode, &'static str, &'static str) {
    match why {
        NoEndpoint::NoHealthy => (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "UH"),
        NoEndpoint::NoSubset => (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "NC"),
    }
}

/// The endpoint a request on this tunnel goes to, without routes (`headers`: the
/// request's, for a consistent hash; `None` for TCP).
fn route(context: &TunnelContext, headers: Option<&HeaderMap>) -> Result<Endpoint, NoEndpoint> {
    match &context.target {
        BoundTarget::Service { service, port, vip } => {
            let state = context.shared.model.borrow().state.clone();
            let hash = HashInput {
                headers,
                client: context.client.ip(),
            };
            let to = PickFor {
                service,
                port,
                vip: *vip,
                subset: None,
            };
            context.shared.balancer.pick(&state, to, hash, || {
                context.shared.next_turn(&service.key(), port.port)
            })
        }
        BoundTarget::Workload { workload, addr } => Ok(Endpoint {
            workload: workload.clone(),
            addr: *addr,
            cluster: None,
        }),
    }
}

/// Decides and relays a plain TCP connection on a bound target to an endpoint.
pub async fn relay_tcp<IO>(context: Arc<TunnelContext>, io: IO, baggage: ambit_core::hbone::Baggage)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let verdict = {
        let state = context.shared.model.borrow().state.clone();
        authz::authorize_tcp(
            &state,
            &context.shared.gateway,
            &context.target,
            &ConnectionInfo {
                peer: &context.peer,
                source: context.client,
                destination: context.destination,
            },
        )
    };
    if let Err(denial) = &verdict.decision {
        tracing::info!(peer = %context.peer, dst = %context.destination, %denial, "TCP connection denied by authorization policy");
        return;
    }
    let Ok(endpoint) = route(&context, None) else {
        tracing::info!(dst = %context.destination, "TCP connection refused: no healthy upstream");
        return;
    };
    let forwarded = ambit_core::hbone::Forwarded {
        for_addr: context.client,
        host: match &context.target {
            BoundTarget::Service { service, .. } => Some(service.hostname.clone()),
            BoundTarget::Workload { .. } => None,
        },
    };
    let relayed = if endpoint.workload.is_hbone() {
        let tunnel = context
            .shared
            .upstreams
            .tunnel(
                endpoint.addr,
                &endpoint.workload.identity,
                forwarded,
                baggage,
            )
            .await;
        match tunnel {
            Ok(crate::upstream::TunnelIo { stream, _open }) => {
                ambit_net::relay::relay_tunnel(io, stream).await
            }
            Err(e) => {
                tracing::info!(dst = %context.destination, upstream = %endpoint.addr, error = %e, "TCP upstream failed");
                return;
            }
        }
    } else {
        match tokio::net::TcpStream::connect(endpoint.addr).await {
            Ok(tcp) => ambit_net::relay::relay_streams(io, tcp).await,
            Err(e) => {
                tracing::info!(dst = %context.destination, upstream = %endpoint.addr, error = %e, "TCP upstream (outside the mesh) failed");
                return;
            }
        }
    };
    tracing::debug!(dst = %context.destination, upstream = %endpoint.addr, bytes_in = relayed.forward, bytes_out = relayed.backward, "TCP connection closed");
}

/// A response the waypoint makes itself.
pub fn local_reply(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::copy_from_slice(body.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// The answer of an injected abort, as Envoy's fault filter gives it: the status
/// with body `fault filter abort`, or for a gRPC status a trailers-only gRPC
/// response (HTTP 200, `grpc-status`).
fn fault_abort(abort: AbortWith) -> Response<Body> {
    const BODY: &str = "fault filter abort";
    match abort {
        AbortWith::Http(status) => local_reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            BODY,
        ),
        AbortWith::Grpc(code) => {
            let mut response = Response::new(Body::default());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert("grpc-message", HeaderValue::from_static(BODY));
            response
        }
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the headers that concern one connection only (RFC 9110 §7.6.1), keeping
/// `Upgrade` and `Connection: upgrade` when switching protocols, and `te: trailers`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrading && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    let trailers_only = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Appends the client's address to `x-forwarded-for`, as Envoy does.
fn append_forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    let ip = client.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// What the access log and the metrics keep of a request, taken before it is sent
/// on.
#[derive(Debug, Clone)]
pub struct RequestSummary {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    /// The client's HTTP version, as Envoy's `%PROTOCOL%`: `HTTP/1.1`, `HTTP/2`.
    pub version: &'static str,
    pub trace_id: String,
    /// `x-request-id`, the client's or the one the waypoint added.
    pub request_id: String,
    /// When the request's headers had arrived.
    pub started: Instant,
}

fn request_summary<B>(request: &Request<B>, trace_id: String, started: Instant) -> RequestSummary {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    RequestSummary {
        method: request.method().to_string(),
        authority,
        path: request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        protocol: if authz::is_grpc(request.headers()) {
            "grpc"
        } else {
            "http"
        },
        version: match request.version() {
            Version::HTTP_09 => "HTTP/0.9",
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        },
        request_id: request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        trace_id,
        started,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn a_trace_continues_with_a_new_span_and_a_request_id_is_added_when_absent() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert("x-request-id", HeaderValue::from_static("mine"));
        let trace = propagate_trace(&mut h);
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        let sent = h["traceparent"].to_str().unwrap();
        assert!(
            sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && sent.ends_with("-01"),
            "{sent}"
        );
        assert!(!sent.contains("b7ad6b7169203331"), "{sent}");
        assert_eq!(h["x-request-id"], "mine");

        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        let trace = propagate_trace(&mut h);
        assert_eq!(trace.len(), 32);
        let id = h["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!((id.len(), &id[14..15]), (36, "4"), "{id}");
    }

    #[test]
    fn the_client_is_appended_to_x_forwarded_for() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.1.0.5:4000".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.1.0.5");
        append_forwarded_for(&mut h, "[fd00::1]:4000".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.1.0.5, fd00::1");
    }
}
