//! The web page (read-only), on the client listener: `/` (an overview),
//! `/ui/queue`, `/ui/running`, `/ui/recent`, `/ui/agents`, and
//! `/ui/builds/{id}` with its live log (`/ui/builds/{id}/log?offset=N`,
//! polled by the page). HTML rendered here ([`page`]), a few lines of
//! inline script, no external resources, and a strict
//! `Content-Security-Policy` (a fresh nonce per page for the one style and
//! script element).
//!
//! Authentication ([`session`]): a client token of any role through
//! `Authorization`, as on the API, or a session cookie, which only these
//! routes accept (the APIs never do: a cookie rides along with requests
//! a browser makes on its own, a header does not). `/login` (a form that
//! takes a token) and `/ui/session/{code}` (a one-time login code minted
//! with `POST /client/v1/ui-login-codes`; `?next=/ui/…` picks the page it
//! opens) give a browser its cookie;
//! `POST /logout` ends the session. A page asked for without either is
//! redirected to `/login`.

mod page;
pub(crate) mod session;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use rand_core::{OsRng, RngCore};
use serde::Deserialize;

use super::auth::{hash_token, presented};
use super::client_api::{log_answer, unbuildable_among, LogQuery};
use super::{authenticate, blocking, live_log, now, ApiError, App, Inner, ReadToken};
use crate::coordinator::api::UiLoginCode;
use crate::coordinator::datastore::BuildFilter;
use crate::coordinator::model::{BuildId, BuildRecord, BuildState, Principal};
use page::{Queued, Running};

/// How many builds a list shows.
const LIST_LIMIT: usize = 200;
/// How much of a running build's log the running view shows.
const TAIL_BYTES: u64 = 1024;
/// How much of a log the build page shows at first.
const PAGE_LOG_BYTES: u64 = 256 << 10;
/// How often list views reload themselves.
const REFRESH_SECS: u32 = 5;

/// The page's routes, guarded by [`require_viewer`], and the routes that
/// give a browser a session (open to all).
pub(super) fn router(app: App) -> Router<App> {
    let pages = Router::new()
        .route("/", get(overview))
        .route("/ui/queue", get(queue))
        .route("/ui/running", get(running))
        .route("/ui/recent", get(recent))
        .route("/ui/agents", get(agents))
        .route("/ui/builds/{id}", get(build))
        .route("/ui/builds/{id}/log", get(build_log))
        .route_layer(middleware::from_fn_with_state(app, require_viewer));
    Router::new()
        .merge(pages)
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/ui/session/{code}", get(session_from_code))
}

/// The route of the client API (behind its token guard) that mints login
/// codes.
pub(super) fn api_router() -> Router<App> {
    Router::new().route("/client/v1/ui-login-codes", post(new_login_code))
}

/// The client token's principal behind a request: from `Authorization`,
/// else from the session cookie (its token checked again, so that a
/// revoked or expired token ends the session).
async fn viewer(app: &App, headers: &HeaderMap) -> Result<Option<Principal>, ApiError> {
    if presented(headers).is_some() {
        return authenticate(app, headers).await.map(Some);
    }
    let Some(id) = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::from_cookies)
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let t = now();
    let Some(token_hash) = app.sessions.lookup(&id, t) else {
        return Ok(None);
    };
    let found = blocking(app, move |a| Ok(a.ds.token_lookup(&token_hash, t)?)).await?;
    if found.is_none() {
        app.sessions.close(&id);
    }
    Ok(found)
}

/// Lets through requests of a client token (any role: each includes
/// `read`); sends a browser without one to the login form.
async fn require_viewer(
    State(app): State<App>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match viewer(&app, req.headers()).await? {
        Some(p @ Principal::Client { .. }) => {
            req.extensions_mut().insert(p);
            Ok(next.run(req).await)
        }
        Some(Principal::Agent { .. }) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the web page needs a client token; this is an agent's",
        )),
        None => Ok(redirect("/login", None)),
    }
}

/// A `303 See Other` to `to`, setting a cookie when given.
fn redirect(to: &str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    if let Ok(to) = HeaderValue::from_str(to) {
        h.insert(header::LOCATION, to);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, c);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An HTML answer with the page's security headers; `nonce` is the one the
/// page's style and script carry.
fn html(status: StatusCode, nonce: &str, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
         base-uri 'none'"
    );
    let pairs = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8".to_owned()),
        (header::CONTENT_SECURITY_POLICY, csp),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (header::REFERRER_POLICY, "no-referrer".to_owned()),
        (header::X_FRAME_OPTIONS, "DENY".to_owned()),
        (header::CACHE_CONTROL, "no-store".to_owned()),
    ];
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    r
}

/// A fresh nonce for a page's style and script.
fn nonce() -> String {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A view of the navigation, reloading itself.
fn view(here: &'static str, title: &str, body: String) -> Response {
    let n = nonce();
    let page = page::layout(title, Some(here), &n, Some(REFRESH_SECS), &body, None);
    html(StatusCode::OK, &n, page)
}

fn list(a: &Inner, states: &[BuildState], limit: usize) -> Result<Vec<BuildRecord>, ApiError> {
    let filter = BuildFilter {
        states: states.iter().copied().collect(),
        limit,
        ..BuildFilter::default()
    };
    Ok(a.ds.builds(&filter)?)
}

/// Queued builds, the next to start first, each with why no agent can do
/// it (if none can).
fn queued(a: &Inner, limit: usize) -> Result<Vec<Queued>, ApiError> {
    let agents = a.ds.agents()?;
    let mut builds = list(a, &[BuildState::Queued], limit)?;
    builds.sort_by_key(|b| (b.waiting_on > 0, -b.effective_priority, b.id));
    let mut out = Vec::with_capacity(builds.len());
    for build in builds {
        let unbuildable = match a.ds.derivation(&build.drv)? {
            Some(r) => unbuildable_among(a, &agents, &r),
            None => None,
        };
        out.push(Queued { build, unbuildable });
    }
    Ok(out)
}

fn running_builds(a: &Inner, limit: usize) -> Result<Vec<Running>, ApiError> {
    let mut out = Vec::new();
    for build in list(a, &[BuildState::Allocated], limit)? {
        let tail = live_log::tail(a, &build, TAIL_BYTES)?;
        out.push(Running {
            tail: String::from_utf8_lossy(&tail.bytes).into_owned(),
            build,
        });
    }
    Ok(out)
}

/// Finished builds, the latest to finish first.
fn results(a: &Inner, limit: usize) -> Result<Vec<BuildRecord>, ApiError> {
    let states = [
        BuildState::Succeeded,
        BuildState::Failed,
        BuildState::Canceled,
    ];
    let mut builds = list(a, &states, limit)?;
    builds.sort_by_key(|b| std::cmp::Reverse((b.finished_at, b.id)));
    Ok(builds)
}

async fn overview(State(app): State<App>) -> Result<Response, ApiError> {
    let body = blocking(&app, |a| {
        let t = now();
        Ok([
            page::running(&running_builds(a, 20)?, t),
            page::queue(&queued(a, 20)?, t),
            page::recent(&results(a, 20)?, t),
            page::agents(&a.ds.agents()?, t),
        ]
        .concat())
    })
    .await?;
    Ok(view("/", "Overview", body))
}

async fn queue(State(app): State<App>) -> Result<Response, ApiError> {
    let body = blocking(&app, |a| Ok(page::queue(&queued(a, LIST_LIMIT)?, now()))).await?;
    Ok(view("/ui/queue", "Queue", body))
}

async fn running(State(app): State<App>) -> Result<Response, ApiError> {
    let body = blocking(&app, |a| {
        Ok(page::running(&running_builds(a, LIST_LIMIT)?, now()))
    })
    .await?;
    Ok(view("/ui/running", "Running", body))
}

async fn recent(State(app): State<App>) -> Result<Response, ApiError> {
    let body = blocking(&app, |a| Ok(page::recent(&results(a, LIST_LIMIT)?, now()))).await?;
    Ok(view("/ui/recent", "Recent results", body))
}

async fn agents(State(app): State<App>) -> Result<Response, ApiError> {
    let body = blocking(&app, |a| Ok(page::agents(&a.ds.agents()?, now()))).await?;
    Ok(view("/ui/agents", "Agents", body))
}

fn build_id(s: &str) -> Result<BuildId, ApiError> {
    s.parse()
        .map_err(|e: crate::coordinator::model::ModelError| ApiError::bad_request(e.to_string()))
}

async fn build(State(app): State<App>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    let body = blocking(&app, move |a| {
        let b = a.ds.build(id)?;
        let dependencies = a.ds.dependencies(id)?;
        let record = a.ds.derivation(&b.drv)?;
        let unbuildable = match &record {
            Some(r) if b.state.is_active() => unbuildable_among(a, &a.ds.agents()?, r),
            _ => None,
        };
        let tail = live_log::tail(a, &b, PAGE_LOG_BYTES)?;
        let log = String::from_utf8_lossy(&tail.bytes).into_owned();
        let outputs = record.map(|r| r.outputs).unwrap_or_default();
        Ok(page::build(
            &page::BuildPage {
                build: &b,
                dependencies: &dependencies,
                outputs: &outputs,
                unbuildable: unbuildable.as_deref(),
                log: &log,
                log_from: tail.next - tail.bytes.len() as u64,
                next: tail.next,
                complete: tail.complete,
            },
            now(),
        ))
    })
    .await?;
    let n = nonce();
    let title = format!("Build {id}");
    let page = page::layout(&title, Some(""), &n, None, &body, Some(page::FOLLOW_LOG));
    Ok(html(StatusCode::OK, &n, page))
}

async fn build_log(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    log_answer(&app, id, q.offset.unwrap_or(0)).await
}

async fn login_form() -> Response {
    let n = nonce();
    html(
        StatusCode::OK,
        &n,
        page::layout("Log in", None, &n, None, &page::login(None), None),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// Opens a session for a valid client token. Its token is checked again
/// on every request, so the token's expiry or revocation ends it too.
async fn open_session(app: &App, token_hash: [u8; 32]) -> Result<Result<String, String>, ApiError> {
    let t = now();
    let principal = blocking(app, move |a| Ok(a.ds.token_lookup(&token_hash, t)?)).await?;
    match principal {
        Some(Principal::Client { .. }) => Ok(Ok(app.sessions.open(
            token_hash,
            t + session::SESSION_SECS,
            t,
        ))),
        Some(Principal::Agent { .. }) => Ok(Err(
            "this is an agent's token; the page needs a client token (read, submit or admin)"
                .to_owned(),
        )),
        None => Ok(Err("unknown, revoked or expired token".to_owned())),
    }
}

/// The cookie of a new session, and where to go.
fn logged_in(app: &App, id: &str, to: &str) -> Response {
    let cookie = session::set_cookie(id, session::SESSION_SECS, app.sessions.secure);
    redirect(to, Some(cookie))
}

async fn login(State(app): State<App>, Form(form): Form<LoginForm>) -> Result<Response, ApiError> {
    match open_session(&app, hash_token(&form.token)).await? {
        Ok(id) => Ok(logged_in(&app, &id, "/")),
        Err(why) => {
            let n = nonce();
            let page = page::layout("Log in", None, &n, None, &page::login(Some(&why)), None);
            Ok(html(StatusCode::UNAUTHORIZED, &n, page))
        }
    }
}

async fn logout(State(app): State<App>, headers: HeaderMap) -> Response {
    for v in headers.get_all(header::COOKIE) {
        if let Some(id) = v.to_str().ok().and_then(session::from_cookies) {
            app.sessions.close(id);
        }
    }
    redirect("/login", Some(session::clear_cookie(app.sessions.secure)))
}

#[derive(Deserialize)]
struct AfterLogin {
    /// The page to show once logged in (one of this page's own).
    next: Option<String>,
}

/// Whether `to` is a page of this web page (`/` or `/ui/…` with plain
/// characters), so that a login code's `next` cannot send a browser
/// elsewhere.
fn is_own_page(to: &str) -> bool {
    to == "/"
        || to.strip_prefix("/ui/").is_some_and(|rest| {
            rest.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'?' | b'=' | b'&')
            }) && !rest.contains("//")
        })
}

async fn session_from_code(
    State(app): State<App>,
    Path(code): Path<String>,
    Query(next): Query<AfterLogin>,
) -> Result<Response, ApiError> {
    let Some(token_hash) = app.sessions.take_code(&code, now()) else {
        return Ok(redirect("/login", None));
    };
    match open_session(&app, token_hash).await? {
        Ok(id) => {
            let to = next.next.filter(|n| is_own_page(n));
            Ok(logged_in(&app, &id, to.as_deref().unwrap_or("/")))
        }
        Err(_) => Ok(redirect("/login", None)),
    }
}

async fn new_login_code(
    State(app): State<App>,
    _: ReadToken,
    headers: HeaderMap,
) -> Result<Json<UiLoginCode>, ApiError> {
    // The guard checked this token; the code stands for it.
    let token = presented(&headers)
        .ok_or_else(|| ApiError::bad_request("a login code needs an Authorization header"))?;
    let code = app.sessions.new_code(hash_token(&token), now());
    Ok(Json(UiLoginCode {
        path: format!("/ui/session/{code}"),
        code,
        expires_in: session::CODE_SECS,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_code_leads_only_to_this_page() {
        for ok in ["/", "/ui/queue", "/ui/builds/12", "/ui/x?a=b&c=d"] {
            assert!(is_own_page(ok), "{ok}");
        }
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/ui//evil.example",
            "/login",
            "/ui/a#b",
            "/ui/a b",
            "/ui/../client/v1/tokens",
        ] {
            assert!(!is_own_page(bad), "{bad}");
        }
    }
}
