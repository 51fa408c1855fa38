//! The command that starts the serve protocol on a machine, and its shell
//! quoting: pure, so that what reaches the remote shell is tested here.

use crate::decide::Machine;

/// The command that starts the serve protocol on `machine`: Nix runs
/// `<remote-program> --serve --write` when the store URI has a
/// `remote-program` parameter (`ssh://host?remote-program=/bin/nix-store`),
/// else it is `sandoff serve --stdio --write`. The program's words are
/// shell-quoted one by one, so a program with arguments still works (as
/// the value was pasted unquoted into a command line in Nix 2.8).
pub fn remote_command(machine: &Machine) -> String {
    match remote_program(&machine.store_uri) {
        Some(program) => {
            let words: Vec<String> = program.split_whitespace().map(shell_quote).collect();
            format!("{} --serve --write", words.join(" "))
        }
        None => "sandoff serve --stdio --write".to_owned(),
    }
}

/// The decoded `remote-program` query parameter of a store URI, if any.
fn remote_program(uri: &str) -> Option<String> {
    let (_, query) = uri.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    query.split('&').find_map(|param| {
        let (key, value) = param.split_once('=')?;
        (percent_decode(key) == "remote-program" && !value.is_empty())
            .then(|| percent_decode(value))
    })
}

/// Decodes `%XX` escapes; a malformed escape stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `word` as one POSIX shell word.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./=:@%+,-".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{MachineFormat, MachineName};

    fn machine(uri: &str) -> Machine {
        Machine {
            name: MachineName::new(uri).expect("name"),
            format: MachineFormat::Nix,
            store_uri: uri.to_owned(),
            host: Some("host".to_owned()),
            systems: Default::default(),
            user: None,
            port: None,
            private_key: None,
            max_jobs: 1,
            speed_factor: 1.0,
            supported_features: Default::default(),
            mandatory_features: Default::default(),
            host_key: None,
            guix: None,
        }
    }

    #[test]
    fn remote_command_defaults_to_sandoff_serve() {
        assert_eq!(
            remote_command(&machine("ssh://root@host")),
            "sandoff serve --stdio --write"
        );
        assert_eq!(
            remote_command(&machine("ssh://root@host?compress=true")),
            "sandoff serve --stdio --write"
        );
    }

    #[test]
    fn remote_command_uses_remote_program() {
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=/bin/nix-store")),
            "/bin/nix-store --serve --write"
        );
        assert_eq!(
            remote_command(&machine(
                "ssh://h?compress=true&remote-program=%2Fopt%2Fnix%2Fbin%2Fnix-store"
            )),
            "/opt/nix/bin/nix-store --serve --write"
        );
        // Words are quoted one by one; arguments survive.
        assert_eq!(
            remote_command(&machine(
                "ssh://h?remote-program=nix-store%20--store%20/x%20y"
            )),
            "nix-store --store /x y --serve --write"
        );
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=/my%24dir/it's")),
            r"'/my$dir/it'\''s' --serve --write"
        );
        // An empty value is no program.
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=")),
            "sandoff serve --stdio --write"
        );
    }

    #[test]
    fn percent_decoding_leaves_malformed_escapes() {
        assert_eq!(percent_decode("a%2Fb%2fc"), "a/b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
