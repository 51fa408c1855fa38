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

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};

use super::rows;
use crate::coordinator::datastore::{
    DatastoreError, Delivery, HookProgress, MetricsSnapshot, HISTOGRAM_BUCKETS,
};
use crate::coordinator::model::{AgentId, BuildId, BuildRecord, BuildState, Event, EventKind};

/// Writes one event.
pub(super) fn write(
    conn: &Connection,
    kind: EventKind,
    payload: Map<String, Value>,
    now: i64,
) -> Result<i64, DatastoreError> {
    let text = serde_json::to_string(&payload)
        .map_err(|e| DatastoreError::Corrupt(format!("event payload: {e}")))?;
    conn.prepare_cached("insert into events (kind, time, payload) values (?1, ?2, ?3)")?
        .execute(params![kind.as_str(), now, text])?;
    Ok(conn.last_insert_rowid())
}

/// Writes an event about one build, as it stands now.
pub(super) fn build_event(
    conn: &Connection,
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
pub(super) fn bump(conn: &Connection, name: &str, by: i64) -> Result<(), DatastoreError> {
    conn.prepare_cached(
        "insert into counters (name, value) values (?1, ?2) \
         on conflict (name) do update set value = counters.value + excluded.value",
    )?
    .execute(params![name, by])?;
    Ok(())
}

/// Counts one observation of a histogram (`name_bucket:LE`, `name_sum`,
/// `name_count`; the buckets are not cumulative here, the exposition adds
/// them up).
fn observe(conn: &Connection, name: &str, seconds: i64) -> Result<(), DatastoreError> {
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
pub(super) fn ended(conn: &Connection, id: BuildId, now: i64) -> Result<(), DatastoreError> {
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
    conn: &Connection,
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
pub(super) fn last_id(conn: &Connection) -> Result<i64, DatastoreError> {
    Ok(conn.query_row("select coalesce(max(id), 0) from events", [], |r| r.get(0))?)
}

/// Up to `limit` events with ids above `after`, oldest first.
pub(super) fn after(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<Event>, DatastoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "select id, kind, time, payload from events where id > ?1 order by id limit ?2",
    )?;
    let raw = stmt
        .query_map(params![after, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(id, kind, time, payload)| {
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
pub(super) fn progress(conn: &Connection, hook: &str) -> Result<HookProgress, DatastoreError> {
    if let Some(p) = known_progress(conn, hook)? {
        return Ok(p);
    }
    let last = last_id(conn)?;
    conn.execute(
        "insert into hook_cursors (hook, after) values (?1, ?2)",
        params![hook, last],
    )?;
    Ok(HookProgress {
        cursor: last,
        deliveries: BTreeMap::new(),
    })
}

/// A hook's progress if it has a cursor (a read: hooks ask often).
pub(super) fn known_progress(
    conn: &Connection,
    hook: &str,
) -> Result<Option<HookProgress>, DatastoreError> {
    let cursor: Option<i64> = conn
        .prepare_cached("select after from hook_cursors where hook = ?1")?
        .query_row(params![hook], |r| r.get(0))
        .optional()?;
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "select event, attempts, next_try, delivered from hook_deliveries \
         where hook = ?1 order by event",
    )?;
    let deliveries = stmt
        .query_map(params![hook], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                Delivery {
                    attempts: r.get(1)?,
                    next_try: r.get(2)?,
                    delivered: r.get(3)?,
                },
            ))
        })?
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    Ok(Some(HookProgress { cursor, deliveries }))
}

/// Records a delivery or a failed attempt of `event` to `hook`.
pub(super) fn record(
    conn: &Connection,
    hook: &str,
    event: i64,
    delivered: bool,
    next_try: i64,
) -> Result<Delivery, DatastoreError> {
    conn.prepare_cached(
        "insert into hook_deliveries (hook, event, attempts, next_try, delivered) \
         values (?1, ?2, 1, ?3, ?4) \
         on conflict (hook, event) do update set attempts = hook_deliveries.attempts + 1, \
         next_try = excluded.next_try, delivered = excluded.delivered",
    )?
    .execute(params![hook, event, next_try, delivered])?;
    Ok(conn
        .prepare_cached(
            "select attempts, next_try, delivered from hook_deliveries \
             where hook = ?1 and event = ?2",
        )?
        .query_row(params![hook, event], |r| {
            Ok(Delivery {
                attempts: r.get(0)?,
                next_try: r.get(1)?,
                delivered: r.get(2)?,
            })
        })?)
}

/// Moves a hook's cursor forward (never back) and forgets the deliveries
/// it now covers.
pub(super) fn advance(conn: &Connection, hook: &str, cursor: i64) -> Result<(), DatastoreError> {
    conn.execute(
        "insert into hook_cursors (hook, after) values (?1, ?2) \
         on conflict (hook) do update set after = \
         case when excluded.after > hook_cursors.after then excluded.after else hook_cursors.after end",
        params![hook, cursor],
    )?;
    conn.execute(
        "delete from hook_deliveries where hook = ?1 and event <= ?2",
        params![hook, cursor],
    )?;
    Ok(())
}

/// Deletes the events every one of `hooks` has passed, keeping the last
/// `keep` events whatever the cursors (for SSE clients that resume).
/// Cursors of hooks not in `hooks` (no longer configured) are dropped, so
/// a removed hook does not hold the outbox forever.
pub(super) fn prune(
    conn: &Connection,
    hooks: &[String],
    keep: i64,
) -> Result<usize, DatastoreError> {
    let known = conn
        .prepare_cached("select hook from hook_cursors")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for gone in known.iter().filter(|h| !hooks.contains(h)) {
        conn.execute("delete from hook_cursors where hook = ?1", params![gone])?;
        conn.execute("delete from hook_deliveries where hook = ?1", params![gone])?;
    }
    let last = last_id(conn)?;
    let min_cursor: Option<i64> =
        conn.query_row("select min(after) from hook_cursors", [], |r| r.get(0))?;
    let mut limit = last.saturating_sub(keep.max(0));
    if let Some(c) = min_cursor {
        limit = limit.min(c);
    }
    // A configured hook without a cursor yet starts at the last event
    // (see `progress`), so it holds nothing back.
    Ok(conn.execute("delete from events where id <= ?1", params![limit])?)
}

/// What `/metrics` shows from the datastore.
pub(super) fn metrics(conn: &Connection) -> Result<MetricsSnapshot, DatastoreError> {
    let counters = conn
        .prepare_cached("select name, value from counters")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    // Active builds only: the `builds_state` index bounds this by the
    // queue, not by the history.
    let queue = conn
        .prepare_cached(
            "select system, state, count(*) from builds where state in ('queued', 'allocated') \
             group by system, state order by system, state",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let (cache_paths, cache_bytes) = conn.query_row(
        "select count(*), coalesce(sum(file_size), 0) from cache_paths",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(MetricsSnapshot {
        counters,
        queue,
        cache_paths,
        cache_bytes,
    })
}
