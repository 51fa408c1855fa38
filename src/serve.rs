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
//! ([`crate::build`], placed with [`Placement::local_only`]), as the build
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
//!   see [`Keyring`]); without a key the build still succeeds, with a
//!   warning, and the client refuses the unsigned outputs.
//! - Statuses follow Nix 2.8's `DerivationGoal::buildDone`: builder failed
//!   → `PermanentFailure` (`TransientFailure` for a fixed-output
//!   derivation, which may depend on the network), killed by
//!   `maxSilentTime`/`buildTimeout` → `TimedOut`, the builder succeeded but
//!   an output is refused (missing, not owned by the build user, wrong
//!   fixed hash) → `OutputRejected`, anything else → `MiscFailure`. The
//!   message is the build error, with the last lines of the log.
//! - The `drvHash` keying the 2.6/2.7 realisations is, as Nix 2.8's
//!   `staticOutputHashes`, the hashDerivationModulo of the
//!   `BasicDerivation` as received (its inputs are all sources) with its
//!   outputs masked, in `sha256:<base16>` form; it is not the hash of the
//!   original `.drv`, which the server never sees.
//! - `maxLogSize` and the repeat options are read and ignored (no log limit
//!   yet); `keepFailed` keeps the build directory on the server.
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

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::build::local::{realise_one, remove_stale_build_dirs, StepOutcome};
use crate::build::{self, builds_dir, BuildContext, BuildErrorKind, Event, Options};
use crate::decide::Placement;
use crate::derivation::modulo::hash_derivation_modulo;
use crate::derivation::{Derivation, DerivationKind, DerivationOutput};
use crate::sandbox::{BuildOutcome, Limits, UserError, UserPool};
use crate::serve_protocol::{
    self, BuildOptions, BuildResult, BuildStatus, ProtocolError, MAX_ITEMS, MAX_STRING,
};
use crate::store::export::{import_paths, write_export, ExportError, SignaturePolicy};
use crate::store::keyring::Keyring;
use crate::store::local::{LocalStore, StoreError};
use crate::store::nar::{self, NarError};
use crate::store::path::output_path_name;
use crate::store::signature::{Signature, SignatureError};
use crate::store::wire::{self, WireError};
use crate::store::{
    ContentAddress, Hash, HashAlgo, HashError, PathError, StorePath, ValidPathInfo,
};

use crate::serve_protocol::cmd;
pub use crate::serve_protocol::{SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION};

/// How the server may use its store.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Allow commands that add paths (`ImportPaths`, `AddToStoreNar`), as `--write`.
    pub write: bool,
}

/// What building (`BuildDerivation`, `BuildPaths`) needs from the caller.
pub struct BuildSetup<'a> {
    /// The build users, or why there are none: then only derivations whose
    /// outputs are valid already succeed, and builds fail with the reason.
    pub pool: Result<&'a UserPool, Arc<UserError>>,
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
    /// Extra `impureEnvVars` names allowed (see [`Options::impure_env_allow`]).
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

fn wire<T>(what: &'static str, r: Result<T, WireError>) -> Result<T, ServeError> {
    r.map_err(|source| ServeError::Wire { what, source })
}

/// Reads the next command number, or `None` at a clean EOF between commands.
fn read_command(r: &mut dyn Read) -> Result<Option<u64>, ServeError> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return wire("reading a command", Err(WireError::Truncated)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return wire("reading a command", Err(WireError::Io(e))),
        }
    }
    Ok(Some(u64::from_le_bytes(buf)))
}

/// One serve session on `store`: handshake, then commands until EOF. Builds
/// have no build users (they fail saying so) and log to this process's
/// stderr; see [`serve_with_builds`].
pub fn serve(
    store: &LocalStore,
    input: &mut dyn Read,
    output: &mut dyn Write,
    opts: ServeOptions,
) -> Result<(), ServeError> {
    let mut stderr = io::stderr();
    let setup = BuildSetup {
        pool: Err(Arc::new(UserError::NotGiven {
            why: "this server was started without build users",
        })),
        log: &mut stderr,
        hangup: None,
        cores: 1,
        limits: Limits::default(),
        impure_env_allow: Vec::new(),
    };
    serve_with_builds(store, input, output, opts, setup)
}

/// One serve session on `store`, building with `setup`: handshake, then
/// commands until EOF.
pub fn serve_with_builds(
    store: &LocalStore,
    input: &mut dyn Read,
    output: &mut dyn Write,
    opts: ServeOptions,
    setup: BuildSetup<'_>,
) -> Result<(), ServeError> {
    let magic = wire("reading the magic", wire::read_u64(input))?;
    if magic != SERVE_MAGIC_1 {
        return Err(ServeError::BadMagic { got: magic });
    }
    wire("writing the magic", wire::write_u64(output, SERVE_MAGIC_2))?;
    wire(
        "writing the version",
        wire::write_u64(output, SERVE_PROTOCOL_VERSION),
    )?;
    wire("flushing", output.flush().map_err(WireError::Io))?;
    let client_version = wire("reading the client version", wire::read_u64(input))?;
    tracing::debug!(client_version, "serve session opened");
    let mut server = Server {
        store,
        input,
        output,
        opts,
        client_minor: client_version & 0xff,
        setup,
        placement: None,
    };
    while let Some(command) = read_command(server.input)? {
        tracing::debug!(command, "serve command");
        server.command(command)?;
        wire("flushing", server.output.flush().map_err(WireError::Io))?;
    }
    Ok(())
}

struct Server<'a, 's> {
    store: &'a LocalStore,
    input: &'a mut dyn Read,
    output: &'a mut dyn Write,
    opts: ServeOptions,
    client_minor: u64,
    setup: BuildSetup<'s>,
    /// Made at the first build (it probes the host).
    placement: Option<Placement>,
}

impl Server<'_, '_> {
    fn command(&mut self, command: u64) -> Result<(), ServeError> {
        match command {
            cmd::QUERY_VALID_PATHS => {
                let _lock = wire("QueryValidPaths", wire::read_bool(self.input))?;
                let _substitute = wire("QueryValidPaths", wire::read_bool(self.input))?;
                let paths = self.read_paths("QueryValidPaths")?;
                let mut valid = BTreeSet::new();
                for p in paths {
                    if self.store.is_valid(&p)? {
                        valid.insert(p);
                    }
                }
                self.write_paths("QueryValidPaths", &valid)
            }
            cmd::QUERY_PATH_INFOS => {
                let paths = self.read_paths("QueryPathInfos")?;
                for p in &paths {
                    // Unknown paths are skipped, as Nix does.
                    if let Some(info) = self.store.query_path_info(p)? {
                        self.write_info(&info)?;
                    }
                }
                wire("QueryPathInfos", wire::write_bytes(self.output, b""))
            }
            cmd::DUMP_STORE_PATH => {
                let path = self.read_path("DumpStorePath")?;
                self.require_valid(&path)?;
                let loc = self.store.location();
                nar::dump(&loc.real_path(&path), self.output).map_err(|source| ServeError::Dump {
                    path: loc.logical(&path),
                    source: Box::new(source),
                })
            }
            cmd::IMPORT_PATHS => {
                self.require_write("ImportPaths")?;
                import_paths(
                    self.store,
                    self.input,
                    SignaturePolicy::AcceptUnchecked,
                    &mut |_| {},
                )?;
                wire("ImportPaths", wire::write_u64(self.output, 1))
            }
            cmd::EXPORT_PATHS => {
                let _sign = wire("ExportPaths", wire::read_u64(self.input))?;
                let paths = self.read_paths("ExportPaths")?;
                let loc = self.store.location();
                let mut entries = Vec::new();
                for p in self.store.topo_sort(&paths)? {
                    let info = self.require_valid(&p)?;
                    entries.push((info, loc.real_path(&p)));
                }
                write_export(
                    &mut *self.output,
                    &loc.dir,
                    entries.iter().map(|(i, p)| (i, p.as_path())),
                )?;
                Ok(())
            }
            cmd::QUERY_CLOSURE => {
                let include_outputs = wire("QueryClosure", wire::read_bool(self.input))?;
                let paths = self.read_paths("QueryClosure")?;
                for p in &paths {
                    self.require_valid(p)?;
                }
                let closure = closure(self.store, &paths, include_outputs)?;
                self.write_paths("QueryClosure", &closure)
            }
            cmd::ADD_TO_STORE_NAR => {
                self.require_write("AddToStoreNar")?;
                self.add_to_store_nar()
            }
            cmd::BUILD_PATHS => {
                self.require_build("BuildPaths")?;
                self.build_paths()
            }
            cmd::BUILD_DERIVATION => {
                self.require_build("BuildDerivation")?;
                self.build_derivation()
            }
            n => Err(ServeError::UnknownCommand(n)),
        }
    }

    fn add_to_store_nar(&mut self) -> Result<(), ServeError> {
        const WHAT: &str = "AddToStoreNar";
        let path = self.read_path(WHAT)?;
        let dir = self.store.location().dir.clone();
        let full = dir.display(&path);
        let deriver = wire(WHAT, wire::read_string(self.input, MAX_STRING))?;
        let deriver = if deriver.is_empty() {
            None
        } else {
            Some(dir.parse_path(&deriver).map_err(ServeError::BadPath)?)
        };
        let hash = wire(WHAT, wire::read_string(self.input, MAX_STRING))?;
        let nar_hash =
            Hash::parse_bare(&hash, HashAlgo::Sha256).map_err(|source| ServeError::BadHash {
                path: full.clone(),
                source,
            })?;
        let references = self.read_paths(WHAT)?;
        let registration_time = wire(WHAT, wire::read_u64(self.input))?;
        let nar_size = wire(WHAT, wire::read_u64(self.input))?;
        let ultimate = wire(WHAT, wire::read_bool(self.input))?;
        let signatures = wire(
            WHAT,
            wire::read_string_set(self.input, MAX_ITEMS, MAX_STRING),
        )?
        .iter()
        .map(|s| s.parse::<Signature>())
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|source| ServeError::BadSignature {
            path: full.clone(),
            source,
        })?;
        let ca = wire(WHAT, wire::read_string(self.input, MAX_STRING))?;
        let ca = if ca.is_empty() {
            None
        } else {
            Some(
                ca.parse::<ContentAddress>()
                    .map_err(|_| ServeError::BadCa {
                        path: full.clone(),
                        ca: ca.clone(),
                    })?,
            )
        };
        let info = ValidPathInfo {
            path,
            deriver,
            nar_hash,
            nar_size,
            references,
            registration_time: i64::try_from(registration_time).unwrap_or(i64::MAX),
            ultimate,
            signatures,
            ca,
        };
        let mut nar = (&mut *self.input).take(nar_size);
        if self.store.is_valid(&info.path)? {
            // Keep the stream in step: the NAR is there whether we want it or not.
            io::copy(&mut nar, &mut io::sink()).map_err(|e| ServeError::Wire {
                what: WHAT,
                source: e.into(),
            })?;
        } else {
            self.store.add_nar(&info, &mut nar)?;
        }
        if nar.limit() != 0 {
            return Err(ServeError::NarSizeMismatch {
                path: full,
                nar_size,
                consumed: nar_size - nar.limit(),
            });
        }
        wire(WHAT, wire::write_u64(self.output, 1))
    }

    fn require_build(&self, command: &'static str) -> Result<(), ServeError> {
        if self.opts.write {
            Ok(())
        } else {
            Err(ServeError::BuildNotAllowed { command })
        }
    }

    fn require_write(&self, command: &'static str) -> Result<(), ServeError> {
        if self.opts.write {
            Ok(())
        } else {
            Err(ServeError::ReadOnly { command })
        }
    }

    fn require_valid(&self, path: &StorePath) -> Result<ValidPathInfo, ServeError> {
        self.store
            .query_path_info(path)?
            .ok_or_else(|| ServeError::NotValid {
                path: self.store.location().logical(path),
            })
    }

    fn read_path(&mut self, what: &'static str) -> Result<StorePath, ServeError> {
        let s = wire(what, wire::read_string(self.input, MAX_STRING))?;
        self.store
            .location()
            .dir
            .parse_path(&s)
            .map_err(ServeError::BadPath)
    }

    fn read_paths(&mut self, what: &'static str) -> Result<BTreeSet<StorePath>, ServeError> {
        let n = wire(what, wire::read_count(self.input, MAX_ITEMS))?;
        (0..n).map(|_| self.read_path(what)).collect()
    }

    fn write_paths(
        &mut self,
        what: &'static str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(), ServeError> {
        let dir = &self.store.location().dir;
        wire(
            what,
            wire::write_strings(self.output, paths.iter().map(|p| dir.display(p))),
        )
    }

    fn write_info(&mut self, info: &ValidPathInfo) -> Result<(), ServeError> {
        const WHAT: &str = "QueryPathInfos";
        let dir = self.store.location().dir.clone();
        let deriver = info
            .deriver
            .as_ref()
            .map(|d| dir.display(d))
            .unwrap_or_default();
        wire(
            WHAT,
            wire::write_bytes(self.output, dir.display(&info.path).as_bytes()),
        )?;
        wire(WHAT, wire::write_bytes(self.output, deriver.as_bytes()))?;
        self.write_paths(WHAT, &info.references)?;
        // Nothing is compressed here, so the download is the NAR itself.
        wire(WHAT, wire::write_u64(self.output, info.nar_size))?;
        wire(WHAT, wire::write_u64(self.output, info.nar_size))?;
        if self.client_minor >= 4 {
            wire(
                WHAT,
                wire::write_bytes(self.output, info.nar_hash.to_nix32_prefixed().as_bytes()),
            )?;
            let ca = info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default();
            wire(WHAT, wire::write_bytes(self.output, ca.as_bytes()))?;
            wire(
                WHAT,
                wire::write_strings(self.output, info.signatures.iter().map(|s| s.to_string())),
            )?;
        }
        Ok(())
    }
}

impl Server<'_, '_> {
    /// `BuildDerivation`: reads the request, answers a [`BuildResult`].
    fn build_derivation(&mut self) -> Result<(), ServeError> {
        const WHAT: &str = "BuildDerivation";
        let drv_path = self.read_path(WHAT)?;
        let dir = self.store.location().dir.clone();
        let Some(drv_name) = drv_path.name().strip_suffix(".drv") else {
            return Err(ServeError::NotDerivation {
                path: dir.display(&drv_path),
            });
        };
        let drv = serve_protocol::read_basic_derivation(self.input, &dir, drv_name)
            .map_err(ServeError::Protocol)?;
        let options =
            BuildOptions::read(self.input, self.client_minor).map_err(ServeError::Protocol)?;
        tracing::info!(drv = %dir.display(&drv_path), "BuildDerivation");
        let result = self.build_basic(&drv_path, drv_name, &drv, &options);
        tracing::info!(status = ?result.status, error = %result.error_msg, "BuildDerivation done");
        result
            .write(
                self.output,
                self.client_minor,
                &dir,
                &basic_drv_hash(&drv, &dir),
            )
            .map_err(ServeError::Protocol)
    }

    /// Checks and builds a `BasicDerivation`; every failure is a result.
    fn build_basic(
        &mut self,
        drv_path: &StorePath,
        drv_name: &str,
        drv: &Derivation,
        options: &BuildOptions,
    ) -> BuildResult {
        let start_time = now();
        let mut result = BuildResult {
            status: BuildStatus::MiscFailure,
            error_msg: String::new(),
            times_built: 0,
            non_deterministic: false,
            start_time,
            stop_time: start_time,
            built_outputs: BTreeMap::new(),
        };
        let loc = self.store.location();
        let full = loc.logical(drv_path);
        if let Err(msg) = check_basic(self.store, &full, drv_name, drv) {
            result.error_msg = msg;
            return result;
        }
        let outputs = drv.output_paths();
        let mut all_valid = true;
        for p in outputs.values() {
            match self.store.is_valid(p) {
                Ok(v) => all_valid &= v,
                Err(e) => {
                    result.error_msg = format!("cannot build '{full}': {e}");
                    return result;
                }
            }
        }
        if all_valid {
            result.status = BuildStatus::AlreadyValid;
            result.built_outputs = outputs;
            return result;
        }
        if let Err(e) = remove_stale_build_dirs(&builds_dir(loc)) {
            tracing::warn!("cannot remove stale build directories: {e}");
        }
        let placement = placement_for(&mut self.placement, drv.required_system_features());
        let ctx = BuildContext {
            store: self.store,
            pool: self.setup.pool.clone(),
            options: build_options(options, &self.setup, true),
            placement,
            offload: None,
        };
        let log = &mut *self.setup.log;
        let hangup = self.setup.hangup;
        let outcome = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Event>();
            let forward = s.spawn(move || {
                for event in rx {
                    if let Event::Log { line, .. } = event {
                        log_line(log, &line);
                    }
                }
            });
            let outcome = while_watching(hangup, || realise_one(&ctx, drv_path, drv, &tx));
            drop(tx);
            if let Err(panic) = forward.join() {
                std::panic::resume_unwind(panic);
            }
            outcome
        });
        result.stop_time = now();
        match outcome {
            Ok(StepOutcome::Built) => {
                self.sign_outputs(&full, &outputs);
                result.status = BuildStatus::Built;
                result.times_built = 1;
                result.built_outputs = outputs;
            }
            // Another process built it while we waited for the locks.
            Ok(StepOutcome::Reused) => {
                result.status = BuildStatus::AlreadyValid;
                result.built_outputs = outputs;
            }
            Err(e) => {
                result.status = failure_status(&e.kind, drv.is_fixed_output());
                result.error_msg = e.to_string();
            }
        }
        result
    }

    /// Signs each output with this machine's key; without a key (or on any
    /// failure) warns, on the log too so that the client's user sees why
    /// the outputs will be refused.
    fn sign_outputs(&mut self, drv: &str, outputs: &BTreeMap<String, StorePath>) {
        let loc = self.store.location();
        let sign = || -> Result<(), String> {
            let key = Keyring::new(&loc.state)
                .secret_key()
                .map_err(|e| format!("{e} (run `sandoff setup` to create this machine's key)"))?;
            for p in outputs.values() {
                let info = self
                    .store
                    .query_path_info(p)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("'{}' is not valid", loc.logical(p)))?;
                let sig = key.sign_path(&info, &loc.dir).map_err(|e| e.to_string())?;
                self.store
                    .add_signatures(p, &BTreeSet::from([sig]))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        if let Err(e) = sign() {
            tracing::warn!(drv, "outputs not signed: {e}");
            let _ = writeln!(
                self.setup.log,
                "warning: the outputs of '{drv}' are not signed by this machine: {e}"
            );
            let _ = self.setup.log.flush();
        }
    }

    /// `BuildPaths`: realises the paths, answers `0` or a status and message.
    fn build_paths(&mut self) -> Result<(), ServeError> {
        const WHAT: &str = "BuildPaths";
        let specs = wire(WHAT, wire::read_strings(self.input, MAX_ITEMS, MAX_STRING))?;
        let options =
            BuildOptions::read(self.input, self.client_minor).map_err(ServeError::Protocol)?;
        let dir = &self.store.location().dir;
        let mut drvs = Vec::new();
        let mut others = Vec::new();
        for spec in &specs {
            // `path!out,dev`: every output is built, so the names only
            // need to be there.
            let path = spec.split_once('!').map_or(spec.as_str(), |(p, _)| p);
            let path = dir.parse_path(path).map_err(ServeError::BadPath)?;
            if path.is_derivation() {
                drvs.push(path);
            } else {
                others.push(path);
            }
        }
        let (status, msg) = self.realise_paths(&drvs, &others, &options);
        wire(WHAT, wire::write_u64(self.output, status))?;
        if status != 0 {
            wire(WHAT, wire::write_bytes(self.output, msg.as_bytes()))?;
        }
        Ok(())
    }

    /// Nix's exit status (0, 1, 100, 101) and message of building `drvs`
    /// and making sure `others` are valid.
    fn realise_paths(
        &mut self,
        drvs: &[StorePath],
        others: &[StorePath],
        options: &BuildOptions,
    ) -> (u64, String) {
        let loc = self.store.location();
        for p in others {
            match self.store.is_valid(p) {
                Ok(true) => {}
                Ok(false) => {
                    return (
                        1,
                        format!(
                        "path '{}' is not valid here and cannot be substituted (no substituters)",
                        loc.logical(p)
                    ),
                    )
                }
                Err(e) => return (1, e.to_string()),
            }
        }
        if drvs.is_empty() {
            return (0, String::new());
        }
        let mut features = BTreeSet::new();
        for d in drvs.iter() {
            if let Ok(drv) = build::graph::read_derivation(self.store, d) {
                features.extend(drv.required_system_features());
            }
        }
        let placement = placement_for(&mut self.placement, features);
        let ctx = BuildContext {
            store: self.store,
            pool: self.setup.pool.clone(),
            options: build_options(options, &self.setup, true),
            placement,
            offload: None,
        };
        let log = &mut *self.setup.log;
        let mut built = Vec::new();
        let realised = while_watching(self.setup.hangup, || {
            build::realise(&ctx, drvs, &mut |event| match event {
                Event::Log { line, .. } => log_line(log, line),
                Event::Built { drv, .. } => built.push(drv.clone()),
                _ => {}
            })
        });
        // Signed as BuildDerivation's outputs are, dependencies included.
        for drv in &built {
            match self.store.derivation_outputs(drv) {
                Ok(outputs) => self.sign_outputs(&loc.logical(drv), &outputs),
                Err(e) => tracing::warn!(drv = %loc.logical(drv), "outputs not signed: {e}"),
            }
        }
        let r = match realised {
            Ok(r) => r,
            Err(e) => return (1, e.to_string()),
        };
        if r.success() {
            return (0, String::new());
        }
        let mut msgs = Vec::new();
        // The failures are one-line messages by now; a time limit shows as
        // BuildOutcome's Display right after "builder for '...' failed: ",
        // before the log tail (which might say anything).
        let mut timed_out = false;
        for (drv, error) in &r.failed {
            timed_out |= error
                .split("; last log lines:")
                .next()
                .is_some_and(|e| e.contains("failed: timed out after"));
            let drv = loc.logical(drv);
            if error.contains(&drv) {
                msgs.push(error.clone());
            } else {
                msgs.push(format!("build of '{drv}' failed: {error}"));
            }
        }
        for (drv, dep) in &r.dependency_failed {
            msgs.push(format!(
                "'{}' not built: dependency '{}' failed",
                loc.logical(drv),
                loc.logical(dep)
            ));
        }
        for drv in &r.not_started {
            msgs.push(format!(
                "'{}' not built: stopped after a failure",
                loc.logical(drv)
            ));
        }
        (if timed_out { 101 } else { 100 }, msgs.join("; "))
    }
}

/// The checks of a `BasicDerivation` before building it (see the module
/// docs); the error is the message of a `MiscFailure`.
fn check_basic(
    store: &LocalStore,
    full: &str,
    drv_name: &str,
    drv: &Derivation,
) -> Result<(), String> {
    let dir = &store.location().dir;
    match drv.kind() {
        Ok(DerivationKind::InputAddressed { deferred: false } | DerivationKind::Fixed) => {}
        Ok(kind) => {
            return Err(format!(
                "cannot build '{full}': {kind:?} derivations are not supported by this server"
            ))
        }
        Err(e) => return Err(format!("cannot build '{full}': {e}")),
    }
    for (name, output) in &drv.outputs {
        let Some(path) = output.path() else {
            return Err(format!(
                "cannot build '{full}': output '{name}' has no path"
            ));
        };
        let expected_name = output_path_name(drv_name, name.as_str());
        if path.name() != expected_name {
            return Err(format!(
                "cannot build '{full}': output '{name}' is '{}', whose name is not '{expected_name}'",
                dir.display(path)
            ));
        }
        if let DerivationOutput::CAFixed { method, hash, .. } = output {
            let expected = dir
                .make_fixed_output_path(*method, hash, &expected_name, [], false)
                .map_err(|e| format!("cannot build '{full}': {e}"))?;
            if &expected != path {
                return Err(format!(
                    "cannot build '{full}': fixed output '{name}' is '{}', but its hash gives '{}'",
                    dir.display(path),
                    dir.display(&expected)
                ));
            }
        }
    }
    for input in &drv.input_sources {
        match store.is_valid(input) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "cannot build '{full}': input '{}' is not valid on this machine \
                     (the client must send the whole input closure first)",
                    dir.display(input)
                ))
            }
            Err(e) => return Err(format!("cannot build '{full}': {e}")),
        }
    }
    Ok(())
}

/// The build options of one serve build.
fn build_options(options: &BuildOptions, setup: &BuildSetup<'_>, stream_logs: bool) -> Options {
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    Options {
        jobs: 1,
        keep_going: false,
        keep_failed: options.keep_failed,
        max_silent: secs(options.max_silent_time),
        timeout: secs(options.build_timeout),
        cores: setup.cores,
        stream_logs,
        limits: setup.limits,
        impure_env_allow: setup.impure_env_allow.clone(),
    }
}

/// The status of a failed build, as Nix 2.8's `buildDone` (module docs).
fn failure_status(e: &BuildErrorKind, fixed_output: bool) -> BuildStatus {
    use BuildErrorKind as K;
    match e {
        K::Kept { error, .. } => failure_status(error, fixed_output),
        K::Failed {
            outcome: BuildOutcome::TimedOut { .. },
            ..
        } => BuildStatus::TimedOut,
        K::Failed { .. } if fixed_output => BuildStatus::TransientFailure,
        K::Failed { .. } => BuildStatus::PermanentFailure,
        K::MissingOutput { .. }
        | K::ForeignFile { .. }
        | K::UnsupportedType { .. }
        | K::HashMismatch { .. }
        | K::FlatNotRegular
        | K::FixedReferences { .. } => BuildStatus::OutputRejected,
        _ => BuildStatus::MiscFailure,
    }
}

/// The hashDerivationModulo of a `BasicDerivation` with its outputs masked
/// (it has no input derivations, so nothing is looked up), as Nix 2.8 keys
/// realisations with it, `sha256:<base16>`.
fn basic_drv_hash(drv: &Derivation, dir: &crate::store::StoreDir) -> String {
    let no_lookup = |p: &StorePath| {
        Err::<Derivation, _>(io::Error::new(
            io::ErrorKind::NotFound,
            format!("a BasicDerivation has no input derivation ({p})"),
        ))
    };
    let hash = hash_derivation_modulo(drv, dir, true, no_lookup)
        .ok()
        .and_then(|h| h.hashes.into_values().next())
        // Not computable (e.g. no outputs): still a stable string.
        .unwrap_or_else(|| HashAlgo::Sha256.digest(&drv.to_aterm(dir)));
    hash.to_base16_prefixed()
}

/// The closure of `paths`; with `include_outputs`, also the valid outputs
/// of every derivation in it and their closures, until nothing is added.
fn closure(
    store: &LocalStore,
    paths: &BTreeSet<StorePath>,
    include_outputs: bool,
) -> Result<BTreeSet<StorePath>, ServeError> {
    let mut closure = store.closure(paths)?;
    if !include_outputs {
        return Ok(closure);
    }
    let mut expanded = BTreeSet::new();
    loop {
        let mut new = BTreeSet::new();
        for drv in closure.iter().filter(|p| p.is_derivation()) {
            if !expanded.insert(drv.clone()) {
                continue;
            }
            for out in store.derivation_outputs(drv)?.into_values() {
                if !closure.contains(&out) && store.is_valid(&out)? {
                    new.insert(out);
                }
            }
        }
        if new.is_empty() {
            return Ok(closure);
        }
        closure.extend(store.closure(&new)?);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How often the hangup watcher looks.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Runs `f` on this thread (the sandbox's parent-death signal is tied to
/// the thread that starts a build) while another thread watches `hangup`.
fn while_watching<R>(hangup: Option<BorrowedFd<'_>>, f: impl FnOnce() -> R) -> R {
    let Some(fd) = hangup else {
        return f();
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| watch(fd, &done));
        // Set even when `f` panics: else the scope would wait for the
        // watcher forever and the session would never end.
        let _stop = SetOnDrop(&done);
        f()
        // `_stop` stops the watcher; the scope joins it and re-raises a
        // panic of either thread.
    })
}

/// Sets the flag when dropped (also while unwinding).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Until `done`: polls `fd` for a hangup; once it has hung up, kills this
/// process's children again and again (a build may start after the first
/// round, e.g. once it has a build user).
fn watch(fd: BorrowedFd<'_>, done: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let interval =
        PollTimeout::try_from(WATCH_INTERVAL.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    // A socket whose peer shut down its side (nix names no POLLRDHUP).
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut gone = false;
    while !done.load(Ordering::Acquire) {
        if gone {
            kill_children();
            std::thread::sleep(WATCH_INTERVAL);
            continue;
        }
        // Not POLLIN: a client may send its next command early, which is
        // not a hangup. POLLHUP and POLLERR are always reported.
        let mut pfd = [PollFd::new(fd, rdhup)];
        match poll(&mut pfd, interval) {
            Ok(0) | Err(nix::Error::EINTR) => {}
            Ok(_) => {
                let ev = pfd[0].revents().unwrap_or(PollFlags::empty());
                if ev.contains(PollFlags::POLLNVAL) {
                    tracing::warn!("cannot watch the client connection: not an open file");
                    return;
                }
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | rdhup) {
                    tracing::warn!("the client went away: killing the build");
                    gone = true;
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch the client connection: {e}");
                return;
            }
        }
    }
}

/// SIGKILLs every child of this process (found in `/proc`): the sandboxed
/// builders, whose PID namespaces die with them.
fn kill_children() {
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

/// Passes one build log line to the client (the server's stderr) at once.
/// The client may be gone; the log file has it all, so a failure is ignored.
fn log_line(log: &mut dyn Write, line: &[u8]) {
    let _ = log
        .write_all(line)
        .and_then(|()| log.write_all(b"\n"))
        .and_then(|()| log.flush());
}

/// How builds are placed here: always locally, and without checking
/// `requiredSystemFeatures`: the client chose this machine from its
/// machines file, which is what says which features it offers (Nix would
/// check the remote's `system-features` again and fail).
fn placement_for(slot: &mut Option<Placement>, features: BTreeSet<String>) -> &Placement {
    let p = slot.get_or_insert_with(Placement::local_only);
    p.local.features.extend(features);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::OutputName;
    use crate::store::{FileIngestionMethod, StoreLocation};

    fn open(tmp: &tempfile::TempDir) -> LocalStore {
        // The tests' `.drv` files are placeholders, not derivations.
        LocalStore::open_with_drv_check(
            StoreLocation::new(Default::default(), tmp.path().join("root")),
            Box::new(crate::store::local::AcceptAnyDrv),
        )
        .expect("open store")
    }

    fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("store path")
    }

    #[test]
    fn a_build_that_panics_while_watched_ends_the_session_with_the_panic() {
        use std::os::fd::AsFd;
        // The client is still there: the watcher would poll it forever
        // unless told the build is over, also when the build panicked.
        let (ours, _client) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let got = std::panic::catch_unwind(|| {
            while_watching(Some(ours.as_fd()), || -> () {
                panic!("injected build panic")
            })
        });
        assert!(got.is_err(), "the panic reaches the session");
        assert_eq!(while_watching(Some(ours.as_fd()), || 7), 7);
    }

    fn drv(outputs: Vec<(&str, DerivationOutput)>, inputs: &[&StorePath]) -> Derivation {
        Derivation {
            outputs: outputs
                .into_iter()
                .map(|(n, o)| (OutputName::new(n).expect("name"), o))
                .collect(),
            input_derivations: BTreeMap::new(),
            input_sources: inputs.iter().map(|p| (*p).clone()).collect(),
            system: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn checks_output_names_fixed_paths_and_inputs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(&tmp);
        let input = store
            .add_text("input", b"x", &BTreeSet::new(), &BTreeMap::new())
            .expect("add");
        let ia = |base: &str| DerivationOutput::InputAddressed { path: path(base) };
        let good = drv(
            vec![
                ("out", ia("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")),
                ("dev", ia("8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-dev")),
            ],
            &[&input],
        );
        check_basic(&store, "d", "hello", &good).expect("fits");

        let wrong_name = drv(
            vec![("dev", ia("8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"))],
            &[&input],
        );
        let e = check_basic(&store, "d", "hello", &wrong_name).expect_err("dev named hello");
        assert!(e.contains("'hello-dev'"), "{e}");

        let missing = path("00000000000000000000000000000000-missing");
        let no_input = drv(
            vec![("out", ia("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"))],
            &[&input, &missing],
        );
        let e = check_basic(&store, "d", "hello", &no_input).expect_err("missing input");
        assert!(
            e.contains("/nix/store/00000000000000000000000000000000-missing"),
            "{e}"
        );

        let hash = HashAlgo::Sha256.digest(b"content");
        let dir = &store.location().dir;
        let right = dir
            .make_fixed_output_path(FileIngestionMethod::Flat, &hash, "src", [], false)
            .expect("path");
        let fixed = |path: StorePath| {
            drv(
                vec![(
                    "out",
                    DerivationOutput::CAFixed {
                        method: FileIngestionMethod::Flat,
                        hash: hash.clone(),
                        path,
                    },
                )],
                &[],
            )
        };
        check_basic(&store, "d", "src", &fixed(right.clone())).expect("right fixed path");
        let e = check_basic(
            &store,
            "d",
            "src",
            &fixed(path("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-src")),
        )
        .expect_err("wrong fixed path");
        assert!(e.contains(&dir.display(&right)), "{e}");

        let deferred = drv(vec![("out", DerivationOutput::Deferred)], &[]);
        assert!(check_basic(&store, "d", "x", &deferred).is_err());
    }

    #[test]
    fn failures_map_to_nix_statuses() {
        let failed = |outcome| BuildErrorKind::Failed {
            outcome,
            kept: None,
            tail: Vec::new(),
        };
        let timeout = BuildOutcome::TimedOut {
            kind: crate::sandbox::TimeoutKind::Silent,
            after: Duration::from_secs(1),
        };
        assert_eq!(
            failure_status(&failed(timeout), false),
            BuildStatus::TimedOut
        );
        assert_eq!(
            failure_status(&failed(timeout), true),
            BuildStatus::TimedOut
        );
        let exit = BuildOutcome::Exited(1);
        assert_eq!(
            failure_status(&failed(exit), false),
            BuildStatus::PermanentFailure
        );
        assert_eq!(
            failure_status(&failed(exit), true),
            BuildStatus::TransientFailure
        );
        let kept = BuildErrorKind::Kept {
            error: Box::new(failed(exit)),
            dir: "/tmp/x".into(),
        };
        assert_eq!(failure_status(&kept, false), BuildStatus::PermanentFailure);
        let missing = BuildErrorKind::MissingOutput {
            output: "out".to_owned(),
            path: "p".to_owned(),
        };
        assert_eq!(failure_status(&missing, false), BuildStatus::OutputRejected);
        let no_users = BuildErrorKind::NoUsers(Arc::new(UserError::NotGiven { why: "none" }));
        assert_eq!(failure_status(&no_users, false), BuildStatus::MiscFailure);
    }

    #[test]
    fn closure_with_outputs_follows_valid_outputs_of_derivations() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(&tmp);
        let none = BTreeSet::new();
        let dep = store
            .add_text("dep", b"d", &none, &BTreeMap::new())
            .expect("add");
        let out = store
            .add_text(
                "out",
                b"o",
                &BTreeSet::from([dep.clone()]),
                &BTreeMap::new(),
            )
            .expect("add");
        let src = store
            .add_text("src", b"s", &none, &BTreeMap::new())
            .expect("add");
        let unbuilt = path("00000000000000000000000000000000-unbuilt");
        let outputs =
            BTreeMap::from([("out".to_owned(), out.clone()), ("doc".to_owned(), unbuilt)]);
        let drv = store
            .add_text(
                "x.drv",
                b"Derive(...)",
                &BTreeSet::from([src.clone()]),
                &outputs,
            )
            .expect("add drv");
        let roots = BTreeSet::from([drv.clone()]);
        assert_eq!(
            closure(&store, &roots, false).expect("closure"),
            BTreeSet::from([drv.clone(), src.clone()])
        );
        assert_eq!(
            closure(&store, &roots, true).expect("closure"),
            BTreeSet::from([drv, src, out, dep])
        );
    }

    #[test]
    fn basic_derivation_hash_is_stable_and_prefixed() {
        let d = drv(
            vec![(
                "out",
                DerivationOutput::InputAddressed {
                    path: path("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"),
                },
            )],
            &[],
        );
        let dir = crate::store::StoreDir::default();
        let h = basic_drv_hash(&d, &dir);
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64, "{h}");
        assert_eq!(h, basic_drv_hash(&d, &dir));
        let mut other = d.clone();
        other.builder = b"/bin/bash".to_vec();
        assert_ne!(h, basic_drv_hash(&other, &dir));
    }

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parent_pid("42 (sh) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("42 (a) b) 1 (c) S 9 1 1"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }
}
