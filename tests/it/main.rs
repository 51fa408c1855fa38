//! Integration tests: one binary, one module per area.

mod build;
mod decide;
mod derivation;
mod hook;
mod hosts;
mod nar;
mod registry;
mod sandbox;
mod serve;
mod support;
mod transfer;
