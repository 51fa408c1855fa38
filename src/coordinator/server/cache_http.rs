//! The binary cache over HTTP (`/cache/…`, on both listeners): what Nix's
//! `http://` binary cache store and agents read. Only the names a cache
//! serves are answered (`nix-cache-info`, `<hash>.narinfo`,
//! `nar/<file hash>.nar.zst`, `log/<drv>`); anything else is 404, so no
//! request can reach another file under `--cache-dir`. The token check is
//! the routers' guard (any valid token reads the cache).

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream;
use tokio::io::AsyncReadExt;

use super::{ApiError, App};

pub(super) fn router() -> Router<App> {
    Router::new()
        .route("/cache/nix-cache-info", get(cache_info))
        .route("/cache/{file}", get(narinfo))
        .route("/cache/nar/{file}", get(nar))
        .route("/cache/log/{file}", get(log))
}

async fn cache_info(State(app): State<App>) -> Result<Response, ApiError> {
    send(
        app.cache.dir().join("nix-cache-info"),
        "text/x-nix-cache-info",
    )
    .await
}

async fn narinfo(State(app): State<App>, Path(file): Path<String>) -> Result<Response, ApiError> {
    send(app.cache.narinfo_path(&file)?, "text/x-nix-narinfo").await
}

async fn nar(State(app): State<App>, Path(file): Path<String>) -> Result<Response, ApiError> {
    send(app.cache.nar_path(&file)?, "application/x-nix-nar").await
}

async fn log(State(app): State<App>, Path(file): Path<String>) -> Result<Response, ApiError> {
    send(app.cache.log_path(&file)?, "text/plain; charset=utf-8").await
}

/// Streams a file, 404 if it is not there.
async fn send(path: PathBuf, content_type: &'static str) -> Result<Response, ApiError> {
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            return Err(ApiError::not_found(format!(
                "no '{}' in the cache",
                name.unwrap_or_default()
            )));
        }
        Err(e) => {
            return Err(ApiError::internal(format!(
                "reading '{}': {e}",
                path.display()
            )))
        }
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("reading '{}': {e}", path.display())))?
        .len();
    let chunks = stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 1 << 16];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut r = (StatusCode::OK, Body::from_stream(chunks)).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(r)
}
