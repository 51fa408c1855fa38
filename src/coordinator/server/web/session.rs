//! Browser sessions of the web page, kept in memory.
//!
//! A browser cannot send an `Authorization` header by itself, so the page
//! has a login form: the token is checked once, and the browser gets a
//! cookie holding a random session id (256 bits), never the token. The
//! coordinator keeps, by the SHA-256 of each session id, the hash of the
//! token it came from and an expiry; every request checks that token
//! again in the datastore, so revoking or expiring the token ends its
//! sessions at once. Sessions live in memory only: a restarted
//! coordinator forgets them and browsers log in again (acceptable for a
//! read-only page, and nothing secret is written to disk).
//!
//! Login codes hand a browser a session without putting a token in a
//! URL: an authenticated client (a script, a test) asks for a code
//! (`POST /client/v1/ui-login-codes`), which the browser opens once
//! within a minute (`GET /ui/session/<code>`) to get its cookie.

use std::collections::HashMap;
use std::sync::Mutex;

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

/// How long a session lasts (at most: its token's expiry and revocation
/// end it sooner).
pub(crate) const SESSION_SECS: i64 = 12 * 3600;
/// How long a login code can be used.
pub(crate) const CODE_SECS: i64 = 60;
/// The most sessions (or codes) kept; the oldest go first past it, so that
/// a client minting codes in a loop cannot grow the coordinator's memory.
const MAX_ENTRIES: usize = 10_000;
/// The cookie's name.
pub(crate) const COOKIE: &str = "sandoff_session";

/// What a session or a code stands for.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The hash of the token that logged in.
    token_hash: [u8; 32],
    expires_at: i64,
}

/// The sessions and login codes of the web page.
#[derive(Debug)]
pub(crate) struct Sessions {
    /// Whether the cookie gets `Secure` (the listener speaks TLS).
    pub(crate) secure: bool,
    maps: Mutex<Maps>,
}

#[derive(Debug, Default)]
struct Maps {
    sessions: HashMap<[u8; 32], Entry>,
    codes: HashMap<[u8; 32], Entry>,
}

/// A random secret as 64 hex digits.
fn secret() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Adds `entry` under a new secret; drops expired entries, and the one
/// closest to expiry when full.
fn insert(map: &mut HashMap<[u8; 32], Entry>, entry: Entry, now: i64) -> String {
    map.retain(|_, e| e.expires_at > now);
    if map.len() >= MAX_ENTRIES {
        if let Some(k) = map
            .iter()
            .min_by_key(|(_, e)| e.expires_at)
            .map(|(k, _)| *k)
        {
            map.remove(&k);
        }
    }
    let s = secret();
    map.insert(key(&s), entry);
    s
}

impl Sessions {
    /// No sessions yet.
    pub(crate) fn new(secure: bool) -> Sessions {
        Sessions {
            secure,
            maps: Mutex::new(Maps::default()),
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding it leaves two maps that are still valid.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for the token with hash `token_hash`, lasting until
    /// `expires_at`; returns the session id (the cookie's value).
    pub(crate) fn open(&self, token_hash: [u8; 32], expires_at: i64, now: i64) -> String {
        let entry = Entry {
            token_hash,
            expires_at,
        };
        insert(&mut self.maps().sessions, entry, now)
    }

    /// The token hash of a live session.
    pub(crate) fn lookup(&self, id: &str, now: i64) -> Option<[u8; 32]> {
        let maps = self.maps();
        let e = maps.sessions.get(&key(id))?;
        (e.expires_at > now).then_some(e.token_hash)
    }

    /// Ends a session.
    pub(crate) fn close(&self, id: &str) {
        self.maps().sessions.remove(&key(id));
    }

    /// A new one-time login code for the token with hash `token_hash`.
    pub(crate) fn new_code(&self, token_hash: [u8; 32], now: i64) -> String {
        let entry = Entry {
            token_hash,
            expires_at: now + CODE_SECS,
        };
        insert(&mut self.maps().codes, entry, now)
    }

    /// Uses up a login code: its token hash, if it is valid.
    pub(crate) fn take_code(&self, code: &str, now: i64) -> Option<[u8; 32]> {
        let e = self.maps().codes.remove(&key(code))?;
        (e.expires_at > now).then_some(e.token_hash)
    }
}

/// The session id in a `Cookie` header, if any.
pub(crate) fn from_cookies(header: &str) -> Option<&str> {
    header.split(';').find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then_some(value)
    })
}

/// The `Set-Cookie` value that stores session `id` for `max_age` seconds
/// (`HttpOnly`: no script reads it; `SameSite=Strict`: no other site's
/// page sends it, which also keeps the logout form from cross-site use).
pub(crate) fn set_cookie(id: &str, max_age: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that removes the cookie.
pub(crate) fn clear_cookie(secure: bool) -> String {
    set_cookie("", 0, secure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_close() {
        let s = Sessions::new(false);
        let id = s.open([1; 32], 100, 0);
        assert_eq!(id.len(), 64);
        assert_eq!(s.lookup(&id, 99), Some([1; 32]));
        assert_eq!(s.lookup(&id, 100), None);
        assert_eq!(s.lookup("nope", 0), None);
        s.close(&id);
        assert_eq!(s.lookup(&id, 0), None);
    }

    #[test]
    fn a_login_code_works_once_and_within_a_minute() {
        let s = Sessions::new(false);
        let code = s.new_code([2; 32], 0);
        assert_eq!(s.take_code(&code, 10), Some([2; 32]));
        assert_eq!(s.take_code(&code, 10), None, "used up");
        let late = s.new_code([2; 32], 0);
        assert_eq!(s.take_code(&late, CODE_SECS), None, "expired");
    }

    #[test]
    fn the_session_map_is_bounded() {
        let s = Sessions::new(false);
        for i in 0..(MAX_ENTRIES + 5) {
            s.open([0; 32], 1000 + i as i64, 0);
        }
        assert_eq!(s.maps().sessions.len(), MAX_ENTRIES);
    }

    #[test]
    fn the_cookie_is_read_among_others_and_set_strictly() {
        assert_eq!(from_cookies("a=b; sandoff_session=xyz; c=d"), Some("xyz"));
        assert_eq!(from_cookies("sandoff_session="), None);
        assert_eq!(from_cookies("other=1"), None);
        let c = set_cookie("xyz", 60, true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Secure",
            "Max-Age=60",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie("xyz", 60, false).contains("Secure"));
    }
}
