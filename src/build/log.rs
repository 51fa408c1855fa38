//! Build logs: where each is kept, in which layout, and the sink a build
//! writes it through (with `--max-log-size`).
//!
//! # Layout, per kind of store
//!
//! - sandoff's own store: `<state>/log/<drv base name>`, plain text,
//!   written unbuffered as the build streams, so `sandoff log DRV` during a
//!   build shows everything so far.
//! - a daemon's store (`--daemon-store nix|guix`, where
//!   [`StoreLocation::daemon_log_dir`] is set): the daemons' layout,
//!   `<log dir>/drvs/<first 2 chars of the base name>/<rest>.bz2`,
//!   bzip2-compressed (Nix 2.8 `DerivationGoal::openLogFile` with the
//!   default `compress-build-log = true`; guix-daemon the same), so that
//!   `nix-store -l`, `nix log` and `guix build --log-file` read what
//!   sandoff built on their store. The compressed stream is complete only
//!   once the build ends ([`LogSink::finish`]); `sandoff log` reads both.
//!
//! Builds the hook offloads for a daemon are not logged here: the daemon
//! writes their log from the hook's stderr, as it does for Nix's own hook.
//!
//! # Size limit
//!
//! With a limit (`--max-log-size`, Nix's `max-build-log-size`), the sink
//! accepts at most that many bytes of the builder's output; the write that
//! would pass it fails, which makes the sandbox kill the whole build, and
//! [`LogSink::exceeded`] tells the caller why, for Nix's message "killed
//! after writing more than N bytes of log output".

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use bzip2::write::BzEncoder;

use super::{BuildErrorKind, Event};
use crate::store::{StoreLocation, StorePath};

/// How many log lines a failure message quotes.
pub const TAIL_LINES: usize = 10;

/// Where the log of `drv` is kept (see the module docs).
pub fn log_path(loc: &StoreLocation, drv: &StorePath) -> PathBuf {
    let base = drv.base_name();
    match &loc.daemon_log_dir {
        None => loc.state.join("log").join(base),
        Some(dir) => {
            // Base names are nixbase32 digests followed by a name: ASCII,
            // longer than two bytes.
            let (head, rest) = base.split_at(2);
            dir.join("drvs").join(head).join(format!("{rest}.bz2"))
        }
    }
}

/// Whether a log file at `path` is bzip2-compressed (by its name, as Nix).
fn is_compressed(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bz2")
}

/// Opens the log at `path` for reading, decompressing a `.bz2` one as it
/// is read (a build decides how long its log is: never read whole).
pub fn open_log(path: &Path) -> io::Result<Box<dyn Read>> {
    let file = File::open(path)?;
    Ok(if is_compressed(path) {
        Box::new(bzip2::read::MultiBzDecoder::new(io::BufReader::new(file)))
    } else {
        Box::new(file)
    })
}

/// Removes the other logs a daemon may have left for the same derivation
/// beside `<rest>.bz2`: Nix reads a plain `<rest>` before it, Guix a
/// `<rest>.gz`, and either would show an older build's log.
fn remove_older_logs(bz2: &Path) {
    let plain = bz2.with_extension("");
    let gz = plain.with_extension(match plain.extension() {
        Some(e) => format!("{}.gz", e.to_string_lossy()),
        None => "gz".to_owned(),
    });
    for old in [plain, gz] {
        match fs::remove_file(&old) {
            Ok(()) => tracing::debug!(path = %old.display(), "removed an older build log"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %old.display(), "cannot remove an older build log: {e}")
            }
        }
    }
}

/// The file under a [`LogSink`].
enum LogFile {
    Plain(File),
    Bz2(BzEncoder<File>),
}

impl LogFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            LogFile::Plain(f) => f.write_all(buf),
            LogFile::Bz2(z) => z.write_all(buf),
        }
    }

    /// Flushes a plain file; ends a compressed stream (nothing may be
    /// written after).
    fn finish(&mut self) -> io::Result<()> {
        match self {
            LogFile::Plain(f) => f.flush(),
            LogFile::Bz2(z) => z.try_finish(),
        }
    }
}

/// A build's log: written to its file as it comes, the last lines kept for
/// the failure message, each line also sent as an [`Event::Log`] when asked.
pub struct LogSink {
    file: LogFile,
    path: PathBuf,
    stream: Option<(Sender<Event>, StorePath)>,
    partial: Vec<u8>,
    tail: VecDeque<Vec<u8>>,
    /// Bytes of builder output accepted so far.
    written: u64,
    /// `--max-log-size`, and how much had been written when it was set.
    limit: Option<(u64, u64)>,
    /// Set once a write would have passed `limit`.
    exceeded: bool,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink").field("path", &self.path).finish()
    }
}

impl LogSink {
    /// Creates (truncating) the log file at `path`, compressed if its name
    /// ends in `.bz2` (see [`log_path`]), without a size limit.
    pub fn create(
        path: &Path,
        stream: Option<(Sender<Event>, StorePath)>,
    ) -> Result<LogSink, BuildErrorKind> {
        let io_err = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| BuildErrorKind::Io {
                action,
                path,
                source,
            }
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        if is_compressed(path) {
            remove_older_logs(path);
        }
        let file = File::create(path).map_err(io_err("create", path))?;
        let file = if is_compressed(path) {
            LogFile::Bz2(BzEncoder::new(file, bzip2::Compression::default()))
        } else {
            LogFile::Plain(file)
        };
        Ok(LogSink {
            file,
            path: path.to_owned(),
            stream,
            partial: Vec::new(),
            tail: VecDeque::new(),
            written: 0,
            limit: None,
            exceeded: false,
        })
    }

    /// From now on accepts at most `limit` more bytes (`None` or 0: no
    /// limit, as Nix's 0). Set for local builds only: a build machine
    /// enforces the limit it is sent, and a remote log cut here would look
    /// like the machine's fault.
    pub fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit.filter(|&l| l > 0).map(|l| (self.written, l));
    }

    /// The limit, if one was passed (the build must then fail with
    /// [`BuildErrorKind::LogLimit`]).
    pub fn exceeded(&self) -> Option<u64> {
        self.limit.filter(|_| self.exceeded).map(|(_, l)| l)
    }

    /// The last lines (lossily decoded).
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .tail
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            if lines.len() > TAIL_LINES {
                lines.remove(0);
            }
        }
        lines
    }

    /// Completes the file and sends a last unterminated line.
    pub fn finish(&mut self) {
        if let Err(e) = self.file.finish() {
            tracing::warn!(path = %self.path.display(), "cannot write build log: {e}");
        }
        if !self.partial.is_empty() {
            if let Some((tx, drv)) = &self.stream {
                let _ = tx.send(Event::Log {
                    drv: drv.clone(),
                    line: std::mem::take(&mut self.partial),
                });
            }
        }
    }

    fn line(&mut self, line: Vec<u8>) {
        if let Some((tx, drv)) = &self.stream {
            let _ = tx.send(Event::Log {
                drv: drv.clone(),
                line: line.clone(),
            });
        }
        self.tail.push_back(line);
        if self.tail.len() > TAIL_LINES {
            self.tail.pop_front();
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.map_or(u64::MAX, |(from, l)| {
            (from + l).saturating_sub(self.written)
        });
        let (buf, over) = if buf.len() as u64 > room {
            // What fits is kept, for the tail of the message.
            (&buf[..room as usize], true)
        } else {
            (buf, false)
        };
        // Unbuffered (a plain file): each write is one chunk read from the
        // builder's pipe, and `sandoff log` during the build shows
        // everything so far.
        self.file.write_all(buf)?;
        self.written += buf.len() as u64;
        let mut rest = buf;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..i]);
            self.line(line);
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        // A builder printing no newline must not grow this without bound.
        if self.partial.len() > 64 * 1024 {
            let line = std::mem::take(&mut self.partial);
            self.line(line);
        }
        if over {
            self.exceeded = true;
            return Err(io::Error::other("the log passed --max-log-size"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            LogFile::Plain(f) => f.flush(),
            // Flushing a bzip2 stream ends a block: only at the end.
            LogFile::Bz2(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreDir;

    fn drv() -> StorePath {
        StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv").expect("path")
    }

    #[test]
    fn log_sink_writes_everything_and_keeps_the_last_lines() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("log/x.drv");
        let (tx, rx) = std::sync::mpsc::channel();
        let drv = drv();
        let mut sink = LogSink::create(&path, Some((tx, drv.clone()))).expect("create");
        for i in 0..15 {
            write!(sink, "line {i}\nhalf").expect("write");
            writeln!(sink, "-{i}").expect("write");
        }
        sink.write_all(b"no newline").expect("write");
        let tail = sink.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("no newline"));
        assert_eq!(tail[0], "half-10");
        sink.finish();
        drop(sink);
        let lines: Vec<Vec<u8>> = rx
            .iter()
            .map(|e| match e {
                Event::Log { line, drv: d } if d == drv => line,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(lines.len(), 31);
        assert_eq!(lines[1], b"half-0");
        assert_eq!(lines[30], b"no newline");
        let written = fs::read_to_string(&path).expect("read");
        assert!(written.starts_with("line 0\nhalf-0\n") && written.ends_with("no newline"));
    }

    #[test]
    fn daemon_stores_get_nix_layout_others_sandoffs() {
        let mut loc = StoreLocation::new(StoreDir::default(), "/r".into());
        assert_eq!(
            log_path(&loc, &drv()),
            Path::new("/r/nix/var/sandoff/log/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv")
        );
        loc.daemon_log_dir = Some("/r/nix/var/log/nix".into());
        assert_eq!(
            log_path(&loc, &drv()),
            Path::new("/r/nix/var/log/nix/drvs/7h/7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv.bz2")
        );
    }

    #[test]
    fn a_bz2_log_is_compressed_and_reads_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("drvs/7h/rest.drv.bz2");
        let mut sink = LogSink::create(&path, None).expect("create");
        for i in 0..1000 {
            writeln!(sink, "line {i}").expect("write");
        }
        sink.finish();
        drop(sink);
        let raw = fs::read(&path).expect("read");
        assert!(raw.starts_with(b"BZh"), "not bzip2");
        let mut text = String::new();
        open_log(&path)
            .expect("open")
            .read_to_string(&mut text)
            .expect("decompress");
        assert_eq!(text.lines().count(), 1000);
        assert!(text.ends_with("line 999\n"));
        // An older log of the daemon's, which Nix or Guix would read first,
        // is gone once sandoff writes one.
        let plain = tmp.path().join("drvs/7h/rest.drv");
        let gz = tmp.path().join("drvs/7h/rest.drv.gz");
        fs::write(&plain, "old").expect("write");
        fs::write(&gz, "old").expect("write");
        LogSink::create(&path.with_file_name("rest.drv.bz2"), None).expect("create");
        assert!(!plain.exists() && !gz.exists());
    }

    #[test]
    fn the_write_that_passes_the_limit_fails_and_keeps_what_fits() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("log");
        let mut sink = LogSink::create(&path, None).expect("create");
        sink.set_limit(Some(10));
        sink.write_all(b"12345\n").expect("fits");
        assert_eq!(sink.exceeded(), None);
        assert!(sink.write_all(b"6789\nabc").is_err());
        assert_eq!(sink.exceeded(), Some(10));
        sink.finish();
        assert_eq!(fs::read(&path).expect("read"), b"12345\n6789");
        // Counted from when it is set (a machine's log before does not count).
        let mut sink = LogSink::create(&path, None).expect("create");
        sink.write_all(b"sandoff: building on a machine\n")
            .expect("no limit yet");
        sink.set_limit(Some(3));
        sink.write_all(b"abc").expect("fits");
        assert!(sink.write_all(b"d").is_err());
        // No limit: 0, as Nix.
        let mut sink = LogSink::create(&path, None).expect("create");
        sink.set_limit(Some(0));
        sink.write_all(&[b'x'; 100_000]).expect("no limit");
        assert_eq!(sink.exceeded(), None);
    }
}
