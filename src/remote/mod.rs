//! Other machines: everything sandoff does to build on a machine over SSH
//! with Nix's serve protocol (`nix-store --serve`, 2.7), below `build`.
//!
//! - [`transport`]: what a client talks over; [`ssh`] is the SSH one
//!   (`ssh2`, host key always verified), a child process the local one.
//! - [`compress`]: zstd over the protocol streams between sandoff peers
//!   (negotiated on the remote command line, framed per message).
//! - [`client`]: the client side of the protocol: queries, transfers,
//!   builds ([`crate::serve_protocol`] holds what both sides share).
//! - [`slots`] and [`backoff`]: per-machine state shared by every sandoff
//!   process on this host, under `<state>/current-load/` and
//!   `<state>/offload-backoff/`.
//! - [`offloader`]: one offloaded build end to end, machine choice through
//!   [`crate::decide`], pooled connections and the admin commands
//!   (`machines test/status`, `copy --to`).
//!
//! The server side of the protocol (`sandoff serve`) and the build hook
//! (`sandoff hook`) are front ends above [`crate::build`]: [`crate::serve`]
//! and [`crate::hook`].

pub mod backoff;
pub mod client;
pub mod compress;
pub mod offloader;
pub mod slots;
pub mod ssh;
pub mod transport;
