//! One offloaded build end to end, and the choice of machine with failover.
//!
//! [`Offloader`] is shared by the worker threads of one `sandoff` process.
//! For each derivation to build, [`Offloader::place`] asks
//! [`crate::decide::decide`] with every machine's true state (slots held by
//! any process on this host, backoff) and takes what the decision needs: a
//! slot on the chosen machine, or a local build permit, or waits when the
//! decision is to postpone. [`Offloader::build_on`] then runs the build
//! there:
//!
//! 1. reuse an idle connection to the machine, or connect (SSH, host key
//!    verified), agree on the store directory (see
//!    [`remote_command`](crate::remote::ssh::remote_command)) and start its
//!    serve program;
//! 2. ask which paths of the input closure it lacks, and send those in one
//!    export stream, dependencies first, each signed with this machine's key;
//! 3. `BuildDerivation` with the input closure, the same max-silent-time and
//!    timeout, the remote log copied into the local log as it comes;
//! 4. fetch the outputs' infos, refuse any output without a valid signature
//!    by a trusted key, fetch their NARs, check them against the signed
//!    hashes, and register all outputs in one transaction.
//!
//! Failures are classified ([`OffloadError::retry_elsewhere`]): the
//! machine could not be reached, refused us, has another store directory,
//! or the link died — the machine
//! goes into backoff and the derivation is placed again (another machine,
//! or local); the build itself failed there, or its outputs were refused —
//! the build fails, with the remote log.
//!
//! The files: `placement` (the decision, slots, permits, load, backoff),
//! `pool` (connections kept between builds), `build` (one build on a
//! machine, steps 1 to 4) and `admin` (`machines status`, `machines test`,
//! `copy --to`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backoff::{Backoff, BackoffError};
use super::client::ClientError;
use super::slots::{Slot, SlotDir, SlotError};
use super::ssh::{ProbeError, SshError, SshOptions};
use crate::decide::{Machine, MachineName};
use crate::derivation::Derivation;
use crate::serve_protocol::{BuildOptions, BuildResult, StoreDirMismatch};
use crate::store::export::ExportError;
use crate::store::keyring::{Keyring, KeyringError};
use crate::store::local::{LocalStore, PathLocks, StoreError};
use crate::store::signature::{SecretKey, TrustedKeys};
use crate::store::{StoreDir, StoreLocation, StorePath};

/// How long a postponed placement waits before asking again when no slot
/// of this process was released (slots of other processes are not
/// signalled).
const RECHECK: Duration = Duration::from_millis(500);

/// How long a measured load is used before it is measured again.
const LOAD_TTL: Duration = Duration::from_secs(30);

/// Grace beyond the build timeout before the link counts as dead: the
/// remote enforces the timeout itself and needs time to say so.
const TIMEOUT_GRACE: Duration = Duration::from_secs(60);

/// Why offloading a build failed.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// SSH could not connect, verify the host or log in.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The remote program did not open a serve session.
    #[error("cannot start '{command}' on '{machine}': {source}")]
    Session {
        machine: MachineName,
        command: String,
        #[source]
        source: ClientError,
    },
    /// The machine's store directory is not this client's: every path
    /// would be misnamed there, so nothing was sent.
    #[error("'{machine}' cannot build for this store: {source} (list it only for clients of {})", source.server)]
    StoreDir {
        machine: MachineName,
        #[source]
        source: Box<StoreDirMismatch>,
    },
    /// The store directory of a stock Nix machine could not be learned,
    /// so nothing was sent.
    #[error("cannot learn the store directory of '{machine}' with '{command}': {source}")]
    StoreDirProbe {
        machine: MachineName,
        command: String,
        #[source]
        source: Box<ProbeError>,
    },
    /// The session broke while the build was under way.
    #[error("lost the connection to '{machine}' while {during}: {source}")]
    Lost {
        machine: MachineName,
        during: &'static str,
        #[source]
        source: ClientError,
    },
    /// An output came back without a valid signature by a trusted key.
    #[error("refusing output '{path}' from '{machine}': it is not signed by a trusted key (signed by: {signers}); trust the machine's key with `sandoff key authorize`")]
    Untrusted {
        machine: MachineName,
        path: String,
        signers: String,
    },
    /// The machine said the build succeeded but does not have an output.
    #[error("'{machine}' built '{drv}' but has no output '{path}'")]
    MissingOutput {
        machine: MachineName,
        drv: String,
        path: String,
    },
    /// A path's NAR is not the one its signed info describes, or a fixed
    /// output's content is not the declared one.
    #[error("'{path}' from '{machine}' is not what it should be: {reason}")]
    Corrupt {
        machine: MachineName,
        path: String,
        reason: String,
    },
    /// Sending the inputs failed on this side.
    #[error("cannot send inputs to '{machine}': {source}")]
    Export {
        machine: MachineName,
        #[source]
        source: Box<ExportError>,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] Box<StoreError>),
    /// The slot files failed.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// The backoff records failed.
    #[error(transparent)]
    Backoff(#[from] BackoffError),
    /// The keys could not be read.
    #[error(transparent)]
    Keys(#[from] KeyringError),
}

impl From<StoreError> for OffloadError {
    fn from(e: StoreError) -> OffloadError {
        OffloadError::Store(Box::new(e))
    }
}

impl OffloadError {
    /// Whether the machine is at fault and another one (or this host) may
    /// succeed: it is put into backoff and the derivation placed again.
    pub fn retry_elsewhere(&self) -> bool {
        match self {
            OffloadError::Ssh(e) => e.is_machine_failure(),
            // A machine of another store directory is as useless to this
            // client as one that is down: backoff, and the build goes
            // elsewhere (or, in the hook, the request is declined).
            OffloadError::Session { .. }
            | OffloadError::Lost { .. }
            | OffloadError::StoreDir { .. }
            | OffloadError::StoreDirProbe { .. } => true,
            _ => false,
        }
    }

    /// Whether this failure may be an attack rather than an outage: a host
    /// key that does not match (a man in the middle?) or a refused login.
    /// Worth a warning every time, even when the build succeeds elsewhere.
    pub fn is_suspicious(&self) -> bool {
        matches!(
            self,
            OffloadError::Ssh(SshError::HostKeyMismatch { .. } | SshError::Auth { .. })
        )
    }
}

/// One derivation to build on a machine: what [`Offloader::build_on`]
/// needs besides the machine.
pub struct RemoteJob<'a> {
    /// The store the inputs are valid in and the outputs go to.
    pub store: &'a LocalStore,
    /// The derivation's `.drv` path.
    pub drv_path: &'a StorePath,
    /// The derivation.
    pub drv: &'a Derivation,
    /// Its input paths (valid in `store`); their closure is sent.
    pub inputs: &'a BTreeSet<StorePath>,
    /// The locks of its outputs, held by the caller.
    pub locks: &'a PathLocks,
    /// Time limits and the rest, as the machine's build gets them.
    pub options: BuildOptions,
    /// Ask the machine to substitute the inputs it lacks from its own
    /// substituters before any is sent (Nix's `builders-use-substitutes`);
    /// what it cannot substitute is sent as usual.
    pub substitute: bool,
}

/// How a remote build ended, when it ran.
#[derive(Debug)]
pub enum RemoteOutcome {
    /// Built (or already valid) there; the outputs are valid here now.
    Built,
    /// The build failed there.
    Failed(BuildResult),
}

/// Where [`Offloader::place`] put a derivation.
pub enum Placed<'o> {
    /// Build it here, holding this permit.
    Local(LocalPermit<'o>),
    /// Build it on this machine, holding this slot.
    Remote { machine: &'o Machine, slot: Slot },
    /// Nothing can build it.
    Fail { reason: String },
}

/// What [`Offloader::try_place`] found.
pub enum Attempt<'o> {
    /// Placed (or failed).
    Placed(Placed<'o>),
    /// Nothing free now: ask again later.
    Wait {
        /// Why.
        reason: String,
    },
}

/// One of the local build permits (`-j`); released when dropped.
pub struct LocalPermit<'o> {
    offloader: &'o Offloader,
}

impl Drop for LocalPermit<'_> {
    fn drop(&mut self) {
        let mut state = self.offloader.lock_state();
        state.local_running = state.local_running.saturating_sub(1);
        drop(state);
        self.offloader.wake.notify_all();
    }
}

#[derive(Default)]
struct State {
    local_running: usize,
    idle: BTreeMap<MachineName, Vec<Conn>>,
}

/// Builds on the machines of a machines file, shared by one process's workers.
pub struct Offloader {
    machines: Vec<Machine>,
    local_jobs: usize,
    slots: SlotDir,
    backoff: Backoff,
    ssh: SshOptions,
    signing_key: Option<SecretKey>,
    trusted: TrustedKeys,
    state: Mutex<State>,
    wake: Condvar,
    /// The store directory paths are named in (for serve sessions).
    dir: StoreDir,
    /// Normalized loads measured on machines that have an overload
    /// threshold (Guix machines), and when.
    loads: Mutex<BTreeMap<MachineName, (Instant, f64)>>,
    /// The paths each machine is known to hold (see `held`).
    known: Mutex<BTreeMap<MachineName, BTreeSet<StorePath>>>,
}

impl Offloader {
    /// An offloader for the store at `loc` (slots, backoff and keys live in
    /// its state directory) over `machines`, running at most `local_jobs`
    /// local builds at once.
    pub fn new(
        loc: &StoreLocation,
        machines: Vec<Machine>,
        local_jobs: usize,
        ssh: SshOptions,
    ) -> Result<Offloader, OffloadError> {
        let keyring = Keyring::new(&loc.state);
        let signing_key = match keyring.secret_key() {
            Ok(k) => Some(k),
            Err(KeyringError::NoKey { path }) => {
                tracing::warn!(
                    key = %path.display(),
                    "no signing key: inputs sent to build machines are unsigned (run `sandoff setup`)"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Offloader {
            machines,
            local_jobs: local_jobs.max(1),
            slots: SlotDir::new(&loc.state),
            backoff: Backoff::new(&loc.state),
            ssh,
            signing_key,
            trusted: keyring.trusted_keys()?,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            dir: loc.dir.clone(),
            loads: Mutex::new(BTreeMap::new()),
            known: Mutex::new(BTreeMap::new()),
        })
    }

    /// The same offloader counting slots in `slots` instead of
    /// `<state>/current-load` (a directory other processes share).
    pub fn with_slots(mut self, slots: SlotDir) -> Offloader {
        self.slots = slots;
        self
    }

    /// The machines.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// How many builds may run remotely at once (every machine's slots).
    pub fn remote_capacity(&self) -> usize {
        self.machines.iter().map(|m| m.max_jobs as usize).sum()
    }

    /// How many builds may run locally at once.
    pub fn local_jobs(&self) -> usize {
        self.local_jobs
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the counters half-updated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

mod admin;
mod build;
mod held;
mod placement;
mod pool;

pub use held::InputClosure;

pub use admin::{parse_status, CopyReport, MachineStatus, TestReport};
pub use placement::observed_state;
pub use pool::{Conn, StoreDirCheck, Stream};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_output() {
        let out = "0.52 0.58 0.59 1/123 4567\n8\n/dev/sda1 1000000 400000 600000 40% /\n";
        assert_eq!(
            parse_status(out),
            (Some(0.52), Some(8), Some(600000 * 1024))
        );
        assert_eq!(parse_status(""), (None, None, None));
        assert_eq!(parse_status("nan\nx\n"), (None, None, None));
        let s = MachineStatus {
            reachable: Ok(()),
            load: Some(12.0),
            cores: Some(8),
            free_disk: None,
            slots_in_use: 0,
            backoff: None,
        };
        assert_eq!(s.normalized_load(), Some(1.0));
    }
}
