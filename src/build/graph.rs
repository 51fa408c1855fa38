//! The build graph and its scheduler.
//!
//! [`realise`] loads, from each requested `.drv`, the derivations that still
//! have an invalid output (a derivation whose outputs are all valid is not
//! entered, nor are its inputs), then runs them in dependency order, up to
//! `jobs` builders at once, one thread each; a worker whose builder exited
//! ([`Event::BuilderExited`]) frees its job slot while it registers the
//! outputs, and at most `2 * jobs` workers run in all. Without machines, up
//! to `jobs` more workers prepare their builds while the builders run and
//! wait for a slot ([`super::slots`]), when the pool has build users for
//! them. The caller's thread
//! schedules and gets every [`Event`]. As Nix: after a failure no new build starts and the
//! running ones finish, unless `keep_going`, which builds everything that
//! does not depend on a failure and reports the rest as
//! [`Event::DependencyFailed`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::local::{
    check_one, clear_free_user_dirs, realise_one, realise_step, remove_stale_build_dirs,
    BuildContext, StepOutcome,
};
use super::slots::JobSlots;
use super::{builds_dir, BuildError, BuildErrorKind, Event, GraphError};
use crate::derivation::check::{self, ReadError};
use crate::derivation::{Derivation, DrvHasher};
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

/// Reads the derivation at `path`, which must be valid.
pub fn read_derivation(store: &LocalStore, path: &StorePath) -> Result<Derivation, ReadError> {
    check::read_derivation(store, path)
}

/// The nodes to build by `.drv` path, and parsed derivations by path (every
/// root's from [`load`], every one read from [`walk`]).
type Loaded = (BTreeMap<StorePath, Node>, BTreeMap<StorePath, Derivation>);

/// The derivations among `roots`' closure with an invalid output, and their
/// edges; plus every root's parsed derivation. Every derivation read is
/// checked to give the output paths it names ([`check::check_outputs`]):
/// one that claims another's outputs would otherwise "build" at once, or
/// write what the real derivation later reuses. A cycle is named.
fn load(
    store: &LocalStore,
    roots: &[StorePath],
    check: &BTreeSet<StorePath>,
) -> Result<Loaded, GraphError> {
    let (nodes, read) = walk(store, roots, check)?;
    if let Some(cycle) = find_cycle(&nodes) {
        return Err(GraphError::Cycle {
            cycle: cycle.iter().map(|p| store.location().logical(p)).collect(),
        });
    }
    // Input derivations the walk read already are not read again.
    let mut hasher = DrvHasher::new(store.location().dir.clone(), |p: &StorePath| {
        match read.get(p) {
            Some(drv) => Ok(drv.clone()),
            None => read_derivation(store, p),
        }
    });
    for (path, drv) in &read {
        check::check_outputs(drv, path, &mut hasher).map_err(|source| {
            BuildError::new(&store.location().dir, path, BuildErrorKind::Refused(source))
        })?;
    }
    let root_drvs = roots
        .iter()
        .filter_map(|r| read.get(r).map(|d| (r.clone(), d.clone())))
        .collect();
    Ok((nodes, root_drvs))
}

/// A cycle among `nodes`' edges, as paths with the first repeated last.
fn find_cycle(nodes: &BTreeMap<StorePath, Node>) -> Option<Vec<StorePath>> {
    // Peel off nodes that wait for nothing left; what remains lies on or
    // leads to a cycle, and following any remaining edge finds one.
    let mut left: BTreeMap<&StorePath, BTreeSet<&StorePath>> = nodes
        .iter()
        .map(|(p, n)| (p, n.waiting_for.iter().collect()))
        .collect();
    loop {
        let free: Vec<&StorePath> = left
            .iter()
            .filter(|(_, w)| w.is_empty())
            .map(|(p, _)| *p)
            .collect();
        if free.is_empty() {
            break;
        }
        for p in &free {
            left.remove(p);
        }
        for w in left.values_mut() {
            for p in &free {
                w.remove(p);
            }
        }
    }
    let mut at = *left.keys().next()?;
    let mut trail: Vec<&StorePath> = Vec::new();
    loop {
        if let Some(i) = trail.iter().position(|p| *p == at) {
            let mut cycle: Vec<StorePath> = trail[i..].iter().map(|p| (*p).clone()).collect();
            cycle.push(at.clone());
            return Some(cycle);
        }
        trail.push(at);
        at = left.get(at)?.iter().next()?;
    }
}

/// Every derivation read from `roots` down (stopping at those whose
/// outputs are all valid, unless in `check`, which are built again): the
/// nodes to build with their edges, and all of them by path.
fn walk(
    store: &LocalStore,
    roots: &[StorePath],
    check: &BTreeSet<StorePath>,
) -> Result<Loaded, GraphError> {
    let mut nodes: BTreeMap<StorePath, Node> = BTreeMap::new();
    let mut read: BTreeMap<StorePath, Derivation> = BTreeMap::new();
    let mut stack: Vec<StorePath> = roots.to_vec();
    while let Some(path) = stack.pop() {
        if read.contains_key(&path) {
            continue;
        }
        let drv = read_derivation(store, &path)?;
        read.insert(path.clone(), drv.clone());
        let outputs = drv.output_paths();
        if outputs.len() != drv.outputs.len() {
            return Err(BuildError::new(
                &store.location().dir,
                &path,
                BuildErrorKind::Unsupported {
                    reason: "some output paths are not known before the build (content-addressed or deferred outputs)".to_owned(),
                },
            )
            .into());
        }
        let mut missing = false;
        for p in outputs.values() {
            missing |= !store.is_valid(p)?;
        }
        if !missing && !check.contains(&path) {
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
    Ok((nodes, read))
}

/// How a worker ended.
enum Ended {
    Done(StorePath, Result<StepOutcome, BuildError>),
    /// The worker of this derivation panicked (its builder was killed by
    /// the sandbox's guards while unwinding).
    Panicked(StorePath),
}

/// How a worker tells the scheduler that it ended. Its events go straight
/// to the scheduler's event channel (no thread in between); the end goes
/// to a channel of its own, followed by an [`Event::Tick`] on the event
/// channel that wakes the scheduler to take it. The scheduler's own ticks
/// are not sent on that channel, so a received tick is always a worker's
/// wake-up; the end it announces was sent after all of that worker's
/// events, so the scheduler has seen them when it takes the end.
struct Ending {
    events: mpsc::Sender<Event>,
    done: mpsc::Sender<Ended>,
}

impl Ending {
    fn send(&self, ended: Ended) {
        let _ = self.done.send(ended);
        let _ = self.events.send(Event::Tick);
    }
}

/// Tells the scheduler that its worker panicked, when dropped armed: without
/// it the scheduler would wait for that worker's `Done` forever.
struct ReportPanic {
    ending: Ending,
    path: Option<StorePath>,
}

impl Drop for ReportPanic {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            self.ending.send(Ended::Panicked(path));
        }
    }
}

/// Builds whatever is missing of `roots` (full `.drv` store paths, valid in
/// the store) with `ctx`, reporting every [`Event`] to `on_event` on this
/// thread. Errors only when the graph cannot be loaded; build failures are
/// in the returned [`Realisation`].
pub fn realise(
    ctx: &BuildContext<'_>,
    roots: &[StorePath],
    on_event: &mut dyn FnMut(&Event),
) -> Result<Realisation, GraphError> {
    // Leftovers of killed runs; failing to clean them is no reason not to build.
    let builds = builds_dir(ctx.store.location());
    if let Err(e) = remove_stale_build_dirs(&builds) {
        tracing::warn!("cannot remove stale build directories: {e}");
    }
    if let Ok(pool) = &ctx.pool {
        clear_free_user_dirs(&builds, pool);
    }
    if let Err(e) = ctx.store.remove_stale_stages() {
        tracing::warn!("cannot remove stale staging directories: {e}");
    }
    // `--check` applies to the requested derivations only.
    let check: BTreeSet<StorePath> = if ctx.options.check {
        roots.iter().cloned().collect()
    } else {
        BTreeSet::new()
    };
    if let Some(off) = ctx.offload {
        return schedule(
            ctx.store,
            roots,
            &check,
            // With machines, workers beyond `jobs` wait for remote slots;
            // the offloader keeps local builds to `jobs`.
            Workers::free(ctx.options.jobs + off.remote_capacity()),
            ctx.options.keep_going,
            on_event,
            &|path, drv, events| {
                if check.contains(path) {
                    check_one(ctx, path, drv, events)
                } else {
                    realise_one(ctx, path, drv, events)
                }
            },
        );
    }
    let jobs = ctx.options.jobs.max(1);
    let slots = JobSlots::new(jobs);
    // Builds prepared ahead each hold a build user while they wait: only
    // when the pool has one for them beside the running and finishing
    // builds' (else they would wait for users instead, polling).
    let users = ctx.pool.as_ref().map_or(0, |p| p.users().len());
    let ahead = if users >= 3 * jobs { jobs } else { 0 };
    schedule(
        ctx.store,
        roots,
        &check,
        Workers {
            jobs,
            ahead,
            slots: Some(&slots),
        },
        ctx.options.keep_going,
        on_event,
        &|path, drv, events| realise_step(ctx, path, drv, check.contains(path), &slots, events),
    )
}

/// How many workers a [`schedule`] runs.
struct Workers<'s> {
    /// Builders at once.
    jobs: usize,
    /// Workers started beyond `jobs` that prepare their build while the
    /// running builders run, and wait for one of `slots` (see
    /// [`super::slots`]).
    ahead: usize,
    /// The job slots the workers take themselves (and report
    /// [`Event::Started`] once they have one), closed when the graph
    /// stops; without them a worker's slot is taken for it when it starts.
    slots: Option<&'s JobSlots>,
}

impl Workers<'_> {
    /// `jobs` workers, each counted as a builder from its start.
    fn free(jobs: usize) -> Workers<'static> {
        Workers {
            jobs,
            ahead: 0,
            slots: None,
        }
    }
}

/// One step of the schedule: realise one derivation whose inputs are valid.
type Step<'s> = dyn Fn(&StorePath, &Derivation, &mpsc::Sender<Event>) -> Result<StepOutcome, BuildError>
    + Sync
    + 's;

/// The scheduler of [`realise`], with the step to run for each derivation
/// as a parameter (so that it can be tested without building).
fn schedule(
    store: &LocalStore,
    roots: &[StorePath],
    check: &BTreeSet<StorePath>,
    workers: Workers<'_>,
    keep_going: bool,
    on_event: &mut dyn FnMut(&Event),
    step: &Step<'_>,
) -> Result<Realisation, GraphError> {
    let (mut nodes, root_drvs) = load(store, roots, check)?;
    let mut result = Realisation::default();
    on_event(&Event::Planned {
        to_build: nodes.len(),
    });
    let mut ready: BTreeSet<StorePath> = nodes
        .iter()
        .filter(|(_, n)| n.waiting_for.is_empty())
        .map(|(p, _)| p.clone())
        .collect();
    let jobs = workers.jobs.max(1);
    let ahead = workers.ahead;
    let (etx, erx) = mpsc::channel::<Event>();
    let (dtx, drx) = mpsc::channel::<Ended>();
    let mut stopping = false;
    // When each build started, for the time [`Event::Built`] reports.
    let mut started: BTreeMap<StorePath, Instant> = BTreeMap::new();
    // No new build starts, prepared ones included.
    let stop = |stopping: &mut bool| {
        *stopping = true;
        if let Some(slots) = workers.slots {
            slots.close();
        }
    };
    std::thread::scope(|scope| {
        // Workers whose builder may still run (each holds or waits for a
        // job slot), and workers past their builder
        // ([`Event::BuilderExited`]: checking, registering, cleaning up): at
        // most `jobs + ahead` of the first kind, and `2 * jobs + ahead`
        // together.
        let mut running = 0usize;
        let mut finishing: BTreeSet<StorePath> = BTreeSet::new();
        loop {
            while running < jobs + ahead
                && running + finishing.len() < 2 * jobs + ahead
                && !stopping
            {
                let Some(path) = ready.pop_first() else { break };
                let Some(node) = nodes.get(&path) else {
                    continue;
                };
                let drv = node.drv.clone();
                let ending = Ending {
                    events: etx.clone(),
                    done: dtx.clone(),
                };
                if workers.slots.is_none() {
                    started.insert(path.clone(), Instant::now());
                    on_event(&Event::Started { drv: path.clone() });
                }
                running += 1;
                scope.spawn(move || {
                    let mut report = ReportPanic {
                        ending,
                        path: Some(path.clone()),
                    };
                    let r = step(&path, &drv, &report.ending.events);
                    report.path = None;
                    report.ending.send(Ended::Done(path, r));
                });
            }
            if running == 0 && finishing.is_empty() {
                break;
            }
            let ended = match erx.recv_timeout(TICK) {
                // A worker ended (see [`Ending`]).
                Ok(Event::Tick) => match drx.try_recv() {
                    Ok(ended) => ended,
                    Err(_) => continue,
                },
                Ok(e) => {
                    match &e {
                        Event::BuilderExited { drv }
                            if nodes.contains_key(drv) && finishing.insert(drv.clone()) =>
                        {
                            running -= 1;
                        }
                        Event::Started { drv } => {
                            started.insert(drv.clone(), Instant::now());
                        }
                        _ => {}
                    }
                    on_event(&e);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    on_event(&Event::Tick);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let (path, r) = match ended {
                Ended::Done(path, r) => (path, r),
                Ended::Panicked(path) => {
                    // A bug: start nothing more and let the running builds
                    // end; the scope then re-raises the panic, so the
                    // process exits non-zero instead of reporting success.
                    tracing::error!(drv = %path, "a build worker panicked");
                    if !finishing.remove(&path) {
                        running -= 1;
                    }
                    stop(&mut stopping);
                    continue;
                }
            };
            if !finishing.remove(&path) {
                running -= 1;
            }
            let elapsed = started
                .remove(&path)
                .map_or(Duration::ZERO, |t| t.elapsed());
            // Prepared, never started (the graph stopped): not started.
            if matches!(r, Ok(StepOutcome::NotStarted)) {
                continue;
            }
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
                        StepOutcome::NotStarted => {}
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
                    if !keep_going {
                        stop(&mut stopping);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::derivation::{DerivationOutput, DrvHasher, OutputName};
    use crate::store::{StoreDir, StoreLocation};

    fn store(tmp: &std::path::Path) -> LocalStore {
        crate::derivation::check::open_store(StoreLocation::new(
            StoreDir::default(),
            tmp.join("root"),
        ))
        .expect("open store")
    }

    /// Adds a derivation named `name` using the `out` of each of `inputs`.
    fn add(store: &LocalStore, name: &str, inputs: &[&StorePath]) -> StorePath {
        let mut drv = Derivation {
            outputs: [(OutputName::out(), DerivationOutput::Deferred)].into(),
            input_derivations: inputs
                .iter()
                .map(|i| ((*i).clone(), [OutputName::out()].into()))
                .collect(),
            system: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            env: [
                (b"name".to_vec(), name.as_bytes().to_vec()),
                (b"out".to_vec(), Vec::new()),
            ]
            .into(),
            ..Derivation::default()
        };
        let mut hasher = DrvHasher::new(StoreDir::default(), |p: &StorePath| {
            read_derivation(store, p)
        });
        drv.fill_output_paths(&mut hasher).expect("output paths");
        let dir = StoreDir::default();
        store
            .add_text(
                &format!("{name}.drv"),
                &drv.to_aterm(&dir),
                &drv.references(),
                &drv.output_paths(),
            )
            .expect("add drv")
    }

    /// Runs the scheduler with a step that fails the derivations named in
    /// `fail`; returns the result, the events and the order steps started.
    fn run(
        store: &LocalStore,
        roots: &[StorePath],
        jobs: usize,
        keep_going: bool,
        fail: &[&str],
    ) -> (Realisation, Vec<Event>, Vec<String>, usize) {
        let order = Mutex::new(Vec::new());
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let step = |p: &StorePath, _: &Derivation, _: &mpsc::Sender<Event>| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let name = p.name().trim_end_matches(".drv").to_owned();
            order.lock().expect("lock").push(name.clone());
            std::thread::sleep(Duration::from_millis(30));
            running.fetch_sub(1, Ordering::SeqCst);
            if fail.contains(&name.as_str()) {
                Err(BuildError::new(
                    &StoreDir::default(),
                    p,
                    BuildErrorKind::Unsupported {
                        reason: "told to fail".to_owned(),
                    },
                ))
            } else {
                Ok(StepOutcome::Built)
            }
        };
        let (r, events) = schedule_collecting(store, roots, Workers::free(jobs), keep_going, &step);
        let order = order.into_inner().expect("lock");
        (r, events, order, most.load(Ordering::SeqCst))
    }

    #[test]
    fn runs_a_diamond_in_dependency_order_up_to_jobs_at_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path());
        let root = add(&s, "root", &[]);
        let left = add(&s, "left", &[&root]);
        let right = add(&s, "right", &[&root]);
        let top = add(&s, "top", &[&left, &right]);
        let (r, events, order, most) = run(&s, &[top.clone(), left.clone()], 2, false, &[]);
        assert!(r.success());
        assert_eq!(r.built, 4);
        assert_eq!(order[0], "root");
        assert_eq!(order[3], "top");
        assert_eq!(most, 2, "left and right ran together");
        assert_eq!(events[0], Event::Planned { to_build: 4 });
        let names: Vec<&StorePath> = r.outputs.iter().map(|(d, _)| d).collect();
        assert_eq!(names, vec![&top, &left], "outputs in argument order");
        let (_, _, _, most) = run(&s, &[top], 1, false, &[]);
        assert_eq!(most, 1);
    }

    #[test]
    fn a_builder_that_exited_frees_its_slot_while_its_outputs_register() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path());
        let names = ["a", "b", "c", "d"];
        let roots: Vec<StorePath> = names.iter().map(|n| add(&s, n, &[])).collect();
        let (building, most_building) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (alive, most_alive) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let step = |p: &StorePath, _: &Derivation, events: &mpsc::Sender<Event>| {
            most_alive.fetch_max(alive.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            most_building.fetch_max(
                building.fetch_add(1, Ordering::SeqCst) + 1,
                Ordering::SeqCst,
            );
            std::thread::sleep(Duration::from_millis(20));
            building.fetch_sub(1, Ordering::SeqCst);
            events
                .send(Event::BuilderExited { drv: p.clone() })
                .expect("send");
            // "Registering": long enough that the next build starts meanwhile.
            std::thread::sleep(Duration::from_millis(60));
            alive.fetch_sub(1, Ordering::SeqCst);
            Ok(StepOutcome::Built)
        };
        let mut exited = 0;
        let r = schedule(
            &s,
            &roots,
            &BTreeSet::new(),
            Workers::free(1),
            false,
            &mut |e| {
                exited += usize::from(matches!(e, Event::BuilderExited { .. }));
            },
            &step,
        )
        .expect("schedule");
        assert!(r.success());
        assert_eq!(r.built, 4);
        assert_eq!(exited, 4, "every BuilderExited reaches the caller");
        assert_eq!(
            most_building.load(Ordering::SeqCst),
            1,
            "one builder at a time (-j 1)"
        );
        assert_eq!(
            most_alive.load(Ordering::SeqCst),
            2,
            "a build starts while the last one registers, and no more than jobs finish at once"
        );
    }

    /// [`schedule`] of `roots` with `step`, and the events it reported
    /// but ticks.
    fn schedule_collecting(
        store: &LocalStore,
        roots: &[StorePath],
        workers: Workers<'_>,
        keep_going: bool,
        step: &Step<'_>,
    ) -> (Realisation, Vec<Event>) {
        let mut events = Vec::new();
        let r = schedule(
            store,
            roots,
            &BTreeSet::new(),
            workers,
            keep_going,
            &mut |e| {
                if *e != Event::Tick {
                    events.push(e.clone());
                }
            },
            step,
        )
        .expect("schedule");
        (r, events)
    }

    /// A step as [`realise_step`] takes it: prepares, waits for a slot,
    /// reports `Started`, builds (failing if its name is in `fail`),
    /// reports `BuilderExited`, registers.
    #[allow(clippy::too_many_arguments)]
    fn slotted_step(
        slots: &JobSlots,
        p: &StorePath,
        events: &mpsc::Sender<Event>,
        fail: &[&str],
        alive: &AtomicUsize,
        most_alive: &AtomicUsize,
        building: &AtomicUsize,
        most_building: &AtomicUsize,
    ) -> Result<StepOutcome, BuildError> {
        most_alive.fetch_max(alive.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5)); // preparing
        let Some(slot) = slots.acquire() else {
            alive.fetch_sub(1, Ordering::SeqCst);
            return Ok(StepOutcome::NotStarted);
        };
        events
            .send(Event::Started { drv: p.clone() })
            .expect("send");
        most_building.fetch_max(
            building.fetch_add(1, Ordering::SeqCst) + 1,
            Ordering::SeqCst,
        );
        std::thread::sleep(Duration::from_millis(30));
        building.fetch_sub(1, Ordering::SeqCst);
        drop(slot);
        // Before the graph hears of it and starts the next worker.
        alive.fetch_sub(1, Ordering::SeqCst);
        events
            .send(Event::BuilderExited { drv: p.clone() })
            .expect("send");
        if fail.iter().any(|f| p.name().starts_with(f)) {
            return Err(BuildError::new(
                &StoreDir::default(),
                p,
                BuildErrorKind::Unsupported {
                    reason: "told to fail".to_owned(),
                },
            ));
        }
        Ok(StepOutcome::Built)
    }

    #[test]
    fn builds_prepared_ahead_wait_for_a_job_slot_and_are_not_started_after_a_failure() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path());
        let roots: Vec<StorePath> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| add(&s, n, &[]))
            .collect();
        let run = |fail: &[&str]| {
            let slots = JobSlots::new(1);
            let (alive, most_alive) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let (building, most_building) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let step = |p: &StorePath, _: &Derivation, events: &mpsc::Sender<Event>| {
                slotted_step(
                    &slots,
                    p,
                    events,
                    fail,
                    &alive,
                    &most_alive,
                    &building,
                    &most_building,
                )
            };
            let workers = Workers {
                jobs: 1,
                ahead: 1,
                slots: Some(&slots),
            };
            let (r, events) = schedule_collecting(&s, &roots, workers, false, &step);
            (
                r,
                events,
                most_alive.load(Ordering::SeqCst),
                most_building.load(Ordering::SeqCst),
            )
        };
        let (r, events, most_alive, most_building) = run(&[]);
        assert!(r.success());
        assert_eq!(r.built, 4);
        assert_eq!(most_building, 1, "one builder at a time (-j 1)");
        assert_eq!(most_alive, 2, "the next build prepares while one builds");
        let started = events
            .iter()
            .filter(|e| matches!(e, Event::Started { .. }))
            .count();
        assert_eq!(started, 4, "each build reports its start once, itself");

        // Every build fails: the first one to start stops the graph, which
        // closes the slots, so the builds prepared meanwhile never start
        // (but one that took the freed slot before the failure was known).
        let (r, events, _, _) = run(&["a", "b", "c", "d"]);
        assert_eq!(r.built, 0);
        assert_eq!(r.failed.len() + r.not_started.len(), 4, "{r:?}");
        assert!(r.not_started.len() >= 2, "{events:?}");
    }

    #[test]
    fn a_panicking_worker_is_not_swallowed_and_the_scheduler_ends() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path());
        let bad = add(&s, "bad", &[]);
        let good = add(&s, "good", &[]);
        let step = |p: &StorePath, _: &Derivation, _: &mpsc::Sender<Event>| {
            if p.name().starts_with("bad") {
                panic!("injected worker panic");
            }
            Ok(StepOutcome::Built)
        };
        let mut events = Vec::new();
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            schedule(
                &s,
                &[bad.clone(), good],
                &BTreeSet::new(),
                Workers::free(1),
                true,
                &mut |e| events.push(e.clone()),
                &step,
            )
        }));
        // Before, the scheduler waited forever for the worker's `Done`;
        // now the panic reaches the caller (and `main`: a non-zero exit).
        assert!(got.is_err(), "the worker's panic propagates");
        assert_eq!(
            events.iter().rfind(|e| **e != Event::Tick),
            Some(&Event::Started { drv: bad }),
            "nothing happens after the panic"
        );
    }

    #[test]
    fn keep_going_builds_what_does_not_depend_on_a_failure() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path());
        let bad = add(&s, "bad", &[]);
        let above = add(&s, "above", &[&bad]);
        let top = add(&s, "top", &[&above]);
        let other = add(&s, "other", &[]);
        let roots = [top.clone(), other.clone()];
        let (r, events, order, _) = run(&s, &roots, 1, true, &["bad"]);
        assert!(!r.success());
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, bad);
        let mut dep: Vec<StorePath> = r.dependency_failed.iter().map(|(d, _)| d.clone()).collect();
        dep.sort();
        let mut expected = vec![above.clone(), top.clone()];
        expected.sort();
        assert_eq!(dep, expected);
        assert!(order.contains(&"other".to_owned()));
        assert!(!order.contains(&"above".to_owned()));
        assert!(events.contains(&Event::DependencyFailed {
            drv: above.clone(),
            dependency: bad.clone()
        }));

        // Without keep-going nothing new starts after the failure.
        let (r, _, order, _) = run(&s, &roots, 1, false, &["bad"]);
        assert!(!r.success());
        let pos = order.iter().position(|n| n == "bad").expect("bad ran");
        assert_eq!(
            pos,
            order.len() - 1,
            "nothing started after the failure: {order:?}"
        );
        if !order.contains(&"other".to_owned()) {
            assert_eq!(r.not_started, vec![other]);
        }
    }

    #[test]
    fn derivations_with_valid_outputs_are_not_scheduled() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path());
        let root = add(&s, "root", &[]);
        let top = add(&s, "top", &[&root]);
        let root_out = s.derivation_outputs(&root).expect("outputs")["out"].clone();
        // Register root's output as if it had been built.
        let info = crate::store::ValidPathInfo {
            path: root_out,
            deriver: Some(root.clone()),
            nar_hash: crate::store::HashAlgo::Sha256.digest(b""),
            nar_size: 1,
            references: BTreeSet::new(),
            registration_time: 1,
            ultimate: true,
            signatures: BTreeSet::new(),
            ca: None,
        };
        s.registry().register_many(&[info]).expect("register");
        let (r, events, order, _) = run(&s, &[top, root], 2, false, &[]);
        assert!(r.success());
        assert_eq!(order, vec!["top".to_owned()]);
        assert_eq!(events[0], Event::Planned { to_build: 1 });
        assert_eq!(r.outputs.len(), 2);
    }
}
