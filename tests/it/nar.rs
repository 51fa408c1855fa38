//! NAR: golden fixtures from Nix 2.8, oracle tests against `nix-store
//! --dump/--restore` and `nix-hash`, and the `sandoff nar|hash` commands.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sandoff::store::nar::{self, NarError, NullVisitor};

use crate::support;
use crate::this_test;

const TREES: [&str; 4] = ["d", "odd", "file", "link"];

fn fixture_dir() -> PathBuf {
    support::fixtures().join("nar")
}

/// Builds the fixture trees under `<tmp>/trees` with the same script regen.sh uses.
fn build_trees(tmp: &Path) -> PathBuf {
    let dir = tmp.join("trees");
    support::run_ok(
        Command::new("bash")
            .arg(fixture_dir().join("build-trees.sh"))
            .arg(&dir),
    );
    dir
}

struct Golden {
    name: String,
    hex: String,
    nix32: String,
    size: u64,
}

fn golden_hashes() -> Vec<Golden> {
    let text = std::fs::read_to_string(fixture_dir().join("hashes.txt")).expect("read hashes.txt");
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Golden {
                name: f[0].into(),
                hex: f[1].into(),
                nix32: f[2].into(),
                size: f[3].parse().expect("size"),
            }
        })
        .collect()
}

fn dump_vec(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    nar::dump(path, &mut out).unwrap_or_else(|e| panic!("dump {}: {e}", path.display()));
    out
}

#[test]
fn dump_matches_golden_nars_from_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let trees = build_trees(tmp.path());
    let golden = golden_hashes();
    assert_eq!(golden.len(), TREES.len());
    for g in golden {
        let want = std::fs::read(fixture_dir().join(format!("{}.nar", g.name))).unwrap();
        let got = dump_vec(&trees.join(&g.name));
        assert!(
            got == want,
            "NAR of tree '{}' differs from the golden one",
            g.name
        );
        let (hash, size) = nar::hash_path(&trees.join(&g.name)).unwrap();
        assert_eq!(hash.to_base16(), g.hex, "{}", g.name);
        assert_eq!(hash.to_nix32(), g.nix32, "{}", g.name);
        assert_eq!(size, g.size, "{}", g.name);
    }
}

#[test]
fn reference_vector_tree_d() {
    // formats.md §4.
    let tmp = tempfile::tempdir().unwrap();
    let trees = build_trees(tmp.path());
    let (hash, size) = nar::hash_path(&trees.join("d")).unwrap();
    assert_eq!(
        hash.to_base16(),
        "6c01ab4fdd85148deb9764095d88cda92c8d190101b28046748bf5c6ffbd231c"
    );
    assert_eq!(
        hash.to_nix32(),
        "0713ppzwdxcbfi381ch104cqsb59rn45s2b4jzmqs545vm7sn0bc"
    );
    assert_eq!(size, 1072);
}

#[test]
fn golden_nars_parse_restore_and_dump_back_identically() {
    let tmp = tempfile::tempdir().unwrap();
    for name in TREES {
        let bytes = std::fs::read(fixture_dir().join(format!("{name}.nar"))).unwrap();
        assert_eq!(
            nar::parse(&mut Cursor::new(&bytes), &mut NullVisitor).unwrap(),
            bytes.len() as u64
        );
        let dest = tmp.path().join(name);
        nar::restore(&mut Cursor::new(&bytes), &dest).unwrap();
        assert!(
            dump_vec(&dest) == bytes,
            "restored '{name}' dumps differently"
        );
    }
}

#[test]
fn golden_nars_reject_every_truncation() {
    let bytes = std::fs::read(fixture_dir().join("odd.nar")).unwrap();
    for cut in (0..bytes.len()).step_by(7) {
        match nar::parse(&mut Cursor::new(&bytes[..cut]), &mut NullVisitor) {
            Err(NarError::UnexpectedEof { pos }) => assert_eq!(pos, cut as u64),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

/// A fresh Nix configuration and chroot store root for one test.
struct NixEnv {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    store: PathBuf,
    work: PathBuf,
}

impl NixEnv {
    /// A new environment, if Nix's tools are there (see [`needs_nix`]).
    fn ready(test: &str) -> Option<NixEnv> {
        needs_nix(test).then(NixEnv::new)
    }

    fn new() -> NixEnv {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("conf");
        let store = tmp.path().join("root");
        let work = tmp.path().join("work");
        std::fs::create_dir(&work).unwrap();
        NixEnv {
            conf,
            store,
            work,
            _tmp: tmp,
        }
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = support::nix_cmd(program, &self.conf);
        c.arg("--store").arg(&self.store);
        c
    }

    fn nix_dump(&self, path: &Path) -> Vec<u8> {
        support::run_ok(self.cmd("nix-store").arg("--dump").arg(path))
    }

    fn nix_restore(&self, bytes: &[u8], dest: &Path) {
        let out =
            support::output_with_input(self.cmd("nix-store").arg("--restore").arg(dest), bytes);
        assert!(
            out.status.success(),
            "nix-store --restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn nix_hash(&self, path: &Path, base32: bool) -> String {
        let mut c = support::nix_cmd("nix-hash", &self.conf);
        c.args(["--type", "sha256"]);
        if base32 {
            c.arg("--base32");
        }
        String::from_utf8(support::run_ok(c.arg(path)))
            .unwrap()
            .trim_end()
            .to_owned()
    }
}

fn needs_nix(test: &str) -> bool {
    support::require_programs(test, &["nix-store", "nix-hash"])
}

#[test]
fn dump_and_hash_agree_with_nix_on_odd_trees() {
    let Some(env) = NixEnv::ready(this_test!()) else {
        return;
    };
    let trees = build_trees(&env.work);
    for name in TREES {
        let p = trees.join(name);
        assert!(
            dump_vec(&p) == env.nix_dump(&p),
            "dump of '{name}' differs from nix-store --dump"
        );
        for base32 in [false, true] {
            let mut c = support::sandoff();
            c.args(["hash", "path"]);
            if base32 {
                c.arg("--base32");
            }
            let ours = String::from_utf8(support::run_ok(c.arg(&p))).unwrap();
            assert_eq!(
                ours,
                format!("{}\n", env.nix_hash(&p, base32)),
                "{name} base32={base32}"
            );
        }
    }
}

#[test]
fn nix_restores_our_nars_and_we_restore_nix_nars() {
    let Some(env) = NixEnv::ready(this_test!()) else {
        return;
    };
    let trees = build_trees(&env.work);
    for name in TREES {
        let ours = dump_vec(&trees.join(name));
        // Ours, restored by Nix, dumps (by Nix) to the same bytes.
        let by_nix = env.work.join(format!("{name}-by-nix"));
        env.nix_restore(&ours, &by_nix);
        assert!(
            env.nix_dump(&by_nix) == ours,
            "nix-store --restore of our '{name}' dumps differently"
        );
        // Nix's, restored by us, dumps (by Nix) to the same bytes.
        let theirs = env.nix_dump(&trees.join(name));
        let by_us = env.work.join(format!("{name}-by-us"));
        nar::restore(&mut Cursor::new(&theirs), &by_us).unwrap();
        assert!(
            env.nix_dump(&by_us) == theirs,
            "our restore of Nix's '{name}' dumps differently"
        );
    }
}

#[test]
fn dump_agrees_with_nix_on_a_generated_tree() {
    // Many entries (directories with enough files to be read by two threads),
    // sizes around the padding boundaries and a file large enough to be read
    // ahead on a helper thread.
    let Some(env) = NixEnv::ready(this_test!()) else {
        return;
    };
    let root = env.work.join("gen");
    std::fs::create_dir(&root).unwrap();
    for i in 0..300usize {
        let dir = root.join(format!("d{}", i % 17));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), vec![i as u8; i % 23]).unwrap();
    }
    let big: Vec<u8> = (0..(9 << 20) + 5).map(|i: usize| (i % 251) as u8).collect();
    std::fs::write(root.join("big"), big).unwrap();
    let ours = dump_vec(&root);
    assert!(
        ours == env.nix_dump(&root),
        "dump of a generated tree differs from nix-store --dump"
    );
    let out = support::run_ok(support::sandoff().args(["hash", "path"]).arg(&root));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{}\n", env.nix_hash(&root, false))
    );
}

// ---- CLI ----

fn sandoff_with_stdin(args: &[&str], extra: &[&Path], stdin: &[u8]) -> std::process::Output {
    // The process may exit before reading everything; that is not our failure.
    support::output_after_writing(support::sandoff().args(args).args(extra), stdin).0
}

#[test]
fn cli_dump_then_restore_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let trees = build_trees(tmp.path());
    for name in TREES {
        let nar_bytes = support::run_ok(
            support::sandoff()
                .args(["nar", "dump"])
                .arg(trees.join(name)),
        );
        let golden = std::fs::read(fixture_dir().join(format!("{name}.nar"))).unwrap();
        assert!(
            nar_bytes == golden,
            "sandoff nar dump {name} differs from the golden NAR"
        );
        let dest = tmp.path().join(format!("{name}-restored"));
        let out = sandoff_with_stdin(&["nar", "restore"], &[&dest], &nar_bytes);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dump_vec(&dest) == golden);
    }
}

#[track_caller]
fn assert_one_line_failure(out: &std::process::Output, want: &str) {
    assert_eq!(out.status.code(), Some(1), "exit status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("sandoff: "), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(err.contains(want), "expected '{want}' in: {err}");
}

#[test]
fn cli_restore_of_bad_nar_fails_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture_dir().join("odd.nar")).unwrap();
    let dest = tmp.path().join("out");

    // Truncated in the middle: part of the tree was already created.
    let out = sandoff_with_stdin(&["nar", "restore"], &[&dest], &good[..good.len() / 2]);
    assert_one_line_failure(&out, "unexpected end of NAR at byte");
    assert!(
        dest.symlink_metadata().is_err(),
        "partial tree left at DEST"
    );

    // Not a NAR at all.
    let out = sandoff_with_stdin(
        &["nar", "restore"],
        &[&dest],
        b"hello world, this is no archive",
    );
    assert_one_line_failure(&out, "doesn't look like a Nix archive");
    assert!(dest.symlink_metadata().is_err());

    // A whole NAR followed by a byte.
    let mut trailing = good.clone();
    trailing.push(b'\n');
    let out = sandoff_with_stdin(&["nar", "restore"], &[&dest], &trailing);
    assert_one_line_failure(
        &out,
        &format!("trailing data after NAR at byte {}", good.len()),
    );
    assert!(dest.symlink_metadata().is_err());

    // Existing destination is left alone.
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("mine"), b"keep").unwrap();
    let out = sandoff_with_stdin(&["nar", "restore"], &[&dest], &good);
    assert_one_line_failure(&out, "already exists");
    assert_eq!(std::fs::read(dest.join("mine")).unwrap(), b"keep");
}

#[test]
fn cli_hash_path_prints_hex_nix32_and_sri() {
    let tmp = tempfile::tempdir().unwrap();
    let trees = build_trees(tmp.path());
    let d = trees.join("d");
    let run = |flag: Option<&str>| {
        let mut c = support::sandoff();
        c.args(["hash", "path"]);
        c.args(flag);
        String::from_utf8(support::run_ok(c.arg(&d))).unwrap()
    };
    assert_eq!(
        run(None),
        "6c01ab4fdd85148deb9764095d88cda92c8d190101b28046748bf5c6ffbd231c\n"
    );
    assert_eq!(
        run(Some("--base32")),
        "0713ppzwdxcbfi381ch104cqsb59rn45s2b4jzmqs545vm7sn0bc\n"
    );
    assert_eq!(
        run(Some("--sri")),
        "sha256-bAGrT92FFI3rl2QJXYjNqSyNGQEBsoBGdIv1xv+9Ixw=\n"
    );
}

#[test]
fn cli_refuses_unsupported_file_types() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    support::run_ok(Command::new("mkfifo").arg(&fifo));
    let out = support::sandoff()
        .args(["hash", "path"])
        .arg(&fifo)
        .output()
        .unwrap();
    assert_one_line_failure(&out, "is a fifo");
    let out = support::sandoff()
        .args(["nar", "dump"])
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert_one_line_failure(&out, "missing");
}

#[test]
fn cli_dump_into_a_closed_pipe_is_not_an_error() {
    // The reader of a pipe may stop early (`sandoff nar dump x | head -c 10`).
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big");
    std::fs::write(&big, vec![7u8; 4 << 20]).unwrap();
    let mut child = support::sandoff()
        .args(["nar", "dump"])
        .arg(&big)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut head).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&head, b"\x0d\0\0\0\0\0\0\0ni");
}
