//! The command that starts the serve protocol on a machine, the command
//! that learns a stock Nix machine's store directory first, and their shell
//! quoting: pure, so that what reaches the remote shell is tested here.
//!
//! # Agreeing on the store directory
//!
//! Nix's serve protocol never says which store directory a side names its
//! paths in, so a `/gnu/store` client and a `/nix/store` machine would
//! only find out on the first path, with a confusing error, or not at all.
//! The directory is therefore agreed before anything is sent:
//!
//! - A sandoff machine gets the client's directory on its command line,
//!   `sandoff serve --stdio --write --expect-store-dir DIR`, and refuses
//!   before the handshake when its own differs, with a line the client
//!   recognises ([`StoreDirMismatch`](crate::serve_protocol::StoreDirMismatch)).
//!   The check costs nothing (no extra command), and it is made by the very
//!   process that then serves, so it cannot disagree with it.
//! - A stock Nix machine (a `remote-program` that is not sandoff) knows no
//!   such option, so its directory is asked first, on the same SSH
//!   connection: [`store_dir_probe`] runs the same program, with the same
//!   arguments and environment as the serve session will have, as
//!   `<program> --print-fixed-path sha256 <zeros> sandoff-store-dir-probe`.
//!   That prints the path such a fixed output would have in its store
//!   (`nix-store` has had the operation since 1.x; it needs no evaluator,
//!   no daemon features and writes nothing). The path's hash depends on
//!   the store directory, so [`parse_store_dir_probe`] checks the answer
//!   against the path computed here for the directory it names: a program
//!   that printed something else is not believed. The alternatives were
//!   worse: `nix-instantiate --eval builtins.storeDir` needs a second
//!   program next to `nix-store` (and the evaluator), `NIX_STORE_DIR` is
//!   only one of the ways a store directory is set (`nix.conf`, `--store
//!   local?store=…`), and reading it from a `QueryValidPaths` answer means
//!   sending a path first, which a Nix server with another directory
//!   answers by dying.

use crate::decide::Machine;
use crate::remote::compress::{compress_arg, WireCompression};
use crate::store::{FileIngestionMethod, Hash, HashAlgo, StoreDir};

/// The name of the path [`store_dir_probe`] asks for.
const PROBE_NAME: &str = "sandoff-store-dir-probe";

/// Why the answer to [`store_dir_probe`] names no store directory.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The program failed (not `nix-store`? an old one?).
    #[error("it exited with status {status}: {stderr}")]
    Failed { status: i32, stderr: String },
    /// The answer is not `<dir>/<hash>-sandoff-store-dir-probe`.
    #[error("it printed {got:?}, not a store path")]
    NotAPath { got: String },
    /// The answer names a directory, but its hash is not the one a store
    /// there gives the probe: not a `nix-store` answer.
    #[error("it printed '{got}', but in {dir} the path is '{expected}'")]
    WrongPath {
        got: String,
        dir: StoreDir,
        expected: String,
    },
}

/// The command that starts the serve protocol on `machine` for a client
/// whose store directory is `dir`. Nix runs `<remote-program> --serve
/// --write` when the store URI has a `remote-program` parameter
/// (`ssh://host?remote-program=/bin/nix-store`), and so does this, unless
/// the program is sandoff (its file name is `sandoff`); sandoff is run as
/// `<sandoff> serve --stdio --write --expect-store-dir <dir>` (see the
/// module docs). The program's words are shell-quoted one by one, so a
/// program with arguments still works (as the value was pasted unquoted
/// into a command line in Nix 2.8).
///
/// When the streams are to be zstd-compressed ([`wire_compression`]),
/// sandoff also gets `--compress zstd:LEVEL` (see
/// [`crate::remote::compress`]); a stock Nix program never does.
pub fn remote_command(machine: &Machine, dir: &StoreDir) -> String {
    let zstd = match wire_compression(machine) {
        WireCompression::Zstd { level } => Some(level),
        WireCompression::None | WireCompression::SshZlib => None,
    };
    remote_command_with(machine, dir, zstd)
}

/// [`remote_command`] asking a sandoff program for zstd at `zstd` (or not
/// at all), whatever the entry says: for a second try without `--compress`
/// at a sandoff too old to know it.
pub fn remote_command_with(machine: &Machine, dir: &StoreDir, zstd: Option<i32>) -> String {
    let compress = match zstd {
        Some(level) => format!(" --compress {}", compress_arg(level)),
        None => String::new(),
    };
    let sandoff = |program: &str| {
        format!(
            "{program} serve --stdio --write --expect-store-dir {}{compress}",
            shell_quote(dir.as_str())
        )
    };
    match remote_program(&machine.store_uri) {
        Some(words) if is_sandoff(&words) => sandoff(&quoted(&words)),
        Some(words) => format!("{} --serve --write", quoted(&words)),
        None => sandoff("sandoff"),
    }
}

/// How the streams to `machine` are compressed: zstd when its serve
/// program is sandoff (unless its entry turns compression off), SSH zlib
/// when it is a stock Nix program and its entry asks for compression.
pub fn wire_compression(machine: &Machine) -> WireCompression {
    let sandoff_peer = remote_program(&machine.store_uri).is_none_or(|w| is_sandoff(&w));
    WireCompression::choose(machine.compression, sandoff_peer)
}

/// The command that prints the store directory of `machine`'s serve
/// program, when that program cannot check it itself: a stock Nix
/// `remote-program`. `None` for sandoff, which checks the client's
/// directory before the handshake. Its output goes to
/// [`parse_store_dir_probe`].
pub fn store_dir_probe(machine: &Machine) -> Option<String> {
    let words = remote_program(&machine.store_uri).filter(|w| !is_sandoff(w))?;
    Some(format!(
        "{} --print-fixed-path sha256 {} {PROBE_NAME}",
        quoted(&words),
        probe_hash().to_base16()
    ))
}

/// The store directory in what [`store_dir_probe`] printed: its first
/// line, a store path whose hash must be the one that directory gives.
pub fn parse_store_dir_probe(out: &[u8]) -> Result<StoreDir, ProbeError> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().next().unwrap_or("").trim();
    let not_a_path = || ProbeError::NotAPath {
        got: text.chars().take(200).collect(),
    };
    let (dir, base) = line.rsplit_once('/').ok_or_else(not_a_path)?;
    if !base.ends_with(&format!("-{PROBE_NAME}")) {
        return Err(not_a_path());
    }
    let dir = StoreDir::new(dir).map_err(|_| not_a_path())?;
    let expected = dir
        .make_fixed_output_path(
            FileIngestionMethod::Flat,
            &probe_hash(),
            PROBE_NAME,
            [],
            false,
        )
        .map(|p| dir.display(&p))
        .map_err(|_| not_a_path())?;
    if expected != line {
        return Err(ProbeError::WrongPath {
            got: line.to_owned(),
            dir,
            expected,
        });
    }
    Ok(dir)
}

/// The hash the probe asks about: any will do; zeros say it is no content.
fn probe_hash() -> Hash {
    Hash::from_bytes(HashAlgo::Sha256, &[0; 32]).expect("32 bytes is a sha256 digest")
}

/// Whether the program (its words) is sandoff: its file name says so.
fn is_sandoff(words: &[String]) -> bool {
    words
        .first()
        .and_then(|w| w.rsplit('/').next())
        .is_some_and(|name| name == "sandoff")
}

/// The `remote-program` of a store URI, as words.
fn remote_program(uri: &str) -> Option<Vec<String>> {
    let program = remote_program_value(uri)?;
    let words: Vec<String> = program.split_whitespace().map(str::to_owned).collect();
    (!words.is_empty()).then_some(words)
}

/// `words` as one shell command line, each quoted.
fn quoted(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    quoted.join(" ")
}

/// The decoded `remote-program` query parameter of a store URI, if any.
fn remote_program_value(uri: &str) -> Option<String> {
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
    use crate::decide::nix_format::{self, NoIncludes};

    fn machine(uri: &str) -> Machine {
        let line = format!("{uri} x86_64-linux\n");
        nix_format::parse(&line, "machines", "x86_64-linux", &NoIncludes)
            .expect("parses")
            .remove(0)
    }

    fn nix() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn remote_command_defaults_to_sandoff_serve_checking_the_store_dir() {
        assert_eq!(
            remote_command(&machine("ssh://root@host?compress=false"), &nix()),
            "sandoff serve --stdio --write --expect-store-dir /nix/store"
        );
        let odd = StoreDir::new("/my store/it's").expect("store dir");
        assert_eq!(
            remote_command(&machine("ssh://root@host?compress=0"), &odd),
            r"sandoff serve --stdio --write --expect-store-dir '/my store/it'\''s'"
        );
        assert_eq!(store_dir_probe(&machine("ssh://root@host")), None);
    }

    #[test]
    fn remote_command_uses_remote_program() {
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=/bin/nix-store"), &nix()),
            "/bin/nix-store --serve --write"
        );
        assert_eq!(
            remote_command(
                &machine("ssh://h?compress=true&remote-program=%2Fopt%2Fnix%2Fbin%2Fnix-store"),
                &nix()
            ),
            "/opt/nix/bin/nix-store --serve --write"
        );
        // Words are quoted one by one; arguments survive.
        assert_eq!(
            remote_command(
                &machine("ssh://h?remote-program=nix-store%20--store%20/x%20y"),
                &nix()
            ),
            "nix-store --store /x y --serve --write"
        );
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=/my%24dir/it's"), &nix()),
            r"'/my$dir/it'\''s' --serve --write"
        );
        // An empty value is no program.
        assert_eq!(
            remote_command(&machine("ssh://h?remote-program=&compress=false"), &nix()),
            "sandoff serve --stdio --write --expect-store-dir /nix/store"
        );
    }

    #[test]
    fn sandoff_peers_are_asked_for_zstd_and_stock_nix_never() {
        // Unset: zstd at the default level with sandoff, nothing with Nix.
        let m = machine("ssh://root@host");
        assert_eq!(wire_compression(&m), WireCompression::Zstd { level: 1 });
        assert_eq!(
            remote_command(&m, &nix()),
            "sandoff serve --stdio --write --expect-store-dir /nix/store --compress zstd:1"
        );
        let m = machine("ssh://h?remote-program=/bin/nix-store");
        assert_eq!(wire_compression(&m), WireCompression::None);
        // Asked for: zstd with sandoff, SSH zlib with Nix.
        let m = machine("ssh://h?compress=true&remote-program=/opt/bin/sandoff");
        assert_eq!(wire_compression(&m), WireCompression::Zstd { level: 1 });
        assert!(remote_command(&m, &nix()).ends_with(" --compress zstd:1"));
        let m = machine("ssh://h?compress=true&remote-program=/bin/nix-store");
        assert_eq!(wire_compression(&m), WireCompression::SshZlib);
        assert_eq!(remote_command(&m, &nix()), "/bin/nix-store --serve --write");
        // Off: neither.
        let m = machine("ssh://h?compress=false");
        assert_eq!(wire_compression(&m), WireCompression::None);
        // The second try at an old sandoff, without --compress.
        assert_eq!(
            remote_command_with(&machine("ssh://h"), &nix(), None),
            "sandoff serve --stdio --write --expect-store-dir /nix/store"
        );
    }

    #[test]
    fn a_sandoff_remote_program_checks_the_store_dir_itself() {
        let gnu = StoreDir::new("/gnu/store").expect("store dir");
        let m = machine("ssh://h?remote-program=/opt/sandoff/bin/sandoff%20--store-root%20/srv");
        assert_eq!(
            remote_command(&m, &gnu),
            "/opt/sandoff/bin/sandoff --store-root /srv serve --stdio --write \
             --expect-store-dir /gnu/store --compress zstd:1"
        );
        assert_eq!(store_dir_probe(&m), None);
        // A name that merely contains "sandoff" is not sandoff.
        let m = machine("ssh://h?remote-program=/bin/sandoff-nix-store");
        assert_eq!(
            remote_command(&m, &gnu),
            "/bin/sandoff-nix-store --serve --write"
        );
        assert!(store_dir_probe(&m).is_some());
    }

    #[test]
    fn a_stock_nix_program_is_probed_with_its_own_arguments() {
        let m = machine("ssh://h?remote-program=nix-store%20--store%20/x%20y");
        assert_eq!(
            store_dir_probe(&m).as_deref(),
            Some(
                "nix-store --store /x y --print-fixed-path sha256 \
                 0000000000000000000000000000000000000000000000000000000000000000 \
                 sandoff-store-dir-probe"
            )
        );
    }

    #[test]
    fn probe_answers_of_nix_2_8_name_their_directory() {
        // What `[NIX_STORE_DIR=/gnu/store] nix-store --print-fixed-path sha256
        // <64 zeros> sandoff-store-dir-probe` of Nix 2.8.0 printed.
        assert_eq!(
            parse_store_dir_probe(
                b"/nix/store/6fm2nk551qcxz9msr5k6v6bw07lkrsyl-sandoff-store-dir-probe\n"
            ),
            Ok(nix())
        );
        assert_eq!(
            parse_store_dir_probe(
                b"/gnu/store/i1f2fbgrqqcw1g54y32qk3cmzj5hscgj-sandoff-store-dir-probe\n"
            ),
            Ok(StoreDir::new("/gnu/store").expect("store dir"))
        );
    }

    #[test]
    fn probe_answers_that_are_not_the_probe_path_are_refused() {
        for got in [
            &b""[..],
            b"\n",
            b"error: unknown flag '--print-fixed-path'\n",
            b"sandoff-store-dir-probe\n",
            b"relative/6fm2nk551qcxz9msr5k6v6bw07lkrsyl-sandoff-store-dir-probe\n",
            b"/nix/store/6fm2nk551qcxz9msr5k6v6bw07lkrsyl-other\n",
        ] {
            assert!(
                matches!(parse_store_dir_probe(got), Err(ProbeError::NotAPath { .. })),
                "{:?}",
                String::from_utf8_lossy(got)
            );
        }
        // The /nix/store answer under another directory: the hash gives it away.
        let e = parse_store_dir_probe(
            b"/gnu/store/6fm2nk551qcxz9msr5k6v6bw07lkrsyl-sandoff-store-dir-probe",
        );
        assert!(
            matches!(&e, Err(ProbeError::WrongPath { expected, .. })
                if expected == "/gnu/store/i1f2fbgrqqcw1g54y32qk3cmzj5hscgj-sandoff-store-dir-probe"),
            "{e:?}"
        );
    }

    #[test]
    fn percent_decoding_leaves_malformed_escapes() {
        assert_eq!(percent_decode("a%2Fb%2fc"), "a/b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
