//! `sandoff build --check`, `--max-log-size`, build logs in Nix's layout on
//! a Nix store (read by real Nix 2.8's `nix-store -l`), and each build in
//! its own cgroup (kill on timeout, CPU time and peak memory reported).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::build::{assert_stderr_has, events, logical, text, Store};
use crate::support::{self, Need};
use crate::this_test;

/// A derivation whose output differs at each build.
const RANDOM_SCRIPT: &str =
    "mkdir $out; echo same > $out/same; head -c 32 /dev/urandom | od -x > $out/random";

#[test]
fn check_of_a_deterministic_build_passes_and_changes_nothing() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("same", "mkdir $out; echo hello > $out/file");
    let out = s.build(&[&d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = s.out(&d);
    let before = s.info(&p).expect("valid");
    let out = s.build(&["--check", "--json", &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), logical(&p));
    let built: Vec<_> = events(&out)
        .into_iter()
        .filter(|e| e["event"] == "built")
        .collect();
    assert_eq!(built.len(), 1, "built again: {}", text(&out.stderr));
    assert_eq!(built[0]["checked"], true);
    assert_eq!(s.info(&p).expect("still valid"), before);
    assert!(!s.real(&p).with_extension("check").exists());
    assert!(s.build_dirs().is_empty());
}

#[test]
fn check_of_a_nondeterministic_build_fails_naming_the_output_and_keeps_the_new_copy_with_k() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("random", RANDOM_SCRIPT);
    let out = s.build(&[&d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = s.out(&d);
    let real = s.real(&p);
    let before = s.info(&p).expect("valid");
    let random = fs::read(real.join("random")).expect("read");
    let mut check_name = real.clone().into_os_string();
    check_name.push(".check");
    let check_copy = std::path::PathBuf::from(check_name);

    let out = s.build(&["--check", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(
        &out,
        &format!(
            "derivation '{d}' may not be deterministic: output '{}' differs",
            real.display()
        ),
    );
    assert!(!check_copy.exists(), "kept only with -K");

    let out = s.build(&["--check", "-K", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(
        &out,
        &format!(
            "output '{}' differs from '{}'",
            real.display(),
            check_copy.display()
        ),
    );
    let meta = fs::symlink_metadata(&check_copy).expect("the .check copy is kept");
    assert_eq!(meta.uid(), 0, "root-owned");
    assert_eq!(
        fs::read_to_string(check_copy.join("same")).expect("read"),
        "same\n"
    );
    assert_ne!(
        fs::read(check_copy.join("random")).expect("read"),
        random,
        "the new build"
    );
    // Nothing registered changed, and the copy is not a store path.
    assert_eq!(s.info(&p).expect("still valid"), before);
    assert_eq!(fs::read(real.join("random")).expect("read"), random);
    let check_path = s.path(&format!("{}.check", logical(&p)));
    assert!(s.info(&check_path).is_none(), "not registered");
    // As for any failure with -K (and as Nix), the build directory too.
    assert_stderr_has(&out, "build directory kept at");
    assert_eq!(s.build_dirs().len(), 1, "{:?}", s.build_dirs());
    // Checking again replaces the read-only copy of the last check.
    let first = fs::read(check_copy.join("random")).expect("read");
    let out = s.build(&["--check", "-K", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "may not be deterministic");
    assert_ne!(fs::read(check_copy.join("random")).expect("read"), first);
    assert_eq!(s.info(&p).expect("still valid"), before);
}

#[test]
fn check_of_an_unbuilt_derivation_is_refused() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("never", "echo x > $out");
    let out = s.build(&["--check", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(
        &out,
        &format!("some outputs of '{d}' are not valid, so checking is not possible"),
    );
    assert!(s.info(&s.out(&d)).is_none());
}

#[test]
fn check_realises_inputs_normally_and_checks_only_the_named_derivation() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    // The input is not deterministic: were it checked, this would fail.
    let input = s.script_drv("input", RANDOM_SCRIPT);
    let top = s.drv(
        "top",
        crate::build::Spec {
            script: "echo top > $out",
            inputs: &[(&input, "out")],
            ..Default::default()
        },
    );
    assert!(s.build(&[&top]).status.success());
    let out = s.build(&["--check", "--json", &top]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built: Vec<String> = events(&out)
        .iter()
        .filter(|e| e["event"] == "built")
        .map(|e| e["drv"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(built, vec![top]);
}

#[test]
fn max_log_size_kills_a_chatty_build_and_registers_nothing() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv(
        "chatty",
        "mkdir $out; while true; do echo 0123456789abcdef0123456789abcdef; done",
    );
    let out = s.build(&["--max-log-size", "10000", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(
        &out,
        &format!("building '{d}' killed after writing more than 10000 bytes of log output"),
    );
    let p = s.out(&d);
    assert!(s.info(&p).is_none());
    assert!(!s.real(&p).exists());
    assert!(s.build_dirs().is_empty());
    // What was accepted is the log.
    let log = support::run_ok(s.cmd().args(["log", &d]));
    assert_eq!(log.len(), 10000);
    // Under the limit, nothing changes.
    let quiet = s.script_drv("quiet", "echo a few bytes; echo x > $out");
    let out = s.build(&["--max-log-size", "10000", &quiet]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn nix_store_reads_the_log_of_a_sandoff_build_on_a_nix_chroot_store() {
    if !crate::build::ready(this_test!())
        || !support::require(this_test!(), &[Need::Program("nix-store")])
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let conf = tmp.path().join("conf");
    // Real Nix makes the store and its database.
    let src = tmp.path().join("busybox");
    fs::create_dir_all(src.join("bin")).expect("mkdir");
    fs::copy("/bin/busybox", src.join("bin/busybox")).expect("busybox");
    let bb = support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&root)
            .arg("--add")
            .arg(&src),
    );
    let bb = String::from_utf8(bb).expect("utf8").trim().to_owned();
    let cmd = || {
        let mut c = support::sandoff();
        c.arg("--store-root")
            .arg(&root)
            .args(["--daemon-store", "nix", "--state-dir"])
            .arg(tmp.path().join("sandoff-state"))
            .env_remove("NIX_STATE_DIR")
            .env_remove("NIX_LOG_DIR")
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_USER_POOL_DIR");
        c
    };
    let builder = format!("{bb}/bin/busybox");
    let drv = support::derivation_add(
        &mut cmd(),
        &serde_json::json!({
            "outputs": {"out": {"path": ""}},
            "inputSrcs": [bb],
            "inputDrvs": {},
            "system": "x86_64-linux",
            "builder": builder,
            "args": ["sh", "-c", "echo line one; echo line two >&2; echo built > $out"],
            "env": {"name": "logged", "builder": builder, "system": "x86_64-linux", "out": ""},
        }),
    );
    support::run_ok(cmd().args(["build", &drv]));
    let base = Path::new(&drv)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("base name");
    let file = root
        .join("nix/var/log/nix/drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]));
    assert!(
        fs::read(&file)
            .expect("a log in Nix's layout")
            .starts_with(b"BZh"),
        "bzip2"
    );
    let by_nix = support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&root)
            .args(["-l", &drv]),
    );
    assert_eq!(text(&by_nix), "line one\nline two\n");
    let by_sandoff = support::run_ok(cmd().args(["log", &drv]));
    assert_eq!(text(&by_sandoff), "line one\nline two\n");
    assert!(!tmp.path().join("sandoff-state/log").exists());
}

/// Whether builds here get a cgroup: a cgroup2 hierarchy is mounted.
fn cgroup2_available() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| sandoff::sandbox::cgroup::cgroup2_mount(&m))
        .is_some()
}

/// Whether a peak memory figure can be had: always (the cgroup's
/// `memory.peak`, else the builder's `ru_maxrss` from wait4).
fn peak_memory_available() -> bool {
    true
}

/// The pids of processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

/// A derivation that starts `sleep <marker>` as a daemon (setsid in a
/// double fork: its own session and process group, its parent gone; it
/// only ends when killed), says "daemon up", then waits forever.
fn daemonizing_drv(s: &Store, marker: &'static str) -> (String, &'static str) {
    let d = s.script_drv(
        &format!("daemonizes-{marker}"),
        &format!(
            "(setsid sh -c 'touch $TMPDIR/up; exec sleep {marker}' </dev/null >/dev/null 2>&1 &)\n\
             while [ ! -e $TMPDIR/up ]; do sleep 0.1; done\n\
             echo daemon up\n\
             sleep 1000; echo > $out"
        ),
    );
    (d, marker)
}

#[test]
fn a_timeout_kills_a_daemonized_process_of_the_build_too() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (d, marker) = daemonizing_drv(&s, "77731");
    assert!(processes_with(&format!("sleep {marker}")).is_empty());
    let out = s.build(&["-L", "--timeout", "2", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, &format!("daemonizes-{marker}> daemon up"));
    assert_stderr_has(&out, "timed out after 2 seconds");
    // sandoff returns once the build's cgroup is empty (or, without one,
    // once the PID namespace and the build user's processes are killed).
    let left = processes_with(&format!("sleep {marker}"));
    assert!(left.is_empty(), "still running: {left:?}");
    assert!(s.info(&s.out(&d)).is_none());
}

#[test]
fn the_report_gives_cpu_time_and_peak_memory_of_a_build() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    if !support::require(
        this_test!(),
        &[Need::Condition {
            what: "a cgroup2 hierarchy",
            met: cgroup2_available(),
        }],
    ) {
        return;
    }
    let d = s.script_drv(
        "busy",
        "i=0; while [ $i -lt 300000 ]; do i=$((i + 1)); done; echo $i > $out",
    );
    let out = s.build(&["--json", &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = events(&out)
        .into_iter()
        .find(|e| e["event"] == "built")
        .expect("a built event");
    eprintln!("{built}");
    let cpu = built["cpuSeconds"].as_f64().expect("CPU time reported");
    assert!(cpu > 0.0, "{built}");
    if peak_memory_available() {
        let peak = built["peakMemoryBytes"]
            .as_u64()
            .expect("peak memory reported");
        assert!(peak > 0, "{built}");
    }
    // The human report says the same.
    let again = s.script_drv(
        "busy2",
        "i=0; while [ $i -lt 1000 ]; do i=$((i + 1)); done; echo $i > $out",
    );
    let out = s.build(&[&again]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_stderr_has(&out, "(CPU ");
}

#[test]
fn max_log_size_reaches_the_build_machine() {
    let Some((h, s, machines)) = crate::offload::one_trusted_host(this_test!(), 91) else {
        return;
    };
    let d = s.script_drv(
        "chatty-remote",
        "mkdir $out; while true; do echo 0123456789abcdef0123456789abcdef; done",
    );
    let out = s.build(&[
        "--max-log-size",
        "10000",
        "--machines",
        machines.to_str().expect("utf-8"),
        &d,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("failed on '{}'", crate::offload::uri(&h))),
        "{err}"
    );
    assert!(err.contains("LogLimitExceeded"), "{err}");
    assert!(
        err.contains("killed after writing more than 10000 bytes of log output"),
        "{err}"
    );
    assert!(s.info(&s.out(&d)).is_none());
}

/// `cmd` run in a mount namespace of its own without the cgroup2 mount, so
/// that sandoff finds no cgroup2 hierarchy (as on a machine without one).
fn without_cgroup2(cmd: &std::process::Command) -> std::process::Command {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mount = sandoff::sandbox::cgroup::cgroup2_mount(&mountinfo).expect("cgroup2 mounted");
    let mut c = std::process::Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("umount -l \"$0\" && exec \"$@\"")
        .arg(mount)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

#[test]
fn without_cgroup2_builds_run_as_before_and_a_timeout_still_kills_everything() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    if !support::require(
        this_test!(),
        &[
            Need::Program("unshare"),
            Need::Condition {
                what: "a cgroup2 hierarchy (to take away)",
                met: cgroup2_available(),
            },
        ],
    ) {
        return;
    }
    let d = s.script_drv("no-cgroup", "echo x > $out");
    let mut build = s.cmd();
    build.args(["build", "--json", &d]);
    let out = without_cgroup2(&build).output().expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = events(&out)
        .into_iter()
        .find(|e| e["event"] == "built")
        .expect("a built event");
    // No cgroup: what wait4 saw of the builder is reported instead.
    assert!(
        built.get("cpuSeconds").is_some() && built["peakMemoryBytes"].as_u64() > Some(0),
        "measured by wait4: {built}"
    );
    // The PID namespace and the build user's cleanup still kill a daemon.
    let (d, marker) = daemonizing_drv(&s, "77732");
    let mut build = s.cmd();
    build.args(["build", "-L", "--timeout", "2", &d]);
    let out = without_cgroup2(&build).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, &format!("daemonizes-{marker}> daemon up"));
    assert_stderr_has(&out, "timed out after 2 seconds");
    let left = processes_with(&format!("sleep {marker}"));
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn a_build_cgroup_measures_kills_and_removes_what_is_in_it() {
    if !support::require(
        this_test!(),
        &[
            Need::Root,
            Need::Condition {
                what: "a cgroup2 hierarchy",
                met: cgroup2_available(),
            },
        ],
    ) {
        return;
    }
    // A uid no build user has: this cgroup is this test's alone.
    let cg = sandoff::sandbox::cgroup::BuildCgroup::create(3_999_999).expect("a cgroup");
    let dir = cg.dir().to_owned();
    let mut child = std::process::Command::new("sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done; exec sleep 1000",
        ])
        .spawn()
        .expect("spawn");
    // Moved in from outside, as a test may (builds are cloned into it).
    fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("join the cgroup");
    assert!(
        fs::read_to_string(dir.join("cgroup.procs"))
            .expect("read")
            .lines()
            .any(|p| p == child.id().to_string()),
        "the child is in the cgroup"
    );
    assert!(cg.usage().cpu.is_some(), "cpu.stat is read");
    drop(cg);
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed with the cgroup");
    assert!(!dir.exists(), "removed");
}

#[test]
fn check_builds_here_even_with_build_machines() {
    let Some((h, s, machines)) = crate::offload::one_trusted_host(this_test!(), 92) else {
        return;
    };
    let d = s.script_drv("checked-here", "echo same > $out");
    assert!(s.build(&[&d]).status.success());
    let out = s.build(&[
        "--check",
        "--machines",
        machines.to_str().expect("utf-8"),
        &d,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_stderr_has(&out, "checked (bit-identical)");
    let log = text(&support::run_ok(s.cmd().args(["log", &d])));
    assert!(
        !log.contains(&crate::offload::uri(&h)),
        "built on the machine: {log}"
    );
}
