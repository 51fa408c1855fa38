//! The SSH session: TCP connect with a timeout and keepalives, the
//! handshake with preferred methods, the host key check (against the
//! machine entry, else known_hosts) and public-key authentication.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ssh2::{CheckResult, KnownHostFileKind, MethodType};
use zeroize::Zeroizing;

use super::channel::{poll_session, SshChannel, IDLE_WAIT, LIBSSH2_ERROR_TIMEOUT};
use super::command::wire_compression;
use super::host_key::{self, host_port, hostkey_algorithms, PublicKey};
use super::{SshError, SshOptions, RUN_OUTPUT_LIMIT};
use crate::bounded;
use crate::decide::Machine;
use crate::remote::compress::WireCompression;

/// How many keepalive intervals opening a channel and starting a command
/// may take (as many as blocking libssh2 calls were retried before).
const STEP_KEEPALIVES: u32 = 5;

/// libssh2's `LIBSSH2_ERROR_EAGAIN`: a non-blocking call would block.
const LIBSSH2_ERROR_EAGAIN: i32 = -37;

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
        // A stock Nix serve program speaks plain bytes: when the entry asks
        // for compression, SSH compresses (zlib, as Nix's `ssh -C` and
        // Guix's guile-ssh). A sandoff peer gets zstd instead (cheaper per
        // byte), never both.
        if wire_compression(machine) == WireCompression::SshZlib {
            session.set_compress(true);
            prefer_compression(&session, &host);
        }
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
            compression = session.methods(MethodType::CompCs).unwrap_or("?"),
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

    /// The SSH compression negotiated for what this side sends
    /// (`zlib@openssh.com`, `zlib`), `None` when it sends plain packets.
    pub fn ssh_compression(&self) -> Option<String> {
        self.session
            .methods(MethodType::CompCs)
            .filter(|m| *m != "none")
            .map(str::to_owned)
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
        // Each step waits for the server's answer; see `step`.
        self.session.set_blocking(false);
        let opened = self.step(|| self.session.channel_session());
        let started =
            opened.and_then(|mut channel| self.step(|| channel.exec(command)).map(|()| channel));
        self.session.set_blocking(true);
        let channel = started.map_err(exec_err)?;
        Ok(SshChannel::new(
            &self.session,
            channel,
            socket,
            self.host.clone(),
            self.keepalive,
        ))
    }

    /// Runs one non-blocking libssh2 step until it is done. Between tries
    /// it acknowledges at once what the server sent: sshd does not set
    /// `TCP_NODELAY` on a session without a terminal, so a small packet of
    /// its (the channel confirmation) waits until its previous one is
    /// acknowledged, and the kernel would delay that acknowledgement by up
    /// to 40 ms while this side only waits (measured: 50 ms of the channel
    /// open on a 10 ms link). A slow server may take a few keepalive
    /// intervals to answer, not forever: after [`STEP_KEEPALIVES`] of them,
    /// libssh2's timeout error.
    fn step<T>(&self, mut op: impl FnMut() -> Result<T, ssh2::Error>) -> Result<T, ssh2::Error> {
        let interval = if self.keepalive.is_zero() {
            IDLE_WAIT
        } else {
            self.keepalive
        };
        let deadline = Instant::now() + interval * STEP_KEEPALIVES;
        loop {
            match op() {
                Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_EAGAIN) => {}
                done => return done,
            }
            // Best effort: an error here only means the ACK waits.
            let _ = rustix::net::sockopt::set_tcp_quickack(&self.socket, true);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ssh2::Error::new(
                    ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT),
                    "timed out waiting for the server",
                ));
            }
            if !self.keepalive.is_zero() {
                // Due or not, libssh2 decides; it cannot block here.
                let _ = self.session.keepalive_send();
            }
            // Whatever poll says, the next try reports what is wrong with
            // the socket, if anything is.
            let _ = poll_session(&self.session, &self.socket, left.min(interval));
        }
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
        channel.send_eof().map_err(|e| lost(io::Error::from(e)))?;
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

/// SSH compression methods in order of preference: OpenSSH's delayed
/// zlib first (compression starts after authentication, so nothing
/// unauthenticated reaches zlib), then plain zlib, then none, so that a
/// server that compresses nothing still connects.
fn prefer_compression(session: &ssh2::Session, host: &str) {
    for method in [MethodType::CompCs, MethodType::CompSc] {
        let supported = session.supported_algs(method).unwrap_or_default();
        let list: Vec<&str> = ["zlib@openssh.com", "zlib", "none"]
            .into_iter()
            .filter(|p| supported.contains(p))
            .collect();
        if let Err(e) = session.method_pref(method, &list.join(",")) {
            tracing::debug!(host, "compression preference {}: {e}", list.join(","));
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
    for line in host_key::known_hosts_entries(&text) {
        if let Err(e) = known.read_str(line, KnownHostFileKind::OpenSSH) {
            tracing::debug!(file = %path.display(), "skipping known_hosts line: {e}");
        }
    }
    match known.check_port(host, port, &offered.blob) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => Err(SshError::HostKeyMismatch {
            host: addr.clone(),
            expected: host_key::expected_from_known_hosts(&text, host, port, path),
            offered: offered.to_string(),
        }),
        CheckResult::NotFound | CheckResult::Failure => Err(unknown(String::new())),
    }
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
}
