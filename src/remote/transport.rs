//! The byte stream a serve client talks over, whatever carries it: an SSH
//! channel ([`super::ssh`]) or a local child process (tests, and
//! `nix-store --serve` on this machine).
//!
//! The serve protocol has two streams from the server: stdout carries the
//! protocol, stderr the build log. A client must keep reading stderr while it
//! waits for a reply, or a chatty build fills the pipe (or the SSH window)
//! and both sides wait for each other.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// A connection to a serve server: `Read` is its stdout, `Write` its stdin.
pub trait Transport: Read + Write + Send {
    /// Waits until at least one byte of the server's stdout can be read
    /// without blocking, copying everything the server writes to stderr into
    /// `log` meanwhile. Fails with `io::ErrorKind::TimedOut` once `deadline`
    /// passes, and with `UnexpectedEof` (or another error) when the server or
    /// the link is gone.
    fn wait_reply(&mut self, log: &mut dyn Write, deadline: Option<Instant>) -> io::Result<()>;

    /// Copies whatever the server has written to stderr so far into `log`,
    /// without waiting.
    fn drain_log(&mut self, log: &mut dyn Write) -> io::Result<()>;
}

/// How much of the child's stderr [`ChildTransport::stderr_tail`] keeps.
const TAIL_MAX: usize = 4096;

/// A serve server run as a local child process (`sandoff serve --stdio
/// --write`, `nix-store --serve --write --store <root>`), with its stdin,
/// stdout and stderr piped.
///
/// Reads from stdout are buffered, and [`Transport::wait_reply`] counts
/// buffered bytes as a reply; writes are buffered until `flush`. The child is
/// killed when the transport is dropped without [`ChildTransport::close`].
pub struct ChildTransport {
    child: Child,
    /// `None` once closed.
    stdin: Option<BufWriter<ChildStdin>>,
    stdout: BufReader<ChildStdout>,
    /// `None` once the child closed it.
    stderr: Option<ChildStderr>,
    /// The last bytes of stderr, for error messages.
    tail: Vec<u8>,
}

impl ChildTransport {
    /// Starts `cmd` with its three standard streams piped to us.
    pub fn spawn(mut cmd: Command) -> io::Result<ChildTransport> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let piped = |what| io::Error::other(format!("child {what} is not piped"));
        let stdin = child.stdin.take().ok_or_else(|| piped("stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| piped("stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| piped("stderr"))?;
        Ok(ChildTransport {
            child,
            stdin: Some(BufWriter::with_capacity(64 * 1024, stdin)),
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            stderr: Some(stderr),
            tail: Vec::new(),
        })
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The last few KiB the child wrote to stderr (lossily decoded), to
    /// explain why a session failed.
    pub fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
    }

    /// Ends the session: flushes and closes the child's stdin (a serve
    /// server exits at EOF), reads its stdout and stderr to the end (stderr
    /// into `log`) so it cannot block on a full pipe, and waits for it.
    pub fn close_with_log(mut self, log: &mut dyn Write) -> io::Result<ExitStatus> {
        if let Some(mut stdin) = self.stdin.take() {
            // A child that already exited makes this fail; its status says why.
            let _ = stdin.flush();
        }
        let mut stdout_open = true;
        while stdout_open || self.stderr.is_some() {
            let ready = self.poll_streams(stdout_open, None)?;
            if ready.stdout {
                let mut buf = [0u8; 8192];
                stdout_open = read_retrying(self.stdout.get_mut(), &mut buf)? != 0;
            }
            if ready.stderr {
                self.read_stderr(log)?;
            }
        }
        self.child.wait()
    }

    /// [`ChildTransport::close_with_log`], dropping the rest of the log.
    pub fn close(self) -> io::Result<ExitStatus> {
        self.close_with_log(&mut io::sink())
    }

    /// Waits until stdout (if `want_stdout`) or stderr is readable (or at
    /// EOF), or until `timeout` (`None`: forever; `Some(0)`: just look).
    fn poll_streams(&self, want_stdout: bool, timeout: Option<PollTimeout>) -> io::Result<Ready> {
        let readable = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        let mut fds = Vec::with_capacity(2);
        if want_stdout {
            fds.push(PollFd::new(
                self.stdout.get_ref().as_fd(),
                PollFlags::POLLIN,
            ));
        }
        if let Some(e) = &self.stderr {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
        }
        if fds.is_empty() {
            return Ok(Ready::default());
        }
        loop {
            match poll(&mut fds, timeout.unwrap_or(PollTimeout::NONE)) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let is_ready = |fd: &PollFd| fd.revents().is_some_and(|r| r.intersects(readable));
        let mut ready = Ready::default();
        let mut it = fds.iter();
        if want_stdout {
            ready.stdout = it.next().is_some_and(is_ready);
        }
        if self.stderr.is_some() {
            ready.stderr = it.next().is_some_and(is_ready);
        }
        Ok(ready)
    }

    /// Reads once from a readable stderr into `log` (and the tail).
    fn read_stderr(&mut self, log: &mut dyn Write) -> io::Result<()> {
        let Some(stderr) = &mut self.stderr else {
            return Ok(());
        };
        let mut buf = [0u8; 16 * 1024];
        let n = read_retrying(stderr, &mut buf)?;
        if n == 0 {
            self.stderr = None;
            return Ok(());
        }
        self.tail.extend_from_slice(&buf[..n]);
        if self.tail.len() > TAIL_MAX {
            self.tail.drain(..self.tail.len() - TAIL_MAX);
        }
        log.write_all(&buf[..n])
    }
}

fn read_retrying(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Which streams [`ChildTransport::poll_streams`] found readable.
#[derive(Default)]
struct Ready {
    stdout: bool,
    stderr: bool,
}

impl Read for ChildTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Write for ChildTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stdin {
            Some(w) => w.write(buf),
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the child's stdin is closed",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stdin {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Transport for ChildTransport {
    fn wait_reply(&mut self, log: &mut dyn Write, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            if !self.stdout.buffer().is_empty() {
                return Ok(());
            }
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no reply from the serve server before the deadline",
                        ));
                    }
                    // Capped: a poll timeout is an i32 of milliseconds, and
                    // the loop comes back to wait for the rest.
                    let ms = left.as_millis().clamp(1, 60_000);
                    Some(PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX))
                }
            };
            let ready = self.poll_streams(true, timeout)?;
            if ready.stderr {
                self.read_stderr(log)?;
            }
            if ready.stdout {
                // Readable: this read does not block, and nothing read is lost.
                return if self.stdout.fill_buf()?.is_empty() {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the serve server closed its output",
                    ))
                } else {
                    Ok(())
                };
            }
        }
    }

    fn drain_log(&mut self, log: &mut dyn Write) -> io::Result<()> {
        while self.stderr.is_some() {
            if !self.poll_streams(false, Some(PollTimeout::ZERO))?.stderr {
                break;
            }
            self.read_stderr(log)?;
        }
        Ok(())
    }
}

impl Drop for ChildTransport {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
