//! Store directories, store paths and how Nix computes them.
//!
//! A [`StorePath`] is the base name `<hash>-<name>` alone; the directory it
//! lives in is a separate value, [`StoreDir`], so that `/nix/store` and Guix's
//! `/gnu/store` are handled by the same code and never hard-coded.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::hash::{Hash, HashAlgo};
use super::nixbase32;

/// Length of the nix-base32 hash part of a store path.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts (255 minus the hash part and the dash, minus `.drv`-ish slack).
pub const MAX_NAME_LEN: usize = 211;

/// Why a store path or store directory was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("store directory '{0}' must be an absolute path without trailing slash, '.' or '..'")]
    BadStoreDir(String),
    #[error("path '{path}' is not in the store directory '{store_dir}'")]
    NotInStore { path: String, store_dir: String },
    #[error("store path '{0}' is too short to hold a hash part and a name")]
    TooShort(String),
    #[error("store path '{path}' has an invalid hash part")]
    BadHashPart { path: String },
    #[error("invalid store path name '{name}': {why}")]
    BadName { name: String, why: &'static str },
}

/// A logical store directory such as `/nix/store` or `/gnu/store`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl StoreDir {
    /// Checks and wraps a store directory: absolute, canonical, no trailing slash.
    pub fn new(dir: &str) -> Result<StoreDir, PathError> {
        let bad = || PathError::BadStoreDir(dir.to_owned());
        if !dir.starts_with('/') || dir.len() < 2 || dir.ends_with('/') {
            return Err(bad());
        }
        if dir[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad());
        }
        if dir.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(bad());
        }
        Ok(StoreDir(dir.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full logical path of `path`: `<store dir>/<hash>-<name>`.
    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.0)
    }

    /// Parses a full logical path; it must be exactly `<store dir>/<base name>`.
    pub fn parse_path(&self, full: &str) -> Result<StorePath, PathError> {
        let base = full
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| PathError::NotInStore {
                path: full.to_owned(),
                store_dir: self.0.clone(),
            })?;
        StorePath::from_base_name(base)
    }

    /// Like [`StoreDir::parse_path`] but accepts a path inside a store path
    /// (`/nix/store/<hash>-<name>/bin/sh`), returning the store path and the rest.
    pub fn split_path<'a>(&self, full: &'a str) -> Result<(StorePath, &'a str), PathError> {
        let not_in_store = || PathError::NotInStore {
            path: full.to_owned(),
            store_dir: self.0.clone(),
        };
        let rest = full
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_in_store)?;
        let (base, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        Ok((StorePath::from_base_name(base)?, tail))
    }

    /// `makeStorePath`: the path for `type:sha256:<hex>:<store dir>:<name>`.
    pub fn make_store_path(
        &self,
        ty: &str,
        inner: &Hash,
        name: &str,
    ) -> Result<StorePath, PathError> {
        check_name(name)?;
        let fingerprint = format!("{}:{}:{}:{}", ty, inner.to_base16_prefixed(), self.0, name);
        let digest = HashAlgo::Sha256.digest(fingerprint.as_bytes());
        let compressed = compress_hash(digest.as_bytes(), 20);
        Ok(StorePath(format!(
            "{}-{}",
            nixbase32::encode(&compressed),
            name
        )))
    }

    /// `makeTextPath`: text files and `.drv` files, with their references.
    pub fn make_text_path<'a>(
        &self,
        name: &str,
        contents_sha256: &Hash,
        references: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<StorePath, PathError> {
        let ty = self.type_with_refs("text", references, false);
        self.make_store_path(&ty, contents_sha256, name)
    }

    /// `makeFixedOutputPath`: content-addressed paths (`nix-store --add`,
    /// `--add-fixed`, fixed-output derivations).
    pub fn make_fixed_output_path<'a>(
        &self,
        method: FileIngestionMethod,
        hash: &Hash,
        name: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, PathError> {
        if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
            let ty = self.type_with_refs("source", references, self_reference);
            self.make_store_path(&ty, hash, name)
        } else {
            let prefix = if method == FileIngestionMethod::Recursive {
                "r:"
            } else {
                ""
            };
            let inner = format!("fixed:out:{}{}:{}:", prefix, hash.algo(), hash.to_base16());
            let inner = HashAlgo::Sha256.digest(inner.as_bytes());
            self.make_store_path("output:out", &inner, name)
        }
    }

    /// The path of a content-addressed object with the given references.
    pub fn make_content_addressed_path<'a>(
        &self,
        ca: &ContentAddress,
        name: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, PathError> {
        match ca {
            ContentAddress::Text(h) => self.make_text_path(name, h, references),
            ContentAddress::Fixed { method, hash } => {
                self.make_fixed_output_path(*method, hash, name, references, self_reference)
            }
        }
    }

    /// The path of an input-addressed derivation output, from the derivation's
    /// (masked) hashDerivationModulo.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, PathError> {
        let name = output_path_name(drv_name, output);
        self.make_store_path(&format!("output:{output}"), drv_hash, &name)
    }

    fn type_with_refs<'a>(
        &self,
        ty: &str,
        refs: impl IntoIterator<Item = &'a StorePath>,
        self_ref: bool,
    ) -> String {
        let mut refs: Vec<String> = refs.into_iter().map(|r| self.display(r)).collect();
        refs.sort();
        let mut s = ty.to_owned();
        for r in refs {
            s.push(':');
            s.push_str(&r);
        }
        if self_ref {
            s.push_str(":self");
        }
        s
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StoreDir {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, PathError> {
        StoreDir::new(s)
    }
}

/// `outputPathName`: `name` for `out`, `name-<output>` otherwise.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// XOR-folds a digest to `size` bytes (`compressHash`).
pub fn compress_hash(digest: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, b) in digest.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// Checks a store path name: 1..=211 bytes of `[0-9a-zA-Z+-._?=]`, not
/// starting with a `.`. Nix up to 2.3 and guix-daemon refuse a leading dot
/// outright ("for possibly security reasons (e.g., `.` and `..`)"); Nix 2.4
/// dropped the rule and later Nix refuses `.`, `..`, `.-…` and `..-…` again.
/// The strictest rule is the one every peer accepts, and it keeps hidden
/// files (such as our own `.sandoff-stage-…` copies) out of the namespace.
pub fn check_name(name: &str) -> Result<(), PathError> {
    let bad = |why| {
        Err(PathError::BadName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 211 characters");
    }
    if let Some(c) = name
        .bytes()
        .find(|&c| !(c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)))
    {
        let _ = c;
        return bad("only letters, digits and '+-._?=' are allowed");
    }
    if name.starts_with('.') {
        return bad("it must not start with a period");
    }
    Ok(())
}

/// The base name of a store path: a 32-character nix-base32 hash part, a
/// dash and a checked name. Ordered as Nix orders `StorePath`s (by base name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath(String);

impl StorePath {
    /// Parses `<hash>-<name>` (no directory).
    pub fn from_base_name(base: &str) -> Result<StorePath, PathError> {
        if base.len() < HASH_PART_LEN + 2 || !base.is_char_boundary(HASH_PART_LEN) {
            return Err(PathError::TooShort(base.to_owned()));
        }
        let (hash, rest) = base.split_at(HASH_PART_LEN);
        if !hash.bytes().all(nixbase32::is_digit) {
            return Err(PathError::BadHashPart {
                path: base.to_owned(),
            });
        }
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| PathError::BadHashPart {
                path: base.to_owned(),
            })?;
        check_name(name)?;
        Ok(StorePath(base.to_owned()))
    }

    /// Builds a path from a 20-byte digest and a name.
    pub fn from_digest(digest: &[u8; 20], name: &str) -> Result<StorePath, PathError> {
        check_name(name)?;
        Ok(StorePath(format!("{}-{}", nixbase32::encode(digest), name)))
    }

    /// The nix-base32 hash part (32 characters).
    pub fn hash_part(&self) -> &str {
        &self.0[..HASH_PART_LEN]
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.0[HASH_PART_LEN + 1..]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.0
    }

    /// Whether this is a derivation file (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.0.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    /// The base name; use [`StoreDir::display`] for the full path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a content-addressed path's files were hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileIngestionMethod {
    /// The hash of a single file's contents.
    Flat,
    /// The hash of the NAR serialisation (`r:`).
    Recursive,
}

/// A content address as stored in the database's `ca` column and narinfo `CA:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// `text:sha256:<nix32>`: text files and derivations.
    Text(Hash),
    /// `fixed:[r:]<algo>:<nix32>`: fixed-output paths.
    Fixed {
        method: FileIngestionMethod,
        hash: Hash,
    },
}

/// Why a content address string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContentAddressError {
    #[error(
        "invalid content address '{0}' (expected 'text:sha256:...' or 'fixed:[r:]<algo>:...')"
    )]
    Malformed(String),
    #[error("invalid hash in content address: {0}")]
    Hash(#[from] super::hash::HashError),
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{}", h.to_nix32_prefixed()),
            ContentAddress::Fixed { method, hash } => {
                let r = if *method == FileIngestionMethod::Recursive {
                    "r:"
                } else {
                    ""
                };
                write!(f, "fixed:{}{}", r, hash.to_nix32_prefixed())
            }
        }
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressError;
    fn from_str(s: &str) -> Result<Self, ContentAddressError> {
        if let Some(rest) = s.strip_prefix("text:") {
            let h = Hash::parse_any_prefixed(rest)?;
            if h.algo() != HashAlgo::Sha256 {
                return Err(ContentAddressError::Malformed(s.to_owned()));
            }
            return Ok(ContentAddress::Text(h));
        }
        if let Some(rest) = s.strip_prefix("fixed:") {
            let (method, rest) = match rest.strip_prefix("r:") {
                Some(r) => (FileIngestionMethod::Recursive, r),
                None => (FileIngestionMethod::Flat, rest),
            };
            return Ok(ContentAddress::Fixed {
                method,
                hash: Hash::parse_any_prefixed(rest)?,
            });
        }
        Err(ContentAddressError::Malformed(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nix() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn parses_and_prints_full_paths() {
        let p = nix()
            .parse_path("/nix/store/q6dq4cjk6aw4cz1whdksas0153xcyk1b-d")
            .unwrap();
        assert_eq!(p.hash_part(), "q6dq4cjk6aw4cz1whdksas0153xcyk1b");
        assert_eq!(p.name(), "d");
        assert_eq!(
            nix().display(&p),
            "/nix/store/q6dq4cjk6aw4cz1whdksas0153xcyk1b-d"
        );
        let gnu = StoreDir::new("/gnu/store").unwrap();
        assert!(matches!(
            gnu.parse_path("/nix/store/q6dq4cjk6aw4cz1whdksas0153xcyk1b-d"),
            Err(PathError::NotInStore { .. })
        ));
    }

    #[test]
    fn rejects_bad_names() {
        for name in [
            "",
            ".",
            "..",
            ".-x",
            "..-x",
            ".x",
            "..x",
            ".sandoff-stage-0",
            "a/b",
            "a b",
            "é",
            &"x".repeat(212),
        ] {
            assert!(check_name(name).is_err(), "{name:?}");
        }
        for name in ["a", "a.", "x..y", "a+b-c.d_e?f=g", &"x".repeat(211)] {
            assert!(check_name(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn rejects_bad_hash_parts() {
        assert!(StorePath::from_base_name("e6dq4cjk6aw4cz1whdksas0153xcyk1b-d").is_err());
        assert!(StorePath::from_base_name("q6dq4cjk6aw4cz1whdksas0153xcyk1bxd").is_err());
        assert!(StorePath::from_base_name("q6dq4cjk6aw4cz1whdksas0153xcyk1b-").is_err());
        assert!(StorePath::from_base_name("short").is_err());
        assert!(StorePath::from_base_name("q6dq4cjk6aw4cz1whdksas0153xcyk1é-d").is_err());
    }

    #[test]
    fn rejects_bad_store_dirs() {
        for d in [
            "",
            "/",
            "nix/store",
            "/nix/store/",
            "/nix//store",
            "/nix/./store",
            "/nix/../store",
        ] {
            assert!(StoreDir::new(d).is_err(), "{d:?}");
        }
    }

    // Vectors from Nix 2.8.0 (see ../shared/reference/formats.md §4).
    #[test]
    fn fixed_output_paths() {
        let tree_nar = Hash::parse_bare(
            "6c01ab4fdd85148deb9764095d88cda92c8d190101b28046748bf5c6ffbd231c",
            HashAlgo::Sha256,
        )
        .unwrap();
        // The source path of the test tree (`nix-store --add`), and a flat
        // file (`--add-fixed`).
        for (method, hash, name, base) in [
            (
                FileIngestionMethod::Recursive,
                tree_nar,
                "d",
                "q6dq4cjk6aw4cz1whdksas0153xcyk1b-d",
            ),
            (
                FileIngestionMethod::Flat,
                HashAlgo::Sha256.digest(b"hello\n"),
                "a.txt",
                "fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt",
            ),
        ] {
            let p = nix()
                .make_fixed_output_path(method, &hash, name, [], false)
                .unwrap();
            assert_eq!(p.base_name(), base);
        }
    }

    #[test]
    fn text_paths() {
        let foo = nix()
            .make_text_path("foo", &HashAlgo::Sha256.digest(b"bar"), [])
            .unwrap();
        assert_eq!(foo.base_name(), "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
        let content = nix().display(&foo);
        let baz = nix()
            .make_text_path("baz", &HashAlgo::Sha256.digest(content.as_bytes()), [&foo])
            .unwrap();
        assert_eq!(baz.base_name(), "5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz");
    }

    #[test]
    fn content_address_round_trip() {
        for s in [
            "text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            "fixed:r:sha1:00bgd045z0d4icpbc2yyz4gx48ak44la",
        ] {
            assert_eq!(s.parse::<ContentAddress>().unwrap().to_string(), s);
        }
        assert!("blob:sha256:x".parse::<ContentAddress>().is_err());
    }
}
