//! The local source: a directory of multi-document Kubernetes YAML, the same objects a
//! user would `kubectl apply`. In local mode a Pod's `status.podIP(s)` and
//! `spec.nodeName` come from the file, since no scheduler or CNI fills them in.
//!
//! Documents are read by [`ambit_k8s::read`], the code `ambitctl local apply`
//! validates with. A security policy that cannot be read but whose kind and namespace
//! can is kept to fail closed in its scope. Any other document that cannot be used
//! makes the file keep its last good content (its security policies still follow
//! the file), so a half-saved edit never removes the rest of the file's objects from
//! the mesh; each error names the file, the line and the document. Kinds the control
//! plane does not use (Deployments, ConfigMaps, ...) are skipped. A file is read
//! again only when its size, times or inode change, so an unchanged directory costs
//! one `stat` per file and poll.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::resources::{Object, Resources};

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

/// Parses one file's text as the directory source does ([`ambit_k8s::read`]).
pub use ambit_k8s::read::{parse_file, DocumentError};

/// What identifies a file's content without reading it: a rewrite, a rename over it
/// or an edit in place each change one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// One file as last read.
#[derive(Debug)]
struct File {
    stamp: Stamp,
    /// What the source takes from it.
    objects: Vec<Object>,
    /// Its documents that could not be used as written.
    errors: Vec<DocumentError>,
}

/// The directory source: the objects of every `*.yaml` / `*.yml` file in a directory
/// (not its subdirectories). A file is read again only when its [`Stamp`] changes.
#[derive(Debug)]
pub struct Directory {
    root: PathBuf,
    files: BTreeMap<PathBuf, File>,
    /// How many times a file was read and parsed (for tests and logs).
    parses: u64,
}

impl Directory {
    pub fn new(root: &Path) -> Directory {
        Directory {
            root: root.to_owned(),
            files: BTreeMap::new(),
            parses: 0,
        }
    }

    /// How many times a file has been read and parsed since `new`.
    pub fn parses(&self) -> u64 {
        self.parses
    }

    /// Looks at the directory again; reads only the files that are new or changed.
    /// Files that are gone take their objects with them. A file every document of
    /// which is accounted for (read, skipped as an unused kind, or a security policy
    /// kept unreadable to fail closed) replaces its previous content; a file with a
    /// document that is simply lost (bad YAML, a Pod of the wrong shape) keeps its
    /// last good content, with every security policy it still holds taking the place
    /// of the old one of that key, so a policy never waits for the rest of its file.
    /// Returns the problems of every file, changed or not.
    pub fn reload(&mut self) -> Result<Vec<DocumentError>, DirectoryError> {
        let read_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DirectoryError::Read { path, source }
        };
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(&self.root).map_err(read_error(&self.root))? {
            let path = entry.map_err(read_error(&self.root))?.path();
            let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if !yaml {
                continue;
            }
            // Follows symbolic links, as reading the file does.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    present.insert(path, Stamp::of(&m));
                }
                Ok(_) => {}
                // Removed between the listing and now: gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(read_error(&path)(e)),
            }
        }
        let mut files = BTreeMap::new();
        for (path, stamp) in present {
            let previous = match self.files.remove(&path) {
                Some(file) if file.stamp == stamp => {
                    files.insert(path, file);
                    continue;
                }
                previous => previous,
            };
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_error(&path)(e)),
            };
            self.parses += 1;
            let parsed = parse_file(&path, &text);
            let objects = if parsed.is_whole() {
                parsed.objects
            } else {
                let mut kept: Vec<Object> = previous.map(|f| f.objects).unwrap_or_default();
                for object in parsed.objects.into_iter().filter(is_security) {
                    let (kind, key) = (object.kind_of(), object.key());
                    kept.retain(|o| (o.kind_of(), o.key()) != (kind, key.clone()));
                    kept.push(object);
                }
                kept
            };
            files.insert(
                path,
                File {
                    stamp,
                    objects,
                    errors: parsed.errors,
                },
            );
        }
        self.files = files;
        Ok(self
            .files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect())
    }

    /// The objects of all files, a later file's object replacing an earlier one of the
    /// same kind and key.
    pub fn resources(&self) -> Resources {
        let mut resources = Resources::default();
        for object in self.files.values().flat_map(|f| &f.objects) {
            resources.insert(object.clone());
        }
        resources
    }
}

fn is_security(object: &Object) -> bool {
    matches!(
        object,
        Object::AuthorizationPolicy(_)
            | Object::PeerAuthentication(_)
            | Object::RequestAuthentication(_)
    )
}

impl fmt::Display for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ObjectKey;
    use crate::translate::translate;
    use ambit_core::authz::{evaluate, Connection};
    use ambit_core::model::MeshConfig;

    fn errors(text: &str) -> Vec<DocumentError> {
        parse_file(Path::new("dir/app.yaml"), text).errors
    }

    /// Whether the model lets a plaintext (or mTLS) connection reach a workload of
    /// `namespace` on `port`, by every policy that applies to it.
    fn allowed(config: &MeshConfig, namespace: &str, plaintext: bool, port: u16) -> bool {
        let id = ambit_core::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/client").unwrap();
        let trust_domain = ambit_core::TrustDomain::parse("cluster.local").unwrap();
        let state = ambit_core::model::MeshState::build(config, &trust_domain).unwrap();
        let workload = config
            .workloads
            .iter()
            .find(|w| w.namespace == namespace)
            .expect("a workload in the namespace");
        let c = Connection {
            peer: (!plaintext).then_some(&id),
            source_ip: "10.9.0.9".parse().unwrap(),
            destination_ip: workload.ips[0],
            destination_port: port,
        };
        let policies = state.policies_for(workload);
        evaluate(policies, &c).allowed()
    }

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n\
        spec: {nodeName: node-a, containers: [{name: app, image: x}]}\n\
        status: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}]}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: other}\n\
        spec: {nodeName: node-a, containers: [{name: app, image: x}]}\n\
        status: {podIP: 10.1.0.3, podIPs: [{ip: 10.1.0.3}]}\n";

    fn source(files: &[(&str, &str)]) -> (tempfile::TempDir, Directory, Vec<DocumentError>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut source = Directory::new(dir.path());
        let errors = source.reload().unwrap();
        (dir, source, errors)
    }

    #[test]
    fn port_level_mtls_with_integer_keys_reads_as_kubernetes_does() {
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
            metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n\
            apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
            metadata: {name: web, namespace: shop}\n\
            spec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    9090: {mode: PERMISSIVE}\n";
        let (_dir, source, errors) = source(&[("pods.yaml", PODS), ("pa.yaml", text)]);
        assert!(errors.is_empty(), "{errors:?}");
        let resources = source.resources();
        assert_eq!(resources.peer_authentications.len(), 2);
        let web = &resources.peer_authentications[&ObjectKey::new("shop", "web")];
        assert_eq!(web.spec["portLevelMtls"]["9090"]["mode"], "PERMISSIVE");
        let t = translate(&resources);
        assert!(
            t.policy_status.iter().all(|(_, _, a)| a.accepted),
            "{:?}",
            t.policy_status
        );
        // The mesh-wide STRICT holds: plaintext refused on the other namespace.
        assert!(!allowed(&t.config, "other", true, 80));
        assert!(allowed(&t.config, "other", false, 80));
    }

    #[test]
    fn a_document_that_begins_on_its_separator_line_is_read() {
        let text = "--- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n\
            --- {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n\
            ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n";
        let parsed = parse_file(Path::new("a.yaml"), text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let names: Vec<String> = parsed.objects.iter().map(|o| o.key().name).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn an_unreadable_policy_whose_namespace_is_known_denies_its_namespace() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata:\n  name: deny-legacy\n  namespace: shop\n  labels: 5\n\
            spec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}\n";
        let (_dir, source, errors) = source(&[("pods.yaml", PODS), ("policy.yaml", text)]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].fails_closed);
        assert_eq!((errors[0].line, errors[0].document), (1, 1));
        assert!(
            errors[0].message.contains("metadata.labels"),
            "{}",
            errors[0]
        );
        let t = translate(&source.resources());
        let (_, key, acceptance) = &t.policy_status[0];
        assert_eq!(key, &ObjectKey::new("shop", "deny-legacy"));
        assert_eq!(acceptance.reason, "InvalidValue");
        assert!(!allowed(&t.config, "shop", false, 80), "shop is denied");
        assert!(allowed(&t.config, "other", false, 80), "only shop");
    }

    #[test]
    fn an_unknown_version_of_a_security_kind_fails_closed_and_of_another_kind_is_an_error() {
        let text = "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\n\
            metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n";
        let (_dir, source, errors) = source(&[("pods.yaml", PODS), ("pa.yaml", text)]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].fails_closed);
        assert!(
            errors[0].message.contains("security.istio.io/v2"),
            "{}",
            errors[0]
        );
        let t = translate(&source.resources());
        assert!(!allowed(&t.config, "other", true, 80), "mesh-wide STRICT");
        assert!(allowed(&t.config, "other", false, 80));

        let errors = errors_of("apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(!errors[0].fails_closed);
        assert!(errors[0].message.contains("\"v2\""), "{}", errors[0]);
    }

    fn errors_of(text: &str) -> Vec<DocumentError> {
        errors(text)
    }

    #[test]
    fn an_unreadable_policy_in_a_new_file_is_not_lost() {
        // Nothing was ever good in this file: the policy must still bite.
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {name: p, namespace: shop, labels: 5}\nspec: {}\n---\n\
            apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
            spec:\n  ports: [{port: eighty}]\n";
        let (_dir, source, errors) = source(&[("pods.yaml", PODS), ("policy.yaml", text)]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        let service = errors.iter().find(|e| !e.fails_closed).unwrap();
        assert_eq!((service.line, service.document), (6, 2), "{service}");
        assert!(service.message.contains("spec.ports"), "{service}");
        let resources = source.resources();
        assert!(resources.services.is_empty());
        assert!(!allowed(&translate(&resources).config, "shop", false, 80));
    }

    #[test]
    fn a_document_that_does_not_parse_is_reported_with_file_and_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: [oops\n";
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let err = &errors[0];
        assert_eq!(err.path, Path::new("dir/app.yaml"));
        assert!(err.line >= 9, "{err}");
        assert!(!err.fails_closed);
        assert!(err.to_string().starts_with("dir/app.yaml:"), "{err}");
    }

    #[test]
    fn a_document_of_the_wrong_shape_names_its_kind_object_field_and_first_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  ports: [{port: eighty}]\n";
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].line, errors[0].document),
            (5, 2),
            "{}",
            errors[0]
        );
        assert!(
            errors[0]
                .message
                .starts_with("Service shop/web: spec.ports"),
            "{}",
            errors[0]
        );
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
    fn security_policies_follow_a_file_whose_other_documents_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n";
        std::fs::write(&file, pod).unwrap();
        let mut source = Directory::new(dir.path());
        assert!(source.reload().unwrap().is_empty());
        let broken = format!(
            "{pod}spec: {{containers: 5}}\n---\napiVersion: security.istio.io/v1\n\
             kind: AuthorizationPolicy\nmetadata: {{name: deny, namespace: shop}}\n\
             spec: {{action: DENY, rules: [{{}}]}}\n"
        );
        std::fs::write(&file, broken).unwrap();
        let errors = source.reload().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let resources = source.resources();
        assert_eq!(resources.pods.len(), 1, "the last good pod");
        assert_eq!(resources.authorization_policies.len(), 1, "the new policy");
    }

    #[test]
    fn an_unchanged_file_is_not_parsed_again_and_changes_and_deletions_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        std::fs::write(&a, ns("one")).unwrap();
        std::fs::write(&b, "kind: [broken\n").unwrap();
        let mut source = Directory::new(dir.path());
        assert_eq!(source.reload().unwrap().len(), 1);
        assert_eq!(source.parses(), 2);
        for _ in 0..5 {
            // Unchanged: its problems are still reported, nothing is read again.
            assert_eq!(source.reload().unwrap().len(), 1);
        }
        assert_eq!(source.parses(), 2);

        // Same size, content changed in place.
        std::fs::write(&a, ns("two")).unwrap();
        source.reload().unwrap();
        assert_eq!(source.parses(), 3);
        assert!(source.resources().namespaces.contains_key("two"));
        // Replaced by a rename (as editors and `ambitctl local apply` do).
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, ns("six")).unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        source.reload().unwrap();
        assert_eq!(source.parses(), 4);
        assert!(source.resources().namespaces.contains_key("six"));
        // Deleted.
        std::fs::remove_file(&b).unwrap();
        assert!(source.reload().unwrap().is_empty());
        std::fs::remove_file(&a).unwrap();
        source.reload().unwrap();
        assert!(source.resources().namespaces.is_empty());
        assert_eq!(source.parses(), 4);
    }

    #[test]
    fn unknown_kinds_are_skipped_and_objects_need_a_kind_and_a_name() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let parsed = parse_file(Path::new("a.yaml"), text);
        assert!(parsed.objects.is_empty() && parsed.errors.is_empty());
        let err = &errors("metadata: {name: x}\n")[0];
        assert!(err.message.contains("apiVersion and kind"), "{err}");
        let err = &errors("apiVersion: v1\nkind: Pod\n")[0];
        assert!(err.message.contains("metadata.name"), "{err}");
    }
}
