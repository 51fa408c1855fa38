//! Build logs as they grow: an agent appends a running build's new log
//! bytes every second or so to an upload named after the build
//! (`uploads/log-b<id>.part`, with the offsets, limits and syncing of NAR
//! uploads); at the end it sends the whole log, which replaces that
//! upload by `log/<drv>`, as before. Readers (the client API, the web
//! page) ask for the bytes from an offset and get them from whichever
//! of the two holds the build's log.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

use super::{ApiError, Inner};
use crate::coordinator::cache::UploadId;
use crate::coordinator::model::{BuildId, BuildRecord, BuildState};

/// The most bytes of a log one answer carries.
pub(crate) const MAX_PART: u64 = 1 << 20;

/// The upload that holds the live log of build `id`.
pub(crate) fn upload_id(id: BuildId) -> UploadId {
    UploadId::new(&format!("log-b{id}")).expect("'log-b' and digits make a valid upload id")
}

/// A piece of a build's log.
#[derive(Debug)]
pub(crate) struct LogPart {
    /// The bytes from the requested offset (at most the requested limit).
    pub(crate) bytes: Vec<u8>,
    /// Where the next read starts.
    pub(crate) next: u64,
    /// The log's size now.
    pub(crate) size: u64,
    /// No more bytes will come: the build ended and the log is whole.
    pub(crate) complete: bool,
}

/// The file of `build`'s log: the live one while it grows, the final one
/// once it is there (`None`: no log yet).
fn log_file(a: &Inner, build: &BuildRecord) -> Result<Option<(PathBuf, bool)>, ApiError> {
    let live = a.cache.partial_path(&upload_id(build.id));
    if live.is_file() {
        return Ok(Some((live, false)));
    }
    let drv = a
        .store_dir
        .parse_path(&build.drv)
        .map_err(|e| ApiError::internal(format!("build {}: {e}", build.id)))?;
    let done = a.cache.dir().join("log").join(drv.base_name());
    // The final log of a running build's derivation may be an earlier
    // build's: shown only once this build has ended.
    if build.state != BuildState::Allocated && done.is_file() {
        return Ok(Some((done, true)));
    }
    Ok(None)
}

/// Up to `limit` bytes of `build`'s log from `offset`.
pub(crate) fn read(
    a: &Inner,
    build: &BuildRecord,
    offset: u64,
    limit: u64,
) -> Result<LogPart, ApiError> {
    let Some((path, final_log)) = log_file(a, build)? else {
        return Ok(LogPart {
            bytes: Vec::new(),
            next: offset,
            size: 0,
            complete: !build.state.is_active(),
        });
    };
    let io_err = |e: io::Error| ApiError::internal(format!("reading '{}': {e}", path.display()));
    let mut file = match File::open(&path) {
        Ok(f) => f,
        // Replaced by the final log between the check and the open: the
        // reader asks again.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(LogPart {
                bytes: Vec::new(),
                next: offset,
                size: offset,
                complete: false,
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let size = file.metadata().map_err(io_err)?.len();
    let start = offset.min(size);
    file.seek(SeekFrom::Start(start)).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(limit.min(MAX_PART))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let next = start + bytes.len() as u64;
    // A finished build whose agent never sent the whole log (its lease
    // was lost, it was canceled) keeps the live one: nothing more comes.
    let ended = final_log || !build.state.is_active();
    Ok(LogPart {
        complete: ended && next >= size,
        bytes,
        next,
        size,
    })
}

/// The last `n` bytes of `build`'s log (from a line start when it is cut).
pub(crate) fn tail(a: &Inner, build: &BuildRecord, n: u64) -> Result<LogPart, ApiError> {
    let whole = read(a, build, 0, 0)?;
    let from = whole.size.saturating_sub(n);
    let mut part = read(a, build, from, n)?;
    if from > 0 {
        if let Some(nl) = part.bytes.iter().position(|&b| b == b'\n') {
            part.bytes.drain(..=nl);
        }
    }
    Ok(part)
}
