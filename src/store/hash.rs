//! Hashes as Nix prints and parses them: base16, nix-base32, base64 and SRI.

use std::fmt;
use std::io;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use md5::Digest as _;
use thiserror::Error;

use super::nixbase32;

/// The hash algorithms Nix accepts for fixed outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The name Nix uses (`sha256`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Hashes a byte string in one go.
    pub fn digest(self, data: &[u8]) -> Hash {
        let mut h = Hasher::new(self);
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_owned())),
        }
    }
}

/// Why a hash string could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}' (expected md5, sha1, sha256 or sha512)")]
    UnknownAlgo(String),
    #[error("hash '{0}' names no algorithm (expected e.g. 'sha256:...' or 'sha256-...')")]
    MissingAlgo(String),
    #[error("hash '{hash}' has the wrong length for {algo}")]
    BadLength { hash: String, algo: HashAlgo },
    #[error("hash '{hash}' is not valid {encoding}")]
    BadEncoding {
        hash: String,
        encoding: &'static str,
    },
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

impl Hash {
    /// Builds a hash from raw digest bytes; `None` when the length is wrong for `algo`.
    pub fn from_bytes(algo: HashAlgo, digest: &[u8]) -> Option<Hash> {
        if digest.len() != algo.size() {
            return None;
        }
        let mut bytes = [0u8; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Some(Hash { algo, bytes })
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    /// Lowercase hexadecimal, no prefix.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(self.algo.size() * 2);
        for b in self.as_bytes() {
            s.push(char::from_digit((b >> 4) as u32, 16).expect("nibble"));
            s.push(char::from_digit((b & 0xf) as u32, 16).expect("nibble"));
        }
        s
    }

    /// nix-base32, no prefix.
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(self.as_bytes())
    }

    /// Standard base64 with padding, no prefix.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.as_bytes())
    }

    /// `algo:<nix32>`, as in narinfo files and fingerprints.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("{}:{}", self.algo, self.to_nix32())
    }

    /// `algo:<hex>`, as in Nix's SQLite database.
    pub fn to_base16_prefixed(&self) -> String {
        format!("{}:{}", self.algo, self.to_base16())
    }

    /// `algo-<base64>` (Subresource Integrity), as in `nix path-info --json`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// Parses a hash whose algorithm is known from context: base16, nix32 or
    /// base64, told apart by length, as Nix does.
    pub fn parse_bare(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        let n = algo.size();
        let bad = |encoding| HashError::BadEncoding {
            hash: s.to_owned(),
            encoding,
        };
        let bytes = if s.len() == n * 2 {
            decode_hex(s).ok_or_else(|| bad("base16"))?
        } else if s.len() == nixbase32::encoded_len(n) {
            nixbase32::decode_exact(s.as_bytes(), n).map_err(|_| bad("nix-base32"))?
        } else if s.len() == ((4 * n / 3) + 3) & !3 {
            BASE64.decode(s).map_err(|_| bad("base64"))?
        } else {
            return Err(HashError::BadLength {
                hash: s.to_owned(),
                algo,
            });
        };
        Hash::from_bytes(algo, &bytes).ok_or(HashError::BadLength {
            hash: s.to_owned(),
            algo,
        })
    }

    /// Parses `algo:<any encoding>` or SRI `algo-<base64>`.
    pub fn parse_any_prefixed(s: &str) -> Result<Hash, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            return Hash::parse_bare(rest, algo.parse()?);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            let algo: HashAlgo = algo.parse()?;
            let bytes = BASE64.decode(rest).map_err(|_| HashError::BadEncoding {
                hash: s.to_owned(),
                encoding: "base64",
            })?;
            return Hash::from_bytes(algo, &bytes).ok_or(HashError::BadLength {
                hash: s.to_owned(),
                algo,
            });
        }
        Err(HashError::MissingAlgo(s.to_owned()))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_base16_prefixed())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// An incremental hasher for any [`HashAlgo`]; also an `io::Write` sink.
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        match algo {
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let (algo, digest): (HashAlgo, Vec<u8>) = match self {
            Hasher::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            Hasher::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            Hasher::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        Hash::from_bytes(algo, &digest).expect("digest size matches its algorithm")
    }
}

impl io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A sink that hashes and counts what passes through it (NAR hash and size).
pub struct HashSink {
    hasher: Hasher,
    len: u64,
}

impl HashSink {
    pub fn new(algo: HashAlgo) -> HashSink {
        HashSink {
            hasher: Hasher::new(algo),
            len: 0,
        }
    }
    /// The hash and the number of bytes written.
    pub fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.len)
    }
}

impl io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that hashes and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    sink: HashSink,
}

impl<R: io::Read> HashingReader<R> {
    pub fn new(inner: R, algo: HashAlgo) -> HashingReader<R> {
        HashingReader {
            inner,
            sink: HashSink::new(algo),
        }
    }
    /// The hash and count of what was read so far, and the inner reader.
    pub fn finish(self) -> (Hash, u64, R) {
        let (h, n) = self.sink.finish();
        (h, n, self.inner)
    }
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        io::Write::write_all(&mut self.sink, &buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sha256_of_hello() {
        let h = HashAlgo::Sha256.digest(b"hello\n");
        assert_eq!(
            h.to_base16(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        assert_eq!(
            h.to_nix32(),
            "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM="
        );
    }

    #[test]
    fn parses_every_encoding() {
        let h = HashAlgo::Sha256.digest(b"hello\n");
        for s in [
            h.to_base16_prefixed(),
            h.to_nix32_prefixed(),
            h.to_sri(),
            format!("sha256:{}", h.to_base64()),
        ] {
            assert_eq!(Hash::parse_any_prefixed(&s).unwrap(), h, "{s}");
        }
    }

    #[test]
    fn rejects_unknown_algo_and_length() {
        assert!(matches!(
            Hash::parse_any_prefixed("sha3:00"),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_any_prefixed("sha256:abc"),
            Err(HashError::BadLength { .. })
        ));
        assert!(matches!(
            Hash::parse_any_prefixed("abc"),
            Err(HashError::MissingAlgo(_))
        ));
    }
}
