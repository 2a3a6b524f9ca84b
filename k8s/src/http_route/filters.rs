//! A route rule's `filters`, read with the CRDs' validation: HTTPRoute takes
//! `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`
//! and `RequestMirror`; GRPCRoute the header modifiers and `RequestMirror`.
//! `ExtensionRef` names an implementation's own filter: Ambit has none, so a rule
//! with one is refused rather than routed without it.

use ambit_core::route::{
    Filters, HeaderModifier, Mirror, PathModifier, Redirect, Rewrite, RouteMatch,
};
use serde_json::Value;

use super::{backend, list, number, port, text, Flavour, PathMatch};
use crate::resources::ObjectKey;

const MAX_FILTERS: usize = 16;
const MAX_HEADERS: usize = 16;
const MAX_VALUE: usize = 4096;

/// The filters of `rule` (at `path`), whose matches are `matches`.
pub(super) fn filters(
    rule: &Value,
    path: &str,
    flavour: Flavour,
    matches: &[RouteMatch],
    key: &ObjectKey,
) -> Result<Filters, String> {
    let mut out = Filters::default();
    let at = format!("{path}.filters");
    for (i, f) in list(rule.get("filters"), &at, MAX_FILTERS)?
        .iter()
        .enumerate()
    {
        let at = format!("{at}[{i}]");
        let kind = text(f, "type", &at)?.ok_or_else(|| format!("{at}.type: is required"))?;
        let allowed: &[&str] = match flavour {
            Flavour::Http => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestRedirect",
                "URLRewrite",
                "RequestMirror",
            ],
            Flavour::Grpc => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
            ],
        };
        if kind == "ExtensionRef" {
            return Err(format!(
                "{at}: ExtensionRef filters are not supported by Ambit (it has no filter of its own to refer to)"
            ));
        }
        if !allowed.contains(&kind) {
            return Err(format!(
                "{at}.type: {kind:?} is not one of {}",
                allowed.join(", ")
            ));
        }
        // The CRD: the field named after the type is set, and no other.
        let field = field_of(kind);
        for other in [
            "requestHeaderModifier",
            "responseHeaderModifier",
            "requestRedirect",
            "urlRewrite",
            "requestMirror",
            "extensionRef",
        ] {
            let set = f.get(other).is_some_and(|v| !v.is_null());
            if other == field && !set {
                return Err(format!("{at}.{other}: is required for type {kind}"));
            }
            if other != field && set {
                return Err(format!("{at}.{other}: must not be set for type {kind}"));
            }
        }
        let body = &f[field];
        let body_at = format!("{at}.{field}");
        let once = |slot_taken: bool| {
            if slot_taken {
                Err(format!("{at}: a rule may have one {kind} filter"))
            } else {
                Ok(())
            }
        };
        match kind {
            "RequestHeaderModifier" => {
                once(out.request_headers.is_some())?;
                out.request_headers = Some(header_modifier(body, &body_at)?);
            }
            "ResponseHeaderModifier" => {
                once(out.response_headers.is_some())?;
                out.response_headers = Some(header_modifier(body, &body_at)?);
            }
            "RequestRedirect" => {
                once(out.redirect.is_some())?;
                out.redirect = Some(redirect(body, &body_at, matches)?);
            }
            "URLRewrite" => {
                once(out.rewrite.is_some())?;
                out.rewrite = Some(rewrite(body, &body_at, matches)?);
            }
            _ => out.mirrors.push(mirror(body, &body_at, key)?),
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(format!(
            "{at}: RequestRedirect and URLRewrite may not both be used in one rule"
        ));
    }
    Ok(out)
}

fn field_of(kind: &str) -> &'static str {
    match kind {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestRedirect" => "requestRedirect",
        "URLRewrite" => "urlRewrite",
        "RequestMirror" => "requestMirror",
        _ => "extensionRef",
    }
}

fn header_modifier(m: &Value, at: &str) -> Result<HeaderModifier, String> {
    if !m.is_object() {
        return Err(format!("{at}: must be an object"));
    }
    let pairs = |field: &str| -> Result<Vec<(String, String)>, String> {
        let at = format!("{at}.{field}");
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, h) in list(m.get(field), &at, MAX_HEADERS)?.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let name = header_name(text(h, "name", &at)?, &format!("{at}.name"))?;
            let value = text(h, "value", &at)?.ok_or_else(|| format!("{at}.value: is required"))?;
            if value.is_empty() || value.len() > MAX_VALUE {
                return Err(format!(
                    "{at}.value: must be 1 to {MAX_VALUE} characters, not {}",
                    value.len()
                ));
            }
            http::HeaderValue::from_str(value)
                .map_err(|_| format!("{at}.value: {value:?} is not a valid header value"))?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(format!("{at}.name: {name:?} is listed twice"));
            }
            out.push((name, value.to_owned()));
        }
        Ok(out)
    };
    let set = pairs("set")?;
    let add = pairs("add")?;
    let mut remove: Vec<String> = Vec::new();
    let remove_at = format!("{at}.remove");
    for (i, n) in list(m.get("remove"), &remove_at, MAX_HEADERS)?
        .iter()
        .enumerate()
    {
        let at = format!("{remove_at}[{i}]");
        let name = header_name(n.as_str(), &at)?;
        if remove.contains(&name) {
            return Err(format!("{at}: {name:?} is listed twice"));
        }
        remove.push(name);
    }
    Ok(HeaderModifier { set, add, remove })
}

/// A header name as the CRD's `HTTPHeaderName`, lower-cased. Pseudo-headers and the
/// framing headers are refused: rewriting them would change what the request is.
pub(crate) fn header_name(name: Option<&str>, at: &str) -> Result<String, String> {
    let name = match name {
        Some(n) if !n.is_empty() => n,
        _ => return Err(format!("{at}: is required")),
    };
    if name.len() > 256 || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("{at}: {name:?} is not a valid header name"));
    }
    let lower = name.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade" | "te"
    ) {
        return Err(format!(
            "{at}: {name:?} may not be modified by a filter (use URLRewrite for the host)"
        ));
    }
    Ok(lower)
}

/// A `path` modifier of a redirect or rewrite. `ReplacePrefixMatch` needs the rule to
/// have exactly one match, a `PathPrefix` (the CRD's rule).
fn path_modifier(p: &Value, at: &str, matches: &[RouteMatch]) -> Result<PathModifier, String> {
    let kind = text(p, "type", at)?.ok_or_else(|| format!("{at}.type: is required"))?;
    let full = text(p, "replaceFullPath", at)?;
    let prefix = text(p, "replacePrefixMatch", at)?;
    let check = |v: &str, field: &str| -> Result<(), String> {
        if v.len() > 1024 || (!v.is_empty() && !v.starts_with('/')) || v.contains(['?', '#']) {
            return Err(format!(
                "{at}.{field}: {v:?} must be an absolute path of at most 1024 characters, without '?' or '#'"
            ));
        }
        Ok(())
    };
    match kind {
        "ReplaceFullPath" => {
            if prefix.is_some() {
                return Err(format!(
                    "{at}.replacePrefixMatch: must not be set for type ReplaceFullPath"
                ));
            }
            let full = full.ok_or_else(|| format!("{at}.replaceFullPath: is required"))?;
            check(full, "replaceFullPath")?;
            Ok(PathModifier::Full(if full.is_empty() {
                "/".to_owned()
            } else {
                full.to_owned()
            }))
        }
        "ReplacePrefixMatch" => {
            if full.is_some() {
                return Err(format!(
                    "{at}.replaceFullPath: must not be set for type ReplacePrefixMatch"
                ));
            }
            let prefix = prefix.ok_or_else(|| format!("{at}.replacePrefixMatch: is required"))?;
            check(prefix, "replacePrefixMatch")?;
            let one_prefix =
                matches.len() == 1 && matches!(matches[0].path, Some(PathMatch::Prefix(_)));
            // A rule without matches is `PathPrefix /`.
            if !(one_prefix || matches.is_empty()) {
                return Err(format!(
                    "{at}: ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix"
                ));
            }
            Ok(PathModifier::Prefix(prefix.to_owned()))
        }
        other => Err(format!(
            "{at}.type: {other:?} is not ReplaceFullPath or ReplacePrefixMatch"
        )),
    }
}

/// The CRD's `PreciseHostname`: a DNS name, no wildcard.
pub(crate) fn hostname(h: Option<&str>, at: &str) -> Result<Option<String>, String> {
    let Some(h) = h else { return Ok(None) };
    let valid = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(format!("{at}: {h:?} is not a hostname"));
    }
    Ok(Some(h.to_owned()))
}

fn redirect(r: &Value, at: &str, matches: &[RouteMatch]) -> Result<Redirect, String> {
    if !r.is_object() {
        return Err(format!("{at}: must be an object"));
    }
    let scheme = match text(r, "scheme", at)? {
        None => None,
        Some(s @ ("http" | "https")) => Some(s.to_owned()),
        Some(other) => return Err(format!("{at}.scheme: {other:?} is not http or https")),
    };
    let status = match number(r, "statusCode", at, 999)? {
        None => 302,
        Some(s @ (301 | 302 | 303 | 307 | 308)) => s as u16,
        Some(other) => {
            return Err(format!(
                "{at}.statusCode: {other} is not 301, 302, 303, 307 or 308"
            ))
        }
    };
    let path = match r.get("path").filter(|p| !p.is_null()) {
        None => None,
        Some(p) => Some(path_modifier(p, &format!("{at}.path"), matches)?),
    };
    Ok(Redirect {
        scheme,
        hostname: hostname(text(r, "hostname", at)?, &format!("{at}.hostname"))?,
        path,
        port: port(r, at)?,
        status,
    })
}

fn rewrite(r: &Value, at: &str, matches: &[RouteMatch]) -> Result<Rewrite, String> {
    if !r.is_object() {
        return Err(format!("{at}: must be an object"));
    }
    let path = match r.get("path").filter(|p| !p.is_null()) {
        None => None,
        Some(p) => Some(path_modifier(p, &format!("{at}.path"), matches)?),
    };
    Ok(Rewrite {
        hostname: hostname(text(r, "hostname", at)?, &format!("{at}.hostname"))?,
        path,
    })
}

/// `RequestMirror`: `backendRef`, and `percent` or `fraction` (not both).
fn mirror(m: &Value, at: &str, key: &ObjectKey) -> Result<Mirror, String> {
    let backend_at = format!("{at}.backendRef");
    let b = m
        .get("backendRef")
        .filter(|b| b.is_object())
        .ok_or_else(|| format!("{backend_at}: is required"))?;
    if b.get("weight").is_some_and(|w| !w.is_null()) {
        return Err(format!("{backend_at}.weight: a mirror has no weight"));
    }
    let backend = backend(b, &backend_at, key)?;
    let percent = number(m, "percent", at, 100)?;
    let fraction = m.get("fraction").filter(|f| !f.is_null());
    let share_ppm = match (percent, fraction) {
        (Some(_), Some(_)) => {
            return Err(format!("{at}: percent and fraction may not both be set"))
        }
        (Some(p), None) => u32::try_from(p * 10_000).unwrap_or(Mirror::ALL),
        (None, Some(f)) => {
            let fat = format!("{at}.fraction");
            let numerator = number(f, "numerator", &fat, u64::from(u32::MAX))?
                .ok_or_else(|| format!("{fat}.numerator: is required"))?;
            let denominator = number(f, "denominator", &fat, u64::from(u32::MAX))?.unwrap_or(100);
            if denominator == 0 || numerator > denominator {
                return Err(format!(
                    "{fat}: numerator {numerator} must be at most denominator {denominator}, which must not be 0"
                ));
            }
            u32::try_from(numerator * u64::from(Mirror::ALL) / denominator).unwrap_or(Mirror::ALL)
        }
        (None, None) => Mirror::ALL,
    };
    Ok(Mirror { backend, share_ppm })
}
