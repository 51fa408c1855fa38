//! Derivations that claim what they are not, by every route into the
//! store: a `.drv` naming another derivation's output (or a fixed output at
//! a path its hash does not give) is refused by `store add`, `store import`
//! and the serve protocol's ImportPaths, and never leaves a file behind; one
//! that is in a store anyway (registered by another program) is refused
//! before it is built and reported by `store verify`; a derivation that
//! depends on itself is named.
//!
//! The building tests need what `build::ready` needs (root, busybox, build
//! users); the others need nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sandoff::derivation::{Derivation, DerivationOutput, OutputName};
use sandoff::serve::{serve, ServeOptions, SERVE_MAGIC_1, SERVE_MAGIC_2};
use sandoff::store::export::write_export;
use sandoff::store::{nar, wire, HashAlgo, StoreDir, StorePath, ValidPathInfo};

use crate::build::{assert_stderr_has, logical, ready, text, Store};
use crate::support;
use crate::this_test;

/// A `.drv` with no inputs whose one output `out` is `claimed`, written to
/// `dir/<name>.drv`, with the info it would be registered under (its honest
/// text path: only its outputs lie).
fn forged(dir: &Path, name: &str, output: DerivationOutput) -> (PathBuf, ValidPathInfo) {
    let sd = StoreDir::default();
    let claimed = output.path().expect("a path").clone();
    let drv = Derivation {
        outputs: BTreeMap::from([(OutputName::out(), output)]),
        system: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), b"echo pwned > $out".to_vec()],
        env: BTreeMap::from([
            (b"name".to_vec(), name.as_bytes().to_vec()),
            (b"out".to_vec(), sd.display(&claimed).into_bytes()),
        ]),
        ..Derivation::default()
    };
    let bytes = drv.to_aterm(&sd);
    let path = drv.drv_path(&sd).expect("drv path");
    let file = dir.join(format!("{name}.drv"));
    std::fs::write(&file, &bytes).expect("write");
    let (nar_hash, nar_size) = nar::hash_path(&file).expect("nar");
    let info = ValidPathInfo {
        path,
        deriver: None,
        nar_hash,
        nar_size,
        references: BTreeSet::new(),
        registration_time: 1,
        ultimate: false,
        signatures: BTreeSet::new(),
        ca: None,
    };
    (file, info)
}

/// An export archive of the one file `file` as `info`.
fn archive(info: &ValidPathInfo, file: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    write_export(&mut out, &StoreDir::default(), [(info, file)]).expect("export");
    out
}

/// Nothing of `path` in the store: not valid, no file.
fn assert_absent(s: &Store, path: &StorePath) {
    assert!(s.info(path).is_none(), "{path} is valid");
    assert!(!s.real(path).exists(), "{path} left a file");
    let stages: Vec<_> = std::fs::read_dir(s.real(path).parent().expect("store dir"))
        .expect("read store")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sandoff-stage-") && !n.ends_with(".lock"))
        .collect();
    assert!(stages.is_empty(), "staged copies left: {stages:?}");
}

/// A store (with busybox) holding a real derivation `victim` whose output
/// a forged derivation claims.
fn victim() -> (Store, String, StorePath) {
    let s = Store::new();
    let drv = s.script_drv("victim", "echo real > $out");
    let out = s.out(&drv);
    (s, drv, out)
}

/// A fixed-output `.drv` `fetch` whose output is `claimed`, a path its hash
/// does not give, written under `dir`.
fn forged_fixed_output(dir: &Path, claimed: &StorePath) -> (PathBuf, ValidPathInfo) {
    forged(
        dir,
        "fetch",
        DerivationOutput::CAFixed {
            method: sandoff::store::FileIngestionMethod::Flat,
            hash: HashAlgo::Sha256.digest(b"pwned\n"),
            path: claimed.clone(),
        },
    )
}

/// `sandoff store import --no-check-sigs` of `file` as `info`.
fn import(s: &Store, info: &ValidPathInfo, file: &Path) -> std::process::Output {
    support::output_with_input(
        s.cmd().args(["store", "import", "--no-check-sigs"]),
        &archive(info, file),
    )
}

#[test]
fn a_derivation_claiming_another_output_is_refused_by_every_route() {
    let (s, _, victim_out) = victim();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, info) = forged(
        tmp.path(),
        "victim",
        DerivationOutput::InputAddressed {
            path: victim_out.clone(),
        },
    );

    // store import
    let out = import(&s, &info, &file);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "import accepted a forged .drv");
    assert!(
        err.contains("refusing derivation") && err.contains(&logical(&victim_out)),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_absent(&s, &info.path);

    // store add (a `.drv` is a derivation whatever route it takes)
    let out = s
        .cmd()
        .args(["store", "add"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success(), "store add accepted a forged .drv");
    assert_stderr_has(&out, "refusing derivation");

    // the serve protocol's ImportPaths
    let store = s.open();
    let mut input = Vec::new();
    wire::write_u64(&mut input, SERVE_MAGIC_1).expect("vec");
    wire::write_u64(&mut input, 0x207).expect("vec");
    wire::write_u64(&mut input, 4).expect("vec"); // ImportPaths
    input.extend_from_slice(&archive(&info, &file));
    let mut output = Vec::new();
    let res = serve(
        &store,
        &mut &input[..],
        &mut output,
        ServeOptions {
            write: true,
            ..Default::default()
        },
    );
    let err = res.expect_err("serve accepted a forged .drv");
    let mut chain = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        chain = format!("{chain}: {c}");
        cause = c.source();
    }
    let err = chain;
    assert!(err.contains("refusing derivation"), "{err}");
    let mut r = &output[..];
    assert_eq!(wire::read_u64(&mut r).expect("magic"), SERVE_MAGIC_2);
    assert_absent(&s, &info.path);

    // The real derivation still builds its own output.
    assert!(s.info(&victim_out).is_none());
}

#[test]
fn a_fixed_output_at_a_path_its_hash_does_not_give_is_refused_on_import() {
    let (s, _, victim_out) = victim();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, info) = forged_fixed_output(tmp.path(), &victim_out);
    let out = import(&s, &info, &file);
    assert!(!out.status.success());
    assert_stderr_has(&out, "output 'out'");
    assert_absent(&s, &info.path);
}

/// Registers the file `file` as `info` behind sandoff's back, as another
/// program sharing the database could (the registry is Nix's schema).
fn register_behind_our_back(s: &Store, info: &ValidPathInfo, file: &Path) {
    let real = s.real(&info.path);
    std::fs::copy(file, &real).expect("copy into the store");
    let db = rusqlite::Connection::open(s.loc().state.join("db/db.sqlite")).expect("db");
    db.execute(
        "insert into ValidPaths (path, hash, registrationTime, narSize) values (?1, ?2, 1, ?3)",
        rusqlite::params![
            logical(&info.path),
            format!("sha256:{}", info.nar_hash.to_base16()),
            info.nar_size as i64
        ],
    )
    .expect("insert");
    let id = db.last_insert_rowid();
    for r in &info.references {
        db.execute(
            "insert into Refs (referrer, reference) select ?1, id from ValidPaths where path = ?2",
            rusqlite::params![id, logical(r)],
        )
        .expect("insert ref");
    }
}

#[test]
fn a_forged_fixed_output_already_in_the_store_is_not_built_and_fails_verify() {
    if !ready(this_test!()) {
        return;
    }
    let (s, _, victim_out) = victim();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, info) = forged_fixed_output(tmp.path(), &victim_out);
    register_behind_our_back(&s, &info, &file);
    let drv = logical(&info.path);
    let out = s.build(&[&drv]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "built a forged fixed output");
    assert!(
        err.contains("refusing to build") && err.contains("output 'out'"),
        "{err}"
    );
    assert!(
        s.info(&victim_out).is_none(),
        "the claimed path became valid"
    );
    assert!(!s.real(&victim_out).exists());

    let out = s
        .cmd()
        .args(["store", "verify", &drv])
        .output()
        .expect("run");
    assert!(!out.status.success(), "verify passed a forged derivation");
    assert_stderr_has(&out, "not what its name claims");
}

#[test]
fn a_derivation_that_depends_on_itself_is_named() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let sd = StoreDir::default();
    // A path that cannot be its contents' text path: it names itself.
    let me = StorePath::from_base_name("00000000000000000000000000000000-loop.drv").expect("path");
    let out_path =
        StorePath::from_base_name("11111111111111111111111111111111-loop").expect("path");
    let drv = Derivation {
        outputs: BTreeMap::from([(
            OutputName::out(),
            DerivationOutput::InputAddressed {
                path: out_path.clone(),
            },
        )]),
        input_derivations: BTreeMap::from([(me.clone(), BTreeSet::from([OutputName::out()]))]),
        system: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        env: BTreeMap::from([
            (b"name".to_vec(), b"loop".to_vec()),
            (b"out".to_vec(), sd.display(&out_path).into_bytes()),
        ]),
        ..Derivation::default()
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("loop.drv");
    std::fs::write(&file, drv.to_aterm(&sd)).expect("write");
    let (nar_hash, nar_size) = nar::hash_path(&file).expect("nar");
    let info = ValidPathInfo {
        path: me.clone(),
        deriver: None,
        nar_hash,
        nar_size,
        references: BTreeSet::from([me.clone()]),
        registration_time: 1,
        ultimate: false,
        signatures: BTreeSet::new(),
        ca: None,
    };
    register_behind_our_back(&s, &info, &file);
    for args in [vec![], vec!["-k"]] {
        let mut args: Vec<&str> = args;
        let full = logical(&me);
        args.push(&full);
        let out = s.build(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains(&format!("depend on themselves: {full} -> {full}")),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_store_name_starting_with_a_period_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join(".hidden");
    std::fs::write(&file, b"x").expect("write");
    let out = crate::support::sandoff()
        .arg("--store-root")
        .arg(tmp.path().join("root"))
        .args(["store", "add"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "a name starting with '.' was accepted"
    );
    assert_stderr_has(&out, "must not start with a period");
}
