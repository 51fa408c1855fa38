//! SSH to build machines with `ssh2` (libssh2): the server's host key is
//! always verified, connecting has a timeout, a dead link is noticed.
//!
//! A dead link is noticed by the kernel: SSH keepalives go out after each
//! keepalive interval of silence (libssh2 sends them from inside blocking
//! calls, [`Transport::wait_reply`] between its polls), and TCP keepalive
//! plus `TCP_USER_TIMEOUT` abort the connection when the peer stops
//! acknowledging, which fails the read or write in progress. A server that
//! is alive but stuck (its TCP stack still answering) is caught only by the
//! caller's deadlines.
//!
//! The server writes two streams into one flow-controlled channel: stderr
//! left unread fills the window and stalls stdout (and the server's reading
//! of stdin). So every wait here is a non-blocking loop around poll(2) that
//! takes stderr as it comes: into the caller's log in
//! [`Transport::wait_reply`], into a backlog (handed on by the next
//! `wait_reply` or `drain_log`) in plain `Read` and `Write`.
//!
//! libssh2 has one blocking flag per session, and a blocking call holds the
//! session's lock while it waits. The loops switch the session to
//! non-blocking mode and back; opening and closing channels block. So the
//! channels of one session are used one at a time, from one thread at a
//! time: concurrent builds on one machine take one session each.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use ssh2::{BlockDirections, CheckResult, KnownHostFileKind, MethodType};
use zeroize::Zeroizing;

use super::transport::Transport;
use crate::bounded;
use crate::decide::Machine;

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

/// Ciphers in order of preference, fastest first as measured against
/// OpenSSH's sshd (AES-NI machine, 200 MiB to `cat > /dev/null`): libssh2
/// calls the cipher once per 16-byte block, which costs AES-GCM (and its
/// per-call GHASH) much more than AES-CTR with an encrypt-then-MAC SHA-256
/// (one call per packet): about 280 against 175 MB/s.
const CIPHER_PREFS: &[&str] = &[
    "aes128-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes192-ctr",
];

/// MACs in order of preference: encrypt-then-MAC, SHA-256 (SHA-NI).
const MAC_PREFS: &[&str] = &[
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha1",
];

/// Read and copy buffers: large, so that each libssh2 call moves a lot.
const BUF_SIZE: usize = 256 * 1024;

/// At most this much stderr waits in memory for a log to take it; more is
/// dropped (and counted) rather than stalling the server.
const MAX_BACKLOG: usize = 64 << 20;

/// An authenticated SSH session to one machine.
pub struct SshSession {
    session: ssh2::Session,
    host: String,
    /// A duplicate of the session's socket, to poll(2) it.
    socket: TcpStream,
    keepalive: Duration,
}

impl SshSession {
    /// Connects to `machine` (host, port, user, identity, host key from its
    /// entry), verifies the host key and authenticates.
    pub fn connect(machine: &Machine, opts: &SshOptions) -> Result<SshSession, SshError> {
        let host = machine.host.clone().ok_or_else(|| SshError::NoHost {
            machine: machine.name.to_string(),
            uri: machine.store_uri.clone(),
        })?;
        let port = machine.port.unwrap_or(22);
        let expected = match &machine.host_key {
            Some(line) => Some(
                PublicKey::parse(line).map_err(|reason| SshError::BadHostKey {
                    machine: machine.name.to_string(),
                    key: line.clone(),
                    reason,
                })?,
            ),
            None => None,
        };
        let addr = host_port(&host, port);

        let stream =
            tcp_connect(&host, port, opts.connect_timeout).map_err(|source| SshError::Connect {
                addr: addr.clone(),
                source,
            })?;
        configure_socket(&stream, opts.keepalive);
        let socket = stream.try_clone().map_err(|source| SshError::Connect {
            addr: addr.clone(),
            source,
        })?;

        let handshake_err = |source| SshError::Handshake {
            addr: addr.clone(),
            source,
        };
        let mut session = ssh2::Session::new().map_err(handshake_err)?;
        session.set_tcp_stream(stream);
        // The whole login (handshake and authentication) is bounded by the
        // connect timeout; afterwards the link's health is the keepalives' job.
        session.set_timeout(duration_ms(opts.connect_timeout));
        set_method_prefs(&session, expected.as_ref(), &host);
        session.handshake().map_err(handshake_err)?;

        let offered = offered_key(&session, &addr)?;
        match &expected {
            Some(expected) => {
                if *expected != offered {
                    return Err(SshError::HostKeyMismatch {
                        host: addr,
                        expected: expected.to_string(),
                        offered: offered.to_string(),
                    });
                }
            }
            None => {
                let path = match &opts.known_hosts {
                    Some(p) => p.clone(),
                    None => home_dir().join(".ssh/known_hosts"),
                };
                check_known_hosts(&session, &host, port, &path, &offered)?;
            }
        }

        authenticate(&session, machine, opts, &addr)?;
        session.set_timeout(0);
        let keepalive_secs = u32::try_from(opts.keepalive.as_secs()).unwrap_or(u32::MAX);
        if keepalive_secs > 0 {
            // No reply wanted: nothing in libssh2 would read it (the replies
            // pile up in its packet queue), and an unacknowledged keepalive
            // already makes TCP declare the peer dead (TCP_USER_TIMEOUT).
            session.set_keepalive(false, keepalive_secs);
        }
        tracing::debug!(
            host = %addr,
            cipher = session.methods(MethodType::CryptCs).unwrap_or("?"),
            mac = session.methods(MethodType::MacCs).unwrap_or("?"),
            "SSH session established"
        );
        Ok(SshSession {
            session,
            host: addr,
            socket,
            keepalive: opts.keepalive,
        })
    }

    /// The host connected to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runs `command` (a shell command line) and returns its stdio.
    pub fn exec(&self, command: &str) -> Result<SshChannel, SshError> {
        let exec_err = |source| SshError::Exec {
            host: self.host.clone(),
            command: command.to_owned(),
            source,
        };
        let socket = self.socket.try_clone().map_err(|source| SshError::Lost {
            host: self.host.clone(),
            command: command.to_owned(),
            source,
        })?;
        self.session.set_blocking(true);
        // A slow server may take longer than a keepalive interval to answer
        // (see `retry_keepalive_timeouts`), but not forever.
        let mut channel =
            retry_keepalive_timeouts(4, || self.session.channel_session()).map_err(exec_err)?;
        retry_keepalive_timeouts(4, || channel.exec(command)).map_err(exec_err)?;
        Ok(SshChannel {
            channel,
            session: self.session.clone(),
            socket,
            host: self.host.clone(),
            keepalive: self.keepalive,
            ahead: vec![0; BUF_SIZE].into_boxed_slice(),
            ahead_pos: 0,
            ahead_end: 0,
            scratch: vec![0; BUF_SIZE].into_boxed_slice(),
            backlog: Vec::new(),
            dropped: 0,
        })
    }

    /// Runs `command` to completion: its stdout, stderr and exit status
    /// (for `machines status`: `cat /proc/loadavg`, `df`). Each of stdout
    /// and stderr may be at most [`RUN_OUTPUT_LIMIT`]: the machine, not
    /// this host, decides how much it sends.
    pub fn run(&self, command: &str) -> Result<(Vec<u8>, Vec<u8>, i32), SshError> {
        let mut channel = self.exec(command)?;
        let lost = |source| SshError::Lost {
            host: self.host.clone(),
            command: command.to_owned(),
            source,
        };
        let ch = &mut channel.channel;
        retry_keepalive_timeouts(u32::MAX, || ch.send_eof())
            .map_err(|e| lost(io::Error::from(e)))?;
        let mut out = bounded::LimitedBuf::new(RUN_OUTPUT_LIMIT);
        let mut err = bounded::LimitedBuf::new(RUN_OUTPUT_LIMIT);
        if let Err(e) = channel.pump_to_eof(&mut out, &mut err) {
            if out.overflowed() || err.overflowed() {
                return Err(SshError::OutputTooLong {
                    host: self.host.clone(),
                    command: command.to_owned(),
                    limit: RUN_OUTPUT_LIMIT,
                });
            }
            return Err(lost(e));
        }
        let status = channel.finish().map_err(lost)?;
        Ok((out.into_inner(), err.into_inner(), status))
    }
}

/// A remote process's stdio over one SSH channel. `Read` (stdout) and
/// `Write` (stdin) block until they made progress, meanwhile keeping the
/// server's stderr for the next log copy; `flush` has nothing to do, each
/// `write` has sent its bytes. Dropping it without [`SshChannel::close`] closes the channel
/// without the exit status (libssh2 waits up to a keepalive interval for
/// the server to confirm).
pub struct SshChannel {
    channel: ssh2::Channel,
    session: ssh2::Session,
    socket: TcpStream,
    host: String,
    keepalive: Duration,
    /// Stdout read ahead (by `wait_reply`, or by a small `read`, so that
    /// many small reads cost one libssh2 call); `ahead[ahead_pos..ahead_end]`
    /// is returned first.
    ahead: Box<[u8]>,
    ahead_pos: usize,
    ahead_end: usize,
    /// Where stderr passes through on its way to a log.
    scratch: Box<[u8]>,
    /// Stderr read while `Read` or `Write` waited (taking it keeps the
    /// server from stalling on a full window); the next `wait_reply` or
    /// `drain_log` hands it on first.
    backlog: Vec<u8>,
    /// Stderr bytes dropped because the backlog was full.
    dropped: u64,
}

impl SshChannel {
    /// Closes stdin, waits for the process to end, returns its exit status.
    pub fn close(mut self) -> io::Result<i32> {
        self.session.set_blocking(true);
        let channel = &mut self.channel;
        if let Err(e) = retry_keepalive_timeouts(u32::MAX, || channel.send_eof()) {
            // The process may be gone already; a dead link fails below.
            tracing::debug!(host = %self.host, "sending EOF: {e}");
        }
        // Whatever the process still writes is read and dropped: it cannot
        // exit while its output does not fit in the channel window.
        let mut out = io::sink();
        let mut err = Vec::new();
        self.pump_to_eof(&mut out, &mut err)?;
        if !err.is_empty() {
            tracing::debug!(host = %self.host, stderr = %String::from_utf8_lossy(&err), "remote stderr at close");
        }
        self.finish()
    }

    /// After EOF: waits for the channel to close and returns the exit
    /// status (128 + signal number for a process killed by a signal).
    fn finish(&mut self) -> io::Result<i32> {
        self.session.set_blocking(true);
        let channel = &mut self.channel;
        retry_keepalive_timeouts(u32::MAX, || channel.wait_close())
            .map_err(|e| self.io_err(e.into()))?;
        if let Ok(signal) = self.channel.exit_signal() {
            if let Some(name) = signal.exit_signal {
                let number = format!("SIG{name}")
                    .parse::<nix::sys::signal::Signal>()
                    .map(|s| s as i32)
                    .unwrap_or(0);
                return Ok(128 + number);
            }
        }
        self.channel
            .exit_status()
            .map_err(|e| self.io_err(e.into()))
    }

    /// Reads stdout into `out` and stderr into `err` until the channel is
    /// at EOF, without blocking on one stream while the other fills up.
    fn pump_to_eof(&mut self, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<()> {
        self.flush_backlog(err)?;
        let _blocking = NonBlocking::new(&self.session);
        out.write_all(&self.ahead[self.ahead_pos..self.ahead_end])?;
        self.ahead_pos = 0;
        self.ahead_end = 0;
        let mut idle_passes = 0;
        loop {
            let progress_err = self.copy_stderr(err)?;
            let mut progress_out = false;
            loop {
                match self.channel.read(&mut self.ahead) {
                    Ok(0) => break,
                    Ok(n) => {
                        out.write_all(&self.ahead[..n])?;
                        progress_out = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(self.io_err(e)),
                }
            }
            if self.channel.eof() {
                self.copy_stderr(err)?;
                return Ok(());
            }
            if progress_err || progress_out {
                idle_passes = 0;
            } else if self.should_poll(&mut idle_passes) {
                self.wait_socket(None)?;
            }
        }
    }

    /// Whether to poll the socket after a pass that read nothing: not while
    /// libssh2 has packets of this channel queued (reading one stream can
    /// queue the other's), except after a few idle passes, so that a packet
    /// neither stream takes cannot make a busy loop.
    fn should_poll(&self, idle_passes: &mut u32) -> bool {
        if *idle_passes < 2 && self.channel.read_window().available > 0 {
            *idle_passes += 1;
            return false;
        }
        *idle_passes = 0;
        true
    }

    /// Copies the stderr available now into `log`; whether there was any.
    /// The session must be in non-blocking mode.
    fn copy_stderr(&mut self, log: &mut dyn Write) -> io::Result<bool> {
        let mut stderr = self.channel.stderr();
        let mut any = false;
        loop {
            match stderr.read(&mut self.scratch) {
                Ok(0) => return Ok(any),
                Ok(n) => {
                    log.write_all(&self.scratch[..n])?;
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) => return Err(self.io_err(e)),
            }
        }
    }

    /// Sends a keepalive if one is due and waits until the socket can be
    /// read (or written, if libssh2 is stuck sending), at most until the
    /// next keepalive is due or `deadline`. Fails when the socket died.
    fn wait_socket(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let mut wait = if self.keepalive.is_zero() {
            Duration::from_secs(15)
        } else {
            match self.session.keepalive_send() {
                Ok(secs) => Duration::from_secs(u64::from(secs.max(1))),
                Err(e) => {
                    let e = io::Error::from(e);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(self.io_err(e));
                    }
                    Duration::from_millis(100)
                }
            }
        };
        if let Some(deadline) = deadline {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        let mut flags = PollFlags::POLLIN;
        if matches!(
            self.session.block_directions(),
            BlockDirections::Outbound | BlockDirections::Both
        ) {
            flags |= PollFlags::POLLOUT;
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let revents = {
            let mut fds = [PollFd::new(self.socket.as_fd(), flags)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
                Err(nix::errno::Errno::EINTR) => PollFlags::empty(),
                Err(e) => return Err(self.io_err(e.into())),
            }
        };
        if revents.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
            let cause = match self.socket.take_error() {
                Ok(Some(e)) => e,
                _ => io::Error::new(io::ErrorKind::ConnectionAborted, "socket error"),
            };
            return Err(self.io_err(cause));
        }
        Ok(())
    }

    /// An error with the host named, keeping its kind; libssh2's bare
    /// "transport read" becomes what happened to the socket.
    fn io_err(&self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::Other {
            if let Some(cause) = socket_failure(&self.socket) {
                return io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("SSH connection to {} lost: {cause} ({e})", self.host),
                );
            }
        }
        io::Error::new(e.kind(), format!("SSH connection to {}: {e}", self.host))
    }
}

/// What broke the socket, if it is broken: a pending error, or the peer
/// having closed it. (libssh2 keeps the socket non-blocking, so the peek
/// does not wait.)
fn socket_failure(socket: &TcpStream) -> Option<String> {
    if let Ok(Some(e)) = socket.take_error() {
        return Some(e.to_string());
    }
    match socket.peek(&mut [0u8; 1]) {
        Ok(0) => Some("the server closed the connection".to_owned()),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Calls `f` again (at most `retries` more times) while it fails with
/// libssh2's timeout. In blocking mode libssh2 waits at most one keepalive
/// interval, sends the keepalive, and reports a timeout even though the
/// session is fine; the next call picks up where the last one stopped.
fn retry_keepalive_timeouts<T>(
    retries: u32,
    mut f: impl FnMut() -> Result<T, ssh2::Error>,
) -> Result<T, ssh2::Error> {
    let mut left = retries;
    loop {
        match f() {
            Err(e) if left > 0 && e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) => {
                left -= 1;
            }
            res => return res,
        }
    }
}

/// libssh2's `LIBSSH2_ERROR_TIMEOUT`.
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;

impl Drop for SshChannel {
    fn drop(&mut self) {
        // Freeing an open channel sends the close; in blocking mode libssh2
        // would then wait for the server's, which sshd sends only once the
        // remote process has ended. Nothing here needs it: don't wait (the
        // next `exec` makes the session blocking again).
        self.session.set_blocking(false);
    }
}

/// Puts a session into non-blocking mode until dropped.
struct NonBlocking(ssh2::Session);

impl NonBlocking {
    fn new(session: &ssh2::Session) -> NonBlocking {
        session.set_blocking(false);
        NonBlocking(session.clone())
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        self.0.set_blocking(true);
    }
}

impl Read for SshChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.ahead_pos == self.ahead_end && buf.len() < self.ahead.len() / 2 {
            self.ahead_pos = 0;
            self.ahead_end = 0;
            let n = self.read_stdout(None)?;
            self.ahead_end = n;
        }
        if self.ahead_pos < self.ahead_end {
            let n = buf.len().min(self.ahead_end - self.ahead_pos);
            buf[..n].copy_from_slice(&self.ahead[self.ahead_pos..self.ahead_pos + n]);
            self.ahead_pos += n;
            return Ok(n);
        }
        self.read_stdout(Some(buf))
    }
}

impl SshChannel {
    /// Waits for stdout and reads it into `buf` (else the read-ahead
    /// buffer): at least one byte, or 0 at EOF. Stderr arriving meanwhile
    /// goes to the backlog, so that it never fills the channel window and
    /// stalls the stdout we wait for.
    fn read_stdout(&mut self, buf: Option<&mut [u8]>) -> io::Result<usize> {
        let _blocking = NonBlocking::new(&self.session);
        let mut buf = buf;
        let mut idle_passes = 0;
        loop {
            let target = match buf.as_deref_mut() {
                Some(b) => b,
                None => &mut self.ahead[..],
            };
            match self.channel.read(target) {
                Ok(0) => {
                    // `eof()` stays false while stderr is unread.
                    self.stderr_to_backlog()?;
                    if self.channel.eof() {
                        return Ok(0);
                    }
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.io_err(e)),
            }
            if self.stderr_to_backlog()? {
                idle_passes = 0;
            } else if self.should_poll(&mut idle_passes) {
                self.wait_socket(None)?;
            }
        }
    }

    /// Moves the stderr available now into the backlog; whether there was
    /// any. The session must be in non-blocking mode.
    fn stderr_to_backlog(&mut self) -> io::Result<bool> {
        let mut stderr = self.channel.stderr();
        let mut any = false;
        loop {
            match stderr.read(&mut self.scratch) {
                Ok(0) => return Ok(any),
                Ok(n) => {
                    any = true;
                    let room = MAX_BACKLOG.saturating_sub(self.backlog.len()).min(n);
                    self.backlog.extend_from_slice(&self.scratch[..room]);
                    self.dropped += (n - room) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) => return Err(self.io_err(e)),
            }
        }
    }

    /// Hands the backlog to `log`.
    fn flush_backlog(&mut self, log: &mut dyn Write) -> io::Result<()> {
        if !self.backlog.is_empty() {
            log.write_all(&self.backlog)?;
            self.backlog = Vec::new();
        }
        if self.dropped > 0 {
            let note = format!(
                "\nsandoff: {} bytes of the log from {} were dropped (nobody read them)\n",
                self.dropped, self.host
            );
            log.write_all(note.as_bytes())?;
            self.dropped = 0;
        }
        Ok(())
    }
}

impl Write for SshChannel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _blocking = NonBlocking::new(&self.session);
        // libssh2 sends at most one packet (32 KiB) per call; keep going
        // so that one write moves a large buffer.
        let mut done = 0;
        let mut idle_passes = 0;
        while done < buf.len() {
            match self.channel.write(&buf[done..]) {
                Ok(n) if n > 0 => {
                    done += n;
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.io_err(e)),
            }
            // Stuck on the socket or on the server's window. A server that
            // writes stderr before it reads again needs it taken; one that
            // is gone never opens the window again.
            if self.stderr_to_backlog()? {
                idle_passes = 0;
                continue;
            }
            if self.channel.wait_close().is_ok() {
                // Without blocking, `wait_close` only looks whether the
                // server's close has arrived (it refuses before its EOF).
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!(
                        "SSH connection to {}: the remote program exited and stopped reading",
                        self.host
                    ),
                ));
            }
            if self.should_poll(&mut idle_passes) {
                self.wait_socket(None)?;
            }
        }
        Ok(done)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Nothing to do: each `write` has handed its packets to the kernel.
        // (`ssh2::Channel::flush` would *discard* unread input, libssh2's
        // meaning of flush.)
        Ok(())
    }
}

impl Transport for SshChannel {
    fn wait_reply(&mut self, log: &mut dyn Write, deadline: Option<Instant>) -> io::Result<()> {
        self.flush_backlog(log)?;
        if self.ahead_pos < self.ahead_end {
            return Ok(());
        }
        let _blocking = NonBlocking::new(&self.session);
        let mut idle_passes = 0;
        loop {
            let got_log = self.copy_stderr(log)?;
            match self.channel.read(&mut self.ahead) {
                Ok(0) => {
                    if self.channel.eof() {
                        self.copy_stderr(log)?;
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{}: the remote program ended the connection", self.host),
                        ));
                    }
                }
                Ok(n) => {
                    self.ahead_pos = 0;
                    self.ahead_end = n;
                    // The log the server wrote before this reply may have
                    // come in with it: hand it over now.
                    self.copy_stderr(log)?;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.io_err(e)),
            }
            // Checked even while the log flows: a chatty build has a
            // deadline too.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{}: no reply before the deadline", self.host),
                ));
            }
            if got_log {
                idle_passes = 0;
            } else if self.should_poll(&mut idle_passes) {
                self.wait_socket(deadline)?;
            }
        }
    }

    fn drain_log(&mut self, log: &mut dyn Write) -> io::Result<()> {
        self.flush_backlog(log)?;
        let _blocking = NonBlocking::new(&self.session);
        self.copy_stderr(log)?;
        Ok(())
    }
}

/// The command that starts the serve protocol on `machine`: Nix runs
/// `<remote-program> --serve --write` when the store URI has a
/// `remote-program` parameter (`ssh://host?remote-program=/bin/nix-store`),
/// else it is `sandoff serve --stdio --write`. The program's words are
/// shell-quoted one by one, so a program with arguments still works (as
/// the value was pasted unquoted into a command line in Nix 2.8).
pub fn remote_command(machine: &Machine) -> String {
    match remote_program(&machine.store_uri) {
        Some(program) => {
            let words: Vec<String> = program.split_whitespace().map(shell_quote).collect();
            format!("{} --serve --write", words.join(" "))
        }
        None => "sandoff serve --stdio --write".to_owned(),
    }
}

/// The decoded `remote-program` query parameter of a store URI, if any.
fn remote_program(uri: &str) -> Option<String> {
    let (_, query) = uri.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    query.split('&').find_map(|param| {
        let (key, value) = param.split_once('=')?;
        (percent_decode(key) == "remote-program" && !value.is_empty())
            .then(|| percent_decode(value))
    })
}

/// Decodes `%XX` escapes; a malformed escape stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `word` as one POSIX shell word.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./=:@%+,-".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// An SSH public key: its type name and its wire-format blob.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PublicKey {
    kind: String,
    blob: Vec<u8>,
}

impl PublicKey {
    /// Parses an OpenSSH public-key line, `ssh-ed25519 AAAA... comment`;
    /// the comment is ignored, the type must match the blob's own.
    fn parse(line: &str) -> Result<PublicKey, String> {
        let mut fields = line.split_whitespace();
        let kind = fields
            .next()
            .ok_or_else(|| "empty key".to_owned())?
            .to_owned();
        let b64 = fields
            .next()
            .ok_or_else(|| "no base64 key after the key type".to_owned())?;
        let blob = base64_engine()
            .decode(b64)
            .map_err(|e| format!("key is not base64: {e}"))?;
        match blob_key_type(&blob) {
            Some(inner) if inner == kind => Ok(PublicKey { kind, blob }),
            Some(inner) => Err(format!("key type '{kind}' but the key data says '{inner}'")),
            None => Err("key data too short or malformed".to_owned()),
        }
    }

    /// A key from the wire-format blob only (as the server offers it).
    fn from_blob(blob: &[u8]) -> Option<PublicKey> {
        let kind = blob_key_type(blob)?.to_owned();
        Some(PublicKey {
            kind,
            blob: blob.to_vec(),
        })
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind,
            base64::engine::general_purpose::STANDARD.encode(&self.blob)
        )
    }
}

/// Base64 that accepts keys with or without their `=` padding.
fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// The type name a public-key blob starts with (an SSH string).
fn blob_key_type(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4usize.checked_add(len)?)?;
    let name = std::str::from_utf8(name).ok()?;
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic())).then_some(name)
}

/// The host-key algorithms that verify a key of type `kind`.
fn hostkey_algorithms(kind: &str) -> &str {
    match kind {
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
        other => other,
    }
}

/// `host:port`, bracketing IPv6 addresses.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// TCP connect to each address of `host` in turn, all within `timeout`.
fn tcp_connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    // A timeout past what an Instant holds saturates to the largest wait
    // connect_timeout takes per address, not a panic.
    let deadline = Instant::now().checked_add(timeout);
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("host name '{host}' resolves to no address"),
    );
    for addr in addrs {
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connection timed out after {timeout:?}"),
            ));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {addr} within {timeout:?}"),
                );
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// TCP_NODELAY for protocol round trips; keepalive probes and a user
/// timeout so that the kernel declares a silent peer dead after about three
/// keepalive intervals, even inside a blocking read or write. Failures are
/// logged, not fatal: the SSH keepalives still work.
fn configure_socket(stream: &TcpStream, keepalive: Duration) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    if keepalive.is_zero() {
        return;
    }
    let secs = u32::try_from(keepalive.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    let interval = (secs / 3).max(1);
    let results = [
        (
            "SO_KEEPALIVE",
            setsockopt(stream, sockopt::KeepAlive, &true),
        ),
        (
            "TCP_KEEPIDLE",
            setsockopt(stream, sockopt::TcpKeepIdle, &secs),
        ),
        (
            "TCP_KEEPINTVL",
            setsockopt(stream, sockopt::TcpKeepInterval, &interval),
        ),
        ("TCP_KEEPCNT", setsockopt(stream, sockopt::TcpKeepCount, &4)),
        (
            "TCP_USER_TIMEOUT",
            setsockopt(
                stream,
                sockopt::TcpUserTimeout,
                &secs.saturating_mul(3).saturating_mul(1000),
            ),
        ),
    ];
    for (name, result) in results {
        if let Err(e) = result {
            tracing::debug!("setting {name}: {e}");
        }
    }
}

/// Prefers fast ciphers and, when the expected host key is known, the
/// host-key algorithm that can match it (a server with several host keys
/// would otherwise offer whichever libssh2 likes best).
fn set_method_prefs(session: &ssh2::Session, expected: Option<&PublicKey>, host: &str) {
    for (method, prefs) in [
        (MethodType::CryptCs, CIPHER_PREFS),
        (MethodType::CryptSc, CIPHER_PREFS),
        (MethodType::MacCs, MAC_PREFS),
        (MethodType::MacSc, MAC_PREFS),
    ] {
        let supported = session.supported_algs(method).unwrap_or_default();
        let list: Vec<&str> = prefs
            .iter()
            .copied()
            .filter(|p| supported.contains(p))
            .collect();
        if !list.is_empty() {
            if let Err(e) = session.method_pref(method, &list.join(",")) {
                tracing::debug!(host, "method preference {}: {e}", list.join(","));
            }
        }
    }
    if let Some(key) = expected {
        let supported = session
            .supported_algs(MethodType::HostKey)
            .unwrap_or_default();
        let list: Vec<&str> = hostkey_algorithms(&key.kind)
            .split(',')
            .filter(|a| supported.contains(a))
            .collect();
        if !list.is_empty() {
            if let Err(e) = session.method_pref(MethodType::HostKey, &list.join(",")) {
                tracing::debug!(host, "host key preference: {e}");
            }
        }
    }
}

/// The key the server offered in the handshake.
fn offered_key(session: &ssh2::Session, addr: &str) -> Result<PublicKey, SshError> {
    session
        .host_key()
        .and_then(|(blob, _)| PublicKey::from_blob(blob))
        .ok_or_else(|| SshError::Handshake {
            addr: addr.to_owned(),
            source: ssh2::Error::new(
                ssh2::ErrorCode::Session(-1),
                "the server offered no usable host key",
            ),
        })
}

/// Checks `offered` against the known_hosts file at `path` (entries may be
/// hashed, or `[host]:port` for other ports than 22).
fn check_known_hosts(
    session: &ssh2::Session,
    host: &str,
    port: u16,
    path: &Path,
    offered: &PublicKey,
) -> Result<(), SshError> {
    let addr = host_port(host, port);
    let unknown = |note: String| SshError::UnknownHost {
        host: addr.clone(),
        known_hosts: format!("{}{note}", path.display()),
        offered: offered.to_string(),
    };
    let text = match bounded::read_file_to_string(path, bounded::KNOWN_HOSTS_LIMIT) {
        Ok(text) => text,
        Err(e) if e.is_not_found() => return Err(unknown(" (no such file)".to_owned())),
        Err(e) => return Err(unknown(format!(" (unreadable: {e})"))),
    };
    // libssh2's CString conversion would panic on a NUL.
    if host.contains('\0') {
        return Err(unknown(String::new()));
    }
    let mut known = session
        .known_hosts()
        .map_err(|source| SshError::Handshake {
            addr: addr.clone(),
            source,
        })?;
    // Line by line, so that one line libssh2 cannot parse (a certificate
    // authority, a key type it lacks) does not hide the others.
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        if let Err(e) = known.read_str(line, KnownHostFileKind::OpenSSH) {
            tracing::debug!(file = %path.display(), "skipping known_hosts line: {e}");
        }
    }
    match known.check_port(host, port, &offered.blob) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => {
            let listed = known_keys_for(&text, host, port);
            let expected = if listed.is_empty() {
                format!("the key for {addr} in {}", path.display())
            } else {
                listed.join(" or ")
            };
            Err(SshError::HostKeyMismatch {
                host: addr.clone(),
                expected: format!("{expected} (from {})", path.display()),
                offered: offered.to_string(),
            })
        }
        CheckResult::NotFound | CheckResult::Failure => Err(unknown(String::new())),
    }
}

/// The keys (`type base64`) that plain (unhashed) known_hosts lines list for
/// `host` on `port`, to name what was expected in a mismatch.
fn known_keys_for(text: &str, host: &str, port: u16) -> Vec<String> {
    let bracketed = format!("[{host}]:{port}");
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let names = fields.next()?;
            if names.starts_with('#') || names.starts_with('@') {
                return None;
            }
            let matches = names.split(',').any(|n| {
                n.eq_ignore_ascii_case(&bracketed) || (port == 22 && n.eq_ignore_ascii_case(host))
            });
            let kind = fields.next()?;
            let b64 = fields.next()?;
            matches.then(|| format!("{kind} {b64}"))
        })
        .collect()
}

/// Public-key authentication as the entry's user (else the local user)
/// with the entry's key (else the default identity).
fn authenticate(
    session: &ssh2::Session,
    machine: &Machine,
    opts: &SshOptions,
    addr: &str,
) -> Result<(), SshError> {
    let user = machine.user.clone().unwrap_or_else(current_user);
    let auth_err = |key: &str, reason: String| SshError::Auth {
        user: user.clone(),
        host: addr.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let key = match (&machine.private_key, &opts.default_identity) {
        (Some(key), _) => expand_home(key),
        (None, Some(key)) => key.clone(),
        (None, None) => {
            let ssh_dir = home_dir().join(".ssh");
            let candidates = [ssh_dir.join("id_ed25519"), ssh_dir.join("id_rsa")];
            match candidates.iter().find(|p| p.exists()) {
                Some(p) => p.clone(),
                None => {
                    return Err(auth_err(
                        "no key",
                        format!(
                            "the machine entry names no private key and neither {} nor {} exists",
                            candidates[0].display(),
                            candidates[1].display()
                        ),
                    ))
                }
            }
        }
    };
    let key_text = key.display().to_string();
    // libssh2 reads the key file itself, without a limit: a key path that
    // names a FIFO or `/dev/zero` is refused here instead of hanging it.
    if let Err(e) = bounded::read_file(&key, bounded::KEY_FILE_LIMIT).map(Zeroizing::new) {
        return Err(auth_err(
            &key_text,
            format!("cannot read the private key: {e}"),
        ));
    }
    session
        .userauth_pubkey_file(&user, None, &key, None)
        .map_err(|e| auth_err(&key_text, e.message().to_owned()))?;
    if !session.authenticated() {
        return Err(auth_err(
            &key_text,
            "the server did not accept the key".to_owned(),
        ));
    }
    Ok(())
}

/// `~/x` relative to the home directory, as ssh reads `-i ~/x`.
fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None => PathBuf::from(path),
    }
}

/// `$HOME`, else the password database's home directory, else `/`.
fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The local user name, as ssh logs in by default: from the password
/// database, else `$USER`, else `root` for uid 0.
fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{MachineFormat, MachineName};

    #[test]
    fn a_connect_timeout_past_the_clocks_range_is_no_panic() {
        // Nobody listens there: refused at once, whatever the timeout.
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let err = tcp_connect("127.0.0.1", port, Duration::MAX).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    fn machine(uri: &str) -> Machine {
        Machine {
            name: MachineName::new(uri).expect("name"),
            format: MachineFormat::Nix,
            store_uri: uri.to_owned(),
            host: Some("host".to_owned()),
            systems: Default::default(),
            user: None,
            port: None,
            private_key: None,
            max_jobs: 1,
            speed_factor: 1.0,
            supported_features: Default::default(),
            mandatory_features: Default::default(),
            host_key: None,
            guix: None,
        }
    }

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn remote_command_defaults_to_sandoff_serve() {
        assert_eq!(
            remote_command(&machine("ssh://root@host")),
            "sandoff serve --stdio --write"
        );
        assert_eq!(
            remote_command(&machine("ssh://root@host?compress=true")),
            "sandoff serve --stdio --write"
        );
    }

    #[test]
    fn remote_command_uses_remote_program() {
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=/bin/nix-store")),
            "/bin/nix-store --serve --write"
        );
        assert_eq!(
            remote_command(&machine(
                "ssh://h?compress=true&remote-program=%2Fopt%2Fnix%2Fbin%2Fnix-store"
            )),
            "/opt/nix/bin/nix-store --serve --write"
        );
        // Words are quoted one by one; arguments survive.
        assert_eq!(
            remote_command(&machine(
                "ssh://h?remote-program=nix-store%20--store%20/x%20y"
            )),
            "nix-store --store /x y --serve --write"
        );
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=/my%24dir/it's")),
            r"'/my$dir/it'\''s' --serve --write"
        );
        // An empty value is no program.
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=")),
            "sandoff serve --stdio --write"
        );
    }

    #[test]
    fn percent_decoding_leaves_malformed_escapes() {
        assert_eq!(percent_decode("a%2Fb%2fc"), "a/b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn public_key_parse_ignores_comment_and_padding() {
        let a = PublicKey::parse(&format!("{ED} host1")).expect("parses");
        let b = PublicKey::parse(ED).expect("parses");
        assert_eq!(a, b);
        assert_eq!(a.kind, "ssh-ed25519");
        assert_eq!(a.to_string(), ED);
        let unpadded = ED.trim_end_matches('=');
        assert_eq!(PublicKey::parse(unpadded).expect("parses"), a);
        assert_eq!(PublicKey::from_blob(&a.blob), Some(a));
    }

    #[test]
    fn public_key_parse_refuses_bad_keys() {
        assert!(PublicKey::parse("").is_err());
        assert!(PublicKey::parse("ssh-ed25519").is_err());
        assert!(PublicKey::parse("ssh-ed25519 !!!")
            .unwrap_err()
            .contains("base64"));
        // The type must match the blob's own.
        let err = PublicKey::parse(&ED.replace("ssh-ed25519", "ssh-rsa")).unwrap_err();
        assert!(err.contains("'ssh-ed25519'"), "{err}");
        // A blob too short to hold its type name.
        assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err());
        assert!(PublicKey::parse("ssh-ed25519 AAAAC3Nz").is_err());
    }

    #[test]
    fn keys_differing_in_blob_are_unequal() {
        let a = PublicKey::parse(ED).expect("parses");
        let mut b = a.clone();
        let last = b.blob.len() - 1;
        b.blob[last] ^= 1;
        assert_ne!(a, b);
    }

    #[test]
    fn known_keys_for_matches_plain_and_bracketed_names() {
        let text = format!(
            "# comment\n[10.0.0.1]:2222 {ED}\nhost,10.0.0.1 ssh-rsa AAAB\n|1|abc|def {ED}\n@revoked 10.0.0.1 {ED}\n"
        );
        assert_eq!(known_keys_for(&text, "10.0.0.1", 2222), vec![ED.to_owned()]);
        assert_eq!(
            known_keys_for(&text, "10.0.0.1", 22),
            vec!["ssh-rsa AAAB".to_owned()]
        );
        assert!(known_keys_for(&text, "other", 22).is_empty());
    }

    #[test]
    fn keepalive_timeouts_are_retried_a_bounded_number_of_times() {
        let timeout = || {
            ssh2::Error::new(
                ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT),
                "Timed out waiting on socket",
            )
        };
        let mut calls = 0;
        let res = retry_keepalive_timeouts(4, || {
            calls += 1;
            if calls < 3 {
                Err(timeout())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(res.expect("third call succeeds"), 3);
        let mut calls = 0;
        let res: Result<(), _> = retry_keepalive_timeouts(2, || {
            calls += 1;
            Err(timeout())
        });
        assert!(res.is_err());
        assert_eq!(calls, 3);
        // Other errors are not retried.
        let mut calls = 0;
        let res: Result<(), _> = retry_keepalive_timeouts(5, || {
            calls += 1;
            Err(ssh2::Error::new(
                ssh2::ErrorCode::Session(-7),
                "socket send",
            ))
        });
        assert!(res.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn sockets_get_keepalive_and_user_timeout() {
        use nix::sys::socket::{getsockopt, sockopt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        configure_socket(&stream, Duration::from_secs(15));
        assert!(stream.nodelay().expect("nodelay"));
        assert!(getsockopt(&stream, sockopt::KeepAlive).expect("keepalive"));
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepIdle).expect("idle"), 15);
        assert_eq!(
            getsockopt(&stream, sockopt::TcpKeepInterval).expect("intvl"),
            5
        );
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepCount).expect("cnt"), 4);
        assert_eq!(
            getsockopt(&stream, sockopt::TcpUserTimeout).expect("user timeout"),
            45_000
        );
    }

    #[test]
    fn host_port_brackets_ipv6() {
        assert_eq!(host_port("::1", 22), "[::1]:22");
        assert_eq!(host_port("h", 2222), "h:2222");
    }

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
