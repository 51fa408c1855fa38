//! The event outbox, hooks' delivery progress and the durable counters.
//!
//! Events are inserted by the functions that change a build's state, with
//! the same connection inside the same transaction: a change that rolls
//! back leaves no event, and a committed one always has its event. The
//! counters behind `/metrics` (builds by final state, the wait and
//! duration histograms, lease expiries, bytes uploaded) are bumped the
//! same way, so a scrape costs O(buckets), never a walk of the builds.
//!
//! The SQL keeps to what PostgreSQL accepts as well (qualified columns in
//! upserts, `case` rather than SQLite's two-argument `max`).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::rows;
use crate::coordinator::datastore::sql::{args, Sql};
use crate::coordinator::datastore::{
    DatastoreError, Delivery, HookProgress, MetricsSnapshot, HISTOGRAM_BUCKETS,
};
use crate::coordinator::model::{AgentId, BuildId, BuildRecord, BuildState, Event, EventKind};

/// Writes one event.
pub(super) fn write(
    conn: &dyn Sql,
    kind: EventKind,
    payload: Map<String, Value>,
    now: i64,
) -> Result<i64, DatastoreError> {
    let text = serde_json::to_string(&payload)
        .map_err(|e| DatastoreError::Corrupt(format!("event payload: {e}")))?;
    conn.query_one(
        "insert into events (kind, time, payload) values (?1, ?2, ?3) returning id",
        args![kind.as_str(), now, text],
    )?
    .get(0)
}

/// Writes an event about one build, as it stands now.
pub(super) fn build_event(
    conn: &dyn Sql,
    kind: EventKind,
    id: BuildId,
    now: i64,
) -> Result<BuildRecord, DatastoreError> {
    let b = rows::build(conn, id)?;
    let json = serde_json::to_value(&b)
        .map_err(|e| DatastoreError::Corrupt(format!("build {id} as JSON: {e}")))?;
    write(
        conn,
        kind,
        Map::from_iter([("build".to_owned(), json)]),
        now,
    )?;
    Ok(b)
}

/// Adds `by` to a counter.
pub(super) fn bump(conn: &dyn Sql, name: &str, by: i64) -> Result<(), DatastoreError> {
    conn.execute(
        "insert into counters (name, value) values (?1, ?2) \
         on conflict (name) do update set value = counters.value + excluded.value",
        args![name, by],
    )?;
    Ok(())
}

/// Counts one observation of a histogram (`name_bucket:LE`, `name_sum`,
/// `name_count`; the buckets are not cumulative here, the exposition adds
/// them up).
fn observe(conn: &dyn Sql, name: &str, seconds: i64) -> Result<(), DatastoreError> {
    let seconds = seconds.max(0);
    let le = HISTOGRAM_BUCKETS
        .iter()
        .find(|&&b| seconds <= b)
        .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
    bump(conn, &format!("{name}_bucket:{le}"), 1)?;
    bump(conn, &format!("{name}_sum"), seconds)?;
    bump(conn, &format!("{name}_count"), 1)
}

/// A build reached a final state: its event, and the counters of finished
/// builds (by state; for a build that ran, its wait and its duration).
pub(super) fn ended(conn: &dyn Sql, id: BuildId, now: i64) -> Result<(), DatastoreError> {
    let b = rows::build(conn, id)?;
    let kind = match b.state {
        BuildState::Succeeded => EventKind::BuildSuccess,
        BuildState::Failed => EventKind::BuildFailure,
        BuildState::Canceled => EventKind::BuildCanceled,
        BuildState::Queued | BuildState::Allocated => return Ok(()),
    };
    build_event(conn, kind, id, now)?;
    bump(conn, &format!("builds_finished:{}", b.state.as_str()), 1)?;
    if let Some(started) = b.started_at {
        observe(conn, "wait_seconds", started.saturating_sub(b.created_at))?;
        let finished = b.finished_at.unwrap_or(now);
        observe(conn, "duration_seconds", finished.saturating_sub(started))?;
    }
    Ok(())
}

/// Leases of `agent` expired: its `agent-lost` event and the counter.
pub(super) fn agent_lost(
    conn: &dyn Sql,
    agent: &AgentId,
    builds: &[BuildId],
    now: i64,
) -> Result<(), DatastoreError> {
    let payload = Map::from_iter([
        ("agent".to_owned(), Value::from(agent.as_str())),
        (
            "builds".to_owned(),
            Value::from(builds.iter().map(|b| b.get()).collect::<Vec<_>>()),
        ),
    ]);
    write(conn, EventKind::AgentLost, payload, now)?;
    bump(
        conn,
        "lease_expiries",
        i64::try_from(builds.len()).unwrap_or(i64::MAX),
    )
}

/// The largest event id so far (0 before the first).
pub(super) fn last_id(conn: &dyn Sql) -> Result<i64, DatastoreError> {
    conn.query_one("select coalesce(max(id), 0) from events", &[])?
        .get(0)
}

/// Up to `limit` events with ids above `after`, oldest first.
pub(super) fn after(
    conn: &dyn Sql,
    after: i64,
    limit: usize,
) -> Result<Vec<Event>, DatastoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    conn.query(
        "select id, kind, time, payload from events where id > ?1 order by id limit ?2",
        args![after, limit],
    )?
    .iter()
    .map(|r| {
        let (id, kind, time, payload): (i64, String, i64, String) = r.to()?;
        Ok(Event {
            id,
            kind: kind
                .parse()
                .map_err(|_| DatastoreError::Corrupt(format!("event {id} of kind '{kind}'")))?,
            time,
            payload: rows::from_json("events.payload", &payload)?,
        })
    })
    .collect()
}

/// A hook's progress; a hook seen for the first time starts after the
/// last event (it is told of what happens from now on, not of the past).
pub(super) fn progress(conn: &dyn Sql, hook: &str) -> Result<HookProgress, DatastoreError> {
    if let Some(p) = known_progress(conn, hook)? {
        return Ok(p);
    }
    let last = last_id(conn)?;
    conn.execute(
        "insert into hook_cursors (hook, after) values (?1, ?2)",
        args![hook, last],
    )?;
    Ok(HookProgress {
        cursor: last,
        deliveries: BTreeMap::new(),
    })
}

/// A hook's progress if it has a cursor (a read: hooks ask often).
pub(super) fn known_progress(
    conn: &dyn Sql,
    hook: &str,
) -> Result<Option<HookProgress>, DatastoreError> {
    let Some(cursor) = conn.query_opt(
        "select after from hook_cursors where hook = ?1",
        args![hook],
    )?
    else {
        return Ok(None);
    };
    let cursor: i64 = cursor.get(0)?;
    let deliveries = conn
        .query(
            "select event, attempts, next_try, delivered from hook_deliveries \
             where hook = ?1 order by event",
            args![hook],
        )?
        .iter()
        .map(|r| {
            Ok((
                r.get::<i64>(0)?,
                Delivery {
                    attempts: r.get(1)?,
                    next_try: r.get(2)?,
                    delivered: r.get(3)?,
                },
            ))
        })
        .collect::<Result<BTreeMap<_, _>, DatastoreError>>()?;
    Ok(Some(HookProgress { cursor, deliveries }))
}

/// Records a delivery or a failed attempt of `event` to `hook`.
pub(super) fn record(
    conn: &dyn Sql,
    hook: &str,
    event: i64,
    delivered: bool,
    next_try: i64,
) -> Result<Delivery, DatastoreError> {
    let r = conn.query_one(
        "insert into hook_deliveries (hook, event, attempts, next_try, delivered) \
         values (?1, ?2, 1, ?3, ?4) \
         on conflict (hook, event) do update set attempts = hook_deliveries.attempts + 1, \
         next_try = excluded.next_try, delivered = excluded.delivered \
         returning attempts, next_try, delivered",
        args![hook, event, next_try, delivered],
    )?;
    Ok(Delivery {
        attempts: r.get(0)?,
        next_try: r.get(1)?,
        delivered: r.get(2)?,
    })
}

/// Moves a hook's cursor forward (never back) and forgets the deliveries
/// it now covers.
pub(super) fn advance(conn: &dyn Sql, hook: &str, cursor: i64) -> Result<(), DatastoreError> {
    conn.execute(
        "insert into hook_cursors (hook, after) values (?1, ?2) \
         on conflict (hook) do update set after = \
         case when excluded.after > hook_cursors.after then excluded.after else hook_cursors.after end",
        args![hook, cursor],
    )?;
    conn.execute(
        "delete from hook_deliveries where hook = ?1 and event <= ?2",
        args![hook, cursor],
    )?;
    Ok(())
}

/// Deletes the events every one of `hooks` has passed, keeping the last
/// `keep` events whatever the cursors (for SSE clients that resume).
/// Cursors of hooks not in `hooks` (no longer configured) are dropped, so
/// a removed hook does not hold the outbox forever.
pub(super) fn prune(conn: &dyn Sql, hooks: &[String], keep: i64) -> Result<usize, DatastoreError> {
    let known: Vec<String> = conn.column("select hook from hook_cursors", &[])?;
    for gone in known.iter().filter(|h| !hooks.contains(h)) {
        conn.execute("delete from hook_cursors where hook = ?1", args![gone])?;
        conn.execute("delete from hook_deliveries where hook = ?1", args![gone])?;
    }
    let last = last_id(conn)?;
    let min_cursor: Option<i64> = conn
        .query_one("select min(after) from hook_cursors", &[])?
        .get(0)?;
    let mut limit = last.saturating_sub(keep.max(0));
    if let Some(c) = min_cursor {
        limit = limit.min(c);
    }
    // A configured hook without a cursor yet starts at the last event
    // (see `progress`), so it holds nothing back.
    let deleted = conn.execute("delete from events where id <= ?1", args![limit])?;
    Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
}

/// What `/metrics` shows from the datastore.
pub(super) fn metrics(conn: &dyn Sql) -> Result<MetricsSnapshot, DatastoreError> {
    let counters: BTreeMap<String, i64> = conn
        .rows("select name, value from counters", &[])?
        .into_iter()
        .collect();
    // Active builds only: the `builds_state` index bounds this by the
    // queue, not by the history.
    let queue = conn.rows(
        "select system, state, count(*) from builds where state in ('queued', 'allocated') \
         group by system, state order by system, state",
        &[],
    )?;
    // The cast: PostgreSQL sums bigints as numeric.
    let totals = conn.query_one(
        "select count(*), cast(coalesce(sum(file_size), 0) as bigint) from cache_paths",
        &[],
    )?;
    let (cache_paths, cache_bytes) = (totals.get(0)?, totals.get(1)?);
    Ok(MetricsSnapshot {
        counters,
        queue,
        cache_paths,
        cache_bytes,
    })
}
