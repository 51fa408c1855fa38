//! Key, signature and trusted-keys parsing: never a panic; whatever parses
//! prints back in a form that parses to the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandoff::store::signature::{PublicKey, SecretKey, Signature, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(pk) = PublicKey::parse(text, "fuzz") {
        assert_eq!(PublicKey::parse(&pk.to_string(), "fuzz").ok(), Some(pk));
    }
    if let Ok(sk) = SecretKey::parse(text, "fuzz") {
        let sig = sk.sign("fuzz");
        assert!(sk.to_public().verify("fuzz", &sig));
    }
    if let Ok(sig) = text.parse::<Signature>() {
        assert_eq!(sig.to_string().parse::<Signature>().ok(), Some(sig));
    }
    let _ = TrustedKeys::parse(text, "fuzz");
});
