//! What `local status` shows of the routes: each HTTPRoute's and GRPCRoute's status per
//! Service parent (`Accepted`, `ResolvedRefs`), each VirtualService's `Accepted`
//! condition and each DestinationRule's `WaypointAccepted` (in the accepted column), as
//! the local control plane writes them to its status file (the stand-in
//! for the status subresources a cluster would hold: `ambit-control --status-file`).

use std::path::Path;

use serde_yaml_ng::Value;

/// One row of the routes table, and the messages of its conditions that are not
/// `True`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    /// `HTTPRoute shop/canary`.
    pub route: String,
    /// `Service shop/reviews`, or `-` for a VirtualService (its hosts are its parents)
    /// or a DestinationRule.
    pub parent: String,
    pub accepted: String,
    pub resolved_refs: String,
    /// `Accepted=False (NoMatchingParent): ...` for each condition not `True`.
    pub problems: Vec<String>,
}

/// The route rows of the status file at `path`; none when it does not exist yet.
pub fn read(path: &Path) -> anyhow::Result<Vec<RouteRow>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let objects: Vec<Value> =
        serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(rows(&objects))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `True`, or `False (Reason)`; and the problem line when not `True`.
fn condition(route: &str, conditions: &Value, type_: &str) -> (String, Option<String>) {
    let found = conditions
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| str_of(c, "type") == type_);
    match found {
        None => ("-".to_owned(), None),
        Some(c) if str_of(c, "status") == "True" => ("True".to_owned(), None),
        Some(c) => {
            let (status, reason) = (str_of(c, "status"), str_of(c, "reason"));
            (
                format!("{status} ({reason})"),
                Some(format!(
                    "{route}: {type_}={status} ({reason}): {}",
                    str_of(c, "message")
                )),
            )
        }
    }
}

fn rows(objects: &[Value]) -> Vec<RouteRow> {
    let mut out = Vec::new();
    for o in objects {
        let kind = str_of(o, "kind");
        let meta = o.get("metadata").cloned().unwrap_or(Value::Null);
        let route = format!(
            "{kind} {}/{}",
            str_of(&meta, "namespace"),
            str_of(&meta, "name")
        );
        let status = o.get("status").cloned().unwrap_or(Value::Null);
        match kind {
            "HTTPRoute" | "GRPCRoute" => {
                for p in status
                    .get("parents")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    let r = p.get("parentRef").cloned().unwrap_or(Value::Null);
                    let mut parent = format!(
                        "{} {}/{}",
                        str_of(&r, "kind"),
                        str_of(&r, "namespace"),
                        str_of(&r, "name")
                    );
                    if let Some(port) = r.get("port").and_then(Value::as_u64) {
                        parent.push_str(&format!(":{port}"));
                    }
                    let conditions = p.get("conditions").cloned().unwrap_or(Value::Null);
                    let (accepted, a) = condition(&route, &conditions, "Accepted");
                    let (resolved_refs, b) = condition(&route, &conditions, "ResolvedRefs");
                    out.push(RouteRow {
                        route: route.clone(),
                        parent,
                        accepted,
                        resolved_refs,
                        problems: a.into_iter().chain(b).collect(),
                    });
                }
            }
            "VirtualService" | "DestinationRule" => {
                let conditions = status.get("conditions").cloned().unwrap_or(Value::Null);
                let type_ = if kind == "VirtualService" {
                    "Accepted"
                } else {
                    "WaypointAccepted"
                };
                let (accepted, a) = condition(&route, &conditions, type_);
                out.push(RouteRow {
                    route,
                    parent: "-".to_owned(),
                    accepted,
                    resolved_refs: "-".to_owned(),
                    problems: a.into_iter().collect(),
                });
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn route_parents_and_virtual_service_conditions_become_rows() {
        let objects: Vec<Value> = serde_yaml_ng::from_str(
            r#"
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: canary, namespace: shop}
  status:
    parents:
    - parentRef: {group: "", kind: Service, namespace: shop, name: reviews, port: 9080}
      conditions:
      - {type: Accepted, status: "True", reason: Accepted, message: routed}
      - {type: ResolvedRefs, status: "False", reason: BackendNotFound, message: "backend Service shop/ghost not found"}
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata: {name: reviews, namespace: shop}
  status:
    conditions:
    - {type: Accepted, status: "True", reason: Accepted, message: routing}
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: reviews-again, namespace: shop}
  status:
    conditions:
    - {type: WaypointAccepted, status: "False", reason: Overridden, message: "DestinationRule shop/reviews for Service shop/reviews is older and applies instead"}
- apiVersion: v1
  kind: Service
  metadata: {name: reviews, namespace: shop}
  status: {conditions: []}
"#,
        )
        .unwrap();
        let rows = rows(&objects);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].route, "DestinationRule shop/reviews-again");
        assert_eq!(rows[2].accepted, "False (Overridden)");
        assert_eq!(
            rows[2].problems,
            [
                "DestinationRule shop/reviews-again: WaypointAccepted=False (Overridden): \
              DestinationRule shop/reviews for Service shop/reviews is older and applies instead"
            ]
        );
        assert_eq!(rows[0].parent, "Service shop/reviews:9080");
        assert_eq!(rows[0].accepted, "True");
        assert_eq!(rows[0].resolved_refs, "False (BackendNotFound)");
        assert_eq!(
            rows[0].problems,
            ["HTTPRoute shop/canary: ResolvedRefs=False (BackendNotFound): backend Service shop/ghost not found"]
        );
        assert_eq!(rows[1].route, "VirtualService shop/reviews");
        assert_eq!(
            (rows[1].accepted.as_str(), rows[1].problems.len()),
            ("True", 0)
        );
    }

    #[test]
    fn no_file_yet_is_no_rows_and_a_bad_file_names_itself() {
        let dir = std::env::temp_dir().join(format!("ambitctl-routes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(read(&dir.join("absent.yaml")).unwrap().is_empty());
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "{ not: [yaml").unwrap();
        let e = read(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.yaml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
