//! Ed25519 keys and signatures in Nix's `name:base64` formats.
//!
//! Nix signs a path's *fingerprint* ([`ValidPathInfo::fingerprint`]) with a
//! libsodium `crypto_sign` secret key. The file formats (`nix-store
//! --generate-binary-cache-key`) are:
//!
//! - secret key: `name:base64(seed ‖ public)`, 32 + 32 bytes, mode 0600;
//! - public key: `name:base64(public)`, 32 bytes, mode 0644;
//! - signature: `name:base64(ed25519(fingerprint))`, 64 bytes.
//!
//! Files are written without a trailing newline, as Nix writes them; a
//! trailing newline is accepted when reading, as Nix's base64 decoder skips it.
//! Ed25519 (RFC 8032) is deterministic, so sandoff's signature of a fingerprint
//! is byte-identical to Nix's with the same key.
//!
//! Trust is a set of public keys ([`TrustedKeys`]); a signature counts only if
//! a trusted key *of the same name* verifies it, as in Nix's `verifyDetached`.

use crate::bounded::{self, BoundedError};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::Permissions;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as BASE64};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore as _};
use thiserror::Error;
use zeroize::Zeroizing;

use super::{StoreDir, ValidPathInfo};

/// Bytes in a secret key: the 32-byte seed followed by the 32-byte public key.
pub const SECRET_KEY_LEN: usize = 64;
/// Bytes in a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes in a detached signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why a key or signature could not be parsed, stored or checked.
#[derive(Debug, Error)]
pub enum SignatureError {
    #[error("malformed signature '{0}' (expected '<key name>:<base64 of 64 bytes>')")]
    MalformedSignature(String),
    #[error("{origin}: not in 'name:base64' form")]
    NotNameBase64 { origin: String },
    #[error("{origin}: invalid key name '{name}' (it must be non-empty, without ':', whitespace or control characters)")]
    BadKeyName { origin: String, name: String },
    #[error("{origin}: a {kind} key has {expected} bytes, this one has {got}")]
    BadKeyLength {
        origin: String,
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{origin}: the public half of the secret key does not belong to its seed")]
    KeyPairMismatch { origin: String },
    #[error("{origin}: not a valid ed25519 public key")]
    BadPublicKey { origin: String },
    #[error("{origin}: two different keys are named '{name}'")]
    ConflictingKeys { origin: String, name: String },
    #[error("cannot read key file '{path}'")]
    Read {
        path: PathBuf,
        #[source]
        source: BoundedError,
    },
    #[error("cannot write key file '{path}'")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to overwrite existing file '{path}'")]
    Exists { path: PathBuf },
    #[error("cannot get random bytes from the operating system")]
    Randomness(#[source] io::Error),
    #[error("signature by unknown key '{name}'")]
    UnknownKey { name: String },
    #[error("signature by key '{name}' does not match the fingerprint")]
    BadSignature { name: String },
    #[error("cannot sign path '{path}': its NAR size is 0 (unknown)")]
    UnknownNarSize { path: String },
}

/// A detached ed25519 signature with the name of the key that made it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// Wraps raw signature bytes made by the key called `key_name`.
    pub fn new(key_name: String, bytes: [u8; 64]) -> Signature {
        Signature { key_name, bytes }
    }
    /// The name of the key that made the signature.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
    /// The 64 signature bytes.
    pub fn bytes(&self) -> &[u8; 64] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Signature {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Signature, SignatureError> {
        let bad = || SignatureError::MalformedSignature(s.to_owned());
        let (name, b64) = s.split_once(':').ok_or_else(bad)?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad());
        }
        let bytes = BASE64.decode(b64).map_err(|_| bad())?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| bad())?;
        Ok(Signature {
            key_name: name.to_owned(),
            bytes,
        })
    }
}

/// Nix's decoder stops at `=`, so key files without padding are accepted too.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Key names end up in whitespace-separated lists (signatures, trusted keys)
/// and before a `:`, so those characters cannot be part of them.
fn check_key_name(name: &str, origin: &str) -> Result<(), SignatureError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(SignatureError::BadKeyName {
            origin: origin.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Splits `name:base64` (one trailing newline allowed) and decodes the key
/// bytes into memory that is wiped when dropped.
fn split_key<'a>(
    text: &'a str,
    origin: &str,
) -> Result<(&'a str, Zeroizing<Vec<u8>>), SignatureError> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let not_key = || SignatureError::NotNameBase64 {
        origin: origin.to_owned(),
    };
    let (name, b64) = text.split_once(':').ok_or_else(not_key)?;
    if b64.is_empty() {
        return Err(not_key());
    }
    check_key_name(name, origin)?;
    let bytes = Zeroizing::new(LENIENT_BASE64.decode(b64).map_err(|_| not_key())?);
    Ok((name, bytes))
}

fn read_key_file(path: &Path) -> Result<Zeroizing<String>, SignatureError> {
    let read_err = |source| SignatureError::Read {
        path: path.to_owned(),
        source,
    };
    let bytes =
        Zeroizing::new(bounded::read_file(path, bounded::KEY_FILE_LIMIT).map_err(read_err)?);
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(SignatureError::NotNameBase64 {
            origin: key_file_origin(path),
        }),
    }
}

fn key_file_origin(path: &Path) -> String {
    format!("key file '{}'", path.display())
}

/// Creates `path` with `contents` and `mode`, atomically: the data goes to a
/// temporary file in the same directory (created 0600, so a secret is never
/// readable by others), which is then linked into place without replacing
/// anything, so the file is either absent or complete.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SignatureError> {
    if path.symlink_metadata().is_ok() {
        return Err(SignatureError::Exists {
            path: path.to_owned(),
        });
    }
    let write_err = |source| SignatureError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".sandoff-key-")
        .permissions(Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(write_err)?;
    tmp.write_all(contents).map_err(write_err)?;
    // fchmod is not subject to the umask, so the public key really is 0644.
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            SignatureError::Exists {
                path: path.to_owned(),
            }
        } else {
            write_err(e.error)
        }
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)
}

// The key bytes are wiped by `SigningKey`'s own `Drop` (ed25519-dalek's
// `zeroize` feature); this fails to compile if that ever goes away.
const _: fn() = || {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<SigningKey>();
};

/// An ed25519 secret key with its name. `Debug` never shows the key, and the
/// key bytes are wiped when it is dropped.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate(name: &str) -> Result<SecretKey, SignatureError> {
        check_key_name(name, "generate")?;
        let mut seed = Zeroizing::new([0u8; 32]);
        OsRng.try_fill_bytes(&mut seed[..]).map_err(|e| {
            let io = e.raw_os_error().map(io::Error::from_raw_os_error);
            SignatureError::Randomness(io.unwrap_or_else(|| io::Error::other(e.to_string())))
        })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Parses `name:base64(seed ‖ public)`; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<SecretKey, SignatureError> {
        let (name, bytes) = split_key(text, origin)?;
        let bytes: Zeroizing<[u8; SECRET_KEY_LEN]> =
            Zeroizing::new(bytes.as_slice().try_into().map_err(|_| {
                SignatureError::BadKeyLength {
                    origin: origin.to_owned(),
                    kind: "secret",
                    expected: SECRET_KEY_LEN,
                    got: bytes.len(),
                }
            })?);
        // libsodium signs with the stored public half; a mismatched one would
        // make signatures that no key verifies, so refuse it here.
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| {
            SignatureError::KeyPairMismatch {
                origin: origin.to_owned(),
            }
        })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Reads a secret key file as Nix writes it.
    pub fn read_file(path: &Path) -> Result<SecretKey, SignatureError> {
        let text = read_key_file(path)?;
        SecretKey::parse(&text, &key_file_origin(path))
    }

    /// Creates the secret key file at `path` (mode 0600, no trailing newline);
    /// refuses to replace an existing file.
    pub fn write_file(&self, path: &Path) -> Result<(), SignatureError> {
        let bytes = Zeroizing::new(self.key.to_keypair_bytes());
        // Reserved up front so that encoding never reallocates, which would
        // leave an unwiped copy of the key behind.
        let mut text = Zeroizing::new(String::with_capacity(self.name.len() + 1 + 88));
        text.push_str(&self.name);
        text.push(':');
        BASE64.encode_string(&bytes[..], &mut text);
        write_new_file(path, text.as_bytes(), 0o600)
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `fingerprint` (deterministic: the same bytes as Nix's signature).
    pub fn sign(&self, fingerprint: &str) -> Signature {
        let sig = self.key.sign(fingerprint.as_bytes());
        Signature::new(self.name.clone(), sig.to_bytes())
    }

    /// Signs a path's fingerprint. Like Nix, refuses a path whose NAR size
    /// is unknown (0), since its fingerprint would be meaningless.
    pub fn sign_path(
        &self,
        info: &ValidPathInfo,
        dir: &StoreDir,
    ) -> Result<Signature, SignatureError> {
        if info.nar_size == 0 {
            return Err(SignatureError::UnknownNarSize {
                path: dir.display(&info.path),
            });
        }
        Ok(self.sign(&info.fingerprint(dir)))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// An ed25519 public key with its name.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PublicKey, SignatureError> {
        let (name, bytes) = split_key(text, origin)?;
        let bytes: [u8; PUBLIC_KEY_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| SignatureError::BadKeyLength {
                    origin: origin.to_owned(),
                    kind: "public",
                    expected: PUBLIC_KEY_LEN,
                    got: bytes.len(),
                })?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| SignatureError::BadPublicKey {
            origin: origin.to_owned(),
        })?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Reads a public key file as Nix writes it.
    pub fn read_file(path: &Path) -> Result<PublicKey, SignatureError> {
        let text = read_key_file(path)?;
        PublicKey::parse(&text, &key_file_origin(path))
    }

    /// Creates the public key file at `path` (mode 0644, no trailing newline);
    /// refuses to replace an existing file.
    pub fn write_file(&self, path: &Path) -> Result<(), SignatureError> {
        write_new_file(path, self.to_string().as_bytes(), 0o644)
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32 key bytes.
    pub fn bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.key.as_bytes()
    }

    /// Whether `sig` is this key's signature of `fingerprint`. A signature
    /// naming another key is never valid, as in Nix.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        // Strict verification refuses small-order and non-canonical values,
        // as libsodium's crypto_sign_verify_detached does.
        sig.key_name() == self.name
            && self
                .key
                .verify_strict(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(sig.bytes()),
                )
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<PublicKey, SignatureError> {
        PublicKey::parse(s, "public key")
    }
}

/// The public keys whose signatures are trusted, by name (Nix's
/// `trusted-public-keys`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl TrustedKeys {
    /// No trusted keys: nothing verifies.
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Parses keys separated by whitespace or newlines; `#` starts a comment
    /// that runs to the end of the line. `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<TrustedKeys, SignatureError> {
        let mut keys = TrustedKeys::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(before, _)| before);
            for token in line.split_whitespace() {
                let key = PublicKey::parse(token, &format!("{origin} line {}", n + 1))?;
                keys.insert(key, origin)?;
            }
        }
        Ok(keys)
    }

    /// Reads a trusted keys file.
    pub fn read_file(path: &Path) -> Result<TrustedKeys, SignatureError> {
        let text =
            bounded::read_file_to_string(path, bounded::TRUSTED_KEYS_LIMIT).map_err(|source| {
                SignatureError::Read {
                    path: path.to_owned(),
                    source,
                }
            })?;
        TrustedKeys::parse(&text, &format!("trusted keys file '{}'", path.display()))
    }

    /// Like [`TrustedKeys::read_file`], but a missing file means no trusted keys.
    pub fn read_file_or_empty(path: &Path) -> Result<TrustedKeys, SignatureError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TrustedKeys::new()),
            _ => TrustedKeys::read_file(path),
        }
    }

    /// Adds a key. The same key twice is fine; two different keys with one
    /// name would make trust depend on order, so that is refused.
    pub fn insert(&mut self, key: PublicKey, origin: &str) -> Result<(), SignatureError> {
        match self.keys.get(&key.name) {
            Some(existing) if *existing != key => Err(SignatureError::ConflictingKeys {
                origin: origin.to_owned(),
                name: key.name,
            }),
            Some(_) => Ok(()),
            None => {
                self.keys.insert(key.name.clone(), key);
                Ok(())
            }
        }
    }

    /// The trusted key called `name`.
    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// Checks one signature of `fingerprint`, saying why it does not count.
    pub fn check(&self, fingerprint: &str, sig: &Signature) -> Result<(), SignatureError> {
        let key = self
            .keys
            .get(sig.key_name())
            .ok_or_else(|| SignatureError::UnknownKey {
                name: sig.key_name().to_owned(),
            })?;
        if key.verify(fingerprint, sig) {
            Ok(())
        } else {
            Err(SignatureError::BadSignature {
                name: sig.key_name().to_owned(),
            })
        }
    }

    /// How many distinct trusted keys have validly signed `info`. A key
    /// counts once however many signatures name it, so `--sigs-needed 2`
    /// really means two keys. A path of unknown NAR size (0) has no
    /// fingerprint and so no valid signature.
    pub fn count_valid(&self, info: &ValidPathInfo, dir: &StoreDir) -> usize {
        if info.nar_size == 0 {
            return 0;
        }
        let fingerprint = info.fingerprint(dir);
        let mut names: Vec<&str> = info
            .signatures
            .iter()
            .filter(|sig| self.check(&fingerprint, sig).is_ok())
            .map(Signature::key_name)
            .collect();
        names.dedup();
        names.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::store::{Hash, StorePath};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/keys")
            .join(name)
    }

    fn fixture_text(name: &str) -> String {
        std::fs::read_to_string(fixture(name)).expect("fixture")
    }

    /// Nix's signatures from `path-info.json`, by store path.
    fn nix_signatures() -> BTreeMap<String, Vec<String>> {
        let json: serde_json::Value =
            serde_json::from_str(&fixture_text("path-info.json")).expect("json");
        let mut out = BTreeMap::new();
        for entry in json.as_array().expect("array") {
            let path = entry["path"].as_str().expect("path").to_owned();
            let sigs = entry["signatures"]
                .as_array()
                .expect("sigs")
                .iter()
                .map(|s| s.as_str().unwrap().to_owned());
            out.insert(path, sigs.collect());
        }
        out
    }

    fn info_from_json(entry: &serde_json::Value, dir: &StoreDir) -> ValidPathInfo {
        let refs = entry["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| dir.parse_path(r.as_str().unwrap()).unwrap());
        ValidPathInfo {
            path: dir.parse_path(entry["path"].as_str().unwrap()).unwrap(),
            deriver: None,
            nar_hash: Hash::parse_any_prefixed(entry["narHash"].as_str().unwrap()).unwrap(),
            nar_size: entry["narSize"].as_u64().unwrap(),
            references: refs.collect(),
            registration_time: 0,
            ultimate: false,
            signatures: entry["signatures"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().parse().unwrap())
                .collect(),
            ca: None,
        }
    }

    #[test]
    fn signs_nix_fingerprints_byte_identically() {
        let sk = SecretKey::read_file(&fixture("sk")).unwrap();
        let sigs = nix_signatures();
        for name in ["foo", "baz"] {
            let fp = fixture_text(&format!("fingerprint-{name}"));
            let path = fp.split(';').nth(1).unwrap();
            let ours = sk.sign(&fp).to_string();
            assert_eq!(sigs[path], vec![ours], "{name}");
        }
    }

    #[test]
    fn verifies_nix_signatures_with_nix_public_key() {
        let pk = PublicKey::read_file(&fixture("pk")).unwrap();
        let sigs = nix_signatures();
        for name in ["foo", "baz"] {
            let fp = fixture_text(&format!("fingerprint-{name}"));
            let path = fp.split(';').nth(1).unwrap();
            let sig: Signature = sigs[path][0].parse().unwrap();
            assert!(pk.verify(&fp, &sig), "{name}");
            assert!(
                !pk.verify(&format!("{fp}x"), &sig),
                "{name} with altered fingerprint"
            );
        }
    }

    #[test]
    fn fingerprint_of_path_info_matches_nix() {
        let dir = StoreDir::default();
        let json: serde_json::Value =
            serde_json::from_str(&fixture_text("path-info.json")).unwrap();
        let mut keys = TrustedKeys::new();
        keys.insert(PublicKey::read_file(&fixture("pk")).unwrap(), "test")
            .unwrap();
        for entry in json.as_array().unwrap() {
            let info = info_from_json(entry, &dir);
            let fp = fixture_text(&format!("fingerprint-{}", info.path.name()));
            assert_eq!(info.fingerprint(&dir), fp);
            assert_eq!(keys.count_valid(&info, &dir), 1, "{}", info.path);
        }
    }

    #[test]
    fn public_key_of_nix_secret_key_is_nix_public_key() {
        let sk = SecretKey::read_file(&fixture("sk")).unwrap();
        assert_eq!(sk.to_public().to_string(), fixture_text("pk"));
        assert_eq!(sk.name(), "test-key-1");
    }

    #[test]
    fn debug_of_secret_key_is_redacted() {
        let sk = SecretKey::read_file(&fixture("sk")).unwrap();
        let secret_b64 = fixture_text("sk").split_once(':').unwrap().1.to_owned();
        let dbg = format!("{sk:?}");
        assert!(
            dbg.contains("<redacted>") && dbg.contains("test-key-1"),
            "{dbg}"
        );
        assert!(!dbg.contains(&secret_b64[..20]), "{dbg}");
    }

    #[test]
    fn writes_key_files_as_nix_does() {
        let tmp = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate("cache.example.org-1").unwrap();
        let (skf, pkf) = (tmp.path().join("sk"), tmp.path().join("pk"));
        sk.write_file(&skf).unwrap();
        sk.to_public().write_file(&pkf).unwrap();
        let meta = std::fs::metadata(&skf).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 19 + 1 + 88, "name, colon, base64 of 64 bytes");
        assert_eq!(std::fs::metadata(&pkf).unwrap().mode() & 0o777, 0o644);
        let pk_text = std::fs::read_to_string(&pkf).unwrap();
        assert!(!pk_text.ends_with('\n'));
        assert_eq!(pk_text, sk.to_public().to_string());
        // Round trip: the read-back key makes the same signatures.
        let sk2 = SecretKey::read_file(&skf).unwrap();
        assert_eq!(sk2.sign("x"), sk.sign("x"));
        assert_eq!(PublicKey::read_file(&pkf).unwrap(), sk.to_public());
        // Only the key file is left behind: no temporary files.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    }

    #[test]
    fn key_files_must_be_small_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let big = tmp.path().join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(bounded::TRUSTED_KEYS_LIMIT + 1).unwrap();
        let zero = Path::new("/dev/zero");
        for path in [zero, &fifo, &big] {
            // Each would hang or fill memory if read whole.
            let e = SecretKey::read_file(path).expect_err("refused");
            assert!(matches!(e, SignatureError::Read { .. }), "{e:?}");
            let e = PublicKey::read_file(path).unwrap_err();
            assert!(matches!(e, SignatureError::Read { .. }), "{e:?}");
            let e = TrustedKeys::read_file(path).unwrap_err();
            assert!(matches!(e, SignatureError::Read { .. }), "{e:?}");
        }
        let e = TrustedKeys::read_file(&big).unwrap_err();
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("larger than the limit of 1 MiB"));
    }

    #[test]
    fn refuses_to_overwrite_key_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sk");
        std::fs::write(&path, "keep me").unwrap();
        let sk = SecretKey::generate("k").unwrap();
        let err = sk.write_file(&path).unwrap_err();
        assert!(matches!(err, SignatureError::Exists { .. }), "{err}");
        assert!(sk.to_public().write_file(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn generated_keys_differ_and_verify() {
        let a = SecretKey::generate("a").unwrap();
        let b = SecretKey::generate("a").unwrap();
        assert_ne!(a.to_public(), b.to_public());
        let sig = a.sign("1;x");
        assert!(a.to_public().verify("1;x", &sig));
        assert!(!b.to_public().verify("1;x", &sig));
    }

    #[test]
    fn accepts_trailing_newline_and_missing_padding() {
        let pk = fixture_text("pk");
        assert_eq!(
            PublicKey::parse(&format!("{pk}\n"), "t")
                .unwrap()
                .to_string(),
            pk
        );
        assert_eq!(
            PublicKey::parse(pk.trim_end_matches('='), "t")
                .unwrap()
                .to_string(),
            pk
        );
        let sk = fixture_text("sk");
        assert!(SecretKey::parse(&format!("{sk}\n"), "t").is_ok());
    }

    #[test]
    fn rejects_malformed_keys_with_clear_messages() {
        let pk = fixture_text("pk");
        let b64 = pk.split_once(':').unwrap().1;
        let cases: Vec<(String, &str)> = vec![
            ("nocolon".into(), "t: not in 'name:base64' form"),
            (format!(":{b64}"), "t: invalid key name ''"),
            ("name:".into(), "t: not in 'name:base64' form"),
            ("name:!!!!".into(), "t: not in 'name:base64' form"),
            (
                format!("two words:{b64}"),
                "t: invalid key name 'two words'",
            ),
            (
                "name:AAAA".into(),
                "t: a public key has 32 bytes, this one has 3",
            ),
        ];
        for (text, msg) in cases {
            let err = PublicKey::parse(&text, "t").unwrap_err().to_string();
            assert!(err.starts_with(msg), "{text:?}: {err}");
        }
        // A public key is not a secret key, and vice versa.
        let err = SecretKey::parse(&pk, "key file 'pk'")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "key file 'pk': a secret key has 64 bytes, this one has 32"
        );
        let err = PublicKey::parse(&fixture_text("sk"), "t")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "t: a public key has 32 bytes, this one has 64");
    }

    #[test]
    fn secret_key_errors_never_show_the_key() {
        let sk = fixture_text("sk");
        let b64 = sk.split_once(':').unwrap().1;
        let err = SecretKey::parse(&format!("bad name:{b64}"), "t")
            .unwrap_err()
            .to_string();
        assert!(!err.contains(&b64[..16]), "{err}");
    }

    #[test]
    fn rejects_secret_key_with_foreign_public_half() {
        let a = SecretKey::generate("a").unwrap();
        let b = SecretKey::generate("a").unwrap();
        let mut bytes = a.key.to_keypair_bytes();
        bytes[32..].copy_from_slice(b.to_public().bytes());
        let text = format!("a:{}", BASE64.encode(bytes));
        let err = SecretKey::parse(&text, "t").unwrap_err();
        assert!(
            matches!(err, SignatureError::KeyPairMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_key_file_names_the_file() {
        let err = SecretKey::read_file(Path::new("/nonexistent/sk")).unwrap_err();
        assert_eq!(err.to_string(), "cannot read key file '/nonexistent/sk'");
    }

    #[test]
    fn parses_trusted_keys_with_comments_and_whitespace() {
        let a = SecretKey::generate("a").unwrap().to_public();
        let b = SecretKey::generate("b").unwrap().to_public();
        let c = SecretKey::generate("c").unwrap().to_public();
        let text = format!("# trusted\n{a}   {b} # the b key\n\n\t{c}\n{a}\n");
        let keys = TrustedKeys::parse(&text, "f").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.get("b"), Some(&b));
        let names: Vec<&str> = keys.iter().map(PublicKey::name).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(TrustedKeys::parse("", "f").unwrap().is_empty());
    }

    #[test]
    fn trusted_keys_errors_name_the_line() {
        let err = TrustedKeys::parse("# ok\nnot-a-key\n", "trusted keys file 'f'").unwrap_err();
        assert_eq!(
            err.to_string(),
            "trusted keys file 'f' line 2: not in 'name:base64' form"
        );
        let a1 = SecretKey::generate("a").unwrap().to_public();
        let a2 = SecretKey::generate("a").unwrap().to_public();
        let err = TrustedKeys::parse(&format!("{a1}\n{a2}"), "f").unwrap_err();
        assert_eq!(err.to_string(), "f: two different keys are named 'a'");
    }

    #[test]
    fn missing_trusted_keys_file_is_empty_only_when_asked() {
        let p = Path::new("/nonexistent/trusted-keys");
        assert!(TrustedKeys::read_file_or_empty(p).unwrap().is_empty());
        assert!(TrustedKeys::read_file(p).is_err());
    }

    fn sample_info() -> ValidPathInfo {
        ValidPathInfo {
            path: StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").unwrap(),
            deriver: None,
            nar_hash: Hash::parse_any_prefixed(
                "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h",
            )
            .unwrap(),
            nar_size: 120,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        }
    }

    #[test]
    fn counts_each_trusted_key_once() {
        let dir = StoreDir::default();
        let (a, b, stranger) = (
            SecretKey::generate("a").unwrap(),
            SecretKey::generate("b").unwrap(),
            SecretKey::generate("s").unwrap(),
        );
        let mut keys = TrustedKeys::new();
        keys.insert(a.to_public(), "t").unwrap();
        keys.insert(b.to_public(), "t").unwrap();
        let mut info = sample_info();
        assert_eq!(keys.count_valid(&info, &dir), 0);
        info.signatures.insert(a.sign_path(&info, &dir).unwrap());
        info.signatures
            .insert(stranger.sign_path(&info, &dir).unwrap());
        assert_eq!(keys.count_valid(&info, &dir), 1);
        // A second, different signature claiming to be by `a` adds nothing.
        info.signatures.insert(Signature::new("a".into(), [7; 64]));
        assert_eq!(keys.count_valid(&info, &dir), 1);
        info.signatures.insert(b.sign_path(&info, &dir).unwrap());
        assert_eq!(keys.count_valid(&info, &dir), 2);
        // Any change to what the fingerprint covers invalidates them all.
        info.nar_size = 121;
        assert_eq!(keys.count_valid(&info, &dir), 0);
    }

    #[test]
    fn check_explains_why_a_signature_does_not_count() {
        let dir = StoreDir::default();
        let a = SecretKey::generate("a").unwrap();
        let mut keys = TrustedKeys::new();
        keys.insert(a.to_public(), "t").unwrap();
        let fp = sample_info().fingerprint(&dir);
        assert!(keys.check(&fp, &a.sign(&fp)).is_ok());
        let foo = SecretKey::generate("foo").unwrap().sign(&fp);
        assert_eq!(
            keys.check(&fp, &foo).unwrap_err().to_string(),
            "signature by unknown key 'foo'"
        );
        let forged = Signature::new("a".into(), *foo.bytes());
        assert_eq!(
            keys.check(&fp, &forged).unwrap_err().to_string(),
            "signature by key 'a' does not match the fingerprint"
        );
    }

    #[test]
    fn refuses_to_sign_unknown_nar_size() {
        let dir = StoreDir::default();
        let sk = SecretKey::generate("a").unwrap();
        let mut info = sample_info();
        info.nar_size = 0;
        let err = sk.sign_path(&info, &dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot sign path '/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello': its NAR size is 0 (unknown)"
        );
        // And such a path never counts as signed.
        info.signatures.insert(sk.sign(&info.fingerprint(&dir)));
        let mut keys = TrustedKeys::new();
        keys.insert(sk.to_public(), "t").unwrap();
        assert_eq!(keys.count_valid(&info, &dir), 0);
    }

    #[test]
    fn rejects_bad_names_when_generating() {
        for name in ["", "a:b", "a b", "a\nb"] {
            assert!(SecretKey::generate(name).is_err(), "{name:?}");
        }
    }
}
