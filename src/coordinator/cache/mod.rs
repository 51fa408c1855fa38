//! The binary cache under `--cache-dir`, in Nix's layout, and the checks
//! every upload passes before it enters it.
//!
//! ```text
//! <dir>/nix-cache-info            StoreDir, WantMassQuery, Priority
//! <dir>/<hash part>.narinfo       signed by the coordinator's key
//! <dir>/nar/<file hash>.nar.zst   zstd-compressed NARs
//! <dir>/log/<drv base name>       build logs
//! <dir>/drv/<drv base name>       plain copies of accepted .drv files
//! <dir>/uploads/<id>.part         uploads in progress
//! ```
//!
//! An upload is a zstd-compressed NAR sent in pieces under a caller-chosen
//! [`UploadId`]; each piece is appended at the offset the uploader says,
//! which must be the current size (so an interrupted upload resumes where
//! the file ends, never with a gap or an overlap), and is synced before
//! the call returns. [`Cache::finish`] then checks the whole of it against
//! a [`Claim`] in one streaming pass ([`verify`]) and only then moves it
//! into `nar/` and writes its narinfo. Every file that readers see is
//! written under a temporary name, synced and renamed, NAR before
//! narinfo: a crash leaves no half file and no narinfo pointing nowhere.
//! Whatever fails, nothing enters the cache and the upload is discarded.
//!
//! Synchronous, blocking code: the server calls it from blocking tasks.

pub mod narinfo;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use crate::derivation::check::{check_drv_file, CheckError, MAX_DRV_SIZE};
use crate::derivation::Derivation;
use crate::store::nixbase32;
use crate::store::signature::SecretKey;
use crate::store::{
    ContentAddress, FileIngestionMethod, HashAlgo, StoreDir, StorePath, ValidPathInfo,
};

use super::model::{CachedPath, DrvRecord};
pub use narinfo::{Compression, NarInfo, NarInfoError};
pub use verify::{Claim, ClaimKind, FixedOutput, Rejection};
use verify::{Inspected, Root, Wants};

/// The `Priority` in `nix-cache-info`: cache.nixos.org's, so that among
/// the two the order the user configured decides.
const PRIORITY: u32 = 40;

/// Why a cache operation failed.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("'{id}' is not an upload id (1-128 letters, digits, '-', '_' or '.', starting with a letter or digit)")]
    BadUploadId { id: String },
    #[error("upload '{id}' is at byte {current}, not {offset}: ask for its offset and resume from there")]
    OffsetMismatch {
        id: String,
        offset: u64,
        current: u64,
    },
    #[error("upload '{id}' is larger than the limit of {max} bytes; it was discarded")]
    TooLarge { id: String, max: u64 },
    #[error(
        "upload '{id}' was cut at byte {offset} (that much is kept: resume from there): {source}"
    )]
    Interrupted {
        id: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("there is no upload '{id}'")]
    NoUpload { id: String },
    #[error("upload of '{path}' refused: {reason}")]
    Rejected {
        path: String,
        #[source]
        reason: Rejection,
    },
    #[error("the log of '{drv}' is larger than the limit of {max} bytes")]
    LogTooLarge { drv: String, max: u64 },
    #[error("'{name}' is not a file of this cache")]
    BadName { name: String },
    #[error("cannot read '{}': {source}", file.display())]
    ReadNarInfo {
        file: PathBuf,
        #[source]
        source: crate::bounded::BoundedError,
    },
    #[error("the narinfo of '{path}' in the cache is unreadable: {source}")]
    BadNarInfo {
        path: String,
        #[source]
        source: NarInfoError,
    },
}

impl CacheError {
    /// Whether the caller's request is at fault (a bad id or name, a wrong
    /// offset, too much data, a refused upload), as opposed to the cache's
    /// own storage: the server answers 4xx for these, 5xx for the rest.
    pub fn is_caller_error(&self) -> bool {
        !matches!(
            self,
            CacheError::Io { .. } | CacheError::ReadNarInfo { .. } | CacheError::BadNarInfo { .. }
        )
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The name of an upload, chosen by the caller (`b42-out`,
/// `src-<hash part>`): safe as a file name, never `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(String);

impl UploadId {
    /// Checks an id: 1-128 of `[A-Za-z0-9._-]`, starting with a letter or digit.
    pub fn new(id: &str) -> Result<UploadId, CacheError> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && id.as_bytes()[0].is_ascii_alphanumeric()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(UploadId(id.to_owned()))
        } else {
            Err(CacheError::BadUploadId { id: id.to_owned() })
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What [`Cache::finish`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The path as its narinfo says.
    pub cached: CachedPath,
    /// For a `.drv`, what the coordinator keeps of it.
    pub drv: Option<DrvRecord>,
}

/// The binary cache in a directory; see the module docs.
pub struct Cache {
    dir: PathBuf,
    store_dir: StoreDir,
    key: SecretKey,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.dir)
            .field("store_dir", &self.store_dir)
            .field("key", &self.key.name())
            .finish()
    }
}

impl Cache {
    /// Opens the cache in `dir` (creating it and its layout if needed) for
    /// paths of `store_dir`, signing narinfos with `key`.
    pub fn open(dir: &Path, store_dir: StoreDir, key: SecretKey) -> Result<Cache, CacheError> {
        for sub in ["", "nar", "log", "uploads", "drv"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
        }
        let cache = Cache {
            dir: dir.to_owned(),
            store_dir,
            key,
        };
        let info = format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
            cache.store_dir
        );
        let path = dir.join("nix-cache-info");
        // Rewritten only when different, so that opening is read-only on an
        // existing cache (and a changed store directory is corrected).
        let now = crate::bounded::read_file(&path, 4096).ok();
        if now.as_deref() != Some(info.as_bytes()) {
            write_atomically(&path, &mut info.as_bytes(), u64::MAX)?;
        }
        Ok(cache)
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store directory its paths are in.
    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The public half of the signing key, for `trusted-public-keys`.
    pub fn public_key(&self) -> crate::store::signature::PublicKey {
        self.key.to_public()
    }

    /// Where the bytes of upload `id` are kept until [`Cache::finish`].
    pub fn partial_path(&self, id: &UploadId) -> PathBuf {
        self.dir.join("uploads").join(format!("{}.part", id.0))
    }

    /// How many bytes of upload `id` are kept (0 when there is none): where
    /// the next [`Cache::append`] must start.
    pub fn upload_offset(&self, id: &UploadId) -> Result<u64, CacheError> {
        let path = self.partial_path(id);
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("inspect", &path)(e)),
        }
    }

    /// Appends what `data` yields to upload `id`, which must now hold
    /// exactly `offset` bytes (the uploader asks for the offset first);
    /// returns the new size. What was received is synced before this
    /// returns, also when `data` fails midway ([`CacheError::Interrupted`],
    /// which tells the offset to resume from). An upload that would grow
    /// past `max_total` bytes is refused and discarded: it can never be
    /// accepted.
    pub fn append(
        &self,
        id: &UploadId,
        offset: u64,
        data: &mut dyn Read,
        max_total: u64,
    ) -> Result<u64, CacheError> {
        let path = self.partial_path(id);
        let mut file =
            open_locked(&path, true)?.ok_or_else(|| CacheError::NoUpload { id: id.0.clone() })?;
        let current = file.metadata().map_err(io_err("inspect", &path))?.len();
        if current != offset {
            if current == 0 {
                // Created just now by this call: not an upload yet.
                remove_if_there(&path)?;
            }
            return Err(CacheError::OffsetMismatch {
                id: id.0.clone(),
                offset,
                current,
            });
        }
        if offset > max_total {
            drop(file);
            self.discard(id)?;
            return Err(CacheError::TooLarge {
                id: id.0.clone(),
                max: max_total,
            });
        }
        file.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek in", &path))?;
        let mut written = offset;
        let mut buf = vec![0u8; 256 << 10];
        let result = loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            if written + n as u64 > max_total {
                drop(file);
                self.discard(id)?;
                return Err(CacheError::TooLarge {
                    id: id.0.clone(),
                    max: max_total,
                });
            }
            file.write_all(&buf[..n]).map_err(io_err("write", &path))?;
            written += n as u64;
        };
        // Synced before the offset is reported, so that an offset the
        // uploader learnt survives a crash.
        file.sync_data().map_err(io_err("sync", &path))?;
        if offset == 0 {
            // A new file: its directory entry must survive a crash too.
            sync_dir(&self.dir.join("uploads"))?;
        }
        match result {
            Ok(()) => Ok(written),
            Err(source) => Err(CacheError::Interrupted {
                id: id.0.clone(),
                offset: written,
                source,
            }),
        }
    }

    /// Forgets upload `id` (nothing happens when there is none).
    pub fn discard(&self, id: &UploadId) -> Result<(), CacheError> {
        let path = self.partial_path(id);
        // Under its lock, so that no append is midway.
        let Some(_file) = open_locked(&path, false)? else {
            return Ok(());
        };
        remove_if_there(&path)
    }

    /// Discards the uploads not appended to for `age` or longer (uploaders
    /// that never came back); returns how many. Uploads in use are skipped.
    pub fn remove_stale_uploads(&self, age: std::time::Duration) -> Result<usize, CacheError> {
        let dir = self.dir.join("uploads");
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let entry = entry.map_err(io_err("read directory", &dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".part"))
                .and_then(|n| UploadId::new(n).ok())
            else {
                continue;
            };
            let modified = match entry.metadata().and_then(|m| m.modified()) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("inspect", &entry.path())(e)),
            };
            if now.duration_since(modified).is_ok_and(|d| d >= age) {
                let path = self.partial_path(&id);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("open", &path)(e)),
                };
                // A lock held means an append or finish is under way; a
                // file no longer at `path` was finished meanwhile.
                let Ok(held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                    continue;
                };
                if same_file(&held, &path)? {
                    remove_if_there(&path)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Checks upload `id` against `claim` and, when it is what it claims,
    /// adds it to the cache: the compressed file to
    /// `nar/<nix32 sha256 of it>.nar.zst`, a signed narinfo to
    /// `<hash part>.narinfo`, and for a `.drv` a plain copy to
    /// `drv/<base name>`. On any failure nothing enters the cache and the
    /// upload is discarded (a bad upload is restarted, not resumed). A path
    /// already in the cache keeps its narinfo (the upload must still pass
    /// the checks), as Nix's binary caches keep the first copy.
    pub fn finish(&self, id: &UploadId, claim: &Claim) -> Result<Accepted, CacheError> {
        let path = self.partial_path(id);
        let mut file =
            open_locked(&path, false)?.ok_or_else(|| CacheError::NoUpload { id: id.0.clone() })?;
        let result = self.finish_locked(&path, &mut file, claim);
        // Discarded under its lock, unless it was moved into `nar/` already
        // (then a file at `path` is a new upload of someone else's).
        if result.is_err() && same_file(&file, &path).unwrap_or(false) {
            if let Err(e) = remove_if_there(&path) {
                tracing::warn!("cannot discard a refused upload: {e}");
            }
        }
        result
    }

    fn finish_locked(
        &self,
        part: &Path,
        file: &mut Flock<File>,
        claim: &Claim,
    ) -> Result<Accepted, CacheError> {
        let full = self.store_dir.display(&claim.path);
        let reject = |reason| CacheError::Rejected {
            path: full.clone(),
            reason,
        };
        let wants = match &claim.kind {
            ClaimKind::Output { fixed: Some(f) } => match f.method {
                FileIngestionMethod::Flat => Wants {
                    flat_algo: Some(f.hash.algo()),
                    ..Wants::default()
                },
                FileIngestionMethod::Recursive => Wants {
                    nar_algo: (f.hash.algo() != HashAlgo::Sha256).then_some(f.hash.algo()),
                    ..Wants::default()
                },
            },
            ClaimKind::Output { fixed: None } | ClaimKind::Source => Wants::default(),
            ClaimKind::Derivation => Wants {
                keep_contents: Some(MAX_DRV_SIZE),
                ..Wants::default()
            },
        };
        // The path itself is looked for too: a self-reference is recorded
        // (outputs) or refused (sources).
        let mut candidates = claim.candidates.clone();
        candidates.insert(claim.path.clone());
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("seek in", part))?;
        let found = verify::inspect(&mut io::BufReader::new(&mut **file), &candidates, wants)
            .map_err(reject)?;
        if let Some(h) = &claim.nar_hash {
            if *h != found.nar_hash {
                return Err(reject(Rejection::NarHashMismatch {
                    claimed: h.to_nix32_prefixed(),
                    got: found.nar_hash.to_nix32_prefixed(),
                }));
            }
        }
        if let Some(n) = claim.nar_size {
            if n != found.nar_size {
                return Err(reject(Rejection::NarSizeMismatch {
                    claimed: n,
                    got: found.nar_size,
                }));
            }
        }
        let (references, ca, drv) = match &claim.kind {
            ClaimKind::Output { fixed } => {
                let ca = match fixed {
                    Some(f) => Some(self.check_fixed(claim, f, &found).map_err(reject)?),
                    None => None,
                };
                (found.found.clone(), ca, None)
            }
            ClaimKind::Source => {
                let (refs, ca) = self.check_source(claim, &found).map_err(reject)?;
                (refs, Some(ca), None)
            }
            ClaimKind::Derivation => {
                let (refs, ca, record, copy) = self.check_derivation(claim, &found)?;
                (refs, Some(ca), Some((record, copy)))
            }
        };
        let file_name = format!("{}.nar.zst", found.file_hash.to_nix32());
        let url = format!("nar/{file_name}");
        let drv_record = drv.as_ref().map(|(r, _)| r.clone());
        let existing = match self.lookup(&claim.path) {
            Ok(e) => e,
            // Never left by this code (narinfos are written whole); one
            // put there by hand is replaced rather than blocking the path.
            Err(e @ CacheError::BadNarInfo { .. }) => {
                tracing::warn!("replacing an unreadable narinfo: {e}");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(existing) = existing {
            // Already cached: keep the first copy; this one was checked,
            // and is dropped.
            remove_if_there(part)?;
            if let Some((_, copy)) = drv {
                self.keep_drv_copy(&claim.path, copy)?;
            }
            return Ok(Accepted {
                cached: existing,
                drv: drv_record,
            });
        }
        // The part file is the NAR's temporary: synced by every append,
        // renamed into place, and its directory synced.
        let nar_dir = self.dir.join("nar");
        let nar_path = nar_dir.join(&file_name);
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io_err("set permissions of", part))?;
        file.sync_all().map_err(io_err("sync", part))?;
        // Should anything below fail, this file stays in `nar/` without a
        // narinfo: invisible to clients, and possibly the same file as
        // another path's (same compressed bytes), so not removed.
        fs::rename(part, &nar_path).map_err(io_err("move into place", &nar_path))?;
        sync_dir(&nar_dir)?;
        // The .drv copy before the narinfo: a cached .drv always has one.
        if let Some((_, copy)) = drv {
            self.keep_drv_copy(&claim.path, copy)?;
        }
        let mut info = NarInfo {
            path: claim.path.clone(),
            url,
            compression: Compression::Zstd,
            file_hash: Some(found.file_hash.clone()),
            file_size: Some(found.file_size),
            nar_hash: found.nar_hash.clone(),
            nar_size: found.nar_size,
            references,
            deriver: claim.deriver.clone(),
            signatures: BTreeSet::new(),
            ca,
        };
        let sig = self
            .key
            .sign(&info.to_path_info().fingerprint(&self.store_dir));
        info.signatures.insert(sig);
        let narinfo = self.narinfo_file(&claim.path);
        write_atomically(
            &narinfo,
            &mut info.to_text(&self.store_dir).as_bytes(),
            u64::MAX,
        )?;
        tracing::info!(path = %full, nar_size = info.nar_size, "added to the cache");
        Ok(Accepted {
            cached: self.cached_path(&info),
            drv: drv_record,
        })
    }

    /// A fixed output: no references but itself, the declared content hash,
    /// and the path that hash gives. Returns its content address.
    fn check_fixed(
        &self,
        claim: &Claim,
        fixed: &FixedOutput,
        found: &Inspected,
    ) -> Result<ContentAddress, Rejection> {
        if let Some(r) = found.found.iter().find(|r| **r != claim.path) {
            return Err(Rejection::FixedReferences {
                reference: self.store_dir.display(r),
            });
        }
        let got = match fixed.method {
            FileIngestionMethod::Flat => match &found.root {
                Root::Regular {
                    executable: false,
                    flat: Some(h),
                    ..
                } => h.clone(),
                _ => return Err(Rejection::FlatNotRegular),
            },
            FileIngestionMethod::Recursive => match &found.nar_extra {
                Some(h) => h.clone(),
                None => found.nar_hash.clone(),
            },
        };
        if got != fixed.hash {
            return Err(Rejection::FixedHashMismatch {
                specified: fixed.hash.to_nix32_prefixed(),
                got: got.to_nix32_prefixed(),
            });
        }
        let computed = self
            .store_dir
            .make_fixed_output_path(fixed.method, &fixed.hash, claim.path.name(), [], false)
            .map_err(|_| Rejection::FixedPath {
                computed: "(none: the name is invalid)".to_owned(),
            })?;
        if computed != claim.path {
            return Err(Rejection::FixedPath {
                computed: self.store_dir.display(&computed),
            });
        }
        Ok(ContentAddress::Fixed {
            method: fixed.method,
            hash: got,
        })
    }

    /// A source: its path must be a content address of its contents, as
    /// `builtins.toFile` (text), `nix-store --add` (recursive sha256) or
    /// `--add-fixed` (flat sha256) make them. Returns its references and
    /// content address.
    fn check_source(
        &self,
        claim: &Claim,
        found: &Inspected,
    ) -> Result<(BTreeSet<StorePath>, ContentAddress), Rejection> {
        if found.found.contains(&claim.path) {
            return Err(Rejection::SelfReference);
        }
        let refs = found.found.clone();
        let dir = &self.store_dir;
        let name = claim.path.name();
        let is = |p: Result<StorePath, _>| p.is_ok_and(|p| p == claim.path);
        if let Root::Regular {
            executable, sha256, ..
        } = &found.root
        {
            if !executable && is(dir.make_text_path(name, sha256, &refs)) {
                return Ok((refs, ContentAddress::Text(sha256.clone())));
            }
            if refs.is_empty()
                && is(dir.make_fixed_output_path(
                    FileIngestionMethod::Flat,
                    sha256,
                    name,
                    [],
                    false,
                ))
            {
                let ca = ContentAddress::Fixed {
                    method: FileIngestionMethod::Flat,
                    hash: sha256.clone(),
                };
                return Ok((refs, ca));
            }
        }
        if is(dir.make_fixed_output_path(
            FileIngestionMethod::Recursive,
            &found.nar_hash,
            name,
            &refs,
            false,
        )) {
            let ca = ContentAddress::Fixed {
                method: FileIngestionMethod::Recursive,
                hash: found.nar_hash.clone(),
            };
            return Ok((refs, ca));
        }
        Err(Rejection::NotContentAddressed {
            tried: match found.root {
                Root::Regular { .. } => "text, recursive sha256 and flat sha256",
                _ => "recursive sha256; text and flat need a single file",
            },
        })
    }

    /// A `.drv`: one small regular file that passes the store's derivation
    /// check, its input derivations read from `drv/`. Returns its
    /// references, content address, record, and its bytes written to a
    /// synced temporary file in `drv/`, to be kept once the rest is done.
    fn check_derivation(
        &self,
        claim: &Claim,
        found: &Inspected,
    ) -> Result<
        (
            BTreeSet<StorePath>,
            ContentAddress,
            DrvRecord,
            tempfile::NamedTempFile,
        ),
        CacheError,
    > {
        let dir = &self.store_dir;
        let full = dir.display(&claim.path);
        let reject = |reason| CacheError::Rejected {
            path: full.clone(),
            reason,
        };
        let (bytes, sha256) = match &found.root {
            Root::Regular {
                executable: false,
                contents: Some(c),
                sha256,
                ..
            } => (c, sha256),
            Root::Regular {
                executable: false,
                size,
                ..
            } => return Err(reject(Rejection::DrvTooLarge { size: *size })),
            _ => return Err(reject(Rejection::DrvNotFile)),
        };
        let drv = Derivation::from_aterm(bytes, dir)
            .map_err(|e| reject(Rejection::Derivation(CheckError::Parse(e))))?;
        let references = drv.references();
        if let Some(r) = references.iter().find(|r| !claim.candidates.contains(r)) {
            return Err(reject(Rejection::UndeclaredInput {
                input: dir.display(r),
            }));
        }
        let drv_dir = self.dir.join("drv");
        // Said here rather than from deep inside the output path check,
        // which meets a missing input only once it hashes that far.
        if let Some(missing) = drv
            .input_derivations
            .keys()
            .find(|p| !self.drv_copy(p).is_file())
        {
            return Err(reject(Rejection::MissingInputDrv {
                input: dir.display(missing),
            }));
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&drv_dir)
            .map_err(io_err("create a temporary file in", &drv_dir))?;
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io_err("write", tmp.path()))?;
        let info = ValidPathInfo {
            path: claim.path.clone(),
            deriver: None,
            nar_hash: found.nar_hash.clone(),
            nar_size: found.nar_size,
            references: references.clone(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        };
        let find = |p: &StorePath| -> Option<PathBuf> {
            let f = self.drv_copy(p);
            f.is_file().then_some(f)
        };
        check_drv_file(dir, &info, tmp.path(), &find).map_err(|e| match e {
            CheckError::MissingInput { path } => reject(Rejection::MissingInputDrv { input: path }),
            e => reject(Rejection::Derivation(e)),
        })?;
        let show = |p: &StorePath| dir.display(p);
        let record = DrvRecord {
            drv: full.clone(),
            system: String::from_utf8_lossy(&drv.system).into_owned(),
            required_features: drv.required_system_features(),
            outputs: drv
                .output_paths()
                .into_iter()
                .map(|(o, p)| (o, show(&p)))
                .collect(),
            input_drvs: drv
                .input_derivations
                .iter()
                .map(|(p, outs)| {
                    (
                        show(p),
                        outs.iter().map(|o| o.as_str().to_owned()).collect(),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            input_srcs: drv.input_sources.iter().map(show).collect(),
        };
        Ok((
            references,
            ContentAddress::Text(sha256.clone()),
            record,
            tmp,
        ))
    }

    fn keep_drv_copy(
        &self,
        path: &StorePath,
        tmp: tempfile::NamedTempFile,
    ) -> Result<(), CacheError> {
        let dest = self.drv_copy(path);
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
            .map_err(io_err("set permissions of", tmp.path()))?;
        tmp.persist(&dest)
            .map_err(|e| io_err("move into place", &dest)(e.error))?;
        sync_dir(&self.dir.join("drv"))
    }

    /// The [`CachedPath`] a narinfo describes.
    fn cached_path(&self, info: &NarInfo) -> CachedPath {
        let show = |p: &StorePath| self.store_dir.display(p);
        CachedPath {
            path: show(&info.path),
            nar_hash: info.nar_hash.to_nix32_prefixed(),
            nar_size: info.nar_size,
            references: info.references.iter().map(show).collect(),
            deriver: info.deriver.as_ref().map(show),
            url: info.url.clone(),
            file_size: info.file_size.unwrap_or(0),
        }
    }

    fn narinfo_file(&self, path: &StorePath) -> PathBuf {
        self.dir.join(format!("{}.narinfo", path.hash_part()))
    }

    /// What the cache holds of `path`, if anything.
    pub fn lookup(&self, path: &StorePath) -> Result<Option<CachedPath>, CacheError> {
        let file = self.narinfo_file(path);
        let text = match crate::bounded::read_file(&file, narinfo::MAX_NARINFO_SIZE as u64) {
            Ok(t) => t,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(source) => return Err(CacheError::ReadNarInfo { file, source }),
        };
        let info =
            NarInfo::parse(&text, &self.store_dir).map_err(|source| CacheError::BadNarInfo {
                path: self.store_dir.display(path),
                source,
            })?;
        // Another path with the same hash part cannot be this one.
        if info.path != *path {
            return Ok(None);
        }
        Ok(Some(self.cached_path(&info)))
    }

    /// Stores the build log of `drv` at `log/<drv base name>` (replacing
    /// any earlier one at once, never partly), reading at most `max` bytes.
    pub fn write_log(
        &self,
        drv: &StorePath,
        data: &mut dyn Read,
        max: u64,
    ) -> Result<(), CacheError> {
        let dest = self.dir.join("log").join(drv.base_name());
        if write_atomically(&dest, data, max)? {
            Ok(())
        } else {
            Err(CacheError::LogTooLarge {
                drv: self.store_dir.display(drv),
                max,
            })
        }
    }

    /// Where the plain copy of an accepted `.drv` is kept.
    pub fn drv_copy(&self, path: &StorePath) -> PathBuf {
        self.dir.join("drv").join(path.base_name())
    }

    /// The file for an untrusted request name `<hash part>.narinfo`.
    /// Anything else (other characters, other lengths, `..`, `/`) is refused.
    pub fn narinfo_path(&self, name: &str) -> Result<PathBuf, CacheError> {
        let ok = name
            .strip_suffix(".narinfo")
            .is_some_and(|h| is_nix32(h, 32));
        if ok {
            Ok(self.dir.join(name))
        } else {
            Err(CacheError::BadName {
                name: name.chars().take(100).collect(),
            })
        }
    }

    /// The file for an untrusted request name `<52 nix32 digits>.nar.zst`
    /// (the part of a narinfo's `URL` after `nar/`). Anything else is refused.
    pub fn nar_path(&self, file: &str) -> Result<PathBuf, CacheError> {
        let ok = file
            .strip_suffix(".nar.zst")
            .is_some_and(|h| is_nix32(h, 52));
        if ok {
            Ok(self.dir.join("nar").join(file))
        } else {
            Err(CacheError::BadName {
                name: file.chars().take(100).collect(),
            })
        }
    }

    /// The file of the build log of the derivation with base name `name`
    /// (untrusted: it must be a `.drv` store path base name).
    pub fn log_path(&self, name: &str) -> Result<PathBuf, CacheError> {
        match StorePath::from_base_name(name) {
            Ok(p) if p.is_derivation() => Ok(self.dir.join("log").join(p.base_name())),
            _ => Err(CacheError::BadName {
                name: name.chars().take(100).collect(),
            }),
        }
    }
}

fn is_nix32(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(nixbase32::is_digit)
}

/// Opens (with `create`, creating) `path` and takes its exclusive lock;
/// `None` when it does not exist. The lock is taken on the file that is
/// still at `path`: one that was renamed or removed meanwhile (a finished
/// or discarded upload) is not written to.
fn open_locked(path: &Path, create: bool) -> Result<Option<Flock<File>>, CacheError> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(path);
        let file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let locked = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            io_err("lock", path)(io::Error::from_raw_os_error(errno as i32))
        })?;
        if same_file(&locked, path)? {
            return Ok(Some(locked));
        }
        if !create && !path.exists() {
            return Ok(None);
        }
    }
}

/// Whether `file` is (still) the file at `path`.
fn same_file(file: &File, path: &Path) -> Result<bool, CacheError> {
    let held = file.metadata().map_err(io_err("inspect", path))?;
    match fs::symlink_metadata(path) {
        Ok(now) => Ok(now.ino() == held.ino() && now.dev() == held.dev()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

fn remove_if_there(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Writes `data` to `dest` (mode 0644) under a temporary name, syncs and
/// renames it, then syncs the directory: readers see the old file or the
/// new one, and a crash leaves no half file. Returns false, writing
/// nothing, when `data` holds more than `max` bytes.
fn write_atomically(dest: &Path, data: &mut dyn Read, max: u64) -> Result<bool, CacheError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(io_err("create a temporary file in", dir))?;
    let n = io::copy(&mut data.take(max.saturating_add(1)), tmp.as_file_mut())
        .map_err(io_err("write", tmp.path()))?;
    if n > max {
        // Dropping `tmp` removes it.
        return Ok(false);
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_err("sync", tmp.path()))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
        .map_err(io_err("set permissions of", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| io_err("move into place", dest)(e.error))?;
    sync_dir(dir)?;
    Ok(true)
}

#[cfg(test)]
mod tests;
