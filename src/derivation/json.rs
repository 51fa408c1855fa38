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
//! # Reading: what `show` writes, byte for byte
//!
//! [`from_json`] reads JSON whose strings are bytes ([`super::bytejson`]):
//! raw non-UTF-8 bytes inside string literals stand for themselves, escapes
//! mean what JSON says. So whatever [`show`] (or Nix 2.8's
//! `nix show-derivation`) prints reads back as the same derivation, latin1
//! env values and all, and `derivation add` gives the same `.drv`.
//!
//! The derivation's name is not part of the 2.8 JSON (nor of the `.drv`):
//! [`from_json`] takes it as Nix does, see there.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::bytejson::{self, ByteJsonError, Value};
use super::{
    name_from_drv_path, Derivation, DerivationError, DerivationOutput, FixedPaths, RawDerivation,
    RawOutput,
};
use crate::store::path::check_name;
use crate::store::{StoreDir, StorePath};

/// Why derivation JSON was refused.
#[derive(Debug, Error)]
pub enum JsonError {
    #[error("derivation JSON: {0}")]
    Syntax(#[from] ByteJsonError),
    #[error("derivation JSON: unknown field '{0}'")]
    UnknownField(String),
    #[error("derivation JSON: missing field '{0}'")]
    MissingField(&'static str),
    #[error("derivation JSON: '{field}' is {got}, expected {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("derivation JSON: the .drv path key is not UTF-8: {0:?}")]
    KeyNotUtf8(Vec<u8>),
    #[error(
        "derivation JSON: \"name\" is '{name}' but the .drv path it is keyed by names '{key}'"
    )]
    NameMismatch { name: String, key: String },
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

/// One derivation read from JSON by [`from_json`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromJson {
    /// The `.drv` path the JSON was keyed by, as given (a whole
    /// `nix show-derivation` map), to be checked against the computed one.
    pub key: Option<String>,
    /// The derivation's name; see [`from_json`] for where it comes from.
    pub name: String,
    /// The derivation, output paths possibly still to fill in.
    pub derivation: Derivation,
}

/// Reads one derivation from JSON: either the derivation object itself
/// (`{"outputs": …}`) or a whole `nix show-derivation` map with exactly one
/// entry, whose key is returned too. Strings are bytes, as [`show`] writes
/// them (see [`super::bytejson`]). Output paths may be empty (fixed ones
/// are computed here; input-addressed ones become
/// [`DerivationOutput::Deferred`], to be filled by
/// [`Derivation::fill_output_paths_named`]).
///
/// The name is the one Nix would use: the object's `"name"` member if it
/// has one (Nix ≥ 2.15 writes and reads it: `Derivation::fromJSON`), else
/// the name of the `.drv` path it is keyed by (`nameFromPath`, as for any
/// derivation Nix reads), else the `name` variable of its environment (what
/// `derivationStrict` names it after). A name given twice must agree.
pub fn from_json(bytes: &[u8], dir: &StoreDir) -> Result<FromJson, JsonError> {
    let Value::Object(map) = bytejson::parse(bytes)? else {
        return Err(JsonError::Shape);
    };
    let (key, members) = if map.iter().any(|(k, _)| k == b"outputs") {
        (None, map)
    } else {
        let mut entries = map.into_iter();
        match (entries.next(), entries.next()) {
            (Some((k, Value::Object(members))), None) => {
                let k = String::from_utf8(k).map_err(|e| JsonError::KeyNotUtf8(e.into_bytes()))?;
                (Some(k), members)
            }
            _ => return Err(JsonError::Shape),
        }
    };
    let (given_name, raw) = read_derivation(members)?;
    let key_name = match &key {
        None => None,
        Some(k) => {
            let path = dir
                .parse_path(k)
                .map_err(|source| DerivationError::BadStorePath {
                    what: "derivation path",
                    path: k.clone(),
                    source,
                })?;
            Some(name_from_drv_path(&path)?.to_owned())
        }
    };
    let name = match (given_name, key_name) {
        (Some(n), Some(k)) if n != k => return Err(JsonError::NameMismatch { name: n, key: k }),
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            let env: BTreeMap<Vec<u8>, Vec<u8>> = raw.env.iter().cloned().collect();
            super::env_name(&env)?.to_owned()
        }
    };
    check_name(&name).map_err(|e| DerivationError::BadName(e.to_string()))?;
    let derivation = Derivation::from_raw(raw, dir, FixedPaths::MayCompute { name: &name })?;
    Ok(FromJson {
        key,
        name,
        derivation,
    })
}

/// The permissive form: every field a byte string, every output field
/// optional, unknown members refused. Returns the `name` member too.
fn read_derivation(
    members: Vec<(Vec<u8>, Value)>,
) -> Result<(Option<String>, RawDerivation), JsonError> {
    let mut raw = RawDerivation::default();
    let mut name = None;
    let mut seen = BTreeSet::new();
    for (k, v) in members {
        let field = String::from_utf8_lossy(&k).into_owned();
        match k.as_slice() {
            b"name" => {
                let n = string(&field, v)?;
                name = Some(
                    String::from_utf8(n)
                        .map_err(|_| DerivationError::BadName("not UTF-8".to_owned()))?,
                );
            }
            b"outputs" => {
                for (out, o) in object(&field, v)? {
                    let what = format!("outputs.{}", String::from_utf8_lossy(&out));
                    let mut output = RawOutput {
                        name: out,
                        ..RawOutput::default()
                    };
                    let mut impure = false;
                    for (ok, ov) in object(&what, o)? {
                        let f = format!("{what}.{}", String::from_utf8_lossy(&ok));
                        match ok.as_slice() {
                            b"path" => output.path = string(&f, ov)?,
                            b"hashAlgo" => output.hash_algo = string(&f, ov)?,
                            b"hash" => output.hash = string(&f, ov)?,
                            b"impure" => match ov {
                                Value::Bool(b) => impure = b,
                                other => return Err(wrong(&f, "a boolean", &other)),
                            },
                            _ => return Err(JsonError::UnknownField(f)),
                        }
                    }
                    if impure {
                        output.hash = b"impure".to_vec();
                    }
                    raw.outputs.push(output);
                }
            }
            b"inputSrcs" => raw.input_sources = strings(&field, v)?,
            b"inputDrvs" => {
                for (p, outs) in object(&field, v)? {
                    let f = format!("inputDrvs.{}", String::from_utf8_lossy(&p));
                    raw.input_derivations.push((p, strings(&f, outs)?));
                }
            }
            b"system" => raw.system = string(&field, v)?,
            b"builder" => raw.builder = string(&field, v)?,
            b"args" => raw.args = strings(&field, v)?,
            b"env" => {
                for (ek, ev) in object(&field, v)? {
                    let f = format!("env.{}", String::from_utf8_lossy(&ek));
                    raw.env.push((ek, string(&f, ev)?));
                }
            }
            _ => return Err(JsonError::UnknownField(field)),
        }
        seen.insert(k);
    }
    for required in [
        "outputs",
        "inputSrcs",
        "inputDrvs",
        "system",
        "builder",
        "args",
        "env",
    ] {
        if !seen.contains(required.as_bytes()) {
            return Err(JsonError::MissingField(required));
        }
    }
    Ok((name, raw))
}

fn wrong(field: &str, expected: &'static str, got: &Value) -> JsonError {
    JsonError::WrongType {
        field: field.to_owned(),
        expected,
        got: got.kind(),
    }
}

fn string(field: &str, v: Value) -> Result<Vec<u8>, JsonError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(wrong(field, "a string", &other)),
    }
}

fn strings(field: &str, v: Value) -> Result<Vec<Vec<u8>>, JsonError> {
    match v {
        Value::Array(items) => items.into_iter().map(|i| string(field, i)).collect(),
        other => Err(wrong(field, "an array of strings", &other)),
    }
}

fn object(field: &str, v: Value) -> Result<Vec<(Vec<u8>, Value)>, JsonError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(wrong(field, "an object", &other)),
    }
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
        let back = from_json(&json, &nix()).unwrap();
        assert_eq!(back.key.as_deref(), Some(nix().display(&path).as_str()));
        assert_eq!(back.name, "hello");
        assert_eq!(back.derivation, drv);
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let inner = serde_json::to_vec(&value[nix().display(&path)]).unwrap();
        let back = from_json(&inner, &nix()).unwrap();
        assert_eq!((back.key, back.name.as_str()), (None, "hello"));
        assert_eq!(back.derivation, drv);
    }

    #[test]
    fn non_utf8_json_round_trips() {
        let mut drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        drv.env.insert(
            b"caf\xe9".to_vec(),
            b"\xff\xfe latin1 \xe9\x01\x7f".to_vec(),
        );
        drv.args.push(b"\xe9t\xe9".to_vec());
        let path = drv.drv_path(&nix()).unwrap();
        let json = show(&[(path.clone(), drv.clone())].into(), &nix());
        assert!(std::str::from_utf8(&json).is_err(), "raw bytes, as Nix 2.8");
        let back = from_json(&json, &nix()).unwrap();
        assert_eq!(back.derivation, drv);
        assert_eq!(back.derivation.to_aterm(&nix()), drv.to_aterm(&nix()));
    }

    #[test]
    fn name_comes_from_json_then_key_then_env() {
        let drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let mut no_name = drv.clone();
        no_name.env.remove(b"name".as_slice());
        let path = no_name.drv_path_named("other", &nix()).unwrap();
        // Keyed by its path: the name is the path's, whatever the env says.
        let json = show(&[(path.clone(), no_name.clone())].into(), &nix());
        assert_eq!(from_json(&json, &nix()).unwrap().name, "other");
        // A bare object without a name member: only the env can tell.
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let mut inner = value[nix().display(&path)].clone();
        let err = from_json(&serde_json::to_vec(&inner).unwrap(), &nix()).unwrap_err();
        assert!(err.to_string().contains("no 'name' variable"), "{err}");
        // Nix ≥ 2.15's "name" member.
        inner["name"] = "other".into();
        let back = from_json(&serde_json::to_vec(&inner).unwrap(), &nix()).unwrap();
        assert_eq!((back.name.as_str(), back.derivation), ("other", no_name));
        let mut keyed = serde_json::Map::new();
        keyed.insert(nix().display(&path), inner.clone());
        inner["name"] = "hello".into();
        keyed.insert(nix().display(&path), inner);
        let err = from_json(&serde_json::to_vec(&keyed).unwrap(), &nix()).unwrap_err();
        assert!(matches!(err, JsonError::NameMismatch { .. }), "{err}");
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
            from_json(b"{\"x\": \"\xe9\n\"}", &nix()),
            Err(JsonError::Syntax(_))
        ));
    }
}
