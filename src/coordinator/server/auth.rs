//! Tokens: made here, stored only as their SHA-256 (a token is 256 random
//! bits, so a plain hash is as good as a slow one), and read from either an
//! `Authorization: Bearer` header or the password of HTTP Basic (what Nix's
//! `netrc-file` sends when it substitutes from the cache).

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use base64::Engine;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

/// What every token starts with, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "sandoff_";

/// A new random token (shown once; only its hash is kept).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let mut s = String::with_capacity(TOKEN_PREFIX.len() + 64);
    s.push_str(TOKEN_PREFIX);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// What the datastore keeps of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// The token a request carries, if any.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_user, password) = text.split_once(':')?;
        return Some(password.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_are_random_and_read_from_bearer_or_basic() {
        let a = new_token();
        assert_ne!(a, new_token());
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {a}")).unwrap(),
        );
        assert_eq!(presented(&h).as_deref(), Some(a.as_str()));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("nix:{a}"));
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {basic}")).unwrap(),
        );
        assert_eq!(presented(&h).as_deref(), Some(a.as_str()));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Digest x"));
        assert_eq!(presented(&h), None);
        assert_eq!(hash_token(&a), hash_token(&format!("{a}\n")));
    }
}
