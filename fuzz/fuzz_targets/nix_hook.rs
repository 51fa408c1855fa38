//! nix-daemon 2.x's hook protocol: the settings, the requests and the data
//! after an accept are read or refused, never a panic; accepted settings
//! become a configuration or a named refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::hook::nix::{read_accepted, read_request, read_settings, Config};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(settings) = read_settings(&mut r) {
        let _ = Config::from_settings(&settings);
    }
    while let Ok(Some(_)) = read_request(&mut r) {}
    let _ = read_accepted(&mut r);
});
