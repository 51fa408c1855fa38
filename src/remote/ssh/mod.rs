//! SSH to build machines with `ssh2` (libssh2): the server's host key is
//! always verified, connecting has a timeout, a dead link is noticed.
//!
//! A dead link is noticed by the kernel: SSH keepalives go out after each
//! keepalive interval of silence (libssh2 sends them from inside blocking
//! calls, [`Transport::wait_reply`](crate::remote::transport::Transport::wait_reply) between its polls), and TCP keepalive
//! plus `TCP_USER_TIMEOUT` abort the connection when the peer stops
//! acknowledging, which fails the read or write in progress. A server that
//! is alive but stuck (its TCP stack still answering) is caught only by the
//! caller's deadlines.
//!
//! The server writes two streams into one flow-controlled channel: stderr
//! left unread fills the window and stalls stdout (and the server's reading
//! of stdin). So every wait here is a non-blocking loop around poll(2) that
//! takes stderr as it comes: into the caller's log in
//! [`Transport::wait_reply`](crate::remote::transport::Transport::wait_reply), into a backlog (handed on by the next
//! `wait_reply` or `drain_log`) in plain `Read` and `Write`.
//!
//! libssh2 has one blocking flag per session, and a blocking call holds the
//! session's lock while it waits. The loops switch the session to
//! non-blocking mode and back; opening and closing channels block. So the
//! channels of one session are used one at a time, from one thread at a
//! time: concurrent builds on one machine take one session each.
//!
//! Compression: a stock Nix serve program speaks plain bytes, so when its
//! machine entry asks for compression (`?compress=true`) the session asks
//! sshd for SSH's zlib (`zlib@openssh.com`, compressing after the login,
//! then `zlib`), as Nix's `ssh -C` and Guix's guile-ssh do; a server that
//! offers neither still connects, uncompressed.
//! [`SshSession::ssh_compression`] says what was agreed. A sandoff peer is
//! compressed with zstd above SSH instead ([`crate::remote::compress`]),
//! never both: [`wire_compression`] chooses.
//!
//! One file per job: `session` connects, checks the host key and logs
//! in; `channel` carries one remote process's stdio; `host_key` is the
//! pure side of host keys (parsing, known_hosts lines, the mismatch
//! message); `command` is the remote command line and its quoting, and
//! how the store directory is agreed before the serve session starts.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::bounded;

mod channel;
mod command;
mod host_key;
mod session;

pub use channel::SshChannel;
pub use command::{
    parse_store_dir_probe, remote_command, remote_command_with, store_dir_probe, wire_compression,
    ProbeError,
};
pub use session::SshSession;

/// The most stdout (and stderr) [`SshSession::run`] takes from a command.
pub const RUN_OUTPUT_LIMIT: u64 = 1 << 20;

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
    /// A command run with [`SshSession::run`] printed more than it may.
    #[error("'{command}' on {host} printed more than the limit of {}", bounded::size(*limit))]
    OutputTooLong {
        host: String,
        command: String,
        limit: u64,
    },
    /// The connection broke while a remote command ran.
    #[error("connection to {host} lost while running '{command}': {source}")]
    Lost {
        host: String,
        command: String,
        #[source]
        source: io::Error,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_failures() {
        let e = SshError::NoHost {
            machine: "m".into(),
            uri: "u".into(),
        };
        assert!(!e.is_machine_failure());
        let e = SshError::UnknownHost {
            host: "h".into(),
            known_hosts: "k".into(),
            offered: "o".into(),
        };
        assert!(e.is_machine_failure());
    }
}
