//! The registry and local store against Nix 2.8: the same paths for the same
//! input, each reading the other's store, `/gnu/store` stores, concurrent
//! adds and interrupted adds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sandoff::store::nar;
use sandoff::store::signature::Signature;
use sandoff::store::{
    FileIngestionMethod, HashAlgo, StoreDir, StoreLocation, StorePath, ValidPathInfo,
};

use crate::support;
use crate::this_test;

/// A store laid out as Nix's chroot store `--store <root>`: state in
/// `<root>/nix/var/nix`, so both tools use the same database.
fn nix_location(root: &Path) -> StoreLocation {
    let mut loc = StoreLocation::new(StoreDir::default(), root.to_owned());
    loc.state = root.join("nix/var/nix");
    loc
}

/// `sandoff` on the chroot store at `root`, sharing Nix's state directory.
fn sandoff_on(root: &Path) -> Command {
    let mut c = support::sandoff();
    c.arg("--store-root")
        .arg(root)
        .arg("--state-dir")
        .arg(root.join("nix/var/nix"));
    c
}

fn nix_store(conf: &Path, root: &Path) -> Command {
    let mut c = support::nix_cmd("nix-store", conf);
    c.arg("--store").arg(root);
    c
}

fn nix(conf: &Path, root: &Path) -> Command {
    let mut c = support::nix_cmd("nix", conf);
    c.arg("--store").arg(root);
    c
}

/// The test tree of formats.md §4: `a.txt`, executable `run.sh`, a symlink
/// and an empty file in a subdirectory.
fn test_tree(dir: &Path) -> PathBuf {
    let d = dir.join("d");
    fs::create_dir_all(d.join("sub")).unwrap();
    fs::write(d.join("a.txt"), "hello\n").unwrap();
    fs::write(d.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(d.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", d.join("link")).unwrap();
    fs::write(d.join("sub/empty"), "").unwrap();
    d
}

/// After [`support::require_programs`], a scratch directory with Nix's
/// config directory `conf` and a chroot store root `root` in it.
fn nix_scratch(
    test: &str,
    programs: &[&'static str],
) -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    if !support::require_programs(test, programs) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (conf, root) = (tmp.path().join("conf"), tmp.path().join("root"));
    Some((tmp, conf, root))
}

/// `nix-store --verify --check-contents` over the store at `root`, and its
/// stderr.
fn nix_verify(conf: &Path, root: &Path) -> (std::process::Output, String) {
    let out = nix_store(conf, root)
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn text(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap()
}

fn sig(name: &str, byte: u8) -> Signature {
    Signature::new(name.to_owned(), [byte; 64])
}

fn count_rows(db: &Path, path: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "select count(*) from ValidPaths where path = ?",
        [path],
        |r| r.get(0),
    )
    .unwrap()
}

fn leftovers(store_dir: &Path) -> Vec<String> {
    fs::read_dir(store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.') && n != ".links" || n.ends_with(".lock"))
        .collect()
}

#[test]
fn schema_matches_nix_2_8_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let store = sandoff::derivation::check::open_store(nix_location(tmp.path())).unwrap();
    let db = store.registry().db_path().to_owned();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<String> = conn
        .prepare(
            "select type || ' ' || name || ' ' || tbl_name || char(10) || coalesce(sql, '') \
             from sqlite_master order by name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let got: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let fixtures = support::fixtures().join("db");
    assert_eq!(
        got,
        fs::read_to_string(fixtures.join("nix-2.8-sqlite-master.txt")).unwrap()
    );
    let mode: String = conn
        .query_row("pragma journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        format!("{mode}\n"),
        fs::read_to_string(fixtures.join("nix-2.8-journal-mode.txt")).unwrap()
    );
    assert_eq!(
        fs::read(tmp.path().join("nix/var/nix/db/schema")).unwrap(),
        fs::read(fixtures.join("nix-2.8-schema-version")).unwrap()
    );
}

#[test]
fn add_prints_the_same_path_as_nix_store() {
    let Some((tmp, conf, _)) = nix_scratch(this_test!(), &["nix-store"]) else {
        return;
    };
    let d = test_tree(tmp.path());
    let a = d.join("a.txt");
    let run = d.join("run.sh");
    let cases: Vec<(Vec<&str>, Vec<&str>, &Path)> = vec![
        (vec!["--add"], vec!["add"], &d),
        (vec!["--add"], vec!["add"], &run),
        (
            vec!["--add-fixed", "sha256"],
            vec!["add-fixed", "sha256"],
            &a,
        ),
        (vec!["--add-fixed", "md5"], vec!["add-fixed", "md5"], &run),
        (
            vec!["--add-fixed", "--recursive", "sha1"],
            vec!["add-fixed", "--recursive", "sha1"],
            &d,
        ),
        (
            vec!["--add-fixed", "--recursive", "sha512"],
            vec!["add-fixed", "--recursive", "sha512"],
            &a,
        ),
    ];
    let nix_root = tmp.path().join("nix-root");
    let our_root = tmp.path().join("our-root");
    for (nix_args, our_args, src) in cases {
        let theirs = support::run_ok(nix_store(&conf, &nix_root).args(&nix_args).arg(src));
        let ours = support::run_ok(sandoff_on(&our_root).arg("store").args(&our_args).arg(src));
        assert_eq!(
            text(ours.clone()),
            text(theirs),
            "{our_args:?} {}",
            src.display()
        );
        // Same NAR hash, as Nix reads it from our database.
        let path = text(ours).trim().to_owned();
        let q = |root: &Path| {
            text(support::run_ok(
                nix_store(&conf, root).args(["-q", "--hash"]).arg(&path),
            ))
        };
        assert_eq!(q(&our_root), q(&nix_root), "{path}");
    }
}

#[test]
fn nix_reads_a_store_sandoff_wrote() {
    let Some((tmp, conf, root)) = nix_scratch(this_test!(), &["nix-store", "nix"]) else {
        return;
    };
    let loc = nix_location(&root);
    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
    let d = store
        .add_path(
            &test_tree(tmp.path()),
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
        )
        .unwrap();
    let foo = store
        .add_text("foo", b"bar", &BTreeSet::new(), &BTreeMap::new())
        .unwrap();
    assert_eq!(
        loc.logical(&foo),
        "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
    );
    let baz = store
        .add_text(
            "baz",
            loc.logical(&foo).as_bytes(),
            &[foo.clone()].into(),
            &BTreeMap::new(),
        )
        .unwrap();
    assert_eq!(
        loc.logical(&baz),
        "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz"
    );

    // An input-addressed path with references, a deriver and signatures,
    // imported from a NAR.
    let out_dir = tmp.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    fs::write(
        out_dir.join("refs"),
        format!("{}\n{}\n", loc.logical(&foo), loc.logical(&baz)),
    )
    .unwrap();
    let mut nar_bytes = Vec::new();
    nar::dump(&out_dir, &mut nar_bytes).unwrap();
    let (nar_hash, nar_size) = nar::hash_path(&out_dir).unwrap();
    let out = StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").unwrap();
    let drv = StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv").unwrap();
    let info = ValidPathInfo {
        path: out.clone(),
        deriver: Some(drv.clone()),
        nar_hash: nar_hash.clone(),
        nar_size,
        references: [foo.clone(), baz.clone()].into(),
        registration_time: 1_700_000_000,
        ultimate: true,
        signatures: [sig("test-key-2", 2), sig("test-key-1", 1)].into(),
        ca: None,
    };
    store.add_nar(&info, &mut nar_bytes.as_slice()).unwrap();
    drop(store);

    let (verify, stderr) = nix_verify(&conf, &root);
    assert!(verify.status.success(), "{stderr}");
    assert!(
        !stderr.contains("modified") && !stderr.contains("error"),
        "{stderr}"
    );
    // Nix prints query results in topological order; compare them sorted.
    let q = |args: &[&str], p: &StorePath| {
        let out = text(support::run_ok(
            nix_store(&conf, &root).args(args).arg(loc.logical(p)),
        ));
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect::<String>()
    };
    let lines = |ps: &[&StorePath]| {
        let mut ps: Vec<&StorePath> = ps.to_vec();
        ps.sort();
        ps.iter()
            .map(|p| format!("{}\n", loc.logical(p)))
            .collect::<String>()
    };
    assert_eq!(q(&["-q", "--references"], &out), lines(&[&foo, &baz]));
    assert_eq!(
        q(&["-q", "--references"], &baz),
        format!("{}\n", loc.logical(&foo))
    );
    assert_eq!(q(&["-q", "--referrers"], &foo), lines(&[&out, &baz]));
    assert_eq!(
        q(&["-q", "--hash"], &out),
        format!("{}\n", nar_hash.to_nix32_prefixed())
    );
    assert_eq!(
        q(&["-q", "--deriver"], &out),
        format!("{}\n", loc.logical(&drv))
    );
    assert_eq!(q(&["-q", "--size"], &out), format!("{nar_size}\n"));

    // `nix path-info --json --sigs` and ours print the same document.
    let paths: Vec<String> = [&d, &foo, &baz, &out]
        .iter()
        .map(|p| loc.logical(p))
        .collect();
    let ours = assert_info_like_nix(&conf, &root, &paths);
    let json: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let o = json
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"] == loc.logical(&out))
        .unwrap();
    assert_eq!(o["deriver"], loc.logical(&drv));
    assert_eq!(o["ultimate"], true);
    assert_eq!(o["signatures"].as_array().unwrap().len(), 2);
}

/// `sandoff store info` of `paths` prints what `nix path-info --sigs`
/// prints, with `--json` and without; returns our JSON.
fn assert_info_like_nix(conf: &Path, root: &Path, paths: &[String]) -> String {
    let theirs = text(support::run_ok(
        nix(conf, root)
            .args(["path-info", "--json", "--sigs"])
            .args(paths),
    ));
    let ours_json = text(support::run_ok(
        sandoff_on(root)
            .args(["store", "info", "--json"])
            .args(paths),
    ));
    assert_eq!(ours_json.trim_end(), theirs);
    let theirs = text(support::run_ok(
        nix(conf, root).args(["path-info", "--sigs"]).args(paths),
    ));
    let ours = text(support::run_ok(
        sandoff_on(root).args(["store", "info"]).args(paths),
    ));
    assert_eq!(ours, theirs);
    ours_json
}

#[test]
fn sandoff_reads_a_store_nix_wrote() {
    let programs = ["nix-store", "nix", "nix-build", "busybox"];
    let Some((tmp, conf, root)) = nix_scratch(this_test!(), &programs) else {
        return;
    };
    let d = test_tree(tmp.path());
    let added = text(support::run_ok(
        nix_store(&conf, &root).arg("--add").arg(&d),
    ))
    .trim()
    .to_owned();
    let fixed = text(support::run_ok(
        nix_store(&conf, &root)
            .args(["--add-fixed", "sha256"])
            .arg(d.join("a.txt")),
    ))
    .trim()
    .to_owned();
    // A build: a text input (`foo`), a source input (`bb`), a `.drv` with its
    // output recorded in DerivationOutputs, and an output with a deriver
    // and a reference.
    let bb = tmp.path().join("bb");
    fs::create_dir_all(bb.join("bin")).unwrap();
    fs::copy(support::which("busybox").unwrap(), bb.join("bin/busybox")).unwrap();
    let expr = format!(
        r#"let foo = builtins.toFile "foo" "bar"; in
        derivation {{ name = "hello"; system = builtins.currentSystem; builder = "${{{bb}}}/bin/busybox";
          args = ["sh" "-c" "echo ${{foo}} > $out"]; }}"#,
        bb = bb.display()
    );
    let mut build = support::nix_cmd("nix-build", &conf);
    build
        .arg("--store")
        .arg(&root)
        .args(["--no-out-link", "-E", &expr]);
    let out = text(support::run_ok(&mut build)).trim().to_owned();
    let drv = text(support::run_ok(nix_store(&conf, &root).args([
        "-q",
        "--deriver",
        &out,
    ])))
    .trim()
    .to_owned();
    let keys = tmp.path().join("keys");
    fs::create_dir(&keys).unwrap();
    support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .args(["--generate-binary-cache-key", "test-key-1"])
            .arg(keys.join("sk"))
            .arg(keys.join("pk")),
    );
    support::run_ok(
        nix(&conf, &root)
            .args(["store", "sign", "--key-file"])
            .arg(keys.join("sk"))
            .arg(&out),
    );

    let paths = [added.clone(), fixed.clone(), out.clone()];
    assert_info_like_nix(&conf, &root, &paths);

    let loc = nix_location(&root);
    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
    let out_p = loc.dir.parse_path(&out).unwrap();
    let drv_p = loc.dir.parse_path(&drv).unwrap();
    let info = store.query_path_info(&out_p).unwrap().unwrap();
    assert_eq!(info.deriver.as_ref(), Some(&drv_p));
    assert!(info.ultimate);
    assert_eq!(info.signatures.len(), 1);
    assert_eq!(
        store.derivation_outputs(&drv_p).unwrap(),
        [("out".to_owned(), out_p.clone())].into()
    );
    let drv_info = store.query_path_info(&drv_p).unwrap().unwrap();
    assert!(drv_info.ca.is_some());
    let foo = drv_info
        .references
        .iter()
        .find(|r| r.name() == "foo")
        .unwrap()
        .clone();
    assert_eq!(info.references, [foo.clone()].into());
    let closure = store.closure(&[drv_p.clone()].into()).unwrap();
    assert_eq!(closure.len(), 3, "{closure:?}");
    let sorted = store.topo_sort(&closure).unwrap();
    assert_eq!(sorted.last(), Some(&drv_p));
    let nar_hash = text(support::run_ok(
        nix_store(&conf, &root).args(["-q", "--hash", &out]),
    ))
    .trim()
    .to_owned();
    assert_eq!(info.nar_hash.to_nix32_prefixed(), nar_hash);

    // Mixed: sandoff adds a path referring to Nix's, Nix checks the whole store.
    let note = store
        .add_text(
            "note",
            out.as_bytes(),
            &[out_p.clone()].into(),
            &BTreeMap::new(),
        )
        .unwrap();
    drop(store);
    let (verify, stderr) = nix_verify(&conf, &root);
    assert!(
        verify.status.success() && !stderr.contains("modified"),
        "{stderr}"
    );
    let refs = text(support::run_ok(
        nix_store(&conf, &root)
            .args(["-q", "--references"])
            .arg(loc.logical(&note)),
    ));
    assert_eq!(refs, format!("{out}\n"));
}

#[test]
fn gnu_store_dir_with_store_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let d = test_tree(tmp.path());
    let gnu = |args: &[&str]| {
        let mut c = support::sandoff();
        c.args(["--store-dir", "/gnu/store", "--store-root"])
            .arg(&root)
            .args(args);
        c
    };
    let path = text(support::run_ok(gnu(&["store", "add"]).arg(&d)))
        .trim()
        .to_owned();
    // Nix 2.8 names it the same (NIX_STORE_DIR=/gnu/store nix-store --add d).
    let base = path.strip_prefix("/gnu/store/").unwrap();
    assert!(root
        .join("gnu/store")
        .join(base)
        .join("sub/empty")
        .is_file());
    assert!(root.join("nix/var/sandoff/db/db.sqlite").is_file());
    let info = text(support::run_ok(
        gnu(&["store", "info", "--json"]).arg(&path),
    ));
    let json: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(json[0]["path"], path);
    assert!(json[0]["ca"]
        .as_str()
        .unwrap()
        .starts_with("fixed:r:sha256:"));
    // A /nix/store path is not in this store.
    let err = gnu(&[
        "store",
        "info",
        "/nix/store/q6dq4cjk6aw4cz1whdksas0153xcyk1b-d",
    ])
    .output()
    .unwrap();
    assert_eq!(err.status.code(), Some(1));
}

#[test]
fn gnu_store_interoperates_with_nix() {
    let Some((tmp, conf, root)) = nix_scratch(this_test!(), &["nix-store", "nix"]) else {
        return;
    };
    let d = test_tree(tmp.path());
    let mut ours = sandoff_on(&root);
    ours.args(["--store-dir", "/gnu/store", "store", "add"])
        .arg(&d);
    let path = text(support::run_ok(&mut ours)).trim().to_owned();
    // Nix's chroot store keeps files in <root>/nix/store whatever the
    // logical directory; `real=` points it at ours.
    let url = format!(
        "local?root={r}&store=/gnu/store&real={r}/gnu/store",
        r = root.display()
    );
    let mut nix_add = support::nix_cmd("nix-store", &conf);
    nix_add
        .env("NIX_STORE_DIR", "/gnu/store")
        .args(["--store", &url, "--add"])
        .arg(&d);
    assert_eq!(text(support::run_ok(&mut nix_add)).trim(), path);
    let mut fixed = support::nix_cmd("nix-store", &conf);
    fixed
        .env("NIX_STORE_DIR", "/gnu/store")
        .args(["--store", &url, "--add-fixed", "sha256"])
        .arg(d.join("a.txt"));
    let fixed = text(support::run_ok(&mut fixed)).trim().to_owned();
    let mut verify = support::nix_cmd("nix-store", &conf);
    verify.env("NIX_STORE_DIR", "/gnu/store").args([
        "--store",
        &url,
        "--verify",
        "--check-contents",
    ]);
    let v = verify.output().unwrap();
    assert!(v.status.success() && !String::from_utf8_lossy(&v.stderr).contains("modified"));
    let mut theirs = support::nix_cmd("nix", &conf);
    theirs.env("NIX_STORE_DIR", "/gnu/store").args([
        "--store",
        &url,
        "path-info",
        "--json",
        "--sigs",
        &path,
        &fixed,
    ]);
    let theirs = text(support::run_ok(&mut theirs));
    let mut ours = sandoff_on(&root);
    ours.args([
        "--store-dir",
        "/gnu/store",
        "store",
        "info",
        "--json",
        &path,
        &fixed,
    ]);
    assert_eq!(text(support::run_ok(&mut ours)).trim_end(), theirs);
}

#[test]
fn concurrent_adds_register_each_path_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let loc = nix_location(&root);
    let shared = test_tree(tmp.path());
    let (shared_hash, _) = nar::hash_path(&shared).unwrap();
    let own: Vec<PathBuf> = (0..6)
        .map(|i| {
            let f = tmp.path().join(format!("own-{i}"));
            fs::write(&f, format!("file {i}\n")).unwrap();
            f
        })
        .collect();
    // Threads, each with its own store handle (its own SQLite connection).
    let results: Vec<(StorePath, StorePath)> = std::thread::scope(|s| {
        let handles: Vec<_> = own
            .iter()
            .map(|f| {
                let loc = loc.clone();
                let shared = &shared;
                s.spawn(move || {
                    let store = sandoff::derivation::check::open_store(loc).unwrap();
                    let a = store
                        .add_path(shared, FileIngestionMethod::Recursive, HashAlgo::Sha256)
                        .unwrap();
                    let b = store
                        .add_path(f, FileIngestionMethod::Flat, HashAlgo::Sha256)
                        .unwrap();
                    (a, b)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = &results[0].0;
    assert!(results.iter().all(|(a, _)| a == first));
    // Processes: the same tree and a second tree, all at once.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("x"), "x\n").unwrap();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let src = if i % 2 == 0 { &shared } else { &other };
            sandoff_on(&root)
                .arg("store")
                .arg("add")
                .arg(src)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut printed = BTreeSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed.insert(text(out.stdout).trim().to_owned());
    }
    assert_eq!(printed.len(), 2);
    assert!(printed.contains(&loc.logical(first)));

    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
    let db = store.registry().db_path().to_owned();
    let valid = store.query_valid_paths().unwrap();
    assert_eq!(valid.len(), 1 + own.len() + 1, "{valid:?}");
    for p in &valid {
        assert_eq!(count_rows(&db, &loc.logical(p)), 1);
        let info = store.query_path_info(p).unwrap().unwrap();
        assert_eq!(
            nar::hash_path(&loc.real_path(p)).unwrap(),
            (info.nar_hash.clone(), info.nar_size),
            "{p}"
        );
    }
    assert_eq!(
        store.query_path_info(first).unwrap().unwrap().nar_hash,
        shared_hash
    );
    assert_eq!(leftovers(&loc.real_store_dir()), Vec::<String>::new());
}

#[test]
fn interrupted_adds_leave_nothing_valid_and_are_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let loc = nix_location(&root);
    let d = test_tree(tmp.path());
    let (h, _) = nar::hash_path(&d).unwrap();
    let path = loc
        .dir
        .make_fixed_output_path(FileIngestionMethod::Recursive, &h, "d", [], false)
        .unwrap();
    let real = loc.real_path(&path);
    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();

    // A crash while restoring: a half-written, read-only target and a
    // staging directory nobody will finish.
    fs::create_dir_all(real.join("sub")).unwrap();
    fs::write(real.join("a.txt"), "hel").unwrap();
    fs::set_permissions(real.join("sub"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o555)).unwrap();
    let stale = loc.real_store_dir().join(".sandoff-stage-dead");
    fs::create_dir_all(stale.join("x")).unwrap();
    assert!(!store.is_valid(&path).unwrap());
    assert!(store.query_path_info(&path).unwrap().is_none());

    assert_eq!(
        store
            .add_path(&d, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap(),
        path
    );
    let info = store.query_path_info(&path).unwrap().unwrap();
    assert_eq!(
        nar::hash_path(&real).unwrap(),
        (info.nar_hash, info.nar_size)
    );
    assert_eq!(fs::read(real.join("a.txt")).unwrap(), b"hello\n");
    // The dead stage is garbage; nothing else is.
    assert_eq!(store.remove_stale_stages().unwrap(), 1);
    assert!(!stale.exists());

    // A crash after the move but before registration: complete files, no row.
    let db = store.registry().db_path().to_owned();
    store.registry().invalidate(&path).unwrap();
    assert!(!store.is_valid(&path).unwrap());
    assert_eq!(count_rows(&db, &loc.logical(&path)), 0);
    assert_eq!(
        store
            .add_path(&d, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap(),
        path
    );
    assert!(store.is_valid(&path).unwrap());
}

#[test]
fn killed_add_is_never_half_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let loc = nix_location(&root);
    let big = tmp.path().join("big");
    for i in 0..40 {
        let dir = big.join(format!("dir{i}"));
        fs::create_dir_all(&dir).unwrap();
        for j in 0..50 {
            fs::write(dir.join(format!("f{j}")), vec![b'a' + (j % 26) as u8; 2048]).unwrap();
        }
    }
    let (h, size) = nar::hash_path(&big).unwrap();
    let path = loc
        .dir
        .make_fixed_output_path(FileIngestionMethod::Recursive, &h, "big", [], false)
        .unwrap();
    for delay_ms in [0u64, 5, 20, 60] {
        let mut child = sandoff_on(&root)
            .arg("store")
            .arg("add")
            .arg(&big)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
        if let Some(info) = store.query_path_info(&path).unwrap() {
            // Valid means complete.
            assert_eq!(
                nar::hash_path(&loc.real_path(&path)).unwrap(),
                (info.nar_hash, info.nar_size)
            );
            store.registry().invalidate(&path).unwrap();
        }
    }
    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
    store.remove_stale_stages().unwrap();
    let stages: Vec<String> = leftovers(&loc.real_store_dir())
        .into_iter()
        .filter(|n| n.starts_with(".sandoff-stage"))
        .collect();
    assert_eq!(stages, Vec::<String>::new());
    assert_eq!(
        store
            .add_path(&big, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap(),
        path
    );
    assert_eq!(nar::hash_path(&loc.real_path(&path)).unwrap(), (h, size));
}

#[test]
fn info_of_an_invalid_path_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let missing = "/nix/store/q6dq4cjk6aw4cz1whdksas0153xcyk1b-d";
    let out = sandoff_on(&root)
        .args(["store", "info", "--json", missing])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("path '{missing}' is not valid")),
        "{stderr}"
    );
}
