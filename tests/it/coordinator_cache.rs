//! The coordinator's binary cache against real Nix 2.8: paths Nix made are
//! uploaded into a `Cache` (zstd NARs, narinfos signed by a fresh key), then
//! Nix substitutes them into a fresh chroot store, from `file://` and from
//! `http://`, with `require-sigs`, and verifies them; sandoff's own
//! substituter fetches the same closure and finds Nix's NAR hashes.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use sandoff::coordinator::cache::{Cache, Claim, ClaimKind, UploadId};
use sandoff::coordinator::substitute::{default_agent, HttpCache};
use sandoff::derivation::check::open_store;
use sandoff::store::nar;
use sandoff::store::signature::{SecretKey, TrustedKeys};
use sandoff::store::{StoreDir, StoreLocation, StorePath};

use crate::support;
use crate::this_test;

fn nix(program: &str, conf: &Path, store: &Path) -> Command {
    let mut c = support::nix_cmd(program, conf);
    c.arg("--store").arg(store);
    c
}

fn text(out: Vec<u8>) -> String {
    String::from_utf8(out).expect("utf-8").trim().to_owned()
}

/// Serves `dir` under `/cache/` over HTTP/1.1 to any number of clients, one
/// request a connection, until the test process ends.
fn serve(dir: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = answer(conn, &dir);
        }
    });
    addr
}

fn answer(mut conn: TcpStream, dir: &Path) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.split(' ');
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("");
    let file = path
        .strip_prefix("/cache/")
        .filter(|rel| !rel.split('/').any(|c| c == ".." || c.is_empty()))
        .and_then(|rel| std::fs::read(dir.join(rel)).ok());
    let (status, body) = match file {
        Some(b) => ("200 OK", b),
        None => ("404 Not Found", Vec::new()),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        conn.write_all(&body)?;
    }
    Ok(())
}

fn upload(cache: &Cache, id: &str, real: &Path, claim: &Claim) {
    let mut nar_bytes = Vec::new();
    nar::dump(real, &mut nar_bytes).expect("dump");
    let bytes = zstd::encode_all(&nar_bytes[..], 3).expect("zstd");
    let id = UploadId::new(id).expect("id");
    // In two pieces, resumed from the offset the cache reports.
    let half = bytes.len() / 2;
    cache
        .append(&id, 0, &mut &bytes[..half], 1 << 30)
        .expect("append");
    let at = cache.upload_offset(&id).expect("offset");
    cache
        .append(&id, at, &mut &bytes[at as usize..], 1 << 30)
        .expect("append");
    cache.finish(&id, claim).expect("finish");
}

#[test]
fn nix_substitutes_from_the_coordinator_cache_and_verifies() {
    if !support::require_programs(this_test!(), &["nix-store", "nix"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("conf");
    let src_store = tmp.path().join("src");
    let dir = StoreDir::default();

    // Real paths made by Nix: `foo`, `baz` (which refers to `foo`), and a
    // tree added with `nix-store --add`.
    support::nix_foo_baz(&conf, &src_store);
    let baz = dir.parse_path(support::NIX_BAZ).expect("baz");
    let foo_full = text(support::run_ok(nix("nix-store", &conf, &src_store).args([
        "-q",
        "--references",
        support::NIX_BAZ,
    ])));
    let foo = dir.parse_path(&foo_full).expect("foo");
    let work = tmp.path().join("tree");
    std::fs::create_dir_all(work.join("bin")).expect("mkdir");
    std::fs::write(work.join("bin/hello"), b"#!/bin/sh\necho hello\n").expect("write");
    std::os::unix::fs::symlink("bin/hello", work.join("link")).expect("symlink");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        work.join("bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let tree_full = text(support::run_ok(
        nix("nix-store", &conf, &src_store).arg("--add").arg(&work),
    ));
    let tree = dir.parse_path(&tree_full).expect("tree");
    // And a derivation whose input source is `baz`.
    let drv_full = text(support::run_ok(
        nix("nix-instantiate", &conf, &src_store).args([
            "-E",
            r#"let foo = builtins.toFile "foo" "bar"; baz = builtins.toFile "baz" "${foo}";
               in derivation { name = "uses-baz"; system = "x86_64-linux"; builder = "/bin/sh";
                               args = [ "-c" "cat ${baz} > $out" ]; }"#,
        ]),
    ));
    let drv = dir.parse_path(&drv_full).expect("drv");
    let real = |p: &StorePath| src_store.join("nix/store").join(p.base_name());

    let key = SecretKey::generate("coordinator-it-1").expect("key");
    let public = key.to_public().to_string();
    let cache_dir = tmp.path().join("cache");
    let cache = Cache::open(&cache_dir, dir.clone(), key).expect("cache");
    let claim = |path: &StorePath, kind: ClaimKind, candidates: &[&StorePath]| Claim {
        path: path.clone(),
        kind,
        candidates: candidates.iter().map(|p| (*p).clone()).collect(),
        nar_hash: None,
        nar_size: None,
        deriver: None,
    };
    upload(
        &cache,
        "src-foo",
        &real(&foo),
        &claim(&foo, ClaimKind::Source, &[]),
    );
    upload(
        &cache,
        "src-baz",
        &real(&baz),
        &claim(&baz, ClaimKind::Source, &[&foo]),
    );
    // The tree as a build output (no content address, a deriver): Nix
    // takes it on the strength of the signature alone.
    let mut as_output = claim(&tree, ClaimKind::Output { fixed: None }, &[&foo]);
    as_output.deriver =
        Some(StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv").expect("drv"));
    upload(&cache, "b1-out", &real(&tree), &as_output);
    let record = {
        let mut nar_bytes = Vec::new();
        nar::dump(&real(&drv), &mut nar_bytes).expect("dump");
        let id = UploadId::new("drv-uses-baz").expect("id");
        let bytes = zstd::encode_all(&nar_bytes[..], 3).expect("zstd");
        cache
            .append(&id, 0, &mut &bytes[..], 1 << 30)
            .expect("append");
        let accepted = cache
            .finish(&id, &claim(&drv, ClaimKind::Derivation, &[&baz]))
            .expect("finish");
        accepted.drv.expect("a derivation record")
    };
    let nix_out = text(support::run_ok(nix("nix-store", &conf, &src_store).args([
        "-q",
        "--outputs",
        &drv_full,
    ])));
    assert_eq!(record.outputs["out"], nix_out);
    assert_eq!(
        record.input_srcs,
        [support::NIX_BAZ.to_owned()].into_iter().collect()
    );

    // Nix's own cache of the same paths: its narinfos agree with ours on
    // everything but the file (compression level), the signature, and
    // what was claimed differently (the tree's deriver, its CA).
    let nix_cache = tmp.path().join("nix-cache");
    let to = format!("file://{}?compression=zstd", nix_cache.display());
    // The .drv with its closure (`foo`, `baz`), then the tree.
    support::run_ok(
        nix("nix", &conf, &src_store)
            .args(["copy", "--derivation", "--to", &to])
            .arg(&drv_full),
    );
    support::run_ok(nix("nix", &conf, &src_store).args(["copy", "--to", &to, &tree_full]));
    for p in [&foo, &baz, &tree, &drv] {
        let fields = |d: &Path| -> Vec<String> {
            let t = std::fs::read_to_string(d.join(format!("{}.narinfo", p.hash_part())))
                .expect("narinfo");
            t.lines()
                .filter(|l| {
                    ["StorePath:", "NarHash:", "NarSize:", "References:", "CA:"]
                        .iter()
                        .any(|f| l.starts_with(f))
                })
                .filter(|l| !(p == &tree && l.starts_with("CA:")))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(fields(&cache_dir), fields(&nix_cache), "{p}");
    }

    // A path without a content address and no trusted signature: Nix
    // refuses it, so the successes below are the signatures' doing.
    let stranger = SecretKey::generate("coordinator-it-1")
        .expect("key")
        .to_public()
        .to_string();
    let refused = nix("nix-store", &conf, &tmp.path().join("refused"))
        .args(["--option", "substituters"])
        .arg(format!("file://{}", cache_dir.display()))
        .args(["--option", "trusted-public-keys", &stranger])
        .args(["--option", "require-sigs", "true"])
        .args(["--realise", &tree_full])
        .output()
        .expect("run nix-store");
    assert!(
        !refused.status.success(),
        "Nix took an output signed by an untrusted key"
    );

    let addr = serve(cache_dir.clone());
    let http = format!("http://{addr}/cache");
    for (i, substituter) in [format!("file://{}", cache_dir.display()), http.clone()]
        .into_iter()
        .enumerate()
    {
        let dest = tmp.path().join(format!("dest{i}"));
        let subst = |c: &mut Command| {
            c.args(["--option", "substituters", &substituter])
                .args(["--option", "trusted-public-keys", &public])
                .args(["--option", "require-sigs", "true"]);
        };
        let mut realise = nix("nix-store", &conf, &dest);
        subst(&mut realise);
        let out = support::run_ok(realise.args(["--realise", support::NIX_BAZ, &tree_full]));
        assert_eq!(
            text(out),
            format!("{}\n{tree_full}", support::NIX_BAZ),
            "{substituter}"
        );
        support::run_ok(nix("nix-store", &conf, &dest).args([
            "--verify-path",
            support::NIX_BAZ,
            &foo_full,
            &tree_full,
        ]));
        // The signatures came along and Nix finds them valid.
        support::run_ok(
            nix("nix", &conf, &dest)
                .args(["store", "verify", "--sigs-needed", "1"])
                .args(["--option", "trusted-public-keys", &public])
                .args([support::NIX_BAZ, &foo_full, &tree_full]),
        );
        let refs = text(support::run_ok(nix("nix-store", &conf, &dest).args([
            "-q",
            "--references",
            support::NIX_BAZ,
        ])));
        assert_eq!(refs, foo_full);
        let deriver = text(support::run_ok(nix("nix-store", &conf, &dest).args([
            "-q",
            "--deriver",
            &tree_full,
        ])));
        assert!(deriver.ends_with("-hello.drv"), "{deriver}");
        // The .drv itself (its file, not its outputs).
        let mut copy = nix("nix", &conf, &dest);
        subst(&mut copy);
        support::run_ok(
            copy.args(["copy", "--derivation", "--from", &substituter])
                .arg(&drv_full),
        );
        support::run_ok(nix("nix-store", &conf, &dest).args(["--verify-path", &drv_full]));
    }

    // sandoff's substituter, over HTTP, into a store of its own: the NAR
    // hashes it registers are Nix's.
    let mut trusted = TrustedKeys::new();
    trusted
        .insert(cache.public_key(), "test")
        .expect("trusted key");
    let client = HttpCache::new(&http, default_agent(), None, trusted);
    let store =
        open_store(StoreLocation::new(dir.clone(), tmp.path().join("sandoff"))).expect("store");
    let want: BTreeSet<StorePath> = [baz.clone(), tree.clone()].into_iter().collect();
    assert_eq!(client.fetch_closure(&store, &want).expect("fetch"), 3);
    for p in [&foo, &baz, &tree] {
        let info = store.query_path_info(p).expect("query").expect("valid");
        let nix_hash = text(support::run_ok(
            nix("nix-store", &conf, &src_store)
                .args(["-q", "--hash"])
                .arg(dir.display(p)),
        ));
        assert_eq!(info.nar_hash.to_nix32_prefixed(), nix_hash, "{p}");
    }
}
