//! Kubernetes YAML → the objects Ambit keeps, read as the API server would read them,
//! shared by the control plane's directory source and `ambitctl local apply` so both
//! accept and refuse exactly the same documents.
//!
//! - A file is a stream of YAML documents split by the YAML library (a document may
//!   begin on its `---` line: `--- {apiVersion: v1, ...}`); each stands on its own.
//! - Each document is converted to JSON as Kubernetes does (`sigs.k8s.io/yaml`): a
//!   mapping key that is an integer, a boolean or a float becomes its text, so
//!   `portLevelMtls: {9090: {mode: STRICT}}` reads as `"9090"`; merge keys (`<<`) are
//!   applied; any other key (null, a sequence, a mapping) is an error.
//! - Kinds Ambit does not use are skipped; a used kind in an unknown `apiVersion` is an
//!   error.
//! - A security policy (AuthorizationPolicy, PeerAuthentication, RequestAuthentication) that cannot be read —
//!   bad YAML inside it, a malformed `metadata`, an unknown version — but whose
//!   namespace can still be told is kept as an object marked unreadable, which the
//!   translation fails closed in its scope (decision record 0007): it is an error
//!   that [`DocumentError::fails_closed`] says is enforced.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use crate::resources::Object;
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// A document that cannot be used as written, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    pub path: PathBuf,
    /// 1-based line in the file: where the error is, or where its document starts.
    pub line: usize,
    /// 1-based index of the document in the file.
    pub document: usize,
    pub message: String,
    /// The document is a security policy kept as unreadable: enforced closed in its
    /// scope (everything denied there, or STRICT), not lost.
    pub fails_closed: bool,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: document {}: {}",
            self.path.display(),
            self.line,
            self.document,
            self.message
        )?;
        if self.fails_closed {
            f.write_str(" (the control plane enforces it closed in its scope)")?;
        }
        Ok(())
    }
}

impl std::error::Error for DocumentError {}

/// What one file holds.
#[derive(Debug, Clone, Default)]
pub struct ParsedFile {
    /// The objects read, unreadable security policies included.
    pub objects: Vec<Object>,
    /// Where each of `objects` is: (document, line), both 1-based.
    pub places: Vec<(usize, usize)>,
    pub errors: Vec<DocumentError>,
}

impl ParsedFile {
    /// Every document is accounted for: read, skipped as an unused kind, or a policy
    /// enforced closed. A file that is not whole has documents that are simply lost.
    pub fn is_whole(&self) -> bool {
        self.errors.iter().all(|e| e.fails_closed)
    }
}

/// One YAML document of a file converted to JSON, or why it could not be.
#[derive(Debug)]
pub struct Document {
    /// 1-based.
    pub index: usize,
    /// 1-based line the document starts on.
    pub line: usize,
    /// `Ok(None)` for an empty document.
    pub value: Result<Option<Json>, DocumentProblem>,
}

/// Why a document is not readable JSON.
#[derive(Debug)]
pub struct DocumentProblem {
    /// 1-based line of the problem.
    pub line: usize,
    pub message: String,
    /// The document as far as it was read: a syntax error leaves nothing, an
    /// unsupported key leaves the rest of the document (so its kind and namespace can
    /// still be told).
    pub partial: Option<Json>,
}

/// Splits `text` into its YAML documents, each converted to JSON as Kubernetes does.
pub fn documents(text: &str) -> Vec<Document> {
    let starts = document_lines(text);
    let mut out = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let start = starts.get(i).copied().unwrap_or(1);
        let value = match Yaml::deserialize(document) {
            Err(e) => Err(DocumentProblem {
                line: e.location().map_or(start, |l| l.line()),
                message: without_location(&e.to_string()),
                partial: None,
            }),
            Ok(mut yaml) => match yaml.apply_merge() {
                Err(e) => Err(DocumentProblem {
                    line: start,
                    message: without_location(&e.to_string()),
                    partial: None,
                }),
                Ok(()) if yaml.is_null() => Ok(None),
                Ok(()) => {
                    let mut problems = Vec::new();
                    let json = to_json(yaml, "", &mut problems);
                    match problems.is_empty() {
                        true => Ok(Some(json)),
                        false => Err(DocumentProblem {
                            line: start,
                            message: problems.join("; "),
                            partial: Some(json),
                        }),
                    }
                }
            },
        };
        let failed = matches!(&value, Err(p) if p.partial.is_none());
        out.push(Document {
            index: i + 1,
            line: start,
            value,
        });
        // After a syntax error the library cannot tell where the next document
        // starts: the rest of the file is unread, which the error already says.
        if failed {
            break;
        }
    }
    out
}

/// serde_yaml's messages end with " at line L column C", which our location says.
fn without_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The 1-based line each document starts on: the first line with content, and after
/// each `---` the line it is on when content follows it there, else the next one.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut in_document = false;
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker {
            let rest = line[3..].trim();
            starts.push(if rest.is_empty() || rest.starts_with('#') {
                i + 2
            } else {
                i + 1
            });
            in_document = true;
        } else if !in_document && !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            if !line.starts_with('%') {
                starts.push(i + 1);
                in_document = true;
            }
        } else if line == "..." {
            in_document = false;
        }
    }
    if starts.is_empty() {
        starts.push(1);
    }
    starts
}

/// YAML → JSON as `sigs.k8s.io/yaml` converts it; what cannot be converted is left out
/// and named in `problems` by its path.
fn to_json(yaml: Yaml, path: &str, problems: &mut Vec<String>) -> Json {
    let at = |p: &str| {
        if p.is_empty() {
            "(top)".to_owned()
        } else {
            p.to_owned()
        }
    };
    match yaml {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::from(i)
            } else if let Some(u) = n.as_u64() {
                Json::from(u)
            } else {
                match n.as_f64().and_then(serde_json::Number::from_f64) {
                    Some(f) => Json::Number(f),
                    None => {
                        problems.push(format!("{}: {n} is not a JSON number", at(path)));
                        Json::Null
                    }
                }
            }
        }
        Yaml::String(s) => Json::String(s),
        Yaml::Sequence(items) => Json::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]"), problems))
                .collect(),
        ),
        Yaml::Mapping(map) => {
            let mut object = serde_json::Map::new();
            for (key, value) in map {
                let key = match key {
                    Yaml::String(s) => s,
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Bool(b) => b.to_string(),
                    other => {
                        problems.push(format!(
                            "{}: a mapping key must be a string, number or boolean, not {}",
                            at(path),
                            describe(&other)
                        ));
                        continue;
                    }
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let value = to_json(value, &child, problems);
                object.insert(key, value);
            }
            Json::Object(object)
        }
        Yaml::Tagged(tagged) => to_json(tagged.value, path, problems),
    }
}

fn describe(value: &Yaml) -> &'static str {
    match value {
        Yaml::Null => "null",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a sequence",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

/// The kinds Ambit keeps, and the versions it reads each in.
fn versions(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Namespace" | "Pod" | "Service" => &["v1"],
        "EndpointSlice" => &["discovery.k8s.io/v1"],
        "ServiceEntry" => &crate::service_entry::API_VERSIONS,
        "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication" => {
            &crate::security::API_VERSIONS
        }
        "Gateway" | "GatewayClass" => &crate::gateway::API_VERSIONS,
        "HTTPRoute" => &crate::http_route::API_VERSIONS,
        "GRPCRoute" => &crate::http_route::GRPC_API_VERSIONS,
        "VirtualService" => &crate::virtual_service::API_VERSIONS,
        "DestinationRule" => &crate::destination_rule::API_VERSIONS,
        _ => return None,
    })
}

/// Parses one file's text into the objects Ambit keeps, and what could not be used.
pub fn parse_file(path: &Path, text: &str) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    for document in documents(text) {
        let (index, start) = (document.index, document.line);
        let error = |line: usize, message: String, fails_closed: bool| DocumentError {
            path: path.to_owned(),
            line,
            document: index,
            message,
            fails_closed,
        };
        let (value, problem) = match document.value {
            Ok(None) => continue,
            Ok(Some(v)) => (v, None),
            Err(DocumentProblem {
                line,
                message,
                partial: Some(v),
            }) => (v, Some((line, message))),
            Err(p) => {
                parsed.errors.push(error(p.line, p.message, false));
                continue;
            }
        };
        let field = |name: &str| value.get(name).and_then(Json::as_str).unwrap_or("");
        let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
        if api_version.is_empty() || kind.is_empty() {
            let message = problem.map_or_else(
                || "not a Kubernetes object: apiVersion and kind are required".to_owned(),
                |(_, m)| m,
            );
            parsed.errors.push(error(start, message, false));
            continue;
        }
        let Some(known) = versions(&kind) else {
            // Deployments, ConfigMaps, ...: not used by Ambit.
            continue;
        };
        let security = matches!(
            kind.as_str(),
            "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"
        );
        let mut why = problem.map(|(_, m)| m);
        if why.is_none() && !known.contains(&api_version.as_str()) {
            why = Some(format!(
                "{kind}: apiVersion {api_version:?} is not one Ambit reads ({})",
                known.join(", ")
            ));
        }
        let typed = match &why {
            Some(_) => None,
            None => match type_object(&kind, &value) {
                Ok(object) if !object.key().name.is_empty() => Some(object),
                Ok(_) => {
                    why = Some(format!("{kind}: metadata.name is required"));
                    None
                }
                Err(e) => {
                    why = Some(format!("{kind} {}: {e}", object_name(&value)));
                    None
                }
            },
        };
        match (typed, why) {
            (Some(object), _) => {
                parsed.objects.push(object);
                parsed.places.push((index, start));
            }
            (None, Some(why)) if security => {
                match unreadable_policy(&kind, &value, &why, (index, start)) {
                    Ok(object) => {
                        let message =
                            format!("{why}; kept as an unreadable {kind} {}", object.key());
                        parsed.objects.push(object);
                        parsed.places.push((index, start));
                        parsed.errors.push(error(start, message, true));
                    }
                    Err(e) => parsed
                        .errors
                        .push(error(start, format!("{why}; {e}"), false)),
                }
            }
            (None, why) => parsed.errors.push(error(
                start,
                why.unwrap_or_else(|| format!("{kind}: cannot be read")),
                false,
            )),
        }
    }
    parsed
}

/// An object as the API server sent it (list or watch), typed as [`Kind`] says. One
/// that does not type is an error naming the field, except a security policy whose
/// namespace can be read: it is kept marked unreadable, to fail closed in its scope as
/// the directory reader does. The watchers use this for every object, so one object
/// they cannot read never stops the rest of its kind from being listed and watched.
pub fn from_api_server(kind: crate::resources::Kind, value: &Json) -> Result<Object, String> {
    let kind = kind.as_str();
    match type_object(kind, value) {
        Ok(object) => Ok(object),
        Err(why)
            if matches!(
                kind,
                "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"
            ) =>
        {
            unreadable_policy(kind, value, &why, (0, 0)).map_err(|e| format!("{why}; {e}"))
        }
        Err(why) => Err(why),
    }
}

/// The typed object of a known kind and version; an error names the field that
/// stops it (`spec.ports[0].port: invalid type ...`).
fn type_object(kind: &str, value: &Json) -> Result<Object, String> {
    fn typed<T: DeserializeOwned>(value: &Json) -> Result<T, String> {
        serde_path_to_error::deserialize(value.clone()).map_err(|e| e.to_string())
    }
    Ok(match kind {
        "Namespace" => Object::Namespace(Box::new(typed(value)?)),
        "Pod" => Object::Pod(Box::new(typed(value)?)),
        "Service" => Object::Service(Box::new(typed(value)?)),
        "EndpointSlice" => Object::EndpointSlice(Box::new(typed(value)?)),
        "ServiceEntry" => Object::ServiceEntry(Box::new(typed(value)?)),
        "AuthorizationPolicy" => Object::AuthorizationPolicy(Box::new(typed(value)?)),
        "PeerAuthentication" => Object::PeerAuthentication(Box::new(typed(value)?)),
        "RequestAuthentication" => Object::RequestAuthentication(Box::new(typed(value)?)),
        "Gateway" => Object::Gateway(Box::new(typed(value)?)),
        "GatewayClass" => Object::GatewayClass(Box::new(typed(value)?)),
        "HTTPRoute" => Object::HttpRoute(Box::new(typed(value)?)),
        "GRPCRoute" => Object::GrpcRoute(Box::new(typed(value)?)),
        "VirtualService" => Object::VirtualService(Box::new(typed(value)?)),
        "DestinationRule" => Object::DestinationRule(Box::new(typed(value)?)),
        other => return Err(format!("{other}: not a kind Ambit keeps")),
    })
}

/// A security policy that cannot be read, kept so that it fails closed: in its
/// namespace (`default` when it names none), named as written or, without a readable
/// name, after its place in the file. Its spec is kept when it is readable JSON, so a
/// policy whose action and selector can be read fails closed as itself would.
fn unreadable_policy(
    kind: &str,
    value: &Json,
    why: &str,
    (index, line): (usize, usize),
) -> Result<Object, String> {
    let metadata = value.get("metadata");
    let namespace = match metadata.and_then(|m| m.get("namespace")) {
        None | Some(Json::Null) => "default".to_owned(),
        Some(Json::String(ns)) if !ns.is_empty() => ns.clone(),
        Some(_) => {
            return Err(
                "its metadata.namespace cannot be read, so neither can the scope it would fail closed in"
                    .into(),
            )
        }
    };
    let name = match metadata.and_then(|m| m.get("name")).and_then(Json::as_str) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => format!("unreadable-document-{index}-line-{line}"),
    };
    let metadata = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        ..ObjectMeta::default()
    };
    let spec = value.get("spec").cloned().unwrap_or(Json::Null);
    let unreadable = Some(why.to_owned());
    Ok(match kind {
        "AuthorizationPolicy" => Object::AuthorizationPolicy(Box::new(AuthorizationPolicy {
            metadata,
            spec,
            unreadable,
        })),
        "RequestAuthentication" => Object::RequestAuthentication(Box::new(RequestAuthentication {
            metadata,
            spec,
            unreadable,
        })),
        _ => Object::PeerAuthentication(Box::new(PeerAuthentication {
            metadata,
            spec,
            unreadable,
        })),
    })
}

/// `namespace/name` of an object not yet typed, for messages.
fn object_name(value: &Json) -> String {
    let meta = |field: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Json::as_str)
            .map(str::to_owned)
    };
    match (meta("namespace"), meta("name")) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name,
        _ => "(unnamed)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<Option<Json>, DocumentProblem> {
        let mut docs = documents(text);
        assert_eq!(docs.len(), 1, "{docs:?}");
        docs.remove(0).value
    }

    #[test]
    fn keys_are_converted_as_kubernetes_converts_them() {
        let json = one("a: {9090: x, true: y, 1.5: z}\n").unwrap().unwrap();
        assert_eq!(
            json,
            serde_json::json!({"a": {"9090": "x", "true": "y", "1.5": "z"}})
        );
        let merged = one("base: &b {x: 1}\nc: {<<: *b, y: 2}\n")
            .unwrap()
            .unwrap();
        assert_eq!(merged["c"], serde_json::json!({"x": 1, "y": 2}));
    }

    #[test]
    fn a_key_that_cannot_be_text_is_named_and_the_rest_is_kept() {
        let problem = one("kind: PeerAuthentication\nspec:\n  ? [a, b]\n  : 1\n").unwrap_err();
        assert!(
            problem.message.starts_with("spec: a mapping key"),
            "{problem:?}"
        );
        assert_eq!(problem.partial.unwrap()["kind"], "PeerAuthentication");
    }

    #[test]
    fn documents_start_where_their_content_does() {
        let text = "# comment\n---\nkind: A\n--- {kind: B}\n---   \n\n---\nkind: C\n";
        let docs = documents(text);
        let lines: Vec<(usize, usize)> = docs.iter().map(|d| (d.index, d.line)).collect();
        assert_eq!(lines[..2], [(1, 3), (2, 4)], "{docs:?}");
        let kinds: Vec<Option<String>> = docs
            .iter()
            .map(|d| {
                d.value
                    .as_ref()
                    .unwrap()
                    .as_ref()
                    .map(|v| v["kind"].as_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(kinds.iter().flatten().collect::<Vec<_>>(), ["A", "B", "C"]);
        assert_eq!(docs.last().unwrap().line, 8);
    }

    #[test]
    fn a_syntax_error_keeps_the_documents_before_it_and_names_its_line() {
        let docs = documents("kind: A\n---\nkind: [B\n---\nkind: C\n");
        assert!(matches!(&docs[0].value, Ok(Some(_))), "{docs:?}");
        let problem = docs.last().unwrap().value.as_ref().unwrap_err();
        assert!(problem.line >= 3, "{problem:?}");
    }
}
