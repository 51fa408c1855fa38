//! Memory of failing machines, shared by every sandoff process on this host
//! and kept across runs: after a machine could not be reached (or refused
//! us), it is not tried again for 30 s, doubling with each further failure
//! up to 10 min; one success forgets it. One file per machine in
//! `<state>/offload-backoff/`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::decide::MachineName;

/// The first backoff.
pub const FIRST: Duration = Duration::from_secs(30);
/// The longest backoff.
pub const MAX: Duration = Duration::from_secs(600);

/// Why the backoff files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} '{}': {source}", path.display())]
pub struct BackoffError {
    /// What was being done.
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// A machine's failure record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackoffState {
    /// Failures in a row.
    pub failures: u32,
    /// Not tried before this time.
    pub until: SystemTime,
    /// The last failure, one line.
    pub last_error: String,
}

impl BackoffState {
    /// Whether the machine must still be left alone at `now`.
    pub fn active(&self, now: SystemTime) -> bool {
        now < self.until
    }
}

/// How long to wait after `failures` failures in a row (1 → 30 s, doubling,
/// at most 10 min).
pub fn delay_after(_failures: u32) -> Duration {
    todo!("helper D")
}

/// `<state>/offload-backoff`.
#[derive(Clone, Debug)]
pub struct Backoff {
    dir: PathBuf,
}

impl Backoff {
    /// The backoff records of the store whose state directory is `state`.
    pub fn new(state: &Path) -> Backoff {
        Backoff {
            dir: state.join("offload-backoff"),
        }
    }

    /// The machine's record, if it has failed since its last success.
    pub fn state(&self, _machine: &MachineName) -> Result<Option<BackoffState>, BackoffError> {
        let _ = &self.dir;
        todo!("helper D")
    }

    /// Records a failure at `now` and returns the new record.
    pub fn record_failure(
        &self,
        _machine: &MachineName,
        _now: SystemTime,
        _error: &str,
    ) -> Result<BackoffState, BackoffError> {
        todo!("helper D")
    }

    /// Forgets the machine's failures.
    pub fn record_success(&self, _machine: &MachineName) -> Result<(), BackoffError> {
        todo!("helper D")
    }
}
