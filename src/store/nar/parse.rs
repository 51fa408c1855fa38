//! The strict NAR reader: [`parse`] and [`NarVisitor`].

use std::fmt::Write as _;
use std::io::{self, Read};

use super::*;

/// Receives what [`parse`] finds, in order. A node's `name` is `None` for
/// the root and the entry name otherwise. Every method may stop the parse by
/// returning an error. The defaults do nothing, so parsing with a visitor
/// that overrides nothing only validates.
pub trait NarVisitor {
    /// A directory starts; its entries follow, then [`NarVisitor::directory_end`].
    fn directory(&mut self, _name: Option<&[u8]>) -> Result<(), NarError> {
        Ok(())
    }
    /// The innermost open directory is complete.
    fn directory_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    /// A regular file of `size` bytes starts; its contents follow in chunks,
    /// then [`NarVisitor::regular_end`].
    fn regular(
        &mut self,
        _name: Option<&[u8]>,
        _executable: bool,
        _size: u64,
    ) -> Result<(), NarError> {
        Ok(())
    }
    /// The next chunk of the current file's contents.
    fn contents(&mut self, _chunk: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    /// The current file is complete.
    fn regular_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    /// A symlink (target checked: 1 to 4095 bytes, no NUL).
    fn symlink(&mut self, _name: Option<&[u8]>, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
}

/// A visitor that ignores everything: `parse(src, &mut NullVisitor)` checks
/// a NAR and skips over it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullVisitor;

impl NarVisitor for NullVisitor {}

/// Reads exactly one NAR from `source`, never a byte past its end, checking
/// it strictly and reporting its contents to `visitor`. Returns the NAR's size.
///
/// Tokens are read with small exact reads, so `source` should be buffered
/// (a `BufReader` the caller owns, or `StdinLock`); wrapping a shared stream
/// in a new `BufReader` here would swallow the bytes after the NAR.
pub fn parse(source: &mut dyn Read, visitor: &mut dyn NarVisitor) -> Result<u64, NarError> {
    let mut p = Parser {
        src: source,
        pos: 0,
        tok: Vec::with_capacity(64),
        chunk: Vec::new(),
        prev: Vec::new(),
    };
    p.magic()?;
    p.node(0, None, visitor)?;
    Ok(p.pos)
}

struct Parser<'r> {
    src: &'r mut dyn Read,
    pos: u64,
    /// The last string read (keyword, name or target), without padding.
    tok: Vec<u8>,
    chunk: Vec<u8>,
    /// Per depth, a buffer for the previous entry name (for the order check).
    prev: Vec<Vec<u8>>,
}

/// `read_exact` that counts bytes and turns a short input into a NAR error
/// carrying the exact offset.
fn fill(src: &mut dyn Read, pos: &mut u64, mut buf: &mut [u8]) -> Result<(), NarError> {
    while !buf.is_empty() {
        match src.read(buf) {
            Ok(0) => return Err(NarError::UnexpectedEof { pos: *pos }),
            Ok(n) => {
                *pos += n as u64;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(NarError::Read {
                    pos: *pos,
                    source: e,
                })
            }
        }
    }
    Ok(())
}

impl Parser<'_> {
    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        fill(self.src, &mut self.pos, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads the rest of a string whose length `len` (≤ a small bound) was
    /// read already, into `self.tok`, checking its padding.
    fn read_body(&mut self, len: usize) -> Result<(), NarError> {
        let total = padded(len);
        self.tok.clear();
        self.tok.resize(total, 0);
        fill(self.src, &mut self.pos, &mut self.tok)?;
        if let Some(i) = self.tok[len..].iter().position(|&b| b != 0) {
            return Err(NarError::NonZeroPadding {
                pos: self.pos - (total - len - i) as u64,
            });
        }
        self.tok.truncate(len);
        Ok(())
    }

    /// Reads a keyword into `self.tok`; returns its offset. Longer strings
    /// are refused unread.
    fn tag(&mut self, expected: &'static str) -> Result<u64, NarError> {
        let start = self.pos;
        let len = self.read_u64()?;
        if len > MAX_TAG_LEN as u64 {
            return Err(NarError::UnexpectedToken {
                pos: start,
                expected,
                found: format!("<{len}-byte string>"),
            });
        }
        self.read_body(len as usize)?;
        Ok(start)
    }

    fn expect(&mut self, want: &'static [u8], expected: &'static str) -> Result<(), NarError> {
        let start = self.tag(expected)?;
        if self.tok != want {
            return Err(self.unexpected(start, expected));
        }
        Ok(())
    }

    fn unexpected(&self, pos: u64, expected: &'static str) -> NarError {
        NarError::UnexpectedToken {
            pos,
            expected,
            found: show(&self.tok),
        }
    }

    fn magic(&mut self) -> Result<(), NarError> {
        let mut b = [0u8; 24];
        fill(self.src, &mut self.pos, &mut b)?;
        if b != TOK_NAR[..24] {
            return Err(NarError::BadMagic);
        }
        Ok(())
    }

    fn node(
        &mut self,
        depth: usize,
        name: Option<&[u8]>,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        let start = self.pos;
        if depth >= MAX_DEPTH {
            return Err(NarError::TooDeep { pos: start });
        }
        self.expect(b"(", "'('")?;
        self.expect(b"type", "'type'")?;
        const TYPES: &str = "'regular', 'symlink' or 'directory'";
        let at = self.tag(TYPES)?;
        match self.tok.as_slice() {
            b"regular" => self.regular(name, v),
            b"symlink" => self.symlink(name, v),
            b"directory" => self.directory(depth, name, v),
            _ => Err(self.unexpected(at, TYPES)),
        }
    }

    fn regular(&mut self, name: Option<&[u8]>, v: &mut dyn NarVisitor) -> Result<(), NarError> {
        let mut at = self.tag("'executable' or 'contents'")?;
        let mut executable = false;
        if self.tok == b"executable" {
            let marker = self.pos;
            let len = self.read_u64()?;
            if len != 0 {
                return Err(NarError::NonEmptyExecutable { pos: marker });
            }
            executable = true;
            at = self.tag("'contents'")?;
        }
        if self.tok != b"contents" {
            return Err(self.unexpected(
                at,
                if executable {
                    "'contents'"
                } else {
                    "'executable' or 'contents'"
                },
            ));
        }
        let size = self.read_u64()?;
        v.regular(name, executable, size)?;
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(READ_CHUNK_SIZE);
            if self.chunk.len() < n {
                self.chunk.resize(n, 0);
            }
            fill(self.src, &mut self.pos, &mut self.chunk[..n])?;
            v.contents(&self.chunk[..n])?;
            left -= n as u64;
        }
        let pad = (8 - (size % 8) as usize) % 8;
        let mut b = [0u8; 8];
        fill(self.src, &mut self.pos, &mut b[..pad])?;
        if let Some(i) = b[..pad].iter().position(|&x| x != 0) {
            return Err(NarError::NonZeroPadding {
                pos: self.pos - (pad - i) as u64,
            });
        }
        v.regular_end()?;
        self.expect(b")", "')'")
    }

    fn symlink(&mut self, name: Option<&[u8]>, v: &mut dyn NarVisitor) -> Result<(), NarError> {
        self.expect(b"target", "'target'")?;
        let at = self.pos;
        let len = self.read_u64()?;
        if len > MAX_TARGET_LEN as u64 {
            return Err(NarError::InvalidSymlinkTarget {
                pos: at,
                reason: "longer than 4095 bytes",
            });
        }
        self.read_body(len as usize)?;
        if self.tok.is_empty() {
            return Err(NarError::InvalidSymlinkTarget {
                pos: at,
                reason: "empty",
            });
        }
        if self.tok.contains(&0) {
            return Err(NarError::InvalidSymlinkTarget {
                pos: at,
                reason: "contains a NUL byte",
            });
        }
        v.symlink(name, &self.tok)?;
        self.expect(b")", "')'")
    }

    fn directory(
        &mut self,
        depth: usize,
        name: Option<&[u8]>,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        v.directory(name)?;
        if self.prev.len() <= depth {
            self.prev.resize_with(depth + 1, Vec::new);
        }
        // Taken out while the children (one level deeper) use `self`.
        let mut prev = std::mem::take(&mut self.prev[depth]);
        prev.clear();
        let res = self.entries(depth, &mut prev, v);
        self.prev[depth] = prev;
        res?;
        v.directory_end()
    }

    fn entries(
        &mut self,
        depth: usize,
        prev: &mut Vec<u8>,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        loop {
            let at = self.tag("'entry' or ')'")?;
            match self.tok.as_slice() {
                b")" => return Ok(()),
                b"entry" => {}
                _ => return Err(self.unexpected(at, "'entry' or ')'")),
            }
            self.expect(b"(", "'('")?;
            self.expect(b"name", "'name'")?;
            let at = self.pos;
            let len = self.read_u64()?;
            if len > MAX_NAME_LEN as u64 {
                return Err(NarError::InvalidName {
                    pos: at,
                    name: format!("<{len}-byte name>"),
                    reason: "longer than 255 bytes",
                });
            }
            self.read_body(len as usize)?;
            let name = self.tok.as_slice();
            let bad = |reason| NarError::InvalidName {
                pos: at,
                name: show(name),
                reason,
            };
            if name.is_empty() {
                return Err(bad("empty"));
            }
            if name == b"." || name == b".." {
                return Err(bad("'.' and '..' are not entry names"));
            }
            if name.contains(&b'/') {
                return Err(bad("contains '/'"));
            }
            if name.contains(&0) {
                return Err(bad("contains a NUL byte"));
            }
            // Names are never empty, so an empty `prev` means "first entry".
            if !prev.is_empty() {
                match name.cmp(prev.as_slice()) {
                    std::cmp::Ordering::Greater => {}
                    std::cmp::Ordering::Equal => {
                        return Err(NarError::DuplicateName {
                            pos: at,
                            name: show(name),
                        })
                    }
                    std::cmp::Ordering::Less => {
                        return Err(NarError::NotSorted {
                            pos: at,
                            prev: show(prev),
                            name: show(name),
                        })
                    }
                }
            }
            prev.clear();
            prev.extend_from_slice(name);
            self.expect(b"node", "'node'")?;
            self.node(depth + 1, Some(prev), v)?;
            self.expect(b")", "')'")?;
        }
    }
}

/// Renders raw bytes for a one-line message: UTF-8 as is, control
/// characters and invalid bytes escaped, long strings cut.
pub(super) fn show(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let mut out = String::new();
    for chunk in bytes[..bytes.len().min(MAX)].utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if bytes.len() > MAX {
        out.push_str("...");
    }
    out
}
