//! The build graph and its scheduler.
//!
//! [`realise`] loads, from each requested `.drv`, the derivations that still
//! have an invalid output (a derivation whose outputs are all valid is not
//! entered, nor are its inputs), then runs them in dependency order, up to
//! `jobs` at once, one thread each. The caller's thread schedules and gets
//! every [`Event`]. As Nix: after a failure no new build starts and the
//! running ones finish, unless `keep_going`, which builds everything that
//! does not depend on a failure and reports the rest as
//! [`Event::DependencyFailed`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::local::{realise_one, remove_stale_build_dirs, BuildContext, StepOutcome};
use super::{builds_dir, BuildError, Event};
use crate::derivation::Derivation;
use crate::store::local::LocalStore;
use crate::store::StorePath;

/// How often the scheduler wakes up without news ([`Event::Tick`]).
const TICK: Duration = Duration::from_millis(250);

/// The result of [`realise`].
#[derive(Debug, Default)]
pub struct Realisation {
    /// For each requested derivation, in the order given, its outputs by name.
    pub outputs: Vec<(StorePath, BTreeMap<String, StorePath>)>,
    /// The derivations that failed, with the error (one line each).
    pub failed: Vec<(StorePath, String)>,
    /// The derivations not built because a dependency failed.
    pub dependency_failed: Vec<(StorePath, StorePath)>,
    /// The derivations not started because an earlier build failed
    /// (without `keep_going`).
    pub not_started: Vec<StorePath>,
    /// How many were built here.
    pub built: usize,
    /// How many another process built meanwhile.
    pub reused: usize,
}

impl Realisation {
    /// Whether every requested output is valid.
    pub fn success(&self) -> bool {
        self.failed.is_empty() && self.dependency_failed.is_empty() && self.not_started.is_empty()
    }
}

/// A derivation to build.
struct Node {
    drv: Derivation,
    /// Input derivations still to be built.
    waiting_for: BTreeSet<StorePath>,
    /// Derivations that wait for this one.
    dependents: BTreeSet<StorePath>,
}

/// Reads and parses the `.drv` file of `path`, which must be valid.
pub fn read_derivation(store: &LocalStore, path: &StorePath) -> Result<Derivation, BuildError> {
    let loc = store.location();
    if !store.is_valid(path)? {
        return Err(BuildError::NotValid {
            drv: loc.logical(path),
        });
    }
    let file = loc.real_path(path);
    let bytes = std::fs::read(&file).map_err(|e| BuildError::BadDerivation {
        drv: loc.logical(path),
        reason: format!("cannot read {}: {e}", file.display()),
    })?;
    Derivation::from_aterm(&bytes, &loc.dir).map_err(|e| BuildError::BadDerivation {
        drv: loc.logical(path),
        reason: e.to_string(),
    })
}

/// The nodes to build by `.drv` path, and every root's parsed derivation.
type Loaded = (BTreeMap<StorePath, Node>, BTreeMap<StorePath, Derivation>);

/// The derivations among `roots`' closure with an invalid output, and their
/// edges; plus every root's parsed derivation.
fn load(store: &LocalStore, roots: &[StorePath]) -> Result<Loaded, BuildError> {
    let mut nodes: BTreeMap<StorePath, Node> = BTreeMap::new();
    let mut root_drvs = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<StorePath> = roots.to_vec();
    while let Some(path) = stack.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        if !path.is_derivation() {
            return Err(BuildError::BadDerivation {
                drv: store.location().logical(&path),
                reason: "not a .drv store path".to_owned(),
            });
        }
        let drv = read_derivation(store, &path)?;
        if roots.contains(&path) {
            root_drvs.insert(path.clone(), drv.clone());
        }
        let outputs = drv.output_paths();
        if outputs.len() != drv.outputs.len() {
            return Err(BuildError::Unsupported {
                drv: store.location().logical(&path),
                reason: "some output paths are not known before the build (content-addressed or deferred outputs)".to_owned(),
            });
        }
        let mut missing = false;
        for p in outputs.values() {
            missing |= !store.is_valid(p)?;
        }
        if !missing {
            continue;
        }
        stack.extend(drv.input_derivations.keys().cloned());
        nodes.insert(
            path,
            Node {
                drv,
                waiting_for: BTreeSet::new(),
                dependents: BTreeSet::new(),
            },
        );
    }
    let edges: Vec<(StorePath, StorePath)> = nodes
        .iter()
        .flat_map(|(p, n)| {
            n.drv
                .input_derivations
                .keys()
                .filter(|i| nodes.contains_key(*i))
                .map(move |i| (p.clone(), i.clone()))
        })
        .collect();
    for (p, i) in edges {
        if let Some(n) = nodes.get_mut(&p) {
            n.waiting_for.insert(i.clone());
        }
        if let Some(n) = nodes.get_mut(&i) {
            n.dependents.insert(p);
        }
    }
    Ok((nodes, root_drvs))
}

enum Msg {
    Event(Event),
    Done(StorePath, Result<StepOutcome, BuildError>, Duration),
}

/// Builds whatever is missing of `roots` (full `.drv` store paths, valid in
/// the store) with `ctx`, reporting every [`Event`] to `on_event` on this
/// thread. Errors only when the graph cannot be loaded; build failures are
/// in the returned [`Realisation`].
pub fn realise(
    ctx: &BuildContext<'_>,
    roots: &[StorePath],
    on_event: &mut dyn FnMut(&Event),
) -> Result<Realisation, BuildError> {
    // Leftovers of killed runs; failing to clean them is no reason not to build.
    if let Err(e) = remove_stale_build_dirs(&builds_dir(ctx.store.location())) {
        tracing::warn!("cannot remove stale build directories: {e}");
    }
    if let Err(e) = ctx.store.remove_stale_stages() {
        tracing::warn!("cannot remove stale staging directories: {e}");
    }
    let (mut nodes, root_drvs) = load(ctx.store, roots)?;
    let mut result = Realisation::default();
    on_event(&Event::Planned {
        to_build: nodes.len(),
    });
    let mut ready: BTreeSet<StorePath> = nodes
        .iter()
        .filter(|(_, n)| n.waiting_for.is_empty())
        .map(|(p, _)| p.clone())
        .collect();
    let jobs = ctx.options.jobs.max(1);
    let (tx, rx) = mpsc::channel::<Msg>();
    // Events from workers come through their own channel, forwarded below.
    let mut stopping = false;
    std::thread::scope(|scope| {
        let mut running = 0usize;
        loop {
            while running < jobs && !stopping {
                let Some(path) = ready.pop_first() else { break };
                let Some(node) = nodes.get(&path) else {
                    continue;
                };
                let drv = node.drv.clone();
                let tx = tx.clone();
                on_event(&Event::Started { drv: path.clone() });
                running += 1;
                scope.spawn(move || {
                    let start = Instant::now();
                    let (etx, erx) = mpsc::channel::<Event>();
                    // Forward worker events in order, before its Done.
                    let fwd_tx = tx.clone();
                    let r = std::thread::scope(|inner| {
                        inner.spawn(move || {
                            for e in erx {
                                let _ = fwd_tx.send(Msg::Event(e));
                            }
                        });
                        // Moved in, so it is dropped before the scope joins
                        // the forwarder (which ends when all senders are gone).
                        let etx = etx;
                        realise_one(ctx, &path, &drv, &etx)
                    });
                    let _ = tx.send(Msg::Done(path, r, start.elapsed()));
                });
            }
            if running == 0 {
                break;
            }
            let msg = match rx.recv_timeout(TICK) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    on_event(&Event::Tick);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let (path, r, elapsed) = match msg {
                Msg::Event(e) => {
                    on_event(&e);
                    continue;
                }
                Msg::Done(path, r, elapsed) => (path, r, elapsed),
            };
            running -= 1;
            let Some(node) = nodes.remove(&path) else {
                continue;
            };
            match r {
                Ok(outcome) => {
                    match outcome {
                        StepOutcome::Built => {
                            result.built += 1;
                            on_event(&Event::Built {
                                drv: path.clone(),
                                elapsed,
                            });
                        }
                        StepOutcome::Reused => {
                            result.reused += 1;
                            on_event(&Event::Reused { drv: path.clone() });
                        }
                    }
                    for d in &node.dependents {
                        if let Some(n) = nodes.get_mut(d) {
                            n.waiting_for.remove(&path);
                            if n.waiting_for.is_empty() {
                                ready.insert(d.clone());
                            }
                        }
                    }
                }
                Err(e) => {
                    let error = e.to_string().replace('\n', " ");
                    on_event(&Event::Failed {
                        drv: path.clone(),
                        error: error.clone(),
                    });
                    result.failed.push((path.clone(), error));
                    if !ctx.options.keep_going {
                        stopping = true;
                    }
                    // Everything above the failure can never be built.
                    let mut stack: Vec<StorePath> = node.dependents.into_iter().collect();
                    while let Some(d) = stack.pop() {
                        if let Some(n) = nodes.remove(&d) {
                            ready.remove(&d);
                            on_event(&Event::DependencyFailed {
                                drv: d.clone(),
                                dependency: path.clone(),
                            });
                            result.dependency_failed.push((d, path.clone()));
                            stack.extend(n.dependents);
                        }
                    }
                }
            }
        }
    });
    for root in roots {
        if let Some(drv) = root_drvs.get(root) {
            result.outputs.push((root.clone(), drv.output_paths()));
        }
    }
    result.not_started = nodes.into_keys().collect();
    Ok(result)
}
