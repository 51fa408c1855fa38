//! What the store knows about a valid path.

use std::collections::BTreeSet;

use super::signature::Signature;
use super::{ContentAddress, Hash, StoreDir, StorePath};

/// The metadata of a valid store path, as in Nix's `ValidPathInfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    /// The derivation that produced it, if known.
    pub deriver: Option<StorePath>,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Store paths whose hash part occurs in the NAR (may include `path` itself).
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch.
    pub registration_time: i64,
    /// Whether this machine built or added it itself (Nix's "ultimately trusted").
    pub ultimate: bool,
    pub signatures: BTreeSet<Signature>,
    pub ca: Option<ContentAddress>,
}

impl ValidPathInfo {
    /// The narinfo fingerprint that signatures cover:
    /// `1;<path>;sha256:<nix32>;<narSize>;<ref>,<ref>...`.
    pub fn fingerprint(&self, dir: &StoreDir) -> String {
        let refs: Vec<String> = self.references.iter().map(|r| dir.display(r)).collect();
        format!(
            "1;{};{};{};{}",
            dir.display(&self.path),
            self.nar_hash.to_nix32_prefixed(),
            self.nar_size,
            refs.join(",")
        )
    }
}
