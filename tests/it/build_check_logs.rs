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
    // As for any failure with -K (and as Nix), the build directory too.
    assert_stderr_has(&out, "build directory kept at");
    assert_eq!(s.build_dirs().len(), 1, "{:?}", s.build_dirs());
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
