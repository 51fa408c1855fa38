//! NAR (Nix ARchive): writer from a filesystem tree, strict reader.
//!
//! CONTRACT (stub): signatures fixed for other modules; filled in by the NAR change.
//!
//! TEMPORARY minimal implementation (writer + lax reader) so that the registry
//! branch can be tested; the NAR change replaces this file.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use thiserror::Error;

use super::hash::HashSink;
use super::{Hash, HashAlgo};

/// Why a NAR could not be written or read.
#[derive(Debug, Error)]
pub enum NarError {
    #[error("not implemented yet")]
    Unimplemented,
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unsupported file type")]
    FileType { path: String },
    #[error("invalid NAR: {0}")]
    Invalid(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
    move |source| NarError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn put(sink: &mut dyn Write, s: &[u8]) -> io::Result<()> {
    sink.write_all(&(s.len() as u64).to_le_bytes())?;
    sink.write_all(s)?;
    let pad = (8 - s.len() % 8) % 8;
    sink.write_all(&[0u8; 8][..pad])
}

/// Writes the NAR serialisation of the file, symlink or directory at `path`.
pub fn dump(path: &Path, sink: &mut dyn Write) -> Result<(), NarError> {
    put(sink, b"nix-archive-1").map_err(io_err(path))?;
    dump_node(path, sink)
}

fn dump_node(path: &Path, sink: &mut dyn Write) -> Result<(), NarError> {
    let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
    let ft = meta.file_type();
    let w = |sink: &mut dyn Write, toks: &[&[u8]]| -> Result<(), NarError> {
        for t in toks {
            put(sink, t).map_err(io_err(path))?;
        }
        Ok(())
    };
    w(sink, &[b"(", b"type"])?;
    if ft.is_file() {
        w(sink, &[b"regular"])?;
        if meta.permissions().mode() & 0o100 != 0 {
            w(sink, &[b"executable", b""])?;
        }
        w(sink, &[b"contents"])?;
        let mut f = fs::File::open(path).map_err(io_err(path))?;
        let len = meta.len();
        sink.write_all(&len.to_le_bytes()).map_err(io_err(path))?;
        let copied = io::copy(&mut (&mut f).take(len), sink).map_err(io_err(path))?;
        if copied != len {
            return Err(NarError::Invalid("file shrank while being written"));
        }
        let pad = ((8 - len % 8) % 8) as usize;
        sink.write_all(&[0u8; 8][..pad]).map_err(io_err(path))?;
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err(path))?;
        w(
            sink,
            &[b"symlink", b"target", target.as_os_str().as_bytes()],
        )?;
    } else if ft.is_dir() {
        w(sink, &[b"directory"])?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        for e in fs::read_dir(path).map_err(io_err(path))? {
            names.push(e.map_err(io_err(path))?.file_name().as_bytes().to_vec());
        }
        names.sort();
        for name in names {
            w(sink, &[b"entry", b"(", b"name", &name, b"node"])?;
            dump_node(&path.join(std::ffi::OsStr::from_bytes(&name)), sink)?;
            w(sink, &[b")"])?;
        }
    } else {
        return Err(NarError::FileType {
            path: path.display().to_string(),
        });
    }
    w(sink, &[b")"])
}

/// SHA-256 of the NAR of `path`, and the NAR's size.
pub fn hash_path(path: &Path) -> Result<(Hash, u64), NarError> {
    let mut sink = HashSink::new(HashAlgo::Sha256);
    dump(path, &mut sink)?;
    Ok(sink.finish())
}

struct Reader<'a> {
    src: &'a mut dyn Read,
}

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.src
            .read_exact(&mut b)
            .map_err(|_| NarError::Invalid("unexpected end of NAR"))?;
        Ok(u64::from_le_bytes(b))
    }
    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        self.src
            .read_exact(&mut b[..pad])
            .map_err(|_| NarError::Invalid("unexpected end of NAR"))?;
        if b.iter().any(|&x| x != 0) {
            return Err(NarError::Invalid("non-zero padding"));
        }
        Ok(())
    }
    fn bytes(&mut self, max: u64) -> Result<Vec<u8>, NarError> {
        let len = self.u64()?;
        if len > max {
            return Err(NarError::Invalid("string too long"));
        }
        let mut v = vec![0u8; len as usize];
        self.src
            .read_exact(&mut v)
            .map_err(|_| NarError::Invalid("unexpected end of NAR"))?;
        self.padding(len)?;
        Ok(v)
    }
    fn expect(&mut self, tok: &'static [u8]) -> Result<(), NarError> {
        if self.bytes(64)? != tok {
            return Err(NarError::Invalid("unexpected token"));
        }
        Ok(())
    }
}

/// Reads exactly one NAR from `source` (never a byte past its end) and
/// restores it at `dest`, which must not exist.
pub fn restore(source: &mut dyn Read, dest: &Path) -> Result<(), NarError> {
    let mut r = Reader { src: source };
    if r.bytes(64)? != b"nix-archive-1" {
        return Err(NarError::Invalid("input doesn't look like a Nix archive"));
    }
    restore_node(&mut r, dest, 0)
}

fn restore_node(r: &mut Reader<'_>, dest: &Path, depth: usize) -> Result<(), NarError> {
    if depth > 256 {
        return Err(NarError::Invalid("too deep"));
    }
    r.expect(b"(")?;
    r.expect(b"type")?;
    match r.bytes(64)?.as_slice() {
        b"regular" => {
            let mut tok = r.bytes(64)?;
            let mut exec = false;
            if tok == b"executable" {
                r.expect(b"")?;
                exec = true;
                tok = r.bytes(64)?;
            }
            if tok != b"contents" {
                return Err(NarError::Invalid("expected 'contents'"));
            }
            let mode = if exec { 0o777 } else { 0o666 };
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(dest)
                .map_err(io_err(dest))?;
            let len = r.u64()?;
            let copied = io::copy(&mut (&mut *r.src).take(len), &mut f).map_err(io_err(dest))?;
            if copied != len {
                return Err(NarError::Invalid("unexpected end of NAR"));
            }
            r.padding(len)?;
        }
        b"symlink" => {
            r.expect(b"target")?;
            let target = r.bytes(4096)?;
            symlink(std::ffi::OsStr::from_bytes(&target), dest).map_err(io_err(dest))?;
        }
        b"directory" => {
            fs::create_dir(dest).map_err(io_err(dest))?;
            loop {
                match r.bytes(64)?.as_slice() {
                    b")" => return Ok(()),
                    b"entry" => {}
                    _ => return Err(NarError::Invalid("expected 'entry' or ')'")),
                }
                r.expect(b"(")?;
                r.expect(b"name")?;
                let name = r.bytes(255)?;
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    return Err(NarError::Invalid("NAR contains invalid file name"));
                }
                r.expect(b"node")?;
                restore_node(r, &dest.join(std::ffi::OsStr::from_bytes(&name)), depth + 1)?;
                r.expect(b")")?;
            }
        }
        _ => return Err(NarError::Invalid("unknown file type")),
    }
    r.expect(b")")
}
