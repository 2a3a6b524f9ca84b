//! Who is calling the CA. Each authenticator looks at the credentials of a request
//! (bearer token, verified peer certificate) and either recognises a caller, reports
//! that the credential it handles is absent (`Ok(None)`), or rejects it.
//!
//! Two now: static tokens from a file (local mode) and the mesh certificate the
//! caller presented over mutual TLS (renewal). Kubernetes TokenReview and node
//! authorization arrive with the control plane and plug in behind the same trait.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ambit_core::certificate::Caller;
use ambit_core::SpiffeId;
use futures::future::BoxFuture;
use serde::Deserialize;

/// What a request carries to prove who sent it.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The token from `authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// The identity of a client certificate already verified by the TLS layer.
    pub peer_identity: Option<SpiffeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{authenticator}: {reason}")]
    Rejected {
        authenticator: &'static str,
        reason: String,
    },
    #[error("no credentials: send `authorization: Bearer <token>` or present a mesh certificate")]
    NoCredentials,
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    AllRejected(Vec<AuthError>),
}

pub trait Authenticator: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;
    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthError>>;
}

/// Tries each authenticator in order; the first that recognises the caller wins.
pub async fn authenticate(
    authenticators: &[Arc<dyn Authenticator>],
    credentials: &Credentials,
) -> Result<Caller, AuthError> {
    let mut errors = Vec::new();
    for a in authenticators {
        match a.authenticate(credentials).await {
            Ok(Some(caller)) => return Ok(caller),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Err(AuthError::NoCredentials),
        1 => Err(errors.remove(0)),
        _ => Err(AuthError::AllRejected(errors)),
    }
}

/// Authenticates the caller of a gRPC request on the CA's port: its bearer token
/// (`authorization: Bearer <token>`) or the mesh certificate the TLS layer verified
/// ([`PeerInfo`](crate::server::PeerInfo)). Shared by every service on that port.
pub async fn authenticate_request<T>(
    authenticators: &[Arc<dyn Authenticator>],
    request: &tonic::Request<T>,
) -> Result<Caller, tonic::Status> {
    let peer = request
        .extensions()
        .get::<crate::server::PeerInfo>()
        .cloned();
    let remote = peer
        .as_ref()
        .map(|p| p.remote.to_string())
        .unwrap_or_default();
    let connection = peer.as_ref().map(|p| p.authenticated.clone());
    let credentials = Credentials {
        bearer_token: bearer_token(request)?,
        peer_identity: peer.and_then(|p| p.identity),
    };
    let caller = authenticate(authenticators, &credentials)
        .await
        .map_err(|e| {
            tracing::warn!(%remote, error = %e, "request not authenticated");
            tonic::Status::unauthenticated(e.to_string())
        })?;
    // The connection has carried an authenticated request: it may stay open.
    if let Some(flag) = connection {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(caller)
}

/// The token of `authorization: Bearer <token>`, if the request has one.
pub fn bearer_token<T>(request: &tonic::Request<T>) -> Result<Option<String>, tonic::Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| tonic::Status::unauthenticated("authorization metadata is not ASCII"))?;
    match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_string()))
        }
        _ => Err(tonic::Status::unauthenticated(
            "authorization metadata must be `Bearer <token>`",
        )),
    }
}

/// One entry of the tokens file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenEntry {
    pub token: String,
    pub identity: SpiffeId,
    #[serde(default)]
    pub node_agent: bool,
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a YAML list of {{token, identity, nodeAgent, node}}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}:{line}: entry {index}: {reason}")]
    Entry {
        path: String,
        /// The line the entry starts on (1-based); 0 when it cannot be told (a flow
        /// sequence).
        line: usize,
        index: usize,
        reason: String,
    },
}

/// Static bearer tokens mapped to callers (local mode). Tokens are kept only as
/// SHA-256 digests and looked up by digest, so neither memory dumps nor lookup timing
/// reveal them.
pub struct TokenAuthenticator {
    callers: HashMap<[u8; 32], Caller>,
}

impl fmt::Debug for TokenAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenAuthenticator({} tokens)", self.callers.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenAuthenticator {
    pub fn from_file(path: &Path) -> Result<Self, TokensFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses the tokens file; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, TokensFileError> {
        let entries: Vec<TokenEntry> = serde_yaml_ng::from_str::<Option<Vec<TokenEntry>>>(text)
            .map_err(|e| TokensFileError::Parse {
                path: origin.to_string(),
                reason: e.to_string(),
            })?
            .unwrap_or_default();
        let lines = entry_lines(text, entries.len());
        let mut callers = HashMap::new();
        for (index, e) in entries.into_iter().enumerate() {
            let bad = |reason: &str| TokensFileError::Entry {
                path: origin.to_string(),
                line: lines.get(index).copied().unwrap_or(0),
                index,
                reason: reason.to_string(),
            };
            if e.token.len() < 16 {
                return Err(bad("token must be at least 16 characters"));
            }
            if e.node_agent && e.node.as_deref().unwrap_or("").is_empty() {
                return Err(bad("nodeAgent: true requires the node it runs on (node)"));
            }
            let caller = Caller {
                identity: e.identity,
                node_agent: e.node_agent,
                node: e.node,
            };
            if callers.insert(digest(&e.token), caller).is_some() {
                return Err(bad("token repeats an earlier entry's token"));
            }
        }
        Ok(TokenAuthenticator { callers })
    }

    pub fn len(&self) -> usize {
        self.callers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }
}

impl Authenticator for TokenAuthenticator {
    fn name(&self) -> &'static str {
        "bearer token"
    }

    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthError>> {
        Box::pin(async move {
            let Some(token) = credentials.bearer_token.as_deref() else {
                return Ok(None);
            };
            match self.callers.get(&digest(token)) {
                Some(caller) => Ok(Some(caller.clone())),
                None => Err(AuthError::Rejected {
                    authenticator: self.name(),
                    reason: "token is not recognised".into(),
                }),
            }
        })
    }
}

/// The line (1-based) each of the `count` top-level entries of a block sequence
/// starts on: the lines beginning with `-`. Empty when that count does not match (a
/// flow sequence, or a layout this does not follow), so no wrong line is ever named.
fn entry_lines(text: &str, count: usize) -> Vec<usize> {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("- ") || *l == "-")
        .map(|(i, _)| i + 1)
        .collect();
    if lines.len() == count {
        lines
    } else {
        Vec::new()
    }
}

/// The tokens file, read again whenever it changes (its modification time or size),
/// so a caller added while the CA runs (a waypoint `ambitctl local apply` starts) is
/// recognised, and one removed is no longer. A file that changed but cannot be read or
/// parsed keeps the tokens last read (and says why in the log): a half-written file
/// never locks every caller out.
pub struct TokensFile {
    path: std::path::PathBuf,
    current: std::sync::RwLock<(Option<FileStamp>, Arc<TokenAuthenticator>)>,
}

/// What tells that the file changed: modification time, size, and inode (a file
/// replaced by a rename).
type FileStamp = (std::time::SystemTime, u64, u64);

impl fmt::Debug for TokensFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokensFile({})", self.path.display())
    }
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

impl TokensFile {
    /// Reads `path`; errors if it cannot be read or parsed now.
    pub fn open(path: &Path) -> Result<Self, TokensFileError> {
        let at = stamp(path);
        let tokens = TokenAuthenticator::from_file(path)?;
        Ok(TokensFile {
            path: path.to_owned(),
            current: std::sync::RwLock::new((at, Arc::new(tokens))),
        })
    }

    /// The tokens as the file holds them now (or as last read, if it cannot be).
    fn tokens(&self) -> Arc<TokenAuthenticator> {
        let now = stamp(&self.path);
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0 == now {
                return current.1.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 != now {
            // Whatever happens, this version of the file is not read again.
            current.0 = now;
            match TokenAuthenticator::from_file(&self.path) {
                Ok(tokens) => {
                    tracing::info!(path = %self.path.display(), tokens = tokens.len(), "bearer tokens read again: the file changed");
                    current.1 = Arc::new(tokens);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the tokens file changed but cannot be read; keeping the tokens read before")
                }
            }
        }
        current.1.clone()
    }

    pub fn len(&self) -> usize {
        self.tokens().len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens().is_empty()
    }
}

impl Authenticator for TokensFile {
    fn name(&self) -> &'static str {
        "bearer token"
    }

    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthError>> {
        let tokens = self.tokens();
        Box::pin(async move { tokens.authenticate(credentials).await })
    }
}

/// A caller presenting a mesh certificate (verified to chain to the mesh root by the
/// TLS layer) is that certificate's identity. Such callers are never node agents: a
/// certificate does not say which node it runs on, so impersonation needs a token.
#[derive(Debug, Default)]
pub struct PeerCertificateAuthenticator;

impl Authenticator for PeerCertificateAuthenticator {
    fn name(&self) -> &'static str {
        "client certificate"
    }

    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthError>> {
        Box::pin(async move {
            Ok(credentials.peer_identity.clone().map(|identity| Caller {
                identity,
                node_agent: false,
                node: None,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
- token: "workload-token-0123456789"
  identity: spiffe://cluster.local/ns/shop/sa/cart
- token: "node-agent-token-0123456789"
  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel
  nodeAgent: true
  node: node-a
"#;

    fn chain() -> Vec<Arc<dyn Authenticator>> {
        vec![
            Arc::new(TokenAuthenticator::from_yaml(FILE, "tokens.yaml").unwrap()),
            Arc::new(PeerCertificateAuthenticator),
        ]
    }

    fn creds(token: Option<&str>, peer: Option<&str>) -> Credentials {
        Credentials {
            bearer_token: token.map(String::from),
            peer_identity: peer.map(|p| SpiffeId::parse(p).unwrap()),
        }
    }

    #[tokio::test]
    async fn a_tokens_file_replaced_by_a_rename_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, FILE).unwrap();
        let tokens = TokensFile::open(&path).unwrap();
        // Same length, same modification time: only the inode tells.
        let swapped = FILE.replace("workload-token-0123456789", "workload-token-9876543210");
        let next = dir.path().join("tokens.yaml.new");
        std::fs::write(&next, &swapped).unwrap();
        let at = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::File::options()
            .write(true)
            .open(&next)
            .unwrap()
            .set_modified(at)
            .unwrap();
        std::fs::rename(&next, &path).unwrap();
        let creds = creds(Some("workload-token-9876543210"), None);
        assert!(futures::executor::block_on(tokens.authenticate(&creds))
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn a_changed_tokens_file_is_read_again_and_a_broken_one_keeps_the_last_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, FILE).unwrap();
        let tokens = TokensFile::open(&path).unwrap();
        let added = "added-waypoint-token-0123456789";
        let who = |tokens: &TokensFile, token: &str| {
            let creds = creds(Some(token), None);
            futures::executor::block_on(tokens.authenticate(&creds))
                .map(|c| c.map(|c| c.identity.to_string()))
        };
        assert!(who(&tokens, added).is_err());
        let more = format!(
            "{FILE}- token: \"{added}\"\n  identity: spiffe://cluster.local/ns/shop/sa/wp\n"
        );
        std::fs::write(&path, &more).unwrap();
        assert_eq!(
            who(&tokens, added).unwrap().as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/wp")
        );
        assert_eq!(tokens.len(), 3);
        // Half written: the tokens read before still hold.
        std::fs::write(&path, "- token: [").unwrap();
        assert!(who(&tokens, added).unwrap().is_some());
        // Removed: no longer recognised.
        std::fs::write(&path, FILE).unwrap();
        assert!(who(&tokens, added).is_err());
        assert!(who(&tokens, "workload-token-0123456789").unwrap().is_some());
    }

    #[tokio::test]
    async fn authentication_table() {
        let chain = chain();
        let cases = [
            (
                creds(Some("workload-token-0123456789"), None),
                Ok(("spiffe://cluster.local/ns/shop/sa/cart", false)),
            ),
            (
                creds(Some("node-agent-token-0123456789"), None),
                Ok(("spiffe://cluster.local/ns/ambit-system/sa/ztunnel", true)),
            ),
            (
                creds(None, Some("spiffe://cluster.local/ns/shop/sa/pay")),
                Ok(("spiffe://cluster.local/ns/shop/sa/pay", false)),
            ),
            (
                creds(
                    Some("wrong-token-000000000"),
                    Some("spiffe://cluster.local/ns/shop/sa/pay"),
                ),
                Ok(("spiffe://cluster.local/ns/shop/sa/pay", false)),
            ),
            (
                creds(Some("wrong-token-000000000"), None),
                Err("bearer token: token is not recognised"),
            ),
            (creds(None, None), Err("no credentials")),
        ];
        for (c, want) in cases {
            let got = authenticate(&chain, &c).await;
            match (got, want) {
                (Ok(caller), Ok((id, agent))) => {
                    assert_eq!(caller.identity.as_str(), id);
                    assert_eq!(caller.node_agent, agent);
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{e}"),
                (got, want) => panic!("{c:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn tokens_file_errors_name_the_entry() {
        let cases = [
            ("- token: short\n  identity: spiffe://cluster.local/ns/a/sa/b\n", "t.yaml:1: entry 0: token must be at least 16"),
            ("- token: aaaaaaaaaaaaaaaaaaaa\n  identity: spiffe://cluster.local/ns/a/sa/b\n  nodeAgent: true\n", "entry 0: nodeAgent: true requires"),
            ("- token: aaaaaaaaaaaaaaaaaaaa\n  identity: spiffe://cluster.local/ns/a/sa/b\n- token: aaaaaaaaaaaaaaaaaaaa\n  identity: spiffe://cluster.local/ns/a/sa/c\n", "t.yaml:3: entry 1: token repeats"),
            ("- token: aaaaaaaaaaaaaaaaaaaa\n  identity: http://x\n", "must start with \"spiffe://\""),
            // A parse error names the line (the YAML library's position).
            ("- token: aaaaaaaaaaaaaaaaaaaa\n  identity: spiffe://cluster.local/ns/a/sa/b\n- token: [\n", "line 3 column 10"),
            // A flow sequence: the entry, without a line that might be wrong.
            ("[{token: short, identity: spiffe://cluster.local/ns/a/sa/b}]", "t.yaml:0: entry 0: token must"),
            ("- token: aaaaaaaaaaaaaaaaaaaa\n  identity: spiffe://cluster.local/ns/a/sa/b\n  nodeagent: true\n", "unknown field `nodeagent`"),
            ("token: x\n", "not a YAML list"),
        ];
        for (text, want) in cases {
            let e = TokenAuthenticator::from_yaml(text, "t.yaml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.starts_with("t.yaml"), "{text:?}: {e}");
        }
        assert!(TokenAuthenticator::from_yaml("", "t.yaml")
            .unwrap()
            .is_empty());
    }
}
