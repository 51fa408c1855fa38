//! Where the coordinator keeps everything that must survive a restart: the
//! derivations it knows, the builds and their dependencies, the agents,
//! the tokens (hashed) and the index of the cache. One interface,
//! [`Datastore`], two backends: SQLite ([`sqlite`], one file) and
//! PostgreSQL ([`postgres`], for farms that outgrow one file). The
//! scheduling logic is written once ([`logic`]) over a small SQL interface
//! ([`sql`]) each backend implements; each backend has its own schema
//! migrations with the same version numbers.
//!
//! Scheduling decisions are made here, each in one transaction, so that a
//! crash between two steps cannot lose or duplicate a build: which builds
//! a submission creates, effective priorities and critical paths, which
//! builds an agent gets, lease expiry, retries with backoff.
//!
//! Calls are blocking; the server runs them on tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

pub mod logic;
pub mod postgres;
pub mod sql;
pub mod sqlite;

pub use logic::leases::{FEATURE_SETS, READY};
pub use logic::schema::{known_version, version};
pub use logic::Store;

use super::model::{
    AgentId, AgentOffer, AgentRecord, BuildId, BuildRecord, BuildState, CachedPath, DrvRecord,
    Event, Expiry, NewBuild, Principal, Setback, Submitted, TokenRecord,
};

/// Why a datastore call failed. The variants from `Sqlite` to `Corrupt` are
/// the database's or the setup's; every other one is the caller's mistake
/// and changed nothing.
#[derive(Debug, Error)]
pub enum DatastoreError {
    #[error("datastore: {source}")]
    Sqlite {
        #[from]
        source: rusqlite::Error,
    },
    #[error("datastore: cannot open '{path}': {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("datastore: {source}")]
    Postgres {
        #[from]
        source: ::postgres::Error,
    },
    #[error("datastore: cannot connect to '{url}': {source}")]
    PostgresConnect {
        /// The URL, its password hidden.
        url: String,
        #[source]
        source: ::postgres::Error,
    },
    #[error("datastore: bad PostgreSQL URL '{url}': {source}")]
    PostgresUrl {
        url: String,
        #[source]
        source: ::postgres::Error,
    },
    #[error("datastore: '{url}' asks for TLS, which sandoff does not speak to PostgreSQL (use a local socket, e.g. postgresql:///DB?host=/run/postgresql, or a trusted network with sslmode=disable)")]
    PostgresTls { url: String },
    #[error("datastore: unsupported URL '{0}' (use sqlite:///PATH or postgresql://…)")]
    Url(String),
    #[error("datastore: schema version {found} is newer than this sandoff knows ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("datastore: corrupt row: {0}")]
    Corrupt(String),
    #[error("no build {0}")]
    NoBuild(BuildId),
    #[error("no agent '{0}'")]
    NoAgent(AgentId),
    #[error("agent '{0}' exists already")]
    AgentExists(AgentId),
    #[error("unknown derivation '{0}': upload it first")]
    NoDerivation(String),
    #[error("build {id} is {state}, not {wanted}")]
    WrongState {
        id: BuildId,
        state: &'static str,
        wanted: &'static str,
    },
    #[error("build {id} is not leased to agent '{agent}' (its lease expired or it was canceled)")]
    NotLeased { id: BuildId, agent: AgentId },
    #[error("no token '{0}'")]
    NoToken(String),
}

/// How infrastructure failures are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first backoff, in seconds; each further failure triples it.
    pub base_secs: i64,
    /// The longest backoff.
    pub max_secs: i64,
    /// After this many infrastructure failures the build fails for good.
    pub max_attempts: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // Hydra retries 5 times, 60 s x 3^n; a smaller base suits the
        // lost-lease case, where the build was never wrong.
        RetryPolicy {
            base_secs: 10,
            max_secs: 3600,
            max_attempts: 6,
        }
    }
}

/// Which builds `builds list` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildFilter {
    /// Only these states (all when empty).
    pub states: BTreeSet<BuildState>,
    /// Only builds with this tag (`key`, `value`).
    pub tag: Option<(String, String)>,
    /// Only builds of this derivation.
    pub drv: Option<String>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// A build handed to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub id: BuildId,
    pub drv: DrvRecord,
    pub lease_deadline: i64,
}

/// Queue figures for `builds list` summaries and the benchmark.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: i64,
    /// Queued and waiting for nothing.
    pub ready: i64,
    pub allocated: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub canceled: i64,
}

/// The upper bounds (seconds) of the wait-time and build-duration
/// histograms' buckets, `+Inf` aside.
pub const HISTOGRAM_BUCKETS: [i64; 12] =
    [1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400];

/// Where one event stands with one hook, past the hook's cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Attempts so far (the delivering one included).
    pub attempts: i64,
    /// Not tried again before this time.
    pub next_try: i64,
    pub delivered: bool,
}

/// A hook's delivery progress: every event up to `cursor` is done with;
/// `deliveries` holds those after it that were tried (or delivered out of
/// order, with a parallelism above 1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookProgress {
    pub cursor: i64,
    pub deliveries: BTreeMap<i64, Delivery>,
}

/// What `/metrics` reads from the datastore.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Durable counters: `builds_finished:STATE`, `lease_expiries`,
    /// `bytes_uploaded`, and `wait_seconds_…`/`duration_seconds_…` with
    /// `_bucket:LE` (not cumulative), `_sum` and `_count`.
    pub counters: BTreeMap<String, i64>,
    /// Active builds: (system, state, count).
    pub queue: Vec<(String, String, i64)>,
    /// Paths in the cache index and their files' total size.
    pub cache_paths: i64,
    pub cache_bytes: i64,
}

/// The coordinator's persistent state. Every method is one transaction.
pub trait Datastore: Send + Sync {
    // --- derivations -----------------------------------------------------

    /// Records checked derivations (idempotent: a known one is left as is).
    fn put_derivations(&self, drvs: &[DrvRecord]) -> Result<(), DatastoreError>;
    /// A recorded derivation.
    fn derivation(&self, drv: &str) -> Result<Option<DrvRecord>, DatastoreError>;

    // --- the cache index -------------------------------------------------

    /// Records paths that entered the cache (their files are in place).
    fn cache_add(&self, paths: &[CachedPath]) -> Result<(), DatastoreError>;
    /// A path in the cache.
    fn cache_get(&self, path: &str) -> Result<Option<CachedPath>, DatastoreError>;
    /// Which of `paths` the cache does not hold.
    fn cache_missing(&self, paths: &[String]) -> Result<BTreeSet<String>, DatastoreError>;

    // --- builds ----------------------------------------------------------

    /// Submits builds. For each, the closure of its input derivations is
    /// walked (every one must be recorded, else `NoDerivation` and nothing
    /// changes): an input whose outputs are all in the cache needs nothing;
    /// one with an active build becomes a dependency of it; one whose last
    /// build failed makes this build fail at once ("dependency failed"),
    /// unless `retry`; otherwise a build is created for it too. A
    /// derivation with an active build is not built twice: its build is
    /// returned (`created: false`) with the higher priority of the two.
    /// Effective priorities and critical paths are updated down the
    /// dependencies. A build whose outputs are all in the cache succeeds at
    /// once.
    fn submit(&self, builds: &[NewBuild], now: i64) -> Result<Vec<Submitted>, DatastoreError>;
    /// One build.
    fn build(&self, id: BuildId) -> Result<BuildRecord, DatastoreError>;
    /// Builds matching `filter`, newest first.
    fn builds(&self, filter: &BuildFilter) -> Result<Vec<BuildRecord>, DatastoreError>;
    /// The ids of the active builds `id` waits for.
    fn dependencies(&self, id: BuildId) -> Result<Vec<BuildId>, DatastoreError>;
    /// Cancels an active build, and every active build that needs it.
    /// Returns the canceled ids.
    fn cancel(&self, id: BuildId, now: i64) -> Result<Vec<BuildId>, DatastoreError>;
    /// Sets an active build's own priority and recomputes the effective
    /// priorities it affects.
    fn set_priority(&self, id: BuildId, priority: i64) -> Result<BuildRecord, DatastoreError>;
    /// Counts by state.
    fn queue_stats(&self) -> Result<QueueStats, DatastoreError>;

    // --- agents and leases -------------------------------------------------

    /// Creates an (enabled) agent.
    fn agent_new(&self, id: &AgentId, now: i64) -> Result<(), DatastoreError>;
    /// Enables or disables an agent; a disabled agent gets no work and its
    /// tokens are refused.
    fn agent_set_enabled(&self, id: &AgentId, enabled: bool) -> Result<(), DatastoreError>;
    /// Every agent.
    fn agents(&self) -> Result<Vec<AgentRecord>, DatastoreError>;
    /// Records what the agent offers (`last_seen = now`) and leases it up
    /// to `offer.free_slots` builds it can do: queued, waiting for nothing,
    /// past their `defer_until` and backoff, of one of its systems (or
    /// `builtin`) with every required feature among its features; highest
    /// effective priority first, then longest critical path, then oldest.
    /// A build whose last setback was on this agent goes to it only when no
    /// other enabled agent seen in the last `lease_secs` could take it.
    fn allocate(
        &self,
        agent: &AgentId,
        offer: &AgentOffer,
        lease_secs: i64,
        now: i64,
    ) -> Result<Vec<Allocation>, DatastoreError>;
    /// The builds still leased to `agent` (an agent that restarts resumes
    /// these and only these).
    fn leases(&self, agent: &AgentId) -> Result<Vec<Allocation>, DatastoreError>;
    /// Extends the leases of those of `builds` still leased to `agent` to
    /// `now + lease_secs`; returns the others, which the agent must stop.
    fn heartbeat(
        &self,
        agent: &AgentId,
        builds: &[BuildId],
        lease_secs: i64,
        now: i64,
    ) -> Result<Vec<BuildId>, DatastoreError>;
    /// Marks a leased build started (first time only).
    fn start(&self, agent: &AgentId, id: BuildId, now: i64) -> Result<(), DatastoreError>;
    /// A leased build succeeded: in one transaction its outputs enter the
    /// cache index, it becomes `succeeded`, and its dependents stop waiting
    /// for it. `NotLeased` (and nothing changes) if it is not leased to
    /// `agent` any more.
    fn succeed(
        &self,
        agent: &AgentId,
        id: BuildId,
        outputs: &[CachedPath],
        now: i64,
    ) -> Result<(), DatastoreError>;
    /// A leased build came back without a result: a build failure is final
    /// and fails the active builds that need it; an infrastructure failure
    /// requeues it with backoff (or fails it past `max_attempts`).
    fn setback(
        &self,
        agent: &AgentId,
        id: BuildId,
        setback: &Setback,
        now: i64,
    ) -> Result<BuildRecord, DatastoreError>;
    /// Requeues every allocated build whose lease ended before `now`, as an
    /// infrastructure failure on its agent; returns them.
    fn expire_leases(&self, now: i64) -> Result<Vec<BuildId>, DatastoreError>;

    // --- tokens ------------------------------------------------------------

    /// Stores a token by its SHA-256; returns its public id.
    fn token_add(
        &self,
        hash: &[u8; 32],
        principal: &Principal,
        expires_at: Expiry,
        now: i64,
    ) -> Result<String, DatastoreError>;
    /// Whose token this is: `None` if unknown, revoked, expired, or of a
    /// disabled or deleted agent.
    fn token_lookup(&self, hash: &[u8; 32], now: i64) -> Result<Option<Principal>, DatastoreError>;
    /// Revokes a token by its public id.
    fn token_revoke(&self, id: &str) -> Result<(), DatastoreError>;
    /// Every token (never the secret).
    fn tokens(&self) -> Result<Vec<TokenRecord>, DatastoreError>;

    // --- events and hooks ----------------------------------------------------
    //
    // Every method above that changes a build's state writes its event in
    // the same transaction: `submit` (`build-submitted` for each build it
    // creates, and `build-success`/`build-failure` for one created
    // finished), `start` (`build-started`, the first time), `succeed`,
    // `setback` and `cancel` (`build-success`, `build-failure`,
    // `build-canceled` for every build that ends, dependents included;
    // `build-missing-inputs` for [`Setback::MissingInputs`]) and
    // `expire_leases` (one `agent-lost` per agent).

    /// Up to `limit` events with ids above `after`, oldest first.
    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, DatastoreError>;
    /// The id of the last event written (0 before any).
    fn last_event_id(&self) -> Result<i64, DatastoreError>;
    /// Where `hook` (any stable name of a configured hook) stands. A hook
    /// never seen starts after the last event written.
    fn hook_progress(&self, hook: &str) -> Result<HookProgress, DatastoreError>;
    /// Records one attempt to deliver `event` to `hook`: delivered, or
    /// failed and not to be tried again before `next_try`. Returns the
    /// event's standing.
    fn hook_attempt(
        &self,
        hook: &str,
        event: i64,
        delivered: bool,
        next_try: i64,
    ) -> Result<Delivery, DatastoreError>;
    /// Moves `hook`'s cursor up to `cursor` (never back): every event up to
    /// it was delivered or is not for this hook.
    fn hook_advance(&self, hook: &str, cursor: i64) -> Result<(), DatastoreError>;
    /// Deletes the events all of `hooks` have passed, but never the last
    /// `keep`; forgets the progress of hooks not in `hooks`. Returns how
    /// many events went.
    fn prune_events(&self, hooks: &[String], keep: i64) -> Result<usize, DatastoreError>;

    // --- metrics ---------------------------------------------------------------

    /// The counters and gauges of `/metrics` (agents aside: [`Datastore::agents`]).
    fn metrics(&self) -> Result<MetricsSnapshot, DatastoreError>;
}

/// Opens the datastore a `--datastore` URL names (`sqlite:///PATH`, or a
/// PostgreSQL URI `postgresql://…`/`postgres://…`), creating or migrating
/// its schema. Blocking: call it outside async code.
pub fn open(url: &str, retry: RetryPolicy) -> Result<Box<dyn Datastore>, DatastoreError> {
    if url.starts_with("postgresql://") || url.starts_with("postgres://") {
        return Ok(Box::new(postgres::PostgresDatastore::open(url, retry)?));
    }
    match url.strip_prefix("sqlite://") {
        Some(path) if path.starts_with('/') => Ok(Box::new(sqlite::SqliteDatastore::open(
            std::path::Path::new(path),
            retry,
        )?)),
        _ => Err(DatastoreError::Url(postgres::redact(url))),
    }
}
