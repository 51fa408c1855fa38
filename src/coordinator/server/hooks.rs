//! Hooks: programs and webhooks the coordinator tells of its events.
//!
//! Each configured hook (`--hook EVENT=TARGET`) is one tokio task that
//! reads the event outbox from its own cursor in the datastore, delivers
//! every event of its kind, and moves the cursor on only once an event is
//! delivered. A delivery that fails is retried after 1 s × 2^(n-1), at
//! most 10 minutes, with the attempt count and the next try kept in the
//! datastore: a coordinator that restarts (even after kill -9) resumes
//! each hook where it stood, so every event is delivered at least once,
//! and in order unless `--hook-parallelism EVENT=N` lets N go at a time.
//!
//! A **program** hook is the program path followed by arguments split on
//! whitespace, run without a shell (no quoting, no expansion: a hook that
//! needs a shell names `/bin/sh` and a script); it gets the event JSON on
//! stdin, `SANDOFF_EVENT` (the kind) and `SANDOFF_EVENT_ID` in its
//! environment, its stderr goes to the coordinator's; exit status 0 means
//! delivered; past `--hook-timeout` it is killed and the attempt failed.
//! A **webhook** (`http://…`, `https://…`) is POSTed the JSON
//! (`Content-Type: application/json`, `X-Sandoff-Event: KIND`); a 2xx
//! answer means delivered.
//!
//! Programs and webhooks run on tokio's blocking pool.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{blocking, now, App};
use crate::coordinator::datastore::HookProgress;
use crate::coordinator::model::{Event, EventKind, ModelError};

/// How long a delivery may take by default (`--hook-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait between two attempts.
const MAX_BACKOFF_SECS: i64 = 600;
/// How many events a hook reads from the outbox at a time.
const BATCH: usize = 1000;
/// How often a hook looks at the outbox when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);
/// Events kept in the outbox for SSE clients that resume, whatever the
/// hooks' cursors.
pub(crate) const KEEP_EVENTS: i64 = 10_000;

/// A bad `--hook` or `--hook-parallelism`, or a failed delivery.
#[derive(Debug, Error)]
pub enum HookError {
    #[error("--hook '{spec}': expected EVENT=PROGRAM [ARGS…] or EVENT=http(s)://URL")]
    Spec { spec: String },
    #[error("--hook-parallelism '{spec}': expected EVENT=N with N at least 1")]
    Parallelism { spec: String },
    #[error("'{spec}': {source}")]
    Event {
        spec: String,
        #[source]
        source: ModelError,
    },
    #[error("hook program '{program}': cannot run it: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hook program '{program}': {status}")]
    Exit {
        program: PathBuf,
        status: ExitStatus,
    },
    #[error("hook program '{program}': killed after {secs} s (--hook-timeout)")]
    Timeout { program: PathBuf, secs: u64 },
    #[error("webhook {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("webhook {url}: TLS: {source}")]
    Tls {
        url: String,
        #[source]
        source: native_tls::Error,
    },
}

/// Where a hook sends events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookTarget {
    /// A program and its arguments (no shell).
    Program { program: PathBuf, args: Vec<String> },
    /// A URL to POST to.
    Webhook { url: String },
}

/// One `--hook EVENT=TARGET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookSpec {
    pub event: EventKind,
    pub target: HookTarget,
    /// The spec as given: the hook's name in the datastore (its cursor)
    /// and in logs.
    pub name: String,
}

impl HookSpec {
    /// Parses `EVENT=PROGRAM [ARGS…]` or `EVENT=http(s)://URL`.
    pub fn parse(spec: &str) -> Result<HookSpec, HookError> {
        let bad = || HookError::Spec {
            spec: spec.to_owned(),
        };
        let (event, target) = spec.split_once('=').ok_or_else(bad)?;
        let event: EventKind = event.trim().parse().map_err(|source| HookError::Event {
            spec: spec.to_owned(),
            source,
        })?;
        let target = target.trim();
        let target = if target.starts_with("http://") || target.starts_with("https://") {
            HookTarget::Webhook {
                url: target.to_owned(),
            }
        } else {
            let mut words = target.split_whitespace();
            let program = PathBuf::from(words.next().ok_or_else(bad)?);
            HookTarget::Program {
                program,
                args: words.map(str::to_owned).collect(),
            }
        };
        let name = format!("{event}={}", target_text(&target));
        Ok(HookSpec {
            event,
            target,
            name,
        })
    }
}

fn target_text(t: &HookTarget) -> String {
    match t {
        HookTarget::Webhook { url } => url.clone(),
        HookTarget::Program { program, args } => {
            let mut s = program.display().to_string();
            for a in args {
                s.push(' ');
                s.push_str(a);
            }
            s
        }
    }
}

/// Parses `--hook-parallelism EVENT=N`.
pub fn parse_parallelism(spec: &str) -> Result<(EventKind, usize), HookError> {
    let bad = || HookError::Parallelism {
        spec: spec.to_owned(),
    };
    let (event, n) = spec.split_once('=').ok_or_else(bad)?;
    let event: EventKind = event.trim().parse().map_err(|source| HookError::Event {
        spec: spec.to_owned(),
        source,
    })?;
    let n: usize = n.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    Ok((event, n))
}

/// Every hook of a coordinator and how they run.
#[derive(Clone, Debug)]
pub struct HookSettings {
    pub hooks: Vec<HookSpec>,
    /// Events of a kind delivered at once to each of its hooks (1 when
    /// absent: in order).
    pub parallelism: BTreeMap<EventKind, usize>,
    pub timeout: Duration,
}

impl Default for HookSettings {
    fn default() -> Self {
        HookSettings {
            hooks: Vec::new(),
            parallelism: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The wait after the `attempts`-th failed attempt: 1 s × 2^(n-1), at most
/// ten minutes.
pub(crate) fn backoff_secs(attempts: i64) -> i64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    2_i64.saturating_pow(exponent).min(MAX_BACKOFF_SECS)
}

/// Starts one task per hook, and the outbox's pruning.
pub(crate) fn start(app: &App, settings: HookSettings) {
    let mut names: Vec<String> = Vec::new();
    for mut hook in settings.hooks {
        // The same spec given twice is two hooks, each with its cursor.
        let base = hook.name.clone();
        let mut n = 1;
        while names.contains(&hook.name) {
            n += 1;
            hook.name = format!("{base}#{n}");
        }
        names.push(hook.name.clone());
        let parallelism = settings.parallelism.get(&hook.event).copied().unwrap_or(1);
        tracing::info!(hook = %hook.name, parallelism, "hook configured");
        tokio::spawn(run_hook(
            app.clone(),
            Arc::new(hook),
            parallelism,
            settings.timeout,
        ));
    }
    tokio::spawn(prune(app.clone(), names));
}

/// Deletes delivered events now and then, keeping [`KEEP_EVENTS`].
async fn prune(app: App, hooks: Vec<String>) {
    loop {
        let hooks = hooks.clone();
        match blocking(&app, move |a| Ok(a.ds.prune_events(&hooks, KEEP_EVENTS)?)).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "outbox pruned"),
            Err(e) => tracing::error!("pruning the event outbox: {}", e.message),
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// One hook's loop; it never ends (errors are logged and retried).
async fn run_hook(app: App, hook: Arc<HookSpec>, parallelism: usize, timeout: Duration) {
    let mut wake = app.wake.subscribe();
    loop {
        match step(&app, &hook, parallelism, timeout).await {
            Ok(Step::Worked) => continue,
            Ok(Step::Idle) => {}
            Ok(Step::WaitUntil(t)) => {
                // New events may be taken meanwhile (with a parallelism
                // above the retries pending), so they wake it too.
                let secs = u64::try_from(t.saturating_sub(now())).unwrap_or(0).max(1);
                let _ = tokio::time::timeout(Duration::from_secs(secs), wake.changed()).await;
                continue;
            }
            Err(e) => tracing::error!(hook = %hook.name, "hook: {}", e.message),
        }
        // New events wake it; the poll is a fallback.
        let _ = tokio::time::timeout(POLL, wake.changed()).await;
    }
}

/// What one pass over the outbox did.
enum Step {
    /// Delivered or tried something: look again at once.
    Worked,
    /// Nothing to do.
    Idle,
    /// Only retries not yet due, the first at this time.
    WaitUntil(i64),
}

/// What a hook does with the events after its cursor.
#[derive(Debug, PartialEq)]
struct Plan {
    /// The cursor passes every event up to the first one still owed to
    /// this hook (events of other kinds, or delivered out of order).
    advance_to: i64,
    /// Owed events to deliver now: of the first `parallelism` owed ones,
    /// those whose retry is due.
    due: Vec<Event>,
    /// When nothing is due: when the first of the owed ones is.
    wait_until: Option<i64>,
}

fn plan(
    progress: &HookProgress,
    events: Vec<Event>,
    kind: EventKind,
    parallelism: usize,
    now: i64,
) -> Plan {
    let mut advance_to = progress.cursor;
    let mut owed: Vec<Event> = Vec::new();
    for e in events {
        let delivered = progress.deliveries.get(&e.id).is_some_and(|d| d.delivered);
        if e.kind != kind || delivered {
            if owed.is_empty() {
                advance_to = e.id;
            }
            continue;
        }
        if owed.len() == parallelism {
            break;
        }
        owed.push(e);
    }
    let due_at = |e: &Event| progress.deliveries.get(&e.id).map_or(now, |d| d.next_try);
    let (due, later): (Vec<Event>, Vec<Event>) = owed.into_iter().partition(|e| due_at(e) <= now);
    let wait_until = if due.is_empty() {
        later.iter().map(due_at).min()
    } else {
        None
    };
    Plan {
        advance_to,
        due,
        wait_until,
    }
}

async fn step(
    app: &App,
    hook: &Arc<HookSpec>,
    parallelism: usize,
    timeout: Duration,
) -> Result<Step, super::ApiError> {
    let name = hook.name.clone();
    let progress = blocking(app, move |a| Ok(a.ds.hook_progress(&name)?)).await?;
    let cursor = progress.cursor;
    let events = blocking(app, move |a| Ok(a.ds.events_after(cursor, BATCH)?)).await?;
    let plan = plan(&progress, events, hook.event, parallelism, now());
    if plan.advance_to > cursor {
        let name = hook.name.clone();
        let to = plan.advance_to;
        blocking(app, move |a| Ok(a.ds.hook_advance(&name, to)?)).await?;
    }
    let due = plan.due;
    if due.is_empty() {
        return Ok(match plan.wait_until {
            Some(t) => Step::WaitUntil(t),
            None if plan.advance_to > cursor => Step::Worked,
            None => Step::Idle,
        });
    }
    let mut tasks = Vec::with_capacity(due.len());
    for e in due {
        let hook = hook.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let outcome = deliver(&hook, &e, timeout);
            (e, outcome)
        }));
    }
    for task in tasks {
        let (e, outcome) = task
            .await
            .map_err(|err| super::ApiError::internal(format!("hook worker: {err}")))?;
        let attempts_before = progress.deliveries.get(&e.id).map_or(0, |d| d.attempts);
        let delivered = outcome.is_ok();
        let next_try = now().saturating_add(backoff_secs(attempts_before.saturating_add(1)));
        match &outcome {
            Ok(()) => {
                tracing::info!(hook = %hook.name, event = e.id, kind = %e.kind, "hook: delivered")
            }
            Err(err) => tracing::warn!(
                hook = %hook.name,
                event = e.id,
                attempt = attempts_before + 1,
                retry_at = next_try,
                "hook: delivery failed: {err}"
            ),
        }
        let name = hook.name.clone();
        blocking(app, move |a| {
            Ok(a.ds.hook_attempt(&name, e.id, delivered, next_try)?)
        })
        .await?;
    }
    Ok(Step::Worked)
}

/// Delivers one event (blocking).
pub(crate) fn deliver(hook: &HookSpec, event: &Event, timeout: Duration) -> Result<(), HookError> {
    let body = event.to_json().to_string();
    match &hook.target {
        HookTarget::Program { program, args } => run_program(program, args, event, &body, timeout),
        HookTarget::Webhook { url } => post(url, event.kind, &body, timeout),
    }
}

fn run_program(
    program: &PathBuf,
    args: &[String],
    event: &Event,
    body: &str,
    timeout: Duration,
) -> Result<(), HookError> {
    let mut child = Command::new(program)
        .args(args)
        .env("SANDOFF_EVENT", event.kind.as_str())
        .env("SANDOFF_EVENT_ID", event.id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| HookError::Spawn {
            program: program.clone(),
            source,
        })?;
    // Written from its own thread: a program that does not read its stdin
    // must still be caught by the timeout, not block this one on a full pipe.
    if let Some(mut stdin) = child.stdin.take() {
        let body = body.to_owned();
        std::thread::spawn(move || {
            // A program that exits without reading is its own business:
            // its exit status decides.
            let _ = stdin.write_all(body.as_bytes());
        });
    }
    let started = Instant::now();
    loop {
        let waited = child.try_wait().map_err(|source| HookError::Spawn {
            program: program.clone(),
            source,
        })?;
        if let Some(status) = waited {
            return if status.success() {
                Ok(())
            } else {
                Err(HookError::Exit {
                    program: program.clone(),
                    status,
                })
            };
        }
        if started.elapsed() >= timeout {
            // Already gone if it exited meanwhile; either way it is reaped.
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Timeout {
                program: program.clone(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post(url: &str, kind: EventKind, body: &str, timeout: Duration) -> Result<(), HookError> {
    let tls = native_tls::TlsConnector::new().map_err(|source| HookError::Tls {
        url: url.to_owned(),
        source,
    })?;
    let agent = ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(0)
        .tls_connector(Arc::new(tls))
        .build();
    let answer = agent
        .post(url)
        .set("Content-Type", "application/json")
        .set("X-Sandoff-Event", kind.as_str())
        .send_string(body)
        .map_err(|source| HookError::Http {
            url: url.to_owned(),
            source: Box::new(source),
        })?;
    // ureq turns 4xx/5xx into errors; a 3xx (redirects are not followed,
    // a POST should not be replayed elsewhere) is no delivery either.
    if (200..300).contains(&answer.status()) {
        Ok(())
    } else {
        Err(HookError::Http {
            url: url.to_owned(),
            source: Box::new(ureq::Error::Status(answer.status(), answer)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_programs_and_webhooks() {
        let h = HookSpec::parse("build-success=/usr/bin/notify --to ops  x").unwrap();
        assert_eq!(h.event, EventKind::BuildSuccess);
        assert_eq!(
            h.target,
            HookTarget::Program {
                program: "/usr/bin/notify".into(),
                args: vec!["--to".into(), "ops".into(), "x".into()],
            }
        );
        let h = HookSpec::parse("agent-lost=https://example.org/hook?a=b").unwrap();
        assert_eq!(
            h.target,
            HookTarget::Webhook {
                url: "https://example.org/hook?a=b".into()
            }
        );
        assert_eq!(h.name, "agent-lost=https://example.org/hook?a=b");
    }

    #[test]
    fn rejects_bad_hook_specs() {
        assert!(matches!(
            HookSpec::parse("build-done=/bin/true"),
            Err(HookError::Event { .. })
        ));
        assert!(matches!(
            HookSpec::parse("build-success="),
            Err(HookError::Spec { .. })
        ));
        assert!(matches!(
            HookSpec::parse("/bin/true"),
            Err(HookError::Spec { .. })
        ));
        assert!(matches!(
            parse_parallelism("build-success=0"),
            Err(HookError::Parallelism { .. })
        ));
        assert_eq!(
            parse_parallelism("build-failure=4").unwrap(),
            (EventKind::BuildFailure, 4)
        );
    }

    #[test]
    fn backoff_doubles_up_to_ten_minutes() {
        let waits: Vec<i64> = (1..=12).map(backoff_secs).collect();
        assert_eq!(waits[..4], [1, 2, 4, 8]);
        assert_eq!(waits[11], 600);
        assert_eq!(backoff_secs(i64::MAX), 600);
    }

    fn ev(id: i64, kind: EventKind) -> Event {
        Event {
            id,
            kind,
            time: 0,
            payload: serde_json::Map::new(),
        }
    }

    fn ids(events: &[Event]) -> Vec<i64> {
        events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn a_hook_passes_other_kinds_and_waits_in_order_for_a_failing_event() {
        use crate::coordinator::datastore::Delivery;
        use EventKind::{BuildStarted as S, BuildSuccess as K};
        let events = || vec![ev(1, S), ev(2, K), ev(3, S), ev(4, K), ev(5, K)];
        let fresh = HookProgress::default();
        // In order: the first owed event alone; the cursor passes event 1.
        let p = plan(&fresh, events(), K, 1, 100);
        assert_eq!(
            (p.advance_to, ids(&p.due), p.wait_until),
            (1, vec![2], None)
        );
        // Event 2 failed, retry at 150: nothing else goes before it.
        let mut failing = HookProgress::default();
        failing.deliveries.insert(
            2,
            Delivery {
                attempts: 1,
                next_try: 150,
                delivered: false,
            },
        );
        let p = plan(&failing, events(), K, 1, 100);
        assert_eq!((ids(&p.due), p.wait_until), (vec![], Some(150)));
        assert_eq!(plan(&failing, events(), K, 1, 150).due[0].id, 2);
        // With a parallelism of 3 the others go meanwhile...
        let p = plan(&failing, events(), K, 3, 100);
        assert_eq!((p.advance_to, ids(&p.due)), (1, vec![4, 5]));
        // ...and once they are delivered, the cursor still waits for 2.
        for id in [4, 5] {
            failing.deliveries.insert(
                id,
                Delivery {
                    attempts: 1,
                    next_try: 0,
                    delivered: true,
                },
            );
        }
        let p = plan(&failing, events(), K, 3, 100);
        assert_eq!(
            (p.advance_to, ids(&p.due), p.wait_until),
            (1, vec![], Some(150))
        );
        // When 2 is delivered, the cursor passes all five.
        failing.deliveries.get_mut(&2).unwrap().delivered = true;
        let p = plan(&failing, events(), K, 3, 100);
        assert_eq!((p.advance_to, ids(&p.due), p.wait_until), (5, vec![], None));
    }

    fn event() -> Event {
        Event {
            id: 7,
            kind: EventKind::BuildFailure,
            time: 1,
            payload: serde_json::Map::new(),
        }
    }

    #[test]
    fn a_program_gets_the_event_on_stdin_and_its_exit_status_counts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = dir.path().join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n{{ echo \"$SANDOFF_EVENT $SANDOFF_EVENT_ID\"; cat; }} >> {}\nexit \"$1\"\n",
                out.display()
            ),
        )
        .unwrap();
        let spec = |code: &str| {
            HookSpec::parse(&format!(
                "build-failure=/bin/sh {} {code}",
                script.display()
            ))
            .unwrap()
        };
        deliver(&spec("0"), &event(), DEFAULT_TIMEOUT).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("build-failure 7\n{\"id\":7,"), "{text}");
        assert!(matches!(
            deliver(&spec("3"), &event(), DEFAULT_TIMEOUT),
            Err(HookError::Exit { .. })
        ));
    }

    #[test]
    fn a_program_past_the_timeout_is_killed() {
        let h = HookSpec::parse("build-failure=/bin/sleep 1000").unwrap();
        assert!(matches!(
            deliver(&h, &event(), Duration::from_millis(100)),
            Err(HookError::Timeout { .. })
        ));
    }
}
