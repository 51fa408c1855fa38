//! The build coordinator: a persistent queue of builds, agents that dial in
//! for work, and a Nix binary cache of the results (the Guix Build
//! Coordinator's design, `../shared/seeds/`, made stricter: every API
//! authenticated, dependency-aware dispatch, leases, results verified on
//! arrival).
//!
//! - [`model`]: the coordinator's vocabulary (build ids, states, roles,
//!   what it knows of a derivation), plain data shared by the rest.
//! - [`datastore`]: where the queue, the agents, the tokens and the index
//!   of the cache live: one [`datastore::Datastore`] interface, SQLite
//!   ([`datastore::sqlite`]) or PostgreSQL ([`datastore::postgres`]) behind
//!   it, one scheduling logic for both; scheduling (effective priorities,
//!   critical paths, leases, retries) is decided there in transactions.
//! - [`cache`]: the binary cache under `--cache-dir` and the checks every
//!   NAR passes before it enters it (uploads from clients and agents,
//!   zstd-compressed and resumable).
//! - [`substitute`]: fetching a closure from such a cache into a local
//!   store, checking every signature and hash (agents use it for inputs).
//! - [`server`]: the coordinator process: the agent and client HTTP APIs
//!   (axum on tokio, TLS with rustls), authentication, the lease reaper;
//!   hooks and the live event stream over the datastore's event outbox,
//!   Prometheus metrics, live build logs and the read-only web page.
//! - [`api`]: the JSON bodies of both APIs, shared by server and client.
//! - [`client`]: the HTTP client both the CLI and agents use.
//! - [`submit`]: the client side of a submission (uploads, then builds).
//! - [`workers`]: SSH machines (Nix `machines`, Guix `machines.scm`) as
//!   agentless workers: an in-process agent per machine that offloads.
//! - [`agent`]: the agent loop: lease builds, fetch inputs, build them with
//!   sandoff's own sandbox (streaming the log as it grows), upload log and
//!   outputs, report.

pub mod agent;
pub mod api;
pub mod cache;
pub mod client;
pub mod datastore;
pub mod model;
pub mod server;
pub mod submit;
pub mod substitute;
pub mod workers;
