//! Host directories for one build, laid out as hardened by the CVE fixes in
//! Nix and Guix (CVE-2021-27851, CVE-2024-38531, CVE-2025-52991):
//!
//! ```text
//! <top>/                           root:root 0700: nobody else can reach inside
//!     build/                       <build uid>:<build gid> 0700, bound at /tmp/<name>
//!     store/                       root:<build gid> 01775, bound at the store dir;
//!                                  the builder creates its outputs here
//!     root/                        empty; the sandbox's root tmpfs is mounted on it
//!                                  inside the build's own mount namespace
//! ```
//!
//! The root mount point is a sibling of the other two, never their ancestor:
//! the tmpfs would otherwise hide them from the bind mounts.
//!
//! Two ways to get them: [`HostDirs::create`], a fresh set
//! (`<parent>/sandoff-build-XXXXXX`), and [`HostDirs::for_user`], the one
//! set of a build user (`<parent>/uid-<uid>/sandoff-build`), reused by each
//! build of that user under its lease: emptied after the build
//! ([`HostDirs::clear`]) and checked, emptied of what a crash left and given
//! its owners and modes again before the next. A local build otherwise made
//! and removed six directories and a lock file; on ext4 without a journal
//! every new inode skips each one freed in the last minute, so a run of
//! small builds slowed itself down as it went. A kept build's set
//! ([`HostDirs::keep`]) moves out of the user's place to one of its own.

use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::plan::{BuildUser, SandboxDirs};
use super::SandboxError;

/// The host directories of one build; see the module docs.
#[derive(Debug)]
pub struct HostDirs {
    top: PathBuf,
    dirs: SandboxDirs,
}

fn host_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SandboxError + 'a {
    move |source| SandboxError::HostDir {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl HostDirs {
    /// Creates a fresh set under `parent` (which must exist) for `user`.
    pub fn create(parent: &Path, user: &BuildUser) -> Result<HostDirs, SandboxError> {
        let top = tempfile::Builder::new()
            .prefix("sandoff-build-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(host_err("create build directory in", parent))?
            .keep();
        HostDirs::make(top, user)
    }

    /// Makes `build`, `store` and `root` in `top` (which exists) for
    /// `user`.
    fn make(top: PathBuf, user: &BuildUser) -> Result<HostDirs, SandboxError> {
        let dirs = HostDirs::at(top);
        make_dir(&dirs.dirs.build, 0o700)?;
        make_dir(&dirs.dirs.store, 0o1775)?;
        make_dir(&dirs.dirs.root, 0o700)?;
        dirs.set_owners(user)?;
        Ok(dirs)
    }

    /// The set of `user` under `parent`, `<parent>/uid-<uid>/sandoff-build`,
    /// ready for a build: created if missing; else checked (real
    /// directories, root's but `build`), emptied of anything an earlier
    /// build of this user left (a crash, or sandoff killed) and given its
    /// owners and modes again, as the builder may have changed those of
    /// `build`. Anything not as expected is removed and made again. The
    /// caller must hold `user`'s lease: nothing else may use the set
    /// meanwhile.
    pub fn for_user(parent: &Path, user: &BuildUser) -> Result<HostDirs, SandboxError> {
        let slot = user_slot(parent, user.uid());
        let dirs = HostDirs::at(slot.join(USER_TOP));
        match dirs.reusable(&slot) {
            Ok(true) => {
                dirs.clear()?;
                dirs.set_owners(user)?;
                return Ok(dirs);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(dir = %slot.display(), "making the build directory again: {e}")
            }
        }
        match std::fs::symlink_metadata(&slot) {
            Ok(_) => remove_any(&slot).map_err(host_err("remove", &slot))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(host_err("inspect", &slot)(e)),
        }
        std::fs::create_dir_all(parent).map_err(host_err("create", parent))?;
        make_dir(&slot, 0o755)?;
        make_dir(&dirs.top, 0o700)?;
        HostDirs::make(dirs.top, user)
    }

    /// Whether the set at `slot` is as [`HostDirs::for_user`] leaves it:
    /// real directories, root's (`build` excepted), `root` empty.
    fn reusable(&self, slot: &Path) -> std::io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::symlink_metadata(slot) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let root_dir = |m: &std::fs::Metadata| m.file_type().is_dir() && m.uid() == 0;
        if !root_dir(&meta) {
            return Ok(false);
        }
        for dir in [&self.top, &self.dirs.store, &self.dirs.root] {
            if !root_dir(&std::fs::symlink_metadata(dir)?) {
                return Ok(false);
            }
        }
        if !std::fs::symlink_metadata(&self.dirs.build)?
            .file_type()
            .is_dir()
        {
            return Ok(false);
        }
        Ok(std::fs::read_dir(&self.dirs.root)?.next().is_none())
    }

    /// Gives `build` and `store` their owners and modes for `user`.
    fn set_owners(&self, user: &BuildUser) -> Result<(), SandboxError> {
        let build = &self.dirs.build;
        chown(build, Some(user.uid()), Some(user.gid())).map_err(host_err("chown", build))?;
        std::fs::set_permissions(build, std::fs::Permissions::from_mode(0o700))
            .map_err(host_err("chmod", build))?;
        let store = &self.dirs.store;
        chown(store, Some(0), Some(user.gid())).map_err(host_err("chown", store))?;
        // chown may clear the sticky bit on some filesystems; set the mode last.
        std::fs::set_permissions(store, std::fs::Permissions::from_mode(0o1775))
            .map_err(host_err("chmod", store))
    }

    /// Removes everything the build left in `build` and `store`, keeping
    /// the directories for the next build of the user. As [`Self::remove`],
    /// the top directory is out of reach meanwhile.
    pub fn clear(&self) -> Result<(), SandboxError> {
        std::fs::set_permissions(&self.top, std::fs::Permissions::from_mode(0o000))
            .map_err(host_err("chmod", &self.top))?;
        for dir in [&self.dirs.build, &self.dirs.store] {
            let entries = std::fs::read_dir(dir).map_err(host_err("read", dir))?;
            for entry in entries {
                let path = entry.map_err(host_err("read", dir))?.path();
                remove_any(&path).map_err(host_err("remove", &path))?;
            }
        }
        std::fs::set_permissions(&self.top, std::fs::Permissions::from_mode(0o700))
            .map_err(host_err("chmod", &self.top))
    }

    /// Moves a set made by [`HostDirs::for_user`] out of the user's place,
    /// to `<parent>/kept-XXXXXX/sandoff-build` (the user's next build
    /// makes a new one), and returns it there.
    pub fn keep(self) -> Result<HostDirs, SandboxError> {
        let slot = self.top.parent().unwrap_or(&self.top);
        let parent = slot.parent().unwrap_or(slot);
        // An empty directory of a free name, which the rename replaces.
        let kept = tempfile::Builder::new()
            .prefix("kept-")
            .tempdir_in(parent)
            .map_err(host_err("create a directory in", parent))?
            .keep();
        if let Err(e) = std::fs::rename(slot, &kept) {
            let _ = std::fs::remove_dir(&kept);
            return Err(host_err("move", slot)(e));
        }
        Ok(HostDirs::at(kept.join(USER_TOP)))
    }

    /// The set whose top directory is `top` (nothing is checked).
    fn at(top: PathBuf) -> HostDirs {
        HostDirs {
            dirs: SandboxDirs {
                root: top.join("root"),
                build: top.join("build"),
                store: top.join("store"),
            },
            top,
        }
    }

    /// The uids whose set under `parent` ([`HostDirs::for_user`]) has
    /// anything in `build` or `store`: what a build killed mid-way left
    /// (or one that runs now).
    pub fn users_with_leftovers(parent: &Path) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return Vec::new();
        };
        let has_files = |d: &Path| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some());
        entries
            .flatten()
            .filter_map(|entry| {
                let uid = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix(USER_SLOT_PREFIX)?
                    .parse::<u32>()
                    .ok()?;
                let set = HostDirs::at(entry.path().join(USER_TOP));
                (has_files(&set.dirs.build) || has_files(&set.dirs.store)).then_some(uid)
            })
            .collect()
    }

    /// The directories to put in a [`super::SandboxSpec`].
    pub fn dirs(&self) -> &SandboxDirs {
        &self.dirs
    }

    /// The top directory (root-only).
    pub fn top(&self) -> &Path {
        &self.top
    }

    /// Where an output the builder created is, on the host.
    pub fn output(&self, base_name: &str) -> PathBuf {
        self.dirs.store.join(base_name)
    }

    /// Deletes everything. The top directory is made inaccessible first, so
    /// nothing can reach the tree while it is being deleted (Nix's
    /// CVE-2025-52991 hardening); root is unaffected by the mode.
    pub fn remove(self) -> Result<(), SandboxError> {
        std::fs::set_permissions(&self.top, std::fs::Permissions::from_mode(0o000))
            .map_err(host_err("chmod", &self.top))?;
        std::fs::remove_dir_all(&self.top).map_err(host_err("remove", &self.top))
    }
}

/// A build user's set is `<parent>/uid-<uid>/sandoff-build`.
const USER_SLOT_PREFIX: &str = "uid-";
const USER_TOP: &str = "sandoff-build";

/// Where `uid`'s set is under `parent` (its top's parent).
fn user_slot(parent: &Path, uid: u32) -> PathBuf {
    parent.join(format!("{USER_SLOT_PREFIX}{uid}"))
}

/// Creates the directory `path` with exactly `mode`.
fn make_dir(path: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(host_err("create", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(host_err("chmod", path))
}

/// Removes `path` and, if it is a directory, what is in it; a symbolic
/// link is removed, never followed.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path)?.file_type().is_dir() {
        true => std::fs::remove_dir_all(path),
        false => std::fs::remove_file(path),
    }
}
