//! The binary cache (see [`super`]).
