//! The local build sandbox: from a build's plain data to "the builder ran in
//! a sandbox and exited with status X, its log streamed".
//!
//! - [`plan`] (pure): [`SandboxSpec`] → [`SandboxPlan`], the declarative list of
//!   setup steps, the argv and the environment exactly as Nix sets them.
//! - [`syscall`]: the [`Syscall`] trait every setup step goes through;
//!   `recording` (compiled for tests only) a fake that records the calls; `linux` holds the real calls and the
//!   only fork (the only `unsafe` of the sandbox).
//! - [`exec`]: clones the child into new mount, PID, network (unless
//!   fixed-output), IPC and UTS namespaces; the child runs the steps and
//!   execs, or reports the failing step and exits (fail closed); the parent
//!   streams the log and enforces `--max-silent-time` and `--timeout`.
//! - [`interactive`]: a build's sandbox again with a shell or command in
//!   place of its builder, on a fresh pty proxied to the user's terminal
//!   (`sandoff enter`).
//! - [`seccomp`]: the builder's seccomp filter (Nix's: no setuid/setgid
//!   `chmod`, no xattrs), a hand-written BPF program checked by an interpreter.
//! - [`cgroup`]: each build in a cgroup of its own when cgroup v2 is
//!   usable (kill everything at once; CPU time and peak memory).
//! - [`users`]: the build-user pool (flock per uid) and killing a uid's
//!   processes; [`host`]: the per-build host directories; [`setup`]:
//!   `sandoff setup`.
//!
//! A build, in order:
//! 1. lease a user ([`UserPool::acquire`]);
//! 2. create [`HostDirs`], fill a [`SandboxSpec`];
//! 3. [`run_build`]: plan, kill the user's processes, [`exec::run`], kill
//!    them again;
//! 4. (not here) check, canonicalise, scan and register the outputs found
//!    at [`SandboxPlan::outputs`], then delete the directories.
//!
//! # Choices, against Nix 2.8 and Guix
//!
//! - No user namespace: the builder runs as the real build uid (as Nix
//!   without user namespaces, and Guix); `/etc/passwd` names it `nixbld`.
//! - Stricter than Nix: inputs are bound read-only, `nosuid`, `nodev` (Nix
//!   relies on file modes); the root is a tmpfs remounted read-only; `/proc`
//!   is `nosuid,nodev,noexec` with `sys`, `sysrq-trigger`, `irq`, `bus`
//!   read-only (as bubblewrap); the bounding, ambient and inheritable
//!   capability sets are cleared explicitly.
//! - The log is a pipe (as Guix), not a pty (as Nix).
//! - Fixed-output builds share the host network namespace, as Nix: their
//!   outputs must be copied before registration (CVE-2024-27297), which is
//!   the registration step's job.
//! - The parent-death signal is armed first thing in the child; if sandoff
//!   dies in the instants before that, the build runs unsupervised until the
//!   next build of that user kills it.
//! - Kernel keyrings, which are not namespaced: each build joins a fresh
//!   anonymous session keyring (as the build user, so the caller's session
//!   keyring is not its own), and the seccomp filter refuses `add_key`,
//!   `request_key` and `keyctl` on every ABI, as Docker and Flatpak do, so
//!   nothing can be created in or read from the build user's keyrings and
//!   nothing survives into the next build of that uid. The errno is
//!   `ENOSYS`, not Docker's `EPERM`: it reads as a kernel built without
//!   `CONFIG_KEYS`, which programs and test suites handle as an ordinary
//!   configuration, where `EPERM` makes them fail (see [`seccomp`]).
//! - Resource bounds, defaults a build farm can live with and the caller
//!   can raise ([`plan::Limits`]): `/tmp` is a tmpfs of a quarter of
//!   memory and `/dev/shm` one of 256 MiB (unbounded, each would be half
//!   of memory); `RLIMIT_NPROC` of the build user is 8192 (each build has
//!   its own uid, so this bounds one build); a fixed-output build gets only
//!   the `impureEnvVars` of [`plan::DEFAULT_IMPURE_ENV_ALLOW`] plus what the
//!   caller allows, never `SANDOFF_*` ([`plan::impure_env_allowed`]).
//! - Time limits saturate: a limit past what the clock can represent (a
//!   serve client or daemon sends `u64::MAX` seconds for "forever") is no
//!   limit, rather than refused, so such clients work as they do with Nix.
//! - A panic in the supervising thread never leaves the build behind:
//!   [`exec::KillOnDrop`] kills the builder's PID namespace and `run_build`
//!   the build user's processes while unwinding; callers re-raise the panic
//!   so the process exits non-zero. This needs `panic = "unwind"` (the
//!   default, kept in `Cargo.toml`); with `abort` the parent-death signal
//!   would still kill the builder, but nothing would clean up.
//! - Capabilities are dropped in the child with raw `prctl` and `capset`
//!   (`linux`), not with the `caps` crate that the tests use to read them:
//!   after `clone` in a multi-threaded process only async-signal-safe code
//!   may run, since another thread may have held the allocator's or any
//!   other lock at the instant of the clone and the child would wait on it
//!   forever; `caps` allocates (its sets are `HashSet`s) and returns
//!   errors that format strings. The raw calls touch only the stack.
//! - The child holds every fd of the parent until `execve` (close-on-exec):
//!   a file being written by another thread while a sandbox is being set up
//!   cannot be executed (`ETXTBSY`) until that sandbox has exec'd.

pub mod cgroup;
pub mod exec;
pub mod host;
pub mod interactive;
mod linux;
mod netns;
pub mod plan;
#[cfg(test)]
mod recording;
pub mod seccomp;
pub mod setup;
pub mod syscall;
pub mod users;

use std::io::Write;
use std::path::PathBuf;

pub use cgroup::ResourceUsage;
pub use exec::{BuildOutcome, TimeoutKind};
pub use host::HostDirs;
pub use interactive::run_interactive;
pub use plan::{
    BuildUser, InputPath, Interactive, InteractiveStdio, Limits, SandboxDirs, SandboxPlan,
    SandboxSpec, SetupOp, Timeouts, TmpfsSize,
};
pub use syscall::Syscall;
pub use users::{UserError, UserLease, UserPool};

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec cannot be turned into a sandbox.
    #[error("invalid sandbox spec: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A setup step failed in the child; the builder did not run.
    #[error("sandbox setup failed at step {step} ({op}): {source}")]
    SetupFailed {
        /// The step's index in [`SandboxPlan::ops`].
        step: usize,
        /// The step.
        op: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// Starting or supervising the child failed.
    #[error("cannot {action}: {source}")]
    Spawn {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the build log to the caller's sink failed (the build is killed).
    #[error("cannot write the build log: {source}")]
    Log {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Preparing or removing host directories failed.
    #[error("cannot {action} {path}: {source}")]
    HostDir {
        /// What was being done.
        action: &'static str,
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The build-user pool failed.
    #[error(transparent)]
    Users(#[from] UserError),
    /// The build failed and so did the cleanup after it; both are kept.
    #[error("{error} (and then: {cleanup})")]
    WithCleanup {
        /// The build's error.
        error: Box<SandboxError>,
        /// The cleanup's error.
        cleanup: UserError,
    },
}

/// Plans and runs one build as `lease`'s user, killing that user's processes
/// before and after (so nothing survives the build to change its outputs).
pub fn run_build(
    lease: &UserLease,
    spec: &SandboxSpec,
    log: &mut dyn Write,
) -> Result<BuildOutcome, SandboxError> {
    run_build_measured(lease, spec, log).map(|(outcome, _)| outcome)
}

/// [`run_build`] in a cgroup of its own when cgroup v2 is usable
/// ([`cgroup`]): everything the build started is killed when the builder
/// has exited, and what it used is returned (from the cgroup, else as
/// `wait4` saw the builder; `None`: neither measured it).
pub fn run_build_measured(
    lease: &UserLease,
    spec: &SandboxSpec,
    log: &mut dyn Write,
) -> Result<(BuildOutcome, Option<ResourceUsage>), SandboxError> {
    plan_and_run(lease, spec, log, true)
}

/// [`run_build_measured`] for a caller that killed the user's processes
/// itself ([`UserLease::kill_processes`]) after taking the lease, as a
/// build does before it waits for a job slot: only root can start a
/// process as a build user meanwhile, so they are not killed again here,
/// where the next builder waits for it.
pub fn run_build_measured_killed(
    lease: &UserLease,
    spec: &SandboxSpec,
    log: &mut dyn Write,
) -> Result<(BuildOutcome, Option<ResourceUsage>), SandboxError> {
    plan_and_run(lease, spec, log, false)
}

/// Plans `spec` and runs it with [`with_user`].
fn plan_and_run(
    lease: &UserLease,
    spec: &SandboxSpec,
    log: &mut dyn Write,
    kill_first: bool,
) -> Result<(BuildOutcome, Option<ResourceUsage>), SandboxError> {
    let mut plan = plan::plan(spec)?;
    with_user(lease, spec, &mut plan, kill_first, |plan| {
        exec::run_measured(plan, log)
    })
}

/// Runs `run` (which runs `plan`, a planned sandbox, to its end, and may
/// report what the builder used) as `lease`'s user, the spec's, in a
/// cgroup of its own when cgroup v2 is usable, killing that user's
/// processes before (if `kill_first`), and after unless the cgroup was
/// killed and removed; returns what the build used as far as the cgroup or
/// `run` measured it.
fn with_user(
    lease: &UserLease,
    spec: &SandboxSpec,
    plan: &mut SandboxPlan,
    kill_first: bool,
    run: impl FnOnce(&SandboxPlan) -> Result<(BuildOutcome, Option<ResourceUsage>), SandboxError>,
) -> Result<(BuildOutcome, Option<ResourceUsage>), SandboxError> {
    if &spec.user != lease.user() {
        return Err(SandboxError::InvalidSpec {
            field: "user",
            reason: format!(
                "spec runs as '{}' but the lease is for '{}'",
                spec.user.user_name(),
                lease.user().user_name()
            ),
        });
    }
    // Dropped on every way out (a panic too): kills what is left, removes it.
    let cgroup = cgroup::BuildCgroup::create(lease.user().uid());
    if let Some(cg) = &cgroup {
        plan.cgroup = Some(cg.dir().to_path_buf());
    }
    if kill_first {
        lease.kill_processes()?;
    }
    // A panic while the build runs must not leave the user's processes
    // behind either (exec::run kills the builder's PID namespace itself).
    let guard = KillUserOnUnwind(Some(lease));
    let result = run(plan);
    guard.disarm();
    // The cgroup's figures cover every process of the build (daemons too);
    // what wait4 saw of the builder fills in what the cgroup cannot give.
    let (measured, killed_in_cgroup) = match cgroup.map(cgroup::BuildCgroup::close) {
        Some((usage, gone)) => (Some(usage), gone),
        None => (None, false),
    };
    let result = result.map(|(outcome, reaped)| {
        let usage = match (measured, reaped) {
            (Some(m), Some(r)) => Some(ResourceUsage {
                cpu: m.cpu.or(r.cpu),
                peak_memory: m.peak_memory.or(r.peak_memory),
            }),
            (m, r) => m.or(r),
        };
        (outcome, usage)
    });
    // The cgroup held every process of the build (each was cloned into it,
    // and a build user can write to no cgroup.procs) and is killed: killing
    // the uid's processes once more would only cost a fork. Without one,
    // the uid is all there is to go by (Nix's killUser).
    let after = if killed_in_cgroup {
        Ok(())
    } else {
        lease.kill_processes()
    };
    match (result, after) {
        (r, Ok(())) => r,
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(error), Err(cleanup)) => Err(SandboxError::WithCleanup {
            error: Box::new(error),
            cleanup,
        }),
    }
}

/// Kills a build user's processes when dropped armed (while unwinding from
/// a panic during the build).
struct KillUserOnUnwind<'a>(Option<&'a UserLease>);

impl KillUserOnUnwind<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillUserOnUnwind<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            if let Err(e) = lease.kill_processes() {
                tracing::error!("after a panic during the build: {e}");
            }
        }
    }
}
