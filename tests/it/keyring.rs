//! The test process's own kernel keyrings, through raw `keyctl`/`add_key`
//! (no libkeyutils): a key put where a build must not find it.
//!
//! The only `unsafe` of the tests: two system calls on plain arguments.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;

const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
const KEYCTL_INVALIDATE: libc::c_long = 21;

fn check(ret: libc::c_long) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as i32)
    }
}

/// The serial of this thread's session keyring, created if there is none
/// (credentials, and so session keyrings, are per thread: a build cloned
/// from this thread inherits this one).
pub fn session_keyring() -> io::Result<i32> {
    // SAFETY: integer arguments only.
    check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_SESSION_KEYRING,
            1 as libc::c_long,
        )
    })
}

/// A "user" key in this thread's session keyring; invalidated when dropped.
pub struct SessionKey(i32);

impl SessionKey {
    /// Adds `description` with `payload`.
    pub fn add(description: &str, payload: &[u8]) -> io::Result<SessionKey> {
        let desc = CString::new(description).map_err(io::Error::other)?;
        // SAFETY: the type and description are NUL-terminated strings and
        // the payload pointer and length describe `payload`, all valid for
        // the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                desc.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                KEY_SPEC_SESSION_KEYRING,
            )
        })
        .map(SessionKey)
    }
}

impl Drop for SessionKey {
    fn drop(&mut self) {
        // SAFETY: integer arguments only.
        unsafe {
            libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, self.0 as libc::c_long);
        }
    }
}
