//! ATerm `.drv` parsing: never panics, and whatever is accepted prints back
//! to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::derivation::Derivation;
use sandoff::store::StoreDir;

fuzz_target!(|data: &[u8]| {
    let dir = StoreDir::default();
    if let Ok(drv) = Derivation::from_aterm(data, &dir) {
        assert_eq!(
            drv.to_aterm(&dir),
            data,
            "accepted input must print back identically"
        );
        let _ = drv.drv_path(&dir);
    }
});
