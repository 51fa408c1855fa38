//! Where each derivation goes: the decision with every machine's true
//! state, the slot or local permit it needs, the load of Guix machines,
//! and the backoff of a machine that failed.

use crate::decide::{self, Decision, DrvFacts, Machine, MachineState, Placement};
use crate::derivation::Derivation;
use crate::remote::backoff::Backoff;
use crate::remote::slots::{Slot, SlotDir};
use std::time::{Instant, SystemTime};

use super::admin::{normalize_load, parse_status, STATUS_COMMAND};
use super::*;

/// What this host knows of `machine` at `now` without asking it: the slots
/// any sandoff process holds there, and whether it is in backoff.
pub fn observed_state<'m>(
    slots: &SlotDir,
    backoff: &Backoff,
    machine: &'m Machine,
    now: SystemTime,
) -> Result<MachineState<'m>, OffloadError> {
    Ok(MachineState {
        machine,
        slots_in_use: slots.in_use(machine)?,
        load: None,
        in_backoff: backoff.state(&machine.name)?.is_some_and(|b| b.active(now)),
        held_bytes: 0,
    })
}

impl Offloader {
    /// The machines with their slots in use and backoff now, and how much
    /// of `inputs` each is known to hold.
    fn states(&self, inputs: &InputClosure) -> Result<Vec<MachineState<'_>>, OffloadError> {
        let now = SystemTime::now();
        let mut states = Vec::with_capacity(self.machines.len());
        for m in &self.machines {
            let mut state = observed_state(&self.slots, &self.backoff, m, now)?;
            state.load = self.fresh_load(m);
            state.held_bytes = self.known_bytes(m, inputs);
            states.push(state);
        }
        Ok(states)
    }

    /// Decides where `drv` is built and takes what that needs, waiting
    /// while the decision is to postpone (or to build locally with every
    /// local permit taken). `placement` gives the local facts and policy.
    pub fn place(
        &self,
        placement: &Placement,
        drv: &Derivation,
        inputs: &InputClosure,
    ) -> Result<Placed<'_>, OffloadError> {
        loop {
            if let Attempt::Placed(p) = self.try_place(placement, drv, inputs)? {
                return Ok(p);
            }
            // Wait for a permit or slot of this process to be released, or
            // a while for those of others.
            let guard = self.lock_state();
            let _ = self.wake.wait_timeout(guard, RECHECK);
        }
    }

    /// One decision for `drv`, whose input closure is `inputs`, without
    /// waiting: [`Attempt::Wait`] when it is to be postponed, or built here
    /// with every local permit taken.
    pub fn try_place(
        &self,
        placement: &Placement,
        drv: &Derivation,
        inputs: &InputClosure,
    ) -> Result<Attempt<'_>, OffloadError> {
        let facts = DrvFacts::from_derivation(drv);
        loop {
            let _choice = self.slots.lock_choice()?;
            let states = self.states(inputs)?;
            let mut local = placement.local.clone();
            local.free_slot = self.lock_state().local_running < self.local_jobs;
            match decide::decide(&facts, &states, &local, &placement.policy) {
                Decision::Fail { reason } => return Ok(Attempt::Placed(Placed::Fail { reason })),
                Decision::Remote { machine, reason } => {
                    let m = self
                        .machines
                        .iter()
                        .find(|m| m.name == machine)
                        .expect("decide chose one of the machines it was given");
                    if m.overload_threshold().is_some() && self.fresh_load(m).is_none() {
                        // As Guix: look at the chosen machine's load before
                        // using it, then decide again knowing it (outside
                        // the choice lock: this takes a connection).
                        drop(_choice);
                        if let Err(e) = self.measure_load(m) {
                            if !e.retry_elsewhere() {
                                return Err(e);
                            }
                            self.record_failure(m, &e);
                        }
                        continue;
                    }
                    if let Some(slot) = self.slots.try_acquire(m)? {
                        tracing::debug!(machine = %m.name, slot = slot.index, %reason, "offloading");
                        return Ok(Attempt::Placed(Placed::Remote { machine: m, slot }));
                    }
                    // Taken between the count and now by a process that
                    // does not take the choice lock: decide again.
                }
                Decision::Local { reason } => {
                    let mut guard = self.lock_state();
                    if guard.local_running >= self.local_jobs {
                        return Ok(Attempt::Wait { reason });
                    }
                    guard.local_running += 1;
                    tracing::debug!(%reason, "building locally");
                    return Ok(Attempt::Placed(Placed::Local(LocalPermit {
                        offloader: self,
                    })));
                }
                Decision::Postpone { reason } => return Ok(Attempt::Wait { reason }),
            }
        }
    }

    /// The machine's normalized load, if measured in the last
    /// [`LOAD_TTL`].
    fn fresh_load(&self, machine: &Machine) -> Option<f64> {
        let loads = self
            .loads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loads
            .get(&machine.name)
            .filter(|(at, _)| at.elapsed() < LOAD_TTL)
            .map(|(_, load)| *load)
    }

    /// Measures the machine's normalized load (1-minute load average per
    /// processor, at most 1, as Guix) over a pooled or new connection,
    /// which stays pooled for the build.
    fn measure_load(&self, machine: &Machine) -> Result<(), OffloadError> {
        let conn = self.idle_or_connect(machine)?;
        let (out, _, _) = conn.session.run(STATUS_COMMAND)?;
        let (load, cores, _) = parse_status(&String::from_utf8_lossy(&out));
        // A machine that does not say counts as fully loaded, as in Guix.
        let normalized = normalize_load(load, cores).unwrap_or(1.0);
        tracing::info!(machine = %machine.name, "normalized load is {normalized:.2}");
        self.loads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(machine.name.clone(), (Instant::now(), normalized));
        self.put_idle(machine, conn);
        Ok(())
    }

    /// Puts `machine` into backoff after `error`.
    pub fn record_failure(&self, machine: &Machine, error: &OffloadError) {
        let line = error.to_string().replace('\n', " ");
        // Builds that were under way there when it went down all fail at
        // once: one outage, one failure, not a backoff grown by each.
        let now = SystemTime::now();
        if let Ok(Some(b)) = self.backoff.state(&machine.name) {
            if b.active(now) {
                tracing::warn!(machine = %machine.name, "{line} (already in backoff)");
                self.wake.notify_all();
                return;
            }
        }
        match self
            .backoff
            .record_failure(&machine.name, SystemTime::now(), &line)
        {
            Ok(b) => tracing::warn!(
                machine = %machine.name,
                failures = b.failures,
                "{line}; not using it for {} s",
                b.until
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .as_secs()
            ),
            Err(e) => tracing::warn!(machine = %machine.name, "{line}; cannot record it: {e}"),
        }
        // Whoever postponed may now choose another way.
        self.wake.notify_all();
    }

    /// Releases `slot` and wakes whoever waits for one.
    pub fn release(&self, slot: Slot) {
        drop(slot);
        self.wake.notify_all();
    }
}
