//! NAR (Nix ARchive): writer from a filesystem tree, strict reader.
//!
//! A NAR is a canonical serialisation of a file, symlink or directory tree:
//! only the file type, the executable bit, contents and symlink targets are
//! kept, and directory entries are sorted bytewise, so equal trees give equal
//! bytes (and equal hashes). See `formats.md` §3 for the grammar.
//!
//! * [`dump`] writes the NAR of a path, byte-identical to `nix-store --dump`.
//!   It walks the tree with `openat`-relative calls on directory descriptors
//!   (no path re-resolution per entry, no symlink ever followed) and batches
//!   the fixed tokens and small files into one large buffer; reader threads
//!   read small files ahead in NAR order while the dumping thread writes and
//!   hashes, so hashing a tree costs little more than the system calls,
//!   spread over the cores, and the hash itself.
//! * [`parse`] reads exactly one NAR from a stream, never a byte past its end
//!   (a NAR is embedded in export streams and protocol messages), checks it
//!   with the limits of current Nix (sorted names, name and target bounds,
//!   nesting depth, zero padding) and reports what it finds to a
//!   [`NarVisitor`]. Lengths are checked before anything is allocated and
//!   file contents are streamed in chunks, so no input can make it allocate
//!   much or panic.
//! * [`restore`] is [`parse`] with a visitor that creates the tree. Every
//!   entry is created relative to a descriptor of the directory it created
//!   just before, with `O_EXCL`/`O_NOFOLLOW`, so a symlink in the archive can
//!   never redirect a write outside the destination. On failure the partial
//!   tree is removed.
//!
//! Trees nested deeper than [`MAX_DEPTH`] are refused by both sides, as
//! current Nix does (`narMaxDepth`): sandoff never writes a NAR it would not
//! read back.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

mod dump;
mod parse;
mod restore;

pub use dump::{dump, hash_path};
pub use parse::{parse, NarVisitor, NullVisitor};
pub use restore::{remove_tree, restore, restore_canonical, restore_whole};

/// Deepest nesting allowed: a node at depth `MAX_DEPTH` (the root is at 0)
/// is refused when writing and when reading, as Nix's `narMaxDepth`.
pub const MAX_DEPTH: usize = 64;
/// Longest directory entry name accepted (`NAME_MAX` on Linux).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted (`PATH_MAX` minus the NUL).
pub const MAX_TARGET_LEN: usize = 4095;
/// Keywords are at most 13 bytes; anything much longer is refused without
/// being read, which keeps error messages short and allocations bounded.
const MAX_TAG_LEN: usize = 32;
/// The writer's buffer: tokens and file contents are gathered here, so the
/// sink sees few, large writes and big files are read in large chunks.
const WRITE_BUF_SIZE: usize = 1 << 20;
/// File contents are handed to a [`NarVisitor`] in chunks of at most this.
const READ_CHUNK_SIZE: usize = 256 << 10;
/// Files at least this large are read by a helper thread while the sink
/// consumes the previous chunk.
const PIPELINE_MIN: u64 = 8 << 20;
/// Chunk size and number of buffers of that pipeline.
const PIPELINE_CHUNK: usize = 1 << 20;
const PIPELINE_BUFS: usize = 3;
/// Reading ahead in a directory tree (see `dump.rs`): reader threads start
/// once the walk has queued `PREFETCH_MIN_FILES` regular files (a small
/// output is dumped on one thread); they read files of up to
/// `PREFETCH_MAX_SIZE` bytes whole, taking `PREFETCH_CHUNK` files at a time,
/// at most `PREFETCH_AHEAD` files ahead of the writing. Memory held for
/// files read ahead is thus bounded by about (`PREFETCH_AHEAD` +
/// `MAX_READERS` x `PREFETCH_CHUNK`) x `PREFETCH_MAX_SIZE` = 5 MiB.
const PREFETCH_MIN_FILES: usize = 16;
const PREFETCH_MAX_SIZE: usize = 32 << 10;
const PREFETCH_AHEAD: usize = 128;
const PREFETCH_CHUNK: usize = 8;
/// At most this many reader threads, whatever the number of cores.
const MAX_READERS: usize = 3;
/// The walk also stops ahead at this many directories not yet written (each
/// holds a descriptor; the walk's own path of at most `MAX_DEPTH` aside) or
/// this many queued events.
const MAX_DIRS_AHEAD: usize = 32;
const MAX_EVENTS: usize = 1024;
/// `getdents64` buffer; entries are copied out before recursing.
const DIRENT_BUF_SIZE: usize = 32 << 10;

/// Why a NAR could not be written or read.
#[derive(Debug, Error)]
pub enum NarError {
    // Reading.
    /// The input ended inside the NAR.
    #[error("unexpected end of NAR at byte {pos}")]
    UnexpectedEof { pos: u64 },
    /// Reading the input failed.
    #[error("reading NAR at byte {pos}")]
    Read {
        pos: u64,
        #[source]
        source: io::Error,
    },
    /// The input does not start with `nix-archive-1`.
    #[error("input doesn't look like a Nix archive (bad magic at byte 0)")]
    BadMagic,
    /// A keyword other than the ones the grammar allows here.
    #[error("unexpected NAR token '{found}' at byte {pos} (expected {expected})")]
    UnexpectedToken {
        pos: u64,
        expected: &'static str,
        found: String,
    },
    /// A padding byte after a string is not zero.
    #[error("non-zero padding in NAR at byte {pos}")]
    NonZeroPadding { pos: u64 },
    /// The `executable` marker is followed by something other than `""`.
    #[error("NAR executable marker has a non-empty value at byte {pos}")]
    NonEmptyExecutable { pos: u64 },
    /// A directory entry name that could escape the directory or is not a name.
    #[error("invalid NAR entry name '{name}' at byte {pos}: {reason}")]
    InvalidName {
        pos: u64,
        name: String,
        reason: &'static str,
    },
    /// Directory entries out of order.
    #[error("NAR entry names not sorted: '{name}' after '{prev}' at byte {pos}")]
    NotSorted {
        pos: u64,
        prev: String,
        name: String,
    },
    /// The same name twice in one directory.
    #[error("duplicate NAR entry name '{name}' at byte {pos}")]
    DuplicateName { pos: u64, name: String },
    /// A symlink target that no symlink can have.
    #[error("invalid NAR symlink target at byte {pos}: {reason}")]
    InvalidSymlinkTarget { pos: u64, reason: &'static str },
    /// Directories nested [`MAX_DEPTH`] deep.
    #[error("NAR directory nesting exceeds the maximum depth of {MAX_DEPTH} at byte {pos}")]
    TooDeep { pos: u64 },
    /// Bytes after the NAR where the NAR should be the whole input.
    #[error("trailing data after NAR at byte {pos}")]
    TrailingData { pos: u64 },

    // Restoring.
    /// The restore destination is already there.
    #[error("cannot restore NAR to '{}': it already exists", path.display())]
    DestExists { path: PathBuf },
    /// Creating or writing a file, directory or symlink failed.
    #[error("restoring '{}'", path.display())]
    Restore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    // Writing.
    /// Reading the tree to archive failed.
    #[error("{op} '{}'", path.display())]
    Dump {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A fifo, socket or device: a NAR can hold none of these.
    #[error("'{}' is a {kind}; a NAR can only hold regular files, directories and symlinks", path.display())]
    UnsupportedType { path: PathBuf, kind: &'static str },
    /// A file got shorter while it was being archived.
    #[error("'{}' changed while being archived (expected {expected} bytes, got {got})", path.display())]
    FileChanged {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// A tree nested too deep to be a NAR.
    #[error("'{}' is nested {MAX_DEPTH} or more directories deep, more than a NAR may be", path.display())]
    DumpTooDeep { path: PathBuf },
    /// The path to archive cannot be passed to the system (it contains NUL).
    #[error("path '{}' contains a NUL byte", path.display())]
    BadPath { path: PathBuf },
    /// Writing the NAR to its sink failed.
    #[error("writing NAR")]
    Write(#[source] io::Error),
}

// ---------------------------------------------------------------------------
// Wire tokens.

const fn padded(n: usize) -> usize {
    (n + 7) & !7
}

/// Concatenates the wire form (`u64le len`, bytes, zero padding) of `toks`
/// at compile time; the length check makes a wrong `N` a build error.
const fn tokens<const N: usize>(toks: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    let mut t = 0;
    while t < toks.len() {
        let s = toks[t];
        let len = (s.len() as u64).to_le_bytes();
        let mut i = 0;
        while i < 8 {
            out[at + i] = len[i];
            i += 1;
        }
        let mut j = 0;
        while j < s.len() {
            out[at + 8 + j] = s[j];
            j += 1;
        }
        at += 8 + padded(s.len());
        t += 1;
    }
    assert!(at == N, "token array has the wrong length");
    out
}

const MAGIC: &[u8] = b"nix-archive-1";
/// `nix-archive-1 ( type`: the start of every NAR.
const TOK_NAR: [u8; 56] = tokens(&[MAGIC, b"(", b"type"]);
/// `regular contents`, then the size.
const TOK_REG: [u8; 32] = tokens(&[b"regular", b"contents"]);
/// `regular executable "" contents`, then the size.
const TOK_EXE: [u8; 64] = tokens(&[b"regular", b"executable", b"", b"contents"]);
/// `symlink target`, then the target.
const TOK_SYM: [u8; 32] = tokens(&[b"symlink", b"target"]);
/// `directory`, then the entries.
const TOK_DIR: [u8; 24] = tokens(&[b"directory"]);
/// `entry ( name`, then the name.
const TOK_ENTRY: [u8; 48] = tokens(&[b"entry", b"(", b"name"]);
/// `node ( type`, after an entry's name.
const TOK_NODE: [u8; 48] = tokens(&[b"node", b"(", b"type"]);
/// `)`: closes a node or an entry.
const TOK_CLOSE: [u8; 16] = tokens(&[b")"]);

#[cfg(test)]
mod tests {
    use super::parse::show;
    use super::restore::Restorer;
    use super::*;
    use crate::store::HashAlgo;
    use rustix::fs::{self as rfs, Mode, CWD};
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::io::Cursor;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::Path;

    use proptest::prelude::*;

    // A model tree and a deliberately naive encoder, written from the grammar
    // token by token, to check the fast writer and to build bad NARs.

    #[derive(Debug, Clone)]
    enum T {
        File {
            exec: bool,
            data: Vec<u8>,
        },
        Link(Vec<u8>),
        /// Entries in the order they are written (not necessarily sorted).
        Dir(Vec<(Vec<u8>, T)>),
    }

    fn s(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
        out.resize(padded(out.len()), 0);
    }

    /// The wire strings `toks`, one after the other.
    fn wire(toks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for t in toks {
            s(&mut out, t);
        }
        out
    }

    fn node(out: &mut Vec<u8>, t: &T) {
        s(out, b"(");
        s(out, b"type");
        match t {
            T::File { exec, data } => {
                s(out, b"regular");
                if *exec {
                    s(out, b"executable");
                    s(out, b"");
                }
                s(out, b"contents");
                s(out, data);
            }
            T::Link(target) => {
                s(out, b"symlink");
                s(out, b"target");
                s(out, target);
            }
            T::Dir(entries) => {
                s(out, b"directory");
                for (name, child) in entries {
                    s(out, b"entry");
                    s(out, b"(");
                    s(out, b"name");
                    s(out, name);
                    s(out, b"node");
                    node(out, child);
                    s(out, b")");
                }
            }
        }
        s(out, b")");
    }

    fn nar(t: &T) -> Vec<u8> {
        let mut out = Vec::new();
        s(&mut out, MAGIC);
        node(&mut out, t);
        out
    }

    fn file(data: &[u8]) -> T {
        T::File {
            exec: false,
            data: data.to_vec(),
        }
    }

    fn dir(entries: &[(&str, T)]) -> T {
        T::Dir(
            entries
                .iter()
                .map(|(n, t)| (n.as_bytes().to_vec(), t.clone()))
                .collect(),
        )
    }

    fn parse_bytes(bytes: &[u8]) -> Result<u64, NarError> {
        parse(&mut Cursor::new(bytes), &mut NullVisitor)
    }

    /// Writes the model to `path`.
    fn materialise(path: &Path, t: &T) {
        match t {
            T::File { exec, data } => {
                std::fs::write(path, data).unwrap();
                let mode = if *exec { 0o755 } else { 0o644 };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            T::Link(target) => symlink(OsStr::from_bytes(target), path).unwrap(),
            T::Dir(entries) => {
                std::fs::create_dir(path).unwrap();
                for (name, child) in entries {
                    materialise(&path.join(OsStr::from_bytes(name)), child);
                }
            }
        }
    }

    fn dump_to_vec(path: &Path) -> Result<Vec<u8>, NarError> {
        let mut out = Vec::new();
        dump(path, &mut out)?;
        Ok(out)
    }

    #[test]
    fn fixed_tokens_match_the_grammar() {
        assert_eq!(TOK_NAR.as_slice(), wire(&[b"nix-archive-1", b"(", b"type"]));
        assert_eq!(TOK_REG.as_slice(), wire(&[b"regular", b"contents"]));
        assert_eq!(
            TOK_EXE.as_slice(),
            wire(&[b"regular", b"executable", b"", b"contents"])
        );
        assert_eq!(TOK_SYM.as_slice(), wire(&[b"symlink", b"target"]));
        assert_eq!(TOK_ENTRY.as_slice(), wire(&[b"entry", b"(", b"name"]));
        assert_eq!(TOK_NODE.as_slice(), wire(&[b"node", b"(", b"type"]));
        assert_eq!(&TOK_CLOSE[..9], b"\x01\0\0\0\0\0\0\0)");
        assert_eq!(TOK_DIR.len(), 24);
    }

    #[test]
    fn dumps_a_tree_as_the_grammar_says_with_sorted_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        // Created in an order unrelated to the NAR's, which is bytewise.
        let names = ["é", "~", "a.b", "a-b", "a b", "a", "_", "Z", "B", "A", "0"];
        let created = T::Dir(
            names
                .iter()
                .map(|n| (n.as_bytes().to_vec(), file(n.as_bytes())))
                .collect(),
        );
        materialise(&root, &created);
        let mut sorted: Vec<_> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
        sorted.sort();
        assert_eq!(
            sorted
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect::<Vec<_>>(),
            ["0", "A", "B", "Z", "_", "a", "a b", "a-b", "a.b", "~", "é"]
        );
        let want = T::Dir(sorted.into_iter().map(|n| (n.clone(), file(&n))).collect());
        assert_eq!(dump_to_vec(&root).unwrap(), nar(&want));
    }

    #[test]
    fn dumps_executables_by_user_execute_bit_only() {
        let tmp = tempfile::tempdir().unwrap();
        for (mode, exec) in [
            (0o755, true),
            (0o700, true),
            (0o100, true),
            (0o670, false),
            (0o644, false),
        ] {
            let p = tmp.path().join(format!("f{mode:o}"));
            std::fs::write(&p, b"x").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = dump_to_vec(&p);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert_eq!(
                got.unwrap(),
                nar(&T::File {
                    exec,
                    data: b"x".to_vec()
                }),
                "mode {mode:o}"
            );
        }
    }

    #[test]
    fn dumps_top_level_symlink_without_following_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("l");
        symlink(tmp.path(), &p).unwrap();
        let target = tmp.path().as_os_str().as_bytes().to_vec();
        assert_eq!(dump_to_vec(&p).unwrap(), nar(&T::Link(target)));
    }

    #[test]
    fn dumps_large_file_across_buffer_boundaries() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(WRITE_BUF_SIZE * 2 + 13))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let t = dir(&[
            ("a", file(b"small")),
            ("big", file(&data)),
            ("z", file(b"")),
        ]);
        materialise(&tmp.path().join("t"), &t);
        let got = dump_to_vec(&tmp.path().join("t")).unwrap();
        assert_eq!(got, nar(&t));
        let (hash, size) = hash_path(&tmp.path().join("t")).unwrap();
        assert_eq!(size, got.len() as u64);
        assert_eq!(hash, HashAlgo::Sha256.digest(&got));
    }

    #[test]
    fn dumps_file_through_the_read_ahead_pipeline() {
        let tmp = tempfile::tempdir().unwrap();
        let len = PIPELINE_MIN as usize + 3 * PIPELINE_CHUNK + 5;
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let t = dir(&[("big", T::File { exec: true, data }), ("z", file(b"after"))]);
        materialise(&tmp.path().join("t"), &t);
        assert_eq!(dump_to_vec(&tmp.path().join("t")).unwrap(), nar(&t));
    }

    #[test]
    fn dumps_large_directory_with_prefetching_helper() {
        let tmp = tempfile::tempdir().unwrap();
        let mut entries = Vec::new();
        for i in 0..(PREFETCH_MIN_FILES * 5) {
            let name = format!("f{i:03}");
            let size = match i % 7 {
                0 => PREFETCH_MAX_SIZE + 1,
                1 => PREFETCH_MAX_SIZE,
                _ => i * 37 % 300,
            };
            let data: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
            entries.push((
                name,
                T::File {
                    exec: i % 3 == 0,
                    data,
                },
            ));
            if i % 11 == 0 {
                entries.push((format!("f{i:03}-link"), T::Link(b"target".to_vec())));
                entries.push((format!("f{i:03}-sub"), dir(&[("inner", file(b"x"))])));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let t = T::Dir(
            entries
                .into_iter()
                .map(|(n, t)| (n.into_bytes(), t))
                .collect(),
        );
        materialise(&tmp.path().join("t"), &t);
        assert_eq!(dump_to_vec(&tmp.path().join("t")).unwrap(), nar(&t));
    }

    /// A tree shaped like a large package output, with what the read-ahead
    /// must get right: many small and empty files, executables, symlinks,
    /// empty and nested directories, files around the read-ahead size limit,
    /// more files than are read ahead and more directories than are listed
    /// ahead.
    fn many_small_files() -> T {
        let mut seed = 42u64;
        let mut next = move |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        let mut top = Vec::new();
        for d in 0..(MAX_DIRS_AHEAD + 9) {
            let mut entries = Vec::new();
            for f in 0..(d * 7 % 40) {
                let size = match f % 13 {
                    0 => 0,
                    1 => PREFETCH_MAX_SIZE,
                    2 if d % 5 == 0 => PREFETCH_MAX_SIZE + 1,
                    _ => next(3000),
                };
                let data = (0..size).map(|_| next(256) as u8).collect();
                entries.push((
                    format!("f{f:02}"),
                    T::File {
                        exec: f % 4 == 0,
                        data,
                    },
                ));
            }
            if d % 3 == 0 {
                entries.push(("link".into(), T::Link(b"f00".to_vec())));
                entries.push(("empty".into(), dir(&[])));
            }
            if d % 4 == 1 {
                entries.push(("nested".into(), chain(d % 9 + 1)));
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let entries = entries
                .into_iter()
                .map(|(n, t)| (n.into_bytes(), t))
                .collect();
            top.push((format!("d{d:02}").into_bytes(), T::Dir(entries)));
        }
        top.push((b"z-last".to_vec(), file(b"after all directories")));
        T::Dir(top)
    }

    #[test]
    fn dumps_many_small_files_the_same_with_and_without_readers() {
        let tmp = tempfile::tempdir().unwrap();
        let t = many_small_files();
        materialise(&tmp.path().join("t"), &t);
        let want = nar(&t);
        for readers in [0, 1, MAX_READERS] {
            let mut got = Vec::new();
            dump::dump_with(&tmp.path().join("t"), &mut got, readers).unwrap();
            assert!(got == want, "readers: {readers}");
        }
        assert!(dump_to_vec(&tmp.path().join("t")).unwrap() == want);
    }

    #[test]
    fn reports_fifo_among_many_files_without_hanging() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        std::fs::create_dir(&root).unwrap();
        for i in 0..(PREFETCH_MIN_FILES * 3) {
            std::fs::write(root.join(format!("f{i:03}")), b"data").unwrap();
        }
        let fifo = root.join("f020x");
        rfs::mkfifoat(CWD, &fifo, Mode::from_raw_mode(0o644)).unwrap();
        match dump_to_vec(&root) {
            Err(NarError::UnsupportedType { path, kind: "fifo" }) => assert_eq!(path, fifo),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_to_dump_a_fifo_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("t")).unwrap();
        let fifo = tmp.path().join("t/pipe");
        rfs::mkfifoat(CWD, &fifo, Mode::from_raw_mode(0o644)).unwrap();
        match dump_to_vec(&tmp.path().join("t")) {
            Err(NarError::UnsupportedType { path, kind: "fifo" }) => assert_eq!(path, fifo),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            dump_to_vec(&fifo),
            Err(NarError::UnsupportedType { kind: "fifo", .. })
        ));
    }

    #[test]
    fn refuses_to_dump_a_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = dump_to_vec(&sock).unwrap_err();
        assert!(err.to_string().contains("is a socket"), "{err}");
    }

    #[test]
    fn refuses_to_dump_missing_path() {
        let err = dump_to_vec(Path::new("/nonexistent/sandoff-nar")).unwrap_err();
        assert!(matches!(err, NarError::Dump { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/sandoff-nar"),
            "{err}"
        );
    }

    fn chain(depth: usize) -> T {
        let mut t = file(b"leaf");
        for _ in 0..depth {
            t = dir(&[("d", t)]);
        }
        t
    }

    #[test]
    fn depth_limit_is_the_same_for_writer_and_reader() {
        // A file at depth 63 is fine; at depth 64 both sides refuse.
        let tmp = tempfile::tempdir().unwrap();
        materialise(&tmp.path().join("ok"), &chain(MAX_DEPTH - 1));
        materialise(&tmp.path().join("deep"), &chain(MAX_DEPTH));
        let ok = dump_to_vec(&tmp.path().join("ok")).unwrap();
        assert_eq!(ok, nar(&chain(MAX_DEPTH - 1)));
        assert_eq!(parse_bytes(&ok).unwrap(), ok.len() as u64);
        assert!(matches!(
            dump_to_vec(&tmp.path().join("deep")),
            Err(NarError::DumpTooDeep { .. })
        ));
        assert!(matches!(
            parse_bytes(&nar(&chain(MAX_DEPTH))),
            Err(NarError::TooDeep { .. })
        ));
    }

    // ---- reader ----

    #[test]
    fn parse_reads_exactly_one_nar_and_reports_its_size() {
        let n = nar(&dir(&[
            ("a", file(b"hello\n")),
            ("l", T::Link(b"a".to_vec())),
        ]));
        let mut input = n.clone();
        input.extend_from_slice(b"NEXT THING");
        let mut cur = Cursor::new(&input);
        assert_eq!(parse(&mut cur, &mut NullVisitor).unwrap(), n.len() as u64);
        assert_eq!(cur.position(), n.len() as u64);
    }

    #[test]
    fn every_truncation_is_unexpected_end() {
        let n = nar(&dir(&[
            (
                "a",
                T::File {
                    exec: true,
                    data: b"hello".to_vec(),
                },
            ),
            ("l", T::Link(b"a".to_vec())),
        ]));
        for cut in 0..n.len() {
            match parse_bytes(&n[..cut]) {
                Err(NarError::UnexpectedEof { pos }) => assert_eq!(pos, cut as u64),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[track_caller]
    fn rejects(bytes: &[u8], want: &str) -> NarError {
        let err = parse_bytes(bytes).unwrap_err();
        assert!(
            err.to_string().contains(want),
            "expected '{want}', got '{err}'"
        );
        err
    }

    #[test]
    fn rejects_bad_magic() {
        let mut n = nar(&file(b"x"));
        n[8] = b'N';
        rejects(&n, "doesn't look like a Nix archive");
        let mut n = nar(&file(b"x"));
        n[8 + 13] = 1; // magic padding
        rejects(&n, "doesn't look like a Nix archive");
        rejects(
            b"\x0d\0\0\0\0\0\0\0nix-archive-2\0\0\0",
            "doesn't look like a Nix archive",
        );
    }

    /// Replaces the first occurrence of wire string `from` with `to`.
    fn swap_token(n: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        s(&mut a, from);
        s(&mut b, to);
        let at = n
            .windows(a.len())
            .position(|w| w == a)
            .expect("token present");
        [&n[..at], &b[..], &n[at + a.len()..]].concat()
    }

    #[test]
    fn rejects_unknown_and_unexpected_tokens() {
        let n = nar(&file(b"x"));
        let err = rejects(
            &swap_token(&n, b"regular", b"fifo"),
            "unexpected NAR token 'fifo' at byte 56",
        );
        assert!(matches!(err, NarError::UnexpectedToken { pos: 56, .. }));
        rejects(&swap_token(&n, b"type", b"TYPE"), "expected 'type'");
        rejects(
            &swap_token(&n, b"contents", b"content"),
            "expected 'executable' or 'contents'",
        );
        let d = nar(&dir(&[("a", file(b"x"))]));
        rejects(
            &swap_token(&d, b"entry", b"entries"),
            "expected 'entry' or ')'",
        );
        rejects(&swap_token(&d, b"node", b"nod"), "expected 'node'");
        // A huge token where a keyword belongs is refused without reading it.
        let mut huge = n[..56].to_vec();
        huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
        rejects(&huge, "<1152921504606846976-byte string>");
    }

    #[test]
    fn rejects_unsorted_and_duplicate_entries() {
        let err = rejects(
            &nar(&dir(&[("b", file(b"")), ("a", file(b""))])),
            "NAR entry names not sorted: 'a' after 'b' at byte",
        );
        assert!(matches!(err, NarError::NotSorted { .. }));
        // Bytewise, not by locale or case: 'a' < 'é' and 'B' < 'a'.
        rejects(
            &nar(&dir(&[("é", file(b"")), ("a", file(b""))])),
            "not sorted",
        );
        rejects(
            &nar(&dir(&[("a", file(b"")), ("B", file(b""))])),
            "not sorted",
        );
        let err = rejects(
            &nar(&dir(&[("a", file(b"")), ("a", dir(&[]))])),
            "duplicate NAR entry name 'a'",
        );
        assert!(matches!(err, NarError::DuplicateName { .. }));
        // Sorting is per directory: the same names in sibling directories are fine.
        let ok = nar(&dir(&[
            ("a", dir(&[("x", file(b""))])),
            ("b", dir(&[("x", file(b""))])),
        ]));
        parse_bytes(&ok).unwrap();
    }

    #[test]
    fn rejects_invalid_names() {
        let long = "n".repeat(256);
        for (name, why) in [
            ("", "empty"),
            (".", "'.' and '..'"),
            ("..", "'.' and '..'"),
            ("a/b", "contains '/'"),
            ("/", "contains '/'"),
            ("a\0b", "NUL"),
            (long.as_str(), "longer than 255 bytes"),
        ] {
            let err = rejects(&nar(&dir(&[(name, file(b""))])), why);
            assert!(
                matches!(err, NarError::InvalidName { pos: 128, .. }),
                "{name:?}: {err:?}"
            );
        }
        parse_bytes(&nar(&dir(&[(&"n".repeat(255), file(b""))]))).unwrap();
        // Dots are fine in names other than '.' and '..'.
        parse_bytes(&nar(&dir(&[
            ("...", file(b"")),
            ("..a", file(b"")),
            (".a", file(b"")),
        ])))
        .unwrap();
    }

    #[test]
    fn refuses_absurd_name_length_before_allocating() {
        let n = nar(&dir(&[("a", file(b""))]));
        let mut bad = n[..128].to_vec();
        bad.extend_from_slice(&u64::MAX.to_le_bytes());
        rejects(&bad, "longer than 255 bytes");
    }

    #[test]
    fn rejects_invalid_symlink_targets() {
        rejects(
            &nar(&T::Link(Vec::new())),
            "invalid NAR symlink target at byte 88: empty",
        );
        rejects(&nar(&T::Link(b"a\0b".to_vec())), "NUL");
        rejects(&nar(&T::Link(vec![b'x'; 4096])), "longer than 4095 bytes");
        parse_bytes(&nar(&T::Link(vec![b'x'; 4095]))).unwrap();
        let mut bad = nar(&T::Link(b"x".to_vec()))[..88].to_vec();
        bad.extend_from_slice(&u64::MAX.to_le_bytes());
        rejects(&bad, "longer than 4095 bytes");
    }

    #[test]
    fn rejects_non_zero_padding() {
        // In the contents padding ("x" at 96, padding 97..104).
        let mut n = nar(&file(b"x"));
        n[102] = 1;
        let err = rejects(&n, "non-zero padding in NAR at byte 102");
        assert!(matches!(err, NarError::NonZeroPadding { pos: 102 }));
        // In a token's padding.
        let mut n = nar(&file(b"x"));
        n[24 + 8 + 1] = b' ';
        rejects(&n, "non-zero padding in NAR at byte 33");
        // In a name's padding.
        let mut n = nar(&dir(&[("a", file(b""))]));
        n[128 + 8 + 5] = 0xff;
        rejects(&n, "non-zero padding in NAR at byte 141");
    }

    #[test]
    fn rejects_executable_marker_with_value_or_after_contents() {
        let bad = wire(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"yes",
            b"contents",
            b"x",
            b")",
        ]);
        rejects(&bad, "executable marker has a non-empty value at byte 96");
        // regular contents "x" executable "" ) : executable after contents.
        let after = wire(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"x",
            b"executable",
            b"",
            b")",
        ]);
        rejects(&after, "unexpected NAR token 'executable'");
        // Two executable markers.
        let twice = wire(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"executable",
            b"",
            b"contents",
            b"x",
            b")",
        ]);
        rejects(&twice, "expected 'contents'");
    }

    #[test]
    fn huge_contents_length_is_streamed_not_allocated() {
        let mut n = nar(&file(b""));
        let at = n.len() - 24; // the u64 size, before ")"
        n[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        n.truncate(at + 8);
        n.extend_from_slice(&[7u8; 100]);
        assert!(matches!(
            parse_bytes(&n),
            Err(NarError::UnexpectedEof { .. })
        ));
    }

    #[test]
    fn visitor_sees_events_in_order() {
        #[derive(Default)]
        struct Log(Vec<String>);
        impl NarVisitor for Log {
            fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
                self.0.push(format!("dir {}", show(name.unwrap_or(b"/"))));
                Ok(())
            }
            fn directory_end(&mut self) -> Result<(), NarError> {
                self.0.push("end".into());
                Ok(())
            }
            fn regular(
                &mut self,
                name: Option<&[u8]>,
                exec: bool,
                size: u64,
            ) -> Result<(), NarError> {
                self.0
                    .push(format!("file {} {exec} {size}", show(name.unwrap_or(b"/"))));
                Ok(())
            }
            fn contents(&mut self, chunk: &[u8]) -> Result<(), NarError> {
                self.0.push(format!("data {}", show(chunk)));
                Ok(())
            }
            fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
                self.0.push(format!(
                    "link {} {}",
                    show(name.unwrap_or(b"/")),
                    show(target)
                ));
                Ok(())
            }
        }
        let n = nar(&dir(&[
            (
                "a",
                T::File {
                    exec: true,
                    data: b"hi".to_vec(),
                },
            ),
            ("b", dir(&[("c", T::Link(b"../a".to_vec()))])),
            ("e", file(b"")),
        ]));
        let mut log = Log::default();
        parse(&mut Cursor::new(&n), &mut log).unwrap();
        assert_eq!(
            log.0,
            [
                "dir /",
                "file a true 2",
                "data hi",
                "dir b",
                "link c ../a",
                "end",
                "file e false 0",
                "end"
            ]
        );
    }

    // ---- restore ----

    #[test]
    fn restores_a_tree_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let t = dir(&[
            ("empty", dir(&[])),
            (
                "exe",
                T::File {
                    exec: true,
                    data: b"#!/bin/sh\n".to_vec(),
                },
            ),
            ("f", file(b"data")),
            ("l", T::Link(b"/nonexistent".to_vec())),
        ]);
        let dest = tmp.path().join("out");
        restore(&mut Cursor::new(nar(&t)), &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"data");
        let exe = std::fs::metadata(dest.join("exe"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(exe & 0o111, 0o111, "{exe:o}");
        let f = std::fs::metadata(dest.join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(f & 0o111, 0, "{f:o}");
        assert_eq!(
            std::fs::read_link(dest.join("l")).unwrap(),
            Path::new("/nonexistent")
        );
        assert!(dest.join("empty").is_dir());
        assert_eq!(dump_to_vec(&dest).unwrap(), nar(&t));
    }

    #[test]
    fn restores_top_level_file_and_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        for t in [
            T::File {
                exec: true,
                data: b"x".to_vec(),
            },
            T::Link(b"target".to_vec()),
        ] {
            let dest = tmp.path().join(format!("{}", matches!(t, T::Link(_))));
            restore(&mut Cursor::new(nar(&t)), &dest).unwrap();
            assert_eq!(dump_to_vec(&dest).unwrap(), nar(&t));
        }
    }

    #[test]
    fn refuses_existing_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let dangling = tmp.path().join("dangling");
        symlink("/nonexistent", &dangling).unwrap();
        for dest in [tmp.path().to_owned(), dangling] {
            let err = restore(&mut Cursor::new(nar(&file(b"x"))), &dest).unwrap_err();
            assert!(matches!(err, NarError::DestExists { .. }), "{err}");
        }
    }

    #[test]
    fn failed_restore_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        let bad = nar(&dir(&[
            ("a", dir(&[("x", file(b"1"))])),
            ("b", file(b"2")),
            ("a", file(b"")),
        ]));
        let err = restore(&mut Cursor::new(&bad), &dest).unwrap_err();
        assert!(matches!(err, NarError::NotSorted { .. }), "{err}");
        assert!(dest.symlink_metadata().is_err(), "partial tree left behind");
        // Truncated inside a file.
        let good = nar(&dir(&[("a", file(b"12345678"))]));
        let err = restore(&mut Cursor::new(&good[..good.len() - 30]), &dest).unwrap_err();
        assert!(matches!(err, NarError::UnexpectedEof { .. }), "{err}");
        assert!(dest.symlink_metadata().is_err());
    }

    #[test]
    fn restore_whole_refuses_trailing_data_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        let mut input = nar(&dir(&[("a", file(b"x"))]));
        let size = input.len() as u64;
        restore_whole(&mut Cursor::new(&input), &dest).unwrap();
        std::fs::remove_dir_all(&dest).unwrap();
        input.push(0);
        match restore_whole(&mut Cursor::new(&input), &dest) {
            Err(NarError::TrailingData { pos }) => assert_eq!(pos, size),
            other => panic!("{other:?}"),
        }
        assert!(dest.symlink_metadata().is_err());
    }

    #[test]
    fn restorer_never_writes_through_a_symlink_it_created() {
        // Driven directly: the parser cannot produce a name twice, but the
        // restorer must be safe on its own.
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        let dest = tmp.path().join("out");
        let mut r = Restorer::new(&dest);
        r.directory(None).unwrap();
        r.symlink(Some(b"a"), outside.as_os_str().as_bytes())
            .unwrap();
        r.symlink(Some(b"v"), outside.join("victim").as_os_str().as_bytes())
            .unwrap();
        assert!(r.directory(Some(b"a")).is_err());
        assert!(r.regular(Some(b"a"), false, 0).is_err());
        assert!(r.regular(Some(b"v"), false, 0).is_err());
        assert!(r.symlink(Some(b"a"), b"elsewhere").is_err());
        drop(r);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
    }

    #[test]
    fn refuses_to_restore_over_a_symlink_restored_before() {
        // A NAR whose root is a symlink to a directory, followed (in another
        // restore) by a NAR aimed at that path, must not land outside.
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dest = tmp.path().join("out");
        restore(
            &mut Cursor::new(nar(&T::Link(outside.as_os_str().as_bytes().to_vec()))),
            &dest,
        )
        .unwrap();
        let err = restore(&mut Cursor::new(nar(&dir(&[("x", file(b""))]))), &dest).unwrap_err();
        assert!(matches!(err, NarError::DestExists { .. }));
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn messages_escape_odd_bytes() {
        assert_eq!(show(b"a\nb\xffc"), "a\\nb\\xffc");
        assert_eq!(show("é".as_bytes()), "é");
        assert!(show(&[b'x'; 100]).ends_with("..."));
    }

    // ---- properties ----

    fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
        let alphabet: Vec<u8> = b"aAzZ09 ._-~"
            .iter()
            .copied()
            .chain([0xc3, 0xa9, 0xff, 0x01])
            .collect();
        prop::collection::vec(prop::sample::select(alphabet), 1..6)
            .prop_filter("not . or ..", |n| n != b"." && n != b"..")
    }

    #[derive(Debug, Clone)]
    enum Tree {
        File { exec: bool, data: Vec<u8> },
        Link(Vec<u8>),
        Dir(BTreeMap<Vec<u8>, Tree>),
    }

    impl Tree {
        /// The model with entries in NAR (bytewise) order.
        fn model(&self) -> T {
            match self {
                Tree::File { exec, data } => T::File {
                    exec: *exec,
                    data: data.clone(),
                },
                Tree::Link(t) => T::Link(t.clone()),
                Tree::Dir(m) => T::Dir(m.iter().map(|(k, v)| (k.clone(), v.model())).collect()),
            }
        }
    }

    fn tree_strategy() -> impl Strategy<Value = Tree> {
        let target =
            prop::collection::vec(prop::sample::select(b"ab/.-~ \xc3\xa9".to_vec()), 1..12);
        let leaf = prop_oneof![
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(exec, data)| Tree::File { exec, data }),
            target.prop_map(Tree::Link),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop::collection::btree_map(name_strategy(), inner, 0..6).prop_map(Tree::Dir)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn dump_restore_dump_is_identical(tree in tree_strategy()) {
            let tmp = tempfile::tempdir().unwrap();
            let src = tmp.path().join("src");
            let model = tree.model();
            materialise(&src, &model);
            let first = dump_to_vec(&src).unwrap();
            prop_assert_eq!(&first, &nar(&model));
            let back = tmp.path().join("back");
            restore(&mut Cursor::new(&first), &back).unwrap();
            prop_assert_eq!(dump_to_vec(&back).unwrap(), first);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_on_random_bytes(tail in prop::collection::vec(any::<u8>(), 0..200), magic in any::<bool>()) {
            let mut input = if magic { TOK_NAR.to_vec() } else { Vec::new() };
            input.extend_from_slice(&tail);
            let _ = parse_bytes(&input);
        }

        #[test]
        fn parse_never_panics_on_mutated_nars(
            tree in tree_strategy(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
        ) {
            let good = nar(&tree.model());
            prop_assert_eq!(parse_bytes(&good).unwrap(), good.len() as u64);
            let mut bad = good.clone();
            for (at, byte, kind) in edits {
                let i = at.index(bad.len());
                match kind {
                    0 => bad[i] = byte,
                    1 => bad.truncate(i),
                    _ => bad.insert(i, byte),
                }
                if bad.is_empty() {
                    break;
                }
            }
            let _ = parse_bytes(&bad);
        }
    }
}
