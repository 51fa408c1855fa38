//! The client API (`/client/v1/…`): uploads of `.drv` files and sources,
//! submissions, builds, agents and tokens. Roles: `read` for queries,
//! `submit` for uploads and changes to builds, `admin` for agents and
//! tokens.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::auth::{hash_token, new_token};
use super::live_log;
use super::uploads::{append_body, offset_answer, requested_offset};
use super::{blocking, build_id, now, AdminToken, ApiError, App, Inner, ReadToken, SubmitToken};
use crate::coordinator::api::{
    AgentList, BuildDetail, BuildList, Canceled, FinishUpload, IssuedToken, NewAgent, NewToken,
    Paths, SetPriority, Submit, SubmitAnswer, TokenList, UploadKind, LOG_COMPLETE,
};
use crate::coordinator::cache::{Claim, ClaimKind, UploadId};
use crate::coordinator::datastore::BuildFilter;
use crate::coordinator::model::{agent_can_build, AgentId, BuildId, BuildState, Principal};
use crate::store::{Hash, StorePath};

pub(super) fn router() -> Router<App> {
    Router::new()
        .route("/client/v1/info", get(info))
        .route("/client/v1/missing", post(missing))
        .route(
            "/client/v1/uploads/{name}",
            put(put_upload).head(head_upload),
        )
        .route("/client/v1/uploads/{name}/finish", post(finish_upload))
        .route("/client/v1/builds", post(submit).get(list_builds))
        .route("/client/v1/builds/{id}", get(show_build))
        .route("/client/v1/builds/{id}/log", get(build_log))
        .route("/client/v1/builds/{id}/cancel", post(cancel))
        .route("/client/v1/builds/{id}/priority", post(set_priority))
        .route("/client/v1/agents", get(list_agents).post(new_agent))
        .route("/client/v1/agents/{id}/token", post(agent_token))
        .route("/client/v1/agents/{id}/disable", post(disable_agent))
        .route("/client/v1/agents/{id}/enable", post(enable_agent))
        .route("/client/v1/tokens", get(list_tokens).post(new_client_token))
        .route("/client/v1/tokens/{id}/revoke", post(revoke_token))
}

async fn info(State(app): State<App>, _: ReadToken) -> Result<Response, ApiError> {
    Ok(Json(app.info.clone()).into_response())
}

async fn missing(
    State(app): State<App>,
    _: ReadToken,
    Json(paths): Json<Paths>,
) -> Result<Json<Paths>, ApiError> {
    if paths.paths.len() > 1_000_000 {
        return Err(ApiError::bad_request("at most 1,000,000 paths per request"));
    }
    blocking(&app, move |a| {
        for p in &paths.paths {
            parse_full(a, p)?;
        }
        let missing = a.ds.cache_missing(&paths.paths)?;
        Ok(Json(Paths {
            paths: missing.into_iter().collect(),
        }))
    })
    .await
}

fn parse_full(a: &Inner, p: &str) -> Result<StorePath, ApiError> {
    a.store_dir
        .parse_path(p)
        .map_err(|e| ApiError::bad_request(format!("'{p}': {e}")))
}

/// A store path from its base name in a URL.
fn path_of_name(a: &Inner, name: &str) -> Result<StorePath, ApiError> {
    parse_full(a, &format!("{}/{name}", a.store_dir.as_str()))
}

fn upload_of(path: &StorePath) -> Result<UploadId, ApiError> {
    UploadId::new(&format!("p-{}", path.hash_part()))
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn head_upload(
    State(app): State<App>,
    _: SubmitToken,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let offset = blocking(&app, move |a| {
        let path = path_of_name(a, &name)?;
        Ok(a.cache.upload_offset(&upload_of(&path)?)?)
    })
    .await?;
    Ok(offset_answer(StatusCode::OK, offset))
}

async fn put_upload(
    State(app): State<App>,
    _: SubmitToken,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let offset = requested_offset(&headers)?;
    let id = blocking(&app, move |a| upload_of(&path_of_name(a, &name)?)).await?;
    append_body(&app, id, offset, body).await
}

/// Checks an uploaded `.drv` or source and moves it into the cache. Its
/// references must be in the cache already (clients upload in
/// dependency order), so the cache never holds a path without its closure.
async fn finish_upload(
    State(app): State<App>,
    _: SubmitToken,
    Path(name): Path<String>,
    Json(claim): Json<FinishUpload>,
) -> Result<StatusCode, ApiError> {
    blocking(&app, move |a| {
        let path = path_of_name(a, &name)?;
        let full = a.store_dir.display(&path);
        let id = upload_of(&path)?;
        if a.ds.cache_get(&full)?.is_some() {
            a.cache.discard(&id)?;
            return Ok(StatusCode::NO_CONTENT);
        }
        let mut candidates = BTreeSet::new();
        let mut wanted = Vec::new();
        for r in &claim.references {
            let rp = parse_full(a, r)?;
            if rp != path {
                wanted.push(r.clone());
            }
            candidates.insert(rp);
        }
        let missing = a.ds.cache_missing(&wanted)?;
        if let Some(m) = missing.first() {
            return Err(ApiError::unprocessable(format!(
                "'{full}' refers to '{m}', which is not in the cache: upload it first"
            )));
        }
        let nar_hash = Hash::parse_any_prefixed(&claim.nar_hash)
            .map_err(|e| ApiError::unprocessable(format!("'{full}': {e}")))?;
        let kind = match claim.kind {
            UploadKind::Derivation if path.is_derivation() => ClaimKind::Derivation,
            UploadKind::Derivation => {
                return Err(ApiError::unprocessable(format!(
                    "'{full}' is not a .drv path"
                )))
            }
            UploadKind::Source => ClaimKind::Source,
        };
        let accepted = a.cache.finish(
            &id,
            &Claim {
                path: path.clone(),
                kind,
                candidates,
                nar_hash: Some(nar_hash),
                nar_size: Some(claim.nar_size),
                deriver: None,
            },
        )?;
        if let Some(drv) = accepted.drv {
            a.ds.put_derivations(&[drv])?;
        }
        a.ds.cache_add(&[accepted.cached])?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn submit(
    State(app): State<App>,
    _: SubmitToken,
    Json(submit): Json<Submit>,
) -> Result<Json<SubmitAnswer>, ApiError> {
    blocking(&app, move |a| {
        for b in &submit.builds {
            let p = parse_full(a, &b.drv)?;
            if !p.is_derivation() {
                return Err(ApiError::bad_request(format!(
                    "'{}' is not a .drv path",
                    b.drv
                )));
            }
        }
        let builds = a.ds.submit(&submit.builds, now())?;
        a.wake();
        for s in builds.iter().filter(|s| s.created) {
            tracing::info!(build = %s.id, drv = %s.drv, "submitted");
        }
        Ok(Json(SubmitAnswer { builds }))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    /// Comma-separated states.
    state: Option<String>,
    /// `key=value`.
    tag: Option<String>,
    drv: Option<String>,
    limit: Option<usize>,
}

async fn list_builds(
    State(app): State<App>,
    _: ReadToken,
    Query(q): Query<ListQuery>,
) -> Result<Json<BuildList>, ApiError> {
    let mut filter = BuildFilter {
        limit: q.limit.unwrap_or(1000).min(100_000),
        drv: q.drv,
        ..BuildFilter::default()
    };
    for s in q
        .state
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let state: BuildState = s
            .parse()
            .map_err(|e: crate::coordinator::model::ModelError| {
                ApiError::bad_request(e.to_string())
            })?;
        filter.states.insert(state);
    }
    if let Some(tag) = q.tag {
        let (k, v) = tag
            .split_once('=')
            .ok_or_else(|| ApiError::bad_request(format!("tag '{tag}' is not KEY=VALUE")))?;
        filter.tag = Some((k.to_owned(), v.to_owned()));
    }
    blocking(&app, move |a| {
        Ok(Json(BuildList {
            builds: a.ds.builds(&filter)?,
        }))
    })
    .await
}

async fn show_build(
    State(app): State<App>,
    _: ReadToken,
    Path(id): Path<String>,
) -> Result<Json<BuildDetail>, ApiError> {
    let id = build_id(&id)?;
    blocking(&app, move |a| {
        let build = a.ds.build(id)?;
        let dependencies = a.ds.dependencies(id)?;
        let record = a.ds.derivation(&build.drv)?;
        let unbuildable = match &record {
            Some(r) if build.state.is_active() => unbuildable(a, r)?,
            _ => None,
        };
        Ok(Json(BuildDetail {
            outputs: record.map(|r| r.outputs).unwrap_or_default(),
            build,
            dependencies,
            unbuildable,
        }))
    })
    .await
}

#[derive(Debug, Deserialize)]
pub(super) struct LogQuery {
    /// Where to start (0 when absent).
    pub(super) offset: Option<u64>,
}

/// The bytes of a build's log from `offset` (the live log while the build
/// runs): `Upload-Offset` says where the next request starts,
/// `Log-Complete` (`true`/`false`) whether more will come.
async fn build_log(
    State(app): State<App>,
    _: ReadToken,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    log_answer(&app, id, q.offset.unwrap_or(0)).await
}

/// A log part as an answer (for the client API and the web page).
pub(super) async fn log_answer(app: &App, id: BuildId, offset: u64) -> Result<Response, ApiError> {
    let part = blocking(app, move |a| {
        let build = a.ds.build(id)?;
        live_log::read(a, &build, offset, live_log::MAX_PART)
    })
    .await?;
    let mut r = offset_answer(StatusCode::OK, part.next);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Same-origin with the web page: never to be taken for HTML.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h.insert(
        LOG_COMPLETE,
        HeaderValue::from_static(if part.complete { "true" } else { "false" }),
    );
    *r.body_mut() = Body::from(part.bytes);
    Ok(r)
}

/// Why no enabled agent can do this derivation, if none can: the same
/// rule as allocation (a system it offers, or `builtin`; every required
/// feature among its features).
fn unbuildable(
    a: &Inner,
    drv: &crate::coordinator::model::DrvRecord,
) -> Result<Option<String>, ApiError> {
    Ok(unbuildable_among(a, &a.ds.agents()?, drv))
}

/// [`unbuildable`] among `agents`, by the allocation's own rule
/// ([`agent_can_build`]), with the mandatory features agents last told.
pub(super) fn unbuildable_among(
    a: &Inner,
    agents: &[crate::coordinator::model::AgentRecord],
    drv: &crate::coordinator::model::DrvRecord,
) -> Option<String> {
    let mandatory = a.mandatory.lock().ok();
    let none = BTreeSet::new();
    let able = agents.iter().filter(|ag| ag.enabled).any(|ag| {
        let m = mandatory
            .as_ref()
            .and_then(|m| m.get(&ag.id))
            .unwrap_or(&none);
        agent_can_build(
            &ag.systems,
            &ag.features,
            m,
            &drv.system,
            &drv.required_features,
        )
    });
    if able {
        return None;
    }
    let features = if drv.required_features.is_empty() {
        String::new()
    } else {
        let f: Vec<&str> = drv.required_features.iter().map(String::as_str).collect();
        format!(" with features {}", f.join(", "))
    };
    Some(format!(
        "no enabled agent builds {}{features} (agents tell their systems and features when they ask for work)",
        drv.system
    ))
}

async fn cancel(
    State(app): State<App>,
    _: SubmitToken,
    Path(id): Path<String>,
) -> Result<Json<Canceled>, ApiError> {
    let id = build_id(&id)?;
    blocking(&app, move |a| {
        let canceled = a.ds.cancel(id, now())?;
        a.wake();
        Ok(Json(Canceled { canceled }))
    })
    .await
}

async fn set_priority(
    State(app): State<App>,
    _: SubmitToken,
    Path(id): Path<String>,
    Json(p): Json<SetPriority>,
) -> Result<Json<crate::coordinator::model::BuildRecord>, ApiError> {
    let id = build_id(&id)?;
    blocking(&app, move |a| Ok(Json(a.ds.set_priority(id, p.priority)?))).await
}

async fn list_agents(State(app): State<App>, _: ReadToken) -> Result<Json<AgentList>, ApiError> {
    blocking(&app, move |a| {
        Ok(Json(AgentList {
            agents: a.ds.agents()?,
        }))
    })
    .await
}

fn agent_id(s: &str) -> Result<AgentId, ApiError> {
    AgentId::new(s).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn expiry(expires_in: Option<i64>) -> Result<Option<i64>, ApiError> {
    match expires_in {
        Some(s) if s <= 0 => Err(ApiError::bad_request(
            "expires_in must be positive (seconds)",
        )),
        Some(s) => Ok(Some(now().saturating_add(s))),
        None => Ok(None),
    }
}

/// Makes a token for `principal` and stores its hash.
pub(crate) fn issue(
    a: &Inner,
    principal: &Principal,
    expires_at: Option<i64>,
) -> Result<IssuedToken, ApiError> {
    let token = new_token();
    let id =
        a.ds.token_add(&hash_token(&token), principal, expires_at, now())?;
    Ok(IssuedToken { id, token })
}

async fn new_agent(
    State(app): State<App>,
    _: AdminToken,
    Json(req): Json<NewAgent>,
) -> Result<Json<IssuedToken>, ApiError> {
    let agent = agent_id(&req.id)?;
    let expires_at = expiry(req.expires_in)?;
    blocking(&app, move |a| {
        a.ds.agent_new(&agent, now())?;
        tracing::info!(agent = %agent, "agent created");
        Ok(Json(issue(a, &Principal::Agent { agent }, expires_at)?))
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
struct ExpiresIn {
    expires_in: Option<i64>,
}

async fn agent_token(
    State(app): State<App>,
    _: AdminToken,
    Path(id): Path<String>,
    body: Option<Json<ExpiresIn>>,
) -> Result<Json<IssuedToken>, ApiError> {
    let agent = agent_id(&id)?;
    let expires_at = expiry(body.map(|b| b.0).unwrap_or_default().expires_in)?;
    blocking(&app, move |a| {
        if !a.ds.agents()?.iter().any(|r| r.id == agent) {
            return Err(crate::coordinator::datastore::DatastoreError::NoAgent(agent).into());
        }
        Ok(Json(issue(a, &Principal::Agent { agent }, expires_at)?))
    })
    .await
}

async fn disable_agent(
    State(app): State<App>,
    _: AdminToken,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_enabled(app, id, false).await
}

async fn enable_agent(
    State(app): State<App>,
    _: AdminToken,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_enabled(app, id, true).await
}

async fn set_enabled(app: App, id: String, enabled: bool) -> Result<StatusCode, ApiError> {
    let agent = agent_id(&id)?;
    blocking(&app, move |a| {
        a.ds.agent_set_enabled(&agent, enabled)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn list_tokens(State(app): State<App>, _: AdminToken) -> Result<Json<TokenList>, ApiError> {
    blocking(&app, move |a| {
        Ok(Json(TokenList {
            tokens: a.ds.tokens()?,
        }))
    })
    .await
}

async fn new_client_token(
    State(app): State<App>,
    _: AdminToken,
    Json(req): Json<NewToken>,
) -> Result<Json<IssuedToken>, ApiError> {
    let expires_at = expiry(req.expires_in)?;
    blocking(&app, move |a| {
        Ok(Json(issue(
            a,
            &Principal::Client { role: req.role },
            expires_at,
        )?))
    })
    .await
}

async fn revoke_token(
    State(app): State<App>,
    _: AdminToken,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&app, move |a| {
        a.ds.token_revoke(&id)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
