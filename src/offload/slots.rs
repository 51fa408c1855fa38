//! Build slots on machines, shared by every sandoff process on this host:
//! slot `i` of a machine is an exclusive `flock` on
//! `<state>/current-load/<escaped name>-<i>`, held for as long as a build
//! uses it (Nix's scheme, so `slots in use` counts other processes too).
//! Choosing a machine and taking its slot happen under
//! `<state>/current-load/main-lock`, so two processes cannot both take the
//! last slot on the strength of the same count.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::decide::{Machine, MachineName};

/// Why the slot files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} '{}': {source}", path.display())]
pub struct SlotError {
    /// What was being done.
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// `<state>/current-load`.
#[derive(Clone, Debug)]
pub struct SlotDir {
    dir: PathBuf,
}

/// A held slot; released when dropped.
#[derive(Debug)]
pub struct Slot {
    /// The machine.
    pub machine: MachineName,
    /// Which of its slots.
    pub index: u32,
    _lock: nix::fcntl::Flock<File>,
}

/// Held while choosing a machine and taking its slot.
pub struct ChoiceLock {
    _lock: nix::fcntl::Flock<File>,
}

impl SlotDir {
    /// The slot directory of the store whose state directory is `state`.
    pub fn new(state: &Path) -> SlotDir {
        SlotDir {
            dir: state.join("current-load"),
        }
    }

    /// Takes `main-lock`, waiting for it.
    pub fn lock_choice(&self) -> Result<ChoiceLock, SlotError> {
        let _ = &self.dir;
        todo!("helper D")
    }

    /// How many of `machine`'s slots some process holds now.
    pub fn in_use(&self, _machine: &Machine) -> Result<u32, SlotError> {
        todo!("helper D")
    }

    /// Takes a free slot of `machine`, or `None` when all `max_jobs` are held.
    pub fn try_acquire(&self, _machine: &Machine) -> Result<Option<Slot>, SlotError> {
        todo!("helper D")
    }
}
