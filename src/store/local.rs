//! A local store: files under the physical root, the registry in SQLite.
//!
//! # Layout
//! - `<root>/<store dir>`: the files (created with the default mode, 0755
//!   under the usual umask, as Nix does without a build-users group; a
//!   multi-user `1775 root:nixbld` store is set up by whoever sets up build
//!   users, and an existing directory's mode is never changed).
//! - `<state>/db/{db.sqlite,schema,big-lock}`: the registry ([`Registry`]).
//! - `<store>/<hash>-<name>.lock`: per-path locks, the same files and the
//!   same `flock` protocol as Nix's `PathLocks`, so sandoff and Nix adding
//!   the same path at once exclude each other. An import keeps its batches'
//!   locks until it has answered ([`LockKeeper`]), so that removing their
//!   files does not slow down its own later files.
//! - `<store>/.sandoff-stage-<random>`: NARs being restored. They live in the
//!   store directory so that moving them into place is one `rename(2)`.
//!
//! # How a path becomes valid
//! Files are restored into a staging path, checked against the expected NAR
//! hash, size and content address, canonicalised (owner = this process, mode
//! 0444 or 0555, mtime 1, only regular files, directories and symlinks),
//! renamed into place under the path's lock, flushed to disk (`fsync` of
//! each file of a small path, `syncfs` for many files), and
//! only then registered, in one transaction together with their references
//! and derivation outputs. A crash at any point leaves at worst an
//! unregistered directory at the target, which the next add of that path
//! removes, or a staging directory, which
//! [`LocalStore::remove_stale_stages`] removes. A path is registered only
//! once all its references (other than itself) are valid.
//!
//! A path named `….drv` is a derivation to everything that reads the store,
//! so before one becomes valid, by whatever route, the [`DrvCheck`] the store
//! was opened with checks that the file is what its name claims (Nix's
//! `registerValidPaths` runs `checkDerivationOutputs` at the same place).
//! The store cannot parse derivations itself (it sits below them), so the
//! check is passed in; a store opened without one refuses every `.drv`
//! rather than trusting it. The check also gives the derivation's output
//! paths, which are recorded with it (`DerivationOutputs`) whatever the
//! route, so builds of an imported `.drv` find its outputs, as in Nix.
//!
//! Adds are not as careful as Nix about extended attributes and ACLs:
//! canonicalisation does not strip them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use rand_core::{OsRng, RngCore};
use thiserror::Error;

mod locks;

use locks::{Keeping, PathLock};
pub use locks::{KeptLocks, LockKeeper, PathLocks};

use super::hash::{Hasher, HashingReader};
use super::nar::{self, remove_tree, NarError};
use super::registry::{Registry, RegistryError};
use super::signature::Signature;
use super::{
    ContentAddress, FileIngestionMethod, Hash, HashAlgo, PathError, StoreLocation, StorePath,
    ValidPathInfo,
};

/// Staged copies are `<store>/.sandoff-stage-<random>`; the dot keeps the
/// name from ever being a store path.
const STAGE_PREFIX: &str = ".sandoff-stage-";

/// The modification time Nix gives every file in the store.
const STORE_MTIME: i64 = 1;

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{action} '{path}': {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action} '{path}': {source}")]
    Sys {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("NAR of '{path}': {source}")]
    Nar {
        path: PathBuf,
        #[source]
        source: NarError,
    },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("cannot add '{path}': it has no file name to name the store path after")]
    NoName { path: PathBuf },
    #[error("cannot add '{path}' flat: it is not a regular file (use --recursive)")]
    NotRegularFile { path: PathBuf },
    #[error("'{path}' has unsupported file type (only regular files, directories and symlinks)")]
    UnsupportedFileType { path: PathBuf },
    #[error("hash mismatch importing path '{path}': specified {expected}, got {got}")]
    NarHashMismatch {
        path: String,
        expected: String,
        got: String,
    },
    #[error("size mismatch importing path '{path}': specified {expected}, got {got}")]
    NarSizeMismatch {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("content address mismatch importing path '{path}': specified {expected}, got {got}")]
    CaMismatch {
        path: String,
        expected: String,
        got: String,
    },
    #[error("content address '{ca}' does not match path '{path}' (it gives '{computed}')")]
    CaPathMismatch {
        path: String,
        ca: String,
        computed: String,
    },
    #[error("cannot add '{path}': its reference '{reference}' is not valid")]
    InvalidReference { path: String, reference: String },
    #[error("path '{path}' is not valid")]
    NotValid { path: String },
    #[error("'{path}' is not locked by this process (take its lock first)")]
    NotLocked { path: String },
    #[error("cycle detected in the references of '{path}' from '{from}'")]
    Cycle { path: String, from: String },
    #[error("refusing derivation '{path}': {source}")]
    BadDerivation {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("refusing derivation '{path}': this store was opened without a derivation check")]
    DerivationUnchecked { path: String },
}

/// A [`DrvCheck`] that accepts anything, for tests of the store itself.
#[cfg(test)]
pub(crate) struct AcceptAnyDrv;

#[cfg(test)]
impl DrvCheck for AcceptAnyDrv {
    fn check(
        &self,
        _: &super::StoreDir,
        _: &ValidPathInfo,
        _: &Path,
        _: &dyn Fn(&StorePath) -> Option<PathBuf>,
    ) -> Result<DrvOutputs, Box<dyn std::error::Error + Send + Sync>> {
        Ok(DrvOutputs::new())
    }
}

/// Checks a `.drv` file before it becomes valid: that it parses, that its
/// store path is the text path of its contents, and that its outputs are
/// the paths its contents give (implemented above the store, by the
/// derivation layer).
pub trait DrvCheck: Send + Sync {
    /// `files` is where `info.path`'s file is now; `find` says where the file
    /// of another path is, for paths that are valid or that become valid
    /// together with this one (input derivations imported in one batch).
    /// Returns the derivation's known output paths by output name, which
    /// the store records with it (`DerivationOutputs`, as Nix's
    /// `registerValidPath` does for every `.drv`, whatever route it took).
    fn check(
        &self,
        dir: &super::StoreDir,
        info: &ValidPathInfo,
        files: &Path,
        find: &dyn Fn(&StorePath) -> Option<PathBuf>,
    ) -> Result<DrvOutputs, Box<dyn std::error::Error + Send + Sync>>;
}

/// A derivation's output paths by output name.
pub type DrvOutputs = BTreeMap<String, StorePath>;

/// The outputs to record with `path`: those the caller gives, else those
/// the derivation check found (for a `.drv` that came by another route
/// than `add_text`).
fn recorded_outputs<'a>(
    given: &'a DrvOutputs,
    checked: &'a BTreeMap<StorePath, DrvOutputs>,
    path: &StorePath,
) -> &'a DrvOutputs {
    match checked.get(path) {
        Some(found) if given.is_empty() => found,
        _ => given,
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn sys_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> StoreError + 'a {
    move |source| StoreError::Sys {
        action,
        path: path.to_owned(),
        source,
    }
}

fn nar_err(path: &Path) -> impl FnOnce(NarError) -> StoreError + '_ {
    move |source| StoreError::Nar {
        path: path.to_owned(),
        source,
    }
}

/// An open local store.
pub struct LocalStore {
    loc: StoreLocation,
    registry: Registry,
    /// Held shared for the store's lifetime, as Nix holds `db/big-lock`, so
    /// that a Nix schema migration (which takes it exclusively) never runs
    /// under us.
    _big_lock: Flock<File>,
    /// What checks a `.drv` before it becomes valid; `None` refuses them.
    drv_check: Option<Box<dyn DrvCheck>>,
    /// The owner of the staged copies alive now, if any.
    stager: Mutex<Weak<Stager>>,
    /// Batch locks kept for a [`LockKeeper`].
    keeping: Keeping,
}

/// The lock that marks staged copies as alive, one for all those alive at
/// once (an import's batch): `<store>/.sandoff-stage-<owner>.lock`, the
/// copies being `.sandoff-stage-<owner>-<n>`; it goes with the last of them.
/// One lock per staged copy made every imported path create and delete a
/// second file, and on ext4 without a journal every new inode skips those
/// deleted in the last minute.
struct Stager {
    prefix: String,
    _lock: PathLock,
    next: AtomicU64,
}

/// A NAR restored into a temporary directory inside the store, not yet
/// valid. Dropping it removes the files.
pub struct StagedPath {
    /// Where the files are now.
    pub tmp: PathBuf,
    /// SHA-256 of the NAR that was read, and its size.
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Held while the staged copy exists, so that
    /// [`LocalStore::remove_stale_stages`] can tell it from a dead one.
    _lock: Option<Arc<Stager>>,
    /// Whether the files were made with a store path's metadata already
    /// ([`nar::restore_canonical`]), so that no walk has to set it.
    canonical: bool,
}

impl Drop for StagedPath {
    fn drop(&mut self) {
        // An empty path marks a staged copy that was moved into place.
        if !self.tmp.as_os_str().is_empty() {
            if let Err(e) = remove_tree(&self.tmp) {
                tracing::warn!(path = %self.tmp.display(), "cannot remove staged files: {e}");
            }
        }
    }
}

impl StagedPath {
    /// Gives the staged files a store path's metadata (read-only, mtime 1,
    /// this user's), unless they were made with it.
    pub fn canonicalise(&self) -> Result<(), StoreError> {
        if self.canonical {
            return Ok(());
        }
        canonicalise_path(&self.tmp)
    }

    /// The content hash of the staged files as `method` and `algo` define it:
    /// the NAR's hash (already known for sha256) or, flat, the hash of a
    /// regular file's contents.
    pub fn content_hash(
        &self,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> Result<Hash, StoreError> {
        content_hash(&self.tmp, &self.nar_hash, method, algo)
    }
}

/// The content hash of the files at `files`, whose NAR hash is `nar_hash`,
/// as `method` and `algo` define it.
fn content_hash(
    files: &Path,
    nar_hash: &Hash,
    method: FileIngestionMethod,
    algo: HashAlgo,
) -> Result<Hash, StoreError> {
    match method {
        FileIngestionMethod::Recursive if algo == HashAlgo::Sha256 => Ok(nar_hash.clone()),
        FileIngestionMethod::Recursive => {
            let mut h = Hasher::new(algo);
            nar::dump(files, &mut h).map_err(nar_err(files))?;
            Ok(h.finish())
        }
        FileIngestionMethod::Flat => flat_hash(files, algo),
    }
}

/// Outputs moved into place under their locks and not registered yet.
/// Dropped before [`LocalStore::register_placed`] made them valid (an
/// error, or a flush that failed), their files are removed: nothing
/// unregistered of ours stays at a store path.
struct Placed {
    moved: Vec<PathBuf>,
    infos: Vec<ValidPathInfo>,
    derivation_outputs: BTreeMap<StorePath, DrvOutputs>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        for real in &self.moved {
            if let Err(rm) = remove_tree(real) {
                tracing::warn!(path = %real.display(), "cannot remove unregistered output: {rm}");
            }
        }
    }
}

/// A batch moved into place and being flushed, not valid yet (see
/// [`LocalStore::start_commit_batch`]).
pub struct PendingCommit {
    // Fields drop in this order: the flush is waited for before the files
    // are removed and before the locks go.
    flush: Option<Flush>,
    placed: Option<Placed>,
    locks: Option<PathLocks>,
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        if let Some(flush) = self.flush.take() {
            let _ = flush.wait();
        }
    }
}

/// A flush of paths, on a thread of its own when one can be started.
enum Flush {
    Running(std::thread::JoinHandle<Result<(), StoreError>>),
    Done(Result<(), StoreError>),
}

impl Flush {
    fn start(paths: &[PathBuf]) -> Flush {
        if paths.is_empty() {
            return Flush::Done(Ok(()));
        }
        let theirs = paths.to_vec();
        let thread = std::thread::Builder::new()
            .name("flush".into())
            .spawn(move || sync_paths(&theirs));
        match thread {
            Ok(handle) => Flush::Running(handle),
            Err(e) => {
                tracing::debug!("flushing on the committing thread: {e}");
                Flush::Done(sync_paths(paths))
            }
        }
    }

    fn wait(self) -> Result<(), StoreError> {
        match self {
            Flush::Done(result) => result,
            Flush::Running(handle) => handle.join().unwrap_or_else(|_| {
                Err(StoreError::Io {
                    action: "flushing",
                    path: PathBuf::new(),
                    source: io::Error::other("the flushing thread panicked"),
                })
            }),
        }
    }
}

impl std::fmt::Debug for StagedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedPath")
            .field("tmp", &self.tmp)
            .field("nar_hash", &self.nar_hash)
            .field("nar_size", &self.nar_size)
            .finish()
    }
}

impl LocalStore {
    /// Opens (creating if needed) the store at `loc`: directories and database.
    /// A daemon's store (`loc.daemon_db`) is opened as it is: nothing created.
    pub fn open(loc: StoreLocation) -> Result<LocalStore, StoreError> {
        let db_dir = loc.db_dir();
        if loc.daemon_db.is_none() {
            let store_dir = loc.real_store_dir();
            fs::create_dir_all(&store_dir)
                .map_err(io_err("creating store directory", &store_dir))?;
            fs::create_dir_all(&db_dir).map_err(io_err("creating database directory", &db_dir))?;
        }
        // A daemon's database must exist, and says so before anything else.
        let daemon_registry = match loc.daemon_db {
            Some(_) => Some(Registry::open_existing(&db_dir, loc.dir.clone())?),
            None => None,
        };
        let lock_path = db_dir.join("big-lock");
        // A daemon's lock file is the daemon's to create; ours is created.
        let lock_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(loc.daemon_db.is_none())
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        let big_lock = Flock::lock(lock_file, FlockArg::LockShared)
            .map_err(|(_, e)| sys_err("locking", &lock_path)(e))?;
        let registry = match daemon_registry {
            Some(r) => r,
            None => Registry::open(&db_dir, loc.dir.clone())?,
        };
        Ok(LocalStore {
            loc,
            registry,
            _big_lock: big_lock,
            drv_check: None,
            stager: Mutex::new(Weak::new()),
            keeping: Keeping::default(),
        })
    }

    /// [`LocalStore::open`] with the check that `.drv` files must pass to
    /// become valid (without one, registering a `.drv` is refused).
    pub fn open_with_drv_check(
        loc: StoreLocation,
        check: Box<dyn DrvCheck>,
    ) -> Result<LocalStore, StoreError> {
        let mut store = LocalStore::open(loc)?;
        store.drv_check = Some(check);
        Ok(store)
    }

    /// That a valid path is what its name claims, as it would be checked on
    /// entering the store: the files match its content address, which gives
    /// its path, and a `.drv` passes the derivation check (`store verify`).
    /// `nar_hash` is the hash of the files as they are now (the caller has
    /// it), not the registry's.
    pub fn check_claims(&self, info: &ValidPathInfo, nar_hash: &Hash) -> Result<(), StoreError> {
        let real = self.loc.real_path(&info.path);
        if let Some(ca) = &info.ca {
            self.check_content_address(&real, nar_hash, info, ca)?;
        }
        self.check_derivations(&[(info, &real)]).map(drop)
    }

    /// Runs the derivation check on each `.drv` among `items` (a path and
    /// where its files are now), which become valid together; returns the
    /// outputs of each.
    fn check_derivations(
        &self,
        items: &[(&ValidPathInfo, &Path)],
    ) -> Result<BTreeMap<StorePath, DrvOutputs>, StoreError> {
        let mut outputs = BTreeMap::new();
        for (info, files) in items.iter().filter(|(i, _)| i.path.is_derivation()) {
            let path = self.loc.logical(&info.path);
            let Some(check) = &self.drv_check else {
                return Err(StoreError::DerivationUnchecked { path });
            };
            let find = |p: &StorePath| -> Option<PathBuf> {
                if let Some((_, f)) = items.iter().find(|(i, _)| i.path == *p) {
                    return Some(f.to_path_buf());
                }
                matches!(self.registry.is_valid(p), Ok(true)).then(|| self.loc.real_path(p))
            };
            let outs = check
                .check(&self.loc.dir, info, files, &find)
                .map_err(|source| StoreError::BadDerivation { path, source })?;
            outputs.insert(info.path.clone(), outs);
        }
        Ok(outputs)
    }

    /// Where the store is.
    pub fn location(&self) -> &StoreLocation {
        &self.loc
    }

    /// The registry, for queries this type does not wrap.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry's record of `path`, or `None` when it is not valid.
    pub fn query_path_info(&self, path: &StorePath) -> Result<Option<ValidPathInfo>, StoreError> {
        Ok(self.registry.query_path_info(path)?)
    }

    /// Whether `path` is registered as valid.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        Ok(self.registry.is_valid(path)?)
    }

    /// Which of `paths` are valid, asked in one database read.
    pub fn valid_among<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        Ok(self.registry.valid_among(paths)?)
    }

    /// Every valid path.
    pub fn query_valid_paths(&self) -> Result<BTreeSet<StorePath>, StoreError> {
        Ok(self.registry.query_valid_paths()?)
    }

    /// The valid paths that reference `path`.
    pub fn query_referrers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, StoreError> {
        Ok(self.registry.query_referrers(path)?)
    }

    fn references(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, StoreError> {
        self.registry.query_references(path).map_err(|e| match e {
            RegistryError::NotValid { path } => StoreError::NotValid { path },
            e => e.into(),
        })
    }

    /// `paths` and everything they reference, transitively. Every path
    /// must be valid.
    pub fn closure(&self, paths: &BTreeSet<StorePath>) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<StorePath> = paths.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if seen.contains(&p) {
                continue;
            }
            let refs = self.references(&p)?;
            seen.insert(p);
            todo.extend(refs.into_iter().filter(|r| !seen.contains(r)));
        }
        Ok(seen)
    }

    /// `paths` ordered so that every path comes after its references (among
    /// `paths`). Self-references are fine; any other cycle is an error.
    pub fn topo_sort(&self, paths: &BTreeSet<StorePath>) -> Result<Vec<StorePath>, StoreError> {
        topo_order(paths, |p| self.references(p), &self.loc)
    }

    /// The records of `paths`, every one valid, in [`LocalStore::topo_sort`]'s
    /// order, read in one database transaction: what a stream of them needs,
    /// without a read per path for the order and another for the record.
    pub fn path_infos_in_order(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<ValidPathInfo>, StoreError> {
        let mut infos = self.registry.query_path_infos(paths)?;
        if let Some(p) = paths.iter().find(|p| !infos.contains_key(*p)) {
            return Err(StoreError::NotValid {
                path: self.loc.logical(p),
            });
        }
        let order = topo_order(paths, |p| Ok(infos[p].references.clone()), &self.loc)?;
        Ok(order.iter().filter_map(|p| infos.remove(p)).collect())
    }

    /// Adds a file or tree as a content-addressed path named after its file
    /// name (`nix-store --add` is `Recursive` + `Sha256`; `--add-fixed` the rest).
    /// As `nix-store --add-fixed` does, `Flat` needs a regular file (not a
    /// symlink) and stores it as it is, executable bit included.
    pub fn add_path(
        &self,
        src: &Path,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> Result<StorePath, StoreError> {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StoreError::NoName {
                path: src.to_owned(),
            })?;
        super::path::check_name(name)?;
        let staged = match method {
            FileIngestionMethod::Flat => {
                let meta = fs::symlink_metadata(src).map_err(io_err("reading", src))?;
                if !meta.is_file() {
                    return Err(StoreError::NotRegularFile {
                        path: src.to_owned(),
                    });
                }
                // Re-checked on the staged copy, in case `src` changed.
                self.stage_tree(src)?
            }
            FileIngestionMethod::Recursive => self.stage_tree(src)?,
        };
        let ca_hash = staged.content_hash(method, algo)?;
        let path = self
            .loc
            .dir
            .make_fixed_output_path(method, &ca_hash, name, [], false)?;
        let info = ValidPathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: Some(ContentAddress::Fixed {
                method,
                hash: ca_hash,
            }),
        };
        self.commit(staged, &info, &BTreeMap::new(), false)?;
        Ok(path)
    }

    /// Adds a text file (e.g. a `.drv`) as a `text` path. For a derivation,
    /// `derivation_outputs` fills the `DerivationOutputs` table.
    pub fn add_text(
        &self,
        name: &str,
        contents: &[u8],
        references: &BTreeSet<StorePath>,
        derivation_outputs: &BTreeMap<String, StorePath>,
    ) -> Result<StorePath, StoreError> {
        let hash = HashAlgo::Sha256.digest(contents);
        let path = self.loc.dir.make_text_path(name, &hash, references)?;
        if self.is_valid(&path)? {
            return Ok(path);
        }
        let mut staged = self.new_staged()?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&staged.tmp)
            .map_err(io_err("creating", &staged.tmp))?;
        file.write_all(contents)
            .map_err(io_err("writing", &staged.tmp))?;
        drop(file);
        (staged.nar_hash, staged.nar_size) =
            nar::hash_path(&staged.tmp).map_err(nar_err(&staged.tmp))?;
        let info = ValidPathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: references.clone(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: Some(ContentAddress::Text(hash)),
        };
        self.commit(staged, &info, derivation_outputs, false)?;
        Ok(path)
    }

    /// A staging path that does not exist yet, in the store directory.
    fn new_staged(&self) -> Result<StagedPath, StoreError> {
        let dir = self.loc.real_store_dir();
        let stager = {
            let mut guard = self
                .stager
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match guard.upgrade() {
                Some(s) => s,
                None => {
                    let mut rnd = [0u8; 12];
                    OsRng.fill_bytes(&mut rnd);
                    let owner: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
                    let prefix = format!("{STAGE_PREFIX}{owner}");
                    let stager = Arc::new(Stager {
                        _lock: PathLock::acquire(&dir.join(&prefix))?,
                        prefix,
                        next: AtomicU64::new(0),
                    });
                    *guard = Arc::downgrade(&stager);
                    stager
                }
            }
        };
        let n = stager.next.fetch_add(1, Ordering::Relaxed);
        Ok(StagedPath {
            tmp: dir.join(format!("{}-{n}", stager.prefix)),
            nar_hash: HashAlgo::Sha256.digest(b""),
            nar_size: 0,
            _lock: Some(stager),
            canonical: false,
        })
    }

    /// Removes staged copies left behind by processes that died (their
    /// lock is free); returns how many. Staged copies in use are kept. The
    /// store directory is scanned, so this belongs with garbage collection
    /// rather than with every `open`.
    pub fn remove_stale_stages(&self) -> Result<usize, StoreError> {
        let dir = self.loc.real_store_dir();
        // Staged copies by owner: `.sandoff-stage-<owner>[-<n>]`, locked by
        // `.sandoff-stage-<owner>.lock` (one copy per owner before 2026-12).
        let mut owners: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err("reading directory", &dir))? {
            let entry = entry.map_err(io_err("reading directory", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(STAGE_PREFIX) else {
                continue;
            };
            let (owner, is_lock) = match rest.strip_suffix(".lock") {
                Some(owner) => (owner, true),
                None => (rest.split('-').next().unwrap_or(rest), false),
            };
            let stages = owners.entry(owner.to_owned()).or_default();
            if !is_lock {
                stages.push(dir.join(name));
            }
        }
        let mut removed = 0;
        for (owner, stages) in owners {
            let Some(_lock) = PathLock::try_acquire(&dir.join(format!("{STAGE_PREFIX}{owner}")))?
            else {
                continue;
            };
            for path in &stages {
                remove_tree(path).map_err(io_err("removing stale", path))?;
            }
            // A lock file left alone counts as one.
            removed += stages.len().max(1);
        }
        Ok(removed)
    }

    /// Restores one NAR from `nar` (reading exactly its bytes) into a
    /// temporary directory in the store, hashing it on the way.
    pub fn stage_nar(&self, nar: &mut dyn Read) -> Result<StagedPath, StoreError> {
        let mut staged = self.new_staged()?;
        let mut reader = HashingReader::new(nar, HashAlgo::Sha256);
        staged.canonical = nar::restore_canonical(&mut reader, &staged.tmp, STORE_MTIME)
            .map_err(nar_err(&staged.tmp))?;
        let (hash, size, _) = reader.finish();
        staged.nar_hash = hash;
        staged.nar_size = size;
        Ok(staged)
    }

    /// Stages `src` by streaming its NAR through a pipe into `stage_nar`, so
    /// the staged copy is exactly what was hashed.
    fn stage_tree(&self, src: &Path) -> Result<StagedPath, StoreError> {
        // A small tree (most build outputs of small derivations) is
        // serialised in memory on this thread: a thread and a pipe cost
        // more than the copy itself.
        if is_small_tree(src, SMALL_TREE_BYTES, FSYNC_EACH_MAX) {
            let mut nar = Vec::new();
            nar::dump(src, &mut nar).map_err(nar_err(src))?;
            return self.stage_nar(&mut nar.as_slice());
        }
        let (r, w) = nix::unistd::pipe().map_err(sys_err("creating pipe for", src))?;
        // Buffering is safe here: the pipe carries exactly one NAR.
        let mut reader = io::BufReader::with_capacity(1 << 16, File::from(r));
        std::thread::scope(|scope| {
            let dumper = scope.spawn(move || {
                let mut sink = PipeSink {
                    inner: io::BufWriter::with_capacity(1 << 16, File::from(w)),
                    reader_gone: false,
                };
                let dumped = nar::dump(src, &mut sink)
                    .map_err(nar_err(src))
                    .and_then(|()| sink.flush().map_err(io_err("writing NAR of", src)));
                (dumped, sink.reader_gone)
            });
            let staged = self.stage_nar(&mut reader);
            // Unblocks the dumper if staging stopped early.
            drop(reader);
            let (dumped, reader_gone) = dumper.join().unwrap_or_else(|_| {
                let panicked = io::Error::other("NAR writer panicked");
                (Err(io_err("dumping", src)(panicked)), false)
            });
            match (staged, dumped) {
                (Ok(staged), Ok(())) => Ok(staged),
                // The reader stopped first: its error is the cause.
                (Err(e), Err(_)) if reader_gone => Err(e),
                // Otherwise a failed dump explains a truncated NAR best.
                (_, Err(e)) => Err(e),
                (Err(e), Ok(())) => Err(e),
            }
        })
    }

    /// Makes a staged path valid as `info.path`: checks the NAR hash and size
    /// against `info`, that every reference is valid (or is the path itself),
    /// canonicalises, moves it into place and registers it in one transaction.
    /// Already valid: the staged copy is dropped and new signatures are merged.
    pub fn commit_staged(
        &self,
        staged: StagedPath,
        info: &ValidPathInfo,
    ) -> Result<(), StoreError> {
        self.commit(staged, info, &BTreeMap::new(), true)
    }

    /// That a staged copy is what `info` describes: NAR hash and size, and
    /// (with `check_ca`) its content address.
    pub fn check_staged(
        &self,
        staged: &StagedPath,
        info: &ValidPathInfo,
        check_ca: bool,
    ) -> Result<(), StoreError> {
        let logical = || self.loc.logical(&info.path);
        if staged.nar_hash != info.nar_hash {
            return Err(StoreError::NarHashMismatch {
                path: logical(),
                expected: info.nar_hash.to_nix32_prefixed(),
                got: staged.nar_hash.to_nix32_prefixed(),
            });
        }
        if staged.nar_size != info.nar_size {
            return Err(StoreError::NarSizeMismatch {
                path: logical(),
                expected: info.nar_size,
                got: staged.nar_size,
            });
        }
        match &info.ca {
            Some(ca) if check_ca => {
                self.check_content_address(&staged.tmp, &staged.nar_hash, info, ca)
            }
            _ => Ok(()),
        }
    }

    /// [`LocalStore::commit_staged`] for many paths at once (references
    /// first, or already valid): the checks of `commit_staged` for each,
    /// then, under all their locks, every path moved into place, one
    /// filesystem sync and one registry transaction. Paths already valid
    /// get the new signatures merged. On failure nothing of the batch is
    /// registered and nothing of it is left in place.
    pub fn commit_staged_batch(
        &self,
        batch: Vec<(StagedPath, ValidPathInfo)>,
    ) -> Result<(), StoreError> {
        let pending = self.start_commit_batch(batch)?;
        self.finish_commit_batch(pending)
    }

    /// [`LocalStore::commit_staged_batch`] in two halves, so that the caller
    /// can work while the filesystem flushes: this one checks the batch and
    /// moves it into place under its locks, and starts the flush on a
    /// thread; [`LocalStore::finish_commit_batch`] waits for the flush and
    /// registers the batch. Until then its paths are not valid. A pending
    /// commit dropped unfinished removes its paths again.
    pub fn start_commit_batch(
        &self,
        batch: Vec<(StagedPath, ValidPathInfo)>,
    ) -> Result<PendingCommit, StoreError> {
        let paths: BTreeSet<StorePath> = batch.iter().map(|(_, i)| i.path.clone()).collect();
        for (staged, info) in &batch {
            self.check_staged(staged, info, true)?;
        }
        let items: Vec<(&ValidPathInfo, &Path)> =
            batch.iter().map(|(s, i)| (i, s.tmp.as_path())).collect();
        self.check_derivations(&items)?;
        let locks = self.lock_batch(&paths)?;
        // One read for the batch; only a path someone made valid meanwhile
        // is read again, to merge the signatures.
        let valid = self.registry.valid_among(&paths)?;
        let mut todo = Vec::with_capacity(batch.len());
        for (staged, info) in batch {
            if !valid.contains(&info.path) || !self.merge_if_valid(&info)? {
                todo.push((staged, info));
            }
        }
        match self.prepare_outputs(&locks, todo) {
            Ok(placed) => Ok(PendingCommit {
                flush: Some(Flush::start(&placed.moved)),
                placed: Some(placed),
                locks: Some(locks),
            }),
            Err(e) => {
                self.keeping.keep_or_release(locks);
                Err(e)
            }
        }
    }

    /// Waits for the flush of a commit [`LocalStore::start_commit_batch`]
    /// started, and registers its paths in one transaction; on failure
    /// removes them.
    pub fn finish_commit_batch(&self, mut pending: PendingCommit) -> Result<(), StoreError> {
        let synced = pending.flush.take().map_or(Ok(()), Flush::wait);
        let result = match pending.placed.take() {
            Some(placed) => self.register_placed(placed, synced),
            None => synced,
        };
        if let Some(locks) = pending.locks.take() {
            self.keeping.keep_or_release(locks);
        }
        result
    }

    /// Keeps the path locks of the batches [`LocalStore::commit_staged_batch`]
    /// commits until the keeper is finished or dropped, so that their lock
    /// files are removed after the caller answered (see [`LockKeeper`]). A
    /// keeper made while another is active does nothing.
    pub fn keep_batch_locks(&self) -> LockKeeper<'_> {
        LockKeeper::new(&self.keeping)
    }

    /// A batch's locks. Sorted (a set), so two batches cannot deadlock on
    /// each other; but while locks of earlier batches are kept, taken out of
    /// order, waiting could: then only tried, and if one is taken the kept
    /// locks are let go before waiting.
    fn lock_batch(&self, paths: &BTreeSet<StorePath>) -> Result<PathLocks, StoreError> {
        if self.keeping.holding() {
            if let Some(locks) = self.try_lock_paths(paths)? {
                return Ok(locks);
            }
            self.keeping.release_now();
        }
        self.lock_paths(paths)
    }

    /// `commit_staged`, also recording a derivation's outputs.
    pub fn commit_staged_derivation(
        &self,
        staged: StagedPath,
        info: &ValidPathInfo,
        derivation_outputs: &BTreeMap<String, StorePath>,
    ) -> Result<(), StoreError> {
        self.commit(staged, info, derivation_outputs, true)
    }

    fn commit(
        &self,
        mut staged: StagedPath,
        info: &ValidPathInfo,
        derivation_outputs: &BTreeMap<String, StorePath>,
        check_ca: bool,
    ) -> Result<(), StoreError> {
        self.check_staged(&staged, info, check_ca)?;
        self.check_references(info)?;
        let checked = self.check_derivations(&[(info, &staged.tmp)])?;
        let derivation_outputs = recorded_outputs(derivation_outputs, &checked, &info.path);
        let real = self.loc.real_path(&info.path);
        let _lock = PathLock::acquire(&real)?;
        if self.merge_if_valid(info)? {
            return Ok(());
        }
        staged.canonicalise()?;
        // Under the lock, anything at the target is a leftover of an
        // interrupted add (or of garbage): it was never valid.
        move_into_place(&staged.tmp, &real)?;
        staged.tmp = PathBuf::new();
        self.register_in_place(info, derivation_outputs, &real, true)
    }

    /// Flushes the files at `real` and registers them; with
    /// `remove_on_failure`, removes them again when registration fails so
    /// that no unregistered copy of ours lingers.
    fn register_in_place(
        &self,
        info: &ValidPathInfo,
        derivation_outputs: &BTreeMap<String, StorePath>,
        real: &Path,
        remove_on_failure: bool,
    ) -> Result<(), StoreError> {
        let result = sync_paths(&[real.to_owned()]).and_then(|()| {
            let mut info = info.clone();
            if info.registration_time == 0 {
                info.registration_time = now();
            }
            self.registry
                .register(&info, derivation_outputs)
                .map_err(|e| match e {
                    RegistryError::InvalidReference { path, reference } => {
                        StoreError::InvalidReference { path, reference }
                    }
                    e => e.into(),
                })
        });
        if let Err(e) = result {
            if !remove_on_failure {
                return Err(e);
            }
            if let Err(rm) = remove_tree(real) {
                tracing::warn!(path = %real.display(), "cannot remove unregistered path: {rm}");
            }
            return Err(e);
        }
        tracing::debug!(path = %self.loc.logical(&info.path), "registered");
        Ok(())
    }

    fn check_references(&self, info: &ValidPathInfo) -> Result<(), StoreError> {
        for r in info.references.iter().filter(|r| **r != info.path) {
            if !self.registry.is_valid(r)? {
                return Err(StoreError::InvalidReference {
                    path: self.loc.logical(&info.path),
                    reference: self.loc.logical(r),
                });
            }
        }
        Ok(())
    }

    /// Checks that `ca` gives `info.path` and, unless the path refers to
    /// itself (then the hash is taken modulo its own hash part), that it
    /// matches the staged contents.
    fn check_content_address(
        &self,
        files: &Path,
        nar_hash: &Hash,
        info: &ValidPathInfo,
        ca: &ContentAddress,
    ) -> Result<(), StoreError> {
        let self_ref = info.references.contains(&info.path);
        let others = info.references.iter().filter(|r| **r != info.path);
        let computed =
            self.loc
                .dir
                .make_content_addressed_path(ca, info.path.name(), others, self_ref)?;
        if computed != info.path {
            return Err(StoreError::CaPathMismatch {
                path: self.loc.logical(&info.path),
                ca: ca.to_string(),
                computed: self.loc.logical(&computed),
            });
        }
        if self_ref {
            return Ok(());
        }
        let (method, expected) = match ca {
            ContentAddress::Text(h) => (FileIngestionMethod::Flat, h),
            ContentAddress::Fixed { method, hash } => (*method, hash),
        };
        let got = content_hash(files, nar_hash, method, expected.algo())?;
        if &got != expected {
            return Err(StoreError::CaMismatch {
                path: self.loc.logical(&info.path),
                expected: expected.to_nix32_prefixed(),
                got: got.to_nix32_prefixed(),
            });
        }
        Ok(())
    }

    /// `stage_nar` then `commit_staged`.
    pub fn add_nar(&self, info: &ValidPathInfo, nar: &mut dyn Read) -> Result<(), StoreError> {
        let staged = self.stage_nar(nar)?;
        self.commit_staged(staged, info)
    }

    /// Registers files that are already at `info.path`'s place in the store
    /// (a build's output): under the path's lock, canonicalises them, checks
    /// their NAR hash and size against `info` and registers them with
    /// `derivation_outputs` (for a `.drv`). Already valid: merges signatures.
    /// On any failure the files are left in place, unregistered.
    pub fn register_valid_path(
        &self,
        info: &ValidPathInfo,
        derivation_outputs: &BTreeMap<String, StorePath>,
    ) -> Result<(), StoreError> {
        self.check_references(info)?;
        let real = self.loc.real_path(&info.path);
        let _lock = PathLock::acquire(&real)?;
        if self.merge_if_valid(info)? {
            return Ok(());
        }
        canonicalise_path(&real)?;
        let (hash, size) = nar::hash_path(&real).map_err(nar_err(&real))?;
        let logical = self.loc.logical(&info.path);
        if hash != info.nar_hash {
            return Err(StoreError::NarHashMismatch {
                path: logical,
                expected: info.nar_hash.to_nix32_prefixed(),
                got: hash.to_nix32_prefixed(),
            });
        }
        if size != info.nar_size {
            return Err(StoreError::NarSizeMismatch {
                path: logical,
                expected: info.nar_size,
                got: size,
            });
        }
        if let Some(ca) = &info.ca {
            self.check_content_address(&real, &hash, info, ca)?;
        }
        let checked = self.check_derivations(&[(info, &real)])?;
        let derivation_outputs = recorded_outputs(derivation_outputs, &checked, &info.path);
        self.register_in_place(info, derivation_outputs, &real, false)
    }

    /// If `info.path` is valid already (someone else added it), merges
    /// `info`'s signatures into it and returns true. Call under its lock.
    fn merge_if_valid(&self, info: &ValidPathInfo) -> Result<bool, StoreError> {
        if !self.registry.is_valid(&info.path)? {
            return Ok(false);
        }
        if !info.signatures.is_empty() {
            self.registry.add_signatures(&info.path, &info.signatures)?;
        }
        Ok(true)
    }

    /// Adds signatures to a valid path.
    pub fn add_signatures(
        &self,
        path: &StorePath,
        sigs: &BTreeSet<Signature>,
    ) -> Result<(), StoreError> {
        self.registry
            .add_signatures(path, sigs)
            .map_err(|e| match e {
                RegistryError::NotValid { path } => StoreError::NotValid { path },
                e => e.into(),
            })
    }

    /// Takes the exclusive locks of `paths` (`<path>.lock`, Nix's protocol),
    /// in sorted order so that two processes locking overlapping sets cannot
    /// deadlock. Blocks until all are held.
    pub fn lock_paths(&self, paths: &BTreeSet<StorePath>) -> Result<PathLocks, StoreError> {
        let mut locks = Vec::new();
        for p in paths {
            locks.push(PathLock::acquire(&self.loc.real_path(p))?);
        }
        Ok(PathLocks {
            locks,
            paths: paths.clone(),
        })
    }

    /// [`LocalStore::lock_paths`] without waiting: `None` (and nothing held)
    /// when another process holds one of them.
    pub fn try_lock_paths(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Option<PathLocks>, StoreError> {
        let mut locks = Vec::new();
        for p in paths {
            match PathLock::try_acquire(&self.loc.real_path(p))? {
                Some(l) => locks.push(l),
                None => return Ok(None),
            }
        }
        Ok(Some(PathLocks {
            locks,
            paths: paths.clone(),
        }))
    }

    /// Locks that another process holds for us: a build hook's parent
    /// daemon holds the output locks of the build it hands over (Nix's
    /// `NIX_HELD_LOCKS`), and taking them again would wait for ever. Only
    /// for that case: nothing is locked here.
    pub fn held_by_parent(&self, paths: &BTreeSet<StorePath>) -> PathLocks {
        PathLocks {
            locks: Vec::new(),
            paths: paths.clone(),
        }
    }

    /// Copies the file or tree at `src` (anywhere on this machine) into a
    /// staging path in the store through its NAR serialisation, so that the
    /// copy is fresh files owned by us (no inode or open file of whoever
    /// wrote `src` survives: CVE-2024-27297) and exactly what was hashed.
    pub fn stage_path(&self, src: &Path) -> Result<StagedPath, StoreError> {
        self.stage_tree(src)
    }

    /// Makes a build's outputs valid together: under `locks` (which must
    /// cover every output; they are not taken again, since a second `flock`
    /// of the same file by this process would wait for itself), each staged
    /// copy is canonicalised and renamed into place (replacing any invalid
    /// leftover), the filesystem is synced, and all are registered in one
    /// transaction, so outputs that refer to each other become valid at
    /// once. References must be valid or among the outputs. On any failure
    /// every output moved into place is removed again and nothing is
    /// registered. Outputs that are already valid are skipped.
    pub fn register_built_outputs(
        &self,
        locks: &PathLocks,
        outputs: Vec<(StagedPath, ValidPathInfo)>,
    ) -> Result<(), StoreError> {
        let placed = self.prepare_outputs(locks, outputs)?;
        let synced = sync_paths(&placed.moved);
        self.register_placed(placed, synced)
    }

    /// What [`LocalStore::register_built_outputs`] does before the flush:
    /// the checks, then the outputs not valid yet moved into place.
    fn prepare_outputs(
        &self,
        locks: &PathLocks,
        outputs: Vec<(StagedPath, ValidPathInfo)>,
    ) -> Result<Placed, StoreError> {
        let batch: BTreeSet<&StorePath> = outputs.iter().map(|(_, i)| &i.path).collect();
        // What is asked of the database, in one read: the references from
        // outside the batch, and the outputs themselves.
        let outside: BTreeSet<&StorePath> = outputs
            .iter()
            .flat_map(|(_, i)| &i.references)
            .filter(|r| !batch.contains(r))
            .collect();
        let valid = self
            .registry
            .valid_among(outside.iter().copied().chain(batch.iter().copied()))?;
        for (_, info) in &outputs {
            if !locks.paths.contains(&info.path) {
                return Err(StoreError::NotLocked {
                    path: self.loc.logical(&info.path),
                });
            }
            for r in &info.references {
                if !batch.contains(r) && !valid.contains(r) {
                    return Err(StoreError::InvalidReference {
                        path: self.loc.logical(&info.path),
                        reference: self.loc.logical(r),
                    });
                }
            }
        }
        let mut todo = Vec::new();
        for (staged, info) in outputs {
            if !valid.contains(&info.path) {
                todo.push((staged, info));
            }
        }
        // A content-addressed output must be what its name claims, whoever
        // built it: a fixed-output derivation that names the wrong path
        // must not get it with a `ca` it does not satisfy.
        for (staged, info) in &todo {
            if let Some(ca) = &info.ca {
                self.check_content_address(&staged.tmp, &staged.nar_hash, info, ca)?;
            }
        }
        let items: Vec<(&ValidPathInfo, &Path)> =
            todo.iter().map(|(s, i)| (i, s.tmp.as_path())).collect();
        let checked = self.check_derivations(&items)?;
        self.place(todo, checked)
    }

    /// Canonicalises staged copies and moves them into place (their paths
    /// locked by the caller); on failure removes what it moved.
    fn place(
        &self,
        todo: Vec<(StagedPath, ValidPathInfo)>,
        derivation_outputs: BTreeMap<StorePath, DrvOutputs>,
    ) -> Result<Placed, StoreError> {
        let mut placed = Placed {
            moved: Vec::with_capacity(todo.len()),
            infos: Vec::with_capacity(todo.len()),
            derivation_outputs,
        };
        let now = now();
        for (mut staged, mut info) in todo {
            staged.canonicalise()?;
            let real = self.loc.real_path(&info.path);
            move_into_place(&staged.tmp, &real)?;
            staged.tmp = PathBuf::new();
            placed.moved.push(real);
            if info.registration_time == 0 {
                info.registration_time = now;
            }
            placed.infos.push(info);
        }
        Ok(placed)
    }

    /// Registers placed outputs in one transaction once their flush
    /// (`synced`) succeeded; on any failure removes them.
    fn register_placed(
        &self,
        mut placed: Placed,
        synced: Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        synced?;
        self.registry
            .register_many(&placed.infos)
            .map_err(|e| match e {
                RegistryError::InvalidReference { path, reference } => {
                    StoreError::InvalidReference { path, reference }
                }
                e => e.into(),
            })?;
        // The paths are valid now, so nothing below may undo them.
        placed.moved.clear();
        // A failure here must not undo them either (the files would go): a
        // `.drv` then lacks its outputs, as after a crash between the two,
        // and builds of it find none until it is imported again.
        for (drv, outputs) in &placed.derivation_outputs {
            if let Err(e) = self.registry.set_derivation_outputs(drv, outputs) {
                tracing::warn!(drv = %self.loc.logical(drv), "cannot record the outputs of a derivation: {e}");
            }
        }
        Ok(())
    }

    /// The outputs a valid derivation file declares (`DerivationOutputs`).
    pub fn derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        self.registry.derivation_outputs(drv).map_err(|e| match e {
            RegistryError::NotValid { path } => StoreError::NotValid { path },
            e => e.into(),
        })
    }
}

/// `paths` ordered so that every path comes after its references among
/// them (`refs_of` gives a path's references); self-references are fine, any
/// other cycle is an error. Depth first, smallest reference first, so the
/// order depends only on the graph.
fn topo_order(
    paths: &BTreeSet<StorePath>,
    mut refs_of: impl FnMut(&StorePath) -> Result<BTreeSet<StorePath>, StoreError>,
    loc: &StoreLocation,
) -> Result<Vec<StorePath>, StoreError> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    // The references of `path` within `paths`, without itself, in reverse
    // order (they are popped, so the smallest is visited first).
    let mut sort_refs = |path: &StorePath| -> Result<Vec<StorePath>, StoreError> {
        let mut refs: Vec<StorePath> = refs_of(path)?
            .into_iter()
            .filter(|r| r != path && paths.contains(r))
            .collect();
        refs.reverse();
        Ok(refs)
    };
    let mut marks: BTreeMap<StorePath, Mark> = BTreeMap::new();
    let mut sorted = Vec::with_capacity(paths.len());
    for start in paths {
        if marks.contains_key(start) {
            continue;
        }
        // Iterative DFS: (path, its remaining references).
        let mut stack: Vec<(StorePath, Vec<StorePath>)> = Vec::new();
        marks.insert(start.clone(), Mark::Visiting);
        stack.push((start.clone(), sort_refs(start)?));
        while let Some((node, pending)) = stack.last_mut() {
            match pending.pop() {
                Some(next) => match marks.get(&next) {
                    Some(Mark::Done) => {}
                    Some(Mark::Visiting) => {
                        return Err(StoreError::Cycle {
                            path: loc.logical(&next),
                            from: loc.logical(node),
                        })
                    }
                    None => {
                        let refs = sort_refs(&next)?;
                        marks.insert(next.clone(), Mark::Visiting);
                        stack.push((next, refs));
                    }
                },
                None => {
                    let node = node.clone();
                    stack.pop();
                    marks.insert(node.clone(), Mark::Done);
                    sorted.push(node);
                }
            }
        }
    }
    Ok(sorted)
}

/// The `algo` hash of the contents of the regular file at `path`.
fn flat_hash(path: &Path, algo: HashAlgo) -> Result<Hash, StoreError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("reading", path))?;
    if !meta.is_file() {
        return Err(StoreError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    let mut h = Hasher::new(algo);
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    io::copy(&mut f, &mut h).map_err(io_err("reading", path))?;
    Ok(h.finish())
}

/// The writing end of the NAR pipe; remembers whether the reader hung up.
struct PipeSink {
    inner: io::BufWriter<File>,
    reader_gone: bool,
}

impl Write for PipeSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        self.reader_gone |= matches!(&r, Err(e) if e.kind() == io::ErrorKind::BrokenPipe);
        r
    }
    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        self.reader_gone |= matches!(&r, Err(e) if e.kind() == io::ErrorKind::BrokenPipe);
        r
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Renames the staged copy `tmp` to `real`, replacing whatever is there (a
/// leftover that was never valid: the caller holds the path's lock). The
/// rename is tried first, as there is nothing at `real` but after a crash:
/// looking first cost a lookup in the store directory for every path.
fn move_into_place(tmp: &Path, real: &Path) -> Result<(), StoreError> {
    match fs::rename(tmp, real) {
        Ok(()) => return Ok(()),
        // A directory is there (or a file where a directory goes, or the
        // other way round); a file over a file was replaced already.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR)
            ) => {}
        Err(e) => return Err(io_err("moving staged path to", real)(e)),
    }
    remove_tree(real).map_err(io_err("removing stale", real))?;
    fs::rename(tmp, real).map_err(io_err("moving staged path to", real))
}

/// Gives a tree the metadata of a store path, as Nix's
/// `canonicalisePathMetaData`: owned by this process's uid and gid, mode
/// 0444 (0555 if the owner could execute it; directories 0555, which also
/// clears setuid, setgid and sticky bits), mtime 1. Anything other than a
/// regular file, directory or symlink is refused.
pub fn canonicalise_path(path: &Path) -> Result<(), StoreError> {
    let uid = Uid::effective();
    let gid = Gid::effective();
    canonicalise_entry(path, uid, gid)
}

fn canonicalise_entry(path: &Path, uid: Uid, gid: Gid) -> Result<(), StoreError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("reading", path))?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
        return Err(StoreError::UnsupportedFileType {
            path: path.to_owned(),
        });
    }
    if ft.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err("reading directory", path))? {
            let entry = entry.map_err(io_err("reading directory", path))?;
            canonicalise_entry(&entry.path(), uid, gid)?;
        }
    }
    if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
        fchownat(
            None,
            path,
            Some(uid),
            Some(gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(sys_err("changing owner of", path))?;
    }
    if !ft.is_symlink() {
        let mode = meta.permissions().mode() & 0o7777;
        let want = 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 };
        if mode != want {
            fs::set_permissions(path, fs::Permissions::from_mode(want))
                .map_err(io_err("changing mode of", path))?;
        }
    }
    if meta.mtime() != STORE_MTIME {
        utimensat(
            None,
            path,
            &TimeSpec::UTIME_OMIT,
            &TimeSpec::new(STORE_MTIME, 0),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(sys_err("changing modification time of", path))?;
    }
    Ok(())
}

/// A tree whose files hold at most this many bytes (and that has at most
/// [`FSYNC_EACH_MAX`] entries) is staged through memory.
const SMALL_TREE_BYTES: u64 = 1 << 20;

/// Whether the tree at `path` has at most `max_entries` entries and
/// `max_bytes` bytes in its regular files.
fn is_small_tree(path: &Path, max_bytes: u64, max_entries: usize) -> bool {
    let (mut entries, mut bytes) = (Vec::new(), 0);
    collect_entries(path, &mut entries, &mut bytes, max_entries).is_ok_and(|fits| fits)
        && bytes <= max_bytes
}

/// Up to this many files and directories in the paths being made valid
/// are flushed one by one; more, and the whole filesystem is.
const FSYNC_EACH_MAX: usize = 64;

/// Flushes the files of `paths` (in one store directory) and the renames
/// that put them there, so that they are on disk before the registry says
/// they are valid. A few files (a typical small output) are `fsync`ed one
/// by one, then their directory: `syncfs` would also wait for everything
/// else written to the filesystem meanwhile (other builds, compilers), a
/// wait of tens of milliseconds on a busy machine. Many files are flushed
/// with one `syncfs`, cheaper than thousands of `fsync`s.
fn sync_paths(paths: &[PathBuf]) -> Result<(), StoreError> {
    let Some(first) = paths.first() else {
        return Ok(());
    };
    let store_dir = first.parent().unwrap_or(first);
    let mut entries = Vec::new();
    let few = paths
        .iter()
        .all(|p| collect_entries(p, &mut entries, &mut 0, FSYNC_EACH_MAX).is_ok_and(|fits| fits));
    if !few {
        let f = File::open(store_dir).map_err(io_err("opening", store_dir))?;
        return nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f.as_fd()))
            .map_err(sys_err("syncing", store_dir));
    }
    for e in entries.iter().map(PathBuf::as_path).chain([store_dir]) {
        // Symlinks cannot be opened; their directory's flush covers them.
        File::open(e)
            .and_then(|f| f.sync_all())
            .map_err(io_err("flushing", e))?;
    }
    Ok(())
}

/// Adds the regular files and directories of the tree at `path` to `out`,
/// and the regular files' sizes to `bytes`; `Ok(false)` as soon as there
/// would be more than `max`.
fn collect_entries(
    path: &Path,
    out: &mut Vec<PathBuf>,
    bytes: &mut u64,
    max: usize,
) -> io::Result<bool> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(true);
    }
    if out.len() >= max {
        return Ok(false);
    }
    out.push(path.to_owned());
    if meta.is_file() {
        *bytes += meta.len();
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            if !collect_entries(&entry?.path(), out, bytes, max)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreDir;

    #[test]
    fn small_trees_are_flushed_file_by_file_and_large_ones_whole() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        fs::create_dir_all(out.join("bin")).unwrap();
        fs::write(out.join("bin/a"), b"a").unwrap();
        fs::write(out.join("b"), b"b").unwrap();
        std::os::unix::fs::symlink("b", out.join("c")).unwrap();
        let mut entries = Vec::new();
        let mut bytes = 0;
        assert!(collect_entries(&out, &mut entries, &mut bytes, 10).unwrap());
        // The tree, its directory, two files; not the symlink.
        assert_eq!(entries.len(), 4, "{entries:?}");
        assert_eq!(bytes, 2, "the two files' sizes");
        let mut entries = Vec::new();
        assert!(!collect_entries(&out, &mut entries, &mut 0, 3).unwrap());
        // Both ways flush without error.
        sync_paths(std::slice::from_ref(&out)).unwrap();
        let many = d.path().join("many");
        fs::create_dir(&many).unwrap();
        for i in 0..=FSYNC_EACH_MAX {
            fs::write(many.join(i.to_string()), b"x").unwrap();
        }
        sync_paths(&[out, many]).unwrap();
    }

    fn store(tmp: &Path) -> LocalStore {
        LocalStore::open_with_drv_check(
            StoreLocation::new(StoreDir::default(), tmp.join("root")),
            Box::new(AcceptAnyDrv),
        )
        .unwrap()
    }

    #[test]
    fn a_store_without_a_derivation_check_refuses_drv_files() {
        let tmp = tempfile::tempdir().unwrap();
        let s = LocalStore::open(StoreLocation::new(
            StoreDir::default(),
            tmp.path().join("r"),
        ))
        .unwrap();
        let err = s
            .add_text("x.drv", b"Derive()", &BTreeSet::new(), &BTreeMap::new())
            .unwrap_err();
        assert!(
            matches!(err, StoreError::DerivationUnchecked { .. }),
            "{err}"
        );
        assert!(s.query_valid_paths().unwrap().is_empty());
        assert_eq!(
            fs::read_dir(tmp.path().join("r/nix/store"))
                .unwrap()
                .count(),
            0,
            "nothing left in the store"
        );
        // Anything else is added as before.
        s.add_text("x", b"x", &BTreeSet::new(), &BTreeMap::new())
            .unwrap();
    }

    #[test]
    fn a_refused_derivation_leaves_nothing() {
        struct Refuse;
        impl DrvCheck for Refuse {
            fn check(
                &self,
                _: &StoreDir,
                _: &ValidPathInfo,
                _: &Path,
                _: &dyn Fn(&StorePath) -> Option<PathBuf>,
            ) -> Result<DrvOutputs, Box<dyn std::error::Error + Send + Sync>> {
                Err("no".into())
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = LocalStore::open_with_drv_check(
            StoreLocation::new(StoreDir::default(), tmp.path().join("r")),
            Box::new(Refuse),
        )
        .unwrap();
        let err = s
            .add_text("x.drv", b"Derive()", &BTreeSet::new(), &BTreeMap::new())
            .unwrap_err();
        assert!(err.to_string().starts_with("refusing derivation"), "{err}");
        assert!(s.query_valid_paths().unwrap().is_empty());
        assert_eq!(
            fs::read_dir(tmp.path().join("r/nix/store"))
                .unwrap()
                .count(),
            0
        );
    }

    /// Whatever route a `.drv` takes in (`add_text` without outputs, a
    /// batch as imports commit), the outputs its check found are recorded.
    #[test]
    fn a_drv_records_the_outputs_its_check_found_by_every_route() {
        struct Outputs;
        impl DrvCheck for Outputs {
            fn check(
                &self,
                _: &StoreDir,
                _: &ValidPathInfo,
                _: &Path,
                _: &dyn Fn(&StorePath) -> Option<PathBuf>,
            ) -> Result<DrvOutputs, Box<dyn std::error::Error + Send + Sync>> {
                Ok(want())
            }
        }
        fn want() -> DrvOutputs {
            let out = StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").unwrap();
            BTreeMap::from([("out".to_owned(), out)])
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = LocalStore::open_with_drv_check(
            StoreLocation::new(StoreDir::default(), tmp.path().join("r")),
            Box::new(Outputs),
        )
        .unwrap();
        let a = s
            .add_text("a.drv", b"Derive(a)", &BTreeSet::new(), &BTreeMap::new())
            .unwrap();
        assert_eq!(s.derivation_outputs(&a).unwrap(), want());

        let file = tmp.path().join("b.drv");
        fs::write(&file, b"Derive(b)").unwrap();
        let staged = s.stage_path(&file).unwrap();
        let hash = HashAlgo::Sha256.digest(b"Derive(b)");
        let path = StoreDir::default()
            .make_text_path("b.drv", &hash, &BTreeSet::new())
            .unwrap();
        let info = ValidPathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: Some(ContentAddress::Text(hash)),
        };
        s.commit_staged_batch(vec![(staged, info)]).unwrap();
        assert_eq!(s.derivation_outputs(&path).unwrap(), want());
    }

    fn tree(dir: &Path) -> PathBuf {
        let d = dir.join("d");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("a.txt"), "hello\n").unwrap();
        fs::write(d.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(d.join("run.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("a.txt", d.join("link")).unwrap();
        fs::write(d.join("sub/empty"), "").unwrap();
        d
    }

    fn nar_of(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        nar::dump(path, &mut v).unwrap();
        v
    }

    /// (relative path, file type, mode, mtime, uid, gid) of every node
    /// under `root`, in name order.
    fn metadata_of(root: &Path) -> Vec<(PathBuf, String, u32, i64, u32, u32)> {
        fn walk(root: &Path, p: &Path, out: &mut Vec<(PathBuf, String, u32, i64, u32, u32)>) {
            let m = fs::symlink_metadata(p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            let mode = if m.file_type().is_symlink() {
                0
            } else {
                m.mode() & 0o7777
            };
            out.push((
                rel,
                format!("{:?}", m.file_type()),
                mode,
                m.mtime(),
                m.uid(),
                m.gid(),
            ));
            if m.is_dir() {
                let mut names: Vec<PathBuf> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                names.sort();
                for n in names {
                    walk(root, &n, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out
    }

    #[test]
    fn a_staged_nar_has_the_metadata_a_canonicalising_walk_would_give_it() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::create_dir(src.join("empty")).unwrap();
        fs::write(src.join("plain"), b"plain").unwrap();
        fs::write(src.join("sub/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("sub/tool"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(src.join("sub/deeper/empty-file"), b"").unwrap();
        std::os::unix::fs::symlink("../plain", src.join("sub/link")).unwrap();
        let nar = nar_of(&src);
        // The old way: restored as `nix-store --restore` would, then walked.
        let walked = tmp.path().join("walked");
        nar::restore(&mut nar.as_slice(), &walked).unwrap();
        canonicalise_path(&walked).unwrap();
        let staged = s.stage_nar(&mut nar.as_slice()).unwrap();
        assert!(staged.canonical);
        let want = metadata_of(&walked);
        assert_eq!(metadata_of(&staged.tmp), want);
        // What that is: read-only, executables r-x, mtime 1 everywhere.
        let modes: Vec<(String, u32, i64)> = want
            .iter()
            .map(|(p, _, mode, mtime, _, _)| (p.display().to_string(), *mode, *mtime))
            .collect();
        assert!(
            modes.contains(&("sub/tool".to_owned(), 0o555, 1)),
            "{modes:?}"
        );
        assert!(modes.contains(&("plain".to_owned(), 0o444, 1)), "{modes:?}");
        assert!(modes.contains(&("empty".to_owned(), 0o555, 1)), "{modes:?}");
        assert!(modes.contains(&("sub/link".to_owned(), 0, 1)), "{modes:?}");
        // Staged copies with read-only directories still go away.
        let path = staged.tmp.clone();
        drop(staged);
        assert!(!path.exists());
    }

    #[test]
    fn a_nar_cut_short_leaves_no_read_only_remains() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), b"x").unwrap();
        fs::write(src.join("z"), vec![7u8; 4096]).unwrap();
        let nar = nar_of(&src);
        // Cut inside "z": "a" and "a/b" are finished (read-only) by then.
        let err = s.stage_nar(&mut &nar[..nar.len() - 2048]).unwrap_err();
        assert!(err.to_string().contains("NAR"), "{err}");
        assert!(stage_dirs(&s).is_empty(), "{:?}", stage_dirs(&s));
    }

    fn stage_dirs(s: &LocalStore) -> Vec<PathBuf> {
        fs::read_dir(s.location().real_store_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                name.starts_with(".sandoff-stage") && !name.ends_with(".lock")
            })
            .collect()
    }

    /// Two staged outputs that refer to each other, as a build makes them.
    fn built_pair(s: &LocalStore, dir: &Path) -> Vec<(StagedPath, ValidPathInfo)> {
        let out = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x").unwrap();
        let dev = StorePath::from_base_name("8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x-dev").unwrap();
        [(&out, &dev), (&dev, &out)]
            .into_iter()
            .map(|(me, other)| {
                let src = dir.join(me.name());
                fs::write(&src, s.loc.logical(other)).unwrap();
                let staged = s.stage_path(&src).unwrap();
                let info = ValidPathInfo {
                    path: me.clone(),
                    deriver: None,
                    nar_hash: staged.nar_hash.clone(),
                    nar_size: staged.nar_size,
                    references: BTreeSet::from([other.clone()]),
                    registration_time: 0,
                    ultimate: true,
                    signatures: BTreeSet::new(),
                    ca: None,
                };
                (staged, info)
            })
            .collect()
    }

    #[test]
    fn built_outputs_referring_to_each_other_register_together() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let pair = built_pair(&s, tmp.path());
        let paths: BTreeSet<StorePath> = pair.iter().map(|(_, i)| i.path.clone()).collect();
        let locks = s.lock_paths(&paths).unwrap();
        assert!(s.try_lock_paths(&paths).unwrap().is_none(), "held");
        s.register_built_outputs(&locks, pair).unwrap();
        for p in &paths {
            let info = s.query_path_info(p).unwrap().unwrap();
            assert_eq!(info.references.len(), 1);
            assert!(info.registration_time > 0);
            let meta = fs::symlink_metadata(s.loc.real_path(p)).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o444);
            assert_eq!(meta.mtime(), 1);
        }
        assert!(stage_dirs(&s).is_empty());
        drop(locks);
        assert!(s.try_lock_paths(&paths).unwrap().is_some(), "released");
    }

    #[test]
    fn a_built_output_whose_content_address_does_not_give_its_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tmp.path().join("f");
        fs::write(&src, b"pwned\n").unwrap();
        let staged = s.stage_path(&src).unwrap();
        let hash = HashAlgo::Sha256.digest(b"pwned\n");
        // A fixed-output derivation that wrote another derivation's path.
        let victim = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x").unwrap();
        let info = ValidPathInfo {
            path: victim.clone(),
            deriver: None,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: true,
            signatures: BTreeSet::new(),
            ca: Some(ContentAddress::Fixed {
                method: FileIngestionMethod::Flat,
                hash,
            }),
        };
        let locks = s.lock_paths(&BTreeSet::from([victim.clone()])).unwrap();
        let err = s.register_built_outputs(&locks, vec![(staged, info)]);
        assert!(
            matches!(err, Err(StoreError::CaPathMismatch { .. })),
            "{err:?}"
        );
        assert!(!s.is_valid(&victim).unwrap());
        assert!(!s.loc.real_path(&victim).exists());
        assert!(stage_dirs(&s).is_empty());
    }

    /// A staged file with no references, ready for `commit_staged_batch`.
    fn staged_leaf(s: &LocalStore, dir: &Path, name: &str) -> (StagedPath, ValidPathInfo) {
        let src = dir.join(name);
        fs::write(&src, name).unwrap();
        let staged = s.stage_path(&src).unwrap();
        let info = ValidPathInfo {
            path: StorePath::from_base_name(&format!("{}-{name}", "1".repeat(32))).unwrap(),
            deriver: None,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        };
        (staged, info)
    }

    fn lock_files(s: &LocalStore) -> BTreeSet<String> {
        fs::read_dir(s.location().real_store_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".lock") && !n.starts_with(".sandoff-stage"))
            .collect()
    }

    #[test]
    fn a_started_commit_is_in_place_but_not_valid_until_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let a = staged_leaf(&s, tmp.path(), "a");
        let b = staged_leaf(&s, tmp.path(), "b");
        let (pa, pb) = (a.1.path.clone(), b.1.path.clone());
        let pending = s.start_commit_batch(vec![a]).unwrap();
        assert!(s.loc.real_path(&pa).exists(), "moved into place");
        assert!(!s.is_valid(&pa).unwrap(), "valid only once flushed");
        let held = BTreeSet::from([pa.clone()]);
        assert!(
            s.try_lock_paths(&held).unwrap().is_none(),
            "locked meanwhile"
        );
        s.finish_commit_batch(pending).unwrap();
        assert!(s.is_valid(&pa).unwrap());
        assert!(s.try_lock_paths(&held).unwrap().is_some(), "released");
        // Dropped unfinished (the import failed before it got there): its
        // files go, nothing is registered, the lock is let go.
        let pending = s.start_commit_batch(vec![b]).unwrap();
        assert!(s.loc.real_path(&pb).exists());
        drop(pending);
        assert!(!s.loc.real_path(&pb).exists(), "no unregistered copy left");
        assert!(!s.is_valid(&pb).unwrap());
        assert!(s.try_lock_paths(&BTreeSet::from([pb])).unwrap().is_some());
        assert!(stage_dirs(&s).is_empty());
        assert!(s.is_valid(&pa).unwrap(), "the finished one stays");
    }

    #[test]
    fn a_keeper_holds_batch_locks_until_it_is_done_and_no_longer() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let a = staged_leaf(&s, tmp.path(), "a");
        let b = staged_leaf(&s, tmp.path(), "b");
        let (pa, pb) = (a.1.path.clone(), b.1.path.clone());
        // Without a keeper a batch's lock files go with the batch.
        s.commit_staged_batch(vec![a]).unwrap();
        assert!(lock_files(&s).is_empty());
        let keeper = s.keep_batch_locks();
        // A second keeper leaves the keeping to the first.
        assert!(s.keep_batch_locks().finish().is_empty());
        s.commit_staged_batch(vec![b]).unwrap();
        assert!(s.is_valid(&pb).unwrap(), "valid before the locks go");
        assert_eq!(
            lock_files(&s),
            BTreeSet::from([format!("{}.lock", pb.base_name())])
        );
        let both = BTreeSet::from([pa.clone(), pb.clone()]);
        assert!(s.try_lock_paths(&both).unwrap().is_none(), "still held");
        let kept = keeper.finish();
        assert_eq!(kept.len(), 1);
        // Nothing more is kept once the keeper is done.
        let c = staged_leaf(&s, tmp.path(), "c");
        s.commit_staged_batch(vec![c]).unwrap();
        assert_eq!(lock_files(&s).len(), 1);
        drop(kept);
        assert!(lock_files(&s).is_empty());
        assert!(s.try_lock_paths(&both).unwrap().is_some());
        // Dropped rather than finished (an error on the way), it lets go too.
        let keeper = s.keep_batch_locks();
        let d = staged_leaf(&s, tmp.path(), "d");
        s.commit_staged_batch(vec![d]).unwrap();
        assert_eq!(lock_files(&s).len(), 1);
        drop(keeper);
        assert!(lock_files(&s).is_empty());
    }

    #[test]
    fn kept_locks_are_let_go_before_waiting_for_another_holder() {
        // Another holder takes `b` and then waits for `a`, in sorted order;
        // a keeper holding `a` from an earlier batch must not then wait for
        // `b`, or neither would ever go on.
        let tmp = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(tmp.path()));
        let a = staged_leaf(&s, tmp.path(), "a");
        let b = staged_leaf(&s, tmp.path(), "b");
        let (pa, pb) = (a.1.path.clone(), b.1.path.clone());
        let keeper = s.keep_batch_locks();
        s.commit_staged_batch(vec![a]).unwrap();
        let held_b = s.lock_paths(&BTreeSet::from([pb.clone()])).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = {
            let s = s.clone();
            std::thread::spawn(move || {
                let held_a = s.lock_paths(&BTreeSet::from([pa])).unwrap();
                drop(held_b);
                drop(held_a);
            })
        };
        let committer = {
            let s = s.clone();
            std::thread::spawn(move || {
                tx.send(s.commit_staged_batch(vec![b]).is_ok()).unwrap();
            })
        };
        let done = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(done, Ok(true), "the second batch did not get its lock");
        committer.join().unwrap();
        other.join().unwrap();
        assert!(s.is_valid(&pb).unwrap());
        // The first batch's lock went before the wait, the second's is kept.
        assert_eq!(keeper.finish().len(), 1);
        assert!(lock_files(&s).is_empty());
    }

    #[test]
    fn built_outputs_need_their_locks_and_valid_references_or_nothing_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let mut pair = built_pair(&s, tmp.path());
        let paths: BTreeSet<StorePath> = pair.iter().map(|(_, i)| i.path.clone()).collect();
        let one = BTreeSet::from([pair[0].1.path.clone()]);
        let partial = s.lock_paths(&one).unwrap();
        let err = s.register_built_outputs(&partial, built_pair(&s, tmp.path()));
        assert!(matches!(err, Err(StoreError::NotLocked { .. })), "{err:?}");
        drop(partial);
        let locks = s.lock_paths(&paths).unwrap();
        pair[1]
            .1
            .references
            .insert(StorePath::from_base_name("00000000000000000000000000000000-gone").unwrap());
        let err = s.register_built_outputs(&locks, pair);
        assert!(
            matches!(err, Err(StoreError::InvalidReference { .. })),
            "{err:?}"
        );
        for p in &paths {
            assert!(!s.is_valid(p).unwrap());
            assert!(!s.loc.real_path(p).exists());
        }
        assert!(stage_dirs(&s).is_empty());
    }

    #[test]
    fn add_path_registers_a_canonical_read_only_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tree(tmp.path());
        let p = s
            .add_path(&src, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap();
        let info = s.query_path_info(&p).unwrap().unwrap();
        let (h, n) = nar::hash_path(&src).unwrap();
        assert_eq!((info.nar_hash.clone(), info.nar_size), (h.clone(), n));
        assert_eq!(
            info.ca,
            Some(ContentAddress::Fixed {
                method: FileIngestionMethod::Recursive,
                hash: h
            })
        );
        let real = s.location().real_path(&p);
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&real), 0o555);
        assert_eq!(mode(&real.join("a.txt")), 0o444);
        assert_eq!(mode(&real.join("run.sh")), 0o555);
        assert_eq!(
            fs::symlink_metadata(real.join("sub/empty"))
                .unwrap()
                .mtime(),
            1
        );
        assert_eq!(fs::symlink_metadata(real.join("link")).unwrap().mtime(), 1);
        assert!(stage_dirs(&s).is_empty());
        // Adding again is a no-op that returns the same path.
        assert_eq!(
            s.add_path(&src, FileIngestionMethod::Recursive, HashAlgo::Sha256)
                .unwrap(),
            p
        );
        assert!(stage_dirs(&s).is_empty());
    }

    #[test]
    fn add_fixed_flat_and_recursive_match_nix_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tree(tmp.path());
        let p = s
            .add_path(
                &src.join("a.txt"),
                FileIngestionMethod::Flat,
                HashAlgo::Sha256,
            )
            .unwrap();
        assert_eq!(p.base_name(), "fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt");
        let info = s.query_path_info(&p).unwrap().unwrap();
        assert_eq!(
            info.ca.unwrap().to_string(),
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
        );
        assert!(matches!(
            s.add_path(&src, FileIngestionMethod::Flat, HashAlgo::Sha256),
            Err(StoreError::NotRegularFile { .. })
        ));
        let r = s
            .add_path(&src, FileIngestionMethod::Recursive, HashAlgo::Sha1)
            .unwrap();
        assert!(matches!(
            s.query_path_info(&r).unwrap().unwrap().ca,
            Some(ContentAddress::Fixed { .. })
        ));
    }

    #[test]
    fn add_text_records_references_and_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let foo = s
            .add_text("foo", b"bar", &BTreeSet::new(), &BTreeMap::new())
            .unwrap();
        assert_eq!(foo.base_name(), "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
        let out = StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").unwrap();
        let outputs: BTreeMap<String, StorePath> = [("out".to_owned(), out)].into();
        let drv = s
            .add_text("x.drv", b"Derive()", &[foo.clone()].into(), &outputs)
            .unwrap();
        assert_eq!(s.derivation_outputs(&drv).unwrap(), outputs);
        assert_eq!(
            s.query_path_info(&drv).unwrap().unwrap().references,
            [foo.clone()].into()
        );
        assert_eq!(
            s.closure(&[drv.clone()].into()).unwrap(),
            [drv.clone(), foo.clone()].into()
        );
        assert_eq!(
            s.topo_sort(&[drv.clone(), foo.clone()].into()).unwrap(),
            vec![foo, drv]
        );
    }

    #[test]
    fn refuses_invalid_reference_and_registers_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let missing = StorePath::from_base_name("00bgd045z0d4icpbc2yyz4gx48ak44la-gone").unwrap();
        let err = s
            .add_text("t", b"x", &[missing].into(), &BTreeMap::new())
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidReference { .. }), "{err}");
        assert!(s.query_valid_paths().unwrap().is_empty());
        assert!(stage_dirs(&s).is_empty());
        assert_eq!(
            fs::read_dir(s.location().real_store_dir()).unwrap().count(),
            0
        );
    }

    #[test]
    fn hash_mismatch_removes_staged_files_and_leaves_no_target() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tree(tmp.path());
        let nar = nar_of(&src);
        let (h, n) = nar::hash_path(&src).unwrap();
        let path = s
            .location()
            .dir
            .make_fixed_output_path(FileIngestionMethod::Recursive, &h, "d", [], false)
            .unwrap();
        let mut info = ValidPathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: HashAlgo::Sha256.digest(b"wrong"),
            nar_size: n,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        };
        let err = s.add_nar(&info, &mut nar.as_slice()).unwrap_err();
        assert!(matches!(err, StoreError::NarHashMismatch { .. }), "{err}");
        info.nar_hash = h;
        info.nar_size = n + 8;
        assert!(matches!(
            s.add_nar(&info, &mut nar.as_slice()),
            Err(StoreError::NarSizeMismatch { .. })
        ));
        assert!(!s.location().real_path(&path).exists());
        assert!(stage_dirs(&s).is_empty());
        assert!(!s.is_valid(&path).unwrap());
        info.nar_size = n;
        s.add_nar(&info, &mut nar.as_slice()).unwrap();
        assert!(s.is_valid(&path).unwrap());
    }

    #[test]
    fn refuses_content_address_that_does_not_match() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tree(tmp.path());
        let (h, n) = nar::hash_path(&src).unwrap();
        let wrong = HashAlgo::Sha256.digest(b"other");
        let path = s
            .location()
            .dir
            .make_fixed_output_path(FileIngestionMethod::Recursive, &wrong, "d", [], false)
            .unwrap();
        let info = ValidPathInfo {
            path,
            deriver: None,
            nar_hash: h,
            nar_size: n,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: Some(ContentAddress::Fixed {
                method: FileIngestionMethod::Recursive,
                hash: wrong,
            }),
        };
        let err = s.add_nar(&info, &mut nar_of(&src).as_slice()).unwrap_err();
        assert!(matches!(err, StoreError::CaMismatch { .. }), "{err}");
    }

    #[test]
    fn topo_sort_refuses_cycles_but_allows_self_references() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let reg = s.registry();
        let mk = |name: &str, refs: &[&StorePath]| ValidPathInfo {
            path: StorePath::from_base_name(name).unwrap(),
            deriver: None,
            nar_hash: HashAlgo::Sha256.digest(name.as_bytes()),
            nar_size: 8,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            registration_time: 1,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        };
        let a = mk("00bgd045z0d4icpbc2yyz4gx48ak44la-a", &[]);
        let a_path = a.path.clone();
        let mut b = mk("q6dq4cjk6aw4cz1whdksas0153xcyk1b-b", &[&a_path]);
        b.references.insert(b.path.clone());
        reg.register(&a, &BTreeMap::new()).unwrap();
        reg.register(&b, &BTreeMap::new()).unwrap();
        let both: BTreeSet<StorePath> = [a.path.clone(), b.path.clone()].into();
        assert_eq!(
            s.topo_sort(&both).unwrap(),
            vec![a.path.clone(), b.path.clone()]
        );
        // c sorts first by name but refers to b: it comes last, with the
        // same order and records from the one-read variant.
        let c = mk("03bgd045z0d4icpbc2yyz4gx48ak44la-c", &[&b.path]);
        reg.register(&c, &BTreeMap::new()).unwrap();
        let three: BTreeSet<StorePath> = [a.path.clone(), b.path.clone(), c.path.clone()].into();
        let order = s.topo_sort(&three).unwrap();
        assert_eq!(order, vec![a.path.clone(), b.path.clone(), c.path.clone()]);
        let infos = s.path_infos_in_order(&three).unwrap();
        assert_eq!(
            infos.iter().map(|i| i.path.clone()).collect::<Vec<_>>(),
            order
        );
        assert_eq!(infos[1], s.query_path_info(&b.path).unwrap().unwrap());
        let unknown: BTreeSet<StorePath> = [
            a.path.clone(),
            mk("2qgfy89v28340cr9d9z471zfi5iczv5l-x", &[]).path,
        ]
        .into();
        assert!(matches!(
            s.path_infos_in_order(&unknown),
            Err(StoreError::NotValid { .. })
        ));
        // A cycle can only be made behind the registry's back (Nix forbids it too).
        let conn = rusqlite::Connection::open(reg.db_path()).unwrap();
        conn.execute(
            "insert into Refs (referrer, reference) values ((select id from ValidPaths where path like '%-a'), (select id from ValidPaths where path like '%-b'))",
            [],
        )
        .unwrap();
        assert!(matches!(s.topo_sort(&both), Err(StoreError::Cycle { .. })));
        assert!(matches!(
            s.path_infos_in_order(&both),
            Err(StoreError::Cycle { .. })
        ));
    }

    #[test]
    fn a_staged_copy_replaces_whatever_leftover_is_at_its_place() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().expect("tempdir");
        let staged_dir = |name: &str| {
            let p = tmp.path().join(name);
            fs::create_dir(&p).expect("mkdir");
            fs::write(p.join("new"), "new").expect("write");
            p
        };
        let real = tmp.path().join("real");
        // Nothing there.
        move_into_place(&staged_dir("a"), &real).expect("move");
        assert!(real.join("new").exists());
        // A read-only tree there, as a store path's.
        fs::write(real.join("old"), "old").expect("write");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o555)).expect("chmod");
        move_into_place(&staged_dir("b"), &real).expect("move over a tree");
        assert!(real.join("new").exists() && !real.join("old").exists());
        // A file, and a symbolic link to a directory elsewhere.
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("keep"), "x").expect("write");
        for leftover in ["file", "link"] {
            remove_tree(&real).expect("clean");
            match leftover {
                "file" => fs::write(&real, "old").expect("write"),
                _ => symlink(&outside, &real).expect("symlink"),
            }
            move_into_place(&staged_dir(leftover), &real).expect("move over a leftover");
            assert!(real.join("new").exists(), "{leftover}");
        }
        assert!(outside.join("keep").exists(), "the link was not followed");
        // A file over a file.
        let file = tmp.path().join("f");
        fs::write(&file, "new").expect("write");
        let real_file = tmp.path().join("real-file");
        fs::write(&real_file, "old").expect("write");
        move_into_place(&file, &real_file).expect("move");
        assert_eq!(fs::read_to_string(&real_file).expect("read"), "new");
    }

    #[test]
    fn removes_stale_stages_but_not_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let src = tree(tmp.path());
        let live = s.stage_nar(&mut nar_of(&src).as_slice()).unwrap();
        let dir = s.location().real_store_dir();
        fs::create_dir_all(dir.join(".sandoff-stage-dead/x")).unwrap();
        fs::set_permissions(
            dir.join(".sandoff-stage-dead"),
            fs::Permissions::from_mode(0o555),
        )
        .unwrap();
        fs::write(dir.join(".sandoff-stage-orphan.lock"), "").unwrap();
        assert_eq!(s.remove_stale_stages().unwrap(), 2);
        assert!(live.tmp.join("sub/empty").is_file());
        assert_eq!(stage_dirs(&s), vec![live.tmp.clone()]);
        // One lock for every copy this store stages, held while it is open.
        let name = live.tmp.file_name().unwrap().to_str().unwrap();
        let owner = name.rsplit_once('-').unwrap().0;
        let lock = dir.join(format!("{owner}.lock"));
        assert!(lock.exists());
        let second = s.stage_nar(&mut nar_of(&src).as_slice()).unwrap();
        assert!(second
            .tmp
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(owner));
        assert_eq!(s.remove_stale_stages().unwrap(), 0, "live copies are kept");
        drop((live, second));
        assert!(stage_dirs(&s).is_empty());
        assert!(!lock.exists(), "the lock goes with the last copy");
    }

    #[test]
    fn registers_files_already_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let foo = s
            .add_text("foo", b"bar", &BTreeSet::new(), &BTreeMap::new())
            .unwrap();
        let out = StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").unwrap();
        let real = s.location().real_path(&out);
        fs::create_dir(&real).unwrap();
        fs::write(real.join("bin"), s.location().logical(&foo)).unwrap();
        let (nar_hash, nar_size) = nar::hash_path(&real).unwrap();
        let mut info = ValidPathInfo {
            path: out.clone(),
            deriver: None,
            nar_hash: HashAlgo::Sha256.digest(b"wrong"),
            nar_size,
            references: [foo.clone()].into(),
            registration_time: 0,
            ultimate: true,
            signatures: BTreeSet::new(),
            ca: None,
        };
        let err = s.register_valid_path(&info, &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, StoreError::NarHashMismatch { .. }), "{err}");
        assert!(real.join("bin").is_file());
        assert!(!s.is_valid(&out).unwrap());
        info.nar_hash = nar_hash;
        s.register_valid_path(&info, &BTreeMap::new()).unwrap();
        let got = s.query_path_info(&out).unwrap().unwrap();
        assert!(got.ultimate && got.registration_time > 0);
        assert_eq!(got.references, [foo].into());
        let mode = fs::metadata(real.join("bin")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o444);
    }

    #[test]
    fn canonicalise_refuses_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(
            canonicalise_path(tmp.path()),
            Err(StoreError::UnsupportedFileType { .. })
        ));
    }
}
