//! Reading and writing the datastore's rows: JSON columns, identifiers and
//! states, each checked on the way out (a bad value is `Corrupt`, never a
//! panic).

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::coordinator::datastore::sql::{args, Row, Sql};
use crate::coordinator::datastore::{Allocation, DatastoreError};
use crate::coordinator::model::{AgentId, BuildId, BuildRecord, BuildState, DrvRecord};

/// Serialises a value for a JSON column.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, DatastoreError> {
    serde_json::to_string(value)
        .map_err(|e| DatastoreError::Corrupt(format!("cannot encode a JSON column: {e}")))
}

/// Parses a JSON column; `what` names it in the error.
pub(super) fn from_json<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, DatastoreError> {
    serde_json::from_str(text).map_err(|e| DatastoreError::Corrupt(format!("{what}: {e}: {text}")))
}

pub(super) fn build_id(n: i64) -> Result<BuildId, DatastoreError> {
    BuildId::new(n).map_err(|_| DatastoreError::Corrupt(format!("build id {n}")))
}

pub(super) fn agent_id(s: &str) -> Result<AgentId, DatastoreError> {
    AgentId::new(s).map_err(|_| DatastoreError::Corrupt(format!("agent id '{s}'")))
}

pub(super) fn state(s: &str) -> Result<BuildState, DatastoreError> {
    s.parse()
        .map_err(|_| DatastoreError::Corrupt(format!("build state '{s}'")))
}

/// The columns [`build_from_row`] reads, in its order.
pub(super) const BUILD_COLUMNS: &str = "id, drv, system, state, priority, effective_priority, \
    critical_path, tags, created_at, defer_until, waiting_on, agent, lease_deadline, attempts, \
    next_attempt_at, started_at, finished_at, message";

/// A build from a row selected with [`BUILD_COLUMNS`].
pub(super) fn build_from_row(r: &Row) -> Result<BuildRecord, DatastoreError> {
    let state_name: String = r.get(3)?;
    let tags: String = r.get(7)?;
    let agent: Option<String> = r.get(11)?;
    Ok(BuildRecord {
        id: build_id(r.get(0)?)?,
        drv: r.get(1)?,
        system: r.get(2)?,
        state: state(&state_name)?,
        priority: r.get(4)?,
        effective_priority: r.get(5)?,
        critical_path: r.get(6)?,
        tags: from_json("builds.tags", &tags)?,
        created_at: r.get(8)?,
        defer_until: r.get(9)?,
        waiting_on: r.get(10)?,
        agent: agent.as_deref().map(agent_id).transpose()?,
        lease_deadline: r.get(12)?,
        attempts: r.get(13)?,
        next_attempt_at: r.get(14)?,
        started_at: r.get(15)?,
        finished_at: r.get(16)?,
        message: r.get(17)?,
    })
}

/// One build, or `NoBuild`.
pub(super) fn build(conn: &dyn Sql, id: BuildId) -> Result<BuildRecord, DatastoreError> {
    match conn.query_opt(
        &format!("select {BUILD_COLUMNS} from builds where id = ?1"),
        args![id.get()],
    )? {
        Some(r) => build_from_row(&r),
        None => Err(DatastoreError::NoBuild(id)),
    }
}

/// Records a derivation unless it is known already.
pub(super) fn put_derivation(conn: &dyn Sql, d: &DrvRecord) -> Result<(), DatastoreError> {
    let inserted = conn.execute(
        "insert into derivations (drv, system, required_features, outputs, input_drvs, input_srcs) \
         values (?1, ?2, ?3, ?4, ?5, ?6) on conflict (drv) do nothing",
        args![
            &d.drv,
            &d.system,
            to_json(&d.required_features)?,
            to_json(&d.outputs)?,
            to_json(&d.input_drvs)?,
            to_json(&d.input_srcs)?,
        ],
    )?;
    if inserted == 1 {
        for (name, path) in &d.outputs {
            conn.execute(
                "insert into derivation_outputs (drv, output, path) values (?1, ?2, ?3)",
                args![&d.drv, name, path],
            )?;
        }
    }
    Ok(())
}

/// A recorded derivation.
pub(super) fn derivation(conn: &dyn Sql, drv: &str) -> Result<Option<DrvRecord>, DatastoreError> {
    let Some(r) = conn.query_opt(
        "select system, required_features, outputs, input_drvs, input_srcs \
         from derivations where drv = ?1",
        args![drv],
    )?
    else {
        return Ok(None);
    };
    let (system, features, outputs, input_drvs, input_srcs): (
        String,
        String,
        String,
        String,
        String,
    ) = r.to()?;
    Ok(Some(DrvRecord {
        drv: drv.to_owned(),
        system,
        required_features: from_json::<BTreeSet<String>>(
            "derivations.required_features",
            &features,
        )?,
        outputs: from_json::<BTreeMap<String, String>>("derivations.outputs", &outputs)?,
        input_drvs: from_json("derivations.input_drvs", &input_drvs)?,
        input_srcs: from_json("derivations.input_srcs", &input_srcs)?,
    }))
}

/// A recorded derivation that must exist (a build refers to it).
pub(super) fn derivation_of_build(conn: &dyn Sql, drv: &str) -> Result<DrvRecord, DatastoreError> {
    derivation(conn, drv)?.ok_or_else(|| {
        DatastoreError::Corrupt(format!("a build refers to unknown derivation '{drv}'"))
    })
}

/// Whether every output of `drv` is in the cache. All outputs, not only
/// those a dependent uses: a build produces all of them anyway, and this
/// keeps "done" one property of the derivation rather than of each edge.
pub(super) fn outputs_cached(conn: &dyn Sql, drv: &str) -> Result<bool, DatastoreError> {
    conn.query_one(
        "select not exists (select 1 from derivation_outputs o where o.drv = ?1 \
         and not exists (select 1 from cache_paths c where c.path = o.path))",
        args![drv],
    )?
    .get(0)
}

/// The active build of `drv`, if any (there is at most one).
pub(super) fn active_build(conn: &dyn Sql, drv: &str) -> Result<Option<i64>, DatastoreError> {
    conn.query_opt(
        "select id from builds where drv = ?1 and state in ('queued', 'allocated') \
         order by id desc limit 1",
        args![drv],
    )?
    .map(|r| r.get(0))
    .transpose()
}

/// The most recent build of a derivation.
pub(super) struct LastBuild {
    pub(super) id: i64,
    pub(super) state: BuildState,
    /// The dependency whose failure failed it, if that is why it failed.
    pub(super) failed_dependency: Option<String>,
}

impl LastBuild {
    /// Failed by its own builder (or past its retries): final until retried.
    pub(super) fn failed_itself(&self) -> bool {
        self.state == BuildState::Failed && self.failed_dependency.is_none()
    }
}

/// The most recent build of `drv`.
pub(super) fn last_build(conn: &dyn Sql, drv: &str) -> Result<Option<LastBuild>, DatastoreError> {
    conn.query_opt(
        "select id, state, failed_dependency from builds where drv = ?1 \
         order by id desc limit 1",
        args![drv],
    )?
    .map(|r| {
        Ok(LastBuild {
            id: r.get(0)?,
            state: state(&r.get::<String>(1)?)?,
            failed_dependency: r.get(2)?,
        })
    })
    .transpose()
}

/// The lease of an allocated build, as the agent receives it.
pub(super) fn allocation(
    conn: &dyn Sql,
    id: i64,
    drv: &str,
    lease_deadline: i64,
) -> Result<Allocation, DatastoreError> {
    Ok(Allocation {
        id: build_id(id)?,
        drv: derivation_of_build(conn, drv)?,
        lease_deadline,
    })
}
