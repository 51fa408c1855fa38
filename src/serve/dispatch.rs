//! The session: the handshake, the command loop, and the commands that
//! query and transfer paths (the two that build are in [`super::builds`]).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use crate::decide::Placement;
use crate::remote::compress::{ZstdReader, ZstdWriter};
use crate::sandbox::{Limits, UserError};
use crate::serve_protocol::{self, MAX_ITEMS, MAX_STRING};
use crate::store::export::{import_paths, write_export, SignaturePolicy};
use crate::store::local::{KeptLocks, LocalStore};
use crate::store::nar::{self};
use crate::store::signature::Signature;
use crate::store::wire::{self, WireError};
use crate::store::{ContentAddress, Hash, HashAlgo, StorePath, ValidPathInfo};

use crate::serve_protocol::cmd;
pub use crate::serve_protocol::{SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION};

use super::{BuildSetup, ServeError, ServeOptions};

/// [`serve_protocol::wire`] with the server's error, so that `?` knows it.
pub(super) fn wire<T>(what: &'static str, r: Result<T, WireError>) -> Result<T, ServeError> {
    serve_protocol::wire(what, r)
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
        pool: Err(std::sync::Arc::new(UserError::NotGiven {
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
    match opts.zstd_level {
        None => session(store, input, output, opts, client_version, setup),
        Some(level) => {
            // The compressed streams start here, after the client's version
            // (see `crate::remote::compress`).
            let zstd = |e| ServeError::Wire {
                what: "starting zstd",
                source: WireError::Io(e),
            };
            let mut input = ZstdReader::new(input).map_err(zstd)?;
            let mut output = ZstdWriter::new(output, level).map_err(zstd)?;
            let res = session(store, &mut input, &mut output, opts, client_version, setup);
            let (read, written) = (input.count(), output.count());
            tracing::debug!(
                level,
                read_plain = read.plain,
                read_wire = read.wire,
                written_plain = written.plain,
                written_wire = written.wire,
                "zstd session ended"
            );
            res
        }
    }
}

/// The command loop of a session whose handshake is done.
fn session(
    store: &LocalStore,
    input: &mut dyn Read,
    output: &mut dyn Write,
    opts: ServeOptions,
    client_version: u64,
    setup: BuildSetup<'_>,
) -> Result<(), ServeError> {
    let mut server = Server {
        store,
        input,
        output,
        opts,
        client_minor: serve_protocol::minor(client_version),
        setup,
        placement: None,
        kept: KeptLocks::default(),
    };
    std::thread::scope(|scope| {
        while let Some(command) = read_command(server.input)? {
            tracing::debug!(command, "serve command");
            server.command(command)?;
            wire("flushing", server.output.flush().map_err(WireError::Io))?;
            // An import's path locks go once the client has its answer: their
            // files are removed while it goes on (see `LockKeeper`).
            let kept = std::mem::take(&mut server.kept);
            if !kept.is_empty() {
                let release = move || drop(kept);
                if let Err(e) = std::thread::Builder::new()
                    .name("release-locks".into())
                    .spawn_scoped(scope, release)
                {
                    tracing::warn!("cannot start a thread to release locks: {e}");
                }
            }
        }
        Ok(())
    })
}

pub(super) struct Server<'a, 's> {
    pub(super) store: &'a LocalStore,
    pub(super) input: &'a mut dyn Read,
    pub(super) output: &'a mut dyn Write,
    pub(super) opts: ServeOptions,
    pub(super) client_minor: u64,
    pub(super) setup: BuildSetup<'s>,
    /// Made at the first build (it probes the host).
    pub(super) placement: Option<Placement>,
    /// The path locks of the last import, released after its answer.
    kept: KeptLocks,
}

impl Server<'_, '_> {
    fn command(&mut self, command: u64) -> Result<(), ServeError> {
        match command {
            cmd::QUERY_VALID_PATHS => {
                let _lock = wire("QueryValidPaths", wire::read_bool(self.input))?;
                let _substitute = wire("QueryValidPaths", wire::read_bool(self.input))?;
                let paths = self.read_paths("QueryValidPaths")?;
                let valid = self.store.valid_among(&paths)?;
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
                let keeper = self.store.keep_batch_locks();
                import_paths(
                    self.store,
                    self.input,
                    SignaturePolicy::AcceptUnchecked,
                    &mut |_| {},
                )?;
                self.kept = keeper.finish();
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

    pub(super) fn require_build(&self, command: &'static str) -> Result<(), ServeError> {
        if self.opts.write {
            Ok(())
        } else {
            Err(ServeError::BuildNotAllowed { command })
        }
    }

    pub(super) fn require_write(&self, command: &'static str) -> Result<(), ServeError> {
        if self.opts.write {
            Ok(())
        } else {
            Err(ServeError::ReadOnly { command })
        }
    }

    pub(super) fn require_valid(&self, path: &StorePath) -> Result<ValidPathInfo, ServeError> {
        self.store
            .query_path_info(path)?
            .ok_or_else(|| ServeError::NotValid {
                path: self.store.location().logical(path),
            })
    }

    pub(super) fn read_path(&mut self, what: &'static str) -> Result<StorePath, ServeError> {
        let s = wire(what, wire::read_string(self.input, MAX_STRING))?;
        self.store
            .location()
            .dir
            .parse_path(&s)
            .map_err(ServeError::BadPath)
    }

    pub(super) fn read_paths(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        let n = wire(what, wire::read_count(self.input, MAX_ITEMS))?;
        (0..n).map(|_| self.read_path(what)).collect()
    }

    pub(super) fn write_paths(
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

    pub(super) fn write_info(&mut self, info: &ValidPathInfo) -> Result<(), ServeError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::test_support::{open, path};
    use std::collections::BTreeMap;

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
}
