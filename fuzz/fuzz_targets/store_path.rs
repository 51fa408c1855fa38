//! Store paths, store directories, hashes and content addresses from arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::store::{ContentAddress, Hash, StoreDir, StorePath};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = StorePath::from_base_name(s) {
        assert_eq!(StorePath::from_base_name(p.base_name()).as_ref(), Ok(&p));
    }
    let _ = StoreDir::default().parse_path(s);
    let _ = StoreDir::new(s);
    if let Ok(h) = Hash::parse_any_prefixed(s) {
        assert_eq!(Hash::parse_any_prefixed(&h.to_nix32_prefixed()).as_ref(), Ok(&h));
    }
    if let Ok(ca) = s.parse::<ContentAddress>() {
        assert_eq!(ca.to_string().parse::<ContentAddress>().as_ref(), Ok(&ca));
    }
});
