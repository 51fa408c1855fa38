//! Nix machines-file parsing: never panics, and every accepted machine keeps
//! the invariants the decision relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::decide::nix_format;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(machines) =
        nix_format::parse(text, "machines", "x86_64-linux", &nix_format::NoIncludes)
    {
        for m in &machines {
            assert!(
                m.check().is_ok(),
                "accepted machine breaks an invariant: {m:?}"
            );
        }
    }
});
