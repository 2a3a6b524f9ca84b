//! Gateway API's `Gateway` and `GatewayClass` (`gateway.networking.k8s.io`, v1; v1beta1
//! reads the same), as far as the control plane reads them: what declares a waypoint.
//! Unknown fields are ignored, as the API server would keep them; a field of the wrong
//! type makes the object unreadable, which the reader reports by name and line
//! ([`crate::read`]) rather than dropping it silently.
//!
//! A Gateway is a waypoint when its class is [`WAYPOINT_CLASS`]; [`waypoint_listener`]
//! says whether its listeners have the one shape a waypoint serves.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "gateway.networking.k8s.io";
/// The versions a Gateway or GatewayClass may be written in (one schema; v1 is stored).
pub const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// The GatewayClass of waypoints, and its controller (Istio's names).
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const WAYPOINT_CONTROLLER: &str = "istio.io/mesh-controller";
/// The label that says which traffic a waypoint serves: on the Gateway, else on its
/// class; `service` when neither has it.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The one listener a waypoint has.
pub const WAYPOINT_LISTENER_NAME: &str = "mesh";
pub const WAYPOINT_LISTENER_PROTOCOL: &str = "HBONE";
/// Istio's message for any other listener shape (reason `UnsupportedProtocol`).
pub const UNSUPPORTED_LISTENER_MESSAGE: &str =
    "Expected a single listener on port 15008 with protocol HBONE";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
    /// int32 in the API; the schema bounds it to 1..=65535.
    #[serde(default)]
    pub port: i32,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupKind {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayClass {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewayClassSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    #[serde(default)]
    pub controller_name: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// Which namespaces a listener admits bindings from (`allowedRoutes.namespaces`).
#[derive(Debug, Clone, PartialEq)]
pub enum AdmittedNamespaces<'a> {
    /// Only the Gateway's own (`Same`, the default).
    Same,
    All,
    /// Those whose labels the selector matches.
    Selector(&'a LabelSelector),
}

impl Listener {
    /// `allowedRoutes.namespaces.from`; an unknown value or a `Selector` without a
    /// selector admits only the Gateway's own namespace (the narrowest reading).
    pub fn admitted_namespaces(&self) -> AdmittedNamespaces<'_> {
        let namespaces = self
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref());
        match namespaces.map(|n| (n.from.as_deref(), n.selector.as_ref())) {
            Some((Some("All"), _)) => AdmittedNamespaces::All,
            Some((Some("Selector"), Some(selector))) => AdmittedNamespaces::Selector(selector),
            _ => AdmittedNamespaces::Same,
        }
    }
}

/// The Gateway's waypoint listener, or Istio's reason it has none: exactly one
/// listener, port 15008, protocol HBONE (its name is not checked, as in Istio).
pub fn waypoint_listener(gateway: &Gateway) -> Result<&Listener, &'static str> {
    match gateway.spec.listeners.as_slice() {
        [l] if l.port == i32::from(ambit_core::hbone::HBONE_PORT)
            && l.protocol == WAYPOINT_LISTENER_PROTOCOL =>
        {
            Ok(l)
        }
        _ => Err(UNSUPPORTED_LISTENER_MESSAGE),
    }
}

/// Whether `labels` match `selector` (matchLabels and matchExpressions `In`,
/// `NotIn`, `Exists`, `DoesNotExist`); an unknown operator matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let exact = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    exact && expressions
}

resource!(Gateway, GROUP, "Gateway", "gateways");
resource!(
    GatewayClass,
    GROUP,
    "GatewayClass",
    "gatewayclasses",
    k8s_openapi::ClusterResourceScope
);

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(yaml: &str) -> Gateway {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn only_one_hbone_listener_on_15008_is_a_waypoint() {
        let cases = [
            ("[{name: mesh, port: 15008, protocol: HBONE}]", true),
            // The name is not part of the shape.
            ("[{name: other, port: 15008, protocol: HBONE}]", true),
            ("[{name: mesh, port: 15009, protocol: HBONE}]", false),
            ("[{name: mesh, port: 15008, protocol: HTTP}]", false),
            ("[{name: mesh, port: 15008, protocol: hbone}]", false),
            (
                "[{name: mesh, port: 15008, protocol: HBONE}, {name: b, port: 80, protocol: HTTP}]",
                false,
            ),
            ("[]", false),
        ];
        for (listeners, want) in cases {
            let g = gateway(&format!(
                "metadata: {{name: w}}\nspec: {{gatewayClassName: istio-waypoint, listeners: {listeners}}}"
            ));
            assert_eq!(waypoint_listener(&g).is_ok(), want, "{listeners}");
        }
    }

    #[test]
    fn allowed_routes_default_to_the_gateways_own_namespace() {
        let listener = |yaml: &str| -> Listener { serde_yaml_ng::from_str(yaml).unwrap() };
        let base = "{name: mesh, port: 15008, protocol: HBONE";
        assert_eq!(
            listener(&format!("{base}}}")).admitted_namespaces(),
            AdmittedNamespaces::Same
        );
        assert_eq!(
            listener(&format!(
                "{base}, allowedRoutes: {{namespaces: {{from: All}}}}}}"
            ))
            .admitted_namespaces(),
            AdmittedNamespaces::All
        );
        // Selector without a selector: the narrowest reading.
        assert_eq!(
            listener(&format!(
                "{base}, allowedRoutes: {{namespaces: {{from: Selector}}}}}}"
            ))
            .admitted_namespaces(),
            AdmittedNamespaces::Same
        );
        let l = listener(&format!(
            "{base}, allowedRoutes: {{namespaces: {{from: Selector, selector: {{matchLabels: {{team: a}}}}}}}}}}"
        ));
        let AdmittedNamespaces::Selector(s) = l.admitted_namespaces() else {
            panic!("not a selector")
        };
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        assert!(selector_matches(s, &labels(&[("team", "a"), ("x", "y")])));
        assert!(!selector_matches(s, &labels(&[("team", "b")])));
    }

    #[test]
    fn selector_expressions() {
        let s: LabelSelector = serde_yaml_ng::from_str(
            "matchExpressions: [{key: env, operator: In, values: [prod, stage]}, {key: legacy, operator: DoesNotExist}]",
        )
        .unwrap();
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        assert!(selector_matches(&s, &l(&[("env", "prod")])));
        assert!(!selector_matches(&s, &l(&[("env", "dev")])));
        assert!(!selector_matches(
            &s,
            &l(&[("env", "prod"), ("legacy", "1")])
        ));
        let odd: LabelSelector =
            serde_yaml_ng::from_str("matchExpressions: [{key: env, operator: Near}]").unwrap();
        assert!(!selector_matches(&odd, &l(&[("env", "prod")])));
    }
}
