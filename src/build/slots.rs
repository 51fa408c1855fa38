//! The local job slots (`-j`) of a graph built without machines, taken by
//! each build right before its builder starts rather than before it is
//! prepared.
//!
//! A build's preparation (the outputs' locks, the log, the input closure,
//! a build user, its directories) takes about a millisecond that is not
//! the builder's. [`super::graph`] starts up to `jobs` more workers than
//! there are slots, so that the next builds prepare while the current
//! builders run, and each worker waits here for a slot before its
//! builder: at most `jobs` builders run at once, as before, with nothing
//! but the sandbox itself between one builder's end and the next one's
//! start. When the graph stops (a failure without `--keep-going`) it
//! closes the slots, and the prepared builds that wait for one are not
//! started (as Nix starts no new build then).

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// `jobs` slots shared by a graph's workers.
#[derive(Debug)]
pub struct JobSlots {
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug)]
struct State {
    free: usize,
    closed: bool,
}

/// One slot, held until dropped.
#[derive(Debug)]
pub struct JobSlot<'s> {
    slots: &'s JobSlots,
}

impl JobSlots {
    /// `jobs` free slots (at least one).
    pub fn new(jobs: usize) -> JobSlots {
        JobSlots {
            state: Mutex::new(State {
                free: jobs.max(1),
                closed: false,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two plain fields, consistent after any panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a free slot; `None` once the slots are closed.
    pub fn acquire(&self) -> Option<JobSlot<'_>> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if state.free > 0 {
                state.free -= 1;
                return Some(JobSlot { slots: self });
            }
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// From now on no slot is given; the waiters get `None`. Slots held
    /// stay held until their builds drop them.
    pub fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }
}

impl Drop for JobSlot<'_> {
    fn drop(&mut self) {
        self.slots.lock().free += 1;
        self.slots.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn at_most_jobs_slots_are_held_at_once() {
        let slots = JobSlots::new(2);
        let held = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let slot = slots.acquire().expect("open");
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    held.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn closing_turns_away_waiters_and_later_comers() {
        let slots = JobSlots::new(1);
        let held = slots.acquire().expect("open");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| slots.acquire().is_none());
            std::thread::sleep(Duration::from_millis(20));
            slots.close();
            assert!(waiter.join().expect("no panic"), "a waiter is turned away");
        });
        drop(held);
        assert!(
            slots.acquire().is_none(),
            "a freed slot is not given after close"
        );
    }

    #[test]
    fn zero_jobs_means_one_slot() {
        let slots = JobSlots::new(0);
        let one = slots.acquire();
        assert!(one.is_some());
    }
}
