//! Guix machines.scm reading and evaluation: never panics (deep nesting
//! included), and every accepted machine keeps the model's invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::decide::guix_format;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "HOME").then(|| "/root".to_owned());
    if let Ok(machines) = guix_format::parse(text, "machines.scm", &env) {
        for m in &machines {
            assert!(
                m.check().is_ok(),
                "accepted machine breaks an invariant: {m:?}"
            );
        }
    }
});
