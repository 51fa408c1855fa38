//! `sandoff build` end to end: busybox derivations added with
//! `sandoff derivation add` to a store under a temporary directory, built by
//! the sandoff binary as the `sandoffbld` users.
//!
//! Needs root (sandbox, build users) and /bin/busybox. The build users' lock
//! directory is the one the sandbox tests use, so builds of this test binary
//! never share a user.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use sandoff::sandbox::setup::{ensure_build_users, BuildUsers};
use sandoff::store::local::LocalStore;
use sandoff::store::{nar, HashAlgo, StoreDir, StoreLocation, StorePath, ValidPathInfo};
use serde_json::json;

use crate::support::{self, Need};
use crate::this_test;

/// A group of one build user that only tests naming it use: a test that
/// must know which user its next build gets (the pool's other users may be
/// held by builds of tests running at the same time).
pub(crate) const SOLO_GROUP: &str = "sandoffsolo";

/// Root, busybox, namespaces (what [`crate::sandbox::ready`] checks) and
/// the build users (the pool, and [`SOLO_GROUP`]).
pub(crate) fn ready(test: &str) -> bool {
    if !crate::sandbox::ready(test) {
        return false;
    }
    static USERS: OnceLock<bool> = OnceLock::new();
    let met = *USERS.get_or_init(|| {
        [("sandoffbld", 10), (SOLO_GROUP, 1)]
            .iter()
            .all(|(group, count)| {
                ensure_build_users(&BuildUsers::Create {
                    group: (*group).to_owned(),
                    count: *count,
                })
                .is_ok()
            })
    });
    support::require(
        test,
        &[Need::Condition {
            what: "sandoffbld users",
            met,
        }],
    )
}

/// `out`'s stderr holds `needle`.
pub(crate) fn assert_stderr_has(out: &std::process::Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert!(stderr.contains(needle), "{stderr}");
}

/// A store under a temporary directory, with busybox in it.
pub(crate) struct Store {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) bb: String,
    /// Its store directory (`/nix/store` unless made with [`Store::with_dir`]).
    pub(crate) dir: StoreDir,
}

/// How a derivation is given to `drv`.
#[derive(Default)]
pub(crate) struct Spec<'a> {
    /// Shell script run by busybox sh, with the applets on PATH.
    pub(crate) script: &'a str,
    /// Input derivations and the output used.
    pub(crate) inputs: &'a [(&'a str, &'a str)],
    /// Output names (default `out`).
    pub(crate) outputs: &'a [&'a str],
    /// Fixed output: hashAlgo (`sha256` or `r:sha256`) and hex hash.
    pub(crate) fixed: Option<(&'a str, String)>,
    /// Extra environment.
    pub(crate) env: &'a [(&'a str, &'a str)],
}

impl Store {
    pub(crate) fn new() -> Store {
        Store::with_dir(StoreDir::default())
    }

    /// A store whose paths are named in `dir` (such as `/gnu/store`).
    pub(crate) fn with_dir(dir: StoreDir) -> Store {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src/busybox/bin");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::copy("/bin/busybox", src.join("busybox")).expect("copy busybox");
        let mut s = Store {
            tmp,
            bb: String::new(),
            dir,
        };
        let out = support::run_ok(
            s.cmd()
                .args(["store", "add"])
                .arg(s.tmp.path().join("src/busybox")),
        );
        s.bb = String::from_utf8(out).expect("utf8").trim().to_owned();
        s
    }

    pub(crate) fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    pub(crate) fn loc(&self) -> StoreLocation {
        StoreLocation::new(self.dir.clone(), self.root())
    }

    pub(crate) fn cmd(&self) -> Command {
        let mut c = support::sandoff();
        c.arg("--store-root")
            .arg(self.root())
            .env_remove("SANDOFF_USER_POOL_DIR")
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR");
        if self.dir != StoreDir::default() {
            c.arg("--store-dir").arg(self.dir.as_str());
        }
        c
    }

    /// A new store, if the machine can build (see [`ready`]).
    pub(crate) fn ready(test: &str) -> Option<Store> {
        ready(test).then(Store::new)
    }

    /// Adds a derivation named `name` that runs `script` and takes no
    /// inputs; returns its `.drv` path.
    pub(crate) fn script_drv(&self, name: &str, script: &str) -> String {
        self.drv(
            name,
            Spec {
                script,
                ..Spec::default()
            },
        )
    }

    /// Adds a derivation named `name`; returns its `.drv` path.
    pub(crate) fn drv(&self, name: &str, spec: Spec<'_>) -> String {
        let bb = format!("{}/bin/busybox", self.bb);
        let script = format!(
            "set -eu\n{bb} mkdir -p $TMPDIR/bin\n{bb} --install -s $TMPDIR/bin\nexport PATH=$TMPDIR/bin\n{}",
            spec.script
        );
        let outputs: &[&str] = if spec.outputs.is_empty() {
            &["out"]
        } else {
            spec.outputs
        };
        let mut outs = serde_json::Map::new();
        let mut env = serde_json::Map::new();
        for o in outputs {
            let mut v = json!({"path": ""});
            if let Some((algo, hash)) = &spec.fixed {
                v["hashAlgo"] = json!(algo);
                v["hash"] = json!(hash);
            }
            outs.insert((*o).to_owned(), v);
            env.insert((*o).to_owned(), json!(""));
        }
        if outputs.len() > 1 {
            env.insert("outputs".into(), json!(outputs.join(" ")));
        }
        env.insert("name".into(), json!(name));
        env.insert("builder".into(), json!(bb));
        env.insert("system".into(), json!("x86_64-linux"));
        for (k, v) in spec.env {
            env.insert((*k).to_owned(), json!(v));
        }
        let mut input_drvs = serde_json::Map::new();
        for (d, o) in spec.inputs {
            input_drvs.insert((*d).to_owned(), json!([o]));
        }
        let drv = json!({
            "outputs": outs,
            "inputSrcs": [self.bb],
            "inputDrvs": input_drvs,
            "system": "x86_64-linux",
            "builder": bb,
            "args": ["sh", "-c", script],
            "env": env,
        });
        support::derivation_add(&mut self.cmd(), &drv)
    }

    /// `cmd build DRV` started, its output thrown away (for a test that
    /// stops it midway).
    pub(crate) fn spawn_build(&self, cmd: &mut Command, drv: &str) -> std::process::Child {
        cmd.args(["build", drv])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sandoff build")
    }

    pub(crate) fn build(&self, args: &[&str]) -> Output {
        self.cmd().arg("build").args(args).output().expect("run")
    }

    pub(crate) fn open(&self) -> LocalStore {
        sandoff::derivation::check::open_store(self.loc()).expect("open store")
    }

    pub(crate) fn path(&self, full: &str) -> StorePath {
        self.dir.parse_path(full).expect("store path")
    }

    /// The output paths of a `.drv`, by output name.
    pub(crate) fn outputs(&self, drv: &str) -> std::collections::BTreeMap<String, StorePath> {
        self.open()
            .derivation_outputs(&self.path(drv))
            .expect("derivation outputs")
    }

    pub(crate) fn out(&self, drv: &str) -> StorePath {
        self.outputs(drv).remove("out").expect("out")
    }

    pub(crate) fn info(&self, p: &StorePath) -> Option<ValidPathInfo> {
        self.open().query_path_info(p).expect("query")
    }

    pub(crate) fn real(&self, p: &StorePath) -> PathBuf {
        self.loc().real_path(p)
    }

    /// Build directories left under `<state>/builds`: all but the build
    /// users' reusable ones with nothing in them.
    pub(crate) fn build_dirs(&self) -> Vec<PathBuf> {
        support::leftover_build_dirs(&self.loc().state)
    }

    /// The reusable build directory set of each build user that built here.
    pub(crate) fn user_build_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.loc().state.join("builds")) {
            Ok(d) => d
                .map(|e| e.expect("entry").path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("uid-"))
                })
                .map(|p| p.join("sandoff-build"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(crate) fn logical(p: &StorePath) -> String {
    StoreDir::default().display(p)
}

/// The JSON events of a `--json` run.
pub(crate) fn events(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every entry of a tree: canonical metadata.
fn assert_canonical(path: &Path) {
    let meta = std::fs::symlink_metadata(path).expect("lstat");
    assert_eq!(meta.uid(), 0, "{}", path.display());
    assert_eq!(meta.mtime(), 1, "{}", path.display());
    if !meta.file_type().is_symlink() {
        let mode = meta.permissions().mode() & 0o7777;
        assert!(
            mode == 0o444 || mode == 0o555,
            "{}: {mode:o}",
            path.display()
        );
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(path).expect("readdir") {
            assert_canonical(&e.expect("entry").path());
        }
    }
}

#[test]
fn builds_a_graph_in_order_with_scanned_references_and_canonical_outputs() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let c = s.script_drv("c", "echo building c; mkdir $out; echo from-c > $out/file; chmod 755 $out/file; ln -s file $out/link");
    let b = s.drv(
        "b",
        Spec {
            // Embeds c's path, so c is a reference.
            script: "cat $c/file > $out; echo $c >> $out",
            inputs: &[(&c, "out")],
            env: &[("c", &logical(&s.out(&c)))],
            ..Spec::default()
        },
    );
    let a = s.drv(
        "a",
        Spec {
            // Reads b and c but embeds only b (and out <-> dev).
            script: "mkdir $out $dev; head -n 1 $b > $out/b; cat $c/file > $out/c; echo $b > $out/ref; echo $dev > $out/dev; echo $out > $dev/out",
            inputs: &[(&b, "out"), (&c, "out")],
            outputs: &["dev", "out"],
            env: &[
                ("b", &logical(&s.out(&b))),
                ("c", &logical(&s.out(&c))),
            ],
            ..Spec::default()
        },
    );
    let out = s.build(&["--json", &a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a_outs = s.outputs(&a);
    let expected: Vec<String> = a_outs.values().map(logical).collect();
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        expected,
        "outputs sorted by output name"
    );
    let built: Vec<String> = events(&out)
        .iter()
        .filter(|e| e["event"] == "built")
        .map(|e| e["drv"].as_str().expect("drv").to_owned())
        .collect();
    assert_eq!(
        built,
        vec![c.clone(), b.clone(), a.clone()],
        "dependency order"
    );
    assert_eq!(
        events(&out)
            .last()
            .map(|e| (e["event"].clone(), e["success"].clone())),
        Some((json!("done"), json!(true)))
    );

    let (c_out, b_out) = (s.out(&c), s.out(&b));
    let (a_out, a_dev) = (a_outs["out"].clone(), a_outs["dev"].clone());
    let refs = |p: &StorePath| s.info(p).expect("valid").references;
    assert_eq!(refs(&c_out), BTreeSet::new());
    assert_eq!(refs(&b_out), BTreeSet::from([c_out.clone()]));
    assert_eq!(refs(&a_out), BTreeSet::from([a_dev.clone(), b_out.clone()]));
    assert_eq!(refs(&a_dev), BTreeSet::from([a_out.clone()]));
    let info = s.info(&a_out).expect("valid");
    assert_eq!(info.deriver, Some(s.path(&a)));
    assert!(info.ultimate);
    assert_eq!(info.ca, None);
    assert_eq!(
        info.nar_hash,
        nar::hash_path(&s.real(&a_out)).expect("nar").0
    );
    for p in [&c_out, &b_out, &a_out, &a_dev] {
        assert_canonical(&s.real(p));
    }
    let file = std::fs::metadata(s.real(&c_out).join("file")).expect("stat");
    assert_eq!(file.permissions().mode() & 0o7777, 0o555);
    assert_eq!(
        std::fs::read_to_string(s.real(&a_out).join("c")).expect("read"),
        "from-c\n"
    );
    assert!(s.build_dirs().is_empty(), "{:?}", s.build_dirs());

    // The log is kept; a second build has nothing to do.
    let log = support::run_ok(s.cmd().args(["log", &c]));
    assert_eq!(text(&log), "building c\n");
    // Nothing to build: no build users needed.
    let again = s.build(&[
        "--json",
        "--build-users-group",
        "sandoff-no-such-group",
        &a,
        &c,
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(!events(&again).iter().any(|e| e["event"] == "started"));
    assert_eq!(
        text(&again.stdout),
        format!("{}\n{}\n{}\n", expected[0], expected[1], logical(&c_out))
    );
}

#[test]
fn concurrent_builds_get_distinct_build_users() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let script = "sleep 2; id -u > $out";
    let x = s.drv(
        "x",
        Spec {
            script,
            ..Spec::default()
        },
    );
    let y = s.drv(
        "y",
        Spec {
            script,
            env: &[("y", "1")],
            ..Spec::default()
        },
    );
    let out = s.build(&["--json", "-j", "2", &x, &y]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Side by side: both started before either was built.
    let order: Vec<String> = events(&out)
        .iter()
        .filter(|e| e["event"] == "started" || e["event"] == "built")
        .map(|e| e["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        order,
        ["started", "started", "built", "built"],
        "ran one after the other"
    );
    let uid = |d: &str| std::fs::read_to_string(s.real(&s.out(d))).expect("read");
    assert_ne!(uid(&x), uid(&y));
    assert_ne!(uid(&x).trim(), "0");
}

/// Network namespaces are made ahead of builds (`sandbox::netns`): each
/// build must still get one of its own, never the host's nor an earlier
/// build's, with only a loopback device, up. Each build leaves a TCP
/// connection in TIME_WAIT (state that outlives its processes), which the
/// next build would see if it shared the namespace.
#[test]
fn every_build_gets_a_fresh_network_namespace_with_only_loopback_up() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    // The server side may be an IPv6 socket: both tables count.
    let script = "{ readlink /proc/self/ns/net; cat /proc/net/tcp /proc/net/tcp6 | grep -c ' 0[0-9A-F] ' || true; \
        ip -o link show | sed 's/^[0-9]*: //' | cut -d' ' -f1-2; } > $out
        nc -l -p 5000 > /dev/null &
        i=0; until echo hi | nc 127.0.0.1 5000 2>/dev/null; do i=$((i+1)); [ $i -lt 50 ]; sleep 0.1; done
        wait
        cat /proc/net/tcp /proc/net/tcp6 | grep -q ' 06 '";
    let drvs: Vec<String> = (0..4)
        .map(|i| {
            let n = i.to_string();
            s.drv(
                &format!("net{i}"),
                Spec {
                    script,
                    env: &[("n", &n)],
                    ..Spec::default()
                },
            )
        })
        .collect();
    let args: Vec<&str> = ["-j", "1"]
        .into_iter()
        .chain(drvs.iter().map(String::as_str))
        .collect();
    let out = s.build(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let host = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    for d in &drvs {
        let got = std::fs::read_to_string(s.real(&s.out(d))).expect("read output");
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 3, "{got}");
        assert!(lines[0].starts_with("net:["), "{got}");
        assert_ne!(
            Path::new(lines[0]),
            host,
            "a build ran in the host's network namespace"
        );
        assert_eq!(
            lines[1].trim(),
            "0",
            "a build saw an earlier build's TCP state:\n{got}"
        );
        assert!(
            lines[2].starts_with("lo: <LOOPBACK,UP"),
            "only loopback, up: {got}"
        );
    }
}

#[test]
fn two_processes_build_the_same_derivation_once() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("once", "sleep 2; echo done > $out");
    let spawn = || {
        s.cmd()
            .args(["build", "--json", &d])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (p1, p2) = (spawn(), spawn());
    let (o1, o2) = (
        p1.wait_with_output().expect("wait"),
        p2.wait_with_output().expect("wait"),
    );
    for o in [&o1, &o2] {
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(text(&o.stdout), format!("{}\n", logical(&s.out(&d))));
    }
    let count = |what: &str| {
        events(&o1)
            .iter()
            .chain(events(&o2).iter())
            .filter(|e| e["event"] == what)
            .count()
    };
    assert_eq!(
        count("built"),
        1,
        "{}{}",
        text(&o1.stderr),
        text(&o2.stderr)
    );
    assert_eq!(
        count("reused"),
        1,
        "{}{}",
        text(&o1.stderr),
        text(&o2.stderr)
    );
    assert_eq!(count("waiting-for-lock"), 1);
}

/// sha256 of "hello\n", and of the NAR of a (non-executable) file holding it.
fn hello_hashes() -> (String, String) {
    let flat = HashAlgo::Sha256.digest(b"hello\n").to_base16();
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = tmp.path().join("f");
    std::fs::write(&f, "hello\n").expect("write");
    let rec = nar::hash_path(&f).expect("nar").0.to_base16();
    (flat, rec)
}

#[test]
fn fixed_output_with_the_right_hash_is_registered_with_its_content_address() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (flat, rec) = hello_hashes();
    let f = s.drv(
        "hello.txt",
        Spec {
            script: "echo hello > $out",
            fixed: Some(("sha256", flat.clone())),
            ..Spec::default()
        },
    );
    let r = s.drv(
        "hello-r.txt",
        Spec {
            script: "echo hello > $out",
            fixed: Some(("r:sha256", rec.clone())),
            ..Spec::default()
        },
    );
    let out = s.build(&[&f, &r]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ca = |d: &str| {
        s.info(&s.out(d))
            .expect("valid")
            .ca
            .expect("ca")
            .to_string()
    };
    let h = |hex: &str| {
        sandoff::store::Hash::parse_bare(hex, HashAlgo::Sha256)
            .expect("hash")
            .to_nix32_prefixed()
    };
    assert_eq!(ca(&f), format!("fixed:{}", h(&flat)));
    assert_eq!(ca(&r), format!("fixed:r:{}", h(&rec)));
}

#[test]
fn fixed_output_gets_only_allowlisted_impure_env_vars() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let expected = "state=unset secret=unset proxy=http://proxy.invalid:3128 extra=unset\n";
    let script = "line=\"state=${SANDOFF_STATE_DIR-unset} secret=${AWS_SECRET_ACCESS_KEY-unset} \
                  proxy=${http_proxy-unset} extra=${MY_FETCH_TOKEN-unset}\"; \
                  echo \"$line\"; echo \"$line\" > $out";
    let d = s.drv(
        "impure-env.txt",
        Spec {
            script,
            fixed: Some((
                "sha256",
                HashAlgo::Sha256.digest(expected.as_bytes()).to_base16(),
            )),
            env: &[(
                "impureEnvVars",
                "SANDOFF_STATE_DIR AWS_SECRET_ACCESS_KEY http_proxy MY_FETCH_TOKEN",
            )],
            ..Spec::default()
        },
    );
    let state = s.loc().state;
    let out = {
        let mut c = s.cmd();
        // The default state directory, named explicitly: sandoff's own
        // settings are in its environment when a daemon starts it.
        c.env("SANDOFF_STATE_DIR", &state)
            .env("AWS_SECRET_ACCESS_KEY", "hunter2")
            .env("http_proxy", "http://proxy.invalid:3128")
            .env("MY_FETCH_TOKEN", "token-value")
            .env_remove("SANDOFF_IMPURE_ENV_ALLOW")
            .args(["build", &d]);
        c.output().expect("run")
    };
    // Had anything else leaked, the output's hash would not match.
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(s.real(&s.out(&d))).expect("output"),
        expected
    );
    let log =
        std::fs::read_to_string(state.join("log").join(s.path(&d).base_name())).expect("build log");
    assert!(
        !log.contains("hunter2") && !log.contains(state.to_str().expect("utf-8")),
        "{log}"
    );

    // Extending the allowlist passes the named variable (the fixed hash is
    // of its value), never a SANDOFF_ one, even when listed.
    let other = s.drv(
        "impure-env-extra.txt",
        Spec {
            script:
                "echo \"state=${SANDOFF_STATE_DIR-unset} extra=${MY_FETCH_TOKEN-unset}\" > $out",
            fixed: Some((
                "sha256",
                HashAlgo::Sha256
                    .digest(b"state=unset extra=token-value\n")
                    .to_base16(),
            )),
            env: &[("impureEnvVars", "SANDOFF_STATE_DIR MY_FETCH_TOKEN")],
            ..Spec::default()
        },
    );
    let mut c = s.cmd();
    let out = c
        .env("SANDOFF_STATE_DIR", &state)
        .env("MY_FETCH_TOKEN", "token-value")
        .args([
            "build",
            "--impure-env-allow",
            "MY_FETCH_TOKEN,SANDOFF_*",
            &other,
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn fixed_output_with_a_wrong_hash_registers_nothing() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let wrong = HashAlgo::Sha256.digest(b"something else").to_base16();
    let d = s.drv(
        "wrong.txt",
        Spec {
            script: "echo hello > $out",
            fixed: Some(("sha256", wrong)),
            ..Spec::default()
        },
    );
    let out = s.build(&[&d]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "hash mismatch in fixed-output derivation '{d}': specified sha256:"
        )),
        "{err}"
    );
    let p = s.out(&d);
    assert!(s.info(&p).is_none());
    assert!(!s.real(&p).exists());
    assert!(s.build_dirs().is_empty());
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn failing_build_leaves_nothing_and_names_the_derivation() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("fails", "mkdir $out; echo oops >&2; exit 3");
    let out = s.build(&["-L", &d]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "builder for '{d}' failed: builder exited with status 3"
        )),
        "{err}"
    );
    assert!(err.contains("fails> oops\n"), "-L streams the log: {err}");
    assert!(err.contains("oops"), "the log tail is quoted: {err}");
    let p = s.out(&d);
    assert!(s.info(&p).is_none());
    assert!(!s.real(&p).exists());
    assert!(s.build_dirs().is_empty());

    let nobody = s.build(&["--build-users-group", "sandoff-no-such-group", &d]);
    assert_eq!(nobody.status.code(), Some(1));
    assert_stderr_has(&nobody, &format!("cannot build '{d}': no build users: build users group 'sandoff-no-such-group' does not exist"));

    let missing = s.script_drv("lazy", "true");
    let out = s.build(&[&missing]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "did not produce output 'out'");
}

#[test]
fn keep_going_builds_the_independent_rest() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let bad = s.script_drv("bad", "exit 1");
    let good = s.script_drv("good", "echo ok > $out");
    let above = s.drv(
        "above",
        Spec {
            script: "echo x > $out",
            inputs: &[(&bad, "out")],
            ..Spec::default()
        },
    );
    // Without --keep-going: exit 1, nothing printed, `above` never started.
    let stop = s.build(&["-j", "1", "--json", &above, &good]);
    assert_eq!(stop.status.code(), Some(1));
    assert_eq!(text(&stop.stdout), "");
    assert!(!events(&stop)
        .iter()
        .any(|e| e["event"] == "started" && e["drv"] == above.as_str()));
    let out = s.build(&["-j", "1", "--keep-going", &above, &good]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("'{above}' not built: dependency '{bad}' failed")),
        "{err}"
    );
    assert!(s.info(&s.out(&good)).is_some(), "{err}");
    assert!(s.info(&s.out(&above)).is_none());
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn silent_and_overlong_builds_are_killed() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let silent = s.script_drv("silent", "sleep 1000; echo > $out");
    let out = s.build(&["--max-silent-time", "1", &silent]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "timed out after 1 seconds of silence");
    let chatty = s.script_drv("chatty", "while true; do echo tick; sleep 0.2; done");
    let out = s.build(&["--timeout", "1", "--max-silent-time", "5", &chatty]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "timed out");
    assert!(s.info(&s.out(&chatty)).is_none());
    assert!(s.build_dirs().is_empty());
}

#[test]
fn limits_of_u64_max_seconds_mean_forever_and_do_not_panic() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let quick = s.script_drv("quick", "echo done > $out");
    let max = u64::MAX.to_string();
    let out = s.build(&["--timeout", &max, "--max-silent-time", &max, &quick]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), logical(&s.out(&quick)));
}

#[test]
fn resource_flags_reach_the_sandbox() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.drv(
        "limits",
        Spec {
            script: "awk '$5 == \"/tmp\" || $5 == \"/dev/shm\" { print $5, $NF }' /proc/self/mountinfo > $out; \
                     echo nproc=$(ulimit -u) >> $out",
            ..Spec::default()
        },
    );
    let out = s.build(&[
        "--tmp-size",
        "3m",
        "--shm-size",
        "1m",
        "--max-processes",
        "64",
        &d,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = std::fs::read_to_string(s.real(&s.out(&d))).expect("output");
    let line = |mp: &str| {
        got.lines()
            .find(|l| l.starts_with(&format!("{mp} ")))
            .unwrap_or_else(|| panic!("no {mp}: {got}"))
            .to_owned()
    };
    assert!(line("/tmp").contains("size=3072k"), "{got}");
    assert!(line("/dev/shm").contains("size=1024k"), "{got}");
    assert!(got.contains("nproc=64\n"), "{got}");
    let bad = s.build(&["--shm-size", "0", &d]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

#[test]
fn kill_9_mid_build_leaves_no_valid_output_and_the_next_run_succeeds() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv(
        "slow",
        "mkdir $out; echo started; sleep 2; echo done > $out/f",
    );
    // One build user for both runs, so that the next build is the one of
    // the killed run's user (it waits while the killed run's processes still
    // hold that user).
    let solo = || {
        let mut c = s.cmd();
        c.env("SANDOFF_BUILD_USERS_GROUP", SOLO_GROUP);
        c
    };
    let mut child = s.spawn_build(&mut solo(), &d);
    // Wait until the builder has started (its log says so).
    let log = sandoff::build::log_path(&s.loc(), &s.path(&d));
    support::wait_for("the build to start", || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("started"))
            .then_some(())
    });
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let p = s.out(&d);
    assert!(s.info(&p).is_none());
    assert!(!s.real(&p).exists());
    // The killed run's build directory stays behind, not empty; the next
    // build of its build user empties it.
    let left: Vec<PathBuf> = s.build_dirs();
    assert_eq!(left.len(), 1, "{left:?}");
    // As if a crash had struck between moving the output and registering it.
    std::fs::create_dir_all(s.real(&p)).expect("mkdir");
    std::fs::write(s.real(&p).join("junk"), "stale").expect("write");
    let out = solo().args(["build", &d]).output().expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.info(&p).is_some());
    assert!(!s.real(&p).join("junk").exists());
    assert_eq!(
        std::fs::read_to_string(s.real(&p).join("f")).expect("read"),
        "done\n"
    );
    assert!(s.build_dirs().is_empty(), "{:?}", s.build_dirs());
}

#[test]
fn build_users_directories_are_emptied_for_reuse_and_a_crashs_leftovers_go() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let a = s.script_drv("reuse-a", "echo left > $TMPDIR/left; echo a > $out");
    let out = s.build(&[&a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.build_dirs().is_empty(), "{:?}", s.build_dirs());
    let users = s.user_build_dirs();
    assert!(
        !users.is_empty(),
        "a build user's directories are kept for reuse"
    );
    // What a build killed mid-way could leave, and worse: files, symbolic
    // links to a directory elsewhere, its build directory open to all.
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("precious"), "x").expect("write");
    for top in &users {
        std::fs::write(top.join("build/junk"), "x").expect("write");
        std::fs::create_dir(top.join("store/half-an-output")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), top.join("store/link")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), top.join("build/link")).expect("symlink");
        std::fs::set_permissions(top.join("build"), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
    }
    // Whichever user it gets, the builder finds its directories as new.
    let b = s.script_drv(
        "reuse-b",
        r#"test "$(ls -A $TMPDIR)" = bin
test "$(stat -c %a:%u $TMPDIR)" = "700:$(id -u)"
test ! -e /nix/store/half-an-output
test ! -e /nix/store/link
echo b > $out"#,
    );
    let out = s.build(&[&b]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A leftover of a user that another test's build held meanwhile goes
    // at a later start, once that user is free.
    let empty = |d: PathBuf| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none());
    support::wait_for("the leftovers to be removed", || {
        let out = s.build(&[&a]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        users
            .iter()
            .all(|t| empty(t.join("build")) && empty(t.join("store")))
            .then_some(())
    });
    assert!(s.build_dirs().is_empty(), "{:?}", s.build_dirs());
    assert!(
        outside.path().join("precious").exists(),
        "no symbolic link was followed"
    );
}

#[test]
fn keep_failed_keeps_and_reports_the_build_directory() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("kept", "echo partial > $TMPDIR/note; exit 1");
    let out = s.build(&["--keep-failed", &d]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let slots = s.build_dirs();
    assert_eq!(
        slots.len(),
        1,
        "only the kept directory, no lock file: {slots:?}"
    );
    let kept: Vec<PathBuf> = std::fs::read_dir(&slots[0])
        .expect("readdir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(
        err.contains(&format!("build directory kept at {}", kept[0].display())),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(kept[0].join("build/note")).expect("read"),
        "partial\n"
    );
}

#[test]
fn log_of_an_unbuilt_derivation_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = support::sandoff()
        .arg("--store-root")
        .arg(tmp.path())
        .args(["log", "/nix/store/rl3y5ay9c8dmy8b1pznaydbndphskkws-a.drv"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "no build log of");
}

/// `examples/graph/build.sh`: the diamond with a fixed-output root builds.
#[test]
fn example_graph_builds() {
    if !ready(this_test!()) || !support::require_programs(this_test!(), &["jq"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graph/build.sh");
    let out = support::run_ok(
        Command::new(script)
            .arg("--store-root")
            .arg(tmp.path())
            .env("SANDOFF", env!("CARGO_BIN_EXE_sandoff"))
            .env_remove("SANDOFF_USER_POOL_DIR"),
    );
    let top = text(&out);
    let top = top.trim();
    assert!(top.ends_with("-top"), "{top}");
    let real = tmp.path().join(top.trim_start_matches('/')).join("summary");
    assert_eq!(
        std::fs::read_to_string(real).expect("read summary"),
        "HELLO FROM A FIXED-OUTPUT DERIVATION\n37\n"
    );
}

#[test]
fn build_places_each_derivation_with_the_decision_module() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("placed", "echo placed > $out");
    // A local machine that cannot build x86_64-linux, and no machines.
    let out = s.build(&["--system", "aarch64-linux", "--extra-platforms=", &d]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("cannot build '{d}'")), "{err}");
    assert!(err.contains("x86_64-linux"), "names the system: {err}");
    assert!(s.info(&s.out(&d)).is_none());

    // A machine that matches but cannot be reached: it goes into backoff
    // and the build fails over to this machine.
    let machines = s.tmp.path().join("machines");
    std::fs::write(&machines, "ssh://builder.invalid x86_64-linux - 2 1\n").expect("write");
    let out = s.build(&["--machines", machines.to_str().expect("utf8"), &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.info(&s.out(&d)).is_some());
    let backoff = s.loc().state.join("offload-backoff");
    assert_eq!(
        std::fs::read_dir(&backoff)
            .expect("backoff records")
            .filter(|e| !e
                .as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".lock"))
            .count(),
        1,
        "one record in {}",
        backoff.display()
    );

    // --local-only (and guix-daemon's --no-build-hook) build here.
    for flag in ["--local-only", "--no-build-hook"] {
        let fresh = Store::new();
        let d = fresh.drv(
            "placed",
            Spec {
                script: "echo placed > $out",
                ..Spec::default()
            },
        );
        let out = fresh.build(&["--machines", machines.to_str().expect("utf8"), flag, &d]);
        assert!(out.status.success(), "{flag}: {}", text(&out.stderr));
        assert!(fresh.info(&fresh.out(&d)).is_some());
    }

    // A local-build derivation stays local even with a matching machine.
    let local = s.drv(
        "local-build",
        Spec {
            script: "echo here > $out",
            env: &[("preferLocalBuild", "1")],
            ..Spec::default()
        },
    );
    let out = s.build(&["--machines", machines.to_str().expect("utf8"), &local]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.info(&s.out(&local)).is_some());
}

/// A builder that prints OSC 52 (set the clipboard), a window title and a
/// colour, on stderr; then `exit_code`.
pub(crate) fn hostile_log_script(exit_code: u8) -> String {
    format!(
        r"printf 'x\033]52;c;ZXZpbA==\007y\n\033]0;pwned\033\\z\n\033[31mred\033[0m\n' >&2; mkdir $out; exit {exit_code}"
    )
}

/// What [`hostile_log_script`] writes, byte for byte.
pub(crate) const HOSTILE_LOG: &[u8] =
    b"x\x1b]52;c;ZXZpbA==\x07y\n\x1b]0;pwned\x1b\\z\n\x1b[31mred\x1b[0m\n";

/// Neither the clipboard nor the title sequence, nor any BEL, in `err`;
/// the colour kept.
pub(crate) fn assert_terminal_safe(err: &[u8], what: &str) {
    let shown = String::from_utf8_lossy(err);
    assert!(
        !err.windows(2).any(|w| w == b"\x1b]"),
        "{what}: an OSC sequence reached stderr: {shown:?}"
    );
    assert!(
        !err.contains(&0x07),
        "{what}: BEL reached stderr: {shown:?}"
    );
    assert!(
        shown.contains("\x1b[31mred\x1b[0m"),
        "{what}: colours are kept: {shown:?}"
    );
}

#[test]
fn failing_build_log_tail_reaches_stderr_without_terminal_escapes() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("hostile-fails", &hostile_log_script(3));
    let out = s.build(&[&d]);
    assert_eq!(out.status.code(), Some(1));
    assert_terminal_safe(&out.stderr, "log tail");
    assert_stderr_has(&out, "xy");
    let log = support::run_ok(s.cmd().args(["log", &d]));
    assert_eq!(log, HOSTILE_LOG, "the log on disk is as the build wrote it");
}

#[test]
fn streamed_build_log_reaches_stderr_without_terminal_escapes() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("hostile-ok", &hostile_log_script(0));
    let out = s.build(&["-L", &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_terminal_safe(&out.stderr, "-L");
    assert_stderr_has(&out, "hostile-ok> xy\n");
    let log = support::run_ok(s.cmd().args(["log", &d]));
    assert_eq!(log, HOSTILE_LOG, "the log on disk is as the build wrote it");
}

#[test]
fn timings_account_for_every_step_of_a_build() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = s.script_drv("timed", "echo timed > $out");
    let out = s.build(&["--json", &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let timings = events(&out)
        .into_iter()
        .find(|e| e["event"] == "timings")
        .expect("a timings event");
    let ms = timings["milliseconds"].as_object().expect("milliseconds");
    let steps = [
        "lock", "log", "inputs", "place", "user", "dirs", "sandbox", "stage", "scan", "register",
        "cleanup",
    ];
    for step in steps {
        assert!(ms[step].as_f64().is_some_and(|v| v >= 0.0), "{timings}");
    }
    // A local build runs its builder: the sandbox step took time.
    assert!(ms["sandbox"].as_f64() > Some(0.0), "{timings}");
    // The table, once everything is built.
    let d = s.script_drv("timed-table", "echo table > $out");
    let out = s.build(&["--timings", &d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("timings over 1 build(s)"), "{stderr}");
    assert!(stderr.contains("all steps"), "{stderr}");
}
