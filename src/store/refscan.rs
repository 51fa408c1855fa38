//! Reference scanning: which candidate store paths a path's files mention.
//!
//! A store path refers to another when the other's 32-character hash part
//! occurs anywhere in its NAR serialisation: file contents, file names and
//! symlink targets all count (Nix's `references.cc`). Only candidates are
//! reported (the build's input closure and its own outputs); other hashes that
//! happen to occur are ignored.
//!
//! The search is Nix's: a 32-byte window is checked right to left against the
//! nix-base32 alphabet, and a byte outside it at offset `j` moves the window
//! `j + 1` bytes on, since no window containing that byte can match. Typical
//! binary data is therefore skipped in strides close to 32 bytes, and the hash
//! set is consulted only for windows made entirely of nix-base32 characters.
//!
//! [`RefScanner`] is an [`io::Write`] sink, so [`nar::dump`] feeds it directly;
//! data may arrive in chunks of any size, and a hash part split across chunks
//! is found through a 31-byte tail kept from the previous chunk.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::Path;

use super::hash::{Hash, HashAlgo, HashSink};
use super::nar::{self, NarError};
use super::nixbase32;
use super::path::HASH_PART_LEN;
use super::StorePath;

/// A hash part as raw ASCII bytes.
pub type HashPart = [u8; HASH_PART_LEN];

/// `IS_NIX32[b]`: whether byte `b` is in the nix-base32 alphabet.
static IS_NIX32: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < nixbase32::ALPHABET.len() {
        table[nixbase32::ALPHABET[i] as usize] = true;
        i += 1;
    }
    table
};

/// Bits in the prefilter: at a thousand candidates, about 1.5% of the
/// windows that pass it are false positives.
const FILTER_BITS: usize = 1 << 16;

/// A streaming scanner for hash parts; write the bytes to scan into it.
#[derive(Clone)]
pub struct RefScanner {
    /// Candidates not seen yet; found ones move to `found`, so each is
    /// reported once and later windows cost less.
    pending: HashSet<HashPart>,
    found: HashSet<HashPart>,
    /// A one-hash Bloom filter over all candidates: in long runs of
    /// nix-base32 text every position is a window, and this bit test is far
    /// cheaper than hashing 32 bytes for the set.
    filter: Vec<u64>,
    /// The last (up to) 31 bytes written: a match spanning two writes has at
    /// most 31 bytes in the earlier one.
    tail: Vec<u8>,
}

impl RefScanner {
    /// A scanner for the given hash parts.
    pub fn new(hash_parts: impl IntoIterator<Item = HashPart>) -> RefScanner {
        let pending: HashSet<HashPart> = hash_parts.into_iter().collect();
        let mut filter = vec![0u64; FILTER_BITS / 64];
        for h in &pending {
            let bit = filter_bit(h);
            filter[bit / 64] |= 1 << (bit % 64);
        }
        RefScanner {
            pending,
            found: HashSet::new(),
            filter,
            tail: Vec::new(),
        }
    }

    /// A scanner for the hash parts of `paths`.
    pub fn for_paths<'a>(paths: impl IntoIterator<Item = &'a StorePath>) -> RefScanner {
        RefScanner::new(paths.into_iter().map(|p| {
            // StorePath guarantees a hash part of exactly 32 ASCII characters.
            p.hash_part()
                .as_bytes()
                .try_into()
                .expect("a store path's hash part has 32 bytes")
        }))
    }

    /// Scans the next chunk of the stream.
    pub fn scan(&mut self, data: &[u8]) {
        if self.pending.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            // Only windows that start in the tail and end in `data` are new here.
            let head = &data[..data.len().min(HASH_PART_LEN - 1)];
            let mut joined = [0u8; 2 * (HASH_PART_LEN - 1)];
            let len = self.tail.len() + head.len();
            joined[..self.tail.len()].copy_from_slice(&self.tail);
            joined[self.tail.len()..len].copy_from_slice(head);
            self.search(&joined[..len]);
        }
        self.search(data);
        self.keep_tail(data);
    }

    fn keep_tail(&mut self, data: &[u8]) {
        let keep = HASH_PART_LEN - 1;
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
    }

    /// The hash parts seen so far.
    pub fn found(&self) -> &HashSet<HashPart> {
        &self.found
    }

    /// The paths among `candidates` whose hash part was seen.
    pub fn found_paths<'a>(
        &self,
        candidates: impl IntoIterator<Item = &'a StorePath>,
    ) -> BTreeSet<StorePath> {
        candidates
            .into_iter()
            .filter(|p| self.found.contains(p.hash_part().as_bytes()))
            .cloned()
            .collect()
    }
}

impl io::Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Which filter bit a window maps to: a multiplicative hash of its first
/// 8 bytes (40 bits of entropy in nix-base32).
fn filter_bit(window: &HashPart) -> usize {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&window[..8]);
    (u64::from_le_bytes(prefix).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as usize
}

impl RefScanner {
    /// Nix's window search over one contiguous buffer. Nix re-checks all 32
    /// bytes of each window; here bytes already known to be nix-base32 are
    /// not checked again, which finds the same rightmost bad byte (so the
    /// same skips and matches) in one look per byte.
    fn search(&mut self, s: &[u8]) {
        let mut i = 0;
        // Every byte in s[i..known] is in the alphabet.
        let mut known = 0;
        'windows: while i + HASH_PART_LEN <= s.len() {
            let end = i + HASH_PART_LEN;
            for j in (known.max(i)..end).rev() {
                if !IS_NIX32[usize::from(s[j])] {
                    i = j + 1;
                    continue 'windows;
                }
            }
            known = end;
            let window: &HashPart = s[i..end].try_into().expect("the window is 32 bytes long");
            let bit = filter_bit(window);
            if self.filter[bit / 64] & (1 << (bit % 64)) != 0 && self.pending.remove(window) {
                tracing::debug!(hash = %String::from_utf8_lossy(window), offset = i, "found reference");
                self.found.insert(*window);
                if self.pending.is_empty() {
                    return;
                }
            }
            i += 1;
        }
    }
}

impl std::fmt::Debug for RefScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefScanner")
            .field("pending", &self.pending.len())
            .field("found", &self.found.len())
            .finish_non_exhaustive()
    }
}

/// The paths among `candidates` that the file, symlink or tree at `path`
/// (a physical path) refers to.
pub fn scan_path(
    path: &Path,
    candidates: &BTreeSet<StorePath>,
) -> Result<BTreeSet<StorePath>, NarError> {
    let mut scanner = RefScanner::for_paths(candidates);
    nar::dump(path, &mut scanner)?;
    Ok(scanner.found_paths(candidates))
}

/// [`scan_path`] and the NAR's SHA-256 and size, from a single serialisation
/// (what registering a build output needs).
pub fn scan_and_hash_path(
    path: &Path,
    candidates: &BTreeSet<StorePath>,
) -> Result<(BTreeSet<StorePath>, Hash, u64), NarError> {
    let mut tee = Tee {
        scanner: RefScanner::for_paths(candidates),
        hash: HashSink::new(HashAlgo::Sha256),
    };
    nar::dump(path, &mut tee)?;
    let (hash, size) = tee.hash.finish();
    Ok((tee.scanner.found_paths(candidates), hash, size))
}

struct Tee {
    scanner: RefScanner,
    hash: HashSink,
}

impl io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scanner.scan(buf);
        io::Write::write_all(&mut self.hash, buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const A: &[u8; 32] = b"2qgfy89v28340cr9d9z471zfi5iczv5l";
    const B: &[u8; 32] = b"d0x4sjwksanirbaxlb05009gy5lvia3q";
    const C: &[u8; 32] = b"vxjiwkjkn7x4079qvh1jkl5pn05j2aw0";

    fn scan_chunks(candidates: &[HashPart], chunks: &[&[u8]]) -> BTreeSet<HashPart> {
        let mut s = RefScanner::new(candidates.iter().copied());
        for c in chunks {
            s.scan(c);
        }
        s.found().iter().copied().collect()
    }

    /// The obvious definition: every candidate that occurs as a substring.
    fn naive(candidates: &[HashPart], data: &[u8]) -> BTreeSet<HashPart> {
        candidates
            .iter()
            .filter(|c| data.windows(HASH_PART_LEN).any(|w| w == &c[..]))
            .copied()
            .collect()
    }

    #[test]
    fn finds_hash_in_contents_and_ignores_others() {
        let data = [
            b"#!/bin/sh\nexec /nix/store/".as_slice(),
            A,
            b"-hello/bin/hello\n",
        ]
        .concat();
        assert_eq!(scan_chunks(&[*A, *B], &[&data]), BTreeSet::from([*A]));
    }

    #[test]
    fn finds_hash_split_across_every_boundary() {
        let data = [b"xx/".as_slice(), A, b"/yy"].concat();
        for cut in 0..=data.len() {
            let (l, r) = data.split_at(cut);
            assert_eq!(
                scan_chunks(&[*A], &[l, r]),
                BTreeSet::from([*A]),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn finds_hash_fed_one_byte_at_a_time() {
        let data = [b"e".as_slice(), B, b"e", A].concat();
        let chunks: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(
            scan_chunks(&[*A, *B, *C], &chunks),
            BTreeSet::from([*A, *B])
        );
    }

    #[test]
    fn finds_hash_inside_longer_nix32_run() {
        // Windows slide one byte at a time through valid characters.
        let data = [b"0000000".as_slice(), C, b"1111"].concat();
        assert_eq!(scan_chunks(&[*C], &[&data]), BTreeSet::from([*C]));
    }

    #[test]
    fn nothing_to_find_without_candidates() {
        assert!(scan_chunks(&[], &[A]).is_empty());
        assert!(scan_chunks(&[*A], &[&A[..31]]).is_empty());
    }

    #[test]
    fn maps_hashes_back_to_paths() {
        let pa = StorePath::from_base_name(&format!("{}-hello", std::str::from_utf8(A).unwrap()))
            .unwrap();
        let pb =
            StorePath::from_base_name(&format!("{}-bb", std::str::from_utf8(B).unwrap())).unwrap();
        let candidates = BTreeSet::from([pa.clone(), pb]);
        let mut s = RefScanner::for_paths(&candidates);
        io::Write::write_all(&mut s, &[b"..".as_slice(), A].concat()).unwrap();
        assert_eq!(s.found_paths(&candidates), BTreeSet::from([pa]));
    }

    #[test]
    fn scan_path_finds_references_in_names_targets_and_contents() {
        let path = |h: &[u8; 32], name: &str| {
            StorePath::from_base_name(&format!("{}-{name}", std::str::from_utf8(h).unwrap()))
                .unwrap()
        };
        let (pa, pb, pc) = (path(A, "a"), path(B, "b"), path(C, "c"));
        let unused = StorePath::from_base_name("00bgd045z0d4icpbc2yyz4gx48ak44la-unused").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(out.join(format!("share/{}", pa.base_name()))).unwrap();
        std::os::unix::fs::symlink(
            format!("/nix/store/{}/bin/x", pb.base_name()),
            out.join("link"),
        )
        .unwrap();
        std::fs::write(
            out.join("file"),
            format!("prefix /nix/store/{}/lib suffix", pc.base_name()),
        )
        .unwrap();
        let candidates = BTreeSet::from([pa.clone(), pb.clone(), pc.clone(), unused]);
        assert_eq!(
            scan_path(&out, &candidates).unwrap(),
            BTreeSet::from([pa.clone(), pb.clone(), pc.clone()])
        );
        let (refs, hash, size) = scan_and_hash_path(&out, &candidates).unwrap();
        assert_eq!(refs, BTreeSet::from([pa, pb, pc]));
        assert_eq!((hash, size), nar::hash_path(&out).unwrap());
    }

    /// Bytes biased towards the nix32 alphabet, so that both skips and long
    /// runs of valid windows (where hash parts overlap) happen.
    fn byte(valid_weight: u32) -> impl Strategy<Value = u8> {
        prop_oneof![
            valid_weight => (0..32usize).prop_map(|i| nixbase32::ALPHABET[i]),
            1 => any::<u8>(),
        ]
    }

    fn data() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(byte(4), 0..300),
            proptest::collection::vec(byte(100), 0..300),
        ]
    }

    proptest! {
        #[test]
        fn planted_hashes_are_found_at_any_offset_and_chunking(
            mut data in data(),
            plants in proptest::collection::vec((0usize..300, 0usize..3), 1..4),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let hashes = [*A, *B, *C];
            for &(offset, which) in &plants {
                let offset = offset.min(data.len());
                data.splice(offset..offset, hashes[which]);
            }
            let mut cuts = cuts;
            cuts.push(0);
            cuts.push(data.len());
            cuts.iter_mut().for_each(|c| *c = (*c).min(data.len()));
            cuts.sort_unstable();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
            let got = scan_chunks(&hashes, &chunks);
            // A later plant may split an earlier one, so compare with the
            // obvious definition: exactly the candidates that occur.
            prop_assert!(got.contains(&hashes[plants[plants.len() - 1].1]));
            prop_assert_eq!(got, naive(&hashes, &data));
        }
    }
}
