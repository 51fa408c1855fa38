//! Real build hosts for tests: sshd instances started by
//! `examples/testhosts.sh`, the harness users get, so the tested one.
//!
//! Host indices pick the loopback address (`127.0.0.(1+index)`) and, with
//! [`HostConfig::netns`], the namespace `sandoff-th<index>`; ports are random,
//! so tests may share an index unless they use namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sandoff::decide::nix_format::{self, NoIncludes};
use sandoff::decide::Machine;
use sandoff::store::StoreDir;
use tempfile::TempDir;

use crate::support::{self, Need};
use crate::this_test;

/// What a test needs to start a [`TestHost`].
pub const NEEDS: &[Need] = &[
    Need::Root,
    Need::Program("sshd"),
    Need::Program("ssh"),
    Need::Program("ssh-keygen"),
];

/// What a test needs to start a [`TestHost`] of [`HostKind::Nix`].
pub const NIX_NEEDS: &[Need] = &[
    Need::Root,
    Need::Program("sshd"),
    Need::Program("ssh"),
    Need::Program("ssh-keygen"),
    Need::Program("nix-store"),
];

fn script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/testhosts.sh"
    ))
}

/// What serves the host's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// `sandoff serve --stdio --write`.
    Sandoff,
    /// Nix 2.8's `nix-store --serve --write` on a chroot store.
    Nix,
}

/// How to start a [`TestHost`]: its kind and its machines-line fields.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// What serves the store.
    pub kind: HostKind,
    /// System types (machines-line field 2).
    pub systems: Vec<String>,
    /// Slots (`maxJobs`).
    pub max_jobs: u32,
    /// Speed factor.
    pub speed: u32,
    /// Supported features.
    pub features: Vec<String>,
    /// Mandatory features.
    pub mandatory: Vec<String>,
    /// Run sshd in network namespace `sandoff-th<index>` behind a veth pair
    /// (address 10.77.<index>.2), so the link can be cut.
    pub netns: bool,
    /// The store directory the host names its paths in
    /// (`TESTHOSTS_STORE_DIR`).
    pub store_dir: StoreDir,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            kind: HostKind::Sandoff,
            systems: vec!["x86_64-linux".into()],
            max_jobs: 2,
            speed: 1,
            features: Vec::new(),
            mandatory: Vec::new(),
            netns: false,
            store_dir: StoreDir::default(),
        }
    }
}

impl HostConfig {
    /// A Nix host with the default fields.
    pub fn nix() -> HostConfig {
        HostConfig {
            kind: HostKind::Nix,
            ..HostConfig::default()
        }
    }

    /// The same with these supported features.
    pub fn features(mut self, features: &[&str]) -> HostConfig {
        self.features = features.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The same with these mandatory features.
    pub fn mandatory(mut self, features: &[&str]) -> HostConfig {
        self.mandatory = features.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The same with `max_jobs` slots.
    pub fn max_jobs(mut self, max_jobs: u32) -> HostConfig {
        self.max_jobs = max_jobs;
        self
    }

    /// The same with speed factor `speed`.
    pub fn speed(mut self, speed: u32) -> HostConfig {
        self.speed = speed;
        self
    }

    /// The same with these system types.
    pub fn systems(mut self, systems: &[&str]) -> HostConfig {
        self.systems = systems.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The same in its own network namespace.
    pub fn netns(mut self) -> HostConfig {
        self.netns = true;
        self
    }

    /// The same with its store in `dir` (such as `/gnu/store`).
    pub fn store_dir(mut self, dir: &str) -> HostConfig {
        self.store_dir = StoreDir::new(dir).expect("a store directory");
        self
    }
}

/// One sshd on 127.0.0.(1+index) with its own host key and store root;
/// dropping it stops sshd and its sessions (by pid) and removes its
/// directory.
pub struct TestHost {
    dir: TempDir,
    /// The host's directory, `<dir>/host<index>`.
    pub home: PathBuf,
    /// The address sshd listens on.
    pub addr: String,
    /// The port sshd listens on.
    pub port: u16,
    /// What serves its store.
    pub kind: HostKind,
    /// Its network namespace, if it has one.
    pub netns: Option<String>,
    /// The store directory it names its paths in.
    pub store_dir: StoreDir,
    index: u8,
}

impl TestHost {
    /// After [`support::require`] of [`NEEDS`], starts host `index` as
    /// [`TestHost::start`] does.
    pub fn start_if_ready(test: &str, index: u8) -> Option<TestHost> {
        support::require(test, NEEDS).then(|| TestHost::start(index))
    }

    /// Starts sandoff host `index` (1 → 127.0.0.2) on a port that was free just now.
    pub fn start(index: u8) -> TestHost {
        TestHost::start_with(index, &HostConfig::default())
    }

    /// Starts a Nix 2.8 host `index` (`nix-store --serve --write`).
    pub fn start_nix(index: u8) -> TestHost {
        TestHost::start_with(index, &HostConfig::nix())
    }

    /// Starts host `index` as `config` says.
    pub fn start_with(index: u8, config: &HostConfig) -> TestHost {
        // Random ports keep concurrent tests and runs out of each other's
        // way; inside its own namespace a host has the address to itself.
        let port = if config.netns {
            22
        } else {
            std::net::TcpListener::bind((format!("127.0.0.{}", 1 + index).as_str(), 0))
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .args(["start", "1"])
            .arg(dir.path())
            .env("SANDOFF", env!("CARGO_BIN_EXE_sandoff"))
            .env("SANDOFF_USER_POOL_DIR", user_pool_dir())
            .env(
                "TESTHOSTS_KIND",
                match config.kind {
                    HostKind::Sandoff => "sandoff",
                    HostKind::Nix => "nix",
                },
            )
            .env("TESTHOSTS_FIRST", index.to_string())
            .env("TESTHOSTS_PORT", port.to_string())
            .env("TESTHOSTS_SYSTEMS", config.systems.join(","))
            .env("TESTHOSTS_MAX_JOBS", config.max_jobs.to_string())
            .env("TESTHOSTS_SPEED", config.speed.to_string())
            .env("TESTHOSTS_FEATURES", config.features.join(","))
            .env("TESTHOSTS_MANDATORY", config.mandatory.join(","))
            .env("TESTHOSTS_NETNS", if config.netns { "1" } else { "" })
            .env("TESTHOSTS_STORE_DIR", config.store_dir.as_str());
        support::run_ok(&mut cmd);
        let hosts = std::fs::read_to_string(dir.path().join("hosts")).expect("hosts file");
        let fields: Vec<&str> = hosts.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "hosts file: {hosts:?}");
        let home = PathBuf::from(fields[0]);
        let netns = std::fs::read_to_string(home.join("netns"))
            .ok()
            .map(|s| s.trim().to_owned());
        TestHost {
            home,
            addr: fields[1].to_owned(),
            port: fields[2].parse().expect("port"),
            kind: config.kind,
            netns,
            store_dir: config.store_dir.clone(),
            index,
            dir,
        }
    }

    /// The client key every test host accepts.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    /// A file with the host's line in Nix's machines format.
    pub fn machines(&self) -> PathBuf {
        self.dir.path().join("machines")
    }

    /// The host's line in Nix's machines format (no newline):
    /// `ssh://root@ADDR:PORT[?remote-program=...] SYSTEMS KEY MAXJOBS SPEED
    /// FEATURES MANDATORY HOSTKEY`.
    pub fn machine_line(&self) -> String {
        std::fs::read_to_string(self.home.join("machine"))
            .expect("machine line")
            .trim_end()
            .to_owned()
    }

    /// [`TestHost::machine_line`] with `max_jobs` slots and speed factor
    /// `speed`.
    pub fn machine_line_with(&self, max_jobs: u32, speed: u32) -> String {
        let mut fields: Vec<String> = self
            .machine_line()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        fields[3] = max_jobs.to_string();
        fields[4] = speed.to_string();
        fields.join(" ")
    }

    /// The host's machine line, parsed.
    pub fn machine(&self) -> Machine {
        let mut ms = nix_format::parse(
            &self.machine_line(),
            "machines",
            "x86_64-linux",
            &NoIncludes,
        )
        .expect("machine line parses");
        assert_eq!(ms.len(), 1);
        ms.remove(0)
    }

    /// The public key (`host<index>-1:base64`) the host signs its store
    /// paths with, for clients to trust.
    pub fn signing_public_key(&self) -> String {
        std::fs::read_to_string(self.home.join("signing-key.pub"))
            .expect("signing-key.pub")
            .trim()
            .to_owned()
    }

    /// A known_hosts file with this host's key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// The host's store root: its sessions' `SANDOFF_STORE_ROOT`, or the Nix
    /// host's chroot store.
    pub fn root(&self) -> PathBuf {
        self.home.join("root")
    }

    /// A Nix host's `NIX_CONF_DIR` (its nix.conf names its store and signing
    /// key): `NIX_CONF_DIR=<this> nix-store ...` works on the host's store.
    pub fn nix_conf_dir(&self) -> PathBuf {
        self.home.join("nixconf")
    }

    /// The `remote-program` for Nix's `ssh://` store.
    pub fn serve_program(&self) -> PathBuf {
        self.home.join("serve")
    }

    /// The listening sshd's pid.
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.home.join("sshd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills sshd and every process under it (per-connection sshd, the
    /// served program, its builds) at once with SIGKILL, as a crashing
    /// machine would: connections die, new ones are refused.
    pub fn kill(&self) {
        let Some(pid) = self.pid() else { return };
        kill_tree(pid);
        let _ = std::fs::remove_file(self.home.join("sshd.pid"));
    }

    /// Takes the host's link down (namespace hosts only): packets vanish,
    /// connections hang, as on a dead network.
    pub fn cut_link(&self) {
        self.set_link("down");
    }

    /// Brings the host's link back up after [`TestHost::cut_link`].
    pub fn restore_link(&self) {
        self.set_link("up");
    }

    fn set_link(&self, state: &str) {
        assert!(self.netns.is_some(), "only namespace hosts have a link");
        support::run_ok(Command::new("ip").args([
            "link",
            "set",
            &format!("sth{}h", self.index),
            state,
        ]));
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

    /// `ssh root@<host> <command>` with the client key and known_hosts.
    pub fn ssh(&self, command: &str) -> Command {
        self.ssh_extra(&[], command)
    }

    /// [`TestHost::ssh`] with more ssh options (`["-o", "ConnectTimeout=2"]`);
    /// options after the command would go to the remote command instead.
    pub fn ssh_extra(&self, options: &[&str], command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts())
            .args(options)
            .arg(format!("root@{}", self.addr))
            .arg(command);
        c
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // The script kills sshd and its sessions by the pid in its PidFile
        // and removes the host's namespace.
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// The build users' lock directory the hosts use: the one every build of
/// the tests uses (build, sandbox, serve), since the build users are
/// system-wide and two builds must never share one.
pub fn user_pool_dir() -> PathBuf {
    PathBuf::from(sandoff::sandbox::users::DEFAULT_USER_POOL_DIR)
}

/// The parent of every process, from `/proc/<pid>/stat`.
fn parents() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `root` and all its descendants.
pub fn descendants(root: i32) -> Vec<i32> {
    let table = parents();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(table.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// SIGSTOPs the tree (so nothing forks past the walk), walks it again and
/// SIGKILLs it.
fn kill_tree(root: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for p in descendants(root) {
        let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
    }
    for p in descendants(root) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Whether `pid` is gone or a zombie (nothing reaps sshd's in a container).
fn dead(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z ")
}

/// Waits up to 5 s for `pid` to die.
fn wait_dead(pid: i32) -> bool {
    (0..50).any(|_| {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        false
    })
}

/// The serve handshake (SERVE_MAGIC_1, version 2.7) and the server's
/// answer: SERVE_MAGIC_2 and its version, 16 bytes.
const HANDSHAKE: &[u8] = b"\xeb\x9d\x0c\x39\0\0\0\0\x07\x02\0\0\0\0\0\0";

/// Runs `program` on the host with the handshake on stdin; returns stdout.
fn serve_handshake(host: &TestHost, program: &str) -> Vec<u8> {
    let out = support::output_with_input(&mut host.ssh(program), HANDSHAKE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
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
    let Some(host) = TestHost::start_if_ready(this_test!(), 1) else {
        return;
    };
    let out = support::run_ok(&mut host.ssh_with(
        &host.client_key(),
        &host.known_hosts(),
        "echo $SANDOFF_STORE_ROOT; command -v sandoff; echo $SANDOFF_USER_POOL_DIR",
    ));
    let out = String::from_utf8_lossy(&out);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(host.root().to_str().expect("utf-8")));
    assert!(
        lines.next().is_some_and(|l| l.ends_with("/sandoff")),
        "{out}"
    );
    // Hosts lock the system-wide build users where a local client does.
    assert_eq!(lines.next(), user_pool_dir().to_str());

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
    let Some(host) = TestHost::start_if_ready(this_test!(), 2) else {
        return;
    };
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
    let Some(host) = TestHost::start_if_ready(this_test!(), 4) else {
        return;
    };
    let pid: i32 = std::fs::read_to_string(host.home.join("sshd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(!dead(pid));
    drop(host);
    // sshd may linger as a zombie until PID 1 reaps it; it no longer listens.
    assert!(wait_dead(pid), "sshd {pid} still running");
}

#[test]
fn hosts_start_with_writes_the_machine_line() {
    if !support::require(this_test!(), NEEDS) {
        return;
    }
    let config = HostConfig::default()
        .systems(&["x86_64-linux", "i686-linux"])
        .max_jobs(3)
        .speed(2)
        .features(&["kvm", "big-parallel"])
        .mandatory(&["kvm"]);
    let host = TestHost::start_with(5, &config);
    let m = host.machine();
    assert_eq!(m.max_jobs, 3);
    assert_eq!(m.speed_factor, 2.0);
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    assert_eq!(m.systems, set(&["x86_64-linux", "i686-linux"]));
    assert_eq!(m.supported_features, set(&["kvm", "big-parallel"]));
    assert_eq!(m.mandatory_features, set(&["kvm"]));
    assert_eq!(m.port, Some(host.port));
    // A sandoff host needs no remote-program: sandoff is on its PATH.
    assert!(
        !host.machine_line().contains('?'),
        "{}",
        host.machine_line()
    );
    assert_eq!(
        std::fs::read_to_string(host.machines()).expect("machines"),
        format!("{}\n", host.machine_line())
    );

    let shown = support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(host.root())
            .args(["key", "show"]),
    );
    assert_eq!(
        String::from_utf8_lossy(&shown).trim(),
        host.signing_public_key()
    );
    assert!(host.signing_public_key().starts_with("host5-1:"));
}

#[test]
fn hosts_nix_host_answers_the_serve_handshake() {
    if !support::require(this_test!(), NIX_NEEDS) {
        return;
    }
    let host = TestHost::start_nix(6);
    assert_eq!(host.kind, HostKind::Nix);
    let m = host.machine();
    assert!(
        m.store_uri.ends_with(&format!(
            "?remote-program={}",
            host.serve_program().display()
        )),
        "{}",
        m.store_uri
    );
    assert!(
        host.signing_public_key().starts_with("host6-1:"),
        "{}",
        host.signing_public_key()
    );

    // What Nix's client runs: `<remote-program> --serve --write`.
    let program = format!("{} --serve --write", host.serve_program().display());
    let out = serve_handshake(&host, &program);
    assert_eq!(out.len(), 16, "{out:x?}");
    assert_eq!(out[..8], 0x5452eecb_u64.to_le_bytes());
    let version = u64::from_le_bytes(out[8..].try_into().expect("8 bytes"));
    assert_eq!(version >> 8, 2, "major version {version:#x}");
    // The chroot store was made under the host's root, not in /nix/store.
    assert!(host.root().join("nix/var/nix/db").is_dir());
    assert!(host.nix_conf_dir().join("nix.conf").is_file());

    // Sessions see the host's Nix configuration: its store and signing key.
    let out = support::run_ok(&mut host.ssh("nix show-config"));
    let conf = String::from_utf8_lossy(&out);
    let root = host.root();
    assert!(
        conf.lines()
            .any(|l| l == format!("store = {}", root.display())),
        "{conf}"
    );
    assert!(conf.contains("signing-key.sec"), "{conf}");
}

#[test]
fn hosts_kill_stops_sshd_and_its_sessions() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 7) else {
        return;
    };
    let pid = host.pid().expect("sshd pid");
    let mut session = host
        .ssh("echo started; exec sleep 300")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssh");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(session.stdout.as_mut().expect("piped")),
        &mut line,
    )
    .expect("read session");
    assert_eq!(line, "started\n");
    let tree = descendants(pid);
    assert!(tree.len() >= 3, "sshd, its session and sleep: {tree:?}");

    host.kill();
    for p in tree {
        assert!(wait_dead(p), "{p} survived kill()");
    }
    let status = session.wait().expect("wait ssh");
    assert!(!status.success());
    let res = host.ssh("true").output().expect("spawn ssh");
    assert!(!res.status.success(), "sshd still answers");
}

#[test]
fn hosts_in_a_namespace_can_lose_their_link() {
    let mut needs = NEEDS.to_vec();
    needs.push(Need::Program("ip"));
    if !support::require(this_test!(), &needs) {
        return;
    }
    // 201: namespaces are system-wide, so far from the indices others use.
    let host = TestHost::start_with(201, &HostConfig::default().netns());
    assert_eq!(host.netns.as_deref(), Some("sandoff-th201"));
    assert_eq!(host.addr, "10.77.201.2");
    let out = support::run_ok(&mut host.ssh("echo $SANDOFF_STORE_ROOT"));
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        host.root().to_str().expect("utf-8")
    );

    host.cut_link();
    let res = host
        .ssh_extra(&["-o", "ConnectTimeout=2"], "true")
        .output()
        .expect("spawn ssh");
    assert!(!res.status.success(), "reached a host whose link is down");
    host.restore_link();
    support::run_ok(&mut host.ssh("true"));

    let home = host.home.clone();
    drop(host);
    let res = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&res.stdout).contains("sandoff-th201"),
        "namespace left behind"
    );
    assert!(!home.exists());
}

#[test]
fn hosts_nix_host_builds_and_signs_for_a_nix_client() {
    let mut needs = NIX_NEEDS.to_vec();
    needs.extend([
        Need::Program("nix-build"),
        Need::Program("nix"),
        Need::Program("busybox"),
    ]);
    if !support::require(this_test!(), &needs) {
        return;
    }
    let host = TestHost::start_nix(8);
    let tmp = tempfile::tempdir().expect("tempdir");
    let bb = tmp.path().join("bb/bin");
    std::fs::create_dir_all(&bb).expect("mkdir");
    std::fs::copy(
        support::which("busybox").expect("busybox"),
        bb.join("busybox"),
    )
    .expect("copy busybox");
    let nixfile = tmp.path().join("t.nix");
    std::fs::write(
        &nixfile,
        r#"let bb = ./bb; in derivation {
  name = "on-host"; system = "x86_64-linux"; builder = "${bb}/bin/busybox";
  args = [ "sh" "-c" "${bb}/bin/busybox id -u > $out" ];
}"#,
    )
    .expect("write t.nix");
    // Nix 2.8 takes the port from NIX_SSHOPTS, not from the URI.
    let builder = format!(
        "ssh://root@{}?remote-program={} x86_64-linux - 1 1",
        host.addr,
        host.serve_program().display()
    );
    let local = tmp.path().join("local");
    let out = support::run_ok(
        support::nix_cmd("nix-build", &tmp.path().join("conf"))
            .arg("--store")
            .arg(&local)
            .args(["--no-out-link", "--max-jobs", "0", "--builders", &builder])
            .arg(&nixfile)
            .env("NIX_SSHOPTS", host.ssh_opts().join(" ")),
    );
    let path = String::from_utf8_lossy(&out).trim().to_owned();
    // Built in the host's sandbox, as an unprivileged uid, and copied back.
    let content = std::fs::read_to_string(local.join(path.trim_start_matches('/')))
        .expect("output copied back");
    assert_ne!(content.trim(), "0", "built as root");

    // The host signed it with its key.
    let info = support::run_ok(
        Command::new("nix")
            .args(["--extra-experimental-features", "nix-command"])
            .args(["path-info", "--sigs", &path])
            .env("NIX_CONF_DIR", host.nix_conf_dir()),
    );
    let info = String::from_utf8_lossy(&info);
    let key_name = host.signing_public_key();
    let key_name = key_name.split(':').next().expect("name");
    assert!(info.contains(&format!(" {key_name}:")), "{info}");
}

#[test]
fn hosts_serve_the_store_dir_they_are_given() {
    if !support::require(this_test!(), NIX_NEEDS) {
        return;
    }
    let gnu = HostConfig::default().store_dir("/gnu/store");
    let host = TestHost::start_with(46, &gnu);
    assert_eq!(host.store_dir.as_str(), "/gnu/store");
    let out = support::run_ok(&mut host.ssh("echo $SANDOFF_STORE_DIR"));
    assert_eq!(String::from_utf8_lossy(&out).trim(), "/gnu/store");

    // A Nix host's serve program passes its arguments on, so a client can
    // ask where its store is.
    let nix = TestHost::start_with(47, &HostConfig::nix().store_dir("/gnu/store"));
    let probe = format!(
        "{} --print-fixed-path sha256 {} sandoff-store-dir-probe",
        nix.serve_program().display(),
        "0".repeat(64)
    );
    let out = support::run_ok(&mut nix.ssh(&probe));
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        // As `NIX_STORE_DIR=/gnu/store nix-store --print-fixed-path ...` prints it.
        "/gnu/store/i1f2fbgrqqcw1g54y32qk3cmzj5hscgj-sandoff-store-dir-probe"
    );
}
