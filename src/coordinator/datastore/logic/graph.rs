//! The dependency graph of active builds: effective priorities, critical
//! paths, and what a failure or a cancellation takes with it.
//!
//! `build_deps(build, dependency)` says `build` waits for `dependency`; its
//! rows exist only while both are active, so every walk here stays among
//! active builds. Derivation graphs are acyclic and may be deep, so every
//! walk is iterative.
//!
//! - eff(b) = max(own(b), eff(w) for every w waiting on b)
//! - cp(b) = 1 + max(cp(w) for every w waiting on b), 1 when none waits.
//!
//! Both only depend on a build's waiters, so a change at some builds
//! affects exactly their "cone": them and everything they transitively
//! wait for. Two ways to bring a cone up to date:
//! - [`raise`], when values can only have grown (a submission adds waiters
//!   and raises priorities): it follows dependencies only while it still
//!   raises something, so submitting one more build over a popular
//!   dependency does not read all of that dependency's waiters;
//! - [`recompute`], when values may drop (a priority lowered, waiters
//!   canceled or failed): the cone exactly, in topological order, taking
//!   the values of waiters outside it as they are stored.
//!
//! Both are kept exact this way (not left stale-high after cancels), as
//! long as every change to the graph goes through one of them.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::coordinator::datastore::sql::{args, Sql};
use crate::coordinator::datastore::DatastoreError;

/// The builds `id` waits for.
pub(super) fn dependencies_of(conn: &dyn Sql, id: i64) -> Result<Vec<i64>, DatastoreError> {
    conn.column(
        "select dependency from build_deps where build = ?1 order by dependency",
        args![id],
    )
}

/// The builds waiting for `id`.
pub(super) fn dependents_of(conn: &dyn Sql, id: i64) -> Result<Vec<i64>, DatastoreError> {
    conn.column(
        "select build from build_deps where dependency = ?1 order by build",
        args![id],
    )
}

/// Propagates raised values down the dependencies: each item of `work`
/// is (dependency, effective priority, critical path its waiter now
/// implies); every build below what its waiters imply is raised, and the
/// walk goes on below it. Items with the longest paths are taken first, so
/// that a deep chain is not walked again for each shorter claim on it.
pub(super) fn raise(conn: &dyn Sql, mut work: Vec<(i64, i64, i64)>) -> Result<(), DatastoreError> {
    // A stack: the last item is taken first.
    work.sort_by_key(|&(_, eff, cp)| (cp, eff));
    while let Some((id, eff, cp)) = work.pop() {
        let r = conn.query_one(
            "select effective_priority, critical_path from builds where id = ?1",
            args![id],
        )?;
        let (old_eff, old_cp): (i64, i64) = r.to()?;
        if eff <= old_eff && cp <= old_cp {
            continue;
        }
        let (eff, cp) = (eff.max(old_eff), cp.max(old_cp));
        set_values(conn, id, eff, cp)?;
        for d in dependencies_of(conn, id)? {
            work.push((d, eff, cp.saturating_add(1)));
        }
    }
    Ok(())
}

fn set_values(conn: &dyn Sql, id: i64, eff: i64, cp: i64) -> Result<(), DatastoreError> {
    conn.execute(
        "update builds set effective_priority = ?2, critical_path = ?3 where id = ?1",
        args![id, eff, cp],
    )?;
    Ok(())
}

/// A build of the cone while it is recomputed.
struct Node {
    deps: Vec<i64>,
    /// Waiters inside the cone not processed yet.
    pending: usize,
    eff: i64,
    cp: i64,
    old_eff: i64,
    old_cp: i64,
}

/// Recomputes effective priorities and critical paths of `starts` and of
/// everything they transitively wait for.
pub(super) fn recompute(conn: &dyn Sql, starts: &[i64]) -> Result<(), DatastoreError> {
    // The cone, closed under "waits for".
    let mut nodes: HashMap<i64, Node> = HashMap::new();
    let mut stack: Vec<i64> = starts.to_vec();
    while let Some(id) = stack.pop() {
        if nodes.contains_key(&id) {
            continue;
        }
        let r = conn.query_one(
            "select priority, effective_priority, critical_path from builds where id = ?1",
            args![id],
        )?;
        let (own, old_eff, old_cp): (i64, i64, i64) = r.to()?;
        let deps = dependencies_of(conn, id)?;
        stack.extend(deps.iter().copied().filter(|d| !nodes.contains_key(d)));
        nodes.insert(
            id,
            Node {
                deps,
                pending: 0,
                eff: own,
                cp: 1,
                old_eff,
                old_cp,
            },
        );
    }
    // Waiters outside the cone count with their stored values; those inside
    // are waited for, in topological order.
    let ids: Vec<i64> = nodes.keys().copied().collect();
    for id in &ids {
        let rows = conn.query(
            "select w.id, w.effective_priority, w.critical_path \
             from build_deps e join builds w on w.id = e.build where e.dependency = ?1",
            args![*id],
        )?;
        let mut inside = 0;
        let (mut eff, mut cp) = (i64::MIN, 0);
        for r in rows {
            let (w, w_eff, w_cp): (i64, i64, i64) = r.to()?;
            if nodes.contains_key(&w) {
                inside += 1;
            } else {
                eff = eff.max(w_eff);
                cp = cp.max(w_cp.saturating_add(1));
            }
        }
        let node = nodes.get_mut(id).expect("ids are the cone's keys");
        node.pending = inside;
        node.eff = node.eff.max(eff);
        node.cp = node.cp.max(cp);
    }
    let mut ready: VecDeque<i64> = ids
        .iter()
        .copied()
        .filter(|id| nodes[id].pending == 0)
        .collect();
    let mut done: HashSet<i64> = HashSet::new();
    while let Some(id) = ready.pop_front() {
        done.insert(id);
        let (eff, cp, deps) = {
            let n = &nodes[&id];
            if n.eff != n.old_eff || n.cp != n.old_cp {
                set_values(conn, id, n.eff, n.cp)?;
            }
            (n.eff, n.cp, n.deps.clone())
        };
        for d in deps {
            let dep = nodes
                .get_mut(&d)
                .expect("the cone is closed under dependencies");
            dep.eff = dep.eff.max(eff);
            dep.cp = dep.cp.max(cp.saturating_add(1));
            dep.pending -= 1;
            if dep.pending == 0 {
                ready.push_back(d);
            }
        }
    }
    if done.len() != nodes.len() {
        // Only a cycle leaves builds unprocessed, and derivations cannot
        // form one; say so rather than loop.
        tracing::warn!(
            left = nodes.len() - done.len(),
            "datastore: dependency cycle among active builds; their priorities were not recomputed"
        );
    }
    Ok(())
}

/// Ends `root` and every active build that transitively waits for it:
/// `root` gets `state` and `root_message`, its dependents `state` and
/// `dependent_message` (and `dependent_cause` as their
/// `failed_dependency`). Their edges are removed and the builds they waited
/// for (still active) are recomputed, since fewer builds now need them.
/// Returns the dependents, nearest first.
pub(super) fn end_with_dependents(
    conn: &dyn Sql,
    root: i64,
    state: &str,
    root_message: Option<&str>,
    dependent_message: &str,
    dependent_cause: Option<&str>,
    now: i64,
) -> Result<Vec<i64>, DatastoreError> {
    let mut ended: Vec<i64> = vec![root];
    let mut seen: HashSet<i64> = HashSet::from([root]);
    let mut i = 0;
    while i < ended.len() {
        for w in dependents_of(conn, ended[i])? {
            if seen.insert(w) {
                ended.push(w);
            }
        }
        i += 1;
    }
    let mut survivors: Vec<i64> = Vec::new();
    for &id in &ended {
        survivors.extend(
            dependencies_of(conn, id)?
                .into_iter()
                .filter(|d| !seen.contains(d)),
        );
    }
    for &id in &ended {
        let (message, cause) = if id == root {
            (root_message, None)
        } else {
            (Some(dependent_message), dependent_cause)
        };
        conn.execute(
            "update builds set state = ?2, message = ?3, finished_at = ?4, lease_deadline = null, \
             waiting_on = 0, failed_dependency = ?5 where id = ?1",
            args![id, state, message, now, cause],
        )?;
        conn.execute(
            "delete from build_deps where build = ?1 or dependency = ?1",
            args![id],
        )?;
    }
    survivors.sort_unstable();
    survivors.dedup();
    recompute(conn, &survivors)?;
    Ok(ended.split_off(1))
}
