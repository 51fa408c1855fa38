//! What each machine is known to hold: the store paths this process saw
//! valid there (in a `QueryValidPaths` answer), sent there, or had built
//! there. Placement prefers, among equally good machines, the one that
//! holds more of a derivation's input closure (fewer bytes to send); a
//! chain of derivations thus stays on the machine that built its first
//! link. The knowledge is a hint, never trusted for correctness: before a
//! build the machine is asked again which inputs it lacks. It is learned
//! for free from the sessions builds open anyway; a machine never asked
//! counts as holding nothing ([`Offloader::query_held`] asks on purpose,
//! for `sandoff decide --ask-machines`).

use std::collections::{BTreeMap, BTreeSet};

use super::build::query_missing;
use super::{OffloadError, Offloader};
use crate::decide::Machine;
use crate::store::local::{LocalStore, StoreError};
use crate::store::StorePath;

/// A derivation's input closure with each path's NAR size: what a machine
/// lacking all of it would receive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputClosure {
    sizes: BTreeMap<StorePath, u64>,
}

impl InputClosure {
    /// The closure of `inputs` (valid in `store`) with their NAR sizes.
    pub fn of(
        store: &LocalStore,
        inputs: &BTreeSet<StorePath>,
    ) -> Result<InputClosure, StoreError> {
        let mut sizes = BTreeMap::new();
        for p in store.closure(inputs)? {
            let size = store.query_path_info(&p)?.map_or(0, |i| i.nar_size);
            sizes.insert(p, size);
        }
        Ok(InputClosure { sizes })
    }

    /// An empty closure (nothing to weigh machines by).
    pub fn none() -> InputClosure {
        InputClosure::default()
    }

    /// The paths.
    pub fn paths(&self) -> impl Iterator<Item = &StorePath> {
        self.sizes.keys()
    }

    /// The bytes of the paths in `held`.
    pub fn bytes_in(&self, held: &BTreeSet<StorePath>) -> u64 {
        // Walk the smaller of the two.
        if held.len() < self.sizes.len() {
            held.iter().filter_map(|p| self.sizes.get(p)).sum()
        } else {
            self.sizes
                .iter()
                .filter(|(p, _)| held.contains(*p))
                .map(|(_, s)| s)
                .sum()
        }
    }
}

impl Offloader {
    /// Notes that `machine` holds `paths`.
    pub(super) fn learn<'p>(
        &self,
        machine: &Machine,
        paths: impl IntoIterator<Item = &'p StorePath>,
    ) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        known
            .entry(machine.name.clone())
            .or_default()
            .extend(paths.into_iter().cloned());
    }

    /// The bytes of `inputs` that `machine` is known to hold.
    pub(super) fn known_bytes(&self, machine: &Machine, inputs: &InputClosure) -> u64 {
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        known
            .get(&machine.name)
            .map_or(0, |held| inputs.bytes_in(held))
    }

    /// Asks `machine` which paths of `inputs` it holds (over a pooled or
    /// new connection, which stays pooled), learns the answer and returns
    /// their bytes.
    pub fn query_held(
        &self,
        machine: &Machine,
        inputs: &InputClosure,
    ) -> Result<u64, OffloadError> {
        let mut conn = self.idle_or_connect(machine)?;
        let closure: BTreeSet<StorePath> = inputs.paths().cloned().collect();
        let missing = query_missing(&mut conn, &closure, false)
            .map_err(super::build::lost(machine, "asking which inputs it holds"))?;
        let held: BTreeSet<StorePath> = closure.difference(&missing).cloned().collect();
        self.learn(machine, &held);
        self.put_idle(machine, conn);
        Ok(inputs.bytes_in(&held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreDir;

    fn sp(name: &str) -> StorePath {
        let hash = format!("{:0<32}", name.len());
        StoreDir::default()
            .parse_path(&format!("/nix/store/{}-{name}", hash.replace('0', "a")))
            .expect("path")
    }

    #[test]
    fn bytes_in_counts_only_the_closure_paths_held() {
        let c = InputClosure {
            sizes: [(sp("a"), 10), (sp("bb"), 200), (sp("ccc"), 3000)].into(),
        };
        assert_eq!(c.bytes_in(&BTreeSet::new()), 0);
        assert_eq!(c.bytes_in(&[sp("bb")].into()), 200);
        // Paths outside the closure weigh nothing, whichever side is walked.
        let many: BTreeSet<StorePath> = [sp("a"), sp("ccc"), sp("dddd"), sp("eeeee")].into();
        assert_eq!(c.bytes_in(&many), 3010);
        assert_eq!(InputClosure::none().bytes_in(&many), 0);
    }
}
