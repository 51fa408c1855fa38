//! Realising derivations: from `.drv` paths to valid outputs, built here
//! in the sandbox or on a build machine.
//!
//! - [`graph`]: loads the closure of the requested derivations that still
//!   has outputs to build, and schedules it: dependency order, up to `jobs`
//!   builds at once (one thread each), Nix's `--keep-going` semantics. The
//!   caller's thread schedules and receives every [`Event`].
//! - [`local`]: one build whose inputs are valid: under the outputs' locks,
//!   lease a build user, run the sandbox, check and copy the outputs into
//!   the store, scan their references, check fixed-output hashes and the
//!   derivation's output checks, register them all in one transaction.
//! - [`attrs`]: what a derivation's attributes add to a local build:
//!   references graphs, structured attributes (`.attrs.json`,
//!   `.attrs.sh`), and the output checks run before registration.
//! - [`somewhere`]: the one failover policy of `sandoff build` and the
//!   hook: place, build on a machine, on the machine's fault place again,
//!   else build here.
//! - [`enter`]: a failed build's sandbox saved with its kept directory, and
//!   set up again around a shell (`sandoff enter`).
//! - [`check`]: `--check`, building valid outputs again and comparing.
//! - [`log`]: where build logs are kept, per kind of store, and
//!   `--max-log-size`.
//! - [`error`]: [`BuildError`], one derivation around what went wrong, and
//!   [`GraphError`] for what stops a whole graph.
//!
//! # Choices
//!
//! - Per-output locks are Nix's `<output>.lock` files, taken by the worker
//!   thread (first without waiting, then, after a [`Event::WaitingForLock`],
//!   blocking); once held, validity is checked again, so a derivation that
//!   another process built meanwhile is reused, not rebuilt.
//! - Outputs are not renamed out of the build's scratch store: each is copied
//!   into a staging path of the real store through its NAR (as Nix does for
//!   fixed outputs since CVE-2024-27297, here for all). No file the builder
//!   could still hold open, and no hard link it made, reaches the store; the
//!   build directories may live on any filesystem. Before the copy every
//!   file must be owned by the build user, which refuses hard links to files
//!   the build does not own (`ln /etc/shadow $out`), as Nix's
//!   "invalid ownership" check.
//! - Logs: `<state>/log/<drv base name>`, plain text, written as the build
//!   streams; on a Nix or Guix daemon's store, the daemon's own
//!   `<log dir>/drvs/<2 chars>/<rest>.bz2`, so that `nix-store -l` reads
//!   it ([`log`]). `--max-log-size` kills a build whose log passes it.
//! - Build directories: one set per build user,
//!   `<state>/builds/uid-<uid>/sandoff-build` ([`crate::sandbox::HostDirs`]),
//!   used under the user's lease and emptied after each build rather than
//!   made and removed (six directories and a lock file a build, which on
//!   ext4 without a journal slowed every later file creation for a
//!   minute). `--keep-failed` moves the set to `<state>/builds/kept-XXXXXX`,
//!   with the build's sandbox saved in it for `sandoff enter` ([`enter`]).
//! - A crash (`kill -9`) leaves no valid output. At worst it leaves an
//!   unregistered path at an output's place, which the next build replaces
//!   under the lock; a staging copy, removed when the next [`realise`]
//!   starts; and files in its user's build directories, emptied then if the
//!   user is free, else by the user's next build. (Directories of earlier
//!   versions, `<state>/builds/<random>` with a free `<random>.lock` a minute
//!   old, are removed then too.)
//! - Where a derivation is built is asked of [`crate::decide`] for each one
//!   that has to be built (the local system and extra platforms, features,
//!   local-build, machines), through the offloader when there are machines
//!   (which sees their true slots and backoff); without machines a remote
//!   or postponed decision fails the build, saying so. Content-addressed
//!   (floating, impure) outputs are refused with a clear error: sandoff
//!   does not implement them.
//! - Built-in builders: `builtin:fetchurl` is run, as in Nix 2.8, by
//!   sandoff itself (no program of the derivation's) under the build user,
//!   here outside the chroot (Nix with `sandbox = true` runs it in the
//!   fixed-output chroot; see [`fetchurl`] for why that is safe and what it
//!   refuses), its output then checked and registered as any fixed output;
//!   every other `builtin:NAME` is refused, naming it.

pub mod attrs;
pub mod check;
pub mod enter;
pub mod error;
pub mod fetchurl;
pub mod graph;
pub mod local;
pub mod log;
pub mod slots;
pub mod somewhere;
pub mod timings;

use std::path::PathBuf;
use std::time::Duration;

use crate::sandbox::{Limits, ResourceUsage};
use crate::store::{StoreLocation, StorePath};

pub use error::{BuildError, BuildErrorKind, GraphError};
pub use graph::{realise, Realisation};
pub use local::BuildContext;
pub use log::log_path;

/// What happened during [`realise`], in order, delivered on the caller's thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The graph is loaded: this many derivations need building.
    Planned {
        /// How many.
        to_build: usize,
    },
    /// A worker started on `drv`.
    Started {
        /// The derivation.
        drv: StorePath,
    },
    /// Another process holds an output lock of `drv`; the worker waits.
    WaitingForLock {
        /// The derivation.
        drv: StorePath,
    },
    /// A line of `drv`'s build log (only with [`Options::stream_logs`]),
    /// without its newline.
    Log {
        /// The derivation.
        drv: StorePath,
        /// The line's bytes.
        line: Vec<u8>,
    },
    /// Where the time of realising `drv` went ([`timings`]), sent after
    /// every attempt that took its locks and found it to build.
    Timings {
        /// The derivation.
        drv: StorePath,
        /// Its steps' times.
        times: timings::StepTimes,
    },
    /// `drv` was built; its outputs are valid.
    Built {
        /// The derivation.
        drv: StorePath,
        /// How long the whole step took (locks, build, registration).
        elapsed: Duration,
    },
    /// Another process built `drv` while we waited for its locks.
    Reused {
        /// The derivation.
        drv: StorePath,
    },
    /// `drv` failed.
    Failed {
        /// The derivation.
        drv: StorePath,
        /// Why, one line.
        error: String,
    },
    /// `drv` was not built because a dependency failed (`--keep-going`).
    DependencyFailed {
        /// The derivation.
        drv: StorePath,
        /// The failed dependency.
        dependency: StorePath,
    },
    /// A machine was refused for a reason that may be an attack (a host
    /// key that does not match, a refused login); the build is placed
    /// again, and may still succeed elsewhere.
    Warning {
        /// The derivation being placed.
        drv: StorePath,
        /// The machine.
        machine: String,
        /// Why, naming both keys for a host key mismatch.
        message: String,
    },
    /// What the local build of `drv` used (when measured: see
    /// [`crate::sandbox::cgroup`]); sent before its `Built` or `Failed`.
    Usage {
        /// The derivation.
        drv: StorePath,
        /// CPU time and peak memory, as far as known.
        usage: ResourceUsage,
    },
    /// The builder of `drv` ended; its outputs are being checked and
    /// registered. Its job slot is free from here: as Nix, which frees the
    /// slot when the builder exits, before it registers the outputs.
    BuilderExited {
        /// The derivation.
        drv: StorePath,
    },
    /// Nothing happened for a while; lets a progress line update its clock.
    Tick,
}

/// How builds are run.
#[derive(Clone, Debug)]
pub struct Options {
    /// At most this many builds at once (at least 1).
    pub jobs: usize,
    /// Keep building what does not depend on a failure.
    pub keep_going: bool,
    /// Keep the build directory of a failed build.
    pub keep_failed: bool,
    /// Kill a build after this long without log output.
    pub max_silent: Option<Duration>,
    /// Kill a build after this long.
    pub timeout: Option<Duration>,
    /// `NIX_BUILD_CORES`.
    pub cores: u32,
    /// Send every log line as an [`Event::Log`].
    pub stream_logs: bool,
    /// Resource bounds of each local build (`/tmp` and `/dev/shm` sizes,
    /// process limit).
    pub limits: Limits,
    /// Variables a fixed-output build may get through `impureEnvVars`
    /// besides [`crate::sandbox::plan::DEFAULT_IMPURE_ENV_ALLOW`] (names,
    /// or prefixes ending in `*`; `SANDOFF_*` never passes).
    pub impure_env_allow: Vec<String>,
    /// Build machines substitute the inputs they lack before any is sent
    /// (Nix's `builders-use-substitutes`).
    pub builders_use_substitutes: bool,
    /// Kill a build whose log passes this many bytes (`--max-log-size`;
    /// `None`: no limit).
    pub max_log_size: Option<u64>,
    /// `--check`: build the requested derivations again though their
    /// outputs are valid, and fail if the result differs ([`check`]).
    pub check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            jobs: 1,
            keep_going: false,
            keep_failed: false,
            max_silent: None,
            timeout: None,
            cores: 1,
            stream_logs: false,
            limits: Limits::default(),
            impure_env_allow: Vec::new(),
            builders_use_substitutes: false,
            max_log_size: None,
            check: false,
        }
    }
}

/// Where build directories are created: `<state>/builds`.
pub fn builds_dir(loc: &StoreLocation) -> PathBuf {
    loc.state.join("builds")
}
