//! The agent: asks the coordinator for builds it can do, fetches their
//! inputs from the coordinator's cache (every narinfo signed by the
//! coordinator's key, every NAR hash checked), builds each with sandoff's
//! own sandbox ([`crate::build::realise_one`], as `sandoff build` and
//! `sandoff serve` do), streams the log while the build runs (the new
//! lines about every second), and sends back the log and the outputs as
//! zstd-compressed NARs (spooled to disk first, so a broken upload resumes
//! from the byte the coordinator holds).
//!
//! Leases: the agent sends a heartbeat with the builds it runs every third
//! of a lease; builds the coordinator says it lost (the lease expired
//! while the agent was cut off, or they were canceled) are not uploaded.
//! On start it asks for the builds still leased to it and builds them
//! again (a restarted agent lost their sandboxes).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use thiserror::Error;

use super::api::{BuildResult, Heartbeat, HeartbeatAnswer, Info, Job, Jobs, OutputClaim};
use super::client::{Client, ClientError};
use super::model::{AgentOffer, BuildId, Setback};
use super::submit::compress_nar;
use super::substitute::HttpCache;
use crate::build::{self, BuildContext, BuildErrorKind, Event};
use crate::derivation::check::MAX_DRV_SIZE;
use crate::derivation::Derivation;
use crate::serve_protocol::BuildStatus;
use crate::store::signature::{PublicKey, TrustedKeys};
use crate::store::StorePath;

/// How an agent runs.
#[derive(Debug)]
pub struct AgentConfig {
    pub client: Client,
    pub systems: BTreeSet<String>,
    pub features: BTreeSet<String>,
    /// Only builds requiring all of these (an SSH machine's mandatory
    /// features; empty for agents).
    pub mandatory_features: BTreeSet<String>,
    pub max_parallel_builds: usize,
    /// How long to wait between requests for work when there was none.
    pub poll: Duration,
    /// Where compressed NARs and logs wait for their upload.
    pub spool: PathBuf,
    /// zstd level of uploads.
    pub zstd_level: i32,
    /// The key the cache's narinfos must be signed with; `None`: the one
    /// the coordinator announces (over its authenticated connection).
    pub coordinator_key: Option<PublicKey>,
    /// The largest log sent.
    pub max_log_bytes: u64,
}

/// Why the agent could not start or a job could not finish.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("coordinator: {0}")]
    Client(#[from] ClientError),
    #[error("the coordinator's key '{key}': {source}")]
    Key {
        key: String,
        #[source]
        source: crate::store::signature::SignatureError,
    },
    #[error("spool directory '{path}': {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Runs the agent until `stop` is set.
pub fn run(
    config: &AgentConfig,
    ctx: &BuildContext<'_>,
    stop: &AtomicBool,
) -> Result<(), AgentError> {
    fs::create_dir_all(&config.spool).map_err(|source| AgentError::Spool {
        path: config.spool.clone(),
        source,
    })?;
    let info: Info = config.client.get("/agent/v1/info")?;
    let key = match &config.coordinator_key {
        Some(k) => k.clone(),
        None => PublicKey::parse(&info.public_key, "the coordinator").map_err(|source| {
            AgentError::Key {
                key: info.public_key.clone(),
                source,
            }
        })?,
    };
    let mut trusted = TrustedKeys::new();
    trusted
        .insert(key, "the coordinator")
        .map_err(|source| AgentError::Key {
            key: info.public_key.clone(),
            source,
        })?;
    let cache = HttpCache::new(
        &format!("{}/cache", config.client.base()),
        config.client.http().clone(),
        Some(config.client.authorization().to_owned()),
        trusted,
    );
    let running: Mutex<BTreeMap<BuildId, Arc<AtomicBool>>> = Mutex::new(BTreeMap::new());
    // Signalled when a job ends, so that a free slot is offered at once
    // rather than after the poll interval.
    let slot_freed = Condvar::new();
    let lease = Duration::from_secs(info.lease_secs.max(3) as u64);
    std::thread::scope(|s| {
        let jobs_of = |jobs: Jobs| {
            for job in jobs.jobs {
                let lost = Arc::new(AtomicBool::new(false));
                {
                    let mut r = running.lock().expect("no job thread panics holding it");
                    if r.contains_key(&job.id) {
                        continue;
                    }
                    r.insert(job.id, lost.clone());
                }
                let (cache, running, slot_freed) = (&cache, &running, &slot_freed);
                s.spawn(move || {
                    let id = job.id;
                    run_job(config, ctx, cache, job, &lost);
                    running
                        .lock()
                        .expect("no job thread panics holding it")
                        .remove(&id);
                    slot_freed.notify_all();
                });
            }
        };
        // Builds leased before a restart are ours to do again.
        match config.client.get::<Jobs>("/agent/v1/leases") {
            Ok(jobs) => {
                if !jobs.jobs.is_empty() {
                    tracing::info!(
                        count = jobs.jobs.len(),
                        "resuming builds still leased to this agent"
                    );
                }
                jobs_of(jobs);
            }
            Err(e) => tracing::warn!("asking for this agent's leases: {e}"),
        }
        s.spawn(|| heartbeats(config, &running, lease / 3, stop));
        while !stop.load(Ordering::Relaxed) {
            let busy = running
                .lock()
                .expect("no job thread panics holding it")
                .len();
            let free = config.max_parallel_builds.saturating_sub(busy);
            let mut got = false;
            if free > 0 {
                let offer = AgentOffer {
                    systems: config.systems.clone(),
                    features: config.features.clone(),
                    mandatory_features: config.mandatory_features.clone(),
                    free_slots: free as i64,
                    max_parallel_builds: config.max_parallel_builds as i64,
                };
                match config.client.post::<_, Jobs>("/agent/v1/allocate", &offer) {
                    Ok(jobs) => {
                        got = !jobs.jobs.is_empty();
                        for j in &jobs.jobs {
                            tracing::info!(build = %j.id, drv = %j.drv.drv, "leased");
                        }
                        jobs_of(jobs);
                    }
                    Err(e) => tracing::warn!("asking for work: {e}"),
                }
            }
            if !got {
                let r = running.lock().expect("no job thread panics holding it");
                // Waits for the poll interval, or less if a job ends (and
                // at once if one ended since the offer).
                if r.len() >= busy {
                    let _ = slot_freed.wait_timeout(r, config.poll);
                }
            }
        }
    });
    Ok(())
}

/// Tells the coordinator which builds run here, every `every`; marks
/// those it says are lost.
fn heartbeats(
    config: &AgentConfig,
    running: &Mutex<BTreeMap<BuildId, Arc<AtomicBool>>>,
    every: Duration,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(every.max(Duration::from_millis(500)));
        let builds: Vec<BuildId> = running
            .lock()
            .expect("no job thread panics holding it")
            .keys()
            .copied()
            .collect();
        if builds.is_empty() {
            continue;
        }
        match config
            .client
            .post::<_, HeartbeatAnswer>("/agent/v1/heartbeat", &Heartbeat { builds })
        {
            Ok(answer) => {
                let r = running.lock().expect("no job thread panics holding it");
                for id in answer.lost {
                    if let Some(flag) = r.get(&id) {
                        tracing::warn!(build = %id, "lease lost; its result will not be sent");
                        flag.store(true, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => tracing::warn!("heartbeat: {e}"),
        }
    }
}

/// Does one job and reports its result; every failure ends in a report
/// (or, for a lost lease, in silence).
fn run_job(
    config: &AgentConfig,
    ctx: &BuildContext<'_>,
    cache: &HttpCache,
    job: Job,
    lost: &AtomicBool,
) {
    let id = job.id;
    let report = match do_job(config, ctx, cache, &job, lost) {
        Ok(Some(outputs)) => BuildResult::Success { outputs },
        Ok(None) => return,
        Err(setback) => BuildResult::Setback { setback },
    };
    if lost.load(Ordering::Relaxed) {
        return;
    }
    let path = format!("/agent/v1/builds/{id}/result");
    // A coordinator restarting, or a link down, is waited out while the
    // lease may still hold (about two minutes of tries); after that the
    // lease has expired and the build is someone else's.
    const TRIES: u32 = 12;
    for attempt in 0..TRIES {
        match config.client.post_only(&path, Some(&report)) {
            Ok(()) => {
                tracing::info!(build = %id, "reported {}", outcome_name(&report));
                return;
            }
            Err(e) if e.is_transient() && attempt + 1 < TRIES && !lost.load(Ordering::Relaxed) => {
                tracing::warn!(build = %id, "reporting: {e}; trying again");
                std::thread::sleep(Duration::from_secs((1u64 << attempt.min(4)).min(10)));
            }
            Err(e) => {
                tracing::error!(build = %id, "reporting: {e}; giving up (the lease will expire and the build be done again)");
                return;
            }
        }
    }
}

fn outcome_name(r: &BuildResult) -> &'static str {
    match r {
        BuildResult::Success { .. } => "success",
        BuildResult::Setback {
            setback: Setback::BuildFailure { .. },
        } => "build failure",
        BuildResult::Setback { .. } => "infrastructure failure",
    }
}

fn infra(message: impl std::fmt::Display) -> Setback {
    Setback::Infrastructure {
        message: message.to_string(),
    }
}

/// Fetches, builds, uploads. `Ok(None)`: the lease was lost.
fn do_job(
    config: &AgentConfig,
    ctx: &BuildContext<'_>,
    cache: &HttpCache,
    job: &Job,
    lost: &AtomicBool,
) -> Result<Option<BTreeMap<String, OutputClaim>>, Setback> {
    let id = job.id;
    let client = &config.client;
    let store = ctx.store;
    let dir = &store.location().dir;
    client
        .post_only::<()>(&format!("/agent/v1/builds/{id}/start"), None)
        .map_err(infra)?;
    let drv_path = dir.parse_path(&job.drv.drv).map_err(infra)?;
    let bytes = client
        .get_bytes(&format!("/agent/v1/builds/{id}/drv"), MAX_DRV_SIZE)
        .map_err(infra)?;
    let mut drv = Derivation::from_aterm(&bytes, dir)
        .map_err(|e| infra(format!("'{}': {e}", job.drv.drv)))?;
    let mut inputs = BTreeSet::new();
    for p in &job.inputs {
        inputs.insert(dir.parse_path(p).map_err(infra)?);
    }
    cache
        .fetch_closure(store, &inputs)
        .map_err(|e| infra(format!("fetching inputs: {e}")))?;
    // A basic derivation, as the serve protocol's BuildDerivation: the
    // inputs are resolved, their derivations are not needed here.
    drv.input_derivations.clear();
    drv.input_sources = inputs;
    let log_path = format!("/agent/v1/builds/{id}/log");
    let mut send = |offset: u64, bytes: &[u8]| client.append_bytes(&log_path, offset, bytes);
    let (log, outcome) = build_logged(ctx, &drv_path, &drv, config.max_log_bytes, &mut send);
    if lost.load(Ordering::Relaxed) {
        return Ok(None);
    }
    // The log goes first: a failure's log is what its user reads. The
    // whole of it replaces the live one (which may have missed a part).
    if let Err(e) = client.put_bytes(&log_path, &log) {
        tracing::warn!(build = %id, "sending the log: {e}");
    }
    if let Err(e) = outcome {
        return Err(if is_build_failure(&e.kind) {
            Setback::BuildFailure {
                message: e.to_string(),
            }
        } else {
            infra(e)
        });
    }
    let mut claims = BTreeMap::new();
    for (name, path) in drv.output_paths() {
        if lost.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let spooled = config.spool.join(format!("b{id}-{name}.nar.zst"));
        // Its NAR hash and size were computed when it was registered.
        let info = store
            .query_path_info(&path)
            .map_err(infra)?
            .ok_or_else(|| infra(format!("output '{name}' is not valid after its build")))?;
        let claim = OutputClaim {
            nar_hash: info.nar_hash.to_nix32_prefixed(),
            nar_size: info.nar_size,
        };
        compress_nar(
            &store.location().real_path(&path),
            &spooled,
            config.zstd_level,
        )
        .map_err(|e| infra(format!("compressing output '{name}': {e}")))?;
        let sent = client.upload(&format!("/agent/v1/builds/{id}/outputs/{name}"), &spooled);
        let _ = fs::remove_file(&spooled);
        sent.map_err(|e| infra(format!("uploading output '{name}': {e}")))?;
        claims.insert(name, claim);
    }
    Ok(Some(claims))
}

/// How often a running build's new log lines are sent.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Appends a live log's new part at an offset; answers the size the
/// coordinator holds (the agent's [`Client::append_bytes`], a recorder in
/// tests).
type SendLog<'a> = dyn FnMut(u64, &[u8]) -> Result<u64, ClientError> + Send + 'a;

/// The log of a running build as it grows, and whether the build ended.
#[derive(Default)]
struct LiveLog {
    bytes: Vec<u8>,
    done: bool,
}

/// Builds `drv`, collecting its log (at most `max` bytes kept) and sending
/// what is new of it through `send` every [`LOG_EVERY`], so that clients
/// can follow a running build.
fn build_logged(
    ctx: &BuildContext<'_>,
    drv_path: &StorePath,
    drv: &Derivation,
    max: u64,
    send: &mut SendLog<'_>,
) -> (
    Vec<u8>,
    Result<build::local::StepOutcome, build::BuildError>,
) {
    let live = (Mutex::new(LiveLog::default()), Condvar::new());
    let outcome = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<Event>();
        let live = &live;
        s.spawn(move || {
            for event in rx {
                if let Event::Log { line, .. } = event {
                    append_line(live, &line, max);
                }
            }
            finish(live);
        });
        s.spawn(move || stream_log(live, send, LOG_EVERY));
        let outcome = build::local::realise_one(ctx, drv_path, drv, &tx);
        drop(tx);
        outcome
    });
    let log = live.0.into_inner().unwrap_or_else(|e| e.into_inner()).bytes;
    (log, outcome)
}

/// Adds a line to the live log unless it would pass `max` bytes.
fn append_line(live: &(Mutex<LiveLog>, Condvar), line: &[u8], max: u64) {
    let mut l = live.0.lock().expect("no log thread panics holding it");
    if ((l.bytes.len() + line.len()) as u64) < max {
        l.bytes.extend_from_slice(line);
        l.bytes.push(b'\n');
    }
}

/// Marks the live log complete and wakes the sender.
fn finish(live: &(Mutex<LiveLog>, Condvar)) {
    live.0.lock().expect("no log thread panics holding it").done = true;
    live.1.notify_all();
}

/// Sends the new part of the live log every `every` until it is complete.
/// The first call (empty) starts a fresh live log on the coordinator, so
/// that a log of an earlier attempt is not shown as this one's. A refused
/// append (an offset the coordinator disagrees with, a lease it no longer
/// knows) stops the streaming, as does a failed first one: the complete log
/// is sent at the end anyway. A transient failure later is tried again.
fn stream_log(live: &(Mutex<LiveLog>, Condvar), send: &mut SendLog<'_>, every: Duration) {
    let mut sent: u64 = 0;
    let mut first = true;
    loop {
        let (chunk, done) = {
            let l = live.0.lock().expect("no log thread panics holding it");
            let l = if first || l.done {
                l
            } else {
                live.1
                    .wait_timeout(l, every)
                    .expect("no log thread panics holding it")
                    .0
            };
            let start = (sent as usize).min(l.bytes.len());
            (l.bytes[start..].to_vec(), l.done)
        };
        if first || !chunk.is_empty() {
            match send(sent, &chunk) {
                Ok(n) => sent = n,
                // The coordinator restarts or the network hiccups: the
                // same part goes again next time.
                Err(e) if e.is_transient() && !first => {
                    tracing::debug!("sending the live log: {e}; trying again");
                }
                Err(e) => {
                    tracing::warn!(
                        "sending the live log: {e}; the log is sent when the build ends"
                    );
                    return;
                }
            }
            first = false;
        }
        if done {
            return;
        }
    }
}

/// Whether a failure is the derivation's (final) rather than this
/// machine's (retried elsewhere).
fn is_build_failure(kind: &BuildErrorKind) -> bool {
    use BuildErrorKind as K;
    match kind {
        K::Kept { error, .. } => is_build_failure(error),
        // A machine's verdict on the derivation (an SSH worker's build);
        // its transient and miscellaneous failures are the machine's.
        K::RemoteFailed { status, .. } => !matches!(
            status,
            BuildStatus::TransientFailure | BuildStatus::MiscFailure
        ),
        K::Failed { .. }
        | K::LogLimit { .. }
        | K::MissingOutput { .. }
        | K::ForeignFile { .. }
        | K::UnsupportedType { .. }
        | K::HashMismatch { .. }
        | K::FlatNotRegular
        | K::FixedReferences { .. }
        | K::OutputCheck(_)
        | K::Refused(_)
        | K::Unsupported { .. }
        | K::Attributes(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live log is sent in contiguous parts from offset 0, and the last part is sent once the log is complete.
    #[test]
    fn live_log_is_sent_in_contiguous_parts_until_complete() {
        let live = (Mutex::new(LiveLog::default()), Condvar::new());
        let sent: Mutex<Vec<(u64, Vec<u8>)>> = Mutex::new(Vec::new());
        let mut send = |offset: u64, bytes: &[u8]| -> Result<u64, ClientError> {
            sent.lock().unwrap().push((offset, bytes.to_vec()));
            Ok(offset + bytes.len() as u64)
        };
        std::thread::scope(|s| {
            let live = &live;
            let send = &mut send;
            s.spawn(move || stream_log(live, send, Duration::from_millis(5)));
            for i in 0..50 {
                append_line(live, format!("line {i}").as_bytes(), 1 << 20);
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            finish(live);
        });
        let sent = sent.into_inner().unwrap();
        // The first part (at once, whatever the log holds) starts a fresh
        // live log at offset 0.
        assert_eq!(sent[0].0, 0);
        let mut whole = Vec::new();
        for (offset, bytes) in &sent {
            assert_eq!(*offset, whole.len() as u64, "parts are contiguous");
            whole.extend_from_slice(bytes);
        }
        let expected: String = (0..50).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(whole).unwrap(), expected);
    }

    /// A refused append stops the streaming (the whole log goes at the end).
    #[test]
    fn a_refused_append_stops_the_live_log() {
        let live = (Mutex::new(LiveLog::default()), Condvar::new());
        let mut calls = 0;
        let mut send = |_: u64, _: &[u8]| -> Result<u64, ClientError> {
            calls += 1;
            Err(ClientError::Http {
                url: "x".into(),
                status: 409,
                message: "not leased".into(),
            })
        };
        append_line(&live, b"a", 100);
        stream_log(&live, &mut send, Duration::from_millis(1));
        assert_eq!(calls, 1);
    }

    #[test]
    fn the_live_log_keeps_at_most_max_bytes() {
        let live = (Mutex::new(LiveLog::default()), Condvar::new());
        append_line(&live, b"12345", 8);
        append_line(&live, b"67890", 8);
        assert_eq!(live.0.lock().unwrap().bytes, b"12345\n");
    }
}
