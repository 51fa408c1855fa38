//! sandoff as the offload hook of a real guix-daemon 1.4.0 (built from
//! `../shared/guix-daemon` by the test script), driven by Guix's own Guile
//! client: the daemon runs `$GUIX offload ...`, `GUIX` being a symlink named
//! `guix` to sandoff, which builds on a `/gnu/store` sandoff test host and
//! registers the output in the daemon's own database.
//!
//! Needs root, the built daemon (`$SANDOFF_GUIX_KIT`, default
//! `/var/tmp/guix-kit`), guile and what the test hosts need.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::daemons::{machines_file, sandoff_as, trust, Running};
use crate::hosts::{HostConfig, TestHost, NEEDS};
use crate::support::{self, Need};
use crate::this_test;

/// Where the test script builds guix-daemon.
fn kit() -> PathBuf {
    std::env::var_os("SANDOFF_GUIX_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/guix-kit"))
}

/// A running guix-daemon with its state, logs and socket under one
/// directory.
struct Daemon {
    running: Running,
}

impl Daemon {
    /// guix-daemon with `max_jobs` local builds, its hook `guix` the sandoff
    /// binary, machines from `machines`, sandoff's own state in `dir/sandoff`.
    fn start(dir: &Path, max_jobs: u32, machines: &Path) -> Daemon {
        let guix = sandoff_as(dir, "guix");
        let socket = dir.join("socket");
        let running = Running::spawn(
            Command::new(kit().join("guix-daemon"))
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", "/root")
                .env("GUIX", &guix)
                .env("GUIX_STATE_DIRECTORY", dir.join("var"))
                .env("GUIX_LOG_DIRECTORY", dir.join("log"))
                .env("GUIX_CONFIGURATION_DIRECTORY", dir.join("etc"))
                .env("SANDOFF_STATE_DIR", dir.join("sandoff"))
                .env("SANDOFF_MACHINES", machines)
                .arg("--build-users-group=guixbuild")
                .arg(format!("--listen={}", socket.display()))
                .arg(format!("--max-jobs={max_jobs}")),
            dir,
            &socket,
        );
        Daemon { running }
    }

    /// Guix's client: the derivation `tag` running `script`, built.
    fn build(&self, tag: &str, script: &str) -> (Output, String) {
        let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/guix/client.scm");
        let out = support::output_or_kill(
            Command::new("guile")
                .env("GUIX_DAEMON_SOCKET", self.running.dir.join("socket"))
                .args(["--no-auto-compile", "-L"])
                .arg(kit().join("src"))
                .arg(client)
                .arg(tag)
                .arg(self.running.dir.join("bb"))
                .arg(script)
                .arg("--build"),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let output = text
            .lines()
            .find_map(|l| l.strip_prefix("out "))
            .unwrap_or_default()
            .to_owned();
        (out, output)
    }

    /// Whether `path` is valid in the daemon's database.
    fn is_valid(&self, path: &str) -> bool {
        self.db()
            .query_row(
                "select count(*) from ValidPaths where path = ?",
                [path],
                |r| r.get::<_, i64>(0),
            )
            .expect("query")
            == 1
    }

    /// The daemon's database.
    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.running.dir.join("var/db/db.sqlite"))
            .expect("guix-daemon's db")
    }
}

/// A temporary directory for the test, when what it needs is here.
fn ready(test: &str) -> Option<tempfile::TempDir> {
    let built = kit().join("guix-daemon").is_file();
    let ok = support::require(test, NEEDS)
        && support::require(
            test,
            &[
                Need::Program("guile"),
                Need::Program("zcat"),
                Need::Condition {
                    what: "guix-daemon built from ../shared/guix-daemon (scripts/test.sh does it)",
                    met: built,
                },
            ],
        );
    ok.then(|| tempfile::tempdir().expect("tempdir"))
}

/// guix-daemon's build users and `/gnu/store`, as its README says.
fn guix_setup(dir: &Path) {
    let sh = |cmd: &str| support::run_ok(Command::new("sh").args(["-c", cmd]));
    sh("getent group guixbuild >/dev/null || groupadd --system guixbuild");
    sh("getent passwd guixbuilder01 >/dev/null || useradd -g guixbuild -G guixbuild --system guixbuilder01");
    sh("mkdir -p /gnu/store && chgrp guixbuild /gnu/store && chmod 1775 /gnu/store");
    let bb = dir.join("bb/bin");
    std::fs::create_dir_all(&bb).expect("mkdir");
    std::fs::copy("/bin/busybox", bb.join("busybox")).expect("busybox");
}

/// A tag no earlier run used: `/gnu/store` outlives the test's daemon.
fn tag(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{what}-{}-{nanos}", std::process::id())
}

#[test]
fn guix_daemon_offloads_to_sandoff_and_gets_valid_outputs() {
    let Some(tmp) = ready(this_test!()) else {
        return;
    };
    let dir = tmp.path();
    guix_setup(dir);
    let host = TestHost::start_with(60, &HostConfig::default().store_dir("/gnu/store"));
    let machines = machines_file(dir, &[&host]);
    trust(dir, &host);

    // --max-jobs=0: the daemon relies on its hook.
    let daemon = Daemon::start(dir, 0, &machines);
    let t = tag("remote");
    let (out, output) = daemon.build(
        &t,
        "echo building $TAG remotely; mkdir $out; echo hello from $TAG > $out/greeting",
    );
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("on 'ssh://"), "built on the host: {said}");
    // Valid in the daemon's database, with the NAR hash of what is there,
    // its deriver and its reference to busybox.
    let real = PathBuf::from(&output);
    assert_eq!(
        std::fs::read_to_string(real.join("greeting")).expect("output"),
        format!("hello from {t}\n")
    );
    let (hash, size) = sandoff::store::nar::hash_path(&real).expect("nar");
    let (db_hash, db_size, deriver): (String, i64, String) = daemon
        .db()
        .query_row(
            "select hash, narSize, deriver from ValidPaths where path = ?",
            [&output],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the output is valid in guix-daemon's database");
    assert_eq!(db_hash, hash.to_base16_prefixed());
    assert_eq!(db_size as u64, size);
    assert!(
        deriver.ends_with(&format!("sandoff-test-{t}.drv")),
        "{deriver}"
    );
    // The build's log is in the daemon's log directory (from fd 4).
    let base = Path::new(&deriver)
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let log = dir
        .join("log/drvs")
        .join(&base[..2])
        .join(format!("{}.gz", &base[2..]));
    let text = support::run_ok(Command::new("zcat").arg(&log));
    assert!(
        String::from_utf8_lossy(&text).contains("remotely"),
        "{}",
        String::from_utf8_lossy(&text)
    );

    // A build that fails on the host fails the client's build, with its log.
    let (out, _) = daemon.build(&tag("fails"), "echo the-remote-build-says-no; exit 1");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(said.contains("the-remote-build-says-no"), "{said}");
    drop(daemon);

    // No machine fits: the hook declines and the daemon builds it itself.
    std::fs::write(&machines, "").expect("machines");
    let daemon = Daemon::start(dir, 1, &machines);
    let t = tag("local");
    let (out, output) = daemon.build(&t, "mkdir $out; echo local $TAG > $out/greeting");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("on 'ssh://"), "{said}");
    assert!(
        daemon.is_valid(&output),
        "{output} is not valid in the daemon's database"
    );
    drop(daemon);

    // A host that dies mid-build: the build finishes on the other one.
    let other = TestHost::start_with(64, &HostConfig::default().store_dir("/gnu/store"));
    trust(dir, &other);
    // The first host is preferred (faster), one build at a time each.
    std::fs::write(
        &machines,
        format!(
            "{}\n{}\n",
            host.machine_line_with(1, 4),
            other.machine_line_with(1, 1)
        ),
    )
    .expect("machines");
    let daemon = Daemon::start(dir, 0, &machines);
    let t = tag("failover");
    let script = "echo started; sleep 20; mkdir $out; echo done > $out/greeting";
    let client = std::thread::scope(|scope| {
        let client = scope.spawn(|| daemon.build(&t, script));
        // Started on the first host once its build directory exists; then
        // the host dies (sshd and the build with it).
        let builds = host.root().join("nix/var/sandoff/builds");
        support::wait_for("the build to start on the first host", || {
            std::fs::read_dir(&builds)
                .is_ok_and(|mut d| d.next().is_some())
                .then_some(())
        });
        host.kill();
        client.join().expect("client")
    });
    let (out, output) = client;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    let base = Path::new(&output).file_name().expect("name").to_owned();
    assert!(
        other.root().join("gnu/store").join(&base).exists(),
        "built on the other host: {said}"
    );
    assert!(
        daemon.is_valid(&output),
        "{output} is not valid in the daemon's database"
    );
}
