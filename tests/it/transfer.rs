//! Keys, signatures and export archives against Nix 2.8: what one side
//! writes, the other accepts; what is tampered with, truncated or untrusted
//! is refused and leaves nothing behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sandoff::store::export::{ExportError, ExportWriter};
use sandoff::store::signature::{PublicKey, SecretKey};
use sandoff::store::{Hash, StoreDir, ValidPathInfo};

use crate::support;
use crate::this_test;

const FOO: &str = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";
const BAZ: &str = support::NIX_BAZ;

/// A scratch directory with a Nix config and Nix's chroot store at `root/`.
struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    fn nix(&self, program: &str) -> Command {
        support::nix_cmd(program, &self.path("nixconf"))
    }
    /// `nix` with the chroot store `store` (a directory name in the scratch dir).
    fn nix_store_cmd(&self, program: &str, store: &str) -> Command {
        let mut c = self.nix(program);
        c.arg("--store").arg(self.path(store));
        c
    }
    /// sandoff with its store under `root` (a directory name in the scratch dir).
    fn sandoff(&self, root: &str) -> Command {
        let mut c = support::sandoff();
        c.env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR");
        c.arg("--store-root").arg(self.path(root));
        c
    }
    /// Creates `foo` and `baz` (which refers to `foo`) in Nix's store `store`.
    fn nix_foo_baz(&self, store: &str) {
        support::nix_foo_baz(&self.path("nixconf"), &self.path(store));
    }
    /// `nix path-info --json --sigs` of one path.
    fn nix_path_info(&self, store: &str, path: &str) -> serde_json::Value {
        let out = support::run_ok(self.nix_store_cmd("nix", store).args([
            "path-info",
            "--json",
            "--sigs",
            path,
        ]));
        let json: serde_json::Value = serde_json::from_slice(&out).expect("path-info json");
        json[0].clone()
    }
}

fn run_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    // A refusing reader may close its end early; that is part of some tests.
    support::output_after_writing(cmd, input).0
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `out` failed, saying `why` on stderr.
fn assert_refused(out: &Output, why: &str) {
    assert!(!out.status.success());
    assert!(stderr(out).contains(why), "{}", stderr(out));
}

/// `out` is of an import that succeeded and printed foo and baz, in order.
fn assert_imported_foo_and_baz(out: &Output) {
    assert!(out.status.success(), "import: {}", stderr(out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{FOO}\n{BAZ}\n")
    );
}

/// `nix-store --import` of `archive` into Nix's store `dst`, which then
/// verifies both paths.
fn nix_imports_and_verifies(s: &Scratch, archive: &[u8]) {
    let out = run_stdin(s.nix_store_cmd("nix-store", "dst").arg("--import"), archive);
    assert_imported_foo_and_baz(&out);
    support::run_ok(
        s.nix_store_cmd("nix-store", "dst")
            .args(["--verify-path", FOO, BAZ]),
    );
}

/// `sandoff store verify <args>` in the store at `root`.
fn verify(s: &Scratch, root: &str, args: &[&str]) -> Output {
    s.sandoff(root)
        .args(["store", "verify"])
        .args(args)
        .output()
        .unwrap()
}

/// Nothing of foo or baz is in the store at `root`.
fn assert_no_foo_or_baz(s: &Scratch, root: &str) {
    assert!(!store_entries(&s.path(root))
        .iter()
        .any(|e| e.ends_with("-foo") || e.ends_with("-baz")));
}

fn info_from_json(j: &serde_json::Value, dir: &StoreDir) -> ValidPathInfo {
    ValidPathInfo {
        path: dir
            .parse_path(j["path"].as_str().expect("path"))
            .expect("store path"),
        deriver: None,
        nar_hash: Hash::parse_any_prefixed(j["narHash"].as_str().expect("narHash")).expect("hash"),
        nar_size: j["narSize"].as_u64().expect("narSize"),
        references: j["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(|r| dir.parse_path(r.as_str().expect("ref")).expect("ref path"))
            .collect(),
        registration_time: 0,
        ultimate: false,
        signatures: BTreeSet::new(),
        ca: None,
    }
}

/// Entries of the store directory under a root (to see what an import left).
fn store_entries(root: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(root.join("nix/store")) {
        Ok(rd) => rd
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Byte offset of the `n`th (0-based) occurrence of `needle`.
fn nth_occurrence(hay: &[u8], needle: &[u8], n: usize) -> usize {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .nth(n)
        .expect("occurrence")
        .0
}

#[test]
fn sandoff_key_signs_like_nix_and_nix_trusts_it() {
    if !support::require_programs(this_test!(), &["nix"]) {
        return;
    }
    let s = Scratch::new();
    let (sk, pk) = generate_key(&s, "");
    s.nix_foo_baz("nix");
    support::run_ok(
        s.nix_store_cmd("nix", "nix")
            .args(["store", "sign", "--key-file"])
            .arg(&sk)
            .arg(BAZ),
    );
    let j = s.nix_path_info("nix", BAZ);
    let dir = StoreDir::default();
    let info = info_from_json(&j, &dir);
    let ours = SecretKey::read_file(&sk)
        .unwrap()
        .sign_path(&info, &dir)
        .unwrap();
    assert_eq!(j["signatures"], serde_json::json!([ours.to_string()]));
    // Nix verifies with sandoff's public key file.
    let pk_text = std::fs::read_to_string(&pk).unwrap();
    support::run_ok(s.nix_store_cmd("nix", "nix").args([
        "store",
        "verify",
        "--sigs-needed",
        "1",
        "--trusted-public-keys",
        &pk_text,
        BAZ,
    ]));
    assert!(PublicKey::read_file(&pk)
        .unwrap()
        .verify(&info.fingerprint(&dir), &ours));
}

#[test]
fn nix_imports_signed_sandoff_archive() {
    if !support::require_programs(this_test!(), &["nix-store", "nix"]) {
        return;
    }
    let s = Scratch::new();
    s.nix_foo_baz("src");
    let dir = StoreDir::default();
    let key = SecretKey::generate("sandoff-test-1").unwrap();
    // The NARs come from `nix-store --dump`; the archive from sandoff's writer.
    let mut writer = ExportWriter::new(Vec::new(), dir.clone());
    for path in [FOO, BAZ] {
        let physical = s.path("src").join(path.trim_start_matches('/'));
        let nar = support::run_ok(s.nix("nix-store").arg("--dump").arg(&physical));
        let mut info = info_from_json(&s.nix_path_info("src", path), &dir);
        info.signatures.insert(key.sign_path(&info, &dir).unwrap());
        writer
            .write_entry_with(&info, |w| w.write_all(&nar).map_err(ExportError::Write))
            .unwrap();
    }
    let archive = writer.finish().unwrap();
    nix_imports_and_verifies(&s, &archive);
    // Nix reads the signature trailer and drops it, as for its own imports.
    let j = s.nix_path_info("dst", BAZ);
    assert_eq!(j["references"], serde_json::json!([FOO]));
    assert!(
        j.get("signatures")
            .is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty())),
        "{j}"
    );
}

// ---------------------------------------------------------------------------
// Through sandoff's own store.

/// Nix's export of foo and baz, unsigned.
fn nix_export(s: &Scratch) -> Vec<u8> {
    s.nix_foo_baz("nix");
    support::run_ok(
        s.nix_store_cmd("nix-store", "nix")
            .args(["--export", FOO, BAZ]),
    )
}

/// Imports `archive` into sandoff's store at `root` with extra arguments.
fn sandoff_import(s: &Scratch, root: &str, args: &[&str], archive: &[u8]) -> Output {
    run_stdin(
        s.sandoff(root).args(["store", "import"]).args(args),
        archive,
    )
}

fn needs_nix(test: &str) -> bool {
    support::require_programs(test, &["nix-store", "nix"])
}

/// For the tests of [`nix_export`]: after [`needs_nix`], the scratch
/// directory and the archive.
fn nix_export_ready(test: &str) -> Option<(Scratch, Vec<u8>)> {
    if !needs_nix(test) {
        return None;
    }
    let s = Scratch::new();
    let archive = nix_export(&s);
    Some((s, archive))
}

#[test]
fn nix_archive_imports_only_without_signature_checks() {
    let Some((s, archive)) = nix_export_ready(this_test!()) else {
        return;
    };
    let out = sandoff_import(&s, "a", &[], &archive);
    assert_refused(
        &out,
        &format!("path '{FOO}' lacks a signature by a trusted key (it has no signatures)"),
    );
    assert!(out.stdout.is_empty());
    assert_no_foo_or_baz(&s, "a");

    let out = sandoff_import(&s, "a", &["--no-check-sigs"], &archive);
    assert_imported_foo_and_baz(&out);
    let out = verify(&s, "a", &[FOO, BAZ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Unsigned paths export byte for byte as Nix exported them.
    assert_eq!(
        support::run_ok(s.sandoff("a").args(["store", "export", FOO, BAZ])),
        archive
    );
}

#[test]
fn sandoff_export_is_imported_and_verified_by_nix() {
    let Some((s, archive, _)) = signed_archive_ready(this_test!()) else {
        return;
    };
    // Named in reverse: the archive still comes dependencies first.
    let ours = support::run_ok(s.sandoff("a").args(["store", "export", BAZ, FOO]));
    assert_eq!(ours, archive);
    nix_imports_and_verifies(&s, &ours);
}

/// `sandoff key generate sandoff-test-1 <prefix>sk <prefix>pk` in the scratch dir.
fn generate_key(s: &Scratch, prefix: &str) -> (PathBuf, PathBuf) {
    let (sk, pk) = (
        s.path(&format!("{prefix}sk")),
        s.path(&format!("{prefix}pk")),
    );
    support::run_ok(
        support::sandoff()
            .args(["key", "generate", "sandoff-test-1"])
            .arg(&sk)
            .arg(&pk),
    );
    (sk, pk)
}

/// A store `a` holding foo and baz signed by a fresh key; returns its
/// signed archive and the key files.
fn signed_archive(s: &Scratch) -> (Vec<u8>, PathBuf, PathBuf) {
    let archive = nix_export(s);
    let out = sandoff_import(s, "a", &["--no-check-sigs"], &archive);
    assert!(out.status.success(), "{}", stderr(&out));
    let (sk, pk) = generate_key(s, "");
    support::run_ok(
        s.sandoff("a")
            .args(["store", "sign", "--key-file"])
            .arg(&sk)
            .args([FOO, BAZ]),
    );
    (
        support::run_ok(s.sandoff("a").args(["store", "export", FOO, BAZ])),
        sk,
        pk,
    )
}

/// For the tests of [`signed_archive`]: after [`needs_nix`], the scratch
/// directory, the archive and the public key file.
fn signed_archive_ready(test: &str) -> Option<(Scratch, Vec<u8>, PathBuf)> {
    if !needs_nix(test) {
        return None;
    }
    let s = Scratch::new();
    let (archive, _, pk) = signed_archive(&s);
    Some((s, archive, pk))
}

/// What an import that adds nothing leaves in the store at `root` (locks,
/// links...).
fn entries_of_an_empty_import(s: &Scratch, root: &str) -> BTreeSet<String> {
    let out = sandoff_import(s, root, &[], &[0u8; 8]);
    assert!(out.status.success(), "{}", stderr(&out));
    store_entries(&s.path(root))
}

/// The entries of the store at `root` that are not in `before`.
fn entries_since(s: &Scratch, root: &str, before: &BTreeSet<String>) -> BTreeSet<String> {
    store_entries(&s.path(root))
        .difference(before)
        .cloned()
        .collect()
}

#[test]
fn signed_archive_imports_with_trusted_key_only() {
    let Some((s, archive, pk)) = signed_archive_ready(this_test!()) else {
        return;
    };
    // No trusted keys at all (no <state>/trusted-keys).
    let out = sandoff_import(&s, "b", &[], &archive);
    assert_refused(&out, "signature by unknown key 'sandoff-test-1'");
    // Another key of the same name is not trusted either.
    let (_, other) = generate_key(&s, "other.");
    let out = sandoff_import(
        &s,
        "b",
        &["--trusted-keys", other.to_str().unwrap()],
        &archive,
    );
    assert_refused(&out, "does not match the fingerprint");
    assert_no_foo_or_baz(&s, "b");
    // The right key, from the default file <state>/trusted-keys.
    let state = s.path("b/nix/var/sandoff");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::copy(&pk, state.join("trusted-keys")).unwrap();
    let out = sandoff_import(&s, "b", &[], &archive);
    assert_imported_foo_and_baz(&out);
    // The signatures travelled: b can verify them.
    let out = verify(&s, "b", &["--sigs-needed", "1", FOO, BAZ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn tampered_archive_keeps_earlier_paths_and_nothing_of_the_bad_one() {
    let Some((s, archive, pk)) = signed_archive_ready(this_test!()) else {
        return;
    };
    let pk = pk.to_str().unwrap().to_owned();
    // baz's NAR holds the path of foo: the second occurrence of it in the
    // archive (after foo's own metadata). Flip its last byte.
    let at = nth_occurrence(&archive, FOO.as_bytes(), 1) + FOO.len() - 1;
    let mut tampered = archive.clone();
    tampered[at] ^= 0x01;
    let before = entries_of_an_empty_import(&s, "b");
    let out = sandoff_import(&s, "b", &["--trusted-keys", &pk], &tampered);
    assert_refused(
        &out,
        &format!("path '{BAZ}' lacks a signature by a trusted key"),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{FOO}\n"),
        "foo came first and stays"
    );
    let after = entries_since(&s, "b", &before);
    assert_eq!(
        after,
        BTreeSet::from([FOO.trim_start_matches("/nix/store/").to_owned()]),
        "no trace of baz"
    );

    // A broken NAR token is refused before anything of it is kept.
    let at = nth_occurrence(&archive, b"contents", 1);
    let mut broken = archive;
    broken[at] = b'k';
    let out = sandoff_import(&s, "c", &["--trusted-keys", &pk], &broken);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{FOO}\n"));
    assert!(!store_entries(&s.path("c"))
        .iter()
        .any(|e| e.ends_with("-baz")));
}

#[test]
fn truncated_archives_are_refused() {
    let Some((s, archive, pk)) = signed_archive_ready(this_test!()) else {
        return;
    };
    let pk = pk.to_str().unwrap().to_owned();
    // What an import that adds nothing leaves in a store (locks, links...).
    let baseline = entries_of_an_empty_import(&s, "base");
    // In the first NAR, in foo's metadata, in baz's NAR: nothing of the
    // entry being read stays. In the end marker: both entries were complete.
    let foo_meta = nth_occurrence(&archive, b"NIXE", 0);
    let baz_nar = nth_occurrence(&archive, FOO.as_bytes(), 1);
    let cases = [
        (20, 0),
        (foo_meta + 12, 0),
        (baz_nar + 5, 1),
        (archive.len() - 8, 2),
    ];
    for (n, (cut, complete)) in cases.into_iter().enumerate() {
        let root = format!("t{n}");
        let out = sandoff_import(&s, &root, &["--trusted-keys", &pk], &archive[..cut]);
        assert!(!out.status.success(), "cut at {cut}");
        // Cuts inside a NAR are reported by the NAR reader in its own words.
        let err = stderr(&out);
        assert!(
            err.contains("truncated") || err.contains("unexpected end of NAR"),
            "cut at {cut}: {err}"
        );
        let expected = [FOO, BAZ][..complete]
            .iter()
            .map(|p| format!("{p}\n"))
            .collect::<String>();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            expected,
            "cut at {cut}"
        );
        let left = entries_since(&s, &root, &baseline);
        let kept: BTreeSet<String> = [FOO, BAZ][..complete]
            .iter()
            .map(|p| p.trim_start_matches("/nix/store/").to_owned())
            .collect();
        assert_eq!(
            left, kept,
            "cut at {cut}: nothing but complete entries is left"
        );
    }
}

#[test]
fn verify_reports_corrupted_and_untrusted_paths() {
    let Some((s, archive)) = nix_export_ready(this_test!()) else {
        return;
    };
    assert!(sandoff_import(&s, "a", &["--no-check-sigs"], &archive)
        .status
        .success());
    let out = verify(&s, "a", &["--sigs-needed", "1", FOO]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("path '{FOO}': untrusted")),
        "{}",
        stderr(&out)
    );

    let file = s.path("a").join(FOO.trim_start_matches('/'));
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, "baz").unwrap();
    let out = verify(&s, "a", &[FOO, BAZ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("path '{FOO}': corrupted")), "{err}");
    assert!(!err.contains(&format!("path '{BAZ}'")), "{err}");
    assert!(err.contains("1 of 2 paths failed verification"), "{err}");
}

#[test]
fn key_authorize_makes_import_trust_the_key_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    support::run_ok(
        support::sandoff()
            .args(["key", "generate", "demo-1"])
            .arg(&sk)
            .arg(&pk),
    );
    let in_state = || {
        let mut c = support::sandoff();
        c.arg("--state-dir").arg(&state);
        c
    };
    // No machine key yet: a clear error that says what to do.
    let out = in_state().args(["key", "show"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandoff setup"));
    support::run_ok(in_state().args(["key", "authorize"]).arg(&pk));
    let trusted = std::fs::read_to_string(state.join("trusted-keys")).unwrap();
    assert_eq!(trusted.trim_end(), std::fs::read_to_string(&pk).unwrap());
    // Authorizing again adds nothing.
    support::run_ok(in_state().args(["key", "authorize"]).arg(&pk));
    assert_eq!(
        std::fs::read_to_string(state.join("trusted-keys")).unwrap(),
        trusted
    );
}
