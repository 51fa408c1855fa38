//! Derivations: the ATerm `.drv` format, `hashDerivationModulo`, output paths,
//! the JSON of `nix show-derivation` and the attributes builds look at.
//!
//! # Design
//!
//! Parsing goes in two steps, as in harmonia and tvix: the syntax is read
//! into a permissive [`RawDerivation`] (every field a byte string, lists in
//! file order), which `Derivation::from_raw` then checks into the strict
//! [`Derivation`] (store paths parsed in a given [`StoreDir`], output kinds
//! told apart, hashes decoded). The ATerm reader ([`aterm`]) and the JSON
//! reader ([`json`]) share that second step.
//!
//! Derivation strings (builder, args, env, system) are bytes: a `.drv` may
//! hold any byte but NUL, and real ones hold latin1 text. Maps are
//! `BTreeMap`s over bytes, which sort exactly as Nix's `std::map<std::string>`
//! (unsigned bytewise); [`StorePath`] sorts by base name, which within one
//! store directory is the order of the full paths that Nix sorts.
//!
//! A parsed derivation prints back byte for byte: the parser refuses what the
//! printer could not reproduce (unsorted or duplicate entries, escapes in the
//! fields Nix writes unescaped, hashes not in lowercase hex, trailing bytes).
//!
//! # The name
//!
//! A `.drv` file does not hold its derivation's name: Nix names a derivation
//! after the file (`<hash>-<name>.drv`, `nameFromPath`) whenever it reads
//! one, and fixed output paths and hence `hashDerivationModulo` depend on it.
//! The `name` environment variable is only what `derivationStrict` happens
//! to write, and not always: structured-attrs derivations keep it inside
//! `__json`, Guix derivations need not have it. So [`Derivation`] has no
//! name field; whatever knows the path passes the name
//! ([`name_from_drv_path`], the `…_named` methods, and [`DrvHasher`] names
//! every input derivation after its path). Only a derivation that has no
//! path yet is named after its `name` variable ([`Derivation::env_name`]),
//! and [`json::from_json`] takes the name as Nix does (see there).

pub mod aterm;
pub mod bytejson;
pub mod check;
pub mod json;
pub mod modulo;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;

use crate::store::path::{check_name, output_path_name};
use crate::store::{FileIngestionMethod, Hash, HashAlgo, PathError, StoreDir, StorePath};

pub use aterm::AtermError;
pub use json::JsonError;
pub use modulo::{hash_derivation_modulo, DrvHash, DrvHashKind, DrvHasher};

/// Why a derivation was refused or could not be completed.
#[derive(Debug, Error)]
pub enum DerivationError {
    #[error("invalid output name '{name}': {source}")]
    BadOutputName {
        name: String,
        #[source]
        source: PathError,
    },
    #[error("output name is not UTF-8: {0:?}")]
    OutputNameNotUtf8(Vec<u8>),
    #[error("{what} '{path}' is not a valid store path: {source}")]
    BadStorePath {
        what: &'static str,
        path: String,
        #[source]
        source: PathError,
    },
    #[error("input derivation '{0}' does not end in '.drv'")]
    InputNotDerivation(String),
    #[error("output '{output}': {why}")]
    BadOutput { output: String, why: String },
    #[error("output '{output}': unknown hash algorithm '{algo}' (expected [r:]md5, sha1, sha256 or sha512)")]
    BadHashAlgo { output: String, algo: String },
    #[error("output '{output}': hash '{hash}' is not {expected} lowercase hex digits")]
    BadOutputHash {
        output: String,
        hash: String,
        expected: usize,
    },
    #[error("derivation has no outputs")]
    NoOutputs,
    #[error("derivation mixes output kinds ({0}); Nix allows one kind per derivation")]
    MixedOutputs(String),
    #[error("a fixed-output derivation must have exactly one output, named 'out' (found {0})")]
    BadFixedOutputs(String),
    #[error("derivation has no valid name: {0}")]
    BadName(String),
    #[error(
        "the {field} contains '{byte}', which Nix writes unescaped and so cannot be read back"
    )]
    Unprintable { field: &'static str, byte: char },
    #[error("output '{output}': expected path {expected}, given {given}")]
    WrongOutputPath {
        output: String,
        expected: String,
        given: String,
    },
    #[error(
        "environment variable '{output}': expected the output path {expected}, given '{given}'"
    )]
    WrongOutputEnv {
        output: String,
        expected: String,
        given: String,
    },
    #[error("cannot compute output paths of a {0} derivation (only input-addressed and fixed-output ones)")]
    UnsupportedKind(&'static str),
    #[error("derivation {drv}: input derivation has no hash for output '{output}'")]
    NoHashForOutput { drv: String, output: String },
    #[error("input derivations form a cycle through {0}")]
    Cycle(String),
    #[error("cannot read input derivation {path}")]
    Lookup {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot compute a store path: {0}")]
    Path(#[from] PathError),
}

/// The name of a derivation output (`out`, `dev`, ...): valid as the suffix
/// of a store path name (`<name>-<output>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputName(String);

impl OutputName {
    /// Checks an output name: non-empty, store-path name characters only.
    pub fn new(name: &str) -> Result<OutputName, DerivationError> {
        check_name(name).map_err(|source| DerivationError::BadOutputName {
            name: name.to_owned(),
            source,
        })?;
        Ok(OutputName(name.to_owned()))
    }

    /// Checks an output name given as bytes (as in a `.drv`).
    pub fn from_bytes(name: &[u8]) -> Result<OutputName, DerivationError> {
        let s = std::str::from_utf8(name)
            .map_err(|_| DerivationError::OutputNameNotUtf8(name.to_vec()))?;
        OutputName::new(s)
    }

    /// The conventional default output.
    pub fn out() -> OutputName {
        OutputName("out".to_owned())
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OutputName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One output of a derivation, by how its path is determined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DerivationOutput {
    /// The path follows from the derivation's hashDerivationModulo.
    InputAddressed { path: StorePath },
    /// Fixed-output: the path follows from the declared content hash.
    CAFixed {
        method: FileIngestionMethod,
        hash: Hash,
        path: StorePath,
    },
    /// Content-addressed with the hash known only after the build (experimental in Nix).
    CAFloating {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
    /// Input-addressed, path not computed yet (written as `("out","","","")`).
    Deferred,
    /// Impure derivation output (experimental in Nix).
    Impure {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// The output path, when it is known.
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed { path } | DerivationOutput::CAFixed { path, .. } => {
                Some(path)
            }
            _ => None,
        }
    }

    /// The `hashAlgo` field: `[r:]<algo>` or empty.
    pub fn hash_algo(&self) -> String {
        match self {
            DerivationOutput::CAFixed { method, hash, .. } => method_algo(*method, hash.algo()),
            DerivationOutput::CAFloating { method, algo }
            | DerivationOutput::Impure { method, algo } => method_algo(*method, *algo),
            _ => String::new(),
        }
    }

    /// The `hash` field: hex for fixed outputs, `impure`, or empty.
    pub fn hash_field(&self) -> String {
        match self {
            DerivationOutput::CAFixed { hash, .. } => hash.to_base16(),
            DerivationOutput::Impure { .. } => "impure".to_owned(),
            _ => String::new(),
        }
    }

    fn kind_name(&self) -> &'static str {
        match self {
            DerivationOutput::InputAddressed { .. } => "input-addressed",
            DerivationOutput::CAFixed { .. } => "fixed",
            DerivationOutput::CAFloating { .. } => "floating content-addressed",
            DerivationOutput::Deferred => "deferred",
            DerivationOutput::Impure { .. } => "impure",
        }
    }
}

/// `printMethodAlgo`: `r:sha256`, `sha1`, ...
pub(crate) fn method_algo(method: FileIngestionMethod, algo: HashAlgo) -> String {
    match method {
        FileIngestionMethod::Recursive => format!("r:{algo}"),
        FileIngestionMethod::Flat => algo.to_string(),
    }
}

/// What kind of derivation this is, from its outputs (Nix's `DerivationType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DerivationKind {
    /// All outputs input-addressed (`deferred`: paths not computed yet).
    InputAddressed { deferred: bool },
    /// One output `out` with a fixed content hash.
    Fixed,
    /// Content-addressed outputs whose hash is known after the build.
    Floating,
    /// Impure outputs.
    Impure,
}

/// A derivation as Nix 2.8 models it, minus the name: what a `.drv` file
/// holds. The name belongs to the path (see "The name" in the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<OutputName, DerivationOutput>,
    /// Input `.drv` paths and the outputs of each that are used.
    pub input_derivations: BTreeMap<StorePath, BTreeSet<OutputName>>,
    /// Input store paths that are not derivation outputs.
    pub input_sources: BTreeSet<StorePath>,
    /// The platform, e.g. `x86_64-linux`. Written unescaped, so it must not
    /// contain `"` or `\`.
    pub system: Vec<u8>,
    /// The program to run (a path, or `builtin:…`).
    pub builder: Vec<u8>,
    /// Its arguments, in order.
    pub args: Vec<Vec<u8>>,
    /// Its environment, sorted bytewise by name.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One output as written: name, path, `hashAlgo`, `hash`, all unchecked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawOutput {
    /// The output name.
    pub name: Vec<u8>,
    /// The full output path, or empty.
    pub path: Vec<u8>,
    /// `[r:]<algo>` for content-addressed outputs, else empty.
    pub hash_algo: Vec<u8>,
    /// Hex hash (fixed), `impure`, or empty.
    pub hash: Vec<u8>,
}

/// A derivation as read, before any check beyond syntax: byte strings in
/// file order. Full store paths are still strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawDerivation {
    /// Output tuples.
    pub outputs: Vec<RawOutput>,
    /// Full `.drv` paths with the output names used from each.
    pub input_derivations: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    /// Full store paths.
    pub input_sources: Vec<Vec<u8>>,
    /// See [`Derivation`] for these.
    pub system: Vec<u8>,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Whether a raw fixed output may leave its path empty, to be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FixedPaths<'a> {
    /// As in a `.drv`: the path must be there (and is checked later).
    Required,
    /// As in JSON given to `derivation add`: empty means "compute it", from
    /// the derivation's name.
    MayCompute { name: &'a str },
}

impl Derivation {
    /// Parses a `.drv` file whose store paths are in `dir`.
    pub fn from_aterm(bytes: &[u8], dir: &StoreDir) -> Result<Derivation, AtermError> {
        let raw = aterm::parse(bytes)?;
        Derivation::from_raw(raw, dir, FixedPaths::Required).map_err(AtermError::Invalid)
    }

    /// The `.drv` file contents.
    pub fn to_aterm(&self, dir: &StoreDir) -> Vec<u8> {
        aterm::print(self, dir, false, None)
    }

    /// Checks a raw derivation into a strict one. With [`FixedPaths::Required`]
    /// (a `.drv`) the output kinds are checked too; JSON for `derivation add`
    /// may mix given and empty paths until they are filled in.
    pub(crate) fn from_raw(
        raw: RawDerivation,
        dir: &StoreDir,
        fixed: FixedPaths<'_>,
    ) -> Result<Derivation, DerivationError> {
        if let Some(&b) = raw.system.iter().find(|&&b| b == b'"' || b == b'\\') {
            return Err(DerivationError::Unprintable {
                field: "system",
                byte: b as char,
            });
        }
        let env: BTreeMap<Vec<u8>, Vec<u8>> = raw.env.into_iter().collect();
        let mut outputs = BTreeMap::new();
        for o in raw.outputs {
            let name = OutputName::from_bytes(&o.name)?;
            let output = parse_output(&name, &o, dir, fixed)?;
            outputs.insert(name, output);
        }
        let mut input_derivations = BTreeMap::new();
        for (path, outs) in raw.input_derivations {
            let path = parse_store_path("input derivation", &path, dir)?;
            if !path.is_derivation() {
                return Err(DerivationError::InputNotDerivation(dir.display(&path)));
            }
            let outs = outs
                .iter()
                .map(|o| OutputName::from_bytes(o))
                .collect::<Result<_, _>>()?;
            input_derivations.insert(path, outs);
        }
        let input_sources = raw
            .input_sources
            .iter()
            .map(|p| parse_store_path("input source", p, dir))
            .collect::<Result<_, _>>()?;
        let drv = Derivation {
            outputs,
            input_derivations,
            input_sources,
            system: raw.system,
            builder: raw.builder,
            args: raw.args,
            env,
        };
        if matches!(fixed, FixedPaths::Required) {
            drv.kind()?;
        }
        Ok(drv)
    }

    /// The kind of derivation, refusing what Nix refuses (no outputs, mixed
    /// kinds, a fixed output not alone or not named `out`).
    pub fn kind(&self) -> Result<DerivationKind, DerivationError> {
        let mut kinds: BTreeSet<&'static str> = BTreeSet::new();
        for o in self.outputs.values() {
            kinds.insert(o.kind_name());
        }
        let Some(&first) = kinds.first() else {
            return Err(DerivationError::NoOutputs);
        };
        if kinds.len() > 1 {
            return Err(DerivationError::MixedOutputs(
                kinds.into_iter().collect::<Vec<_>>().join(", "),
            ));
        }
        Ok(match first {
            "fixed" => {
                if self.outputs.len() != 1 || !self.outputs.contains_key(&OutputName::out()) {
                    let names: Vec<&str> = self.outputs.keys().map(|n| n.as_str()).collect();
                    return Err(DerivationError::BadFixedOutputs(names.join(", ")));
                }
                DerivationKind::Fixed
            }
            "floating content-addressed" => DerivationKind::Floating,
            "impure" => DerivationKind::Impure,
            "deferred" => DerivationKind::InputAddressed { deferred: true },
            _ => DerivationKind::InputAddressed { deferred: false },
        })
    }

    /// The `name` environment variable, when it is a valid store path name.
    ///
    /// This is *not* the derivation's name in general: Nix names a
    /// derivation after its `.drv` file (`<name>.drv`, [`name_from_drv_path`]),
    /// and a structured-attrs derivation keeps `name` inside `__json` while a
    /// Guix derivation need not have the variable at all. It is the name only
    /// where no path is known yet (a derivation being created, as
    /// `derivationStrict` does from its `name` attribute); every `…_named`
    /// method takes the name explicitly instead.
    pub fn env_name(&self) -> Result<&str, DerivationError> {
        env_name(&self.env)
    }

    /// The store path this derivation is written to, named after its `name`
    /// variable ([`Derivation::env_name`]); see [`Derivation::drv_path_named`].
    pub fn drv_path(&self, dir: &StoreDir) -> Result<StorePath, DerivationError> {
        self.drv_path_named(self.env_name()?, dir)
    }

    /// The store path this derivation is written to under the name `name`: a
    /// `text` path named `<name>.drv` whose references are the inputs (never
    /// the outputs).
    pub fn drv_path_named(&self, name: &str, dir: &StoreDir) -> Result<StorePath, DerivationError> {
        check_name(name).map_err(|e| DerivationError::BadName(e.to_string()))?;
        let name = format!("{name}.drv");
        let contents = HashAlgo::Sha256.digest(&self.to_aterm(dir));
        Ok(dir.make_text_path(&name, &contents, &self.references())?)
    }

    /// What the `.drv` file references: input sources and input derivations.
    pub fn references(&self) -> BTreeSet<StorePath> {
        let mut refs = self.input_sources.clone();
        refs.extend(self.input_derivations.keys().cloned());
        refs
    }

    /// Whether this is a fixed-output derivation.
    pub fn is_fixed_output(&self) -> bool {
        matches!(self.kind(), Ok(DerivationKind::Fixed))
    }

    /// `preferLocalBuild = true` (`env.preferLocalBuild == "1"`): build here
    /// rather than offload.
    pub fn prefer_local_build(&self) -> bool {
        self.env
            .get(b"preferLocalBuild".as_slice())
            .is_some_and(|v| v == b"1")
    }

    /// `requiredSystemFeatures`: the features a machine needs to build this,
    /// split on whitespace as Nix does.
    pub fn required_system_features(&self) -> BTreeSet<String> {
        self.env
            .get(b"requiredSystemFeatures".as_slice())
            .map(|v| {
                v.split(|b| b" \t\n\r".contains(b))
                    .filter(|f| !f.is_empty())
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The output paths that are known, by output name.
    pub fn output_paths(&self) -> BTreeMap<String, StorePath> {
        self.outputs
            .iter()
            .filter_map(|(name, o)| o.path().map(|p| (name.as_str().to_owned(), p.clone())))
            .collect()
    }
}

/// The `name` variable of `env`, checked: [`Derivation::env_name`].
fn env_name(env: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<&str, DerivationError> {
    let raw = env.get(b"name".as_slice()).ok_or_else(|| {
        DerivationError::BadName(
            "no 'name' variable, and no .drv path or JSON \"name\" to take it from".to_owned(),
        )
    })?;
    let name =
        std::str::from_utf8(raw).map_err(|_| DerivationError::BadName("not UTF-8".to_owned()))?;
    check_name(name).map_err(|e| DerivationError::BadName(e.to_string()))?;
    Ok(name)
}

/// The name of the derivation stored at `path`: its base name minus the
/// `<hash>-` prefix and the `.drv` suffix, as Nix's `nameFromPath`. This is
/// the name Nix gives a derivation it reads (`readDerivation`), whatever its
/// environment holds.
pub fn name_from_drv_path(path: &StorePath) -> Result<&str, DerivationError> {
    path.name()
        .strip_suffix(".drv")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DerivationError::InputNotDerivation(path.base_name().to_owned()))
}

fn parse_store_path(
    what: &'static str,
    bytes: &[u8],
    dir: &StoreDir,
) -> Result<StorePath, DerivationError> {
    let s = String::from_utf8_lossy(bytes);
    dir.parse_path(&s)
        .map_err(|source| DerivationError::BadStorePath {
            what,
            path: s.into_owned(),
            source,
        })
}

/// Interprets one output tuple as Nix's `parseDerivationOutput` does.
fn parse_output(
    name: &OutputName,
    o: &RawOutput,
    dir: &StoreDir,
    fixed: FixedPaths<'_>,
) -> Result<DerivationOutput, DerivationError> {
    let bad = |why: &str| DerivationError::BadOutput {
        output: name.to_string(),
        why: why.to_owned(),
    };
    if o.hash_algo.is_empty() {
        if !o.hash.is_empty() {
            return Err(bad("a hash without a hash algorithm"));
        }
        if o.path.is_empty() {
            return Ok(DerivationOutput::Deferred);
        }
        return Ok(DerivationOutput::InputAddressed {
            path: parse_store_path("output path", &o.path, dir)?,
        });
    }
    let algo_str = String::from_utf8_lossy(&o.hash_algo);
    let (method, algo) = match algo_str.strip_prefix("r:") {
        Some(a) => (FileIngestionMethod::Recursive, a),
        None => (FileIngestionMethod::Flat, algo_str.as_ref()),
    };
    let algo: HashAlgo = algo.parse().map_err(|_| DerivationError::BadHashAlgo {
        output: name.to_string(),
        algo: algo_str.to_string(),
    })?;
    if o.hash == b"impure" {
        if !o.path.is_empty() {
            return Err(bad("an impure output cannot have a path"));
        }
        return Ok(DerivationOutput::Impure { method, algo });
    }
    if o.hash.is_empty() {
        if !o.path.is_empty() {
            return Err(bad(
                "a floating content-addressed output cannot have a path",
            ));
        }
        return Ok(DerivationOutput::CAFloating { method, algo });
    }
    let hash_str = String::from_utf8_lossy(&o.hash);
    let bad_hash = || DerivationError::BadOutputHash {
        output: name.to_string(),
        hash: hash_str.to_string(),
        expected: algo.size() * 2,
    };
    let hash = Hash::parse_bare(&hash_str, algo).map_err(|_| bad_hash())?;
    // Nix prints the hash as lowercase hex; anything else would not print back.
    if hash.to_base16().as_bytes() != o.hash.as_slice() {
        return Err(bad_hash());
    }
    let path = match fixed {
        FixedPaths::MayCompute { name: drv_name } if o.path.is_empty() => dir
            .make_fixed_output_path(
                method,
                &hash,
                &output_path_name(drv_name, name.as_str()),
                [],
                false,
            )?,
        _ => parse_store_path("output path", &o.path, dir)?,
    };
    Ok(DerivationOutput::CAFixed { method, hash, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv_with(outputs: &[(&str, DerivationOutput)]) -> Derivation {
        Derivation {
            outputs: outputs
                .iter()
                .map(|(n, o)| (OutputName::new(n).unwrap(), o.clone()))
                .collect(),
            ..Default::default()
        }
    }

    fn fixed() -> DerivationOutput {
        let hash = HashAlgo::Sha256.digest(b"hello\n");
        let path = StorePath::from_base_name("fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt").unwrap();
        DerivationOutput::CAFixed {
            method: FileIngestionMethod::Flat,
            hash,
            path,
        }
    }

    #[test]
    fn rejects_bad_output_names() {
        for n in ["", "a/b", "a b", ".", "é"] {
            assert!(OutputName::new(n).is_err(), "{n:?}");
        }
        assert!(OutputName::from_bytes(b"\xff").is_err());
        assert_eq!(OutputName::new("dev").unwrap().as_str(), "dev");
    }

    #[test]
    fn kinds_follow_nix() {
        assert!(matches!(
            drv_with(&[]).kind(),
            Err(DerivationError::NoOutputs)
        ));
        assert_eq!(
            drv_with(&[("out", fixed())]).kind().unwrap(),
            DerivationKind::Fixed
        );
        assert!(matches!(
            drv_with(&[("dev", fixed())]).kind(),
            Err(DerivationError::BadFixedOutputs(_))
        ));
        assert!(matches!(
            drv_with(&[("out", fixed()), ("dev", DerivationOutput::Deferred)]).kind(),
            Err(DerivationError::MixedOutputs(_))
        ));
        assert_eq!(
            drv_with(&[("out", DerivationOutput::Deferred)])
                .kind()
                .unwrap(),
            DerivationKind::InputAddressed { deferred: true }
        );
    }

    #[test]
    fn attributes() {
        let mut d = drv_with(&[("out", fixed())]);
        assert!(d.is_fixed_output());
        assert!(!d.prefer_local_build());
        assert!(d.required_system_features().is_empty());
        d.env.insert(b"preferLocalBuild".to_vec(), b"1".to_vec());
        d.env.insert(
            b"requiredSystemFeatures".to_vec(),
            b" kvm\tbig-parallel  kvm ".to_vec(),
        );
        assert!(d.prefer_local_build());
        let want: BTreeSet<String> = ["big-parallel", "kvm"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(d.required_system_features(), want);
        d.env.insert(b"preferLocalBuild".to_vec(), b"".to_vec());
        assert!(!d.prefer_local_build());
    }

    #[test]
    fn env_name_is_checked() {
        let mut d = drv_with(&[("out", DerivationOutput::Deferred)]);
        assert!(d.env_name().is_err());
        d.env.insert(b"name".to_vec(), b"a b".to_vec());
        assert!(d.env_name().is_err());
        d.env.insert(b"name".to_vec(), b"hello".to_vec());
        assert_eq!(d.env_name().unwrap(), "hello");
    }

    #[test]
    fn name_from_drv_path_strips_hash_and_extension() {
        let p = StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv").unwrap();
        assert_eq!(name_from_drv_path(&p).unwrap(), "hello");
        let p = StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello").unwrap();
        assert!(name_from_drv_path(&p).is_err());
    }

    #[test]
    fn drv_path_named_ignores_the_env() {
        let drv = Derivation::from_aterm(testdata::HELLO, &testdata::nix()).unwrap();
        let mut no_name = drv.clone();
        no_name.env.remove(b"name".as_slice());
        assert!(no_name.drv_path(&testdata::nix()).is_err());
        // Same bytes as without the variable, named as asked.
        let p = no_name.drv_path_named("hello", &testdata::nix()).unwrap();
        assert!(p.base_name().ends_with("-hello.drv"));
        assert_ne!(p, drv.drv_path(&testdata::nix()).unwrap());
    }
}

#[cfg(test)]
mod proptests;

/// Shared test vectors.
#[cfg(test)]
pub(crate) mod testdata {
    use crate::store::StoreDir;

    /// formats.md §5: the `hello` derivation, `/nix/store/4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv`.
    pub const HELLO: &[u8] = br#"Derive([("out","/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello","","")],[],["/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb"],"x86_64-linux","/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb/bin/busybox",["sh","-c","echo hi > $out"],[("builder","/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb/bin/busybox"),("name","hello"),("out","/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello"),("system","x86_64-linux")])"#;

    pub fn nix() -> StoreDir {
        StoreDir::default()
    }
}
