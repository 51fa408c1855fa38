//! sandoff builds Nix- and Guix-style derivations, locally in a chroot sandbox
//! or offloaded over SSH.
//!
//! # Architecture
//!
//! - [`store`]: the store model, byte-compatible with Nix 2.8: store paths and
//!   hashes, NAR, the SQLite registry of valid paths (Nix's schema),
//!   signatures, export archives and reference scanning. It knows nothing of
//!   derivations or builds.
//! - [`derivation`]: the ATerm `.drv` format, `hashDerivationModulo`, output
//!   paths and the JSON form of `nix show-derivation`.
//! - [`sandbox`]: the local build sandbox: a pure plan of setup steps, run
//!   by one forked child in fresh namespaces as a pooled build user.
//! - [`decide`]: where a derivation is built; Nix and Guix machines files
//!   read into one machine model, and one pure `decide()` for every caller.
//! - [`build`]: realising derivations here: the graph of what is missing,
//!   scheduled in dependency order on threads, each build run in the
//!   sandbox and its outputs checked, scanned and registered atomically.
//! - [`offload`]: other machines: for now the server side of Nix's serve
//!   protocol (`sandoff serve --stdio`), so Nix can copy paths in and out.
//!
//! Two leaf modules serve them all and depend on nothing in the crate:
//!
//! - [`termsafe`]: text written by builds (logs, a machine's error
//!   messages) filtered before it reaches a terminal, keeping colours.
//! - [`bounded`]: reading input others control (machines files, key files,
//!   the daemon's lines) with a limit, regular files only.
//!
//! They are the lowest layer: `termsafe`, `bounded` < `store` <
//! `derivation` < the rest.
//!
//! The binary (`src/main.rs`) is a thin CLI over these modules.

pub mod bounded;
pub mod build;
pub mod decide;
pub mod derivation;
pub mod offload;
pub mod sandbox;
pub mod store;
pub mod termsafe;

#[cfg(test)]
mod layers {
    /// The leaf modules use nothing of the crate (their tests aside), so
    /// every other module may use them.
    #[test]
    fn leaf_modules_use_nothing_of_the_crate() {
        for (name, source) in [
            ("termsafe", include_str!("termsafe.rs")),
            ("bounded", include_str!("bounded.rs")),
        ] {
            let code = source.split("#[cfg(test)]").next().unwrap_or(source);
            for word in ["crate::", "super::", "sandoff::"] {
                assert!(!code.contains(word), "{name} uses {word}");
            }
        }
    }
}
