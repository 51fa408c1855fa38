//! Build slots on machines, shared by every sandoff process on this host:
//! slot `i` of a machine is an exclusive `flock` on
//! `<state>/current-load/<escaped name>-<i>`, held for as long as a build
//! uses it (Nix's scheme, so `slots in use` counts other processes too).
//! Choosing a machine and taking its slot happen under
//! `<state>/current-load/main-lock`, so two processes cannot both take the
//! last slot on the strength of the same count.
//!
//! The directory can be another one ([`SlotDir::at`]): Nix 1.x's
//! `NIX_CURRENT_LOAD` names one that every build hook on the host shares.
//!
//! `flock` locks belong to open file descriptions, not processes, so two
//! [`SlotDir`]s in one process exclude each other exactly as two processes
//! do, and a lock dies with the process that held it: a crashed build never
//! leaves a slot taken.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::decide::{Machine, MachineName};
use crate::store::nixbase32;

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

/// The directory of slot files, `<state>/current-load` unless given.
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

/// Longest escaped name used as is; longer ones are replaced by a hash so
/// that `<name>-<slot>` and `<name>.lock` stay under NAME_MAX (255).
const MAX_ESCAPED: usize = 200;

/// Machine names as file names: Nix's `escapeUri` (`/` → `_`, so the
/// files of a plain `ssh://host` machine are named as Nix names them), and
/// also `%XX` for every byte that is awkward in a file name or a shell (and
/// for `%` itself, and a leading `.`, so no name is hidden, `.` or `..`).
/// A name whose escaped form would be longer than 200 bytes becomes its
/// first 100 escaped bytes, `~`, and 32 nix-base32 digits of the SHA-256 of
/// the whole name.
pub fn escape_name(name: &MachineName) -> String {
    let mut out = String::with_capacity(name.as_str().len());
    for (i, &b) in name.as_str().as_bytes().iter().enumerate() {
        match b {
            b'/' => out.push('_'),
            b'.' if i == 0 => out.push_str("%2E"),
            b'a'..=b'z'
            | b'A'..=b'Z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'@'
            | b':'
            | b'+'
            | b'='
            | b','
            | b'?'
            | b'&'
            | b'[' // IPv6 hosts: ssh://[::1]
            | b']' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    if out.len() <= MAX_ESCAPED {
        return out;
    }
    let digest = Sha256::digest(name.as_str().as_bytes());
    let mut short: String = out.chars().take(100).collect();
    short.push('~');
    short.push_str(&nixbase32::encode(&digest)[..32]);
    short
}

/// Opens (creating) a lock file readable by all, as Nix's are.
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
}

/// Waits for an exclusive `flock(2)`, retried when a signal interrupts it.
fn lock_blocking(file: File) -> Result<Flock<File>, Errno> {
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, errno)) => return Err(errno),
        }
    }
}

/// An exclusive `flock(2)` if nobody holds one; `Ok(None)` if someone does.
fn try_lock(file: File) -> Result<Option<Flock<File>>, Errno> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno),
    }
}

impl SlotDir {
    /// The slot directory of the store whose state directory is `state`.
    pub fn new(state: &Path) -> SlotDir {
        SlotDir {
            dir: state.join("current-load"),
        }
    }

    /// The slot directory `dir`, shared with every process given the same
    /// one (Nix 1.x's `NIX_CURRENT_LOAD`).
    pub fn at(dir: PathBuf) -> SlotDir {
        SlotDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The lock file of `machine`'s slot `index`.
    pub fn slot_path(&self, machine: &MachineName, index: u32) -> PathBuf {
        self.dir.join(format!("{}-{}", escape_name(machine), index))
    }

    fn create_dir(&self) -> Result<(), SlotError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(|source| SlotError {
                action: "create slot directory",
                path: self.dir.clone(),
                source,
            })
    }

    /// Takes `main-lock`, waiting for it.
    pub fn lock_choice(&self) -> Result<ChoiceLock, SlotError> {
        self.create_dir()?;
        let path = self.dir.join("main-lock");
        let file = open_lock_file(&path).map_err(|source| SlotError {
            action: "open",
            path: path.clone(),
            source,
        })?;
        match lock_blocking(file) {
            Ok(lock) => Ok(ChoiceLock { _lock: lock }),
            Err(errno) => Err(SlotError {
                action: "lock",
                path,
                source: errno.into(),
            }),
        }
    }

    /// How many of `machine`'s slots some process holds now.
    pub fn in_use(&self, machine: &Machine) -> Result<u32, SlotError> {
        let mut held = 0;
        for index in 0..machine.max_jobs {
            let path = self.slot_path(&machine.name, index);
            // Only read access: counting must not create files, and a
            // missing file is a slot nobody ever took.
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(SlotError {
                        action: "open",
                        path,
                        source,
                    })
                }
            };
            match try_lock(file) {
                // Free: the probe's lock is released as it drops here.
                Ok(Some(_probe)) => {}
                Ok(None) => held += 1,
                Err(errno) => {
                    return Err(SlotError {
                        action: "lock",
                        path,
                        source: errno.into(),
                    })
                }
            }
        }
        Ok(held)
    }

    /// Takes a free slot of `machine`, or `None` when all `max_jobs` are held.
    pub fn try_acquire(&self, machine: &Machine) -> Result<Option<Slot>, SlotError> {
        if machine.max_jobs == 0 {
            return Ok(None);
        }
        self.create_dir()?;
        for index in 0..machine.max_jobs {
            let path = self.slot_path(&machine.name, index);
            let file = open_lock_file(&path).map_err(|source| SlotError {
                action: "open",
                path: path.clone(),
                source,
            })?;
            match try_lock(file) {
                Ok(Some(lock)) => {
                    // The mtime says when the slot was last taken, as Nix's
                    // futimens does; only informative, so a failure is no error.
                    if let Err(e) = lock.set_modified(SystemTime::now()) {
                        tracing::debug!(path = %path.display(), error = %e, "cannot touch slot file");
                    }
                    return Ok(Some(Slot {
                        machine: machine.name.clone(),
                        index,
                        _lock: lock,
                    }));
                }
                Ok(None) => {}
                Err(errno) => {
                    return Err(SlotError {
                        action: "lock",
                        path,
                        source: errno.into(),
                    })
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::nix_format::{self, NoIncludes};

    fn machine(uri: &str, max_jobs: u32) -> Machine {
        let line = format!("{uri} x86_64-linux - {max_jobs} 1 - - -\n");
        let mut ms =
            nix_format::parse(&line, "machines", "x86_64-linux", &NoIncludes).expect("parses");
        ms.remove(0)
    }

    fn name(s: &str) -> MachineName {
        MachineName::new(s).expect("valid name")
    }

    #[test]
    fn escapes_slashes_as_nix_and_the_rest_with_percent() {
        assert_eq!(
            escape_name(&name("ssh://nix@host:2222")),
            "ssh:__nix@host:2222"
        );
        assert_eq!(
            escape_name(&name("ssh://h?remote-program=/bin/x")),
            "ssh:__h?remote-program=_bin_x"
        );
        assert_eq!(escape_name(&name("a%b*c'd")), "a%25b%2Ac%27d");
        assert_eq!(escape_name(&name("..")), "%2E.");
        assert_eq!(escape_name(&name("héte")), "h%C3%A9te");
    }

    #[test]
    fn long_names_become_a_bounded_hash() {
        let long_a = name(&format!("ssh://{}a", "x".repeat(300)));
        let long_b = name(&format!("ssh://{}b", "x".repeat(300)));
        let (a, b) = (escape_name(&long_a), escape_name(&long_b));
        assert_ne!(a, b);
        assert!(a.len() <= MAX_ESCAPED, "{}", a.len());
        assert!(a.starts_with("ssh:__xxx"));
        assert_eq!(a, escape_name(&long_a));
    }

    #[test]
    fn max_jobs_zero_never_yields_a_slot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let slots = SlotDir::new(tmp.path());
        let m = machine("ssh://zero", 0);
        assert!(slots.try_acquire(&m).expect("acquire").is_none());
        assert_eq!(slots.in_use(&m).expect("in_use"), 0);
    }

    #[test]
    fn slots_are_taken_in_order_and_released_on_drop() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let slots = SlotDir::new(&tmp.path().join("state"));
        let m = machine("ssh://root@host", 2);
        assert_eq!(slots.in_use(&m).expect("in_use"), 0);
        let a = slots.try_acquire(&m).expect("acquire").expect("free slot");
        let b = slots.try_acquire(&m).expect("acquire").expect("free slot");
        assert_eq!((a.index, b.index), (0, 1));
        assert_eq!(a.machine, m.name);
        assert!(slots.slot_path(&m.name, 0).exists());
        assert_eq!(slots.in_use(&m).expect("in_use"), 2);
        assert!(slots.try_acquire(&m).expect("acquire").is_none());
        drop(a);
        assert_eq!(slots.in_use(&m).expect("in_use"), 1);
        let c = slots
            .try_acquire(&m)
            .expect("acquire")
            .expect("slot 0 again");
        assert_eq!(c.index, 0);
        drop((b, c));
        assert_eq!(slots.in_use(&m).expect("in_use"), 0);
    }

    #[test]
    fn two_slot_dirs_on_one_directory_see_each_other() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let one = SlotDir::new(tmp.path());
        let two = SlotDir::new(tmp.path());
        let m = machine("ssh://shared", 1);
        let other = machine("ssh://other", 1);
        let held = one.try_acquire(&m).expect("acquire").expect("free");
        assert_eq!(two.in_use(&m).expect("in_use"), 1);
        assert!(two.try_acquire(&m).expect("acquire").is_none());
        // Another machine's slots are separate.
        assert!(two.try_acquire(&other).expect("acquire").is_some());
        drop(held);
        assert!(two.try_acquire(&m).expect("acquire").is_some());
    }

    #[test]
    fn slot_touch_marks_last_use() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let slots = SlotDir::new(tmp.path());
        let m = machine("ssh://touched", 1);
        let path = slots.slot_path(&m.name, 0);
        std::fs::create_dir_all(slots.path()).expect("mkdir");
        let f = File::create(&path).expect("create");
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        f.set_modified(old).expect("set mtime");
        drop(f);
        let _slot = slots.try_acquire(&m).expect("acquire").expect("free");
        let mtime = std::fs::metadata(&path)
            .and_then(|md| md.modified())
            .expect("mtime");
        assert!(mtime > old);
    }

    #[test]
    fn a_slot_held_by_another_process_is_counted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let slots = SlotDir::new(tmp.path());
        let m = machine("ssh://root@busy", 3);
        std::fs::create_dir_all(slots.path()).expect("mkdir");
        let path = slots.slot_path(&m.name, 0);
        // Another holder: a lock through its own open file description,
        // which conflicts with ours exactly as another process's would
        // (flock locks belong to the open file description).
        let other = try_lock(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .expect("open slot"),
        )
        .expect("lock")
        .expect("free");
        assert_eq!(slots.in_use(&m).expect("in_use"), 1);
        let mine = slots.try_acquire(&m).expect("acquire").expect("free");
        assert_eq!(mine.index, 1);
        assert_eq!(slots.in_use(&m).expect("in_use"), 2);
        drop(other);
        assert_eq!(slots.in_use(&m).expect("in_use"), 1);
    }

    #[test]
    fn the_choice_lock_excludes_another_holder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let slots = SlotDir::new(&tmp.path().join("a/b"));
        let held = slots.lock_choice().expect("lock");
        let path = slots.path().join("main-lock");
        let probe = File::open(&path).expect("open main-lock");
        assert!(matches!(try_lock(probe), Ok(None)));
        drop(held);
        let probe = File::open(&path).expect("open main-lock");
        assert!(matches!(try_lock(probe), Ok(Some(_))));
    }
}
