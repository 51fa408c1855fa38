//! Request bodies into the cache: resumable NAR uploads (an offset in an
//! `Upload-Offset` header, as tus does) and logs, streamed from the async
//! body into blocking writers through a small channel, so a 1 GiB upload
//! is never held in memory.

use std::io::{self, Read};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{ApiError, App, Inner};
use crate::coordinator::api::UPLOAD_OFFSET;
use crate::coordinator::cache::{CacheError, UploadId};
use crate::store::StorePath;

/// An answer carrying the upload's offset.
pub(super) fn offset_answer(status: StatusCode, offset: u64) -> Response {
    let mut r = status.into_response();
    r.headers_mut()
        .insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    r
}

/// The `Upload-Offset` of a `PUT` (required: a client that does not know
/// where it stands must ask with `HEAD` first).
pub(super) fn requested_offset(headers: &HeaderMap) -> Result<u64, ApiError> {
    headers
        .get(UPLOAD_OFFSET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "an upload needs an Upload-Offset header (HEAD tells the current one)",
            )
        })
}

/// Appends `body` to upload `id` at `offset`; answers the new offset.
/// What arrived before the body broke off is kept: the client resumes
/// from there.
pub(super) async fn append_body(
    app: &App,
    id: UploadId,
    offset: u64,
    body: Body,
) -> Result<Response, ApiError> {
    let new_offset = with_body(app, body, move |a, r| {
        a.cache.append(&id, offset, r, a.max_upload_bytes)
    })
    .await?;
    Ok(offset_answer(StatusCode::OK, new_offset))
}

/// Stores a build's log (at most the upload limit).
pub(super) async fn write_log(app: &App, drv: StorePath, body: Body) -> Result<(), ApiError> {
    with_body(app, body, move |a, r| {
        a.cache.write_log(&drv, r, a.max_upload_bytes)
    })
    .await
}

/// Runs `write` on the blocking pool, reading `body` as it arrives.
async fn with_body<T: Send + 'static>(
    app: &App,
    body: Body,
    write: impl FnOnce(&Inner, &mut dyn Read) -> Result<T, CacheError> + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let inner = app.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            chunk: Bytes::new(),
        };
        write(&inner, &mut reader)
    });
    forward(body, tx).await;
    Ok(writer
        .await
        .map_err(|e| ApiError::internal(format!("upload worker: {e}")))??)
}

/// Sends the body's chunks to the blocking writer until either ends.
async fn forward(body: Body, tx: mpsc::Sender<io::Result<Bytes>>) {
    let mut stream = body.into_data_stream();
    while let Some(item) = stream.next().await {
        let item = item.map_err(|e| io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()));
        let broken = item.is_err();
        if tx.send(item).await.is_err() || broken {
            // The writer stopped (limit, bad offset) or the body broke.
            break;
        }
    }
}

/// A blocking `Read` over the chunks an async task sends.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}
