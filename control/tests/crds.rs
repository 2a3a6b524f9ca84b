//! The CRDs in `deploy/crds/` against what ambit-control reads:
//! - each kind is served in v1 (stored) and v1beta1 with one schema, a status
//!   subresource and its printer columns;
//! - every field the schema allows is a field the control plane reads (a spec setting
//!   every one of them parses; a field the control plane does not know fails the
//!   policy closed, so a schema field it did not read would do that to valid YAML);
//! - the enums are the values the control plane accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ambit_control::resources::ObjectKey;
use ambit_control::translate::{authz, peer_authn};
use serde_json::{json, Map, Value};

fn crds() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/security-istio-io.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
            value.apply_merge().unwrap();
            serde_json::to_value(value).unwrap()
        })
        .collect()
}

fn crd(kind: &str) -> Value {
    crds()
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn spec_schema(crd: &Value) -> Value {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// A value for `schema` setting every property it allows.
fn everything(name: &str, schema: &Value) -> Value {
    if let Some(values) = schema["enum"].as_array() {
        return values[values.len() - 1].clone();
    }
    match schema["type"].as_str() {
        Some("object") => {
            let mut object = Map::new();
            if let Some(properties) = schema["properties"].as_object() {
                for (key, property) in properties {
                    object.insert(key.clone(), everything(key, property));
                }
            }
            if schema
                .get("additionalProperties")
                .is_some_and(Value::is_object)
            {
                let key = if name == "portLevelMtls" {
                    "8080"
                } else {
                    "app"
                };
                object.insert(key.into(), everything(key, &schema["additionalProperties"]));
            }
            Value::Object(object)
        }
        Some("array") => json!([everything(name, &schema["items"])]),
        Some("boolean") => json!(true),
        Some("integer") => json!(1),
        Some("number") => json!(12.5),
        _ => json!(match name {
            "ports" | "notPorts" => "8080",
            "serviceAccounts" | "notServiceAccounts" => "ns/sa",
            "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks" => "10.0.0.0/8",
            "key" => "source.ip",
            "interval" | "baseEjectionTime" | "ttl" => "1s",
            "path" => "/",
            "values" | "notValues" => "10.0.0.1",
            _ => "x",
        }),
    }
}

#[test]
fn every_kind_is_served_in_v1_and_v1beta1_with_status_and_columns() {
    for (kind, short, columns) in [
        ("AuthorizationPolicy", "ap", vec!["Action", "Age"]),
        ("PeerAuthentication", "pa", vec!["Mode", "Age"]),
        ("RequestAuthentication", "ra", vec!["Age"]),
    ] {
        let crd = crd(kind);
        assert_eq!(crd["spec"]["group"], "security.istio.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert!(crd["spec"]["names"]["shortNames"]
            .as_array()
            .unwrap()
            .contains(&json!(short)));
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let names: Vec<&str> = versions
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["v1", "v1beta1"], "{kind}");
        let stored: Vec<bool> = versions
            .iter()
            .map(|v| v["storage"].as_bool().unwrap())
            .collect();
        assert_eq!(stored, [true, false], "{kind}: v1 is stored");
        for v in versions {
            assert_eq!(v["served"], true, "{kind}");
            assert_eq!(v["subresources"]["status"], json!({}), "{kind}");
            let got: Vec<&str> = v["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            assert_eq!(got, columns, "{kind}");
            assert_eq!(v["schema"], versions[0]["schema"], "{kind}: one schema");
        }
    }
}

#[test]
fn every_authorization_policy_field_in_the_schema_is_read_by_the_control_plane() {
    let spec = everything("spec", &spec_schema(&crd("AuthorizationPolicy")));
    // Spot-check that the generator reached the leaves.
    assert_eq!(
        spec["rules"][0]["from"][0]["source"]["notTrustDomains"],
        json!(["x"])
    );
    assert_eq!(
        spec["rules"][0]["to"][0]["operation"]["notPorts"],
        json!(["8080"])
    );
    let t = authz::translate_policy(&ObjectKey::new("shop", "p"), None, &spec, "istio-system");
    let message = &t.acceptance.message;
    assert!(!message.contains("unknown field"), "{message}");
    assert!(!message.contains("invalid type"), "{message}");
    // What the schema does not have, the control plane refuses (and fails closed).
    let t = authz::translate_policy(
        &ObjectKey::new("shop", "p"),
        None,
        &json!({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}),
        "istio-system",
    );
    assert!(
        t.acceptance.message.contains("unknown field"),
        "{:?}",
        t.acceptance
    );
}

#[test]
fn every_peer_authentication_field_in_the_schema_is_read_by_the_control_plane() {
    let spec = everything("spec", &spec_schema(&crd("PeerAuthentication")));
    assert_eq!(spec["portLevelMtls"]["8080"]["mode"], "STRICT");
    let read = peer_authn::read(&ObjectKey::new("shop", "p"), "", &spec);
    assert_eq!(read.acceptance.reason, "Accepted", "{:?}", read.acceptance);
}

#[test]
fn the_enums_are_what_the_control_plane_accepts() {
    let ap = spec_schema(&crd("AuthorizationPolicy"));
    for action in ap["properties"]["action"]["enum"].as_array().unwrap() {
        let t = authz::translate_policy(
            &ObjectKey::new("shop", "p"),
            None,
            &json!({"action": action, "rules": [{}]}),
            "istio-system",
        );
        assert_ne!(
            t.acceptance.reason, "InvalidValue",
            "{action}: {:?}",
            t.acceptance
        );
    }
    let pa = spec_schema(&crd("PeerAuthentication"));
    for mode in pa["properties"]["mtls"]["properties"]["mode"]["enum"]
        .as_array()
        .unwrap()
    {
        let read = peer_authn::read(
            &ObjectKey::new("shop", "p"),
            "",
            &json!({"mtls": {"mode": mode}}),
        );
        assert_ne!(read.acceptance.reason, "InvalidValue", "{mode}");
    }
}

/// The Gateway API CRDs, and the objects after them in the same file.
fn gateway_api() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/gateway-networking-k8s-io.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
            serde_json::to_value(value).unwrap()
        })
        .collect()
}

#[test]
fn the_gateway_api_file_is_its_source_expanded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/src");
    let text = std::fs::read_to_string(dir.join("gateway-api.source.yaml")).unwrap();
    let mut source: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    source.apply_merge().unwrap();
    // Merge keys inside list items are applied per item.
    let mut items: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_value(source).unwrap();
    for item in &mut items {
        item.apply_merge().unwrap();
    }
    let source: Vec<Value> = items
        .into_iter()
        .map(|v| serde_json::to_value(v).unwrap())
        .collect();
    assert_eq!(
        source,
        gateway_api(),
        "deploy/crds/gateway-networking-k8s-io.yaml is stale: run python3 deploy/crds/src/expand.py"
    );
}

#[test]
fn the_gateway_api_kinds_are_served_in_v1_and_a_gateway_parses_as_the_control_plane_reads_it() {
    let docs = gateway_api();
    for (kind, versions, scope) in [
        ("GatewayClass", vec!["v1", "v1beta1"], "Cluster"),
        ("Gateway", vec!["v1", "v1beta1"], "Namespaced"),
        ("HTTPRoute", vec!["v1", "v1beta1"], "Namespaced"),
        ("GRPCRoute", vec!["v1"], "Namespaced"),
    ] {
        let crd = docs
            .iter()
            .find(|d| d["kind"] == "CustomResourceDefinition" && d["spec"]["names"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        assert_eq!(crd["spec"]["group"], "gateway.networking.k8s.io");
        assert_eq!(crd["spec"]["scope"], scope, "{kind}");
        let served: Vec<&str> = crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(served, versions, "{kind}");
        assert_eq!(
            crd["spec"]["versions"][0]["storage"], true,
            "{kind}: v1 stored"
        );
    }
    // Only CRDs: the class istio-waypoint is applied by the control plane, as istiod
    // does (a custom object beside its CRD cannot be mapped before the CRD is
    // established, so `kubectl apply` and Helm would fail on a first install).
    assert!(
        docs.iter().all(|d| d["kind"] == "CustomResourceDefinition"),
        "only CRDs in the file"
    );
    // A listener's enum is what the control plane reads.
    let gateway = docs
        .iter()
        .find(|d| d["spec"]["names"]["kind"] == "Gateway")
        .unwrap();
    let listener = &gateway["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        ["spec"]["properties"]["listeners"]["items"]["properties"];
    assert_eq!(
        listener["allowedRoutes"]["properties"]["namespaces"]["properties"]["from"]["enum"],
        json!(["All", "Selector", "Same"])
    );
    let parsed: ambit_control::gateway::Gateway = serde_json::from_value(json!({
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
            {"name": "mesh", "port": 15008, "protocol": "HBONE",
             "allowedRoutes": {"namespaces": {"from": "All"}}}]},
    }))
    .unwrap();
    assert!(ambit_control::gateway::waypoint_listener(&parsed).is_ok());
}

/// The networking.istio.io CRDs (VirtualService, ServiceEntry), merge keys applied.
fn networking() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/networking-istio-io.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
            value.apply_merge().unwrap();
            let mut value = serde_json::to_value(value).unwrap();
            // Merge keys inside the versions list.
            if let Some(versions) = value["spec"]["versions"].as_array_mut() {
                for v in versions {
                    let mut y: serde_yaml_ng::Value = serde_json::from_value(v.clone()).unwrap();
                    y.apply_merge().unwrap();
                    *v = serde_json::to_value(y).unwrap();
                }
            }
            value
        })
        .collect()
}

#[test]
fn virtual_services_and_service_entries_are_served_in_v1_v1beta1_and_v1alpha3() {
    for (kind, short) in [("VirtualService", "vs"), ("ServiceEntry", "se")] {
        let crd = networking()
            .into_iter()
            .find(|c| c["spec"]["names"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        assert_eq!(crd["spec"]["group"], "networking.istio.io");
        assert!(crd["spec"]["names"]["shortNames"]
            .as_array()
            .unwrap()
            .contains(&json!(short)));
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let names: Vec<&str> = versions
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["v1", "v1beta1", "v1alpha3"], "{kind}");
        for v in versions {
            assert_eq!(v["served"], true, "{kind}");
            assert_eq!(v["storage"], v["name"] == "v1", "{kind}");
            assert_eq!(v["subresources"]["status"], json!({}), "{kind}");
            assert_eq!(v["schema"], versions[0]["schema"], "{kind}: one schema");
        }
    }
}

#[test]
fn every_virtual_service_field_in_the_schema_is_read_by_the_control_plane() {
    let crd = networking()
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == "VirtualService")
        .unwrap();
    let mut spec = everything("spec", &spec_schema(&crd));
    // What the schema's own rules (one of a StringMatch, route or redirect, one abort
    // status) and the semantic checks allow together.
    let http = &mut spec["http"][0];
    http.as_object_mut().unwrap().remove("redirect");
    for m in ["uri", "method", "authority"] {
        http["match"][0][m] = json!({"exact": "/x"});
    }
    http["match"][0]["headers"]["app"] = json!({"prefix": "x"});
    http["match"][0]["queryParams"]["app"] = json!({"regex": "x"});
    http["match"][0]["ignoreUriCase"] = json!(false);
    http["match"][0]["gateways"] = json!(["mesh"]);
    http["fault"]["abort"]
        .as_object_mut()
        .unwrap()
        .remove("grpcStatus");
    http["fault"]["abort"]["httpStatus"] = json!(503);
    for d in ["timeout", "perTryTimeout", "fixedDelay"] {
        let target = match d {
            "timeout" => &mut http["timeout"],
            "perTryTimeout" => &mut http["retries"]["perTryTimeout"],
            _ => &mut http["fault"]["delay"]["fixedDelay"],
        };
        *target = json!("1s");
    }
    http["retries"]["retryOn"] = json!("5xx");
    http["rewrite"] = json!({"uri": "/y", "authority": "x"});
    spec["hosts"] = json!(["reviews"]);
    spec["gateways"] = json!(["mesh"]);
    let vs = ambit_k8s::virtual_service::VirtualService {
        metadata: Default::default(),
        spec,
    };
    let read = ambit_k8s::virtual_service::read(&ObjectKey::new("shop", "x"), &vs);
    read.route.unwrap();
}

fn destination_rule_crd() -> Value {
    networking()
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == "DestinationRule")
        .expect("no CRD for DestinationRule")
}

#[test]
fn destination_rule_is_served_in_v1_and_v1beta1_with_one_schema_status_and_columns() {
    let crd = destination_rule_crd();
    assert_eq!(crd["spec"]["group"], "networking.istio.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["dr"]));
    let versions = crd["spec"]["versions"].as_array().unwrap();
    let names: Vec<(&str, bool)> = versions
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["storage"].as_bool().unwrap()))
        .collect();
    assert_eq!(names, [("v1", true), ("v1beta1", false)]);
    for v in versions {
        assert_eq!(v["served"], true);
        assert_eq!(v["subresources"]["status"], json!({}));
        assert_eq!(v["schema"], versions[0]["schema"], "one schema");
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Host", "Age"]);
    }
    // The served versions are the ones the control plane reads.
    let read: Vec<String> = ambit_k8s::destination_rule::API_VERSIONS
        .iter()
        .map(|v| v.trim_start_matches("networking.istio.io/").to_owned())
        .collect();
    assert_eq!(read, ["v1", "v1beta1"]);
}

#[test]
fn every_destination_rule_field_in_the_schema_is_read_by_the_control_plane() {
    let spec = everything("spec", &spec_schema(&destination_rule_crd()));
    // Spot-check that the generator reached the leaves.
    assert_eq!(
        spec["subsets"][0]["trafficPolicy"]["portLevelSettings"][0]["outlierDetection"]
            ["baseEjectionTime"],
        "1s"
    );
    assert_eq!(spec["subsets"][0]["labels"]["app"], "x");
    // consistentHash takes one key (maxProperties: 1): each in turn.
    let hash_keys = ["httpHeaderName", "httpCookie", "useSourceIp"];
    for keep in hash_keys {
        fn each_hash(v: &mut Value, keep: &str, keys: &[&str]) {
            match v {
                Value::Object(o) => {
                    if let Some(Value::Object(h)) = o.get_mut("consistentHash") {
                        h.retain(|k, _| k == keep || !keys.contains(&k.as_str()));
                    }
                    o.values_mut().for_each(|v| each_hash(v, keep, keys));
                }
                Value::Array(a) => a.iter_mut().for_each(|v| each_hash(v, keep, keys)),
                _ => {}
            }
        }
        let mut one = spec.clone();
        each_hash(&mut one, keep, &hash_keys);
        // ... and simple or consistentHash, not both.
        fn no_simple(v: &mut Value) {
            match v {
                Value::Object(o) => {
                    if let Some(Value::Object(lb)) = o.get_mut("loadBalancer") {
                        lb.remove("simple");
                    }
                    o.values_mut().for_each(no_simple);
                }
                Value::Array(a) => a.iter_mut().for_each(no_simple),
                _ => {}
            }
        }
        no_simple(&mut one);
        let read =
            ambit_k8s::destination_rule::read_spec(&ObjectKey::new("shop", "reviews"), 0, &one);
        assert!(read.is_ok(), "{keep}: {read:?}");
    }
    // What the schema does not have, the control plane refuses.
    let spec = json!({"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "1s"}}}});
    let e =
        ambit_k8s::destination_rule::read_spec(&ObjectKey::new("shop", "r"), 0, &spec).unwrap_err();
    assert!(e.contains("unknown or not supported"), "{e}");
}

#[test]
fn the_destination_rule_enums_are_what_the_control_plane_accepts() {
    let schema = spec_schema(&destination_rule_crd());
    let lb = &schema["properties"]["trafficPolicy"]["properties"]["loadBalancer"]["properties"];
    for simple in lb["simple"]["enum"].as_array().unwrap() {
        let read = ambit_k8s::destination_rule::read_spec(
            &ObjectKey::new("shop", "r"),
            0,
            &json!({"host": "r", "trafficPolicy": {"loadBalancer": {"simple": simple}}}),
        );
        assert!(read.is_ok(), "{simple}: {read:?}");
    }
}
