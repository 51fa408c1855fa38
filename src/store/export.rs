//! Export archives: the `nix-store --export` / `--import` stream, carrying
//! signatures.
//!
//! # Format
//!
//! Every integer is a little-endian u64 and every string is a length, the
//! bytes and zero padding to a multiple of 8 (formats.md §1, §8):
//!
//! ```text
//! export = { u64(1) entry } u64(0)
//! entry  = NAR                       -- no length prefix: the NAR ends itself
//!          u64(0x4558494e)           -- "NIXE"
//!          str(store path)           -- full path
//!          u64(n) { str(reference) } -- sorted full paths
//!          str(deriver)              -- full path or ""
//!          trailer
//! ```
//!
//! Entries come dependencies first, so an importer can make each path valid
//! as soon as it has read it.
//!
//! # How signatures travel
//!
//! Nix's trailer is `u64(0)`, "no legacy signature"; its importer reads a
//! string after a `u64(1)` and ignores it (`export-import.cc`, 2.8.0 and
//! later: `if (readInt(source) == 1) readString(source);`). sandoff uses that
//! slot for the path's signatures:
//!
//! ```text
//! trailer = u64(0)                                 -- no signatures (Nix's form)
//!         | u64(1) str("name:base64 name:base64")  -- space-separated signatures
//! ```
//!
//! So an archive written by sandoff is byte-identical to Nix's when the paths
//! are unsigned, and `nix-store --import` accepts it either way (dropping the
//! signatures, as Nix's own import does), while sandoff's importer checks
//! them against its trusted keys. Nix's archives carry no signatures, so they
//! import into sandoff only with signature checks turned off.
//!
//! # Reading
//!
//! [`ExportReader`] parses the stream without buffering a NAR: the caller
//! passes a function that consumes exactly one NAR from the stream (the
//! store's `stage_nar`, or [`skip_nar`] for a pure decode). Lengths and
//! counts are bounded before anything is allocated, and a short stream is a
//! clear `truncated` error. [`import_paths`] makes the paths valid one at a
//! time, each atomically: a failure keeps the paths already imported and
//! leaves nothing of the failing one.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::Path;

use thiserror::Error;

use super::hash::{HashAlgo, HashSink, HashingReader};
use super::local::{LocalStore, PendingCommit, StagedPath, StoreError};
use super::nar::{self, NarError};
use super::signature::{Signature, SignatureError, TrustedKeys};
use super::wire::padding;
use super::{Hash, PathError, StoreDir, StorePath, ValidPathInfo};

mod checks;
use checks::SignatureChecks;

/// `exportMagic`: "NIXE" in little-endian.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Longest store path string accepted (PATH_MAX); real ones are far shorter.
const MAX_PATH_LEN: u64 = 4096;
/// Most references one entry may list.
const MAX_REFERENCES: u64 = 1 << 20;
/// Longest signature trailer accepted: thousands of signatures.
const MAX_SIGNATURES_LEN: u64 = 1 << 20;

/// Why an export archive could not be written, read or imported.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("export archive is truncated at byte {pos} (reading {what})")]
    Truncated { pos: u64, what: &'static str },
    #[error("cannot read export archive at byte {pos}")]
    Read {
        pos: u64,
        #[source]
        source: io::Error,
    },
    #[error("not an export archive: expected 0 or 1 at byte {pos}, found {found}")]
    BadMarker { pos: u64, found: u64 },
    #[error("export archive: wrong magic {found:#x} at byte {pos} (expected 0x4558494e, 'NIXE')")]
    BadMagic { pos: u64, found: u64 },
    #[error(
        "export archive: {what} at byte {pos} is {len} bytes long, more than the limit of {max}"
    )]
    TooLong {
        what: &'static str,
        pos: u64,
        len: u64,
        max: u64,
    },
    #[error("export archive: {count} references at byte {pos}, more than the limit of {max}")]
    TooManyReferences { pos: u64, count: u64, max: u64 },
    #[error("export archive: non-zero padding after {what} at byte {pos}")]
    BadPadding { what: &'static str, pos: u64 },
    #[error("export archive: {what} at byte {pos} is not UTF-8")]
    NotUtf8 { what: &'static str, pos: u64 },
    #[error("export archive: bad {what} at byte {pos}")]
    BadPath {
        what: &'static str,
        pos: u64,
        #[source]
        source: PathError,
    },
    #[error("export archive: signature marker at byte {pos} is {found} (expected 0 or 1)")]
    BadSignatureMarker { pos: u64, found: u64 },
    #[error("export archive: bad signature for '{path}' at byte {pos}")]
    BadSignature {
        path: String,
        pos: u64,
        #[source]
        source: SignatureError,
    },
    #[error("malformed NAR in export archive: {0}")]
    Nar(#[source] NarError),
    #[error("cannot write the NAR of '{path}'")]
    Dump {
        path: String,
        #[source]
        source: NarError,
    },
    #[error("cannot write export archive")]
    Write(#[source] io::Error),
    #[error("path '{path}' has changed on disk: its NAR is {actual} ({actual_size} bytes), the registry says {expected} ({expected_size} bytes)")]
    Changed {
        path: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("cannot unpack entry {entry} of the export archive")]
    Stage {
        entry: usize,
        #[source]
        source: Box<StoreError>,
    },
    #[error("path '{path}' lacks a signature by a trusted key ({detail})")]
    Untrusted { path: String, detail: String },
    #[error("cannot check the signatures of entry {entry} of the export archive")]
    SignatureChecker { entry: usize },
    #[error(
        "path '{path}' references '{reference}', which is neither valid nor earlier in the archive"
    )]
    MissingReference { path: String, reference: String },
    #[error("cannot check whether '{path}' is valid")]
    Query {
        path: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot import path '{path}'")]
    Commit {
        path: String,
        #[source]
        source: Box<StoreError>,
    },
}

/// What an entry says about its path, apart from the NAR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    pub path: StorePath,
    /// Store paths the path refers to (may include itself).
    pub references: BTreeSet<StorePath>,
    /// The derivation that produced it, if the exporter knew.
    pub deriver: Option<StorePath>,
    /// Signatures from a sandoff trailer; always empty for Nix's archives.
    pub signatures: BTreeSet<Signature>,
}

// ---------------------------------------------------------------------------
// Writing

/// Writes export archives: [`ExportWriter::write_path`] per path,
/// dependencies first, then [`ExportWriter::finish`].
pub struct ExportWriter<W: Write> {
    sink: W,
    dir: StoreDir,
}

impl<W: Write> ExportWriter<W> {
    /// A writer for paths of the store directory `dir`.
    pub fn new(sink: W, dir: StoreDir) -> ExportWriter<W> {
        ExportWriter { sink, dir }
    }

    /// Writes one entry, serialising the files at `physical` (where
    /// `info.path` is on this machine). Like Nix, refuses a path whose NAR no
    /// longer matches the registry, so corruption does not spread; the
    /// archive is then unfinished, and importers refuse it.
    pub fn write_path(&mut self, info: &ValidPathInfo, physical: &Path) -> Result<(), ExportError> {
        let path = self.dir.display(&info.path);
        self.write_entry_with(info, |sink| {
            nar::dump(physical, sink).map_err(|source| ExportError::Dump { path, source })
        })
    }

    /// Writes one entry whose NAR `write_nar` produces, checking it against
    /// `info`'s NAR hash and size.
    pub fn write_entry_with(
        &mut self,
        info: &ValidPathInfo,
        write_nar: impl FnOnce(&mut dyn Write) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        write_u64(&mut self.sink, 1)?;
        let mut tee = HashingWriter {
            inner: &mut self.sink,
            hash: HashSink::new(HashAlgo::Sha256),
        };
        write_nar(&mut tee)?;
        let (actual, actual_size) = tee.hash.finish();
        if actual != info.nar_hash || actual_size != info.nar_size {
            return Err(ExportError::Changed {
                path: self.dir.display(&info.path),
                expected: info.nar_hash.to_nix32_prefixed(),
                expected_size: info.nar_size,
                actual: actual.to_nix32_prefixed(),
                actual_size,
            });
        }
        write_meta(&mut self.sink, &self.dir, info)
    }

    /// Writes the end marker and flushes; returns the sink.
    pub fn finish(mut self) -> Result<W, ExportError> {
        write_u64(&mut self.sink, 0)?;
        self.sink.flush().map_err(ExportError::Write)?;
        Ok(self.sink)
    }
}

/// Writes a whole archive of `entries` (each a path's registry record and
/// where its files are), in the order given, which must be dependencies first.
pub fn write_export<'a>(
    sink: &mut dyn Write,
    dir: &StoreDir,
    entries: impl IntoIterator<Item = (&'a ValidPathInfo, &'a Path)>,
) -> Result<(), ExportError> {
    let mut writer = ExportWriter::new(sink, dir.clone());
    for (info, physical) in entries {
        writer.write_path(info, physical)?;
    }
    writer.finish().map(drop)
}

fn write_meta(
    sink: &mut dyn Write,
    dir: &StoreDir,
    info: &ValidPathInfo,
) -> Result<(), ExportError> {
    write_u64(sink, EXPORT_MAGIC)?;
    write_str(sink, dir.display(&info.path).as_bytes())?;
    write_u64(sink, info.references.len() as u64)?;
    for r in &info.references {
        write_str(sink, dir.display(r).as_bytes())?;
    }
    let deriver = info
        .deriver
        .as_ref()
        .map(|d| dir.display(d))
        .unwrap_or_default();
    write_str(sink, deriver.as_bytes())?;
    if info.signatures.is_empty() {
        write_u64(sink, 0)
    } else {
        let sigs: Vec<String> = info.signatures.iter().map(Signature::to_string).collect();
        write_u64(sink, 1)?;
        write_str(sink, sigs.join(" ").as_bytes())
    }
}

fn write_u64(sink: &mut dyn Write, n: u64) -> Result<(), ExportError> {
    sink.write_all(&n.to_le_bytes()).map_err(ExportError::Write)
}

fn write_str(sink: &mut dyn Write, s: &[u8]) -> Result<(), ExportError> {
    write_u64(sink, s.len() as u64)?;
    sink.write_all(s).map_err(ExportError::Write)?;
    sink.write_all(&[0u8; 8][..padding(s.len() as u64)])
        .map_err(ExportError::Write)
}

/// Passes everything on and hashes it (the NAR as it goes out).
struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hash: HashSink,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.write_all(&buf[..n])?;
        Ok(n)
    }
    /// Nothing: a NAR is not a message boundary of the export stream, which
    /// [`ExportWriter::finish`] flushes once. `nar::dump` flushes its sink
    /// after each path; passed on through a compressing SSH transport, that
    /// ended a zstd frame and sent a small SSH packet per path (2,000 small
    /// paths: 2,000 frames, each a separate write down the host's pipe).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Reading

/// Counts the bytes read, for error positions.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A streaming parser of export archives.
pub struct ExportReader<R: Read> {
    src: Counted<R>,
    dir: StoreDir,
    entries: usize,
    done: bool,
}

impl<R: Read> ExportReader<R> {
    /// A reader of archives of paths in the store directory `dir`.
    pub fn new(src: R, dir: StoreDir) -> ExportReader<R> {
        ExportReader {
            src: Counted { inner: src, pos: 0 },
            dir,
            entries: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.src.pos
    }

    /// Reads the next entry, or `None` after the end marker. `read_nar` is
    /// called with the stream positioned at the entry's NAR and must consume
    /// exactly that NAR; what it returns comes back with the entry's metadata.
    /// After an error the stream position is unknown: stop reading.
    pub fn next_entry<T>(
        &mut self,
        read_nar: impl FnOnce(&mut dyn Read, usize) -> Result<T, ExportError>,
    ) -> Result<Option<(T, EntryMeta)>, ExportError> {
        if self.done {
            return Ok(None);
        }
        let pos = self.src.pos;
        match self.read_u64("entry marker")? {
            0 => {
                self.done = true;
                return Ok(None);
            }
            1 => {}
            found => return Err(ExportError::BadMarker { pos, found }),
        }
        let entry = self.entries;
        self.entries += 1;
        let nar = read_nar(&mut self.src, entry)?;
        let meta = self.read_meta()?;
        Ok(Some((nar, meta)))
    }

    fn read_meta(&mut self) -> Result<EntryMeta, ExportError> {
        let pos = self.src.pos;
        let magic = self.read_u64("magic")?;
        if magic != EXPORT_MAGIC {
            return Err(ExportError::BadMagic { pos, found: magic });
        }
        let path = self.read_path("store path")?;
        let pos = self.src.pos;
        let count = self.read_u64("reference count")?;
        if count > MAX_REFERENCES {
            return Err(ExportError::TooManyReferences {
                pos,
                count,
                max: MAX_REFERENCES,
            });
        }
        let mut references = BTreeSet::new();
        for _ in 0..count {
            references.insert(self.read_path("reference")?);
        }
        let deriver_pos = self.src.pos;
        let deriver = self.read_text("deriver", MAX_PATH_LEN)?;
        let deriver = if deriver.is_empty() {
            None
        } else {
            Some(self.parse_path(&deriver, "deriver", deriver_pos)?)
        };
        let pos = self.src.pos;
        let signatures = match self.read_u64("signature marker")? {
            0 => BTreeSet::new(),
            1 => {
                let pos = self.src.pos;
                let text = self.read_text("signatures", MAX_SIGNATURES_LEN)?;
                text.split_ascii_whitespace()
                    .map(|s| s.parse::<Signature>())
                    .collect::<Result<_, _>>()
                    .map_err(|source| ExportError::BadSignature {
                        path: self.dir.display(&path),
                        pos,
                        source,
                    })?
            }
            found => return Err(ExportError::BadSignatureMarker { pos, found }),
        };
        Ok(EntryMeta {
            path,
            references,
            deriver,
            signatures,
        })
    }

    fn read_path(&mut self, what: &'static str) -> Result<StorePath, ExportError> {
        let pos = self.src.pos;
        let text = self.read_text(what, MAX_PATH_LEN)?;
        self.parse_path(&text, what, pos)
    }

    fn parse_path(
        &self,
        text: &str,
        what: &'static str,
        pos: u64,
    ) -> Result<StorePath, ExportError> {
        self.dir
            .parse_path(text)
            .map_err(|source| ExportError::BadPath { what, pos, source })
    }

    fn read_u64(&mut self, what: &'static str) -> Result<u64, ExportError> {
        let pos = self.src.pos;
        let mut buf = [0u8; 8];
        read_exact(&mut self.src, &mut buf, pos, what)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// A string of at most `max` bytes, checked before allocating.
    fn read_text(&mut self, what: &'static str, max: u64) -> Result<String, ExportError> {
        let pos = self.src.pos;
        let len = self.read_u64(what)?;
        if len > max {
            return Err(ExportError::TooLong {
                what,
                pos,
                len,
                max,
            });
        }
        let mut buf = vec![0u8; len as usize];
        read_exact(&mut self.src, &mut buf, pos, what)?;
        let pad_pos = self.src.pos;
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding(len)];
        read_exact(&mut self.src, pad, pad_pos, what)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(ExportError::BadPadding { what, pos: pad_pos });
        }
        String::from_utf8(buf).map_err(|_| ExportError::NotUtf8 { what, pos })
    }
}

fn read_exact(
    src: &mut dyn Read,
    buf: &mut [u8],
    pos: u64,
    what: &'static str,
) -> Result<(), ExportError> {
    src.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ExportError::Truncated { pos, what },
        _ => ExportError::Read { pos, source: e },
    })
}

/// An entry decoded without a store: metadata and what the NAR hashes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedEntry {
    pub meta: EntryMeta,
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// Decodes a whole archive without a store, checking each NAR's structure
/// and hashing it (for inspection, tests and fuzzing).
pub fn decode_all(src: impl Read, dir: &StoreDir) -> Result<Vec<DecodedEntry>, ExportError> {
    let mut reader = ExportReader::new(src, dir.clone());
    let mut out = Vec::new();
    while let Some(((nar_hash, nar_size), meta)) = reader.next_entry(|nar, _| {
        let mut hashing = HashingReader::new(nar, HashAlgo::Sha256);
        skip_nar(&mut hashing)?;
        let (hash, size, _) = hashing.finish();
        Ok((hash, size))
    })? {
        out.push(DecodedEntry {
            meta,
            nar_hash,
            nar_size,
        });
    }
    Ok(out)
}

/// Reads exactly one NAR from `src` and discards it, checking it with the
/// NAR module's strict parser (tokens, padding, sorted and valid names,
/// bounded depth).
pub fn skip_nar(src: &mut dyn Read) -> Result<(), ExportError> {
    nar::parse(src, &mut nar::NullVisitor).map_err(ExportError::Nar)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Importing

/// Which paths an import accepts.
#[derive(Clone, Copy, Debug)]
pub enum SignaturePolicy<'a> {
    /// Each path needs a valid signature by one of these keys.
    RequireTrusted(&'a TrustedKeys),
    /// Accept paths whatever their signatures (`--no-check-sigs`).
    AcceptUnchecked,
}

/// What an import needs from a store: [`LocalStore`] in production, an
/// in-memory fake in tests (passed in explicitly, never chosen by `cfg`).
pub trait ImportTarget {
    /// A NAR unpacked but not yet valid; dropping it must discard it.
    type Staged;
    /// The store directory paths are named in.
    fn store_dir(&self) -> &StoreDir;
    /// Reads exactly one NAR from `nar` (entry `entry` of the archive) and
    /// stages it, returning it with its NAR hash and size.
    fn stage(
        &self,
        nar: &mut dyn Read,
        entry: usize,
    ) -> Result<(Self::Staged, Hash, u64), ExportError>;
    /// Whether `path` is valid.
    fn is_valid(&self, path: &StorePath) -> Result<bool, ExportError>;
    /// A batch on its way to being valid (see [`ImportTarget::start_commit`]).
    type Pending;
    /// Starts making staged NARs valid, in order (references first); each
    /// path atomically. A store may do it at once, paying for durability
    /// once, and in the background: the paths become valid in
    /// [`ImportTarget::finish_commit`], and not at all if `Pending` is
    /// dropped.
    fn start_commit(
        &self,
        batch: Vec<(Self::Staged, ValidPathInfo)>,
    ) -> Result<Self::Pending, ExportError>;
    /// Makes the batch of `pending` valid.
    fn finish_commit(&self, pending: Self::Pending) -> Result<(), ExportError>;
}

impl ImportTarget for LocalStore {
    type Staged = StagedPath;

    fn store_dir(&self) -> &StoreDir {
        &self.location().dir
    }

    fn stage(
        &self,
        nar: &mut dyn Read,
        entry: usize,
    ) -> Result<(StagedPath, Hash, u64), ExportError> {
        let staged = self.stage_nar(nar).map_err(|source| ExportError::Stage {
            entry,
            source: Box::new(source),
        })?;
        let (hash, size) = (staged.nar_hash.clone(), staged.nar_size);
        Ok((staged, hash, size))
    }

    fn is_valid(&self, path: &StorePath) -> Result<bool, ExportError> {
        LocalStore::is_valid(self, path).map_err(|source| ExportError::Query {
            path: self.location().logical(path),
            source: Box::new(source),
        })
    }

    type Pending = (PendingCommit, String);

    fn start_commit(
        &self,
        batch: Vec<(StagedPath, ValidPathInfo)>,
    ) -> Result<(PendingCommit, String), ExportError> {
        let first = match batch.first() {
            Some((_, info)) => self.location().logical(&info.path),
            None => String::new(),
        };
        match self.start_commit_batch(batch) {
            Ok(pending) => Ok((pending, first)),
            Err(source) => Err(ExportError::Commit {
                path: first,
                source: Box::new(source),
            }),
        }
    }

    fn finish_commit(&self, (pending, first): (PendingCommit, String)) -> Result<(), ExportError> {
        self.finish_commit_batch(pending)
            .map_err(|source| ExportError::Commit {
                path: first,
                source: Box::new(source),
            })
    }
}

/// How many paths, or NAR bytes, an import stages before making them valid
/// together: one filesystem sync per batch instead of one per path (which
/// made a 300-path import wait for 300 synchronous write-backs).
const BATCH_PATHS: usize = 256;
const BATCH_BYTES: u64 = 256 << 20;

/// Imports an archive into `store`, in stream order, each path atomically;
/// `on_imported` is told of each path as it becomes valid. On error, the
/// paths already imported stay valid and nothing of the failing one remains.
/// Signatures are checked on another thread while the next paths are
/// staged (see [`checks`]); a batch is committed only once all of its paths
/// passed.
pub fn import_paths<S: ImportTarget>(
    store: &S,
    src: &mut dyn Read,
    policy: SignaturePolicy<'_>,
    on_imported: &mut dyn FnMut(&StorePath),
) -> Result<Vec<StorePath>, ExportError> {
    match policy {
        SignaturePolicy::AcceptUnchecked => import_checked(store, src, None, on_imported),
        SignaturePolicy::RequireTrusted(keys) => std::thread::scope(|scope| {
            let checks = SignatureChecks::new(scope, keys, store.store_dir().clone());
            import_checked(store, src, Some(checks), on_imported)
        }),
    }
}

fn import_checked<'s, 'k: 's, S: ImportTarget>(
    store: &S,
    src: &mut dyn Read,
    mut checks: Option<SignatureChecks<'s, 'k>>,
    on_imported: &mut dyn FnMut(&StorePath),
) -> Result<Vec<StorePath>, ExportError> {
    let dir = store.store_dir().clone();
    let mut reader = ExportReader::new(src, dir.clone());
    let mut done = Done {
        dir: &dir,
        on_imported,
        imported: Vec::new(),
    };
    let mut batch = Batch::default();
    // The batch before, being flushed while this one is staged.
    let mut pending: Option<Started<S::Pending>> = None;
    let result = (|| {
        // The reader numbers the entries; the checks and the batch go by it.
        while let Some(((index, (staged, nar_hash, nar_size)), meta)) =
            reader.next_entry(|nar, entry| Ok((entry, store.stage(nar, entry)?)))?
        {
            let info = ValidPathInfo {
                path: meta.path,
                deriver: meta.deriver,
                nar_hash,
                nar_size,
                references: meta.references,
                registration_time: now(),
                ultimate: false,
                signatures: meta.signatures,
                ca: None,
            };
            if let Some(checks) = &mut checks {
                checks.submit(index, &info);
                if checks.refused().is_some() {
                    // Reported after the loop, which cuts the batch there.
                    return Ok(());
                }
            }
            for r in &info.references {
                // Earlier entries are valid, pending or in the batch by now.
                if *r != info.path
                    && !batch.paths.contains(r)
                    && !pending.as_ref().is_some_and(|p| p.paths.contains(r))
                    && !store.is_valid(r)?
                {
                    return Err(ExportError::MissingReference {
                        path: dir.display(&info.path),
                        reference: dir.display(r),
                    });
                }
            }
            batch.push(index, staged, info);
            if batch.entries.len() >= BATCH_PATHS || batch.bytes >= BATCH_BYTES {
                if checks.as_mut().is_some_and(|c| c.settle().is_some()) {
                    return Ok(());
                }
                if let Err(e) = done.finish(store, pending.take()) {
                    // Nothing after a batch that failed becomes valid.
                    batch.cut_at(batch.first);
                    return Err(e);
                }
                pending = batch.start(store)?;
            }
        }
        Ok(())
    })();
    // A refused path comes before anything the loop failed on later in the
    // stream: the batch stops short of it, and its refusal is the error.
    let refusal = checks.and_then(SignatureChecks::into_refusal);
    if let Some(refusal) = &refusal {
        batch.cut_at(refusal.index);
    }
    let result = match refusal {
        Some(refusal) => Err(refusal.error),
        None => result,
    };
    // The batch before comes first; then what was staged and checked
    // before an error is committed too, so that the paths before the
    // failing one stay valid, as if one at a time.
    let finished = done.finish(store, pending.take());
    let committed = match &finished {
        Ok(()) => batch
            .start(store)
            .and_then(|started| done.finish(store, started)),
        Err(_) => Ok(()),
    };
    finished.and(result).and(committed).map(|()| done.imported)
}

/// A batch whose commit has started: its paths, in order.
struct Started<P> {
    pending: P,
    order: Vec<StorePath>,
    paths: BTreeSet<StorePath>,
}

/// The paths an import made valid, told as they become so.
struct Done<'a, 'f> {
    dir: &'a StoreDir,
    on_imported: &'f mut dyn FnMut(&StorePath),
    imported: Vec<StorePath>,
}

impl Done<'_, '_> {
    /// Makes a started batch valid, if there is one.
    fn finish<S: ImportTarget>(
        &mut self,
        store: &S,
        started: Option<Started<S::Pending>>,
    ) -> Result<(), ExportError> {
        let Some(started) = started else {
            return Ok(());
        };
        store.finish_commit(started.pending)?;
        for p in started.order {
            tracing::info!(path = %self.dir.display(&p), "imported");
            (self.on_imported)(&p);
            self.imported.push(p);
        }
        Ok(())
    }
}

/// Paths staged and checked, not yet valid: entries `first..` of the
/// archive, in order.
struct Batch<S> {
    first: usize,
    entries: Vec<(S, ValidPathInfo)>,
    paths: BTreeSet<StorePath>,
    bytes: u64,
}

impl<S> Default for Batch<S> {
    fn default() -> Self {
        Batch {
            first: 0,
            entries: Vec::new(),
            paths: BTreeSet::new(),
            bytes: 0,
        }
    }
}

impl<S> Batch<S> {
    fn push(&mut self, index: usize, staged: S, info: ValidPathInfo) {
        if self.entries.is_empty() {
            self.first = index;
        }
        self.bytes += info.nar_size;
        self.paths.insert(info.path.clone());
        self.entries.push((staged, info));
    }

    /// Drops entry `index` and those after it (discarding what they staged).
    fn cut_at(&mut self, index: usize) {
        let keep = index.saturating_sub(self.first);
        for (_, info) in self.entries.drain(keep.min(self.entries.len())..) {
            self.paths.remove(&info.path);
        }
    }

    /// Starts committing every entry, emptying the batch (`None` if it was
    /// empty).
    fn start<T: ImportTarget<Staged = S>>(
        &mut self,
        store: &T,
    ) -> Result<Option<Started<T::Pending>>, ExportError> {
        if self.entries.is_empty() {
            return Ok(None);
        }
        let entries = std::mem::take(&mut self.entries);
        let paths = std::mem::take(&mut self.paths);
        self.bytes = 0;
        let order: Vec<StorePath> = entries.iter().map(|(_, i)| i.path.clone()).collect();
        let pending = store.start_commit(entries)?;
        Ok(Some(Started {
            pending,
            order,
            paths,
        }))
    }
}

/// Why none of a path's signatures counts, for the error message.
fn untrusted_detail(keys: &TrustedKeys, info: &ValidPathInfo, dir: &StoreDir) -> String {
    if info.signatures.is_empty() {
        return "it has no signatures".to_owned();
    }
    let fingerprint = info.fingerprint(dir);
    let why: Vec<String> = info
        .signatures
        .iter()
        .filter_map(|s| keys.check(&fingerprint, s).err())
        .map(|e| e.to_string())
        .collect();
    why.join("; ")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    /// A cut archive fails either in the archive's own fields or inside a NAR.
    fn is_truncation(msg: &str) -> bool {
        msg.contains("truncated") || msg.contains("unexpected end of NAR")
    }

    use super::*;
    use crate::store::signature::SecretKey;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/keys")
                .join(name),
        )
        .expect("fixture")
    }

    /// The NAR of a regular file, built token by token.
    fn file_nar(contents: &[u8], executable: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut tok = |s: &[u8]| write_str(&mut out, s).unwrap();
        tok(b"nix-archive-1");
        tok(b"(");
        tok(b"type");
        tok(b"regular");
        if executable {
            tok(b"executable");
            tok(b"");
        }
        tok(b"contents");
        tok(contents);
        tok(b")");
        out
    }

    fn info_for(nar: &[u8], base: &str, refs: &[&str]) -> ValidPathInfo {
        ValidPathInfo {
            path: StorePath::from_base_name(base).unwrap(),
            deriver: None,
            nar_hash: HashAlgo::Sha256.digest(nar),
            nar_size: nar.len() as u64,
            references: refs
                .iter()
                .map(|r| StorePath::from_base_name(r).unwrap())
                .collect(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        }
    }

    const FOO: &str = "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";
    const BAZ: &str = "5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz";

    fn encode(entries: &[(&ValidPathInfo, &[u8])]) -> Vec<u8> {
        let mut w = ExportWriter::new(Vec::new(), StoreDir::default());
        for (info, nar) in entries {
            w.write_entry_with(info, |s| s.write_all(nar).map_err(ExportError::Write))
                .unwrap();
        }
        w.finish().unwrap()
    }

    fn sample() -> (Vec<u8>, Vec<u8>, ValidPathInfo, ValidPathInfo) {
        let nar_foo = file_nar(b"bar", false);
        let nar_baz = file_nar(b"/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo", true);
        let foo = info_for(&nar_foo, FOO, &[]);
        let mut baz = info_for(&nar_baz, BAZ, &[FOO, BAZ]);
        baz.deriver =
            Some(StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv").unwrap());
        (nar_foo, nar_baz, foo, baz)
    }

    /// A sink that counts its flushes.
    #[derive(Default)]
    struct FlushCounter {
        bytes: Vec<u8>,
        flushes: usize,
    }

    impl Write for FlushCounter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[test]
    fn an_export_stream_is_flushed_once_at_its_end_not_after_each_nar() {
        // `nar::dump` flushes its sink after each path, as the closures
        // below do: a flush through a compressing transport ends a frame
        // and sends a packet, so each NAR must not reach the stream's sink.
        let (nar_foo, nar_baz, foo, baz) = sample();
        let mut w = ExportWriter::new(FlushCounter::default(), StoreDir::default());
        for (info, nar) in [(&foo, &nar_foo), (&baz, &nar_baz)] {
            w.write_entry_with(info, |s| {
                s.write_all(nar).map_err(ExportError::Write)?;
                s.flush().map_err(ExportError::Write)
            })
            .unwrap();
        }
        let sink = w.finish().unwrap();
        assert_eq!(sink.flushes, 1);
        assert_eq!(sink.bytes, encode(&[(&foo, &nar_foo), (&baz, &nar_baz)]));
    }

    #[test]
    fn decodes_nix_export_of_foo_and_baz() {
        let dir = StoreDir::default();
        let entries = decode_all(fixture("export-foo-baz.nixexport").as_slice(), &dir).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&fixture("path-info.json")).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.meta.path.base_name()).collect();
        assert_eq!(names, [FOO, BAZ], "dependencies first");
        for e in &entries {
            let j = json
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["path"] == dir.display(&e.meta.path))
                .unwrap();
            assert_eq!(e.nar_hash.to_sri(), j["narHash"].as_str().unwrap());
            assert_eq!(e.nar_size, j["narSize"].as_u64().unwrap());
            let refs: Vec<String> = e.meta.references.iter().map(|r| dir.display(r)).collect();
            assert_eq!(serde_json::json!(refs), j["references"]);
            assert!(
                e.meta.signatures.is_empty(),
                "Nix's archives carry no signatures"
            );
            assert_eq!(e.meta.deriver, None);
        }
    }

    #[test]
    fn unsigned_archive_is_byte_identical_to_nix() {
        // Re-encode what Nix exported, with the NARs cut out of Nix's stream.
        let dir = StoreDir::default();
        let nix = fixture("export-foo-baz.nixexport");
        let mut reader = ExportReader::new(nix.as_slice(), dir.clone());
        let mut w = ExportWriter::new(Vec::new(), dir);
        while let Some((nar, meta)) = reader
            .next_entry(|r, _| {
                let mut buf = Vec::new();
                let mut tee = TeeReader {
                    inner: r,
                    copy: &mut buf,
                };
                skip_nar(&mut tee)?;
                Ok(buf)
            })
            .unwrap()
        {
            let mut info = info_for(&nar, meta.path.base_name(), &[]);
            info.references = meta.references;
            w.write_entry_with(&info, |s| s.write_all(&nar).map_err(ExportError::Write))
                .unwrap();
        }
        assert_eq!(w.finish().unwrap(), nix);
    }

    struct TeeReader<'a> {
        inner: &'a mut dyn Read,
        copy: &'a mut Vec<u8>,
    }

    impl Read for TeeReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.copy.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    #[test]
    fn round_trips_metadata_and_signatures() {
        let dir = StoreDir::default();
        let (nar_foo, nar_baz, foo, mut baz) = sample();
        let (k1, k2) = (
            SecretKey::generate("k1").unwrap(),
            SecretKey::generate("k2").unwrap(),
        );
        baz.signatures.insert(k1.sign_path(&baz, &dir).unwrap());
        baz.signatures.insert(k2.sign_path(&baz, &dir).unwrap());
        let bytes = encode(&[(&foo, &nar_foo), (&baz, &nar_baz)]);
        let got = decode_all(bytes.as_slice(), &dir).unwrap();
        assert_eq!(got.len(), 2);
        for (e, info) in got.iter().zip([&foo, &baz]) {
            assert_eq!(e.meta.path, info.path);
            assert_eq!(e.meta.references, info.references);
            assert_eq!(e.meta.deriver, info.deriver);
            assert_eq!(e.meta.signatures, info.signatures);
            assert_eq!((&e.nar_hash, e.nar_size), (&info.nar_hash, info.nar_size));
        }
    }

    #[test]
    fn signature_trailer_is_a_space_separated_string_after_a_one() {
        let dir = StoreDir::default();
        let (nar_foo, _, mut foo, _) = sample();
        let k = SecretKey::generate("k").unwrap();
        let sig = k.sign_path(&foo, &dir).unwrap();
        foo.signatures.insert(sig.clone());
        let bytes = encode(&[(&foo, &nar_foo)]);
        let text = sig.to_string();
        let mut tail = Vec::new();
        write_u64(&mut tail, 1).unwrap();
        write_str(&mut tail, text.as_bytes()).unwrap();
        write_u64(&mut tail, 0).unwrap();
        assert!(bytes.ends_with(&tail));
    }

    #[test]
    fn stops_after_end_marker() {
        let (nar_foo, _, foo, _) = sample();
        let mut bytes = encode(&[(&foo, &nar_foo)]);
        bytes.extend_from_slice(b"trailing garbage");
        assert_eq!(
            decode_all(bytes.as_slice(), &StoreDir::default())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn refuses_every_truncation() {
        let (nar_foo, nar_baz, foo, mut baz) = sample();
        baz.signatures.insert(
            SecretKey::generate("k")
                .unwrap()
                .sign_path(&baz, &StoreDir::default())
                .unwrap(),
        );
        let bytes = encode(&[(&foo, &nar_foo), (&baz, &nar_baz)]);
        for len in 0..bytes.len() {
            let err = decode_all(&bytes[..len], &StoreDir::default()).unwrap_err();
            assert!(is_truncation(&err.to_string()), "cut at {len}: {err}");
        }
    }

    #[test]
    fn refuses_absurd_lengths_before_allocating() {
        let (nar_foo, _, foo, _) = sample();
        let bytes = encode(&[(&foo, &nar_foo)]);
        // The store path's length field follows the NAR and the magic.
        let at = 8 + nar_foo.len() + 8;
        let mut bad = bytes.clone();
        bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = decode_all(bad.as_slice(), &StoreDir::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::TooLong {
                    what: "store path",
                    ..
                }
            ),
            "{err}"
        );
        // The reference count follows the path.
        let at = at + 8 + 48;
        let mut bad = bytes.clone();
        bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = decode_all(bad.as_slice(), &StoreDir::default()).unwrap_err();
        assert!(
            matches!(err, ExportError::TooManyReferences { .. }),
            "{err}"
        );
        // A NAR file of 2^64-1 bytes is streamed, not allocated: truncated.
        let mut bad = bytes;
        let at = 8 + nar_foo.len() - 16 - 16;
        bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = decode_all(bad.as_slice(), &StoreDir::default()).unwrap_err();
        assert!(is_truncation(&err.to_string()), "{err}");
    }

    #[test]
    fn refuses_bad_markers_magic_and_padding() {
        let dir = StoreDir::default();
        let (nar_foo, _, foo, _) = sample();
        let bytes = encode(&[(&foo, &nar_foo)]);
        let mut bad = bytes.clone();
        bad[0] = 2;
        assert_eq!(
            decode_all(bad.as_slice(), &dir).unwrap_err().to_string(),
            "not an export archive: expected 0 or 1 at byte 0, found 2"
        );
        let magic_at = 8 + nar_foo.len();
        let mut bad = bytes.clone();
        bad[magic_at] ^= 1;
        assert!(matches!(
            decode_all(bad.as_slice(), &dir),
            Err(ExportError::BadMagic { .. })
        ));
        // Path string length 48: no padding; the trailer marker sits 8 bytes before the end marker.
        let sig_at = bytes.len() - 16;
        let mut bad = bytes.clone();
        bad[sig_at] = 7;
        assert!(matches!(
            decode_all(bad.as_slice(), &dir),
            Err(ExportError::BadSignatureMarker { found: 7, .. })
        ));
        // "nix-archive-1" (13 bytes) is padded with 3 zero bytes; the NAR
        // reader compares the padded magic whole, as Nix does.
        let mut bad = bytes;
        bad[8 + 8 + 13] = 1;
        assert!(decode_all(bad.as_slice(), &dir)
            .unwrap_err()
            .to_string()
            .contains("doesn't look like a Nix archive"));
    }

    #[test]
    fn refuses_paths_outside_the_store_dir() {
        let (nar_foo, _, foo, _) = sample();
        let bytes = encode(&[(&foo, &nar_foo)]);
        let err = decode_all(bytes.as_slice(), &StoreDir::new("/gnu/store").unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::BadPath {
                    what: "store path",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_malformed_signature_trailer() {
        let dir = StoreDir::default();
        let (nar_foo, _, foo, _) = sample();
        let mut bytes = encode(&[(&foo, &nar_foo)]);
        bytes.truncate(bytes.len() - 16);
        write_u64(&mut bytes, 1).unwrap();
        write_str(&mut bytes, b"k:notbase64").unwrap();
        write_u64(&mut bytes, 0).unwrap();
        let err = decode_all(bytes.as_slice(), &dir).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "export archive: bad signature for '/nix/store/{FOO}'"
            )),
            "{err}"
        );
    }

    #[test]
    fn refuses_nar_that_changed_since_registration() {
        let (_, _, foo, _) = sample();
        let mut w = ExportWriter::new(Vec::new(), StoreDir::default());
        let err = w.write_entry_with(&foo, |s| {
            s.write_all(&file_nar(b"baz", false))
                .map_err(ExportError::Write)
        });
        let err = err.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("path '/nix/store/{FOO}' has changed on disk")),
            "{err}"
        );
    }

    #[test]
    fn skip_nar_reads_exactly_one_nar() {
        let nar = file_nar(b"hello\n", true);
        let mut stream = nar.clone();
        stream.extend_from_slice(b"NEXT");
        let mut r = stream.as_slice();
        skip_nar(&mut r).unwrap();
        assert_eq!(r, b"NEXT");
    }

    #[test]
    fn skip_nar_checks_structure() {
        let mut nar = Vec::new();
        for t in [b"nix-archive-1".as_slice(), b"(", b"type", b"directory"] {
            write_str(&mut nar, t).unwrap();
        }
        let entry = |nar: &mut Vec<u8>, name: &[u8]| {
            for t in [
                b"entry".as_slice(),
                b"(",
                b"name",
                name,
                b"node",
                b"(",
                b"type",
                b"symlink",
                b"target",
                b"x",
                b")",
                b")",
            ] {
                write_str(nar, t).unwrap();
            }
        };
        let mut sorted = nar.clone();
        entry(&mut sorted, b"a");
        entry(&mut sorted, b"b");
        write_str(&mut sorted, b")").unwrap();
        skip_nar(&mut sorted.as_slice()).unwrap();
        let mut unsorted = nar.clone();
        entry(&mut unsorted, b"b");
        entry(&mut unsorted, b"a");
        write_str(&mut unsorted, b")").unwrap();
        assert!(skip_nar(&mut unsorted.as_slice())
            .unwrap_err()
            .to_string()
            .contains("not sorted"));
        let mut slash = nar;
        entry(&mut slash, b"a/b");
        assert!(skip_nar(&mut slash.as_slice())
            .unwrap_err()
            .to_string()
            .contains("invalid NAR entry name"));
    }

    #[test]
    fn skip_nar_limits_depth() {
        let mut nar = Vec::new();
        write_str(&mut nar, b"nix-archive-1").unwrap();
        for _ in 0..100 {
            for t in [
                b"(".as_slice(),
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
            ] {
                write_str(&mut nar, t).unwrap();
            }
        }
        assert!(skip_nar(&mut nar.as_slice())
            .unwrap_err()
            .to_string()
            .contains("maximum depth"));
    }

    // -- Importing, against an in-memory store ------------------------------

    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::rc::Rc;

    /// Valid paths in memory; counts staged NARs not yet committed or dropped.
    #[derive(Default)]
    struct FakeStore {
        dir: StoreDir,
        valid: RefCell<BTreeMap<StorePath, ValidPathInfo>>,
        live_staged: Rc<Cell<usize>>,
        /// A batch holding this path fails to become valid (a failed flush).
        fail_finish: Option<StorePath>,
    }

    struct FakeStaged {
        live: Rc<Cell<usize>>,
    }

    impl Drop for FakeStaged {
        fn drop(&mut self) {
            self.live.set(self.live.get() - 1);
        }
    }

    impl ImportTarget for FakeStore {
        type Staged = FakeStaged;
        fn store_dir(&self) -> &StoreDir {
            &self.dir
        }
        fn stage(
            &self,
            nar: &mut dyn Read,
            _entry: usize,
        ) -> Result<(FakeStaged, Hash, u64), ExportError> {
            let mut hashing = HashingReader::new(nar, HashAlgo::Sha256);
            skip_nar(&mut hashing)?;
            let (hash, size, _) = hashing.finish();
            self.live_staged.set(self.live_staged.get() + 1);
            Ok((
                FakeStaged {
                    live: self.live_staged.clone(),
                },
                hash,
                size,
            ))
        }
        fn is_valid(&self, path: &StorePath) -> Result<bool, ExportError> {
            Ok(self.valid.borrow().contains_key(path))
        }
        type Pending = Vec<ValidPathInfo>;
        fn start_commit(
            &self,
            batch: Vec<(FakeStaged, ValidPathInfo)>,
        ) -> Result<Vec<ValidPathInfo>, ExportError> {
            Ok(batch.into_iter().map(|(_, info)| info).collect())
        }
        fn finish_commit(&self, infos: Vec<ValidPathInfo>) -> Result<(), ExportError> {
            if let Some(bad) = infos
                .iter()
                .find(|i| Some(&i.path) == self.fail_finish.as_ref())
            {
                return Err(ExportError::Commit {
                    path: self.dir.display(&bad.path),
                    source: Box::new(StoreError::Io {
                        action: "flushing",
                        path: "/fake".into(),
                        source: io::Error::from_raw_os_error(libc::EIO),
                    }),
                });
            }
            let mut valid = self.valid.borrow_mut();
            for info in infos {
                valid.insert(info.path.clone(), info);
            }
            Ok(())
        }
    }

    fn import(
        store: &FakeStore,
        archive: &[u8],
        policy: SignaturePolicy<'_>,
    ) -> (Vec<String>, Result<(), String>) {
        let mut seen = Vec::new();
        let res = import_paths(store, &mut &archive[..], policy, &mut |p| {
            seen.push(p.base_name().to_owned())
        });
        assert_eq!(store.live_staged.get(), 0, "a staged NAR was left behind");
        let res = res.map(|paths| {
            assert_eq!(
                paths.iter().map(StorePath::base_name).collect::<Vec<_>>(),
                seen
            )
        });
        (seen, res.map_err(|e| e.to_string()))
    }

    /// foo and baz signed by a fresh key, the archive, and that key trusted.
    fn signed_sample() -> (Vec<u8>, TrustedKeys) {
        let dir = StoreDir::default();
        let (nar_foo, nar_baz, mut foo, mut baz) = sample();
        let key = SecretKey::generate("k").unwrap();
        foo.signatures.insert(key.sign_path(&foo, &dir).unwrap());
        baz.signatures.insert(key.sign_path(&baz, &dir).unwrap());
        let mut keys = TrustedKeys::new();
        keys.insert(key.to_public(), "test").unwrap();
        (encode(&[(&foo, &nar_foo), (&baz, &nar_baz)]), keys)
    }

    #[test]
    fn imports_signed_archive_dependencies_first() {
        let (archive, keys) = signed_sample();
        let store = FakeStore::default();
        let (seen, res) = import(&store, &archive, SignaturePolicy::RequireTrusted(&keys));
        res.unwrap();
        assert_eq!(seen, [FOO, BAZ]);
        let valid = store.valid.borrow();
        let baz = &valid[&StorePath::from_base_name(BAZ).unwrap()];
        assert_eq!(baz.signatures.len(), 1, "signatures are kept");
        assert_eq!(keys.count_valid(baz, &store.dir), 1);
        assert_eq!(baz.deriver.as_ref().map(StorePath::name), Some("hello.drv"));
        assert!(!baz.ultimate && baz.ca.is_none());
    }

    #[test]
    fn imports_nix_archive_only_without_signature_checks() {
        let archive = fixture("export-foo-baz.nixexport");
        let store = FakeStore::default();
        let keys = TrustedKeys::new();
        let (seen, res) = import(&store, &archive, SignaturePolicy::RequireTrusted(&keys));
        assert_eq!(
            res.unwrap_err(),
            format!(
                "path '/nix/store/{FOO}' lacks a signature by a trusted key (it has no signatures)"
            )
        );
        assert!(seen.is_empty() && store.valid.borrow().is_empty());
        let (seen, res) = import(&store, &archive, SignaturePolicy::AcceptUnchecked);
        res.unwrap();
        assert_eq!(seen, [FOO, BAZ]);
    }

    #[test]
    fn refuses_signatures_by_untrusted_keys() {
        let (archive, _) = signed_sample();
        let mut others = TrustedKeys::new();
        others
            .insert(SecretKey::generate("other").unwrap().to_public(), "test")
            .unwrap();
        let store = FakeStore::default();
        let (_, res) = import(&store, &archive, SignaturePolicy::RequireTrusted(&others));
        assert_eq!(
            res.unwrap_err(),
            format!(
                "path '/nix/store/{FOO}' lacks a signature by a trusted key (signature by unknown key 'k')"
            )
        );
        assert!(store.valid.borrow().is_empty());
    }

    #[test]
    fn tampered_nar_keeps_earlier_paths_and_nothing_of_the_bad_one() {
        let (archive, keys) = signed_sample();
        // baz's NAR holds foo's path: its second occurrence in the archive.
        let needle = format!("/nix/store/{FOO}");
        let at = archive
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle.as_bytes())
            .nth(1)
            .unwrap()
            .0;
        let mut tampered = archive;
        tampered[at + needle.len() - 1] ^= 1;
        let store = FakeStore::default();
        let (seen, res) = import(&store, &tampered, SignaturePolicy::RequireTrusted(&keys));
        assert_eq!(
            res.unwrap_err(),
            format!(
                "path '/nix/store/{BAZ}' lacks a signature by a trusted key \
                 (signature by key 'k' does not match the fingerprint)"
            )
        );
        assert_eq!(seen, [FOO]);
        assert_eq!(store.valid.borrow().len(), 1);
    }

    /// `n` independent paths of one file each, signed by `key`, except
    /// those in `unsigned`; their archive.
    fn many_signed(n: usize, key: &SecretKey, unsigned: &[usize]) -> (Vec<u8>, Vec<ValidPathInfo>) {
        let dir = StoreDir::default();
        let mut nars = Vec::new();
        let mut infos = Vec::new();
        for i in 0..n {
            let nar = file_nar(format!("file {i}").as_bytes(), false);
            let digits = i.to_string();
            let base = format!("{}{digits}-p{i}", "0".repeat(32 - digits.len()));
            let mut info = info_for(&nar, &base, &[]);
            if !unsigned.contains(&i) {
                info.signatures.insert(key.sign_path(&info, &dir).unwrap());
            }
            nars.push(nar);
            infos.push(info);
        }
        let entries: Vec<(&ValidPathInfo, &[u8])> = infos
            .iter()
            .zip(&nars)
            .map(|(i, n)| (i, n.as_slice()))
            .collect();
        (encode(&entries), infos)
    }

    #[test]
    fn a_refused_path_after_a_full_batch_keeps_everything_before_it_and_nothing_after() {
        // Checks run on another thread: the batch of the first BATCH_PATHS
        // paths is committed, then the paths up to the refused one, none
        // after, and the refusal is the error even though the archive is
        // also cut short after it.
        let key = SecretKey::generate("k").unwrap();
        let mut keys = TrustedKeys::new();
        keys.insert(key.to_public(), "test").unwrap();
        // In the first batch (found when it is full), and after it.
        for bad in [100, BATCH_PATHS + 14] {
            let (archive, infos) = many_signed(BATCH_PATHS + 40, &key, &[bad, bad + 3]);
            let cut = &archive[..archive.len() - 30];
            let store = FakeStore::default();
            let (seen, res) = import(&store, cut, SignaturePolicy::RequireTrusted(&keys));
            assert_eq!(
                res.unwrap_err(),
                format!(
                    "path '/nix/store/{}' lacks a signature by a trusted key (it has no signatures)",
                    infos[bad].path.base_name()
                )
            );
            let expected: Vec<String> = infos[..bad]
                .iter()
                .map(|i| i.path.base_name().to_owned())
                .collect();
            assert_eq!(seen, expected);
            assert_eq!(store.valid.borrow().len(), bad);
        }
        // And the whole archive, all signed, imports in order.
        let (archive, infos) = many_signed(BATCH_PATHS + 40, &key, &[]);
        let store = FakeStore::default();
        let (seen, res) = import(&store, &archive, SignaturePolicy::RequireTrusted(&keys));
        res.unwrap();
        assert_eq!(seen.len(), infos.len());
        assert_eq!(
            seen.last().map(String::as_str),
            infos.last().map(|i| i.path.base_name())
        );
    }

    #[test]
    fn a_batch_that_cannot_become_valid_stops_the_import_at_its_start() {
        // Each batch is flushed while the next is staged. One that fails to
        // become valid (its flush failed) leaves the batches before it
        // valid and nothing of it or after it, whether it failed while the
        // next was staged, or at the end.
        let key = SecretKey::generate("k").unwrap();
        let n = 2 * BATCH_PATHS + 40;
        for (bad, valid) in [
            (10, 0),
            (BATCH_PATHS + 10, BATCH_PATHS),
            (2 * BATCH_PATHS + 5, 2 * BATCH_PATHS),
        ] {
            let (archive, infos) = many_signed(n, &key, &[]);
            let store = FakeStore {
                fail_finish: Some(infos[bad].path.clone()),
                ..FakeStore::default()
            };
            let (seen, res) = import(&store, &archive, SignaturePolicy::AcceptUnchecked);
            let err = res.unwrap_err();
            assert!(
                err.contains(&format!(
                    "cannot import path '/nix/store/{}'",
                    infos[bad].path.base_name()
                )),
                "{err}"
            );
            assert_eq!(seen.len(), valid, "failing at {bad}");
            assert_eq!(store.valid.borrow().len(), valid);
        }
    }

    #[test]
    fn a_path_may_refer_to_one_of_the_batch_still_being_flushed() {
        // Entry BATCH_PATHS + 5 refers to entry 3, whose batch has started
        // becoming valid but is not yet when the reference is checked.
        let n = BATCH_PATHS + 10;
        let bases: Vec<String> = (0..n)
            .map(|i| {
                let digits = i.to_string();
                format!("{}{digits}-p{i}", "0".repeat(32 - digits.len()))
            })
            .collect();
        let nars: Vec<Vec<u8>> = (0..n)
            .map(|i| file_nar(format!("file {i}").as_bytes(), false))
            .collect();
        let infos: Vec<ValidPathInfo> = (0..n)
            .map(|i| {
                let refs: &[&str] = if i == BATCH_PATHS + 5 {
                    &[&bases[3]]
                } else {
                    &[]
                };
                info_for(&nars[i], &bases[i], refs)
            })
            .collect();
        let entries: Vec<(&ValidPathInfo, &[u8])> = infos
            .iter()
            .zip(&nars)
            .map(|(i, n)| (i, n.as_slice()))
            .collect();
        let store = FakeStore::default();
        let (seen, res) = import(&store, &encode(&entries), SignaturePolicy::AcceptUnchecked);
        res.unwrap();
        assert_eq!(seen.len(), n);
    }

    #[test]
    fn a_refusal_comes_before_a_missing_reference_of_the_same_entry() {
        // baz references foo, which is not in the archive, and is unsigned:
        // the signature is what is checked first, as before the checks had
        // a thread of their own.
        let (_, nar_baz, _, baz) = sample();
        let archive = encode(&[(&baz, &nar_baz)]);
        let mut keys = TrustedKeys::new();
        keys.insert(SecretKey::generate("k").unwrap().to_public(), "test")
            .unwrap();
        let store = FakeStore::default();
        let (_, res) = import(&store, &archive, SignaturePolicy::RequireTrusted(&keys));
        assert!(res.unwrap_err().contains("lacks a signature"));
        assert!(store.valid.borrow().is_empty());
    }

    #[test]
    fn truncated_archive_keeps_earlier_paths() {
        let (archive, keys) = signed_sample();
        let magic = b"nix-archive-1";
        let second_nar = archive
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| w == magic)
            .nth(1)
            .unwrap()
            .0;
        // Cut inside baz's NAR: foo stays, nothing of baz.
        let store = FakeStore::default();
        let (seen, res) = import(
            &store,
            &archive[..second_nar + 40],
            SignaturePolicy::RequireTrusted(&keys),
        );
        assert!(is_truncation(&res.unwrap_err()));
        assert_eq!(seen, [FOO]);
        assert_eq!(store.valid.borrow().len(), 1);
        // Cut in the end marker: both entries were complete and stay.
        let store = FakeStore::default();
        let (seen, res) = import(
            &store,
            &archive[..archive.len() - 1],
            SignaturePolicy::RequireTrusted(&keys),
        );
        assert!(is_truncation(&res.unwrap_err()));
        assert_eq!(seen, [FOO, BAZ]);
    }

    #[test]
    fn refuses_reference_to_a_path_neither_valid_nor_earlier() {
        let (_, nar_baz, _, baz) = sample();
        let archive = encode(&[(&baz, &nar_baz)]);
        let store = FakeStore::default();
        let (_, res) = import(&store, &archive, SignaturePolicy::AcceptUnchecked);
        assert_eq!(
            res.unwrap_err(),
            format!(
                "path '/nix/store/{BAZ}' references '/nix/store/{FOO}', which is neither valid nor earlier in the archive"
            )
        );
        assert!(store.valid.borrow().is_empty());
        // Once foo is valid, the same archive imports (baz's self-reference is fine).
        let (nar_foo, _, foo, _) = sample();
        import(
            &store,
            &encode(&[(&foo, &nar_foo)]),
            SignaturePolicy::AcceptUnchecked,
        )
        .1
        .unwrap();
        import(&store, &archive, SignaturePolicy::AcceptUnchecked)
            .1
            .unwrap();
    }
}
