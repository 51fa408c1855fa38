//! Host directories for one build, laid out as hardened by the CVE fixes in
//! Nix and Guix (CVE-2021-27851, CVE-2024-38531, CVE-2025-52991):
//!
//! ```text
//! <parent>/sandoff-build-XXXXXX/   root:root 0700: nobody else can reach inside
//!     build/                       <build uid>:<build gid> 0700, bound at /tmp/<name>
//!     store/                       root:<build gid> 01775, bound at the store dir;
//!                                  the builder creates its outputs here
//!     root/                        empty; the sandbox's root tmpfs is mounted on it
//!                                  inside the build's own mount namespace
//! ```
//!
//! The root mount point is a sibling of the other two, never their ancestor:
//! the tmpfs would otherwise hide them from the bind mounts.

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
        let mkdir = |name: &str, mode: u32| -> Result<PathBuf, SandboxError> {
            let p = top.join(name);
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .map_err(host_err("create", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(host_err("chmod", &p))?;
            Ok(p)
        };
        let build = mkdir("build", 0o700)?;
        chown(&build, Some(user.uid()), Some(user.gid())).map_err(host_err("chown", &build))?;
        let store = mkdir("store", 0o1775)?;
        chown(&store, Some(0), Some(user.gid())).map_err(host_err("chown", &store))?;
        // chown may clear the sticky bit on some filesystems; set the mode last.
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1775))
            .map_err(host_err("chmod", &store))?;
        let root = mkdir("root", 0o700)?;
        Ok(HostDirs {
            top,
            dirs: SandboxDirs { root, build, store },
        })
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
