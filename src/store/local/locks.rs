//! Per-path locks (`<path>.lock`, Nix's `PathLocks` protocol), and keeping
//! those of an import's batches until its reply is out.
//!
//! # Why an import keeps its locks
//! Releasing a lock removes its file, as Nix does. On ext4 without a journal
//! every new inode skips each inode freed in the last minute (six while the
//! inode table block is dirty), looking each one up in the buffer cache. An
//! import that created and removed one lock file per path made every later
//! creation of that import walk past all the earlier lock files: quadratic
//! in the paths, and most of the host's time on 2,000 small paths (see
//! `bench/offload/README.md`). With a [`LockKeeper`], the batches' locks are
//! held until the caller has answered and released then (`sandoff serve`
//! does it on another thread), so that the import itself frees no inode and
//! nobody waits for the removals.
//!
//! Holding locks across batches breaks the rule that keeps two lockers from
//! deadlocking (take them in sorted order), so while any are kept a batch's
//! locks are only tried; if one is taken, the kept locks are let go before
//! waiting. There are at most [`LockKeeper`]'s limit of them (each is an
//! open file), and they go when it is dropped, on any error.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::resource::{getrlimit, Resource};

use super::{io_err, sys_err, StoreError};
use crate::store::StorePath;

/// Exclusive locks on a set of store paths, from [`LocalStore::lock_paths`];
/// released when dropped.
///
/// [`LocalStore::lock_paths`]: super::LocalStore::lock_paths
pub struct PathLocks {
    pub(super) locks: Vec<PathLock>,
    pub(super) paths: BTreeSet<StorePath>,
}

impl PathLocks {
    /// The locked paths.
    pub fn paths(&self) -> &BTreeSet<StorePath> {
        &self.paths
    }
}

impl std::fmt::Debug for PathLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathLocks")
            .field("paths", &self.paths)
            .finish()
    }
}

/// An exclusive lock on `<path>.lock`, with Nix's protocol for lock files
/// that a previous holder deleted: the holder unlinks the file and writes one
/// byte to it before unlocking, so a waiter that wakes up on a non-empty file
/// knows it locked a dead inode and retries.
pub(super) struct PathLock {
    path: PathBuf,
    file: Flock<File>,
}

impl PathLock {
    pub(super) fn acquire(path: &Path) -> Result<PathLock, StoreError> {
        PathLock::lock(path, FlockArg::LockExclusive)?
            .ok_or_else(|| sys_err("locking", path)(Errno::EWOULDBLOCK))
    }

    /// `None` when someone else holds the lock.
    pub(super) fn try_acquire(path: &Path) -> Result<Option<PathLock>, StoreError> {
        PathLock::lock(path, FlockArg::LockExclusiveNonblock)
    }

    fn lock(path: &Path, how: FlockArg) -> Result<Option<PathLock>, StoreError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        loop {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
                .map_err(io_err("opening lock", &lock_path))?;
            let file = match Flock::lock(file, how) {
                Ok(f) => f,
                Err((_, Errno::EWOULDBLOCK)) if how == FlockArg::LockExclusiveNonblock => {
                    return Ok(None)
                }
                Err((_, e)) => return Err(sys_err("locking", &lock_path)(e)),
            };
            if file
                .metadata()
                .map_err(io_err("reading lock", &lock_path))?
                .len()
                == 0
            {
                return Ok(Some(PathLock {
                    path: lock_path,
                    file,
                }));
            }
            tracing::debug!(path = %lock_path.display(), "lock file was deleted by its holder; retrying");
        }
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove lock file: {e}");
        }
        if let Err(e) = (&*self.file).write_all(b"d") {
            tracing::warn!(path = %self.path.display(), "cannot mark lock file stale: {e}");
        }
    }
}

/// Locks that a [`LockKeeper`] kept; dropping this releases them.
#[derive(Default)]
pub struct KeptLocks {
    held: Vec<PathLocks>,
    count: usize,
}

impl KeptLocks {
    /// How many path locks are held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl std::fmt::Debug for KeptLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptLocks")
            .field("count", &self.count)
            .finish()
    }
}

/// The keeping state of a store: `None` while no keeper is active.
#[derive(Default)]
pub(super) struct Keeping(Mutex<Option<Kept>>);

pub(super) struct Kept {
    locks: KeptLocks,
    /// At most this many path locks are kept: each is an open file.
    limit: usize,
}

impl Keeping {
    fn state(&self) -> MutexGuard<'_, Option<Kept>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts keeping at most `limit` locks; false if a keeper is active
    /// already.
    fn start(&self, limit: usize) -> bool {
        let mut state = self.state();
        if state.is_some() {
            return false;
        }
        *state = Some(Kept {
            locks: KeptLocks::default(),
            limit,
        });
        true
    }

    /// Stops keeping; what was kept.
    fn stop(&self) -> KeptLocks {
        self.state().take().map(|k| k.locks).unwrap_or_default()
    }

    /// Whether any lock is kept now.
    pub(super) fn holding(&self) -> bool {
        self.state().as_ref().is_some_and(|k| !k.locks.is_empty())
    }

    /// Releases what is kept now (keeping goes on, if it was on).
    pub(super) fn release_now(&self) {
        let released = self.state().as_mut().map(|k| std::mem::take(&mut k.locks));
        drop(released);
    }

    /// Keeps `locks` if a keeper is active (releasing the older ones first
    /// if there would be too many), or releases them.
    pub(super) fn keep_or_release(&self, locks: PathLocks) {
        let mut state = self.state();
        let Some(kept) = state.as_mut() else {
            drop(state);
            drop(locks);
            return;
        };
        let n = locks.locks.len();
        let older = if kept.locks.count + n > kept.limit {
            std::mem::take(&mut kept.locks)
        } else {
            KeptLocks::default()
        };
        if n <= kept.limit {
            kept.locks.count += n;
            kept.locks.held.push(locks);
            drop(state);
        } else {
            drop(state);
            drop(locks);
        }
        // Released outside the mutex: removing files takes a while.
        drop(older);
    }
}

/// How many path locks a keeper may hold: half of the open files this
/// process may have, leaving the rest to everything else it does.
fn keep_limit() -> usize {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => usize::try_from(soft / 2)
            .unwrap_or(usize::MAX)
            .saturating_sub(64)
            .min(1 << 16),
        Err(_) => 0,
    }
}

/// Keeps the locks of batches that [`LocalStore::commit_staged_batch`]
/// commits while it lives (see the module's documentation). From
/// [`LocalStore::keep_batch_locks`]; [`LockKeeper::finish`] hands them over,
/// dropping it releases them.
///
/// [`LocalStore::commit_staged_batch`]: super::LocalStore::commit_staged_batch
/// [`LocalStore::keep_batch_locks`]: super::LocalStore::keep_batch_locks
pub struct LockKeeper<'a> {
    keeping: &'a Keeping,
    /// False for a keeper made while another was active: the outer one
    /// keeps, this one does nothing.
    active: bool,
}

impl<'a> LockKeeper<'a> {
    pub(super) fn new(keeping: &'a Keeping) -> LockKeeper<'a> {
        let active = keeping.start(keep_limit());
        LockKeeper { keeping, active }
    }

    /// Stops keeping and hands over what was kept.
    pub fn finish(mut self) -> KeptLocks {
        self.take()
    }

    fn take(&mut self) -> KeptLocks {
        if std::mem::take(&mut self.active) {
            self.keeping.stop()
        } else {
            KeptLocks::default()
        }
    }
}

impl Drop for LockKeeper<'_> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks(dir: &Path, names: &[&str]) -> PathLocks {
        PathLocks {
            locks: names
                .iter()
                .map(|n| PathLock::acquire(&dir.join(n)).unwrap())
                .collect(),
            paths: BTreeSet::new(),
        }
    }

    fn lock_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn at_most_the_limit_is_kept_the_older_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let keeping = Keeping::default();
        assert!(keeping.start(3));
        assert!(!keeping.start(3), "one keeper at a time");
        keeping.keep_or_release(locks(dir, &["a", "b"]));
        assert!(keeping.holding());
        // Two more would make four: the older two go.
        keeping.keep_or_release(locks(dir, &["c", "d"]));
        assert_eq!(lock_files(dir), ["c.lock", "d.lock"]);
        // More than the limit at once is not kept at all.
        keeping.keep_or_release(locks(dir, &["e", "f", "g", "h"]));
        assert!(!keeping.holding());
        assert!(lock_files(dir).is_empty());
        keeping.keep_or_release(locks(dir, &["i"]));
        let kept = keeping.stop();
        assert_eq!(kept.len(), 1);
        // Not keeping: released at once.
        keeping.keep_or_release(locks(dir, &["j"]));
        assert_eq!(lock_files(dir), ["i.lock"]);
        drop(kept);
        assert!(lock_files(dir).is_empty());
    }
}
