//! `sandoff hook` driven as guix-daemon and Nix 1.x drive their build hook:
//! request lines on stdin, replies on stdout, the log on fd 4 (given by a
//! shell, `4>>LOG`), the exit status.
//!
//! The protocol tests need no machine: derivations are only added to a store
//! under a temporary directory, and machines files name hosts that cannot
//! be reached or are never chosen. The `hook_builds_*` tests and the checks
//! after an accept use real sshd test hosts (root), since the hook connects
//! before it accepts. The `guix_*` tests run sandoff through a symlink named
//! `guix`, as guix-daemon's `GUIX` variable would point at it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sandoff::decide::file::DEFAULT_LOCATIONS;
use sandoff::decide::Machine;
use sandoff::remote::backoff::Backoff;
use sandoff::remote::slots::SlotDir;
use sandoff::store::local::LocalStore;
use sandoff::store::{StoreDir, StoreLocation, StorePath};
use serde_json::json;
use tempfile::TempDir;

use crate::hosts::{self, TestHost};
use crate::support::{self, Need};
use crate::this_test;

/// A store under a temporary directory.
struct Local {
    tmp: TempDir,
    /// Its store directory (`/nix/store` unless made with [`Local::with_dir`]).
    dir: StoreDir,
}

impl Local {
    fn new() -> Local {
        Local::with_dir(StoreDir::default())
    }

    /// A store whose paths are named in `dir` (Guix's `/gnu/store`).
    fn with_dir(dir: StoreDir) -> Local {
        Local {
            tmp: tempfile::tempdir().expect("tempdir"),
            dir,
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    fn loc(&self) -> StoreLocation {
        StoreLocation::new(self.dir.clone(), self.root())
    }

    fn cmd(&self) -> Command {
        let mut c = support::sandoff();
        c.arg("--store-root")
            .arg(self.root())
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR")
            .env_remove("SANDOFF_MACHINES");
        if self.dir != StoreDir::default() {
            c.arg("--store-dir").arg(self.dir.as_str());
        }
        c
    }

    /// Adds a derivation; returns its `.drv` path.
    fn add(&self, drv: serde_json::Value) -> String {
        support::derivation_add(&mut self.cmd(), &drv)
    }

    /// A derivation that is never built: only its system and features count.
    fn drv(&self, name: &str, system: &str, features: &[&str]) -> String {
        let mut env = json!({"name": name, "builder": "/bin/sh", "system": system, "out": ""});
        if !features.is_empty() {
            env["requiredSystemFeatures"] = json!(features.join(" "));
        }
        self.add(json!({
            "outputs": {"out": {"path": ""}},
            "inputSrcs": [],
            "inputDrvs": {},
            "system": system,
            "builder": "/bin/sh",
            "args": ["-c", "exit 1"],
            "env": env,
        }))
    }

    /// Writes a machines file.
    fn machines(&self, text: &str) -> PathBuf {
        let p = self.tmp.path().join("machines");
        std::fs::write(&p, text).expect("write machines");
        p
    }

    /// `sandoff hook x86_64-linux 0 0 0` with the machines file.
    fn hook(&self, machines: Option<&Path>) -> Command {
        let mut c = self.cmd();
        if let Some(m) = machines {
            c.env("SANDOFF_MACHINES", m);
        }
        c.args(["hook", "x86_64-linux", "0", "0", "0"]);
        c
    }

    fn store(&self) -> LocalStore {
        sandoff::derivation::check::open_store(self.loc()).expect("open store")
    }

    /// Whether the output `out` of `drv` is valid in this store.
    fn is_valid(&self, drv: &str) -> bool {
        self.store()
            .query_path_info(&self.out(drv))
            .expect("query")
            .is_some()
    }

    fn out(&self, drv: &str) -> StorePath {
        self.store()
            .derivation_outputs(&self.dir.parse_path(drv).expect("drv path"))
            .expect("outputs")
            .remove("out")
            .expect("out")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` with `input` on stdin (then EOF).
fn talk(cmd: &mut Command, input: &str) -> Output {
    support::output_with_input(cmd, input.as_bytes())
}

fn request(willing: bool, system: &str, drv: &str, features: &[&str]) -> String {
    format!(
        "{} {system} {drv} {}\n",
        u8::from(willing),
        features.join(",")
    )
}

/// No line on stderr may look like a reply to the daemon.
fn assert_no_reply_on_stderr(out: &Output) {
    let err = text(&out.stderr);
    assert!(
        !err.lines().any(|l| l.starts_with("# ")),
        "stderr has a reply-like line: {err}"
    );
}

/// Everything a remote build goes through.
fn offload_ready(test: &str) -> bool {
    support::require(test, hosts::NEEDS) && support::require(test, &[Need::Program("busybox")])
}

/// For the `hook_builds_*` tests: after [`offload_ready`], test host
/// `index` and a local store that trusts its signing key.
fn trusted_host(test: &str, index: u8) -> Option<(TestHost, Local)> {
    if !offload_ready(test) {
        return None;
    }
    let host = TestHost::start(index);
    let s = Local::new();
    trust(&s, &host);
    Some((host, s))
}

/// A local port where nobody listens (bound a moment ago, then closed).
fn dead_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[test]
fn hook_declines_what_no_machine_can_build() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let mips = s.drv("mips", "mips64-linux", &[]);
    let cuda = s.drv("cuda", "x86_64-linux", &["cuda"]);
    // Never contacted: declining needs no connection.
    let machines = s.machines(
        "ssh://arm.invalid aarch64-linux - 2 1 kvm\nssh://x86.invalid x86_64-linux - 2 1 kvm\n",
    );
    let input = [
        request(true, "mips64-linux", &mips, &[]),
        request(false, "x86_64-linux", &cuda, &["cuda"]),
        request(true, "mips64-linux", &mips, &[]),
    ]
    .concat();
    let out = talk(&mut s.hook(Some(&machines)), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# decline\n# decline\n# decline\n");
    assert_no_reply_on_stderr(&out);

    // With only an aarch64 machine, an x86_64 build is the daemon's.
    let machines = s.machines("ssh://arm.invalid aarch64-linux - 2 1\n");
    let out = talk(
        &mut s.hook(Some(&machines)),
        &request(false, "x86_64-linux", &x86, &[]),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# decline\n");
    // Nothing was taken: no slot files, no backoff.
    assert!(!s.loc().state.join("current-load").exists());
    assert!(!s.loc().state.join("offload-backoff").exists());
}

#[test]
fn hook_declines_everything_without_machines() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let arm = s.drv("arm", "aarch64-linux", &["kvm"]);
    let input = [
        request(true, "x86_64-linux", &x86, &[]),
        request(false, "aarch64-linux", &arm, &["kvm"]),
    ]
    .concat();
    // An empty machines file.
    let empty = s.machines("# no machines\n");
    let out = talk(&mut s.hook(Some(&empty)), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# decline\n# decline\n");

    // No machines file at all (the default locations must be absent).
    let none = !DEFAULT_LOCATIONS.iter().any(|p| Path::new(p).exists());
    let what = "no machines file in the default locations";
    if !support::require(this_test!(), &[Need::Condition { what, met: none }]) {
        return;
    }
    let out = talk(&mut s.hook(None), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# decline\n# decline\n");
}

/// The hook's error about a request line of `feed`: exit status 1, one
/// short line, and it ends (the watchdog in `feed_or_kill` says if not).
fn assert_long_line_refused(
    s: &Local,
    feed: impl FnOnce(std::process::ChildStdin) + Send + 'static,
) {
    let out = support::feed_or_kill(&mut s.hook(None), feed);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.len() < 1024,
        "a short error, not the line: {} bytes",
        err.len()
    );
    assert_eq!(
        err,
        "sandoff: the daemon's request line is longer than the limit of 1 MiB\n"
    );
}

#[test]
fn hook_refuses_a_200_mb_request_line_in_one_short_line() {
    let s = Local::new();
    assert_long_line_refused(&s, |mut stdin| {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..200 {
            if stdin.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = stdin.write_all(b"\n");
    });
}

#[test]
fn hook_does_not_buffer_an_endless_request_line() {
    // The line never ends: only a hook that stops reading at the limit
    // ever answers (one that buffers the line runs until memory is gone).
    let s = Local::new();
    assert_long_line_refused(&s, |mut stdin| {
        let chunk = vec![b'1'; 1 << 16];
        while stdin.write_all(&chunk).is_ok() {}
    });
}

#[test]
fn hook_ends_quietly_at_end_of_input() {
    let s = Local::new();
    let out = talk(&mut s.hook(None), "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

#[test]
fn hook_rejects_malformed_lines_naming_them() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let machines = s.machines("ssh://arm.invalid aarch64-linux\n");
    // One good request is answered first.
    let bad = format!("1 x86_64-linux {x86}");
    let out = talk(
        &mut s.hook(Some(&machines)),
        &format!("{}{bad}\n", request(true, "x86_64-linux", &x86, &[])),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "# decline\n");
    let err = text(&out.stderr);
    assert!(err.contains("invalid request line"), "{err}");
    assert!(err.contains(&format!("{bad:?}")), "names the line: {err}");

    for line in [
        "hello",
        "2 x86_64-linux /nix/store/x.drv ",
        &format!("1 x86_64-linux {x86} kvm big-parallel"),
    ] {
        let out = talk(&mut s.hook(Some(&machines)), &format!("{line}\n"));
        assert_eq!(out.status.code(), Some(1), "{line}");
        assert!(out.stdout.is_empty());
        let err = text(&out.stderr);
        assert!(err.starts_with("sandoff: invalid request line"), "{err}");
        assert_no_reply_on_stderr(&out);
    }

    // A derivation the store does not have: a request to answer, so it is
    // declined with the reason (see hook_declines_with_the_reason_*).
    let missing = "/nix/store/00000000000000000000000000000000-missing.drv";
    let out = talk(
        &mut s.hook(Some(&machines)),
        &request(true, "x86_64-linux", missing, &[]),
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "# decline\n");
    let err = text(&out.stderr);
    assert!(err.contains(missing) && err.contains("not valid"), "{err}");

    // Bad arguments are usage errors.
    let out = talk(s.cmd().args(["hook", "x86_64-linux", "0", "2", "0"]), "");
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `cmd` as the daemon does, stderr joined with stdout (one pipe),
/// with `input` on stdin: what the daemon reads, in order.
fn talk_joined(cmd: &Command, input: &str) -> Output {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(r#"exec "$0" "$@" 2>&1"#)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    talk(&mut sh, input)
}

/// The hook's joined output for one request is `sandoff: ...` lines
/// (one of them holding `reason`) followed by `# decline`, and it exits 0.
fn assert_declined_because(out: &Output, reason: &str) {
    let all = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let lines: Vec<&str> = all.lines().collect();
    let (reply, before) = lines.split_last().expect("a reply");
    assert_eq!(*reply, "# decline", "{all}");
    assert!(
        !before.is_empty(),
        "the reason comes before the reply: {all}"
    );
    assert!(
        before.iter().all(|l| l.starts_with("sandoff: ")),
        "only reason lines before the reply: {all}"
    );
    assert!(
        before.iter().any(|l| l.contains(reason)),
        "{reason:?} in {all}"
    );
}

#[test]
fn hook_declines_with_the_reason_when_it_cannot_answer() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let req = request(true, "x86_64-linux", &x86, &[]);

    // A machines file that is not there, or not a file.
    let gone = s.tmp.path().join("no-such-machines");
    let out = talk_joined(&s.hook(Some(&gone)), &req);
    assert_declined_because(&out, "cannot use machines file");
    let out = talk_joined(&s.hook(Some(s.tmp.path())), &req);
    assert_declined_because(&out, "cannot use machines file");
    // One that cannot be parsed.
    let bad = s.machines("ssh://x86.invalid x86_64-linux - many\n");
    let out = talk_joined(&s.hook(Some(&bad)), &req);
    assert_declined_because(&out, "maxJobs");
    // A relative NIX_REMOTE_SYSTEMS, which Nix 1.x forbids.
    let out = talk_joined(s.hook(None).env("NIX_REMOTE_SYSTEMS", "machines"), &req);
    assert_declined_because(&out, "NIX_REMOTE_SYSTEMS must be an absolute path");

    // A derivation the store does not have; one that it cannot read.
    let machines = s.machines("ssh://x86.invalid x86_64-linux - 1 1\n");
    let missing = "/nix/store/00000000000000000000000000000000-missing.drv";
    let out = talk_joined(
        &s.hook(Some(&machines)),
        &request(true, "x86_64-linux", missing, &[]),
    );
    assert_declined_because(&out, "not valid in the store");
    let gnu = "/gnu/store/00000000000000000000000000000000-other-store.drv";
    let out = talk_joined(
        &s.hook(Some(&machines)),
        &request(true, "x86_64-linux", gnu, &[]),
    );
    assert_declined_because(&out, gnu);
    let drv_file = s
        .loc()
        .real_path(&StoreDir::default().parse_path(&x86).expect("drv path"));
    let store_dir = drv_file.parent().expect("store directory");
    let mode = std::fs::metadata(store_dir).expect("stat").permissions();
    let mut writable = mode.clone();
    std::os::unix::fs::PermissionsExt::set_mode(&mut writable, 0o755);
    std::fs::set_permissions(store_dir, writable).expect("chmod");
    std::fs::remove_file(&drv_file).expect("remove .drv");
    std::fs::set_permissions(store_dir, mode).expect("chmod back");
    let out = talk_joined(&s.hook(Some(&machines)), &req);
    assert_declined_because(&out, "x86.drv");

    // Every request of the session is answered, each after its reason.
    let out = talk_joined(&s.hook(Some(&gone)), &[req.clone(), req.clone()].concat());
    let all = text(&out.stdout);
    let replies: Vec<&str> = all.lines().filter(|l| l.starts_with("# ")).collect();
    assert_eq!(replies, ["# decline", "# decline"], "{all}");
    assert!(
        all.lines()
            .next()
            .is_some_and(|l| l.starts_with("sandoff: ")),
        "{all}"
    );

    // A store that cannot be opened: every request is still answered.
    let file_root = s.tmp.path().join("not-a-directory");
    std::fs::write(&file_root, "").expect("write");
    let mut c = s.hook(Some(&machines));
    c.arg("--store-root").arg(&file_root);
    let out = talk_joined(&c, &req);
    assert_declined_because(&out, "not-a-directory");
}

#[test]
fn hook_reads_nix_remote_systems_and_counts_slots_in_nix_current_load() {
    let s = Local::new();
    let darwin = s.drv("darwin", "x86_64-darwin", &[]);
    let perf = s.drv("perf", "i686-linux", &["perf"]);
    let mips = s.drv("mips", "mips64-linux", &[]);
    // Nix 1.x's example, as its manual gives it.
    let conf = support::fixtures().join("etc/nix/remote-systems.conf");
    let listed = sandoff::decide::file::load_as(
        &conf,
        Some(sandoff::decide::MachineFormat::Nix),
        "x86_64-linux",
    )
    .expect("remote-systems.conf");
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ssh://nix@mcflurry.labs.cs.uu.nl",
            "ssh://nix@scratchy.labs.cs.uu.nl",
            "ssh://nix@itchy.labs.cs.uu.nl",
            "ssh://nix@poochie.labs.cs.uu.nl"
        ]
    );
    // Every slot of mcflurry (x86_64-darwin, 2) and poochie (the only one
    // for "perf", 8) is held in the shared directory, as by other hooks.
    let shared = s.tmp.path().join("current-load");
    let slots = SlotDir::at(shared.clone());
    let mut held = Vec::new();
    for m in [&listed[0], &listed[3]] {
        while let Some(slot) = slots.try_acquire(m).expect("slot files") {
            held.push(slot);
        }
    }
    assert_eq!(held.len(), 10);
    let hook = || {
        let mut c = s.hook(None);
        c.env("NIX_REMOTE_SYSTEMS", &conf)
            .env("NIX_CURRENT_LOAD", &shared);
        c
    };
    let input = [
        request(false, "x86_64-darwin", &darwin, &[]),
        request(true, "x86_64-darwin", &darwin, &[]),
        request(false, "i686-linux", &perf, &["perf"]),
        request(true, "mips64-linux", &mips, &[]),
    ]
    .concat();
    let out = talk(&mut hook(), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // This host cannot build for darwin: willing or not, it waits.
    assert_eq!(
        text(&out.stdout),
        "# postpone\n# postpone\n# postpone\n# decline\n"
    );
    assert_no_reply_on_stderr(&out);
    // The store's own slot directory was not used.
    assert!(!s.loc().state.join("current-load").exists());

    // SANDOFF_MACHINES comes first: with none there, the daemon builds.
    let empty = s.machines("");
    let out = talk(hook().env("SANDOFF_MACHINES", &empty), &input);
    assert_eq!(
        text(&out.stdout),
        "# decline\n# decline\n# decline\n# decline\n",
        "{}",
        text(&out.stderr)
    );
    // Empty variables are unset ones, not a usage error without a reply.
    let out = talk(
        s.hook(Some(&empty))
            .env("NIX_REMOTE_SYSTEMS", "")
            .env("NIX_CURRENT_LOAD", ""),
        &input,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 4);
    drop(held);
}

#[test]
fn hook_postpones_when_every_slot_is_busy_and_the_daemon_is_not_willing() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let gpu = s.drv("gpu", "x86_64-linux", &["gpu"]);
    let machines = s.machines("ssh://busy.invalid x86_64-linux - 1 1 gpu\n");
    // Its one slot is held by this process, as a running build would.
    let (slots, machine, slot) = hold_first_slot(&s, &machines);
    let input = [
        // Not willing: wait for the machine.
        request(false, "x86_64-linux", &x86, &[]),
        // Willing and able: the daemon builds it now.
        request(true, "x86_64-linux", &x86, &[]),
        // Willing but unable (no gpu here): only the machine can.
        request(true, "x86_64-linux", &gpu, &["gpu"]),
    ]
    .concat();
    let out = talk(&mut s.hook(Some(&machines)), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# postpone\n# decline\n# postpone\n");
    assert_no_reply_on_stderr(&out);
    // The hook took no slot of its own and left none behind.
    assert_eq!(slots.in_use(&machine).expect("in use"), 1);
    drop(slot);
    assert_eq!(slots.in_use(&machine).expect("in use"), 0);
}

#[test]
fn hook_checks_the_lines_after_accepting() {
    if !offload_ready(this_test!()) {
        return;
    }
    let host = TestHost::start(26);
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let other = s.drv("other", "x86_64-linux", &[]);
    // Connected before the accept; nothing is built, since the lines are
    // checked first.
    let machines = s.machines(&std::fs::read_to_string(host.machines()).expect("machines"));
    let machine = sandoff::decide::file::load(&machines, "x86_64-linux")
        .expect("machines")
        .remove(0);
    let req = request(true, "x86_64-linux", &x86, &[]);
    let shown = |p: &StorePath| StoreDir::default().display(p);
    let cases = [
        (req.clone(), "before sending the inputs line"),
        (format!("{req}{x86} \n"), "before sending the outputs line"),
        (
            format!("{req}/tmp/not-in-store \n{}\n", shown(&s.out(&x86))),
            "invalid inputs line",
        ),
        (
            format!("{req}{x86} \n{}\n", shown(&s.out(&other))),
            "is not an output of",
        ),
    ];
    for (input, message) in cases {
        let out = talk(&mut s.hook(Some(&machines)), &input);
        assert_eq!(out.status.code(), Some(1), "{input:?}");
        assert_eq!(text(&out.stdout), "# accept\n");
        let err = text(&out.stderr);
        assert!(err.contains(message), "{input:?}: {err}");
        assert_no_reply_on_stderr(&out);
    }
    // Each hook gave its slot back, and the machine is not blamed.
    let slots = SlotDir::new(&s.loc().state);
    assert_eq!(slots.in_use(&machine).expect("in use"), 0);
    let backoff = Backoff::new(&s.loc().state);
    assert!(backoff.state(&machine.name).expect("backoff").is_none());
}

#[test]
fn hook_declines_when_the_only_machine_cannot_be_reached() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let machines = s.machines(&format!(
        "ssh://root@127.0.0.1:{} x86_64-linux - 1 1\n",
        dead_port()
    ));
    let machine = sandoff::decide::file::load(&machines, "x86_64-linux")
        .expect("machines")
        .remove(0);
    // The hook connects before it accepts: an unreachable machine goes into
    // backoff and the request is decided again, so the daemon builds it
    // (never a hook failure after an accept, as with guix offload).
    let out = talk(
        &mut s.hook(Some(&machines)),
        &request(true, "x86_64-linux", &x86, &[]),
    );
    assert_declined_after_trying(&out);
    let backoff = Backoff::new(&s.loc().state);
    assert!(backoff
        .state(&machine.name)
        .expect("backoff")
        .is_some_and(|b| b.active(std::time::SystemTime::now())));
    // No slot is left held.
    let slots = SlotDir::new(&s.loc().state);
    assert_eq!(slots.in_use(&machine).expect("in use"), 0);
}

#[test]
fn build_no_build_hook_is_local_only() {
    let s = Local::new();
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    let machines = s.machines("ssh://x86.invalid x86_64-linux - 2 1\n");
    let m = machines.to_str().expect("utf-8");
    for flag in ["--local-only", "--no-build-hook"] {
        let out = support::run_ok(s.cmd().args(["decide", "--machines", m, flag, &x86]));
        assert!(
            text(&out).starts_with("local: local builds only"),
            "{flag}: {}",
            text(&out)
        );
    }
}

// ---------------------------------------------------------------------------
// With real machines (root, sshd, the merged offload stack).

/// A derivation built with busybox from the store, as tests/it/build.rs does.
fn busybox_drv(s: &Local, name: &str, script: &str) -> (String, String) {
    let src = s.tmp.path().join("src/busybox/bin");
    if !src.join("busybox").exists() {
        std::fs::create_dir_all(&src).expect("mkdir");
        let bb = support::which("busybox").expect("busybox");
        std::fs::copy(bb, src.join("busybox")).expect("copy busybox");
    }
    let out = support::run_ok(
        s.cmd()
            .args(["store", "add"])
            .arg(s.tmp.path().join("src/busybox")),
    );
    let bb_path = text(&out).trim().to_owned();
    let bb = format!("{bb_path}/bin/busybox");
    let script = format!(
        "set -eu\n{bb} mkdir -p $TMPDIR/bin\n{bb} --install -s $TMPDIR/bin\nexport PATH=$TMPDIR/bin\n{script}"
    );
    let drv = s.add(json!({
        "outputs": {"out": {"path": ""}},
        "inputSrcs": [bb_path],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": bb,
        "args": ["sh", "-c", script],
        "env": {"name": name, "builder": bb, "system": "x86_64-linux", "out": ""},
    }));
    (drv, bb_path)
}

/// Trusts the host's signing key in `s`.
fn trust(s: &Local, host: &TestHost) {
    support::run_ok(
        s.cmd()
            .args(["key", "authorize"])
            .arg(host.root().join("nix/var/sandoff/keys/signing-key.pub")),
    );
}

/// What one accepted hook run gave.
struct Run {
    reply: String,
    code: Option<i32>,
    stderr: String,
    log: String,
}

impl Run {
    /// The hook accepted, and exited with `code`.
    fn assert_accepted_and_exited(&self, code: i32) {
        assert_eq!(self.reply, "# accept\n", "{}", self.stderr);
        assert_eq!(self.code, Some(code), "{}", self.stderr);
    }
}

/// Drives one accept: the request, then (if accepted) the inputs and
/// outputs lines as guix-daemon writes them; fd 4 goes to a log file.
/// Without `fd4` the hook has no descriptor 4 and writes the log on stderr.
fn accept_and_build(
    s: &Local,
    machines: &Path,
    drv: &str,
    inputs: &[&str],
    timeout: u64,
    fd4: bool,
) -> Run {
    accept_and_build_with(s, machines, drv, inputs, 0, timeout, fd4)
}

/// [`accept_and_build`] with a max-silent-time too.
fn accept_and_build_with(
    s: &Local,
    machines: &Path,
    drv: &str,
    inputs: &[&str],
    max_silent: u64,
    timeout: u64,
    fd4: bool,
) -> Run {
    let log = s.tmp.path().join("hook.log");
    let err = s.tmp.path().join("hook.err");
    let _ = std::fs::remove_file(&log);
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(if fd4 {
            r#"exec "$0" "$@" 4>>"$HOOK_LOG""#
        } else {
            r#"exec "$0" "$@""#
        })
        .arg(env!("CARGO_BIN_EXE_sandoff"))
        .arg("--store-root")
        .arg(s.root())
        .args([
            "hook",
            "x86_64-linux",
            &max_silent.to_string(),
            "1",
            &timeout.to_string(),
        ])
        .env("HOOK_LOG", &log)
        .env("SANDOFF_MACHINES", machines)
        .env_remove("SANDOFF_STORE_DIR")
        .env_remove("SANDOFF_STATE_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).expect("stderr file"));
    let mut child = c.spawn().expect("spawn hook");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    stdin
        .write_all(request(true, "x86_64-linux", drv, &[]).as_bytes())
        .expect("request");
    stdin.flush().expect("flush");
    let mut reply = String::new();
    stdout.read_line(&mut reply).expect("reply");
    if reply == "# accept\n" {
        let out = StoreDir::default().display(&s.out(drv));
        let mut line: String = inputs.iter().map(|p| format!("{p} ")).collect();
        line.push_str(&format!("{drv} \n{out}\n"));
        stdin.write_all(line.as_bytes()).expect("paths lines");
    }
    drop(stdin);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    assert!(rest.is_empty(), "more on stdout after the reply: {rest:?}");
    let status = child.wait().expect("wait hook");
    Run {
        reply,
        code: status.code(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

#[test]
fn hook_builds_on_a_machine_with_the_log_on_fd_4() {
    let Some((host, s)) = trusted_host(this_test!(), 21) else {
        return;
    };
    let (drv, bb) = busybox_drv(
        &s,
        "hooked",
        "echo hello from the machine\necho built > $out\n",
    );
    let run = accept_and_build(&s, &host.machines(), &drv, &[&bb], 0, true);
    run.assert_accepted_and_exited(0);
    assert!(
        run.log.contains("hello from the machine"),
        "log: {:?}",
        run.log
    );
    // The note on where it builds is in the log too, before the log.
    let note = format!("sandoff: building '{drv}' on '");
    assert!(
        run.log.find(&note) < run.log.find("hello from the machine"),
        "log: {:?}",
        run.log
    );
    assert!(run.stderr.contains(&note), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("@ build-remote {drv} ")),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.lines().any(|l| l.starts_with("# ")),
        "{}",
        run.stderr
    );
    let out = s.out(&drv);
    let info = s.store().query_path_info(&out).expect("query");
    assert!(info.is_some(), "output valid here");
    assert_eq!(
        std::fs::read_to_string(s.loc().real_path(&out)).expect("output"),
        "built\n"
    );
    // The slot is free again.
    let machine = sandoff::decide::file::load(&host.machines(), "x86_64-linux")
        .expect("machines")
        .remove(0);
    assert_eq!(
        SlotDir::new(&s.loc().state)
            .in_use(&machine)
            .expect("slots"),
        0
    );
}

#[test]
fn hook_builds_print_a_hostile_remote_log_and_failure_filtered() {
    let Some((host, s)) = trusted_host(this_test!(), 23) else {
        return;
    };
    let script = "printf 'x\\033]52;c;ZXZpbA==\\007y\\n\\033]0;pwned\\033\\\\z\\n' >&2\nexit 3\n";
    let raw = "x\x1b]52;c;ZXZpbA==\x07y\n\x1b]0;pwned\x1b\\z\n";
    let safe = |stderr: &str| !stderr.contains("\x1b]") && !stderr.contains('\x07');

    // The log on fd 4 goes to the daemon as written; stderr is filtered.
    let (drv, bb) = busybox_drv(&s, "hostile", script);
    let run = accept_and_build(&s, &host.machines(), &drv, &[&bb], 0, true);
    assert_eq!(run.code, Some(100), "{:?}", run.stderr);
    assert!(run.log.contains(raw), "log: {:?}", run.log);
    assert!(safe(&run.stderr), "{:?}", run.stderr);

    // Without fd 4 the log itself goes to stderr: filtered too.
    let (drv, bb) = busybox_drv(&s, "hostile-again", script);
    let run = accept_and_build(&s, &host.machines(), &drv, &[&bb], 0, false);
    assert_eq!(run.code, Some(100), "{:?}", run.stderr);
    assert!(run.stderr.contains("xy\n"), "{:?}", run.stderr);
    assert!(safe(&run.stderr), "{:?}", run.stderr);
}

#[test]
fn hook_builds_exit_100_on_a_failed_remote_build_and_101_on_a_timeout() {
    let Some((host, s)) = trusted_host(this_test!(), 22) else {
        return;
    };
    let (drv, bb) = busybox_drv(&s, "failing", "echo about to fail\nexit 3\n");
    let run = accept_and_build(&s, &host.machines(), &drv, &[&bb], 0, true);
    run.assert_accepted_and_exited(100);
    assert!(run.log.contains("about to fail"), "log: {:?}", run.log);
    assert!(!s.is_valid(&drv));

    let (drv, bb) = busybox_drv(&s, "slow", "sleep 60\necho never > $out\n");
    let run = accept_and_build(&s, &host.machines(), &drv, &[&bb], 2, true);
    run.assert_accepted_and_exited(101);
    assert!(!s.is_valid(&drv));
}

#[test]
fn hook_builds_with_u64_max_limits() {
    let Some((host, s)) = trusted_host(this_test!(), 41) else {
        return;
    };
    let (drv, bb) = busybox_drv(&s, "forever-limits", "echo built > $out\n");
    // A daemon passes u64::MAX for "no limit"; the hook used to panic
    // adding it to the clock.
    let run = accept_and_build_with(&s, &host.machines(), &drv, &[&bb], u64::MAX, u64::MAX, true);
    run.assert_accepted_and_exited(0);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(s.is_valid(&drv));
}

#[test]
fn hook_builds_fail_over_to_another_machine_before_accepting() {
    let Some((host, s)) = trusted_host(this_test!(), 23) else {
        return;
    };
    // The same line on a port where nobody listens, faster so chosen first.
    let line = std::fs::read_to_string(host.machines()).expect("machines");
    let mut fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    fields[0] = format!("ssh://root@127.0.0.1:{}", dead_port());
    fields[4] = "10".to_owned();
    let machines = s.machines(&format!("{}\n{line}", fields.join(" ")));
    let (drv, bb) = busybox_drv(&s, "moved", "echo built elsewhere\necho moved > $out\n");
    let run = accept_and_build(&s, &machines, &drv, &[&bb], 0, true);
    run.assert_accepted_and_exited(0);
    assert!(run.stderr.contains("trying elsewhere"), "{}", run.stderr);
    assert!(run.log.contains("built elsewhere"), "log: {:?}", run.log);
    assert!(s.is_valid(&drv));
    let listed = sandoff::decide::file::load(&machines, "x86_64-linux").expect("machines");
    let backoff = Backoff::new(&s.loc().state);
    let now = std::time::SystemTime::now();
    let state = |m: &Machine| backoff.state(&m.name).expect("backoff record");
    assert!(
        state(&listed[0]).is_some_and(|b| b.active(now)),
        "the dead machine is in backoff"
    );
    assert!(state(&listed[1]).is_none(), "the live one is not");
}

#[test]
fn hook_builds_two_hooks_sharing_nix_current_load_take_turns() {
    let Some((host, s)) = trusted_host(this_test!(), 42) else {
        return;
    };
    let x86 = s.drv("x86", "x86_64-linux", &[]);
    // The host with one slot.
    let machines = s.machines(&format!("{}\n", host.machine_line_with(1, 1)));
    let shared = s.tmp.path().join("current-load");
    let hook = |shared_dir: bool| {
        let mut c = s.hook(Some(&machines));
        if shared_dir {
            c.env("NIX_CURRENT_LOAD", &shared);
        }
        c
    };
    let req = request(false, "x86_64-linux", &x86, &[]);

    // The first hook accepts: it holds the slot while it waits for the
    // inputs and outputs lines.
    let mut first = hook(true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook");
    let mut stdin = first.stdin.take().expect("stdin");
    stdin.write_all(req.as_bytes()).expect("request");
    stdin.flush().expect("flush");
    let mut reply = String::new();
    BufReader::new(first.stdout.take().expect("stdout"))
        .read_line(&mut reply)
        .expect("reply");
    assert_eq!(reply, "# accept\n");

    // A second one given the same directory sees the slot taken and waits.
    let out = talk(&mut hook(true), &req);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# postpone\n");
    // One counting in the store's own directory does not see it (it
    // accepts, then fails for want of the lines).
    let out = talk(&mut hook(false), &req);
    assert_eq!(text(&out.stdout), "# accept\n", "{}", text(&out.stderr));

    // The first ends (the daemon closed its input): the slot is free again
    // and the next hook takes it.
    drop(stdin);
    let first = first.wait_with_output().expect("wait hook");
    assert_eq!(first.status.code(), Some(1), "{}", text(&first.stderr));
    let out = talk(&mut hook(true), &req);
    assert_eq!(text(&out.stdout), "# accept\n", "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------
// As `guix`: a symlink named guix, as guix-daemon's GUIX points at.

/// Takes a slot of the first machine of the machines file `file`, in
/// `s`'s slot directory, as a running build holds it; with the directory
/// and the machine.
fn hold_first_slot(
    s: &Local,
    file: &Path,
) -> (
    SlotDir,
    sandoff::decide::Machine,
    sandoff::remote::slots::Slot,
) {
    let machine = sandoff::decide::file::load(file, "x86_64-linux")
        .expect("machines")
        .remove(0);
    let slots = SlotDir::new(&s.loc().state);
    let slot = slots
        .try_acquire(&machine)
        .expect("slot files")
        .expect("a free slot");
    (slots, machine, slot)
}

/// The hook declined after its machine failed it (so the daemon builds it
/// or asks again); what it said.
fn assert_declined_after_trying(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# decline\n");
    let err = text(&out.stderr);
    assert!(err.contains("trying elsewhere"), "{err}");
    err
}

/// A `guix` symlink to sandoff in `s`, and a command running it with only
/// the variables the test sets.
fn as_guix(s: &Local) -> (PathBuf, impl Fn(&[&str]) -> Command + '_) {
    let bin = s.tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let guix = bin.join("guix");
    if !guix.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandoff"), &guix).expect("symlink");
    }
    let link = guix.clone();
    let cmd = move |args: &[&str]| {
        let mut c = Command::new(&link);
        // This test store is sandoff's own registry, not a guix-daemon's
        // database (the real daemon's case has tests of its own).
        c.args(args)
            .env("SANDOFF_STORE_ROOT", s.root())
            .env("SANDOFF_DAEMON_STORE", "sandoff");
        for var in [
            "SANDOFF_STORE_DIR",
            "SANDOFF_STATE_DIR",
            "SANDOFF_MACHINES",
            "SANDOFF_GUIX",
            "NIX_STORE_DIR",
            "NIX_REMOTE_SYSTEMS",
            "NIX_CURRENT_LOAD",
            "GUIX_CONFIGURATION_DIRECTORY",
        ] {
            c.env_remove(var);
        }
        c
    };
    (guix, cmd)
}

#[test]
fn guix_offload_is_the_hook_with_guix_machines_and_store() {
    let s = Local::new();
    // In /gnu/store, which `guix offload` expects without being told.
    let drv = support::derivation_add(
        s.cmd().args(["--store-dir", "/gnu/store"]),
        &json!({
            "outputs": {"out": {"path": ""}},
            "inputSrcs": [],
            "inputDrvs": {},
            "system": "x86_64-linux",
            "builder": "/bin/sh",
            "args": ["-c", "exit 1"],
            "env": {"name": "x", "builder": "/bin/sh", "system": "x86_64-linux", "out": ""},
        }),
    );
    assert!(drv.starts_with("/gnu/store/"), "{drv}");
    // machines.scm in Guix's configuration directory, its one slot busy.
    let etc = s.tmp.path().join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::write(
        etc.join("machines.scm"),
        "(list (build-machine (name \"busy.invalid\") (systems '(\"x86_64-linux\")) \
         (user \"root\") (parallel-builds 1) \
         (host-key \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq2fX0nq9pZf1vLrJmXh3D7kY1w2n5m0fWQm9p4b1sT\")))\n",
    )
    .expect("machines.scm");
    let (_, _, slot) = hold_first_slot(&s, &etc.join("machines.scm"));

    let (_, guix) = as_guix(&s);
    let offload = ["offload", "x86_64-linux", "0", "0", "0"];
    let input = [
        request(false, "x86_64-linux", &drv, &[]),
        request(true, "x86_64-linux", &drv, &[]),
    ]
    .concat();
    let out = talk(
        guix(&offload).env("GUIX_CONFIGURATION_DIRECTORY", &etc),
        &input,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# postpone\n# decline\n");
    assert_no_reply_on_stderr(&out);

    // No machines.scm: no machines, as for guix offload, without a word.
    let out = talk(
        guix(&offload).env("GUIX_CONFIGURATION_DIRECTORY", s.tmp.path().join("none")),
        &input,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# decline\n# decline\n");
    assert_eq!(text(&out.stderr), "");
    // SANDOFF_MACHINES still comes first.
    let empty = s.machines("");
    let out = talk(
        guix(&offload)
            .env("GUIX_CONFIGURATION_DIRECTORY", &etc)
            .env("SANDOFF_MACHINES", &empty),
        &input,
    );
    assert_eq!(text(&out.stdout), "# decline\n# decline\n");
    drop(slot);
}

#[test]
fn guix_other_subcommands_run_the_real_guix_or_say_why_not() {
    let s = Local::new();
    let (_, guix) = as_guix(&s);
    let args = ["substitute", "--query"];
    let out = guix(&args).output().expect("run guix");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("SANDOFF_GUIX") && err.contains("guix substitute"),
        "{err}"
    );

    // The real guix gets the arguments, its own path as argv[0], stdin,
    // and gives its exit status.
    let real = s.tmp.path().join("real-guix");
    std::fs::write(
        &real,
        "#!/bin/sh\nread line\necho \"$0|$*|$line\"\nexit 7\n",
    )
    .expect("script");
    let mut perms = std::fs::metadata(&real).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&real, perms).expect("chmod");
    let out = talk(guix(&args).env("SANDOFF_GUIX", &real), "have\n");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{}|substitute --query|have\n", real.display())
    );
    let out = talk(guix(&["offload", "test"]).env("SANDOFF_GUIX", &real), "x\n");
    assert_eq!(
        text(&out.stdout),
        format!("{}|offload test|x\n", real.display())
    );

    // A real guix that cannot be run is one line too.
    let out = guix(&args)
        .env("SANDOFF_GUIX", s.tmp.path().join("nothing"))
        .output()
        .expect("run guix");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn hook_declines_when_the_only_machine_has_another_store_dir() {
    // A guix-daemon's hook (/gnu/store) and a machine serving /nix/store.
    if !offload_ready(this_test!()) {
        return;
    }
    let host = TestHost::start(45);
    let s = Local::with_dir(StoreDir::new("/gnu/store").expect("store dir"));
    trust(&s, &host);
    let (drv, bb) = busybox_drv(&s, "gnu-hook", "echo x > $out");
    let machines = s.machines(&format!("{}\n", host.machine_line()));
    let machine = host.machine();
    // The hook connects before it accepts: the machine refuses this
    // client's store directory, goes into backoff, and the daemon gets
    // the build back.
    let out = talk(
        &mut s.hook(Some(&machines)),
        &request(true, "x86_64-linux", &drv, &[]),
    );
    let err = assert_declined_after_trying(&out);
    assert!(
        err.contains(
            "store directory mismatch: the server's store is /nix/store, the client's is /gnu/store"
        ),
        "{err}"
    );
    let backoff = Backoff::new(&s.loc().state)
        .state(&machine.name)
        .expect("backoff")
        .expect("in backoff");
    assert!(backoff.active(std::time::SystemTime::now()));
    assert!(
        backoff.last_error.contains("/gnu/store"),
        "{}",
        backoff.last_error
    );
    assert_eq!(
        SlotDir::new(&s.loc().state)
            .in_use(&machine)
            .expect("in use"),
        0
    );
    // Nothing reached the machine's store.
    assert!(!host.root().join("gnu").exists());
    let bb = s.dir.parse_path(&bb).expect("store path");
    assert!(!host.root().join("nix/store").join(bb.base_name()).exists());
}
