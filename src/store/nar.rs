//! NAR (Nix ARchive): writer from a filesystem tree, strict reader.
//!
//! A NAR is a canonical serialisation of a file, symlink or directory tree:
//! only the file type, the executable bit, contents and symlink targets are
//! kept, and directory entries are sorted bytewise, so equal trees give equal
//! bytes (and equal hashes). See `formats.md` §3 for the grammar.
//!
//! * [`dump`] writes the NAR of a path, byte-identical to `nix-store --dump`.
//!   It walks the tree with `openat`-relative calls on directory descriptors
//!   (no path re-resolution per entry, no symlink ever followed), batches the
//!   fixed tokens and small files into one large buffer, and reads file
//!   contents straight into that buffer, so hashing a tree costs little more
//!   than the system calls and the hash itself.
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

use std::ffi::{CStr, CString, OsStr};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, CWD};
use thiserror::Error;

use super::hash::HashSink;
use super::{Hash, HashAlgo};

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
/// Directories with at least this many regular files share the reading of
/// files up to `PREFETCH_MAX_SIZE` with a helper thread, which stays at most
/// `PREFETCH_AHEAD` files ahead.
const PREFETCH_MIN_FILES: usize = 16;
const PREFETCH_MAX_SIZE: usize = 64 << 10;
const PREFETCH_AHEAD: usize = 64;
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

// ---------------------------------------------------------------------------
// Writer.

/// Writes the NAR serialisation of the file, symlink or directory at `path`.
///
/// The path itself is not followed if it is a symlink (as `nix-store --dump`).
/// Output goes to `sink` in large writes; no extra buffering is needed.
pub fn dump(path: &Path, sink: &mut dyn Write) -> Result<(), NarError> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| NarError::BadPath {
        path: path.to_owned(),
    })?;
    let mut d = Dumper {
        sink,
        buf: vec![0u8; WRITE_BUF_SIZE].into_boxed_slice(),
        len: 0,
        dirents: Vec::with_capacity(DIRENT_BUF_SIZE),
        levels: Vec::new(),
        link: Vec::new(),
        path: path.to_owned(),
        parallel: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
    };
    d.put(&TOK_NAR)?;
    d.node(CWD, &cpath, FileType::Unknown, 0)?;
    d.flush()?;
    d.sink.flush().map_err(NarError::Write)
}

/// SHA-256 of the NAR of `path`, and the NAR's size.
pub fn hash_path(path: &Path) -> Result<(Hash, u64), NarError> {
    let mut sink = HashSink::new(HashAlgo::Sha256);
    dump(path, &mut sink)?;
    Ok(sink.finish())
}

/// One directory's entries, kept between reading it and finishing it.
/// Levels are reused across siblings so a walk allocates per depth, not per
/// directory or per entry.
#[derive(Default)]
struct Level {
    /// Entry names, each followed by a NUL so it can be passed as a C string.
    names: Vec<u8>,
    entries: Vec<DirEntry>,
}

impl Level {
    fn name(&self, e: &DirEntry) -> &CStr {
        CStr::from_bytes_with_nul(&self.names[e.start..=e.end])
            .expect("names from getdents hold one NUL, at their end")
    }
}

struct DirEntry {
    start: usize,
    /// Index of the terminating NUL.
    end: usize,
    kind: FileType,
}

struct Dumper<'s> {
    sink: &'s mut dyn Write,
    buf: Box<[u8]>,
    len: usize,
    dirents: Vec<u8>,
    levels: Vec<Level>,
    link: Vec<u8>,
    /// The path of the node being written, for error messages only.
    path: PathBuf,
    /// Whether a second core can read large files ahead.
    parallel: bool,
}

impl Dumper<'_> {
    fn flush(&mut self) -> Result<(), NarError> {
        if self.len > 0 {
            self.sink
                .write_all(&self.buf[..self.len])
                .map_err(NarError::Write)?;
            self.len = 0;
        }
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        if bytes.len() > self.buf.len() - self.len {
            self.flush()?;
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        Ok(())
    }

    fn put_padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = (8 - (len % 8) as usize) % 8;
        self.put(&[0u8; 8][..pad])
    }

    /// A wire string whose bytes are at most a few KiB (names, targets).
    fn put_str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.put_padding(s.len() as u64)
    }

    fn err(&self, op: &'static str, e: impl Into<io::Error>) -> NarError {
        NarError::Dump {
            op,
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Writes a node from its type keyword to its closing `)`.
    fn node(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        hint: FileType,
        depth: usize,
    ) -> Result<(), NarError> {
        let kind = match hint {
            FileType::RegularFile | FileType::Directory | FileType::Symlink => hint,
            // d_type may be DT_UNKNOWN on some filesystems; the root has no d_type.
            _ => {
                let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.err("reading file type of", e))?;
                FileType::from_raw_mode(st.st_mode)
            }
        };
        match kind {
            FileType::RegularFile => self.regular(dir, name),
            FileType::Directory => self.directory(dir, name, depth),
            FileType::Symlink => self.symlink(dir, name),
            other => Err(NarError::UnsupportedType {
                path: self.path.clone(),
                kind: type_name(other),
            }),
        }
    }

    fn regular(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), NarError> {
        let fd = rfs::openat(dir, name, file_open_flags(), Mode::empty())
            .map_err(|e| self.err("opening", e))?;
        let st = rfs::fstat(&fd).map_err(|e| self.err("reading metadata of", e))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::RegularFile {
            return Err(NarError::UnsupportedType {
                path: self.path.clone(),
                kind: type_name(kind),
            });
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let executable = st.st_mode & 0o100 != 0;
        self.put(if executable { &TOK_EXE } else { &TOK_REG })?;
        self.put(&size.to_le_bytes())?;
        if self.parallel && size >= PIPELINE_MIN {
            self.flush()?;
            self.copy_pipelined(&fd, size)?;
        } else {
            self.copy_contents(&fd, size)?;
        }
        self.put_padding(size)?;
        self.put(&TOK_CLOSE)
    }

    /// Copies a large file with reading and writing overlapped: a helper
    /// thread reads ahead into a few buffers while this thread feeds the sink
    /// (usually a hash, whose cost then hides the copy out of the page cache).
    fn copy_pipelined(&mut self, fd: &OwnedFd, size: u64) -> Result<(), NarError> {
        type Filled = io::Result<(Vec<u8>, usize)>;
        let (full_tx, full_rx) = mpsc::sync_channel::<Filled>(PIPELINE_BUFS);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(PIPELINE_BUFS);
        for _ in 0..PIPELINE_BUFS {
            empty_tx
                .send(vec![0u8; PIPELINE_CHUNK])
                .expect("the receiver is alive");
        }
        let reader = move || {
            let mut left = size;
            while left > 0 {
                // Err: the consumer stopped (and dropped its ends); so do we.
                let Ok(mut buf) = empty_rx.recv() else { return };
                let want = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(PIPELINE_CHUNK);
                let mut got = 0;
                while got < want {
                    match rustix::io::read(fd, &mut buf[got..want]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            let _ = full_tx.send(Err(e.into()));
                            return;
                        }
                    }
                }
                left -= got as u64;
                if full_tx.send(Ok((buf, got))).is_err() || got < want {
                    return;
                }
            }
        };
        std::thread::scope(|scope| {
            if std::thread::Builder::new()
                .name("nar-read".into())
                .spawn_scoped(scope, reader)
                .is_err()
            {
                // No thread to be had: the reader (and its channel ends) is
                // dropped, and the plain copy does the work.
                return self.copy_contents(fd, size);
            }
            // Takes the consumer's channel ends by value so that they are
            // dropped before the scope joins the reader, which then cannot
            // wait on them forever.
            self.consume_pipelined(full_rx, empty_tx, size)
        })
    }

    fn consume_pipelined(
        &mut self,
        full_rx: mpsc::Receiver<io::Result<(Vec<u8>, usize)>>,
        empty_tx: mpsc::SyncSender<Vec<u8>>,
        size: u64,
    ) -> Result<(), NarError> {
        let mut left = size;
        while left > 0 {
            let (buf, n) = match full_rx.recv() {
                Ok(Ok((buf, n))) if n > 0 => (buf, n),
                Ok(Err(e)) => return Err(self.err("reading", e)),
                // The file ended early (the reader stops after a short chunk).
                Ok(Ok(_)) | Err(_) => {
                    return Err(NarError::FileChanged {
                        path: self.path.clone(),
                        expected: size,
                        got: size - left,
                    })
                }
            };
            self.sink.write_all(&buf[..n]).map_err(NarError::Write)?;
            left -= n as u64;
            // Err: the reader is done and needs no more buffers.
            let _ = empty_tx.send(buf);
        }
        Ok(())
    }

    /// Reads exactly `size` bytes of `fd` straight into the output buffer.
    fn copy_contents(&mut self, fd: &OwnedFd, size: u64) -> Result<(), NarError> {
        let mut left = size;
        while left > 0 {
            if self.len == self.buf.len() {
                self.flush()?;
            }
            let room = (self.buf.len() - self.len).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match rustix::io::read(fd, &mut self.buf[self.len..self.len + room]) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.err("reading", e)),
            };
            if n == 0 {
                return Err(NarError::FileChanged {
                    path: self.path.clone(),
                    expected: size,
                    got: size - left,
                });
            }
            self.len += n;
            left -= n as u64;
        }
        Ok(())
    }

    fn symlink(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), NarError> {
        let target = rfs::readlinkat(dir, name, std::mem::take(&mut self.link))
            .map_err(|e| self.err("reading symlink", e))?;
        self.put(&TOK_SYM)?;
        self.put_str(target.as_bytes())?;
        self.link = target.into_bytes();
        self.put(&TOK_CLOSE)
    }

    fn directory(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        depth: usize,
    ) -> Result<(), NarError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(parent, name, flags, Mode::empty())
            .map_err(|e| self.err("opening directory", e))?;
        if self.levels.len() <= depth {
            self.levels.resize_with(depth + 1, Level::default);
        }
        // Taken out while the children (one level deeper) use `self`.
        let mut level = std::mem::take(&mut self.levels[depth]);
        let res = self
            .read_entries(&fd, &mut level)
            .and_then(|()| self.entries(&fd, &level, depth));
        self.levels[depth] = level;
        res
    }

    fn read_entries(&mut self, fd: &OwnedFd, level: &mut Level) -> Result<(), NarError> {
        level.names.clear();
        level.entries.clear();
        let mut dir = RawDir::new(fd, self.dirents.spare_capacity_mut());
        while let Some(entry) = dir.next() {
            let entry = entry.map_err(|e| NarError::Dump {
                op: "reading directory",
                path: self.path.clone(),
                source: e.into(),
            })?;
            let name = entry.file_name().to_bytes_with_nul();
            if name == b".\0" || name == b"..\0" {
                continue;
            }
            let start = level.names.len();
            level.names.extend_from_slice(name);
            level.entries.push(DirEntry {
                start,
                end: level.names.len() - 1,
                kind: entry.file_type(),
            });
        }
        let names = &level.names;
        // Bytewise order of the raw names, as Nix's std::map<std::string>.
        level
            .entries
            .sort_unstable_by(|a, b| names[a.start..a.end].cmp(&names[b.start..b.end]));
        Ok(())
    }

    fn entries(&mut self, fd: &OwnedFd, level: &Level, depth: usize) -> Result<(), NarError> {
        self.put(&TOK_DIR)?;
        let files = level
            .entries
            .iter()
            .filter(|e| e.kind == FileType::RegularFile)
            .count();
        if self.parallel && files >= PREFETCH_MIN_FILES {
            let (tx, rx) = mpsc::sync_channel(PREFETCH_AHEAD);
            let (pool_tx, pool_rx) = mpsc::channel();
            std::thread::scope(|scope| {
                let helper = move || prefetch(fd, level, tx, pool_rx);
                let spawned = std::thread::Builder::new()
                    .name("nar-prefetch".into())
                    .spawn_scoped(scope, helper);
                // Without a helper thread (or once it is gone) this thread
                // reads every file itself.
                let prefetch = spawned.ok().map(|_| Prefetch { rx, pool: pool_tx });
                // `prefetch` is moved in and dropped on return, before the
                // scope joins the helper, so the helper never waits on it.
                self.entries_from(fd, level, depth, prefetch)
            })?;
        } else {
            self.entries_from(fd, level, depth, None)?;
        }
        self.put(&TOK_CLOSE)
    }

    fn entries_from(
        &mut self,
        fd: &OwnedFd,
        level: &Level,
        depth: usize,
        prefetch: Option<Prefetch>,
    ) -> Result<(), NarError> {
        let mut nth_file = 0usize;
        for e in &level.entries {
            let name = level.name(e);
            self.path.push(OsStr::from_bytes(name.to_bytes()));
            if depth + 1 >= MAX_DEPTH {
                return Err(NarError::DumpTooDeep {
                    path: self.path.clone(),
                });
            }
            self.put(&TOK_ENTRY)?;
            self.put_str(name.to_bytes())?;
            self.put(&TOK_NODE)?;
            let mut done = false;
            if e.kind == FileType::RegularFile {
                if let (Some(p), true) = (&prefetch, is_prefetched(nth_file)) {
                    // None: the helper left this one to us (large, changed or
                    // failing; the error is then reported from here).
                    if let Ok(Some((executable, data))) = p.rx.recv() {
                        self.put_file(executable, &data)?;
                        let _ = p.pool.send(data);
                        done = true;
                    }
                }
                nth_file += 1;
            }
            if !done {
                self.node(fd.as_fd(), name, e.kind, depth + 1)?;
            }
            self.put(&TOK_CLOSE)?;
            self.path.pop();
        }
        Ok(())
    }

    /// A regular file's body from bytes already read.
    fn put_file(&mut self, executable: bool, data: &[u8]) -> Result<(), NarError> {
        self.put(if executable { &TOK_EXE } else { &TOK_REG })?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.put(data)?;
        self.put_padding(data.len() as u64)?;
        self.put(&TOK_CLOSE)
    }
}

/// Files read ahead by a helper thread: one message per file it takes, in
/// entry order. Large directories spend their time in system calls (open,
/// fstat, read, close per file), so two threads sharing them halve the wait.
struct Prefetch {
    rx: mpsc::Receiver<Option<(bool, Vec<u8>)>>,
    /// Buffers handed back to the helper for reuse.
    pool: mpsc::Sender<Vec<u8>>,
}

/// The helper takes every other regular file of a directory; the dumping
/// thread reads the rest (and everything else) meanwhile.
fn is_prefetched(nth_file: usize) -> bool {
    nth_file % 2 == 1
}

fn prefetch(
    dir: &OwnedFd,
    level: &Level,
    tx: mpsc::SyncSender<Option<(bool, Vec<u8>)>>,
    pool: mpsc::Receiver<Vec<u8>>,
) {
    let files = level
        .entries
        .iter()
        .filter(|e| e.kind == FileType::RegularFile);
    for (nth, e) in files.enumerate() {
        if !is_prefetched(nth) {
            continue;
        }
        let buf = pool.try_recv().unwrap_or_default();
        // Err: the dumping thread stopped; so do we.
        if tx.send(read_small_file(dir, level.name(e), buf)).is_err() {
            return;
        }
    }
}

/// Reads a small regular file whole; `None` for anything else, which the
/// dumping thread then handles (and reports) itself.
fn read_small_file(dir: &OwnedFd, name: &CStr, mut buf: Vec<u8>) -> Option<(bool, Vec<u8>)> {
    let fd = rfs::openat(dir, name, file_open_flags(), Mode::empty()).ok()?;
    let st = rfs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    let size = usize::try_from(st.st_size)
        .ok()
        .filter(|&n| n <= PREFETCH_MAX_SIZE)?;
    buf.clear();
    buf.resize(size, 0);
    let mut got = 0;
    while got < size {
        match rustix::io::read(&fd, &mut buf[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
    Some((st.st_mode & 0o100 != 0, buf))
}

/// How files to archive are opened. `O_NONBLOCK`: if an entry was swapped
/// for a fifo since readdir, the open must not hang; fstat then refuses it.
fn file_open_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY
}

fn type_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "file of unknown type",
    }
}

// ---------------------------------------------------------------------------
// Reader.

/// Receives what [`parse`] finds, in order. A node's `name` is `None` for
/// the root and the entry name otherwise. Every method may stop the parse by
/// returning an error. The defaults do nothing, so parsing with a visitor
/// that overrides nothing only validates.
pub trait NarVisitor {
    /// A directory starts; its entries follow, then [`NarVisitor::directory_end`].
    fn directory(&mut self, _name: Option<&[u8]>) -> Result<(), NarError> {
        Ok(())
    }
    /// The innermost open directory is complete.
    fn directory_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    /// A regular file of `size` bytes starts; its contents follow in chunks,
    /// then [`NarVisitor::regular_end`].
    fn regular(
        &mut self,
        _name: Option<&[u8]>,
        _executable: bool,
        _size: u64,
    ) -> Result<(), NarError> {
        Ok(())
    }
    /// The next chunk of the current file's contents.
    fn contents(&mut self, _chunk: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    /// The current file is complete.
    fn regular_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    /// A symlink (target checked: 1 to 4095 bytes, no NUL).
    fn symlink(&mut self, _name: Option<&[u8]>, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
}

/// A visitor that ignores everything: `parse(src, &mut NullVisitor)` checks
/// a NAR and skips over it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullVisitor;

impl NarVisitor for NullVisitor {}

/// Reads exactly one NAR from `source`, never a byte past its end, checking
/// it strictly and reporting its contents to `visitor`. Returns the NAR's size.
///
/// Tokens are read with small exact reads, so `source` should be buffered
/// (a `BufReader` the caller owns, or `StdinLock`); wrapping a shared stream
/// in a new `BufReader` here would swallow the bytes after the NAR.
pub fn parse(source: &mut dyn Read, visitor: &mut dyn NarVisitor) -> Result<u64, NarError> {
    let mut p = Parser {
        src: source,
        pos: 0,
        tok: Vec::with_capacity(64),
        chunk: Vec::new(),
        prev: Vec::new(),
    };
    p.magic()?;
    p.node(0, None, visitor)?;
    Ok(p.pos)
}

struct Parser<'r> {
    src: &'r mut dyn Read,
    pos: u64,
    /// The last string read (keyword, name or target), without padding.
    tok: Vec<u8>,
    chunk: Vec<u8>,
    /// Per depth, a buffer for the previous entry name (for the order check).
    prev: Vec<Vec<u8>>,
}

/// `read_exact` that counts bytes and turns a short input into a NAR error
/// carrying the exact offset.
fn fill(src: &mut dyn Read, pos: &mut u64, mut buf: &mut [u8]) -> Result<(), NarError> {
    while !buf.is_empty() {
        match src.read(buf) {
            Ok(0) => return Err(NarError::UnexpectedEof { pos: *pos }),
            Ok(n) => {
                *pos += n as u64;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(NarError::Read {
                    pos: *pos,
                    source: e,
                })
            }
        }
    }
    Ok(())
}

impl Parser<'_> {
    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        fill(self.src, &mut self.pos, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads the rest of a string whose length `len` (≤ a small bound) was
    /// read already, into `self.tok`, checking its padding.
    fn read_body(&mut self, len: usize) -> Result<(), NarError> {
        let total = padded(len);
        self.tok.clear();
        self.tok.resize(total, 0);
        fill(self.src, &mut self.pos, &mut self.tok)?;
        if let Some(i) = self.tok[len..].iter().position(|&b| b != 0) {
            return Err(NarError::NonZeroPadding {
                pos: self.pos - (total - len - i) as u64,
            });
        }
        self.tok.truncate(len);
        Ok(())
    }

    /// Reads a keyword into `self.tok`; returns its offset. Longer strings
    /// are refused unread.
    fn tag(&mut self, expected: &'static str) -> Result<u64, NarError> {
        let start = self.pos;
        let len = self.read_u64()?;
        if len > MAX_TAG_LEN as u64 {
            return Err(NarError::UnexpectedToken {
                pos: start,
                expected,
                found: format!("<{len}-byte string>"),
            });
        }
        self.read_body(len as usize)?;
        Ok(start)
    }

    fn expect(&mut self, want: &'static [u8], expected: &'static str) -> Result<(), NarError> {
        let start = self.tag(expected)?;
        if self.tok != want {
            return Err(self.unexpected(start, expected));
        }
        Ok(())
    }

    fn unexpected(&self, pos: u64, expected: &'static str) -> NarError {
        NarError::UnexpectedToken {
            pos,
            expected,
            found: show(&self.tok),
        }
    }

    fn magic(&mut self) -> Result<(), NarError> {
        let mut b = [0u8; 24];
        fill(self.src, &mut self.pos, &mut b)?;
        if b != TOK_NAR[..24] {
            return Err(NarError::BadMagic);
        }
        Ok(())
    }

    fn node(
        &mut self,
        depth: usize,
        name: Option<&[u8]>,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        let start = self.pos;
        if depth >= MAX_DEPTH {
            return Err(NarError::TooDeep { pos: start });
        }
        self.expect(b"(", "'('")?;
        self.expect(b"type", "'type'")?;
        const TYPES: &str = "'regular', 'symlink' or 'directory'";
        let at = self.tag(TYPES)?;
        match self.tok.as_slice() {
            b"regular" => self.regular(name, v),
            b"symlink" => self.symlink(name, v),
            b"directory" => self.directory(depth, name, v),
            _ => Err(self.unexpected(at, TYPES)),
        }
    }

    fn regular(&mut self, name: Option<&[u8]>, v: &mut dyn NarVisitor) -> Result<(), NarError> {
        let mut at = self.tag("'executable' or 'contents'")?;
        let mut executable = false;
        if self.tok == b"executable" {
            let marker = self.pos;
            let len = self.read_u64()?;
            if len != 0 {
                return Err(NarError::NonEmptyExecutable { pos: marker });
            }
            executable = true;
            at = self.tag("'contents'")?;
        }
        if self.tok != b"contents" {
            return Err(self.unexpected(
                at,
                if executable {
                    "'contents'"
                } else {
                    "'executable' or 'contents'"
                },
            ));
        }
        let size = self.read_u64()?;
        v.regular(name, executable, size)?;
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(READ_CHUNK_SIZE);
            if self.chunk.len() < n {
                self.chunk.resize(n, 0);
            }
            fill(self.src, &mut self.pos, &mut self.chunk[..n])?;
            v.contents(&self.chunk[..n])?;
            left -= n as u64;
        }
        let pad = (8 - (size % 8) as usize) % 8;
        let mut b = [0u8; 8];
        fill(self.src, &mut self.pos, &mut b[..pad])?;
        if let Some(i) = b[..pad].iter().position(|&x| x != 0) {
            return Err(NarError::NonZeroPadding {
                pos: self.pos - (pad - i) as u64,
            });
        }
        v.regular_end()?;
        self.expect(b")", "')'")
    }

    fn symlink(&mut self, name: Option<&[u8]>, v: &mut dyn NarVisitor) -> Result<(), NarError> {
        self.expect(b"target", "'target'")?;
        let at = self.pos;
        let len = self.read_u64()?;
        if len > MAX_TARGET_LEN as u64 {
            return Err(NarError::InvalidSymlinkTarget {
                pos: at,
                reason: "longer than 4095 bytes",
            });
        }
        self.read_body(len as usize)?;
        if self.tok.is_empty() {
            return Err(NarError::InvalidSymlinkTarget {
                pos: at,
                reason: "empty",
            });
        }
        if self.tok.contains(&0) {
            return Err(NarError::InvalidSymlinkTarget {
                pos: at,
                reason: "contains a NUL byte",
            });
        }
        v.symlink(name, &self.tok)?;
        self.expect(b")", "')'")
    }

    fn directory(
        &mut self,
        depth: usize,
        name: Option<&[u8]>,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        v.directory(name)?;
        if self.prev.len() <= depth {
            self.prev.resize_with(depth + 1, Vec::new);
        }
        // Taken out while the children (one level deeper) use `self`.
        let mut prev = std::mem::take(&mut self.prev[depth]);
        prev.clear();
        let res = self.entries(depth, &mut prev, v);
        self.prev[depth] = prev;
        res?;
        v.directory_end()
    }

    fn entries(
        &mut self,
        depth: usize,
        prev: &mut Vec<u8>,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        loop {
            let at = self.tag("'entry' or ')'")?;
            match self.tok.as_slice() {
                b")" => return Ok(()),
                b"entry" => {}
                _ => return Err(self.unexpected(at, "'entry' or ')'")),
            }
            self.expect(b"(", "'('")?;
            self.expect(b"name", "'name'")?;
            let at = self.pos;
            let len = self.read_u64()?;
            if len > MAX_NAME_LEN as u64 {
                return Err(NarError::InvalidName {
                    pos: at,
                    name: format!("<{len}-byte name>"),
                    reason: "longer than 255 bytes",
                });
            }
            self.read_body(len as usize)?;
            let name = self.tok.as_slice();
            let bad = |reason| NarError::InvalidName {
                pos: at,
                name: show(name),
                reason,
            };
            if name.is_empty() {
                return Err(bad("empty"));
            }
            if name == b"." || name == b".." {
                return Err(bad("'.' and '..' are not entry names"));
            }
            if name.contains(&b'/') {
                return Err(bad("contains '/'"));
            }
            if name.contains(&0) {
                return Err(bad("contains a NUL byte"));
            }
            // Names are never empty, so an empty `prev` means "first entry".
            if !prev.is_empty() {
                match name.cmp(prev.as_slice()) {
                    std::cmp::Ordering::Greater => {}
                    std::cmp::Ordering::Equal => {
                        return Err(NarError::DuplicateName {
                            pos: at,
                            name: show(name),
                        })
                    }
                    std::cmp::Ordering::Less => {
                        return Err(NarError::NotSorted {
                            pos: at,
                            prev: show(prev),
                            name: show(name),
                        })
                    }
                }
            }
            prev.clear();
            prev.extend_from_slice(name);
            self.expect(b"node", "'node'")?;
            self.node(depth + 1, Some(prev), v)?;
            self.expect(b")", "')'")?;
        }
    }
}

/// Renders raw bytes for a one-line message: UTF-8 as is, control
/// characters and invalid bytes escaped, long strings cut.
fn show(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let mut out = String::new();
    for chunk in bytes[..bytes.len().min(MAX)].utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if bytes.len() > MAX {
        out.push_str("...");
    }
    out
}

// ---------------------------------------------------------------------------
// Restorer.

/// Reads exactly one NAR from `source` (never a byte past its end) and
/// restores it at `dest`, which must not exist.
///
/// Files are created with `O_EXCL`, executables get `mode | 0111` as Nix
/// does; timestamps and write permissions are left for the store to
/// canonicalise. On error, whatever was created at `dest` is removed.
pub fn restore(source: &mut dyn Read, dest: &Path) -> Result<(), NarError> {
    restore_counted(source, dest).map(|_| ())
}

/// [`restore`] for a NAR that must be the whole of `source`: a byte after the
/// NAR is an error ([`NarError::TrailingData`]), and the tree is removed.
pub fn restore_whole(source: &mut dyn Read, dest: &Path) -> Result<(), NarError> {
    let size = restore_counted(source, dest)?;
    let mut byte = [0u8; 1];
    let trailing = loop {
        match source.read(&mut byte) {
            Ok(n) => break Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                break Err(NarError::Read {
                    pos: size,
                    source: e,
                })
            }
        }
    };
    match trailing {
        Ok(false) => Ok(()),
        Ok(true) => {
            remove_partial(dest);
            Err(NarError::TrailingData { pos: size })
        }
        Err(e) => {
            remove_partial(dest);
            Err(e)
        }
    }
}

fn restore_counted(source: &mut dyn Read, dest: &Path) -> Result<u64, NarError> {
    if dest.symlink_metadata().is_ok() {
        return Err(NarError::DestExists {
            path: dest.to_owned(),
        });
    }
    let mut r = Restorer::new(dest);
    let res = parse(source, &mut r);
    let created = r.created;
    drop(r);
    if res.is_err() && created {
        remove_partial(dest);
    }
    res
}

/// Best-effort removal of a partly restored tree; `remove_dir_all` does not
/// follow symlinks inside it.
fn remove_partial(dest: &Path) {
    let res = match dest.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dest),
        Ok(_) => std::fs::remove_file(dest),
        Err(_) => return,
    };
    if let Err(e) = res {
        tracing::warn!("could not remove partly restored '{}': {e}", dest.display());
    }
}

/// The filesystem side of [`restore`]. It holds a descriptor for each open
/// directory it created and creates children relative to it, so no path is
/// resolved through anything but directories it made itself.
struct Restorer<'d> {
    dest: &'d Path,
    dirs: Vec<OwnedFd>,
    file: Option<File>,
    /// The path of the entry being created, for messages.
    path: PathBuf,
    /// Whether `dest` itself was created (and so must be removed on failure).
    created: bool,
}

impl<'d> Restorer<'d> {
    fn new(dest: &'d Path) -> Restorer<'d> {
        Restorer {
            dest,
            dirs: Vec::new(),
            file: None,
            path: dest.to_owned(),
            created: false,
        }
    }

    fn err(&self, e: impl Into<io::Error>) -> NarError {
        NarError::Restore {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Where a node goes: (its parent directory, its name), or (cwd, dest)
    /// for the root.
    fn base<'a>(&'a self, name: Option<&'a [u8]>) -> Option<(BorrowedFd<'a>, &'a Path)> {
        match name {
            Some(name) => Some((
                self.dirs.last()?.as_fd(),
                Path::new(OsStr::from_bytes(name)),
            )),
            None if self.dirs.is_empty() => Some((CWD, self.dest)),
            // The parser names every node inside a directory.
            None => None,
        }
    }

    /// Creates a node with `op` and records it for messages and cleanup.
    fn make<T>(
        &mut self,
        name: Option<&[u8]>,
        op: impl FnOnce(BorrowedFd<'_>, &Path) -> rustix::io::Result<T>,
    ) -> Result<T, NarError> {
        if let Some(name) = name {
            self.path.push(OsStr::from_bytes(name));
        }
        let res = match self.base(name) {
            // The root comes only once.
            Some(_) if name.is_none() && self.created => Err(rustix::io::Errno::INVAL),
            Some((dir, path)) => op(dir, path),
            None => Err(rustix::io::Errno::INVAL),
        };
        match res {
            Ok(v) => {
                self.created |= name.is_none();
                Ok(v)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Done with the current non-directory node.
    fn leave(&mut self) {
        if !self.dirs.is_empty() {
            self.path.pop();
        }
    }
}

impl NarVisitor for Restorer<'_> {
    fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        self.make(name, |dir, path| {
            rfs::mkdirat(dir, path, Mode::from_raw_mode(0o777))
        })?;
        // Opened right after creation, without following a symlink, so the
        // descriptor is the directory just made.
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match self.base(name) {
            Some((dir, path)) => rfs::openat(dir, path, flags, Mode::empty()),
            None => Err(rustix::io::Errno::INVAL),
        }
        .map_err(|e| self.err(e))?;
        self.dirs.push(fd);
        Ok(())
    }

    fn directory_end(&mut self) -> Result<(), NarError> {
        self.dirs.pop();
        self.leave();
        Ok(())
    }

    fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        _size: u64,
    ) -> Result<(), NarError> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = self.make(name, |dir, path| {
            rfs::openat(dir, path, flags, Mode::from_raw_mode(0o666))
        })?;
        if executable {
            // As Nix: the umask-filtered default plus every execute bit.
            let mode = rfs::fstat(&fd)
                .map(|st| st.st_mode)
                .map_err(|e| self.err(e))?;
            rfs::fchmod(&fd, Mode::from_raw_mode((mode | 0o111) & 0o7777))
                .map_err(|e| self.err(e))?;
        }
        self.file = Some(File::from(fd));
        Ok(())
    }

    fn contents(&mut self, chunk: &[u8]) -> Result<(), NarError> {
        match self.file.as_mut() {
            Some(f) => f.write_all(chunk).map_err(|e| self.err(e)),
            None => Err(self.err(io::Error::from(io::ErrorKind::InvalidInput))),
        }
    }

    fn regular_end(&mut self) -> Result<(), NarError> {
        self.file = None;
        self.leave();
        Ok(())
    }

    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        self.make(name, |dir, path| rfs::symlinkat(target, dir, path))?;
        self.leave();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Cursor;
    use std::os::unix::fs::{symlink, PermissionsExt};

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
