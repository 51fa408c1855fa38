//! The local build sandbox: from a build's plain data to "the builder ran in
//! a sandbox and exited with status X, its log streamed".
//!
//! - [`plan`] (pure): [`SandboxSpec`] → [`SandboxPlan`], the declarative list of
//!   setup steps, the argv and the environment exactly as Nix sets them.
//! - [`syscall`]: the [`Syscall`] trait every setup step goes through, and a
//!   recording fake for unit tests; `linux` holds the real calls and the
//!   only fork (the only `unsafe` in the crate).
//! - [`exec`]: clones the child into new mount, PID, network (unless
//!   fixed-output), IPC and UTS namespaces; the child runs the steps and
//!   execs, or reports the failing step and exits (fail closed); the parent
//!   streams the log and enforces `--max-silent-time` and `--timeout`.
//! - [`seccomp`]: the builder's seccomp filter (Nix's: no setuid/setgid
//!   `chmod`, no xattrs), a hand-written BPF program checked by an interpreter.
//! - [`users`]: the build-user pool (flock per uid) and killing a uid's
//!   processes; [`host`]: the per-build host directories; [`setup`]:
//!   `sandoff setup`.
//!
//! A build, in order (what [`run_build`] does):
//! 1. lease a user ([`UserPool::acquire`]), kill its processes;
//! 2. create [`HostDirs`], fill a [`SandboxSpec`];
//! 3. [`plan::plan`] and [`exec::run`];
//! 4. kill the user's processes again; then (not here) check, canonicalise,
//!    scan and register the outputs at [`HostDirs::output`] and delete the
//!    directories.

pub mod exec;
pub mod host;
mod linux;
pub mod plan;
pub mod seccomp;
pub mod setup;
pub mod syscall;
pub mod users;

use std::io::Write;
use std::path::PathBuf;

pub use exec::{BuildOutcome, TimeoutKind};
pub use host::HostDirs;
pub use plan::{BuildUser, InputPath, SandboxDirs, SandboxPlan, SandboxSpec, SetupOp, Timeouts};
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
    let plan = plan::plan(spec)?;
    lease.kill_processes()?;
    let result = exec::run(&plan, log);
    match (result, lease.kill_processes()) {
        (r, Ok(())) => r,
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(error), Err(cleanup)) => Err(SandboxError::WithCleanup {
            error: Box::new(error),
            cleanup,
        }),
    }
}
