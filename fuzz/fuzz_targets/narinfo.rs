//! Narinfo text from arbitrary bytes (what an agent reads from the network):
//! never a panic, and what parses prints back to text that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::coordinator::cache::NarInfo;
use sandoff::store::StoreDir;

fuzz_target!(|data: &[u8]| {
    let dir = StoreDir::default();
    if let Ok(info) = NarInfo::parse(data, &dir) {
        let text = info.to_text(&dir);
        assert_eq!(NarInfo::parse(text.as_bytes(), &dir).ok().as_ref(), Some(&info));
    }
});
