//! The serve protocol's structured values, shared by the client
//! ([`super::client`]) and the server ([`super::serve`]): the
//! `BasicDerivation` of `BuildDerivation`, build options and `BuildResult`,
//! as Nix 2.8 (protocol 2.7) writes them. See `offload.md` §4.4.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use crate::derivation::Derivation;
use crate::store::wire::WireError;
use crate::store::{StoreDir, StorePath};

/// Why a protocol value could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed or ended, or a value broke the wire rules.
    #[error("{what}")]
    Wire {
        /// What was being read or written.
        what: &'static str,
        /// The cause.
        #[source]
        source: WireError,
    },
    /// A value was read but makes no sense.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

/// Build options sent with `BuildPaths` and `BuildDerivation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Seconds without log output before the build is killed; 0 = no limit.
    pub max_silent_time: u64,
    /// Seconds before the build is killed; 0 = no limit.
    pub build_timeout: u64,
    /// Bytes of log before the build is killed; 0 = no limit (≥ 2.2).
    pub max_log_size: u64,
    /// Keep the build directory of a failed build (≥ 2.7).
    pub keep_failed: bool,
}

/// `BuildResult::status`, numbered as Nix's `BuildResult::Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

/// The reply to `BuildDerivation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildResult {
    /// How it ended.
    pub status: BuildStatus,
    /// Why it failed (empty on success).
    pub error_msg: String,
    /// ≥ 2.3: how many times it was built.
    pub times_built: u64,
    /// ≥ 2.3: whether repeated builds differed.
    pub non_deterministic: bool,
    /// ≥ 2.3: start time, seconds since the epoch.
    pub start_time: u64,
    /// ≥ 2.3: stop time, seconds since the epoch.
    pub stop_time: u64,
    /// ≥ 2.6: the outputs built, by output name.
    pub built_outputs: BTreeMap<String, StorePath>,
}

/// Writes `drv` as a `BasicDerivation` (outputs, `input_srcs` in place of
/// the derivation's inputs, platform, builder, args, env).
pub fn write_basic_derivation(
    _w: &mut dyn Write,
    _dir: &StoreDir,
    _drv: &Derivation,
    _input_srcs: &BTreeSet<StorePath>,
) -> Result<(), ProtocolError> {
    todo!("helper B")
}

/// Reads a `BasicDerivation` for the derivation named `drv_name` (its
/// `.drv` path's name without `.drv`); its `input_derivations` are empty.
pub fn read_basic_derivation(
    _r: &mut dyn Read,
    _dir: &StoreDir,
    _drv_name: &str,
) -> Result<Derivation, ProtocolError> {
    todo!("helper B")
}

impl BuildOptions {
    /// Writes the options as protocol minor version `minor` has them.
    pub fn write(&self, _w: &mut dyn Write, _minor: u64) -> Result<(), ProtocolError> {
        todo!("helper B")
    }

    /// Reads the options as protocol minor version `minor` has them.
    pub fn read(_r: &mut dyn Read, _minor: u64) -> Result<BuildOptions, ProtocolError> {
        todo!("helper B")
    }
}

impl BuildResult {
    /// Writes the result as protocol minor version `minor` has it.
    /// `drv_hash` (the derivation's hashDerivationModulo, `sha256:<base16>`)
    /// keys the realisations of 2.6/2.7.
    pub fn write(
        &self,
        _w: &mut dyn Write,
        _minor: u64,
        _dir: &StoreDir,
        _drv_hash: &str,
    ) -> Result<(), ProtocolError> {
        todo!("helper B")
    }

    /// Reads a result as protocol minor version `minor` has it.
    pub fn read(
        _r: &mut dyn Read,
        _minor: u64,
        _dir: &StoreDir,
    ) -> Result<BuildResult, ProtocolError> {
        todo!("helper B")
    }
}
