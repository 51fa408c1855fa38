//! The HTTP client of both APIs (blocking, `ureq`), used by the CLI and by
//! agents: JSON calls, bounded downloads, and resumable uploads (ask the
//! offset with `HEAD`, send the rest with `PUT`, again after a broken
//! connection).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use super::api::{ErrorBody, LOG_COMPLETE, UPLOAD_OFFSET};

/// The largest JSON answer read (a list of 100,000 builds fits).
const MAX_JSON: u64 = 256 << 20;
/// How many times an upload resumes after a broken connection.
const UPLOAD_TRIES: u32 = 5;

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{url}: {message} (HTTP {status})")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("{url}: reading the answer: {source}")]
    Read {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{url}: the answer is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: unexpected answer: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read '{path}': {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CA certificate '{path}': {source}")]
    Tls {
        path: PathBuf,
        #[source]
        source: native_tls::Error,
    },
    #[error("'{0}' is not an http:// or https:// URL")]
    Url(String),
}

impl ClientError {
    /// The HTTP status, for an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether trying again may help (the connection broke, the server is
    /// restarting) rather than the request being refused.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } | ClientError::Read { .. } => true,
            ClientError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A coordinator, reached with one token.
#[derive(Clone)]
pub struct Client {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// A client of the coordinator at `url` (`http://host:port` or
    /// `https://…`), trusting `ca_cert` (PEM) besides the system's roots.
    pub fn new(url: &str, token: &str, ca_cert: Option<&Path>) -> Result<Client, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Url(url.to_owned()));
        }
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            // A stalled server is noticed; a large upload is not cut.
            .timeout_read(Duration::from_secs(300))
            .timeout_write(Duration::from_secs(300));
        // ureq needs its TLS connector set even for the system's roots.
        let mut tls = native_tls::TlsConnector::builder();
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|source| ClientError::File {
                path: path.to_owned(),
                source,
            })?;
            let cert =
                native_tls::Certificate::from_pem(&pem).map_err(|source| ClientError::Tls {
                    path: path.to_owned(),
                    source,
                })?;
            tls.add_root_certificate(cert);
        }
        let connector = tls.build().map_err(|source| ClientError::Tls {
            path: ca_cert.map(Path::to_owned).unwrap_or_default(),
            source,
        })?;
        builder = builder.tls_connector(Arc::new(connector));
        Ok(Client {
            base,
            auth: format!("Bearer {}", token.trim()),
            agent: builder.build(),
        })
    }

    /// The coordinator's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The `Authorization` header value this client sends.
    pub fn authorization(&self) -> &str {
        &self.auth
    }

    /// The HTTP agent (TLS roots, timeouts) for other requests to the
    /// same coordinator (the cache).
    pub fn http(&self) -> &ureq::Agent {
        &self.agent
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: &str, path: &str) -> (String, ureq::Request) {
        let url = self.url(path);
        let req = self
            .agent
            .request(method, &url)
            .set("Authorization", &self.auth);
        (url, req)
    }

    /// `GET` a JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (url, req) = self.request("GET", path);
        json(&url, answer(&url, req.call())?)
    }

    /// `POST` a JSON body, read a JSON answer.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let (url, req) = self.request("POST", path);
        let res = send_json(&url, req, body)?;
        json(&url, answer(&url, res)?)
    }

    /// `POST` a JSON body (or none), ignore the answer's body.
    pub fn post_only<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<(), ClientError> {
        let (url, req) = self.request("POST", path);
        let res = match body {
            Some(b) => send_json(&url, req, b)?,
            None => req.call(),
        };
        answer(&url, res).map(drop)
    }

    /// `GET` raw bytes, at most `limit`.
    pub fn get_bytes(&self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let (url, req) = self.request("GET", path);
        read_limited(&url, answer(&url, req.call())?, limit)
    }

    /// `PUT` raw bytes (a log).
    pub fn put_bytes(&self, path: &str, body: &[u8]) -> Result<(), ClientError> {
        let (url, req) = self.request("PUT", path);
        answer(&url, req.send_bytes(body)).map(drop)
    }

    /// `POST` raw bytes to be appended at `offset` (the `Upload-Offset`
    /// header, as for uploads): a live log's new part. Returns the size the
    /// coordinator now holds.
    pub fn append_bytes(&self, path: &str, offset: u64, body: &[u8]) -> Result<u64, ClientError> {
        let (url, req) = self.request("POST", path);
        let req = req
            .set(UPLOAD_OFFSET, &offset.to_string())
            .set("Content-Type", "application/octet-stream");
        let res = answer(&url, req.send_bytes(body))?;
        Ok(res
            .header(UPLOAD_OFFSET)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(offset + body.len() as u64))
    }

    /// Build `id`'s log from `offset` (`GET /client/v1/builds/{id}/log`):
    /// while the build runs, what the agent has sent so far.
    pub fn build_log(&self, id: &str, offset: u64) -> Result<LogChunk, ClientError> {
        let path = format!("/client/v1/builds/{id}/log?offset={offset}");
        let (url, req) = self.request("GET", &path);
        let res = answer(&url, req.call())?;
        let next = res
            .header(UPLOAD_OFFSET)
            .and_then(|v| v.trim().parse().ok());
        let complete = res.header(LOG_COMPLETE) == Some("true");
        let bytes = read_limited(&url, res, MAX_LOG_PART)?;
        Ok(LogChunk {
            next: next.unwrap_or(offset + bytes.len() as u64),
            bytes,
            complete,
        })
    }

    /// How many bytes of the upload at `path` the coordinator holds.
    pub fn upload_offset(&self, path: &str) -> Result<u64, ClientError> {
        let (url, req) = self.request("HEAD", path);
        let res = answer(&url, req.call())?;
        res.header(UPLOAD_OFFSET)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| ClientError::Http {
                url,
                status: 200,
                message: "no Upload-Offset in the answer".into(),
            })
    }

    /// Uploads `file` to `path`, resuming where the coordinator stands
    /// (after an earlier attempt or a broken connection); returns how many
    /// bytes this call sent.
    pub fn upload(&self, path: &str, file: &Path) -> Result<u64, ClientError> {
        let file_err = |source| ClientError::File {
            path: file.to_owned(),
            source,
        };
        let len = std::fs::metadata(file).map_err(file_err)?.len();
        let mut sent = 0;
        let mut tries = 0;
        loop {
            let offset = self.upload_offset(path)?;
            if offset == len {
                return Ok(sent);
            }
            if offset > len {
                return Err(ClientError::Http {
                    url: self.url(path),
                    status: 409,
                    message: format!("the coordinator holds {offset} bytes of a {len}-byte upload"),
                });
            }
            let mut f = File::open(file).map_err(file_err)?;
            f.seek(SeekFrom::Start(offset)).map_err(file_err)?;
            let (url, req) = self.request("PUT", path);
            let req = req
                .set(UPLOAD_OFFSET, &offset.to_string())
                .set("Content-Length", &(len - offset).to_string())
                .set("Content-Type", "application/octet-stream");
            match answer(&url, req.send(f.take(len - offset))) {
                Ok(_) => sent += len - offset,
                Err(e) if e.is_transient() && tries + 1 < UPLOAD_TRIES => {
                    tries += 1;
                    tracing::warn!("upload to {url} broke off ({e}); resuming");
                    std::thread::sleep(Duration::from_millis(200 << tries));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The most bytes one log answer carries (the server sends at most 1 MiB).
const MAX_LOG_PART: u64 = 4 << 20;

/// A part of a build's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    pub bytes: Vec<u8>,
    /// Where the next part starts.
    pub next: u64,
    /// The build ended and its log is whole: no more parts will come.
    pub complete: bool,
}

fn send_json<B: Serialize>(
    url: &str,
    req: ureq::Request,
    body: &B,
) -> Result<Result<ureq::Response, ureq::Error>, ClientError> {
    let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Json {
        url: url.to_owned(),
        source,
    })?;
    Ok(req
        .set("Content-Type", "application/json")
        .send_bytes(&bytes))
}

/// An error answer as a `ClientError` with the server's message.
fn answer(
    url: &str,
    res: Result<ureq::Response, ureq::Error>,
) -> Result<ureq::Response, ClientError> {
    match res {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(status, r)) => {
            let text = r.into_string().unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| text.chars().take(200).collect());
            Err(ClientError::Http {
                url: url.to_owned(),
                status,
                message,
            })
        }
        Err(ureq::Error::Transport(t)) => Err(ClientError::Transport {
            url: url.to_owned(),
            source: Box::new(t),
        }),
    }
}

fn read_limited(url: &str, res: ureq::Response, limit: u64) -> Result<Vec<u8>, ClientError> {
    use crate::bounded::BoundedError;
    crate::bounded::read_all(res.into_reader(), limit).map_err(|e| match e {
        BoundedError::TooLarge { limit } => ClientError::TooLarge {
            url: url.to_owned(),
            limit,
        },
        BoundedError::Io { source } => ClientError::Read {
            url: url.to_owned(),
            source,
        },
        other => ClientError::Read {
            url: url.to_owned(),
            source: std::io::Error::other(other),
        },
    })
}

fn json<T: DeserializeOwned>(url: &str, res: ureq::Response) -> Result<T, ClientError> {
    let bytes = read_limited(url, res, MAX_JSON)?;
    serde_json::from_slice(&bytes).map_err(|source| ClientError::Json {
        url: url.to_owned(),
        source,
    })
}
