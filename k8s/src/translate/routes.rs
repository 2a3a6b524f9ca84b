//! HTTPRoutes into the model (`MeshConfig.http_routes`), for the waypoints of the
//! Services they are attached to. A route is read by `crate::http_route`; one that
//! fails validation is left out and reported with the field at fault (the publisher
//! keeps its last good version, if it had one; otherwise its parents' requests take the
//! Service's own endpoints). Kept with a warning: a backend
//! Service that does not exist (its share of requests is answered 500 by the waypoint,
//! as the Gateway API asks) and a parent Service that does not exist.
//!
//! A route in the namespace of the Service it is attached to is a producer route, for
//! every client; one in another namespace is a consumer route (GAMMA), for the clients
//! of its own namespace only, who take it instead of the producer's routes (the model
//! keeps the two apart; the waypoint knows a client's namespace from its identity).
//! ServiceEntry parents are left out with a warning.

use crate::http_route::{read, read_grpc, ParentKind};
use ambit_core::model::{HttpRouteSpec, RouteParentSpec, ServiceSpec};

use super::waypoints::Condition;
use super::Skipped;
use crate::resources::{ObjectKey, Resources};

/// A route's status for one of its Service parents (Gateway API `RouteParentStatus`):
/// `Accepted` (`Accepted`; `UnsupportedValue` when it fails validation or asks for what
/// is not served; `NoMatchingParent` when the Service does not exist or has no
/// waypoint) and `ResolvedRefs` (`ResolvedRefs`, or `BackendNotFound`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    /// `Service` or `ServiceEntry`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

/// The routes' status: each HTTPRoute and GRPCRoute (kind, key) with a Service (or
/// ServiceEntry) parent, and its status per parent; each VirtualService's `Accepted`
/// condition (Istio's objects carry conditions, not Gateway API parents).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteStatus {
    pub parents: Vec<(&'static str, ObjectKey, Vec<ParentStatus>)>,
    pub conditions: Vec<(&'static str, ObjectKey, Condition)>,
}

/// What the translation makes of the HTTPRoutes.
#[derive(Debug, Default)]
pub struct Routes {
    pub routes: Vec<HttpRouteSpec>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<Skipped>,
    pub status: RouteStatus,
}

/// The routes of `resources` for `services` (the model's), what was left out, what was
/// kept with a warning, and each route's status per parent.
pub fn translate(resources: &Resources, services: &[ServiceSpec]) -> Routes {
    let (mut routes, mut skipped, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
    let mut status = RouteStatus::default();
    let service = |ns: &str, name: &str| {
        services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
    };
    let exists = |ns: &str, name: &str| service(ns, name).is_some();
    let http = resources
        .http_routes
        .iter()
        .map(|(key, o)| ("HTTPRoute", key, read(key, o)));
    let grpc = resources
        .grpc_routes
        .iter()
        .map(|(key, o)| ("GRPCRoute", key, read_grpc(key, o)));
    for (kind, key, read) in http.chain(grpc) {
        let parent_status =
            |p: &crate::http_route::RouteParent, accepted, resolved_refs| ParentStatus {
                kind: match p.kind {
                    ParentKind::Service => "Service",
                    ParentKind::ServiceEntry => "ServiceEntry",
                },
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                port: p.port,
                accepted,
                resolved_refs,
            };
        let route = match read.route {
            Ok(route) => route,
            Err(reason) => {
                let invalid = Condition::new(false, "UnsupportedValue", reason.clone());
                let unresolved =
                    Condition::new(false, "UnsupportedValue", "the route is not valid");
                let parents: Vec<ParentStatus> = read
                    .parents
                    .iter()
                    .map(|p| parent_status(p, invalid.clone(), unresolved.clone()))
                    .collect();
                if !parents.is_empty() {
                    status.parents.push((kind, key.clone(), parents));
                }
                skipped.push(Skipped {
                    kind,
                    key: key.clone(),
                    reason,
                });
                continue;
            }
        };
        let mut warn = |reason: String| {
            warnings.push(Skipped {
                kind,
                key: key.clone(),
                reason,
            })
        };
        let missing: Vec<String> = route
            .rules
            .iter()
            .flat_map(|r| &r.backends)
            .filter(|b| !exists(&b.namespace, &b.name))
            .map(|b| format!("{}/{}", b.namespace, b.name))
            .collect();
        for b in &missing {
            warn(format!(
                "backend Service {b}: not found (BackendNotFound); its share of requests is answered 500"
            ));
        }
        let missing_mirrors: Vec<String> = route
            .rules
            .iter()
            .flat_map(|r| &r.filters.mirrors)
            .filter(|m| !exists(&m.backend.namespace, &m.backend.name))
            .map(|m| format!("{}/{}", m.backend.namespace, m.backend.name))
            .collect();
        for b in &missing_mirrors {
            warn(format!(
                "mirror backend Service {b}: not found (BackendNotFound); requests are not mirrored to it"
            ));
        }
        let resolved_refs = if missing.is_empty() && missing_mirrors.is_empty() {
            Condition::new(true, "ResolvedRefs", "every backend exists")
        } else {
            let mut says = Vec::new();
            if !missing.is_empty() {
                says.push(format!(
                    "backend Service {} not found; its share of requests is answered 500",
                    missing.join(", ")
                ));
            }
            if !missing_mirrors.is_empty() {
                says.push(format!(
                    "mirror backend Service {} not found; requests are not mirrored to it",
                    missing_mirrors.join(", ")
                ));
            }
            Condition::new(false, "BackendNotFound", says.join("; "))
        };
        let mut parents = Vec::new();
        let mut statuses = Vec::new();
        for p in &read.parents {
            let name = format!("{}/{}", p.namespace, p.name);
            let accepted = if p.kind == ParentKind::ServiceEntry {
                let m = format!("parent ServiceEntry {name}: not served by Ambit yet");
                warn(m.clone());
                Condition::new(false, "UnsupportedValue", m)
            } else {
                // A parent in another namespace: a consumer route, for the clients
                // of the route's namespace only (the model keeps them apart).
                let consumer = if p.namespace == key.namespace {
                    String::new()
                } else {
                    format!(" for clients in namespace {}", key.namespace)
                };
                parents.push(RouteParentSpec {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    port: p.port,
                });
                match service(&p.namespace, &p.name) {
                    None => {
                        let m = format!("parent Service {name}: not found");
                        warn(m.clone());
                        Condition::new(false, "NoMatchingParent", m)
                    }
                    Some(s) => match &s.waypoint {
                        None => Condition::new(
                            false,
                            "NoMatchingParent",
                            format!("Service {name} is not bound to a waypoint: only a waypoint routes by HTTPRoutes, so its requests go to the Service itself"),
                        ),
                        Some(w) => Condition::new(
                            true,
                            "Accepted",
                            format!("routed by waypoint {}/{}{consumer}", w.namespace, w.name),
                        ),
                    },
                }
            };
            statuses.push(parent_status(p, accepted, resolved_refs.clone()));
        }
        if !statuses.is_empty() {
            status.parents.push((kind, key.clone(), statuses));
        }
        if !parents.is_empty() {
            routes.push(HttpRouteSpec { parents, route });
        }
    }
    let mut out = Routes {
        routes,
        skipped,
        warnings,
        status,
    };
    virtual_services(resources, services, &mut out);
    out
}

/// The VirtualServices for mesh traffic (`gateways` absent or naming `mesh`), read
/// by `crate::virtual_service` into the same routing. Their `hosts` are their
/// parents; as with HTTPRoutes, a host of another namespace makes it a consumer route
/// (for the clients of its own namespace), and a host that is not a Service of the
/// cluster is left out with a warning. Where an HTTPRoute (or GRPCRoute) also applies to a
/// Service, the model routes that Service by the HTTPRoute alone, and the
/// VirtualService's condition says so.
fn virtual_services(resources: &Resources, services: &[ServiceSpec], out: &mut Routes) {
    const KIND: &str = "VirtualService";
    let service = |ns: &str, name: &str| {
        services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
    };
    // Which Services an HTTPRoute or GRPCRoute routes, and by which.
    let gateway_api = |ns: &str, name: &str| {
        out.routes
            .iter()
            .filter(|r| !r.route.virtual_service)
            .find(|r| {
                r.parents
                    .iter()
                    .any(|p| p.namespace == ns && p.name == name)
            })
            .map(|r| format!("{} {}/{}", r.route.kind(), r.route.namespace, r.route.name))
    };
    let mut routes = Vec::new();
    let mut conditions = Vec::new();
    let (mut skipped, mut warnings) = (Vec::new(), Vec::new());
    for (key, vs) in &resources.virtual_services {
        let read = crate::virtual_service::read(key, vs);
        if !read.for_mesh {
            // For ingress gateways, which Ambit does not serve; not ours to report on.
            continue;
        }
        let route = match read.route {
            Ok(route) => route,
            Err(reason) => {
                conditions.push((
                    KIND,
                    key.clone(),
                    Condition::new(false, "UnsupportedValue", reason.clone()),
                ));
                skipped.push(Skipped {
                    kind: KIND,
                    key: key.clone(),
                    reason,
                });
                continue;
            }
        };
        let mut warn = |reason: String| {
            warnings.push(Skipped {
                kind: KIND,
                key: key.clone(),
                reason,
            })
        };
        let mut says = Vec::new();
        for b in route.rules.iter().flat_map(|r| r.referenced()) {
            if service(&b.namespace, &b.name).is_none() {
                let m = format!(
                    "destination Service {}/{}: not found; its share of requests is answered 500",
                    b.namespace, b.name
                );
                warn(m.clone());
                says.push(m);
            }
        }
        let mut parents = Vec::new();
        let mut routed_by = Vec::new();
        for host in &read.hosts {
            let (ns, name) = match host {
                crate::virtual_service::VsHost::Service { namespace, name } => (namespace, name),
                crate::virtual_service::VsHost::Other(h) => {
                    let m = format!(
                        "host {h:?}: not a Service of this cluster (ServiceEntry hosts are not routed by Ambit yet)"
                    );
                    warn(m.clone());
                    says.push(m);
                    continue;
                }
            };
            let full = format!("{ns}/{name}");
            let consumer = if *ns == key.namespace {
                String::new()
            } else {
                format!(" for clients in namespace {}", key.namespace)
            };
            parents.push(RouteParentSpec {
                namespace: ns.clone(),
                name: name.clone(),
                port: None,
            });
            match service(ns, name).map(|s| &s.waypoint) {
                None => {
                    let m = format!("host Service {full}: not found");
                    warn(m.clone());
                    says.push(m);
                }
                Some(None) => says.push(format!(
                    "Service {full} is not bound to a waypoint: only a waypoint routes by VirtualServices, so its requests go to the Service itself"
                )),
                Some(Some(w)) => match gateway_api(ns, name) {
                    Some(by) => says.push(format!(
                        "{by} also applies to Service {full}; the HTTPRoute wins there (as in Istio's waypoints) and this VirtualService is not used for it"
                    )),
                    None => routed_by.push(format!(
                        "{full} by waypoint {}/{}{consumer}",
                        w.namespace, w.name
                    )),
                },
            }
        }
        let condition = if says.is_empty() {
            Condition::new(
                true,
                "Accepted",
                format!("routing {}", routed_by.join(", ")),
            )
        } else if routed_by.is_empty() {
            Condition::new(false, "NotRouted", says.join("; "))
        } else {
            Condition::new(
                true,
                "PartiallyAccepted",
                format!("routing {}; {}", routed_by.join(", "), says.join("; ")),
            )
        };
        conditions.push((KIND, key.clone(), condition));
        if !parents.is_empty() {
            routes.push(HttpRouteSpec { parents, route });
        }
    }
    out.routes.extend(routes);
    out.skipped.extend(skipped);
    out.warnings.extend(warnings);
    out.status.conditions.extend(conditions);
}
