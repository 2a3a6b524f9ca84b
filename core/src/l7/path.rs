//! Request paths: Istio's `BASE` normalization (reference §1.8) and the path forms a
//! policy's `paths`/`notPaths` may use (§1.2): exact, `prefix*`, `*suffix`, `*`, and
//! the URI templates `{*}` and `{**}`.
//!
//! Normalization, in order, on the part before the first `?` only:
//! 1. `%00` is refused (the waypoint answers 400): a NUL cut short by the backend would
//!    make it see another path than the one authorized;
//! 2. `%XX` is decoded when it encodes one of `-` `.` `0-9` `A-Z` `a-z` `_` `~` (hex
//!    digits in either case), exactly once: `%25` (`%`) is not among them, so `%252e`
//!    stays as written and can never become a dot later;
//! 3. `\` becomes `/`;
//! 4. `.` and `..` segments are resolved as RFC 3986 §5.2.4 does (`..` above the root
//!    stays at the root).
//!
//! Other percent-encodings (`%2F`, `%5C`, ...) and repeated slashes stay as they are,
//! as with Istio's default; the query is kept apart, never matched, and forwarded
//! unchanged. A `%` that starts no valid escape is written `%25` (Ambit's choice, so
//! that no decoding after ours can turn `%%32%65` into a dot segment); with it the
//! normalization is idempotent.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A request path after normalization, with the query string it arrived with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalizedPath {
    path: String,
    query: Option<String>,
}

impl NormalizedPath {
    /// The normalized path, without the query: what policies match.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What followed the first `?`, unchanged (`None` when there was no `?`).
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The request target the backend receives: the normalized path, then `?` and
    /// the query if there was one.
    pub fn to_request_target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// Why a path is refused. Every variant is answered with HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains %00")]
    EncodedNul,
    #[error("the path contains a control character (byte {0:#04x})")]
    ControlCharacter(u8),
    #[error("the path {0:?} does not start with `/`")]
    NotAbsolute(String),
}

impl PathError {
    /// The HTTP status a request with this path gets.
    pub fn status(&self) -> u16 {
        400
    }

    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::EncodedNul => "path_encoded_nul",
            PathError::ControlCharacter(_) => "path_control_character",
            PathError::NotAbsolute(_) => "path_not_absolute",
        }
    }
}

/// Normalizes a request target's path (`/a/%2e%2e/b?x=1` → path `/b`, query `x=1`).
/// An empty path is `/`; the asterisk form (`*`, for `OPTIONS *`) is kept as it is.
pub fn normalize_path(raw: &str) -> Result<NormalizedPath, PathError> {
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (raw, None),
    };
    if let Some(b) = path.bytes().find(|b| b.is_ascii_control()) {
        return Err(PathError::ControlCharacter(b));
    }
    if path.is_empty() {
        return Ok(NormalizedPath {
            path: "/".into(),
            query,
        });
    }
    if path == "*" {
        return Ok(NormalizedPath {
            path: path.into(),
            query,
        });
    }
    let decoded = decode_unreserved(path)?;
    if !decoded.starts_with('/') {
        return Err(PathError::NotAbsolute(path.to_owned()));
    }
    Ok(NormalizedPath {
        path: remove_dot_segments(&decoded),
        query,
    })
}

/// Steps 1–3: `%00` refused, unreserved characters decoded once, `\` to `/`.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (hi, lo) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                );
                match (hi, lo) {
                    (Some(0), Some(0)) => return Err(PathError::EncodedNul),
                    (Some(h), Some(l)) => {
                        let c = char::from(h << 4 | l);
                        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                            out.push(c);
                        } else {
                            // Kept as written, hex digits and all.
                            out.push_str(&path[i..i + 3]);
                        }
                        i += 3;
                    }
                    _ => {
                        // A `%` that starts no escape is escaped itself, so that
                        // decoding can never join it with what follows into a new
                        // escape (`%%32%65` must not reach the backend as `%2e`).
                        out.push_str("%25");
                        i += 1;
                    }
                }
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // Copy up to the next byte of interest in one go (keeps UTF-8 whole).
                let next = bytes[i + 1..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |n| i + 1 + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §5.2.4 over an absolute path (starting with `/`).
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        // A dot segment at the end leaves a directory: `/a/b/..` is `/a/`.
        if i == last {
            out.push("");
        }
    }
    let mut result = String::with_capacity(path.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

/// One value of `paths`/`notPaths`: Istio's string forms, or a URI template when it
/// holds `{*}` or `{**}`. Matched case-sensitively against the normalized path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any path.
    Presence,
    Template(PathTemplate),
}

impl PathMatch {
    /// Reads a policy's path value; a template must be valid (§1.2).
    pub fn parse(value: &str) -> Result<PathMatch, String> {
        if value.contains("{*}") || value.contains("{**}") {
            return PathTemplate::parse(value).map(PathMatch::Template);
        }
        Ok(match crate::authz::StringMatch::parse(value) {
            crate::authz::StringMatch::Exact(s) => PathMatch::Exact(s),
            crate::authz::StringMatch::Prefix(s) => PathMatch::Prefix(s),
            crate::authz::StringMatch::Suffix(s) => PathMatch::Suffix(s),
            crate::authz::StringMatch::Presence => PathMatch::Presence,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(s) => path == s,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Suffix(s) => path.ends_with(s.as_str()),
            PathMatch::Presence => !path.is_empty(),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

impl TryFrom<String> for PathMatch {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        PathMatch::parse(&s)
    }
}

impl From<PathMatch> for String {
    fn from(m: PathMatch) -> Self {
        m.to_string()
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Exact(s) => f.write_str(s),
            PathMatch::Prefix(p) => write!(f, "{p}*"),
            PathMatch::Suffix(s) => write!(f, "*{s}"),
            PathMatch::Presence => f.write_str("*"),
            PathMatch::Template(t) => f.write_str(&t.text),
        }
    }
}

/// A path template: `/` separated segments, each a literal, `{*}` (exactly one
/// non-empty segment) or `{**}` (zero or more segments, whatever they hold; only as the
/// last operator). `/api/{*}/items/{**}` matches `/api/v1/items/` and
/// `/api/v1/items/a/b`, not `/api/items/a`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    /// What precedes a `{**}`, split in segments; the whole template without one.
    head: Vec<Segment>,
    /// After a `{**}`: the literal the path must end with (empty: anything). `None`:
    /// the template has no `{**}`.
    tail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
}

impl PathTemplate {
    /// Istio's rules: starts with `/`; an operator fills its segment alone; no `*`,
    /// `{` or `}` outside an operator; `{**}` at most once and after every `{*}`.
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        if !text.starts_with('/') {
            return Err(format!("path template {text:?} must start with `/`"));
        }
        let segments: Vec<&str> = text[1..].split('/').collect();
        let mut head = Vec::new();
        let mut tail: Option<Vec<&str>> = None;
        for segment in segments {
            match segment {
                "{**}" if tail.is_some() => {
                    return Err(format!(
                        "path template {text:?}: {{**}} may appear only once"
                    ))
                }
                "{**}" => tail = Some(Vec::new()),
                "{*}" if tail.is_some() => {
                    return Err(format!(
                        "path template {text:?}: {{**}} must be the last operator"
                    ))
                }
                "{*}" => head.push(Segment::One),
                s if s.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "path template {text:?}: segment {s:?} may hold only a literal, {{*}} or {{**}}"
                    ))
                }
                s => match &mut tail {
                    Some(t) => t.push(s),
                    None => head.push(Segment::Literal(s.to_owned())),
                },
            }
        }
        Ok(PathTemplate {
            text: text.to_owned(),
            head,
            tail: tail.map(|t| t.iter().map(|s| format!("/{s}")).collect()),
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let n = self.head.len();
        for (i, segment) in self.head.iter().enumerate() {
            let end = rest.find('/');
            // The last head segment of a template without `{**}` takes the rest.
            let (this, after) = match end {
                Some(e) => (&rest[..e], Some(&rest[e + 1..])),
                None => (rest, None),
            };
            let ok = match segment {
                Segment::Literal(l) => this == l,
                Segment::One => !this.is_empty(),
            };
            if !ok {
                return false;
            }
            match (after, i + 1 == n) {
                (Some(a), false) => rest = a,
                (None, false) => return false,
                (after, true) => {
                    return match &self.tail {
                        // `{**}` follows: the path continues with `/`, anything, then
                        // the literal tail.
                        Some(tail) => after.is_some_and(|a| {
                            let a = format!("/{a}");
                            a.len() >= tail.len() && a.ends_with(tail.as_str())
                        }),
                        None => after.is_none(),
                    };
                }
            }
        }
        // Only `{**}` (and its tail) after the leading `/`.
        match &self.tail {
            Some(tail) => {
                let a = format!("/{rest}");
                a.ends_with(tail.as_str())
            }
            None => rest.is_empty(),
        }
    }
}
