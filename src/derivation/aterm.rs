//! The ATerm syntax of `.drv` files (formats.md §5), read and written byte
//! for byte as Nix 2.8 does.
//!
//! ```text
//! Derive([("out","/nix/store/…-hello","","")],[("/nix/store/…-dep.drv",["out"])],
//!        ["/nix/store/…-src"],"x86_64-linux","/bin/sh",["-c","…"],[("name","hello")])
//! ```
//!
//! Only the builder, the args and the env keys and values are escaped (`"`
//! `\` LF CR TAB); every other field is quoted as is. The reader is stricter
//! than Nix's, so that whatever it accepts prints back identically: it
//! refuses escapes in the unescaped fields, unsorted or duplicate entries,
//! stray commas and trailing bytes. The format is flat, so the reader is a
//! loop, not a recursion.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::{Derivation, DerivationError, OutputName, RawDerivation, RawOutput};
use crate::store::StoreDir;

/// Why a `.drv` could not be read.
#[derive(Debug, Error)]
pub enum AtermError {
    #[error("derivation: expected '{expected}' at byte {pos}")]
    Expected { expected: &'static str, pos: usize },
    #[error("derivation: escape '\\{byte}' is not one Nix writes (only \\\" \\\\ \\n \\r \\t) at byte {pos}")]
    BadEscape { byte: char, pos: usize },
    #[error("derivation: raw {what} in an escaped string (Nix writes it escaped) at byte {pos}")]
    Unescaped { what: &'static str, pos: usize },
    #[error("derivation: expected ',' or ']' at byte {pos}")]
    ExpectedSeparator { pos: usize },
    #[error("derivation: unexpected end of input at byte {pos}")]
    Eof { pos: usize },
    #[error(
        "derivation: escape sequence in the {field} (which Nix writes unescaped) at byte {pos}"
    )]
    EscapeInRawField { field: &'static str, pos: usize },
    #[error("derivation: {what} not sorted or duplicated: '{key}' after '{prev}' at byte {pos}")]
    NotSorted {
        what: &'static str,
        key: String,
        prev: String,
        pos: usize,
    },
    #[error("derivation: trailing bytes after the closing ')' at byte {pos}")]
    Trailing { pos: usize },
    #[error("derivation: {0}")]
    Invalid(#[source] DerivationError),
}

/// Whether a string is written with escapes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// `printString`: builder, args, env.
    Escaped,
    /// `printUnquotedString`: everything else; the name says which field.
    Raw(&'static str),
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Result<u8, AtermError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(AtermError::Eof { pos: self.pos })
    }

    fn expect(&mut self, lit: &'static str) -> Result<(), AtermError> {
        if self.input[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else if self.pos + lit.len() > self.input.len()
            && lit.as_bytes().starts_with(&self.input[self.pos..])
        {
            Err(AtermError::Eof {
                pos: self.input.len(),
            })
        } else {
            Err(AtermError::Expected {
                expected: lit,
                pos: self.pos,
            })
        }
    }

    fn string(&mut self, quoting: Quoting) -> Result<Vec<u8>, AtermError> {
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let rest = &self.input[self.pos..];
            let stop =
                rest.iter()
                    .position(|&b| b == b'"' || b == b'\\')
                    .ok_or(AtermError::Eof {
                        pos: self.input.len(),
                    })?;
            if quoting == Quoting::Escaped {
                if let Some(i) = rest[..stop].iter().position(|b| b"\n\r\t".contains(b)) {
                    let what = match rest[i] {
                        b'\n' => "newline",
                        b'\r' => "carriage return",
                        _ => "tab",
                    };
                    return Err(AtermError::Unescaped {
                        what,
                        pos: self.pos + i,
                    });
                }
            }
            out.extend_from_slice(&rest[..stop]);
            self.pos += stop;
            if self.input[self.pos] == b'"' {
                self.pos += 1;
                return Ok(out);
            }
            if let Quoting::Raw(field) = quoting {
                return Err(AtermError::EscapeInRawField {
                    field,
                    pos: self.pos,
                });
            }
            let c = *self.input.get(self.pos + 1).ok_or(AtermError::Eof {
                pos: self.input.len(),
            })?;
            // Nix reads `\X` as X for any X, but writes only these five.
            out.push(match c {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'"' | b'\\' => c,
                _ => {
                    return Err(AtermError::BadEscape {
                        byte: c as char,
                        pos: self.pos,
                    })
                }
            });
            self.pos += 2;
        }
    }

    /// Reads `[item,item,...]`, calling `item` for each; `[` already read.
    fn list_items(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), AtermError>,
    ) -> Result<(), AtermError> {
        if self.peek()? == b']' {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(AtermError::ExpectedSeparator { pos: self.pos }),
            }
        }
    }

    fn string_list(&mut self, quoting: Quoting) -> Result<Vec<Vec<u8>>, AtermError> {
        self.expect("[")?;
        let mut items = Vec::new();
        self.list_items(|r| {
            items.push(r.string(quoting)?);
            Ok(())
        })?;
        Ok(items)
    }
}

/// Checks that keys come strictly ascending (Nix writes sorted maps and sets).
fn check_order(
    what: &'static str,
    prev: Option<&[u8]>,
    key: &[u8],
    pos: usize,
) -> Result<(), AtermError> {
    match prev {
        Some(p) if p >= key => Err(AtermError::NotSorted {
            what,
            key: String::from_utf8_lossy(key).into_owned(),
            prev: String::from_utf8_lossy(p).into_owned(),
            pos,
        }),
        _ => Ok(()),
    }
}

/// Reads the syntax of a `.drv` into its raw form.
pub fn parse(input: &[u8]) -> Result<RawDerivation, AtermError> {
    let mut r = Reader { input, pos: 0 };
    let mut drv = RawDerivation::default();
    r.expect("Derive([")?;
    r.list_items(|r| {
        let pos = r.pos;
        r.expect("(")?;
        let name = r.string(Quoting::Raw("output name"))?;
        check_order(
            "output names",
            drv.outputs.last().map(|o| o.name.as_slice()),
            &name,
            pos,
        )?;
        r.expect(",")?;
        let path = r.string(Quoting::Raw("output path"))?;
        r.expect(",")?;
        let hash_algo = r.string(Quoting::Raw("output hash algorithm"))?;
        r.expect(",")?;
        let hash = r.string(Quoting::Raw("output hash"))?;
        r.expect(")")?;
        drv.outputs.push(RawOutput {
            name,
            path,
            hash_algo,
            hash,
        });
        Ok(())
    })?;
    r.expect(",[")?;
    r.list_items(|r| {
        let pos = r.pos;
        r.expect("(")?;
        let path = r.string(Quoting::Raw("input derivation path"))?;
        check_order(
            "input derivations",
            drv.input_derivations.last().map(|(p, _)| p.as_slice()),
            &path,
            pos,
        )?;
        r.expect(",")?;
        let pos = r.pos;
        let outs = r.string_list(Quoting::Raw("input derivation output"))?;
        for w in outs.windows(2) {
            check_order("input derivation outputs", Some(&w[0]), &w[1], pos)?;
        }
        r.expect(")")?;
        drv.input_derivations.push((path, outs));
        Ok(())
    })?;
    r.expect(",")?;
    let pos = r.pos;
    drv.input_sources = r.string_list(Quoting::Raw("input source"))?;
    for w in drv.input_sources.windows(2) {
        check_order("input sources", Some(&w[0]), &w[1], pos)?;
    }
    r.expect(",")?;
    drv.system = r.string(Quoting::Raw("system"))?;
    r.expect(",")?;
    drv.builder = r.string(Quoting::Escaped)?;
    r.expect(",")?;
    drv.args = r.string_list(Quoting::Escaped)?;
    r.expect(",[")?;
    r.list_items(|r| {
        let pos = r.pos;
        r.expect("(")?;
        let key = r.string(Quoting::Escaped)?;
        check_order(
            "environment variables",
            drv.env.last().map(|(k, _)| k.as_slice()),
            &key,
            pos,
        )?;
        r.expect(",")?;
        let value = r.string(Quoting::Escaped)?;
        r.expect(")")?;
        drv.env.push((key, value));
        Ok(())
    })?;
    r.expect(")")?;
    if r.pos != input.len() {
        return Err(AtermError::Trailing { pos: r.pos });
    }
    Ok(drv)
}

/// `printString`: quoted, with `"` `\` LF CR TAB escaped.
fn escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// `printUnquotedString`: quoted, nothing escaped.
fn raw(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

fn list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut each: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(b']');
}

/// `Derivation::unparse`. With `mask_outputs`, output paths and the env
/// variables named after outputs are written empty; `inputs`, when given,
/// replaces the input derivations (hashDerivationModulo writes the hex
/// modulo hashes of the inputs there).
pub(crate) fn print(
    drv: &Derivation,
    dir: &StoreDir,
    mask_outputs: bool,
    inputs: Option<&BTreeMap<String, BTreeSet<OutputName>>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"Derive(");
    list(&mut out, &drv.outputs, |out, (name, o)| {
        out.push(b'(');
        raw(out, name.as_str().as_bytes());
        out.push(b',');
        let path = match o.path() {
            Some(p) if !mask_outputs => dir.display(p),
            _ => String::new(),
        };
        raw(out, path.as_bytes());
        out.push(b',');
        raw(out, o.hash_algo().as_bytes());
        out.push(b',');
        raw(out, o.hash_field().as_bytes());
        out.push(b')');
    });
    out.push(b',');
    let input_pair = |out: &mut Vec<u8>, key: &[u8], outs: &BTreeSet<OutputName>| {
        out.push(b'(');
        raw(out, key);
        out.push(b',');
        list(out, outs, |out, o| raw(out, o.as_str().as_bytes()));
        out.push(b')');
    };
    match inputs {
        Some(inputs) => list(&mut out, inputs, |out, (k, outs)| {
            input_pair(out, k.as_bytes(), outs)
        }),
        None => list(&mut out, &drv.input_derivations, |out, (p, outs)| {
            input_pair(out, dir.display(p).as_bytes(), outs)
        }),
    }
    out.push(b',');
    list(&mut out, &drv.input_sources, |out, p| {
        raw(out, dir.display(p).as_bytes())
    });
    out.push(b',');
    raw(&mut out, &drv.system);
    out.push(b',');
    escaped(&mut out, &drv.builder);
    out.push(b',');
    list(&mut out, &drv.args, |out, a| escaped(out, a));
    out.push(b',');
    list(&mut out, &drv.env, |out, (k, v)| {
        out.push(b'(');
        escaped(out, k);
        out.push(b',');
        let masked = mask_outputs
            && std::str::from_utf8(k).is_ok_and(|k| drv.outputs.keys().any(|o| o.as_str() == k));
        escaped(out, if masked { b"" } else { v });
        out.push(b')');
    });
    out.push(b')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::testdata::{nix, HELLO};

    #[test]
    fn round_trips_the_reference_vector() {
        let drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        assert_eq!(drv.to_aterm(&nix()), HELLO);
        assert_eq!(
            drv.args,
            [b"sh".to_vec(), b"-c".to_vec(), b"echo hi > $out".to_vec()]
        );
        assert_eq!(drv.env_name().unwrap(), "hello");
    }

    #[test]
    fn escapes_only_five_bytes_in_escaped_fields() {
        let mut drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        drv.args = vec![b"\"\\\n\r\t\x01\x7f\xe9".to_vec()];
        let printed = drv.to_aterm(&nix());
        let needle = b"[\"\\\"\\\\\\n\\r\\t\x01\x7f\xe9\"]";
        assert!(printed.windows(needle.len()).any(|w| w == needle));
        assert_eq!(Derivation::from_aterm(&printed, &nix()).unwrap(), drv);
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut input = HELLO.to_vec();
        input.push(b'\n');
        assert!(matches!(parse(&input), Err(AtermError::Trailing { pos }) if pos == HELLO.len()));
    }

    #[test]
    fn reports_positions() {
        let err = parse(b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\",\"b\",[],[(\"a\",\"1\")]x")
            .unwrap_err();
        assert!(matches!(err, AtermError::Expected { pos: 54, .. }), "{err}");
        assert!(matches!(
            parse(b"Derive([(\"out\""),
            Err(AtermError::Eof { .. })
        ));
        assert!(matches!(parse(b"Deriv"), Err(AtermError::Eof { .. })));
        assert!(matches!(
            parse(b"Derive([,]"),
            Err(AtermError::Expected { pos: 8, .. })
        ));
    }

    #[test]
    fn rejects_unsorted_and_duplicate_env() {
        let input = b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\",\"b\",[],[(\"b\",\"1\"),(\"a\",\"2\")])";
        assert!(matches!(parse(input), Err(AtermError::NotSorted { .. })));
        let input = b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\",\"b\",[],[(\"a\",\"1\"),(\"a\",\"2\")])";
        let err = parse(input).unwrap_err();
        assert_eq!(
            err.to_string(),
            "derivation: environment variables not sorted or duplicated: 'a' after 'a' at byte 54"
        );
    }

    /// Found by `aterm_parser_survives_mutations`: `\<NUL>` read as NUL
    /// printed back without the backslash.
    #[test]
    fn rejects_escapes_nix_never_writes() {
        let input = b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\",\"a\\\x00b\",[],[])";
        assert!(
            matches!(
                parse(input),
                Err(AtermError::BadEscape {
                    byte: '\0',
                    pos: 38
                })
            ),
            "{:?}",
            parse(input)
        );
        let input = b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\",\"a\nb\",[],[])";
        assert!(
            matches!(
                parse(input),
                Err(AtermError::Unescaped {
                    what: "newline",
                    pos: 38
                })
            ),
            "{:?}",
            parse(input)
        );
    }

    #[test]
    fn rejects_escapes_in_raw_fields() {
        let input = b"Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\\\\y\",\"b\",[],[])";
        assert!(matches!(
            parse(input),
            Err(AtermError::EscapeInRawField {
                field: "system",
                ..
            })
        ));
    }

    #[test]
    fn rejects_store_paths_outside_the_store_dir() {
        let gnu = StoreDir::new("/gnu/store").unwrap();
        assert!(matches!(
            Derivation::from_aterm(HELLO, &gnu),
            Err(AtermError::Invalid(DerivationError::BadStorePath { .. }))
        ));
    }

    #[test]
    fn masks_outputs_for_hashing() {
        let drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let masked = print(&drv, &nix(), true, None);
        let s = String::from_utf8(masked).unwrap();
        assert!(s.starts_with(r#"Derive([("out","","","")]"#));
        assert!(s.contains(r#"("out","")"#));
    }
}
