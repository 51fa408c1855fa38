//! One local build: a derivation whose inputs are all valid becomes valid
//! outputs, or nothing at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use super::attrs;
use super::check::{compare_outputs, decide_here, Mode};
use super::fetchurl::{self, FetchRequest, FetchurlError};
pub use super::log::LogSink;
use super::slots::JobSlots;
use super::somewhere::{build_somewhere, Progress, Somewhere, SomewhereError};
use super::timings::{Step, Timings};
use super::{builds_dir, log_path, BuildError, BuildErrorKind, Event, Options};
use crate::decide::{Decision, Placement};
use crate::derivation::{Derivation, DerivationKind, DerivationOutput};
use crate::remote::offloader::{LocalPermit, Offloader, RemoteJob};
use crate::sandbox::plan::{impure_env_allowed, DEFAULT_BUILD_DIR_NAME};
use crate::sandbox::{
    run_build_measured_killed, HostDirs, InputPath, SandboxSpec, Timeouts, UserError, UserLease,
    UserPool,
};
use crate::serve_protocol::BuildOptions;
use crate::store::local::{LocalStore, PathLocks, StagedPath};
use crate::store::refscan;
use crate::store::{ContentAddress, FileIngestionMethod, HashAlgo, StorePath, ValidPathInfo};

/// How often a build waiting for a free build user checks again.
const USER_POLL: Duration = Duration::from_millis(500);

/// What builds need: the store, the build users, the options.
pub struct BuildContext<'a> {
    /// The store the outputs go to.
    pub store: &'a LocalStore,
    /// The build users, or why there are none: then only derivations whose
    /// outputs are valid already can be realised (as Nix, which needs no
    /// build user when there is nothing to build).
    pub pool: Result<&'a UserPool, Arc<UserError>>,
    /// How to build.
    pub options: Options,
    /// Where each derivation may be built: asked for every derivation that
    /// has to be built, as every caller must (one decision module).
    pub placement: &'a Placement,
    /// The build machines, when builds may be offloaded: then `placement`
    /// is asked through it, with the machines' true slots and backoff, and
    /// it limits local builds to `options.jobs`.
    pub offload: Option<&'a Offloader>,
}

/// How [`realise_one`] ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// Built here.
    Built,
    /// Built by another process while this one waited for the locks.
    Reused,
    /// Prepared, but not started: the graph stopped while it waited for a
    /// job slot ([`JobSlots::close`]).
    NotStarted,
}

/// Realises `drv` (at `drv_path`), whose inputs are valid: takes the locks of
/// its outputs (reporting [`Event::WaitingForLock`] on `events` if another
/// process holds one), returns [`StepOutcome::Reused`] if they are valid by
/// then, else builds it. The log goes to [`log_path`].
pub fn realise_one(
    ctx: &BuildContext<'_>,
    drv_path: &StorePath,
    drv: &Derivation,
    events: &Sender<Event>,
) -> Result<StepOutcome, BuildError> {
    realise_one_here(ctx, drv_path, drv, Mode::Build, None, events)
        .map_err(|kind| BuildError::new(&ctx.store.location().dir, drv_path, kind))
}

/// [`realise_one`] (or [`check_one`] when `check`) for a graph without
/// machines: the build is prepared, then waits for one of `slots` before
/// its builder starts, and reports [`Event::Started`] once it has it.
pub(super) fn realise_step(
    ctx: &BuildContext<'_>,
    drv_path: &StorePath,
    drv: &Derivation,
    check: bool,
    slots: &JobSlots,
    events: &Sender<Event>,
) -> Result<StepOutcome, BuildError> {
    let mode = if check { Mode::Check } else { Mode::Build };
    realise_one_here(ctx, drv_path, drv, mode, Some(slots), events)
        .map_err(|kind| BuildError::new(&ctx.store.location().dir, drv_path, kind))
}

/// Builds `drv` (at `drv_path`), whose outputs must all be valid, here
/// once more and compares the results with them (`--check`, see
/// [`super::check`]); nothing registered changes. [`StepOutcome::Built`]:
/// bit-identical.
pub fn check_one(
    ctx: &BuildContext<'_>,
    drv_path: &StorePath,
    drv: &Derivation,
    events: &Sender<Event>,
) -> Result<StepOutcome, BuildError> {
    realise_one_here(ctx, drv_path, drv, Mode::Check, None, events)
        .map_err(|kind| BuildError::new(&ctx.store.location().dir, drv_path, kind))
}

/// [`realise_one`] or [`check_one`], its failure without the derivation it
/// is about.
fn realise_one_here(
    ctx: &BuildContext<'_>,
    drv_path: &StorePath,
    drv: &Derivation,
    mode: Mode,
    slots: Option<&JobSlots>,
    events: &Sender<Event>,
) -> Result<StepOutcome, BuildErrorKind> {
    let store = ctx.store;
    let mut t = Timings::start();
    let outputs: BTreeSet<StorePath> = drv.output_paths().into_values().collect();
    let locks = match store.try_lock_paths(&outputs)? {
        Some(l) => l,
        None => {
            let _ = events.send(Event::WaitingForLock {
                drv: drv_path.clone(),
            });
            store.lock_paths(&outputs)?
        }
    };
    let mut all_valid = true;
    for o in &outputs {
        all_valid &= store.is_valid(o)?;
    }
    match mode {
        Mode::Build if all_valid => return Ok(StepOutcome::Reused),
        Mode::Check if !all_valid => return Err(BuildErrorKind::CheckInvalid),
        _ => {}
    }
    t.lap(Step::Lock);
    let path = log_path(store.location(), drv_path);
    let mut log = LogSink::create(
        &path,
        ctx.options
            .stream_logs
            .then(|| (events.clone(), drv_path.clone())),
    )?;
    t.lap(Step::Log);
    let r = build_somewhere_locked(
        ctx, drv_path, drv, &locks, mode, slots, &mut log, events, &mut t,
    );
    log.finish();
    t.lap(Step::Cleanup);
    if !matches!(r, Ok(StepOutcome::NotStarted)) {
        let _ = events.send(Event::Timings {
            drv: drv_path.clone(),
            times: t.times().clone(),
        });
    }
    r
}

/// Builds `drv` under `locks` (which must cover its outputs), here or on a
/// machine, and registers its outputs; see the module docs of
/// [`crate::build`]. Warnings about machines go to `events`. The failure
/// leaves out the derivation it is about: [`realise_one`] adds it. Each
/// step's time is charged to `t`. A local build takes one of `slots`, if
/// given, once it is ready to run its builder.
#[allow(clippy::too_many_arguments)]
fn build_somewhere_locked(
    ctx: &BuildContext<'_>,
    drv_path: &StorePath,
    drv: &Derivation,
    locks: &PathLocks,
    mode: Mode,
    slots: Option<&JobSlots>,
    log: &mut LogSink,
    events: &Sender<Event>,
    t: &mut Timings,
) -> Result<StepOutcome, BuildErrorKind> {
    let store = ctx.store;
    let loc = store.location();
    let drv_name = loc.logical(drv_path);
    let unsupported = |reason: &str| BuildErrorKind::Unsupported {
        reason: reason.to_owned(),
    };
    let kind = drv.kind().map_err(BuildErrorKind::Derivation)?;
    match kind {
        DerivationKind::InputAddressed { deferred: false } | DerivationKind::Fixed => {}
        DerivationKind::InputAddressed { deferred: true } => {
            return Err(unsupported("its output paths are not computed (deferred)"))
        }
        DerivationKind::Floating => return Err(unsupported("floating content-addressed outputs")),
        DerivationKind::Impure => return Err(unsupported("impure outputs")),
    }
    let outputs = drv.output_paths();

    let inputs = input_paths(store, drv)?;
    t.lap(Step::Inputs);
    // Held until the builder exits, so that at most `jobs` run here.
    // A check is built here: a machine would register what it built.
    let offload = ctx.offload.filter(|_| mode == Mode::Build);
    let permit = match offload {
        None => {
            let decision = match mode {
                Mode::Build => ctx.placement.decide(drv),
                Mode::Check => decide_here(ctx.placement, drv),
            };
            match decision {
                Decision::Local { reason } => {
                    tracing::debug!(drv = %drv_name, %reason, "building locally");
                }
                Decision::Fail { reason } => return Err(unsupported(&reason)),
                other => {
                    // Only a caller without machines passes no offloader.
                    return Err(unsupported(&format!(
                        "the decision is '{other}', but this run has no build machines"
                    )));
                }
            }
            None
        }
        Some(off) => {
            match place_or_offload(ctx, off, drv_path, drv, &inputs, locks, log, events)? {
                Some(permit) => Some(permit),
                None => return Ok(StepOutcome::Built),
            }
        }
    };
    t.lap(Step::Place);
    // A built-in builder is checked before a build user is taken.
    let builtin = if drv.builder.starts_with(b"builtin:") {
        Some(FetchRequest::from_derivation(drv).map_err(BuildErrorKind::Builtin)?)
    } else {
        None
    };
    let mut closure = store.closure(&inputs)?;
    let prepared = attrs::prepare(store, drv, &closure, &sandbox_build_dir())?;
    closure.extend(prepared.extra_inputs.iter().cloned());
    t.lap(Step::Inputs);

    let pool = ctx
        .pool
        .as_ref()
        .map_err(|e| BuildErrorKind::NoUsers(Arc::clone(e)))?;
    let lease = pool.acquire(USER_POLL).map_err(BuildErrorKind::Users)?;
    // Nothing of the user may run while its directories are emptied for
    // this build, nor once it starts: killed now, not after the wait for a
    // job slot (see `run_build_measured_killed`).
    lease.kill_processes().map_err(BuildErrorKind::Users)?;
    t.lap(Step::User);
    let dirs =
        HostDirs::for_user(&builds_dir(loc), lease.user()).map_err(BuildErrorKind::Sandbox)?;
    let user = lease.user();
    attrs::write_files(&dirs.dirs().build, &prepared.files, user.uid(), user.gid())?;
    t.lap(Step::Dirs);
    let fixed = kind == DerivationKind::Fixed;
    let impure = if fixed {
        impure_env(drv, &ctx.options.impure_env_allow)
    } else {
        BTreeMap::new()
    };
    let timeouts = Timeouts {
        max_silent: ctx.options.max_silent,
        total: ctx.options.timeout,
    };
    // Kept with a failed build's directory for `sandoff enter`.
    let spec = SandboxSpec {
        store_dir: loc.dir.clone(),
        builder: drv.builder.clone(),
        args: prepared.args.clone(),
        env: prepared.env.clone(),
        inputs: closure
            .iter()
            .map(|p| InputPath {
                source: loc.real_path(p),
                path: p.clone(),
            })
            .collect(),
        outputs: outputs.values().cloned().collect(),
        dirs: dirs.dirs().clone(),
        build_dir_name: DEFAULT_BUILD_DIR_NAME.to_owned(),
        user: lease.user().clone(),
        fixed_output: fixed,
        impure_env: impure.clone(),
        impure_env_allow: ctx.options.impure_env_allow.clone(),
        limits: ctx.options.limits,
        cores: ctx.options.cores,
        timeouts,
    };
    // Prepared: in a graph without machines, the builder waits for a job
    // slot here (see [`super::slots`]); with machines the permit is it.
    let job_slot = match slots {
        Some(slots) if permit.is_none() => match slots.acquire() {
            Some(slot) => {
                let _ = events.send(Event::Started {
                    drv: drv_path.clone(),
                });
                Some(slot)
            }
            // The graph stopped: the drops remove what was prepared.
            None => return Ok(StepOutcome::NotStarted),
        },
        _ => None,
    };
    t.lap(Step::Place);
    log.set_limit(ctx.options.max_log_size);
    let ran = match &builtin {
        Some(request) => run_fetchurl(request, &lease, &dirs, drv, &impure, timeouts, log),
        None => {
            tracing::debug!(drv = %drv_name, user = lease.user().user_name(), "building");
            run_build_measured_killed(&lease, &spec, log)
                .map(|(outcome, usage)| {
                    if let Some(usage) = usage {
                        let _ = events.send(Event::Usage {
                            drv: drv_path.clone(),
                            usage,
                        });
                    }
                    outcome
                })
                .map_err(BuildErrorKind::Sandbox)
        }
    };
    t.lap(Step::Sandbox);
    // The builder is gone: its job slot is free for the next build while
    // this one's outputs are checked, registered and its directories
    // removed (Nix frees the slot at the same point, in `buildDone`).
    drop(permit);
    drop(job_slot);
    let _ = events.send(Event::BuilderExited {
        drv: drv_path.clone(),
    });

    // Where a kept directory is is known once it has moved (below).
    let result = match ran {
        Err(_) if log.exceeded().is_some() => Err(BuildErrorKind::LogLimit {
            limit: log.exceeded().unwrap_or_default(),
            kept: None,
        }),
        Err(e) => Err(e),
        Ok(outcome) if !outcome.success() => Err(BuildErrorKind::Failed {
            outcome,
            kept: None,
            tail: log.tail(),
        }),
        Ok(_) => collect_outputs(
            store,
            &drv_name,
            drv_path,
            drv,
            &dirs,
            lease.user().uid(),
            &closure,
            t,
        )
        .and_then(|staged| {
            let r = match mode {
                Mode::Build => {
                    // Nix checks outputs when it builds, not under --check.
                    let infos: Vec<&ValidPathInfo> = staged.iter().map(|(_, info)| info).collect();
                    attrs::check_built_outputs(store, drv, &prepared.checks, &infos).and_then(
                        |()| {
                            store
                                .register_built_outputs(locks, staged)
                                .map_err(Into::into)
                        },
                    )
                }
                Mode::Check => compare_outputs(store, drv_path, staged, ctx.options.keep_failed),
            };
            t.lap(Step::Register);
            r
        }),
    };
    // The lease is still held: no other build can run as this user until the
    // directories are emptied (or moved and chmod'ed out of its reach).
    let result = match result {
        Err(e) if ctx.options.keep_failed => match dirs.keep() {
            Ok(kept) => {
                let top = kept.top().to_path_buf();
                // Root-only until now; 0755 as Nix, for inspection.
                let _ = fs::set_permissions(&top, fs::Permissions::from_mode(0o755));
                // A built-in builder ran no sandbox to enter.
                if builtin.is_none() {
                    let spec = SandboxSpec {
                        dirs: kept.dirs().clone(),
                        ..spec
                    };
                    super::enter::save_or_warn(&top, drv_path, loc, pool, &spec);
                }
                Err(e.kept_at(top))
            }
            Err(keep) => {
                tracing::warn!(drv = %drv_name, "cannot keep the build directory: {keep}");
                Err(e)
            }
        },
        r => {
            if let Err(e) = dirs.clear() {
                tracing::warn!(drv = %drv_name, "cannot empty the build directory: {e}");
            }
            r
        }
    };
    drop(lease);
    result.map(|()| StepOutcome::Built)
}

/// The build directory's path inside the sandbox (see
/// [`crate::sandbox::plan`]), which `NIX_ATTRS_*_FILE` name.
fn sandbox_build_dir() -> String {
    format!("/tmp/{DEFAULT_BUILD_DIR_NAME}")
}

/// Runs `builtin:fetchurl` ([`super::fetchurl`]) as the build user, its
/// output written where a builder's is, in the scratch store of `dirs`.
/// As around a sandboxed build, every process of the user is killed before
/// (nothing left from an earlier build may touch this one's files through
/// the helper) and after (the helper leaves nothing behind).
fn run_fetchurl(
    request: &FetchRequest,
    lease: &UserLease,
    dirs: &HostDirs,
    drv: &Derivation,
    impure: &BTreeMap<Vec<u8>, Vec<u8>>,
    timeouts: Timeouts,
    log: &mut LogSink,
) -> Result<crate::sandbox::BuildOutcome, BuildErrorKind> {
    let out = drv
        .outputs
        .values()
        .find_map(DerivationOutput::path)
        .ok_or(BuildErrorKind::Builtin(FetchurlError::NotFixedOutput))?;
    // The running binary is sandoff's (the CLI, the hook, the serve
    // command); its hidden subcommand is the helper.
    let program = std::env::current_exe().map_err(io_err(
        "find the sandoff binary",
        Path::new("/proc/self/exe"),
    ))?;
    let user = lease.user();
    tracing::debug!(url = %request.urls[0], user = user.user_name(), "builtin:fetchurl");
    let job = fetchurl::FetchJob {
        program: &program,
        request,
        user,
        out_dir: &dirs.dirs().store,
        output: out.base_name(),
        impure_env: impure,
        timeouts,
    };
    lease.kill_processes().map_err(BuildErrorKind::Users)?;
    let ran = fetchurl::run(&job, log).map_err(BuildErrorKind::Builtin);
    let killed = lease.kill_processes().map_err(BuildErrorKind::Users);
    let outcome = ran?;
    killed?;
    Ok(outcome)
}

/// The paths a build of `drv` reads, whose closure it needs: its sources and
/// the used outputs of its input derivations (which must be valid).
pub fn input_paths(
    store: &LocalStore,
    drv: &Derivation,
) -> Result<BTreeSet<StorePath>, BuildErrorKind> {
    let mut inputs = drv.input_sources.clone();
    for (input, names) in &drv.input_derivations {
        let outs = store.derivation_outputs(input)?;
        for name in names {
            let p = outs
                .get(name.as_str())
                .ok_or_else(|| BuildErrorKind::NoSuchOutput {
                    input: store.location().logical(input),
                    output: name.to_string(),
                })?;
            inputs.insert(p.clone());
        }
    }
    Ok(inputs)
}

/// Builds `drv` somewhere ([`build_somewhere`]): remotely (failing over to
/// other machines, or here, while a machine is at fault), or returns the
/// local permit when it is to be built here. `None`: built remotely, its
/// outputs valid here. A machine refused for a reason that may be an attack
/// (a host key that does not match, a refused login) is reported as an
/// [`Event::Warning`] every time, even when the build succeeds elsewhere.
#[allow(clippy::too_many_arguments)]
fn place_or_offload<'o>(
    ctx: &BuildContext<'_>,
    off: &'o Offloader,
    drv_path: &StorePath,
    drv: &Derivation,
    inputs: &BTreeSet<StorePath>,
    locks: &PathLocks,
    log: &mut LogSink,
    events: &Sender<Event>,
) -> Result<Option<LocalPermit<'o>>, BuildErrorKind> {
    let drv_name = ctx.store.location().logical(drv_path);
    let secs = |d: Option<Duration>| d.map_or(0, |d| d.as_secs().max(1));
    let job = RemoteJob {
        store: ctx.store,
        drv_path,
        drv,
        inputs,
        locks,
        options: BuildOptions {
            max_silent_time: secs(ctx.options.max_silent),
            build_timeout: secs(ctx.options.timeout),
            max_log_size: ctx.options.max_log_size.unwrap_or(0),
            keep_failed: ctx.options.keep_failed,
        },
        substitute: ctx.options.builders_use_substitutes,
    };
    let mut progress = |p: Progress<'_>, log: &mut dyn Write| match p {
        Progress::Building { machine } => {
            let _ = writeln!(log, "sandoff: building '{drv_name}' on '{}'", machine.name);
        }
        Progress::MachineFailed { machine, error } => {
            let _ = writeln!(log, "sandoff: {error}; placing the build again");
            if error.is_suspicious() {
                let _ = events.send(Event::Warning {
                    drv: drv_path.clone(),
                    machine: machine.name.to_string(),
                    message: error.to_string(),
                });
            }
        }
    };
    let result = build_somewhere(off, ctx.placement, &job, None, log, &mut progress);
    match result {
        Ok(Somewhere::Here(permit)) => Ok(Some(permit)),
        Ok(Somewhere::Built { .. }) => Ok(None),
        Err(SomewhereError::Placement(e)) => Err(BuildErrorKind::Placement(Box::new(e))),
        Err(SomewhereError::Unplaceable { reason }) => Err(BuildErrorKind::Unsupported { reason }),
        Err(SomewhereError::RemoteFailed { machine, result }) => {
            Err(BuildErrorKind::RemoteFailed {
                machine: machine.to_string(),
                status: result.status,
                message: result.error_msg,
                tail: log.tail(),
            })
        }
        Err(SomewhereError::Offload { machine, source }) => Err(BuildErrorKind::Offload {
            machine: machine.to_string(),
            source,
        }),
    }
}

/// Why leftover build directories could not be removed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} '{}': {source}", path.display())]
pub struct StaleDirsError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn stale_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StaleDirsError + 'a {
    move |source| StaleDirsError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Lock files younger than this are left alone: their creator may not have
/// locked them yet.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Removes the build directories under `builds` left by sandoff processes
/// that died (their lock files are free and older than a minute); returns
/// how many. Running builds and kept directories (`--keep-failed`, which
/// have no lock file) are left alone. Builds no longer make such
/// directories (`<random>` with `<random>.lock`: each now uses its build
/// user's, [`HostDirs::for_user`], which the user's next build empties
/// after a crash), but earlier versions of sandoff did.
pub fn remove_stale_build_dirs(builds: &Path) -> Result<usize, StaleDirsError> {
    let entries = match fs::read_dir(builds) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(stale_err("read directory", builds)(e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(stale_err("read directory", builds))?;
        let lock_path = entry.path();
        if lock_path.extension() != Some(std::ffi::OsStr::new("lock")) {
            continue;
        }
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < STALE_AFTER);
        if young {
            continue;
        }
        let Ok(file) = File::open(&lock_path) else {
            continue;
        };
        let Ok(_lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        let dir = lock_path.with_extension("");
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(stale_err("remove", &dir)(e)),
        }
        fs::remove_file(&lock_path).map_err(stale_err("remove", &lock_path))?;
        tracing::info!(dir = %dir.display(), "removed the build directory of a dead build");
        removed += 1;
    }
    Ok(removed)
}

/// Empties the reusable build directories (`uid-<uid>`, see
/// [`HostDirs::for_user`]) under `builds` that a build killed mid-way left
/// with something in them, for each of `pool`'s users that is free now:
/// so that a crash's files do not wait for the next build of that very
/// user. A user in use is skipped (its build empties its directories);
/// returns how many were emptied.
pub fn clear_free_user_dirs(builds: &Path, pool: &UserPool) -> usize {
    let mut cleared = 0;
    for uid in HostDirs::users_with_leftovers(builds) {
        let Ok(Some(lease)) = pool.try_acquire_uid(uid) else {
            continue;
        };
        match HostDirs::for_user(builds, lease.user()) {
            Ok(dirs) => {
                tracing::info!(dir = %dirs.top().display(), "emptied the build directory of a dead build");
                cleared += 1;
            }
            Err(e) => tracing::warn!("cannot empty the build directory of a dead build: {e}"),
        }
    }
    cleared
}

/// Checks each output the builder made, copies it into a staging path of the
/// store, scans its references and, for a fixed output, checks its hash.
#[allow(clippy::too_many_arguments)]
fn collect_outputs(
    store: &LocalStore,
    drv_name: &str,
    drv_path: &StorePath,
    drv: &Derivation,
    dirs: &HostDirs,
    build_uid: u32,
    closure: &BTreeSet<StorePath>,
    t: &mut Timings,
) -> Result<Vec<(StagedPath, ValidPathInfo)>, BuildErrorKind> {
    let loc = store.location();
    let mut candidates = closure.clone();
    candidates.extend(drv.output_paths().into_values());
    let mut staged_outputs = Vec::new();
    for (name, output) in &drv.outputs {
        let Some(path) = output.path() else {
            continue;
        };
        let scratch = dirs.output(path.base_name());
        match fs::symlink_metadata(&scratch) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BuildErrorKind::MissingOutput {
                    output: name.to_string(),
                    path: loc.logical(path),
                })
            }
            Err(e) => return Err(io_err("read", &scratch)(e)),
        }
        check_owner(&scratch, build_uid)?;
        let staged = store.stage_path(&scratch)?;
        t.lap(Step::Stage);
        let references =
            refscan::scan_path(&staged.tmp, &candidates).map_err(|source| BuildErrorKind::Nar {
                path: staged.tmp.clone(),
                source,
            })?;
        t.lap(Step::Scan);
        let ca = match output {
            DerivationOutput::CAFixed { method, hash, .. } => {
                if let Some(r) = references.iter().find(|r| *r != path) {
                    return Err(BuildErrorKind::FixedReferences {
                        reference: loc.logical(r),
                    });
                }
                let got = fixed_hash(drv_name, &staged, *method, hash.algo())?;
                if &got != hash {
                    return Err(BuildErrorKind::HashMismatch {
                        specified: hash.to_nix32_prefixed(),
                        got: got.to_nix32_prefixed(),
                    });
                }
                Some(ContentAddress::Fixed {
                    method: *method,
                    hash: got,
                })
            }
            _ => None,
        };
        let info = ValidPathInfo {
            path: path.clone(),
            deriver: Some(drv_path.clone()),
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references,
            registration_time: 0,
            ultimate: true,
            signatures: BTreeSet::new(),
            ca,
        };
        staged_outputs.push((staged, info));
    }
    Ok(staged_outputs)
}

/// The hash of a fixed output: of the file's contents (flat, which needs a
/// regular non-executable file, as Nix) or of its NAR (recursive).
fn fixed_hash(
    _drv_name: &str,
    staged: &StagedPath,
    method: FileIngestionMethod,
    algo: HashAlgo,
) -> Result<crate::store::Hash, BuildErrorKind> {
    if method == FileIngestionMethod::Flat {
        let p = &staged.tmp;
        let meta = fs::symlink_metadata(p).map_err(io_err("read", p))?;
        if !meta.is_file() || meta.mode() & 0o100 != 0 {
            return Err(BuildErrorKind::FlatNotRegular {});
        }
    }
    Ok(staged.content_hash(method, algo)?)
}

/// Every file of an output must be a regular file, directory or symlink
/// owned by the build user: a hard link to a file it does not own
/// (`ln /etc/shadow $out/x`) is refused before anything is copied, as Nix's
/// "invalid ownership" check.
fn check_owner(path: &Path, build_uid: u32) -> Result<(), BuildErrorKind> {
    let meta = fs::symlink_metadata(path).map_err(io_err("read", path))?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
        return Err(BuildErrorKind::UnsupportedType {
            path: path.to_owned(),
        });
    }
    if meta.uid() != build_uid {
        return Err(BuildErrorKind::ForeignFile {
            path: path.to_owned(),
            uid: meta.uid(),
            build_uid,
        });
    }
    if ft.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err("read directory", path))? {
            let entry = entry.map_err(io_err("read directory", path))?;
            check_owner(&entry.path(), build_uid)?;
        }
    }
    Ok(())
}

/// The values of the derivation's `impureEnvVars` in our environment (for
/// fixed outputs only, as Nix), of the names allowed by
/// [`impure_env_allowed`] only: a derivation must not be able to ask for
/// sandoff's own settings or any secret of the caller's environment.
fn impure_env(drv: &Derivation, allow: &[String]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    drv.impure_env_vars()
        .into_iter()
        .filter(|n| {
            let ok = impure_env_allowed(n, allow);
            if !ok {
                tracing::warn!(
                    drv = drv.env_name().unwrap_or("?"),
                    var = %String::from_utf8_lossy(n),
                    "impureEnvVars: not passing a variable outside the allowlist (see --impure-env-allow)"
                );
            }
            ok
        })
        .filter_map(|n| {
            let value = std::env::var_os(std::ffi::OsStr::from_bytes(&n))?;
            Some((n, value.as_bytes().to_vec()))
        })
        .collect()
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> BuildErrorKind + 'a {
    move |source| BuildErrorKind::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_not_owned_by_the_build_user() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("out");
        fs::create_dir(&out).expect("mkdir");
        fs::write(out.join("f"), "x").expect("write");
        let me = fs::metadata(&out).expect("stat").uid();
        check_owner(&out, me).expect("all ours");
        let err = check_owner(&out, me + 1).expect_err("not the build user's");
        assert!(
            matches!(&err, BuildErrorKind::ForeignFile { uid, .. } if *uid == me),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_fifos_in_outputs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fifo = tmp.path().join("p");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let me = fs::metadata(tmp.path()).expect("stat").uid();
        let err = check_owner(tmp.path(), me).expect_err("fifo");
        assert!(
            matches!(err, BuildErrorKind::UnsupportedType { .. }),
            "{err:?}"
        );
    }

    fn age(path: &Path) {
        let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
        nix::sys::stat::utimensat(
            None,
            path,
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .expect("utimensat");
    }

    /// A build directory as earlier versions made it: `<random>/` with a
    /// lock file `<random>.lock`, locked while `Some`.
    fn old_slot(
        builds: &Path,
        name: &str,
        locked: bool,
    ) -> (PathBuf, PathBuf, Option<nix::fcntl::Flock<File>>) {
        fs::create_dir_all(builds.join(name).join("sandoff-build-x/build")).expect("mkdir");
        let lock_path = builds.join(format!("{name}.lock"));
        let file = File::create(&lock_path).expect("lock file");
        let lock = locked.then(|| {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| e)
                .expect("lock")
        });
        (builds.join(name), lock_path, lock)
    }

    #[test]
    fn removes_build_dirs_of_dead_builds_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let builds = tmp.path().join("builds");
        let (live_dir, live_lock, _held) = old_slot(&builds, ".tmplive", true);
        age(&live_lock);
        let (dead_dir, dead_lock, _) = old_slot(&builds, ".tmpdead", false);
        age(&dead_lock);
        let (young_dir, _, _) = old_slot(&builds, ".tmpyoung", false);
        // Kept (no lock file), and a build user's reusable set.
        let kept_dir = builds.join("kept-x");
        fs::create_dir_all(kept_dir.join("sandoff-build")).expect("mkdir");
        let user_dir = builds.join("uid-1000");
        fs::create_dir_all(user_dir.join("sandoff-build")).expect("mkdir");

        assert_eq!(remove_stale_build_dirs(&builds).expect("clean"), 1);
        assert!(!dead_dir.exists() && !dead_lock.exists());
        assert!(live_dir.join("sandoff-build-x/build").exists());
        assert!(young_dir.exists(), "too young to be judged");
        assert!(kept_dir.exists() && user_dir.exists());
    }
}
