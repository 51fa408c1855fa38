//! `src/decide`: the machines-file fixtures, the Guix reader checked against
//! real Guile, and the `decide` and `machines list` commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use sandoff::decide::{guix_format, machines::to_json, nix_format, Machine};
use serde_json::{json, Value};

use crate::support::{self, Need};
use crate::this_test;

fn fixture(rel: &str) -> PathBuf {
    support::fixtures().join(rel)
}

fn guix_env(name: &str) -> Option<String> {
    (name == "HOME").then(|| "/home/guix-test".to_owned())
}

fn parse_guix(path: &Path) -> Vec<Machine> {
    let text = std::fs::read_to_string(path).unwrap();
    guix_format::parse(&text, &path.display().to_string(), &guix_env).unwrap()
}

fn parse_nix(path: &Path) -> Vec<Machine> {
    let text = std::fs::read_to_string(path).unwrap();
    nix_format::parse(&text, "machines", "x86_64-linux", &nix_format::NoIncludes).unwrap()
}

#[test]
fn nix_fixture_reads_the_manual_examples() {
    let ms = parse_nix(&fixture("etc/nix/machines"));
    let names: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ssh://nix@mcflurry.labs.cs.uu.nl",
            "ssh://nix@scratchy.labs.cs.uu.nl",
            "ssh://nix@itchy.labs.cs.uu.nl",
            "ssh://nix@poochie.labs.cs.uu.nl",
            "ssh://mac",
            "ssh://beastie",
            "ssh-ng://builder@arm.example.org:2222?remote-program=/run/current-system/sw/bin/nix-daemon",
        ]
    );
    let poochie = &ms[3];
    assert_eq!((poochie.max_jobs, poochie.speed_factor), (8, 2.0));
    assert!(poochie.supported_features.contains("kvm"));
    assert!(poochie.mandatory_features.contains("perf"));
    assert_eq!(ms[0].max_jobs, 2);
    assert_eq!(ms[0].user.as_deref(), Some("nix"));
    let arm = &ms[6];
    assert_eq!(arm.port, Some(2222));
    assert_eq!(arm.host.as_deref(), Some("arm.example.org"));
    assert_eq!(arm.speed_factor, 2.5);
    assert_eq!(
        arm.host_key.as_deref(),
        Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq2fX0nq9pZf1vLrJmXh3D7kY1w2n5m0fWQm9p4b1sT root@arm")
    );
}

/// A command whose reader went away (`sandoff … | head`) ends quietly with
/// success, as for any other write: no panic of `println!`.
#[test]
fn a_closed_stdout_ends_a_listing_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines");
    let lines: String = (0..2000).map(|i| format!("b{i} x86_64-linux\n")).collect();
    std::fs::write(&machines, lines).unwrap();
    for json in [false, true] {
        // The read end is closed before the command starts: every write
        // fails with EPIPE.
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let mut cmd = support::sandoff();
        cmd.args(["machines", "list", "--machines"]).arg(&machines);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .stdout(std::process::Stdio::from(w))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "json {json}: {:?} {err}", out.status);
        assert!(!err.contains("panicked"), "json {json}: {err}");
    }
}

#[test]
fn nix_includes_are_relative_to_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main"), "a\n@more\n@missing\n").unwrap();
    std::fs::write(dir.path().join("more"), "b ; c\n").unwrap();
    let out = support::run_ok(support::sandoff().current_dir(dir.path()).args([
        "machines",
        "list",
        "--json",
        "--machines",
        "main",
    ]));
    let v: Value = serde_json::from_slice(&out).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ssh://a", "ssh://b", "ssh://c"]);
}

/// Guile's reading of a machines.scm through the stand-in `build-machine`
/// of `fixtures/machines/guile-standin.scm`, one JSON object per machine.
fn guile_reading(guile: &str, file: &Path) -> Vec<Value> {
    let out = support::run_ok(
        Command::new(guile)
            .arg("--no-auto-compile")
            .arg("-s")
            .arg(fixture("machines/guile-standin.scm"))
            .arg(file)
            .env("HOME", "/home/guix-test"),
    );
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn guix_reader_agrees_with_guile() {
    let guile = if support::which("guile").is_some() {
        "guile"
    } else {
        "guile-3.0"
    };
    if !support::require(this_test!(), &[Need::Program(guile)]) {
        return;
    }
    for file in [
        fixture("etc/guix/machines.scm"),
        fixture("machines/every-field.scm"),
    ] {
        let ours = parse_guix(&file);
        let theirs = guile_reading(guile, &file);
        assert_eq!(ours.len(), theirs.len(), "{}", file.display());
        for (m, g) in ours.iter().zip(&theirs) {
            let extras = m.guix.as_ref().unwrap();
            let mine = json!({
                "name": m.name.as_str(),
                "systems": m.systems,
                "user": m.user,
                "port": m.port,
                "privateKey": m.private_key,
                "maxJobs": m.max_jobs,
                "speedFactor": m.speed_factor,
                "supportedFeatures": m.supported_features,
                "hostKey": m.host_key,
                "overloadThreshold": extras.overload_threshold,
                "compression": extras.compression,
                "compressionLevel": extras.compression_level,
                "daemonSocket": extras.daemon_socket,
            });
            assert_eq!(&mine, g, "{}", file.display());
        }
    }
}

#[test]
fn guix_fixture_reads_the_manual_example() {
    let ms = parse_guix(&fixture("etc/guix/machines.scm"));
    assert_eq!(ms.len(), 2);
    assert_eq!(ms[0].speed_factor, 2.0);
    assert_eq!(ms[1].systems.iter().collect::<Vec<_>>(), ["aarch64-linux"]);
    assert_eq!(
        ms[1].private_key.as_deref(),
        Some("/home/guix-test/.ssh/identity-for-guix")
    );
}

#[test]
fn machines_list_json_has_the_documented_keys() {
    let out = support::run_ok(
        support::sandoff()
            .args(["machines", "list", "--json", "--machines"])
            .arg(fixture("etc/guix/machines.scm"))
            .env("HOME", "/home/guix-test"),
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    let first = v[0].as_object().unwrap();
    let keys: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "name",
            "systems",
            "user",
            "port",
            "privateKey",
            "maxJobs",
            "speedFactor",
            "supportedFeatures",
            "mandatoryFeatures",
            "hostKey",
            "compression"
        ]
    );
    assert_eq!(v, to_json(&parse_guix(&fixture("etc/guix/machines.scm"))));
    // Guix's default compression: on; no level given, so sandoff's default.
    assert_eq!(first["compression"], json!({"mode": "on", "level": 1}));
    // The environment variable names the file too, and Nix files work.
    let out = support::run_ok(
        support::sandoff()
            .args(["machines", "list", "--json"])
            .env("SANDOFF_MACHINES", fixture("etc/nix/machines")),
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v[3]["mandatoryFeatures"], json!(["perf"]));
    // No compress= in the URI: zstd at the default level with sandoff.
    assert_eq!(v[3]["compression"], json!({"mode": "default", "level": 1}));
    assert_eq!(v[4]["port"], Value::Null);
}

/// `sandoff machines list --machines <file>`, killed if it hangs.
fn machines_list(file: &Path) -> std::process::Output {
    support::output_or_kill(
        support::sandoff()
            .args(["machines", "list", "--machines"])
            .arg(file),
    )
}

#[test]
fn machines_list_reports_parse_errors_with_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("machines.scm");
    std::fs::write(&bad, "(list\n (define x 1))").unwrap();
    let out = machines_list(&bad);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("machines.scm:2: unsupported form 'define'"),
        "{err}"
    );
    let bad = dir.path().join("machines");
    std::fs::write(&bad, "a - - 1\nb - - eight\n").unwrap();
    let out = machines_list(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("machines:2: field maxJobs (#4) 'eight' is not an unsigned integer"),
        "{err}"
    );
}

/// `sandoff machines list --machines FILE`, which must fail at once with
/// one line on stderr that names `FILE`.
fn assert_machines_file_refused(file: &Path, why: &str) {
    let out = machines_list(file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.len() < 1024, "a short line: {err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(why), "{err}");
}

#[test]
fn machines_list_and_decide_print_escape_sequences_of_the_file_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines");
    // Tokens hold no space, tab, `;` or `#`, but may hold ESC and BEL.
    std::fs::write(&machines, "h x86_64-linux\x1b[2J\x07 - 1 1 kvm\x1bc\n").unwrap();
    let out = support::run_ok(
        support::sandoff()
            .args(["machines", "list", "--machines"])
            .arg(&machines),
    );
    let shown = String::from_utf8_lossy(&out);
    assert!(shown.contains("x86_64-linux"), "{shown}");
    assert!(!out.contains(&0x1b) && !out.contains(&0x07), "{shown:?}");

    let root = store_with_drvs();
    let out = support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(root.path())
            .args(["--store-dir", "/nix/store", "decide", MULTI, "--machines"])
            .arg(&machines)
            .args(["--system", "x86_64-linux", "--system-features", ""]),
    );
    let shown = String::from_utf8_lossy(&out);
    assert!(!out.contains(&0x1b) && !out.contains(&0x07), "{shown:?}");
}

#[test]
fn machines_file_that_is_dev_zero_is_refused() {
    assert_machines_file_refused(
        Path::new("/dev/zero"),
        "not a regular file (it is a character device)",
    );
}

#[test]
fn machines_file_including_dev_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("machines");
    std::fs::write(&file, "a\n@/dev/zero\n").unwrap();
    assert_machines_file_refused(
        &file,
        "machines:2: cannot read included machines file '/dev/zero': not a regular file",
    );
}

#[test]
fn machines_file_that_is_a_fifo_is_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("machines");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_machines_file_refused(&fifo, "not a regular file (it is a FIFO)");
    let file = dir.path().join("including");
    std::fs::write(&file, format!("@{}\n", fifo.display())).unwrap();
    assert_machines_file_refused(&file, "not a regular file (it is a FIFO)");
}

#[test]
fn machines_file_over_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("machines");
    let f = std::fs::File::create(&file).unwrap();
    // Sparse: the size is what counts, not the disk it takes.
    f.set_len(sandoff::bounded::MACHINES_FILE_LIMIT + 1)
        .unwrap();
    assert_machines_file_refused(&file, "larger than the limit of 16 MiB");
}

#[test]
fn machines_list_refuses_a_secret_read_through_an_include_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("shadow");
    std::fs::write(&secret, "root:$6$salt$s3cretHash:19000:0:99999:7:::\n").unwrap();
    let machines = dir.path().join("machines");
    std::fs::write(&machines, format!("good.example\n@{}\n", secret.display())).unwrap();
    let out = machines_list(&machines);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "nothing listed");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "{}:1: the host is not a host name",
            secret.display()
        )),
        "names the file and line: {err}"
    );
    assert!(!err.contains("s3cret") && !err.contains("root"), "{err}");

    // A Guix host-name with a control character: refused the same way.
    let scm = dir.path().join("machines.scm");
    std::fs::write(
        &scm,
        "(list (build-machine (name \"h\\x1b;]0;t\\a\") (systems '(\"s\")) (user \"u\") (host-key \"k\")))",
    )
    .unwrap();
    let out = machines_list(&scm);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("machines.scm:1: build-machine: the host is not a host name"),
        "{err}"
    );
    assert!(!err.contains("]0;t"), "{err}");
}

/// A store root holding the derivation fixtures made by Nix 2.8.
fn store_with_drvs() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("nix/store");
    std::fs::create_dir_all(&store).unwrap();
    for e in std::fs::read_dir(fixture("drv/nix-store")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".drv") {
            std::fs::copy(e.path(), store.join(name)).unwrap();
        }
    }
    tmp
}

const HELLO: &str = "/nix/store/4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv";
/// `preferLocalBuild`, requires `kvm` and `big-parallel`.
const MULTI: &str = "/nix/store/1zb7vhdf1zznc3bqkfq0cj742wccbjs6-multi.drv";

fn decide_json(root: &Path, args: &[&str]) -> Value {
    let out = support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(root)
            .arg("--store-dir")
            .arg("/nix/store")
            .arg("decide")
            .args(args)
            .arg("--json")
            .env("HOME", "/home/guix-test")
            .env_remove("SANDOFF_MACHINES"),
    );
    serde_json::from_slice(&out).unwrap()
}

/// [`decide_json`] for `drv` with `machines` on `system`, and `extra` options.
fn decide_on(root: &Path, drv: &str, machines: &Path, system: &str, extra: &[&str]) -> Value {
    let machines = machines.to_str().expect("utf-8 path");
    let args = [&[drv, "--machines", machines, "--system", system], extra].concat();
    decide_json(root, &args)
}

#[test]
fn decide_offloads_to_the_matching_guix_machine() {
    let root = store_with_drvs();
    let guix = fixture("etc/guix/machines.scm");
    let v = decide_on(root.path(), HELLO, &guix, "aarch64-linux", &[]);
    assert_eq!(v["decision"], "remote");
    assert_eq!(v["machine"], "eightysix.example.org");
    assert_eq!(v["machines"][0]["eligible"], true);
    assert_eq!(v["machines"][1]["eligible"], false);
    assert_eq!(
        v["machines"][1]["reason"],
        "does not build x86_64-linux (systems: aarch64-linux)"
    );
    // --local-only: local when the local machine can, else fail.
    let v = decide_on(root.path(), HELLO, &guix, "x86_64-linux", &["--local-only"]);
    assert_eq!(v["decision"], "local");
    assert_eq!(v["machine"], Value::Null);
    let v = decide_on(
        root.path(),
        HELLO,
        &guix,
        "aarch64-linux",
        &["--local-only"],
    );
    assert_eq!(v["decision"], "fail");
}

#[test]
fn decide_builds_locally_when_no_nix_machine_matches() {
    let root = store_with_drvs();
    let nix = fixture("etc/nix/machines");
    let v = decide_on(root.path(), HELLO, &nix, "x86_64-linux", &[]);
    assert_eq!(v["decision"], "local", "{v}");
    assert_eq!(
        v["reason"],
        "no machine can build it (no machine builds x86_64-linux)"
    );
    assert_eq!(v["machines"].as_array().unwrap().len(), 7);
}

#[test]
fn decide_fail_names_the_missing_features() {
    let root = store_with_drvs();
    let guix = fixture("etc/guix/machines.scm");
    let v = decide_on(
        root.path(),
        MULTI,
        &guix,
        "x86_64-linux",
        &["--system-features", ""],
    );
    // `multi` is a local-build derivation: it is never offloaded, so the
    // failure is about the local machine, naming what it lacks.
    assert_eq!(v["decision"], "fail", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("local-build"), "{reason}");
    assert!(
        reason.contains("it lacks the feature(s) big-parallel, kvm"),
        "{reason}"
    );
    // With the features locally, preferLocalBuild keeps it here.
    let v = decide_on(
        root.path(),
        MULTI,
        &guix,
        "x86_64-linux",
        &["--system-features", "kvm,big-parallel"],
    );
    assert_eq!(v["decision"], "local");
}

#[test]
fn decide_without_machines_file_is_local() {
    let root = store_with_drvs();
    let empty = tempfile::NamedTempFile::new().unwrap();
    let v = decide_on(root.path(), HELLO, empty.path(), "x86_64-linux", &[]);
    assert_eq!(v["decision"], "local");
    assert_eq!(v["reason"], "no build machines are configured");
}

#[test]
fn decide_sees_backoff_and_slots_held_on_this_host() {
    use sandoff::remote::backoff::Backoff;
    use sandoff::remote::slots::SlotDir;
    let root = store_with_drvs();
    let guix = fixture("etc/guix/machines.scm");
    let machines = parse_guix(&guix);
    let state = root.path().join("nix/var/sandoff");
    // The one aarch64 machine failed a moment ago.
    let eightysix = machines
        .iter()
        .find(|m| m.name.as_str() == "eightysix.example.org")
        .expect("machine");
    Backoff::new(&state)
        .record_failure(&eightysix.name, std::time::SystemTime::now(), "unreachable")
        .expect("record");
    let v = decide_on(root.path(), HELLO, &guix, "aarch64-linux", &[]);
    assert_ne!(v["machine"], "eightysix.example.org", "{v}");
    assert_eq!(v["machines"][0]["eligible"], false, "{v}");
    assert!(
        v["machines"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("backoff")),
        "{v}"
    );
    // Its slots all held by another build: busy, not ineligible.
    Backoff::new(&state)
        .record_success(&eightysix.name)
        .expect("clear");
    let slots = SlotDir::new(&state);
    let held: Vec<_> = std::iter::from_fn(|| slots.try_acquire(eightysix).expect("slot"))
        .take(eightysix.max_jobs as usize + 1)
        .collect();
    assert_eq!(held.len(), eightysix.max_jobs as usize);
    let v = decide_on(root.path(), HELLO, &guix, "aarch64-linux", &[]);
    assert_eq!(v["machines"][0]["eligible"], true, "{v}");
    assert_ne!(v["decision"], "remote", "{v}");
}
