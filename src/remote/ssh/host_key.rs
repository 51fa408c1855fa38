//! Host keys, pure: OpenSSH public-key lines parsed and compared, the keys
//! a known_hosts file lists for a host, and what a mismatch says was
//! expected. The session does the IO (reading the file, libssh2's check).

use std::path::Path;

use base64::Engine as _;

/// An SSH public key: its type name and its wire-format blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PublicKey {
    pub(super) kind: String,
    pub(super) blob: Vec<u8>,
}

impl PublicKey {
    /// Parses an OpenSSH public-key line, `ssh-ed25519 AAAA... comment`;
    /// the comment is ignored, the type must match the blob's own.
    pub(super) fn parse(line: &str) -> Result<PublicKey, String> {
        let mut fields = line.split_whitespace();
        let kind = fields
            .next()
            .ok_or_else(|| "empty key".to_owned())?
            .to_owned();
        let b64 = fields
            .next()
            .ok_or_else(|| "no base64 key after the key type".to_owned())?;
        let blob = base64_engine()
            .decode(b64)
            .map_err(|e| format!("key is not base64: {e}"))?;
        match blob_key_type(&blob) {
            Some(inner) if inner == kind => Ok(PublicKey { kind, blob }),
            Some(inner) => Err(format!("key type '{kind}' but the key data says '{inner}'")),
            None => Err("key data too short or malformed".to_owned()),
        }
    }

    /// A key from the wire-format blob only (as the server offers it).
    pub(super) fn from_blob(blob: &[u8]) -> Option<PublicKey> {
        let kind = blob_key_type(blob)?.to_owned();
        Some(PublicKey {
            kind,
            blob: blob.to_vec(),
        })
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind,
            base64::engine::general_purpose::STANDARD.encode(&self.blob)
        )
    }
}

/// Base64 that accepts keys with or without their `=` padding.
pub(super) fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// The type name a public-key blob starts with (an SSH string).
pub(super) fn blob_key_type(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4usize.checked_add(len)?)?;
    let name = std::str::from_utf8(name).ok()?;
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic())).then_some(name)
}

/// The host-key algorithms that verify a key of type `kind`.
pub(super) fn hostkey_algorithms(kind: &str) -> &str {
    match kind {
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
        other => other,
    }
}

/// The lines of a known_hosts file that hold host keys: blank lines,
/// comments and markers (`@cert-authority`, `@revoked`, which libssh2 does
/// not know) are left out.
pub(super) fn known_hosts_entries(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !(l.is_empty() || l.starts_with('#') || l.starts_with('@')))
}

/// What a host key mismatch says was expected of `host` on `port`: the
/// keys the known_hosts file at `path` lists for it in plain lines, else
/// (all its lines hashed) where to look.
pub(super) fn expected_from_known_hosts(text: &str, host: &str, port: u16, path: &Path) -> String {
    let listed = known_keys_for(text, host, port);
    let expected = if listed.is_empty() {
        format!(
            "the key for {} in {}",
            host_port(host, port),
            path.display()
        )
    } else {
        listed.join(" or ")
    };
    format!("{expected} (from {})", path.display())
}

/// `host:port`, bracketing IPv6 addresses.
pub(super) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The keys (`type base64`) that plain (unhashed) known_hosts lines list for
/// `host` on `port`, to name what was expected in a mismatch.
pub(super) fn known_keys_for(text: &str, host: &str, port: u16) -> Vec<String> {
    let bracketed = format!("[{host}]:{port}");
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let names = fields.next()?;
            if names.starts_with('#') || names.starts_with('@') {
                return None;
            }
            let matches = names.split(',').any(|n| {
                n.eq_ignore_ascii_case(&bracketed) || (port == 22 && n.eq_ignore_ascii_case(host))
            });
            let kind = fields.next()?;
            let b64 = fields.next()?;
            matches.then(|| format!("{kind} {b64}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn public_key_parse_ignores_comment_and_padding() {
        let a = PublicKey::parse(&format!("{ED} host1")).expect("parses");
        let b = PublicKey::parse(ED).expect("parses");
        assert_eq!(a, b);
        assert_eq!(a.kind, "ssh-ed25519");
        assert_eq!(a.to_string(), ED);
        let unpadded = ED.trim_end_matches('=');
        assert_eq!(PublicKey::parse(unpadded).expect("parses"), a);
        assert_eq!(PublicKey::from_blob(&a.blob), Some(a));
    }

    #[test]
    fn public_key_parse_refuses_bad_keys() {
        assert!(PublicKey::parse("").is_err());
        assert!(PublicKey::parse("ssh-ed25519").is_err());
        assert!(PublicKey::parse("ssh-ed25519 !!!")
            .unwrap_err()
            .contains("base64"));
        // The type must match the blob's own.
        let err = PublicKey::parse(&ED.replace("ssh-ed25519", "ssh-rsa")).unwrap_err();
        assert!(err.contains("'ssh-ed25519'"), "{err}");
        // A blob too short to hold its type name.
        assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err());
        assert!(PublicKey::parse("ssh-ed25519 AAAAC3Nz").is_err());
    }

    #[test]
    fn keys_differing_in_blob_are_unequal() {
        let a = PublicKey::parse(ED).expect("parses");
        let mut b = a.clone();
        let last = b.blob.len() - 1;
        b.blob[last] ^= 1;
        assert_ne!(a, b);
    }

    #[test]
    fn known_keys_for_matches_plain_and_bracketed_names() {
        let text = format!(
            "# comment\n[10.0.0.1]:2222 {ED}\nhost,10.0.0.1 ssh-rsa AAAB\n|1|abc|def {ED}\n@revoked 10.0.0.1 {ED}\n"
        );
        assert_eq!(known_keys_for(&text, "10.0.0.1", 2222), vec![ED.to_owned()]);
        assert_eq!(
            known_keys_for(&text, "10.0.0.1", 22),
            vec!["ssh-rsa AAAB".to_owned()]
        );
        assert!(known_keys_for(&text, "other", 22).is_empty());
    }

    #[test]
    fn host_port_brackets_ipv6() {
        assert_eq!(host_port("::1", 22), "[::1]:22");
        assert_eq!(host_port("h", 2222), "h:2222");
    }
}
