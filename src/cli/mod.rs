//! One file per command group; each turns its arguments into library calls.

/// `println!` that returns the error instead of panicking when stdout is
/// closed (`sandoff … | head`): `main` ends quietly on a broken pipe, as
/// for every other write. Needs a function returning an
/// `io::Error`-convertible error.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub mod build;
pub mod builtin;
pub mod coordinator;
pub mod copy;
pub mod decide;
pub mod derivation;
pub mod enter;
pub mod guix;
pub mod hook;
pub mod key;
pub mod machines;
pub mod nar;
pub mod nix_hook;
pub mod serve;
pub mod setup;
pub mod store;
pub mod transfer;

use std::path::{Path, PathBuf};

use sandoff::store::StoreDir;

/// A daemon whose store sandoff can work on directly (`--daemon-store`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonStore {
    /// guix-daemon: `/gnu/store`, its database (schema 7) in
    /// `$GUIX_STATE_DIRECTORY/db` (default `/var/guix/db`).
    Guix,
    /// nix-daemon: `/nix/store`, its database (schema 10) in
    /// `$NIX_STATE_DIR/db` (default `/nix/var/nix/db` under the store root,
    /// as a chroot store `<root>` keeps it).
    Nix,
    /// No daemon: sandoff's own registry in its state directory (the
    /// default; spelled out to override what a daemon's hook would pick).
    Sandoff,
}

impl DaemonStore {
    /// The daemon's store directory (`None`: sandoff's own default).
    pub fn store_dir(self) -> Option<StoreDir> {
        let dir = match self {
            DaemonStore::Guix => "/gnu/store",
            DaemonStore::Nix => "/nix/store",
            DaemonStore::Sandoff => return None,
        };
        Some(StoreDir::new(dir).expect("a valid store directory"))
    }

    /// The daemon's database directory for a store under `root` (`None`:
    /// sandoff's own). The
    /// daemons' own variables name it as the daemon sees it; the hook
    /// inherits the daemon's environment, so it sees the same.
    pub fn db_dir(self, root: &Path) -> Option<PathBuf> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Some(match self {
            DaemonStore::Guix => var("GUIX_STATE_DIRECTORY")
                .unwrap_or_else(|| root.join("var/guix"))
                .join("db"),
            DaemonStore::Nix => var("NIX_STATE_DIR")
                .unwrap_or_else(|| root.join("nix/var/nix"))
                .join("db"),
            DaemonStore::Sandoff => return None,
        })
    }

    /// The daemon's log directory for a store under `root` (`None`:
    /// sandoff's own), where it keeps `drvs/<2 chars>/<rest>.bz2`: as Nix
    /// 2.8's local store, `<root>/nix/var/log/nix` for a chroot store and
    /// `$NIX_LOG_DIR` (default `/nix/var/log/nix`) for `/`; guix-daemon's
    /// `$GUIX_LOG_DIRECTORY` (default `<root>/var/log/guix`).
    pub fn log_dir(self, root: &Path) -> Option<PathBuf> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Some(match self {
            DaemonStore::Guix => {
                var("GUIX_LOG_DIRECTORY").unwrap_or_else(|| root.join("var/log/guix"))
            }
            DaemonStore::Nix if root == Path::new("/") => {
                var("NIX_LOG_DIR").unwrap_or_else(|| root.join("nix/var/log/nix"))
            }
            DaemonStore::Nix => root.join("nix/var/log/nix"),
            DaemonStore::Sandoff => return None,
        })
    }
}

/// Whether the program was run under the file name `name` (argv[0], e.g. a
/// symlink a daemon runs by that name).
pub fn invoked_as(argv: &[std::ffi::OsString], name: &str) -> bool {
    argv.first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == name)
}
