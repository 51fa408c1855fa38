//! The NAR restorer: [`restore`], [`parse`] with a visitor that creates the tree.

use std::ffi::OsStr;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps, CWD, UTIME_OMIT};

use super::*;

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

/// [`restore`] with a store path's metadata made as each node is written:
/// regular files `r--r--r--` (`r-xr-xr-x` when executable), directories
/// `r-xr-xr-x`, every node's modification time `mtime` (symlinks' too), set
/// through the descriptors the restorer holds anyway, instead of by a
/// second walk over paths afterwards (a fifth of the system calls of
/// importing a small path).
///
/// Returns whether the tree is canonical: false when its root is not owned
/// by this process's effective user and group (a set-group-ID parent gives
/// new files the parent's group), which only a walk with `chown` mends.
pub fn restore_canonical(source: &mut dyn Read, dest: &Path, mtime: i64) -> Result<bool, NarError> {
    let mut r = Restorer::new(dest);
    r.canonical = Some(Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    });
    let res = restore_with(source, dest, r);
    res.map(|(_, owned)| owned)
}

fn restore_counted(source: &mut dyn Read, dest: &Path) -> Result<u64, NarError> {
    restore_with(source, dest, Restorer::new(dest)).map(|(size, _)| size)
}

/// Runs `r` over one NAR: its size, and whether the root is owned by this
/// process's effective user and group.
fn restore_with(
    source: &mut dyn Read,
    dest: &Path,
    mut r: Restorer<'_>,
) -> Result<(u64, bool), NarError> {
    // No look before: creating the root fails with EEXIST if anything is
    // at `dest` (a dangling symlink too), which `make` reports as
    // `DestExists`. A lookup that fails in a large store directory was 3%
    // of the samples of importing 2,000 small paths.
    let res = parse(source, &mut r);
    let (created, owned) = (r.created, r.owned);
    drop(r);
    if res.is_err() && created {
        remove_partial(dest);
    }
    res.map(|size| (size, owned))
}

/// Best-effort removal of a partly restored tree.
fn remove_partial(dest: &Path) {
    if let Err(e) = remove_tree(dest) {
        tracing::warn!("could not remove partly restored '{}': {e}", dest.display());
    }
}

/// Removes the file or tree at `path` (nothing there is fine), making each
/// directory writable first, as a store path's are not. Symlinks inside are
/// removed, never followed.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        if meta.permissions().mode() & 0o700 != 0o700 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        }
        for entry in std::fs::read_dir(path)? {
            remove_tree(&entry?.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// The filesystem side of [`restore`]. It holds a descriptor for each open
/// directory it created and creates children relative to it, so no path is
/// resolved through anything but directories it made itself.
pub(super) struct Restorer<'d> {
    dest: &'d Path,
    dirs: Vec<OwnedFd>,
    file: Option<File>,
    /// The path of the entry being created, for messages.
    path: PathBuf,
    /// Whether `dest` itself was created (and so must be removed on failure).
    created: bool,
    /// Store metadata to give each node as it is made (modification time).
    canonical: Option<Timespec>,
    /// Whether the root is owned by this process's effective user and
    /// group (checked in canonical mode only; true otherwise).
    owned: bool,
}

impl<'d> Restorer<'d> {
    pub(super) fn new(dest: &'d Path) -> Restorer<'d> {
        Restorer {
            dest,
            dirs: Vec::new(),
            file: None,
            path: dest.to_owned(),
            created: false,
            canonical: None,
            owned: true,
        }
    }

    /// The times a canonical node gets: access time untouched.
    fn times(mtime: Timespec) -> Timestamps {
        Timestamps {
            last_access: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_OMIT,
            },
            last_modification: mtime,
        }
    }

    /// In canonical mode, notes whether the root (just made, `st` its
    /// status) belongs to this process's effective user and group.
    fn check_root_owner(
        &mut self,
        is_root: bool,
        st: impl FnOnce() -> rustix::io::Result<rfs::Stat>,
    ) -> Result<(), NarError> {
        if is_root && self.canonical.is_some() {
            let st = st().map_err(|e| self.err(e))?;
            self.owned = st.st_uid == nix::unistd::geteuid().as_raw()
                && st.st_gid == nix::unistd::getegid().as_raw();
        }
        Ok(())
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
            // Something is at `dest` already, which is not ours to remove.
            Err(rustix::io::Errno::EXIST) if name.is_none() => Err(NarError::DestExists {
                path: self.dest.to_owned(),
            }),
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
        self.check_root_owner(name.is_none(), || rfs::fstat(&fd))?;
        self.dirs.push(fd);
        Ok(())
    }

    fn directory_end(&mut self) -> Result<(), NarError> {
        if let (Some(mtime), Some(fd)) = (self.canonical, self.dirs.last()) {
            // Read-only once full; its time set after its last entry.
            rfs::fchmod(fd, Mode::from_raw_mode(0o555))
                .and_then(|()| rfs::futimens(fd, &Self::times(mtime)))
                .map_err(|e| self.err(e))?;
        }
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
        if self.canonical.is_some() {
            self.check_root_owner(name.is_none(), || rfs::fstat(&fd))?;
            // The descriptor stays writable whatever the mode; set here,
            // not at creation, so that no umask can take a bit away.
            let mode = if executable { 0o555 } else { 0o444 };
            rfs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| self.err(e))?;
        } else if executable {
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
        if let (Some(mtime), Some(f)) = (self.canonical, self.file.as_ref()) {
            // After the last write, which would set it again.
            rfs::futimens(f, &Self::times(mtime)).map_err(|e| self.err(e))?;
        }
        self.file = None;
        self.leave();
        Ok(())
    }

    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        self.make(name, |dir, path| rfs::symlinkat(target, dir, path))?;
        if let Some(mtime) = self.canonical {
            let nofollow = AtFlags::SYMLINK_NOFOLLOW;
            let res = match self.base(name) {
                Some((dir, path)) => rfs::utimensat(dir, path, &Self::times(mtime), nofollow),
                None => Err(rustix::io::Errno::INVAL),
            };
            res.map_err(|e| self.err(e))?;
            let dest = self.dest;
            self.check_root_owner(name.is_none(), || rfs::statat(CWD, dest, nofollow))?;
        }
        self.leave();
        Ok(())
    }
}
