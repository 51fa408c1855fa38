//! Network namespaces made ahead of time, so that creating one is not on a
//! build's path.
//!
//! A new network namespace is the dearest part of a sandbox to create (its
//! loopback device and sysctl tables: 9-12% of the CPU samples of a run of
//! trivial builds here). Every build still gets a namespace of its own that nothing else
//! ever used, with only `lo`, up: a thread of this process keeps
//! [`READY`] of them, each made by `unshare(CLONE_NEWNET)` on that thread
//! and held by an open descriptor, and the build's child joins one with
//! `setns` (at its loopback step) instead of cloning into a new one. When
//! none is ready, or they cannot be made (not root), the child makes its
//! own as before.
//!
//! The same thread also ends what a finished build leaves: the build's
//! runner holds the builder's mount namespace by a descriptor and hands it
//! over here once the builder is reaped ([`release_later`]), so that
//! unmounting the sandbox's tree (its tmpfs file systems, `/proc`, the
//! binds) happens on this thread, not in the builder's exit that the next
//! build waits for.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, OnceLock};

use super::linux::{unshare_network, LinuxSyscalls};
use super::syscall::Syscall;

/// How many namespaces are kept ready: one for the next build, one for a
/// build starting on another worker meanwhile.
const READY: usize = 2;

struct Pool {
    state: Mutex<State>,
    wanted: Condvar,
}

#[derive(Default)]
struct State {
    ready: VecDeque<OwnedFd>,
    /// Namespaces of finished builds, to be closed on the thread.
    released: Vec<OwnedFd>,
    /// Making one failed: no more attempts in this process.
    failed: bool,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// A fresh network namespace (`lo` up), if one is ready; it starts the
/// thread that makes them on first use. `None`: the caller makes its own.
pub fn take() -> Option<OwnedFd> {
    let pool = pool();
    let mut state = pool.state.lock().ok()?;
    if state.failed {
        return None;
    }
    let fd = state.ready.pop_front();
    pool.wanted.notify_one();
    fd
}

/// Closes `fd`, a namespace of a finished build, on the thread of this
/// module (at once here when that thread is not running).
pub fn release_later(fd: OwnedFd) {
    let pool = pool();
    let Ok(mut state) = pool.state.lock() else {
        return;
    };
    if state.failed {
        drop(state);
        drop(fd);
        return;
    }
    state.released.push(fd);
    pool.wanted.notify_one();
}

/// The pool, its thread started on first use.
fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("sandoff-netns".to_owned())
            // `wait`, not `get`: this closure returns (and POOL is set)
            // only after the thread was spawned.
            .spawn(|| make_ahead(POOL.wait()));
        let state = State {
            failed: spawned.is_err(),
            ..State::default()
        };
        Pool {
            state: Mutex::new(state),
            wanted: Condvar::new(),
        }
    })
}

/// The making thread: keeps [`READY`] namespaces until making one fails,
/// and closes the released ones.
fn make_ahead(pool: &Pool) {
    loop {
        let (released, more) = {
            let Ok(state) = pool.state.lock() else { return };
            let Ok(mut state) = pool
                .wanted
                .wait_while(state, |s| s.ready.len() >= READY && s.released.is_empty())
            else {
                return;
            };
            let more = state.ready.len() < READY;
            (std::mem::take(&mut state.released), more)
        };
        // Outside the lock: this is the unmounting.
        drop(released);
        if !more {
            continue;
        }
        let made = make();
        let Ok(mut state) = pool.state.lock() else {
            return;
        };
        match made {
            Ok(fd) => state.ready.push_back(fd),
            Err(e) => {
                tracing::debug!("cannot make network namespaces ahead of builds: {e}");
                state.failed = true;
                return;
            }
        }
    }
}

/// Moves this thread into a new network namespace, brings its loopback up
/// and returns a descriptor that keeps it alive.
fn make() -> std::io::Result<OwnedFd> {
    unshare_network().map_err(|e| e.to_io())?;
    LinuxSyscalls.loopback_up().map_err(|e| e.to_io())?;
    // O_CLOEXEC (std's default): no builder ever holds one.
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}
