//! The serve protocol server (`sandoff serve --stdio`): driven in-process
//! with scripted client bytes, and end to end by Nix 2.8's `ssh://` store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sandoff::offload::serve::{
    serve, ServeError, ServeOptions, SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION,
};
use sandoff::store::export::write_export;
use sandoff::store::local::LocalStore;
use sandoff::store::wire;
use sandoff::store::{nar, StoreLocation, StorePath};

use crate::support::{self, Need};

fn open(root: &Path) -> LocalStore {
    LocalStore::open(StoreLocation::new(Default::default(), root.to_owned())).expect("open store")
}

/// A store with `leaf` ("bar") and `top`, which refers to `leaf`.
fn foo_baz(root: &Path) -> (LocalStore, StorePath, StorePath) {
    let store = open(root);
    let leaf = store
        .add_text("foo", b"bar", &BTreeSet::new(), &BTreeMap::new())
        .expect("add foo");
    let refs = BTreeSet::from([leaf.clone()]);
    let content = store.location().logical(&leaf);
    let top = store
        .add_text("baz", content.as_bytes(), &refs, &BTreeMap::new())
        .expect("add baz");
    (store, leaf, top)
}

/// Runs one session whose client sends the handshake (version 2.7) then `body`.
fn session(store: &LocalStore, write: bool, body: &[u8]) -> (Result<(), ServeError>, Vec<u8>) {
    let mut input = Vec::new();
    wire::write_u64(&mut input, SERVE_MAGIC_1).expect("vec");
    wire::write_u64(&mut input, 0x207).expect("vec");
    input.extend_from_slice(body);
    let mut output = Vec::new();
    let res = serve(store, &mut &input[..], &mut output, ServeOptions { write });
    (res, output)
}

/// Checks and strips the server's half of the handshake.
fn after_handshake(out: &[u8]) -> &[u8] {
    let mut r = out;
    assert_eq!(wire::read_u64(&mut r).expect("magic"), SERVE_MAGIC_2);
    assert_eq!(
        wire::read_u64(&mut r).expect("version"),
        SERVE_PROTOCOL_VERSION
    );
    r
}

fn paths(store: &LocalStore, ps: &[&StorePath]) -> Vec<String> {
    ps.iter().map(|p| store.location().logical(p)).collect()
}

fn read_set(r: &mut &[u8]) -> Vec<String> {
    wire::read_strings(r, 100, 4096).expect("path set")
}

#[test]
fn serve_queries_and_dumps() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, leaf, top) = foo_baz(&tmp.path().join("a"));
    let missing = "/nix/store/00000000000000000000000000000000-missing".to_owned();
    let mut body = Vec::new();
    // QueryValidPaths lock=0 substitute=0 {top, missing}
    wire::write_u64(&mut body, 1).unwrap();
    wire::write_u64(&mut body, 0).unwrap();
    wire::write_u64(&mut body, 0).unwrap();
    let mut asked = paths(&store, &[&top]);
    asked.push(missing.clone());
    wire::write_strings(&mut body, &asked).unwrap();
    // QueryPathInfos {top, missing}
    wire::write_u64(&mut body, 2).unwrap();
    wire::write_strings(&mut body, &asked).unwrap();
    // QueryClosure includeOutputs=0 {top}
    wire::write_u64(&mut body, 7).unwrap();
    wire::write_u64(&mut body, 0).unwrap();
    wire::write_strings(&mut body, paths(&store, &[&top])).unwrap();
    // DumpStorePath top
    wire::write_u64(&mut body, 3).unwrap();
    wire::write_bytes(&mut body, store.location().logical(&top).as_bytes()).unwrap();

    let (res, out) = session(&store, false, &body);
    res.expect("session");
    let mut r = after_handshake(&out);
    assert_eq!(read_set(&mut r), paths(&store, &[&top]));

    let info = store.query_path_info(&top).unwrap().expect("baz valid");
    assert_eq!(
        wire::read_string(&mut r, 4096).unwrap(),
        store.location().logical(&top)
    );
    assert_eq!(wire::read_string(&mut r, 4096).unwrap(), ""); // deriver
    assert_eq!(read_set(&mut r), paths(&store, &[&leaf]));
    assert_eq!(wire::read_u64(&mut r).unwrap(), info.nar_size); // downloadSize
    assert_eq!(wire::read_u64(&mut r).unwrap(), info.nar_size);
    assert_eq!(
        wire::read_string(&mut r, 4096).unwrap(),
        info.nar_hash.to_nix32_prefixed()
    );
    let ca = wire::read_string(&mut r, 4096).unwrap();
    assert!(ca.starts_with("text:sha256:"), "ca {ca}");
    assert!(read_set(&mut r).is_empty()); // sigs
    assert_eq!(wire::read_string(&mut r, 4096).unwrap(), ""); // end of infos

    let mut closure = read_set(&mut r);
    closure.sort_by(|a, b| a[11..].cmp(&b[11..]));
    let mut expected = paths(&store, &[&leaf, &top]);
    expected.sort_by(|a, b| a[11..].cmp(&b[11..]));
    assert_eq!(closure, expected);

    let mut nar_bytes = Vec::new();
    nar::dump(&store.location().real_path(&top), &mut nar_bytes).unwrap();
    assert_eq!(r, &nar_bytes[..]);
}

/// The AddToStoreNar request of `path` from `src`, with `nar` as its NAR.
fn add_to_store_nar(
    src: &LocalStore,
    path: &StorePath,
    nar_size: u64,
    nar_bytes: &[u8],
) -> Vec<u8> {
    let info = src.query_path_info(path).unwrap().expect("valid");
    let loc = src.location();
    let mut body = Vec::new();
    wire::write_u64(&mut body, 9).unwrap();
    wire::write_bytes(&mut body, loc.logical(path).as_bytes()).unwrap();
    wire::write_bytes(&mut body, b"").unwrap();
    wire::write_bytes(&mut body, info.nar_hash.to_base16().as_bytes()).unwrap();
    wire::write_strings(&mut body, info.references.iter().map(|r| loc.logical(r))).unwrap();
    wire::write_u64(&mut body, 1234).unwrap();
    wire::write_u64(&mut body, nar_size).unwrap();
    wire::write_u64(&mut body, 0).unwrap();
    wire::write_strings(&mut body, Vec::<String>::new()).unwrap();
    let ca = info.ca.map(|c| c.to_string()).unwrap_or_default();
    wire::write_bytes(&mut body, ca.as_bytes()).unwrap();
    body.extend_from_slice(nar_bytes);
    body
}

fn dump(store: &LocalStore, path: &StorePath) -> Vec<u8> {
    let mut v = Vec::new();
    nar::dump(&store.location().real_path(path), &mut v).unwrap();
    v
}

#[test]
fn serve_add_to_store_nar() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, top) = foo_baz(&tmp.path().join("a"));
    let dst = open(&tmp.path().join("b"));
    let mut body = Vec::new();
    for p in [&leaf, &top] {
        let n = dump(&src, p);
        body.extend(add_to_store_nar(&src, p, n.len() as u64, &n));
    }

    // Without --write: refused, nothing added.
    let (res, _) = session(&dst, false, &body);
    assert!(matches!(res, Err(ServeError::ReadOnly { .. })), "{res:?}");
    assert!(!dst.is_valid(&leaf).unwrap());

    let (res, out) = session(&dst, true, &body);
    res.expect("session");
    let mut r = after_handshake(&out);
    assert_eq!(wire::read_u64(&mut r).unwrap(), 1);
    assert_eq!(wire::read_u64(&mut r).unwrap(), 1);
    assert!(r.is_empty());
    let got = dst.query_path_info(&top).unwrap().expect("baz valid");
    let want = src.query_path_info(&top).unwrap().expect("baz valid");
    assert_eq!(got.nar_hash, want.nar_hash);
    assert_eq!(got.references, want.references);
    assert_eq!(got.registration_time, 1234);

    // Again: already valid, the NAR is skipped and the stream stays in step.
    let (res, out) = session(&dst, true, &body);
    res.expect("second session");
    assert_eq!(after_handshake(&out).len(), 16);
}

#[test]
fn serve_add_to_store_nar_short_nar_adds_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, _) = foo_baz(&tmp.path().join("a"));
    let dst = open(&tmp.path().join("b"));
    let n = dump(&src, &leaf);
    // Announce more than is sent: the stream ends inside the NAR.
    let body = add_to_store_nar(&src, &leaf, n.len() as u64 + 8, &n);
    let (res, _) = session(&dst, true, &body);
    assert!(res.is_err());
    assert!(!dst.is_valid(&leaf).unwrap());
    // Announce less than the NAR: it is cut short and refused.
    let body = add_to_store_nar(&src, &leaf, n.len() as u64 - 8, &n);
    let (res, _) = session(&dst, true, &body);
    assert!(res.is_err());
    assert!(!dst.is_valid(&leaf).unwrap());
}

#[test]
fn serve_import_paths() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, top) = foo_baz(&tmp.path().join("a"));
    let dst = open(&tmp.path().join("b"));
    let infos: Vec<_> = [&leaf, &top]
        .iter()
        .map(|p| {
            (
                src.query_path_info(p).unwrap().expect("valid"),
                src.location().real_path(p),
            )
        })
        .collect();
    let mut body = Vec::new();
    wire::write_u64(&mut body, 4).unwrap();
    write_export(
        &mut body,
        &src.location().dir,
        infos.iter().map(|(i, p)| (i, p.as_path())),
    )
    .unwrap();
    let (res, out) = session(&dst, true, &body);
    res.expect("session");
    assert_eq!(after_handshake(&out), 1u64.to_le_bytes());
    assert!(dst.is_valid(&top).unwrap());
}

#[test]
fn serve_refuses_bad_input() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _, _) = foo_baz(&tmp.path().join("a"));
    // Wrong magic.
    let mut out = Vec::new();
    let res = serve(
        &store,
        &mut &[0u8; 16][..],
        &mut out,
        ServeOptions::default(),
    );
    assert!(
        matches!(res, Err(ServeError::BadMagic { got: 0 })),
        "{res:?}"
    );
    assert!(out.is_empty());
    // A path outside the store.
    let mut body = Vec::new();
    wire::write_u64(&mut body, 3).unwrap();
    wire::write_bytes(&mut body, b"/etc/passwd").unwrap();
    let (res, _) = session(&store, false, &body);
    assert!(matches!(res, Err(ServeError::BadPath(_))), "{res:?}");
    // Building is not supported yet; unknown commands are errors.
    let (res, _) = session(&store, false, &6u64.to_le_bytes());
    assert!(
        matches!(res, Err(ServeError::Unsupported { .. })),
        "{res:?}"
    );
    let (res, _) = session(&store, false, &42u64.to_le_bytes());
    assert!(
        matches!(res, Err(ServeError::UnknownCommand(42))),
        "{res:?}"
    );
    // A command cut short.
    let (res, _) = session(&store, false, &[1, 0, 0]);
    assert!(res.is_err());
}

/// `nix path-info --json` narHash (SRI) of `path` in Nix's chroot store `store`.
fn nix_nar_hash(conf: &Path, store: &Path, path: &str) -> String {
    let out = support::run_ok(
        support::nix_cmd("nix", conf)
            .arg("--store")
            .arg(store)
            .args(["path-info", "--json", path]),
    );
    let json: serde_json::Value = serde_json::from_slice(&out).expect("path-info json");
    json[0]["narHash"].as_str().expect("narHash").to_owned()
}

/// Nix 2.8 copies to and from sandoff's store through its `ssh://` store.
///
/// No sshd is involved: for the host `localhost`, Nix 2.8's `SSHMaster`
/// runs the remote command with `bash -c` instead of ssh (`fakeSSH`), so
/// `remote-program=<wrapper>` runs `<wrapper> --serve --write` right here.
/// The tests through a real sshd come with issue 5's test hosts.
#[test]
fn serve_nix_copy_to_and_from() {
    if !support::require(
        "serve_nix_copy_to_and_from",
        &[Need::Program("nix"), Need::Program("bash")],
    ) {
        return;
    }
    const BAZ: &str = "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz";
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("nixconf");
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let back = tmp.path().join("back");
    let out = support::run_ok(
        support::nix_cmd("nix-instantiate", &conf)
            .arg("--store")
            .arg(&src)
            .args([
                "--read-write-mode",
                "--eval",
                "-E",
                r#"let foo = builtins.toFile "foo" "bar"; in builtins.toFile "baz" "${foo}""#,
            ]),
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), format!("\"{BAZ}\""));

    // Nix appends `--serve --write`; the wrapper drops them.
    let wrapper = tmp.path().join("remote-program");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --store-root '{}' serve --stdio --write\n",
            env!("CARGO_BIN_EXE_sandoff"),
            dst.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod wrapper");
    let remote = format!("ssh://localhost?remote-program={}", wrapper.display());

    support::run_ok(
        support::nix_cmd("nix", &conf)
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR")
            .arg("--store")
            .arg(&src)
            .args(["copy", "--to", &remote, BAZ]),
    );
    let store = open(&dst);
    let top = store.location().dir.parse_path(BAZ).expect("path");
    let info = store.query_path_info(&top).unwrap().expect("baz copied");
    assert_eq!(info.references.len(), 1);
    for r in &info.references {
        assert!(store.is_valid(r).unwrap(), "reference copied too");
    }
    assert_eq!(info.nar_hash.to_sri(), nix_nar_hash(&conf, &src, BAZ));
    drop(store);

    support::run_ok(
        support::nix_cmd("nix", &conf)
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR")
            .args(["copy", "--no-check-sigs", "--from", &remote, "--to"])
            .arg(&back)
            .arg(BAZ),
    );
    assert_eq!(
        nix_nar_hash(&conf, &back, BAZ),
        nix_nar_hash(&conf, &src, BAZ)
    );
}

/// Clients before 2.4 get no narHash, ca or sigs in QueryPathInfos.
#[test]
fn serve_path_infos_for_old_clients() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, leaf, _) = foo_baz(&tmp.path().join("a"));
    let mut input = Vec::new();
    for n in [SERVE_MAGIC_1, 0x203, 2] {
        wire::write_u64(&mut input, n).unwrap();
    }
    wire::write_strings(&mut input, paths(&store, &[&leaf])).unwrap();
    let mut output = Vec::new();
    serve(
        &store,
        &mut &input[..],
        &mut output,
        ServeOptions::default(),
    )
    .expect("session");
    let mut r = after_handshake(&output);
    let info = store.query_path_info(&leaf).unwrap().expect("valid");
    assert_eq!(
        wire::read_string(&mut r, 4096).unwrap(),
        store.location().logical(&leaf)
    );
    assert_eq!(wire::read_string(&mut r, 4096).unwrap(), "");
    assert!(read_set(&mut r).is_empty());
    assert_eq!(wire::read_u64(&mut r).unwrap(), info.nar_size);
    assert_eq!(wire::read_u64(&mut r).unwrap(), info.nar_size);
    assert_eq!(wire::read_string(&mut r, 4096).unwrap(), "");
    assert!(r.is_empty());
}

/// Nix 2.8 copies a closure over real ssh, through a test host's sshd, into
/// the store root that sshd gives the session (`SANDOFF_STORE_ROOT`).
#[test]
fn serve_over_real_sshd_with_nix_copy() {
    let mut needs = crate::hosts::NEEDS.to_vec();
    needs.push(Need::Program("nix"));
    if !support::require("serve_over_real_sshd_with_nix_copy", &needs) {
        return;
    }
    const BAZ: &str = "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz";
    let host = crate::hosts::TestHost::start(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("nixconf");
    let src = tmp.path().join("src");
    support::run_ok(
        support::nix_cmd("nix-instantiate", &conf)
            .arg("--store")
            .arg(&src)
            .args([
                "--read-write-mode",
                "--eval",
                "-E",
                r#"let foo = builtins.toFile "foo" "bar"; in builtins.toFile "baz" "${foo}""#,
            ]),
    );
    let remote = format!(
        "ssh://root@{}?remote-program={}",
        host.addr,
        host.serve_program().display()
    );
    support::run_ok(
        support::nix_cmd("nix", &conf)
            .env("NIX_SSHOPTS", host.ssh_opts().join(" "))
            .arg("--store")
            .arg(&src)
            .args(["copy", "--to", &remote, BAZ]),
    );
    let out = support::run_ok(
        support::sandoff()
            .arg("--store-root")
            .arg(host.root())
            .args(["store", "info", "--json", BAZ]),
    );
    let json: serde_json::Value = serde_json::from_slice(&out).expect("info json");
    assert_eq!(json[0]["path"], BAZ);
    assert_eq!(
        json[0]["narHash"].as_str().expect("narHash"),
        nix_nar_hash(&conf, &src, BAZ)
    );
    assert_eq!(json[0]["references"].as_array().expect("refs").len(), 1);
}
