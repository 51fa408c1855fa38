//! The coordinator's vocabulary: plain data shared by the datastore, the
//! cache, the server, the client and the agent. Times are seconds since the
//! Unix epoch (`i64`), as SQLite and JSON carry them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A malformed identifier, role or state name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("'{0}' is not a build id (a positive number)")]
    BuildId(String),
    #[error("'{0}' is not an agent id (1-64 letters, digits, '-', '_' or '.')")]
    AgentId(String),
    #[error("'{0}' is not a role (read, submit or admin)")]
    Role(String),
    #[error("'{0}' is not a build state")]
    State(String),
    #[error("'{0}' is not an event (build-submitted, build-started, build-success, build-failure, build-canceled, build-missing-inputs or agent-lost)")]
    EventKind(String),
}

/// A build's number, given by the datastore on submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuildId(i64);

impl BuildId {
    /// A build id from the datastore's row id (always positive).
    pub fn new(n: i64) -> Result<BuildId, ModelError> {
        if n > 0 {
            Ok(BuildId(n))
        } else {
            Err(ModelError::BuildId(n.to_string()))
        }
    }

    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl FromStr for BuildId {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<BuildId, ModelError> {
        s.parse::<i64>()
            .ok()
            .and_then(|n| BuildId::new(n).ok())
            .ok_or_else(|| ModelError::BuildId(s.to_owned()))
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An agent's name, chosen by the operator (`agents new NAME`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

impl AgentId {
    /// Checks the name: 1-64 of `[A-Za-z0-9._-]`, not starting with '.'.
    pub fn new(s: &str) -> Result<AgentId, ModelError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(AgentId(s.to_owned()))
        } else {
            Err(ModelError::AgentId(s.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AgentId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<AgentId, ModelError> {
        AgentId::new(&s)
    }
}

impl From<AgentId> for String {
    fn from(a: AgentId) -> String {
        a.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a client token may do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// List and show builds and agents, read the cache.
    Read,
    /// Also upload derivations and sources, submit, cancel and reprioritise.
    Submit,
    /// Also manage agents and tokens.
    Admin,
}

impl Role {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Role, ModelError> {
        match s {
            "read" => Ok(Role::Read),
            "submit" => Ok(Role::Submit),
            "admin" => Ok(Role::Admin),
            _ => Err(ModelError::Role(s.to_owned())),
        }
    }
}

/// Who a valid token belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Principal {
    /// An agent (agent API and the cache).
    Agent {
        /// Which.
        agent: AgentId,
    },
    /// A client with a role (client API and the cache).
    Client {
        /// What it may do.
        role: Role,
    },
}

/// Where a build is in its life. Ordered as declared (so that a
/// `BTreeSet<BuildState>`, as in the datastore's build filter, can exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildState {
    /// Waiting: for its dependencies, its `defer_until`, a retry's backoff,
    /// or an agent.
    Queued,
    /// Leased to an agent until its lease deadline.
    Allocated,
    /// Its outputs are in the cache.
    Succeeded,
    /// Final: the builder failed, or a dependency did, or infrastructure
    /// failures went past the retry limit. Kept until resubmitted with
    /// `--retry`.
    Failed,
    /// Canceled by a client.
    Canceled,
}

impl BuildState {
    /// The name used in JSON, the datastore and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Allocated => "allocated",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Canceled => "canceled",
        }
    }

    /// Queued or allocated: not finished.
    pub fn is_active(self) -> bool {
        matches!(self, BuildState::Queued | BuildState::Allocated)
    }
}

impl FromStr for BuildState {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<BuildState, ModelError> {
        Ok(match s {
            "queued" => BuildState::Queued,
            "allocated" => BuildState::Allocated,
            "succeeded" => BuildState::Succeeded,
            "failed" => BuildState::Failed,
            "canceled" => BuildState::Canceled,
            _ => return Err(ModelError::State(s.to_owned())),
        })
    }
}

/// What the coordinator keeps of a derivation once its `.drv` has been
/// uploaded and checked: enough to schedule and verify its build without
/// reading the file again. Store paths are full paths (`/gnu/store/…`),
/// the coordinator serving one store directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrvRecord {
    /// The `.drv` path.
    pub drv: String,
    /// `system`.
    pub system: String,
    /// `requiredSystemFeatures`.
    pub required_features: BTreeSet<String>,
    /// Output name to output path.
    pub outputs: BTreeMap<String, String>,
    /// Input derivations and the outputs used of each.
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
    /// Input sources.
    pub input_srcs: BTreeSet<String>,
}

/// One build asked for by a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBuild {
    /// The `.drv` path; its [`DrvRecord`] must be in the datastore.
    pub drv: String,
    /// Higher first.
    pub priority: i64,
    /// Free-form `key=value` labels.
    pub tags: BTreeMap<String, String>,
    /// Not handed out before this time.
    pub defer_until: Option<i64>,
    /// Build again even though an earlier build of it failed (`--retry`).
    pub retry: bool,
}

/// How a build's submission went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// The derivation.
    pub drv: String,
    /// Its build: new, or the active build of the same derivation (which
    /// then gets the higher priority of the two).
    pub id: BuildId,
    /// False when an active build, or a success, already covered it.
    pub created: bool,
    /// Its state after submission (`succeeded` when its outputs were all in
    /// the cache already).
    pub state: BuildState,
}

/// Why an allocated build came back without a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Setback {
    /// The builder failed: final.
    BuildFailure {
        /// One line.
        message: String,
    },
    /// Not the derivation's fault (an input could not be fetched, an upload
    /// failed, the agent ran out of disk): retried with backoff, on another
    /// agent where one can do it.
    Infrastructure {
        /// One line.
        message: String,
    },
    /// Inputs the build needs were missing from the cache when it was
    /// handed out (the coordinator's own finding, never an agent's): an
    /// infrastructure failure, retried the same way, that hooks hear of as
    /// `build-missing-inputs`.
    MissingInputs {
        /// One line: which paths.
        message: String,
    },
}

/// A build as the client API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: BuildId,
    pub drv: String,
    pub system: String,
    pub state: BuildState,
    /// Its own priority.
    pub priority: i64,
    /// The highest of its own and of every active build that needs it.
    pub effective_priority: i64,
    /// Length of the longest chain of active builds waiting on it
    /// (itself included).
    pub critical_path: i64,
    pub tags: BTreeMap<String, String>,
    pub created_at: i64,
    pub defer_until: Option<i64>,
    /// How many active builds it still waits for.
    pub waiting_on: i64,
    /// The agent it is (or was last) allocated to.
    pub agent: Option<AgentId>,
    pub lease_deadline: Option<i64>,
    /// Infrastructure failures so far.
    pub attempts: i64,
    /// Not handed out again before this time (backoff after a setback).
    pub next_attempt_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Why it failed, or the last infrastructure failure.
    pub message: Option<String>,
}

/// An agent as the datastore knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub enabled: bool,
    /// What it said it builds, on its last request.
    pub systems: BTreeSet<String>,
    pub features: BTreeSet<String>,
    pub max_parallel_builds: i64,
    pub last_seen: Option<i64>,
    /// Builds leased to it now.
    pub allocated: Vec<BuildId>,
}

/// The system of builds any agent can run (`builtin:fetchurl` and the like).
pub const BUILTIN_SYSTEM: &str = "builtin";

/// Whether an agent offering `systems` and `features`, and taking only
/// builds that require all of `mandatory`, can build a derivation of
/// `system` requiring `required`: the rule of `decide::assess` (a system of
/// its own or `builtin`, every required feature offered, every mandatory
/// feature required). The one rule of allocation and of "cannot start".
pub fn agent_can_build(
    systems: &BTreeSet<String>,
    features: &BTreeSet<String>,
    mandatory: &BTreeSet<String>,
    system: &str,
    required: &BTreeSet<String>,
) -> bool {
    (system == BUILTIN_SYSTEM || systems.contains(system))
        && required.is_subset(features)
        && mandatory.is_subset(required)
}

/// What an agent says about itself when it asks for work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOffer {
    pub systems: BTreeSet<String>,
    pub features: BTreeSet<String>,
    /// Features a build must require to go to it (an SSH machine's
    /// mandatory features, as in Nix's machines files); agents have none.
    #[serde(default)]
    pub mandatory_features: BTreeSet<String>,
    /// Slots it has free now.
    pub free_slots: i64,
    pub max_parallel_builds: i64,
}

/// A path in the cache, as its narinfo says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPath {
    /// Full store path.
    pub path: String,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full store paths.
    pub references: BTreeSet<String>,
    pub deriver: Option<String>,
    /// `nar/<file hash>.nar.zst`, relative to the cache.
    pub url: String,
    pub file_size: u64,
}

/// How long a token lives: `None` for ever.
pub type Expiry = Option<i64>;

/// A token as listed (never the secret, which is shown once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short public id (the first characters of its hash).
    pub id: String,
    pub principal: Principal,
    pub created_at: i64,
    pub expires_at: Expiry,
    pub revoked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_builds_its_systems_and_builtin_with_the_features_asked_and_its_mandatory_ones() {
        let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };
        let (systems, features) = (set(&["x86_64-linux"]), set(&["kvm", "big"]));
        let none = set(&[]);
        let can = |mandatory: &BTreeSet<String>, system: &str, required: &[&str]| {
            agent_can_build(&systems, &features, mandatory, system, &set(required))
        };
        assert!(can(&none, "x86_64-linux", &[]));
        assert!(can(&none, "builtin", &[]));
        assert!(can(&none, "x86_64-linux", &["kvm"]));
        assert!(!can(&none, "aarch64-linux", &[]), "another system");
        assert!(
            !can(&none, "x86_64-linux", &["gpu"]),
            "a feature not offered"
        );
        // A worker with mandatory features takes only builds that ask for them.
        let big = set(&["big"]);
        assert!(!can(&big, "x86_64-linux", &[]));
        assert!(!can(&big, "x86_64-linux", &["kvm"]));
        assert!(can(&big, "x86_64-linux", &["big"]));
        assert!(can(&big, "x86_64-linux", &["big", "kvm"]));
    }

    #[test]
    fn setbacks_keep_their_json_and_missing_inputs_has_its_own() {
        let infra = Setback::Infrastructure {
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&infra).unwrap(),
            r#"{"kind":"infrastructure","message":"x"}"#
        );
        let failure: Setback =
            serde_json::from_str(r#"{"kind":"build-failure","message":"y"}"#).unwrap();
        assert_eq!(
            failure,
            Setback::BuildFailure {
                message: "y".into()
            }
        );
        let missing = Setback::MissingInputs {
            message: "z".into(),
        };
        assert_eq!(
            serde_json::to_string(&missing).unwrap(),
            r#"{"kind":"missing-inputs","message":"z"}"#
        );
    }

    #[test]
    fn event_kinds_round_trip_and_events_are_flat_json() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
        }
        assert!("build-done".parse::<EventKind>().is_err());
        let e = Event {
            id: 3,
            kind: EventKind::AgentLost,
            time: 9,
            payload: serde_json::Map::from_iter([
                ("agent".to_owned(), "a1".into()),
                ("builds".to_owned(), serde_json::json!([1, 2])),
            ]),
        };
        assert_eq!(
            e.to_json().to_string(),
            r#"{"id":3,"event":"agent-lost","time":9,"agent":"a1","builds":[1,2]}"#
        );
    }

    #[test]
    fn ids_roles_and_states_parse_and_refuse() {
        assert_eq!("12".parse::<BuildId>().unwrap().get(), 12);
        assert!("0".parse::<BuildId>().is_err());
        assert!("-3".parse::<BuildId>().is_err());
        assert!("x".parse::<BuildId>().is_err());
        assert!(AgentId::new("agent-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(AgentId::new(bad).is_err(), "{bad:?}");
        }
        assert!(Role::Read < Role::Submit && Role::Submit < Role::Admin);
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
        for s in ["queued", "allocated", "succeeded", "failed", "canceled"] {
            assert_eq!(s.parse::<BuildState>().unwrap().as_str(), s);
        }
        let json = serde_json::to_string(&Principal::Client { role: Role::Submit }).unwrap();
        assert_eq!(json, r#"{"kind":"client","role":"submit"}"#);
        assert!(serde_json::from_str::<AgentId>("\"../x\"").is_err());
    }
}

/// What an event of the outbox is about (`event` in its JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    BuildSubmitted,
    BuildStarted,
    BuildSuccess,
    BuildFailure,
    BuildCanceled,
    BuildMissingInputs,
    AgentLost,
}

impl EventKind {
    /// Every kind, in the order of the docs.
    pub const ALL: [EventKind; 7] = [
        EventKind::BuildSubmitted,
        EventKind::BuildStarted,
        EventKind::BuildSuccess,
        EventKind::BuildFailure,
        EventKind::BuildCanceled,
        EventKind::BuildMissingInputs,
        EventKind::AgentLost,
    ];

    /// The name in JSON, the datastore, SSE and `--hook`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BuildSubmitted => "build-submitted",
            EventKind::BuildStarted => "build-started",
            EventKind::BuildSuccess => "build-success",
            EventKind::BuildFailure => "build-failure",
            EventKind::BuildCanceled => "build-canceled",
            EventKind::BuildMissingInputs => "build-missing-inputs",
            EventKind::AgentLost => "agent-lost",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<EventKind, ModelError> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ModelError::EventKind(s.to_owned()))
    }
}

/// One event of the outbox. Its JSON (see [`Event::to_json`]) is
/// `{"id": N, "event": KIND, "time": T, ...payload}`: `"build": {…}` for
/// the build events, `"agent": ID, "builds": [IDS]` for `agent-lost`.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Increasing; the SSE `id:` and hooks' cursor.
    pub id: i64,
    pub kind: EventKind,
    pub time: i64,
    /// The event's own fields.
    pub payload: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// The event as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.into());
        m.insert("event".into(), self.kind.as_str().into());
        m.insert("time".into(), self.time.into());
        for (k, v) in &self.payload {
            m.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(m)
    }
}
