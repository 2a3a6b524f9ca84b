//! The local source: a directory of multi-document Kubernetes YAML, the same objects a
//! user would `kubectl apply`. In local mode a Pod's `status.podIP(s)` and
//! `spec.nodeName` come from the file, since no scheduler or CNI fills them in.
//!
//! A file is taken whole or not at all: if one of its documents cannot be used, the
//! error names the file and the line, and the file's last good content is kept, so a
//! half-saved edit never removes the rest of the file's objects from the mesh.
//! Kinds the control plane does not use (Deployments, ConfigMaps, ...) are skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use crate::resources::{Object, Resources};

/// A document that cannot be used, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", path.display())]
pub struct DocumentError {
    pub path: PathBuf,
    /// 1-based line in the file: where the error is, or where its document starts.
    pub line: usize,
    pub message: String,
}

/// Why the directory itself could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Parses one file's text into the objects the control plane keeps.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, DocumentError> {
    let mut objects = Vec::new();
    for (first_line, document) in documents(text) {
        let error = |line: usize, message: String| DocumentError {
            path: path.to_owned(),
            line,
            message,
        };
        let value: Value = serde_yaml_ng::from_str(document).map_err(|e| {
            let line = e
                .location()
                .map_or(first_line, |l| first_line + l.line() - 1);
            error(line, e.to_string())
        })?;
        if value.is_null() {
            continue;
        }
        let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or("");
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if api_version.is_empty() || kind.is_empty() {
            return Err(error(
                first_line,
                "not a Kubernetes object: apiVersion and kind are required".into(),
            ));
        }
        let typed = |kind: &str| format!("{kind} {}: ", object_name(&value));
        let object = match (api_version, kind) {
            ("v1", "Namespace") => {
                serde_yaml_ng::from_value(value.clone()).map(|o| Object::Namespace(Box::new(o)))
            }
            ("v1", "Pod") => {
                serde_yaml_ng::from_value(value.clone()).map(|o| Object::Pod(Box::new(o)))
            }
            ("v1", "Service") => {
                serde_yaml_ng::from_value(value.clone()).map(|o| Object::Service(Box::new(o)))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                serde_yaml_ng::from_value(value.clone()).map(|o| Object::EndpointSlice(Box::new(o)))
            }
            (v, "ServiceEntry") if crate::service_entry::API_VERSIONS.contains(&v) => {
                serde_yaml_ng::from_value(value.clone()).map(|o| Object::ServiceEntry(Box::new(o)))
            }
            (v, "AuthorizationPolicy") if crate::security::API_VERSIONS.contains(&v) => {
                serde_yaml_ng::from_value(value.clone())
                    .map(|o| Object::AuthorizationPolicy(Box::new(o)))
            }
            (v, "PeerAuthentication") if crate::security::API_VERSIONS.contains(&v) => {
                serde_yaml_ng::from_value(value.clone())
                    .map(|o| Object::PeerAuthentication(Box::new(o)))
            }
            _ => {
                tracing::debug!(path = %path.display(), line = first_line, api_version, kind, "kind not used by the control plane; skipped");
                continue;
            }
        };
        let object = object.map_err(|e| error(first_line, format!("{}{e}", typed(kind))))?;
        if object.key().name.is_empty() {
            return Err(error(
                first_line,
                format!("{kind}: metadata.name is required"),
            ));
        }
        objects.push(object);
    }
    Ok(objects)
}

/// `namespace/name` of an object not yet typed, for messages.
fn object_name(value: &Value) -> String {
    let meta = |field: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match (meta("namespace"), meta("name")) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name,
        _ => "(unnamed)".into(),
    }
}

/// The documents of a multi-document YAML text, each with the 1-based line it starts
/// on. A `---` at the start of a line separates documents (inside a block scalar it
/// would be indented).
fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            documents.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
        .into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// The directory source: the objects of every `*.yaml` / `*.yml` file in a directory
/// (not its subdirectories), each file's last good content kept.
#[derive(Debug)]
pub struct Directory {
    root: PathBuf,
    files: BTreeMap<PathBuf, Vec<Object>>,
}

impl Directory {
    pub fn new(root: &Path) -> Directory {
        Directory {
            root: root.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Reads the directory again. Files that parse replace their previous content,
    /// files that are gone take their objects with them, and files that do not parse
    /// keep their last good content and are returned as errors.
    pub fn reload(&mut self) -> Result<Vec<DocumentError>, DirectoryError> {
        let read_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DirectoryError::Read { path, source }
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(read_error(&self.root))? {
            let path = entry.map_err(read_error(&self.root))?.path();
            let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut errors = Vec::new();
        let mut files = BTreeMap::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(read_error(&path))?;
            match parse_file(&path, &text) {
                Ok(objects) => {
                    files.insert(path, objects);
                }
                Err(e) => {
                    if let Some(kept) = self.files.remove(&path) {
                        files.insert(path, kept);
                    }
                    errors.push(e);
                }
            }
        }
        self.files = files;
        Ok(errors)
    }

    /// The objects of all files, a later file's object replacing an earlier one of the
    /// same kind and key.
    pub fn resources(&self) -> Resources {
        let mut resources = Resources::default();
        for object in self.files.values().flatten() {
            resources.insert(object.clone());
        }
        resources
    }
}

impl fmt::Display for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_on_separators_with_their_first_lines() {
        let text = "# leading comment\n---\nkind: A\n---\n\n---   \nkind: B\nx: |\n  ---\n";
        let docs = documents(text);
        assert_eq!(
            docs,
            [(3, "kind: A\n"), (7, "kind: B\nx: |\n  ---\n")],
            "{docs:?}"
        );
    }

    #[test]
    fn a_document_that_does_not_parse_is_reported_with_file_and_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: [oops\n";
        let err = parse_file(Path::new("dir/app.yaml"), text).unwrap_err();
        assert_eq!(err.path, Path::new("dir/app.yaml"));
        assert!(err.line >= 9, "{err}");
        assert!(err.to_string().starts_with("dir/app.yaml:"), "{err}");
    }

    #[test]
    fn a_document_of_the_wrong_shape_names_its_kind_object_and_first_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  ports: [{port: eighty}]\n";
        let err = parse_file(Path::new("app.yaml"), text).unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.message.starts_with("Service shop/web: "), "{err}");
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_content_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n";
        std::fs::write(&file, pod).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        let mut source = Directory::new(dir.path());
        assert!(source.reload().unwrap().is_empty());
        assert_eq!(source.resources().pods.len(), 1);

        std::fs::write(&file, format!("{pod}---\nkind: a: b\n")).unwrap();
        let errors = source.reload().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].path.as_path(), errors[0].line),
            (file.as_path(), 5)
        );
        assert_eq!(
            source.resources().pods.len(),
            1,
            "the last good content is kept"
        );

        std::fs::remove_file(&file).unwrap();
        assert!(source.reload().unwrap().is_empty());
        assert!(source.resources().pods.is_empty());
    }

    #[test]
    fn unknown_kinds_are_skipped_and_objects_need_a_kind_and_a_name() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        assert!(parse_file(Path::new("a.yaml"), text).unwrap().is_empty());
        let err = parse_file(Path::new("a.yaml"), "metadata: {name: x}\n").unwrap_err();
        assert!(err.message.contains("apiVersion and kind"), "{err}");
        let err = parse_file(Path::new("a.yaml"), "apiVersion: v1\nkind: Pod\n").unwrap_err();
        assert!(err.message.contains("metadata.name"), "{err}");
    }
}
