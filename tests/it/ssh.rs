//! `remote::ssh` against real sshd test hosts: host keys, authentication,
//! timeouts, big streams, chatty stderr and a link that dies.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandoff::decide::nix_format::{self, NoIncludes};
use sandoff::decide::Machine;
use sandoff::remote::ssh::{SshError, SshOptions, SshSession};
use sandoff::remote::transport::Transport;

use crate::hosts::TestHost;
use crate::support::{self, Need};
use crate::this_test;

/// The machine entry that testhosts.sh wrote for `host`.
fn machine(host: &TestHost) -> Machine {
    let text = std::fs::read_to_string(host.machines()).expect("machines");
    let mut machines =
        nix_format::parse(&text, "machines", "x86_64-linux", &NoIncludes).expect("parses");
    assert_eq!(machines.len(), 1);
    machines.remove(0)
}

/// Options that never look at the real `~/.ssh`.
fn opts() -> SshOptions {
    SshOptions {
        connect_timeout: Duration::from_secs(10),
        keepalive: Duration::from_secs(5),
        known_hosts: Some(PathBuf::from("/nonexistent/known_hosts")),
        default_identity: Some(PathBuf::from("/nonexistent/id_ed25519")),
    }
}

/// A machine on `addr:port` with nothing else set.
fn bare_machine(addr: &str, port: u16) -> Machine {
    let line = format!("ssh://root@{addr}:{port} x86_64-linux\n");
    nix_format::parse(&line, "machines", "x86_64-linux", &NoIncludes)
        .expect("parses")
        .remove(0)
}

/// A fresh ed25519 key pair at `path`; returns the public-key line.
fn keygen(path: &Path) -> String {
    support::run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
    );
    std::fs::read_to_string(path.with_extension("pub"))
        .expect("pub")
        .trim()
        .to_owned()
}

fn host_pub(host: &TestHost) -> String {
    std::fs::read_to_string(host.home.join("ssh_host_ed25519_key.pub"))
        .expect("host key")
        .trim()
        .to_owned()
}

/// `type base64` of a public-key line (its comment dropped).
fn key_only(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`TestHost::start_if_ready`], and a session to it with its machine entry.
fn connected(test: &str, index: u8) -> Option<(TestHost, SshSession)> {
    connected_with_keepalive(test, index, opts().keepalive)
}

/// [`connected`] with keepalives every `keepalive`.
fn connected_with_keepalive(
    test: &str,
    index: u8,
    keepalive: Duration,
) -> Option<(TestHost, SshSession)> {
    let host = TestHost::start_if_ready(test, index)?;
    let o = SshOptions {
        keepalive,
        ..opts()
    };
    let session = SshSession::connect(&machine(&host), &o).expect("connects");
    Some((host, session))
}

fn connect_err(m: &Machine, o: &SshOptions) -> SshError {
    match SshSession::connect(m, o) {
        Ok(_) => panic!("connect to {} succeeded", m.store_uri),
        Err(e) => e,
    }
}

#[test]
fn ssh_connects_with_the_entry_host_key_and_runs() {
    let Some((host, session)) = connected(this_test!(), 21) else {
        return;
    };
    assert_eq!(session.host(), format!("{}:{}", host.addr, host.port));
    let (out, err, status) = session
        .run("echo $SANDOFF_STORE_ROOT; echo oops >&2; exit 3")
        .expect("runs");
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        host.root().display().to_string()
    );
    assert_eq!(err, b"oops\n");
    assert_eq!(status, 3);
    // The session serves several commands, one after the other.
    let (out, _, status) = session.run("cat /proc/loadavg").expect("runs");
    assert_eq!(status, 0);
    assert_eq!(String::from_utf8_lossy(&out).split_whitespace().count(), 5);
    let (_, _, status) = session.run("kill -9 $$").expect("runs");
    assert_eq!(status, 128 + 9);
}

#[test]
fn ssh_run_takes_at_most_its_output_limit() {
    let Some((host, session)) = connected(this_test!(), 34) else {
        return;
    };
    let limit = sandoff::remote::ssh::RUN_OUTPUT_LIMIT;
    let (out, _, status) = session
        .run(&format!("head -c {limit} /dev/zero"))
        .expect("exactly the limit is fine");
    assert_eq!((out.len() as u64, status), (limit, 0));
    // A machine that never stops printing (stdout, then stderr): refused
    // at the limit instead of filling this host's memory.
    for command in ["cat /dev/zero", "cat /dev/zero >&2"] {
        let session = SshSession::connect(&machine(&host), &opts()).expect("connects");
        let e = session.run(command).unwrap_err();
        assert!(matches!(e, SshError::OutputTooLong { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("printed more than the limit of 1 MiB"),
            "{e}"
        );
    }
}

#[test]
fn ssh_wrong_entry_host_key_is_refused_naming_both_keys() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 22) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let other = keygen(&tmp.path().join("other"));
    let mut m = machine(&host);
    m.host_key = Some(other.clone());
    let err = connect_err(&m, &opts());
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err}");
    assert!(err.is_machine_failure());
    let msg = err.to_string();
    assert!(msg.contains(&key_only(&other)), "{msg}");
    assert!(msg.contains(&key_only(&host_pub(&host))), "{msg}");
    assert!(msg.contains(&host.addr), "{msg}");

    // A key that is not a key at all is the entry's fault, not the host's.
    m.host_key = Some("ssh-ed25519 not-base64!".to_owned());
    let err = connect_err(&m, &opts());
    assert!(matches!(err, SshError::BadHostKey { .. }), "{err}");
    assert!(!err.is_machine_failure());
}

#[test]
fn ssh_known_hosts_checks_entries_without_host_key() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 23) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut m = machine(&host);
    m.host_key = None;

    // The key is in known_hosts as [addr]:port: accepted.
    let o = SshOptions {
        known_hosts: Some(host.known_hosts()),
        ..opts()
    };
    let session = SshSession::connect(&m, &o).expect("known host connects");
    assert_eq!(session.run("true").expect("runs").2, 0);

    // Hashed names, among lines libssh2 cannot read: still found.
    let hashed = tmp.path().join("hashed_known_hosts");
    std::fs::write(
        &hashed,
        format!("[{}]:{} {}\n", host.addr, host.port, host_pub(&host)),
    )
    .expect("write");
    support::run_ok(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&hashed));
    let text = std::fs::read_to_string(&hashed).expect("read");
    assert!(text.starts_with("|1|"), "not hashed: {text}");
    std::fs::write(
        &hashed,
        format!(
            "@cert-authority *.example.org {}\n\
             odd.example.org sk-ssh-ed25519@openssh.com AAAAInNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIA==\n\
             garbage\n{text}",
            host_pub(&host)
        ),
    )
    .expect("write");
    let o = SshOptions {
        known_hosts: Some(hashed),
        ..opts()
    };
    SshSession::connect(&m, &o).expect("hashed known host connects");

    // Another key under this host's name: a mismatch naming both.
    let other = keygen(&tmp.path().join("other"));
    let wrong = tmp.path().join("wrong_known_hosts");
    std::fs::write(
        &wrong,
        format!("# test\n[{}]:{} {other}\n", host.addr, host.port),
    )
    .expect("write");
    let o = SshOptions {
        known_hosts: Some(wrong),
        ..opts()
    };
    let err = connect_err(&m, &o);
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&key_only(&other)), "{msg}");
    assert!(msg.contains(&key_only(&host_pub(&host))), "{msg}");

    // Listed for another port only, or a missing file: unknown.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::write(
        &elsewhere,
        format!("[{}]:{} {}\n", host.addr, host.port + 1, host_pub(&host)),
    )
    .expect("write");
    for path in [elsewhere, tmp.path().join("missing")] {
        let o = SshOptions {
            known_hosts: Some(path.clone()),
            ..opts()
        };
        let err = connect_err(&m, &o);
        assert!(matches!(err, SshError::UnknownHost { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&key_only(&host_pub(&host))), "{msg}");
    }
}

#[test]
fn ssh_wrong_client_key_fails_authentication() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 24) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let stranger = tmp.path().join("stranger");
    keygen(&stranger);
    let mut m = machine(&host);
    m.private_key = Some(stranger.display().to_string());
    let err = connect_err(&m, &opts());
    assert!(matches!(err, SshError::Auth { .. }), "{err}");
    assert!(err.is_machine_failure());
    assert!(err.to_string().contains("stranger"), "{err}");

    // No key in the entry: the default identity, which does not exist here.
    m.private_key = None;
    let err = connect_err(&m, &opts());
    assert!(matches!(err, SshError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/id_ed25519"), "{err}");

    // The default identity is used when it is the right key.
    let o = SshOptions {
        default_identity: Some(host.client_key()),
        ..opts()
    };
    SshSession::connect(&m, &o).expect("default identity works");
}

#[test]
fn ssh_key_and_known_hosts_files_must_be_regular_files() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 33) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let fifo = tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Read whole, a FIFO with no writer hangs and /dev/zero never ends:
    // each is refused before libssh2 sees it.
    for bad in [fifo.clone(), PathBuf::from("/dev/zero")] {
        let mut m = machine(&host);
        m.private_key = Some(bad.display().to_string());
        let err = connect_err(&m, &opts());
        assert!(matches!(err, SshError::Auth { .. }), "{err}");
        assert!(err.to_string().contains("not a regular file"), "{err}");

        let mut m = machine(&host);
        m.host_key = None;
        let o = SshOptions {
            known_hosts: Some(bad.clone()),
            ..opts()
        };
        let err = connect_err(&m, &o);
        assert!(matches!(err, SshError::UnknownHost { .. }), "{err}");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}

#[test]
fn ssh_nothing_listening_fails_fast() {
    // Bound and dropped: nothing listens on that port now.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let m = bare_machine("127.0.0.1", port);
    // Fast: refused at once, not given up on after the connect timeout.
    let err = connect_err(&m, &opts());
    assert!(
        matches!(&err, SshError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err}"
    );
    assert!(err.is_machine_failure());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn ssh_silent_server_times_out_in_handshake() {
    // Accepts the connection and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Holds the connection, silent, until told to let go: a connect that
    // returns first gave up on its own, at the handshake.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = listener.accept();
        let _ = held.recv_timeout(Duration::from_secs(300));
        drop(conn);
    });
    let m = bare_machine("127.0.0.1", port);
    let o = SshOptions {
        connect_timeout: Duration::from_millis(700),
        ..opts()
    };
    let err = connect_err(&m, &o);
    let _ = release.send(());
    assert!(matches!(err, SshError::Handshake { .. }), "{err}");
    holder.join().expect("holder");
}

#[test]
fn ssh_connect_to_a_full_backlog_times_out() {
    use nix::sys::socket::SockaddrIn;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    // A listener that never accepts, with the smallest backlog: once its
    // queue is full the kernel drops further SYNs, like a black hole.
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, 0),
    )
    .expect("bind");
    listen(&fd, Backlog::new(0).expect("backlog")).expect("listen");
    let local: SockaddrIn =
        nix::sys::socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("name");
    let port = local.port();
    let mut queued = Vec::new();
    let full = (0..16).any(|_| {
        match TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().expect("addr"),
            Duration::from_millis(300),
        ) {
            Ok(s) => {
                queued.push(s);
                false
            }
            Err(_) => true,
        }
    });
    let what = "a listen backlog that fills (SYNs dropped once full)";
    if !support::require(this_test!(), &[Need::Condition { what, met: full }]) {
        return;
    }
    let m = bare_machine("127.0.0.1", port);
    let o = SshOptions {
        connect_timeout: Duration::from_millis(800),
        ..opts()
    };
    let start = Instant::now();
    let err = connect_err(&m, &o);
    let took = start.elapsed();
    assert!(
        matches!(&err, SshError::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
        "{err}"
    );
    // It waited for its timeout (a lower bound: load only makes it truer).
    assert!(took >= Duration::from_millis(700), "{took:?}");
    drop(queued);
}

#[test]
fn ssh_cat_round_trips_10_mib() {
    let Some((_host, session)) = connected(this_test!(), 25) else {
        return;
    };
    let mut channel = session.exec("cat").expect("exec");
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut back = vec![0u8; data.len()];
    // cat echoes as it reads: read back each MiB before the window fills.
    for (chunk, out) in data.chunks(1 << 20).zip(back.chunks_mut(1 << 20)) {
        channel.write_all(chunk).expect("write");
        channel.flush().expect("flush");
        let mut log = Vec::new();
        channel
            .wait_reply(&mut log, Some(Instant::now() + Duration::from_secs(300)))
            .expect("reply");
        channel.read_exact(out).expect("read back");
        assert!(log.is_empty());
    }
    assert!(back == data, "cat returned other bytes");
    assert_eq!(channel.close().expect("close"), 0);
}

#[test]
fn ssh_wait_reply_copies_5_mib_of_stderr_without_deadlock() {
    let Some((host, session)) = connected(this_test!(), 26) else {
        return;
    };
    let mut channel = session
        .exec("head -c 5242880 /dev/zero | tr '\\0' x >&2; echo reply")
        .expect("exec");
    let mut log = Vec::new();
    channel
        .wait_reply(&mut log, Some(Instant::now() + Duration::from_secs(300)))
        .expect("reply");
    assert_eq!(log.len(), 5 << 20);
    assert!(log.iter().all(|&b| b == b'x'));
    let mut reply = String::new();
    channel.read_to_string(&mut reply).expect("read");
    assert_eq!(reply, "reply\n");
    let mut more = Vec::new();
    channel.drain_log(&mut more).expect("drain");
    assert!(more.is_empty());
    assert_eq!(channel.close().expect("close"), 0);

    // Silence until the deadline: TimedOut; a program that ends: EOF.
    let mut channel = session.exec("sleep 1000").expect("exec");
    let err = channel
        .wait_reply(&mut log, Some(Instant::now() + Duration::from_millis(500)))
        .expect_err("times out");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    drop(channel);
    let mut channel = session.exec("echo bye >&2; exit 5").expect("exec");
    let mut log = Vec::new();
    let err = channel.wait_reply(&mut log, None).expect_err("eof");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert_eq!(log, b"bye\n");
    // The process is gone; closing still tells how it ended.
    assert_eq!(channel.close().expect("close"), 5);

    // Dropping a channel does not wait for its process, which sees EOF.
    let marker = host.home.join("eof-seen");
    let channel = session
        .exec(&format!("cat >/dev/null; touch {}", marker.display()))
        .expect("exec");
    // A drop that waited for the process would never return: the
    // process ends only on the EOF the drop sends.
    drop(channel);
    let seen = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        marker.exists()
    });
    assert!(seen, "the remote process never saw EOF");
    assert_eq!(session.run("true").expect("session still works").2, 0);
}

/// The pids of `pid`'s descendants.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parents = std::collections::HashMap::<i32, Vec<i32>>::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The fields after the command name, which may hold spaces.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in parents.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

#[test]
fn ssh_wait_reply_fails_when_sshd_dies() {
    let Some((host, session)) = connected(this_test!(), 27) else {
        return;
    };
    let mut channel = session.exec("sleep 60; echo late").expect("exec");
    let sshd: i32 = std::fs::read_to_string(host.home.join("sshd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        // The per-connection sshd processes and the remote command.
        for pid in descendants(sshd) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let mut log = Vec::new();
    let err = channel
        .wait_reply(&mut log, Some(Instant::now() + Duration::from_secs(300)))
        .expect_err("the link is gone");
    killer.join().expect("killer");
    // Noticed as a dead link, not by running out the deadline.
    assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains(&host.addr), "{err}");
    // The dead session refuses new commands instead of hanging.
    assert!(session.exec("true").is_err());
}

/// CPU seconds (user + system) from `/proc/<path>/stat`: this thread's own
/// (fields 14, 15), or its process's waited-for children (fields 16, 17).
fn cpu_seconds(path: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{path}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(") ").expect("stat format");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // `rest` starts at field 3 (state); ticks are 1/100 s on Linux.
    let first = if children { 16 } else { 14 } - 3;
    (fields[first] + fields[first + 1]) / 100.0
}

/// Pushes 200 MiB through `Write` to `cat > /dev/null` and the same through
/// OpenSSH's `ssh` (its default cipher and AES-GCM), three times each,
/// printing the best rates and the client's CPU time. Run by hand, alone:
/// `cargo test --test it ssh_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn ssh_throughput_against_openssh() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 28) else {
        return;
    };
    const TOTAL: usize = 200 << 20;
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let session = SshSession::connect(&machine(&host), &opts()).expect("connects");

    let ours = || {
        let cpu = cpu_seconds("thread-self", false);
        let start = Instant::now();
        let mut channel = session.exec("cat > /dev/null").expect("exec");
        for _ in 0..TOTAL / chunk.len() {
            channel.write_all(&chunk).expect("write");
        }
        assert_eq!(channel.close().expect("close"), 0);
        (start.elapsed(), cpu_seconds("thread-self", false) - cpu)
    };
    let openssh = |cipher: &str| {
        let cpu = cpu_seconds("self", true);
        let start = Instant::now();
        let mut ssh = Command::new("ssh");
        ssh.args(["-c", cipher])
            .args(host.ssh_opts())
            .args([format!("root@{}", host.addr), "cat > /dev/null".to_owned()]);
        let mut ssh = ssh
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("ssh");
        let mut stdin = ssh.stdin.take().expect("stdin");
        for _ in 0..TOTAL / chunk.len() {
            stdin.write_all(&chunk).expect("write");
        }
        drop(stdin);
        assert!(ssh.wait().expect("wait").success());
        (start.elapsed(), cpu_seconds("self", true) - cpu)
    };
    let mut best = [(Duration::MAX, 0.0); 3];
    for _ in 0..3 {
        let runs = [
            ours(),
            openssh("chacha20-poly1305@openssh.com"),
            openssh("aes128-gcm@openssh.com"),
        ];
        for (b, r) in best.iter_mut().zip(runs) {
            if r.0 < b.0 {
                *b = r;
            }
        }
    }
    // Downloads: 8 KiB reads (as `io::copy` does) from `head -c`.
    let command = format!("head -c {TOTAL} /dev/zero");
    let down_ours = || {
        let start = Instant::now();
        let mut channel = session.exec(&command).expect("exec");
        let n = std::io::copy(&mut channel, &mut std::io::sink()).expect("read");
        assert_eq!(n as usize, TOTAL);
        assert_eq!(channel.close().expect("close"), 0);
        (start.elapsed(), 0.0)
    };
    let down_openssh = || {
        let start = Instant::now();
        let out = Command::new("ssh")
            .args(["-c", "aes128-gcm@openssh.com"])
            .args(host.ssh_opts())
            .args([format!("root@{}", host.addr), command.clone()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ssh")
            .wait_with_output()
            .expect("ssh");
        assert_eq!(out.stdout.len(), TOTAL);
        (start.elapsed(), 0.0)
    };
    let mut down = [(Duration::MAX, 0.0); 2];
    for _ in 0..2 {
        for (b, r) in down.iter_mut().zip([down_ours(), down_openssh()]) {
            if r.0 < b.0 {
                *b = r;
            }
        }
    }

    let rate = |d: Duration| TOTAL as f64 / 1e6 / d.as_secs_f64();
    for (name, (wall, _)) in ["download ssh2", "download ssh aes128-gcm"]
        .iter()
        .zip(down)
    {
        eprintln!("{name}: {:.0} MB/s ({wall:.2?})", rate(wall));
    }
    for (name, (wall, cpu)) in ["ssh2 (aes128-ctr)", "ssh chacha20", "ssh aes128-gcm"]
        .iter()
        .zip(best)
    {
        eprintln!(
            "{name}: {:.0} MB/s ({wall:.2?}), client CPU {cpu:.2} s",
            rate(wall)
        );
    }
}

#[test]
fn ssh_write_fails_when_the_remote_program_exits() {
    let Some((_host, session)) = connected(this_test!(), 29) else {
        return;
    };
    let mut channel = session.exec("head -c 1000 >/dev/null").expect("exec");
    let chunk = vec![7u8; 1 << 20];
    let res = (0..64).try_for_each(|_| channel.write_all(&chunk));
    let err = res.expect_err("writing to a program that is gone fails");
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
}

#[test]
fn ssh_blocking_io_outlasts_keepalive_intervals() {
    let keepalive = Duration::from_secs(2);
    let Some((_host, session)) = connected_with_keepalive(this_test!(), 30, keepalive) else {
        return;
    };
    // A silent server is not a dead one: reads wait through keepalives...
    let mut channel = session.exec("sleep 5; echo late").expect("exec");
    let mut out = String::new();
    channel.read_to_string(&mut out).expect("read");
    assert_eq!(out, "late\n");
    assert_eq!(channel.close().expect("close"), 0);
    // ...and so do writes into a full window.
    let mut channel = session.exec("sleep 5; cat >/dev/null").expect("exec");
    let chunk = vec![1u8; 1 << 20];
    for _ in 0..8 {
        channel.write_all(&chunk).expect("write");
    }
    assert_eq!(channel.close().expect("close"), 0);
}

#[test]
fn ssh_wait_reply_keeps_deadlines_and_answers_promptly() {
    // Long keepalives: a missed wake-up would stall for 30 s.
    let keepalive = Duration::from_secs(30);
    let Some((_host, session)) = connected_with_keepalive(this_test!(), 31, keepalive) else {
        return;
    };

    // A build that logs all the time still meets its deadline.
    let mut channel = session
        .exec("while :; do echo building >&2; sleep 0.01; done")
        .expect("exec");
    let mut log = Vec::new();
    // The log never stops, so only the deadline can end the wait.
    let err = channel
        .wait_reply(&mut log, Some(Instant::now() + Duration::from_secs(1)))
        .expect_err("times out");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(log.starts_with(b"building\n"));
    drop(channel);

    // Interleaved log and replies: each reply is seen as it comes.
    let mut channel = session
        .exec("for i in $(seq 100); do echo log$i >&2; echo reply$i; sleep 0.005; done")
        .expect("exec");
    // Each reply within 20 s: a missed wake-up would wait for the 30 s
    // keepalive and run out that deadline.
    let mut log = Vec::new();
    let mut replies = String::new();
    for _ in 0..100 {
        channel
            .wait_reply(&mut log, Some(Instant::now() + Duration::from_secs(20)))
            .expect("reply");
        let mut byte = [0u8];
        loop {
            channel.read_exact(&mut byte).expect("read");
            replies.push(byte[0] as char);
            if byte[0] == b'\n' {
                break;
            }
        }
    }
    channel.drain_log(&mut log).expect("drain");
    assert_eq!(replies.lines().count(), 100);
    assert!(replies.starts_with("reply1\nreply2\n"), "{replies}");
    assert_eq!(channel.close().expect("close"), 0);
    let log = String::from_utf8(log).expect("utf-8");
    assert_eq!(log.lines().count(), 100, "{log}");
}

#[test]
fn ssh_plain_reads_and_writes_survive_a_flood_of_stderr() {
    let Some((_host, session)) = connected(this_test!(), 32) else {
        return;
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // 5 MiB of log (more than the channel window) before the reply,
        // read without wait_reply: kept for the next log copy.
        let mut channel = session
            .exec("head -c 5242880 /dev/zero >&2; echo reply")
            .expect("exec");
        let mut reply = String::new();
        channel.read_to_string(&mut reply).expect("read");
        assert_eq!(reply, "reply\n");
        let mut log = Vec::new();
        channel.drain_log(&mut log).expect("drain");
        assert_eq!(log.len(), 5 << 20);
        assert_eq!(channel.close().expect("close"), 0);

        // The same log before the server reads its input.
        let mut channel = session
            .exec("head -c 5242880 /dev/zero >&2; cat >/dev/null")
            .expect("exec");
        let chunk = vec![3u8; 1 << 20];
        for _ in 0..8 {
            channel.write_all(&chunk).expect("write");
        }
        let mut log = Vec::new();
        channel.drain_log(&mut log).expect("drain");
        assert_eq!(channel.close().expect("close"), 0);
        done_tx.send(log.len()).expect("send");
    });
    let log_len = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no deadlock within 60 s");
    assert_eq!(log_len, 5 << 20);
}
