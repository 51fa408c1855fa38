//! `--check`: build a derivation whose outputs are valid once more and
//! tell whether the result is bit-identical, as Nix's and Guix's `--check`.
//!
//! # Choices, against Nix 2.8 (`LocalDerivationGoal::registerOutputs` with
//! `bmCheck`)
//!
//! - Only the derivations named on the command line are checked; their
//!   inputs are realised as usual (built if invalid, else left alone).
//! - All outputs must be valid, else the check fails before building with
//!   Nix's "some outputs of '…' are not valid, so checking is not
//!   possible".
//! - The new outputs are compared by NAR hash with the registered ones;
//!   nothing registered changes (Nix also marks the old paths `ultimate`;
//!   sandoff leaves their registration exactly as it was).
//! - On a difference the check fails with Nix's message "derivation '…' may
//!   not be deterministic: output '…' differs", naming every output that
//!   differs. With `--keep-failed` the new copy of each differing output is
//!   kept as `<output>.check` beside the output in the real store directory
//!   (Nix's `checkSuffix`), canonical and root-owned as the output itself,
//!   not registered, replacing an older one; the message then adds
//!   "from '<output>.check'", as Nix's. As for any failure with
//!   `--keep-failed`, the build directory is kept too (Nix keeps its
//!   `tmpDir` as well).
//! - The log of the check replaces the derivation's log, as Nix's.
//! - A machines file does not matter: the check is decided as if there
//!   were none ([`decide_here`]), so a derivation this machine cannot build
//!   (another system) fails the check, saying why.
//! - A check is always built here, never offloaded: a machine registers
//!   what it builds in its own store and sends it back as valid paths. Nix's
//!   serve protocol has no build mode to ask a machine for a check
//!   (`BuildDerivation` sends time and log limits, repeats and
//!   `keepFailed` only), so `sandoff serve` has none to honour either.

use std::fs;
use std::path::PathBuf;

use super::BuildErrorKind;
use crate::decide::{Decision, Placement, Policy};
use crate::derivation::Derivation;
use crate::store::local::{LocalStore, StagedPath};
use crate::store::{StorePath, ValidPathInfo};

/// Whether a build registers its outputs or compares them with the valid
/// ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Build and register (the outputs are not all valid).
    Build,
    /// Build again and compare (`--check`; the outputs are all valid).
    Check,
}

/// Whether `drv` can be checked here: `placement` without its machines
/// (`Local`, or `Fail` saying why not, e.g. another system).
pub fn decide_here(placement: &Placement, drv: &Derivation) -> Decision {
    let here = Placement {
        machines: Vec::new(),
        local: placement.local.clone(),
        policy: Policy {
            local_only: true,
            ..placement.policy
        },
    };
    here.decide(drv)
}

/// An output whose new build differs from the registered path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The output's real path.
    pub output: PathBuf,
    /// Where the new build was kept (`--keep-failed`).
    pub kept: Option<PathBuf>,
}

/// Compares each staged new output with the valid path of the same name
/// (by NAR hash). Identical: `Ok`, the staged copies are dropped. Any
/// difference: [`BuildErrorKind::NotDeterministic`], after keeping the
/// differing copies as `<output>.check` when `keep`.
pub fn compare_outputs(
    store: &LocalStore,
    drv_path: &StorePath,
    staged: Vec<(StagedPath, ValidPathInfo)>,
    keep: bool,
) -> Result<(), BuildErrorKind> {
    let loc = store.location();
    let mut differences = Vec::new();
    for (mut new, info) in staged {
        let old = store
            .query_path_info(&info.path)?
            .ok_or(BuildErrorKind::CheckInvalid)?;
        if old.nar_hash == new.nar_hash {
            continue;
        }
        let output = loc.real_path(&info.path);
        tracing::info!(
            drv = %loc.logical(drv_path),
            output = %output.display(),
            "check: the new build differs"
        );
        let kept = if keep {
            let mut name = output.clone().into_os_string();
            name.push(".check");
            let dst = PathBuf::from(name);
            keep_copy(&mut new, &dst)?;
            Some(dst)
        } else {
            None
        };
        differences.push(Difference { output, kept });
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(BuildErrorKind::NotDeterministic { differences })
    }
}

/// Moves the staged copy `new` to `dst` (replacing what is there), canonical.
fn keep_copy(new: &mut StagedPath, dst: &PathBuf) -> Result<(), BuildErrorKind> {
    let io_err = |action: &'static str| {
        let path = dst.clone();
        move |source| BuildErrorKind::Io {
            action,
            path,
            source,
        }
    };
    match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dst).map_err(io_err("remove"))?,
        Ok(_) => fs::remove_file(dst).map_err(io_err("remove"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read")(e)),
    }
    new.canonicalise()?;
    fs::rename(&new.tmp, dst).map_err(io_err("move the new build to"))?;
    // Moved: dropping the staged copy must not remove it.
    new.tmp = PathBuf::new();
    Ok(())
}
