//! The build-user pool (Nix's `build-users-group`, `SimpleUserLock`).
//!
//! The pool is the members of one group (`gr_mem`, as Nix: users listed in
//! the group, not users whose primary group it is). A build takes an
//! exclusive `flock` on `<lock dir>/<uid>` and holds it for its whole life,
//! so two concurrent builds never share a uid, across processes too (flock
//! locks belong to the open file, unlike POSIX record locks, which Guix had
//! to work around). When every user is taken the build waits.
//!
//! Before and after each build every process of the uid is killed
//! ([`UserLease::kill_processes`]): a process left behind could keep files
//! open and change outputs after they are checked and registered.
//!
//! This file is also the one place that finds and kills processes: by uid
//! (above) and, for `sandoff serve` when its client goes away, by parent
//! ([`kill_children`], from `/proc`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Group, Pid, User};

use super::linux::{clone_child, LinuxSyscalls};
use super::plan::BuildUser;
use super::syscall::{Errno, Syscall};

/// Errors of the build-user pool.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The build-users group does not exist.
    #[error("build users group '{group}' does not exist (run `sandoff setup` as root)")]
    NoSuchGroup {
        /// The group name.
        group: String,
    },
    /// The group has no members.
    #[error("build users group '{group}' has no members (run `sandoff setup --build-users N`)")]
    EmptyGroup {
        /// The group name.
        group: String,
    },
    /// A member of the group is not a known user.
    #[error("build user '{user}' of group '{group}' does not exist")]
    NoSuchUser {
        /// The member's name.
        user: String,
        /// The group name.
        group: String,
    },
    /// A member is unusable (root, or the user sandoff runs as).
    #[error("build user '{user}' (uid {uid}) cannot be used: {reason}")]
    BadUser {
        /// The member's name.
        user: String,
        /// Its uid.
        uid: u32,
        /// Why.
        reason: &'static str,
    },
    /// Looking up the user database failed.
    #[error("cannot look up '{name}' in the user database: {source}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A lock file could not be opened or locked.
    #[error("cannot lock build user file {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Killing the user's processes failed.
    #[error("cannot kill the processes of build user uid {uid}: {reason}")]
    Kill {
        /// The uid.
        uid: u32,
        /// What went wrong.
        reason: String,
    },
    /// The caller has no build users to give (e.g. a server started
    /// without them): only what needs no build can be done.
    #[error("{why}")]
    NotGiven {
        /// Why, for the user.
        why: &'static str,
    },
}

/// The build users of one group and the directory of their lock files.
#[derive(Clone, Debug)]
pub struct UserPool {
    users: Vec<BuildUser>,
    lock_dir: PathBuf,
}

/// Exclusive use of one build user for one build; the lock is released when
/// this is dropped.
#[derive(Debug)]
pub struct UserLease {
    user: BuildUser,
    // Taken out in `drop`, so that the lock is released before waiters
    // are woken (fields would drop only after it).
    lock: Option<Flock<File>>,
}

/// How many leases this process has returned, with a condition variable
/// signalled at each: a build waiting for a user wakes as soon as another
/// build of this process frees one, instead of at its next poll (other
/// processes' leases are still seen by polling).
static RETURNED: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());

impl Drop for UserLease {
    fn drop(&mut self) {
        drop(self.lock.take());
        let (count, cv) = &RETURNED;
        if let Ok(mut n) = count.lock() {
            *n += 1;
        }
        cv.notify_all();
    }
}

/// Where the build users' lock files are by default. The build users belong
/// to the machine, not to a store, so every sandoff process on the machine
/// must lock them in one place, whatever its store or state directory: two
/// processes with their own lock directories would give one uid to two
/// builds, and each build kills the uid's other processes. Under `/run`, so
/// it is always local, and cleared at boot with the locks it holds.
pub const DEFAULT_USER_POOL_DIR: &str = "/run/sandoff/userpool";

impl UserPool {
    /// The members of `group`, locked through files in `lock_dir`
    /// ([`DEFAULT_USER_POOL_DIR`] unless told otherwise; created if needed).
    pub fn from_group(group: &str, lock_dir: &Path) -> Result<UserPool, UserError> {
        let gr = Group::from_name(group)
            .map_err(lookup_err(group))?
            .ok_or_else(|| UserError::NoSuchGroup {
                group: group.to_owned(),
            })?;
        let me = nix::unistd::getuid().as_raw();
        let mut users = Vec::new();
        for member in &gr.mem {
            let pw = User::from_name(member)
                .map_err(lookup_err(member))?
                .ok_or_else(|| UserError::NoSuchUser {
                    user: member.clone(),
                    group: group.to_owned(),
                })?;
            let uid = pw.uid.as_raw();
            let bad = |reason| UserError::BadUser {
                user: member.clone(),
                uid,
                reason,
            };
            if uid == 0 {
                return Err(bad("it is root"));
            }
            if uid == me {
                return Err(bad("sandoff runs as this user"));
            }
            let user = BuildUser::new(uid, gr.gid.as_raw(), member, group)
                .map_err(|_| bad("its name cannot appear in /etc/passwd"))?;
            users.push(user);
        }
        if users.is_empty() {
            return Err(UserError::EmptyGroup {
                group: group.to_owned(),
            });
        }
        UserPool::new(users, lock_dir)
    }

    /// A pool of the given users.
    pub fn new(users: Vec<BuildUser>, lock_dir: &Path) -> Result<UserPool, UserError> {
        // Private: a lock file another user could hold would stall our builds.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(lock_dir)
            .map_err(|source| UserError::Lock {
                path: lock_dir.to_path_buf(),
                source,
            })?;
        Ok(UserPool {
            users,
            lock_dir: lock_dir.to_path_buf(),
        })
    }

    /// The users of the pool.
    pub fn users(&self) -> &[BuildUser] {
        &self.users
    }

    /// The directory of the users' lock files (recorded with a kept build,
    /// so that `sandoff enter` locks its user where builds do).
    pub fn lock_dir(&self) -> &Path {
        &self.lock_dir
    }

    /// Takes the first free user, or `None` if all are in use.
    pub fn try_acquire(&self) -> Result<Option<UserLease>, UserError> {
        for user in &self.users {
            if let Some(lease) = self.try_lock(user)? {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    /// Takes the user of the pool with this uid if it is free; `None` if it
    /// is in use or not in the pool.
    pub fn try_acquire_uid(&self, uid: u32) -> Result<Option<UserLease>, UserError> {
        match self.users.iter().find(|u| u.uid() == uid) {
            Some(user) => self.try_lock(user),
            None => Ok(None),
        }
    }

    /// Leases `user` (of the pool) if no one holds it.
    fn try_lock(&self, user: &BuildUser) -> Result<Option<UserLease>, UserError> {
        let path = self.lock_dir.join(user.uid().to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| UserError::Lock {
                path: path.clone(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                tracing::debug!(
                    user = user.user_name(),
                    uid = user.uid(),
                    "acquired build user"
                );
                Ok(Some(UserLease {
                    user: user.clone(),
                    lock: Some(lock),
                }))
            }
            Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(UserError::Lock {
                path,
                source: e.into(),
            }),
        }
    }

    /// Takes a free user, waiting while all are in use: until this process
    /// returns one, or `poll` passes (for users other processes hold).
    pub fn acquire(&self, poll: Duration) -> Result<UserLease, UserError> {
        let mut logged = false;
        let (count, cv) = &RETURNED;
        loop {
            // Read before trying, so that a lease returned in between is
            // not missed.
            let seen = count.lock().map_or(0, |n| *n);
            if let Some(lease) = self.try_acquire()? {
                return Ok(lease);
            }
            if !logged {
                tracing::info!(users = self.users.len(), "waiting for a free build user");
                logged = true;
            }
            if let Ok(n) = count.lock() {
                let _ = cv.wait_timeout_while(n, poll, |n| *n == seen);
            } else {
                std::thread::sleep(poll);
            }
        }
    }
}

impl UserLease {
    /// The leased user.
    pub fn user(&self) -> &BuildUser {
        &self.user
    }

    /// Kills every process running as this uid (Nix's `killUser`): a child
    /// switches to the uid and calls `kill(-1, SIGKILL)`, which reaches every
    /// process of the uid, in every PID namespace.
    pub fn kill_processes(&self) -> Result<(), UserError> {
        kill_user(self.user.uid())
    }
}

fn lookup_err(name: &str) -> impl FnOnce(nix::Error) -> UserError + '_ {
    move |e| UserError::Lookup {
        name: name.to_owned(),
        source: e.into(),
    }
}

/// See [`UserLease::kill_processes`]. Refuses uid 0.
fn kill_user(uid: u32) -> Result<(), UserError> {
    let fail = |reason: String| UserError::Kill { uid, reason };
    if uid == 0 {
        return Err(fail("refusing to kill all processes of root".to_owned()));
    }
    let mut child = || {
        let mut sys = LinuxSyscalls;
        if sys.setresuid(uid).is_err() {
            return 2;
        }
        // kill(-1) signals every process we may signal (all of the uid)
        // but the caller, under the tasklist lock, so a fork bomb cannot slip
        // through; it succeeds if there was any other process at all (even
        // ones we may not signal), and fails with ESRCH if there was none.
        // One successful call is enough (as Nix's killUser); retry on EINTR.
        loop {
            match sys.kill_all() {
                Ok(()) | Err(Errno(libc::ESRCH)) => return 0,
                Err(Errno(libc::EINTR)) => continue,
                Err(_) => return 3,
            }
        }
    };
    let pid = clone_child(0, None, &mut child).map_err(|e| fail(format!("fork: {e}")))?;
    match waitpid(Pid::from_raw(pid), None) {
        Ok(WaitStatus::Exited(_, 0)) => Ok(()),
        Ok(WaitStatus::Exited(_, 2)) => Err(fail("setuid failed".to_owned())),
        Ok(status) => Err(fail(format!("killer process ended with {status:?}"))),
        Err(e) => Err(fail(format!("waitpid: {e}"))),
    }
}

/// SIGKILLs every child of this process (found in `/proc`): the sandboxed
/// builders, whose PID namespaces die with them. For a process that serves
/// one client (`sandoff serve`) whose client went away; never call it in a
/// process with children of its own to keep.
pub fn kill_children() {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if parent_pid(&stat) == Some(me) {
            tracing::debug!(pid, "killing a child: the client went away");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The parent's pid in a `/proc/<pid>/stat` line: `pid (comm) state ppid
/// ...`, where comm may hold anything, even spaces and ')'.
fn parent_pid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path) -> UserPool {
        let users = (1..=2)
            .map(|i| BuildUser::new(40000 + i, 40000, &format!("u{i}"), "g").expect("valid"))
            .collect();
        UserPool::new(users, dir).expect("pool")
    }

    #[test]
    fn leases_are_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = pool(dir.path());
        let a = pool.try_acquire().expect("lock").expect("free user");
        let b = pool.try_acquire().expect("lock").expect("free user");
        assert_ne!(a.user().uid(), b.user().uid());
        assert!(pool.try_acquire().expect("lock").is_none());
        let uid = a.user().uid();
        drop(a);
        let c = pool.acquire(Duration::from_millis(10)).expect("lock");
        assert_eq!(c.user().uid(), uid);
    }

    #[test]
    fn acquire_waits_for_a_user_to_be_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = BuildUser::new(40001, 40000, "u1", "g").expect("valid");
        let pool = UserPool::new(vec![one], dir.path()).expect("pool");
        let held = pool.try_acquire().expect("lock").expect("free");
        let t = std::time::Instant::now();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let lease = pool.acquire(Duration::from_millis(20)).expect("lock");
        assert!(t.elapsed() >= Duration::from_millis(150));
        assert_eq!(lease.user().uid(), 40001);
        releaser.join().expect("thread");
    }

    #[test]
    fn two_pools_over_one_lock_dir_exclude_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p1, p2) = (pool(dir.path()), pool(dir.path()));
        let _a = p1.try_acquire().expect("lock").expect("free");
        let _b = p2.try_acquire().expect("lock").expect("free");
        assert!(p1.try_acquire().expect("lock").is_none());
        assert!(p2.try_acquire().expect("lock").is_none());
    }

    #[test]
    fn unknown_group_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = UserPool::from_group("sandoff-no-such-group", dir.path()).expect_err("no group");
        assert_eq!(
            err.to_string(),
            "build users group 'sandoff-no-such-group' does not exist (run `sandoff setup` as root)"
        );
    }

    #[test]
    fn never_kills_root() {
        assert!(kill_user(0).is_err());
    }

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parent_pid("42 (sh) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("42 (a) b) 1 (c) S 9 1 1"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }
}
