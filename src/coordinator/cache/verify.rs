//! The checks an upload passes before it enters the cache: what it claims
//! to be ([`Claim`]), and what one streaming pass over it finds
//! ([`inspect`]): the compressed file's hash and size, the NAR's hash,
//! size and structure (the store's strict NAR parser: sizes are never
//! trusted to allocate), its references among the allowed candidates, and
//! whatever the kind of claim needs of the root file (its contents' hash,
//! or the bytes of a `.drv`).

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read};

use thiserror::Error;

use crate::derivation::check::{CheckError, MAX_DRV_SIZE};
use crate::store::hash::{Hasher, HashingReader};
use crate::store::nar::{self, NarError, NarVisitor};
use crate::store::refscan::RefScanner;
use crate::store::{FileIngestionMethod, Hash, HashAlgo, StorePath};

/// What an uploader says a NAR is. The server fills it from what the
/// coordinator knows (the derivation of an output, the declaration of a
/// source), never from the uploader alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The store path the NAR is the contents of.
    pub path: StorePath,
    /// What kind of path it is, which decides how it is checked.
    pub kind: ClaimKind,
    /// The paths it may reference: for an output, its derivation's input
    /// closure plus the derivation's own outputs; for a source or a `.drv`,
    /// the paths it declares. Only these are looked for in the NAR.
    pub candidates: BTreeSet<StorePath>,
    /// The NAR hash the uploader claims; must match when given.
    pub nar_hash: Option<Hash>,
    /// The NAR size the uploader claims; must match when given.
    pub nar_size: Option<u64>,
    /// The derivation that produced it (outputs), for the narinfo.
    pub deriver: Option<StorePath>,
}

/// How a claimed path is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimKind {
    /// A derivation output: the NAR is what the uploader claims; a fixed
    /// output also has the content hash its derivation declares.
    Output {
        /// The derivation's fixed-output method and hash, if it is one.
        fixed: Option<FixedOutput>,
    },
    /// An input source: its path must be the content address of its
    /// contents (a `text` path, a recursive `source` path or a flat
    /// fixed path), else it cannot be verified and is refused.
    Source,
    /// A `.drv` file: it must pass the store's derivation check, with its
    /// input derivations already in the cache.
    Derivation,
}

/// A fixed output's declared content hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedOutput {
    /// Flat (the single file's contents) or recursive (the NAR).
    pub method: FileIngestionMethod,
    /// The declared hash; its algorithm is the one to hash with.
    pub hash: Hash,
}

/// Why an upload was refused: what is wrong with its contents.
#[derive(Debug, Error)]
pub enum Rejection {
    #[error("not valid zstd-compressed data (at NAR byte {pos}): {source}")]
    Decompress {
        pos: u64,
        #[source]
        source: io::Error,
    },
    #[error("not a valid NAR: {0}")]
    NotNar(#[source] NarError),
    #[error("data after the end of the NAR")]
    TrailingNar,
    #[error("data after the end of the zstd stream")]
    TrailingCompressed,
    #[error("NAR hash mismatch: claimed {claimed}, got {got}")]
    NarHashMismatch { claimed: String, got: String },
    #[error("NAR size mismatch: claimed {claimed}, got {got}")]
    NarSizeMismatch { claimed: u64, got: u64 },
    #[error("a flat fixed output must be a single regular, non-executable file")]
    FlatNotRegular,
    #[error("fixed-output hash mismatch: the derivation specifies {specified}, got {got}")]
    FixedHashMismatch { specified: String, got: String },
    #[error("a fixed output may not reference other paths, but it references '{reference}'")]
    FixedReferences { reference: String },
    #[error("its fixed-output hash gives the path '{computed}', not this one")]
    FixedPath { computed: String },
    #[error(
        "it is not content-addressed by its contents (tried {tried}); \
         a source path that is not content-addressed cannot be verified"
    )]
    NotContentAddressed { tried: &'static str },
    #[error("a source that references itself cannot be verified")]
    SelfReference,
    #[error("a derivation must be a single regular, non-executable file")]
    DrvNotFile,
    #[error("a derivation is at most {MAX_DRV_SIZE} bytes; this one has {size}")]
    DrvTooLarge { size: u64 },
    #[error("input derivation '{input}' is not in the cache (upload it first)")]
    MissingInputDrv { input: String },
    #[error("it declares the input '{input}', which it may not reference")]
    UndeclaredInput { input: String },
    #[error("not a valid derivation: {0}")]
    Derivation(#[source] CheckError),
}

/// What the caller needs of the root file beyond hashes and references.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Wants {
    /// Hash a root regular file's contents with this algorithm as well
    /// (SHA-256 is always computed).
    pub flat_algo: Option<HashAlgo>,
    /// Hash the whole NAR with this algorithm as well.
    pub nar_algo: Option<HashAlgo>,
    /// Keep a root regular file's bytes, if it has at most this many.
    pub keep_contents: Option<u64>,
}

/// What the root of the NAR is.
#[derive(Debug)]
pub(super) enum Root {
    Regular {
        executable: bool,
        size: u64,
        /// SHA-256 of the contents.
        sha256: Hash,
        /// Of the contents with [`Wants::flat_algo`].
        flat: Option<Hash>,
        /// The contents, when [`Wants::keep_contents`] allowed.
        contents: Option<Vec<u8>>,
    },
    Directory,
    Symlink,
}

/// What one pass over an upload found.
#[derive(Debug)]
pub(super) struct Inspected {
    /// SHA-256 and size of the compressed file.
    pub file_hash: Hash,
    pub file_size: u64,
    /// SHA-256 and size of the NAR.
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Of the NAR with [`Wants::nar_algo`].
    pub nar_extra: Option<Hash>,
    /// The candidates whose hash part occurs in the NAR.
    pub found: BTreeSet<StorePath>,
    pub root: Root,
}

/// Reads a zstd-compressed NAR from `compressed` to its end, checking and
/// measuring it (see the module docs); `candidates` are the paths looked
/// for as references.
pub(super) fn inspect(
    compressed: &mut dyn Read,
    candidates: &BTreeSet<StorePath>,
    wants: Wants,
) -> Result<Inspected, Rejection> {
    let file = HashingReader::new(compressed, HashAlgo::Sha256);
    let decoder = zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(
        zstd::zstd_safe::DCtx::in_size(),
        file,
    ))
    .map_err(|source| Rejection::Decompress { pos: 0, source })?;
    let tap = Tap {
        inner: decoder,
        sha256: Hasher::new(HashAlgo::Sha256),
        extra: wants.nar_algo.map(Hasher::new),
        size: 0,
        scanner: RefScanner::for_paths(candidates),
    };
    // The parser reads tokens in small pieces: buffer them. Whatever the
    // buffer reads past the NAR is an error below, so nothing is lost.
    let mut nar_reader = BufReader::with_capacity(256 << 10, tap);
    let mut visitor = RootVisitor {
        wants,
        root: None,
        sha256: None,
        flat: None,
        contents: None,
    };
    match nar::parse(&mut nar_reader, &mut visitor) {
        Ok(_) => {}
        Err(NarError::Read { pos, source }) => return Err(Rejection::Decompress { pos, source }),
        Err(e) => return Err(Rejection::NotNar(e)),
    }
    let pos = nar_reader.get_ref().size;
    let more = nar_reader
        .fill_buf()
        .map_err(|source| Rejection::Decompress { pos, source })?;
    if !more.is_empty() {
        return Err(Rejection::TrailingNar);
    }
    let tap = nar_reader.into_inner();
    // The decoder said "end": the compressed input must be at its end too
    // (a decoder at the end of a frame does not read what follows).
    let mut rest = tap.inner.into_inner();
    let mut byte = [0u8; 1];
    let extra = rest
        .read(&mut byte)
        .map_err(|source| Rejection::Decompress {
            pos: tap.size,
            source,
        })?;
    if extra != 0 {
        return Err(Rejection::TrailingCompressed);
    }
    let (file_hash, file_size, _) = rest.into_inner().finish();
    let root = match visitor.root {
        Some(RootKind::Regular { executable, size }) => Root::Regular {
            executable,
            size,
            sha256: visitor
                .sha256
                .map(Hasher::finish)
                .unwrap_or_else(|| HashAlgo::Sha256.digest(b"")),
            flat: visitor.flat.map(Hasher::finish),
            contents: visitor.contents,
        },
        Some(RootKind::Symlink) => Root::Symlink,
        // The parser only returns Ok after a root node: a directory here.
        Some(RootKind::Directory) | None => Root::Directory,
    };
    Ok(Inspected {
        file_hash,
        file_size,
        nar_hash: tap.sha256.finish(),
        nar_size: tap.size,
        nar_extra: tap.extra.map(Hasher::finish),
        found: tap.scanner.found_paths(candidates),
        root,
    })
}

/// Hashes, counts and scans the decompressed NAR as it is read.
struct Tap<R> {
    inner: R,
    sha256: Hasher,
    extra: Option<Hasher>,
    size: u64,
    scanner: RefScanner,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = &buf[..n];
        self.sha256.update(data);
        if let Some(h) = &mut self.extra {
            h.update(data);
        }
        self.scanner.scan(data);
        self.size += n as u64;
        Ok(n)
    }
}

enum RootKind {
    Regular { executable: bool, size: u64 },
    Directory,
    Symlink,
}

/// Records the root node and, for a root regular file, hashes (and maybe
/// keeps) its contents.
struct RootVisitor {
    wants: Wants,
    root: Option<RootKind>,
    sha256: Option<Hasher>,
    flat: Option<Hasher>,
    contents: Option<Vec<u8>>,
}

impl NarVisitor for RootVisitor {
    fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        if name.is_none() {
            self.root = Some(RootKind::Directory);
        }
        Ok(())
    }

    fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
    ) -> Result<(), NarError> {
        if name.is_none() {
            self.root = Some(RootKind::Regular { executable, size });
            self.sha256 = Some(Hasher::new(HashAlgo::Sha256));
            self.flat = self.wants.flat_algo.map(Hasher::new);
            // The size was checked against the limit before anything is
            // kept, and the bytes arrive in bounded chunks: a lying size
            // cannot make this allocate more than the limit.
            if self.wants.keep_contents.is_some_and(|max| size <= max) {
                self.contents = Some(Vec::new());
            }
        }
        Ok(())
    }

    fn contents(&mut self, chunk: &[u8]) -> Result<(), NarError> {
        // Only a root file starts these hashers; nested files leave them None.
        if let Some(h) = &mut self.sha256 {
            h.update(chunk);
        }
        if let Some(h) = &mut self.flat {
            h.update(chunk);
        }
        if let Some(c) = &mut self.contents {
            c.extend_from_slice(chunk);
        }
        Ok(())
    }

    fn symlink(&mut self, name: Option<&[u8]>, _target: &[u8]) -> Result<(), NarError> {
        if name.is_none() {
            self.root = Some(RootKind::Symlink);
        }
        Ok(())
    }
}
