//! The server side of Nix's serve protocol (`nix-store --serve [--write]`),
//! version 2.7 as in Nix 2.8, over any `Read`/`Write` pair.
//!
//! The client speaks first: `SERVE_MAGIC_1`, then (after our magic and
//! version) its own version; then commands until EOF. Each reply is flushed
//! because the client waits for it before sending more.
//!
//! # Building
//!
//! `BuildDerivation` and `BuildPaths` need `--write` (as Nix: "building
//! paths is not allowed" ends the session) and build in the local sandbox
//! ([`crate::build`], placed with [`Placement::local_only`](crate::decide::Placement::local_only)), as the build
//! users of [`BuildSetup::pool`]. A build that fails is an answer, never the
//! end of the session; only protocol errors end it.
//!
//! - `BuildDerivation` (what Nix's `ssh://` store and sandoff's client use):
//!   the `BasicDerivation` arrives without its `.drv`, its `inputSrcs` being
//!   the whole input closure. Before building, each output path must fit the
//!   derivation's name, a fixed output's path must be the one its hash gives
//!   (input-addressed hash parts cannot be checked without the original
//!   `.drv`: the client is trusted for them, as Nix trusts a trusted user),
//!   and every input must be valid here, else the answer is `MiscFailure`
//!   naming what is wrong. Outputs all valid: `AlreadyValid`. After a build
//!   each output is signed with this machine's key (`<state>/keys/signing-key.sec`,
//!   see [`Keyring`](crate::store::keyring::Keyring)); without a key the build still succeeds, with a
//!   warning, and the client refuses the unsigned outputs.
//! - Statuses follow Nix 2.8's `DerivationGoal::buildDone`: builder failed
//!   → `PermanentFailure` (`TransientFailure` for a fixed-output
//!   derivation, which may depend on the network), killed by
//!   `maxSilentTime`/`buildTimeout` → `TimedOut`, the builder succeeded but
//!   an output is refused (missing, not owned by the build user, wrong
//!   fixed hash, an output check) → `OutputRejected`, anything else →
//!   `MiscFailure`. The message is the build error, with the last lines
//!   of the log.
//! - The `drvHash` keying the 2.6/2.7 realisations is, as Nix 2.8's
//!   `staticOutputHashes`, the hashDerivationModulo of the
//!   `BasicDerivation` as received (its inputs are all sources) with its
//!   outputs masked, in `sha256:<base16>` form; it is not the hash of the
//!   original `.drv`, which the server never sees.
//! - `maxLogSize` and the repeat options are read and ignored: builds here
//!   have no log size limit and are never repeated; `keepFailed` keeps the
//!   build directory on the server.
//! - `BuildPaths` takes `path` or `path!out,...` (the output selection is
//!   accepted but every output of a derivation is built), realises them with
//!   [`crate::build::realise`] (signing the outputs of every derivation it
//!   built), and answers `0`, or Nix's exit status and a message: 101 when
//!   a build timed out, 100 when a build failed, 1 for anything else (e.g.
//!   a path that is not valid here, since there are no substituters).
//! - The build log streams, line by line, to [`BuildSetup::log`] (the
//!   server's stderr, which ssh carries to the client) and to the server's
//!   own log file (`<state>/log/<drv>`).
//! - Client gone: while a build runs, [`BuildSetup::hangup`] (stdin) is
//!   watched; when it hangs up, every child process of this process (the
//!   sandboxed builders: their PID namespaces die with them) is killed until
//!   the build returns, so the build ends as a failure and cleans up as
//!   usual; writing its answer then fails and ends the session. A build still
//!   waiting for a build user or an output lock is killed only once it
//!   starts.
//!
//! # Queries
//!
//! - `QueryValidPaths`: `lock` is accepted and does nothing, since sandoff
//!   never collects garbage, so no temporary root is needed to keep a path;
//!   `substitute` does nothing, since there are no substituters.
//! - `QueryClosure` with `includeOutputs` also follows the valid outputs of
//!   every derivation in the closure, and their closures, as Nix's
//!   `computeFSClosure(includeOutputs)`.
//!
//! # Compression
//!
//! A sandoff client that wants the streams compressed says so on the
//! command line (`sandoff serve --compress zstd:LEVEL`, a stock Nix client
//! never does): after the handshake, stdin is read as zstd frames and each
//! reply is one frame, flushed as it is now ([`crate::remote::compress`]).
//! The checks are the same either way, on the uncompressed bytes.
//!
//! # Files
//!
//! `dispatch` runs the session (handshake, the command loop) and answers
//! the commands that query and transfer paths; `builds` answers the two
//! that build, with what they need (checking a `BasicDerivation`, mapping
//! build errors to Nix's statuses, watching for the client to go away).

use std::io::Write;
use std::os::fd::BorrowedFd;

use crate::sandbox::{Limits, UserError, UserPool};
use crate::serve_protocol::{self, ProtocolError};
use crate::store::export::ExportError;
use crate::store::local::StoreError;
use crate::store::nar::NarError;
use crate::store::signature::SignatureError;
use crate::store::wire::WireError;
use crate::store::{HashError, PathError};

pub use crate::serve_protocol::{SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION};

mod builds;
mod dispatch;

pub use dispatch::{serve, serve_with_builds};

/// How the server may use its store.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Allow commands that add paths (`ImportPaths`, `AddToStoreNar`), as `--write`.
    pub write: bool,
    /// Speak zstd after the handshake, compressing at this level
    /// (`--compress zstd:LEVEL`, asked by a sandoff client; see
    /// [`crate::remote::compress`] for where the compressed streams start).
    pub zstd_level: Option<i32>,
}

/// What building (`BuildDerivation`, `BuildPaths`) needs from the caller.
pub struct BuildSetup<'a> {
    /// The build users, or why there are none: then only derivations whose
    /// outputs are valid already succeed, and builds fail with the reason.
    pub pool: Result<&'a UserPool, std::sync::Arc<UserError>>,
    /// Where each log line goes as the build runs, besides the log file:
    /// the server's stderr, which ssh carries to the client.
    pub log: &'a mut (dyn Write + Send),
    /// Watched while a build runs: when it hangs up (the client went away)
    /// the build is killed. Killing means every child process of this
    /// process, so set it only in a process that serves one session
    /// (`sandoff serve`), never in one that has other children.
    pub hangup: Option<BorrowedFd<'a>>,
    /// `NIX_BUILD_CORES` of each build.
    pub cores: u32,
    /// Resource bounds of each build.
    pub limits: Limits,
    /// Extra `impureEnvVars` names allowed (see [`Options::impure_env_allow`](crate::build::Options::impure_env_allow)).
    pub impure_env_allow: Vec<String>,
}

/// Why a serve session ended in failure.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The client did not open with `SERVE_MAGIC_1`.
    #[error("protocol mismatch: expected magic {SERVE_MAGIC_1:#x}, got {got:#x}")]
    BadMagic { got: u64 },
    /// Reading or writing a protocol value failed.
    #[error("serve protocol: {what}")]
    Wire {
        what: &'static str,
        #[source]
        source: WireError,
    },
    /// A path in a request is not a store path of this store.
    #[error("bad store path in request")]
    BadPath(#[source] PathError),
    /// A path the client asked for is not valid here.
    #[error("path '{path}' is not valid")]
    NotValid { path: String },
    /// A command that adds paths, without `--write`.
    #[error("{command}: importing paths is not allowed (the server was started without --write)")]
    ReadOnly { command: &'static str },
    /// A known command this server does not implement (none since
    /// building exists; kept for callers that match on it).
    #[error("serve command {command} ({number}) is not supported yet")]
    Unsupported { command: &'static str, number: u64 },
    /// A build command without `--write`.
    #[error("{command}: building paths is not allowed (the server was started without --write)")]
    BuildNotAllowed { command: &'static str },
    /// `BuildDerivation` of a path that is not a `.drv`.
    #[error("BuildDerivation: '{path}' is not a derivation (a .drv store path)")]
    NotDerivation { path: String },
    /// A structured protocol value (derivation, options) was malformed.
    #[error("serve protocol")]
    Protocol(#[source] ProtocolError),
    /// A command number Nix does not know either.
    #[error("unknown serve command {0}")]
    UnknownCommand(u64),
    /// `AddToStoreNar` with a malformed NAR hash.
    #[error("AddToStoreNar of '{path}': bad NAR hash")]
    BadHash {
        path: String,
        #[source]
        source: HashError,
    },
    /// `AddToStoreNar` with a malformed signature.
    #[error("AddToStoreNar of '{path}': bad signature")]
    BadSignature {
        path: String,
        #[source]
        source: SignatureError,
    },
    /// `AddToStoreNar` with a malformed content address.
    #[error("AddToStoreNar of '{path}': bad content address '{ca}'")]
    BadCa { path: String, ca: String },
    /// The NAR of `AddToStoreNar` was shorter than the announced `narSize`.
    #[error("AddToStoreNar of '{path}': NAR ended after {consumed} of {nar_size} announced bytes")]
    NarSizeMismatch {
        path: String,
        nar_size: u64,
        consumed: u64,
    },
    /// The store failed.
    #[error("store")]
    Store(#[source] Box<StoreError>),
    /// Serialising a path failed.
    #[error("dumping '{path}'")]
    Dump {
        path: String,
        #[source]
        source: Box<NarError>,
    },
    /// Importing or exporting an archive failed.
    #[error("export archive")]
    Export(#[source] Box<ExportError>),
}

impl serve_protocol::WireContext for ServeError {
    fn wire(what: &'static str, source: WireError) -> ServeError {
        ServeError::Wire { what, source }
    }
}

// Boxed so that every `Result` in the server stays small.
impl From<StoreError> for ServeError {
    fn from(e: StoreError) -> ServeError {
        ServeError::Store(Box::new(e))
    }
}

impl From<ExportError> for ServeError {
    fn from(e: ExportError) -> ServeError {
        ServeError::Export(Box::new(e))
    }
}

#[cfg(test)]
mod test_support {
    use crate::store::local::LocalStore;
    use crate::store::{StoreLocation, StorePath};

    pub(super) fn open(tmp: &tempfile::TempDir) -> LocalStore {
        // The tests' `.drv` files are placeholders, not derivations.
        LocalStore::open_with_drv_check(
            StoreLocation::new(Default::default(), tmp.path().join("root")),
            Box::new(crate::store::local::AcceptAnyDrv),
        )
        .expect("open store")
    }

    pub(super) fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("store path")
    }
}
