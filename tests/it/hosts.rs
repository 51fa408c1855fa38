//! Real build hosts for tests: sshd instances started by
//! `examples/testhosts.sh`, the harness users get, so the tested one.

use std::path::{Path, PathBuf};
use std::process::Command;

use sandoff::decide::nix_format::{self, NoIncludes};
use tempfile::TempDir;

use crate::support::{self, Need};

/// What a test needs to start a [`TestHost`].
pub const NEEDS: &[Need] = &[
    Need::Root,
    Need::Program("sshd"),
    Need::Program("ssh"),
    Need::Program("ssh-keygen"),
];

fn script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/testhosts.sh"
    ))
}

/// One sshd on 127.0.0.(1+index) with its own host key and store root;
/// dropping it stops sshd (by its pid) and removes its directory.
pub struct TestHost {
    dir: TempDir,
    /// The host's directory, `<dir>/host<index>`.
    pub home: PathBuf,
    /// The loopback address sshd listens on.
    pub addr: String,
    /// The port sshd listens on.
    pub port: u16,
}

impl TestHost {
    /// Starts host `index` (1 → 127.0.0.2) on a port that was free just now.
    pub fn start(index: u8) -> TestHost {
        let addr = format!("127.0.0.{}", 1 + index);
        // Random ports keep concurrent tests and runs out of each other's way.
        let port = std::net::TcpListener::bind((addr.as_str(), 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        support::run_ok(
            Command::new("bash")
                .arg(script())
                .args(["start", "1"])
                .arg(dir.path())
                .env("SANDOFF", env!("CARGO_BIN_EXE_sandoff"))
                .env("TESTHOSTS_FIRST", index.to_string())
                .env("TESTHOSTS_PORT", port.to_string()),
        );
        let hosts = std::fs::read_to_string(dir.path().join("hosts")).expect("hosts file");
        let fields: Vec<&str> = hosts.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "hosts file: {hosts:?}");
        TestHost {
            home: PathBuf::from(fields[0]),
            addr: fields[1].to_owned(),
            port: fields[2].parse().expect("port"),
            dir,
        }
    }

    /// The client key every test host accepts.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    /// The host's line in Nix's machines format.
    pub fn machines(&self) -> PathBuf {
        self.dir.path().join("machines")
    }

    /// A known_hosts file with this host's key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// The host's store root, its sessions' `SANDOFF_STORE_ROOT`.
    pub fn root(&self) -> PathBuf {
        self.home.join("root")
    }

    /// The `remote-program` for Nix's `ssh://` store.
    pub fn serve_program(&self) -> PathBuf {
        self.home.join("serve")
    }

    /// ssh options that log in with `key` and check the host against `known_hosts`.
    pub fn ssh_opts_with(&self, key: &Path, known_hosts: &Path) -> Vec<String> {
        vec![
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            key.display().to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-F".into(),
            "/dev/null".into(),
        ]
    }

    /// ssh options for this host, as `NIX_SSHOPTS` takes them.
    pub fn ssh_opts(&self) -> Vec<String> {
        self.ssh_opts_with(&self.client_key(), &self.known_hosts())
    }

    /// `ssh root@<host> <command>` with the given key and known_hosts.
    pub fn ssh_with(&self, key: &Path, known_hosts: &Path, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts_with(key, known_hosts))
            .arg(format!("root@{}", self.addr))
            .arg(command);
        c
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // The script kills sshd by the pid in its PidFile.
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// A fresh ed25519 key pair at `path` (and `path.pub`).
fn keygen(path: &Path) {
    support::run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
    );
}

#[test]
fn hosts_accept_the_client_key_and_refuse_others() {
    if !support::require("hosts_accept_the_client_key_and_refuse_others", NEEDS) {
        return;
    }
    let host = TestHost::start(1);
    let out = support::run_ok(&mut host.ssh_with(
        &host.client_key(),
        &host.known_hosts(),
        "echo $SANDOFF_STORE_ROOT; command -v sandoff",
    ));
    let out = String::from_utf8_lossy(&out);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(host.root().to_str().expect("utf-8")));
    assert!(
        lines.next().is_some_and(|l| l.ends_with("/sandoff")),
        "{out}"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    // Another host's key under this host's name: verification fails.
    let other = tmp.path().join("other_host");
    keygen(&other);
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).expect("pub");
    let wrong_known = tmp.path().join("known_hosts");
    std::fs::write(
        &wrong_known,
        format!("[{}]:{} {}", host.addr, host.port, other_pub),
    )
    .expect("write known_hosts");
    let res = host
        .ssh_with(&host.client_key(), &wrong_known, "true")
        .output()
        .expect("spawn ssh");
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("Host key verification failed"), "{err}");

    // An unknown client key: refused.
    let stranger = tmp.path().join("stranger");
    keygen(&stranger);
    let res = host
        .ssh_with(&stranger, &host.known_hosts(), "true")
        .output()
        .expect("spawn ssh");
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn hosts_machines_file_and_signing_key() {
    if !support::require("hosts_machines_file_and_signing_key", NEEDS) {
        return;
    }
    let host = TestHost::start(2);
    let text = std::fs::read_to_string(host.machines()).expect("machines");
    let machines = nix_format::parse(&text, "machines", "x86_64-linux", &NoIncludes)
        .expect("machines file parses");
    assert_eq!(machines.len(), 1);
    let m = &machines[0];
    assert_eq!(m.host.as_deref(), Some(host.addr.as_str()));
    assert_eq!(m.port, Some(host.port));
    assert_eq!(m.user.as_deref(), Some("root"));
    let key = host.client_key();
    assert_eq!(m.private_key.as_deref(), key.to_str());
    let host_pub =
        std::fs::read_to_string(host.home.join("ssh_host_ed25519_key.pub")).expect("host key");
    assert_eq!(m.host_key.as_deref(), Some(host_pub.trim()));

    // Each host has its own signing key where `sandoff key show` finds it.
    let out = support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(host.root())
            .args(["key", "show"]),
    );
    assert!(String::from_utf8_lossy(&out).starts_with("host2-1:"));
}

#[test]
fn hosts_stop_kills_sshd() {
    if !support::require("hosts_stop_kills_sshd", NEEDS) {
        return;
    }
    let host = TestHost::start(4);
    let pid: i32 = std::fs::read_to_string(host.home.join("sshd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());
    drop(host);
    // sshd may linger as a zombie until PID 1 reaps it; it no longer listens.
    let gone = (0..50).any(|_| {
        let state = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        if state.is_empty() || state.contains(") Z ") {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        false
    });
    assert!(gone, "sshd {pid} still running");
}
