//! Derivation JSON reading: never panics; what is accepted shows and reads
//! back to the same derivation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::derivation::json;
use sandoff::store::{StoreDir, StorePath};

fuzz_target!(|data: &[u8]| {
    let dir = StoreDir::default();
    if let Ok(read) = json::from_json(data, &dir) {
        let drv = read.derivation;
        let path = StorePath::from_base_name("00000000000000000000000000000000-fuzz.drv")
            .expect("valid path");
        let shown = json::show(&[(path, drv.clone())].into(), &dir);
        let back = json::from_json(&shown, &dir).expect("shown JSON reads back");
        assert_eq!(back.derivation, drv);
    }
});
