//! The Nix store model: store directories and paths, hashes, NAR, the
//! registry of valid paths, signatures, export archives and reference scanning.
//!
//! Nothing here knows about derivations, sandboxes or machines.

pub mod export;
pub mod hash;
pub mod keyring;
pub mod local;
pub mod nar;
pub mod nixbase32;
pub mod path;
pub mod path_info;
pub mod refscan;
pub mod registry;
pub mod signature;
pub mod wire;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

pub use hash::{Hash, HashAlgo, HashError};
pub use path::{ContentAddress, FileIngestionMethod, PathError, StoreDir, StorePath};
pub use path_info::ValidPathInfo;

/// Where a store lives: its logical directory, the physical root its files
/// are under (as in Nix's chroot stores), and its state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLocation {
    /// The logical store directory, as it appears in store paths.
    pub dir: StoreDir,
    /// The physical root: `<root>/<dir>` holds the files.
    pub root: PathBuf,
    /// sandoff's own state: its database (unless `daemon_db`), logs, keys,
    /// locks, slots and backoff.
    pub state: PathBuf,
    /// The database directory of the daemon whose store this is
    /// (guix-daemon's `/var/guix/db`, nix-daemon's `/nix/var/nix/db`): then
    /// validity lives there, never in a second registry of sandoff's, and
    /// the database is never created or migrated. `None`: sandoff's own,
    /// `<state>/db`.
    pub daemon_db: Option<PathBuf>,
    /// The log directory of the daemon whose store this is (nix-daemon's
    /// `<root>/nix/var/log/nix`, guix-daemon's `/var/log/guix`): build logs
    /// are written there in the daemons' own layout, so that `nix-store -l`
    /// and `guix build --log-file` read them. `None`: `<state>/log`, in
    /// sandoff's (see `crate::build::log`).
    pub daemon_log_dir: Option<PathBuf>,
}

impl StoreLocation {
    /// A location with the default state directory `<root>/nix/var/sandoff`.
    pub fn new(dir: StoreDir, root: PathBuf) -> StoreLocation {
        let state = root.join("nix/var/sandoff");
        StoreLocation {
            dir,
            root,
            state,
            daemon_db: None,
            daemon_log_dir: None,
        }
    }

    /// Where the registry's database is: the daemon's, or `<state>/db`.
    pub fn db_dir(&self) -> PathBuf {
        self.daemon_db
            .clone()
            .unwrap_or_else(|| self.state.join("db"))
    }

    /// Where the files of the store directory are on this machine.
    pub fn real_store_dir(&self) -> PathBuf {
        self.root.join(self.dir.as_str().trim_start_matches('/'))
    }

    /// Where the files of `path` are on this machine.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.real_store_dir().join(path.base_name())
    }

    /// The full logical path of `path`.
    pub fn logical(&self, path: &StorePath) -> String {
        self.dir.display(path)
    }

    /// Maps a physical path inside the store back to a logical one, if it is there.
    pub fn to_logical(&self, physical: &Path) -> Option<String> {
        let rel = physical.strip_prefix(self.real_store_dir()).ok()?;
        Some(format!("{}/{}", self.dir, rel.to_str()?))
    }
}

impl Default for StoreLocation {
    fn default() -> Self {
        StoreLocation::new(StoreDir::default(), PathBuf::from("/"))
    }
}

/// Replaces `path` with `contents` (mode 0644) so that a reader sees the old
/// file or the new one, never a part: written and synced under a unique
/// temporary name in the same directory, then renamed over it.
pub(crate) fn replace_file_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    // A temporary file starts at 0600; these files are meant to be read by all.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
