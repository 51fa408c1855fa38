//! Ed25519 keys and signatures in Nix's `name:base64` formats.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use thiserror::Error;

/// Why a key or signature could not be parsed or checked.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("malformed signature '{0}' (expected '<key name>:<base64 of 64 bytes>')")]
    MalformedSignature(String),
}

/// A detached ed25519 signature with the name of the key that made it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn new(key_name: String, bytes: [u8; 64]) -> Signature {
        Signature { key_name, bytes }
    }
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
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
        Ok(Signature { key_name: name.to_owned(), bytes })
    }
}
