//! The sandbox tested from inside: busybox-static as the builder, a fake
//! store in a temporary directory, a probe that records what it sees and
//! tries every escape; the host side asserts each refusal.
//!
//! Needs root (mounts, build users) and /bin/busybox (Debian busybox-static);
//! creates the `sandoffbld` build users with `sandoff setup`'s code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sandoff::sandbox::exec::{BuildOutcome, TimeoutKind};
use sandoff::sandbox::plan::{self, InputPath, SandboxSpec, Timeouts};
use sandoff::sandbox::setup::{ensure_build_users, BuildUsers};
use sandoff::sandbox::{run_build, HostDirs, SandboxError, UserLease, UserPool};
use sandoff::store::{StoreDir, StorePath};

use crate::keyring::{session_keyring, SessionKey};
use crate::support::{self, Need};
use crate::this_test;

const BUSYBOX: &str = "7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox";
const OUT: &str = "1f2dhqa4ycv31xpsaw4bavv0ks2ir2fc-probe";
const TEXT: &str = "2g3ajb6zcsw4nh9z5c1xpwm0dl7q8rfk-hello.txt";
const LINK: &str = "3h4bkc7advx5pi0a6d2yqxn1fm8r9sgl-busybox-link";
const PROBE_BIN: &str = "5k6lmd8bfqyw7ri0a8f3zry92gn9s1hp-probes";

/// Root, busybox, and namespaces that work (a container may forbid them).
pub(crate) fn ready(test: &str) -> bool {
    if !support::require(test, &[Need::Root, Need::Program("busybox")]) {
        return false;
    }
    if !Path::new("/bin/busybox").is_file() {
        return support::require(test, &[Need::Program("/bin/busybox")]);
    }
    static NS: OnceLock<bool> = OnceLock::new();
    let ok = *NS.get_or_init(|| {
        std::process::Command::new("unshare")
            .args(["-m", "-p", "-n", "-i", "-u", "-f", "--mount-proc", "true"])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        let _ = support::require(
            test,
            &[Need::Program(
                "working mount/pid/net namespaces (unshare -mpniuf)",
            )],
        );
    }
    ok
}

/// The shared pool: one lock directory for the whole test process, so tests
/// running in parallel never get the same build user.
fn pool() -> &'static UserPool {
    static POOL: OnceLock<UserPool> = OnceLock::new();
    POOL.get_or_init(|| {
        ensure_build_users(&BuildUsers::Create {
            group: "sandoffbld".to_owned(),
            count: 10,
        })
        .expect("sandoff setup");
        let locks = std::path::Path::new(sandoff::sandbox::users::DEFAULT_USER_POOL_DIR);
        UserPool::from_group("sandoffbld", locks).expect("build user pool")
    })
}

fn sp(base: &str) -> StorePath {
    StorePath::from_base_name(base).expect("valid store path")
}

/// A fake store with busybox in it, and a build of `script`.
struct Fixture {
    _tmp: tempfile::TempDir,
    busybox_dir: PathBuf,
    dirs: HostDirs,
    lease: UserLease,
}

/// busybox in a fake store shared by all tests, written once per process
/// before any sandbox of this process runs: a sandboxed child cloned while
/// another thread writes the file would inherit the open file and make
/// exec'ing it fail with ETXTBSY until the child execs.
fn busybox_store() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Kept across runs (a copy per run would litter /tmp); replaced by
        // an atomic rename, so no process ever execs a half-written file.
        let dir = std::env::temp_dir().join("sandoff-it-busybox");
        let bin = dir.join(BUSYBOX).join("bin");
        let target = bin.join("busybox");
        let fresh = std::fs::read("/bin/busybox").expect("read /bin/busybox");
        if std::fs::read(&target).ok().as_deref() != Some(fresh.as_slice()) {
            std::fs::create_dir_all(&bin).expect("mkdir");
            let tmp = bin.join(format!(".busybox-{}", std::process::id()));
            std::fs::write(&tmp, &fresh).expect("write busybox");
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o555))
                .expect("chmod");
            std::fs::rename(&tmp, &target).expect("rename busybox");
        }
        dir
    })
}

impl Fixture {
    /// A new fixture, if the machine can run sandboxes (see [`ready`]).
    fn ready(test: &str) -> Option<Fixture> {
        ready(test).then(Fixture::new)
    }

    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let busybox_dir = busybox_store().join(BUSYBOX);
        let store = tmp.path().join("root/nix/store");
        std::fs::create_dir_all(&store).expect("mkdir store");
        std::fs::write(store.join(TEXT), "hello from a file input\n").expect("write text input");
        std::os::unix::fs::symlink(format!("/nix/store/{BUSYBOX}"), store.join(LINK))
            .expect("symlink input");
        let lease = pool().acquire(Duration::from_millis(50)).expect("lease");
        let dirs = HostDirs::create(tmp.path(), lease.user()).expect("host dirs");
        Fixture {
            _tmp: tmp,
            busybox_dir,
            dirs,
            lease,
        }
    }

    fn spec(&self, script: &str) -> SandboxSpec {
        SandboxSpec {
            store_dir: StoreDir::default(),
            builder: format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes(),
            args: vec![b"sh".to_vec(), b"-c".to_vec(), script.as_bytes().to_vec()],
            env: BTreeMap::from([
                (b"out".to_vec(), format!("/nix/store/{OUT}").into_bytes()),
                (
                    b"BB".to_vec(),
                    format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes(),
                ),
                (
                    b"BBDIR".to_vec(),
                    format!("/nix/store/{BUSYBOX}").into_bytes(),
                ),
                (b"passAsFile".to_vec(), b"text".to_vec()),
                (b"text".to_vec(), b"passed as a file\n".to_vec()),
            ]),
            inputs: vec![
                InputPath {
                    source: self.busybox_dir.clone(),
                    path: sp(BUSYBOX),
                },
                InputPath {
                    source: self.store().join(TEXT),
                    path: sp(TEXT),
                },
                InputPath {
                    source: self.store().join(LINK),
                    path: sp(LINK),
                },
            ],
            outputs: vec![sp(OUT)],
            dirs: self.dirs.dirs().clone(),
            build_dir_name: plan::DEFAULT_BUILD_DIR_NAME.to_owned(),
            user: self.lease.user().clone(),
            fixed_output: false,
            impure_env: BTreeMap::new(),
            impure_env_allow: Vec::new(),
            limits: plan::Limits::default(),
            cores: 2,
            timeouts: Timeouts::default(),
        }
    }

    fn store(&self) -> PathBuf {
        self._tmp.path().join("root/nix/store")
    }

    /// Runs `script` with these timeouts; the outcome (it must run) and the log.
    fn run_with_timeouts(
        &self,
        script: &str,
        max_silent: Option<Duration>,
        total: Option<Duration>,
    ) -> (BuildOutcome, String) {
        let mut spec = self.spec(script);
        spec.timeouts = Timeouts { max_silent, total };
        let (r, log) = self.run(&spec);
        (r.expect("runs"), log)
    }

    fn run(&self, spec: &SandboxSpec) -> (Result<BuildOutcome, SandboxError>, String) {
        let mut log = Vec::new();
        let r = run_build(&self.lease, spec, &mut log);
        (r, String::from_utf8_lossy(&log).into_owned())
    }

    /// Compiles `tests/it/probes/<name>.c` with `gcc -static` into the
    /// store path [`PROBE_BIN`] of this fixture, adds it to `spec`'s
    /// inputs and returns its logical path. gcc writes the file in its own
    /// process, so no sandbox cloned meanwhile inherits a writable fd to it.
    fn probe(&self, spec: &mut SandboxSpec, name: &str) -> String {
        let bin = self.store().join(PROBE_BIN).join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir probe bin");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/it/probes/{name}.c"));
        support::run_ok(
            std::process::Command::new("gcc")
                .args(["-static", "-O1", "-o"])
                .arg(bin.join(name))
                .arg(&src),
        );
        if !spec.inputs.iter().any(|i| i.path == sp(PROBE_BIN)) {
            spec.inputs.push(InputPath {
                source: self.store().join(PROBE_BIN),
                path: sp(PROBE_BIN),
            });
        }
        format!("/nix/store/{PROBE_BIN}/bin/{name}")
    }

    fn out(&self, name: &str) -> String {
        let p = self.dirs.output(OUT).join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }
}

/// The capabilities of one set (`CapEff`, ...) in `/proc/<pid>/status`
/// text, by name: decoded with `caps`, so that a failure says which leaked.
fn named_caps(status: &str, set: &str) -> Vec<String> {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix(set)?.strip_prefix(":\t"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let mut names: Vec<String> = caps::all()
        .into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .map(|c| c.to_string())
        .collect();
    names.sort();
    names
}

/// Puts busybox's applets on PATH inside the build directory.
const PRELUDE: &str = r#"set -u
"$BB" mkdir -p "$TMPDIR/bin"
for a in $("$BB" --list); do "$BB" ln -s "$BB" "$TMPDIR/bin/$a"; done
export PATH="$TMPDIR/bin"
"#;

const PROBE: &str = r#"
mkdir "$out"
id -u > "$out/uid"; id -g > "$out/gid"; id -G > "$out/groups"; id -un > "$out/user"
ls -a / | sort > "$out/root"
ls -a /etc | sort > "$out/etc"
ls -a /dev | sort > "$out/dev"
ls -a /dev/pts | sort > "$out/pts"
ls -a "$NIX_STORE" | sort > "$out/store"
cat /etc/passwd > "$out/passwd"; cat /etc/group > "$out/group"; cat /etc/hosts > "$out/hosts"
hostname > "$out/hostname"
echo $$ > "$out/pid"
ls /proc | grep '^[0-9]*$' | sort -n > "$out/pids"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|SigBlk|SigIgn):' /proc/self/status > "$out/status"
cat /proc/sys/kernel/domainname > "$out/domainname"
readlink /proc/self/fd/0 > "$out/stdin"
cat /proc/self/oom_score_adj > "$out/oom"
cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort > "$out/ifaces"
cat /proc/self/mountinfo > "$out/mountinfo"
pwd > "$out/pwd"
env | sort > "$out/env"
cat "$textPath" > "$out/text"
umask > "$out/umask"
cat "$NIX_STORE/TEXT" > "$out/textinput"
readlink "$NIX_STORE/LINK" > "$out/link"
"$NIX_STORE/LINK/bin/busybox" echo via-link > "$out/vialink"
try() { d="$1"; shift; if e=$("$@" 2>&1 >/dev/null); then echo "ESCAPED: $d"; else echo "refused: $d: $e" | head -1; fi; }
{
try "write into an input" touch "$BBDIR/x"
try "append to a file input" sh -c 'echo x >> "$NIX_STORE/TEXT"'
try "replace a symlink input" ln -sfn /etc "$NIX_STORE/LINK"
try "overwrite an input file" sh -c 'echo x > "$BB"'
try "delete an input" rm -rf "$BBDIR"
try "rename an input" mv "$BBDIR" "$NIX_STORE/moved"
try "chmod an input" chmod 777 "$BBDIR"
try "write to /" touch /x
try "mkdir in /" mkdir /x
try "write /etc/passwd" sh -c 'echo x >> /etc/passwd'
try "create in /etc" touch /etc/x
try "mount tmpfs" sh -c 'mkdir -p /tmp/m && mount -t tmpfs none /tmp/m'
try "mount proc" sh -c 'mkdir -p /tmp/p && mount -t proc proc /tmp/p'
try "remount / rw" mount -o remount,rw /
try "umount /proc" umount /proc
try "mknod" mknod /tmp/null c 1 3
try "chroot" chroot / true
try "sethostname" hostname evil
try "write /proc/sys" sh -c 'echo 1 > /proc/sys/kernel/ns_last_pid'
try "read host /etc/shadow" cat /etc/shadow
try "see host /home" ls /home
try "reach the internet" nc -w 2 1.1.1.1 80
try "setuid to root" su -c true root
try "chown to root" chown 0:0 "$TMPDIR"
try "open a raw socket" ping -c 1 -W 1 127.0.0.1
try "make a setuid file" sh -c 'echo > "$TMPDIR/s" && chmod 4755 "$TMPDIR/s"'
try "make a setgid directory" sh -c 'mkdir "$TMPDIR/g" && chmod 2755 "$TMPDIR/g"'
} > "$out/attempts"
touch /tmp/writable && echo ok > "$out/tmp"
echo x > "$TMPDIR/f" && echo ok > "$out/builddir"
chmod 0700 "$TMPDIR/f" && echo ok > "$out/chmod"
touch /dev/shm/x && echo ok > "$out/shm"
echo probe done
"#;

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn probe_sees_only_the_sandbox_and_every_escape_is_refused() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let user = f.lease.user().clone();
    let probe = PROBE.replace("TEXT", TEXT).replace("LINK", LINK);
    let spec = f.spec(&format!("{PRELUDE}{probe}"));
    let (r, log) = f.run(&spec);
    assert_eq!(
        r.expect("build runs"),
        BuildOutcome::Exited(0),
        "log:\n{log}"
    );
    assert!(log.contains("probe done"), "log streamed: {log}");

    // Identity: the build user, no supplementary groups; names as in the fixtures.
    assert_eq!(f.out("uid").trim(), user.uid().to_string());
    assert_eq!(f.out("gid").trim(), user.gid().to_string());
    assert_eq!(f.out("groups").trim(), user.gid().to_string());
    assert_eq!(f.out("user").trim(), "nixbld");

    // The root holds only the documented entries.
    assert_eq!(
        lines(&f.out("root")),
        [".", "..", "dev", "etc", "nix", "proc", "tmp"]
    );
    assert_eq!(
        lines(&f.out("etc")),
        [".", "..", "group", "hosts", "passwd"]
    );
    assert_eq!(
        lines(&f.out("dev")),
        [
            ".", "..", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
            "stdout", "tty", "urandom", "zero"
        ]
    );
    assert_eq!(lines(&f.out("pts")), [".", "..", "ptmx"]);
    // The store: the input (and the output being built), nothing of the host's.
    assert_eq!(
        lines(&f.out("store")),
        [".", "..", OUT, TEXT, LINK, BUSYBOX]
    );
    // File inputs are bound, symlink inputs copied as links.
    assert_eq!(f.out("textinput"), "hello from a file input\n");
    assert_eq!(f.out("link").trim(), format!("/nix/store/{BUSYBOX}"));
    assert_eq!(f.out("vialink").trim(), "via-link");

    // /etc exactly as the golden files (which are for uid 30001, gid 30000).
    let fixture = |n: &str| {
        std::fs::read_to_string(support::fixtures().join("etc").join(n))
            .expect("fixture")
            .replace("30001", &user.uid().to_string())
            .replace("30000", &user.gid().to_string())
    };
    assert_eq!(f.out("passwd"), fixture("passwd"));
    assert_eq!(f.out("group"), fixture("group"));
    assert_eq!(f.out("hosts"), fixture("hosts"));
    assert_eq!(f.out("hostname").trim(), "localhost");

    // Own PID namespace: the builder is PID 1 and sees only its own processes.
    assert_eq!(f.out("pid").trim(), "1");
    let pids: Vec<u32> = f
        .out("pids")
        .lines()
        .map(|l| l.parse().expect("pid"))
        .collect();
    assert!(pids.contains(&1) && pids.len() <= 4, "pids: {pids:?}");

    // No capabilities anywhere, no_new_privs.
    let status = f.out("status");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "{set} not empty ({:?}):\n{status}",
            named_caps(&status, set)
        );
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(
        status.contains("Seccomp:\t2"),
        "seccomp filter mode: {status}"
    );
    // Signals reset (Rust's ignored SIGPIPE does not leak into the build).
    assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
    assert!(status.contains("SigIgn:\t0000000000000000"), "{status}");
    assert_eq!(f.out("domainname").trim(), "(none)");
    assert_eq!(f.out("stdin").trim(), "/dev/null");
    assert_eq!(f.out("oom").trim(), "1000");

    // Only loopback.
    assert_eq!(lines(&f.out("ifaces")), ["lo"]);

    // Mount flags: inputs ro,nosuid,nodev; /proc nosuid,nodev,noexec; / ro.
    let mountinfo = f.out("mountinfo");
    let opts = |mp: &str| -> String {
        mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(mp))
            .unwrap_or_else(|| panic!("no mount at {mp}:\n{mountinfo}"))
            .split(' ')
            .nth(5)
            .expect("options")
            .to_owned()
    };
    let has = |mp: &str, want: &[&str]| {
        let o = opts(mp);
        for w in want {
            assert!(o.split(',').any(|x| x == *w), "{mp} lacks {w}: {o}");
        }
    };
    has(&format!("/nix/store/{BUSYBOX}"), &["ro", "nosuid", "nodev"]);
    has("/proc", &["nosuid", "nodev", "noexec"]);
    has("/proc/sys", &["ro"]);
    has("/", &["ro", "nosuid", "nodev"]);
    has("/tmp", &["rw", "nosuid", "nodev"]);

    // Environment exactly as planned (plus what sh adds: PWD is ours; SHLVL, _ ).
    let env = f.out("env");
    let plan = plan::plan(&spec).expect("plan");
    for (k, v) in &plan.env {
        let line = format!(
            "{}={}",
            String::from_utf8_lossy(k),
            String::from_utf8_lossy(v)
        );
        if k.as_slice() == b"PATH" || k.as_slice() == b"text" {
            continue; // the prelude replaces PATH
        }
        assert!(env.lines().any(|l| l == line), "env lacks {line}:\n{env}");
    }
    assert_eq!(f.out("pwd").trim(), "/tmp/sandoff-build");
    assert_eq!(f.out("text"), "passed as a file\n");
    assert_eq!(f.out("umask").trim(), "0022");

    // Every escape refused.
    let attempts = f.out("attempts");
    eprintln!("probe attempts:\n{attempts}");
    assert!(!attempts.contains("ESCAPED"), "escapes:\n{attempts}");
    assert_eq!(attempts.lines().count(), 27, "{attempts}");
    assert_eq!(
        std::fs::read_to_string(f.store().join(TEXT)).expect("text"),
        "hello from a file input\n"
    );
    // The input on the host is intact.
    assert!(f.busybox_dir.join("bin/busybox").is_file());
    assert!(!f.busybox_dir.join("x").exists());

    // What should work, works.
    assert_eq!(f.out("tmp").trim(), "ok");
    assert_eq!(f.out("builddir").trim(), "ok");
    assert_eq!(
        f.out("chmod").trim(),
        "ok",
        "plain chmod passes the seccomp filter"
    );
    assert_eq!(f.out("shm").trim(), "ok");
    // The build directory is on the host, owned by the build user.
    assert!(f.dirs.dirs().build.join("f").is_file());
}

#[test]
fn loopback_works() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    // lo is up (deterministic), and a TCP round trip over it works (retried:
    // busybox nc has no way to wait for the listener).
    let script = format!(
        "{PRELUDE}ip link show lo
         for try in 1 2 3 4 5; do
           nc -l -p 4321 > \"$TMPDIR/got\" &
           for i in $(seq 1 100); do echo over-lo | nc 127.0.0.1 4321 2>/dev/null && break; sleep 0.05; done
           wait
           if grep -q over-lo \"$TMPDIR/got\"; then cat \"$TMPDIR/got\"; break; fi
         done"
    );
    let (r, log) = f.run(&f.spec(&script));
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    assert!(log.contains("<LOOPBACK,UP,LOWER_UP>"), "{log}");
    assert!(log.contains("over-lo"), "{log}");
}

#[test]
fn exit_status_and_log_are_reported() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let (r, log) = f.run(&f.spec("echo to-stdout; echo to-stderr >&2; exit 3"));
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(3));
    assert_eq!(log, "to-stdout\nto-stderr\n");
}

#[test]
fn concurrent_builds_get_distinct_build_users() {
    if !ready(this_test!()) {
        return;
    }
    let handles: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let f = Fixture::new();
                let (r, log) = f.run(&f.spec("$BB id -u; $BB sleep 1; $BB id -u"));
                assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
                let uids: Vec<String> = log.lines().map(str::to_owned).collect();
                assert_eq!(uids.len(), 2);
                assert_eq!(uids[0], uids[1]);
                uids[0].clone()
            })
        })
        .collect();
    let uids: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_ne!(uids[0], uids[1], "two concurrent builds shared a uid");
}

/// What a build that the `kind` timeout killed after a second comes back as.
fn timed_out_after_a_second(kind: TimeoutKind) -> BuildOutcome {
    BuildOutcome::TimedOut {
        kind,
        after: Duration::from_secs(1),
    }
}

#[test]
fn silent_build_is_killed() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let (outcome, log) = f.run_with_timeouts(
        "echo start; $BB sleep 1000 & $BB sleep 1000",
        Some(Duration::from_secs(1)),
        None,
    );
    assert_eq!(outcome, timed_out_after_a_second(TimeoutKind::Silent));
    assert!(outcome.to_string().contains("timed out"));
    assert_eq!(log, "start\n");
    assert_no_process_of(f.lease.user().uid());
}

#[test]
fn timeout_kills_a_chatty_build() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let (outcome, log) = f.run_with_timeouts(
        "while true; do echo tick; $BB sleep 0.1; done",
        Some(Duration::from_secs(5)),
        Some(Duration::from_secs(1)),
    );
    assert_eq!(outcome, timed_out_after_a_second(TimeoutKind::Total));
    assert!(log.starts_with("tick\n"));
    assert_no_process_of(f.lease.user().uid());
}

#[test]
fn a_build_that_closes_its_output_and_hangs_is_still_killed() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let (outcome, log) = f.run_with_timeouts(
        "echo bye; exec >&- 2>&-; $BB sleep 1000",
        Some(Duration::from_secs(1)),
        None,
    );
    assert_eq!(outcome, timed_out_after_a_second(TimeoutKind::Silent));
    assert_eq!(log, "bye\n");
    assert_no_process_of(f.lease.user().uid());
}

#[test]
fn leftover_processes_of_the_build_user_are_killed_before_the_build() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let user = f.lease.user().clone();
    // A process a previous build of this user might have left behind.
    let mut stray = std::process::Command::new("/bin/busybox")
        .args(["sleep", "60"])
        .uid(user.uid())
        .gid(user.gid())
        .spawn()
        .expect("spawn stray process");
    let (r, log) = f.run(&f.spec("echo built"));
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    let status = stray.wait().expect("wait");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "stray process: {status:?}"
    );
}

/// The runner holds each builder's mount namespace and hands it to another
/// thread to be taken down once the builder is reaped: none is kept.
#[test]
fn no_mount_namespace_of_a_finished_build_is_kept() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let own = std::fs::read_link("/proc/self/ns/mnt").expect("own namespace");
    for _ in 0..5 {
        // Directories of its own each: a build leaves its inputs' mount
        // points in its scratch store.
        let dirs = HostDirs::create(f._tmp.path(), f.lease.user()).expect("dirs");
        let mut spec = f.spec("echo built");
        spec.dirs = dirs.dirs().clone();
        let (r, log) = f.run(&spec);
        assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
        dirs.remove().expect("remove");
    }
    let held = || {
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("mnt:[") && *l != own)
            .count()
    };
    support::wait_for("the builds' mount namespaces to be closed", || {
        (held() == 0).then_some(())
    });
}

#[test]
fn host_dirs_are_removed_whatever_the_build_left() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let dirs = HostDirs::create(f._tmp.path(), f.lease.user()).expect("dirs");
    let mut spec = f.spec(
        "$BB mkdir -p \"$TMPDIR/a/b\" \"$out/c\"; $BB chmod 0 \"$TMPDIR/a\" \"$out/c\" \"$out\"; \
         $BB ln -s / \"$TMPDIR/root-link\"",
    );
    spec.dirs = dirs.dirs().clone();
    let (r, log) = f.run(&spec);
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    assert!(dirs.output(OUT).is_dir());
    let top = dirs.top().to_path_buf();
    dirs.remove().expect("remove");
    assert!(!top.exists());
    assert!(
        Path::new("/etc/passwd").exists(),
        "followed a symlink out of the build dir"
    );
}

/// No process of `uid` is left on the host.
fn assert_no_process_of(uid: u32) {
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) else {
            continue;
        };
        let real: u32 = line
            .split_whitespace()
            .nth(1)
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        assert_ne!(
            real,
            uid,
            "process {:?} of the build user survived",
            entry.file_name()
        );
    }
}

#[test]
fn missing_builder_is_a_setup_failure_naming_exec() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let mut spec = f.spec("true");
    spec.builder = format!("/nix/store/{BUSYBOX}/bin/nothere").into_bytes();
    let (r, log) = f.run(&spec);
    let err = r.expect_err("fails");
    let msg = err.to_string();
    assert!(
        matches!(err, SandboxError::SetupFailed { ref op, .. } if op == "exec builder"),
        "{msg}"
    );
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert_eq!(log, "");
}

#[test]
fn missing_input_fails_closed_at_its_bind_step() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let mut spec = f.spec("echo RAN > /dev/stderr");
    let ghost = "0000000000000000000000000000000a-ghost";
    spec.inputs.push(InputPath {
        source: PathBuf::from("/nonexistent/ghost"),
        path: sp(ghost),
    });
    let (r, log) = f.run(&spec);
    let err = r.expect_err("fails");
    let SandboxError::SetupFailed { step, ref op, .. } = err else {
        panic!("{err}")
    };
    assert!(op.starts_with("bind /nonexistent/ghost on "), "{op}");
    assert!(err.to_string().starts_with(&format!(
        "sandbox setup failed at step {step} (bind /nonexistent/ghost"
    )));
    assert!(!log.contains("RAN"), "builder ran in a half-built sandbox");
}

#[test]
fn setup_is_idempotent() {
    if !ready(this_test!()) {
        return;
    }
    let _ = pool();
    let again = ensure_build_users(&BuildUsers::Create {
        group: "sandoffbld".to_owned(),
        count: 10,
    })
    .expect("setup");
    assert!(again.created.is_empty(), "created {:?}", again.created);
    assert!(again.members.len() >= 10);
    let existing = ensure_build_users(&BuildUsers::Existing {
        group: "sandoffbld".to_owned(),
    })
    .expect("existing");
    assert_eq!(existing.gid, again.gid);
}

#[test]
fn fixed_output_builds_share_the_host_network_and_resolver() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let mut spec = f.spec(
        "$BB cut -d: -f1 /proc/net/dev | $BB tail -n +3 | $BB tr -d ' ' | $BB sort; \
         $BB ls /etc; echo NIX_OUTPUT_CHECKED=$NIX_OUTPUT_CHECKED",
    );
    spec.fixed_output = true;
    let (r, log) = f.run(&spec);
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    let host_ifaces = std::fs::read_to_string("/proc/net/dev")
        .expect("host net")
        .lines()
        .count()
        - 2;
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= host_ifaces, "{log}");
    assert!(lines.contains(&"nsswitch.conf"), "{log}");
    if Path::new("/etc/resolv.conf").exists() {
        assert!(lines.contains(&"resolv.conf"), "{log}");
    }
    assert!(lines.contains(&"NIX_OUTPUT_CHECKED=1"), "{log}");
}

#[test]
fn cli_setup_creates_users_and_state_dirs_idempotently() {
    if !ready(this_test!()) {
        return;
    }
    let _ = pool();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut keys = Vec::new();
    for run in 0..2 {
        let out = support::run_ok(support::sandoff().arg("--state-dir").arg(tmp.path()).args([
            "setup",
            "--build-users",
            "10",
        ]));
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("build users: group sandoffbld"), "{out}");
        // The users exist already (pool()); only the first run makes the key.
        assert!(!out.contains("created sandoffbld"), "{out}");
        assert_eq!(out.contains("created signing key"), run == 0, "{out}");
        let shown = support::run_ok(
            support::sandoff()
                .arg("--state-dir")
                .arg(tmp.path())
                .args(["key", "show"]),
        );
        keys.push(String::from_utf8(shown).expect("utf-8"));
    }
    assert_eq!(keys[0], keys[1], "setup must keep the existing key");
    for d in ["db", "keys", "log", "userpool", "locks"] {
        assert!(tmp.path().join(d).is_dir(), "{d}");
    }
    assert!(tmp.path().join("keys/signing-key.sec").is_file());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("build-users-group")).expect("group file"),
        "sandoffbld\n"
    );
    let bad = support::sandoff()
        .arg("--state-dir")
        .arg(tmp.path())
        .args(["setup", "--build-users-group", "sandoff-no-such-group"])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("'sandoff-no-such-group' does not exist"));
}

/// A log sink that panics at the first write: stands in for any bug in the
/// supervising thread.
struct PanickingLog;

impl std::io::Write for PanickingLog {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        panic!("injected: the log sink panicked");
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_panic_while_supervising_kills_the_build() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let spec = f.spec("echo started; $BB sleep 600 & exec $BB sleep 600");
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_build(&f.lease, &spec, &mut PanickingLog)
    }));
    assert!(unwound.is_err(), "the injected panic propagates");
    // The supervising thread is still alive (the panic was caught), so the
    // parent-death signal never fired: only the guards can have killed it.
    assert_no_process_of(f.lease.user().uid());
}

#[test]
fn builds_cannot_reach_any_kernel_keyring() {
    let test = this_test!();
    if !ready(test) || !support::require(test, &[Need::Program("gcc")]) {
        return;
    }
    let f = Fixture::new();
    // A secret in the session keyring of the process that runs the build
    // (this thread's: the build is cloned from it).
    let caller = session_keyring().expect("a session keyring for the test");
    let desc = format!("sandoff-it-keyring-{}", std::process::id());
    let _key = SessionKey::add(&desc, b"do not leak").expect("add a key");
    let host_keys = std::fs::read_to_string("/proc/keys").expect("/proc/keys");
    assert!(
        host_keys.contains(&desc),
        "the host sees its key:\n{host_keys}"
    );

    let mut spec = f.spec("");
    let probe = f.probe(&mut spec, "keyring");
    let script =
        format!("echo --- keys; $BB cat /proc/keys; echo --- probe; exec {probe} {caller} {desc}");
    spec.args[2] = script.into_bytes();
    let (r, log) = f.run(&spec);
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    eprintln!("keyring probe:\n{log}");
    let (keys, attempts) = log
        .split_once("--- probe\n")
        .unwrap_or_else(|| panic!("probe ran: {log}"));
    // Nothing of the caller's session keyring is visible, not even through
    // /proc/keys (which needs no keyctl): the build has a keyring of its own.
    assert!(
        !keys.contains(&desc),
        "the caller's key is visible:\n{keys}"
    );
    assert!(
        !keys.contains(&format!("{caller:08x} ")),
        "the caller's session keyring is visible:\n{keys}"
    );
    // Every keyring call is refused (seccomp: ENOSYS).
    assert!(!attempts.contains("ALLOWED"), "{attempts}");
    assert_eq!(
        attempts
            .lines()
            .filter(|l| l.starts_with("refused: "))
            .count(),
        9,
        "{attempts}"
    );
    assert!(
        attempts.contains("refused: add a key to the user keyring: Function not implemented"),
        "{attempts}"
    );
}

#[test]
fn a_fork_bomb_stops_at_the_process_limit() {
    let test = this_test!();
    if !ready(test) || !support::require(test, &[Need::Program("gcc")]) {
        return;
    }
    let f = Fixture::new();
    let mut spec = f.spec("");
    let probe = f.probe(&mut spec, "forkbomb");
    spec.args[2] = format!("exec {probe}").into_bytes();
    spec.limits.max_processes = 50;
    let (r, log) = f.run(&spec);
    // The build finishes cleanly: fork failed with EAGAIN below the limit
    // (the builder itself counts), and nothing of it is left.
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    let n: u64 = log
        .strip_prefix("stopped after ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("fork bomb not stopped: {log}"));
    assert!(n < 50, "{log}");
    assert!(log.contains("Resource temporarily unavailable"), "{log}");
    assert_no_process_of(f.lease.user().uid());
    // The default applies when nothing is said.
    assert_eq!(
        plan::Limits::default().max_processes,
        plan::DEFAULT_MAX_PROCESSES
    );
}

#[test]
fn tmp_and_dev_shm_are_bounded() {
    let Some(f) = Fixture::ready(this_test!()) else {
        return;
    };
    let script =
        "$BB awk '$5 == \"/tmp\" || $5 == \"/dev/shm\" { print $5, $NF }' /proc/self/mountinfo; \
        $BB dd if=/dev/zero of=/dev/shm/big bs=1024 count=2048 2>/dev/null && echo shm-unbounded; \
        $BB dd if=/dev/zero of=/tmp/big bs=1024 count=4096 2>/dev/null && echo tmp-unbounded; \
        $BB dd if=/dev/zero of=\"$TMPDIR/big\" bs=1024 count=4096 2>/dev/null && echo build-dir-ok";
    // The defaults: a quarter of memory for /tmp, 256 MiB for /dev/shm.
    let (r, log) = f.run(&f.spec(
        "$BB awk '$5 == \"/tmp\" || $5 == \"/dev/shm\" { print $5, $NF }' /proc/self/mountinfo",
    ));
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    let pages = nix::unistd::sysconf(nix::unistd::SysconfVar::_PHYS_PAGES)
        .expect("sysconf")
        .expect("physical pages") as u64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .expect("sysconf")
        .expect("page size") as u64;
    let quarter_kib = pages / 4 * page / 1024;
    let size_of = |log: &str, mp: &str| -> u64 {
        let line = log
            .lines()
            .find(|l| l.split(' ').next() == Some(mp))
            .unwrap_or_else(|| panic!("no {mp}: {log}"));
        line.split(',')
            .find_map(|o| o.strip_prefix("size="))
            .and_then(|k| k.strip_suffix('k'))
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("no size on {mp}: {line}"))
    };
    assert_eq!(size_of(&log, "/dev/shm"), 256 * 1024, "{log}");
    // tmpfs rounds the percentage to pages.
    let tmp = size_of(&log, "/tmp");
    assert!(
        tmp.abs_diff(quarter_kib) <= page / 1024 * 4,
        "{tmp} vs {quarter_kib}: {log}"
    );

    // Raised or lowered by the caller; the build directory is on the
    // host's disk, not on /tmp's tmpfs.
    let f = Fixture::new();
    let mut spec = f.spec(script);
    spec.limits.shm_size = plan::TmpfsSize::Bytes(1 << 20);
    spec.limits.tmp_size = plan::TmpfsSize::Bytes(2 << 20);
    let (r, log) = f.run(&spec);
    assert_eq!(r.expect("runs"), BuildOutcome::Exited(0), "{log}");
    assert_eq!(size_of(&log, "/dev/shm"), 1024, "{log}");
    assert_eq!(size_of(&log, "/tmp"), 2048, "{log}");
    assert!(!log.contains("unbounded"), "{log}");
    assert!(log.contains("build-dir-ok"), "{log}");
}

#[test]
fn named_caps_decodes_a_status_mask() {
    // Bit 21 is CAP_SYS_ADMIN, bit 0 CAP_CHOWN; other sets are not read.
    let status = "CapPrm:\t0000000000000001\nCapEff:\t0000000000200001\n";
    assert_eq!(named_caps(status, "CapEff"), ["CAP_CHOWN", "CAP_SYS_ADMIN"]);
    assert!(named_caps("CapEff:\t0000000000000000\n", "CapEff").is_empty());
}
