//! Serve protocol values (`BasicDerivation`, build options, `BuildResult`):
//! any input is read or refused, never a panic; an accepted derivation
//! writes back to bytes that read to the same derivation.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use sandoff::serve_protocol::{
    read_basic_derivation, write_basic_derivation, BuildOptions, BuildResult,
};
use sandoff::store::StoreDir;

fuzz_target!(|data: &[u8]| {
    let dir = StoreDir::default();
    let Some((&minor, rest)) = data.split_first() else {
        return;
    };
    let minor = u64::from(minor % 9);
    let _ = BuildOptions::read(&mut &rest[..], minor);
    if let Ok(r) = BuildResult::read(&mut &rest[..], minor, &dir) {
        let mut out = Vec::new();
        r.write(&mut out, minor, &dir, "sha256:00").expect("vec");
    }
    if let Ok(drv) = read_basic_derivation(&mut &rest[..], &dir, "fuzz") {
        let srcs: BTreeSet<_> = drv.input_sources.clone();
        let mut out = Vec::new();
        write_basic_derivation(&mut out, &dir, &drv, &srcs).expect("vec");
        let back = read_basic_derivation(&mut &out[..], &dir, "fuzz").expect("reads back");
        assert_eq!(back, drv);
    }
});
