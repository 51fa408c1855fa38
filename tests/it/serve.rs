//! The serve protocol server (`sandoff serve --stdio`): driven in-process
//! with scripted client bytes, and end to end by Nix 2.8's `ssh://` store.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sandoff::derivation::{Derivation, DerivationOutput, OutputName};
use sandoff::serve::{
    serve, ServeError, ServeOptions, SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION,
};
use sandoff::serve_protocol::{write_basic_derivation, BuildOptions, BuildResult, BuildStatus};
use sandoff::store::export::write_export;
use sandoff::store::keyring::Keyring;
use sandoff::store::local::LocalStore;
use sandoff::store::signature::SecretKey;
use sandoff::store::wire;
use sandoff::store::{nar, StoreDir, StoreLocation, StorePath};
use serde_json::json;

use crate::build::ready as build_ready;
use crate::support::{self, Need};
use crate::this_test;

/// The sandoff store under `root` (created if need be).
pub(crate) fn open(root: &Path) -> LocalStore {
    sandoff::derivation::check::open_store(StoreLocation::new(Default::default(), root.to_owned()))
        .expect("open store")
}

/// A store with `leaf` ("bar") and `top`, which refers to `leaf`.
pub(crate) fn foo_baz(root: &Path) -> (LocalStore, StorePath, StorePath) {
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
    let res = serve(
        store,
        &mut &input[..],
        &mut output,
        ServeOptions {
            write,
            ..Default::default()
        },
    );
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
    // Building needs --write (as Nix); unknown commands are errors.
    for command in [6u64, 8] {
        let (res, _) = session(&store, false, &command.to_le_bytes());
        assert!(
            matches!(res, Err(ServeError::BuildNotAllowed { .. })),
            "{res:?}"
        );
    }
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
/// Through a real sshd (Nix's own ssh, not `fakeSSH`) is
/// [`serve_over_real_sshd_with_nix_copy`], which needs the test hosts.
#[test]
fn serve_nix_copy_to_and_from() {
    if !support::require_programs(this_test!(), &["nix", "bash"]) {
        return;
    }
    const BAZ: &str = support::NIX_BAZ;
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("nixconf");
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let back = tmp.path().join("back");
    support::nix_foo_baz(&conf, &src);

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
    if !support::require(this_test!(), &needs) {
        return;
    }
    const BAZ: &str = support::NIX_BAZ;
    let host = crate::hosts::TestHost::start(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("nixconf");
    let src = tmp.path().join("src");
    support::nix_foo_baz(&conf, &src);
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

// ---- Building: BuildDerivation and BuildPaths against `sandoff serve --stdio --write`.

/// A server's store under a temporary directory, with busybox and a
/// signing key in it.
struct BuildStore {
    tmp: tempfile::TempDir,
    bb: StorePath,
    key: SecretKey,
}

impl BuildStore {
    /// A new store, if the machine can build (see [`build_ready`]).
    fn ready(test: &str) -> Option<BuildStore> {
        build_ready(test).then(BuildStore::new)
    }

    /// The inputs of every derivation of [`BuildStore::drv`]: busybox.
    fn inputs(&self) -> BTreeSet<StorePath> {
        BTreeSet::from([self.bb.clone()])
    }

    fn new() -> BuildStore {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src/busybox/bin");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::copy("/bin/busybox", src.join("busybox")).expect("copy busybox");
        let key = SecretKey::generate("server-1").expect("key");
        let mut s = BuildStore {
            tmp,
            bb: StorePath::from_base_name("00000000000000000000000000000000-x").expect("path"),
            key,
        };
        let keyring = Keyring::new(&s.loc().state);
        let sk = keyring.secret_key_path();
        std::fs::create_dir_all(sk.parent().expect("keys dir")).expect("mkdir keys");
        s.key.write_file(&sk).expect("write key");
        let out = support::run_ok(
            s.cmd()
                .args(["store", "add"])
                .arg(s.tmp.path().join("src/busybox")),
        );
        s.bb = s.dir().parse_path(text(&out).trim()).expect("busybox path");
        s
    }

    fn dir(&self) -> StoreDir {
        StoreDir::default()
    }

    fn loc(&self) -> StoreLocation {
        StoreLocation::new(self.dir(), self.tmp.path().join("root"))
    }

    fn open(&self) -> LocalStore {
        sandoff::derivation::check::open_store(self.loc()).expect("open store")
    }

    fn cmd(&self) -> Command {
        let mut c = support::sandoff();
        c.arg("--store-root")
            .arg(self.tmp.path().join("root"))
            .env_remove("SANDOFF_USER_POOL_DIR")
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR")
            .env_remove("RUST_LOG");
        c
    }

    /// Adds a busybox derivation running `script`; returns its `.drv` path
    /// and the parsed derivation.
    fn drv(&self, name: &str, script: &str) -> (StorePath, Derivation) {
        let bb = format!("{}/bin/busybox", self.dir().display(&self.bb));
        let script = format!(
            "set -eu\n{bb} mkdir -p $TMPDIR/bin\n{bb} --install -s $TMPDIR/bin\nexport PATH=$TMPDIR/bin\n{script}"
        );
        let drv = json!({
            "outputs": {"out": {"path": ""}},
            "inputSrcs": [self.dir().display(&self.bb)],
            "inputDrvs": {},
            "system": "x86_64-linux",
            "builder": bb,
            "args": ["sh", "-c", script],
            "env": {"out": "", "name": name, "builder": bb, "system": "x86_64-linux"},
        });
        let path = self
            .dir()
            .parse_path(&support::derivation_add(&mut self.cmd(), &drv))
            .expect("drv path");
        let bytes = std::fs::read(self.loc().real_path(&path)).expect("read drv");
        let parsed = Derivation::from_aterm(&bytes, &self.dir()).expect("parse drv");
        (path, parsed)
    }

    /// Starts `sandoff serve --stdio --write` on this store.
    fn serve(&self) -> Served {
        let mut child = self
            .cmd()
            .args(["serve", "--stdio", "--write"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sandoff serve");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut stderr_pipe = child.stderr.take().expect("stderr");
        let stderr = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.0.lock().expect("lock").extend_from_slice(&buf[..n]);
                sink.1.notify_all();
            }
        });
        let mut s = Served {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            dir: self.dir(),
        };
        let w = s.stdin.as_mut().expect("stdin");
        wire::write_u64(w, SERVE_MAGIC_1).unwrap();
        wire::write_u64(w, 0x207).unwrap();
        w.flush().unwrap();
        assert_eq!(wire::read_u64(&mut s.stdout).unwrap(), SERVE_MAGIC_2);
        assert_eq!(
            wire::read_u64(&mut s.stdout).unwrap(),
            SERVE_PROTOCOL_VERSION
        );
        s
    }
}

/// A running `sandoff serve` and the client's ends of its pipes.
struct Served {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: std::io::BufReader<ChildStdout>,
    /// What the server wrote to stderr so far, and a signal for each read.
    stderr: Arc<(Mutex<Vec<u8>>, Condvar)>,
    dir: StoreDir,
}

impl Served {
    fn w(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("stdin open")
    }

    /// Sends a `BuildDerivation` request, not waiting for its result.
    fn send_build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &Derivation,
        input_srcs: &BTreeSet<StorePath>,
        options: &BuildOptions,
    ) {
        let dir = self.dir.clone();
        let w = self.w();
        wire::write_u64(w, 8).unwrap();
        wire::write_bytes(w, dir.display(drv_path).as_bytes()).unwrap();
        write_basic_derivation(w, &dir, drv, input_srcs).unwrap();
        options.write(w, 7).unwrap();
        w.flush().unwrap();
    }

    fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &Derivation,
        input_srcs: &BTreeSet<StorePath>,
        options: &BuildOptions,
    ) -> BuildResult {
        self.send_build_derivation(drv_path, drv, input_srcs, options);
        BuildResult::read(&mut self.stdout, 7, &self.dir).expect("BuildResult")
    }

    fn build_paths(&mut self, specs: &[String], options: &BuildOptions) -> (u64, String) {
        let w = self.w();
        wire::write_u64(w, 6).unwrap();
        wire::write_strings(w, specs).unwrap();
        options.write(w, 7).unwrap();
        w.flush().unwrap();
        let status = wire::read_u64(&mut self.stdout).unwrap();
        let msg = if status == 0 {
            String::new()
        } else {
            wire::read_string(&mut self.stdout, 1 << 20).unwrap()
        };
        (status, msg)
    }

    fn query_closure(&mut self, include_outputs: bool, paths: &[&StorePath]) -> BTreeSet<String> {
        let dir = self.dir.clone();
        let w = self.w();
        wire::write_u64(w, 7).unwrap();
        wire::write_bool(w, include_outputs).unwrap();
        wire::write_strings(w, paths.iter().map(|p| dir.display(p))).unwrap();
        w.flush().unwrap();
        wire::read_strings(&mut self.stdout, 1000, 4096)
            .unwrap()
            .into_iter()
            .collect()
    }

    fn stderr(&self) -> String {
        text(&self.stderr.0.lock().expect("lock"))
    }

    /// Whether the server's stderr comes to hold `needle`. The server writes
    /// a build's log before its reply, but the thread that collects stderr
    /// may not have read it when the reply arrives: wait for it (the long
    /// deadline only keeps a broken server from hanging the test).
    fn stderr_has(&self, needle: &str) -> bool {
        let (buf, read) = &*self.stderr;
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut seen = buf.lock().expect("lock");
        loop {
            if text(&seen).contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            seen = read.wait_timeout(seen, left).expect("lock").0;
        }
    }

    /// Closes the client's side and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "serve: {status}: {}", self.stderr());
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn serve_build_derivation_builds_signs_streams_and_survives_failures() {
    let Some(store) = BuildStore::ready(this_test!()) else {
        return;
    };
    let dir = store.dir();
    let (hello, hello_drv) = store.drv(
        "hello",
        "echo building-hello-now\nmkdir $out\necho hi > $out/greeting",
    );
    let (fails, fails_drv) = store.drv("fails", "echo about-to-fail\nexit 3");
    let (sleeper, sleeper_drv) = store.drv("sleeper", "echo sleeping\nsleep 1000");
    let inputs = store.inputs();
    let out = hello_drv.output_paths()["out"].clone();
    let mut server = store.serve();

    // Built: valid, signed by the server, its log on stderr as it came.
    let r = server.build_derivation(&hello, &hello_drv, &inputs, &BuildOptions::default());
    assert_eq!(r.status, BuildStatus::Built, "{r:?}: {}", server.stderr());
    assert_eq!(r.times_built, 1);
    assert!(r.start_time > 0 && r.stop_time >= r.start_time);
    assert_eq!(
        r.built_outputs,
        BTreeMap::from([("out".to_owned(), out.clone())])
    );
    assert!(
        server.stderr_has("building-hello-now\n"),
        "{}",
        server.stderr()
    );
    let info = store
        .open()
        .query_path_info(&out)
        .unwrap()
        .expect("out valid");
    let public = store.key.to_public();
    assert!(
        info.signatures
            .iter()
            .any(|s| public.verify(&info.fingerprint(&dir), s)),
        "not signed by the server: {:?}",
        info.signatures
    );
    assert_eq!(
        std::fs::read_to_string(store.loc().real_path(&out).join("greeting")).unwrap(),
        "hi\n"
    );
    // The server's own log file has it too.
    let log = std::fs::read_to_string(store.loc().state.join("log").join(hello.base_name()))
        .expect("server log");
    assert!(log.contains("building-hello-now"), "{log}");

    // Again: already valid.
    let r = server.build_derivation(&hello, &hello_drv, &inputs, &BuildOptions::default());
    assert_eq!(r.status, BuildStatus::AlreadyValid, "{r:?}");

    // A failing builder: PermanentFailure with the log, and the session goes on.
    let r = server.build_derivation(&fails, &fails_drv, &inputs, &BuildOptions::default());
    assert_eq!(r.status, BuildStatus::PermanentFailure, "{r:?}");
    assert!(r.error_msg.contains("about-to-fail"), "{}", r.error_msg);
    assert!(r.error_msg.contains("status 3"), "{}", r.error_msg);
    assert!(!store
        .open()
        .is_valid(&fails_drv.output_paths()["out"])
        .unwrap());

    // Killed by the time limit: TimedOut.
    let r = server.build_derivation(
        &sleeper,
        &sleeper_drv,
        &inputs,
        &BuildOptions {
            build_timeout: 1,
            ..Default::default()
        },
    );
    assert_eq!(r.status, BuildStatus::TimedOut, "{r:?}");

    // An input the server lacks: MiscFailure naming it.
    let missing = StorePath::from_base_name("00000000000000000000000000000000-not-here").unwrap();
    let mut with_missing = inputs.clone();
    with_missing.insert(missing.clone());
    let r = server.build_derivation(&fails, &fails_drv, &with_missing, &BuildOptions::default());
    assert_eq!(r.status, BuildStatus::MiscFailure, "{r:?}");
    assert!(
        r.error_msg.contains(&dir.display(&missing)),
        "{}",
        r.error_msg
    );

    // An output path that does not fit the derivation's name.
    let mut renamed = hello_drv.clone();
    let wrong = StorePath::from_base_name(&format!("{}-other", &out.base_name()[..32])).unwrap();
    renamed.outputs.insert(
        OutputName::out(),
        DerivationOutput::InputAddressed { path: wrong },
    );
    let r = server.build_derivation(&hello, &renamed, &inputs, &BuildOptions::default());
    assert_eq!(r.status, BuildStatus::MiscFailure, "{r:?}");
    assert!(r.error_msg.contains("hello"), "{}", r.error_msg);

    // Still serving.
    let closure = server.query_closure(false, &[&out]);
    assert_eq!(closure, BTreeSet::from([dir.display(&out)]));
    server.finish();
}

#[test]
fn serve_build_derivation_with_u64_max_limits_builds() {
    let Some(store) = BuildStore::ready(this_test!()) else {
        return;
    };
    let (quick, quick_drv) = store.drv("quick", "mkdir $out");
    let mut server = store.serve();
    // A client may send u64::MAX for "no limit"; it used to panic the
    // server ("overflow when adding duration to instant").
    let r = server.build_derivation(
        &quick,
        &quick_drv,
        &store.inputs(),
        &BuildOptions {
            max_silent_time: u64::MAX,
            build_timeout: u64::MAX,
            ..Default::default()
        },
    );
    assert_eq!(r.status, BuildStatus::Built, "{r:?}: {}", server.stderr());
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
    server.finish();
}

#[test]
fn serve_build_paths_and_closure_with_outputs() {
    let Some(store) = BuildStore::ready(this_test!()) else {
        return;
    };
    let dir = store.dir();
    let (ok, ok_drv) = store.drv("via-paths", "echo via-paths-log\nmkdir $out");
    let (fails, _) = store.drv("fails", "echo paths-fail\nexit 1");
    let (sleeper, _) = store.drv("sleeper", "sleep 1000");
    let out = ok_drv.output_paths()["out"].clone();
    let mut server = store.serve();

    let spec = format!("{}!out", dir.display(&ok));
    let (status, msg) = server.build_paths(&[spec], &BuildOptions::default());
    assert_eq!((status, msg.as_str()), (0, ""), "{}", server.stderr());
    let info = store.open().query_path_info(&out).unwrap().expect("valid");
    let public = store.key.to_public();
    assert!(
        info.signatures
            .iter()
            .any(|s| public.verify(&info.fingerprint(&dir), s)),
        "not signed by the server: {:?}",
        info.signatures
    );
    assert!(server.stderr_has("via-paths-log\n"), "{}", server.stderr());

    let (status, msg) = server.build_paths(&[dir.display(&fails)], &BuildOptions::default());
    assert_eq!(status, 100, "{msg}");
    assert!(msg.contains("fails.drv"), "{msg}");
    let (status, msg) = server.build_paths(
        &[dir.display(&sleeper)],
        &BuildOptions {
            max_silent_time: 1,
            ..Default::default()
        },
    );
    assert_eq!(status, 101, "{msg}");
    let (status, msg) = server.build_paths(
        &["/nix/store/00000000000000000000000000000000-not-here".to_owned()],
        &BuildOptions::default(),
    );
    assert_eq!(status, 1, "{msg}");
    assert!(msg.contains("not-here"), "{msg}");

    // The closure of the .drv: with includeOutputs also its (valid) output.
    let without = server.query_closure(false, &[&ok]);
    assert_eq!(
        without,
        BTreeSet::from([dir.display(&ok), dir.display(&store.bb)])
    );
    let with = server.query_closure(true, &[&ok]);
    let mut expected = without.clone();
    expected.insert(dir.display(&out));
    assert_eq!(with, expected);
    // A derivation whose output is not valid adds nothing.
    assert!(!server.query_closure(true, &[&fails]).contains("fails"));

    // Without a key the build succeeds, unsigned, and says so on the log.
    std::fs::remove_file(Keyring::new(&store.loc().state).secret_key_path()).expect("rm key");
    let (unsigned, unsigned_drv) = store.drv("unsigned", "mkdir $out");
    let inputs = store.inputs();
    let r = server.build_derivation(&unsigned, &unsigned_drv, &inputs, &BuildOptions::default());
    assert_eq!(r.status, BuildStatus::Built, "{r:?}");
    let info = store
        .open()
        .query_path_info(&unsigned_drv.output_paths()["out"])
        .unwrap()
        .expect("valid");
    assert!(info.signatures.is_empty());
    assert!(
        server.stderr_has("are not signed by this machine"),
        "{}",
        server.stderr()
    );
    server.finish();
}

#[test]
fn serve_kills_the_build_when_the_client_goes_away() {
    let Some(store) = BuildStore::ready(this_test!()) else {
        return;
    };
    let (sleeper, sleeper_drv) = store.drv("long-sleeper", "echo started-sleeping\nsleep 1000");
    let mut server = store.serve();
    server.send_build_derivation(
        &sleeper,
        &sleeper_drv,
        &store.inputs(),
        &BuildOptions::default(),
    );
    assert!(
        server.stderr_has("started-sleeping"),
        "build never started: {}",
        server.stderr()
    );
    // The client goes away: the server ends, which it can do only by
    // killing the build (that would sleep for far longer than the deadline,
    // which only keeps a broken server from hanging the test).
    drop(server.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(300);
    let _status = loop {
        if let Some(s) = server.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "serve still running after the client left: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!store
        .open()
        .is_valid(&sleeper_drv.output_paths()["out"])
        .unwrap());
    // No build directory left behind (the build user's own is empty).
    let builds = support::leftover_build_dirs(&store.loc().state);
    assert!(builds.is_empty(), "{builds:?}");
}

/// Nix 2.8 itself as the client: `nix-build --builders 'ssh://...'` runs its
/// build hook, which sends the input over real sshd into `sandoff serve`,
/// builds there with BuildDerivation, streams the log back and copies the
/// output home.
#[test]
fn serve_builds_for_nix_2_8_build_remote() {
    let test = this_test!();
    let mut needs = crate::hosts::NEEDS.to_vec();
    needs.push(Need::Program("nix-build"));
    if !support::require(test, &needs) || !build_ready(test) {
        return;
    }
    let host = crate::hosts::TestHost::start(40);
    let tmp = tempfile::tempdir().expect("tempdir");
    // The host's builds share the build users' lock directory with every
    // other build of this test binary, so that none shares a user.
    let program = tmp.path().join("serve");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\nexport SANDOFF_USER_POOL_DIR={}\nexec sandoff serve --stdio --write\n",
            std::path::Path::new(sandoff::sandbox::users::DEFAULT_USER_POOL_DIR).display()
        ),
    )
    .expect("write serve script");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bb = tmp.path().join("bb");
    std::fs::create_dir(&bb).expect("mkdir");
    std::fs::copy("/bin/busybox", bb.join("busybox")).expect("copy busybox");
    let expr = tmp.path().join("e2e.nix");
    std::fs::write(
        &expr,
        format!(
            r#"derivation {{
  name = "remote-e2e";
  system = "x86_64-linux";
  builder = "${{{}}}/busybox";
  args = [ "sh" "-c" "echo remote-e2e-log-line; $builder mkdir $out; echo hi > $out/x" ];
}}"#,
            bb.display()
        ),
    )
    .expect("write expression");
    let conf = tmp.path().join("nixconf");
    let local = tmp.path().join("local");
    let machine = format!(
        "ssh://root@{}?remote-program={} x86_64-linux {} 1 1",
        host.addr,
        program.display(),
        host.client_key().display()
    );
    let out = support::nix_cmd("nix-build", &conf)
        .env("NIX_SSHOPTS", host.ssh_opts().join(" "))
        .arg("--store")
        .arg(&local)
        .args(["--no-out-link", "--max-jobs", "0", "--builders", &machine])
        .arg(&expr)
        .output()
        .expect("run nix-build");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "nix-build: {stderr}");
    assert!(stderr.contains("remote-e2e-log-line"), "{stderr}");
    let path = text(&out.stdout).trim().to_owned();
    assert!(path.ends_with("-remote-e2e"), "{path}");
    let base = path.rsplit('/').next().expect("base name");
    let built = local.join("nix/store").join(base).join("x");
    assert_eq!(std::fs::read_to_string(&built).expect("output"), "hi\n");
    // Built and signed on the host.
    let host_store = sandoff::derivation::check::open_store(StoreLocation::new(
        StoreDir::default(),
        host.root(),
    ))
    .expect("host store");
    let info = host_store
        .query_path_info(&StorePath::from_base_name(base).expect("path"))
        .expect("query")
        .expect("valid on the host");
    assert_eq!(info.signatures.len(), 1, "{:?}", info.signatures);
}

#[test]
fn serve_refuses_a_client_of_another_store_dir_before_the_handshake() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let mut hello = Vec::new();
    wire::write_u64(&mut hello, SERVE_MAGIC_1).expect("vec");
    wire::write_u64(&mut hello, 0x207).expect("vec");
    let serve = |dir: &str| {
        let mut c = support::sandoff();
        c.env_remove("SANDOFF_STORE_DIR")
            .arg("--store-root")
            .arg(&root)
            .args(["serve", "--stdio", "--write", "--expect-store-dir", dir]);
        support::output_with_input(&mut c, &hello)
    };
    let out = serve("/gnu/store");
    assert_eq!(out.status.code(), Some(1));
    // Not a byte of the protocol, one line naming both directories, and
    // the store was not even opened.
    assert!(out.stdout.is_empty(), "{:x?}", out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        "sandoff: store directory mismatch: the server's store is /nix/store, \
         the client's is /gnu/store\n"
    );
    assert!(!root.exists(), "opened the store");

    // The same directory: served as ever.
    let out = serve("/nix/store");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(after_handshake(&out.stdout).is_empty());
}
