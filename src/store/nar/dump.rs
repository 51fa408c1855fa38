//! The NAR writer: [`dump`] and [`hash_path`].

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, CWD};

use super::*;
use crate::store::hash::HashSink;
use crate::store::{Hash, HashAlgo};

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
        buf: take_spare_buf(),
        len: 0,
        dirents: Vec::with_capacity(DIRENT_BUF_SIZE),
        levels: Vec::new(),
        link: Vec::new(),
        path: path.to_owned(),
        parallel: *PARALLEL
            .get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)),
    };
    let result = (|| {
        d.put(&TOK_NAR)?;
        d.node(CWD, &cpath, FileType::Unknown, 0)?;
        d.flush()?;
        d.sink.flush().map_err(NarError::Write)
    })();
    give_back_buf(std::mem::take(&mut d.buf));
    result
}

/// Whether a second core can read ahead: asked once per process, since
/// `available_parallelism` reads cgroup files each time (more than a small
/// dump costs).
static PARALLEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Write buffers of finished dumps, for the next ones: a fresh zeroed MiB
/// per dump cost more than all the rest of dumping a small build output
/// (measured: page faults and memset were a tenth of a trivial build's
/// time). Process-wide, not per thread: every build runs on a new thread.
static SPARE_BUFS: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());

/// How many spare buffers are kept: enough for the dumps that run at once
/// on a busy machine, few enough that idle memory stays small.
const SPARE_BUFS_KEPT: usize = 4;

fn take_spare_buf() -> Box<[u8]> {
    SPARE_BUFS
        .lock()
        .ok()
        .and_then(|mut spare| spare.pop())
        .unwrap_or_else(|| vec![0u8; WRITE_BUF_SIZE].into_boxed_slice())
}

fn give_back_buf(buf: Box<[u8]>) {
    if buf.len() != WRITE_BUF_SIZE {
        return;
    }
    if let Ok(mut spare) = SPARE_BUFS.lock() {
        if spare.len() < SPARE_BUFS_KEPT {
            spare.push(buf);
        }
    }
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
