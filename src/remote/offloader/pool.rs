//! Connections to machines, kept idle between builds and reused.

use crate::decide::Machine;
use crate::remote::client::{ClientError, ServeClient};
use crate::remote::compress::{WireCompression, ZstdTransport};
use crate::remote::ssh::{
    parse_store_dir_probe, remote_command, remote_command_with, store_dir_probe, wire_compression,
    ProbeError, SshChannel, SshOptions, SshSession,
};
use crate::serve_protocol::StoreDirMismatch;
use crate::store::StoreDir;

use super::*;

/// What a session's protocol runs over: the remote program's stdio on an
/// SSH channel, zstd after the handshake with a sandoff peer that was
/// asked for it.
pub type Stream = ZstdTransport<SshChannel>;

/// A serve session on a machine.
pub struct Conn {
    /// The session.
    pub client: ServeClient<Stream>,
    /// The SSH connection it runs over.
    pub session: SshSession,
    /// How the machine's store directory was found to be the client's.
    pub store_dir_check: StoreDirCheck,
    /// How its streams are compressed (as negotiated: SSH zlib only if the
    /// server agreed to it).
    pub compression: WireCompression,
    /// The remote command the session runs.
    pub command: String,
}

/// How a connection made sure that the machine's store directory is the
/// client's, before anything was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreDirCheck {
    /// sandoff on the machine checked it (`--expect-store-dir`).
    ByServer,
    /// This command, run first, printed it (a stock Nix machine).
    Probed { command: String },
}

/// Connects to `machine` and opens a serve session with its serve program,
/// for paths in the store directory `dir`, once the machine's store
/// directory is known to be `dir`.
fn connect(machine: &Machine, ssh: &SshOptions, dir: &StoreDir) -> Result<Conn, OffloadError> {
    let session = SshSession::connect(machine, ssh)?;
    let store_dir_check = match store_dir_probe(machine) {
        Some(probe) => {
            let theirs = probe_store_dir(&session, machine, &probe)?;
            if &theirs != dir {
                return Err(OffloadError::StoreDir {
                    machine: machine.name.clone(),
                    source: Box::new(StoreDirMismatch {
                        server: theirs,
                        client: dir.clone(),
                    }),
                });
            }
            StoreDirCheck::Probed { command: probe }
        }
        None => StoreDirCheck::ByServer,
    };
    let mut wire = wire_compression(machine);
    let mut command = remote_command(machine, dir);
    let mut client = loop {
        let channel = ZstdTransport::new(session.exec(&command)?);
        match ServeClient::open(channel, dir.clone()) {
            Ok(client) => break client,
            // A sandoff older than `--compress` refuses it before the
            // handshake (clap: "unexpected argument '--compress'"): ask
            // again without it, on the same connection.
            Err(ClientError::Handshake { got })
                if matches!(wire, WireCompression::Zstd { .. })
                    && got.contains("unexpected argument '--compress'") =>
            {
                tracing::warn!(
                    machine = %machine.name,
                    "its sandoff does not know --compress: talking to it uncompressed (upgrade it)"
                );
                wire = WireCompression::None;
                command = remote_command_with(machine, dir, None);
            }
            Err(ClientError::StoreDir(source)) => {
                return Err(OffloadError::StoreDir {
                    machine: machine.name.clone(),
                    source: Box::new(source),
                })
            }
            Err(source) => {
                return Err(OffloadError::Session {
                    machine: machine.name.clone(),
                    command,
                    source,
                })
            }
        }
    };
    let compression = match wire {
        WireCompression::Zstd { level } => {
            // The server (told with `--compress`) switches after reading
            // the client's version, which `open` has sent.
            client
                .transport()
                .start(level)
                .map_err(|e| OffloadError::Session {
                    machine: machine.name.clone(),
                    command: command.clone(),
                    source: ClientError::Wire {
                        what: "starting zstd",
                        source: e.into(),
                    },
                })?;
            WireCompression::Zstd { level }
        }
        // What the server agreed to: it may compress nothing.
        WireCompression::SshZlib if session.ssh_compression().is_some() => WireCompression::SshZlib,
        WireCompression::SshZlib | WireCompression::None => WireCompression::None,
    };
    tracing::debug!(machine = %machine.name, %compression, "serve session ready");
    Ok(Conn {
        client,
        session,
        store_dir_check,
        compression,
        command,
    })
}

/// The store directory of `machine`'s serve program, from what `probe`
/// (see [`store_dir_probe`]) prints there.
fn probe_store_dir(
    session: &SshSession,
    machine: &Machine,
    probe: &str,
) -> Result<StoreDir, OffloadError> {
    let failed = |source| OffloadError::StoreDirProbe {
        machine: machine.name.clone(),
        command: probe.to_owned(),
        source: Box::new(source),
    };
    let (out, err, status) = session.run(probe)?;
    if status != 0 {
        let err = String::from_utf8_lossy(&err);
        let lines: Vec<&str> = err.trim().lines().collect();
        return Err(failed(ProbeError::Failed {
            status,
            stderr: lines[lines.len().saturating_sub(3)..].join("; "),
        }));
    }
    parse_store_dir_probe(&out).map_err(failed)
}

impl Offloader {
    pub(super) fn connect(&self, machine: &Machine) -> Result<Conn, OffloadError> {
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

    pub(super) fn take_idle(&self, machine: &Machine) -> Option<Conn> {
        self.lock_state().idle.get_mut(&machine.name)?.pop()
    }

    /// An idle connection to `machine`, else a new one.
    pub(super) fn idle_or_connect(&self, machine: &Machine) -> Result<Conn, OffloadError> {
        match self.take_idle(machine) {
            Some(c) => Ok(c),
            None => self.connect(machine),
        }
    }

    pub(super) fn put_idle(&self, machine: &Machine, conn: Conn) {
        self.lock_state()
            .idle
            .entry(machine.name.clone())
            .or_default()
            .push(conn);
    }
}
