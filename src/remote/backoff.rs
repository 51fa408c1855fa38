//! Memory of failing machines, shared by every sandoff process on this host
//! and kept across runs: after a machine could not be reached (or refused
//! us), it is not tried again for 30 s, doubling with each further failure
//! up to 10 min; one success forgets it. One file per machine in
//! `<state>/offload-backoff/`.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::bounded;
use crate::decide::MachineName;
use crate::remote::slots::escape_name;

/// The largest backoff record read.
const RECORD_LIMIT: u64 = 1 << 20;
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
pub fn delay_after(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    // 30 s << 5 = 960 s is already past the cap; stop shifting there.
    let doublings = (failures - 1).min(5);
    (FIRST * (1 << doublings)).min(MAX)
}

/// The longest `last_error` kept, in bytes: enough for any SSH or protocol
/// message, short enough that a record stays one small file.
const MAX_ERROR_LEN: usize = 1000;

/// One printable line: control characters (newlines included) become
/// spaces, and an overlong message is cut at a character boundary.
fn one_line(error: &str) -> String {
    let mut out = String::with_capacity(error.len().min(MAX_ERROR_LEN));
    for c in error.chars() {
        if out.len() + c.len_utf8() > MAX_ERROR_LEN {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out.trim().to_owned()
}

/// Seconds since the epoch, 0 for times before it.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the epoch, rounded up: a record never ends its backoff
/// earlier than asked.
fn unix_secs_ceil(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => d.as_secs().saturating_add(1),
        Ok(d) => d.as_secs(),
        Err(_) => 0,
    }
}

impl BackoffState {
    /// The record file's text:
    /// `failures <n>\nuntil <unix seconds>\nerror <one line>\n`.
    pub fn to_text(&self) -> String {
        format!(
            "failures {}\nuntil {}\nerror {}\n",
            self.failures,
            unix_secs(self.until),
            one_line(&self.last_error)
        )
    }

    /// Parses [`BackoffState::to_text`]'s format; unknown lines are ignored
    /// (a newer sandoff may add some), a missing or malformed `failures` or
    /// `until` is an error naming the line.
    pub fn from_text(text: &str) -> Result<BackoffState, String> {
        let mut failures = None;
        let mut until = None;
        let mut last_error = String::new();
        for (n, line) in text.lines().enumerate() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "failures" => {
                    failures =
                        Some(value.parse::<u32>().map_err(|e| {
                            format!("line {}: bad failure count {value:?}: {e}", n + 1)
                        })?)
                }
                "until" => {
                    let secs = value
                        .parse::<u64>()
                        .map_err(|e| format!("line {}: bad time {value:?}: {e}", n + 1))?;
                    until = Some(
                        UNIX_EPOCH
                            .checked_add(Duration::from_secs(secs))
                            .ok_or_else(|| format!("line {}: time {secs} out of range", n + 1))?,
                    );
                }
                "error" => last_error = value.to_owned(),
                _ => {}
            }
        }
        Ok(BackoffState {
            failures: failures.ok_or("no 'failures' line")?,
            until: until.ok_or("no 'until' line")?,
            last_error,
        })
    }
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

    /// The directory, `<state>/offload-backoff`.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The record file of `machine`.
    pub fn record_path(&self, machine: &MachineName) -> PathBuf {
        self.dir.join(escape_name(machine))
    }

    /// The machine's record, if it has failed since its last success.
    ///
    /// A record that cannot be read or parsed is logged and treated as
    /// none: a damaged file must not keep a machine out of use forever,
    /// and the next failure rewrites it.
    pub fn state(&self, machine: &MachineName) -> Result<Option<BackoffState>, BackoffError> {
        Ok(self.read(machine))
    }

    fn read(&self, machine: &MachineName) -> Option<BackoffState> {
        let path = self.record_path(machine);
        // A record is a few lines; the limit only stops a damaged or
        // replaced file (a FIFO, a device) from hanging every decision.
        let text = match bounded::read_file_to_string(&path, RECORD_LIMIT) {
            Ok(text) => text,
            Err(e) if e.is_not_found() => return None,
            Err(e) => {
                tracing::warn!(
                    machine = machine.as_str(),
                    path = %path.display(),
                    error = %e,
                    "cannot read backoff record; ignoring it"
                );
                return None;
            }
        };
        match BackoffState::from_text(&text) {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!(
                    machine = machine.as_str(),
                    path = %path.display(),
                    error = %e,
                    "corrupt backoff record; ignoring it"
                );
                None
            }
        }
    }

    /// Records a failure at `now` and returns the new record.
    ///
    /// The count is read, increased and written back under an exclusive
    /// `flock` on `<record>.lock`, so concurrent failures from several
    /// processes all count; the record itself is replaced atomically, so
    /// readers (who take no lock) see the old or the new one, never half.
    pub fn record_failure(
        &self,
        machine: &MachineName,
        now: SystemTime,
        error: &str,
    ) -> Result<BackoffState, BackoffError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(|source| BackoffError {
                action: "create backoff directory",
                path: self.dir.clone(),
                source,
            })?;
        let path = self.record_path(machine);
        let _lock = self.lock(machine)?;
        let failures = self
            .read(machine)
            .map_or(0, |s| s.failures)
            .saturating_add(1);
        // Whole seconds (the delay is whole already), so the record read
        // back equals the one returned; clamped so no clock makes it overflow.
        let secs = unix_secs_ceil(now)
            .saturating_add(delay_after(failures).as_secs())
            .min(i64::MAX as u64);
        let until = UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .unwrap_or(now);
        let state = BackoffState {
            failures,
            until,
            last_error: one_line(error),
        };
        crate::store::replace_file_atomically(&path, state.to_text().as_bytes()).map_err(
            |source| BackoffError {
                action: "write backoff record",
                path,
                source,
            },
        )?;
        Ok(state)
    }

    /// Takes the exclusive lock on `machine`'s `<record>.lock`.
    fn lock(&self, machine: &MachineName) -> Result<Flock<File>, BackoffError> {
        let path = self.dir.join(format!("{}.lock", escape_name(machine)));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(|source| BackoffError {
                action: "open",
                path: path.clone(),
                source,
            })?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => {
                    return Err(BackoffError {
                        action: "lock",
                        path,
                        source: errno.into(),
                    })
                }
            }
        }
    }

    /// Forgets the machine's failures.
    pub fn record_success(&self, machine: &MachineName) -> Result<(), BackoffError> {
        let path = self.record_path(machine);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BackoffError {
                action: "remove backoff record",
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> MachineName {
        MachineName::new(s).expect("valid name")
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn delay_doubles_from_30_s_up_to_10_min() {
        let secs: Vec<u64> = (0..9).map(|n| delay_after(n).as_secs()).collect();
        assert_eq!(secs, [0, 30, 60, 120, 240, 480, 600, 600, 600]);
        assert_eq!(delay_after(u32::MAX), MAX);
    }

    #[test]
    fn failures_accumulate_and_success_forgets() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Backoff::new(tmp.path());
        let m = name("ssh://root@127.0.0.2:2222");
        assert_eq!(b.state(&m).expect("state"), None);

        let s1 = b
            .record_failure(&m, at(1000), "connection refused")
            .expect("record");
        assert_eq!(s1.failures, 1);
        assert_eq!(s1.until, at(1030));
        assert_eq!(s1.last_error, "connection refused");
        assert_eq!(b.state(&m).expect("state"), Some(s1.clone()));
        assert!(s1.active(at(1029)));
        assert!(!s1.active(at(1030)));

        let s2 = b
            .record_failure(&m, at(1040), "host key mismatch\nexpected A, got B")
            .expect("record");
        assert_eq!(s2.failures, 2);
        assert_eq!(s2.until, at(1100));
        assert_eq!(s2.last_error, "host key mismatch expected A, got B");
        assert_eq!(b.state(&m).expect("state"), Some(s2));

        // Another machine is untouched.
        assert_eq!(b.state(&name("ssh://other")).expect("state"), None);

        b.record_success(&m).expect("success");
        assert_eq!(b.state(&m).expect("state"), None);
        b.record_success(&m).expect("success twice is fine");
        let s3 = b.record_failure(&m, at(2000), "again").expect("record");
        assert_eq!((s3.failures, s3.until), (1, at(2030)));
    }

    #[test]
    fn a_record_that_is_a_fifo_counts_as_none_without_hanging() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Backoff::new(tmp.path());
        let m = name("ssh://fifo");
        let path = b.record_path(&m);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        assert_eq!(b.state(&m).expect("state"), None);
    }

    #[test]
    fn until_is_rounded_up_to_whole_seconds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Backoff::new(tmp.path());
        let m = name("ssh://frac");
        let s = b
            .record_failure(&m, at(10) + Duration::from_millis(1), "x")
            .expect("record");
        assert_eq!(s.until, at(41));
        assert_eq!(b.state(&m).expect("state"), Some(s));
    }

    #[test]
    fn record_is_the_documented_text() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Backoff::new(tmp.path());
        let m = name("ssh://a/b");
        b.record_failure(&m, at(100), "timeout").expect("record");
        let path = b.record_path(&m);
        assert_eq!(path, tmp.path().join("offload-backoff/ssh:__a_b"));
        assert_eq!(
            std::fs::read_to_string(path).expect("read"),
            "failures 1\nuntil 130\nerror timeout\n"
        );
    }

    #[test]
    fn corrupt_or_unreadable_records_count_as_none() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Backoff::new(tmp.path());
        let m = name("ssh://corrupt");
        std::fs::create_dir_all(b.path()).expect("mkdir");
        for text in [
            "",
            "garbage",
            "failures x\nuntil 5\n",
            "failures 1\n",
            "failures 1\nuntil 99999999999999999999\n",
            "\u{0}\u{1}",
        ] {
            std::fs::write(b.record_path(&m), text).expect("write");
            assert_eq!(b.state(&m).expect("state"), None, "{text:?}");
        }
        // Not even a file: a directory in its place.
        std::fs::remove_file(b.record_path(&m)).expect("rm");
        std::fs::create_dir(b.record_path(&m)).expect("mkdir");
        assert_eq!(b.state(&m).expect("state"), None);
        std::fs::remove_dir(b.record_path(&m)).expect("rmdir");
        // A corrupt record starts the count afresh.
        std::fs::write(b.record_path(&m), "failures many").expect("write");
        let s = b.record_failure(&m, at(0), "e").expect("record");
        assert_eq!(s.failures, 1);
    }

    #[test]
    fn times_far_away_do_not_overflow() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Backoff::new(tmp.path());
        let m = name("ssh://future");
        let far = UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 - 10);
        let s = b.record_failure(&m, far, "e").expect("record");
        assert!(s.until >= far);
        assert_eq!(b.state(&m).expect("state"), Some(s));
        let past = UNIX_EPOCH - Duration::from_secs(100);
        let s = b.record_failure(&m, past, "e").expect("record");
        assert_eq!(s.until, at(60));
    }

    #[test]
    fn unknown_lines_are_ignored() {
        let s = BackoffState::from_text("failures 3\nuntil 7\nnext-field 1\nerror a b\n")
            .expect("parses");
        assert_eq!(s.failures, 3);
        assert_eq!(s.until, at(7));
        assert_eq!(s.last_error, "a b");
    }

    #[test]
    fn concurrent_failures_all_count() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = name("ssh://racy");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    // Each thread its own Backoff: separate open files, as
                    // separate processes would have.
                    let b = Backoff::new(tmp.path());
                    for _ in 0..5 {
                        b.record_failure(&m, at(0), "down").expect("record");
                    }
                });
            }
        });
        let s = Backoff::new(tmp.path()).state(&m).expect("state");
        assert_eq!(s.map(|s| s.failures), Some(20));
    }

    #[test]
    fn overlong_errors_are_cut() {
        let long = "é".repeat(2000);
        let line = one_line(&long);
        assert!(line.len() <= MAX_ERROR_LEN);
        assert!(line.chars().all(|c| c == 'é'));
    }
}
