//! The datastore's behaviour, the same tests against both backends: SQLite
//! (a file in a temporary directory) and PostgreSQL (a fresh database per
//! test on the server `SANDOFF_TEST_POSTGRES` names, a libpq URI of a
//! database to connect to for creating others; `scripts/test.sh` starts a
//! private server and sets it). Each test is a function of a [`Db`];
//! [`conformance!`] makes a `sqlite::` and a `postgres::` test of each.
//! Only the public interface is used, apart from raw SQL for bulk fills and
//! for inspecting the dependency edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sandoff::coordinator::datastore::{
    self, BuildFilter, Datastore, DatastoreError, QueueStats, RetryPolicy,
};
use sandoff::coordinator::model::{
    AgentId, AgentOffer, BuildId, BuildRecord, BuildState, CachedPath, DrvRecord, NewBuild,
    Principal, Role, Setback, Submitted,
};

use crate::support::{require, Need};

/// A datastore as `datastore::open` gives it.
type Ds = Box<dyn Datastore>;

/// The variable naming the PostgreSQL server for these tests.
const POSTGRES_VAR: &str = "SANDOFF_TEST_POSTGRES";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// One test's database, removed when the test ends.
pub(crate) struct Db {
    /// The `--datastore` URL.
    pub(crate) url: String,
    backend: Backend,
    /// SQLite: the file's directory.
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the server's URL and this test's database on it.
    created: Option<(String, String)>,
}

/// `url` (a libpq URI) with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgresql:// URI");
    let (before_query, query) = rest
        .split_once('?')
        .map_or((rest, None), |(a, q)| (a, Some(q)));
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

fn pg_connect(url: &str) -> ::postgres::Client {
    ::postgres::Client::connect(url, ::postgres::NoTls)
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

impl Db {
    /// A fresh database for `test` (its full name), or `None` (after
    /// `SKIP`) if the backend is not available.
    pub(crate) fn new(backend: Backend, test: &str) -> Option<Db> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                // bench/coordinator/alloc.sh keeps the benchmark's database
                // to ask a real coordinator over HTTP next.
                let file = match std::env::var_os("SANDOFF_BENCH_KEEP_DB") {
                    Some(f) if test.contains("::allocate_from_") => PathBuf::from(f),
                    _ => dir.path().join("coordinator.sqlite"),
                };
                Some(Db {
                    url: format!("sqlite://{}", file.display()),
                    backend,
                    _dir: Some(dir),
                    created: None,
                })
            }
            Backend::Postgres => {
                let server = std::env::var(POSTGRES_VAR).ok();
                let needs = [Need::Condition {
                    what: "a PostgreSQL server (SANDOFF_TEST_POSTGRES)",
                    met: server.is_some(),
                }];
                if !require(test, &needs) {
                    return None;
                }
                let server = server.expect("checked by require");
                // bench/coordinator/alloc.sh --postgres names the
                // benchmark's database, kept for a real coordinator next.
                let keep = std::env::var("SANDOFF_BENCH_KEEP_DB")
                    .ok()
                    .filter(|_| test.contains("::allocate_from_"));
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                let short: String = test
                    .rsplit("::")
                    .next()
                    .unwrap_or(test)
                    .chars()
                    .take(32)
                    .collect();
                let name = keep.clone().unwrap_or_else(|| {
                    format!(
                        "t{}_{}_{short}",
                        std::process::id(),
                        NEXT.fetch_add(1, Ordering::Relaxed)
                    )
                });
                let mut admin = pg_connect(&server);
                // One statement each: neither runs inside a transaction.
                for sql in [
                    format!("drop database if exists \"{name}\" with (force)"),
                    format!("create database \"{name}\""),
                ] {
                    admin
                        .batch_execute(&sql)
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                }
                Some(Db {
                    url: with_database(&server, &name),
                    backend,
                    _dir: None,
                    created: keep.is_none().then_some((server, name)),
                })
            }
        }
    }

    /// The datastore, opened anew (as a restarted coordinator would).
    fn open(&self) -> Box<dyn Datastore> {
        datastore::open(&self.url, policy()).expect("open the datastore")
    }

    /// The schema version this sandoff writes to this backend.
    fn known_version(&self) -> i64 {
        let migrations = match self.backend {
            Backend::Sqlite => datastore::sqlite::schema::MIGRATIONS,
            Backend::Postgres => datastore::postgres::schema::MIGRATIONS,
        };
        datastore::known_version(migrations)
    }

    /// Runs raw SQL statements on the database, in one transaction.
    fn sql(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let path = self.url.strip_prefix("sqlite://").expect("a sqlite URL");
                let mut c = rusqlite::Connection::open(path).expect("open the file");
                let tx = c.transaction().expect("begin");
                tx.execute_batch(sql).expect(sql);
                tx.commit().expect("commit");
            }
            Backend::Postgres => {
                let mut c = pg_connect(&self.url);
                let mut tx = c.transaction().expect("begin");
                tx.batch_execute(sql).expect(sql);
                tx.commit().expect("commit");
            }
        }
    }

    /// The integer columns of a query's rows.
    fn ints(&self, sql: &str) -> Vec<Vec<i64>> {
        match self.backend {
            Backend::Sqlite => {
                let path = self.url.strip_prefix("sqlite://").expect("a sqlite URL");
                let c = rusqlite::Connection::open(path).expect("open the file");
                let mut s = c.prepare(sql).expect(sql);
                let n = s.column_count();
                let rows = s
                    .query_map([], |r| (0..n).map(|i| r.get(i)).collect())
                    .expect(sql);
                rows.collect::<Result<_, _>>().expect(sql)
            }
            Backend::Postgres => pg_connect(&self.url)
                .query(sql, &[])
                .expect(sql)
                .iter()
                .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
                .collect(),
        }
    }

    fn int(&self, sql: &str) -> i64 {
        self.ints(sql)[0][0]
    }

    fn pairs(&self, sql: &str) -> Vec<(i64, i64)> {
        self.ints(sql).into_iter().map(|r| (r[0], r[1])).collect()
    }

    /// Fills the datastore with `n` ready builds of `SYSTEM` (one
    /// derivation each, spread over 50 priorities) in one transaction, as
    /// fast as the database takes rows, bypassing `submit`.
    fn fill_queue(&self, n: usize) {
        self.fill_queue_with("bulk", n, 0, "[]", None);
    }

    /// [`Db::fill_queue`] with names `{prefix}-{i}`, priorities from `base`,
    /// required features (JSON) and a `defer_until`. One SQL text for both
    /// backends: a recursive counter.
    fn fill_queue_with(
        &self,
        prefix: &str,
        n: usize,
        base: i64,
        features: &str,
        defer_until: Option<i64>,
    ) {
        let defer = defer_until.map_or("null".to_owned(), |t| t.to_string());
        let numbers = format!(
            "with recursive n(i) as (select 0 union all select i + 1 from n where i < {})",
            n - 1
        );
        let name = format!("'/gnu/store/{prefix}-' || i || '.drv'");
        self.sql(&format!(
            "insert into derivations (drv, system, required_features, outputs, input_drvs, input_srcs) \
             {numbers} select {name}, '{SYSTEM}', '{features}', '{{}}', '{{}}', '[]' from n;
             insert into builds (drv, system, required_features, state, priority, \
             effective_priority, critical_path, tags, created_at, defer_until, held_until) \
             {numbers} select {name}, '{SYSTEM}', '{features}', 'queued', {base} + i % 50, \
             {base} + i % 50, 1, '{{}}', 0, {defer}, {defer} from n order by i;"
        ));
        if self.backend == Backend::Postgres {
            // Fresh statistics, as autovacuum would soon give them.
            self.sql("analyze");
        }
    }

    /// Allocation's queries walk the ready index, without a sort.
    fn check_ready_plan(&self) {
        if self.backend != Backend::Postgres {
            // SQLite's plan is checked by a unit test (sqlite::tests).
            return;
        }
        let mut c = pg_connect(&self.url);
        let plan: Vec<String> = c
            .query(
                &format!(
                    "explain {}",
                    datastore::READY
                        .replace("?1", "'x86_64-linux'")
                        .replace("?2", "'[]'")
                        .replace("?3", "4")
                ),
                &[],
            )
            .expect("explain")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        println!("{plan}");
        assert!(
            plan.contains("builds_ready") && !plan.contains("Sort"),
            "{plan}"
        );
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((server, name)) = &self.created {
            // Best effort: a leftover database of a failed run is harmless
            // in the test script's private server.
            if let Ok(mut c) = ::postgres::Client::connect(server, ::postgres::NoTls) {
                let _ =
                    c.batch_execute(&format!("drop database if exists \"{name}\" with (force)"));
            }
        }
    }
}

/// Runs one conformance test against one backend.
fn run(backend: Backend, test: &str, f: fn(&Db)) {
    let module = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    if let Some(db) = Db::new(backend, &format!("coordinator_datastore::{module}::{test}")) {
        f(&db);
    }
}

/// For each test function, a `#[test]` of the same name in `sqlite` and in
/// `postgres` (attributes such as `#[ignore]` go on both).
macro_rules! conformance {
    ($($(#[$attr:meta])* $name:ident,)*) => {
        mod sqlite {
            $($(#[$attr])* #[test] fn $name() {
                super::run(super::Backend::Sqlite, stringify!($name), super::$name)
            })*
        }
        mod postgres {
            $($(#[$attr])* #[test] fn $name() {
                super::run(super::Backend::Postgres, stringify!($name), super::$name)
            })*
        }
    };
}

conformance! {
    submit_creates_builds_for_missing_dependencies,
    submitting_an_active_drv_returns_its_build_with_the_higher_priority,
    a_build_whose_outputs_are_cached_succeeds_at_once,
    an_unknown_derivation_in_the_closure_changes_nothing,
    a_failed_dependency_fails_the_submission_unless_retry,
    a_failure_by_dependency_is_not_the_dependents_own,
    effective_priority_propagates_and_lowering_recomputes_the_cone,
    critical_path_counts_the_longest_chain_waiting,
    a_deep_chain_is_walked_without_recursion_or_rework,
    allocation_order_is_priority_then_critical_path_then_age,
    allocation_stops_at_free_slots_and_respects_defer_until,
    allocation_matches_systems_features_and_builtin,
    a_disabled_agent_gets_nothing,
    a_build_waiting_on_dependencies_is_allocated_only_after_they_succeed,
    a_build_failure_fails_everything_that_needs_it,
    an_infrastructure_failure_backs_off_and_avoids_the_agent,
    an_agent_gets_its_setback_back_when_no_other_can_take_it,
    an_expired_lease_requeues_and_the_returning_agent_learns_it,
    leases_are_the_builds_still_held_and_only_by_their_agent,
    cancel_takes_the_builds_that_need_it,
    builds_lists_newest_first_with_filters,
    builds_lists_across_pages,
    tokens_are_found_by_hash_until_expired_revoked_or_disabled,
    reopening_a_file_keeps_everything,
    two_connections_never_lease_one_build_twice,
    a_newer_schema_is_refused,
    a_version_1_database_is_migrated_keeping_its_rows,
    #[ignore = "fills 100,000 builds; run by bench/coordinator/alloc.sh"]
    allocate_from_100k_queued_builds,
    #[ignore = "fills 200,000 builds; run by bench/coordinator/alloc.sh"]
    allocate_past_100k_builds_the_agent_cannot_take,
    priorities_paths_and_edges_stay_exact_under_random_operations,
    a_worker_with_mandatory_features_gets_only_builds_that_require_them,
    each_state_change_writes_its_event,
    a_dependency_failure_tells_of_every_build_it_ends,
    a_change_that_rolls_back_writes_no_event,
    each_hook_keeps_its_own_cursor_across_a_restart,
    pruning_keeps_what_a_hook_owes_and_the_last_events,
    counters_move_with_the_changes_that_count,
}

const SYSTEM: &str = "x86_64-linux";
const LEASE: i64 = 60;

fn policy() -> RetryPolicy {
    RetryPolicy {
        base_secs: 10,
        max_secs: 25,
        max_attempts: 3,
    }
}

fn path(name: &str) -> String {
    format!("/gnu/store/{name}.drv")
}

fn out(name: &str) -> String {
    format!("/gnu/store/{name}-out")
}

/// A derivation `name` of `system`, needing `features`, with input
/// derivations `inputs` (their `out`).
fn drv_of(name: &str, system: &str, features: &[&str], inputs: &[&str]) -> DrvRecord {
    DrvRecord {
        drv: path(name),
        system: system.to_owned(),
        required_features: features.iter().map(|f| f.to_string()).collect(),
        outputs: BTreeMap::from([("out".to_owned(), out(name))]),
        input_drvs: inputs
            .iter()
            .map(|i| (path(i), BTreeSet::from(["out".to_owned()])))
            .collect(),
        input_srcs: BTreeSet::new(),
    }
}

fn drv(name: &str, inputs: &[&str]) -> DrvRecord {
    drv_of(name, SYSTEM, &[], inputs)
}

fn new_build(name: &str, priority: i64) -> NewBuild {
    NewBuild {
        drv: path(name),
        priority,
        tags: BTreeMap::new(),
        defer_until: None,
        retry: false,
    }
}

fn submit(ds: &Ds, name: &str, priority: i64, now: i64) -> Submitted {
    submit_one(ds, new_build(name, priority), now)
}

/// `name` at priority 0, asking for a new build after a failure.
fn submit_retry(ds: &Ds, name: &str, now: i64) -> Submitted {
    let build = NewBuild {
        retry: true,
        ..new_build(name, 0)
    };
    submit_one(ds, build, now)
}

fn submit_one(ds: &Ds, build: NewBuild, now: i64) -> Submitted {
    let mut s = ds.submit(&[build], now).expect("submit");
    s.pop().expect("one answer per build")
}

fn cached(path: String) -> CachedPath {
    CachedPath {
        path,
        nar_hash: "sha256:0000000000000000000000000000000000000000000000000000".to_owned(),
        nar_size: 100,
        references: BTreeSet::new(),
        deriver: None,
        url: "nar/x.nar.zst".to_owned(),
        file_size: 50,
    }
}

fn agent(ds: &Ds, name: &str) -> AgentId {
    let id = AgentId::new(name).expect("agent name");
    ds.agent_new(&id, 0).expect("new agent");
    id
}

fn offer(systems: &[&str], features: &[&str], free_slots: i64) -> AgentOffer {
    AgentOffer {
        systems: systems.iter().map(|s| s.to_string()).collect(),
        features: features.iter().map(|f| f.to_string()).collect(),
        mandatory_features: BTreeSet::new(),
        free_slots,
        max_parallel_builds: free_slots,
    }
}

/// The derivation names of what `agent` gets, in order.
fn allocate(ds: &Ds, agent: &AgentId, o: &AgentOffer, now: i64) -> Vec<(BuildId, String)> {
    ds.allocate(agent, o, LEASE, now)
        .expect("allocate")
        .into_iter()
        .map(|a| {
            let name = a
                .drv
                .drv
                .trim_start_matches("/gnu/store/")
                .trim_end_matches(".drv")
                .to_owned();
            (a.id, name)
        })
        .collect()
}

fn names(allocs: &[(BuildId, String)]) -> Vec<&str> {
    allocs.iter().map(|(_, n)| n.as_str()).collect()
}

fn get(ds: &Ds, id: BuildId) -> BuildRecord {
    ds.build(id).expect("build")
}

/// The only active build of `name`.
fn active(ds: &Ds, name: &str) -> BuildRecord {
    let found = ds
        .builds(&BuildFilter {
            drv: Some(path(name)),
            states: BTreeSet::from([BuildState::Queued, BuildState::Allocated]),
            ..BuildFilter::default()
        })
        .expect("builds");
    assert_eq!(found.len(), 1, "active builds of {name}: {found:?}");
    found.into_iter().next().expect("one build")
}

fn only_build(ds: &Ds, name: &str) -> BuildRecord {
    let found = ds
        .builds(&BuildFilter {
            drv: Some(path(name)),
            ..BuildFilter::default()
        })
        .expect("builds");
    assert_eq!(found.len(), 1, "builds of {name}: {found:?}");
    found.into_iter().next().expect("one build")
}

/// Allocates `name` alone to `agent` (it must be the best ready build).
fn lease_one(ds: &Ds, agent: &AgentId, now: i64) -> BuildId {
    let got = allocate(ds, agent, &offer(&[SYSTEM], &[], 1), now);
    assert_eq!(got.len(), 1, "{got:?}");
    got[0].0
}

fn build_failure(msg: &str) -> Setback {
    Setback::BuildFailure {
        message: msg.to_owned(),
    }
}

fn infra(msg: &str) -> Setback {
    Setback::Infrastructure {
        message: msg.to_owned(),
    }
}

// --- PostgreSQL's own --------------------------------------------------------

/// A connection the server ended (a restart, an administrator) is found
/// out at the next call, which runs on a new one: no call fails for it.
#[test]
fn a_postgresql_connection_the_server_ended_is_replaced_at_the_next_call() {
    let Some(db) = Db::new(Backend::Postgres, crate::this_test!()) else {
        return;
    };
    let ds = db.open();
    let a = agent(&ds, "a1");
    // With a timeout, pg_terminate_backend waits until the backend is gone
    // (else the next call could begin before it went, and fail mid-way).
    // (Materialised first, so that the test's own connection is never
    // among those ended, whatever order the planner evaluates in.)
    let end_it = "with others as materialized (select pid from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid() \
         and backend_type = 'client backend') \
         select count(*) from others where pg_terminate_backend(pid, 60000)";
    assert_eq!(db.int(end_it), 1, "the datastore's one connection");
    assert_eq!(ds.agents().expect("a read after the end").len(), 1);
    assert_eq!(db.int(end_it), 1);
    ds.agent_set_enabled(&a, false)
        .expect("a write after the end");
    assert!(!ds.agents().unwrap()[0].enabled);
}

/// The `postgres` client runs a small tokio runtime of its own; the
/// datastore must still open on a blocking thread of the server's runtime
/// and be dropped inside async code (where dropping a runtime panics).
#[test]
fn a_postgresql_datastore_opens_in_the_blocking_pool_and_drops_in_async_code() {
    let Some(db) = Db::new(Backend::Postgres, crate::this_test!()) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = db.url.clone();
        let ds = tokio::task::spawn_blocking(move || {
            let ds = datastore::open(&url, policy()).expect("open");
            ds.agent_new(&AgentId::new("a1").unwrap(), 0)
                .expect("a call");
            ds
        })
        .await
        .expect("the blocking task");
        drop(ds);
    });
}

// --- submission -----------------------------------------------------------

fn submit_creates_builds_for_missing_dependencies(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[
        drv("base", &[]),
        drv("tool", &[]),
        drv("lib", &["base"]),
        drv("app", &["lib", "tool", "base"]),
    ])
    .unwrap();
    ds.cache_add(&[cached(out("tool"))]).unwrap();
    let s = submit(&ds, "app", 3, 100);
    assert!(s.created);
    assert_eq!(s.state, BuildState::Queued);
    let app = get(&ds, s.id);
    let lib = active(&ds, "lib");
    let base = active(&ds, "base");
    assert_eq!(app.waiting_on, 2);
    assert_eq!(lib.waiting_on, 1);
    assert_eq!(base.waiting_on, 0);
    assert_eq!(
        ds.dependencies(app.id).unwrap(),
        vec![lib.id, base.id]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(ds.dependencies(lib.id).unwrap(), vec![base.id]);
    // The cached input needs no build.
    assert!(ds
        .builds(&BuildFilter {
            drv: Some(path("tool")),
            ..Default::default()
        })
        .unwrap()
        .is_empty());
    // Dependencies inherit the submission's priority.
    assert_eq!((base.priority, base.effective_priority), (3, 3));
    let stats = ds.queue_stats().unwrap();
    assert_eq!((stats.queued, stats.ready), (3, 1));
}

fn submitting_an_active_drv_returns_its_build_with_the_higher_priority(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[drv("base", &[]), drv("app", &["base"])])
        .unwrap();
    let base = submit(&ds, "base", 1, 0);
    let app = submit(&ds, "app", 5, 1);
    assert!(app.created);
    assert_eq!(
        active(&ds, "base").id,
        base.id,
        "the active build is reused as a dependency"
    );
    assert_eq!(get(&ds, base.id).effective_priority, 5);
    assert_eq!(get(&ds, base.id).priority, 1);
    let again = submit(&ds, "base", 3, 2);
    assert_eq!(
        (again.id, again.created, again.state),
        (base.id, false, BuildState::Queued)
    );
    assert_eq!(get(&ds, base.id).priority, 3);
    submit(&ds, "base", 0, 3);
    assert_eq!(
        get(&ds, base.id).priority,
        3,
        "a lower priority never lowers"
    );
    let twice = ds
        .submit(&[new_build("base", 4), new_build("base", 2)], 4)
        .unwrap();
    assert!(twice.iter().all(|s| s.id == base.id && !s.created));
    assert_eq!(get(&ds, base.id).priority, 4);
    assert_eq!(ds.builds(&BuildFilter::default()).unwrap().len(), 2);
}

fn a_build_whose_outputs_are_cached_succeeds_at_once(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[drv("base", &[]), drv("app", &["base"])])
        .unwrap();
    ds.cache_add(&[cached(out("base"))]).unwrap();
    let first = submit(&ds, "base", 0, 0);
    assert_eq!((first.created, first.state), (true, BuildState::Succeeded));
    let second = submit(&ds, "base", 0, 1);
    assert_eq!(
        (second.id, second.created, second.state),
        (first.id, false, BuildState::Succeeded)
    );
    let app = submit(&ds, "app", 0, 2);
    assert_eq!(get(&ds, app.id).waiting_on, 0);
    assert!(ds.dependencies(app.id).unwrap().is_empty());
}

fn an_unknown_derivation_in_the_closure_changes_nothing(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[drv("base", &[]), drv("app", &["base", "missing"])])
        .unwrap();
    let err = ds
        .submit(&[new_build("base", 0), new_build("app", 0)], 0)
        .unwrap_err();
    assert!(
        matches!(&err, DatastoreError::NoDerivation(d) if *d == path("missing")),
        "{err}"
    );
    assert_eq!(ds.queue_stats().unwrap(), QueueStats::default());
    assert!(ds.builds(&BuildFilter::default()).unwrap().is_empty());
    let err = ds.submit(&[new_build("nowhere", 0)], 0).unwrap_err();
    assert!(matches!(err, DatastoreError::NoDerivation(_)));
}

fn a_failed_dependency_fails_the_submission_unless_retry(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("base", &[]), drv("app", &["base"])])
        .unwrap();
    let base = submit(&ds, "base", 0, 0);
    assert_eq!(lease_one(&ds, &a, 1), base.id);
    ds.setback(&a, base.id, &build_failure("make: error 2"), 2)
        .unwrap();

    let app = submit(&ds, "app", 0, 3);
    assert_eq!((app.created, app.state), (true, BuildState::Failed));
    assert_eq!(
        get(&ds, app.id).message.as_deref(),
        Some(format!("dependency failed: {}", path("base")).as_str())
    );
    assert_eq!(
        ds.queue_stats().unwrap().queued,
        0,
        "nothing queued for a doomed build"
    );

    let again = submit(&ds, "app", 0, 4);
    assert_eq!(
        (again.id, again.created, again.state),
        (app.id, false, BuildState::Failed)
    );

    let retried = submit_retry(&ds, "app", 5);
    assert_eq!((retried.created, retried.state), (true, BuildState::Queued));
    let new_base = active(&ds, "base");
    assert_ne!(new_base.id, base.id);
    assert_eq!(ds.dependencies(retried.id).unwrap(), vec![new_base.id]);
}

fn a_failure_by_dependency_is_not_the_dependents_own(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[
        drv("base", &[]),
        drv("lib", &["base"]),
        drv("app", &["lib"]),
    ])
    .unwrap();
    let app = submit(&ds, "app", 0, 0);
    let base = lease_one(&ds, &a, 1);
    ds.setback(&a, base, &build_failure("flaky test"), 2)
        .unwrap();
    assert_eq!(get(&ds, app.id).state, BuildState::Failed);

    // Still blocked by the same failure: the same answer.
    let again = submit(&ds, "app", 0, 3);
    assert_eq!(
        (again.id, again.created, again.state),
        (app.id, false, BuildState::Failed)
    );

    // Once base is retried, app and lib need no `retry` of their own.
    let retried = submit_retry(&ds, "base", 4);
    assert!(retried.created);
    let app2 = submit(&ds, "app", 0, 5);
    assert_eq!((app2.created, app2.state), (true, BuildState::Queued));
    let lib2 = active(&ds, "lib");
    assert_eq!(ds.dependencies(app2.id).unwrap(), vec![lib2.id]);
    assert_eq!(ds.dependencies(lib2.id).unwrap(), vec![retried.id]);
}

// --- priorities and critical paths ----------------------------------------------

fn effective_priority_propagates_and_lowering_recomputes_the_cone(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[
        drv("base", &[]),
        drv("a", &["base"]),
        drv("b", &["base"]),
        drv("top", &["a", "b"]),
        drv("other", &["base"]),
    ])
    .unwrap();
    for n in ["base", "a", "b"] {
        submit(&ds, n, 0, 0);
    }
    submit(&ds, "other", 4, 1);
    let top = submit(&ds, "top", 10, 2);
    let eff = |n: &str| active(&ds, n).effective_priority;
    assert_eq!(
        [eff("top"), eff("a"), eff("b"), eff("base"), eff("other")],
        [10, 10, 10, 10, 4]
    );

    let lowered = ds.set_priority(top.id, 1).unwrap();
    assert_eq!((lowered.priority, lowered.effective_priority), (1, 1));
    assert_eq!(
        [eff("a"), eff("b"), eff("base")],
        [1, 1, 4],
        "base keeps other's 4"
    );

    ds.set_priority(active(&ds, "a").id, 7).unwrap();
    assert_eq!([eff("top"), eff("a"), eff("b"), eff("base")], [1, 7, 1, 7]);
    let other = active(&ds, "other");
    ds.set_priority(other.id, -5).unwrap();
    assert_eq!(eff("base"), 7);
}

fn critical_path_counts_the_longest_chain_waiting(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[
        drv("c3", &[]),
        drv("c2", &["c3"]),
        drv("c1", &["c2"]),
        drv("x", &["c3"]),
        drv("y", &["x"]),
        drv("z", &["y"]),
        drv("w", &["z"]),
    ])
    .unwrap();
    submit(&ds, "c1", 0, 0);
    let cp = |n: &str| active(&ds, n).critical_path;
    assert_eq!([cp("c1"), cp("c2"), cp("c3")], [1, 2, 3]);
    submit(&ds, "w", 0, 1);
    assert_eq!(
        [cp("w"), cp("z"), cp("y"), cp("x"), cp("c3"), cp("c2")],
        [1, 2, 3, 4, 5, 2]
    );
    // Canceling the head of the long chain shortens what it made long.
    ds.cancel(active(&ds, "w").id, 2).unwrap();
    assert_eq!(
        [cp("z"), cp("y"), cp("x"), cp("c3"), cp("c2")],
        [1, 2, 3, 4, 2]
    );
}

fn a_deep_chain_is_walked_without_recursion_or_rework(db: &Db) {
    // c0 needs c1 needs ... needs c2999: every walk (closure, priorities,
    // paths, cascade) is iterative and linear in the chain.
    let depth: i64 = 3000;
    let ds = db.open();
    let a = agent(&ds, "a1");
    let drvs: Vec<DrvRecord> = (0..depth)
        .map(|i| {
            let below = format!("c{}", i + 1);
            let inputs: Vec<&str> = if i + 1 < depth {
                vec![below.as_str()]
            } else {
                vec![]
            };
            drv(&format!("c{i}"), &inputs)
        })
        .collect();
    ds.put_derivations(&drvs).unwrap();
    let top = submit(&ds, "c0", 2, 0);
    let bottom = active(&ds, &format!("c{}", depth - 1));
    assert_eq!(
        (bottom.effective_priority, bottom.critical_path),
        (2, depth)
    );
    ds.set_priority(top.id, 8).unwrap();
    assert_eq!(
        active(&ds, &format!("c{}", depth - 1)).effective_priority,
        8
    );
    // A second chain head over the middle makes nothing longer.
    ds.put_derivations(&[drv("head", &["c1500"])]).unwrap();
    submit(&ds, "head", 9, 1);
    let bottom = active(&ds, &format!("c{}", depth - 1));
    assert_eq!(
        (bottom.effective_priority, bottom.critical_path),
        (9, depth)
    );
    assert_eq!(lease_one(&ds, &a, 2), bottom.id);
    ds.setback(&a, bottom.id, &build_failure("no"), 3).unwrap();
    assert_eq!(ds.queue_stats().unwrap().failed, depth + 1);
}

// --- allocation -------------------------------------------------------------

fn allocation_order_is_priority_then_critical_path_then_age(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[
        drv("low", &[]),
        drv("d1", &[]),
        drv("w", &["d1"]),
        drv("d2", &[]),
        drv("d3", &[]),
        drv("high", &[]),
    ])
    .unwrap();
    submit(&ds, "low", 1, 0);
    submit(&ds, "d2", 3, 1);
    submit(&ds, "w", 3, 2);
    submit(&ds, "d3", 3, 3);
    submit(&ds, "high", 5, 4);
    let got = allocate(&ds, &a, &offer(&[SYSTEM], &[], 10), 10);
    assert_eq!(
        names(&got),
        ["high", "d1", "d2", "d3", "low"],
        "w waits for d1"
    );
    for (id, _) in &got {
        let b = get(&ds, *id);
        assert_eq!(
            (b.state, b.agent.as_ref(), b.lease_deadline),
            (BuildState::Allocated, Some(&a), Some(10 + LEASE))
        );
    }
}

fn allocation_stops_at_free_slots_and_respects_defer_until(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("p", &[]), drv("q", &[]), drv("later", &[])])
        .unwrap();
    submit(&ds, "p", 2, 0);
    submit(&ds, "q", 1, 0);
    ds.submit(
        &[NewBuild {
            defer_until: Some(100),
            ..new_build("later", 9)
        }],
        0,
    )
    .unwrap();
    assert_eq!(
        names(&allocate(&ds, &a, &offer(&[SYSTEM], &[], 1), 10)),
        ["p"]
    );
    assert!(allocate(&ds, &a, &offer(&[SYSTEM], &[], 0), 10).is_empty());
    assert_eq!(
        names(&allocate(&ds, &a, &offer(&[SYSTEM], &[], 5), 10)),
        ["q"]
    );
    assert_eq!(
        names(&allocate(&ds, &a, &offer(&[SYSTEM], &[], 5), 100)),
        ["later"]
    );
}

fn allocation_matches_systems_features_and_builtin(db: &Db) {
    let ds = db.open();
    let plain = agent(&ds, "plain");
    let kvm = agent(&ds, "kvm");
    let arm = agent(&ds, "arm");
    ds.put_derivations(&[
        drv_of("needs-kvm", SYSTEM, &["kvm"], &[]),
        drv_of("x86", SYSTEM, &[], &[]),
        drv_of("arm-build", "aarch64-linux", &[], &[]),
        drv_of("fetch", "builtin", &[], &[]),
        drv_of("big", SYSTEM, &["kvm", "big-parallel"], &[]),
    ])
    .unwrap();
    for (n, p) in [
        ("needs-kvm", 5),
        ("x86", 4),
        ("arm-build", 3),
        ("fetch", 2),
        ("big", 6),
    ] {
        submit(&ds, n, p, 0);
    }
    assert_eq!(
        names(&allocate(&ds, &plain, &offer(&[SYSTEM], &[], 10), 1)),
        ["x86", "fetch"]
    );
    assert_eq!(
        names(&allocate(
            &ds,
            &kvm,
            &offer(&[SYSTEM], &["kvm", "nixos-test"], 10),
            1
        )),
        ["needs-kvm"]
    );
    assert_eq!(
        names(&allocate(
            &ds,
            &arm,
            &offer(&["aarch64-linux"], &["kvm", "big-parallel"], 10),
            1
        )),
        ["arm-build"]
    );
    assert_eq!(active(&ds, "big").state, BuildState::Queued);
}

fn a_disabled_agent_gets_nothing(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("p", &[])]).unwrap();
    submit(&ds, "p", 0, 0);
    ds.agent_set_enabled(&a, false).unwrap();
    assert!(allocate(&ds, &a, &offer(&[SYSTEM], &[], 4), 1).is_empty());
    let listed = ds.agents().unwrap();
    assert_eq!((listed[0].enabled, listed[0].last_seen), (false, Some(1)));
    ds.agent_set_enabled(&a, true).unwrap();
    assert_eq!(
        names(&allocate(&ds, &a, &offer(&[SYSTEM], &[], 4), 2)),
        ["p"]
    );
    let listed = ds.agents().unwrap();
    assert_eq!(listed[0].allocated, vec![active(&ds, "p").id]);
    assert_eq!(listed[0].systems, BTreeSet::from([SYSTEM.to_owned()]));
    let missing = AgentId::new("ghost").unwrap();
    assert!(matches!(
        ds.allocate(&missing, &offer(&[SYSTEM], &[], 1), LEASE, 3),
        Err(DatastoreError::NoAgent(_))
    ));
    assert!(matches!(
        ds.agent_new(&a, 4),
        Err(DatastoreError::AgentExists(_))
    ));
    assert!(matches!(
        ds.agent_set_enabled(&missing, true),
        Err(DatastoreError::NoAgent(_))
    ));
}

// --- results ----------------------------------------------------------------

fn a_build_waiting_on_dependencies_is_allocated_only_after_they_succeed(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("base", &[]), drv("app", &["base"])])
        .unwrap();
    let app = submit(&ds, "app", 0, 0);
    let got = allocate(&ds, &a, &offer(&[SYSTEM], &[], 10), 1);
    assert_eq!(names(&got), ["base"]);
    assert!(allocate(&ds, &a, &offer(&[SYSTEM], &[], 10), 2).is_empty());
    ds.start(&a, got[0].0, 3).unwrap();
    ds.start(&a, got[0].0, 4).unwrap();
    assert_eq!(
        get(&ds, got[0].0).started_at,
        Some(3),
        "only the first start counts"
    );
    ds.succeed(&a, got[0].0, &[cached(out("base"))], 5).unwrap();
    let base = get(&ds, got[0].0);
    assert_eq!(
        (base.state, base.finished_at),
        (BuildState::Succeeded, Some(5))
    );
    assert!(ds.cache_get(&out("base")).unwrap().is_some());
    let app_now = get(&ds, app.id);
    assert_eq!(app_now.waiting_on, 0);
    assert!(ds.dependencies(app.id).unwrap().is_empty());
    assert_eq!(
        names(&allocate(&ds, &a, &offer(&[SYSTEM], &[], 10), 6)),
        ["app"]
    );
}

fn a_build_failure_fails_everything_that_needs_it(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[
        drv("base", &[]),
        drv("side", &[]),
        drv("lib", &["base"]),
        drv("app", &["lib", "side"]),
        drv("solo", &[]),
    ])
    .unwrap();
    submit(&ds, "side", 0, 0);
    submit(&ds, "app", 9, 1);
    submit(&ds, "solo", 0, 2);
    assert_eq!(active(&ds, "side").effective_priority, 9);
    let base = lease_one(&ds, &a, 3);
    assert_eq!(get(&ds, base).drv, path("base"));
    let after = ds
        .setback(&a, base, &build_failure("make: error 2"), 4)
        .unwrap();
    assert_eq!(
        (after.state, after.message.as_deref(), after.finished_at),
        (BuildState::Failed, Some("make: error 2"), Some(4))
    );
    let dep_msg = format!("dependency failed: {}", path("base"));
    for n in ["lib", "app"] {
        let b = only_build(&ds, n);
        assert_eq!(
            (b.state, b.message.as_deref()),
            (BuildState::Failed, Some(dep_msg.as_str())),
            "{n}"
        );
    }
    let side = active(&ds, "side");
    assert_eq!(
        (side.effective_priority, side.critical_path),
        (0, 1),
        "nothing needs side any more"
    );
    assert_eq!(active(&ds, "solo").state, BuildState::Queued);
    assert_eq!(ds.queue_stats().unwrap().failed, 3);
}

fn an_infrastructure_failure_backs_off_and_avoids_the_agent(db: &Db) {
    let ds = db.open();
    let a1 = agent(&ds, "a1");
    let a2 = agent(&ds, "a2");
    ds.put_derivations(&[drv("p", &[])]).unwrap();
    submit(&ds, "p", 0, 0);
    assert!(
        allocate(&ds, &a2, &offer(&[SYSTEM], &[], 0), 100).is_empty(),
        "a2 is seen"
    );
    let id = lease_one(&ds, &a1, 100);
    let b = ds.setback(&a1, id, &infra("disk full"), 100).unwrap();
    assert_eq!(
        (
            b.state,
            b.attempts,
            b.next_attempt_at,
            b.message.as_deref(),
            b.lease_deadline
        ),
        (BuildState::Queued, 1, Some(110), Some("disk full"), None)
    );
    assert!(
        allocate(&ds, &a1, &offer(&[SYSTEM], &[], 1), 105).is_empty(),
        "backing off"
    );
    assert!(
        allocate(&ds, &a1, &offer(&[SYSTEM], &[], 1), 111).is_empty(),
        "a2 can take it"
    );
    assert_eq!(lease_one(&ds, &a2, 112), id);
    let b = ds.setback(&a2, id, &infra("upload failed"), 112).unwrap();
    assert_eq!(
        (b.attempts, b.next_attempt_at),
        (2, Some(112 + 25)),
        "30 s capped at 25"
    );
    assert_eq!(lease_one(&ds, &a1, 140), id, "avoids a2 now, not a1");
    let b = ds.setback(&a1, id, &infra("disk full"), 141).unwrap();
    assert_eq!(
        (b.state, b.attempts, b.message.as_deref()),
        (
            BuildState::Failed,
            3,
            Some("gave up after 3 infrastructure failures: disk full")
        )
    );
}

fn an_agent_gets_its_setback_back_when_no_other_can_take_it(db: &Db) {
    let ds = db.open();
    let a1 = agent(&ds, "a1");
    let arm = agent(&ds, "arm");
    let old = agent(&ds, "old");
    ds.put_derivations(&[drv("p", &[])]).unwrap();
    submit(&ds, "p", 0, 0);
    // Seen long ago, or unable to build it: neither counts.
    allocate(&ds, &old, &offer(&[SYSTEM], &[], 0), 1);
    allocate(&ds, &arm, &offer(&["aarch64-linux"], &[], 0), 100);
    let id = lease_one(&ds, &a1, 100);
    ds.setback(&a1, id, &infra("network"), 100).unwrap();
    assert_eq!(lease_one(&ds, &a1, 200), id);
}

fn an_expired_lease_requeues_and_the_returning_agent_learns_it(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("p", &[]), drv("q", &[])]).unwrap();
    submit(&ds, "p", 1, 0);
    submit(&ds, "q", 0, 0);
    let got = allocate(&ds, &a, &offer(&[SYSTEM], &[], 2), 0);
    let (p, q) = (got[0].0, got[1].0);
    assert!(ds.heartbeat(&a, &[p], LEASE, 30).unwrap().is_empty());
    assert_eq!(get(&ds, p).lease_deadline, Some(30 + LEASE));
    assert_eq!(ds.expire_leases(61).unwrap(), vec![q]);
    assert!(ds.expire_leases(89).unwrap().is_empty());
    assert_eq!(ds.expire_leases(91).unwrap(), vec![p]);
    let b = get(&ds, p);
    assert_eq!(
        (b.state, b.attempts, b.message.as_deref()),
        (BuildState::Queued, 1, Some("lease expired on agent a1"))
    );
    assert!(ds.leases(&a).unwrap().is_empty());
    assert_eq!(ds.heartbeat(&a, &[p, q], LEASE, 95).unwrap(), vec![p, q]);
    let err = ds.succeed(&a, p, &[cached(out("p"))], 96).unwrap_err();
    assert!(
        matches!(err, DatastoreError::NotLeased { id, .. } if id == p),
        "{err}"
    );
    assert!(
        ds.cache_get(&out("p")).unwrap().is_none(),
        "a refused result changes nothing"
    );
    assert_eq!(get(&ds, p).state, BuildState::Queued);
    assert!(matches!(
        ds.start(&a, p, 96),
        Err(DatastoreError::NotLeased { .. })
    ));
    assert!(matches!(
        ds.setback(&a, p, &infra("x"), 96),
        Err(DatastoreError::NotLeased { .. })
    ));
}

fn leases_are_the_builds_still_held_and_only_by_their_agent(db: &Db) {
    let ds = db.open();
    let a1 = agent(&ds, "a1");
    let a2 = agent(&ds, "a2");
    ds.put_derivations(&[drv("p", &["q"]), drv("q", &[])])
        .unwrap();
    submit(&ds, "p", 0, 0);
    let q = lease_one(&ds, &a1, 0);
    let leases = ds.leases(&a1).unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (
            leases[0].id,
            leases[0].drv.drv.as_str(),
            leases[0].lease_deadline
        ),
        (q, path("q").as_str(), LEASE)
    );
    assert!(ds.leases(&a2).unwrap().is_empty());
    assert!(matches!(
        ds.succeed(&a2, q, &[], 1),
        Err(DatastoreError::NotLeased { .. })
    ));
    assert_eq!(ds.heartbeat(&a2, &[q], LEASE, 1).unwrap(), vec![q]);
    assert_eq!(
        get(&ds, q).lease_deadline,
        Some(LEASE),
        "another agent's heartbeat extends nothing"
    );
}

// --- cancel and listing -------------------------------------------------------

fn cancel_takes_the_builds_that_need_it(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[
        drv("base", &[]),
        drv("lib", &["base"]),
        drv("app", &["lib"]),
    ])
    .unwrap();
    submit(&ds, "base", 0, 0);
    let app = submit(&ds, "app", 5, 1);
    let lib = active(&ds, "lib");
    assert_eq!(active(&ds, "base").effective_priority, 5);
    let canceled = ds.cancel(lib.id, 2).unwrap();
    assert_eq!(canceled, vec![lib.id, app.id]);
    assert_eq!(get(&ds, app.id).state, BuildState::Canceled);
    assert_eq!(get(&ds, lib.id).message.as_deref(), Some("canceled"));
    let base = active(&ds, "base");
    assert_eq!((base.effective_priority, base.critical_path), (0, 1));
    let err = ds.cancel(lib.id, 3).unwrap_err();
    assert!(
        matches!(
            err,
            DatastoreError::WrongState {
                state: "canceled",
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        ds.set_priority(lib.id, 3),
        Err(DatastoreError::WrongState { .. })
    ));
    let ghost = BuildId::new(999).unwrap();
    assert!(matches!(
        ds.cancel(ghost, 3),
        Err(DatastoreError::NoBuild(_))
    ));
    assert!(matches!(
        ds.dependencies(ghost),
        Err(DatastoreError::NoBuild(_))
    ));
}

/// Listing reads pages of builds; a tag filter that skips most of them
/// still finds the oldest, and limits cut across pages.
fn builds_lists_across_pages(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[drv("tagged", &[])]).unwrap();
    let tagged = ds
        .submit(
            &[NewBuild {
                tags: BTreeMap::from([("job".to_owned(), "old".to_owned())]),
                ..new_build("tagged", 0)
            }],
            0,
        )
        .unwrap()[0]
        .id;
    db.fill_queue(1_200);
    let all = ds.builds(&BuildFilter::default()).unwrap();
    assert_eq!(all.len(), 1_201);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let some = ds
        .builds(&BuildFilter {
            limit: 700,
            ..BuildFilter::default()
        })
        .unwrap();
    assert_eq!(some, all[..700]);
    let found = ds
        .builds(&BuildFilter {
            tag: Some(("job".to_owned(), "old".to_owned())),
            limit: 1,
            ..BuildFilter::default()
        })
        .unwrap();
    assert_eq!(found.iter().map(|b| b.id).collect::<Vec<_>>(), [tagged]);
}

fn builds_lists_newest_first_with_filters(db: &Db) {
    let ds = db.open();
    ds.put_derivations(&[drv("p", &[]), drv("q", &[]), drv("r", &[])])
        .unwrap();
    let tagged = |n: &str, v: &str| NewBuild {
        tags: BTreeMap::from([("jobset".to_owned(), v.to_owned())]),
        ..new_build(n, 0)
    };
    let s = ds
        .submit(&[tagged("p", "a"), tagged("q", "b"), tagged("r", "a")], 0)
        .unwrap();
    ds.cancel(s[1].id, 1).unwrap();
    let ids = |f: BuildFilter| {
        ds.builds(&f)
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(BuildFilter::default()), [s[2].id, s[1].id, s[0].id]);
    assert_eq!(
        ids(BuildFilter {
            limit: 2,
            ..Default::default()
        }),
        [s[2].id, s[1].id]
    );
    assert_eq!(
        ids(BuildFilter {
            tag: Some(("jobset".into(), "a".into())),
            ..Default::default()
        }),
        [s[2].id, s[0].id]
    );
    assert_eq!(
        ids(BuildFilter {
            states: BTreeSet::from([BuildState::Canceled]),
            ..Default::default()
        }),
        [s[1].id]
    );
    assert_eq!(
        ids(BuildFilter {
            drv: Some(path("p")),
            ..Default::default()
        }),
        [s[0].id]
    );
    let stats = ds.queue_stats().unwrap();
    assert_eq!((stats.queued, stats.ready, stats.canceled), (2, 2, 1));
}

// --- tokens -------------------------------------------------------------------

fn tokens_are_found_by_hash_until_expired_revoked_or_disabled(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    let client_hash = [0xab_u8; 32];
    let agent_hash = [0x01_u8; 32];
    let client = Principal::Client { role: Role::Submit };
    let agent_p = Principal::Agent { agent: a.clone() };
    let id = ds.token_add(&client_hash, &client, Some(100), 10).unwrap();
    assert_eq!(id, "abababababab");
    ds.token_add(&agent_hash, &agent_p, None, 11).unwrap();
    assert_eq!(
        ds.token_lookup(&client_hash, 99).unwrap(),
        Some(client.clone())
    );
    assert_eq!(ds.token_lookup(&client_hash, 100).unwrap(), None, "expired");
    assert_eq!(ds.token_lookup(&[0x02; 32], 0).unwrap(), None, "unknown");
    assert_eq!(
        ds.token_lookup(&agent_hash, 1_000_000).unwrap(),
        Some(agent_p.clone())
    );
    ds.agent_set_enabled(&a, false).unwrap();
    assert_eq!(
        ds.token_lookup(&agent_hash, 12).unwrap(),
        None,
        "disabled agent"
    );
    ds.agent_set_enabled(&a, true).unwrap();
    assert_eq!(
        ds.token_lookup(&agent_hash, 12).unwrap(),
        Some(agent_p.clone())
    );
    ds.token_revoke("010101010101").unwrap();
    assert_eq!(ds.token_lookup(&agent_hash, 13).unwrap(), None, "revoked");
    assert!(matches!(
        ds.token_revoke("ffffffffffff"),
        Err(DatastoreError::NoToken(_))
    ));
    let listed = ds.tokens().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (
            listed[0].id.as_str(),
            &listed[0].principal,
            listed[0].expires_at,
            listed[0].revoked
        ),
        ("abababababab", &client, Some(100), false)
    );
    assert_eq!((&listed[1].principal, listed[1].revoked), (&agent_p, true));
    let ghost = Principal::Agent {
        agent: AgentId::new("ghost").unwrap(),
    };
    assert!(matches!(
        ds.token_add(&[3; 32], &ghost, None, 0),
        Err(DatastoreError::NoAgent(_))
    ));
}

// --- files, restarts, migrations -------------------------------------------------

fn reopening_a_file_keeps_everything(db: &Db) {
    let (p, q) = {
        let ds = db.open();
        let a = agent(&ds, "a1");
        ds.put_derivations(&[drv("p", &[]), drv("q", &["p"])])
            .unwrap();
        ds.token_add(&[7; 32], &Principal::Client { role: Role::Admin }, None, 0)
            .unwrap();
        let q = submit(&ds, "q", 2, 0).id;
        let p = lease_one(&ds, &a, 1);
        (p, q)
        // Dropped without any shutdown step, as after kill -9.
    };
    let ds = db.open();
    let a = AgentId::new("a1").unwrap();
    assert_eq!(ds.build(p).unwrap().state, BuildState::Allocated);
    assert_eq!(ds.build(q).unwrap().waiting_on, 1);
    assert_eq!(ds.leases(&a).unwrap().len(), 1);
    assert_eq!(
        ds.token_lookup(&[7; 32], 1).unwrap(),
        Some(Principal::Client { role: Role::Admin })
    );
    ds.succeed(&a, p, &[cached(out("p"))], 2).unwrap();
    assert_eq!(ds.build(q).unwrap().waiting_on, 0);
    assert!(ds.derivation(&path("q")).unwrap().is_some());
}

fn two_connections_never_lease_one_build_twice(db: &Db) {
    // Two datastores over one database behave as two coordinator processes
    // would: each allocation is one writing transaction that takes the write
    // lock first, so a build is read-and-leased by one of them only.
    let first = db.open();
    let names: Vec<String> = (0..60).map(|i| format!("p{i}")).collect();
    let drvs: Vec<DrvRecord> = names.iter().map(|n| drv(n, &[])).collect();
    first.put_derivations(&drvs).unwrap();
    let builds: Vec<NewBuild> = names.iter().map(|n| new_build(n, 0)).collect();
    first.submit(&builds, 0).unwrap();
    let second = db.open();
    let (a1, a2) = (agent(&first, "a1"), AgentId::new("a2").unwrap());
    second.agent_new(&a2, 0).unwrap();
    let leased: Vec<Vec<BuildId>> = std::thread::scope(|scope| {
        let workers: Vec<_> = [(&first, &a1), (&second, &a2)]
            .into_iter()
            .map(|(ds, agent)| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let got = ds
                            .allocate(agent, &offer(&[SYSTEM], &[], 1), LEASE, 1)
                            .unwrap();
                        if got.is_empty() {
                            return mine;
                        }
                        mine.extend(got.into_iter().map(|a| a.id));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let all: Vec<BuildId> = leased.concat();
    let distinct: BTreeSet<BuildId> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (60, 60), "{leased:?}");
}

/// A database written at version 1 (before the event outbox) is brought to
/// the current version on open, its rows kept, and works in full.
fn a_version_1_database_is_migrated_keeping_its_rows(db: &Db) {
    let migrations = match db.backend {
        Backend::Sqlite => datastore::sqlite::schema::MIGRATIONS,
        Backend::Postgres => datastore::postgres::schema::MIGRATIONS,
    };
    db.sql(&format!(
        "{}; create table schema_version (version bigint not null); \
         insert into schema_version (version) values (1); \
         insert into agents (id, enabled, systems, features, max_parallel_builds, created_at) \
         values ('old', true, '[]', '[]', 0, 7)",
        migrations[0]
    ));
    let ds = db.open();
    assert_eq!(
        db.int("select max(version) from schema_version"),
        db.known_version()
    );
    assert_eq!(db.int("select count(*) from schema_version"), 1);
    let agents = ds.agents().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].id.as_str(), "old");
    // Version 2's tables work: an event, a hook's progress, a counter.
    ds.put_derivations(&[drv("p", &[])]).unwrap();
    submit(&ds, "p", 0, 1);
    assert_eq!(ds.events_after(0, 10).unwrap().len(), 1);
    assert_eq!(
        ds.hook_progress("h").unwrap().cursor,
        ds.last_event_id().unwrap()
    );
    ds.cache_add(&[cached(out("q"))]).unwrap();
    assert_eq!(ds.metrics().unwrap().counters["bytes_uploaded"], 50);
}

fn a_newer_schema_is_refused(db: &Db) {
    drop(db.open());
    // Opening again at the same version applies nothing.
    drop(db.open());
    assert_eq!(
        db.int("select max(version) from schema_version"),
        db.known_version()
    );
    db.sql("update schema_version set version = 99");
    let Err(err) = datastore::open(&db.url, policy()) else {
        panic!("a newer schema was opened");
    };
    assert!(
        matches!(err, DatastoreError::SchemaTooNew { found: 99, known } if known == db.known_version()),
        "{err}"
    );
}

// --- scale --------------------------------------------------------------------

/// Prints how long one `allocate` takes over 100,000 queued builds (the
/// issue's target is under 50 ms; `bench/coordinator/alloc.sh` runs this
/// in release mode). Asserts order, never time.
fn allocate_from_100k_queued_builds(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    let fill = Instant::now();
    db.fill_queue(100_000);
    println!("filled 100000 queued builds in {:?}", fill.elapsed());
    for round in 0..3 {
        let t = Instant::now();
        let got = ds
            .allocate(&a, &offer(&[SYSTEM, "aarch64-linux"], &[], 4), LEASE, 1)
            .unwrap();
        let elapsed = t.elapsed();
        println!(
            "allocate #{round}: 4 builds of 100000 queued in {:?} ({:.2} ms)",
            elapsed,
            elapsed.as_secs_f64() * 1000.0
        );
        assert_eq!(got.len(), 4);
        for g in &got {
            assert_eq!(ds.build(g.id).unwrap().effective_priority, 49);
        }
    }
    db.check_ready_plan();
    // An agent of a system nobody needs must not scan the queue either.
    let t = Instant::now();
    assert!(ds
        .allocate(&a, &offer(&["riscv64-linux"], &[], 4), LEASE, 2)
        .unwrap()
        .is_empty());
    println!("allocate for an unneeded system: {:?}", t.elapsed());
}

/// The worst case of the walk: the best 100,000 ready builds are ones this
/// agent cannot take (a feature it lacks, or deferred), so allocation reads
/// past all of them before it finds work. Prints the time; asserts order.
fn allocate_past_100k_builds_the_agent_cannot_take(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    db.fill_queue(100_000);
    db.fill_queue_with("kvm", 50_000, 100, r#"["kvm"]"#, None);
    db.fill_queue_with("deferred", 50_000, 100, "[]", Some(1_000));
    let t = Instant::now();
    let got = ds
        .allocate(&a, &offer(&[SYSTEM], &[], 4), LEASE, 1)
        .unwrap();
    let elapsed = t.elapsed();
    println!(
        "allocate past 100000 unsuitable builds (of 200000 queued): {:?} ({:.2} ms)",
        elapsed,
        elapsed.as_secs_f64() * 1000.0
    );
    assert_eq!(got.len(), 4);
    for g in &got {
        assert!(g.drv.drv.contains("/bulk-"), "{}", g.drv.drv);
    }
}

// --- invariants under random operations -------------------------------------------

/// A small deterministic generator (xorshift64*), so a failing sequence
/// can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(x % u64::try_from(n).unwrap()).unwrap()
    }
}

/// Checks every stored value against its definition, computed from scratch:
/// effective priorities, critical paths, `waiting_on`, edges only between
/// active builds, one active build per derivation.
fn check_invariants(db: &Db, ds: &Ds, context: &str) {
    let all = ds.builds(&BuildFilter::default()).unwrap();
    let edges: Vec<(i64, i64)> = db.pairs("select build, dependency from build_deps");
    let by_id: BTreeMap<i64, &BuildRecord> = all.iter().map(|b| (b.id.get(), b)).collect();
    let mut waiters: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for &(b, d) in &edges {
        assert!(
            by_id[&b].state.is_active() && by_id[&d].state.is_active(),
            "{context}: edge {b}->{d} between finished builds"
        );
        waiters.entry(d).or_default().push(b);
    }
    let mut active_drvs = BTreeSet::new();
    for b in all.iter().filter(|b| b.state.is_active()) {
        assert!(
            active_drvs.insert(&b.drv),
            "{context}: two active builds of {}",
            b.drv
        );
        let waits = edges.iter().filter(|(w, _)| *w == b.id.get()).count();
        assert_eq!(
            b.waiting_on,
            i64::try_from(waits).unwrap(),
            "{context}: waiting_on of {}",
            b.id
        );
    }
    // Definitions, by memoised walks up the waiters (the graph is small).
    fn value(
        id: i64,
        by_id: &BTreeMap<i64, &BuildRecord>,
        waiters: &BTreeMap<i64, Vec<i64>>,
        memo: &mut BTreeMap<i64, (i64, i64)>,
    ) -> (i64, i64) {
        if let Some(v) = memo.get(&id) {
            return *v;
        }
        let mut eff = by_id[&id].priority;
        let mut cp = 1;
        for &w in waiters.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
            let (we, wc) = value(w, by_id, waiters, memo);
            eff = eff.max(we);
            cp = cp.max(wc + 1);
        }
        memo.insert(id, (eff, cp));
        (eff, cp)
    }
    let mut memo = BTreeMap::new();
    for b in all.iter().filter(|b| b.state.is_active()) {
        let (eff, cp) = value(b.id.get(), &by_id, &waiters, &mut memo);
        assert_eq!(
            (b.effective_priority, b.critical_path),
            (eff, cp),
            "{context}: build {} ({})",
            b.id,
            b.drv
        );
    }
}

fn priorities_paths_and_edges_stay_exact_under_random_operations(first: &Db) {
    for seed in 1..=12_u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // A fresh database for each seed.
        let fresh = (seed > 1).then(|| {
            Db::new(first.backend, &format!("random_operations_{seed}")).expect("checked before")
        });
        let db = fresh.as_ref().unwrap_or(first);
        let ds = db.open();
        let a = agent(&ds, "a1");
        // A random DAG: node i may use any node below it.
        let n = 25;
        let drvs: Vec<DrvRecord> = (0..n)
            .map(|i| {
                let inputs: Vec<String> = (0..i)
                    .filter(|_| rng.below(6) == 0)
                    .map(|j| format!("n{j}"))
                    .collect();
                let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                drv(&format!("n{i}"), &inputs)
            })
            .collect();
        ds.put_derivations(&drvs).unwrap();
        let mut now = 0;
        for step in 0..80 {
            now += 1;
            let context = format!("seed {seed} step {step}");
            let active: Vec<BuildRecord> = ds
                .builds(&BuildFilter::default())
                .unwrap()
                .into_iter()
                .filter(|b| b.state.is_active())
                .collect();
            let priority = i64::try_from(rng.below(15)).unwrap() - 5;
            match rng.below(7) {
                0..=2 => {
                    let name = format!("n{}", rng.below(n));
                    let retry = rng.below(3) == 0;
                    ds.submit(
                        &[NewBuild {
                            retry,
                            ..new_build(&name, priority)
                        }],
                        now,
                    )
                    .unwrap();
                }
                3 if !active.is_empty() => {
                    let b = &active[rng.below(active.len())];
                    ds.set_priority(b.id, priority).unwrap();
                }
                4 if !active.is_empty() => {
                    let b = &active[rng.below(active.len())];
                    ds.cancel(b.id, now).unwrap();
                }
                _ => {
                    let got = ds
                        .allocate(&a, &offer(&[SYSTEM], &[], 2), LEASE, now)
                        .unwrap();
                    for g in got {
                        match rng.below(4) {
                            0 => drop(ds.setback(&a, g.id, &build_failure("no"), now).unwrap()),
                            1 => drop(ds.setback(&a, g.id, &infra("flaky"), now).unwrap()),
                            _ => {
                                let outs: Vec<CachedPath> =
                                    g.drv.outputs.values().cloned().map(cached).collect();
                                ds.succeed(&a, g.id, &outs, now).unwrap();
                            }
                        }
                    }
                    now += 30; // past the backoff of most setbacks
                }
            }
            check_invariants(db, &ds, &context);
        }
    }
}

fn a_worker_with_mandatory_features_gets_only_builds_that_require_them(db: &Db) {
    let ds = db.open();
    let w = agent(&ds, "ssh-b1");
    db.fill_queue_with("plain", 2, 0, "[]", None);
    db.fill_queue_with("kvm", 2, 0, r#"["kvm"]"#, None);
    let mut o = offer(&[SYSTEM], &["kvm"], 4);
    o.mandatory_features.insert("kvm".into());
    let got = ds.allocate(&w, &o, LEASE, 1).unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|a| a.drv.drv.contains("/kvm-")), "{got:?}");
}

// --- events, hooks and counters ---------------------------------------------

/// (kind, build id or agent) of every event after `after`.
fn event_list(ds: &Ds, after: i64) -> Vec<(String, String)> {
    ds.events_after(after, 1000)
        .expect("events")
        .into_iter()
        .map(|e| {
            let json = e.to_json();
            assert_eq!(json["id"], e.id);
            assert_eq!(json["event"], e.kind.as_str());
            let subject = match e.kind {
                sandoff::coordinator::model::EventKind::AgentLost => {
                    format!("{} {}", json["agent"], json["builds"])
                }
                _ => json["build"]["id"].to_string(),
            };
            (e.kind.as_str().to_owned(), subject)
        })
        .collect()
}

fn ev(kind: &str, subject: impl ToString) -> (String, String) {
    (kind.to_owned(), subject.to_string())
}

fn each_state_change_writes_its_event(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[
        drv("p", &[]),
        drv("q", &["p"]),
        drv("r", &[]),
        drv("s", &[]),
        drv("t", &[]),
    ])
    .unwrap();
    let q = submit(&ds, "q", 0, 10).id;
    let p = active(&ds, "p").id;
    assert_eq!(
        event_list(&ds, 0),
        // The submitted build is created first, then its dependencies.
        [ev("build-submitted", q), ev("build-submitted", p)]
    );
    let mark = ds.last_event_id().unwrap();
    assert_eq!(lease_one(&ds, &a, 11), p);
    ds.start(&a, p, 12).unwrap();
    // Started again (a resumed agent): no second event.
    ds.start(&a, p, 13).unwrap();
    ds.succeed(&a, p, &[cached(out("p"))], 20).unwrap();
    assert_eq!(lease_one(&ds, &a, 21), q);
    ds.setback(&a, q, &build_failure("boom"), 22).unwrap();
    let r = submit(&ds, "r", 0, 23).id;
    ds.cancel(r, 24).unwrap();
    let s = submit(&ds, "s", 0, 25).id;
    assert_eq!(lease_one(&ds, &a, 26), s);
    let missing = Setback::MissingInputs {
        message: "inputs missing from the cache: x".into(),
    };
    let back = ds.setback(&a, s, &missing, 27).unwrap();
    assert_eq!(back.state, BuildState::Queued);
    ds.cancel(s, 28).unwrap();
    let t = submit(&ds, "t", 0, 29).id;
    assert_eq!(lease_one(&ds, &a, 30), t);
    assert_eq!(ds.expire_leases(30 + LEASE + 1).unwrap(), [t]);
    assert_eq!(
        event_list(&ds, mark),
        [
            ev("build-started", p),
            ev("build-success", p),
            ev("build-failure", q),
            ev("build-submitted", r),
            ev("build-canceled", r),
            ev("build-submitted", s),
            ev("build-missing-inputs", s),
            ev("build-canceled", s),
            ev("build-submitted", t),
            ev("agent-lost", format!("\"a1\" [{t}]")),
        ]
    );
    // The event carries the build as the change left it.
    let events = ds.events_after(mark, 2).unwrap();
    assert_eq!(events[1].to_json()["build"]["state"], "succeeded");
    assert_eq!(events[1].time, 20);
}

fn a_dependency_failure_tells_of_every_build_it_ends(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("p", &[]), drv("q", &["p"])])
        .unwrap();
    let q = submit(&ds, "q", 0, 0).id;
    let p = lease_one(&ds, &a, 1);
    let mark = ds.last_event_id().unwrap();
    ds.setback(&a, p, &build_failure("boom"), 2).unwrap();
    assert_eq!(
        event_list(&ds, mark),
        [ev("build-failure", p), ev("build-failure", q)]
    );
}

fn a_change_that_rolls_back_writes_no_event(db: &Db) {
    let ds = db.open();
    let a = agent(&ds, "a1");
    ds.put_derivations(&[drv("p", &[])]).unwrap();
    // The first build is created inside the transaction, then the second
    // fails it: neither the build nor its event remains.
    let err = ds
        .submit(&[new_build("p", 0), new_build("unknown", 0)], 0)
        .unwrap_err();
    assert!(matches!(err, DatastoreError::NoDerivation(_)), "{err}");
    assert_eq!(ds.last_event_id().unwrap(), 0);
    assert!(ds.builds(&BuildFilter::default()).unwrap().is_empty());
    let p = submit(&ds, "p", 0, 1).id;
    let mark = ds.last_event_id().unwrap();
    // Not leased: refused, nothing written.
    assert!(ds.succeed(&a, p, &[cached(out("p"))], 2).is_err());
    assert!(ds.start(&a, p, 2).is_err());
    assert_eq!(ds.last_event_id().unwrap(), mark);
}

fn each_hook_keeps_its_own_cursor_across_a_restart(db: &Db) {
    let (e1, e2) = {
        let ds = db.open();
        ds.put_derivations(&[drv("p", &[]), drv("q", &[])]).unwrap();
        // A hook starts after the last event there is when first seen.
        submit(&ds, "p", 0, 0);
        let before = ds.last_event_id().unwrap();
        assert_eq!(ds.hook_progress("a").unwrap().cursor, before);
        assert_eq!(ds.hook_progress("b").unwrap().cursor, before);
        submit(&ds, "q", 0, 1);
        let events = ds.events_after(before, 10).unwrap();
        assert_eq!(events.len(), 1);
        let e1 = events[0].id;
        // "a" fails twice, "b" delivers.
        ds.hook_attempt("a", e1, false, 100).unwrap();
        let d = ds.hook_attempt("a", e1, false, 200).unwrap();
        assert_eq!((d.attempts, d.next_try, d.delivered), (2, 200, false));
        ds.hook_attempt("b", e1, true, 0).unwrap();
        ds.hook_advance("b", e1).unwrap();
        let q = only_build(&ds, "q").id;
        ds.cancel(q, 2).unwrap();
        (e1, ds.last_event_id().unwrap())
        // Dropped as after kill -9.
    };
    let ds = db.open();
    let a = ds.hook_progress("a").unwrap();
    assert_eq!(a.cursor, e1 - 1);
    assert_eq!(
        a.deliveries
            .get(&e1)
            .map(|d| (d.attempts, d.next_try, d.delivered)),
        Some((2, 200, false))
    );
    let b = ds.hook_progress("b").unwrap();
    assert_eq!((b.cursor, b.deliveries.len()), (e1, 0));
    assert_eq!(ds.events_after(b.cursor, 10).unwrap()[0].id, e2);
    // A cursor never goes back.
    ds.hook_advance("b", 0).unwrap();
    assert_eq!(ds.hook_progress("b").unwrap().cursor, e1);
}

fn pruning_keeps_what_a_hook_owes_and_the_last_events(db: &Db) {
    let ds = db.open();
    let names = ["p", "q", "r", "s", "t"];
    ds.put_derivations(&names.map(|n| drv(n, &[]))).unwrap();
    let hooks = vec!["a".to_owned()];
    assert_eq!(ds.hook_progress("a").unwrap().cursor, 0);
    for (i, n) in names.iter().enumerate() {
        submit(&ds, n, 0, i as i64);
    }
    let ids: Vec<i64> = ds
        .events_after(0, 10)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 5);
    // "a" owes them all.
    assert_eq!(ds.prune_events(&hooks, 2).unwrap(), 0);
    ds.hook_advance("a", ids[3]).unwrap();
    // Up to the cursor, but the last two stay.
    assert_eq!(ds.prune_events(&hooks, 2).unwrap(), 3);
    let left: Vec<i64> = ds
        .events_after(0, 10)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, ids[3..]);
    // A hook no longer configured holds nothing back.
    ds.hook_advance("a", 0).unwrap();
    assert_eq!(ds.prune_events(&[], 0).unwrap(), 2);
    assert!(ds.events_after(0, 10).unwrap().is_empty());
    // Ids are never reused.
    submit(&ds, "p", 0, 10);
    let next = ds.events_after(0, 10).unwrap();
    assert!(next.iter().all(|e| e.id > ids[4]), "{next:?}");
}

fn counters_move_with_the_changes_that_count(db: &Db) {
    {
        let ds = db.open();
        let a = agent(&ds, "a1");
        ds.put_derivations(&[drv("p", &[]), drv("q", &[]), drv("r", &[])])
            .unwrap();
        let p = submit(&ds, "p", 0, 100).id;
        assert_eq!(lease_one(&ds, &a, 100), p);
        ds.start(&a, p, 103).unwrap();
        ds.succeed(&a, p, &[cached(out("p"))], 403).unwrap();
        let q = submit(&ds, "q", 0, 500).id;
        assert_eq!(lease_one(&ds, &a, 500), q);
        ds.expire_leases(500 + LEASE + 1).unwrap();
        ds.cancel(q, 600).unwrap();
        let r = submit(&ds, "r", 0, 700).id;
        let m = ds.metrics().unwrap();
        assert_eq!(m.queue, [(SYSTEM.to_owned(), "queued".to_owned(), 1)]);
        ds.cancel(r, 701).unwrap();
    }
    let ds = db.open();
    let m = ds.metrics().unwrap();
    let c = |k: &str| m.counters.get(k).copied().unwrap_or(0);
    assert_eq!(c("builds_finished:succeeded"), 1);
    assert_eq!(c("builds_finished:canceled"), 2);
    assert_eq!(c("lease_expiries"), 1);
    assert_eq!(c("bytes_uploaded"), 50);
    // p waited 3 s and ran 300 s; the canceled builds never ran.
    assert_eq!(c("wait_seconds_bucket:5"), 1);
    assert_eq!(c("wait_seconds_count"), 1);
    assert_eq!(c("duration_seconds_bucket:300"), 1);
    assert_eq!(c("duration_seconds_sum"), 300);
    assert_eq!((m.cache_paths, m.cache_bytes), (1, 50));
    assert!(m.queue.is_empty());
}
