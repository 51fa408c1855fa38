//! The NAR restorer: [`restore`], [`parse`] with a visitor that creates the tree.

use std::ffi::OsStr;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, Mode, OFlags, CWD};

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
pub(super) struct Restorer<'d> {
    dest: &'d Path,
    dirs: Vec<OwnedFd>,
    file: Option<File>,
    /// The path of the entry being created, for messages.
    path: PathBuf,
    /// Whether `dest` itself was created (and so must be removed on failure).
    created: bool,
}

impl<'d> Restorer<'d> {
    pub(super) fn new(dest: &'d Path) -> Restorer<'d> {
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
