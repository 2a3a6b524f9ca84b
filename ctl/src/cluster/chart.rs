//! The objects `ambitctl install` applies: the Helm chart's default rendering
//! (`deploy/ambit.yaml`, embedded) changed by `--set key=value` as the chart's templates
//! would change it (docs/decisions/0016-ambitctl-renders-from-the-chart-default.md).
//!
//! Keys are the chart's values (`deploy/helm/ambit/values.yaml`, embedded): a key that
//! is not one is refused with the list of those that are. Values are typed as Helm's
//! `--set` types them (`true`/`false`, integers, else strings) and then checked against
//! what the key holds. `scripts/manifests.py check` renders the chart with Helm for a
//! set of `--set` lists and compares with `ambitctl manifest generate`, so this file
//! and the templates cannot drift apart.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

/// The chart rendered with its defaults (release `ambit`, namespace `ambit-system`).
const DEFAULT_RENDER: &str = include_str!("../../../deploy/ambit.yaml");
/// The chart's values, with their defaults.
const VALUES: &str = include_str!("../../../deploy/helm/ambit/values.yaml");
/// The chart's appVersion: the images' tag when `image.tag` is empty.
const CHART: &str = include_str!("../../../deploy/helm/ambit/Chart.yaml");

/// The namespace the embedded rendering installs into.
pub const NAMESPACE: &str = "ambit-system";
/// The label every Ambit object carries.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "ambit");

/// Why a `--set` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SetError {
    #[error("--set {0:?}: give key=value (for example --set image.tag=1.2.3)")]
    NoEquals(String),
    #[error("--set {key}: not a value of the chart (deploy/helm/ambit/values.yaml); the keys are: {}", valid.join(", "))]
    UnknownKey { key: String, valid: Vec<String> },
    #[error("--set {key}={value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
}

/// The chart's values after `--set`, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Values {
    pub registry: String,
    /// Empty: the chart's appVersion.
    pub tag: String,
    pub pull_policy: String,
    pub trust_domain: String,
    pub root_namespace: String,
    pub log_level: String,
    pub log_format: String,
    pub namespace_create: bool,
    pub crds_enabled: bool,
    pub control: Component,
    pub ztunnel: Component,
    pub cni: Component,
    pub control_replicas: i64,
    /// `ztunnel.terminationGracePeriodSeconds`: the pod's, and one second less (at
    /// least one) as ztunnel's drain deadline.
    pub ztunnel_grace: i64,
    pub cni_bin_dir: String,
    pub cni_conf_dir: String,
}

/// What every component has.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub enabled: bool,
    /// A container's `resources`, as toYaml writes it.
    pub resources: Value,
}

impl Values {
    /// The chart's defaults with each `key=value` of `sets` over them, in order (a
    /// `--set` may hold several, comma-separated as Helm's: `a=1,b=2`; `\,` is a comma).
    pub fn from_sets<S: AsRef<str>>(sets: &[S]) -> Result<Values, SetError> {
        let mut tree = defaults();
        for set in sets {
            for pair in split_pairs(set.as_ref()) {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| SetError::NoEquals(pair.clone()))?;
                set_value(&mut tree, key, value)?;
            }
        }
        Ok(Values::from_tree(&tree))
    }

    fn from_tree(tree: &Value) -> Values {
        let s = |path: &str| scalar_text(&tree.pointer(path).cloned().unwrap_or_default());
        let b = |path: &str| tree.pointer(path).and_then(Value::as_bool).unwrap_or(false);
        let component = |name: &str| Component {
            enabled: b(&format!("/{name}/enabled")),
            resources: tree
                .pointer(&format!("/{name}/resources"))
                .cloned()
                .unwrap_or_default(),
        };
        Values {
            registry: s("/image/registry"),
            tag: s("/image/tag"),
            pull_policy: s("/image/pullPolicy"),
            trust_domain: s("/trustDomain"),
            root_namespace: s("/rootNamespace"),
            log_level: s("/log/level"),
            log_format: s("/log/format"),
            namespace_create: b("/namespace/create"),
            crds_enabled: b("/crds/enabled"),
            control: component("control"),
            ztunnel: component("ztunnel"),
            cni: component("cni"),
            control_replicas: tree
                .pointer("/control/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            ztunnel_grace: tree
                .pointer("/ztunnel/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            cni_bin_dir: s("/cni/binDir"),
            cni_conf_dir: s("/cni/confDir"),
        }
    }

    /// `<registry>/<component>:<tag>`, as the chart's `ambit.image`.
    pub fn image(&self, component: &str) -> String {
        let tag = if self.tag.is_empty() {
            app_version()
        } else {
            self.tag.clone()
        };
        format!("{}/{component}:{tag}", self.registry)
    }

    fn component(&self, app_name: &str) -> Option<&Component> {
        match app_name {
            "ambit-control" => Some(&self.control),
            "ztunnel" => Some(&self.ztunnel),
            "ambit-cni" => Some(&self.cni),
            _ => None,
        }
    }
}

/// Every key `--set` takes: the leaves of values.yaml and, under each `resources`,
/// `requests.*` and `limits.*` of cpu, memory and ephemeral-storage.
pub fn valid_keys() -> Vec<String> {
    let mut keys = BTreeSet::new();
    leaves(&defaults(), "", &mut keys);
    for component in ["control", "ztunnel", "cni"] {
        for kind in ["requests", "limits"] {
            for resource in RESOURCES {
                keys.insert(format!("{component}.resources.{kind}.{resource}"));
            }
        }
    }
    keys.into_iter().collect()
}

const RESOURCES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

/// The objects for `values`, in the order Helm installs them (namespaces, then
/// CRDs and accounts, ..., workloads last).
pub fn render(values: &Values) -> Vec<Value> {
    default_objects()
        .into_iter()
        .filter(|o| kept(o, values))
        .map(|mut o| {
            transform(&mut o, values);
            o
        })
        .collect()
}

/// The default rendering's objects, every component enabled.
pub fn default_objects() -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(DEFAULT_RENDER)
        // The file is generated and checked by scripts/manifests.py; a unit test
        // parses it, so this cannot fail in a built binary.
        .map(|doc| Value::deserialize(doc).unwrap_or(Value::Null))
        .filter(|v| v.is_object())
        .collect()
}

/// The chart's appVersion.
pub fn app_version() -> String {
    CHART
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// `objects` as the multi-document YAML `manifest generate` prints.
pub fn to_yaml(objects: &[Value]) -> String {
    let mut text = String::new();
    for o in objects {
        text.push_str("---\n");
        // A JSON value always serializes as YAML.
        text.push_str(&serde_yaml_ng::to_string(o).unwrap_or_default());
    }
    text
}

fn defaults() -> Value {
    // values.yaml is embedded and parsed by a unit test.
    serde_yaml_ng::from_str(VALUES).unwrap_or(Value::Null)
}

fn leaves(tree: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match tree {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &path, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// `a=1,b=2\,3` → `["a=1", "b=2,3"]`.
fn split_pairs(set: &str) -> Vec<String> {
    let mut pairs = vec![String::new()];
    let mut chars = set.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    if let Some(last) = pairs.last_mut() {
                        last.push(next);
                    }
                }
            }
            ',' => pairs.push(String::new()),
            c => {
                if let Some(last) = pairs.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    pairs
}

/// The value as Helm's `--set` types it: `true`/`false`, an integer (not one with a
/// leading zero, except `0`), `null`, else a string.
pub fn helm_typed(text: &str) -> Value {
    match text {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        "null" => return Value::Null,
        "0" => return Value::from(0),
        _ => {}
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.starts_with('0') {
        if let Ok(n) = text.parse::<i64>() {
            return Value::from(n);
        }
    }
    Value::String(text.to_owned())
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn set_value(tree: &mut Value, key: &str, text: &str) -> Result<(), SetError> {
    let valid = valid_keys();
    if !valid.iter().any(|k| k == key) {
        return Err(SetError::UnknownKey {
            key: key.to_owned(),
            valid,
        });
    }
    let bad = |why: &str| SetError::BadValue {
        key: key.to_owned(),
        value: text.to_owned(),
        why: why.to_owned(),
    };
    let value = helm_typed(text);
    if value.is_null() {
        return Err(bad("null is not taken; leave the key out for its default"));
    }
    let pointer = format!("/{}", key.replace('.', "/"));
    let default = tree.pointer(&pointer).cloned();
    let value = match (default, &value) {
        (Some(Value::Bool(_)), Value::Bool(_)) => value,
        (Some(Value::Bool(_)), _) => return Err(bad("give true or false")),
        (Some(Value::Number(_)), Value::Number(n)) if n.as_i64().is_some_and(|n| n >= 0) => value,
        (Some(Value::Number(_)), _) => return Err(bad("give a whole number, 0 or more")),
        // A quantity (resources) stays as Helm types it (toYaml writes `cpu: 1`).
        _ if key.contains(".resources.") => match &value {
            Value::String(s) if !is_quantity(s) => {
                return Err(bad("give a Kubernetes quantity such as 100m, 1 or 128Mi"))
            }
            Value::Bool(_) => {
                return Err(bad("give a Kubernetes quantity such as 100m, 1 or 128Mi"))
            }
            _ => value,
        },
        _ => {
            let s = scalar_text(&value);
            check_string(key, &s).map_err(|why| bad(&why))?;
            Value::String(s)
        }
    };
    insert(tree, key, value);
    Ok(())
}

/// What a string key holds, checked where a wrong value would only fail in the
/// cluster.
fn check_string(key: &str, s: &str) -> Result<(), String> {
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    match key {
        "image.pullPolicy" if !["Always", "IfNotPresent", "Never"].contains(&s) => {
            Err("give Always, IfNotPresent or Never".to_owned())
        }
        "log.format" if !["text", "json"].contains(&s) => Err("give text or json".to_owned()),
        "log.level" if s.is_empty() => {
            Err("give a filter such as info, debug or ambit_net=debug".to_owned())
        }
        "trustDomain" if !dns(s) => {
            Err("a trust domain is a DNS name of lowercase letters, digits, - and .".to_owned())
        }
        "rootNamespace" if !dns(s) || s.contains('.') || s.len() > 63 => {
            Err("a namespace name is lowercase letters, digits and -, at most 63".to_owned())
        }
        "image.registry" if s.is_empty() || s.ends_with('/') || s.contains(char::is_whitespace) => {
            Err("give a registry path such as ghcr.io/example/ambit".to_owned())
        }
        "image.tag" if s.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') => {
            Err("a tag has no spaces, / or :".to_owned())
        }
        "cni.binDir" | "cni.confDir" if !s.starts_with('/') => {
            Err("give an absolute path on the node".to_owned())
        }
        _ => Ok(()),
    }
}

fn is_quantity(s: &str) -> bool {
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && [
            "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
        ]
        .contains(&suffix)
}

/// Sets `key` (a valid key, whose parent is a map of values.yaml) to `value`.
fn insert(tree: &mut Value, key: &str, value: Value) {
    let (parent, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let pointer = if parent.is_empty() {
        String::new()
    } else {
        format!("/{}", parent.replace('.', "/"))
    };
    if let Some(map) = tree.pointer_mut(&pointer).and_then(Value::as_object_mut) {
        map.insert(leaf.to_owned(), value);
    }
}

fn label<'a>(object: &'a Value, name: &str) -> Option<&'a str> {
    object["metadata"]["labels"][name].as_str()
}

/// Whether the chart renders `object` with `values` (its template's `if`).
fn kept(object: &Value, values: &Values) -> bool {
    match object["kind"].as_str() {
        Some("Namespace") => values.namespace_create,
        Some("CustomResourceDefinition") => values.crds_enabled,
        _ => label(object, "app.kubernetes.io/name")
            .and_then(|name| values.component(name))
            .is_none_or(|c| c.enabled),
    }
}

/// What the templates write from `values` into `object`.
fn transform(object: &mut Value, values: &Values) {
    let app = label(object, "app.kubernetes.io/name")
        .unwrap_or_default()
        .to_owned();
    if object["kind"] == "Deployment" && app == "ambit-control" {
        object["spec"]["replicas"] = values.control_replicas.into();
    }
    let ztunnel = object["kind"] == "DaemonSet" && app == "ztunnel";
    let Some(spec) = object
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if ztunnel {
        spec.insert(
            "terminationGracePeriodSeconds".into(),
            values.ztunnel_grace.into(),
        );
    }
    if let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for volume in volumes {
            let dir = match volume["name"].as_str() {
                Some("cni-bin") => &values.cni_bin_dir,
                Some("cni-conf") => &values.cni_conf_dir,
                _ => continue,
            };
            volume["hostPath"]["path"] = dir.as_str().into();
        }
    }
    let identity = format!(
        "spiffe://{}/ns/{NAMESPACE}/sa/ambit-control",
        values.trust_domain
    );
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else {
        return;
    };
    for container in containers {
        if let Some(component) = container["image"].as_str().and_then(image_component) {
            container["image"] = values.image(&component).into();
        }
        container["imagePullPolicy"] = values.pull_policy.as_str().into();
        if let Some(c) = values.component(&app) {
            container["resources"] = c.resources.clone();
        }
        let Some(env) = container.get_mut("env").and_then(Value::as_array_mut) else {
            continue;
        };
        for var in env {
            let value = match var["name"].as_str() {
                Some("AMBIT_TRUST_DOMAIN") => values.trust_domain.clone(),
                Some("AMBIT_ROOT_NAMESPACE") => values.root_namespace.clone(),
                Some("AMBIT_LOG") => values.log_level.clone(),
                Some("AMBIT_LOG_FORMAT") => values.log_format.clone(),
                Some("AMBIT_WAYPOINT_IMAGE") => values.image("waypoint"),
                Some("AMBIT_CA_IDENTITY" | "AMBIT_CONTROL_IDENTITY") => identity.clone(),
                Some("AMBIT_DRAIN_DEADLINE") if ztunnel => {
                    format!("{}s", (values.ztunnel_grace - 1).max(1))
                }
                _ => continue,
            };
            var["value"] = value.into();
        }
    }
}

/// `ztunnel` of the default rendering's `localhost/ambit/ztunnel:0.1.0`.
fn image_component(image: &str) -> Option<String> {
    let defaults = Values::from_tree(&defaults());
    let rest = image.strip_prefix(&format!("{}/", defaults.registry))?;
    let component = rest.strip_suffix(&format!(":{}", app_version()))?;
    Some(component.to_owned())
}

/// One object's kind and name, as progress lines and errors name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectName {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectName {
    pub fn of(object: &Value) -> ObjectName {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        ObjectName {
            api_version: text(&object["apiVersion"]),
            kind: text(&object["kind"]),
            namespace: object["metadata"]["namespace"].as_str().map(str::to_owned),
            name: text(&object["metadata"]["name"]),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(objects: &'a [Value], kind: &str, name: &str, var: &str) -> &'a Value {
        let o = objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap();
        o["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == var)
            .map(|v| &v["value"])
            .unwrap()
    }

    #[test]
    fn the_defaults_render_the_embedded_manifests_unchanged() {
        let objects = default_objects();
        assert!(objects.len() > 20, "{}", objects.len());
        assert_eq!(render(&Values::from_sets::<&str>(&[]).unwrap()), objects);
    }

    #[test]
    fn every_image_of_the_default_rendering_is_the_charts() {
        let images: Vec<String> = default_objects()
            .iter()
            .filter_map(|o| o.pointer("/spec/template/spec/containers"))
            .flat_map(|c| c.as_array().unwrap().clone())
            .map(|c| c["image"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(images.len(), 3, "{images:?}");
        for image in images {
            assert!(image_component(&image).is_some(), "{image}");
        }
    }

    #[test]
    fn sets_change_what_the_templates_write() {
        let values = Values::from_sets(&[
            "image.registry=ghcr.io/x,image.tag=2.0.0",
            "trustDomain=example.org",
            "control.replicas=3",
            "control.resources.limits.cpu=2",
            "cni.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d",
        ])
        .unwrap();
        let objects = render(&values);
        assert_eq!(
            env(
                &objects,
                "Deployment",
                "ambit-control",
                "AMBIT_WAYPOINT_IMAGE"
            ),
            "ghcr.io/x/waypoint:2.0.0"
        );
        assert_eq!(
            env(&objects, "DaemonSet", "ztunnel", "AMBIT_CA_IDENTITY"),
            "spiffe://example.org/ns/ambit-system/sa/ambit-control"
        );
        let control = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(control["spec"]["replicas"], 3);
        let container = &control["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"], "ghcr.io/x/control:2.0.0");
        assert_eq!(container["resources"]["limits"]["cpu"], 2);
        assert_eq!(container["resources"]["limits"]["memory"], "1Gi");
        assert!(to_yaml(&objects).contains("path: /var/lib/rancher/k3s/agent/etc/cni/net.d"));
    }

    #[test]
    fn disabled_components_are_left_out() {
        let values = Values::from_sets(&[
            "crds.enabled=false,namespace.create=false,control.enabled=false",
            "cni.enabled=false",
        ])
        .unwrap();
        let objects = render(&values);
        let names: BTreeSet<String> = objects
            .iter()
            .map(|o| label(o, "app.kubernetes.io/name").unwrap().to_owned())
            .collect();
        assert_eq!(names, BTreeSet::from(["ztunnel".to_owned()]));
        assert_eq!(objects.len(), 2);
    }

    #[test]
    fn bad_sets_say_what_is_wrong() {
        let unknown = Values::from_sets(&["image.tga=1"]).unwrap_err();
        let text = unknown.to_string();
        assert!(text.contains("image.tga"), "{text}");
        assert!(text.contains("image.tag,"), "{text}");
        assert!(text.contains("values.yaml"), "{text}");
        for (set, why) in [
            ("control.enabled=yes", "true or false"),
            ("control.replicas=two", "whole number"),
            ("control.replicas=-1", "whole number"),
            ("log.format=xml", "text or json"),
            ("image.pullPolicy=Sometimes", "Always"),
            ("trustDomain=Bad Domain", "DNS name"),
            ("cni.binDir=opt/cni", "absolute"),
            ("ztunnel.resources.requests.cpu=lots", "quantity"),
            ("trustDomain=null", "null"),
        ] {
            let e = Values::from_sets(&[set]).unwrap_err().to_string();
            assert!(e.contains(why), "{set}: {e}");
        }
        assert_eq!(
            Values::from_sets(&["trustDomain"]).unwrap_err(),
            SetError::NoEquals("trustDomain".into())
        );
    }

    #[test]
    fn values_are_typed_as_helm_types_them() {
        assert_eq!(helm_typed("true"), Value::Bool(true));
        assert_eq!(helm_typed("12"), Value::from(12));
        assert_eq!(helm_typed("0"), Value::from(0));
        assert_eq!(helm_typed("012"), Value::from("012"));
        assert_eq!(helm_typed("1.5"), Value::from("1.5"));
        assert_eq!(split_pairs(r"a=1,b=x\,y"), vec!["a=1", "b=x,y"]);
        // An integer tag is rendered as its digits, as Helm's template does.
        let values = Values::from_sets(&["image.tag=7"]).unwrap();
        assert_eq!(values.image("ztunnel"), "localhost/ambit/ztunnel:7");
        assert_eq!(app_version(), "0.1.0");
    }
}
