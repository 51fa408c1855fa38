//! SSH machines as agentless workers: the machines of a Nix `machines`
//! file or Guix `machines.scm` take builds from the same queue as agents,
//! through the existing offload code, so a farm mixes agents and plain SSH
//! build hosts (stock `nix-store --serve` or `sandoff serve`) under one
//! queue.
//!
//! Each machine is served by an in-process agent (the [`super::agent`] loop,
//! unchanged) named `ssh-<machine>`, talking to the coordinator over a
//! loopback-only listener with its own token. Its builds go through
//! [`crate::build::local::realise_one`] with an [`Offloader`] that knows
//! only that machine and no local builds: inputs fetched from the cache
//! into a worker store, sent to the machine, built there, the outputs
//! copied back with their signatures checked against the keys the worker
//! store trusts, then uploaded and verified like any agent's.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::agent::{self, AgentConfig, AgentError};
use super::client::{Client, ClientError};
use crate::build::{BuildContext, Options};
use crate::decide::{LocalFacts, Machine, Placement, Policy};
use crate::remote::offloader::{OffloadError, Offloader};
use crate::remote::ssh::SshOptions;
use crate::sandbox::UserPool;
use crate::store::keyring::{Keyring, KeyringError};
use crate::store::local::StoreError;
use crate::store::signature::{PublicKey, TrustedKeys};
use crate::store::{StoreDir, StoreLocation};

/// Why a worker could not start.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("worker for '{machine}': {source}")]
    Store {
        machine: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("worker for '{machine}': {source}")]
    Keys {
        machine: String,
        #[source]
        source: KeyringError,
    },
    #[error("worker for '{machine}': {source}")]
    Offload {
        machine: String,
        #[source]
        source: Box<OffloadError>,
    },
    #[error("worker for '{machine}': {source}")]
    Client {
        machine: String,
        #[source]
        source: ClientError,
    },
    #[error("worker for '{machine}': {source}")]
    Agent {
        machine: String,
        #[source]
        source: AgentError,
    },
}

/// One machine's worker.
#[derive(Debug)]
pub struct Worker {
    pub machine: Machine,
    /// Its store root (and state) for inputs and outputs in transit.
    pub root: PathBuf,
    pub store_dir: StoreDir,
    /// The coordinator's loopback agent URL.
    pub url: String,
    /// The worker's agent token.
    pub token: String,
    /// The coordinator's cache key.
    pub cache_key: PublicKey,
    /// Keys whose signatures make the machine's outputs acceptable.
    pub trusted: TrustedKeys,
    pub ssh: SshOptions,
}

/// The agent name of a machine's worker: `ssh-` and the machine's host
/// (its name without the URI scheme and user: `ssh://root@b1:2222` gives
/// `ssh-b1-2222`), anything an agent id does not allow as `-`.
pub fn agent_name(machine: &Machine) -> String {
    let n = machine.name.as_str();
    let n = n.split_once("://").map_or(n, |(_, rest)| rest);
    let n = n.rsplit_once('@').map_or(n, |(_, host)| host);
    let cleaned: String = n
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("ssh-{cleaned}");
    name.truncate(64);
    name
}

/// Runs `w` until `stop` is set (or it cannot start).
pub fn run(w: Worker, stop: &AtomicBool) -> Result<(), WorkerError> {
    let machine = w.machine.name.to_string();
    let mut loc = StoreLocation::new(w.store_dir.clone(), w.root.join("root"));
    loc.state = w.root.join("state");
    let store =
        crate::derivation::check::open_store(loc.clone()).map_err(|source| WorkerError::Store {
            machine: machine.clone(),
            source: Box::new(source),
        })?;
    let keys_err = |source| WorkerError::Keys {
        machine: machine.clone(),
        source,
    };
    let keyring = Keyring::new(&loc.state);
    // Inputs sent to the machine are signed by this key.
    keyring
        .ensure_key_pair(&format!("{}-1", agent_name(&w.machine)))
        .map_err(keys_err)?;
    keyring.authorize(&w.trusted).map_err(keys_err)?;
    let jobs = w.machine.max_jobs.max(1) as usize;
    let offloader =
        Offloader::new(&loc, vec![w.machine.clone()], jobs, w.ssh.clone()).map_err(|source| {
            WorkerError::Offload {
                machine: machine.clone(),
                source: Box::new(source),
            }
        })?;
    let mut local = LocalFacts::detect();
    // Never here: the coordinator's machine is not a build machine.
    local.disabled = true;
    let placement = Placement {
        machines: vec![w.machine.clone()],
        local,
        policy: Policy {
            local_only: false,
            local_when_busy: false,
        },
    };
    // No build users: nothing is built here (a missing group is the
    // error a local build would then report).
    let pool =
        UserPool::from_group("sandoff-no-local-builds", &w.root.join("userpool")).map_err(Arc::new);
    let ctx = BuildContext {
        store: &store,
        pool: pool.as_ref().map_err(Arc::clone),
        options: Options {
            jobs,
            stream_logs: true,
            ..Options::default()
        },
        placement: &placement,
        offload: Some(&offloader),
    };
    let client = Client::new(&w.url, &w.token, None).map_err(|source| WorkerError::Client {
        machine: machine.clone(),
        source,
    })?;
    let mut features: BTreeSet<String> = w.machine.supported_features.clone();
    features.extend(w.machine.mandatory_features.iter().cloned());
    let config = AgentConfig {
        client,
        systems: w.machine.systems.clone(),
        features,
        mandatory_features: w.machine.mandatory_features.clone(),
        max_parallel_builds: jobs,
        poll: Duration::from_millis(500),
        spool: w.root.join("spool"),
        zstd_level: 3,
        coordinator_key: Some(w.cache_key.clone()),
        max_log_bytes: 64 << 20,
    };
    tracing::info!(machine, "SSH worker started");
    agent::run(&config, &ctx, stop).map_err(|source| WorkerError::Agent { machine, source })
}

/// Where the workers keep their stores by default: next to the cache.
pub fn default_root(cache_dir: &Path) -> PathBuf {
    cache_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .join("ssh-workers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::nix_format;

    #[test]
    fn workers_are_named_after_their_hosts() {
        for (line, name) in [
            ("ssh://root@b1:2222 x86_64-linux", "ssh-b1-2222"),
            (
                "ssh-ng://builder.example.org x86_64-linux",
                "ssh-builder.example.org",
            ),
            ("b2 x86_64-linux", "ssh-b2"),
        ] {
            let ms = nix_format::parse(line, "machines", "x86_64-linux", &nix_format::NoIncludes)
                .expect("parses");
            assert_eq!(agent_name(&ms[0]), name);
        }
    }
}
