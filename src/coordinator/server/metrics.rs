//! `GET /metrics`: Prometheus text exposition (format 0.0.4), on both
//! listeners. It needs a client token with the read role, unless the
//! coordinator runs with `--public-metrics` (the guard then lets this one
//! path through without a token).
//!
//! Everything shown comes from the datastore, so counters survive
//! restarts and several scrapers agree: the counters (builds by final
//! state, lease expiries, bytes that entered the cache, the wait and
//! duration histograms of finished builds) are kept by the transactions
//! that count them, so a scrape reads O(buckets) rows; the queue gauge
//! reads the active builds only; the cache gauges count the cache index.
//!
//! The text is written by hand: a handful of families does not call for a
//! client library.

use std::fmt::Write as _;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{blocking, client_role, now, ApiError, App};
use crate::coordinator::datastore::{MetricsSnapshot, HISTOGRAM_BUCKETS};
use crate::coordinator::model::{AgentRecord, Role};

/// Where the metrics are.
pub const PATH: &str = "/metrics";
/// The prefix of every metric name.
const PREFIX: &str = "sandoff_coordinator_";
/// The final states, shown even at 0 so that rates work from the start.
const FINAL_STATES: [&str; 3] = ["succeeded", "failed", "canceled"];

pub(super) fn router() -> Router<App> {
    Router::new().route(PATH, get(metrics))
}

/// A read token, or none with `--public-metrics`.
struct MetricsAccess;

impl FromRequestParts<App> for MetricsAccess {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        if app.public_metrics {
            return Ok(MetricsAccess);
        }
        client_role(parts, Role::Read).map(|()| MetricsAccess)
    }
}

async fn metrics(State(app): State<App>, _: MetricsAccess) -> Result<Response, ApiError> {
    let text = blocking(&app, |a| {
        let snapshot = a.ds.metrics()?;
        let agents = a.ds.agents()?;
        Ok(render(&snapshot, &agents, a.lease_secs, now()))
    })
    .await?;
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

/// Text exposition, one family at a time.
#[derive(Default)]
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its HELP and TYPE lines.
    pub(crate) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.out, "# TYPE {PREFIX}{name} {kind}");
    }

    /// One sample; `name` may carry a suffix of its family (`_bucket`).
    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: i64) {
        let _ = write!(self.out, "{PREFIX}{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A histogram from the datastore's (not cumulative) buckets.
    fn histogram(&mut self, name: &str, help: &str, s: &MetricsSnapshot, key: &str) {
        self.family(name, "histogram", help);
        let count = |k: &str| s.counters.get(k).copied().unwrap_or(0);
        let mut cumulative = 0;
        for b in HISTOGRAM_BUCKETS {
            cumulative += count(&format!("{key}_bucket:{b}"));
            self.sample(
                &format!("{name}_bucket"),
                &[("le", &b.to_string())],
                cumulative,
            );
        }
        self.sample(
            &format!("{name}_bucket"),
            &[("le", "+Inf")],
            count(&format!("{key}_count")),
        );
        self.sample(&format!("{name}_sum"), &[], count(&format!("{key}_sum")));
        self.sample(
            &format!("{name}_count"),
            &[],
            count(&format!("{key}_count")),
        );
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

/// The whole exposition.
pub(crate) fn render(
    s: &MetricsSnapshot,
    agents: &[AgentRecord],
    lease_secs: i64,
    now: i64,
) -> String {
    let counter = |k: &str| s.counters.get(k).copied().unwrap_or(0);
    let mut e = Exposition::default();
    e.family(
        "queue_builds",
        "gauge",
        "Active builds by system and state (queued, allocated).",
    );
    for (system, state, n) in &s.queue {
        e.sample("queue_builds", &[("system", system), ("state", state)], *n);
    }
    e.family(
        "builds_finished_total",
        "counter",
        "Builds that reached a final state, by that state.",
    );
    for state in FINAL_STATES {
        e.sample(
            "builds_finished_total",
            &[("state", state)],
            counter(&format!("builds_finished:{state}")),
        );
    }
    e.family(
        "agents",
        "gauge",
        "Agents by enabled and whether they were heard from within a lease.",
    );
    for enabled in [true, false] {
        for seen in [true, false] {
            let n = agents
                .iter()
                .filter(|a| a.enabled == enabled)
                .filter(|a| a.last_seen.is_some_and(|t| t >= now - lease_secs) == seen)
                .count();
            e.sample(
                "agents",
                &[
                    ("enabled", if enabled { "true" } else { "false" }),
                    ("seen", if seen { "true" } else { "false" }),
                ],
                i64::try_from(n).unwrap_or(i64::MAX),
            );
        }
    }
    e.family(
        "lease_expiries_total",
        "counter",
        "Leases that expired (builds taken back from a silent agent).",
    );
    e.sample("lease_expiries_total", &[], counter("lease_expiries"));
    e.family(
        "uploaded_bytes_total",
        "counter",
        "Compressed bytes of NAR files that entered the cache (uploads and build outputs).",
    );
    e.sample("uploaded_bytes_total", &[], counter("bytes_uploaded"));
    e.family("cache_paths", "gauge", "Store paths in the cache.");
    e.sample("cache_paths", &[], s.cache_paths);
    e.family(
        "cache_bytes",
        "gauge",
        "Total size of the cache's compressed NAR files.",
    );
    e.sample("cache_bytes", &[], s.cache_bytes);
    e.histogram(
        "build_wait_seconds",
        "Time from submission to start of finished builds that ran.",
        s,
        "wait_seconds",
    );
    e.histogram(
        "build_duration_seconds",
        "Time from start to end of finished builds that ran.",
        s,
        "duration_seconds",
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::coordinator::model::AgentId;

    /// A minimal parser of the text format: every sample line's family has
    /// HELP and TYPE before it, label values are well quoted, values are
    /// numbers. Returns (name with labels as written, value).
    fn parse(text: &str) -> Vec<(String, String, f64)> {
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert_eq!(helped.last().map(String::as_str), Some(name), "{line}");
                typed.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (name, rest) = match line.find('{') {
                Some(i) => (&line[..i], &line[i..]),
                None => line.split_at(line.find(' ').unwrap()),
            };
            let (labels, value) = if rest.starts_with('{') {
                // Walk the label set, honouring escapes inside quotes.
                let mut in_quotes = false;
                let mut escaped = false;
                let mut end = None;
                for (i, c) in rest.char_indices() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' if in_quotes => escaped = true,
                        '"' => in_quotes = !in_quotes,
                        '}' if !in_quotes => {
                            end = Some(i);
                            break;
                        }
                        '\n' => panic!("raw newline in {line}"),
                        _ => {}
                    }
                }
                let end = end.expect("closed label set");
                (&rest[..=end], rest[end + 1..].trim())
            } else {
                ("", rest.trim())
            };
            let family = ["_bucket", "_sum", "_count", ""]
                .iter()
                .find_map(|s| {
                    let f = name.strip_suffix(s)?;
                    typed.contains_key(f).then(|| f.to_owned())
                })
                .unwrap_or_else(|| panic!("no TYPE for {name}"));
            assert!(family.starts_with(PREFIX), "{family}");
            samples.push((name.to_owned(), labels.to_owned(), value.parse().unwrap()));
        }
        samples
    }

    #[test]
    fn exposition_escapes_labels_and_help() {
        let mut e = Exposition::default();
        e.family("x", "gauge", "a \\ b\nc");
        e.sample("x", &[("system", "we\"ird\\sys\ntem"), ("state", "q")], 3);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP sandoff_coordinator_x a \\\\ b\\nc\n# TYPE sandoff_coordinator_x gauge\n\
             sandoff_coordinator_x{system=\"we\\\"ird\\\\sys\\ntem\",state=\"q\"} 3\n"
        );
        let samples = parse(&text);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].2, 3.0);
    }

    #[test]
    fn renders_every_family_with_cumulative_buckets() {
        let mut counters = BTreeMap::new();
        counters.insert("builds_finished:succeeded".to_owned(), 4);
        counters.insert("wait_seconds_bucket:1".to_owned(), 2);
        counters.insert("wait_seconds_bucket:60".to_owned(), 1);
        counters.insert("wait_seconds_bucket:+Inf".to_owned(), 1);
        counters.insert("wait_seconds_count".to_owned(), 4);
        counters.insert("wait_seconds_sum".to_owned(), 100_050);
        let s = MetricsSnapshot {
            counters,
            queue: vec![("x86_64-linux".into(), "queued".into(), 5)],
            cache_paths: 2,
            cache_bytes: 1000,
        };
        let agent = |id: &str, enabled, last_seen| AgentRecord {
            id: AgentId::new(id).unwrap(),
            enabled,
            systems: Default::default(),
            features: Default::default(),
            max_parallel_builds: 1,
            last_seen,
            allocated: Vec::new(),
        };
        let agents = [
            agent("a", true, Some(990)),
            agent("b", true, Some(10)),
            agent("c", false, None),
        ];
        let text = render(&s, &agents, 60, 1000);
        let samples = parse(&text);
        let value = |name: &str, labels: &str| {
            samples
                .iter()
                .find(|(n, l, _)| n == &format!("{PREFIX}{name}") && l == labels)
                .unwrap_or_else(|| panic!("no {name}{labels} in\n{text}"))
                .2
        };
        assert_eq!(
            value("queue_builds", "{system=\"x86_64-linux\",state=\"queued\"}"),
            5.0
        );
        assert_eq!(value("builds_finished_total", "{state=\"succeeded\"}"), 4.0);
        assert_eq!(value("builds_finished_total", "{state=\"failed\"}"), 0.0);
        assert_eq!(value("agents", "{enabled=\"true\",seen=\"true\"}"), 1.0);
        assert_eq!(value("agents", "{enabled=\"true\",seen=\"false\"}"), 1.0);
        assert_eq!(value("agents", "{enabled=\"false\",seen=\"false\"}"), 1.0);
        assert_eq!(value("build_wait_seconds_bucket", "{le=\"1\"}"), 2.0);
        assert_eq!(value("build_wait_seconds_bucket", "{le=\"30\"}"), 2.0);
        assert_eq!(value("build_wait_seconds_bucket", "{le=\"60\"}"), 3.0);
        assert_eq!(value("build_wait_seconds_bucket", "{le=\"86400\"}"), 3.0);
        assert_eq!(value("build_wait_seconds_bucket", "{le=\"+Inf\"}"), 4.0);
        assert_eq!(value("build_wait_seconds_count", ""), 4.0);
        assert_eq!(value("cache_bytes", ""), 1000.0);
        assert_eq!(value("build_duration_seconds_count", ""), 0.0);
    }
}
