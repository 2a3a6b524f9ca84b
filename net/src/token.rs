//! The bearer token a node agent presents to the control plane (CA and xDS). In a
//! cluster it is a projected service account token that the kubelet rewrites before it
//! expires, so a token from a file is read again for every use, never cached.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("token file {path} is empty")]
    Empty { path: String },
}

/// A token given once, or the file that holds the current one.
#[derive(Clone, PartialEq, Eq)]
pub enum BearerToken {
    Fixed(String),
    File(PathBuf),
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        match self {
            BearerToken::Fixed(_) => f.write_str("BearerToken::Fixed(..)"),
            BearerToken::File(path) => write!(f, "BearerToken::File({})", path.display()),
        }
    }
}

impl BearerToken {
    /// The token to send now.
    pub fn current(&self) -> Result<String, TokenError> {
        match self {
            BearerToken::Fixed(token) => Ok(token.clone()),
            BearerToken::File(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| TokenError::Unreadable {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(TokenError::Empty { path: shown });
                }
                Ok(token.to_owned())
            }
        }
    }
}

impl BearerToken {
    /// The `authorization: Bearer <token>` metadata value to send now.
    pub fn authorization(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, String> {
        let token = self.current().map_err(|e| e.to_string())?;
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not valid ASCII metadata".to_owned())
    }
}

impl From<&str> for BearerToken {
    fn from(token: &str) -> Self {
        BearerToken::Fixed(token.to_owned())
    }
}

impl From<String> for BearerToken {
    fn from(token: String) -> Self {
        BearerToken::Fixed(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_at_every_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = BearerToken::File(path.clone());
        assert!(matches!(
            token.current(),
            Err(TokenError::Unreadable { .. })
        ));
        std::fs::write(&path, "first-token\n").unwrap();
        assert_eq!(token.current().unwrap(), "first-token");
        // The kubelet rotates it: the next use sends the new one.
        std::fs::write(&path, "second-token").unwrap();
        assert_eq!(token.current().unwrap(), "second-token");
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(token.current(), Err(TokenError::Empty { .. })));
        assert!(!format!("{:?}", BearerToken::from("secret")).contains("secret"));
    }
}
