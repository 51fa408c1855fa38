//! nix-base32 ("Nix32"), the encoding of hashes in store paths and narinfo files.
//!
//! It is not RFC 4648 base32: the alphabet omits `e o u t`, and the bytes are
//! taken from the end, so the *last* byte decides the *first* characters.

use thiserror::Error;

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Maps an ASCII byte to its digit value, or 0xff when it is not a digit.
const REVERSE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Why a nix-base32 string could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Nix32Error {
    #[error("invalid nix-base32 character {byte:?} at position {pos}")]
    InvalidChar { byte: char, pos: usize },
    #[error("nix-base32 string has length {len}, expected {expected}")]
    BadLength { len: usize, expected: usize },
    #[error("nix-base32 string encodes more bits than {bytes} bytes hold")]
    Overflow { bytes: usize },
}

/// Number of characters needed to encode `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Whether `c` is a nix-base32 digit.
#[inline]
pub fn is_digit(c: u8) -> bool {
    REVERSE[c as usize] != 0xff
}

/// Encodes `bytes` as nix-base32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            // The shift may drop bits beyond the byte: only the low 5 bits count.
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes a nix-base32 string into exactly `n` bytes.
pub fn decode_exact(s: &[u8], n: usize) -> Result<Vec<u8>, Nix32Error> {
    let expected = encoded_len(n);
    if s.len() != expected {
        return Err(Nix32Error::BadLength { len: s.len(), expected });
    }
    let mut out = vec![0u8; n];
    for (pos, &c) in s.iter().enumerate() {
        let digit = REVERSE[c as usize];
        if digit == 0xff {
            return Err(Nix32Error::InvalidChar { byte: c as char, pos });
        }
        let nth = s.len() - pos - 1;
        let b = nth * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = (digit as u16 >> (8 - j)) as u8;
        if i + 1 < n {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Nix32Error::Overflow { bytes: n });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        let sha1 = hex("8a12321522fd91efbd60ebb2481af88580f61600");
        assert_eq!(encode(&sha1), "00bgd045z0d4icpbc2yyz4gx48ak44la");
        let hello = hex("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        assert_eq!(encode(&hello), "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq");
        assert_eq!(decode_exact(b"00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", 32).unwrap(), hello);
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn rejects_overflowing_first_digit() {
        // Nix refuses `20xyy…` for sha256: the leading digit would set bit 256.
        let err = decode_exact(b"20xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", 32).unwrap_err();
        assert_eq!(err, Nix32Error::Overflow { bytes: 32 });
    }

    #[test]
    fn rejects_letters_outside_alphabet() {
        for bad in [b'e', b'o', b'u', b't', b'A', b'-'] {
            let mut s = b"00bgd045z0d4icpbc2yyz4gx48ak44la".to_vec();
            s[5] = bad;
            assert!(matches!(decode_exact(&s, 20), Err(Nix32Error::InvalidChar { pos: 5, .. })));
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert_eq!(decode_exact(s.as_bytes(), bytes.len()).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in proptest::collection::vec(any::<u8>(), 0..110), n in 0usize..70) {
            let _ = decode_exact(&s, n);
        }
    }
}
