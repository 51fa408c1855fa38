//! Integration tests: one binary, one module per area.

mod derivation;
mod registry;
mod support;
mod transfer;
