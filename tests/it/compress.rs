//! Compressed transfers against real sshd test hosts: zstd between sandoff
//! peers (on by default, off on request), SSH zlib with a stock Nix host
//! that asks for compression, and a corrupted compressed stream refused;
//! and the client with a local `sandoff serve --compress`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sandoff::remote::client::{ClientError, ServeClient};
use sandoff::remote::compress::{ByteCount, ZstdTransport};
use sandoff::remote::transport::ChildTransport;
use sandoff::store::export::write_export;
use sandoff::store::hash::HashingReader;
use sandoff::store::nar::{self, NullVisitor};
use sandoff::store::{HashAlgo, StoreDir, StorePath};
use serde_json::Value;

use crate::build::{text, Store};
use crate::client::upload;
use crate::hosts::{self, TestHost};
use crate::serve::foo_baz;
use crate::support;
use crate::this_test;

/// Files of a real closure (programs and their data), not random bytes:
/// what the test hosts need anyway.
const REAL_FILES: &[&str] = &["/usr/bin/ssh", "/usr/bin/ssh-keygen", "/usr/sbin/sshd"];

/// A client store (not set up for building) holding one path made of
/// [`REAL_FILES`].
struct Client {
    tmp: tempfile::TempDir,
    path: String,
}

impl Client {
    fn new() -> Client {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src/closure");
        std::fs::create_dir_all(&src).expect("mkdir");
        for f in REAL_FILES {
            let name = Path::new(f).file_name().expect("file name");
            std::fs::copy(f, src.join(name)).expect("copy a real file");
        }
        let mut c = Client {
            tmp,
            path: String::new(),
        };
        let out = support::run_ok(c.cmd().args(["store", "add"]).arg(&src));
        c.path = text(&out).trim().to_owned();
        c
    }

    fn cmd(&self) -> Command {
        store_cmd(&self.tmp.path().join("root"))
    }

    /// `sandoff copy --to` of the path to the one machine in `machines`.
    fn copy_to(&self, machines: &Path, machine: &str) -> Output {
        self.cmd()
            .args(["copy", "--json", "--machines"])
            .arg(machines)
            .args(["--to", machine, &self.path])
            .output()
            .expect("run sandoff copy")
    }

    /// The same, which must succeed; its JSON report.
    fn copy_to_ok(&self, machines: &Path, machine: &str) -> Value {
        let out = self.copy_to(machines, machine);
        assert!(out.status.success(), "copy: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("copy --json")
    }

    /// `sandoff machines test` of the machines in `machines`, which must
    /// pass; what it printed.
    fn machines_test(&self, machines: &Path) -> String {
        let out = self
            .cmd()
            .args(["machines", "test", "--machines"])
            .arg(machines)
            .output()
            .expect("run sandoff machines test");
        assert!(out.status.success(), "machines test: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn write_machines(&self, line: &str) -> PathBuf {
        let path = self.tmp.path().join("machines");
        std::fs::write(&path, format!("{line}\n")).expect("write machines");
        path
    }
}

/// sandoff on the store under `root`.
fn store_cmd(root: &Path) -> Command {
    let mut c = support::sandoff();
    c.arg("--store-root")
        .arg(root)
        .env_remove("SANDOFF_USER_POOL_DIR")
        .env_remove("SANDOFF_STORE_DIR")
        .env_remove("SANDOFF_STATE_DIR");
    c
}

/// `line` (a machines line) with `param` added to its store URI's query.
fn with_param(line: &str, param: &str) -> String {
    let (uri, rest) = line.split_once(' ').expect("a machines line");
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{param} {rest}")
}

/// The store URI (the machine's name) of a machines line.
fn name(line: &str) -> &str {
    line.split_whitespace().next().expect("a store URI")
}

/// Whether `path` is valid on the sandoff host.
fn valid_on(host: &TestHost, path: &str) -> bool {
    store_cmd(&host.root())
        .args(["store", "info", path])
        .output()
        .expect("run sandoff store info")
        .status
        .success()
}

/// `s` without ANSI colour sequences (tracing colours its fields).
fn without_colours(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_closure_copied_to_a_sandoff_host_travels_as_zstd_by_default() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 70) else {
        return;
    };
    let c = Client::new();
    let line = host.machine_line();
    let machines = c.write_machines(&line);
    // The listing says what the entry means for this peer.
    let list = support::run_ok(
        c.cmd()
            .args(["machines", "list", "--machines"])
            .arg(&machines),
    );
    assert!(text(&list).contains("compress=zstd:1"), "{}", text(&list));

    let report = c.copy_to_ok(&machines, name(&line));
    assert_eq!(report["compression"], "zstd", "{report}");
    assert_eq!(report["level"], 1, "{report}");
    assert_eq!(report["paths"], 1, "{report}");
    let (plain, wire) = (
        report["sent"]["plain"].as_u64().expect("plain"),
        report["sent"]["wire"].as_u64().expect("wire"),
    );
    // The NAR (and the protocol around it) crossed compressed: programs
    // shrink to well under 3/4 with zstd 1. The host decoded it, or the
    // path would not be valid there, with the NAR hash checked. (The
    // default level, 1.)
    assert!(plain > report["narBytes"].as_u64().expect("narBytes"));
    assert!(wire * 4 < plain * 3, "{report}");
    assert!(valid_on(&host, &c.path));
    support::run_ok(
        store_cmd(&host.root())
            .args(["store", "verify", "--sigs-needed", "0"])
            .arg(&c.path),
    );
    // `machines test` sends a path and fetches it back, compressed, and
    // says so.
    let report = c.machines_test(&machines);
    assert!(
        report.contains("streams compressed: zstd level 1"),
        "{report}"
    );
    assert!(report.contains("NAR hash intact"), "{report}");
}

#[test]
fn compress_false_copies_plain_bytes() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 71) else {
        return;
    };
    let c = Client::new();
    let line = with_param(&host.machine_line(), "compress=false");
    let machines = c.write_machines(&line);
    let list = support::run_ok(
        c.cmd()
            .args(["machines", "list", "--machines"])
            .arg(&machines),
    );
    assert!(text(&list).contains("compress=off"), "{}", text(&list));
    let report = c.copy_to_ok(&machines, name(&line));
    assert_eq!(report["compression"], "none", "{report}");
    assert_eq!(report["sent"]["plain"], report["sent"]["wire"], "{report}");
    assert!(valid_on(&host, &c.path));
}

#[test]
fn a_sandoff_that_does_not_know_compress_is_asked_again_without_it() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 75) else {
        return;
    };
    // A sandoff older than --compress, as clap refuses an unknown option.
    let dir = host.home.join("old");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let wrapper = dir.join("sandoff");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n\
         for a; do case $a in --compress) \
         echo \"error: unexpected argument '--compress' found\" >&2; exit 2;; esac; done\n\
         exec sandoff \"$@\"\n",
    )
    .expect("write wrapper");
    support::run_ok(Command::new("chmod").arg("755").arg(&wrapper));
    let c = Client::new();
    let line = with_param(
        &host.machine_line(),
        &format!("remote-program={}", wrapper.display()),
    );
    let machines = c.write_machines(&line);
    let out = c
        .cmd()
        .env("RUST_LOG", "sandoff=warn")
        .args(["copy", "--json", "--machines"])
        .arg(&machines)
        .args(["--to", name(&line), &c.path])
        .output()
        .expect("run sandoff copy");
    assert!(out.status.success(), "copy: {}", text(&out.stderr));
    let err = without_colours(&text(&out.stderr));
    assert!(err.contains("does not know --compress"), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("copy --json");
    assert_eq!(report["compression"], "none", "{report}");
    assert!(valid_on(&host, &c.path));
}

#[test]
fn a_stock_nix_host_asked_to_compress_gets_ssh_zlib() {
    if !support::require(this_test!(), hosts::NIX_NEEDS) {
        return;
    }
    let host = TestHost::start_nix(72);
    let c = Client::new();
    let line = with_param(&host.machine_line(), "compress=true");
    let machines = c.write_machines(&line);
    let list = support::run_ok(
        c.cmd()
            .args(["machines", "list", "--machines"])
            .arg(&machines),
    );
    assert!(text(&list).contains("compress=ssh-zlib"), "{}", text(&list));
    // Negotiated with the real sshd: `ssh-zlib` is reported only when
    // libssh2 and sshd agreed on a zlib method.
    let report = c.copy_to_ok(&machines, name(&line));
    assert_eq!(report["compression"], "ssh-zlib", "{report}");
    // Nix's serve program saw plain bytes: no zstd was sent its way.
    assert_eq!(report["sent"]["plain"], report["sent"]["wire"], "{report}");
    let check = Command::new(host.serve_program())
        .args(["--check-validity", &c.path])
        .output()
        .expect("run nix-store --check-validity");
    assert!(check.status.success(), "{}", text(&check.stderr));
    let report = c.machines_test(&machines);
    assert!(report.contains("streams compressed: SSH zlib"), "{report}");

    // Without compress=, a stock Nix host gets nothing, as with Nix.
    let plain = c.write_machines(&host.machine_line());
    let list = support::run_ok(c.cmd().args(["machines", "list", "--machines"]).arg(&plain));
    assert!(text(&list).contains("compress=off"), "{}", text(&list));
}

#[test]
fn a_corrupted_compressed_stream_fails_clearly_and_registers_nothing() {
    let Some(host) = TestHost::start_if_ready(this_test!(), 73) else {
        return;
    };
    // A remote program named `sandoff` (so it is asked for zstd) that
    // flips one byte of what the client sends, well past the plain
    // handshake and the first small request: inside the compressed NAR.
    let dir = host.home.join("flip");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let wrapper = dir.join("sandoff");
    // dd passes each byte on at once (head and tr would hold the plain
    // handshake in their buffers); sandoff is exec'd with the channel's
    // stdout and stderr to itself, so that its exit ends the session.
    std::fs::write(
        &wrapper,
        "#!/bin/bash\n\
         exec sandoff \"$@\" < <({ dd bs=1 count=20000; dd bs=1 count=1 | \
         tr '\\000-\\377' '\\377\\000-\\376'; exec cat; } 2>/dev/null)\n",
    )
    .expect("write wrapper");
    support::run_ok(Command::new("chmod").arg("755").arg(&wrapper));
    let c = Client::new();
    let line = with_param(
        &host.machine_line(),
        &format!("remote-program={}", wrapper.display()),
    );
    let machines = c.write_machines(&line);
    let out = c.copy_to(&machines, name(&line));
    assert!(!out.status.success(), "a corrupted stream was accepted");
    let err = text(&out.stderr);
    // zstd notices (a bad block, or the frame's checksum at its end), or
    // else the NAR hash check does: either way the cause is named.
    assert!(
        err.contains("zstd stream from the peer is corrupt") || err.contains("hash"),
        "{err}"
    );
    assert!(!valid_on(&host, &c.path));
    // Nothing of it in the host's store directory either.
    let base = Path::new(&c.path).file_name().expect("base name");
    assert!(!host.root().join("nix/store").join(base).exists());
}

#[test]
fn a_derivation_builds_on_a_sandoff_host_with_zstd_and_without() {
    let test = this_test!();
    if !crate::build::ready(test) || !support::require(test, hosts::NEEDS) {
        return;
    }
    let host = TestHost::start(74);
    let s = Store::new();
    support::run_ok(
        s.cmd()
            .args(["key", "authorize"])
            .arg(host.root().join("nix/var/sandoff/keys/signing-key.pub")),
    );
    let key_name = host
        .signing_public_key()
        .split(':')
        .next()
        .expect("key name")
        .to_owned();
    for (param, says) in [
        ("compress=true", "compression=zstd level 1"),
        ("compress=false", "compression=none"),
    ] {
        let machines = s.tmp.path().join("machines");
        std::fs::write(&machines, with_param(&host.machine_line(), param) + "\n")
            .expect("write machines");
        // The input (busybox) is sent, the build runs there, the output
        // comes back: every kind of stream.
        let d = s.script_drv(
            &format!("zstd-{}", &param[9..]),
            "for i in $(seq 1 5000); do echo line $i of a compressible output; done > $out",
        );
        let out = s
            .cmd()
            .env("RUST_LOG", "sandoff::remote=debug")
            .args(["build", "--machines"])
            .arg(&machines)
            .arg(&d)
            .output()
            .expect("run sandoff build");
        let err = without_colours(&text(&out.stderr));
        assert!(out.status.success(), "{param}: {err}");
        assert!(err.contains(says), "{param}: {err}");
        let info = s.info(&s.out(&d)).expect("output valid here");
        assert!(
            info.signatures.iter().any(|sig| sig.key_name() == key_name),
            "{param}: built elsewhere"
        );
    }
}

/// `sandoff serve --stdio --write --compress zstd:3` on the store at `root`,
/// as a local child.
fn zstd_serve(root: &Path) -> ZstdTransport<ChildTransport> {
    let mut cmd = support::sandoff();
    cmd.args(["serve", "--stdio", "--write", "--compress", "zstd:3"])
        .env("SANDOFF_STORE_ROOT", root)
        .env_remove("SANDOFF_STORE_DIR")
        .env_remove("SANDOFF_STATE_DIR");
    ZstdTransport::new(ChildTransport::spawn(cmd).expect("spawn sandoff serve"))
}

#[test]
fn a_query_sent_with_the_greeting_travels_compressed_and_the_session_stays_in_step() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, top) = foo_baz(&tmp.path().join("src"));
    let both = BTreeSet::from([leaf.clone(), top.clone()]);
    let mut hello = ServeClient::hello(zstd_serve(&tmp.path().join("root")), StoreDir::default());
    // The server switches after reading the client's greeting: the query
    // behind it is compressed before the server's greeting is read.
    hello.transport().start_sending(3).expect("zstd");
    hello.query_valid_paths(&both, true, false);
    let (sent, _) = hello.transport().counts();
    assert!(sent.wire > 16, "the query went out with the greeting");
    let mut client = hello.greeted(None).expect("handshake (plain)");
    client.transport().start_receiving().expect("zstd");
    assert!(client.valid_paths_answer().expect("answer").is_empty());
    upload(&mut client, &src, &both);
    assert_eq!(client.query_valid_paths(&both, false, false).unwrap(), both);
}

#[test]
fn the_client_and_a_local_server_speak_zstd_after_the_handshake() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, leaf, top) = foo_baz(&tmp.path().join("src"));
    let both = BTreeSet::from([leaf.clone(), top.clone()]);
    let mut client = ServeClient::open(zstd_serve(&tmp.path().join("root")), StoreDir::default())
        .expect("handshake (plain)");
    client.transport().start(3).expect("zstd");
    assert!(client
        .query_valid_paths(&both, false, false)
        .expect("QueryValidPaths")
        .is_empty());
    upload(&mut client, &src, &both);
    assert_eq!(client.query_valid_paths(&both, false, false).unwrap(), both);
    // Exactly one NAR is read, checked against the hash it had here.
    let (hash, size) = client
        .dump_store_path(&top, |r| {
            let mut reader = HashingReader::new(r, HashAlgo::Sha256);
            nar::parse(&mut reader, &mut NullVisitor).map(|_| {
                let (hash, size, _) = reader.finish();
                (hash, size)
            })
        })
        .expect("DumpStorePath")
        .expect("a NAR");
    let want = src.query_path_info(&top).unwrap().expect("valid");
    assert_eq!((hash, size), (want.nar_hash, want.nar_size));
    let (sent, received) = client.transport().counts();
    assert!(sent.plain > 0 && received.plain > 0);
    assert_ne!(
        sent,
        ByteCount {
            plain: sent.plain,
            wire: sent.plain
        },
        "nothing was compressed"
    );

    // A refusal still comes through, on stderr, and ends the session.
    let missing = StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap();
    let err = client
        .dump_store_path(&missing, |r| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(r, &mut v).map(|_| v)
        })
        .expect_err("refused");
    assert!(
        matches!(&err, ClientError::Refused { reason, .. } if reason.contains("is not valid")),
        "{err}"
    );
    let status = client.into_transport().into_inner().close().expect("close");
    assert!(!status.success());
}

#[test]
fn a_corrupted_reply_stream_fails_the_download_and_stages_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, _, _) = foo_baz(&tmp.path().join("src"));
    // 200 KB of hex from a simple generator: it compresses about 2x, so
    // its NAR is by far the largest reply, and byte 3000 of the replies
    // after the handshake falls inside it.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big_text: String = (0..25_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:08x}", x as u32)
        })
        .collect();
    let big = src
        .add_text(
            "big",
            big_text.as_bytes(),
            &BTreeSet::new(),
            &Default::default(),
        )
        .expect("add big");
    let one = BTreeSet::from([big.clone()]);
    // The server's stdout goes through a flipper of byte 16 + 3000 (past
    // the plain handshake); sandoff is exec'd so that its exit ends it.
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(
            "exec \"$0\" serve --stdio --write --compress zstd:1 > >({ dd bs=1 count=3016; \
             dd bs=1 count=1 | tr '\\000-\\377' '\\377\\000-\\376'; exec cat; } 2>/dev/null)",
        )
        .arg(env!("CARGO_BIN_EXE_sandoff"))
        .env("SANDOFF_STORE_ROOT", tmp.path().join("root"))
        .env_remove("SANDOFF_STORE_DIR")
        .env_remove("SANDOFF_STATE_DIR");
    let transport = ZstdTransport::new(ChildTransport::spawn(cmd).expect("spawn"));
    let mut client = ServeClient::open(transport, StoreDir::default()).expect("handshake");
    client.transport().start(1).expect("zstd");
    let loc = src.location();
    client
        .import_paths(|w| {
            let info = src.query_path_info(&big).unwrap().expect("valid");
            let path = loc.real_path(&big);
            write_export(w, &loc.dir, [(&info, path.as_path())])
        })
        .expect("ImportPaths")
        .expect("export");
    assert_eq!(client.query_valid_paths(&one, false, false).unwrap(), one);
    let dst = crate::serve::open(&tmp.path().join("dst"));
    let res = client.dump_store_path(&big, |r| dst.stage_nar(r));
    let err = match res {
        Ok(Ok(_)) => panic!("a corrupted NAR stream was read without error"),
        Ok(Err(e)) => e.to_string() + &format!("{:?}", e),
        Err(e) => e.to_string() + &format!("{:?}", e),
    };
    assert!(
        err.contains("zstd stream from the peer is corrupt") || err.contains("hash"),
        "{err}"
    );
    assert!(!dst.is_valid(&big).unwrap());
}
