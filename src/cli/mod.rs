//! One file per command group; each turns its arguments into library calls.

pub mod build;
pub mod copy;
pub mod decide;
pub mod derivation;
pub mod guix;
pub mod hook;
pub mod key;
pub mod machines;
pub mod nar;
pub mod serve;
pub mod setup;
pub mod store;
pub mod transfer;
