//! Integration tests: one binary, one module per area.

mod attrs;
mod build;
mod build_check_logs;
mod claims;
mod client;
mod compress;
mod daemon_store;
mod daemons;
mod decide;
mod derivation;
mod enter;
mod fetchurl;
mod guix_daemon;
mod hook;
mod hosts;
mod keyring;
mod nar;
mod nix_daemon;
mod offload;
mod registry;
mod sandbox;
mod serve;
mod ssh;
mod support;
mod transfer;
mod userpool;
