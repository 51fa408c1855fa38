//! Export archive decoder: any input is either decoded or refused, never a
//! panic, a hang or an allocation beyond the stream's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::store::export::decode_all;
use sandoff::store::StoreDir;

fuzz_target!(|data: &[u8]| {
    let _ = decode_all(data, &StoreDir::default());
});
