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

/// A `QueryValidPaths` to send with the session's greeting (see
/// [`crate::remote::client::Hello`]).
#[derive(Clone, Copy)]
pub(super) struct Ask<'a> {
    pub(super) paths: &'a BTreeSet<StorePath>,
    pub(super) substitute: bool,
}

/// An SSH session with a machine whose store directory is known to be the
/// client's (or will be checked by its serve program): the first half of
/// a connection, which needs nothing of what is asked later.
pub(super) struct Reached {
    session: SshSession,
    store_dir_check: StoreDirCheck,
}

/// Connects to `machine` and opens a serve session with its serve program,
/// for paths in the store directory `dir`, once the machine's store
/// directory is known to be `dir`.
fn connect(machine: &Machine, ssh: &SshOptions, dir: &StoreDir) -> Result<Conn, OffloadError> {
    open_serve(machine, dir, reach(machine, ssh, dir)?, None)
}

/// Connects to `machine` over SSH and makes sure its store directory is
/// `dir` (see [`Reached`]).
fn reach(machine: &Machine, ssh: &SshOptions, dir: &StoreDir) -> Result<Reached, OffloadError> {
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
    Ok(Reached {
        session,
        store_dir_check,
    })
}

/// Starts the serve program on a reached machine and opens the session
/// (see [`connect`]). With `ask`, the session's first request goes out
/// with its greeting (locking the paths, as [`super::build::query_missing`]
/// does); the caller reads the answer with
/// [`crate::remote::client::ServeClient::valid_paths_answer`].
fn open_serve(
    machine: &Machine,
    dir: &StoreDir,
    reached: Reached,
    ask: Option<Ask<'_>>,
) -> Result<Conn, OffloadError> {
    let Reached {
        session,
        store_dir_check,
    } = reached;
    let mut wire = wire_compression(machine);
    let mut command = remote_command(machine, dir);
    let mut client = loop {
        let mut hello =
            ServeClient::hello(ZstdTransport::new(session.exec(&command)?), dir.clone());
        if let WireCompression::Zstd { level } = wire {
            // The server (told with `--compress`) switches after reading
            // the client's version, which `hello` has sent.
            hello
                .transport()
                .start_sending(level)
                .map_err(|e| zstd_failed(machine, &command, e))?;
        }
        if let Some(ask) = ask {
            hello.query_valid_paths(ask.paths, true, ask.substitute);
        }
        match hello.greeted(None) {
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
            // And its replies, after its greeting.
            client
                .transport()
                .start_receiving()
                .map_err(|e| zstd_failed(machine, &command, e))?;
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

fn zstd_failed(machine: &Machine, command: &str, e: std::io::Error) -> OffloadError {
    OffloadError::Session {
        machine: machine.name.clone(),
        command: command.to_owned(),
        source: ClientError::Wire {
            what: "starting zstd",
            source: e.into(),
        },
    }
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

    /// Connects to `machine` and learns which of `asked` it lacks (after
    /// it substituted what it could, with `substitute`), the question sent
    /// along with the session's greeting; `during` names the question in
    /// errors.
    pub(super) fn connect_asking(
        &self,
        machine: &Machine,
        asked: &BTreeSet<StorePath>,
        substitute: bool,
        during: &'static str,
    ) -> Result<(Conn, BTreeSet<StorePath>), OffloadError> {
        self.open_asking(machine, self.reach(machine)?, asked, substitute, during)
    }

    /// The first half of [`Offloader::connect`]: an SSH session with
    /// `machine`, its store directory checked.
    pub(super) fn reach(&self, machine: &Machine) -> Result<Reached, OffloadError> {
        reach(machine, &self.ssh, &self.dir)
    }

    /// The second half of [`Offloader::connect_asking`], on a machine
    /// [`Offloader::reach`] reached.
    pub(super) fn open_asking(
        &self,
        machine: &Machine,
        reached: Reached,
        asked: &BTreeSet<StorePath>,
        substitute: bool,
        during: &'static str,
    ) -> Result<(Conn, BTreeSet<StorePath>), OffloadError> {
        let ask = Ask {
            paths: asked,
            substitute,
        };
        let mut conn = open_serve(machine, &self.dir, reached, Some(ask))?;
        let valid = conn
            .client
            .valid_paths_answer()
            .map_err(super::build::lost(machine, during))?;
        let missing = asked.difference(&valid).cloned().collect();
        Ok((conn, missing))
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
