//! `--daemon-store guix|nix`: sandoff working directly on a daemon's store,
//! validity in the daemon's own database (guix-daemon's schema 7, made here
//! from Guix 1.4.0's schema; Nix 2.8's, made by real Nix), never in a
//! registry of sandoff's, and the daemon's database never created or
//! migrated.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{self, Need};
use crate::this_test;

/// guix-daemon's state under `root`: `var/guix/db` with a schema 7
/// database and the daemon's `big-lock`, and an empty `/gnu/store`.
fn guix_daemon_state(root: &Path) -> PathBuf {
    let state = root.join("var/guix");
    let db = state.join("db");
    fs::create_dir_all(&db).expect("mkdir");
    fs::create_dir_all(root.join("gnu/store")).expect("mkdir");
    let sql =
        fs::read_to_string(support::fixtures().join("db/guix-1.4.0-schema.sql")).expect("schema");
    let conn = rusqlite::Connection::open(db.join("db.sqlite")).expect("db");
    conn.execute_batch("pragma journal_mode = wal;")
        .expect("wal");
    conn.execute_batch(&sql).expect("schema");
    fs::write(db.join("schema"), "7").expect("schema file");
    fs::write(db.join("big-lock"), "").expect("big-lock");
    state
}

fn sandoff_on_guix(root: &Path, state: &Path) -> Command {
    let mut c = support::sandoff();
    c.arg("--store-root")
        .arg(root)
        .args(["--daemon-store", "guix", "--state-dir"])
        .arg(root.join("sandoff"))
        .env("GUIX_STATE_DIRECTORY", state)
        .env_remove("SANDOFF_STORE_DIR");
    c
}

#[test]
fn a_guix_daemon_store_is_read_and_written_in_its_own_database() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let state = guix_daemon_state(&root);
    let file = tmp.path().join("hello.txt");
    fs::write(&file, "hello\n").expect("write");
    let out = support::run_ok(
        sandoff_on_guix(&root, &state)
            .args(["store", "add"])
            .arg(&file),
    );
    let path = String::from_utf8(out).expect("utf8").trim().to_owned();
    assert!(path.starts_with("/gnu/store/"), "{path}");
    // The row is in the daemon's database, in its format.
    let conn = rusqlite::Connection::open(state.join("db/db.sqlite")).expect("db");
    let hash: String = conn
        .query_row("select hash from ValidPaths where path = ?", [&path], |r| {
            r.get(0)
        })
        .expect("registered in guix-daemon's database");
    assert!(
        hash.starts_with("sha256:") && hash.len() == 7 + 64,
        "{hash}"
    );
    // And read back from it; nothing of sandoff's own registry exists.
    let info = support::run_ok(sandoff_on_guix(&root, &state).args(["store", "info", &path]));
    assert!(String::from_utf8_lossy(&info).contains(&path));
    support::run_ok(sandoff_on_guix(&root, &state).args(["store", "verify", &path]));
    assert!(
        !root.join("sandoff/db").exists(),
        "a second registry was made"
    );
    assert_eq!(fs::read(state.join("db/schema")).expect("schema"), b"7");
}

#[test]
fn a_missing_daemon_database_is_an_error_and_nothing_is_created() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let state = root.join("var/guix");
    let out = sandoff_on_guix(&root, &state)
        .args([
            "store",
            "info",
            "/gnu/store/00000000000000000000000000000000-x",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("never created"), "{err}");
    assert!(!state.exists(), "the daemon's state was created");
}

#[test]
fn a_nix_daemon_store_is_shared_with_nix_without_a_state_directory_of_its_own() {
    if !support::require(this_test!(), &[Need::Program("nix-store")]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let conf = tmp.path().join("conf");
    let a = tmp.path().join("from-nix.txt");
    fs::write(&a, "made by nix\n").expect("write");
    let by_nix = support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&root)
            .arg("--add")
            .arg(&a),
    );
    let by_nix = String::from_utf8(by_nix).expect("utf8").trim().to_owned();
    let sandoff = || {
        let mut c = support::sandoff();
        c.arg("--store-root")
            .arg(&root)
            .args(["--daemon-store", "nix", "--state-dir"])
            .arg(tmp.path().join("sandoff-state"))
            .env_remove("NIX_STATE_DIR")
            .env_remove("SANDOFF_STORE_DIR");
        c
    };
    // sandoff reads what Nix registered...
    let info = support::run_ok(sandoff().args(["store", "info", &by_nix]));
    assert!(String::from_utf8_lossy(&info).contains(&by_nix));
    // ...and Nix reads what sandoff registers.
    let b = tmp.path().join("from-sandoff.txt");
    fs::write(&b, "made by sandoff\n").expect("write");
    let by_sandoff = support::run_ok(sandoff().args(["store", "add"]).arg(&b));
    let by_sandoff = String::from_utf8(by_sandoff)
        .expect("utf8")
        .trim()
        .to_owned();
    let hash = support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&root)
            .args(["-q", "--hash", &by_sandoff]),
    );
    assert!(String::from_utf8_lossy(&hash).starts_with("sha256:"));
    assert!(!tmp.path().join("sandoff-state/db").exists());
}

#[test]
fn sandoff_builds_into_a_guix_daemon_store() {
    if !crate::build::ready(this_test!()) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let state = guix_daemon_state(&root);
    let cmd = || {
        let mut c = sandoff_on_guix(&root, &state);
        c.env_remove("SANDOFF_USER_POOL_DIR");
        c
    };
    let src = tmp.path().join("busybox");
    fs::create_dir_all(src.join("bin")).expect("mkdir");
    fs::copy("/bin/busybox", src.join("bin/busybox")).expect("busybox");
    let bb = support::run_ok(cmd().args(["store", "add"]).arg(&src));
    let bb = String::from_utf8(bb).expect("utf8").trim().to_owned();
    let builder = format!("{bb}/bin/busybox");
    let drv = support::derivation_add(
        &mut cmd(),
        &serde_json::json!({
            "outputs": {"out": {"path": ""}},
            "inputSrcs": [bb],
            "inputDrvs": {},
            "system": "x86_64-linux",
            "builder": builder,
            "args": ["sh", "-c", "echo built-in-a-guix-store > $out"],
            "env": {"name": "in-guix", "builder": builder, "system": "x86_64-linux", "out": ""},
        }),
    );
    let out = support::run_ok(cmd().args(["build", &drv]));
    let out = String::from_utf8(out).expect("utf8").trim().to_owned();
    assert!(out.starts_with("/gnu/store/"), "{out}");
    let conn = rusqlite::Connection::open(state.join("db/db.sqlite")).expect("db");
    let of_out = |sql: &str| -> rusqlite::types::Value {
        conn.query_row(sql, [&out], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    // Valid in guix-daemon's database, with its deriver and as an output.
    let deriver = of_out("select deriver from ValidPaths where path = ?");
    assert_eq!(deriver, rusqlite::types::Value::Text(drv));
    let outputs = of_out("select count(*) from DerivationOutputs where path = ?");
    assert_eq!(outputs, rusqlite::types::Value::Integer(1));
    assert!(!root.join("sandoff/db").exists());
}
