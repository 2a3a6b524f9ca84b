//! Where the CA's signing material lives. Istio's file names are used everywhere, so
//! a plug-in intermediate (`cacerts`) under a corporate root drops in unchanged:
//! `ca-cert.pem` (the signing certificate), `ca-key.pem` (its key), `cert-chain.pem`
//! (intermediates up to the root, possibly empty) and `root-cert.pem` (the mesh root).
//!
//! Local mode keeps them in a directory; the Kubernetes Secret store arrives with the
//! control plane and implements the same trait.
//!
//! The directory store writes the key first, mode 0600 in a 0700 directory, each file
//! via rename. With no files the CA generates a self-signed ECDSA P-256 root valid
//! 10 years. A plug-in intermediate is checked at load: its key matches `ca-cert.pem`,
//! it is a CA, each link of the chain is signed by the next, none has expired. A partial
//! directory is an error naming the missing files; it is never overwritten.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The four pieces of CA material, PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_chain_pem: String,
    pub root_cert_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CaMaterial").finish_non_exhaustive()
    }
}

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: has {present} but not {missing}; provide all of ca-cert.pem, ca-key.pem and root-cert.pem (cert-chain.pem optional), or none to generate a root")]
    Incomplete {
        dir: PathBuf,
        present: String,
        missing: String,
    },
}

/// Storage of the CA's material.
pub trait RootStore: Send + Sync + std::fmt::Debug {
    /// The stored material, or `None` when nothing is stored yet.
    fn load(&self) -> Result<Option<CaMaterial>, StoreError>;
    /// Stores newly generated material. Never called when `load` found some.
    fn save(&self, material: &CaMaterial) -> Result<(), StoreError>;
    /// Where the material lives, for logs.
    fn location(&self) -> String;
}

/// A directory holding Istio-named PEM files; the key file is written mode 0600.
#[derive(Debug, Clone)]
pub struct DirectoryStore {
    dir: PathBuf,
}

impl DirectoryStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirectoryStore { dir: dir.into() }
    }

    fn read(&self, name: &str) -> Result<Option<String>, StoreError> {
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }
}

impl RootStore for DirectoryStore {
    fn load(&self) -> Result<Option<CaMaterial>, StoreError> {
        let cert = self.read(CA_CERT)?;
        let key = self.read(CA_KEY)?;
        let root = self.read(ROOT_CERT)?;
        let chain = self.read(CERT_CHAIN)?;
        let required = [(CA_CERT, &cert), (CA_KEY, &key), (ROOT_CERT, &root)];
        let present: Vec<&str> = required
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(n, _)| *n)
            .collect();
        let missing: Vec<&str> = required
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        match (cert, key, root) {
            (Some(ca_cert_pem), Some(ca_key_pem), Some(root_cert_pem)) => Ok(Some(CaMaterial {
                ca_cert_pem,
                ca_key_pem,
                cert_chain_pem: chain.unwrap_or_default(),
                root_cert_pem,
            })),
            (None, None, None) if chain.is_none() => Ok(None),
            _ => Err(StoreError::Incomplete {
                dir: self.dir.clone(),
                present: if present.is_empty() {
                    CERT_CHAIN.to_string()
                } else {
                    present.join(", ")
                },
                missing: missing.join(", "),
            }),
        }
    }

    fn save(&self, m: &CaMaterial) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io(&self.dir))?;
        // Key first, so a crash never leaves certificates without their key; each
        // file is written to a temporary name and renamed into place.
        for (name, content, mode) in [
            (CA_KEY, &m.ca_key_pem, 0o600),
            (CA_CERT, &m.ca_cert_pem, 0o644),
            (CERT_CHAIN, &m.cert_chain_pem, 0o644),
            (ROOT_CERT, &m.root_cert_pem, 0o644),
        ] {
            let path = self.dir.join(name);
            let tmp = self.dir.join(format!(".{name}.tmp"));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(content.as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}
