//! Offloading end to end: `sandoff build --machines` with real sshd test
//! hosts (examples/testhosts.sh), each with its own store and signing key,
//! building in its own sandbox.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use sandoff::store::{StoreDir, StorePath};

use crate::build::{
    assert_stderr_has, assert_terminal_safe, hostile_log_script, logical, ready, text, Spec, Store,
    HOSTILE_LOG,
};
use crate::hosts::{self, TestHost};
use crate::support;
use crate::this_test;

/// Root, busybox, build users, sshd.
fn offload_ready(test: &str) -> bool {
    ready(test) && support::require(test, hosts::NEEDS)
}

/// How a host appears in the machines file.
struct Entry<'a> {
    host: &'a TestHost,
    max_jobs: u32,
    speed: u32,
    features: &'a str,
    mandatory: &'a str,
    /// The host key to expect (default: the host's own).
    host_key: Option<String>,
}

impl<'a> Entry<'a> {
    fn new(host: &'a TestHost) -> Entry<'a> {
        Entry {
            host,
            max_jobs: 2,
            speed: 1,
            features: "-",
            mandatory: "-",
            host_key: None,
        }
    }

    fn line(&self) -> String {
        let key = self
            .host_key
            .clone()
            .unwrap_or_else(|| host_public_key(self.host));
        format!(
            "{} x86_64-linux {} {} {} {} {} {}\n",
            uri(self.host),
            self.host.client_key().display(),
            self.max_jobs,
            self.speed,
            self.features,
            self.mandatory,
            base64::engine::general_purpose::STANDARD.encode(key.trim())
        )
    }
}

pub(crate) fn uri(host: &TestHost) -> String {
    format!("ssh://root@{}:{}", host.addr, host.port)
}

fn host_public_key(host: &TestHost) -> String {
    std::fs::read_to_string(host.home.join("ssh_host_ed25519_key.pub")).expect("host key")
}

/// The host's store signing key (public half).
fn signing_key(host: &TestHost) -> PathBuf {
    host.root().join("nix/var/sandoff/keys/signing-key.pub")
}

fn key_name(host: &TestHost) -> String {
    let text = std::fs::read_to_string(signing_key(host)).expect("signing key");
    text.split(':').next().expect("name").to_owned()
}

fn write_machines(s: &Store, entries: &[Entry<'_>]) -> PathBuf {
    let path = s.tmp.path().join("machines");
    let text: String = entries.iter().map(Entry::line).collect();
    std::fs::write(&path, text).expect("write machines");
    path
}

fn trust(s: &Store, host: &TestHost) {
    support::run_ok(s.cmd().args(["key", "authorize"]).arg(signing_key(host)));
}

/// Key names of the signatures on `p` in the client's store.
fn signers(s: &Store, p: &StorePath) -> BTreeSet<String> {
    s.info(p)
        .unwrap_or_else(|| panic!("{} is not valid", logical(p)))
        .signatures
        .iter()
        .map(|sig| sig.key_name().to_owned())
        .collect()
}

fn machines_arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Waits until the log of `drv` shows its build running on `host` (the
/// builder's first line, "started", has come back); returns the log's path.
fn wait_until_started_on(s: &Store, drv: &str, host: &TestHost) -> PathBuf {
    let log = s.loc().state.join("log").join(s.path(drv).base_name());
    let on_host = format!("on '{}'", uri(host));
    support::wait_for(&format!("the build to start on {}", uri(host)), || {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        (l.contains(&on_host) && l.contains("started")).then_some(())
    });
    log
}

/// `sandoff build --machines <machines> <drv>` in the client's store.
pub(crate) fn build_with(s: &Store, machines: &Path, drv: &str) -> std::process::Output {
    s.build(&["--machines", machines_arg(machines), drv])
}

/// `sandoff machines status --json` over `machines`.
fn machines_status(s: &Store, machines: &Path) -> serde_json::Value {
    let status = support::run_ok(s.cmd().args([
        "machines",
        "status",
        "--json",
        "--machines",
        machines_arg(machines),
    ]));
    serde_json::from_slice(&status).expect("json")
}

/// A fresh ed25519 key pair at `path` (and `path.pub`).
fn keygen(path: &Path, comment: &str) {
    support::run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
    );
}

/// After [`offload_ready`], host `index` started and a client store that
/// trusts it.
fn trusted_host(test: &str, index: u8) -> Option<(TestHost, Store)> {
    offload_ready(test).then(|| {
        let (h, s) = (TestHost::start(index), Store::new());
        trust(&s, &h);
        (h, s)
    })
}

/// For tests with one host: after [`offload_ready`], host `index` started,
/// a client store that trusts it, and a machines file naming it.
pub(crate) fn one_trusted_host(test: &str, index: u8) -> Option<(TestHost, Store, PathBuf)> {
    let (h, s) = trusted_host(test, index)?;
    let machines = write_machines(&s, &[Entry::new(&h)]);
    Some((h, s, machines))
}

/// Builds `name` (its builder prints "started", then keeps quiet in `sleep`
/// for `seconds`) with `extra` build options on `lost` (the faster of two
/// one-job machines); once it has started there, `lose` takes `lost` away,
/// and the build must finish on `other` and say that it was placed again.
fn finishes_elsewhere(
    s: &Store,
    (lost, other): (&TestHost, &TestHost),
    (name, seconds): (&str, u32),
    extra: &[&str],
    lose: impl FnOnce(&TestHost),
) {
    trust(s, lost);
    trust(s, other);
    let machines = write_machines(
        s,
        &[
            Entry {
                speed: 4,
                max_jobs: 1,
                ..Entry::new(lost)
            },
            Entry {
                max_jobs: 1,
                ..Entry::new(other)
            },
        ],
    );
    let script = format!("echo started; sleep {seconds}; echo done > $out");
    let d = s.script_drv(name, &script);
    let child = s
        .cmd()
        .arg("build")
        .args(extra)
        .args(["--machines", machines_arg(&machines), &d])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let log = wait_until_started_on(s, &d, lost);
    lose(lost);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(signers(s, &s.out(&d)), [key_name(other)].into());
    let l = std::fs::read_to_string(&log).expect("log");
    assert!(l.contains("placing the build again"), "{l}");
}

fn leaf(s: &Store, name: &str, env: &[(&str, &str)]) -> String {
    let script = format!("echo {name} > $out");
    s.drv(
        name,
        Spec {
            script: &script,
            env,
            ..Spec::default()
        },
    )
}

#[test]
fn builds_a_graph_across_three_hosts_and_here() {
    if !offload_ready(this_test!()) {
        return;
    }
    let (h1, h2, h3) = (
        TestHost::start(11),
        TestHost::start(12),
        TestHost::start(13),
    );
    let s = Store::new();
    for h in [&h1, &h2, &h3] {
        trust(&s, h);
    }
    let machines = write_machines(
        &s,
        &[
            Entry {
                features: "big",
                ..Entry::new(&h1)
            },
            Entry {
                mandatory: "special",
                ..Entry::new(&h2)
            },
            Entry::new(&h3),
        ],
    );
    let leaves: Vec<String> = (0..12)
        .map(|i| leaf(&s, &format!("leaf{i}"), &[]))
        .collect();
    let big = leaf(&s, "big", &[("requiredSystemFeatures", "big")]);
    let special = leaf(&s, "special", &[("requiredSystemFeatures", "special")]);
    let locals: Vec<String> = (0..2)
        .map(|i| leaf(&s, &format!("local{i}"), &[("preferLocalBuild", "1")]))
        .collect();
    let mids: Vec<String> = (0..4)
        .map(|m| {
            let ins: Vec<&String> = leaves[3 * m..3 * m + 3].iter().collect();
            let paths: Vec<String> = ins.iter().map(|d| logical(&s.out(d))).collect();
            let script = format!("cat {} > $out", paths.join(" "));
            let inputs: Vec<(&str, &str)> = ins.iter().map(|d| (d.as_str(), "out")).collect();
            s.drv(
                &format!("mid{m}"),
                Spec {
                    script: &script,
                    inputs: &inputs,
                    ..Spec::default()
                },
            )
        })
        .collect();
    let mut top_inputs: Vec<&String> = mids.iter().collect();
    top_inputs.extend([&big, &special]);
    top_inputs.extend(locals.iter());
    let paths: Vec<String> = top_inputs.iter().map(|d| logical(&s.out(d))).collect();
    let script = format!("cat {} > $out", paths.join(" "));
    let inputs: Vec<(&str, &str)> = top_inputs.iter().map(|d| (d.as_str(), "out")).collect();
    let top = s.drv(
        "top",
        Spec {
            script: &script,
            inputs: &inputs,
            ..Spec::default()
        },
    );

    let out = s.build(&["--machines", machines_arg(&machines), "-j", "2", &top]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let (k1, k2, k3) = (key_name(&h1), key_name(&h2), key_name(&h3));
    // 12 leaves + big + special + 2 local + 4 mids + top.
    let all: Vec<&String> = leaves
        .iter()
        .chain([&big, &special])
        .chain(locals.iter())
        .chain(mids.iter())
        .chain([&top])
        .collect();
    assert_eq!(all.len(), 21);
    let mut by_host = std::collections::BTreeMap::<String, usize>::new();
    for d in &all {
        let sig = signers(&s, &s.out(d));
        for k in &sig {
            *by_host.entry(k.clone()).or_default() += 1;
        }
        if *d != &special {
            assert!(
                !sig.contains(&k2),
                "{d} built on the mandatory-feature host"
            );
        }
    }
    assert_eq!(signers(&s, &s.out(&big)), [k1.clone()].into(), "big");
    assert_eq!(
        signers(&s, &s.out(&special)),
        [k2.clone()].into(),
        "special"
    );
    for d in &locals {
        assert!(signers(&s, &s.out(d)).is_empty(), "{d} was built here");
    }
    // Independent builds went to both hosts that take plain derivations.
    let leaf_signers: BTreeSet<String> =
        leaves.iter().flat_map(|d| signers(&s, &s.out(d))).collect();
    assert_eq!(leaf_signers, [k1.clone(), k3.clone()].into(), "{by_host:?}");
    // The top needed inputs from every host and from here.
    let content = std::fs::read_to_string(s.real(&s.out(&top))).expect("top");
    assert!(
        content.contains("leaf11") && content.contains("special") && content.contains("local1")
    );
    assert!(signers(&s, &s.out(&top)).len() == 1);
}

#[test]
fn a_remote_failure_fails_the_build_with_the_remote_log() {
    let Some((h, s, machines)) = one_trusted_host(this_test!(), 14) else {
        return;
    };
    let d = s.script_drv("fails", "echo remote-says-hello; exit 3");
    let out = build_with(&s, &machines, &d);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("failed on '{}'", uri(&h))), "{err}");
    assert!(
        err.contains("remote-says-hello"),
        "log tail in the error: {err}"
    );
    let log = support::run_ok(s.cmd().arg("log").arg(&d));
    assert!(text(&log).contains("remote-says-hello"), "{}", text(&log));
    assert!(s.info(&s.out(&d)).is_none());
    // A build failure is not the machine's fault: no backoff.
    let records = std::fs::read_dir(s.loc().state.join("offload-backoff"))
        .map(|d| {
            d.filter(|e| {
                !e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".lock")
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(records, 0);
}

#[test]
fn a_remote_build_log_reaches_stderr_without_terminal_escapes() {
    let Some((h, s, machines)) = one_trusted_host(this_test!(), 14) else {
        return;
    };
    let holds_log = |log: &[u8]| log.windows(HOSTILE_LOG.len()).any(|w| w == HOSTILE_LOG);

    // Failing: the machine's message and the log tail in the error.
    let d = s.script_drv("hostile-remote-fails", &hostile_log_script(3));
    let out = build_with(&s, &machines, &d);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("failed on '{}'", uri(&h))));
    assert_terminal_safe(&out.stderr, "remote failure");
    let log = support::run_ok(s.cmd().arg("log").arg(&d));
    assert!(
        holds_log(&log),
        "the log as the build wrote it: {:?}",
        text(&log)
    );

    // Succeeding, with -L: the streamed log.
    let d = s.script_drv("hostile-remote-ok", &hostile_log_script(0));
    let out = s.build(&["-L", "--machines", machines_arg(&machines), &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_terminal_safe(&out.stderr, "remote -L");
    assert_stderr_has(&out, "hostile-remote-ok> xy\n");
    let log = support::run_ok(s.cmd().arg("log").arg(&d));
    assert!(
        holds_log(&log),
        "the log as the build wrote it: {:?}",
        text(&log)
    );
}

#[test]
fn a_wrong_host_key_is_refused_and_the_build_fails_over() {
    let Some((h, s)) = trusted_host(this_test!(), 15) else {
        return;
    };
    let other = s.tmp.path().join("other_host_key");
    keygen(&other, "impostor");
    let wrong = std::fs::read_to_string(other.with_extension("pub")).expect("pub");
    let machines = write_machines(
        &s,
        &[Entry {
            host_key: Some(wrong.clone()),
            ..Entry::new(&h)
        }],
    );
    let t = s
        .cmd()
        .args(["machines", "test", "--machines", machines_arg(&machines)])
        .output()
        .expect("run");
    assert_eq!(t.status.code(), Some(1));
    let report = text(&t.stdout);
    assert!(report.contains("host key mismatch"), "{report}");
    let wrong_blob = wrong.split_whitespace().nth(1).expect("blob");
    let right_blob = host_public_key(&h)
        .split_whitespace()
        .nth(1)
        .expect("blob")
        .to_owned();
    assert!(
        report.contains(wrong_blob),
        "names the expected key: {report}"
    );
    assert!(
        report.contains(&right_blob),
        "names the offered key: {report}"
    );

    // The build goes local, and the machine into backoff, with a warning
    // naming the machine and both keys (a man in the middle?).
    let d = leaf(&s, "failover", &[]);
    let out = build_with(&s, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let warning = text(&out.stderr)
        .lines()
        .find(|l| l.contains("warning: machine"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no warning: {}", text(&out.stderr)));
    for needle in [
        uri(&h).as_str(),
        wrong_blob,
        right_blob.as_str(),
        "host key mismatch",
    ] {
        assert!(warning.contains(needle), "{needle} not in: {warning}");
    }
    assert!(signers(&s, &s.out(&d)).is_empty(), "built here");
    let status = machines_status(&s, &machines);
    let b = &status[0]["backoff"];
    assert_eq!(b["failures"], 1, "{status}");
    assert!(
        b["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("host key mismatch")),
        "{status}"
    );
}

#[test]
fn outputs_of_an_untrusted_host_are_refused() {
    if !offload_ready(this_test!()) {
        return;
    }
    let h = TestHost::start(16);
    let s = Store::new();
    let machines = write_machines(&s, &[Entry::new(&h)]);
    let d = leaf(&s, "untrusted", &[]);
    let out = build_with(&s, &machines, &d);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("not signed by a trusted key"), "{err}");
    assert!(err.contains(&key_name(&h)), "names the signer: {err}");
    assert!(s.info(&s.out(&d)).is_none(), "never registered");

    // Trusted, the same build works, and the machine checks out.
    trust(&s, &h);
    let out = build_with(&s, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(signers(&s, &s.out(&d)), [key_name(&h)].into());
    let t =
        support::run_ok(
            s.cmd()
                .args(["machines", "test", "--machines", machines_arg(&machines)]),
        );
    let report = text(&t);
    assert!(report.contains(": ok"), "{report}");
    assert!(report.contains("fetched it back"), "{report}");
    let status = machines_status(&s, &machines);
    assert_eq!(status[0]["reachable"], true, "{status}");
    assert!(status[0]["load"].is_number(), "{status}");
    assert!(status[0]["freeDisk"].is_number(), "{status}");
    assert_eq!(status[0]["slotsInUse"], 0, "{status}");
}

#[test]
fn a_host_killed_mid_build_makes_the_build_finish_elsewhere() {
    if !offload_ready(this_test!()) {
        return;
    }
    let (fast, slow) = (TestHost::start(17), TestHost::start(18));
    finishes_elsewhere(&Store::new(), (&fast, &slow), ("slow", 3), &[], |h| {
        h.kill()
    });
}

#[test]
fn a_stock_nix_host_builds_next_to_a_sandoff_host() {
    let test = this_test!();
    if !offload_ready(test) || !support::require(test, hosts::NIX_NEEDS) {
        return;
    }
    let nix_host = TestHost::start_with(21, &hosts::HostConfig::nix().mandatory(&["nixonly"]));
    let sandoff_host = TestHost::start(22);
    let s = Store::new();
    trust(&s, &sandoff_host);
    let nix_key = s.tmp.path().join("nix-host.pub");
    std::fs::write(&nix_key, nix_host.signing_public_key()).expect("write key");
    support::run_ok(s.cmd().args(["key", "authorize"]).arg(&nix_key));
    let machines = s.tmp.path().join("machines");
    std::fs::write(
        &machines,
        format!(
            "{}\n{}",
            nix_host.machine_line(),
            Entry::new(&sandoff_host).line()
        ),
    )
    .expect("write machines");

    let on_nix = leaf(&s, "on-nix", &[("requiredSystemFeatures", "nixonly")]);
    let a = logical(&s.out(&on_nix));
    let script = format!("cat {a} > $out; echo and-sandoff >> $out");
    let after = s.drv(
        "after-nix",
        Spec {
            script: &script,
            inputs: &[(&on_nix, "out")],
            ..Spec::default()
        },
    );
    let out = build_with(&s, &machines, &after);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let nix_name = nix_host
        .signing_public_key()
        .split(':')
        .next()
        .expect("name")
        .to_owned();
    assert_eq!(signers(&s, &s.out(&on_nix)), [nix_name].into());
    assert_eq!(
        signers(&s, &s.out(&after)),
        [key_name(&sandoff_host)].into()
    );
    assert_eq!(
        std::fs::read_to_string(s.real(&s.out(&after))).expect("read"),
        "on-nix\nand-sandoff\n"
    );
}

#[test]
fn nix_copy_closure_copies_into_a_sandoff_host() {
    let test = this_test!();
    let mut needs = hosts::NEEDS.to_vec();
    needs.extend([
        support::Need::Program("nix-copy-closure"),
        support::Need::Program("nix-instantiate"),
    ]);
    if !support::require(test, &needs) {
        return;
    }
    const BAZ: &str = support::NIX_BAZ;
    let host = TestHost::start(23);
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("nixconf");
    let src = tmp.path().join("src");
    support::nix_foo_baz(&conf, &src);
    support::run_ok(
        support::nix_cmd("nix-copy-closure", &conf)
            .env("NIX_REMOTE", &src)
            .env("NIX_SSHOPTS", host.ssh_opts().join(" "))
            .args(["--to", &format!("root@{}", host.addr), BAZ]),
    );
    let info = support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(host.root())
            .args(["store", "info", "--json", BAZ]),
    );
    let info: serde_json::Value = serde_json::from_slice(&info).expect("json");
    let foo = info[0]["references"][0]
        .as_str()
        .expect("baz refers to foo")
        .to_owned();
    assert!(foo.ends_with("-foo"), "{info}");
    // The reference came along, and baz is the file Nix wrote.
    support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(host.root())
            .args(["store", "info", &foo]),
    );
    assert_eq!(
        std::fs::read_to_string(host.root().join(BAZ.trim_start_matches('/'))).expect("read"),
        foo
    );
}

#[test]
fn a_refused_login_puts_the_machine_in_backoff_and_builds_here() {
    let Some((h, s)) = trusted_host(this_test!(), 24) else {
        return;
    };
    let stranger = s.tmp.path().join("stranger");
    keygen(&stranger, "stranger");
    let line = Entry::new(&h).line().replacen(
        &h.client_key().display().to_string(),
        &stranger.display().to_string(),
        1,
    );
    let machines = s.tmp.path().join("machines");
    std::fs::write(&machines, line).expect("write machines");
    let d = leaf(&s, "refused", &[]);
    let out = s.build(&["--json", "--machines", machines_arg(&machines), &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A refused login may be an attack too: a warning event, every time.
    let warnings: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "warning")
        .collect();
    assert_eq!(warnings.len(), 1, "{}", text(&out.stderr));
    assert_eq!(warnings[0]["machine"], uri(&h), "{}", warnings[0]);
    assert!(
        warnings[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("authentication")),
        "{}",
        warnings[0]
    );
    assert!(signers(&s, &s.out(&d)).is_empty(), "built here");
    let status = machines_status(&s, &machines);
    assert_eq!(status[0]["reachable"], false, "{status}");
    assert!(
        status[0]["backoff"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("authentication")),
        "{status}"
    );
}

#[test]
fn a_dead_link_mid_build_is_noticed_and_the_build_finishes_elsewhere() {
    let test = this_test!();
    if !offload_ready(test) || !support::require(test, &[support::Need::Program("ip")]) {
        return;
    }
    // 202: namespaces are system-wide, so far from the indices others use.
    let cut = TestHost::start_with(202, &hosts::HostConfig::default().netns());
    let other = TestHost::start(25);
    // Silent while the link dies: only keepalives can tell.
    finishes_elsewhere(
        &Store::new(),
        (&cut, &other),
        ("quiet", 8),
        &["--ssh-keepalive", "1"],
        |h| h.cut_link(),
    );
}

/// A Guix `build-machine` record for a test host.
fn guix_record(host: &TestHost, speed: &str, threshold: &str) -> String {
    format!(
        "(build-machine (name \"{}\") (port {}) (systems '(\"x86_64-linux\")) (user \"root\") \
         (private-key \"{}\") (host-key \"{}\") (speed {speed}) (overload-threshold {threshold}) \
         (parallel-builds 2))\n",
        host.addr,
        host.port,
        host.client_key().display(),
        host_public_key(host).trim()
    )
}

#[test]
fn an_overloaded_guix_machine_is_passed_over() {
    if !offload_ready(this_test!()) {
        return;
    }
    let (busy, calm) = (TestHost::start(27), TestHost::start(28));
    let s = Store::new();
    trust(&s, &busy);
    trust(&s, &calm);
    // A threshold of 0 makes any load too much: the faster machine is
    // measured, found overloaded, and the calm one builds.
    let scm = s.tmp.path().join("machines.scm");
    std::fs::write(
        &scm,
        format!(
            "(list\n{}{})\n",
            guix_record(&busy, "10.0", "0.0"),
            guix_record(&calm, "1.0", "#f")
        ),
    )
    .expect("write machines.scm");
    let d = leaf(&s, "calm", &[]);
    let out = build_with(&s, &scm, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(signers(&s, &s.out(&d)), [key_name(&calm)].into());
}

#[test]
fn a_fixed_output_built_remotely_is_checked_and_keeps_its_content_address() {
    let Some((h, s, machines)) = one_trusted_host(this_test!(), 29) else {
        return;
    };
    let hash = sandoff::store::HashAlgo::Sha256.digest(b"fixed\n");
    let d = s.drv(
        "fixed.txt",
        Spec {
            script: "echo fixed > $out",
            fixed: Some(("sha256", hash.to_base16())),
            ..Spec::default()
        },
    );
    let out = build_with(&s, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = s.info(&s.out(&d)).expect("valid");
    assert_eq!(
        info.ca.map(|c| c.to_string()),
        Some(format!("fixed:{}", hash.to_nix32_prefixed()))
    );
    assert_eq!(signers(&s, &s.out(&d)), [key_name(&h)].into());
}

/// `/gnu/store`.
fn gnu() -> StoreDir {
    StoreDir::new("/gnu/store").expect("store dir")
}

/// `sandoff machines test` over `machines`: its exit code and report.
fn machines_test(s: &Store, machines: &Path) -> (Option<i32>, String) {
    let t = s
        .cmd()
        .args(["machines", "test", "--machines", machines_arg(machines)])
        .output()
        .expect("run");
    (t.status.code(), text(&t.stdout))
}

/// The mismatch names both directories, the machine's first.
fn assert_names_both(text: &str, host: &str, client: &str) {
    let said =
        format!("store directory mismatch: the server's store is {host}, the client's is {client}");
    assert!(text.contains(&said), "{said:?} not in: {text}");
}

/// Nothing of the client's store reached the host's: no `gnu/store` under
/// its root, and none of `paths` in its `nix/store`.
fn assert_nothing_sent(host: &TestHost, paths: &[&StorePath]) {
    assert!(!host.root().join("gnu").exists(), "a /gnu/store appeared");
    for p in paths {
        assert!(
            !host.root().join("nix/store").join(p.base_name()).exists(),
            "{} was sent",
            p.base_name()
        );
    }
}

#[test]
fn a_gnu_store_client_sends_nothing_to_a_nix_store_host_and_builds_elsewhere() {
    if !offload_ready(this_test!()) {
        return;
    }
    let h = TestHost::start(41);
    let s = Store::with_dir(gnu());
    trust(&s, &h);
    let machines = write_machines(&s, &[Entry::new(&h)]);

    let (code, report) = machines_test(&s, &machines);
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("FAILED"), "{report}");
    assert_names_both(&report, "/nix/store", "/gnu/store");

    // The build goes local, the machine into backoff, and the log says why.
    let d = leaf(&s, "gnu-leaf", &[]);
    let out = build_with(&s, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = s.out(&d);
    assert!(signers(&s, &built).is_empty(), "built here");
    assert!(s.real(&built).starts_with(s.root().join("gnu/store")));
    let log = std::fs::read_to_string(s.loc().state.join("log").join(s.path(&d).base_name()))
        .expect("log");
    assert_names_both(&log, "/nix/store", "/gnu/store");
    assert!(log.contains("placing the build again"), "{log}");
    let status = machines_status(&s, &machines);
    let b = &status[0]["backoff"];
    assert_eq!(b["failures"], 1, "{status}");
    assert_names_both(
        b["lastError"].as_str().unwrap_or(""),
        "/nix/store",
        "/gnu/store",
    );

    let bb = s.path(&s.bb);
    assert_nothing_sent(&h, &[&bb, &built, &s.path(&d)]);
}

#[test]
fn a_gnu_store_host_builds_for_a_gnu_store_client() {
    if !offload_ready(this_test!()) {
        return;
    }
    let h = TestHost::start_with(42, &hosts::HostConfig::default().store_dir("/gnu/store"));
    assert_eq!(h.store_dir, gnu());
    let s = Store::with_dir(gnu());
    trust(&s, &h);
    let machines = write_machines(&s, &[Entry::new(&h)]);

    let (code, report) = machines_test(&s, &machines);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains(
            "store directory /gnu/store, the same as here (checked by the machine's sandoff)"
        ),
        "{report}"
    );
    assert!(report.contains("--expect-store-dir /gnu/store"), "{report}");

    let d = leaf(&s, "gnu-remote", &[]);
    let out = build_with(&s, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = s.out(&d);
    assert_eq!(signers(&s, &built), [key_name(&h)].into());
    assert_eq!(
        std::fs::read_to_string(s.real(&built)).expect("read"),
        "gnu-remote\n"
    );
    // It was built there, in the host's /gnu/store.
    assert!(h.root().join("gnu/store").join(built.base_name()).exists());
    let status = machines_status(&s, &machines);
    assert!(status[0]["backoff"].is_null(), "{status}");
}

#[test]
fn a_stock_nix_host_store_dir_is_learned_and_a_mismatch_refused() {
    let test = this_test!();
    if !offload_ready(test) || !support::require(test, hosts::NIX_NEEDS) {
        return;
    }
    let nix_host = TestHost::start_nix(43);
    let nix_key = |s: &Store| {
        let key = s.tmp.path().join("nix-host.pub");
        std::fs::write(&key, nix_host.signing_public_key()).expect("write key");
        support::run_ok(s.cmd().args(["key", "authorize"]).arg(&key));
    };
    let probe = format!("{} --print-fixed-path", nix_host.serve_program().display());

    // A client of the same directory: learned, and the test passes.
    let same = Store::new();
    nix_key(&same);
    let machines = same.tmp.path().join("machines");
    std::fs::write(&machines, nix_host.machine_line()).expect("write machines");
    let (code, report) = machines_test(&same, &machines);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("store directory /nix/store, the same as here (learned with '"),
        "{report}"
    );
    assert!(report.contains(&probe), "{report}");

    // A /gnu/store client: refused before anything is sent, naming both.
    let s = Store::with_dir(gnu());
    nix_key(&s);
    let machines = s.tmp.path().join("machines");
    std::fs::write(&machines, nix_host.machine_line()).expect("write machines");
    let (code, report) = machines_test(&s, &machines);
    assert_eq!(code, Some(1), "{report}");
    assert_names_both(&report, "/nix/store", "/gnu/store");
    let d = leaf(&s, "not-on-nix", &[]);
    let out = build_with(&s, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = s.out(&d);
    assert!(signers(&s, &built).is_empty(), "built here");
    let status = machines_status(&s, &machines);
    assert_eq!(status[0]["backoff"]["failures"], 1, "{status}");
    assert_names_both(
        status[0]["backoff"]["lastError"].as_str().unwrap_or(""),
        "/nix/store",
        "/gnu/store",
    );
    let bb = s.path(&s.bb);
    assert_nothing_sent(&nix_host, &[&bb, &built, &s.path(&d)]);

    // A Nix host serving /gnu/store: its directory learned, the test passes.
    let gnu_host = TestHost::start_with(44, &hosts::HostConfig::nix().store_dir("/gnu/store"));
    let key = s.tmp.path().join("gnu-host.pub");
    std::fs::write(&key, gnu_host.signing_public_key()).expect("write key");
    support::run_ok(s.cmd().args(["key", "authorize"]).arg(&key));
    let machines = s.tmp.path().join("machines-gnu");
    std::fs::write(&machines, gnu_host.machine_line()).expect("write machines");
    let (code, report) = machines_test(&s, &machines);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("store directory /gnu/store, the same as here (learned with '"),
        "{report}"
    );
}

#[test]
fn a_machine_that_has_the_outputs_already_is_fetched_from_not_built() {
    let Some((h, first, machines)) = one_trusted_host(this_test!(), 80) else {
        return;
    };
    // Each build of it gives other bytes: a fetch is told from a rebuild.
    let script = "cat /proc/sys/kernel/random/uuid > $out";
    let d = first.script_drv("built-once", script);
    let out = build_with(&first, &machines, &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = std::fs::read(first.real(&first.out(&d))).expect("output");

    // Another client of the same machine, with the same derivation.
    let second = Store::new();
    trust(&second, &h);
    let machines = write_machines(&second, &[Entry::new(&h)]);
    let d2 = second.script_drv("built-once", script);
    assert_eq!(d2, d, "the same derivation in both stores");
    let out = build_with(&second, &machines, &d2);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(second.real(&second.out(&d2))).expect("output"),
        built,
        "fetched, not built again"
    );
    assert_eq!(signers(&second, &second.out(&d2)), [key_name(&h)].into());
    let log = support::run_ok(second.cmd().args(["log", &d2]));
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("has the outputs of"), "{log}");

    // Outputs it holds but signed by nobody this client trusts are not
    // taken: the build fails as any untrusted output does.
    let third = Store::new();
    let machines = write_machines(&third, &[Entry::new(&h)]);
    let d3 = third.script_drv("built-once", script);
    let out = build_with(&third, &machines, &d3);
    assert!(!out.status.success());
    assert_stderr_has(&out, "not signed by a trusted key");
    assert!(third.info(&third.out(&d3)).is_none());
}

#[test]
fn among_equal_machines_the_one_holding_the_inputs_builds() {
    if !offload_ready(this_test!()) {
        return;
    }
    // `first` sorts before `holder` by name, so without what machines hold
    // the name would choose it.
    let (first, holder) = (TestHost::start(81), TestHost::start(82));
    assert!(uri(&first) < uri(&holder));
    let s = Store::new();
    trust(&s, &first);
    trust(&s, &holder);
    let machines = write_machines(
        &s,
        &[
            Entry::new(&first),
            Entry {
                features: "big",
                ..Entry::new(&holder)
            },
        ],
    );
    // Only `holder` builds the input; then both can build the top.
    let dep = s.drv(
        "held-dep",
        Spec {
            script: "head -c 100000 /dev/zero > $out",
            env: &[("requiredSystemFeatures", "big")],
            ..Spec::default()
        },
    );
    let dep_out = logical(&s.out(&dep));
    let script = format!("wc -c < {dep_out} > $out");
    let top = s.drv(
        "held-top",
        Spec {
            script: &script,
            inputs: &[(dep.as_str(), "out")],
            ..Spec::default()
        },
    );
    let out = build_with(&s, &machines, &top);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(signers(&s, &s.out(&dep)), [key_name(&holder)].into());
    assert_eq!(signers(&s, &s.out(&top)), [key_name(&holder)].into());

    // `sandoff decide --ask-machines` shows what each holds, and chooses
    // the same way.
    let json = support::run_ok(s.cmd().args([
        "decide",
        "--json",
        "--ask-machines",
        "--machines",
        machines_arg(&machines),
        &top,
    ]));
    let json: serde_json::Value = serde_json::from_slice(&json).expect("json");
    assert_eq!(
        json["machine"].as_str(),
        Some(uri(&holder).as_str()),
        "{json}"
    );
    let held = |name: &str| {
        json["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["held_bytes"].as_u64())
            .expect("held_bytes")
    };
    assert_eq!(held(&uri(&first)), 0, "{json}");
    assert!(held(&uri(&holder)) > 100_000, "{json}");
    assert!(
        json["reason"]
            .as_str()
            .unwrap_or("")
            .contains("MiB of the input closure"),
        "{json}"
    );
}
