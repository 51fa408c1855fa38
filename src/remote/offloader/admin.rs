//! What the admin commands ask of machines: `machines status`, `machines
//! test` and `copy --to`.

use crate::decide::Machine;
use crate::remote::compress::{ByteCount, WireCompression};
use crate::remote::ssh::SshSession;
use crate::store::hash::HashingReader;
use crate::store::local::{LocalStore, StoreError};
use crate::store::nar::{self, NullVisitor};
use crate::store::{HashAlgo, StorePath};
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use super::build::{lost, Outgoing};
use super::*;

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
    pub backoff: Option<crate::remote::backoff::BackoffState>,
}

impl MachineStatus {
    /// Load per processor, as Guix normalises it (capped at 1).
    pub fn normalized_load(&self) -> Option<f64> {
        normalize_load(self.load, self.cores)
    }
}

/// Load per processor, capped at 1, as Guix normalises it.
pub(super) fn normalize_load(load: Option<f64>, cores: Option<u32>) -> Option<f64> {
    match (load, cores) {
        (Some(l), Some(c)) if c > 0 => Some((l / f64::from(c)).min(1.0)),
        _ => None,
    }
}

/// The remote command of `machines status`: load average, processors, and
/// the free space where its store is (`SANDOFF_STORE_ROOT` for sandoff
/// hosts with their own root).
pub(super) const STATUS_COMMAND: &str =
    "cat /proc/loadavg; nproc; df -Pk \"${SANDOFF_STORE_ROOT:-/}\" | tail -n 1";

/// Parses what the status command printed: (load, cores, free bytes).
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

/// What [`Offloader::copy_to`] did.
#[derive(Clone, Debug)]
pub struct CopyReport {
    /// Paths sent (those the machine lacked).
    pub paths: usize,
    /// Their NAR bytes.
    pub nar_bytes: u64,
    /// How the streams were compressed.
    pub compression: WireCompression,
    /// Bytes the session sent: as the protocol wrote them, and on the wire
    /// after zstd (SSH zlib, below the channel, is not counted: there the
    /// two are equal).
    pub sent: ByteCount,
    /// Bytes the session received, the same way.
    pub received: ByteCount,
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
    /// connect (host key verified), agree on the store directory (a
    /// mismatch fails the test, naming both), start its serve program, send a fresh
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
            conn.command,
            conn.client.minor()
        ));
        report
            .passed
            .push(format!("streams compressed: {}", conn.compression));
        report.passed.push(match &conn.store_dir_check {
            StoreDirCheck::ByServer => format!(
                "store directory {}, the same as here (checked by the machine's sandoff)",
                self.dir
            ),
            StoreDirCheck::Probed { command } => format!(
                "store directory {}, the same as here (learned with '{command}')",
                self.dir
            ),
        });
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
    /// lacks, in one signed stream. Returns what was sent and how.
    pub fn copy_to(
        &self,
        store: &LocalStore,
        machine: &Machine,
        paths: &BTreeSet<StorePath>,
    ) -> Result<CopyReport, OffloadError> {
        // The closure is read, and its records read and signed, while the
        // SSH session is made and the serve session opens (a third of a
        // second of waiting for the network and the remote program): the
        // closure is needed only for the question sent with the serve
        // greeting (2,000 paths took 12 ms), and 2,000 signatures cost 50 ms
        // of CPU, which the stream would otherwise wait for. Some may turn
        // out not to be needed.
        const WHAT: &str = "asking for missing paths";
        let (local, opened) = std::thread::scope(|scope| {
            let (closure_tx, closure_rx) = std::sync::mpsc::sync_channel(1);
            let local = scope.spawn(move || {
                let closure = store.closure(paths)?;
                // Nobody receives only if the machine was not reached.
                let _ = closure_tx.send(closure.clone());
                let prepared = self.prepare_sending(store, &closure);
                Ok::<_, OffloadError>((closure, prepared))
            });
            let opened = match self.reach(machine) {
                Ok(reached) => match closure_rx.recv() {
                    Ok(closure) => Opened::Asked(Box::new(
                        self.open_asking(machine, reached, &closure, false, WHAT),
                    )),
                    // Reading the closure failed: its error comes from the thread.
                    Err(_) => Opened::Reached(reached),
                },
                Err(e) => Opened::Failed(e),
            };
            let local = local
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (local, opened)
        });
        let (closure, prepared) = local?;
        let (mut conn, missing) = match opened {
            Opened::Asked(asked) => (*asked)?,
            Opened::Reached(reached) => {
                self.open_asking(machine, reached, &closure, false, WHAT)?
            }
            Opened::Failed(e) => return Err(e),
        };
        let entries: Vec<Outgoing> = prepared?
            .into_iter()
            .filter(|e| missing.contains(&e.info.path))
            .collect();
        let bytes = if entries.is_empty() {
            0
        } else {
            self.send_entries(store, machine, &mut conn.client, entries)?
        };
        let (sent, received) = conn.client.transport().counts();
        Ok(CopyReport {
            paths: missing.len(),
            nar_bytes: bytes,
            compression: conn.compression,
            sent,
            received,
        })
    }
}

/// How far [`Offloader::copy_to`] got with a machine while it read the
/// closure.
enum Opened {
    /// The serve session is open (or failed) and was asked which paths the
    /// machine lacks.
    Asked(Box<Result<(Conn, BTreeSet<StorePath>), OffloadError>>),
    /// The machine is reached; the closure was not there to ask about.
    Reached(super::pool::Reached),
    /// The machine was not reached.
    Failed(OffloadError),
}
