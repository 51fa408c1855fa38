//! Connections to machines, kept idle between builds and reused.

use crate::decide::Machine;
use crate::remote::client::ServeClient;
use crate::remote::ssh::{remote_command, SshChannel, SshOptions, SshSession};
use crate::store::StoreDir;

use super::*;

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

    pub(super) fn put_idle(&self, machine: &Machine, conn: Conn) {
        self.lock_state()
            .idle
            .entry(machine.name.clone())
            .or_default()
            .push(conn);
    }
}
