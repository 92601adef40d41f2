//! The deployment files under `deploy/`: the Prometheus rules pass promtool and their unit tests
//! (`scripts/check-deploy.sh`); every alert has a duration, a severity, a summary, a description
//! and a runbook entry that exists in `docs/operations.md`, and is unit-tested both firing and
//! not firing; and every metric the rules and the Grafana dashboard name is one that a PCF in
//! cluster mode exports at /metrics, with the labels they select and group by.
//!
//! The PromQL and the rule files are read with small parsers of their own (no YAML or PromQL
//! crate): enough for the files this repository writes, and strict where it matters, since an
//! unknown identifier counts as a metric name and must then be exported.

use crate::support::*;
use pcf::app::ALL_ROLES;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

on_cluster! {
    every_metric_the_rules_and_the_dashboard_name_is_exported_in_cluster_mode:
        create => rules_and_dashboard_name_exported_metrics,
}

/// The repository's root (the root crate's manifest directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The files in `dir` (under the root) whose names end with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let dir = root().join(dir);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no *{suffix} files in {}", dir.display());
    found
}

#[test]
fn the_prometheus_rules_pass_promtool_and_their_unit_tests() {
    let out = Command::new("bash")
        .arg(root().join("scripts/check-deploy.sh"))
        .current_dir(root())
        .output()
        .expect("running scripts/check-deploy.sh");
    assert!(
        out.status.success(),
        "scripts/check-deploy.sh failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_alert_has_a_duration_a_severity_annotations_and_a_runbook_entry() {
    let anchors = heading_anchors(&read(&root().join("docs/operations.md")));
    let mut problems = Vec::new();
    let alerts: Vec<Rule> = all_rules().into_iter().filter(|r| r.alert).collect();
    assert!(alerts.len() >= 8, "only {} alerts found", alerts.len());
    for rule in &alerts {
        let name = &rule.name;
        for field in ["for", "annotations.summary", "annotations.description"] {
            if rule.get(field).is_empty() {
                problems.push(format!("{name}: no {field}"));
            }
        }
        let severity = rule.get("labels.severity");
        if !["critical", "warning"].contains(&severity) {
            problems.push(format!(
                "{name}: severity {severity:?} is neither critical nor warning"
            ));
        }
        match rule.get("annotations.runbook_url").split_once('#') {
            Some(("docs/operations.md", anchor)) if anchors.contains(anchor) => {}
            _ => problems.push(format!(
                "{name}: runbook_url {:?} is not docs/operations.md#<a heading there>",
                rule.get("annotations.runbook_url")
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for path in files("deploy/prometheus/tests", ".test.yml") {
        let mut alert: Option<String> = None;
        for line in read(&path).lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix("alertname:") {
                alert = Some(name.trim().to_owned());
            } else if let Some(expected) = line.strip_prefix("exp_alerts:") {
                let name = alert.take().unwrap_or_else(|| {
                    panic!("{}: exp_alerts without an alertname", path.display())
                });
                if expected.trim() == "[]" {
                    quiet.insert(name);
                } else {
                    firing.insert(name);
                }
            }
        }
    }
    let mut problems = Vec::new();
    for rule in all_rules().into_iter().filter(|r| r.alert) {
        if !firing.contains(&rule.name) {
            problems.push(format!("{}: no unit test where it fires", rule.name));
        }
        if !quiet.contains(&rule.name) {
            problems.push(format!(
                "{}: no unit test where it does not fire",
                rule.name
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_promql_reader_finds_metrics_labels_and_groupings() {
    let mut q = Promql::of(&[
        "histogram_quantile(0.99, sum by (job, le) (rate(pcf_a_bucket{path=\"/x\",outcome=~\"a|b}\"}[5m])))",
        "pcf:rec:ratio > (14.4 * 0.01) and on (job) max without (instance) (pcf_b) # pcf_comment",
        "sum(increase(pcf_c{job=~\"$job\"}[$__rate_interval])) / up offset 5m",
    ]);
    let mut variables = Vec::new();
    let variable = serde_json::json!({ "query": "label_values(pcf_d{job=~\"$job\"}, instance)" });
    collect_queries(&serde_json::json!({ "list": [variable] }), &mut variables);
    for v in &variables {
        q.scan(v);
    }
    let metrics: Vec<&str> = q.metrics.iter().map(String::as_str).collect();
    assert_eq!(
        metrics,
        [
            "pcf:rec:ratio",
            "pcf_a_bucket",
            "pcf_b",
            "pcf_c",
            "pcf_d",
            "up"
        ]
    );
    let matchers: Vec<(&str, &str)> = q
        .matchers
        .iter()
        .map(|(m, l)| (m.as_str(), l.as_str()))
        .collect();
    assert_eq!(
        matchers,
        [
            ("pcf_a_bucket", "outcome"),
            ("pcf_a_bucket", "path"),
            ("pcf_c", "job"),
            ("pcf_d", "job")
        ]
    );
    let grouping: Vec<&str> = q.grouping.iter().map(String::as_str).collect();
    assert_eq!(grouping, ["instance", "job", "le"]);
}

/// Starts a whole PCF (every role) in cluster mode, makes it count a command and a request,
/// and checks its /metrics against the rules and the dashboard.
async fn rules_and_dashboard_name_exported_metrics(c: &mut Cluster) {
    let rules = all_rules();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter(|r| !r.alert)
        .map(|r| r.name.clone())
        .collect();
    let rule_exprs: Vec<String> = rules.iter().map(|r| r.get("expr").to_owned()).collect();
    let in_rules = Promql::of(&rule_exprs);
    let in_dashboard = Promql::of(&dashboard_queries());

    // Names that are not PCF's: only `up` (Prometheus' own, per scrape target), in the rules.
    let mut problems = Vec::new();
    for (what, q, allowed) in [
        ("the rules", &in_rules, &["up"][..]),
        ("the dashboard", &in_dashboard, &[][..]),
    ] {
        for name in &q.metrics {
            if !(name.starts_with("pcf_") || name.starts_with("pcf:") || allowed.contains(&&**name))
            {
                problems.push(format!("{what} name {name:?}, which is not a PCF metric"));
            }
            if name.starts_with("pcf:") && !recorded.contains(name) {
                problems.push(format!(
                    "{what} name {name:?}, which no recording rule records"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let wanted: BTreeSet<String> = in_rules
        .metrics
        .iter()
        .chain(&in_dashboard.metrics)
        .filter(|m| m.starts_with("pcf_"))
        .cloned()
        .collect();
    assert!(wanted.len() >= 8, "only {wanted:?} found");

    let app = c.start_default(&ALL_ROLES).await;
    let tag = c.tag().to_owned();
    let id = create_user(
        &app.router,
        &format!("metered@{tag}.example.com"),
        "Metered",
    )
    .await;
    // Through the relay, Kafka and a projector: every role has done its work once.
    let seen = user(&app.router, id, Some(1)).await;
    assert_eq!(seen["version"], 1, "{seen}");

    // The projectors' lag is read from Kafka at each scrape, within a few seconds; poll.
    let exported = wait_until(
        CONVERGE,
        "every metric the rules and the dashboard name in /metrics",
        || async {
            let text = get(&app.router, "/metrics").await.text;
            let exported = Exposition::parse(&text);
            let missing: Vec<&String> = wanted.iter().filter(|m| !exported.has(m)).collect();
            if missing.is_empty() {
                Ok(exported)
            } else {
                Err(format!("not in /metrics: {missing:?}\n{text}"))
            }
        },
    )
    .await;

    // The labels they select on exist on those metrics; the labels they group by exist on
    // some metric (or are added by the scrape: job, instance).
    let scrape_labels = ["job", "instance"];
    for (metric, label) in in_rules.matchers.iter().chain(&in_dashboard.matchers) {
        if !metric.starts_with("pcf_") || scrape_labels.contains(&label.as_str()) {
            continue;
        }
        if !exported.labels_of(metric).contains(label) {
            problems.push(format!(
                "{metric}{{{label}=...}}: {metric} has no label {label} (it has {:?})",
                exported.labels_of(metric)
            ));
        }
    }
    let any_label: BTreeSet<&String> = exported.labels.values().flatten().collect();
    for label in in_rules.grouping.iter().chain(&in_dashboard.grouping) {
        if !scrape_labels.contains(&label.as_str()) && !any_label.contains(label) {
            problems.push(format!("grouping by {label}, which no PCF metric has"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// One rule of a rule file: its name, whether it is an alert (else a recording rule), and its
/// fields by dotted path (`expr`, `for`, `labels.severity`, `annotations.summary`, ...).
#[derive(Debug)]
struct Rule {
    name: String,
    alert: bool,
    fields: BTreeMap<String, String>,
}

impl Rule {
    fn get(&self, field: &str) -> &str {
        self.fields.get(field).map_or("", String::as_str)
    }
}

/// Every rule of every file in `deploy/prometheus/rules/`.
fn all_rules() -> Vec<Rule> {
    let mut rules = Vec::new();
    for path in files("deploy/prometheus/rules", ".yml") {
        let text = read(&path);
        let found = parse_rules(&text);
        let declared = text
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("- alert:") || l.starts_with("- record:"))
            .count();
        assert_eq!(found.len(), declared, "{}: {found:?}", path.display());
        for rule in &found {
            assert!(
                !rule.get("expr").trim().is_empty(),
                "{}: {} has no expr",
                path.display(),
                rule.name
            );
        }
        rules.extend(found);
    }
    rules
}

/// The rules of a Prometheus rule file, in the block style this repository writes: each rule
/// starts with `- alert: NAME` or `- record: NAME`; its keys are nested by indentation; values
/// are plain or quoted scalars on the key's line, or block scalars (`|`, `>-`, ...) below it.
fn parse_rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut current: Option<(Rule, usize)> = None;
    // Open mappings of the current rule: (indentation, key).
    let mut parents: Vec<(usize, String)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        i += 1;
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let start = trimmed
            .strip_prefix("- alert:")
            .map(|n| (true, n))
            .or_else(|| trimmed.strip_prefix("- record:").map(|n| (false, n)));
        if let Some((alert, name)) = start {
            rules.extend(current.take().map(|(rule, _)| rule));
            let rule = Rule {
                name: unquote(name.trim()).to_owned(),
                alert,
                fields: BTreeMap::new(),
            };
            current = Some((rule, indent + 2));
            parents.clear();
            continue;
        }
        let Some((rule, key_indent)) = current.as_mut() else {
            continue;
        };
        if indent < *key_indent {
            rules.extend(current.take().map(|(rule, _)| rule));
            continue;
        }
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        while parents.last().is_some_and(|(at, _)| *at >= indent) {
            parents.pop();
        }
        let path: Vec<&str> = parents
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([key.trim()])
            .collect();
        let path = path.join(".");
        let value = value.trim();
        if value.is_empty() {
            parents.push((indent, key.trim().to_owned()));
        } else if ["|", "|-", "|+", ">", ">-", ">+"].contains(&value) {
            let mut block = Vec::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push(next.trim());
                i += 1;
            }
            let joiner = if value.starts_with('>') { " " } else { "\n" };
            rule.fields
                .insert(path, block.join(joiner).trim().to_owned());
        } else {
            rule.fields.insert(path, unquote(value).to_owned());
        }
    }
    rules.extend(current.map(|(rule, _)| rule));
    rules
}

fn unquote(s: &str) -> &str {
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return &s[1..s.len() - 1];
        }
    }
    s
}

/// The anchors a Markdown renderer (GitHub's) gives the headings of `markdown`.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// Every query of the dashboard: the panels' `expr`, and the template variables' queries.
pub(crate) fn dashboard_queries() -> Vec<String> {
    let path = root().join("deploy/grafana/pcf.json");
    let dashboard: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_i64()), "duplicate id: {panel}");
        if panel["type"] != "row" {
            let targets = panel["targets"].as_array().map_or(0, Vec::len);
            assert!(targets > 0, "a panel without a query: {}", panel["title"]);
        }
    }
    assert!(queries.len() >= panels.len(), "{queries:?}");
    queries
}

fn collect_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        // A data source variable's query is the kind of data source, not PromQL.
        Value::Object(map) if map.get("type").is_some_and(|t| t == "datasource") => {}
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", Value::String(q)) => {
                        // `label_values(SELECTOR, LABEL)`: the last argument is a label name.
                        let q = match q.strip_prefix("label_values(") {
                            Some(args) => args.rsplit_once(',').map_or(args, |(sel, _)| sel),
                            None => q,
                        };
                        out.push(q.to_owned());
                    }
                    _ => collect_queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_queries(item, out)),
        _ => {}
    }
}

/// What PromQL expressions name: metrics (and recording rules), the labels selected on each
/// metric, and the labels of `by`, `without`, `on`, `ignoring` and `group_*` clauses.
#[derive(Default, Debug)]
struct Promql {
    metrics: BTreeSet<String>,
    matchers: BTreeSet<(String, String)>,
    grouping: BTreeSet<String>,
}

/// PromQL's functions, aggregations, operators and literals, and Grafana's query functions:
/// every other identifier outside braces, brackets and strings is a metric name.
const NOT_METRICS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "and",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "avg",
    "avg_over_time",
    "bool",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count",
    "count_over_time",
    "count_values",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "inf",
    "irate",
    "label_join",
    "label_names",
    "label_replace",
    "label_values",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max",
    "max_over_time",
    "metrics",
    "min",
    "min_over_time",
    "minute",
    "month",
    "nan",
    "offset",
    "or",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile",
    "quantile_over_time",
    "query_result",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "stddev_over_time",
    "stdvar",
    "stdvar_over_time",
    "sum",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "topk",
    "unless",
    "vector",
    "year",
];

/// Keywords followed by a parenthesised list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

impl Promql {
    fn of(exprs: &[impl AsRef<str>]) -> Self {
        let mut q = Self::default();
        for e in exprs {
            q.scan(e.as_ref());
        }
        q
    }

    fn scan(&mut self, expr: &str) {
        let b = expr.as_bytes();
        let mut i = 0;
        // The metric named right before, while only whitespace follows it.
        let mut metric: Option<String> = None;
        while i < b.len() {
            let c = b[i];
            if c.is_ascii_whitespace() {
                i += 1;
            } else if c == b'"' || c == b'\'' || c == b'`' {
                i = skip_string(b, i);
                metric = None;
            } else if c == b'#' {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            } else if c == b'[' {
                i = skip_past(b, i, b']');
                metric = None;
            } else if c == b'{' {
                let end = skip_past(b, i, b'}');
                if let Some(m) = metric.take() {
                    for label in matcher_labels(&expr[i + 1..end - 1]) {
                        self.matchers.insert((m.clone(), label));
                    }
                }
                i = end;
            } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                metric = None;
                if GROUPING.contains(&word) {
                    let mut j = i;
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if j < b.len() && b[j] == b'(' {
                        let end = skip_past(b, j, b')');
                        for label in expr[j + 1..end - 1].split(',') {
                            if !label.trim().is_empty() {
                                self.grouping.insert(label.trim().to_owned());
                            }
                        }
                        i = end;
                    }
                } else if !NOT_METRICS.contains(&word.to_ascii_lowercase().as_str()) {
                    self.metrics.insert(word.to_owned());
                    metric = Some(word.to_owned());
                }
            } else if c.is_ascii_digit() || c == b'.' {
                // A number or a duration (`5m` after `offset`).
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                metric = None;
            } else {
                i += 1;
                metric = None;
            }
        }
    }
}

/// The index after the string literal that starts at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        if b[j] == b'\\' && quote != b'`' {
            j += 1;
        }
        j += 1;
    }
    (j + 1).min(b.len())
}

/// The index after the `close` that ends the bracket opened at `i` (nested brackets of the
/// same kind and string literals skipped).
fn skip_past(b: &[u8], i: usize, close: u8) -> usize {
    let open = b[i];
    let mut depth = 0;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(b, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    panic!(
        "unbalanced {:?} in {:?}",
        open as char,
        String::from_utf8_lossy(b)
    );
}

/// The label names of the matchers between a selector's braces.
fn matcher_labels(inner: &str) -> Vec<String> {
    let b = inner.as_bytes();
    let mut labels = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            labels.push(inner[start..i].to_owned());
        } else {
            i += 1;
        }
    }
    labels
}

/// The sample names of a Prometheus text exposition, their label names, and its declared
/// families (`# TYPE name kind`).
struct Exposition {
    labels: BTreeMap<String, BTreeSet<String>>,
    families: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut families = BTreeMap::new();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let mut parts = decl.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    families.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let names = labels.entry(line[..end].to_owned()).or_default();
            if line[end..].starts_with('{') {
                let close = line.rfind('}').unwrap_or(line.len());
                names.extend(matcher_labels(&line[end + 1..close]));
            }
        }
        Self { labels, families }
    }

    /// Whether `metric` has samples, or is a histogram's `_bucket`, `_sum` or `_count` series
    /// of a declared histogram family.
    fn has(&self, metric: &str) -> bool {
        self.labels.contains_key(metric)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                metric
                    .strip_suffix(suffix)
                    .and_then(|family| self.families.get(family))
                    .is_some_and(|kind| kind == "histogram")
            })
    }

    fn labels_of(&self, metric: &str) -> BTreeSet<String> {
        self.labels.get(metric).cloned().unwrap_or_default()
    }
}
