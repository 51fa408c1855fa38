//! The serve client (`remote::client`) over a local child process
//! (`ChildTransport`): against `sandoff serve --stdio --write`, against Nix
//! 2.8's `nix-store --serve --write` (including a real `BuildDerivation`),
//! and against programs that do not speak the protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sandoff::derivation::{
    hash_derivation_modulo, Derivation, DerivationOutput, DrvHasher, OutputName,
};
use sandoff::remote::client::{ClientError, ServeClient};
use sandoff::remote::transport::{ChildTransport, Transport};
use sandoff::serve_protocol::{
    read_basic_derivation, write_basic_derivation, BuildOptions, BuildResult, BuildStatus,
};
use sandoff::store::export::write_export;
use sandoff::store::local::LocalStore;
use sandoff::store::wire;
use sandoff::store::{FileIngestionMethod, HashAlgo, StoreDir, StorePath};

use crate::serve::{foo_baz, open};
use crate::support::{self, Need};
use crate::this_test;

/// Writes the export stream of `paths` (and nothing of their closure) from `src`.
fn export(src: &LocalStore, paths: &BTreeSet<StorePath>, w: &mut dyn std::io::Write) {
    let loc = src.location();
    let entries: Vec<_> = src
        .topo_sort(paths)
        .expect("topo sort")
        .into_iter()
        .map(|p| {
            let info = src.query_path_info(&p).unwrap().expect("valid");
            (info, loc.real_path(&p))
        })
        .collect();
    write_export(w, &loc.dir, entries.iter().map(|(i, p)| (i, p.as_path()))).expect("export");
}

/// Copies `paths` (dependencies first) from the server into `dst` with
/// `DumpStorePath` and `QueryPathInfos`, as a download would.
fn download(
    client: &mut ServeClient<ChildTransport>,
    dst: &LocalStore,
    paths: &BTreeSet<StorePath>,
) {
    let mut infos = client.query_path_infos(paths).expect("QueryPathInfos");
    assert_eq!(infos.len(), paths.len());
    infos.sort_by_key(|i| i.references.len());
    for info in infos {
        let staged = client
            .dump_store_path(&info.path, |r| dst.stage_nar(r))
            .expect("DumpStorePath")
            .expect("stage NAR");
        assert_eq!(staged.nar_hash, info.nar_hash);
        assert_eq!(staged.nar_size, info.nar_size);
        dst.commit_staged(staged, &info).expect("commit");
    }
}

/// Uploads `paths` (and nothing of their closure) from `src` with `ImportPaths`.
pub(crate) fn upload<T: Transport>(
    client: &mut ServeClient<T>,
    src: &LocalStore,
    paths: &BTreeSet<StorePath>,
) {
    client
        .import_paths(|w| {
            export(src, paths, w);
            Ok::<(), ()>(())
        })
        .expect("ImportPaths")
        .expect("export");
}

fn sandoff_serve(root: &Path) -> ChildTransport {
    let mut cmd = support::sandoff();
    cmd.args(["serve", "--stdio", "--write"])
        .env("SANDOFF_STORE_ROOT", root)
        .env_remove("SANDOFF_STORE_DIR")
        .env_remove("SANDOFF_STATE_DIR");
    ChildTransport::spawn(cmd).expect("spawn sandoff serve")
}

#[test]
fn client_against_sandoff_serve() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, top) = foo_baz(&tmp.path().join("src"));
    let both = BTreeSet::from([leaf.clone(), top.clone()]);
    let missing = StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap();

    let mut client =
        ServeClient::open(sandoff_serve(&tmp.path().join("root")), StoreDir::default())
            .expect("handshake");
    assert_eq!(client.minor(), 7);
    assert!(client
        .query_valid_paths(&both, false, false)
        .expect("QueryValidPaths")
        .is_empty());

    upload(&mut client, &src, &both);
    let mut asked = both.clone();
    asked.insert(missing.clone());
    assert_eq!(client.query_valid_paths(&asked, true, false).unwrap(), both);

    let infos = client.query_path_infos(&asked).expect("QueryPathInfos");
    assert_eq!(infos.len(), 2, "the missing path is left out");
    for info in &infos {
        let want = src.query_path_info(&info.path).unwrap().expect("valid");
        assert_eq!(info.nar_hash, want.nar_hash);
        assert_eq!(info.nar_size, want.nar_size);
        assert_eq!(info.references, want.references);
        // An export stream does not carry content addresses.
        assert_eq!(info.ca, None);
        assert_eq!(info.deriver, None);
    }

    assert_eq!(
        client
            .query_closure(&BTreeSet::from([top.clone()]), false)
            .expect("QueryClosure"),
        both
    );

    let dst = open(&tmp.path().join("dst"));
    download(&mut client, &dst, &both);
    assert!(dst.is_valid(&top).unwrap());
    assert_eq!(
        std::fs::read(dst.location().real_path(&top)).unwrap(),
        src.location().logical(&leaf).as_bytes()
    );

    // Importing again what is valid works while the first import's locks
    // may still be going (they go after its answer, on another thread).
    upload(&mut client, &src, &both);

    let status = client.into_transport().close().expect("close");
    assert!(status.success(), "sandoff serve exited with {status}");
    // Once the server is gone, so are the lock files it kept.
    let store_dir = tmp.path().join("root").join("nix/store");
    let locks: Vec<_> = std::fs::read_dir(&store_dir)
        .expect("store dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(locks.is_empty(), "left behind: {locks:?}");
}

#[test]
fn client_reports_a_server_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap();
    let mut client =
        ServeClient::open(sandoff_serve(&tmp.path().join("root")), StoreDir::default())
            .expect("handshake");
    // The server refuses to dump an invalid path and ends the session: the
    // error carries what it said on stderr.
    let err = client
        .dump_store_path(&missing, |r| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(r, &mut v).map(|_| v)
        })
        .expect_err("refused");
    match &err {
        ClientError::Refused { what, reason } => {
            assert_eq!(*what, "DumpStorePath");
            assert!(reason.contains("is not valid"), "{reason}");
        }
        e => panic!("wrong error: {e}"),
    }
    // The session is over.
    let err = client
        .query_valid_paths(&BTreeSet::from([missing]), false, false)
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Wire { .. } | ClientError::Refused { .. }),
        "{err}"
    );
    let status = client.into_transport().close().expect("close");
    assert!(!status.success());
}

/// `sh -c script` as the transport.
fn sh(script: &str) -> ChildTransport {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    ChildTransport::spawn(cmd).unwrap()
}

/// The error of a handshake with [`sh`] `script`, which must fail.
fn refused_by(script: &str) -> ClientError {
    ServeClient::open(sh(script), StoreDir::default())
        .err()
        .expect("refused")
}

#[test]
fn client_recognises_a_server_of_another_store_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gnu = StoreDir::new("/gnu/store").expect("store dir");
    let mut cmd = support::sandoff();
    cmd.args([
        "serve",
        "--stdio",
        "--write",
        "--expect-store-dir",
        "/gnu/store",
    ])
    .env("SANDOFF_STORE_ROOT", tmp.path())
    .env_remove("SANDOFF_STORE_DIR")
    .env_remove("SANDOFF_STATE_DIR");
    let err = ServeClient::open(ChildTransport::spawn(cmd).expect("spawn"), gnu.clone())
        .err()
        .expect("refused");
    match err {
        ClientError::StoreDir(m) => {
            assert_eq!(m.server, StoreDir::default());
            assert_eq!(m.client, gnu);
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn client_refuses_what_is_not_a_serve_server() {
    // A login banner where the magic should be.
    let err = refused_by("echo 'Welcome to host'; exec cat >/dev/null");
    match &err {
        ClientError::Handshake { got } => assert!(got.contains("Welcome to host"), "{got}"),
        e => panic!("wrong error: {e}"),
    }

    // A program that dies at once, saying why on stderr.
    let err = refused_by("echo 'nix-store: command not found' >&2; exit 127");
    match &err {
        ClientError::Handshake { got } => assert!(got.contains("command not found"), "{got}"),
        e => panic!("wrong error: {e}"),
    }

    // A program that never answers.
    let err = ServeClient::open_until(
        sh("exec sleep 1000"),
        StoreDir::default(),
        Some(Instant::now() + Duration::from_millis(300)),
    )
    .err()
    .expect("refused");
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err}");

    // The right magic, but protocol 3.7.
    let err = refused_by(
        r"printf '\313\356\122\124\000\000\000\000\007\003\000\000\000\000\000\000'; exec cat >/dev/null",
    );
    assert!(
        matches!(err, ClientError::Version { major: 3, minor: 7 }),
        "{err}"
    );
}

#[test]
fn child_transport_waits_and_times_out() {
    // Logs to stderr, then answers after a while.
    let mut t = sh("echo building >&2; sleep 1; echo done");
    let mut log = Vec::new();
    let err = t
        .wait_reply(&mut log, Some(Instant::now() + Duration::from_millis(200)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    t.wait_reply(&mut log, Some(Instant::now() + Duration::from_secs(300)))
        .expect("reply");
    assert_eq!(log, b"building\n");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut t, &mut out).unwrap();
    assert_eq!(out, "done\n");
    assert!(t.close().unwrap().success());

    // A server that is gone: EOF, not a hang.
    let mut cmd = Command::new("true");
    cmd.arg("ignored");
    let mut t = ChildTransport::spawn(cmd).unwrap();
    let err = t.wait_reply(&mut Vec::new(), None).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
}

/// A directory under `tmp` holding `bin/busybox`, a copy of the host's.
fn busybox_tree(tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join("in/busybox");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    dir
}

/// [`busybox_tree`] added to `store`.
fn add_busybox(store: &LocalStore, tmp: &Path) -> StorePath {
    store
        .add_path(
            &busybox_tree(tmp),
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
        )
        .expect("add busybox")
}

/// `nix-store --serve --write` on a chroot store under `tmp`.
fn nix_serve(tmp: &Path) -> ChildTransport {
    let mut cmd = support::nix_cmd("nix-store", &tmp.join("nixconf"));
    cmd.args(["--serve", "--write", "--store"])
        .arg(tmp.join("nix"));
    ChildTransport::spawn(cmd).expect("spawn nix-store --serve")
}

/// A deadline only a hang reaches.
fn far_deadline() -> Instant {
    Instant::now() + Duration::from_secs(300)
}

/// `BuildDerivation` of `drv` (whose one input is busybox at `bb`), its log
/// into `log`.
fn build_on(
    client: &mut ServeClient<ChildTransport>,
    drv: &Derivation,
    bb: &StorePath,
    log: &mut Vec<u8>,
    deadline: Option<Instant>,
) -> BuildResult {
    let dir = StoreDir::default();
    let drv_path = drv.drv_path(&dir).expect("drv path");
    client
        .build_derivation(
            &drv_path,
            drv,
            &BTreeSet::from([bb.clone()]),
            &BuildOptions::default(),
            log,
            deadline,
        )
        .expect("BuildDerivation")
}

/// What the tests against `nix-store --serve` need.
fn nix_ready(test: &str) -> bool {
    support::require_programs(test, &["nix-store", "/bin/busybox"])
}

/// [`nix_serve`] on a store that has been given busybox (whose path comes
/// back too) through the client.
fn nix_serve_with_busybox(tmp: &Path) -> (ServeClient<ChildTransport>, StorePath) {
    let src = open(&tmp.join("src"));
    let bb = add_busybox(&src, tmp);
    let mut client = ServeClient::open(nix_serve(tmp), StoreDir::default()).expect("handshake");
    upload(&mut client, &src, &BTreeSet::from([bb.clone()]));
    (client, bb)
}

/// The derivation `echo hi > $out`, run by busybox at `bb`, with its
/// output path computed.
fn hello_drv(dir: &StoreDir, bb: &StorePath) -> Derivation {
    let builder = format!("{}/bin/busybox", dir.display(bb)).into_bytes();
    let mut drv = Derivation {
        outputs: BTreeMap::from([(OutputName::out(), DerivationOutput::Deferred)]),
        input_sources: BTreeSet::from([bb.clone()]),
        system: b"x86_64-linux".to_vec(),
        builder: builder.clone(),
        args: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi > $out".to_vec()],
        env: BTreeMap::from([
            (b"builder".to_vec(), builder),
            (b"name".to_vec(), b"client-hello".to_vec()),
            (b"out".to_vec(), Vec::new()),
            (b"system".to_vec(), b"x86_64-linux".to_vec()),
        ]),
        ..Default::default()
    };
    fill_output_paths(&mut drv, dir);
    drv
}

/// Computes the output paths of `drv`, which has no input derivations.
fn fill_output_paths(drv: &mut Derivation, dir: &StoreDir) {
    let mut hasher = DrvHasher::new(dir.clone(), |p: &StorePath| {
        Err::<Derivation, _>(format!("no input derivation {p} here"))
    });
    drv.fill_output_paths(&mut hasher).expect("output paths");
}

/// [`hello_drv`] named `name`, failing with "failing on purpose" on stderr.
fn failing_drv(dir: &StoreDir, bb: &StorePath, name: &str) -> Derivation {
    let mut drv = hello_drv(dir, bb);
    drv.args[2] = b"echo failing on purpose >&2; exit 3".to_vec();
    drv.env.insert(b"name".to_vec(), name.as_bytes().to_vec());
    drv.env.insert(b"out".to_vec(), Vec::new());
    drv.outputs
        .insert(OutputName::out(), DerivationOutput::Deferred);
    fill_output_paths(&mut drv, dir);
    drv
}

#[test]
fn client_against_nix_serve() {
    if !nix_ready(this_test!()) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, top) = foo_baz(&tmp.path().join("src"));
    let bb = add_busybox(&src, tmp.path());
    let dir = StoreDir::default();

    let mut client = ServeClient::open(nix_serve(tmp.path()), dir.clone()).expect("handshake");
    assert!(client.minor() >= 6, "Nix 2.8 speaks 2.6 or later");

    let all = BTreeSet::from([leaf.clone(), top.clone(), bb.clone()]);
    assert!(client
        .query_valid_paths(&all, false, false)
        .unwrap()
        .is_empty());
    upload(&mut client, &src, &all);
    assert_eq!(client.query_valid_paths(&all, false, false).unwrap(), all);

    let infos = client.query_path_infos(&all).expect("QueryPathInfos");
    assert_eq!(infos.len(), 3);
    for info in &infos {
        let want = src.query_path_info(&info.path).unwrap().expect("valid");
        assert_eq!(info.nar_hash, want.nar_hash, "{}", info.path);
        assert_eq!(info.nar_size, want.nar_size);
        assert_eq!(info.references, want.references);
    }
    assert_eq!(
        client
            .query_closure(&BTreeSet::from([top.clone()]), false)
            .unwrap(),
        BTreeSet::from([leaf.clone(), top.clone()])
    );
    let dst = open(&tmp.path().join("dst"));
    download(
        &mut client,
        &dst,
        &BTreeSet::from([leaf.clone(), top.clone()]),
    );

    // Build on Nix: the derivation travels as a BasicDerivation, the .drv
    // itself is never uploaded.
    let drv = hello_drv(&dir, &bb);
    let out = drv.output_paths()["out"].clone();
    let mut log = Vec::new();
    let result = build_on(&mut client, &drv, &bb, &mut log, Some(far_deadline()));
    assert_eq!(
        result.status,
        BuildStatus::Built,
        "{}; log: {}",
        result.error_msg,
        String::from_utf8_lossy(&log)
    );
    assert!(result.times_built <= 1);
    assert!(result.stop_time >= result.start_time);
    // Nix 2.8 reports the realisation even for an input-addressed output.
    assert_eq!(
        result.built_outputs,
        BTreeMap::from([("out".to_owned(), out.clone())])
    );
    assert!(client
        .query_valid_paths(&BTreeSet::from([out.clone()]), false, false)
        .unwrap()
        .contains(&out));
    download(&mut client, &dst, &BTreeSet::from([out.clone()]));
    assert_eq!(
        std::fs::read(dst.location().real_path(&out)).unwrap(),
        b"hi\n"
    );

    // Building it again: already valid.
    let again = build_on(&mut client, &drv, &bb, &mut log, None);
    assert!(again.status.is_success(), "{:?}", again.status);

    let status = client.into_transport().close().expect("close");
    assert!(status.success(), "nix-store --serve exited with {status}");
}

#[test]
fn client_reads_a_failed_nix_build() {
    if !nix_ready(this_test!()) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut client, bb) = nix_serve_with_busybox(tmp.path());
    let dir = StoreDir::default();
    let drv = failing_drv(&dir, &bb, "client-hello");
    let mut log = Vec::new();
    let result = build_on(&mut client, &drv, &bb, &mut log, Some(far_deadline()));
    assert!(!result.status.is_success(), "{:?}", result.status);
    assert!(result.built_outputs.is_empty());
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("failing on purpose"), "log: {log}");
    // The session goes on after a failed build.
    assert!(client
        .query_valid_paths(
            &BTreeSet::from([drv.output_paths()["out"].clone()]),
            false,
            false
        )
        .unwrap()
        .is_empty());
}

/// Records what is read through it.
struct Recorder<'a> {
    inner: &'a mut dyn std::io::Read,
    seen: Vec<u8>,
}

impl std::io::Read for Recorder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// The server side's `BuildResult::write` must produce what Nix 2.8 sends:
/// a raw `BuildDerivation` to Nix, its reply recorded, read back with
/// `BuildResult::read` and written again with the drv's masked modulo hash.
#[test]
fn build_result_bytes_match_nix() {
    if !nix_ready(this_test!()) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (client, bb) = nix_serve_with_busybox(tmp.path());
    let dir = StoreDir::default();
    assert_eq!(client.minor(), 7);
    let drv = hello_drv(&dir, &bb);
    let drv_path = drv.drv_path(&dir).unwrap();
    let mut t = client.into_transport();
    wire::write_u64(&mut t, 8).unwrap();
    wire::write_bytes(&mut t, dir.display(&drv_path).as_bytes()).unwrap();
    write_basic_derivation(&mut t, &dir, &drv, &BTreeSet::from([bb])).unwrap();
    BuildOptions::default().write(&mut t, 7).unwrap();
    std::io::Write::flush(&mut t).unwrap();
    let mut log = Vec::new();
    t.wait_reply(&mut log, Some(far_deadline())).expect("reply");
    let mut rec = Recorder {
        inner: &mut t,
        seen: Vec::new(),
    };
    let result = BuildResult::read(&mut rec, 7, &dir).expect("BuildResult");
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    let hashes = hash_derivation_modulo(&drv, &dir, true, |p: &StorePath| {
        Err::<Derivation, _>(format!("no input derivation {p} here"))
    })
    .expect("modulo hash");
    let drv_hash = hashes.hashes[&OutputName::out()].to_base16_prefixed();
    let mut ours = Vec::new();
    result.write(&mut ours, 7, &dir, &drv_hash).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&rec.seen)
    );
    assert_eq!(ours, rec.seen);
    assert!(t.close().unwrap().success());
}

#[test]
fn client_build_paths_on_nix() {
    if !nix_ready(this_test!()) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = open(&tmp.path().join("src"));
    let bb = add_busybox(&src, tmp.path());
    let dir = StoreDir::default();
    // Two .drv files in the source store: one that builds, one that fails.
    let good = hello_drv(&dir, &bb);
    let bad = failing_drv(&dir, &bb, "client-fails");
    let mut drv_paths = Vec::new();
    for d in [&good, &bad] {
        let name = format!("{}.drv", d.env_name().unwrap());
        let p = src
            .add_text(&name, &d.to_aterm(&dir), &d.references(), &d.output_paths())
            .expect("add .drv");
        assert_eq!(p, d.drv_path(&dir).unwrap());
        drv_paths.push(p);
    }

    let mut client = ServeClient::open(nix_serve(tmp.path()), dir.clone()).expect("handshake");
    let mut to_upload: BTreeSet<StorePath> = drv_paths.iter().cloned().collect();
    to_upload.insert(bb.clone());
    upload(&mut client, &src, &to_upload);

    let mut log = Vec::new();
    let deadline = Some(far_deadline());
    client
        .build_paths(
            &drv_paths[..1],
            &BuildOptions::default(),
            &mut log,
            deadline,
        )
        .expect("BuildPaths")
        .unwrap_or_else(|(status, msg)| panic!("build failed ({status}): {msg}"));
    let out = good.output_paths()["out"].clone();
    assert!(client
        .query_valid_paths(&BTreeSet::from([out.clone()]), false, false)
        .unwrap()
        .contains(&out));

    let (status, msg) = client
        .build_paths(
            &drv_paths[1..],
            &BuildOptions::default(),
            &mut log,
            deadline,
        )
        .expect("BuildPaths")
        .expect_err("the build fails");
    assert_ne!(status, 0);
    assert!(msg.contains("client-fails"), "{msg}");
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("failing on purpose"), "log: {log}");

    // The session goes on.
    assert!(client
        .query_valid_paths(&BTreeSet::from([out.clone()]), false, false)
        .unwrap()
        .contains(&out));
    assert!(client.into_transport().close().unwrap().success());
}

/// What Nix 2.8's own client sends for `BuildDerivation` is read by
/// `read_basic_derivation` and `BuildOptions::read`, and written back to the
/// same bytes. The request is recorded from a real remote build: Nix's
/// build hook, with `ssh://localhost` (which Nix 2.8 runs through `bash -c`,
/// no sshd), runs a wrapper that tees its stdin into a file and execs
/// `nix-store --serve --write` on a second chroot store.
#[test]
fn basic_derivation_bytes_match_nix() {
    if !support::require(
        this_test!(),
        &[
            Need::Program("nix-store"),
            Need::Program("nix-instantiate"),
            Need::Program("nix"),
            Need::Program("bash"),
            Need::Program("tee"),
            Need::Program("/bin/busybox"),
        ],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("nixconf");
    let src = tmp.path().join("src");
    let bb_dir = busybox_tree(tmp.path());
    let bb = String::from_utf8(support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&src)
            .arg("--add")
            .arg(&bb_dir),
    ))
    .unwrap()
    .trim()
    .to_owned();
    let rec = tmp.path().join("request");
    let wrapper = tmp.path().join("remote-program");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ntee '{}' | exec nix-store --serve --write --store '{}'\n",
            rec.display(),
            tmp.path().join("dst").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let expr = format!(
        r#"derivation {{ name = "rec"; system = "x86_64-linux"; builder = "${{builtins.storePath {bb}}}/bin/busybox"; args = ["sh" "-c" "echo hi > $out"]; }}"#
    );
    let drv_full = String::from_utf8(support::run_ok(
        support::nix_cmd("nix-instantiate", &conf)
            .arg("--store")
            .arg(&src)
            .args(["-E", &expr]),
    ))
    .unwrap()
    .trim()
    .to_owned();
    support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&src)
            .args(["--realise", &drv_full, "--max-jobs", "0", "--builders"])
            .arg(format!(
                "ssh://localhost?remote-program={} x86_64-linux",
                wrapper.display()
            )),
    );

    // Walk the recorded requests up to BuildDerivation.
    let dir = StoreDir::default();
    let bytes = std::fs::read(&rec).expect("recorded request");
    let r = &mut &bytes[..];
    assert_eq!(wire::read_u64(r).unwrap(), 0x390c_9deb);
    let minor = wire::read_u64(r).unwrap() & 0xff;
    assert_eq!(minor, 7, "Nix 2.8 offers 2.7");
    loop {
        match wire::read_u64(r).expect("a command") {
            1 => {
                wire::read_u64(r).unwrap();
                wire::read_u64(r).unwrap();
                wire::read_strings(r, 1000, 4096).unwrap();
            }
            2 => {
                wire::read_strings(r, 1000, 4096).unwrap();
            }
            9 => {
                for _ in 0..3 {
                    wire::read_string(r, 4096).unwrap();
                }
                wire::read_strings(r, 1000, 4096).unwrap();
                wire::read_u64(r).unwrap();
                let nar_size = wire::read_u64(r).unwrap();
                wire::read_u64(r).unwrap();
                wire::read_strings(r, 1000, 4096).unwrap();
                wire::read_string(r, 4096).unwrap();
                *r = &r[usize::try_from(nar_size).unwrap()..];
            }
            8 => break,
            c => panic!("unexpected command {c} before BuildDerivation"),
        }
    }
    assert_eq!(wire::read_string(r, 4096).unwrap(), drv_full);
    let drv_path = dir.parse_path(&drv_full).unwrap();

    let start = *r;
    let drv = read_basic_derivation(r, &dir, drv_path.name().trim_end_matches(".drv"))
        .expect("Nix's BasicDerivation reads");
    let nix_bytes = &start[..start.len() - r.len()];
    let mut ours = Vec::new();
    write_basic_derivation(&mut ours, &dir, &drv, &drv.input_sources).unwrap();
    assert_eq!(ours, nix_bytes);
    // It is the .drv less its input derivations (there are none here).
    let aterm = std::fs::read(src.join(drv_full.trim_start_matches('/'))).expect("read .drv");
    assert_eq!(drv, Derivation::from_aterm(&aterm, &dir).unwrap());

    let start = *r;
    let options = BuildOptions::read(r, minor).expect("options");
    let nix_bytes = &start[..start.len() - r.len()];
    let mut ours = Vec::new();
    options.write(&mut ours, minor).unwrap();
    assert_eq!(ours, nix_bytes);
}

/// A server that never answers: keeps what the client sent.
#[derive(Default)]
struct Silent {
    sent: Vec<u8>,
}

impl std::io::Read for Silent {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl std::io::Write for Silent {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Transport for Silent {
    fn wait_reply(
        &mut self,
        _: &mut dyn std::io::Write,
        _: Option<Instant>,
    ) -> std::io::Result<()> {
        Err(std::io::ErrorKind::UnexpectedEof.into())
    }
    fn drain_log(&mut self, _: &mut dyn std::io::Write) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_query_goes_out_with_the_greeting_before_any_reply() {
    let paths = BTreeSet::from([
        StorePath::from_base_name("00000000000000000000000000000000-a").unwrap(),
        StorePath::from_base_name("11111111111111111111111111111111-b").unwrap(),
    ]);
    let mut hello = ServeClient::hello(Silent::default(), StoreDir::default());
    hello.query_valid_paths(&paths, true, false);
    // Greeting (magic, version 2.7), then QueryValidPaths (1), lock,
    // substitute and the paths: all sent, nothing read yet.
    let mut want = Vec::new();
    for n in [0x390c_9deb_u64, 0x207, 1, 1, 0] {
        wire::write_u64(&mut want, n).unwrap();
    }
    wire::write_strings(
        &mut want,
        paths.iter().map(|p| StoreDir::default().display(p)),
    )
    .unwrap();
    assert_eq!(hello.transport().sent, want);
    // The server said nothing: the greeting's failure is the error.
    let err = hello.greeted(None).err().expect("no greeting");
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
}

/// A query sent with the greeting, then the session used as usual: the
/// answers arrive in order and the session stays in step.
fn query_with_greeting(server: ChildTransport, tmp: &Path) {
    let (src, leaf, top) = foo_baz(&tmp.join("src"));
    let both = BTreeSet::from([leaf.clone(), top.clone()]);
    let mut hello = ServeClient::hello(server, StoreDir::default());
    hello.query_valid_paths(&both, false, false);
    let mut client = hello.greeted(Some(far_deadline())).expect("handshake");
    assert!(client.minor() >= 6);
    assert!(client.valid_paths_answer().expect("answer").is_empty());
    upload(&mut client, &src, &both);
    assert_eq!(client.query_valid_paths(&both, false, false).unwrap(), both);
}

#[test]
fn a_query_sent_with_the_greeting_is_answered_by_sandoff_serve() {
    let tmp = tempfile::tempdir().expect("tempdir");
    query_with_greeting(sandoff_serve(&tmp.path().join("root")), tmp.path());
}

#[test]
fn a_query_sent_with_the_greeting_is_answered_by_nix_serve() {
    if !support::require_programs(this_test!(), &["nix-store"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    query_with_greeting(nix_serve(tmp.path()), tmp.path());
}
