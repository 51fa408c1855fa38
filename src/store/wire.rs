//! Nix's wire primitives, shared by NAR, export and the serve protocol:
//! `u64` little-endian, and strings as `u64 len ‖ bytes ‖ zero padding to 8`.
//!
//! Readers take a hard maximum length and check it before allocating, so a
//! hostile peer cannot make us reserve gigabytes with eight bytes.
//! (`nar.rs` and `export.rs` have their own copies and could use this.)

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

/// Failure to read or write a wire value.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended in the middle of a value.
    #[error("unexpected end of stream")]
    Truncated,
    /// A string or list length above the reader's limit.
    #[error("length {len} exceeds the limit of {max}")]
    TooLong { len: u64, max: u64 },
    /// Padding after a string was not all zero bytes.
    #[error("non-zero padding")]
    BadPadding,
    /// A string that must be text was not UTF-8.
    #[error("string is not valid UTF-8")]
    NotUtf8,
    /// The underlying reader or writer failed.
    #[error("I/O error")]
    Io(#[source] io::Error),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> WireError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated
        } else {
            WireError::Io(e)
        }
    }
}

/// Bytes of zero padding after a string of `len` bytes.
pub fn padding(len: u64) -> usize {
    // `len % 8` is below 8, so the cast is lossless.
    ((8 - len % 8) % 8) as usize
}

/// Reads one little-endian `u64`.
pub fn read_u64(r: &mut dyn Read) -> Result<u64, WireError> {
    let mut buf = [0u8; 8];
    r.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// Reads a `u64` used as a boolean (any non-zero value is true, as in Nix).
pub fn read_bool(r: &mut dyn Read) -> Result<bool, WireError> {
    Ok(read_u64(r)? != 0)
}

/// Reads a string of at most `max` bytes.
pub fn read_bytes(r: &mut dyn Read, max: u64) -> Result<Vec<u8>, WireError> {
    let len = read_u64(r)?;
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    let n = usize::try_from(len).map_err(|_| WireError::TooLong { len, max })?;
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)?;
    let mut pad = [0u8; 8];
    let p = padding(len);
    r.read_exact(&mut pad[..p])?;
    if pad[..p].iter().any(|&b| b != 0) {
        return Err(WireError::BadPadding);
    }
    Ok(buf)
}

/// Reads a UTF-8 string of at most `max` bytes.
pub fn read_string(r: &mut dyn Read, max: u64) -> Result<String, WireError> {
    String::from_utf8(read_bytes(r, max)?).map_err(|_| WireError::NotUtf8)
}

/// Reads the length of a list or set, refusing more than `max` items before
/// any is read.
pub fn read_count(r: &mut dyn Read, max: u64) -> Result<u64, WireError> {
    let n = read_u64(r)?;
    if n > max {
        return Err(WireError::TooLong { len: n, max });
    }
    Ok(n)
}

/// Reads a list of at most `max_items` strings of at most `max_len` bytes each.
pub fn read_strings(
    r: &mut dyn Read,
    max_items: u64,
    max_len: u64,
) -> Result<Vec<String>, WireError> {
    let n = read_count(r, max_items)?;
    (0..n).map(|_| read_string(r, max_len)).collect()
}

/// Reads a set of strings (duplicates collapse, as in Nix's `StringSet`).
pub fn read_string_set(
    r: &mut dyn Read,
    max_items: u64,
    max_len: u64,
) -> Result<BTreeSet<String>, WireError> {
    Ok(read_strings(r, max_items, max_len)?.into_iter().collect())
}

/// Writes one little-endian `u64`.
pub fn write_u64(w: &mut dyn Write, n: u64) -> Result<(), WireError> {
    w.write_all(&n.to_le_bytes())?;
    Ok(())
}

/// Writes a boolean as `u64` 0 or 1.
pub fn write_bool(w: &mut dyn Write, b: bool) -> Result<(), WireError> {
    write_u64(w, u64::from(b))
}

/// Writes a string: length, bytes, zero padding.
pub fn write_bytes(w: &mut dyn Write, s: &[u8]) -> Result<(), WireError> {
    let len = s.len() as u64;
    write_u64(w, len)?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..padding(len)])?;
    Ok(())
}

/// Writes a list of strings: count, then each string.
pub fn write_strings<I, S>(w: &mut dyn Write, items: I) -> Result<(), WireError>
where
    I: IntoIterator<Item = S>,
    I::IntoIter: ExactSizeIterator,
    S: AsRef<[u8]>,
{
    let items = items.into_iter();
    write_u64(w, items.len() as u64)?;
    for s in items {
        write_bytes(w, s.as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn string_layout() {
        let mut out = Vec::new();
        write_bytes(&mut out, b"abc").expect("vec");
        assert_eq!(out, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0");
        let mut out = Vec::new();
        write_bytes(&mut out, b"").expect("vec");
        assert_eq!(out, [0u8; 8]);
        let mut out = Vec::new();
        write_bytes(&mut out, b"12345678").expect("vec");
        assert_eq!(out.len(), 16);
    }

    #[test]
    fn too_long_is_refused_before_allocating() {
        let bytes = u64::MAX.to_le_bytes();
        let err = read_bytes(&mut &bytes[..], 1024).unwrap_err();
        assert!(matches!(
            err,
            WireError::TooLong {
                len: u64::MAX,
                max: 1024
            }
        ));
        let err = read_strings(&mut &bytes[..], 10, 10).unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }));
    }

    /// What reading `bytes` as a byte string fails with.
    fn bytes_error(bytes: &[u8]) -> WireError {
        read_bytes(&mut &bytes[..], 64).expect_err("refused")
    }

    #[test]
    fn nonzero_padding_is_refused() {
        let err = bytes_error(b"\x01\0\0\0\0\0\0\0a\0\0\0\0\0\0\x01");
        assert!(matches!(err, WireError::BadPadding), "{err}");
    }

    #[test]
    fn truncation_is_reported() {
        assert!(matches!(
            read_u64(&mut &[1u8, 2][..]),
            Err(WireError::Truncated)
        ));
        // Short contents, and missing padding, are truncations.
        for bytes in [&b"\x05\0\0\0\0\0\0\0ab"[..], b"\x01\0\0\0\0\0\0\0a"] {
            let err = bytes_error(bytes);
            assert!(matches!(err, WireError::Truncated), "{err}");
        }
    }

    #[test]
    fn not_utf8() {
        let mut out = Vec::new();
        write_bytes(&mut out, b"\xff").expect("vec");
        assert!(matches!(
            read_string(&mut &out[..], 64),
            Err(WireError::NotUtf8)
        ));
    }

    proptest! {
        #[test]
        fn round_trip(items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8), n in any::<u64>()) {
            let mut out = Vec::new();
            write_u64(&mut out, n).expect("vec");
            write_strings(&mut out, &items).expect("vec");
            prop_assert_eq!(out.len() % 8, 0);
            let mut r = &out[..];
            prop_assert_eq!(read_u64(&mut r).expect("u64"), n);
            let count = read_u64(&mut r).expect("count");
            prop_assert_eq!(count, items.len() as u64);
            for item in &items {
                prop_assert_eq!(&read_bytes(&mut r, 64).expect("string"), item);
            }
            prop_assert!(r.is_empty());
        }
    }
}
