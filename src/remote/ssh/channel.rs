//! One remote process's stdio over an SSH channel: stdout and stdin as
//! `Read` and `Write`, stderr taken as it comes so that it never stalls the
//! other stream (the `ssh` module docs say why every wait polls).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use ssh2::BlockDirections;

use crate::remote::transport::Transport;

/// Read and copy buffers: large, so that each libssh2 call moves a lot.
const BUF_SIZE: usize = 256 * 1024;

/// At most this much stderr waits in memory for a log to take it; more is
/// dropped (and counted) rather than stalling the server.
const MAX_BACKLOG: usize = 64 << 20;

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
    /// A channel on which `session` has started a remote command.
    pub(super) fn new(
        session: &ssh2::Session,
        channel: ssh2::Channel,
        socket: TcpStream,
        host: String,
        keepalive: Duration,
    ) -> SshChannel {
        SshChannel {
            channel,
            session: session.clone(),
            socket,
            host,
            keepalive,
            ahead: vec![0; BUF_SIZE].into_boxed_slice(),
            ahead_pos: 0,
            ahead_end: 0,
            scratch: vec![0; BUF_SIZE].into_boxed_slice(),
            backlog: Vec::new(),
            dropped: 0,
        }
    }

    /// Closes stdin (the remote process sees EOF), blocking.
    pub(super) fn send_eof(&mut self) -> Result<(), ssh2::Error> {
        let channel = &mut self.channel;
        retry_keepalive_timeouts(u32::MAX, || channel.send_eof())
    }

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
    pub(super) fn finish(&mut self) -> io::Result<i32> {
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
    pub(super) fn pump_to_eof(
        &mut self,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> io::Result<()> {
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
        let mut any = false;
        while let Some(n) = self.read_stderr()? {
            log.write_all(&self.scratch[..n])?;
            any = true;
        }
        Ok(any)
    }

    /// Reads what stderr has now into the scratch buffer: how much, or
    /// `None` when nothing is there (or it ended). Non-blocking mode.
    fn read_stderr(&mut self) -> io::Result<Option<usize>> {
        match self.channel.stderr().read(&mut self.scratch) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(self.io_err(e)),
        }
    }

    /// Sends a keepalive if one is due and waits until the socket can be
    /// read (or written, if libssh2 is stuck sending), at most until the
    /// next keepalive is due or `deadline`. Fails when the socket died.
    fn wait_socket(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let mut wait = if self.keepalive.is_zero() {
            IDLE_WAIT
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
        let revents = match poll_session(&self.session, &self.socket, wait) {
            Ok(revents) => revents,
            Err(nix::errno::Errno::EINTR) => PollFlags::empty(),
            Err(e) => return Err(self.io_err(e.into())),
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

/// How long a wait for the server lasts when no keepalive interval is set.
pub(super) const IDLE_WAIT: Duration = Duration::from_secs(15);

/// Waits at most `wait` until `socket`, the socket of `session`, can be
/// read, or written if libssh2 is stuck sending; what poll(2) reported.
pub(super) fn poll_session(
    session: &ssh2::Session,
    socket: &TcpStream,
    wait: Duration,
) -> nix::Result<PollFlags> {
    let mut flags = PollFlags::POLLIN;
    if matches!(
        session.block_directions(),
        BlockDirections::Outbound | BlockDirections::Both
    ) {
        flags |= PollFlags::POLLOUT;
    }
    let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(socket.as_fd(), flags)];
    nix::poll::poll(&mut fds, timeout)?;
    Ok(fds[0].revents().unwrap_or(PollFlags::empty()))
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
pub(super) fn retry_keepalive_timeouts<T>(
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
pub(super) const LIBSSH2_ERROR_TIMEOUT: i32 = -9;

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
        let mut any = false;
        while let Some(n) = self.read_stderr()? {
            any = true;
            let room = MAX_BACKLOG.saturating_sub(self.backlog.len()).min(n);
            self.backlog.extend_from_slice(&self.scratch[..room]);
            self.dropped += (n - room) as u64;
        }
        Ok(any)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
