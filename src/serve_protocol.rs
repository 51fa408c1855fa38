//! Nix's serve protocol (`nix-store --serve`, 2.7), what the client
//! ([`crate::remote::client`]) and the server ([`crate::serve`]) share: the
//! magic numbers and version (and how a version splits), the command
//! numbers, the limits, the mapping of wire errors into each side's own
//! error ([`WireContext`]), and the structured values: the `BasicDerivation`
//! of `BuildDerivation`, build options and `BuildResult`, as Nix 2.8 writes
//! them. See `offload.md` §4.4. It is a leaf above the store and
//! derivations: both sides use it, and it uses neither.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use crate::derivation::{Derivation, FixedPaths, OutputName, RawDerivation, RawOutput};
use crate::store::wire::{self, WireError};
use crate::store::{StoreDir, StorePath};

/// Sent by the client to open a session.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// The server's answer to [`SERVE_MAGIC_1`].
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The protocol version both sides speak: 2.7, as Nix 2.4 to 2.28.
pub const SERVE_PROTOCOL_VERSION: u64 = 0x207;

/// The serve commands, numbered as in Nix's `serve-protocol.hh`; one list
/// for the client and the server.
pub mod cmd {
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

impl BuildStatus {
    /// The status numbered `n`, if Nix has one.
    pub fn from_u64(n: u64) -> Option<BuildStatus> {
        use BuildStatus::*;
        Some(match n {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            _ => return None,
        })
    }

    /// Whether the outputs are valid afterwards (Nix's `BuildResult::success`).
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// Most entries in any list or set of the protocol (paths, outputs, args,
/// env, signatures), for every reader: client, server and these values.
pub const MAX_ITEMS: u64 = 1 << 20;
/// Longest store path, signature or CA string in a query or reply.
pub const MAX_STRING: u64 = 64 * 1024;
/// Longest store path or output name.
const MAX_PATH: u64 = 4096;
/// Longest single derivation string (an env value may carry a whole script
/// or structured attributes).
const MAX_FIELD: u64 = 64 << 20;
/// Most bytes of strings in one `BasicDerivation`, so that many large fields
/// cannot add up to an unbounded allocation either.
const MAX_DERIVATION: u64 = 256 << 20;
/// Longest error message in a `BuildResult` or a `BuildPaths` reply.
pub const MAX_ERROR_MSG: u64 = 16 << 20;
/// Longest realisation id or JSON in a `BuildResult`.
const MAX_REALISATION: u64 = 1 << 20;

/// An error of one side of the protocol that can say which value failed
/// on the wire: [`ProtocolError`] here, the client's and the server's own.
pub trait WireContext {
    /// The error for `source`, met while reading or writing `what`.
    fn wire(what: &'static str, source: WireError) -> Self;
}

impl WireContext for ProtocolError {
    fn wire(what: &'static str, source: WireError) -> ProtocolError {
        ProtocolError::Wire { what, source }
    }
}

/// `r` with its [`WireError`] put in context: which value failed.
pub fn wire<T, E: WireContext>(what: &'static str, r: Result<T, WireError>) -> Result<T, E> {
    r.map_err(wire_err(what))
}

/// The mapping of [`wire()`], for `map_err`.
pub fn wire_err<E: WireContext>(what: &'static str) -> impl FnOnce(WireError) -> E {
    move |source| E::wire(what, source)
}

/// A client whose store directory is not the server's: every path either
/// sends would be misnamed on the other side (Nix's protocol never says
/// which directory a side uses). `sandoff serve --expect-store-dir` prints
/// it as one line on stderr, before the handshake, and exits; the client
/// finds it with [`StoreDirMismatch::find`] in what the server printed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("store directory mismatch: the server's store is {server}, the client's is {client}")]
pub struct StoreDirMismatch {
    /// Where the server's store paths are.
    pub server: StoreDir,
    /// Where the client's store paths are.
    pub client: StoreDir,
}

impl StoreDirMismatch {
    /// The mismatch that `text` (a server's stderr) reports for a client
    /// whose store directory is `client`, if it reports one. The client
    /// knows its own directory, so the server's is what lies between the
    /// fixed words, whatever it holds (a directory may hold `, `).
    pub fn find(text: &str, client: &StoreDir) -> Option<StoreDirMismatch> {
        const HEAD: &str = "store directory mismatch: the server's store is ";
        let tail = format!(", the client's is {client}");
        text.lines().find_map(|line| {
            let (_, rest) = line.split_once(HEAD)?;
            let server = rest.trim_end().strip_suffix(tail.as_str())?;
            Some(StoreDirMismatch {
                server: StoreDir::new(server).ok()?,
                client: client.clone(),
            })
        })
    }
}

/// The major number of a protocol version (`0x207` is 2.7).
pub fn major(version: u64) -> u64 {
    version >> 8
}

/// The minor number of a protocol version, which is what both sides
/// negotiate (the major must be 2).
pub fn minor(version: u64) -> u64 {
    version & 0xff
}

fn read_count(r: &mut dyn Read, what: &'static str) -> Result<u64, ProtocolError> {
    wire(what, wire::read_count(r, MAX_ITEMS))
}

/// What is left of [`MAX_DERIVATION`] while one derivation is read.
struct Budget(u64);

impl Budget {
    fn bytes(
        &mut self,
        r: &mut dyn Read,
        max: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, ProtocolError> {
        let v = wire(what, wire::read_bytes(r, max.min(self.0)))?;
        self.0 -= v.len() as u64;
        Ok(v)
    }

    fn list(
        &mut self,
        r: &mut dyn Read,
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let n = read_count(r, what)?;
        (0..n).map(|_| self.bytes(r, MAX_FIELD, what)).collect()
    }
}

/// Writes `drv` as a `BasicDerivation` (outputs, `input_srcs` in place of
/// the derivation's inputs, platform, builder, args, env), as Nix 2.8's
/// `writeDerivation`: each output as the four fields of its ATerm tuple.
pub fn write_basic_derivation(
    w: &mut dyn Write,
    dir: &StoreDir,
    drv: &Derivation,
    input_srcs: &BTreeSet<StorePath>,
) -> Result<(), ProtocolError> {
    const WHAT: &str = "writing a BasicDerivation";
    wire(WHAT, wire::write_u64(w, drv.outputs.len() as u64))?;
    for (name, output) in &drv.outputs {
        let path = output.path().map(|p| dir.display(p)).unwrap_or_default();
        wire(WHAT, wire::write_bytes(w, name.as_str().as_bytes()))?;
        wire(WHAT, wire::write_bytes(w, path.as_bytes()))?;
        wire(WHAT, wire::write_bytes(w, output.hash_algo().as_bytes()))?;
        wire(WHAT, wire::write_bytes(w, output.hash_field().as_bytes()))?;
    }
    // A `BTreeSet<StorePath>` iterates by base name, which within one store
    // directory is the order of the full paths Nix writes.
    wire(
        WHAT,
        wire::write_strings(w, input_srcs.iter().map(|p| dir.display(p))),
    )?;
    wire(WHAT, wire::write_bytes(w, &drv.system))?;
    wire(WHAT, wire::write_bytes(w, &drv.builder))?;
    wire(WHAT, wire::write_strings(w, &drv.args))?;
    wire(WHAT, wire::write_u64(w, drv.env.len() as u64))?;
    for (k, v) in &drv.env {
        wire(WHAT, wire::write_bytes(w, k))?;
        wire(WHAT, wire::write_bytes(w, v))?;
    }
    Ok(())
}

/// Reads a `BasicDerivation` for the derivation named `drv_name` (its
/// `.drv` path's name without `.drv`); its `input_derivations` are empty.
///
/// The outputs are checked with the rules of the `.drv` parser (kinds not
/// mixed, hashes well formed, paths in `dir`). Unlike a `.drv`, the wire form
/// need not be sorted: Nix reads it into maps, and so do we (a repeated env
/// name keeps its last value, as in Nix; a repeated output is refused).
pub fn read_basic_derivation(
    r: &mut dyn Read,
    dir: &StoreDir,
    drv_name: &str,
) -> Result<Derivation, ProtocolError> {
    const WHAT: &str = "reading a BasicDerivation";
    let mut budget = Budget(MAX_DERIVATION);
    let n = read_count(r, WHAT)?;
    let mut outputs = Vec::new();
    let mut names = BTreeSet::new();
    for _ in 0..n {
        let name = budget.bytes(r, MAX_PATH, WHAT)?;
        if !names.insert(name.clone()) {
            return Err(ProtocolError::Invalid {
                what: "BasicDerivation",
                reason: format!(
                    "derivation '{drv_name}': output '{}' appears twice",
                    String::from_utf8_lossy(&name)
                ),
            });
        }
        outputs.push(RawOutput {
            name,
            path: budget.bytes(r, MAX_PATH, WHAT)?,
            hash_algo: budget.bytes(r, MAX_PATH, WHAT)?,
            hash: budget.bytes(r, MAX_PATH, WHAT)?,
        });
    }
    let n = read_count(r, WHAT)?;
    let input_sources = (0..n)
        .map(|_| budget.bytes(r, MAX_PATH, WHAT))
        .collect::<Result<_, _>>()?;
    let system = budget.bytes(r, MAX_FIELD, WHAT)?;
    let builder = budget.bytes(r, MAX_FIELD, WHAT)?;
    let args = budget.list(r, WHAT)?;
    let n = read_count(r, WHAT)?;
    let mut env = Vec::new();
    for _ in 0..n {
        let k = budget.bytes(r, MAX_FIELD, WHAT)?;
        let v = budget.bytes(r, MAX_FIELD, WHAT)?;
        env.push((k, v));
    }
    let raw = RawDerivation {
        outputs,
        input_derivations: Vec::new(),
        input_sources,
        system,
        builder,
        args,
        env,
    };
    Derivation::from_raw(raw, dir, FixedPaths::Required).map_err(|e| ProtocolError::Invalid {
        what: "BasicDerivation",
        reason: format!("derivation '{drv_name}': {e}"),
    })
}

impl BuildOptions {
    /// Writes the options as protocol minor version `minor` has them.
    /// Repeats (≥ 2.3) are always 0: Nix dropped them and sandoff never had
    /// them. `enforceDeterminism` is 1, Nix 2.8's default, so the bytes are
    /// Nix's own (it means nothing without repeats).
    pub fn write(&self, w: &mut dyn Write, minor: u64) -> Result<(), ProtocolError> {
        const WHAT: &str = "writing build options";
        wire(WHAT, wire::write_u64(w, self.max_silent_time))?;
        wire(WHAT, wire::write_u64(w, self.build_timeout))?;
        if minor >= 2 {
            wire(WHAT, wire::write_u64(w, self.max_log_size))?;
        }
        if minor >= 3 {
            wire(WHAT, wire::write_u64(w, 0))?; // nrRepeats
            wire(WHAT, wire::write_bool(w, true))?; // enforceDeterminism
        }
        if minor >= 7 {
            wire(WHAT, wire::write_bool(w, self.keep_failed))?;
        }
        Ok(())
    }

    /// Reads the options as protocol minor version `minor` has them.
    /// Fields the version lacks are left at their defaults; repeats and
    /// `enforceDeterminism` are read and ignored, as Nix does today.
    pub fn read(r: &mut dyn Read, minor: u64) -> Result<BuildOptions, ProtocolError> {
        const WHAT: &str = "reading build options";
        let mut o = BuildOptions {
            max_silent_time: wire(WHAT, wire::read_u64(r))?,
            build_timeout: wire(WHAT, wire::read_u64(r))?,
            ..BuildOptions::default()
        };
        if minor >= 2 {
            o.max_log_size = wire(WHAT, wire::read_u64(r))?;
        }
        if minor >= 3 {
            let repeats = wire(WHAT, wire::read_u64(r))?;
            let _enforce_determinism = wire(WHAT, wire::read_bool(r))?;
            if repeats != 0 {
                tracing::debug!(repeats, "ignoring the client's request to repeat builds");
            }
        }
        if minor >= 7 {
            o.keep_failed = wire(WHAT, wire::read_bool(r))?;
        }
        Ok(o)
    }
}

/// A realisation as Nix 2.8's `Realisation::toJSON` prints it: nlohmann's
/// object keys sorted, `outPath` a base name, no signatures or dependencies.
fn realisation_json(id: &str, out_path: &StorePath) -> String {
    let mut m = serde_json::Map::new();
    m.insert(
        "dependentRealisations".to_owned(),
        serde_json::Value::Object(serde_json::Map::new()),
    );
    m.insert("id".to_owned(), serde_json::Value::from(id));
    m.insert(
        "outPath".to_owned(),
        serde_json::Value::from(out_path.base_name()),
    );
    m.insert(
        "signatures".to_owned(),
        serde_json::Value::Array(Vec::new()),
    );
    serde_json::Value::Object(m).to_string()
}

impl BuildResult {
    /// Writes the result as protocol minor version `minor` has it.
    /// `drv_hash` (the derivation's hashDerivationModulo, `sha256:<base16>`)
    /// keys the realisations of 2.6/2.7.
    ///
    /// Nix 2.8 keys them with the hash of the derivation *with its outputs
    /// masked* (`staticOutputHashes`: `hash_derivation_modulo(drv, dir, true,
    /// …)` of the `BasicDerivation` as received); with that hash the bytes
    /// equal Nix's (tested against `nix-store --serve` in
    /// `tests/it/client.rs`). Minors above 7 are written as 2.7: we never
    /// negotiate more.
    pub fn write(
        &self,
        w: &mut dyn Write,
        minor: u64,
        _dir: &StoreDir,
        drv_hash: &str,
    ) -> Result<(), ProtocolError> {
        const WHAT: &str = "writing a BuildResult";
        wire(WHAT, wire::write_u64(w, self.status as u64))?;
        wire(WHAT, wire::write_bytes(w, self.error_msg.as_bytes()))?;
        if minor >= 3 {
            wire(WHAT, wire::write_u64(w, self.times_built))?;
            wire(WHAT, wire::write_bool(w, self.non_deterministic))?;
            wire(WHAT, wire::write_u64(w, self.start_time))?;
            wire(WHAT, wire::write_u64(w, self.stop_time))?;
        }
        if minor >= 6 {
            // Nix's `DrvOutputs` is a map keyed by (drv hash, output name):
            // with one drv hash, by output name, as the BTreeMap iterates.
            wire(WHAT, wire::write_u64(w, self.built_outputs.len() as u64))?;
            for (name, path) in &self.built_outputs {
                let id = format!("{drv_hash}!{name}");
                wire(WHAT, wire::write_bytes(w, id.as_bytes()))?;
                let json = realisation_json(&id, path);
                wire(WHAT, wire::write_bytes(w, json.as_bytes()))?;
            }
        }
        Ok(())
    }

    /// Reads a result as protocol minor version `minor` has it.
    pub fn read(
        r: &mut dyn Read,
        minor: u64,
        dir: &StoreDir,
    ) -> Result<BuildResult, ProtocolError> {
        const WHAT: &str = "reading a BuildResult";
        let n = wire(WHAT, wire::read_u64(r))?;
        let status = BuildStatus::from_u64(n).ok_or_else(|| ProtocolError::Invalid {
            what: "BuildResult",
            reason: format!("unknown build status {n}"),
        })?;
        // Build errors quote logs, which need not be UTF-8.
        let error_msg =
            String::from_utf8_lossy(&wire(WHAT, wire::read_bytes(r, MAX_ERROR_MSG))?).into_owned();
        let mut result = BuildResult {
            status,
            error_msg,
            times_built: 0,
            non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: BTreeMap::new(),
        };
        if minor >= 3 {
            result.times_built = wire(WHAT, wire::read_u64(r))?;
            result.non_deterministic = wire(WHAT, wire::read_bool(r))?;
            result.start_time = wire(WHAT, wire::read_u64(r))?;
            result.stop_time = wire(WHAT, wire::read_u64(r))?;
        }
        if minor >= 6 {
            let n = read_count(r, WHAT)?;
            for _ in 0..n {
                let id = wire(WHAT, wire::read_string(r, MAX_REALISATION))?;
                let json = wire(WHAT, wire::read_string(r, MAX_REALISATION))?;
                let (name, path) = parse_realisation(&id, &json, dir)?;
                result.built_outputs.insert(name, path);
            }
        }
        Ok(result)
    }
}

/// The output name (from the id `<drv hash>!<output>`) and path of one
/// realisation of `BuildResult::builtOutputs`.
fn parse_realisation(
    id: &str,
    json: &str,
    dir: &StoreDir,
) -> Result<(String, StorePath), ProtocolError> {
    let bad = |reason: String| ProtocolError::Invalid {
        what: "BuildResult realisation",
        reason: format!("'{id}': {reason}"),
    };
    let (_, name) = id
        .split_once('!')
        .ok_or_else(|| bad("no '!' between the derivation hash and the output".to_owned()))?;
    let name = OutputName::new(name).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let out_path = value
        .get("outPath")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no string 'outPath' in its JSON".to_owned()))?;
    // Nix 2.8 writes the base name; accept a full path too.
    let path = if out_path.contains('/') {
        dir.parse_path(out_path)
    } else {
        StorePath::from_base_name(out_path)
    }
    .map_err(|e| bad(format!("bad outPath '{out_path}': {e}")))?;
    Ok((name.as_str().to_owned(), path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::testdata::{nix, HELLO};
    use crate::derivation::DerivationOutput;
    use crate::store::{FileIngestionMethod, HashAlgo};

    #[test]
    fn store_dir_mismatch_is_found_in_what_the_server_printed() {
        let dir = |d: &str| StoreDir::new(d).expect("store dir");
        let m = StoreDirMismatch {
            server: dir("/nix/store"),
            client: dir("/gnu/store"),
        };
        let line = format!("sandoff: {m}\n");
        assert_eq!(
            line,
            "sandoff: store directory mismatch: the server's store is /nix/store, \
             the client's is /gnu/store\n"
        );
        let printed = format!("some warning\n{line}");
        assert_eq!(StoreDirMismatch::find(&printed, &m.client), Some(m.clone()));
        // Only a line naming this client's directory counts.
        assert_eq!(StoreDirMismatch::find(&printed, &dir("/other/store")), None);
        assert_eq!(
            StoreDirMismatch::find("error: no such option", &m.client),
            None
        );
        assert_eq!(StoreDirMismatch::find("", &m.client), None);
        // A directory with the separator in it still parses.
        let odd = StoreDirMismatch {
            server: dir("/a, the client's is /b"),
            client: dir("/gnu/store"),
        };
        assert_eq!(
            StoreDirMismatch::find(&odd.to_string(), &odd.client),
            Some(odd.clone())
        );
        // Not a store directory: no mismatch found (the refusal still is one).
        let bad =
            "store directory mismatch: the server's store is relative, the client's is /gnu/store";
        assert_eq!(StoreDirMismatch::find(bad, &m.client), None);
    }

    /// A wire u64.
    fn n(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    /// A wire string, spelled out: length, bytes, zero padding.
    fn s(b: &[u8]) -> Vec<u8> {
        let mut out = n(b.len() as u64);
        out.extend_from_slice(b);
        out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
        out
    }

    fn hello() -> Derivation {
        Derivation::from_aterm(HELLO, &nix()).expect("hello parses")
    }

    fn bb() -> StorePath {
        StorePath::from_base_name("d0x4sjwksanirbaxlb05009gy5lvia3q-bb").expect("valid")
    }

    #[test]
    fn basic_derivation_exact_bytes() {
        let drv = hello();
        let mut out = Vec::new();
        write_basic_derivation(&mut out, &nix(), &drv, &[bb()].into()).unwrap();
        let bb = b"/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb";
        let busybox = b"/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb/bin/busybox";
        let out_path = b"/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello";
        let want: Vec<u8> = [
            n(1),
            s(b"out"),
            s(out_path),
            s(b""),
            s(b""),
            n(1),
            s(bb),
            s(b"x86_64-linux"),
            s(busybox),
            n(3),
            s(b"sh"),
            s(b"-c"),
            s(b"echo hi > $out"),
            n(4),
            s(b"builder"),
            s(busybox),
            s(b"name"),
            s(b"hello"),
            s(b"out"),
            s(out_path),
            s(b"system"),
            s(b"x86_64-linux"),
        ]
        .concat();
        assert_eq!(out, want);
        // The head, literally: one output named "out".
        assert_eq!(
            &out[..24],
            b"\x01\0\0\0\0\0\0\0\x03\0\0\0\0\0\0\0out\0\0\0\0\0"
        );
    }

    #[test]
    fn basic_derivation_round_trips() {
        let drv = hello();
        let mut out = Vec::new();
        write_basic_derivation(&mut out, &nix(), &drv, &drv.input_sources).unwrap();
        let back = read_basic_derivation(&mut &out[..], &nix(), "hello").unwrap();
        assert_eq!(back, drv);
    }

    #[test]
    fn input_srcs_replace_the_inputs() {
        let mut drv = hello();
        let dep = StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-dep.drv").unwrap();
        drv.input_derivations
            .insert(dep, [OutputName::out()].into());
        let srcs: BTreeSet<StorePath> = [
            bb(),
            StorePath::from_base_name("00000000000000000000000000000000-a").unwrap(),
        ]
        .into();
        let mut out = Vec::new();
        write_basic_derivation(&mut out, &nix(), &drv, &srcs).unwrap();
        let back = read_basic_derivation(&mut &out[..], &nix(), "hello").unwrap();
        assert!(back.input_derivations.is_empty());
        assert_eq!(back.input_sources, srcs);
        assert_eq!(back.env, drv.env);
    }

    #[test]
    fn fixed_output_round_trips() {
        let hash = HashAlgo::Sha256.digest(b"hello\n");
        let mut drv = hello();
        let path = StorePath::from_base_name("fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt").unwrap();
        drv.outputs.insert(
            OutputName::out(),
            DerivationOutput::CAFixed {
                method: FileIngestionMethod::Recursive,
                hash: hash.clone(),
                path,
            },
        );
        let mut out = Vec::new();
        write_basic_derivation(&mut out, &nix(), &drv, &BTreeSet::new()).unwrap();
        let tail = [s(b"r:sha256"), s(hash.to_base16().as_bytes())].concat();
        assert!(out.windows(tail.len()).any(|w| w == tail.as_slice()));
        let back = read_basic_derivation(&mut &out[..], &nix(), "hello").unwrap();
        assert_eq!(back.outputs, drv.outputs);
    }

    #[test]
    fn bad_derivations_are_refused() {
        // An output with a hash but no algorithm, as the ATerm parser refuses.
        let bytes = [
            n(1),
            s(b"out"),
            s(b""),
            s(b""),
            s(b"abcd"),
            n(0),
            s(b"x"),
            s(b"/b"),
            n(0),
            n(0),
        ]
        .concat();
        let err = read_basic_derivation(&mut &bytes[..], &nix(), "x").unwrap_err();
        assert!(matches!(err, ProtocolError::Invalid { .. }), "{err}");
        // The same output twice.
        let out = [s(b"out"), s(b""), s(b""), s(b"")].concat();
        let bytes = [n(2), out.clone(), out, n(0)].concat();
        let err = read_basic_derivation(&mut &bytes[..], &nix(), "x").unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        // A count no honest peer sends is refused before reading on.
        let bytes = n(u64::MAX);
        let err = read_basic_derivation(&mut &bytes[..], &nix(), "x").unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Wire {
                    source: WireError::TooLong { .. },
                    ..
                }
            ),
            "{err}"
        );
        // A truncated stream is an error, at every cut.
        let mut full = Vec::new();
        write_basic_derivation(&mut full, &nix(), &hello(), &BTreeSet::new()).unwrap();
        for cut in 0..full.len() {
            assert!(read_basic_derivation(&mut &full[..cut], &nix(), "hello").is_err());
        }
    }

    #[test]
    fn build_options_per_version() {
        let o = BuildOptions {
            max_silent_time: 1,
            build_timeout: 2,
            max_log_size: 3,
            keep_failed: true,
        };
        let cases: [(u64, Vec<u8>); 4] = [
            (1, [n(1), n(2)].concat()),
            (2, [n(1), n(2), n(3)].concat()),
            (3, [n(1), n(2), n(3), n(0), n(1)].concat()),
            (7, [n(1), n(2), n(3), n(0), n(1), n(1)].concat()),
        ];
        for (minor, want) in cases {
            let mut out = Vec::new();
            o.write(&mut out, minor).unwrap();
            assert_eq!(out, want, "minor {minor}");
            let back = BuildOptions::read(&mut &out[..], minor).unwrap();
            let expect = BuildOptions {
                max_log_size: if minor >= 2 { 3 } else { 0 },
                keep_failed: minor >= 7,
                ..o.clone()
            };
            assert_eq!(back, expect, "minor {minor}");
        }
        // Repeats are accepted and ignored.
        let bytes = [n(0), n(0), n(0), n(5), n(1), n(0)].concat();
        assert_eq!(
            BuildOptions::read(&mut &bytes[..], 7).unwrap(),
            BuildOptions::default()
        );
    }

    fn result() -> BuildResult {
        BuildResult {
            status: BuildStatus::Built,
            error_msg: String::new(),
            times_built: 1,
            non_deterministic: false,
            start_time: 1000,
            stop_time: 1002,
            built_outputs: [(
                "out".to_owned(),
                StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").unwrap(),
            )]
            .into(),
        }
    }

    const DRV_HASH: &str =
        "sha256:e8f5d9e5b1a8b46c4b8e1d1d8e0ec17ab10b4a8dbf27d0b1e3ad71e0d6f4ee5c";

    #[test]
    fn build_result_exact_bytes_2_7() {
        let mut out = Vec::new();
        result().write(&mut out, 7, &nix(), DRV_HASH).unwrap();
        let id = format!("{DRV_HASH}!out");
        let json = format!(
            r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"2qgfy89v28340cr9d9z471zfi5iczv5l-hello","signatures":[]}}"#
        );
        let want = [
            n(0),
            s(b""),
            n(1),
            n(0),
            n(1000),
            n(1002),
            n(1),
            s(id.as_bytes()),
            s(json.as_bytes()),
        ]
        .concat();
        assert_eq!(out, want);
        assert_eq!(
            BuildResult::read(&mut &out[..], 7, &nix()).unwrap(),
            result()
        );
    }

    #[test]
    fn build_result_per_version() {
        let r = BuildResult {
            status: BuildStatus::PermanentFailure,
            error_msg: "builder failed with exit code 1".to_owned(),
            ..result()
        };
        for minor in [2, 3, 5, 6, 7] {
            let mut out = Vec::new();
            r.write(&mut out, minor, &nix(), DRV_HASH).unwrap();
            let back = BuildResult::read(&mut &out[..], minor, &nix()).unwrap();
            let mut want = r.clone();
            if minor < 3 {
                want.times_built = 0;
                want.start_time = 0;
                want.stop_time = 0;
            }
            if minor < 6 {
                want.built_outputs.clear();
            }
            assert_eq!(back, want, "minor {minor}");
            for cut in 0..out.len() {
                assert!(BuildResult::read(&mut &out[..cut], minor, &nix()).is_err());
            }
        }
        // 2.2: status and message only.
        let mut out = Vec::new();
        r.write(&mut out, 2, &nix(), DRV_HASH).unwrap();
        assert_eq!(out, [n(3), s(r.error_msg.as_bytes())].concat());
    }

    #[test]
    fn build_result_bad_input() {
        let bytes = [n(15), s(b"")].concat();
        let err = BuildResult::read(&mut &bytes[..], 2, &nix()).unwrap_err();
        assert_eq!(err.to_string(), "BuildResult: unknown build status 15");
        let head = [n(0), s(b""), n(1), n(0), n(0), n(0), n(1)].concat();
        for (id, json) in [
            ("sha256:00", "{}"),
            (
                "no-bang",
                r#"{"outPath":"2qgfy89v28340cr9d9z471zfi5iczv5l-hello"}"#,
            ),
            ("sha256:00!out", r#"{"outPath":"not a path"}"#),
            ("sha256:00!out", "not json"),
            (
                "sha256:00!a b",
                r#"{"outPath":"2qgfy89v28340cr9d9z471zfi5iczv5l-hello"}"#,
            ),
        ] {
            let bytes = [head.clone(), s(id.as_bytes()), s(json.as_bytes())].concat();
            let err = BuildResult::read(&mut &bytes[..], 7, &nix()).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Invalid { .. }),
                "{id} {json}: {err}"
            );
        }
        // A full path in outPath is accepted too.
        let json = r#"{"outPath":"/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello"}"#;
        let bytes = [head, s(b"sha256:00!out"), s(json.as_bytes())].concat();
        let r = BuildResult::read(&mut &bytes[..], 7, &nix()).unwrap();
        assert_eq!(r.built_outputs, result().built_outputs);
    }

    #[test]
    fn statuses_number_as_nix() {
        for k in 0..15 {
            assert_eq!(BuildStatus::from_u64(k).unwrap() as u64, k);
        }
        assert_eq!(BuildStatus::from_u64(15), None);
        assert!(BuildStatus::AlreadyValid.is_success());
        assert!(!BuildStatus::TimedOut.is_success());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn bytes() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(any::<u8>(), 0..12)
        }

        fn drv() -> impl Strategy<Value = Derivation> {
            (
                proptest::collection::vec(any::<u8>(), 0..12)
                    .prop_filter("printed unescaped", |s| {
                        !s.contains(&b'"') && !s.contains(&b'\\')
                    }),
                bytes(),
                proptest::collection::vec(bytes(), 0..4),
                proptest::collection::btree_map(bytes(), bytes(), 0..6),
                proptest::collection::btree_set("[a-z][a-z0-9]{0,5}", 1..4),
            )
                .prop_map(|(system, builder, args, env, outs)| Derivation {
                    outputs: outs
                        .iter()
                        .map(|o| (OutputName::new(o).unwrap(), DerivationOutput::Deferred))
                        .collect(),
                    input_sources: [bb()].into(),
                    system,
                    builder,
                    args,
                    env,
                    ..Default::default()
                })
        }

        proptest! {
            #[test]
            fn write_then_read_is_identity(d in drv()) {
                let mut out = Vec::new();
                write_basic_derivation(&mut out, &nix(), &d, &d.input_sources).unwrap();
                let back = read_basic_derivation(&mut &out[..], &nix(), "x")
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(back, d);
            }

            #[test]
            fn readers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400), minor in 0u64..9) {
                let _ = read_basic_derivation(&mut &data[..], &nix(), "x");
                let _ = BuildOptions::read(&mut &data[..], minor);
                let _ = BuildResult::read(&mut &data[..], minor, &nix());
            }

            #[test]
            fn reader_survives_mutations(
                d in drv(),
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            ) {
                let mut out = Vec::new();
                write_basic_derivation(&mut out, &nix(), &d, &d.input_sources).unwrap();
                for (i, b) in edits {
                    let i = i.index(out.len());
                    out[i] = b;
                }
                let _ = read_basic_derivation(&mut &out[..], &nix(), "x");
            }
        }
    }
}
