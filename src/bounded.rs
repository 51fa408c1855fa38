//! Reading input that someone else controls, with a limit.
//!
//! A machines file, a key file or a line from the daemon is small when it
//! is what it claims to be. Named wrongly or maliciously it may be
//! `/dev/zero` (endless), a FIFO (blocks forever on open or read) or a huge
//! file: read whole, any of these hangs or eats all memory. Every such read
//! goes through here: [`read_file`] takes regular files only and at most
//! `limit` bytes, [`read_line`] at most `limit` bytes before the newline.
//! The limits are far above what real files reach, so only bad input
//! meets them.
//!
//! A leaf module: it depends on nothing else in the crate.

use std::io::{self, BufRead, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use thiserror::Error;

/// Limit for machines files (Nix and Guix), all `@` includes together.
pub const MACHINES_FILE_LIMIT: u64 = 16 << 20;
/// Limit for key files: a signing key, a public key, an SSH key.
pub const KEY_FILE_LIMIT: u64 = 64 << 10;
/// Limit for a list of trusted public keys (about 60 bytes a key).
pub const TRUSTED_KEYS_LIMIT: u64 = 1 << 20;
/// Limit for `known_hosts` files (many hosts, hashed names, long keys).
pub const KNOWN_HOSTS_LIMIT: u64 = 16 << 20;

/// Why a bounded read failed. It does not name the file: the caller's
/// error does, with what the file was for.
#[derive(Debug, Error)]
pub enum BoundedError {
    /// Opening, inspecting or reading failed.
    #[error("{source}")]
    Io {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// It is a directory, FIFO, socket or device, not a regular file.
    #[error("not a regular file (it is {kind})")]
    NotRegular {
        /// What it is instead.
        kind: &'static str,
    },
    /// It holds more than the limit.
    #[error("larger than the limit of {}", size(*limit))]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Text was expected.
    #[error("not valid UTF-8 text")]
    NotUtf8,
}

impl BoundedError {
    /// Whether the file does not exist (some callers skip missing files).
    pub fn is_not_found(&self) -> bool {
        matches!(self, BoundedError::Io { source } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl From<io::Error> for BoundedError {
    fn from(source: io::Error) -> BoundedError {
        BoundedError::Io { source }
    }
}

/// `16 MiB`, `64 KiB` or `100 bytes`.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Reads the regular file at `path` whole, if it holds at most `limit`
/// bytes. The file is opened non-blocking, so that a FIFO is refused at
/// once instead of waiting for a writer, and checked to be a regular file
/// on the descriptor that is then read (no race with a rename).
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, BoundedError> {
    read_opened(path, limit, 0)
}

/// [`read_file`] that does not follow a symlink at `path` (it fails to
/// open, `ELOOP`): for files whose place is their identity, as store paths.
pub fn read_file_no_follow(path: &Path, limit: u64) -> Result<Vec<u8>, BoundedError> {
    read_opened(path, limit, libc::O_NOFOLLOW)
}

fn read_opened(path: &Path, limit: u64, flags: libc::c_int) -> Result<Vec<u8>, BoundedError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // std adds O_CLOEXEC itself.
        .custom_flags(libc::O_NONBLOCK | flags)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else {
            "not a file"
        };
        return Err(BoundedError::NotRegular { kind });
    }
    if meta.len() > limit {
        return Err(BoundedError::TooLarge { limit });
    }
    // Sized up front: no reallocation leaves copies of a secret key behind
    // (the file may still grow; the limit holds then too).
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(BoundedError::TooLarge { limit });
    }
    Ok(bytes)
}

/// [`read_file`] for text.
pub fn read_file_to_string(path: &Path, limit: u64) -> Result<String, BoundedError> {
    String::from_utf8(read_file(path, limit)?).map_err(|_| BoundedError::NotUtf8)
}

/// Reads `input` to its end, if that is at most `limit` bytes (for stdin,
/// which may be anything).
pub fn read_all(input: impl Read, limit: u64) -> Result<Vec<u8>, BoundedError> {
    let mut bytes = Vec::new();
    input
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(BoundedError::TooLarge { limit });
    }
    Ok(bytes)
}

/// Reads one line from `input`, without its newline; `None` at end of
/// input. A line longer than `limit` bytes is an error after reading at
/// most `limit + 1` bytes of it (the rest stays unread: the caller gives
/// up on the stream).
pub fn read_line(input: &mut dyn BufRead, limit: u64) -> Result<Option<Vec<u8>>, BoundedError> {
    let mut line = Vec::new();
    // `limit + 1` leaves room for the newline of a line of exactly `limit`.
    let n = input
        .take(limit.saturating_add(1))
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() as u64 > limit {
        return Err(BoundedError::TooLarge { limit });
    }
    Ok(Some(line))
}

/// A buffer that takes at most `limit` bytes: a write past the limit
/// fails (with [`BoundedError::TooLarge`] inside the `io::Error`) and
/// [`LimitedBuf::overflowed`] tells it apart from other write errors. For
/// output a peer sends through an API that writes into a `Write`.
#[derive(Debug)]
pub struct LimitedBuf {
    bytes: Vec<u8>,
    limit: u64,
    overflowed: bool,
}

impl LimitedBuf {
    /// An empty buffer for at most `limit` bytes.
    pub fn new(limit: u64) -> LimitedBuf {
        LimitedBuf {
            bytes: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    /// Whether a write went past the limit.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The bytes taken.
    pub fn into_inner(self) -> Vec<u8> {
        self.bytes
    }
}

impl io::Write for LimitedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if (self.bytes.len() + buf.len()) as u64 > self.limit {
            self.overflowed = true;
            return Err(io::Error::other(BoundedError::TooLarge {
                limit: self.limit,
            }));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn reads_a_small_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").expect("write");
        assert_eq!(read_file(&path, 3).expect("read"), b"abc");
        assert_eq!(read_file_to_string(&path, 10).expect("read"), "abc");
    }

    #[test]
    fn refuses_a_file_over_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"abcd").expect("write");
        let e = read_file(&path, 3).unwrap_err();
        assert!(matches!(e, BoundedError::TooLarge { limit: 3 }), "{e:?}");
        assert_eq!(
            BoundedError::TooLarge { limit: 16 << 20 }.to_string(),
            "larger than the limit of 16 MiB"
        );
    }

    #[test]
    fn refuses_a_fifo_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // Without O_NONBLOCK this open would block for ever: no writer.
        let e = read_file(&path, 1024).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file (it is a FIFO)");
    }

    #[test]
    fn refuses_dev_zero() {
        let e = read_file(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a regular file (it is a character device)"
        );
    }

    #[test]
    fn refuses_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_file(dir.path(), 1024).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file (it is a directory)");
    }

    #[test]
    fn missing_file_is_told_apart() {
        let e = read_file(Path::new("/nonexistent/sandoff"), 1).unwrap_err();
        assert!(e.is_not_found());
    }

    #[test]
    fn read_all_stops_after_the_limit() {
        // `/dev/zero` never ends: only the limit ends the read.
        let zero = File::open("/dev/zero").expect("open /dev/zero");
        let e = read_all(zero, 1 << 20).unwrap_err();
        assert!(matches!(e, BoundedError::TooLarge { .. }), "{e:?}");
        assert_eq!(read_all(&b"12"[..], 2).expect("read"), b"12");
    }

    #[test]
    fn limited_buf_refuses_writes_past_the_limit() {
        use std::io::Write as _;
        let mut b = LimitedBuf::new(4);
        b.write_all(b"abcd").expect("fits");
        assert!(!b.overflowed());
        let e = b.write_all(b"e").unwrap_err();
        assert_eq!(e.to_string(), "larger than the limit of 4 bytes");
        assert!(b.overflowed());
        assert_eq!(b.into_inner(), b"abcd");
    }

    #[test]
    fn read_line_takes_lines_up_to_the_limit() {
        let mut input = &b"abc\nabcd\nab"[..];
        assert_eq!(read_line(&mut input, 4).expect("1"), Some(b"abc".to_vec()));
        assert_eq!(read_line(&mut input, 4).expect("2"), Some(b"abcd".to_vec()));
        assert_eq!(read_line(&mut input, 4).expect("3"), Some(b"ab".to_vec()));
        assert_eq!(read_line(&mut input, 4).expect("4"), None);
    }

    #[test]
    fn read_line_refuses_a_long_line_reading_only_past_the_limit() {
        let mut input = io::BufReader::new(File::open("/dev/zero").expect("open"));
        let e = read_line(&mut input, 1 << 20).unwrap_err();
        assert!(matches!(e, BoundedError::TooLarge { limit } if limit == 1 << 20));
    }
}
