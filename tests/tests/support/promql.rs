//! What a Grafana dashboard asks Prometheus for: the metrics its panels' PromQL
//! selects and the labels it selects or groups them by, read well enough for the
//! dashboards in `deploy/observability/grafana/` (selectors, `by (...)`, functions,
//! range brackets, strings, `label_values(...)` variables).

use std::collections::{BTreeMap, BTreeSet};

/// Metric name → every label a dashboard's queries use with it.
pub type Uses = BTreeMap<String, BTreeSet<String>>;

/// Operators and aggregations: never metric names, even when not followed by `(`
/// (`sum by (pod) (...)`).
const KEYWORDS: [&str; 22] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The metrics and labels of every query of the dashboard JSON `dashboard`.
pub fn dashboard_uses(dashboard: &serde_json::Value) -> Uses {
    let mut uses = Uses::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                add(&mut uses, expr);
            }
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"].as_str().or(var["query"].as_str());
        if let Some(inner) = query.and_then(|q| q.strip_prefix("label_values(")) {
            let inner = inner.trim_end_matches(')');
            let (expr, label) = inner.rsplit_once(',').unwrap_or((inner, ""));
            let mut one = Uses::new();
            add(&mut one, expr);
            for labels in one.values_mut() {
                labels.insert(label.trim().to_owned());
            }
            merge(&mut uses, one);
        }
    }
    uses
}

fn merge(into: &mut Uses, from: Uses) {
    for (metric, labels) in from {
        into.entry(metric).or_default().extend(labels);
    }
}

/// Adds one expression's metrics, each with its selector's labels and every label the
/// expression groups by.
pub fn add(uses: &mut Uses, expr: &str) {
    let chars: Vec<char> = expr.chars().collect();
    let mut metrics: Vec<(String, BTreeSet<String>)> = Vec::new();
    let mut grouping = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next = chars.get(j).copied();
            if word == "by" || word == "without" {
                let (labels, end) = label_list(&chars, j);
                grouping.extend(labels);
                i = end;
            } else if KEYWORDS.contains(&word.as_str()) || next == Some('(') {
                // An operator keyword, or a function.
            } else if next == Some('{') {
                let (labels, end) = selector(&chars, j);
                metrics.push((word, labels));
                i = end;
            } else {
                metrics.push((word, BTreeSet::new()));
            }
        } else {
            i += 1;
        }
    }
    for (metric, mut labels) in metrics {
        labels.extend(grouping.iter().cloned());
        uses.entry(metric).or_default().extend(labels);
    }
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i] != '"' {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// `( a, b )` at `start`: the names, and the index after `)`.
fn label_list(chars: &[char], start: usize) -> (Vec<String>, usize) {
    let end = (start..chars.len())
        .find(|&k| chars[k] == ')')
        .unwrap_or(chars.len());
    let inner: String = chars[start + 1..end].iter().collect();
    let labels = inner
        .split(',')
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    (labels, end + 1)
}

/// `{a="x", b=~"y"}` at `start`: the label names, and the index after `}`.
fn selector(chars: &[char], start: usize) -> (BTreeSet<String>, usize) {
    let mut labels = BTreeSet::new();
    let mut i = start + 1;
    let mut name = String::new();
    while i < chars.len() && chars[i] != '}' {
        let c = chars[i];
        if c == '"' {
            i = skip_string(chars, i);
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
        } else if matches!(c, '=' | '!' | '~') {
            if !name.is_empty() {
                labels.insert(std::mem::take(&mut name));
            }
        } else {
            name.clear();
        }
        i += 1;
    }
    (labels, i + 1)
}

/// The series names an exposition's `# TYPE` lines declare, each with the labels its
/// samples carry (counters as `<name>_total`, histograms as `_bucket` with `le`,
/// `_sum` and `_count`).
pub fn exposed(text: &str) -> Uses {
    let mut out = Uses::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            };
            for n in names {
                out.entry(n).or_default();
            }
        } else if !line.starts_with('#') {
            let Some((series, _)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let entry = out.entry(name.to_owned()).or_default();
            for pair in labels.trim_end_matches('}').split("\",") {
                if let Some((k, _)) = pair.split_once("=\"") {
                    entry.insert(k.trim_start_matches(',').to_owned());
                }
            }
        }
    }
    out
}

/// What `uses` asks for that `exposed` lacks, leaving out the labels Prometheus adds
/// at scrape time (`target_labels`): one line each.
pub fn missing(uses: &Uses, exposed: &Uses, target_labels: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for (metric, labels) in uses {
        let Some(have) = exposed.get(metric) else {
            out.push(format!("metric {metric}"));
            continue;
        };
        for label in labels {
            if !have.contains(label) && !target_labels.contains(label) {
                out.push(format!("label {label} of {metric}"));
            }
        }
    }
    out
}
