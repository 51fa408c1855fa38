//! The byte-string JSON reader behind `derivation add`: never panics, and
//! nesting past its bound is an error, not a stack overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::derivation::bytejson;

fuzz_target!(|data: &[u8]| {
    let _ = bytejson::parse(data);
});
