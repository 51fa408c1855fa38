//! The client side of the serve protocol, over any [`Transport`]: a
//! sandoff server or a stock `nix-store --serve --write` (Nix 2.8).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Instant;

use super::protocol::{BuildOptions, BuildResult, ProtocolError};
use super::transport::Transport;
use crate::derivation::Derivation;
use crate::store::wire::WireError;
use crate::store::{StoreDir, StorePath, ValidPathInfo};

/// Why a serve session failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server did not answer the handshake with `SERVE_MAGIC_2`
    /// (a shell banner? not a serve server?); `got` holds what it sent.
    #[error("the remote program does not speak the serve protocol (got {got:?})")]
    Handshake { got: String },
    /// The server speaks a major version other than 2, or older than 2.4.
    #[error("unsupported serve protocol version {major}.{minor}")]
    Version { major: u64, minor: u64 },
    /// Reading or writing failed: the link or the server is gone.
    #[error("serve protocol: {what}")]
    Wire {
        what: &'static str,
        #[source]
        source: WireError,
    },
    /// A structured value was malformed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The server refused a request (e.g. ImportPaths did not answer 1).
    #[error("the server refused {what}: {reason}")]
    Refused { what: &'static str, reason: String },
    /// The reply did not come before the deadline.
    #[error("no reply to {what} before the deadline")]
    TimedOut { what: &'static str },
}

/// An open serve session.
pub struct ServeClient<T: Transport> {
    transport: T,
    /// Negotiated minor version (major is 2).
    minor: u64,
    dir: StoreDir,
}

impl<T: Transport> ServeClient<T> {
    /// Opens a session: handshake, offering protocol 2.7.
    pub fn open(_transport: T, _dir: StoreDir) -> Result<ServeClient<T>, ClientError> {
        todo!("helper B")
    }

    /// The negotiated minor version.
    pub fn minor(&self) -> u64 {
        self.minor
    }

    /// The store directory paths are named in.
    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    /// The transport, to drain its log or close it.
    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    /// `QueryValidPaths`: which of `paths` are valid on the server. `lock`
    /// asks it to protect them from garbage collection for the session.
    pub fn query_valid_paths(
        &mut self,
        _paths: &BTreeSet<StorePath>,
        _lock: bool,
        _substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        todo!("helper B")
    }

    /// `QueryPathInfos`: what the server knows of `paths` (unknown ones are
    /// left out). `registration_time` is 0 and `ultimate` false: the
    /// protocol does not carry them.
    pub fn query_path_infos(
        &mut self,
        _paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<ValidPathInfo>, ClientError> {
        todo!("helper B")
    }

    /// `DumpStorePath`: the NAR of `path`, handed to `read_nar`, which must
    /// read exactly one NAR from the reader it gets (e.g.
    /// `LocalStore::stage_nar`).
    pub fn dump_store_path<R, E>(
        &mut self,
        _path: &StorePath,
        _read_nar: impl FnOnce(&mut dyn Read) -> Result<R, E>,
    ) -> Result<Result<R, E>, ClientError> {
        todo!("helper B")
    }

    /// `ImportPaths`: `write_export` writes one export stream (paths in
    /// dependency order, then the end marker); the server must answer 1.
    pub fn import_paths<E>(
        &mut self,
        _write_export: impl FnOnce(&mut dyn Write) -> Result<(), E>,
    ) -> Result<Result<(), E>, ClientError> {
        todo!("helper B")
    }

    /// `QueryClosure`.
    pub fn query_closure(
        &mut self,
        _paths: &BTreeSet<StorePath>,
        _include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        todo!("helper B")
    }

    /// `BuildDerivation`: builds `drv` (at `drv_path`) with `input_srcs` as
    /// its whole input closure, copying the server's log into `log` as it
    /// comes, until the result or `deadline`.
    pub fn build_derivation(
        &mut self,
        _drv_path: &StorePath,
        _drv: &Derivation,
        _input_srcs: &BTreeSet<StorePath>,
        _options: &BuildOptions,
        _log: &mut dyn Write,
        _deadline: Option<Instant>,
    ) -> Result<BuildResult, ClientError> {
        todo!("helper B")
    }

    /// `BuildPaths` of `.drv` paths valid on the server: `Ok(())`, or the
    /// status and message it answered.
    pub fn build_paths(
        &mut self,
        _drvs: &[StorePath],
        _options: &BuildOptions,
        _log: &mut dyn Write,
        _deadline: Option<Instant>,
    ) -> Result<Result<(), (u64, String)>, ClientError> {
        todo!("helper B")
    }

    /// Ends the session, giving the transport back.
    pub fn into_transport(self) -> T {
        self.transport
    }
}
