//! The coordinator process: two HTTP/1.1 listeners (axum on tokio), TLS
//! with rustls when a certificate is given, and the lease reaper.
//!
//! - the **agent API** (`/agent/v1/…`, default `0.0.0.0:8745`): agents
//!   lease builds, send heartbeats, upload logs and outputs, report;
//! - the **client API** (`/client/v1/…`, default `127.0.0.1:8746`):
//!   uploads of `.drv` files and sources, submissions, queries, agents and
//!   tokens;
//! - the **web page** (`/`, `/ui/…`, `/login`) on the client listener,
//!   read-only (see [`web`]);
//! - the **cache** (`/cache/…`) on both: the binary cache under
//!   `--cache-dir`, for agents' inputs and for Nix (`substituters =
//!   http://…/cache`, the token as the password of a `netrc-file` entry).
//!
//! Events of the datastore's outbox go to the hooks ([`hooks`]) and, live,
//! to clients of `GET /client/v1/events` (server-sent events); `/metrics`
//! (both listeners) shows Prometheus metrics ([`metrics`]).
//!
//! Every endpoint needs a token (see [`auth`]), `/metrics` aside with
//! `--public-metrics`; unlike the Guix Build
//! Coordinator's client API, none is open. The datastore is blocking: its
//! calls run on tokio's blocking pool, as do the checks of uploaded NARs.

mod agent_api;
pub mod auth;
mod cache_http;
mod client_api;
mod events_http;
pub mod hooks;
mod live_log;
pub mod metrics;
mod tls;
mod uploads;
mod web;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Json;
use thiserror::Error;

use super::api::{ErrorBody, Info};
use super::cache::{Cache, CacheError};
use super::datastore::{Datastore, DatastoreError, RetryPolicy};
use super::model::{AgentId, BuildId, Principal, Role};
use crate::store::signature::SecretKey;
use crate::store::StoreDir;

/// How the coordinator is run (`sandoff coordinator`).
#[derive(Debug)]
pub struct ServerConfig {
    /// `sqlite:///PATH`.
    pub datastore: String,
    pub agent_listen: SocketAddr,
    pub client_listen: SocketAddr,
    pub cache_dir: PathBuf,
    pub store_dir: StoreDir,
    /// Signs the cache's narinfos.
    pub key: SecretKey,
    /// Certificate chain and key, PEM.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A lease lasts this long without a heartbeat.
    pub lease_secs: i64,
    /// The largest upload (compressed bytes) and log accepted.
    pub max_upload_bytes: u64,
    pub retry: RetryPolicy,
    /// Also serve the agent API, without TLS, on a loopback port of its
    /// own, for in-process agents (the SSH workers).
    pub internal: bool,
    /// The hooks and how they run.
    pub hooks: hooks::HookSettings,
    /// `/metrics` open to requests without a token.
    pub public_metrics: bool,
}

/// Why the coordinator could not start or stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("serving: {0}")]
    Serve(#[source] io::Error),
}

/// What every handler shares.
pub(crate) struct Inner {
    pub(crate) ds: Box<dyn Datastore>,
    pub(crate) cache: Cache,
    pub(crate) store_dir: StoreDir,
    pub(crate) lease_secs: i64,
    pub(crate) max_upload_bytes: u64,
    pub(crate) info: Info,
    pub(crate) public_metrics: bool,
    /// Bumped after writes that may have added events, to wake the hooks
    /// and the event streams (which also poll, should one be missed).
    pub(crate) wake: tokio::sync::watch::Sender<u64>,
    /// Browser sessions of the web page.
    pub(crate) sessions: web::session::Sessions,
    /// Each agent's mandatory features, from its last request for work
    /// (SSH workers have some; the datastore keeps only systems and
    /// features): "cannot start" must know them. Empty for an agent not
    /// heard from since the coordinator started.
    pub(crate) mandatory: std::sync::Mutex<BTreeMap<AgentId, BTreeSet<String>>>,
}

impl Inner {
    /// Tells the hooks and event streams that events may have been written.
    pub(crate) fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The state of both routers.
pub(crate) type App = Arc<Inner>;

/// Where the listeners are, once bound (port 0 picks a free one).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub agent: SocketAddr,
    pub client: SocketAddr,
    /// The loopback agent listener for in-process agents, if asked for.
    pub internal: Option<SocketAddr>,
}

/// Runs the coordinator until SIGINT or SIGTERM; `ready` is told where
/// it listens once both listeners are bound (and the datastore is open).
pub async fn run(config: ServerConfig, ready: impl FnOnce(Bound)) -> Result<(), ServerError> {
    let ServerConfig {
        datastore,
        agent_listen,
        client_listen,
        cache_dir,
        store_dir,
        key,
        tls,
        lease_secs,
        max_upload_bytes,
        retry,
        internal,
        hooks,
        public_metrics,
    } = config;
    let info = Info {
        store_dir: store_dir.as_str().to_owned(),
        public_key: key.to_public().to_string(),
        lease_secs,
        max_upload_bytes,
    };
    let sessions = web::session::Sessions::new(tls.is_some());
    let app: App = tokio::task::spawn_blocking(move || -> Result<App, ServerError> {
        let ds = super::datastore::open(&datastore, retry)?;
        let cache = Cache::open(&cache_dir, store_dir.clone(), key)?;
        Ok(Arc::new(Inner {
            ds,
            cache,
            store_dir,
            lease_secs,
            max_upload_bytes,
            info,
            public_metrics,
            wake: tokio::sync::watch::channel(0).0,
            sessions,
            mandatory: std::sync::Mutex::new(BTreeMap::new()),
        }))
    })
    .await
    .map_err(|e| ServerError::Serve(io::Error::other(e)))??;
    let tls = tls.map(|(c, k)| tls::acceptor(&c, &k)).transpose()?;
    let agent = listen(agent_listen).await?;
    let client = listen(client_listen).await?;
    let internal = match internal {
        true => Some(listen(SocketAddr::from(([127, 0, 0, 1], 0))).await?),
        false => None,
    };
    let bound = Bound {
        agent: agent.local_addr().map_err(ServerError::Serve)?,
        client: client.local_addr().map_err(ServerError::Serve)?,
        internal: match &internal {
            Some(l) => Some(l.local_addr().map_err(ServerError::Serve)?),
            None => None,
        },
    };
    let guard = || middleware::from_fn_with_state(app.clone(), require_token);
    let agent_router = agent_api::router()
        .merge(cache_http::router())
        .merge(metrics::router())
        .route_layer(guard())
        .with_state(app.clone());
    // The web page has its own guard, which also takes a session cookie.
    let client_router = client_api::router()
        .merge(web::api_router())
        .merge(cache_http::router())
        .merge(events_http::router())
        .merge(metrics::router())
        .route_layer(guard())
        .merge(web::router(app.clone()))
        .with_state(app.clone());
    tokio::spawn(reap_leases(app.clone()));
    hooks::start(&app, hooks);
    ready(bound);
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let serve_agent = serve(agent, tls.clone(), agent_router, wait(stop_rx.clone()));
    let serve_internal = {
        let router = agent_api::router()
            .merge(cache_http::router())
            .route_layer(guard())
            .with_state(app.clone());
        let stop = wait(stop_rx.clone());
        async move {
            match internal {
                Some(l) => serve(l, None, router, stop).await,
                None => Ok(()),
            }
        }
    };
    let serve_client = serve(client, tls, client_router, wait(stop_rx));
    let stopper = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        Ok::<(), ServerError>(())
    };
    tokio::try_join!(serve_agent, serve_client, serve_internal, stopper)?;
    Ok(())
}

async fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tls::Acceptor>,
    router: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    match tls {
        None => axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
            .map_err(ServerError::Serve),
        Some(acceptor) => axum::serve(tls::TlsListener::new(listener, acceptor), router)
            .with_graceful_shutdown(stop)
            .await
            .map_err(ServerError::Serve),
    }
}

/// How long an upload nobody appends to is kept (an uploader that never
/// came back).
const STALE_UPLOAD: Duration = Duration::from_secs(24 * 3600);

/// Returns builds whose lease ended to the queue, a few times a lease;
/// sweeps abandoned uploads about once an hour.
async fn reap_leases(app: App) {
    let every = Duration::from_secs((app.lease_secs / 4).clamp(1, 30) as u64);
    let sweep_every = (3600 / every.as_secs()).max(1);
    let mut round: u64 = 0;
    loop {
        tokio::time::sleep(every).await;
        let expired = blocking(&app, |a| {
            let ids = a.ds.expire_leases(now())?;
            if !ids.is_empty() {
                a.wake();
            }
            Ok(ids)
        })
        .await;
        match expired {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(builds = ?ids, "leases expired; builds requeued");
            }
            Ok(_) => {}
            Err(e) => tracing::error!("expiring leases: {}", e.message),
        }
        round += 1;
        if round.is_multiple_of(sweep_every) {
            match blocking(&app, |a| Ok(a.cache.remove_stale_uploads(STALE_UPLOAD)?)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} abandoned uploads"),
                Err(e) => tracing::error!("sweeping uploads: {}", e.message),
            }
        }
    }
}

/// A build id from a URL; 400 when it is not one.
pub(crate) fn build_id(s: &str) -> Result<BuildId, ApiError> {
    s.parse()
        .map_err(|e: super::model::ModelError| ApiError::bad_request(e.to_string()))
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs `f` on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Inner) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app))
        .await
        .map_err(|e| ApiError::internal(format!("worker: {e}")))?
}

/// An error answer: a status and one line, as `{"error": …}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    /// Sent with 401, so that HTTP clients (curl for Nix) send credentials.
    challenge: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            challenge: false,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub(crate) fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!("{message}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn unauthorized(message: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_owned(),
            challenge: true,
        }
    }

    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sandoff coordinator\""),
            );
        }
        r
    }
}

impl From<DatastoreError> for ApiError {
    fn from(e: DatastoreError) -> ApiError {
        use DatastoreError as E;
        let status = match &e {
            E::NoBuild(_) | E::NoAgent(_) | E::NoToken(_) => StatusCode::NOT_FOUND,
            E::AgentExists(_) | E::WrongState { .. } | E::NotLeased { .. } => StatusCode::CONFLICT,
            E::NoDerivation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => return ApiError::internal(e.to_string()),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> ApiError {
        use CacheError as E;
        match &e {
            E::OffsetMismatch { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            E::TooLarge { .. } | E::LogTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            E::NoUpload { .. } | E::BadName { .. } => ApiError::not_found(e.to_string()),
            E::BadUploadId { .. } => ApiError::bad_request(e.to_string()),
            E::Interrupted { .. } => ApiError::bad_request(e.to_string()),
            E::Rejected { .. } => ApiError::unprocessable(e.to_string()),
            E::Io { .. } | E::ReadNarInfo { .. } | E::BadNarInfo { .. } => {
                ApiError::internal(e.to_string())
            }
        }
    }
}

/// The principal of a request's token; 401 without a valid one.
pub(crate) async fn authenticate(app: &App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some(token) = auth::presented(headers) else {
        return Err(ApiError::unauthorized(
            "a token is needed (Authorization: Bearer TOKEN)",
        ));
    };
    let hash = auth::hash_token(&token);
    let found = blocking(app, move |a| Ok(a.ds.token_lookup(&hash, now())?)).await?;
    found.ok_or_else(|| ApiError::unauthorized("unknown, revoked or expired token"))
}

/// Refuses, before anything of the request is read, a request without a
/// valid token; hands the token's principal to the handler.
async fn require_token(
    State(app): State<App>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // The one route an operator may open: nothing else is let through.
    if app.public_metrics && req.uri().path() == metrics::PATH {
        return Ok(next.run(req).await);
    }
    let principal = authenticate(&app, req.headers()).await?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// The agent a request comes from (403 for a client token): an extractor
/// that reads only the request's head, so it runs before any body is read.
pub(crate) struct AgentToken(pub(crate) AgentId);

/// A client token with at least the `read` role.
pub(crate) struct ReadToken;
/// A client token with at least the `submit` role.
pub(crate) struct SubmitToken;
/// A client token with the `admin` role.
pub(crate) struct AdminToken;

/// The principal the guard found.
fn principal(parts: &Parts) -> Result<&Principal, ApiError> {
    parts
        .extensions
        .get::<Principal>()
        .ok_or_else(|| ApiError::unauthorized("a token is needed (Authorization: Bearer TOKEN)"))
}

impl<S: Send + Sync> FromRequestParts<S> for AgentToken {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match principal(parts)? {
            Principal::Agent { agent } => Ok(AgentToken(agent.clone())),
            Principal::Client { .. } => Err(ApiError::forbidden(
                "this is the agent API; a client token cannot use it",
            )),
        }
    }
}

/// Checks that the request's client token has at least `role`.
fn client_role(parts: &Parts, role: Role) -> Result<(), ApiError> {
    match *principal(parts)? {
        Principal::Client { role: has } if has >= role => Ok(()),
        Principal::Client { role: has } => Err(ApiError::forbidden(format!(
            "this needs a {} token; this one is {}",
            role.as_str(),
            has.as_str()
        ))),
        Principal::Agent { .. } => Err(ApiError::forbidden(
            "this needs a client token (an agent token is for the agent API only)",
        )),
    }
}

macro_rules! client_token {
    ($t:ident, $role:expr) => {
        impl<S: Send + Sync> FromRequestParts<S> for $t {
            type Rejection = ApiError;
            async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
                client_role(parts, $role).map(|()| $t)
            }
        }
    };
}
client_token!(ReadToken, Role::Read);
client_token!(SubmitToken, Role::Submit);
client_token!(AdminToken, Role::Admin);
