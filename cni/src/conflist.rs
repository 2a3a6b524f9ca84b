//! ambit-cni's place in the node's CNI configuration: appended to the chain of the
//! primary network (the first configuration file in the directory, as the container
//! runtime picks it), updated in place when it is already there, removed on uninstall.
//! Everything else in the file is kept as it was, key order included; a file that does
//! not change is not rewritten.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The plugin's `type`: the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "ambit-cni";

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a CNI network configuration: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{dir}: no CNI network configuration (*.conflist, *.conf, *.json) to join; the cluster's network plugin writes one first")]
    NoPrimary { dir: PathBuf },
}

/// A configuration's text with ambit-cni's `entry` (its `type` is set) last in its
/// chain, or where it already was. A single-plugin `.conf` becomes a list. `None`
/// when the text already says exactly that.
pub fn with_plugin(text: &str, entry: &Map<String, Value>) -> Result<Option<String>, String> {
    let mut list = as_list(text)?;
    let mut entry = entry.clone();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    let plugins = plugins_mut(&mut list)?;
    match plugins.iter().position(is_ours) {
        Some(i) if plugins[i] == Value::Object(entry.clone()) => return unchanged(text, &list),
        Some(i) => plugins[i] = Value::Object(entry),
        None => plugins.push(Value::Object(entry)),
    }
    Ok(Some(pretty(&list)))
}

/// A configuration's text without ambit-cni in its chain; `None` when it was not there.
pub fn without_plugin(text: &str) -> Result<Option<String>, String> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    Ok(Some(pretty(&list)))
}

/// The file the runtime uses: the first configuration file of `dir` by name.
pub fn primary(dir: &Path) -> Result<PathBuf, ConflistError> {
    let io = |source| ConflistError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoPrimary {
            dir: dir.to_owned(),
        })
}

/// Adds (or updates) ambit-cni in the primary configuration of `dir`; returns its path.
/// A `.conf` is rewritten as a `.conflist` of the same name, as runtimes read both.
pub fn install(dir: &Path, entry: &Map<String, Value>) -> Result<PathBuf, ConflistError> {
    let path = primary(dir)?;
    let text = read(&path)?;
    let invalid = |reason| ConflistError::Invalid {
        path: path.clone(),
        reason,
    };
    let Some(new_text) = with_plugin(&text, entry).map_err(invalid)? else {
        return Ok(path);
    };
    if path.extension().is_some_and(|e| e == "conflist") {
        write_replacing(&path, &new_text)?;
        Ok(path)
    } else {
        let list = path.with_extension("conflist");
        write_replacing(&list, &new_text)?;
        fs::remove_file(&path).map_err(|source| ConflistError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(list)
    }
}

/// Removes ambit-cni from the primary configuration of `dir`, if it is there.
pub fn uninstall(dir: &Path) -> Result<Option<PathBuf>, ConflistError> {
    let path = match primary(dir) {
        Ok(p) => p,
        Err(ConflistError::NoPrimary { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let text = read(&path)?;
    match without_plugin(&text).map_err(|reason| ConflistError::Invalid {
        path: path.clone(),
        reason,
    })? {
        Some(new_text) => {
            write_replacing(&path, &new_text)?;
            Ok(Some(path))
        }
        None => Ok(None),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// A `.conflist`'s object, or a single plugin's `.conf` turned into one.
fn as_list(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Value::Object(object) = value else {
        return Err("not a JSON object".into());
    };
    if object.contains_key("plugins") {
        return Ok(Value::Object(object));
    }
    if !object.contains_key("type") {
        return Err("neither a list (plugins) nor a plugin (type)".into());
    }
    // The list takes the version and name; the plugin keeps the rest.
    let mut list = Map::new();
    let mut plugin = object;
    for key in ["cniVersion", "name"] {
        if let Some(v) = plugin.remove(key) {
            list.insert(key.into(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
    Ok(Value::Object(list))
}

fn plugins_mut(list: &mut Value) -> Result<&mut Vec<Value>, String> {
    list.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| "plugins is not a list".to_owned())
}

/// `None` if `text` already is `list` (compared as JSON).
fn unchanged(text: &str, list: &Value) -> Result<Option<String>, String> {
    let original: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok((original != *list).then(|| pretty(list)))
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

fn read(path: &Path) -> Result<String, ConflistError> {
    fs::read_to_string(path).map_err(|source| ConflistError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, keeping the old file's mode, so the
/// runtime never reads half a file.
fn write_replacing(path: &Path, text: &str) -> Result<(), ConflistError> {
    let io = |source| ConflistError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o644);
    let tmp = path.with_extension("ambit-cni.tmp");
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PRIMARY: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "ptp", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/24"}]]}, "mtu": 1450},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    fn entry() -> Map<String, Value> {
        json!({"agentSocket": "/var/run/ambit/cni.sock"})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn ambit_cni_is_appended_once_and_the_rest_kept_in_order() {
        let added = with_plugin(PRIMARY, &entry()).unwrap().unwrap();
        let v: Value = serde_json::from_str(&added).unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ptp", "portmap", "ambit-cni"]);
        // Key order is the operator's: ptp's "ipam" still comes before "mtu".
        assert!(added.find("\"ipam\"").unwrap() < added.find("\"mtu\"").unwrap());
        assert!(added.find("\"cniVersion\"").unwrap() < added.find("\"plugins\"").unwrap());
        // Again: nothing to do.
        assert_eq!(with_plugin(&added, &entry()).unwrap(), None);
        // A changed entry is updated where it is.
        let mut other = entry();
        other.insert("agentSocket".into(), "/run/other.sock".into());
        let updated = with_plugin(&added, &other).unwrap().unwrap();
        let v: Value = serde_json::from_str(&updated).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(v["plugins"][2]["agentSocket"], "/run/other.sock");
        // Removed: the original configuration, as JSON.
        let removed = without_plugin(&updated).unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&removed).unwrap(),
            serde_json::from_str::<Value>(PRIMARY).unwrap()
        );
        assert_eq!(without_plugin(&removed).unwrap(), None);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf = r#"{"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}"#;
        let v: Value =
            serde_json::from_str(&with_plugin(conf, &entry()).unwrap().unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "net");
        assert_eq!(v["plugins"][0], json!({"type": "bridge", "bridge": "cni0"}));
        assert_eq!(v["plugins"][1]["type"], "ambit-cni");
        assert!(with_plugin("[1]", &entry()).is_err());
        assert!(with_plugin(r#"{"name": "x"}"#, &entry()).is_err());
    }

    #[test]
    fn install_and_uninstall_edit_the_first_file_in_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("10-k8s.conflist"), PRIMARY).unwrap();
        std::fs::write(dir.path().join("99-other.conflist"), PRIMARY).unwrap();
        std::fs::write(dir.path().join("README"), "not a config").unwrap();
        std::fs::set_permissions(
            dir.path().join("10-k8s.conflist"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let path = install(dir.path(), &entry()).unwrap();
        assert_eq!(path, dir.path().join("10-k8s.conflist"));
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("ambit-cni"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("99-other.conflist")).unwrap(),
            PRIMARY
        );
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        install(dir.path(), &entry()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );
        assert_eq!(uninstall(dir.path()).unwrap(), Some(path.clone()));
        assert_eq!(uninstall(dir.path()).unwrap(), None);
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("ambit-cni"));

        let empty = tempfile::tempdir().unwrap();
        let e = install(empty.path(), &entry()).unwrap_err().to_string();
        assert!(e.contains("no CNI network configuration"), "{e}");
        assert_eq!(uninstall(empty.path()).unwrap(), None);
    }
}
