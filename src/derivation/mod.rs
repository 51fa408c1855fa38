//! Derivations: the ATerm `.drv` format, output paths and attributes.
