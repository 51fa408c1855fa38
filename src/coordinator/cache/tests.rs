//! Tests of the cache: uploads, every kind of claim, and that nothing of a
//! refused upload is left anywhere.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::*;
use crate::store::nar::{self, NarError};
use crate::store::signature::SecretKey;
use crate::store::{Hash, HashAlgo};

fn fixture_drv(base: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/drv/nix-store")
        .join(base)
}

fn sp(base: &str) -> StorePath {
    StorePath::from_base_name(base).expect("store path")
}

struct Fixture {
    _tmp: tempfile::TempDir,
    cache: Cache,
}

fn cache() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = SecretKey::generate("cache-test-1").expect("key");
    let cache = Cache::open(&tmp.path().join("cache"), StoreDir::default(), key).expect("open");
    Fixture { _tmp: tmp, cache }
}

/// A node of a tree to archive.
enum T<'a> {
    File(&'a [u8]),
    Exe(&'a [u8]),
    Dir(Vec<(&'a str, T<'a>)>),
}

fn materialise(path: &Path, t: &T) {
    match t {
        T::File(d) | T::Exe(d) => {
            std::fs::write(path, d).expect("write");
            let mode = if matches!(t, T::Exe(_)) { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        T::Dir(entries) => {
            std::fs::create_dir(path).expect("mkdir");
            for (n, c) in entries {
                materialise(&path.join(n), c);
            }
        }
    }
}

/// The NAR of a tree.
fn nar_of(t: &T) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = tmp.path().join("x");
    materialise(&p, t);
    let mut out = Vec::new();
    nar::dump(&p, &mut out).expect("dump");
    out
}

fn zst(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).expect("compress")
}

fn upload(c: &Cache, id: &str, bytes: &[u8]) -> UploadId {
    let id = UploadId::new(id).expect("id");
    c.discard(&id).expect("discard");
    c.append(&id, 0, &mut &bytes[..], u64::MAX).expect("append");
    id
}

fn claim(path: &StorePath, kind: ClaimKind, candidates: &[&StorePath]) -> Claim {
    Claim {
        path: path.clone(),
        kind,
        candidates: candidates.iter().map(|p| (*p).clone()).collect(),
        nar_hash: None,
        nar_size: None,
        deriver: None,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Nothing entered the cache and no upload or temporary file is left.
fn assert_nothing_kept(c: &Cache) {
    assert!(names(&c.dir().join("nar")).is_empty(), "nar/ is not empty");
    assert!(
        names(&c.dir().join("uploads")).is_empty(),
        "uploads/ is not empty"
    );
    assert!(names(&c.dir().join("drv")).is_empty(), "drv/ is not empty");
    let top = names(c.dir());
    assert_eq!(top, ["drv", "log", "nar", "nix-cache-info", "uploads"]);
}

/// Uploads `bytes` and finishes it against `claim`, expecting a refusal.
fn refused(c: &Cache, bytes: &[u8], claim: &Claim) -> Rejection {
    let id = upload(c, "refused", bytes);
    match c.finish(&id, claim) {
        Err(CacheError::Rejected { path, reason }) => {
            assert_eq!(path, c.store_dir().display(&claim.path));
            reason
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

const OUT: &str = "7rjj86a15146cq1d3qy068lml7n8ykzm-out";
const DEP: &str = "5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz";
const OTHER: &str = "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";

fn output_nar() -> Vec<u8> {
    nar_of(&T::Dir(vec![
        (
            "bin",
            T::Dir(vec![(
                "x",
                T::Exe(b"#!/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz/bin/sh\n"),
            )]),
        ),
        (
            "self",
            T::File(b"/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-out\n"),
        ),
    ]))
}

#[test]
fn opens_with_nix_cache_info_and_layout() {
    let f = cache();
    let info = std::fs::read_to_string(f.cache.dir().join("nix-cache-info")).unwrap();
    assert_eq!(
        info,
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
    );
    assert_nothing_kept(&f.cache);
    // Opening again keeps what is there.
    let key = SecretKey::generate("cache-test-1").unwrap();
    Cache::open(f.cache.dir(), StoreDir::default(), key).unwrap();
    assert_nothing_kept(&f.cache);
}

#[test]
fn upload_ids_are_safe_file_names() {
    for ok in ["b42-out", "src-5xd714cbfnkz02h2vbsj4fm03x3f15nf", "a.b_c"] {
        assert!(UploadId::new(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        ".hidden",
        "-x",
        "a b",
        &"x".repeat(129),
    ] {
        assert!(UploadId::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn uploads_resume_in_pieces_and_refuse_a_wrong_offset() {
    let f = cache();
    let c = &f.cache;
    let bytes = zst(&output_nar());
    let id = UploadId::new("b1-out").unwrap();
    assert_eq!(c.upload_offset(&id).unwrap(), 0);
    let half = bytes.len() / 2;
    assert_eq!(
        c.append(&id, 0, &mut &bytes[..half], 1 << 20).unwrap(),
        half as u64
    );
    assert_eq!(c.upload_offset(&id).unwrap(), half as u64);
    // A client that did not ask where to resume is refused, and nothing moves.
    for wrong in [0, half as u64 - 1, half as u64 + 1] {
        let err = c
            .append(&id, wrong, &mut &bytes[half..], 1 << 20)
            .unwrap_err();
        assert!(
            matches!(err, CacheError::OffsetMismatch { current, .. } if current == half as u64),
            "{err}"
        );
    }
    assert_eq!(c.upload_offset(&id).unwrap(), half as u64);
    let end = c
        .append(&id, half as u64, &mut &bytes[half..], 1 << 20)
        .unwrap();
    assert_eq!(end, bytes.len() as u64);
    let out = sp(OUT);
    let accepted = c
        .finish(
            &id,
            &claim(&out, ClaimKind::Output { fixed: None }, &[&sp(DEP), &out]),
        )
        .unwrap();
    assert_eq!(accepted.cached.file_size, bytes.len() as u64);
    assert_eq!(c.upload_offset(&id).unwrap(), 0, "the upload is gone");
}

/// A reader that yields some bytes, then fails as a cut connection does.
struct CutAfter<'a>(&'a [u8]);

impl Read for CutAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "cut"));
        }
        let n = buf.len().min(self.0.len()).min(7);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn a_cut_piece_keeps_what_arrived_to_resume_from() {
    let f = cache();
    let c = &f.cache;
    let bytes = zst(&output_nar());
    let id = UploadId::new("b2-out").unwrap();
    let err = c
        .append(&id, 0, &mut CutAfter(&bytes[..30]), 1 << 20)
        .unwrap_err();
    assert!(
        matches!(err, CacheError::Interrupted { offset: 30, .. }),
        "{err}"
    );
    assert_eq!(c.upload_offset(&id).unwrap(), 30);
    c.append(&id, 30, &mut &bytes[30..], 1 << 20).unwrap();
    let out = sp(OUT);
    c.finish(
        &id,
        &claim(&out, ClaimKind::Output { fixed: None }, &[&sp(DEP)]),
    )
    .unwrap();
}

#[test]
fn an_upload_past_its_limit_is_refused_and_discarded() {
    let f = cache();
    let c = &f.cache;
    let id = UploadId::new("big").unwrap();
    c.append(&id, 0, &mut &[1u8; 60][..], 100).unwrap();
    let err = c.append(&id, 60, &mut &[1u8; 41][..], 100).unwrap_err();
    assert!(
        matches!(err, CacheError::TooLarge { max: 100, .. }),
        "{err}"
    );
    assert_eq!(c.upload_offset(&id).unwrap(), 0);
    // Exactly the limit is fine.
    c.append(&id, 0, &mut &[1u8; 100][..], 100).unwrap();
    c.discard(&id).unwrap();
    assert_nothing_kept(c);
    let err = c
        .finish(&id, &claim(&sp(OUT), ClaimKind::Source, &[]))
        .unwrap_err();
    assert!(matches!(err, CacheError::NoUpload { .. }), "{err}");
}

#[test]
fn a_valid_output_is_cached_with_a_signed_narinfo() {
    let f = cache();
    let c = &f.cache;
    let nar = output_nar();
    let bytes = zst(&nar);
    let id = upload(c, "b3-out", &bytes);
    let out = sp(OUT);
    let drv = sp("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv");
    let mut cl = claim(
        &out,
        ClaimKind::Output { fixed: None },
        &[&sp(DEP), &sp(OTHER), &out],
    );
    let (nar_hash, nar_size) = (HashAlgo::Sha256.digest(&nar), nar.len() as u64);
    cl.nar_hash = Some(nar_hash.clone());
    cl.nar_size = Some(nar_size);
    cl.deriver = Some(drv.clone());
    let accepted = c.finish(&id, &cl).unwrap();
    assert_eq!(accepted.drv, None);
    let cached = accepted.cached;
    let file_hash = HashAlgo::Sha256.digest(&bytes);
    assert_eq!(cached.path, format!("/nix/store/{OUT}"));
    assert_eq!(cached.nar_hash, nar_hash.to_nix32_prefixed());
    assert_eq!(cached.nar_size, nar_size);
    assert_eq!(cached.url, format!("nar/{}.nar.zst", file_hash.to_nix32()));
    assert_eq!(cached.file_size, bytes.len() as u64);
    assert_eq!(
        cached.deriver,
        Some(format!("/nix/store/{}", drv.base_name()))
    );
    // Its dependency and itself; not the candidate it does not mention.
    let refs: BTreeSet<String> = [DEP, OUT]
        .iter()
        .map(|b| format!("/nix/store/{b}"))
        .collect();
    assert_eq!(cached.references, refs);
    assert_eq!(c.lookup(&out).unwrap(), Some(cached.clone()));
    // The files, as a reader sees them.
    assert_eq!(std::fs::read(c.dir().join(&cached.url)).unwrap(), bytes);
    let text = std::fs::read(
        c.narinfo_path(&format!("{}.narinfo", out.hash_part()))
            .unwrap(),
    )
    .unwrap();
    let info = NarInfo::parse(&text, c.store_dir()).unwrap();
    assert_eq!(info.file_hash, Some(file_hash));
    assert!(info.ca.is_none());
    let fp = info.to_path_info().fingerprint(c.store_dir());
    assert_eq!(info.signatures.len(), 1);
    assert!(info
        .signatures
        .iter()
        .all(|s| c.public_key().verify(&fp, s)));
    assert!(names(&c.dir().join("uploads")).is_empty());
    // The same path again: checked, and the first copy kept.
    let id = upload(c, "b3-out-again", &zst(&output_nar()));
    assert_eq!(c.finish(&id, &cl).unwrap().cached, cached);
    assert_eq!(names(&c.dir().join("nar")).len(), 1);
}

#[test]
fn a_lying_claim_is_refused_and_nothing_is_kept() {
    let f = cache();
    let c = &f.cache;
    let nar = output_nar();
    let out = sp(OUT);
    let mut cl = claim(&out, ClaimKind::Output { fixed: None }, &[&sp(DEP)]);
    let mut tampered = nar.clone();
    // A byte of a file's contents: still a NAR, another hash.
    let at = tampered.windows(4).position(|w| w == b"#!/n").unwrap();
    tampered[at + 1] = b'?';
    cl.nar_hash = Some(HashAlgo::Sha256.digest(&nar));
    let reason = refused(c, &zst(&tampered), &cl);
    assert!(
        matches!(reason, Rejection::NarHashMismatch { .. }),
        "{reason}"
    );
    let msg = CacheError::Rejected {
        path: format!("/nix/store/{OUT}"),
        reason,
    }
    .to_string();
    assert!(
        msg.contains(&format!("'/nix/store/{OUT}'"))
            && msg.contains("NAR hash mismatch: claimed sha256:"),
        "{msg}"
    );
    assert_nothing_kept(c);
    cl.nar_hash = None;
    cl.nar_size = Some(nar.len() as u64 + 8);
    let reason = refused(c, &zst(&nar), &cl);
    assert!(
        matches!(reason, Rejection::NarSizeMismatch { .. }),
        "{reason}"
    );
    assert_nothing_kept(c);
}

#[test]
fn a_broken_nar_or_stream_is_refused_and_nothing_is_kept() {
    let f = cache();
    let c = &f.cache;
    let nar = output_nar();
    let cl = claim(&sp(OUT), ClaimKind::Output { fixed: None }, &[&sp(DEP)]);
    // One byte of the structure changed (a keyword).
    let mut bad = nar.clone();
    let at = bad.windows(9).position(|w| w == b"directory").unwrap();
    bad[at] = b'D';
    let reason = refused(c, &zst(&bad), &cl);
    assert!(matches!(reason, Rejection::NotNar(_)), "{reason}");
    assert!(
        reason.to_string().starts_with("not a valid NAR: "),
        "{reason}"
    );
    assert_nothing_kept(c);
    // A truncated NAR, well compressed.
    let reason = refused(c, &zst(&nar[..nar.len() - 16]), &cl);
    assert!(
        matches!(reason, Rejection::NotNar(NarError::UnexpectedEof { .. })),
        "{reason}"
    );
    // A truncated upload: the zstd stream ends early.
    let bytes = zst(&nar);
    let reason = refused(c, &bytes[..bytes.len() / 2], &cl);
    assert!(matches!(reason, Rejection::Decompress { .. }), "{reason}");
    // Not zstd at all: the plain NAR.
    let reason = refused(c, &nar, &cl);
    assert!(matches!(reason, Rejection::Decompress { .. }), "{reason}");
    // A NAR followed by more data, and a stream followed by garbage.
    let mut longer = nar.clone();
    longer.extend_from_slice(&[0; 8]);
    let reason = refused(c, &zst(&longer), &cl);
    assert!(matches!(reason, Rejection::TrailingNar), "{reason}");
    let mut garbage = bytes.clone();
    garbage.extend_from_slice(b"garbage!");
    let reason = refused(c, &garbage, &cl);
    assert!(
        matches!(
            reason,
            Rejection::Decompress { .. } | Rejection::TrailingCompressed
        ),
        "{reason}"
    );
    // An empty upload.
    let reason = refused(c, b"", &cl);
    assert!(
        matches!(reason, Rejection::Decompress { .. } | Rejection::NotNar(_)),
        "{reason}"
    );
    assert_nothing_kept(c);
}

fn fixed(method: FileIngestionMethod, hash: Hash) -> ClaimKind {
    ClaimKind::Output {
        fixed: Some(FixedOutput { method, hash }),
    }
}

#[test]
fn fixed_outputs_must_have_their_declared_hash() {
    let f = cache();
    let c = &f.cache;
    let hello = nar_of(&T::File(b"hello\n"));
    // Paths and hashes as Nix 2.8 computed them (fixtures/drv/fod.nix).
    let flat = sp("xnn6zlbfipi9n3yiyzlrsgxax38vrxhd-flat-sha256");
    let flat_kind = fixed(
        FileIngestionMethod::Flat,
        HashAlgo::Sha256.digest(b"hello\n"),
    );
    let rec = sp("v4rnih172hh4kvib0ag5gkcjh203lmlw-rec-sha1");
    let rec_hash =
        Hash::parse_bare("0deb52c2735eb38d360f976b7b3823c4ad05cce7", HashAlgo::Sha1).unwrap();
    let rec_kind = fixed(FileIngestionMethod::Recursive, rec_hash.clone());
    let id = upload(c, "flat", &zst(&hello));
    let a = c
        .finish(&id, &claim(&flat, flat_kind.clone(), &[]))
        .unwrap();
    assert!(a.cached.references.is_empty());
    let id = upload(c, "rec", &zst(&hello));
    c.finish(&id, &claim(&rec, rec_kind.clone(), &[])).unwrap();
    let text = std::fs::read(
        c.narinfo_path(&format!("{}.narinfo", rec.hash_part()))
            .unwrap(),
    )
    .unwrap();
    let info = NarInfo::parse(&text, c.store_dir()).unwrap();
    assert_eq!(
        info.ca,
        Some(ContentAddress::Fixed {
            method: FileIngestionMethod::Recursive,
            hash: rec_hash
        })
    );

    let f = cache();
    let c = &f.cache;
    // Other contents.
    let reason = refused(
        c,
        &zst(&nar_of(&T::File(b"hullo\n"))),
        &claim(&flat, flat_kind.clone(), &[]),
    );
    assert!(
        matches!(reason, Rejection::FixedHashMismatch { .. }),
        "{reason}"
    );
    let reason = refused(
        c,
        &zst(&nar_of(&T::File(b"hullo\n"))),
        &claim(&rec, rec_kind, &[]),
    );
    assert!(
        matches!(reason, Rejection::FixedHashMismatch { .. }),
        "{reason}"
    );
    // Flat needs one plain file.
    let reason = refused(
        c,
        &zst(&nar_of(&T::Exe(b"hello\n"))),
        &claim(&flat, flat_kind.clone(), &[]),
    );
    assert!(matches!(reason, Rejection::FlatNotRegular), "{reason}");
    // The right contents under another path.
    let reason = refused(c, &zst(&hello), &claim(&sp(OUT), flat_kind.clone(), &[]));
    assert!(matches!(reason, Rejection::FixedPath { .. }), "{reason}");
    // A reference.
    let with_ref = nar_of(&T::File(b"/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz"));
    let h = HashAlgo::Sha256.digest(b"/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz");
    let p = StoreDir::default()
        .make_fixed_output_path(FileIngestionMethod::Flat, &h, "f", [], false)
        .unwrap();
    let reason = refused(
        c,
        &zst(&with_ref),
        &claim(&p, fixed(FileIngestionMethod::Flat, h), &[&sp(DEP)]),
    );
    assert!(
        matches!(reason, Rejection::FixedReferences { .. }),
        "{reason}"
    );
    assert_nothing_kept(c);
}

#[test]
fn sources_must_be_content_addressed_by_their_contents() {
    let f = cache();
    let c = &f.cache;
    let dir = StoreDir::default();
    let dep = sp(DEP);
    // Text with a reference, as `builtins.toFile` makes it.
    let text = b"see /nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz\n";
    let text_path = dir
        .make_text_path("note", &HashAlgo::Sha256.digest(text), [&dep])
        .unwrap();
    let id = upload(c, "src-text", &zst(&nar_of(&T::File(text))));
    let a = c
        .finish(&id, &claim(&text_path, ClaimKind::Source, &[&dep]))
        .unwrap();
    assert_eq!(
        a.cached.references,
        [dir.display(&dep)].into_iter().collect()
    );
    // A tree, as `nix-store --add` makes it.
    let tree = nar_of(&T::Dir(vec![("a", T::File(b"x")), ("b", T::Exe(b"y"))]));
    let tree_path = dir
        .make_fixed_output_path(
            FileIngestionMethod::Recursive,
            &HashAlgo::Sha256.digest(&tree),
            "tree",
            [],
            false,
        )
        .unwrap();
    let id = upload(c, "src-tree", &zst(&tree));
    c.finish(&id, &claim(&tree_path, ClaimKind::Source, &[]))
        .unwrap();
    // A flat file, as `nix-store --add-fixed sha256` makes it.
    let flat_path = sp("fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt");
    let id = upload(c, "src-flat", &zst(&nar_of(&T::File(b"hello\n"))));
    let a = c
        .finish(&id, &claim(&flat_path, ClaimKind::Source, &[]))
        .unwrap();
    let info = NarInfo::parse(
        &std::fs::read(c.dir().join(format!("{}.narinfo", flat_path.hash_part()))).unwrap(),
        &dir,
    )
    .unwrap();
    assert!(matches!(
        info.ca,
        Some(ContentAddress::Fixed {
            method: FileIngestionMethod::Flat,
            ..
        })
    ));
    assert!(a.cached.references.is_empty());

    let f = cache();
    let c = &f.cache;
    // A path that is no content address of these contents.
    let reason = refused(
        c,
        &zst(&nar_of(&T::File(b"hello\n"))),
        &claim(&sp(OUT), ClaimKind::Source, &[]),
    );
    assert!(
        matches!(reason, Rejection::NotContentAddressed { .. }),
        "{reason}"
    );
    assert!(
        reason.to_string().contains("cannot be verified"),
        "{reason}"
    );
    // The text path, but the reference not declared: the scanner does not
    // look for it, so the path does not match.
    let reason = refused(
        c,
        &zst(&nar_of(&T::File(text))),
        &claim(&text_path, ClaimKind::Source, &[]),
    );
    assert!(
        matches!(reason, Rejection::NotContentAddressed { .. }),
        "{reason}"
    );
    assert_nothing_kept(c);
}

fn drv_bytes(base: &str) -> Vec<u8> {
    std::fs::read(fixture_drv(base)).expect("fixture")
}

fn drv_claim(base: &str) -> Claim {
    let path = sp(base);
    let drv = Derivation::from_aterm(&drv_bytes(base), &StoreDir::default()).unwrap();
    let refs = drv.references();
    Claim {
        path,
        kind: ClaimKind::Derivation,
        candidates: refs,
        nar_hash: None,
        nar_size: None,
        deriver: None,
    }
}

const SRC_DRV: &str = "mzzch7g6npd3a3gh1s4flpyk31s1gl9c-src.drv";
const DEP_DRV: &str = "kabwrlly3jbakjmps1sjanhnb0cgwl6f-dep.drv";

#[test]
fn derivations_are_checked_and_their_inputs_must_come_first() {
    let f = cache();
    let c = &f.cache;
    let dep_nar = nar_of(&T::File(&drv_bytes(DEP_DRV)));
    // Its input derivation is not there yet.
    let reason = refused(c, &zst(&dep_nar), &drv_claim(DEP_DRV));
    assert!(
        matches!(&reason, Rejection::MissingInputDrv { input } if input.ends_with(SRC_DRV)),
        "{reason}"
    );
    assert_nothing_kept(c);
    let id = upload(c, "drv-src", &zst(&nar_of(&T::File(&drv_bytes(SRC_DRV)))));
    let src = c.finish(&id, &drv_claim(SRC_DRV)).unwrap();
    assert!(c.dir().join("drv").join(SRC_DRV).is_file());
    let src_record = src.drv.unwrap();
    assert_eq!(
        src_record.outputs["out"],
        "/nix/store/5r6b4w7jm6kdjg19zimjbjm7k95ljbrf-src"
    );
    let id = upload(c, "drv-dep", &zst(&dep_nar));
    let dep = c.finish(&id, &drv_claim(DEP_DRV)).unwrap();
    let record = dep.drv.unwrap();
    assert_eq!(
        record,
        DrvRecord {
            drv: format!("/nix/store/{DEP_DRV}"),
            system: "x86_64-linux".to_owned(),
            required_features: BTreeSet::new(),
            outputs: [(
                "out".to_owned(),
                "/nix/store/vrq8kzlv5yi406kmbrg47j2gnmz7aa4q-dep".to_owned()
            )]
            .into_iter()
            .collect(),
            input_drvs: [(
                format!("/nix/store/{SRC_DRV}"),
                ["out".to_owned()].into_iter().collect()
            )]
            .into_iter()
            .collect(),
            input_srcs: ["/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb".to_owned()]
                .into_iter()
                .collect(),
        }
    );
    assert_eq!(
        std::fs::read(c.dir().join("drv").join(DEP_DRV)).unwrap(),
        drv_bytes(DEP_DRV)
    );
    let cached = dep.cached;
    assert_eq!(cached.references.len(), 2, "{:?}", cached.references);
}

#[test]
fn a_tampered_or_odd_derivation_is_refused() {
    let f = cache();
    let c = &f.cache;
    let id = upload(c, "drv-src", &zst(&nar_of(&T::File(&drv_bytes(SRC_DRV)))));
    c.finish(&id, &drv_claim(SRC_DRV)).unwrap();
    let before = names(&c.dir().join("drv"));
    // One byte of the builder's arguments changed.
    let mut bytes = drv_bytes(DEP_DRV);
    let at = bytes.windows(3).position(|w| w == b"cat").unwrap();
    bytes[at] = b'b';
    let reason = refused(c, &zst(&nar_of(&T::File(&bytes))), &drv_claim(DEP_DRV));
    assert!(
        matches!(
            reason,
            Rejection::Derivation(CheckError::WrongDrvPath { .. })
        ),
        "{reason}"
    );
    // Not a file, executable, not a derivation.
    let dir_nar = nar_of(&T::Dir(vec![("x", T::File(&drv_bytes(DEP_DRV)))]));
    let reason = refused(c, &zst(&dir_nar), &drv_claim(DEP_DRV));
    assert!(matches!(reason, Rejection::DrvNotFile), "{reason}");
    let reason = refused(
        c,
        &zst(&nar_of(&T::Exe(&drv_bytes(DEP_DRV)))),
        &drv_claim(DEP_DRV),
    );
    assert!(matches!(reason, Rejection::DrvNotFile), "{reason}");
    let reason = refused(c, &zst(&nar_of(&T::File(b"Derive(("))), &drv_claim(DEP_DRV));
    assert!(
        matches!(reason, Rejection::Derivation(CheckError::Parse(_))),
        "{reason}"
    );
    // Inputs the claim does not allow.
    let mut cl = drv_claim(DEP_DRV);
    cl.candidates.clear();
    let reason = refused(c, &zst(&nar_of(&T::File(&drv_bytes(DEP_DRV)))), &cl);
    assert!(
        matches!(reason, Rejection::UndeclaredInput { .. }),
        "{reason}"
    );
    assert_eq!(names(&c.dir().join("drv")), before);
    assert!(c.lookup(&sp(DEP_DRV)).unwrap().is_none());
    assert!(names(&c.dir().join("uploads")).is_empty());
}

#[test]
fn request_names_that_are_not_cache_files_are_refused() {
    let f = cache();
    let c = &f.cache;
    let h = "5xd714cbfnkz02h2vbsj4fm03x3f15nf";
    assert_eq!(
        c.narinfo_path(&format!("{h}.narinfo")).unwrap(),
        c.dir().join(format!("{h}.narinfo"))
    );
    let n = "0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar.zst";
    assert_eq!(c.nar_path(n).unwrap(), c.dir().join("nar").join(n));
    for bad in [
        "../5xd714cbfnkz02h2vbsj4fm03x3f15nf.narinfo",
        "5xd714cbfnkz02h2vbsj4fm03x3f15n.narinfo",
        "5xd714cbfnkz02h2vbsj4fm03x3f15nfx.narinfo",
        "5XD714CBFNKZ02H2VBSJ4FM03X3F15NF.narinfo",
        // 'e', 'o', 'u' and 't' are not nix32 digits.
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
        "nix-cache-info",
        "",
        "/etc/passwd",
    ] {
        assert!(c.narinfo_path(bad).is_err(), "{bad}");
    }
    for bad in [
        "../0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar.zst",
        "nar/0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar.zst",
        "0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azd.nar.zst",
        "0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar",
        "0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar.zst/..",
    ] {
        assert!(c.nar_path(bad).is_err(), "{bad}");
    }
    assert!(c.log_path(DEP_DRV).is_ok());
    for bad in ["../x.drv", DEP, "x"] {
        assert!(c.log_path(bad).is_err(), "{bad}");
    }
}

#[test]
fn logs_are_written_whole_or_not_at_all() {
    let f = cache();
    let c = &f.cache;
    let drv = sp(DEP_DRV);
    c.write_log(&drv, &mut &b"building\ndone\n"[..], 100)
        .unwrap();
    let file = c.log_path(DEP_DRV).unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"building\ndone\n");
    let err = c.write_log(&drv, &mut &[b'x'; 101][..], 100).unwrap_err();
    assert!(
        matches!(err, CacheError::LogTooLarge { max: 100, .. }),
        "{err}"
    );
    // The earlier log is still there, and no temporary file is left.
    assert_eq!(std::fs::read(&file).unwrap(), b"building\ndone\n");
    assert_eq!(names(&c.dir().join("log")), [DEP_DRV]);
}

#[test]
fn stale_uploads_are_removed_and_fresh_ones_kept() {
    let f = cache();
    let c = &f.cache;
    let id = UploadId::new("old").unwrap();
    c.append(&id, 0, &mut &b"abc"[..], 100).unwrap();
    // A wrong first offset leaves nothing behind.
    let other = UploadId::new("never").unwrap();
    assert!(c.append(&other, 5, &mut &b"abc"[..], 100).is_err());
    assert_eq!(names(&c.dir().join("uploads")), ["old.part"]);
    assert_eq!(
        c.remove_stale_uploads(std::time::Duration::from_secs(3600))
            .unwrap(),
        0
    );
    assert_eq!(c.upload_offset(&id).unwrap(), 3);
    assert_eq!(
        c.remove_stale_uploads(std::time::Duration::ZERO).unwrap(),
        1
    );
    assert_eq!(c.upload_offset(&id).unwrap(), 0);
}

#[test]
fn concurrent_appends_at_one_offset_let_exactly_one_through() {
    fn shared<T: Send + Sync>() {}
    shared::<Cache>();
    let f = cache();
    let c = &f.cache;
    let id = UploadId::new("raced").unwrap();
    let results: Vec<Result<u64, CacheError>> = std::thread::scope(|s| {
        let a = s.spawn(|| c.append(&id, 0, &mut &[1u8; 1000][..], 1 << 20));
        let b = s.spawn(|| c.append(&id, 0, &mut &[2u8; 1000][..], 1 << 20));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    let err = results.into_iter().find_map(Result::err).unwrap();
    assert!(
        matches!(err, CacheError::OffsetMismatch { current: 1000, .. }),
        "{err}"
    );
    assert!(err.is_caller_error());
    assert_eq!(c.upload_offset(&id).unwrap(), 1000);
    let bytes = std::fs::read(c.partial_path(&id)).unwrap();
    assert!(
        bytes.iter().all(|&b| b == bytes[0]),
        "the pieces were mixed"
    );
}
