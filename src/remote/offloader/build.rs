//! One build on a machine: inputs sent, the build run, outputs fetched,
//! checked and registered.

use crate::decide::Machine;
use crate::derivation::{Derivation, DerivationOutput};
use crate::remote::client::{ClientError, ServeClient};
use crate::remote::compress::write_compressing;
use crate::remote::transport::Transport;
use crate::serve_protocol::BuildStatus;
use crate::store::export::{ExportError, ExportWriter};
use crate::store::local::{LocalStore, PathLocks};
use crate::store::{ContentAddress, StorePath, ValidPathInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use super::pool::Stream;
use super::*;

impl Offloader {
    /// Builds `job`, whose input closure is `inputs` ([`InputClosure::of`]
    /// its inputs), on `machine` and makes its outputs valid in the job's
    /// store under its locks, or reports why not. The remote log goes to
    /// `log`.
    pub fn build_on(
        &self,
        machine: &Machine,
        job: &RemoteJob<'_>,
        inputs: &InputClosure,
        log: &mut dyn Write,
    ) -> Result<RemoteOutcome, OffloadError> {
        let RemoteJob {
            store,
            drv_path,
            drv,
            inputs: _,
            locks,
            options,
            substitute,
        } = job;
        let closure: BTreeSet<StorePath> = inputs.paths().cloned().collect();
        let outputs: BTreeSet<StorePath> = drv.output_paths().into_values().collect();
        // One question for both: which inputs it lacks, and whether it has
        // the outputs already (then they are fetched, not built: the
        // machine as a substituter).
        let asked: BTreeSet<StorePath> = closure.union(&outputs).cloned().collect();
        // A pooled connection may have died since; one fresh try then.
        let pooled = self.take_idle(machine).and_then(|mut conn| {
            match query_missing(&mut conn, &asked, *substitute) {
                Ok(missing) => Some((conn, missing)),
                Err(e) => {
                    tracing::debug!(machine = %machine.name, "idle connection is gone: {e}");
                    None
                }
            }
        });
        let (mut conn, lacking) = match pooled {
            Some(found) => found,
            None => {
                self.connect_asking(machine, &asked, *substitute, "asking for missing inputs")?
            }
        };
        self.learn(machine, asked.difference(&lacking));
        if !outputs.is_empty() && lacking.is_disjoint(&outputs) {
            // Fetched only if signed by a trusted key, and checked against
            // the signed hashes and the derivation, as after a build.
            let _ = writeln!(
                log,
                "sandoff: '{}' has the outputs of '{}' already; fetching them instead of building",
                machine.name,
                store.location().logical(drv_path)
            );
            self.fetch_outputs(store, machine, &mut conn.client, locks, drv_path, drv)?;
            self.put_idle(machine, conn);
            return Ok(RemoteOutcome::Built);
        }
        let missing: BTreeSet<StorePath> = lacking.difference(&outputs).cloned().collect();
        if !missing.is_empty() {
            self.send_paths(store, machine, &mut conn.client, &missing)?;
            self.learn(machine, &missing);
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
                self.learn(machine, &outputs);
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
    /// dependencies first, each signed with this machine's key; returns the
    /// NAR bytes sent.
    pub(super) fn send_paths(
        &self,
        store: &LocalStore,
        machine: &Machine,
        client: &mut ServeClient<Stream>,
        missing: &BTreeSet<StorePath>,
    ) -> Result<u64, OffloadError> {
        let entries = store
            .path_infos_in_order(missing)?
            .into_iter()
            .map(|info| Outgoing {
                info,
                signed: false,
            })
            .collect();
        self.send_entries(store, machine, client, entries)
    }

    /// The records of `paths` in the order they are sent, each signed with
    /// this machine's key (when it has one): what [`Offloader::send_entries`]
    /// takes, made ahead (while connecting) when the paths are known early.
    pub(super) fn prepare_sending(
        &self,
        store: &LocalStore,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<Outgoing>, OffloadError> {
        let dir = &store.location().dir;
        Ok(store
            .path_infos_in_order(paths)?
            .into_iter()
            .map(|mut info| {
                if let Some(key) = &self.signing_key {
                    if let Ok(sig) = key.sign_path(&info, dir) {
                        info.signatures.insert(sig);
                    }
                }
                Outgoing { info, signed: true }
            })
            .collect())
    }

    /// Sends `entries` (in order, valid here) in one export stream, signing
    /// those not signed yet; returns the NAR bytes sent.
    pub(super) fn send_entries(
        &self,
        store: &LocalStore,
        machine: &Machine,
        client: &mut ServeClient<Stream>,
        entries: Vec<Outgoing>,
    ) -> Result<u64, OffloadError> {
        let loc = store.location();
        let total: u64 = entries.iter().map(|e| e.info.nar_size).sum();
        tracing::info!(
            machine = %machine.name,
            "sending {} store items ({:.1} MiB)",
            entries.len(),
            total as f64 / (1024.0 * 1024.0)
        );
        let write = |w: &mut dyn Write| -> Result<(), ExportError> {
            // A zstd block's worth at a time: the machine gets its first
            // NARs after 128 KiB are read here, not after a MiB.
            let sink = BufWriter::with_capacity(128 << 10, w);
            let mut export = ExportWriter::new(sink, loc.dir.clone());
            for Outgoing { mut info, signed } in entries {
                // Signed as it goes out, not all before the first byte:
                // 2,000 small paths took 40 ms of signing, which then
                // overlaps with the machine's import.
                if let (false, Some(key)) = (signed, &self.signing_key) {
                    // A path of unknown NAR size cannot be signed; send
                    // it as is.
                    if let Ok(sig) = key.sign_path(&info, &loc.dir) {
                        info.signatures.insert(sig);
                    }
                }
                export.write_path(&info, &loc.real_path(&info.path))?;
            }
            export.finish().map(drop)
        };
        let sent = match client.transport().level() {
            // Compressed on a thread of its own while this one encrypts and
            // sends: one thread doing both in turn was the limit of large
            // copies (~200 MB/s at level 1).
            Some(level) => {
                client.import_paths_to(|t| write_compressing(t, level, write, ExportError::Write))
            }
            // Plain: one thread; a separate serialising thread only
            // competed with the encryption on a loaded machine (measured).
            None => client.import_paths(write),
        }
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
        })?;
        Ok(total)
    }

    /// Fetches the outputs of `drv` from the machine, checks them and
    /// registers them together.
    fn fetch_outputs(
        &self,
        store: &LocalStore,
        machine: &Machine,
        client: &mut ServeClient<Stream>,
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

/// A path to send: its record, and whether this machine's signature was
/// added to it already.
pub(super) struct Outgoing {
    pub(super) info: ValidPathInfo,
    pub(super) signed: bool,
}

/// The paths of `closure` the machine lacks, after it substituted what it
/// could when `substitute` (a machine without substituters ignores it).
pub(super) fn query_missing(
    conn: &mut Conn,
    closure: &BTreeSet<StorePath>,
    substitute: bool,
) -> Result<BTreeSet<StorePath>, ClientError> {
    // lock: keep them from the remote's garbage collector until we are done.
    let valid = conn.client.query_valid_paths(closure, true, substitute)?;
    Ok(closure.difference(&valid).cloned().collect())
}

pub(super) fn lost<'m>(
    machine: &'m Machine,
    during: &'static str,
) -> impl FnOnce(ClientError) -> OffloadError + 'm {
    move |source| OffloadError::Lost {
        machine: machine.name.clone(),
        during,
        source,
    }
}
