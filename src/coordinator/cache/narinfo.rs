//! Nix's `.narinfo` text: what a binary cache says about one store path.
//!
//! The writer prints the fields in the order and form of Nix 2.8's
//! `NarInfo::to_string` (a cache written here reads like one `nix copy`
//! wrote). The parser reads what that writer and Nix write, and is the
//! first thing an agent meets from the network: it is bounded
//! ([`MAX_NARINFO_SIZE`]), strict about the fields sandoff relies on
//! (duplicates, hashes, store paths, a relative `URL`) and never panics.
//! Unknown fields are ignored, as Nix ignores them.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use thiserror::Error;

use crate::store::signature::{Signature, SignatureError};
use crate::store::{ContentAddress, Hash, HashAlgo, StoreDir, StorePath, ValidPathInfo};

/// The longest narinfo read. A real one is a few hundred bytes plus about
/// 60 bytes a reference; 4 MiB allows some 60,000 references.
pub const MAX_NARINFO_SIZE: usize = 4 << 20;

/// How the file at `URL` is compressed. Only what sandoff writes and
/// reads back is known; anything else (Nix's default `bzip2`, `xz`, …) is
/// refused when parsing, so that a client fails with a clear message
/// instead of feeding the wrong decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `zstd`: what the coordinator's cache holds.
    Zstd,
    /// `none`: the file is the NAR itself.
    None,
}

impl Compression {
    /// The name in the `Compression:` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

/// Why a narinfo was refused.
#[derive(Debug, Error)]
pub enum NarInfoError {
    #[error("narinfo is larger than {MAX_NARINFO_SIZE} bytes")]
    TooLarge,
    #[error("narinfo is not UTF-8 text")]
    NotUtf8,
    #[error("narinfo line {line}: expected 'Name: value' ending in a newline")]
    Malformed { line: usize },
    #[error("narinfo line {line}: field '{field}' given twice")]
    Duplicate { line: usize, field: &'static str },
    #[error("narinfo has no '{0}' field")]
    Missing(&'static str),
    #[error("narinfo line {line}: bad {field} '{value}'")]
    BadValue {
        line: usize,
        field: &'static str,
        value: String,
    },
    #[error("narinfo line {line}: bad store path in {field}")]
    BadPath {
        line: usize,
        field: &'static str,
        #[source]
        source: crate::store::PathError,
    },
    #[error("narinfo line {line}: bad hash in {field}")]
    BadHash {
        line: usize,
        field: &'static str,
        #[source]
        source: crate::store::HashError,
    },
    #[error("narinfo line {line}: {field} must be a sha256 hash")]
    NotSha256 { line: usize, field: &'static str },
    #[error("narinfo line {line}: bad signature")]
    BadSignature {
        line: usize,
        #[source]
        source: SignatureError,
    },
    #[error("narinfo line {line}: compression '{value}' is not supported (only zstd and none)")]
    UnsupportedCompression { line: usize, value: String },
    #[error("narinfo has no 'Compression' field: Nix then means bzip2, which is not supported (only zstd and none)")]
    DefaultCompression,
    #[error("narinfo line {line}: URL '{url}' is not a plain relative path inside the cache")]
    BadUrl { line: usize, url: String },
}

/// A parsed or to-be-written narinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    /// `StorePath` (written in full, in the cache's store directory).
    pub path: StorePath,
    /// `URL`: where the (compressed) NAR is, relative to the cache.
    pub url: String,
    /// `Compression`.
    pub compression: Compression,
    /// `FileHash`: SHA-256 of the file at `url`.
    pub file_hash: Option<Hash>,
    /// `FileSize`: size of the file at `url`.
    pub file_size: Option<u64>,
    /// `NarHash`: SHA-256 of the NAR.
    pub nar_hash: Hash,
    /// `NarSize`.
    pub nar_size: u64,
    /// `References` (base names in the text).
    pub references: BTreeSet<StorePath>,
    /// `Deriver` (a base name in the text).
    pub deriver: Option<StorePath>,
    /// `Sig` lines.
    pub signatures: BTreeSet<Signature>,
    /// `CA`.
    pub ca: Option<ContentAddress>,
}

impl NarInfo {
    /// The path's metadata as the store models it: what signatures cover
    /// ([`ValidPathInfo::fingerprint`]) and what a store registers.
    pub fn to_path_info(&self) -> ValidPathInfo {
        ValidPathInfo {
            path: self.path.clone(),
            deriver: self.deriver.clone(),
            nar_hash: self.nar_hash.clone(),
            nar_size: self.nar_size,
            references: self.references.clone(),
            registration_time: 0,
            ultimate: false,
            signatures: self.signatures.clone(),
            ca: self.ca.clone(),
        }
    }

    /// The text, as Nix 2.8 writes it (fields in its order, every line
    /// ending in a newline, `References:` present even when empty).
    pub fn to_text(&self, dir: &StoreDir) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "StorePath: {}", dir.display(&self.path));
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression.as_str());
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {}", h.to_nix32_prefixed());
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash.to_nix32_prefixed());
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", d.base_name());
        }
        for sig in &self.signatures {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// Parses narinfo text whose store paths are in `dir`.
    pub fn parse(text: &[u8], dir: &StoreDir) -> Result<NarInfo, NarInfoError> {
        if text.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge);
        }
        let text = std::str::from_utf8(text).map_err(|_| NarInfoError::NotUtf8)?;
        let mut p = Partial::default();
        let mut rest = text;
        let mut line = 0;
        while !rest.is_empty() {
            line += 1;
            // Every line ends in a newline, as Nix requires.
            let (l, after) = rest
                .split_once('\n')
                .ok_or(NarInfoError::Malformed { line })?;
            rest = after;
            let (name, value) = l
                .split_once(": ")
                .or_else(|| l.strip_suffix(':').map(|n| (n, "")))
                .ok_or(NarInfoError::Malformed { line })?;
            p.field(line, name, value, dir)?;
        }
        p.finish()
    }
}

/// Fields seen so far.
#[derive(Default)]
struct Partial {
    path: Option<StorePath>,
    url: Option<String>,
    compression: Option<Compression>,
    file_hash: Option<Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Hash>,
    nar_size: Option<u64>,
    references: Option<BTreeSet<StorePath>>,
    deriver: Option<StorePath>,
    signatures: BTreeSet<Signature>,
    ca: Option<ContentAddress>,
}

/// Sets a single-valued field, refusing a second one.
fn once<T>(
    slot: &mut Option<T>,
    line: usize,
    field: &'static str,
    value: T,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Duplicate { line, field });
    }
    *slot = Some(value);
    Ok(())
}

fn sha256(line: usize, field: &'static str, value: &str) -> Result<Hash, NarInfoError> {
    let h = Hash::parse_any_prefixed(value).map_err(|source| NarInfoError::BadHash {
        line,
        field,
        source,
    })?;
    if h.algo() != HashAlgo::Sha256 {
        return Err(NarInfoError::NotSha256 { line, field });
    }
    Ok(h)
}

fn number(line: usize, field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    // `u64::from_str` takes a leading '+'; Nix's writer never does.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(line, field, value));
    }
    value.parse().map_err(|_| bad(line, field, value))
}

fn bad(line: usize, field: &'static str, value: &str) -> NarInfoError {
    NarInfoError::BadValue {
        line,
        field,
        value: value.chars().take(100).collect(),
    }
}

fn base_name(line: usize, field: &'static str, value: &str) -> Result<StorePath, NarInfoError> {
    StorePath::from_base_name(value).map_err(|source| NarInfoError::BadPath {
        line,
        field,
        source,
    })
}

/// A URL the client may join to the cache's base: a relative path of
/// plain names (`nar/<hash>.nar.zst`), never absolute, never `..`.
fn check_url(line: usize, url: &str) -> Result<(), NarInfoError> {
    let ok = !url.is_empty()
        && url.len() <= 1024
        && !url.starts_with('/')
        && url.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(NarInfoError::BadUrl {
            line,
            url: url.chars().take(100).collect(),
        })
    }
}

impl Partial {
    fn field(
        &mut self,
        line: usize,
        name: &str,
        value: &str,
        dir: &StoreDir,
    ) -> Result<(), NarInfoError> {
        match name {
            "StorePath" => {
                let p = dir
                    .parse_path(value)
                    .map_err(|source| NarInfoError::BadPath {
                        line,
                        field: "StorePath",
                        source,
                    })?;
                once(&mut self.path, line, "StorePath", p)
            }
            "URL" => {
                check_url(line, value)?;
                once(&mut self.url, line, "URL", value.to_owned())
            }
            "Compression" => {
                let c = match value {
                    "zstd" => Compression::Zstd,
                    "none" => Compression::None,
                    _ => {
                        return Err(NarInfoError::UnsupportedCompression {
                            line,
                            value: value.chars().take(100).collect(),
                        })
                    }
                };
                once(&mut self.compression, line, "Compression", c)
            }
            "FileHash" => once(
                &mut self.file_hash,
                line,
                "FileHash",
                sha256(line, "FileHash", value)?,
            ),
            "FileSize" => once(
                &mut self.file_size,
                line,
                "FileSize",
                number(line, "FileSize", value)?,
            ),
            "NarHash" => once(
                &mut self.nar_hash,
                line,
                "NarHash",
                sha256(line, "NarHash", value)?,
            ),
            "NarSize" => once(
                &mut self.nar_size,
                line,
                "NarSize",
                number(line, "NarSize", value)?,
            ),
            "References" => {
                let refs = value
                    .split(' ')
                    .filter(|r| !r.is_empty())
                    .map(|r| base_name(line, "References", r))
                    .collect::<Result<BTreeSet<_>, _>>()?;
                once(&mut self.references, line, "References", refs)
            }
            "Deriver" => {
                // Nix writes (and skips) this placeholder for an unknown deriver.
                if value == "unknown-deriver" {
                    return Ok(());
                }
                let d = base_name(line, "Deriver", value)?;
                once(&mut self.deriver, line, "Deriver", d)
            }
            "Sig" => {
                let sig = value
                    .parse::<Signature>()
                    .map_err(|source| NarInfoError::BadSignature { line, source })?;
                self.signatures.insert(sig);
                Ok(())
            }
            "CA" => {
                let ca = value
                    .parse::<ContentAddress>()
                    .map_err(|_| bad(line, "CA", value))?;
                once(&mut self.ca, line, "CA", ca)
            }
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        let nar_size = self.nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            // Nix refuses it too: a NAR is never empty, and a signature
            // over size 0 means nothing.
            return Err(NarInfoError::Missing("NarSize"));
        }
        Ok(NarInfo {
            path: self.path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: self.url.ok_or(NarInfoError::Missing("URL"))?,
            compression: self.compression.ok_or(NarInfoError::DefaultCompression)?,
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver,
            signatures: self.signatures,
            ca: self.ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::signature::SecretKey;
    use proptest::prelude::*;

    /// What Nix 2.8 wrote for `nix copy --to file://…?compression=zstd` of
    /// a `nix-store --add`ed file (Debian's nix-bin, see the module docs).
    const NIX_WROTE: &str = "StorePath: /nix/store/qiwmmmgnk4xmy6mma2man57iwykzv7rg-f.txt
URL: nar/0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar.zst
Compression: zstd
FileHash: sha256:0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj
FileSize: 88
NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
NarSize: 120
References: 
CA: fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
";

    fn dir() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn reads_and_writes_what_nix_wrote_byte_for_byte() {
        let info = NarInfo::parse(NIX_WROTE.as_bytes(), &dir()).unwrap();
        assert_eq!(info.compression, Compression::Zstd);
        assert_eq!(info.nar_size, 120);
        assert_eq!(info.file_size, Some(88));
        assert!(info.references.is_empty());
        assert_eq!(info.to_text(&dir()), NIX_WROTE);
    }

    #[test]
    fn round_trips_references_deriver_and_signatures() {
        let mut info = NarInfo::parse(NIX_WROTE.as_bytes(), &dir()).unwrap();
        let r1 = StorePath::from_base_name("5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz").unwrap();
        let r2 = StorePath::from_base_name("vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo").unwrap();
        info.references = [r1, r2].into_iter().collect();
        info.deriver =
            Some(StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv").unwrap());
        info.ca = None;
        let key = SecretKey::generate("test-1").unwrap();
        let sig = key.sign(&info.to_path_info().fingerprint(&dir()));
        info.signatures.insert(sig);
        let text = info.to_text(&dir());
        assert!(text.contains("References: 5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo\n"));
        assert!(text.contains("Deriver: 4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv\n"));
        let back = NarInfo::parse(text.as_bytes(), &dir()).unwrap();
        assert_eq!(back, info);
        let fp = back.to_path_info().fingerprint(&dir());
        assert!(back
            .signatures
            .iter()
            .all(|s| key.to_public().verify(&fp, s)));
    }

    #[test]
    fn refuses_what_a_client_must_not_follow() {
        let cases: Vec<(String, &str)> = vec![
            (NIX_WROTE.replace("zstd\n", "xz\n"), "compression 'xz'"),
            (
                NIX_WROTE.replace("Compression: zstd\n", ""),
                "no 'Compression'",
            ),
            (
                NIX_WROTE.replace("URL: nar/", "URL: ../nar/"),
                "not a plain relative path",
            ),
            (
                NIX_WROTE.replace("URL: nar/", "URL: /etc/"),
                "not a plain relative path",
            ),
            (
                NIX_WROTE.replace("URL: nar/", "URL: http://evil/"),
                "not a plain relative path",
            ),
            (NIX_WROTE.replace("NarSize: 120", "NarSize: 0"), "NarSize"),
            (
                NIX_WROTE.replace("NarSize: 120", "NarSize: +12"),
                "bad NarSize",
            ),
            (
                format!("{NIX_WROTE}NarSize: 120\n"),
                "'NarSize' given twice",
            ),
            (
                NIX_WROTE.replace("NarHash: sha256:", "NarHash: md5:"),
                "NarHash",
            ),
            (NIX_WROTE.trim_end().to_owned(), "ending in a newline"),
            (NIX_WROTE.replace("/nix/store/", "/gnu/store/"), "StorePath"),
            (
                NIX_WROTE.replace("References: ", "References: ../x"),
                "References",
            ),
            ("x".repeat(MAX_NARINFO_SIZE + 1), "larger than"),
        ];
        for (text, want) in cases {
            let err = NarInfo::parse(text.as_bytes(), &dir()).unwrap_err();
            let msg = format!("{err}");
            assert!(msg.contains(want), "{msg:?} should say {want:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = NarInfo::parse(&bytes, &dir());
        }

        /// A valid narinfo with random lines mutated or inserted never
        /// panics either (more of the input reaches the field parsers).
        #[test]
        fn mutated_narinfo_never_panics(
            cut in 0usize..NIX_WROTE.len(),
            junk in "[ -~\n]{0,80}",
        ) {
            let mut text = NIX_WROTE.as_bytes()[..cut].to_vec();
            text.extend_from_slice(junk.as_bytes());
            text.extend_from_slice(&NIX_WROTE.as_bytes()[cut..]);
            // What parses prints back to text that parses the same.
            if let Ok(info) = NarInfo::parse(&text, &dir()) {
                let again = NarInfo::parse(info.to_text(&dir()).as_bytes(), &dir());
                prop_assert_eq!(again.ok(), Some(info));
            }
        }
    }
}
