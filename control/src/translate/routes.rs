//! HTTPRoutes into the model (`MeshConfig.http_routes`), for the waypoints of the
//! Services they are attached to. A route is read by `ambit_k8s::http_route`; one that
//! fails validation is left out and reported with the field at fault (the publisher
//! keeps its last good version, if it had one; otherwise its parents' requests take the
//! Service's own endpoints). Kept with a warning: a backend
//! Service that does not exist (its share of requests is answered 500 by the waypoint,
//! as the Gateway API asks) and a parent Service that does not exist.
//!
//! Only producer routes are served: a route in the namespace of the Service it is
//! attached to. A parent in another namespace (a GAMMA consumer route, which applies
//! only to clients in the route's namespace) is left out with a warning, as are
//! ServiceEntry parents, until the waypoint can tell clients' namespaces apart there.

use ambit_core::model::{HttpRouteSpec, RouteParentSpec, ServiceSpec};
use ambit_k8s::http_route::{read, ParentKind};

use super::Skipped;
use crate::resources::Resources;

/// The routes of `resources` for `services` (the model's), what was left out, and
/// what was kept with a warning.
pub fn translate(
    resources: &Resources,
    services: &[ServiceSpec],
) -> (Vec<HttpRouteSpec>, Vec<Skipped>, Vec<Skipped>) {
    let (mut routes, mut skipped, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
    let exists =
        |ns: &str, name: &str| services.iter().any(|s| s.namespace == ns && s.name == name);
    for (key, object) in &resources.http_routes {
        let read = read(key, object);
        let route = match read.route {
            Ok(route) => route,
            Err(reason) => {
                skipped.push(Skipped {
                    kind: "HTTPRoute",
                    key: key.clone(),
                    reason,
                });
                continue;
            }
        };
        let mut warn = |reason: String| {
            warnings.push(Skipped {
                kind: "HTTPRoute",
                key: key.clone(),
                reason,
            })
        };
        let mut parents = Vec::new();
        for p in read.parents {
            let name = format!("{}/{}", p.namespace, p.name);
            if p.kind == ParentKind::ServiceEntry {
                warn(format!(
                    "parent ServiceEntry {name}: not served by Ambit yet"
                ));
            } else if p.namespace != key.namespace {
                warn(format!(
                    "parent Service {name}: a route for a Service of another namespace (a consumer route) is not served by Ambit yet"
                ));
            } else {
                if !exists(&p.namespace, &p.name) {
                    warn(format!("parent Service {name}: not found"));
                }
                parents.push(RouteParentSpec {
                    namespace: p.namespace,
                    name: p.name,
                    port: p.port,
                });
            }
        }
        if parents.is_empty() {
            continue;
        }
        for b in route.rules.iter().flat_map(|r| &r.backends) {
            if !exists(&b.namespace, &b.name) {
                warn(format!(
                    "backend Service {}/{}: not found (BackendNotFound); its share of requests is answered 500",
                    b.namespace, b.name
                ));
            }
        }
        routes.push(HttpRouteSpec { parents, route });
    }
    (routes, skipped, warnings)
}
