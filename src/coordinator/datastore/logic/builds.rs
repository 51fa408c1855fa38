//! Submitting, listing, canceling and reprioritising builds.
//!
//! Choices the trait leaves open, made here:
//! - A derivation counts as done when *all* its outputs are in the cache
//!   (see [`rows::outputs_cached`]).
//! - Builds created for missing dependencies inherit the submitted build's
//!   priority, tags and `defer_until`: they were asked for on its behalf,
//!   and a deferred submission should not load the agents early through its
//!   dependencies.
//! - A submitted derivation whose outputs are all cached gets a build that
//!   has succeeded: its latest succeeded build (`created: false`), or a new
//!   row in state `succeeded` (`created: true`) when it never was built
//!   here (its outputs were uploaded), so that every submission has an id.
//! - A submitted derivation whose latest build failed is answered with
//!   that build (`created: false`, `failed`) unless `retry`.
//! - When the closure (without `retry`) holds a derivation whose latest
//!   build failed, only the submitted build is created, failed at once with
//!   `dependency failed: <that drv>`; nothing else is queued for it.
//!   Submitted again while that is still so, the same failed build is
//!   the answer (`created: false`).
//! - A build failed only because a dependency failed (`failed_dependency`)
//!   is no verdict on its own derivation: submitting that derivation again
//!   (or one that needs it) looks at its closure afresh, so once the
//!   dependency has been rebuilt with `retry`, no further `retry` is
//!   needed above it.

use std::collections::{BTreeMap, HashMap};

use super::graph;
use super::rows::{self, build_id, to_json, BUILD_COLUMNS};
use crate::coordinator::datastore::sql::{args, Sql, Value};
use crate::coordinator::datastore::{BuildFilter, DatastoreError, QueueStats};
use crate::coordinator::model::{BuildId, BuildRecord, BuildState, DrvRecord, NewBuild, Submitted};

/// What a derivation of the closure needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Its outputs are in the cache.
    Nothing,
    /// Its active build, which dependents wait for.
    Active(i64),
    /// Its latest build failed (and no `retry`).
    Failed,
    /// A new build.
    Build,
}

/// How one derivation of the closure stands now.
fn need_of(conn: &dyn Sql, drv: &str, retry: bool) -> Result<Need, DatastoreError> {
    if let Some(id) = rows::active_build(conn, drv)? {
        return Ok(Need::Active(id));
    }
    if rows::outputs_cached(conn, drv)? {
        return Ok(Need::Nothing);
    }
    // A build failed by one of its own dependencies is no verdict on this
    // derivation: walk into it, where the walk meets the real failure.
    match rows::last_build(conn, drv)? {
        Some(last) if last.failed_itself() && !retry => Ok(Need::Failed),
        _ => Ok(Need::Build),
    }
}

/// The fields of a new build row.
struct Row<'a> {
    drv: &'a DrvRecord,
    state: BuildState,
    nb: &'a NewBuild,
    waiting_on: i64,
    message: Option<&'a str>,
    failed_dependency: Option<&'a str>,
    now: i64,
}

fn insert_build(conn: &dyn Sql, b: Row<'_>) -> Result<i64, DatastoreError> {
    let finished_at = (!b.state.is_active()).then_some(b.now);
    let held_until = b.nb.defer_until.filter(|&t| t > b.now);
    conn.query_one(
        "insert into builds (drv, system, required_features, state, priority, \
         effective_priority, critical_path, tags, created_at, defer_until, held_until, \
         waiting_on, finished_at, message, failed_dependency) \
         values (?1, ?2, ?3, ?4, ?5, ?5, 1, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) returning id",
        args![
            &b.drv.drv,
            &b.drv.system,
            to_json(&b.drv.required_features)?,
            b.state.as_str(),
            b.nb.priority,
            to_json(&b.nb.tags)?,
            b.now,
            b.nb.defer_until,
            held_until,
            b.waiting_on,
            finished_at,
            b.message,
            b.failed_dependency,
        ],
    )?
    .get(0)
}

/// Submits one build (see the module docs and the trait).
pub(super) fn submit_one(
    conn: &dyn Sql,
    nb: &NewBuild,
    now: i64,
) -> Result<Submitted, DatastoreError> {
    let root = rows::derivation(conn, &nb.drv)?
        .ok_or_else(|| DatastoreError::NoDerivation(nb.drv.clone()))?;
    let answer = |id: i64, created: bool, state: BuildState| -> Result<Submitted, DatastoreError> {
        Ok(Submitted {
            drv: nb.drv.clone(),
            id: build_id(id)?,
            created,
            state,
        })
    };
    if let Some(id) = rows::active_build(conn, &root.drv)? {
        let current = rows::build(conn, build_id(id)?)?;
        if nb.priority > current.priority {
            conn.execute(
                "update builds set priority = ?2, effective_priority = ?3 where id = ?1",
                args![id, nb.priority, current.effective_priority.max(nb.priority)],
            )?;
            let eff = current.effective_priority.max(nb.priority);
            let work = graph::dependencies_of(conn, id)?
                .into_iter()
                .map(|d| (d, eff, current.critical_path.saturating_add(1)))
                .collect();
            graph::raise(conn, work)?;
        }
        return answer(id, false, current.state);
    }
    if rows::outputs_cached(conn, &root.drv)? {
        if let Some(last) = rows::last_build(conn, &root.drv)? {
            if last.state == BuildState::Succeeded {
                return answer(last.id, false, BuildState::Succeeded);
            }
        }
        let id = insert_build(
            conn,
            Row {
                drv: &root,
                state: BuildState::Succeeded,
                nb,
                waiting_on: 0,
                message: Some("outputs already in the cache"),
                failed_dependency: None,
                now,
            },
        )?;
        return answer(id, true, BuildState::Succeeded);
    }
    let last = rows::last_build(conn, &root.drv)?;
    if let Some(last) = &last {
        if last.failed_itself() && !nb.retry {
            return answer(last.id, false, BuildState::Failed);
        }
    }

    // Walk the closure of input derivations, stopping at those that need
    // no new build. `order` lists the derivations to build, root first.
    let mut needs: HashMap<String, Need> = HashMap::from([(root.drv.clone(), Need::Build)]);
    let mut order: Vec<DrvRecord> = Vec::new();
    let mut stack: Vec<DrvRecord> = vec![root];
    let mut failed: Option<String> = None;
    while let Some(d) = stack.pop() {
        for input in d.input_drvs.keys() {
            if needs.contains_key(input) {
                continue;
            }
            let rec = rows::derivation(conn, input)?
                .ok_or_else(|| DatastoreError::NoDerivation(input.clone()))?;
            let need = need_of(conn, input, nb.retry)?;
            needs.insert(input.clone(), need);
            match need {
                Need::Build => stack.push(rec),
                Need::Failed if failed.is_none() => failed = Some(input.clone()),
                _ => {}
            }
        }
        order.push(d);
    }
    if let Some(dep) = failed {
        // Still blocked by the same failure: that answer stands.
        if let Some(last) = &last {
            if last.failed_dependency.as_deref() == Some(dep.as_str()) {
                return answer(last.id, false, BuildState::Failed);
            }
        }
        let message = format!("dependency failed: {dep}");
        let id = insert_build(
            conn,
            Row {
                drv: &order[0],
                state: BuildState::Failed,
                nb,
                waiting_on: 0,
                message: Some(&message),
                failed_dependency: Some(&dep),
                now,
            },
        )?;
        return answer(id, true, BuildState::Failed);
    }

    let mut ids: HashMap<&str, i64> = HashMap::new();
    for d in &order {
        let id = insert_build(
            conn,
            Row {
                drv: d,
                state: BuildState::Queued,
                nb,
                waiting_on: 0,
                message: None,
                failed_dependency: None,
                now,
            },
        )?;
        ids.insert(&d.drv, id);
    }
    // The new builds' own values, computed here in topological order: they
    // all have the submitted priority, and only new builds wait for them, so
    // their effective priority is that priority and their critical path the
    // longest chain of new builds from the root down to them.
    let mut new_waiters: HashMap<&str, usize> = HashMap::new();
    for d in &order {
        for input in d.input_drvs.keys() {
            if needs.get(input) == Some(&Need::Build) {
                *new_waiters.entry(input.as_str()).or_default() += 1;
            }
        }
    }
    let mut cp: HashMap<&str, i64> = HashMap::new();
    let mut ready: Vec<&DrvRecord> = vec![&order[0]];
    let by_drv: HashMap<&str, &DrvRecord> = order.iter().map(|d| (d.drv.as_str(), d)).collect();
    // Claims on active builds, raised below once the new builds are done.
    let mut claims: Vec<(i64, i64, i64)> = Vec::new();
    while let Some(d) = ready.pop() {
        let id = ids[d.drv.as_str()];
        let path = *cp.entry(d.drv.as_str()).or_insert(1);
        let mut waiting_on = 0;
        for input in d.input_drvs.keys() {
            let dependency = match needs.get(input) {
                Some(Need::Active(dep)) => {
                    claims.push((*dep, nb.priority, path.saturating_add(1)));
                    *dep
                }
                Some(Need::Build) => {
                    let below = cp.entry(input.as_str()).or_insert(1);
                    *below = (*below).max(path.saturating_add(1));
                    let left = new_waiters
                        .get_mut(input.as_str())
                        .expect("every new input was counted above");
                    *left -= 1;
                    if *left == 0 {
                        ready.push(by_drv[input.as_str()]);
                    }
                    ids[input.as_str()]
                }
                _ => continue,
            };
            conn.execute(
                "insert into build_deps (build, dependency) values (?1, ?2)",
                args![id, dependency],
            )?;
            waiting_on += 1;
        }
        if waiting_on > 0 || path > 1 {
            conn.execute(
                "update builds set waiting_on = ?2, critical_path = ?3 where id = ?1",
                args![id, waiting_on, path],
            )?;
        }
    }
    graph::raise(conn, claims)?;
    answer(ids[order[0].drv.as_str()], true, BuildState::Queued)
}

/// Builds matching `filter`, newest first. A `limit` of 0 means no limit.
/// The tag is matched in Rust, over the rows the other conditions select
/// (tags are a JSON column, which PostgreSQL and SQLite query differently).
pub(super) fn list(
    conn: &dyn Sql,
    filter: &BuildFilter,
) -> Result<Vec<BuildRecord>, DatastoreError> {
    let mut sql = format!("select {BUILD_COLUMNS} from builds where 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if !filter.states.is_empty() {
        let marks: Vec<String> = filter
            .states
            .iter()
            .map(|s| {
                args.push(s.as_str().into());
                format!("?{}", args.len())
            })
            .collect();
        sql.push_str(&format!(" and state in ({})", marks.join(", ")));
    }
    if let Some(drv) = &filter.drv {
        args.push(drv.into());
        sql.push_str(&format!(" and drv = ?{}", args.len()));
    }
    // Keyset pages, newest first: a `limit` stops reading early even when
    // the tag filter (applied here) skips rows; without a tag, the first
    // page is the answer.
    let page = if filter.limit == 0 || filter.tag.is_some() {
        PAGE
    } else {
        filter.limit.min(PAGE)
    };
    // Both as parameters: PostgreSQL keeps each distinct SQL text prepared.
    args.push(i64::MAX.into());
    let before = args.len();
    args.push(i64::try_from(page).unwrap_or(i64::MAX).into());
    sql.push_str(&format!(
        " and id < ?{before} order by id desc limit ?{}",
        before + 1
    ));
    let mut out = Vec::new();
    loop {
        let found = conn.query(&sql, &args)?;
        for r in &found {
            let b = rows::build_from_row(r)?;
            args[before - 1] = b.id.get().into();
            if let Some((k, v)) = &filter.tag {
                if b.tags.get(k) != Some(v) {
                    continue;
                }
            }
            out.push(b);
            if filter.limit != 0 && out.len() >= filter.limit {
                return Ok(out);
            }
        }
        if found.len() < page {
            return Ok(out);
        }
    }
}

/// How many builds [`list`] reads at a time.
const PAGE: usize = 500;

/// The active builds `id` waits for.
pub(super) fn dependencies(conn: &dyn Sql, id: BuildId) -> Result<Vec<BuildId>, DatastoreError> {
    rows::build(conn, id)?;
    graph::dependencies_of(conn, id.get())?
        .into_iter()
        .map(build_id)
        .collect()
}

fn require_active(b: &BuildRecord) -> Result<(), DatastoreError> {
    if b.state.is_active() {
        Ok(())
    } else {
        Err(DatastoreError::WrongState {
            id: b.id,
            state: b.state.as_str(),
            wanted: "queued or allocated",
        })
    }
}

/// Cancels an active build and everything waiting for it.
pub(super) fn cancel(
    conn: &dyn Sql,
    id: BuildId,
    now: i64,
) -> Result<Vec<BuildId>, DatastoreError> {
    let b = rows::build(conn, id)?;
    require_active(&b)?;
    let message = format!("dependency canceled: {}", b.drv);
    let dependents = graph::end_with_dependents(
        conn,
        id.get(),
        BuildState::Canceled.as_str(),
        Some("canceled"),
        &message,
        None,
        now,
    )?;
    let mut out = vec![id];
    for d in dependents {
        out.push(build_id(d)?);
    }
    for &b in &out {
        super::events::ended(conn, b, now)?;
    }
    Ok(out)
}

/// Sets an active build's own priority and recomputes its cone.
pub(super) fn set_priority(
    conn: &dyn Sql,
    id: BuildId,
    priority: i64,
) -> Result<BuildRecord, DatastoreError> {
    let b = rows::build(conn, id)?;
    require_active(&b)?;
    conn.execute(
        "update builds set priority = ?2 where id = ?1",
        args![id.get(), priority],
    )?;
    graph::recompute(conn, &[id.get()])?;
    rows::build(conn, id)
}

/// Counts by state; `ready` is queued builds waiting for no build.
pub(super) fn stats(conn: &dyn Sql) -> Result<QueueStats, DatastoreError> {
    let counts: BTreeMap<String, i64> = conn
        .rows("select state, count(*) from builds group by state", &[])?
        .into_iter()
        .collect();
    let mut s = QueueStats::default();
    for (name, n) in counts {
        match rows::state(&name)? {
            BuildState::Queued => s.queued = n,
            BuildState::Allocated => s.allocated = n,
            BuildState::Succeeded => s.succeeded = n,
            BuildState::Failed => s.failed = n,
            BuildState::Canceled => s.canceled = n,
        }
    }
    s.ready = conn
        .query_one(
            "select count(*) from builds where state = 'queued' and waiting_on = 0",
            &[],
        )?
        .get(0)?;
    Ok(s)
}
