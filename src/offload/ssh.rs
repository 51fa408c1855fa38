//! SSH to build machines with `ssh2` (libssh2): the server's host key is
//! always verified, connecting has a timeout, a dead link is noticed.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::transport::Transport;
use crate::decide::Machine;

/// Why an SSH connection could not be made or was lost.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The machine entry has no host to connect to.
    #[error("machine '{machine}': its store URI '{uri}' names no SSH host")]
    NoHost { machine: String, uri: String },
    /// TCP connect failed or timed out.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The SSH handshake failed.
    #[error("SSH handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: ssh2::Error,
    },
    /// The server offered a host key other than the expected one.
    #[error("host key mismatch for {host}: expected {expected}, offered {offered}")]
    HostKeyMismatch {
        host: String,
        expected: String,
        offered: String,
    },
    /// No expected host key in the machine entry and none in known_hosts.
    #[error("host {host} is not in {known_hosts} and its machine entry has no host key (offered {offered})")]
    UnknownHost {
        host: String,
        known_hosts: String,
        offered: String,
    },
    /// The machine entry's host key cannot be parsed.
    #[error("machine '{machine}': bad host key '{key}': {reason}")]
    BadHostKey {
        machine: String,
        key: String,
        reason: String,
    },
    /// Public-key authentication failed.
    #[error("authentication as '{user}' on {host} with {key} failed: {reason}")]
    Auth {
        user: String,
        host: String,
        key: String,
        reason: String,
    },
    /// Opening the channel or starting the remote program failed.
    #[error("cannot run '{command}' on {host}: {source}")]
    Exec {
        host: String,
        command: String,
        #[source]
        source: ssh2::Error,
    },
}

impl SshError {
    /// Whether the machine is at fault (unreachable, wrong key, refused
    /// login): the offloader puts it into backoff and tries elsewhere.
    pub fn is_machine_failure(&self) -> bool {
        !matches!(self, SshError::NoHost { .. } | SshError::BadHostKey { .. })
    }
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// Give up connecting (TCP and handshake) after this long (10 s).
    pub connect_timeout: Duration,
    /// Send a keepalive after this long without traffic; after a few
    /// unanswered ones (or TCP giving up) the link counts as dead.
    pub keepalive: Duration,
    /// Where host keys are looked up when the machine entry has none
    /// (default `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// The identity when the entry has none (default `~/.ssh/id_ed25519`,
    /// then `~/.ssh/id_rsa`).
    pub default_identity: Option<PathBuf>,
}

impl Default for SshOptions {
    fn default() -> SshOptions {
        SshOptions {
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            known_hosts: None,
            default_identity: None,
        }
    }
}

/// An authenticated SSH session to one machine.
pub struct SshSession {
    session: ssh2::Session,
    host: String,
}

impl SshSession {
    /// Connects to `machine` (host, port, user, identity, host key from its
    /// entry), verifies the host key and authenticates.
    pub fn connect(_machine: &Machine, _opts: &SshOptions) -> Result<SshSession, SshError> {
        todo!("helper A")
    }

    /// The host connected to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runs `command` (a shell command line) and returns its stdio.
    pub fn exec(&self, _command: &str) -> Result<SshChannel, SshError> {
        let _ = &self.session;
        todo!("helper A")
    }

    /// Runs `command` to completion: its stdout, stderr and exit status
    /// (for `machines status`: `cat /proc/loadavg`, `df`).
    pub fn run(&self, _command: &str) -> Result<(Vec<u8>, Vec<u8>, i32), SshError> {
        todo!("helper A")
    }
}

/// A remote process's stdio over one SSH channel.
pub struct SshChannel {
    channel: ssh2::Channel,
}

impl SshChannel {
    /// Closes stdin, waits for the process to end, returns its exit status.
    pub fn close(self) -> io::Result<i32> {
        let _ = &self.channel;
        todo!("helper A")
    }
}

impl Read for SshChannel {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        todo!("helper A")
    }
}

impl Write for SshChannel {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        todo!("helper A")
    }
    fn flush(&mut self) -> io::Result<()> {
        todo!("helper A")
    }
}

impl Transport for SshChannel {
    fn wait_reply(&mut self, _log: &mut dyn Write, _deadline: Option<Instant>) -> io::Result<()> {
        todo!("helper A")
    }
    fn drain_log(&mut self, _log: &mut dyn Write) -> io::Result<()> {
        todo!("helper A")
    }
}

/// The command that starts the machine's serve program (helper A).
pub fn remote_command(_machine: &Machine) -> String {
    todo!("helper A")
}
