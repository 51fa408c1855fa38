//! The NAR writer: [`dump`] and [`hash_path`].
//!
//! A directory is written in two roles. The dumping thread walks the tree a
//! bounded distance ahead of what it writes (listing and sorting
//! directories, in NAR order, across directory boundaries) and queues every
//! regular file it meets; reader threads take the queued files in that
//! order, in chunks, and read the small ones whole. The dumping thread
//! writes strictly in NAR order and feeds the sink (usually the hash); when
//! the next file is not read yet it reads a chunk itself instead of
//! waiting. On trees of many small files nearly all the time is the
//! per-file `openat`/`fstat`/`read`/`close` in the kernel, which this
//! spreads over the cores. The bytes written do not depend on which thread
//! read what: a reader only ever hands over a whole file of the size it
//! saw, and leaves anything unusual (a failure, a large file, a file that
//! changed type) to the dumping thread, which reads it as a lone file
//! would be and reports the error from its place in the NAR.

use std::collections::VecDeque;
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, CWD};

use super::*;
use crate::store::hash::HashSink;
use crate::store::{Hash, HashAlgo};

/// Writes the NAR serialisation of the file, symlink or directory at `path`.
///
/// The path itself is not followed if it is a symlink (as `nix-store --dump`).
/// Output goes to `sink` in large writes; no extra buffering is needed.
pub fn dump(path: &Path, sink: &mut dyn Write) -> Result<(), NarError> {
    let readers = *READERS.get_or_init(|| {
        std::thread::available_parallelism().map_or(0, |n| (n.get() - 1).min(MAX_READERS))
    });
    dump_with(path, sink, readers)
}

/// [`dump`] with at most `readers` reader threads (0: this thread alone).
pub(super) fn dump_with(path: &Path, sink: &mut dyn Write, readers: usize) -> Result<(), NarError> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| NarError::BadPath {
        path: path.to_owned(),
    })?;
    let mut d = Dumper::new(sink, path, readers);
    let result = (|| {
        d.put(&TOK_NAR)?;
        d.root(&cpath)?;
        d.flush()?;
        d.sink.flush().map_err(NarError::Write)
    })();
    give_back_buf(std::mem::take(&mut d.buf));
    result
}

/// How many reader threads a dump may start: one less than the cores (the
/// dumping thread reads too), asked once per process, since
/// `available_parallelism` reads cgroup files each time (more than a small
/// dump costs).
static READERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

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

/// A listed directory: its descriptor (for the `openat` of its entries) and
/// its entries in NAR order. Shared by the walk, the queued events and the
/// reader threads; the descriptor closes when the last of them is done.
struct Dir {
    fd: OwnedFd,
    /// Entry names, each followed by a NUL so it can be passed as a C string.
    names: Vec<u8>,
    entries: Vec<DirEntry>,
}

impl Dir {
    fn name(&self, i: usize) -> &CStr {
        let e = &self.entries[i];
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

/// What the dumping thread writes next, in NAR order; produced by the walk.
enum Event {
    /// `entry ( name <name> node ( type`, for entry `idx` of `dir`.
    Entry(Arc<Dir>, usize),
    /// The regular file of the entry just before: the next queued file.
    File(Arc<Dir>, usize),
    /// A symlink, or something a NAR cannot hold (refused when written).
    Other(Arc<Dir>, usize, FileType),
    /// `directory`: the directory of the entry just before, or the root.
    DirStart,
    /// `)` closing a directory node.
    DirEnd,
    /// `)` closing an entry.
    EntryEnd,
    /// The walk could not go on here; the error is reported when the dump
    /// gets here, with the path of the entry just before.
    Failed(&'static str, io::Error),
}

/// The walk: a depth-first traversal, resumable after any entry, so it can
/// run ahead of the writing by a bounded amount.
struct Walk {
    /// The directories being walked, and the index of their next entry.
    stack: Vec<(Arc<Dir>, usize)>,
    /// Events not yet written, in order.
    events: VecDeque<Event>,
    /// Files queued since the last hand-over to the readers.
    new_files: Vec<(Arc<Dir>, usize)>,
    /// Regular files walked and not yet written.
    files_ahead: usize,
    /// The `getdents64` buffer.
    dirents: Vec<u8>,
    /// Directories opened by the walk and not yet closed in the NAR: each
    /// holds a descriptor, so this bounds the descriptors a dump holds.
    dirs_ahead: usize,
    done: bool,
}

/// A file read by a reader thread, for the dumping thread.
enum Prefetched {
    Read {
        executable: bool,
        data: Vec<u8>,
    },
    /// Left to the dumping thread: too large to hold, not a regular file any
    /// more, or failing (the dumping thread then reports the error itself).
    Unread,
}

/// The queue of files between the walk and the reader threads. Files are
/// numbered in NAR order and taken in chunks of consecutive files (one lock
/// and at most one wake-up per chunk: in a VM, waking a thread on the other
/// core costs more than reading a small file). The dumping thread consumes
/// the outcomes in order; while the next one is not there it reads a chunk
/// itself rather than wait.
struct Reads {
    state: Mutex<ReadState>,
    /// Readers wait here for files to read.
    queued: Condvar,
    /// The dumping thread waits here for the file it needs.
    read: Condvar,
}

#[derive(Default)]
struct ReadState {
    /// Files queued and not yet taken; the first is number `next_todo`.
    todo: VecDeque<(Arc<Dir>, usize)>,
    next_todo: u64,
    /// Outcomes of files `first..`, in order; `None` while not read yet.
    done: VecDeque<Option<Prefetched>>,
    first: u64,
    /// Buffers of written files, for reuse.
    spare: Vec<Vec<u8>>,
    stop: bool,
    /// A reader panicked (a bug): the files it took are not coming, and the
    /// dumping thread reads them itself rather than wait forever.
    reader_lost: bool,
    /// The file the dumping thread waits for, if it waits.
    writer_waits: Option<u64>,
    idle_readers: usize,
}

/// A chunk of files taken by a thread, and what it read.
#[derive(Default)]
struct Chunk {
    first: u64,
    files: Vec<(Arc<Dir>, usize)>,
    bufs: Vec<Vec<u8>>,
    read: Vec<Prefetched>,
}

impl Reads {
    fn new() -> Reads {
        Reads {
            state: Mutex::new(ReadState::default()),
            queued: Condvar::new(),
            read: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReadState> {
        // Nothing under the lock panics short of a broken invariant (the
        // `expect`s), so a poisoned state is still the last consistent one.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues files (in NAR order) and wakes idle readers for them.
    fn queue(&self, files: &mut Vec<(Arc<Dir>, usize)>) {
        let mut st = self.lock();
        let n = files.len();
        for f in files.drain(..) {
            st.todo.push_back(f);
            st.done.push_back(None);
        }
        let wake = st.idle_readers.min(n.div_ceil(PREFETCH_CHUNK));
        if wake == 0 {
            // Nobody sleeps: no futex call.
        } else if wake == st.idle_readers {
            self.queued.notify_all();
        } else {
            for _ in 0..wake {
                self.queued.notify_one();
            }
        }
    }

    /// Takes the next chunk of queued files, if any, with a buffer for each.
    fn take(&self, st: &mut ReadState, chunk: &mut Chunk) -> bool {
        let n = st.todo.len().min(PREFETCH_CHUNK);
        if n == 0 {
            return false;
        }
        chunk.first = st.next_todo;
        st.next_todo += n as u64;
        chunk.files.extend(st.todo.drain(..n));
        for _ in 0..n {
            chunk.bufs.push(st.spare.pop().unwrap_or_default());
        }
        true
    }

    /// Reads a taken chunk, without the lock.
    fn read_chunk(&self, chunk: &mut Chunk) {
        for ((dir, idx), buf) in chunk.files.drain(..).zip(chunk.bufs.drain(..)) {
            let got = read_small_file(dir.fd.as_fd(), dir.name(idx), buf);
            chunk.read.push(got);
        }
    }

    /// Stores what a chunk read; wakes the dumping thread if it waits for it.
    fn store(&self, st: &mut ReadState, chunk: &mut Chunk) {
        let n = chunk.read.len();
        for (seq, got) in (chunk.first..).zip(chunk.read.drain(..)) {
            // The dumping thread pops only outcomes that are there, unless a
            // reader was lost: then it may have read this file itself.
            if let Some(slot) = seq
                .checked_sub(st.first)
                .and_then(|k| st.done.get_mut(usize::try_from(k).ok()?))
            {
                *slot = Some(got);
            }
        }
        if let Some(w) = st.writer_waits {
            if (chunk.first..chunk.first + n as u64).contains(&w) {
                self.read.notify_one();
            }
        }
    }

    /// The outcome of the next file in NAR order. `back`: the buffer of the
    /// previous file, for reuse.
    fn next(&self, back: Option<Vec<u8>>, chunk: &mut Chunk) -> Prefetched {
        let mut st = self.lock();
        if let Some(buf) = back {
            st.spare.push(buf);
        }
        loop {
            if let Some(Some(_)) = st.done.front() {
                st.first += 1;
                return st.done.pop_front().flatten().expect("checked just above");
            }
            // Not read yet: help rather than wait (the first chunk taken is
            // the one holding this file if no reader has taken it).
            if self.take(&mut st, chunk) {
                drop(st);
                self.read_chunk(chunk);
                st = self.lock();
                self.store(&mut st, chunk);
                continue;
            }
            if st.reader_lost {
                st.done.pop_front();
                st.first += 1;
                return Prefetched::Unread;
            }
            st.writer_waits = Some(st.first);
            st = self.read.wait(st).unwrap_or_else(|e| e.into_inner());
            st.writer_waits = None;
        }
    }

    /// Runs on each reader thread until the dump stops.
    fn reader(&self) {
        /// Tells the dumping thread if this reader unwinds.
        struct Lost<'a>(&'a Reads);
        impl Drop for Lost<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.lock().reader_lost = true;
                    self.0.read.notify_one();
                }
            }
        }
        let _lost = Lost(self);
        let mut chunk = Chunk::default();
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            if !self.take(&mut st, &mut chunk) {
                st.idle_readers += 1;
                st = self.queued.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle_readers -= 1;
                continue;
            }
            drop(st);
            self.read_chunk(&mut chunk);
            st = self.lock();
            self.store(&mut st, &mut chunk);
        }
    }

    fn stop(&self) {
        let mut st = self.lock();
        st.stop = true;
        st.todo.clear();
        self.queued.notify_all();
    }
}

/// Reads a small regular file whole; [`Prefetched::Unread`] for anything
/// else, which the dumping thread then handles (and reports) itself.
fn read_small_file(dir: BorrowedFd<'_>, name: &CStr, mut buf: Vec<u8>) -> Prefetched {
    let Ok(fd) = rfs::openat(dir, name, file_open_flags(), Mode::empty()) else {
        return Prefetched::Unread;
    };
    let Ok(st) = rfs::fstat(&fd) else {
        return Prefetched::Unread;
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Prefetched::Unread;
    }
    let Some(size) = usize::try_from(st.st_size)
        .ok()
        .filter(|&n| n <= PREFETCH_MAX_SIZE)
    else {
        return Prefetched::Unread;
    };
    buf.clear();
    buf.reserve(size);
    // Straight into the spare capacity: no zeroing, and no read past `size`
    // to see the end (the size came from fstat a moment ago).
    while buf.len() < size {
        match rustix::io::read(&fd, rustix::buffer::spare_capacity(&mut buf)) {
            Ok(0) => return Prefetched::Unread,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return Prefetched::Unread,
        }
    }
    // A file that grew since fstat: its first `size` bytes, as a file read
    // by the dumping thread (and by Nix): the NAR stays well formed.
    buf.truncate(size);
    Prefetched::Read {
        executable: st.st_mode & 0o100 != 0,
        data: buf,
    }
}

/// Opens and lists a directory, entries sorted bytewise (as Nix's
/// `std::map<std::string>`). `dirents`: the `getdents64` buffer.
fn open_dir(
    parent: BorrowedFd<'_>,
    name: &CStr,
    dirents: &mut Vec<u8>,
) -> Result<Arc<Dir>, (&'static str, io::Error)> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(parent, name, flags, Mode::empty())
        .map_err(|e| ("opening directory", e.into()))?;
    let mut names = Vec::new();
    let mut entries = Vec::new();
    let mut raw = RawDir::new(&fd, dirents.spare_capacity_mut());
    while let Some(entry) = raw.next() {
        let entry = entry.map_err(|e| ("reading directory", e.into()))?;
        let name = entry.file_name().to_bytes_with_nul();
        if name == b".\0" || name == b"..\0" {
            continue;
        }
        let start = names.len();
        names.extend_from_slice(name);
        entries.push(DirEntry {
            start,
            end: names.len() - 1,
            kind: entry.file_type(),
        });
    }
    entries.sort_unstable_by(|a, b| names[a.start..a.end].cmp(&names[b.start..b.end]));
    Ok(Arc::new(Dir { fd, names, entries }))
}

impl Walk {
    /// Walks one step: one entry, or the end of a directory.
    fn step(&mut self) {
        let Some((dir, next)) = self.stack.last_mut() else {
            self.done = true;
            return;
        };
        if *next == dir.entries.len() {
            self.stack.pop();
            self.events.push_back(Event::DirEnd);
            if self.stack.is_empty() {
                self.done = true;
            } else {
                self.events.push_back(Event::EntryEnd);
            }
            return;
        }
        let i = *next;
        *next += 1;
        let dir = Arc::clone(dir);
        self.events.push_back(Event::Entry(Arc::clone(&dir), i));
        if self.stack.len() >= MAX_DEPTH {
            // The writer refuses this entry; nothing after it is needed.
            self.done = true;
            return;
        }
        let mut kind = dir.entries[i].kind;
        if !matches!(
            kind,
            FileType::RegularFile | FileType::Directory | FileType::Symlink
        ) {
            // d_type may be DT_UNKNOWN on some filesystems.
            match rfs::statat(dir.fd.as_fd(), dir.name(i), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => kind = FileType::from_raw_mode(st.st_mode),
                Err(e) => return self.fail("reading file type of", e.into()),
            }
        }
        match kind {
            FileType::RegularFile => {
                self.events.push_back(Event::File(Arc::clone(&dir), i));
                self.new_files.push((dir, i));
                self.files_ahead += 1;
            }
            FileType::Directory => {
                match open_dir(dir.fd.as_fd(), dir.name(i), &mut self.dirents) {
                    Ok(sub) => {
                        self.events.push_back(Event::DirStart);
                        self.stack.push((sub, 0));
                        self.dirs_ahead += 1;
                    }
                    Err((op, e)) => self.fail(op, e),
                }
                return;
            }
            other => self.events.push_back(Event::Other(dir, i, other)),
        }
        self.events.push_back(Event::EntryEnd);
    }

    fn fail(&mut self, op: &'static str, e: io::Error) {
        self.events.push_back(Event::Failed(op, e));
        self.done = true;
    }
}

struct Dumper<'s> {
    sink: &'s mut dyn Write,
    buf: Box<[u8]>,
    len: usize,
    dirents: Vec<u8>,
    link: Vec<u8>,
    /// The path of the node being written, for error messages only.
    path: PathBuf,
    /// Reader threads a walked directory may start.
    readers: usize,
}

impl<'s> Dumper<'s> {
    fn new(sink: &'s mut dyn Write, path: &Path, readers: usize) -> Dumper<'s> {
        Dumper {
            sink,
            buf: take_spare_buf(),
            len: 0,
            dirents: Vec::with_capacity(DIRENT_BUF_SIZE),
            link: Vec::new(),
            path: path.to_owned(),
            readers,
        }
    }

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

    /// The root node: a directory is walked, anything else written here.
    fn root(&mut self, path: &CStr) -> Result<(), NarError> {
        let st = rfs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("reading file type of", e))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::Directory {
            return self.leaf(CWD, path, kind);
        }
        let root = open_dir(CWD, path, &mut self.dirents).map_err(|(op, e)| self.err(op, e))?;
        self.directory(root)
    }

    /// Writes a listed directory, from `directory` to its closing `)`.
    fn directory(&mut self, root: Arc<Dir>) -> Result<(), NarError> {
        let mut walk = Walk {
            stack: vec![(root, 0)],
            events: VecDeque::from([Event::DirStart]),
            new_files: Vec::new(),
            dirents: std::mem::take(&mut self.dirents),
            files_ahead: 0,
            dirs_ahead: 1,
            done: false,
        };
        let reads = Reads::new();
        let res = std::thread::scope(|scope| {
            let res = self.tree(&mut walk, &reads, scope);
            // Readers finish the chunk they are reading, then return, and
            // the scope waits for them: no thread outlives the dump.
            reads.stop();
            res
        });
        self.dirents = std::mem::take(&mut walk.dirents);
        res
    }

    /// Writes the events of the walk, walking ahead as it goes.
    fn tree<'scope, 'env>(
        &mut self,
        walk: &mut Walk,
        reads: &'env Reads,
        scope: &'scope std::thread::Scope<'scope, 'env>,
    ) -> Result<(), NarError> {
        let ahead = PREFETCH_AHEAD;
        let mut readers = 0;
        let mut queued_total = 0usize;
        let mut depth = 0usize;
        let mut back = None;
        let mut chunk = Chunk::default();
        loop {
            // Walk on when the files queued ahead fall to half: refilling in
            // batches keeps the readers busy with few wake-ups.
            if !walk.done
                && (walk.events.is_empty()
                    || (walk.files_ahead < ahead / 2 && walk.dirs_ahead < MAX_DIRS_AHEAD))
            {
                loop {
                    walk.step();
                    if walk.done
                        || walk.files_ahead >= ahead
                        || walk.dirs_ahead >= MAX_DIRS_AHEAD
                        || walk.events.len() >= MAX_EVENTS
                    {
                        break;
                    }
                }
                if !walk.new_files.is_empty() {
                    queued_total += walk.new_files.len();
                    // Threads pay off only past a few files; a small output
                    // is dumped on this thread alone.
                    while readers < self.readers && queued_total >= PREFETCH_MIN_FILES {
                        let spawned = std::thread::Builder::new()
                            .name("nar-read".into())
                            .spawn_scoped(scope, || reads.reader());
                        if spawned.is_err() {
                            break;
                        }
                        readers += 1;
                    }
                    reads.queue(&mut walk.new_files);
                }
            }
            let Some(event) = walk.events.pop_front() else {
                return Ok(());
            };
            match event {
                Event::Entry(dir, i) => {
                    let name = dir.name(i);
                    self.path.push(OsStr::from_bytes(name.to_bytes()));
                    if depth >= MAX_DEPTH {
                        return Err(NarError::DumpTooDeep {
                            path: self.path.clone(),
                        });
                    }
                    self.put(&TOK_ENTRY)?;
                    self.put_str(name.to_bytes())?;
                    self.put(&TOK_NODE)?;
                }
                Event::File(dir, i) => {
                    walk.files_ahead -= 1;
                    match reads.next(back.take(), &mut chunk) {
                        Prefetched::Read { executable, data } => {
                            self.put_file(executable, &data)?;
                            back = Some(data);
                        }
                        Prefetched::Unread => self.regular(dir.fd.as_fd(), dir.name(i))?,
                    }
                }
                Event::Other(dir, i, kind) => self.leaf(dir.fd.as_fd(), dir.name(i), kind)?,
                Event::DirStart => {
                    self.put(&TOK_DIR)?;
                    depth += 1;
                }
                Event::DirEnd => {
                    self.put(&TOK_CLOSE)?;
                    depth -= 1;
                    walk.dirs_ahead -= 1;
                }
                Event::EntryEnd => {
                    self.put(&TOK_CLOSE)?;
                    self.path.pop();
                }
                Event::Failed(op, e) => return Err(self.err(op, e)),
            }
        }
    }

    /// Writes a node that is not a directory, from its type keyword to its
    /// closing `)`.
    fn leaf(&mut self, dir: BorrowedFd<'_>, name: &CStr, kind: FileType) -> Result<(), NarError> {
        match kind {
            FileType::RegularFile => self.regular(dir, name),
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
        // Readers allowed means a second core, which the pipeline needs.
        if self.readers > 0 && size >= PIPELINE_MIN {
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

    /// A regular file's body from bytes already read.
    fn put_file(&mut self, executable: bool, data: &[u8]) -> Result<(), NarError> {
        self.put(if executable { &TOK_EXE } else { &TOK_REG })?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.put(data)?;
        self.put_padding(data.len() as u64)?;
        self.put(&TOK_CLOSE)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file or directory that goes away between the listing of its
    /// directory and its turn: the error names it, whichever thread met it
    /// first, and nothing hangs or panics.
    #[test]
    fn reports_entries_removed_after_their_directory_was_listed() {
        for readers in [0, MAX_READERS] {
            for gone in ["f017", "sub"] {
                let tmp = tempfile::tempdir().unwrap();
                let root = tmp.path().join("t");
                std::fs::create_dir(&root).unwrap();
                for i in 0..(PREFETCH_AHEAD * 2) {
                    std::fs::write(root.join(format!("f{i:03}")), b"data").unwrap();
                }
                std::fs::create_dir(root.join("sub")).unwrap();
                let croot = CString::new(root.as_os_str().as_bytes()).unwrap();
                let mut dirents = Vec::with_capacity(DIRENT_BUF_SIZE);
                let listed = open_dir(CWD, &croot, &mut dirents).unwrap();
                let p = root.join(gone);
                if gone == "sub" {
                    std::fs::remove_dir(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
                let mut out = Vec::new();
                let err = Dumper::new(&mut out, &root, readers)
                    .directory(listed)
                    .unwrap_err();
                match err {
                    NarError::Dump { path, source, .. } => {
                        assert_eq!(path, p, "readers: {readers}");
                        assert_eq!(source.kind(), io::ErrorKind::NotFound);
                    }
                    other => panic!("readers {readers}, {gone}: {other:?}"),
                }
            }
        }
    }

    /// A reader that dies (a bug) does not leave the dump waiting forever
    /// for the files it took, nor breaks the readers that come after.
    #[test]
    fn files_of_a_lost_reader_are_left_to_the_dumping_thread() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..3 {
            std::fs::write(tmp.path().join(format!("f{i}")), [i as u8; 5]).unwrap();
        }
        let cpath = CString::new(tmp.path().as_os_str().as_bytes()).unwrap();
        let listed = open_dir(CWD, &cpath, &mut Vec::with_capacity(DIRENT_BUF_SIZE)).unwrap();
        let reads = Reads::new();
        reads.queue(&mut (0..3).map(|i| (Arc::clone(&listed), i)).collect());
        // A reader takes all three and dies without storing them.
        let mut taken = Chunk::default();
        assert!(reads.take(&mut reads.lock(), &mut taken));
        reads.lock().reader_lost = true;
        let mut chunk = Chunk::default();
        assert!(matches!(reads.next(None, &mut chunk), Prefetched::Unread));
        // A late store of the same files lands only where still wanted.
        reads.read_chunk(&mut taken);
        reads.store(&mut reads.lock(), &mut taken);
        match reads.next(None, &mut chunk) {
            Prefetched::Read { data, .. } => assert_eq!(data, [1u8; 5]),
            Prefetched::Unread => panic!("f1 was read"),
        }
    }
}
