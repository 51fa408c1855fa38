//! Derivations as JSON, in the shape `nix show-derivation` of Nix 2.8 prints:
//!
//! ```text
//! {
//!   "/nix/store/…-hello.drv": {
//!     "outputs": { "out": { "path": "/nix/store/…-hello" } },
//!     "inputSrcs": [ … ], "inputDrvs": { "/nix/store/…-dep.drv": [ "out" ] },
//!     "system": "…", "builder": "…", "args": [ … ], "env": { … }
//!   }
//! }
//! ```
//!
//! A fixed output adds `"hashAlgo": "r:sha256"` and `"hash": "<hex>"`; a
//! floating one has only `hashAlgo`; an impure one `hashAlgo` and
//! `"impure": true`; a deferred one is `{}`.
//!
//! # Writing: byte for byte as Nix 2.8
//!
//! [`show`] reproduces Nix's own JSON writer (`libutil/json.cc`), not a
//! generic one: two-space indentation, `": "`, `{}`/`[]` when empty, a final
//! newline; in strings `"` `\` LF CR TAB get short escapes, other bytes below
//! 0x20 `\u00xx` (lowercase), and **every other byte is written raw**. So a
//! derivation whose strings are not UTF-8 (latin1 env values, say) gives the
//! same bytes Nix 2.8 gives, which are not valid UTF-8 JSON; we chose fidelity
//! to Nix over repairing the output, since a lossy escape would silently
//! change the derivation for anyone who reads it back.
//!
//! # Reading: UTF-8 JSON only
//!
//! [`from_json`] reads standard JSON with `serde_json`, so it refuses input
//! that is not UTF-8 (with the line and column). Derivations holding
//! non-UTF-8 bytes therefore cannot be added from JSON; their `.drv` files
//! still parse, print and hash exactly.

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

use super::{Derivation, DerivationError, DerivationOutput, FixedPaths, RawDerivation, RawOutput};
use crate::store::{StoreDir, StorePath};

/// Why derivation JSON was refused.
#[derive(Debug, Error)]
pub enum JsonError {
    #[error("derivation JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    #[error("derivation JSON: expected a derivation object (with \"outputs\") or a map with one entry from a .drv path to it")]
    Shape,
    #[error("derivation JSON: {0}")]
    Invalid(#[from] DerivationError),
}

/// Nix's JSON writer: pretty-printed, bytes passed through.
struct Writer {
    out: Vec<u8>,
    /// One entry per open container: whether nothing was written in it yet.
    first: Vec<bool>,
}

impl Writer {
    fn open(&mut self, c: u8) {
        self.out.push(c);
        self.first.push(true);
    }

    fn close(&mut self, c: u8) {
        let empty = self.first.pop().unwrap_or(true);
        if !empty {
            self.newline();
        }
        self.out.push(c);
    }

    fn newline(&mut self) {
        self.out.push(b'\n');
        self.out.resize(self.out.len() + 2 * self.first.len(), b' ');
    }

    fn comma(&mut self) {
        if let Some(first) = self.first.last_mut() {
            if *first {
                *first = false;
            } else {
                self.out.push(b',');
            }
        }
        self.newline();
    }

    fn string(&mut self, s: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.out.push(b'"');
        for &b in s {
            match b {
                b'"' | b'\\' => self.out.extend_from_slice(&[b'\\', b]),
                b'\n' => self.out.extend_from_slice(b"\\n"),
                b'\r' => self.out.extend_from_slice(b"\\r"),
                b'\t' => self.out.extend_from_slice(b"\\t"),
                0..=0x1f => {
                    self.out.extend_from_slice(b"\\u00");
                    self.out.push(HEX[(b >> 4) as usize]);
                    self.out.push(HEX[(b & 0xf) as usize]);
                }
                _ => self.out.push(b),
            }
        }
        self.out.push(b'"');
    }

    fn key(&mut self, k: &[u8]) {
        self.comma();
        self.string(k);
        self.out.extend_from_slice(b": ");
    }

    fn attr(&mut self, k: &str, v: &[u8]) {
        self.key(k.as_bytes());
        self.string(v);
    }

    fn elem(&mut self, v: &[u8]) {
        self.comma();
        self.string(v);
    }
}

/// The output of `nix show-derivation` for these derivations, keyed (and so
/// ordered) by their `.drv` paths.
pub fn show(drvs: &BTreeMap<StorePath, Derivation>, dir: &StoreDir) -> Vec<u8> {
    let mut w = Writer {
        out: Vec::new(),
        first: Vec::new(),
    };
    w.open(b'{');
    for (path, drv) in drvs {
        w.key(dir.display(path).as_bytes());
        write_derivation(&mut w, drv, dir);
    }
    w.close(b'}');
    w.out.push(b'\n');
    w.out
}

fn write_derivation(w: &mut Writer, drv: &Derivation, dir: &StoreDir) {
    w.open(b'{');
    w.key(b"outputs");
    w.open(b'{');
    for (name, output) in &drv.outputs {
        w.key(name.as_str().as_bytes());
        w.open(b'{');
        if let Some(p) = output.path() {
            w.attr("path", dir.display(p).as_bytes());
        }
        match output {
            DerivationOutput::CAFixed { .. } => {
                w.attr("hashAlgo", output.hash_algo().as_bytes());
                w.attr("hash", output.hash_field().as_bytes());
            }
            DerivationOutput::CAFloating { .. } => {
                w.attr("hashAlgo", output.hash_algo().as_bytes())
            }
            DerivationOutput::Impure { .. } => {
                w.attr("hashAlgo", output.hash_algo().as_bytes());
                w.key(b"impure");
                w.out.extend_from_slice(b"true");
            }
            DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred => {}
        }
        w.close(b'}');
    }
    w.close(b'}');
    w.key(b"inputSrcs");
    w.open(b'[');
    for p in &drv.input_sources {
        w.elem(dir.display(p).as_bytes());
    }
    w.close(b']');
    w.key(b"inputDrvs");
    w.open(b'{');
    for (p, outs) in &drv.input_derivations {
        w.key(dir.display(p).as_bytes());
        w.open(b'[');
        for o in outs {
            w.elem(o.as_str().as_bytes());
        }
        w.close(b']');
    }
    w.close(b'}');
    w.attr("system", &drv.system);
    w.attr("builder", &drv.builder);
    w.key(b"args");
    w.open(b'[');
    for a in &drv.args {
        w.elem(a);
    }
    w.close(b']');
    w.key(b"env");
    w.open(b'{');
    for (k, v) in &drv.env {
        w.key(k);
        w.string(v);
    }
    w.close(b'}');
    w.close(b'}');
}

/// One derivation as JSON: the permissive form (every output field optional).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDerivation {
    outputs: BTreeMap<String, JsonOutput>,
    #[serde(rename = "inputSrcs")]
    input_srcs: Vec<String>,
    #[serde(rename = "inputDrvs")]
    input_drvs: BTreeMap<String, Vec<String>>,
    system: String,
    builder: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOutput {
    #[serde(default)]
    path: String,
    #[serde(default, rename = "hashAlgo")]
    hash_algo: String,
    #[serde(default)]
    hash: String,
    #[serde(default)]
    impure: bool,
}

impl From<JsonDerivation> for RawDerivation {
    fn from(j: JsonDerivation) -> RawDerivation {
        let b = |s: String| s.into_bytes();
        RawDerivation {
            outputs: j
                .outputs
                .into_iter()
                .map(|(name, o)| RawOutput {
                    name: b(name),
                    path: b(o.path),
                    hash_algo: b(o.hash_algo),
                    hash: if o.impure {
                        b"impure".to_vec()
                    } else {
                        b(o.hash)
                    },
                })
                .collect(),
            input_derivations: j
                .input_drvs
                .into_iter()
                .map(|(p, outs)| (b(p), outs.into_iter().map(b).collect()))
                .collect(),
            input_sources: j.input_srcs.into_iter().map(b).collect(),
            system: b(j.system),
            builder: b(j.builder),
            args: j.args.into_iter().map(b).collect(),
            env: j.env.into_iter().map(|(k, v)| (b(k), b(v))).collect(),
        }
    }
}

/// Reads one derivation from JSON: either the derivation object itself
/// (`{"outputs": …}`) or a whole `nix show-derivation` map with exactly one
/// entry, whose key is returned too. Output paths may be empty (fixed ones
/// are computed here; input-addressed ones become
/// [`DerivationOutput::Deferred`], to be filled by
/// [`Derivation::fill_output_paths`]).
pub fn from_json(bytes: &[u8], dir: &StoreDir) -> Result<(Option<String>, Derivation), JsonError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    let serde_json::Value::Object(map) = value else {
        return Err(JsonError::Shape);
    };
    let (key, value) = if map.contains_key("outputs") {
        (None, serde_json::Value::Object(map))
    } else {
        let mut entries = map.into_iter();
        match (entries.next(), entries.next()) {
            (Some((k, v @ serde_json::Value::Object(_))), None) => (Some(k), v),
            _ => return Err(JsonError::Shape),
        }
    };
    let json: JsonDerivation = serde_json::from_value(value)?;
    let drv = Derivation::from_raw(json.into(), dir, FixedPaths::MayCompute)?;
    Ok((key, drv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::testdata::{nix, HELLO};

    #[test]
    fn escapes_strings_as_nix_does() {
        let mut w = Writer {
            out: Vec::new(),
            first: Vec::new(),
        };
        w.string(b"\"\\\n\r\t\x01\x08\x0c\x1f\x7f\xe9\xc3\xa9");
        assert_eq!(
            w.out,
            b"\"\\\"\\\\\\n\\r\\t\\u0001\\u0008\\u000c\\u001f\x7f\xe9\xc3\xa9\""
        );
    }

    #[test]
    fn empty_containers_stay_on_one_line() {
        assert_eq!(show(&BTreeMap::new(), &nix()), b"{}\n");
    }

    #[test]
    fn json_round_trips() {
        let drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let path = drv.drv_path(&nix()).unwrap();
        let json = show(&[(path.clone(), drv.clone())].into(), &nix());
        let (key, back) = from_json(&json, &nix()).unwrap();
        assert_eq!(key.as_deref(), Some(nix().display(&path).as_str()));
        assert_eq!(back, drv);
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let inner = serde_json::to_vec(&value[nix().display(&path)]).unwrap();
        assert_eq!(from_json(&inner, &nix()).unwrap(), (None, drv));
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [&b"[]"[..], b"{}", b"{\"a\": {}, \"b\": {}}", b"{\"a\": 1}"] {
            assert!(
                from_json(bad, &nix()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let err = from_json(b"{\"outputs\": {}, \"bogus\": 1}", &nix()).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        assert!(matches!(
            from_json(b"{\"x\": \"\xe9\"}", &nix()),
            Err(JsonError::Syntax(_))
        ));
    }
}
