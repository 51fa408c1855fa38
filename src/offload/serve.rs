//! The server side of Nix's serve protocol (`nix-store --serve [--write]`),
//! version 2.7 as in Nix 2.8, over any `Read`/`Write` pair.
//!
//! The client speaks first: `SERVE_MAGIC_1`, then (after our magic and
//! version) its own version; then commands until EOF. Each reply is flushed
//! because the client waits for it before sending more. Building
//! (`BuildPaths`, `BuildDerivation`) is not implemented yet: those commands
//! end the session with [`ServeError::Unsupported`].

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use crate::store::export::{import_paths, write_export, ExportError, SignaturePolicy};
use crate::store::local::{LocalStore, StoreError};
use crate::store::nar::{self, NarError};
use crate::store::signature::{Signature, SignatureError};
use crate::store::wire::{self, WireError};
use crate::store::{
    ContentAddress, Hash, HashAlgo, HashError, PathError, StorePath, ValidPathInfo,
};

/// Sent by the client to open a session.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// Our answer to [`SERVE_MAGIC_1`].
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The protocol version we speak: 2.7, as Nix 2.4 to 2.28.
pub const SERVE_PROTOCOL_VERSION: u64 = 0x207;

/// Longest string we accept (store paths, signatures, CA strings).
const MAX_STRING: u64 = 64 * 1024;
/// Most items we accept in one path or string set.
const MAX_ITEMS: u64 = 1 << 20;

/// The serve commands, numbered as in Nix's `serve-protocol.hh`.
mod cmd {
    pub const QUERY_VALID_PATHS: u64 = 1;
    pub const QUERY_PATH_INFOS: u64 = 2;
    pub const DUMP_STORE_PATH: u64 = 3;
    pub const IMPORT_PATHS: u64 = 4;
    pub const EXPORT_PATHS: u64 = 5;
    pub const BUILD_PATHS: u64 = 6;
    pub const QUERY_CLOSURE: u64 = 7;
    pub const BUILD_DERIVATION: u64 = 8;
    pub const ADD_TO_STORE_NAR: u64 = 9;
}

/// How the server may use its store.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Allow commands that add paths (`ImportPaths`, `AddToStoreNar`), as `--write`.
    pub write: bool,
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
    /// A known command this server does not implement yet.
    #[error("serve command {command} ({number}) is not supported yet")]
    Unsupported { command: &'static str, number: u64 },
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

/// One serve session on `store`: handshake, then commands until EOF.
pub fn serve(
    store: &LocalStore,
    input: &mut dyn Read,
    output: &mut dyn Write,
    opts: ServeOptions,
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
    };
    while let Some(command) = read_command(server.input)? {
        tracing::debug!(command, "serve command");
        server.command(command)?;
        wire("flushing", server.output.flush().map_err(WireError::Io))?;
    }
    Ok(())
}

struct Server<'a> {
    store: &'a LocalStore,
    input: &'a mut dyn Read,
    output: &'a mut dyn Write,
    opts: ServeOptions,
    client_minor: u64,
}

impl Server<'_> {
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
                // Outputs of derivations are not followed yet; for other
                // paths the flag makes no difference.
                let _include_outputs = wire("QueryClosure", wire::read_bool(self.input))?;
                let paths = self.read_paths("QueryClosure")?;
                for p in &paths {
                    self.require_valid(p)?;
                }
                let closure = self.store.closure(&paths)?;
                self.write_paths("QueryClosure", &closure)
            }
            cmd::ADD_TO_STORE_NAR => {
                self.require_write("AddToStoreNar")?;
                self.add_to_store_nar()
            }
            cmd::BUILD_PATHS => Err(ServeError::Unsupported {
                command: "BuildPaths",
                number: command,
            }),
            cmd::BUILD_DERIVATION => Err(ServeError::Unsupported {
                command: "BuildDerivation",
                number: command,
            }),
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
        let n = wire(what, wire::read_u64(self.input))?;
        if n > MAX_ITEMS {
            return wire(
                what,
                Err(WireError::TooLong {
                    len: n,
                    max: MAX_ITEMS,
                }),
            );
        }
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
