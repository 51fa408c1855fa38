//! Integration tests: one binary, one module per area.

mod derivation;
mod support;
mod transfer;
