//! The agent API (`/agent/v1/…`): leases, heartbeats, uploads, results.
//!
//! An agent may touch only builds leased to it: an upload or a result for
//! a build whose lease expired (or that was canceled) is refused with 409,
//! so a partitioned agent that comes back cannot overwrite what another
//! agent did meanwhile.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::live_log;
use super::uploads::{append_body, offset_answer, requested_offset};
use super::{blocking, build_id, now, AgentToken, ApiError, App, Inner};
use crate::coordinator::api::{BuildResult, Heartbeat, HeartbeatAnswer, Job, Jobs, OutputClaim};
use crate::coordinator::cache::{Claim, ClaimKind, FixedOutput, UploadId};
use crate::coordinator::datastore::{Allocation, DatastoreError};
use crate::coordinator::model::{AgentId, AgentOffer, BuildId, BuildState, CachedPath, Setback};
use crate::derivation::check::MAX_DRV_SIZE;
use crate::derivation::{Derivation, DerivationOutput};
use crate::store::{Hash, StorePath};

pub(super) fn router() -> Router<App> {
    Router::new()
        .route("/agent/v1/info", get(info))
        .route("/agent/v1/allocate", post(allocate))
        .route("/agent/v1/leases", get(leases))
        .route("/agent/v1/heartbeat", post(heartbeat))
        .route("/agent/v1/builds/{id}/start", post(start))
        .route("/agent/v1/builds/{id}/drv", get(drv_file))
        .route(
            "/agent/v1/builds/{id}/outputs/{output}",
            put(put_output).head(head_output),
        )
        .route("/agent/v1/builds/{id}/log", put(put_log).post(append_log))
        .route("/agent/v1/builds/{id}/result", post(result))
}

async fn info(State(app): State<App>, _: AgentToken) -> Result<Response, ApiError> {
    Ok(Json(app.info.clone()).into_response())
}

async fn allocate(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Json(offer): Json<AgentOffer>,
) -> Result<Json<Jobs>, ApiError> {
    if offer.free_slots < 0 || offer.max_parallel_builds < 0 {
        return Err(ApiError::bad_request(
            "free_slots and max_parallel_builds must be >= 0",
        ));
    }
    blocking(&app, move |a| {
        if let Ok(mut m) = a.mandatory.lock() {
            if offer.mandatory_features.is_empty() {
                m.remove(&agent);
            } else {
                m.insert(agent.clone(), offer.mandatory_features.clone());
            }
        }
        let allocated = a.ds.allocate(&agent, &offer, a.lease_secs, now())?;
        let mut jobs = Vec::with_capacity(allocated.len());
        for alloc in allocated {
            if let Some(job) = checked_job(a, &agent, alloc)? {
                jobs.push(job);
            }
        }
        Ok(Json(Jobs { jobs }))
    })
    .await
}

/// The job for an allocation, after checking that its inputs are all in
/// the cache (the datastore hands out only such builds; this catches a
/// cache that lost files). A build whose inputs are missing goes back to
/// the queue as an infrastructure failure.
fn checked_job(a: &Inner, agent: &AgentId, alloc: Allocation) -> Result<Option<Job>, ApiError> {
    let inputs = job_inputs(a, &alloc)?;
    let wanted: Vec<String> = inputs.iter().cloned().collect();
    let missing = a.ds.cache_missing(&wanted)?;
    if !missing.is_empty() {
        let list: Vec<&str> = missing.iter().map(String::as_str).take(3).collect();
        let message = format!("inputs missing from the cache: {}", list.join(", "));
        tracing::error!(build = %alloc.id, "{message}");
        a.ds.setback(agent, alloc.id, &Setback::MissingInputs { message }, now())?;
        a.wake();
        return Ok(None);
    }
    Ok(Some(Job {
        id: alloc.id,
        drv: alloc.drv,
        inputs,
        lease_deadline: alloc.lease_deadline,
    }))
}

/// Input sources and the used outputs of input derivations.
fn job_inputs(a: &Inner, alloc: &Allocation) -> Result<BTreeSet<String>, ApiError> {
    let mut inputs = alloc.drv.input_srcs.clone();
    for (drv, outputs) in &alloc.drv.input_drvs {
        let record =
            a.ds.derivation(drv)?
                .ok_or_else(|| DatastoreError::NoDerivation(drv.clone()))?;
        for o in outputs {
            let path = record.outputs.get(o).ok_or_else(|| {
                ApiError::internal(format!("derivation '{drv}' has no output '{o}'"))
            })?;
            inputs.insert(path.clone());
        }
    }
    Ok(inputs)
}

async fn leases(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
) -> Result<Json<Jobs>, ApiError> {
    blocking(&app, move |a| {
        let mut jobs = Vec::new();
        for alloc in a.ds.leases(&agent)? {
            if let Some(job) = checked_job(a, &agent, alloc)? {
                jobs.push(job);
            }
        }
        Ok(Json(Jobs { jobs }))
    })
    .await
}

async fn heartbeat(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Json(beat): Json<Heartbeat>,
) -> Result<Json<HeartbeatAnswer>, ApiError> {
    blocking(&app, move |a| {
        let lost = a.ds.heartbeat(&agent, &beat.builds, a.lease_secs, now())?;
        Ok(Json(HeartbeatAnswer {
            lost,
            lease_secs: a.lease_secs,
        }))
    })
    .await
}

/// That `id` is leased to `agent` now; 409 otherwise.
fn leased(
    a: &Inner,
    agent: &AgentId,
    id: BuildId,
) -> Result<crate::coordinator::model::BuildRecord, ApiError> {
    let b = a.ds.build(id)?;
    if b.state != BuildState::Allocated || b.agent.as_ref() != Some(agent) {
        return Err(DatastoreError::NotLeased {
            id,
            agent: agent.clone(),
        }
        .into());
    }
    Ok(b)
}

async fn start(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = build_id(&id)?;
    blocking(&app, move |a| {
        a.ds.start(&agent, id, now())?;
        a.wake();
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// The `.drv` file of a build leased to the agent, as the client uploaded
/// and the coordinator checked it.
async fn drv_file(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    let bytes = blocking(&app, move |a| {
        let b = leased(a, &agent, id)?;
        let drv = a
            .store_dir
            .parse_path(&b.drv)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        read_drv(a, &drv)
    })
    .await?;
    Ok(bytes.into_response())
}

fn output_upload(id: BuildId, output: &str) -> Result<UploadId, ApiError> {
    UploadId::new(&format!("b{id}-{output}")).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn head_output(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Path((id, output)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    let upload = output_upload(id, &output)?;
    let offset = blocking(&app, move |a| {
        leased(a, &agent, id)?;
        Ok(a.cache.upload_offset(&upload)?)
    })
    .await?;
    Ok(offset_answer(StatusCode::OK, offset))
}

async fn put_output(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    headers: HeaderMap,
    Path((id, output)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    let upload = output_upload(id, &output)?;
    let offset = requested_offset(&headers)?;
    blocking(&app, move |a| leased(a, &agent, id).map(drop)).await?;
    append_body(&app, upload, offset, body).await
}

async fn put_log(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let id = build_id(&id)?;
    let drv = blocking(&app, move |a| {
        let b = leased(a, &agent, id)?;
        a.store_dir
            .parse_path(&b.drv)
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    super::uploads::write_log(&app, drv, body).await?;
    // The whole log replaces the live one.
    blocking(&app, move |a| {
        Ok(a.cache.discard(&live_log::upload_id(id))?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Appends the new part of a running build's log at `Upload-Offset`; an
/// offset of 0 starts the live log afresh (a new attempt of the build).
async fn append_log(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = build_id(&id)?;
    let offset = requested_offset(&headers)?;
    let upload = live_log::upload_id(id);
    let fresh = upload.clone();
    blocking(&app, move |a| {
        leased(a, &agent, id)?;
        if offset == 0 {
            a.cache.discard(&fresh)?;
        }
        Ok(())
    })
    .await?;
    append_body(&app, upload, offset, body).await
}

async fn result(
    State(app): State<App>,
    AgentToken(agent): AgentToken,
    Path(id): Path<String>,
    Json(result): Json<BuildResult>,
) -> Result<StatusCode, ApiError> {
    let id = build_id(&id)?;
    blocking(&app, move |a| match result {
        BuildResult::Setback { setback } => {
            leased(a, &agent, id)?;
            // Missing inputs are the coordinator's own finding; from an
            // agent they are an infrastructure failure like any other.
            let setback = match setback {
                Setback::MissingInputs { message } => Setback::Infrastructure { message },
                other => other,
            };
            let b = a.ds.setback(&agent, id, &setback, now())?;
            a.wake();
            tracing::info!(build = %id, agent = %agent, state = b.state.as_str(), "setback: {setback:?}");
            Ok(StatusCode::NO_CONTENT)
        }
        BuildResult::Success { outputs } => match accept_outputs(a, &agent, id, &outputs) {
            Ok(cached) => {
                a.ds.succeed(&agent, id, &cached, now())?;
                a.wake();
                tracing::info!(build = %id, agent = %agent, "succeeded");
                Ok(StatusCode::NO_CONTENT)
            }
            Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
                // The agent sent outputs that are not what it claims: not
                // the derivation's fault, and maybe not the next agent's.
                let message = format!("outputs from agent '{agent}' refused: {}", e.message);
                tracing::warn!(build = %id, "{message}");
                a.ds.setback(&agent, id, &Setback::Infrastructure { message }, now())?;
                a.wake();
                Err(e)
            }
            Err(e) => Err(e),
        },
    })
    .await
}

/// Checks every uploaded output of build `id` against its derivation and
/// the agent's claims, and moves it into the cache.
fn accept_outputs(
    a: &Inner,
    agent: &AgentId,
    id: BuildId,
    claims: &BTreeMap<String, OutputClaim>,
) -> Result<Vec<CachedPath>, ApiError> {
    let b = leased(a, agent, id)?;
    let record =
        a.ds.derivation(&b.drv)?
            .ok_or_else(|| DatastoreError::NoDerivation(b.drv.clone()))?;
    let dir = &a.store_dir;
    let parse = |p: &str| {
        dir.parse_path(p)
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    let drv_path = parse(&b.drv)?;
    let drv = Derivation::from_aterm(&read_drv(a, &drv_path)?, dir)
        .map_err(|e| ApiError::internal(format!("'{}': {e}", b.drv)))?;
    for name in claims.keys() {
        if !record.outputs.contains_key(name) {
            return Err(ApiError::unprocessable(format!(
                "'{}' has no output '{name}'",
                b.drv
            )));
        }
    }
    // What the outputs may refer to: the input closure and the outputs.
    let alloc = Allocation {
        id,
        drv: record.clone(),
        lease_deadline: 0,
    };
    let mut candidates = BTreeSet::new();
    for p in closure_in_cache(a, job_inputs(a, &alloc)?)? {
        candidates.insert(parse(&p)?);
    }
    for p in record.outputs.values() {
        candidates.insert(parse(p)?);
    }
    let mut cached = Vec::new();
    for (name, path) in &record.outputs {
        let claim = claims.get(name).ok_or_else(|| {
            ApiError::unprocessable(format!("no result for output '{name}' of '{}'", b.drv))
        })?;
        let nar_hash = Hash::parse_any_prefixed(&claim.nar_hash)
            .map_err(|e| ApiError::unprocessable(format!("output '{name}': {e}")))?;
        let claim = Claim {
            path: parse(path)?,
            kind: output_kind(&drv, name),
            candidates: candidates.clone(),
            nar_hash: Some(nar_hash),
            nar_size: Some(claim.nar_size),
            deriver: Some(drv_path.clone()),
        };
        let accepted = a.cache.finish(&output_upload(id, name)?, &claim)?;
        cached.push(accepted.cached);
    }
    Ok(cached)
}

/// How an output is checked: a fixed output against its declared hash.
fn output_kind(drv: &Derivation, name: &str) -> ClaimKind {
    let fixed = drv.outputs.iter().find_map(|(n, o)| match o {
        DerivationOutput::CAFixed { method, hash, .. } if n.as_str() == name => Some(FixedOutput {
            method: *method,
            hash: hash.clone(),
        }),
        _ => None,
    });
    ClaimKind::Output { fixed }
}

/// The `.drv` file the coordinator kept when it accepted it.
fn read_drv(a: &Inner, drv: &StorePath) -> Result<Vec<u8>, ApiError> {
    let file = a.cache.drv_copy(drv);
    crate::bounded::read_file(&file, MAX_DRV_SIZE).map_err(|e| {
        ApiError::internal(format!(
            "the kept copy of '{}': {e}",
            a.store_dir.display(drv)
        ))
    })
}

/// The closure of `roots` through the cache's references.
pub(super) fn closure_in_cache(
    a: &Inner,
    roots: BTreeSet<String>,
) -> Result<BTreeSet<String>, ApiError> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let info =
            a.ds.cache_get(&p)?
                .ok_or_else(|| ApiError::internal(format!("'{p}' is not in the cache")))?;
        todo.extend(info.references.into_iter().filter(|r| !seen.contains(r)));
    }
    Ok(seen)
}
