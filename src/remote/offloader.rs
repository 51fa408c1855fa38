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
//!    verified) and start its serve program;
//! 2. ask which paths of the input closure it lacks, and send those in one
//!    export stream, dependencies first, each signed with this machine's key;
//! 3. `BuildDerivation` with the input closure, the same max-silent-time and
//!    timeout, the remote log copied into the local log as it comes;
//! 4. fetch the outputs' infos, refuse any output without a valid signature
//!    by a trusted key, fetch their NARs, check them against the signed
//!    hashes, and register all outputs in one transaction.
//!
//! Failures are classified ([`OffloadError::retry_elsewhere`]): the
//! machine could not be reached, refused us, or the link died — the machine
//! goes into backoff and the derivation is placed again (another machine,
//! or local); the build itself failed there, or its outputs were refused —
//! the build fails, with the remote log.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::backoff::{Backoff, BackoffError};
use super::client::{ClientError, ServeClient};
use super::slots::{Slot, SlotDir, SlotError};
use super::ssh::{remote_command, SshChannel, SshError, SshOptions, SshSession};
use super::transport::Transport;
use crate::decide::{self, Decision, DrvFacts, Machine, MachineName, MachineState, Placement};
use crate::derivation::{Derivation, DerivationOutput};
use crate::serve_protocol::{BuildOptions, BuildResult, BuildStatus};
use crate::store::export::{ExportError, ExportWriter};
use crate::store::hash::HashingReader;
use crate::store::keyring::{Keyring, KeyringError};
use crate::store::local::{LocalStore, PathLocks, StoreError};
use crate::store::nar::{self, NullVisitor};
use crate::store::signature::{SecretKey, TrustedKeys};
use crate::store::{ContentAddress, HashAlgo, StoreDir, StoreLocation, StorePath, ValidPathInfo};

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
            OffloadError::Session { .. } | OffloadError::Lost { .. } => true,
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

/// What this host knows of `machine` at `now` without asking it: the slots
/// any sandoff process holds there, and whether it is in backoff.
pub fn observed_state<'m>(
    slots: &SlotDir,
    backoff: &Backoff,
    machine: &'m Machine,
    now: SystemTime,
) -> Result<MachineState<'m>, OffloadError> {
    Ok(MachineState {
        machine,
        slots_in_use: slots.in_use(machine)?,
        load: None,
        in_backoff: backoff.state(&machine.name)?.is_some_and(|b| b.active(now)),
    })
}

/// A serve session on a machine.
pub struct Conn {
    /// The session.
    pub client: ServeClient<SshChannel>,
    /// The SSH connection it runs over.
    pub session: SshSession,
}

/// Connects to `machine` and opens a serve session with its serve program,
/// for paths in the store directory `dir`.
fn connect(machine: &Machine, ssh: &SshOptions, dir: &StoreDir) -> Result<Conn, OffloadError> {
    let session = SshSession::connect(machine, ssh)?;
    let command = remote_command(machine);
    let channel = session.exec(&command)?;
    let client =
        ServeClient::open(channel, dir.clone()).map_err(|source| OffloadError::Session {
            machine: machine.name.clone(),
            command: command.clone(),
            source,
        })?;
    Ok(Conn { client, session })
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
        })
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

    /// The machines with their slots in use and backoff now.
    fn states(&self) -> Result<Vec<MachineState<'_>>, OffloadError> {
        let now = SystemTime::now();
        let mut states = Vec::with_capacity(self.machines.len());
        for m in &self.machines {
            let mut state = observed_state(&self.slots, &self.backoff, m, now)?;
            state.load = self.fresh_load(m);
            states.push(state);
        }
        Ok(states)
    }

    /// Decides where `drv` is built and takes what that needs, waiting
    /// while the decision is to postpone (or to build locally with every
    /// local permit taken). `placement` gives the local facts and policy.
    pub fn place(
        &self,
        placement: &Placement,
        drv: &Derivation,
    ) -> Result<Placed<'_>, OffloadError> {
        loop {
            if let Attempt::Placed(p) = self.try_place(placement, drv)? {
                return Ok(p);
            }
            // Wait for a permit or slot of this process to be released, or
            // a while for those of others.
            let guard = self.lock_state();
            let _ = self.wake.wait_timeout(guard, RECHECK);
        }
    }

    /// One decision for `drv` without waiting: [`Attempt::Wait`] when it is
    /// to be postponed, or built here with every local permit taken.
    pub fn try_place(
        &self,
        placement: &Placement,
        drv: &Derivation,
    ) -> Result<Attempt<'_>, OffloadError> {
        let facts = DrvFacts::from_derivation(drv);
        loop {
            let _choice = self.slots.lock_choice()?;
            let states = self.states()?;
            let mut local = placement.local.clone();
            local.free_slot = self.lock_state().local_running < self.local_jobs;
            match decide::decide(&facts, &states, &local, &placement.policy) {
                Decision::Fail { reason } => return Ok(Attempt::Placed(Placed::Fail { reason })),
                Decision::Remote { machine, reason } => {
                    let m = self
                        .machines
                        .iter()
                        .find(|m| m.name == machine)
                        .expect("decide chose one of the machines it was given");
                    if m.overload_threshold().is_some() && self.fresh_load(m).is_none() {
                        // As Guix: look at the chosen machine's load before
                        // using it, then decide again knowing it (outside
                        // the choice lock: this takes a connection).
                        drop(_choice);
                        if let Err(e) = self.measure_load(m) {
                            if !e.retry_elsewhere() {
                                return Err(e);
                            }
                            self.record_failure(m, &e);
                        }
                        continue;
                    }
                    if let Some(slot) = self.slots.try_acquire(m)? {
                        tracing::debug!(machine = %m.name, slot = slot.index, %reason, "offloading");
                        return Ok(Attempt::Placed(Placed::Remote { machine: m, slot }));
                    }
                    // Taken between the count and now by a process that
                    // does not take the choice lock: decide again.
                }
                Decision::Local { reason } => {
                    let mut guard = self.lock_state();
                    if guard.local_running >= self.local_jobs {
                        return Ok(Attempt::Wait { reason });
                    }
                    guard.local_running += 1;
                    tracing::debug!(%reason, "building locally");
                    return Ok(Attempt::Placed(Placed::Local(LocalPermit {
                        offloader: self,
                    })));
                }
                Decision::Postpone { reason } => return Ok(Attempt::Wait { reason }),
            }
        }
    }

    /// The machine's normalized load, if measured in the last
    /// [`LOAD_TTL`].
    fn fresh_load(&self, machine: &Machine) -> Option<f64> {
        let loads = self
            .loads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loads
            .get(&machine.name)
            .filter(|(at, _)| at.elapsed() < LOAD_TTL)
            .map(|(_, load)| *load)
    }

    /// Measures the machine's normalized load (1-minute load average per
    /// processor, at most 1, as Guix) over a pooled or new connection,
    /// which stays pooled for the build.
    fn measure_load(&self, machine: &Machine) -> Result<(), OffloadError> {
        let conn = match self.take_idle(machine) {
            Some(c) => c,
            None => self.connect(machine)?,
        };
        let (out, _, _) = conn.session.run(STATUS_COMMAND)?;
        let (load, cores, _) = parse_status(&String::from_utf8_lossy(&out));
        // A machine that does not say counts as fully loaded, as in Guix.
        let normalized = normalize_load(load, cores).unwrap_or(1.0);
        tracing::info!(machine = %machine.name, "normalized load is {normalized:.2}");
        self.loads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(machine.name.clone(), (Instant::now(), normalized));
        self.put_idle(machine, conn);
        Ok(())
    }

    /// Puts `machine` into backoff after `error`.
    pub fn record_failure(&self, machine: &Machine, error: &OffloadError) {
        let line = error.to_string().replace('\n', " ");
        // Builds that were under way there when it went down all fail at
        // once: one outage, one failure, not a backoff grown by each.
        let now = SystemTime::now();
        if let Ok(Some(b)) = self.backoff.state(&machine.name) {
            if b.active(now) {
                tracing::warn!(machine = %machine.name, "{line} (already in backoff)");
                self.wake.notify_all();
                return;
            }
        }
        match self
            .backoff
            .record_failure(&machine.name, SystemTime::now(), &line)
        {
            Ok(b) => tracing::warn!(
                machine = %machine.name,
                failures = b.failures,
                "{line}; not using it for {} s",
                b.until
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .as_secs()
            ),
            Err(e) => tracing::warn!(machine = %machine.name, "{line}; cannot record it: {e}"),
        }
        // Whoever postponed may now choose another way.
        self.wake.notify_all();
    }

    /// Releases `slot` and wakes whoever waits for one.
    pub fn release(&self, slot: Slot) {
        drop(slot);
        self.wake.notify_all();
    }

    fn connect(&self, machine: &Machine) -> Result<Conn, OffloadError> {
        connect(machine, &self.ssh, &self.dir)
    }

    /// Connects to `machine` now and keeps the session for its next build,
    /// so that a caller can promise the build only once the machine is
    /// known to answer (the hook, before `# accept`, as Nix 1.x did).
    pub fn warm(&self, machine: &Machine) -> Result<(), OffloadError> {
        let conn = self.connect(machine)?;
        self.put_idle(machine, conn);
        Ok(())
    }

    fn take_idle(&self, machine: &Machine) -> Option<Conn> {
        self.lock_state().idle.get_mut(&machine.name)?.pop()
    }

    fn put_idle(&self, machine: &Machine, conn: Conn) {
        self.lock_state()
            .idle
            .entry(machine.name.clone())
            .or_default()
            .push(conn);
    }

    /// Builds `job` on `machine` and makes its outputs valid in the job's
    /// store under its locks, or reports why not. The remote log goes to
    /// `log`.
    pub fn build_on(
        &self,
        machine: &Machine,
        job: &RemoteJob<'_>,
        log: &mut dyn Write,
    ) -> Result<RemoteOutcome, OffloadError> {
        let RemoteJob {
            store,
            drv_path,
            drv,
            inputs,
            locks,
            options,
        } = job;
        let closure = store.closure(inputs)?;
        // A pooled connection may have died since; one fresh try then.
        let pooled =
            self.take_idle(machine)
                .and_then(|mut conn| match query_missing(&mut conn, &closure) {
                    Ok(missing) => Some((conn, missing)),
                    Err(e) => {
                        tracing::debug!(machine = %machine.name, "idle connection is gone: {e}");
                        None
                    }
                });
        let (mut conn, missing) = match pooled {
            Some(found) => found,
            None => {
                let mut conn = self.connect(machine)?;
                let missing = query_missing(&mut conn, &closure)
                    .map_err(lost(machine, "asking for missing inputs"))?;
                (conn, missing)
            }
        };
        if !missing.is_empty() {
            self.send_paths(store, machine, &mut conn.client, &missing)?;
        }
        // A timeout past what an Instant holds (u64::MAX: "forever") is no
        // deadline, not a panic.
        let deadline = (options.build_timeout > 0)
            .then(|| {
                Instant::now()
                    .checked_add(Duration::from_secs(options.build_timeout))?
                    .checked_add(TIMEOUT_GRACE)
            })
            .flatten();
        let result = conn
            .client
            .build_derivation(drv_path, drv, &closure, options, log, deadline)
            .map_err(lost(machine, "building"))?;
        let outcome = match result.status {
            BuildStatus::Built
            | BuildStatus::Substituted
            | BuildStatus::AlreadyValid
            | BuildStatus::ResolvesToAlreadyValid => {
                self.fetch_outputs(store, machine, &mut conn.client, locks, drv_path, drv)?;
                RemoteOutcome::Built
            }
            _ => RemoteOutcome::Failed(result),
        };
        let _ = conn.client.transport().drain_log(log);
        if let Err(e) = self.backoff.record_success(&machine.name) {
            tracing::warn!(machine = %machine.name, "cannot clear its backoff: {e}");
        }
        self.put_idle(machine, conn);
        Ok(outcome)
    }

    /// Sends `missing` (valid here) to the machine in one export stream,
    /// dependencies first, each signed with this machine's key.
    fn send_paths(
        &self,
        store: &LocalStore,
        machine: &Machine,
        client: &mut ServeClient<SshChannel>,
        missing: &BTreeSet<StorePath>,
    ) -> Result<(), OffloadError> {
        let loc = store.location();
        let mut entries = Vec::with_capacity(missing.len());
        for p in store.topo_sort(missing)? {
            let mut info = store
                .query_path_info(&p)?
                .ok_or_else(|| StoreError::NotValid {
                    path: loc.logical(&p),
                })?;
            if let Some(key) = &self.signing_key {
                // A path of unknown NAR size cannot be signed; send it as is.
                if let Ok(sig) = key.sign_path(&info, &loc.dir) {
                    info.signatures.insert(sig);
                }
            }
            entries.push(info);
        }
        let total: u64 = entries.iter().map(|i| i.nar_size).sum();
        tracing::info!(
            machine = %machine.name,
            "sending {} store items ({:.1} MiB)",
            entries.len(),
            total as f64 / (1024.0 * 1024.0)
        );
        let sent = client
            .import_paths(|w| {
                // One thread: on a loaded machine a separate serialising
                // thread only competed with the encryption (measured).
                let sink = BufWriter::with_capacity(1 << 20, w);
                let mut export = ExportWriter::new(sink, loc.dir.clone());
                for info in &entries {
                    export.write_path(info, &loc.real_path(&info.path))?;
                }
                export.finish().map(drop)
            })
            .map_err(lost(machine, "sending inputs"))?;
        sent.map_err(|e| match e {
            // Our side of the pipe failing is the link dying.
            ExportError::Write(source) => OffloadError::Lost {
                machine: machine.name.clone(),
                during: "sending inputs",
                source: ClientError::Wire {
                    what: "ImportPaths",
                    source: source.into(),
                },
            },
            e => OffloadError::Export {
                machine: machine.name.clone(),
                source: Box::new(e),
            },
        })
    }

    /// Fetches the outputs of `drv` from the machine, checks them and
    /// registers them together.
    fn fetch_outputs(
        &self,
        store: &LocalStore,
        machine: &Machine,
        client: &mut ServeClient<SshChannel>,
        locks: &PathLocks,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> Result<(), OffloadError> {
        let loc = store.location();
        let wanted: BTreeSet<StorePath> = drv.output_paths().into_values().collect();
        let infos = client
            .query_path_infos(&wanted)
            .map_err(lost(machine, "asking for the outputs"))?;
        let infos: BTreeMap<StorePath, ValidPathInfo> =
            infos.into_iter().map(|i| (i.path.clone(), i)).collect();
        let mut checked = Vec::with_capacity(wanted.len());
        for path in &wanted {
            let info = infos.get(path).ok_or_else(|| OffloadError::MissingOutput {
                machine: machine.name.clone(),
                drv: loc.logical(drv_path),
                path: loc.logical(path),
            })?;
            if self.trusted.count_valid(info, &loc.dir) == 0 {
                let signers: Vec<&str> = info.signatures.iter().map(|s| s.key_name()).collect();
                return Err(OffloadError::Untrusted {
                    machine: machine.name.clone(),
                    path: loc.logical(path),
                    signers: if signers.is_empty() {
                        "nobody".to_owned()
                    } else {
                        signers.join(", ")
                    },
                });
            }
            checked.push(info.clone());
        }
        // Fixed outputs are checked against the declared hash here too, and
        // registered with their content address, as when built here.
        let fixed: BTreeMap<&StorePath, ContentAddress> = drv
            .outputs
            .values()
            .filter_map(|o| match o {
                DerivationOutput::CAFixed { method, hash, path } => Some((
                    path,
                    ContentAddress::Fixed {
                        method: *method,
                        hash: hash.clone(),
                    },
                )),
                _ => None,
            })
            .collect();
        let mut staged = Vec::with_capacity(checked.len());
        for mut info in checked {
            let got = client
                .dump_store_path(&info.path, |nar| store.stage_nar(nar))
                .map_err(lost(machine, "fetching outputs"))??;
            if let Some(ca) = fixed.get(&info.path) {
                info.ca = Some(ca.clone());
            }
            if let Err(e) = store.check_staged(&got, &info, true) {
                return Err(OffloadError::Corrupt {
                    machine: machine.name.clone(),
                    path: loc.logical(&info.path),
                    reason: e.to_string(),
                });
            }
            info.deriver = Some(drv_path.clone());
            info.registration_time = 0;
            info.ultimate = false;
            staged.push((got, info));
        }
        store.register_built_outputs(locks, staged)?;
        Ok(())
    }
}

/// The paths of `closure` the machine lacks.
fn query_missing(
    conn: &mut Conn,
    closure: &BTreeSet<StorePath>,
) -> Result<BTreeSet<StorePath>, ClientError> {
    // lock: keep them from the remote's garbage collector until we are done.
    let valid = conn.client.query_valid_paths(closure, true, false)?;
    Ok(closure.difference(&valid).cloned().collect())
}

fn lost<'m>(
    machine: &'m Machine,
    during: &'static str,
) -> impl FnOnce(ClientError) -> OffloadError + 'm {
    move |source| OffloadError::Lost {
        machine: machine.name.clone(),
        during,
        source,
    }
}

/// What `sandoff machines status` shows of one machine.
#[derive(Clone, Debug)]
pub struct MachineStatus {
    /// Reachable (connected, host key verified, logged in), or why not.
    pub reachable: Result<(), String>,
    /// The 1-minute load average.
    pub load: Option<f64>,
    /// Its processors.
    pub cores: Option<u32>,
    /// Free bytes on the filesystem of its store.
    pub free_disk: Option<u64>,
    /// Slots held now by sandoff processes on this host.
    pub slots_in_use: u32,
    /// Its failure record, if any.
    pub backoff: Option<super::backoff::BackoffState>,
}

impl MachineStatus {
    /// Load per processor, as Guix normalises it (capped at 1).
    pub fn normalized_load(&self) -> Option<f64> {
        normalize_load(self.load, self.cores)
    }
}

/// Load per processor, capped at 1, as Guix normalises it.
fn normalize_load(load: Option<f64>, cores: Option<u32>) -> Option<f64> {
    match (load, cores) {
        (Some(l), Some(c)) if c > 0 => Some((l / f64::from(c)).min(1.0)),
        _ => None,
    }
}

/// The remote command of `machines status`: load average, processors, and
/// the free space where its store is (`SANDOFF_STORE_ROOT` for sandoff
/// hosts with their own root).
const STATUS_COMMAND: &str =
    "cat /proc/loadavg; nproc; df -Pk \"${SANDOFF_STORE_ROOT:-/}\" | tail -n 1";

/// Parses what [`STATUS_COMMAND`] printed: (load, cores, free bytes).
pub fn parse_status(out: &str) -> (Option<f64>, Option<u32>, Option<u64>) {
    let mut lines = out.lines();
    let load = lines
        .next()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|l| l.parse::<f64>().ok())
        .filter(|l| l.is_finite() && *l >= 0.0);
    let cores = lines.next().and_then(|l| l.trim().parse::<u32>().ok());
    // `Filesystem 1024-blocks Used Available Capacity Mounted-on`
    let free = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|k| k.parse::<u64>().ok())
        .and_then(|k| k.checked_mul(1024));
    (load, cores, free)
}

/// What `sandoff machines test` found on one machine, step by step.
#[derive(Clone, Debug, Default)]
pub struct TestReport {
    /// Each step that passed, one line.
    pub passed: Vec<String>,
}

impl Offloader {
    /// The status of `machine`; connecting is part of it, so this never fails
    /// for a machine that is down (that is what it reports).
    pub fn status(&self, machine: &Machine) -> Result<MachineStatus, OffloadError> {
        let slots_in_use = self.slots.in_use(machine)?;
        let backoff = self.backoff.state(&machine.name)?;
        let mut status = MachineStatus {
            reachable: Ok(()),
            load: None,
            cores: None,
            free_disk: None,
            slots_in_use,
            backoff,
        };
        match SshSession::connect(machine, &self.ssh) {
            Err(e) => status.reachable = Err(e.to_string()),
            Ok(session) => match session.run(STATUS_COMMAND) {
                Ok((out, _, _)) => {
                    (status.load, status.cores, status.free_disk) =
                        parse_status(&String::from_utf8_lossy(&out));
                }
                Err(e) => status.reachable = Err(e.to_string()),
            },
        }
        Ok(status)
    }

    /// Checks that `machine` can take builds, as `guix offload test`:
    /// connect (host key verified), start its serve program, send a fresh
    /// small path signed with this machine's key, see it valid there, and
    /// fetch it back intact.
    pub fn test_machine(
        &self,
        store: &LocalStore,
        machine: &Machine,
    ) -> Result<TestReport, OffloadError> {
        let loc = store.location();
        let mut report = TestReport::default();
        let mut conn = self.connect(machine)?;
        report.passed.push(format!(
            "connected to {} (host key verified) and started '{}' (serve protocol 2.{})",
            conn.session.host(),
            remote_command(machine),
            conn.client.minor()
        ));
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let text = format!(
            "sandoff machines test of {} at {nanos} by process {}\n",
            machine.name,
            std::process::id()
        );
        let nonce = store.add_text(
            "sandoff-machines-test",
            text.as_bytes(),
            &BTreeSet::new(),
            &BTreeMap::new(),
        )?;
        let one: BTreeSet<StorePath> = [nonce.clone()].into();
        self.send_paths(store, machine, &mut conn.client, &one)?;
        let valid = conn
            .client
            .query_valid_paths(&one, false, false)
            .map_err(lost(machine, "checking the test path"))?;
        if !valid.contains(&nonce) {
            return Err(OffloadError::MissingOutput {
                machine: machine.name.clone(),
                drv: "(machines test)".to_owned(),
                path: loc.logical(&nonce),
            });
        }
        report.passed.push(format!(
            "sent {}{}",
            loc.logical(&nonce),
            if self.signing_key.is_some() {
                ", signed"
            } else {
                " (unsigned: no signing key here)"
            }
        ));
        let local = store
            .query_path_info(&nonce)?
            .ok_or_else(|| StoreError::NotValid {
                path: loc.logical(&nonce),
            })?;
        let hashed = conn
            .client
            .dump_store_path(&nonce, |nar| {
                let mut reader = HashingReader::new(nar, HashAlgo::Sha256);
                nar::parse(&mut reader, &mut NullVisitor).map(|_| {
                    let (hash, size, _) = reader.finish();
                    (hash, size)
                })
            })
            .map_err(lost(machine, "fetching the test path"))?;
        match hashed {
            Ok((hash, size)) if hash == local.nar_hash && size == local.nar_size => {
                report
                    .passed
                    .push("fetched it back, NAR hash intact".to_owned());
                Ok(report)
            }
            Ok(_) => Err(OffloadError::Corrupt {
                machine: machine.name.clone(),
                path: loc.logical(&nonce),
                reason: "its NAR hash changed on the way back".to_owned(),
            }),
            Err(e) => Err(OffloadError::Corrupt {
                machine: machine.name.clone(),
                path: loc.logical(&nonce),
                reason: e.to_string(),
            }),
        }
    }

    /// Copies the closure of `paths` (valid here) to `machine`: the paths it
    /// lacks, in one signed stream. Returns how many were sent and their
    /// NAR bytes.
    pub fn copy_to(
        &self,
        store: &LocalStore,
        machine: &Machine,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(usize, u64), OffloadError> {
        let closure = store.closure(paths)?;
        let mut conn = self.connect(machine)?;
        let missing = query_missing(&mut conn, &closure)
            .map_err(lost(machine, "asking for missing paths"))?;
        let mut bytes = 0;
        for p in &missing {
            if let Some(info) = store.query_path_info(p)? {
                bytes += info.nar_size;
            }
        }
        if !missing.is_empty() {
            self.send_paths(store, machine, &mut conn.client, &missing)?;
        }
        Ok((missing.len(), bytes))
    }
}

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
