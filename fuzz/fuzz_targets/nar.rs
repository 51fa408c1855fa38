//! NAR parser on arbitrary bytes, parse-only (no filesystem): it must return
//! an error or a size, never panic, hang or allocate much.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::store::nar::{parse, NullVisitor};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    if let Ok(size) = parse(&mut input, &mut NullVisitor) {
        // It reads exactly the NAR and nothing after it.
        assert_eq!(size as usize + input.len(), data.len());
    }
});
