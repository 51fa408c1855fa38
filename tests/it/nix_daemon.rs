//! sandoff as the build hook of the real nix-daemon 2.8 (Debian's
//! nix-bin): the daemon, on a chroot store under a temporary directory,
//! runs `build-hook = <dir>/bin/sandoff-build-hook` (a symlink to sandoff)
//! with `max-jobs = 0` and `builders = @<file>` naming a sandoff test host;
//! the hook builds there and registers the output in the daemon's own
//! database. The hook's protocol without a daemon is tested too, on the
//! bytes the daemon sends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::daemons::{machines_file, sandoff_as, trust, Running};
use crate::hosts::{HostConfig, TestHost, NEEDS};
use crate::support::{self, Need};
use crate::this_test;

/// A running nix-daemon on the chroot store `dir/root`, listening on
/// `dir/socket`; stopped by its pid when dropped.
struct Daemon {
    running: Running,
    /// Started as Debian's nix-daemon.service starts it, on `/nix` and
    /// `/etc/nix` of a mount namespace of its own: clients enter it.
    packaged: bool,
}

impl Daemon {
    /// The daemon with `builders` and `max_jobs`, more nix.conf lines in
    /// `extra`.
    fn start(dir: &Path, builders: &str, max_jobs: u32, extra: &str) -> Daemon {
        Daemon::start_on(
            dir,
            &dir.join("root").display().to_string(),
            builders,
            max_jobs,
            extra,
        )
    }

    /// [`Daemon::start`] with the store spelled `store` (its chroot store
    /// `dir/root` all the same).
    fn start_on(dir: &Path, store: &str, builders: &str, max_jobs: u32, extra: &str) -> Daemon {
        let hook = sandoff_as(dir, "sandoff-build-hook");
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(
            conf.join("nix.conf"),
            format!(
                "build-hook = {}\nbuilders = {builders}\nmax-jobs = {max_jobs}\nsandbox = false\n\
                 substituters =\nexperimental-features = nix-command\n{extra}",
                hook.display()
            ),
        )
        .expect("nix.conf");
        let socket = dir.join("socket");
        let running = Running::spawn(
            Command::new("nix-daemon")
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", "/root")
                .env("NIX_CONF_DIR", &conf)
                .env("NIX_DAEMON_SOCKET_PATH", &socket)
                .env("SANDOFF_STATE_DIR", dir.join("sandoff"))
                .args(["--store", store]),
            dir,
            &socket,
        );
        Daemon {
            running,
            packaged: false,
        }
    }

    /// nix-daemon as Debian's nix-daemon.service runs it (`nix-daemon
    /// --daemon`: the store `auto`, `/nix/store` on `/`, nix.conf in
    /// `/etc/nix`), with `nix.conf` as given, in a mount namespace whose
    /// `/nix` is an empty tmpfs and whose `/etc/nix` is `dir/etc-nix`: the
    /// real `/nix` and `/etc/nix` of this machine are never touched.
    fn start_packaged(dir: &Path, nix_conf: &str) -> Daemon {
        let etc = dir.join("etc-nix");
        std::fs::create_dir_all(&etc).expect("mkdir");
        std::fs::write(etc.join("nix.conf"), nix_conf).expect("nix.conf");
        let running = Running::spawn_then(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg(
                    "mount -t tmpfs tmpfs /nix && mount --bind \"$1\" /etc/nix && \
                     exec nix-daemon --daemon",
                )
                .arg("sh")
                .arg(&etc)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", "/root")
                .env("SANDOFF_STATE_DIR", dir.join("sandoff")),
            dir,
            |pid| PathBuf::from(format!("/proc/{pid}/root/nix/var/nix/daemon-socket/socket")),
        );
        Daemon {
            running,
            packaged: true,
        }
    }

    /// Where `path` (a store path or a file under `/nix`) is on this
    /// machine's file system.
    fn file(&self, path: &str) -> PathBuf {
        if self.packaged {
            PathBuf::from(format!("/proc/{}/root{path}", self.running.pid()))
        } else {
            self.running
                .dir
                .join("root")
                .join(path.trim_start_matches('/'))
        }
    }

    /// A Nix client command on the daemon's store. The client reads
    /// `.drv` files itself (a `unix://` store is a local file-system store
    /// to Nix 2.8): `root=` says where they are, or `nix-store -r` fails
    /// after the build with "opening file '/nix/store/….drv'".
    fn client(&self, program: &str) -> Command {
        if self.packaged {
            let mut c = Command::new("nsenter");
            c.arg(format!("--mount=/proc/{}/ns/mnt", self.running.pid()))
                .args(["--", program])
                .env("NIX_REMOTE", "daemon");
            return c;
        }
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.running.dir.join("conf"))
            .arg("--store")
            .arg(format!(
                "unix://{}?root={}",
                self.running.dir.join("socket").display(),
                self.running.dir.join("root").display()
            ));
        c
    }

    /// A derivation in the daemon's store running `script` with busybox.
    fn drv(&self, name: &str, script: &str) -> String {
        self.instantiate(&format!("mk \"{name}\" ''{script}''"))
    }

    /// The derivation of the Nix expression `body`, in which `bb` is
    /// busybox's store path and `mk NAME SCRIPT` a derivation running
    /// SCRIPT with busybox's `sh`.
    fn instantiate(&self, body: &str) -> String {
        let src = self.running.dir.join("busybox/bin");
        if !src.join("busybox").exists() {
            std::fs::create_dir_all(&src).expect("mkdir");
            std::fs::copy(
                support::which("busybox").expect("busybox"),
                src.join("busybox"),
            )
            .expect("copy busybox");
        }
        let bb = text(&support::run_ok(
            self.client("nix-store")
                .arg("--add")
                .arg(self.running.dir.join("busybox")),
        ));
        let expr = format!(
            "let bb = builtins.storePath \"{bb}\"; \
             mk = name: script: derivation {{ inherit name; system = \"x86_64-linux\"; \
             builder = \"${{bb}}/bin/busybox\"; args = [ \"sh\" \"-c\" script ]; }}; \
             in {body}"
        );
        text(&support::run_ok(
            self.client("nix-instantiate").args(["--expr", &expr]),
        ))
    }

    /// `nix-store -r DRV`, its output.
    fn realise(&self, drv: &str) -> std::process::Output {
        support::output_or_kill(
            self.client("nix-store")
                .args(["-r", drv])
                .stdin(Stdio::null()),
        )
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim().to_owned()
}

/// A temporary directory for the test, when what it needs is here.
fn ready(test: &str) -> Option<tempfile::TempDir> {
    let ok = support::require(test, NEEDS)
        && support::require(
            test,
            &[
                Need::Program("nix-daemon"),
                Need::Program("nix-instantiate"),
                Need::Program("busybox"),
            ],
        );
    ok.then(|| tempfile::tempdir().expect("tempdir"))
}

#[test]
fn nix_daemon_2_8_offloads_to_sandoff_and_gets_signed_valid_outputs() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    let dir = tmp.path();
    let host = TestHost::start(61);
    let machines = machines_file(dir, &[&host]);
    trust(dir, &host);
    let daemon = Daemon::start(dir, &format!("@{}", machines.display()), 0, "");
    let drv = daemon.drv(
        "offloaded",
        "echo hello from the machine; echo built > $out",
    );
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let daemon_err = std::fs::read_to_string(dir.join("daemon.err")).unwrap_or_default();
    assert!(out.status.success(), "{said}\ndaemon: {daemon_err}");
    assert!(said.contains("on 'ssh://"), "built on the host: {said}");
    let output = text(&out.stdout);
    assert_eq!(
        std::fs::read_to_string(dir.join("root").join(output.trim_start_matches('/')))
            .expect("output"),
        "built\n"
    );
    // Valid in the daemon's store, signed by the host.
    let info = support::run_ok(daemon.client("nix").args(["path-info", "--json", &output]));
    let info: serde_json::Value = serde_json::from_slice(&info).expect("json");
    let key_name = host
        .signing_public_key()
        .split(':')
        .next()
        .expect("key name")
        .to_owned();
    let sigs = info[0]["signatures"].to_string();
    assert!(sigs.contains(&format!("\"{key_name}:")), "{info}");
    assert_eq!(info[0]["deriver"].as_str(), Some(drv.as_str()), "{info}");
    // The remote log (the hook's fd 4) is the daemon's log of the build.
    let log = support::run_ok(daemon.client("nix").args(["log", &drv]));
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("hello from the machine"), "{log}");

    // A derivation whose input is another's output: both built there, the
    // first one's output sent back for the second.
    let drv = daemon.instantiate(
        "let dep = mk \"dep\" ''echo dep > $out''; \
         in mk \"top\" ''${bb}/bin/busybox cat ${dep} > $out; echo top >> $out''",
    );
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    let output = text(&out.stdout);
    assert_eq!(
        std::fs::read_to_string(dir.join("root").join(output.trim_start_matches('/')))
            .expect("output"),
        "dep\ntop\n"
    );

    // A build that fails on the host fails the client's build, with its log.
    let drv = daemon.drv("fails", "echo the-remote-build-says-no; exit 1");
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("the-remote-build-says-no"), "{said}");
    drop(daemon);

    // No builders: the hook declines (permanently) and the daemon builds
    // it itself.
    let daemon = Daemon::start(dir, "", 1, "");
    let drv = daemon.drv("local", "echo built here > $out");
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("on 'ssh://"), "{said}");
    let output = text(&out.stdout);
    assert_eq!(
        std::fs::read_to_string(dir.join("root").join(output.trim_start_matches('/')))
            .expect("output"),
        "built here\n"
    );
}

#[test]
fn nix_daemon_2_8_timeout_setting_limits_the_remote_build() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    let dir = tmp.path();
    let host = TestHost::start(62);
    let machines = machines_file(dir, &[&host]);
    let builders = format!("@{}", machines.display());
    // The store as `local?root=`, which the daemon passes on as it is.
    let store = format!("local?root={}", dir.join("root").display());
    let daemon = Daemon::start_on(dir, &store, &builders, 0, "timeout = 2\n");
    let drv = daemon.drv("slow", "echo started; sleep 600; echo never > $out");
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    // The host's timeout, as the hook tells it; nix-daemon 2.8 itself
    // only reports the hook's exit status (101, as for Nix 1.x).
    assert!(said.contains("timed out after 2 seconds"), "{said}");
    assert!(said.contains("failed with exit code 101"), "{said}");
    // Each note once: the daemon shows its client both the log and the
    // hook's messages.
    assert_eq!(said.matches("sandoff: building").count(), 1, "{said}");
}

#[test]
fn nix_daemon_2_8_waits_on_a_postpone_while_the_machine_is_busy() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    let dir = tmp.path();
    let host = TestHost::start_with(63, &HostConfig::default().max_jobs(1));
    trust(dir, &host);
    // The machine inline in `builders`, as `;`-separated lines.
    let daemon = Daemon::start(dir, &format!("{};", host.machine_line()), 0, "");
    // Two independent derivations, one slot: the second is postponed
    // until the first is done, then built there too.
    let a = daemon.drv("first", "sleep 1; echo a > $out");
    let b = daemon.drv("second", "echo b > $out");
    let out = support::output_or_kill(
        daemon
            .client("nix-store")
            .args(["-r", &a, &b])
            .stdin(Stdio::null()),
    );
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    // The daemon asks about the second as soon as the first is accepted
    // (it reads the reply before going on), so the slot is still taken.
    assert!(said.contains("waiting for a machine to build"), "{said}");
    assert_eq!(said.matches("sandoff: building").count(), 2, "{said}");
    assert_eq!(text(&out.stdout).lines().count(), 2, "{said}");
}

/// The settings block and one request as nix-daemon 2.8 sends them, with
/// `builders` and `store` as given.
fn request_bytes(builders: &str, store: &str, drv: &str) -> Vec<u8> {
    use sandoff::store::wire;
    let mut b = Vec::new();
    for (k, v) in [
        ("builders", builders),
        ("max-jobs", "0"),
        ("store", store),
        ("system", "x86_64-linux"),
    ] {
        wire::write_u64(&mut b, 1).expect("vec");
        wire::write_bytes(&mut b, k.as_bytes()).expect("vec");
        wire::write_bytes(&mut b, v.as_bytes()).expect("vec");
    }
    wire::write_u64(&mut b, 0).expect("vec");
    wire::write_bytes(&mut b, b"try").expect("vec");
    wire::write_u64(&mut b, 0).expect("vec");
    wire::write_bytes(&mut b, b"x86_64-linux").expect("vec");
    wire::write_bytes(&mut b, drv.as_bytes()).expect("vec");
    wire::write_u64(&mut b, 0).expect("vec");
    b
}

/// The hook at `tmp/sandoff-build-hook`, fed `input`: its exit status
/// and stderr.
fn run_hook(tmp: &Path, input: &[u8]) -> (std::process::ExitStatus, String) {
    let hook = tmp.join("sandoff-build-hook");
    if !hook.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandoff"), &hook).expect("symlink");
    }
    let mut child = Command::new(&hook)
        .arg("3")
        .env_remove("SANDOFF_STORE_ROOT")
        .env_remove("SANDOFF_DAEMON_STORE")
        .env("SANDOFF_STATE_DIR", tmp.join("state"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hook");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input).expect("write");
    let out = child.wait_with_output().expect("hook");
    assert!(out.stdout.is_empty(), "the daemon does not read stdout");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn nix_build_hook_failures_reach_the_client_as_nix_messages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let drv = "/nix/store/gdby02j6d2l6whfyagff2lff2k2cb0dn-x.drv";
    let input = request_bytes("ssh://h x86_64-linux", "daemon", drv);
    let (status, stderr) = run_hook(tmp.path(), &input);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = stderr.strip_prefix("@nix ").expect("a JSON message");
    let msg: serde_json::Value = serde_json::from_str(line.trim_end()).expect("json");
    assert_eq!(msg["action"], "msg");
    assert!(
        msg["msg"]
            .as_str()
            .is_some_and(|m| m.contains("invalid setting 'store' = 'daemon'")),
        "{msg}"
    );
}

#[test]
fn nix_build_hook_without_builders_declines_permanently() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let drv = "/nix/store/gdby02j6d2l6whfyagff2lff2k2cb0dn-x.drv";
    let missing = format!("@{}", tmp.path().join("missing").display());
    for builders in ["", missing.as_str()] {
        let input = request_bytes(builders, &root.display().to_string(), drv);
        let (status, stderr) = run_hook(tmp.path(), &input);
        assert!(status.success(), "{stderr}");
        assert_eq!(stderr, "# decline-permanently\n", "{builders:?}");
    }
}

#[test]
fn nix_daemon_2_8_offloads_to_a_stock_nix_host() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    if !support::require(this_test!(), crate::hosts::NIX_NEEDS) {
        return;
    }
    let dir = tmp.path();
    // A stock `nix-store --serve --write` host, which signs what it builds.
    let host = TestHost::start_nix(65);
    let machines = machines_file(dir, &[&host]);
    trust(dir, &host);
    let daemon = Daemon::start(dir, &format!("@{}", machines.display()), 0, "");
    let drv = daemon.drv("on-stock-nix", "echo built by nix > $out");
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("on 'ssh://"), "built on the host: {said}");
    let output = text(&out.stdout);
    let info = support::run_ok(daemon.client("nix").args(["path-info", "--json", &output]));
    let info: serde_json::Value = serde_json::from_slice(&info).expect("json");
    let key_name = host
        .signing_public_key()
        .split(':')
        .next()
        .expect("key name")
        .to_owned();
    assert!(
        info[0]["signatures"]
            .to_string()
            .contains(&format!("\"{key_name}:")),
        "{info}"
    );
}

#[test]
fn nix_daemon_2_8_builders_use_substitutes_lets_the_machine_substitute_inputs() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    if !support::require(this_test!(), crate::hosts::NIX_NEEDS) {
        return;
    }
    let dir = tmp.path();
    let host = TestHost::start_nix(66);
    let machines = machines_file(dir, &[&host]);
    trust(dir, &host);
    let daemon = Daemon::start(
        dir,
        &format!("@{}", machines.display()),
        0,
        "builders-use-substitutes = true\n",
    );
    let drv = daemon.drv("substituted-input", "echo built > $out");
    let bb = text(&support::run_ok(daemon.client("nix-store").args([
        "-q",
        "--references",
        &drv,
    ])))
    .lines()
    .find(|l| l.ends_with("-busybox"))
    .expect("busybox input")
    .to_owned();
    // A binary cache holding the input, signed by a key the host trusts
    // (the daemon's copy, added with nix-store --add, carries no signature).
    let cache = dir.join("cache");
    let key = dir.join("cache-key");
    support::run_ok(
        Command::new("nix-store")
            .args(["--generate-binary-cache-key", "cache-1"])
            .arg(key.with_extension("sec"))
            .arg(key.with_extension("pub")),
    );
    support::run_ok(
        daemon
            .client("nix")
            .args(["copy", "--to"])
            .arg(format!(
                "file://{}?secret-key={}",
                cache.display(),
                key.with_extension("sec").display()
            ))
            .arg(&bb),
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("key");
    let conf = host.nix_conf_dir().join("nix.conf");
    let mut lines = std::fs::read_to_string(&conf).expect("nix.conf");
    lines.push_str(&format!(
        "substituters = file://{}\ntrusted-public-keys = {}\n",
        cache.display(),
        public.trim()
    ));
    std::fs::write(&conf, lines).expect("nix.conf");

    // `-v`: the hook's info events reach the client at Nix's talkative level.
    let out = support::output_or_kill(
        daemon
            .client("nix-store")
            .args(["-r", "-v", &drv])
            .stdin(Stdio::null()),
    );
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("building remotely"), "{said}");
    // The host substituted the input from the cache: its copy carries the
    // cache's signature, which the daemon's copy never had.
    let info = support::run_ok(
        Command::new("nix")
            .env("NIX_CONF_DIR", host.nix_conf_dir())
            .args(["path-info", "--json", "--store"])
            .arg(host.root())
            .arg(&bb),
    );
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("\"cache-1:"), "{info}");
}

#[test]
fn nix_build_hook_shares_slots_with_nix_build_remote() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    let dir = tmp.path();
    let host = TestHost::start_with(67, &HostConfig::default().max_jobs(1));
    trust(dir, &host);
    let line = host.machine_line();
    let daemon = Daemon::start(dir, &format!("{line};"), 0, "");
    let drv = daemon.drv("after-nix", "echo b > $out");
    // The machine's only slot, taken as Nix 2.8's build-remote takes it:
    // `<state>/current-load/<store URI with '/' as '_'>-0`, flock'ed.
    let current_load = dir.join("root/nix/var/nix/current-load");
    std::fs::create_dir_all(&current_load).expect("mkdir");
    let uri = line.split_whitespace().next().expect("uri");
    let slot = std::fs::File::create(current_load.join(format!("{}-0", uri.replace('/', "_"))))
        .expect("slot file");
    let held = nix::fcntl::Flock::lock(slot, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let mut child = daemon
        .client("nix-store")
        .args(["-r", &drv])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nix-store");
    let stderr = child.stderr.take().expect("stderr");
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let said = std::sync::Arc::clone(&said);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut s = said.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    support::wait_for("the hook to postpone on the busy machine", || {
        said.lock()
            .expect("lock")
            .contains("waiting for a machine to build")
            .then_some(())
    });
    drop(held);
    let out = support::output_or_kill_child(child, "nix-store -r");
    reader.join().expect("reader");
    let said = said.lock().expect("lock").clone();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("sandoff: building"), "{said}");
    assert_eq!(text(&out.stdout).lines().count(), 1, "{said}");
}

#[test]
fn nix_daemon_2_8_as_debian_runs_it_on_the_real_root_offloads_to_sandoff() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    if !support::require(
        this_test!(),
        &[Need::Program("unshare"), Need::Program("nsenter")],
    ) {
        return;
    }
    let dir = tmp.path();
    let host = TestHost::start(68);
    let machines = machines_file(dir, &[&host]);
    trust(dir, &host);
    // The README's nix.conf lines, and what a test daemon needs besides.
    let daemon = Daemon::start_packaged(
        dir,
        &format!(
            "build-hook = {}\nbuilders = @{}\nmax-jobs = 0\nsandbox = false\nsubstituters =\n\
             experimental-features = nix-command\n",
            sandoff_as(dir, "sandoff-build-hook").display(),
            machines.display()
        ),
    );
    let drv = daemon.drv("on-real-root", "echo built > $out");
    let out = daemon.realise(&drv);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let daemon_err = std::fs::read_to_string(dir.join("daemon.err")).unwrap_or_default();
    assert!(out.status.success(), "{said}\ndaemon: {daemon_err}");
    assert!(said.contains("on 'ssh://"), "built on the host: {said}");
    let output = text(&out.stdout);
    assert_eq!(
        std::fs::read_to_string(daemon.file(&output)).expect("output"),
        "built\n"
    );
    // Registered in /nix/var/nix/db (the store `auto`), signed by the host.
    let info = support::run_ok(daemon.client("nix").args(["path-info", "--json", &output]));
    let info: serde_json::Value = serde_json::from_slice(&info).expect("json");
    let key_name = host.signing_public_key();
    let key_name = key_name.split(':').next().expect("key name");
    assert!(
        info[0]["signatures"]
            .to_string()
            .contains(&format!("\"{key_name}:")),
        "{info}"
    );
    // The slots are where Nix's build-remote keeps them for that store.
    assert!(daemon.file("/nix/var/nix/current-load/main-lock").exists());
}
