//! The byte stream a serve client talks over, whatever carries it: an SSH
//! channel ([`super::ssh`]) or a local child process (tests, and
//! `nix-store --serve` on this machine).
//!
//! The serve protocol has two streams from the server: stdout carries the
//! protocol, stderr the build log. A client must keep reading stderr while it
//! waits for a reply, or a chatty build fills the pipe (or the SSH window)
//! and both sides wait for each other.

use std::io::{self, Read, Write};
use std::time::Instant;

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
