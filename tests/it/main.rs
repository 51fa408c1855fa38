//! Integration tests: one binary, one module per area.

mod derivation;
mod nar;
mod registry;
mod sandbox;
mod support;
mod transfer;
