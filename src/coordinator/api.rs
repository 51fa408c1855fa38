//! The JSON bodies of the agent and client APIs, shared by the server and
//! the client so that both ends agree by construction. Paths are below
//! `/agent/v1`, `/client/v1` and `/cache` (see the README's coordinator
//! section for the list).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::model::{
    AgentOffer, AgentRecord, BuildId, BuildRecord, DrvRecord, NewBuild, Role, Setback, Submitted,
    TokenRecord,
};

/// The header that carries an upload's offset (as tus's `Upload-Offset`):
/// in a `HEAD` answer, how many bytes the coordinator holds; on a `PUT`,
/// where the body starts.
pub const UPLOAD_OFFSET: &str = "upload-offset";

/// The header of a log answer (`GET /client/v1/builds/{id}/log`) that says
/// whether the log is whole (`true`) or may still grow (`false`); its
/// `Upload-Offset` says where the next request starts.
pub const LOG_COMPLETE: &str = "log-complete";

/// A build leased to an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: BuildId,
    pub drv: DrvRecord,
    /// The paths the build reads: its input sources and the outputs it uses
    /// of its input derivations (their closures come with them from the
    /// cache).
    pub inputs: BTreeSet<String>,
    pub lease_deadline: i64,
}

/// `POST /agent/v1/allocate`.
pub type AllocateRequest = AgentOffer;

/// Builds leased (`POST /agent/v1/allocate`, `GET /agent/v1/leases`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jobs {
    pub jobs: Vec<Job>,
}

/// `POST /agent/v1/heartbeat`: the builds the agent runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub builds: Vec<BuildId>,
}

/// The answer to a heartbeat: builds no longer leased to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub lost: Vec<BuildId>,
    /// Seconds a lease lasts without a heartbeat.
    pub lease_secs: i64,
}

/// What an agent claims of an uploaded output (checked on arrival).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputClaim {
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
}

/// `POST /agent/v1/builds/{id}/result`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum BuildResult {
    /// Built; each output uploaded to `…/outputs/{name}`.
    Success {
        outputs: BTreeMap<String, OutputClaim>,
    },
    /// No result.
    Setback { setback: Setback },
}

/// `POST /client/v1/missing`, `POST /agent/v1/missing`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paths {
    pub paths: Vec<String>,
}

/// What kind of path a client uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadKind {
    /// A `.drv` file.
    Derivation,
    /// An input source (content-addressed).
    Source,
}

/// `POST /client/v1/uploads/{base name}/finish`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishUpload {
    pub kind: UploadKind,
    pub references: BTreeSet<String>,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
}

/// `POST /client/v1/builds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submit {
    pub builds: Vec<NewBuild>,
}

/// The answer to a submission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitAnswer {
    pub builds: Vec<Submitted>,
}

/// `GET /client/v1/builds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildList {
    pub builds: Vec<BuildRecord>,
}

/// `GET /client/v1/builds/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub build: BuildRecord,
    /// Active builds it waits for.
    pub dependencies: Vec<BuildId>,
    /// Why no agent takes it, when none can ("no enabled agent builds
    /// aarch64-linux"), instead of a silent wait.
    pub unbuildable: Option<String>,
    /// Output name to path.
    pub outputs: BTreeMap<String, String>,
}

/// `POST /client/v1/builds/{id}/priority`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPriority {
    pub priority: i64,
}

/// Canceled builds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canceled {
    pub canceled: Vec<BuildId>,
}

/// `GET /client/v1/agents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentRecord>,
}

/// `POST /client/v1/agents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAgent {
    pub id: String,
    /// Seconds the first token lives (for ever when absent).
    pub expires_in: Option<i64>,
}

/// `POST /client/v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    pub role: Role,
    pub expires_in: Option<i64>,
}

/// A token just made: the secret, shown once, and its public id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    pub id: String,
    pub token: String,
}

/// `GET /client/v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenRecord>,
}

/// `POST /client/v1/ui-login-codes`: a one-time code that gives a browser
/// a session of the web page (for scripts that open the page for a user).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UiLoginCode {
    pub code: String,
    /// Where a browser opens it, below the client API's URL
    /// (`/ui/session/<code>`).
    pub path: String,
    /// Seconds it can be used in, once.
    pub expires_in: i64,
}

/// Every error answer: `{"error": "one line"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /client/v1/info` and `/agent/v1/info`: what a client needs to
/// know of the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub store_dir: String,
    /// The key that signs the cache (`name:base64`).
    pub public_key: String,
    pub lease_secs: i64,
    pub max_upload_bytes: u64,
}
