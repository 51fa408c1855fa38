//! `builtin:fetchurl` end to end: derivations as Nix's `<nix/fetchurl.nix>`
//! makes them, built by `sandoff build` as root with the build users,
//! downloading from a small HTTP server on 127.0.0.1 that each test starts
//! and stops.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use sandoff::store::{nar, ContentAddress, FileIngestionMethod, HashAlgo, StorePath};
use serde_json::json;

use crate::build::{assert_stderr_has, logical, text, Store};
use crate::support;
use crate::this_test;

/// An HTTP/1.1 server on 127.0.0.1 answering GETs from a fixed table
/// (404 for anything else), one connection at a time, until dropped.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(files: BTreeMap<String, Vec<u8>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &files);
                }
            }
        });
        Server {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, files: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/');
    let mut conn = conn;
    match files.get(path) {
        Some(body) => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            conn.write_all(body)?;
        }
        None => {
            conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
            )?;
        }
    }
    conn.flush()
}

/// What a `<nix/fetchurl.nix>` call sets.
struct Fetch<'a> {
    name: &'a str,
    url: String,
    urls: Option<String>,
    /// `sha256` (flat) or `r:sha256`, and the hex hash.
    algo: &'a str,
    hash: String,
    executable: bool,
    unpack: bool,
    builder: &'a str,
}

impl Fetch<'_> {
    fn new(name: &str, url: String, hash: String) -> Fetch<'_> {
        Fetch {
            name,
            urls: None,
            url,
            algo: "sha256",
            hash,
            executable: false,
            unpack: false,
            builder: "builtin:fetchurl",
        }
    }
}

/// Adds the derivation that `<nix/fetchurl.nix>` would make; its `.drv` path.
fn add(s: &Store, f: &Fetch<'_>) -> String {
    let flag = |b: bool| if b { "1" } else { "" };
    let mode = if f.algo.starts_with("r:") {
        "recursive"
    } else {
        "flat"
    };
    let drv = json!({
        "outputs": {"out": {"path": "", "hashAlgo": f.algo, "hash": f.hash}},
        "inputSrcs": [],
        "inputDrvs": {},
        "system": "builtin",
        "builder": f.builder,
        "args": [],
        "env": {
            "builder": f.builder,
            "executable": flag(f.executable),
            "impureEnvVars": "http_proxy https_proxy ftp_proxy all_proxy no_proxy",
            "name": f.name,
            "out": "",
            "outputHash": f.hash,
            "outputHashAlgo": "sha256",
            "outputHashMode": mode,
            "preferLocalBuild": "1",
            "system": "builtin",
            "unpack": flag(f.unpack),
            "url": f.url,
            "urls": f.urls.clone().unwrap_or_else(|| f.url.clone()),
        },
    });
    support::derivation_add(&mut s.cmd(), &drv)
}

fn sha256_hex(bytes: &[u8]) -> String {
    HashAlgo::Sha256.digest(bytes).to_base16()
}

/// The hex SHA-256 of the NAR of a tree made by `make` in a scratch dir.
fn nar_sha256(make: impl FnOnce(&std::path::Path)) -> (String, Vec<u8>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = tmp.path().join("x");
    make(&p);
    let mut bytes = Vec::new();
    nar::dump(&p, &mut bytes).expect("dump");
    (sha256_hex(&bytes), bytes)
}

fn served(files: &[(&str, &[u8])]) -> Server {
    Server::start(
        files
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect(),
    )
}

#[test]
fn fetchurl_flat_download_is_built_and_registered() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let server = served(&[("hello.txt", b"hello\n")]);
    let drv = add(
        &s,
        &Fetch::new("hello.txt", server.url("hello.txt"), sha256_hex(b"hello\n")),
    );
    let out = s.build(&[&drv]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = s.out(&drv);
    assert_eq!(text(&out.stdout).trim(), logical(&path));
    assert_eq!(std::fs::read(s.real(&path)).expect("read"), b"hello\n");
    let info = s.info(&path).expect("registered");
    assert_eq!(
        info.ca,
        Some(ContentAddress::Fixed {
            method: FileIngestionMethod::Flat,
            hash: HashAlgo::Sha256.digest(b"hello\n"),
        })
    );
    assert!(info.references.is_empty());
}

#[test]
fn fetchurl_wrong_hash_fails_naming_both_and_registers_nothing() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let server = served(&[("hello.txt", b"not what was promised\n")]);
    let drv = add(
        &s,
        &Fetch::new("hello.txt", server.url("hello.txt"), sha256_hex(b"hello\n")),
    );
    let out = s.build(&[&drv]);
    assert!(!out.status.success());
    let specified = HashAlgo::Sha256.digest(b"hello\n").to_nix32_prefixed();
    let got = HashAlgo::Sha256
        .digest(b"not what was promised\n")
        .to_nix32_prefixed();
    assert_stderr_has(&out, "hash mismatch in fixed-output derivation");
    assert_stderr_has(&out, &format!("specified {specified}, got {got}"));
    let path: StorePath = s.out(&drv);
    assert!(s.info(&path).is_none(), "nothing registered");
    assert!(!s.real(&path).exists(), "nothing at the output's place");
}

#[test]
fn fetchurl_executable_output_is_executable() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let script = b"#!/bin/sh\necho hi\n";
    let (hash, _) = nar_sha256(|p| {
        std::fs::write(p, script).expect("write");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    });
    let server = served(&[("hi.sh", script)]);
    let mut f = Fetch::new("hi.sh", server.url("hi.sh"), hash);
    f.algo = "r:sha256";
    f.executable = true;
    let drv = add(&s, &f);
    let out = s.build(&[&drv]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let real = s.real(&s.out(&drv));
    assert_eq!(std::fs::read(&real).expect("read"), script);
    let mode = std::fs::metadata(&real).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o555, "{mode:o}");
}

#[test]
fn fetchurl_unpack_restores_a_nar_made_by_sandoff_nar_dump() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("sub/file"), b"unpacked\n").expect("write");
    std::os::unix::fs::symlink("sub/file", tree.join("link")).expect("symlink");
    let nar_bytes = support::run_ok(support::sandoff().args(["nar", "dump"]).arg(&tree));
    let server = served(&[("tree.nar", &nar_bytes)]);
    let mut f = Fetch::new("tree", server.url("tree.nar"), sha256_hex(&nar_bytes));
    f.algo = "r:sha256";
    f.unpack = true;
    let drv = add(&s, &f);
    let out = s.build(&[&drv]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let real = s.real(&s.out(&drv));
    assert_eq!(
        std::fs::read(real.join("sub/file")).expect("read"),
        b"unpacked\n"
    );
    assert_eq!(
        std::fs::read_link(real.join("link")).expect("readlink"),
        std::path::Path::new("sub/file")
    );
}

#[test]
fn fetchurl_404_fails_with_a_clear_error() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let server = served(&[]);
    let url = server.url("missing.txt");
    let drv = add(
        &s,
        &Fetch::new("missing.txt", url.clone(), sha256_hex(b"x")),
    );
    let out = s.build(&[&drv]);
    assert!(!out.status.success());
    assert_stderr_has(
        &out,
        &format!("cannot download '{url}': HTTP status 404 (Not Found)"),
    );
    assert!(s.info(&s.out(&drv)).is_none());
}

#[test]
fn fetchurl_falls_back_to_the_next_of_urls() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let server = served(&[("good.txt", b"hello\n")]);
    let mut f = Fetch::new("hello.txt", server.url("gone.txt"), sha256_hex(b"hello\n"));
    f.urls = Some(format!(
        "{} {}",
        server.url("gone.txt"),
        server.url("good.txt")
    ));
    let drv = add(&s, &f);
    let out = s.build(&[&drv]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(s.real(&s.out(&drv))).expect("read"),
        b"hello\n"
    );
    let log = support::run_ok(s.cmd().arg("log").arg(&drv));
    let log = text(&log);
    assert!(log.contains("HTTP status 404"), "{log}");
    assert!(log.contains("good.txt"), "{log}");
}

#[test]
fn other_builtin_builders_are_refused_by_name() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let mut f = Fetch::new("env", "http://127.0.0.1:1/x".to_owned(), sha256_hex(b"x"));
    f.builder = "builtin:buildenv";
    let drv = add(&s, &f);
    let out = s.build(&[&drv]);
    assert!(!out.status.success());
    assert_stderr_has(
        &out,
        "unsupported builtin builder 'buildenv' (sandoff implements only builtin:fetchurl)",
    );
}

/// The derivation real Nix 2.8 makes with `<nix/fetchurl.nix>` (from its
/// corepkgs, offline) is added by sandoff from Nix's own JSON at the same
/// `.drv` path, and built by sandoff at the output path Nix gave it.
#[test]
fn fetchurl_derivation_of_nix_2_8_builds_at_nixs_path() {
    if !support::require_programs(this_test!(), &["nix", "nix-instantiate"]) {
        return;
    }
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let server = served(&[("hello.txt", b"hello\n")]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("conf");
    let root = tmp.path().join("nixroot");
    let expr = format!(
        "import <nix/fetchurl.nix> {{ url = \"{}\"; sha256 = \"{}\"; }}",
        server.url("hello.txt"),
        sha256_hex(b"hello\n")
    );
    let drv_path = support::run_ok(
        support::nix_cmd("nix-instantiate", &conf)
            .arg("--store")
            .arg(&root)
            .args(["--expr", &expr]),
    );
    let drv_path = text(&drv_path).trim().to_owned();
    let shown = support::run_ok(
        support::nix_cmd("nix", &conf)
            .args(["show-derivation", "--store"])
            .arg(&root)
            .arg(&drv_path),
    );
    let value: serde_json::Value = serde_json::from_slice(&shown).expect("json");
    let nix_out = value[&drv_path]["outputs"]["out"]["path"]
        .as_str()
        .expect("out path")
        .to_owned();
    let added = support::output_with_input(s.cmd().args(["derivation", "add"]), &shown);
    assert!(added.status.success(), "{}", text(&added.stderr));
    assert_eq!(text(&added.stdout).trim(), drv_path);
    let out = s.build(&[&drv_path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), nix_out);
    assert_eq!(
        std::fs::read(s.real(&s.path(&nix_out))).expect("read"),
        b"hello\n"
    );
}

/// The helper runs outside the chroot: a `file://` URL would read this
/// machine's files (and a mismatch would print their hash), so it is refused
/// before anything runs.
#[test]
fn fetchurl_refuses_file_urls() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let drv = add(
        &s,
        &Fetch::new("passwd", "file:///etc/passwd".to_owned(), sha256_hex(b"x")),
    );
    let out = s.build(&[&drv]);
    assert!(!out.status.success());
    assert_stderr_has(&out, "'file:///etc/passwd': file:// URLs are refused");
    assert!(s.info(&s.out(&drv)).is_none());
}

/// A server that never answers: the helper is killed at the build's
/// `--timeout`, like any builder, and nothing is registered.
#[test]
fn fetchurl_is_killed_at_the_build_timeout() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    // Connections complete in the backlog and are never accepted or answered.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = silent.local_addr().expect("addr").port();
    let drv = add(
        &s,
        &Fetch::new(
            "hang.txt",
            format!("http://127.0.0.1:{port}/hang.txt"),
            sha256_hex(b"x"),
        ),
    );
    let out = s.build(&["--timeout", "1", &drv]);
    assert!(!out.status.success());
    assert_stderr_has(&out, "timed out after 1 seconds");
    assert!(s.info(&s.out(&drv)).is_none());
    drop(silent);
}

/// `impureEnvVars` proxies reach the download: with `http_proxy` set for
/// `sandoff build`, a URL whose host does not even resolve is fetched
/// through the proxy (a server answering the absolute-form request).
#[test]
fn fetchurl_goes_through_the_http_proxy_of_impure_env_vars() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let url = "http://sandoff-test.invalid/hello.txt";
    let proxy = served(&[(url, b"hello\n")]);
    let drv = add(
        &s,
        &Fetch::new("hello.txt", url.to_owned(), sha256_hex(b"hello\n")),
    );
    let out = s
        .cmd()
        .env("http_proxy", format!("http://127.0.0.1:{}", proxy.port))
        .args(["build", &drv])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(s.real(&s.out(&drv))).expect("read"),
        b"hello\n"
    );
}

#[test]
fn fetchurl_goes_direct_to_the_hosts_of_no_proxy() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let server = served(&[("hello.txt", b"hello\n")]);
    let drv = add(
        &s,
        &Fetch::new("hello.txt", server.url("hello.txt"), sha256_hex(b"hello\n")),
    );
    // A proxy nobody listens on: only a direct download can succeed.
    let build = |no_proxy: Option<&str>| {
        let mut cmd = s.cmd();
        cmd.env("http_proxy", "http://127.0.0.1:1");
        if let Some(v) = no_proxy {
            cmd.env("no_proxy", v);
        }
        cmd.args(["build", &drv]).output().expect("run")
    };
    let out = build(None);
    assert!(!out.status.success(), "went through the dead proxy");
    let out = build(Some("localhost,127.0.0.1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(s.real(&s.out(&drv))).expect("read"),
        b"hello\n"
    );
}
