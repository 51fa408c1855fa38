//! Offloading builds to other machines over SSH, with Nix's serve protocol
//! (`nix-store --serve`, 2.7) on both ends.
//!
//! - [`serve`]: the server side, `sandoff serve --stdio [--write]`.
//! - [`protocol`]: the protocol's structured values (derivations, build
//!   options and results), shared by both sides.
//! - [`transport`]: what a client talks over; [`ssh`] is the SSH one
//!   (`ssh2`, host key always verified), a child process the local one.
//! - [`client`]: the client side: queries, transfers, builds.
//! - [`slots`] and [`backoff`]: per-machine state shared by every sandoff
//!   process on this host, under `<state>/current-load/` and
//!   `<state>/offload-backoff/`.
//! - [`remote`]: one offloaded build end to end, and the choice of machine
//!   with failover.
//! - [`hook`]: the build-hook line protocol of guix-daemon and Nix 1.x
//!   (`sandoff hook`).

pub mod backoff;
pub mod client;
pub mod hook;
pub mod protocol;
pub mod remote;
pub mod serve;
pub mod slots;
pub mod ssh;
pub mod transport;
