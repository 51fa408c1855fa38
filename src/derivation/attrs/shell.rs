//! `.attrs.sh`: the structured attributes as bash `declare` lines, exactly
//! as Nix 2.8's `writeStructuredAttrsShell` writes them.
//!
//! Only what bash can hold is written: a top-level key that is a shell
//! variable name (`[A-Za-z_][A-Za-z0-9_]*`) whose value is a string,
//! integral number, null or Boolean (`declare k=v`), or an array or object
//! of those only (`declare -a k=(v v )`, `declare -A k=([k]=v [k]=v )`);
//! anything else (nested arrays, a key such as `foo-bar`, a fraction) is
//! left out without a word, as Nix does. Strings are single-quoted with
//! `'` written as `'\''` (Nix's `shellEscape`), which bash reads back
//! byte for byte whatever they hold: newlines, `$`, backquotes.
//!
//! Numbers follow Nix's C++ exactly, oddities included: a number is
//! written when it is integral as a 32-bit float (so 1.00000001 is written
//! as `1`), then converted to a 32-bit `int` (integers wrap modulo 2^32, as
//! `static_cast<int>` does; a float outside `int`'s range becomes
//! -2147483648, what x86-64 gives for that undefined conversion). Booleans
//! are `1` and the empty string, null is `''`.

use serde_json::{Map, Value};

/// Nix's `shellEscape`: `s` in single quotes, each `'` as `'\''`.
pub fn shell_escape(s: &str) -> String {
    let mut r = String::with_capacity(s.len() + 2);
    r.push('\'');
    for c in s.chars() {
        if c == '\'' {
            r.push_str("'\\''");
        } else {
            r.push(c);
        }
    }
    r.push('\'');
    r
}

/// Whether `key` is a shell variable name, as Nix's `shVarName` regex.
fn is_var_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A value bash can hold as one word, as Nix's `handleSimpleType`.
fn simple(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(shell_escape(s)),
        Value::Number(n) => {
            let as_float = n.as_f64().unwrap_or(f64::NAN) as f32;
            if as_float.ceil() != as_float {
                return None;
            }
            let int = if let Some(i) = n.as_i64() {
                i as i32
            } else if let Some(u) = n.as_u64() {
                u as i32
            } else {
                let d = n.as_f64().unwrap_or(f64::NAN);
                if (-2147483648.0..2147483648.0).contains(&d) {
                    d as i32
                } else {
                    i32::MIN
                }
            };
            Some(int.to_string())
        }
        Value::Null => Some("''".to_owned()),
        Value::Bool(b) => Some(if *b { "1" } else { "" }.to_owned()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Entries of an object in nlohmann's order (bytewise by key).
fn sorted(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    entries
}

/// The `.attrs.sh` text for the structured attributes `attrs`.
pub fn attrs_sh(attrs: &Map<String, Value>) -> String {
    let mut sh = String::new();
    for (key, value) in sorted(attrs) {
        if !is_var_name(key) {
            continue;
        }
        if let Some(s) = simple(value) {
            sh.push_str(&format!("declare {key}={s}\n"));
        } else if let Value::Array(items) = value {
            let words: Option<Vec<String>> = items.iter().map(simple).collect();
            if let Some(words) = words {
                let body: String = words.iter().map(|w| format!("{w} ")).collect();
                sh.push_str(&format!("declare -a {key}=({body})\n"));
            }
        } else if let Value::Object(map) = value {
            let words: Option<Vec<String>> = sorted(map)
                .into_iter()
                .map(|(k, v)| simple(v).map(|s| format!("[{}]={s} ", shell_escape(k))))
                .collect();
            if let Some(words) = words {
                sh.push_str(&format!("declare -A {key}=({})\n", words.concat()));
            }
        }
    }
    sh
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sh(v: Value) -> String {
        attrs_sh(v.as_object().expect("object"))
    }

    #[test]
    fn shell_escape_quotes_odd_strings_as_nix() {
        assert_eq!(shell_escape(""), "''");
        assert_eq!(shell_escape("it's"), r"'it'\''s'");
        assert_eq!(shell_escape("''"), r"''\'''\'''");
        assert_eq!(
            shell_escape("$HOME `id` \\n\nline2 \"q\" é"),
            "'$HOME `id` \\n\nline2 \"q\" é'"
        );
    }

    #[test]
    fn writes_simple_values_arrays_and_objects_in_key_order() {
        let got = sh(json!({
            "s": "a b",
            "n": 42,
            "t": true,
            "f": false,
            "z": null,
            "list": ["x", 1, false],
            "empty": [],
            "outputs": {"out": "/nix/store/x-out", "dev": "/nix/store/x-dev"},
        }));
        assert_eq!(
            got,
            "declare -a empty=()\n\
             declare f=\n\
             declare -a list=('x' 1  )\n\
             declare n=42\n\
             declare -A outputs=(['dev']='/nix/store/x-dev' ['out']='/nix/store/x-out' )\n\
             declare s='a b'\n\
             declare t=1\n\
             declare z=''\n"
        );
    }

    #[test]
    fn leaves_out_what_bash_cannot_hold() {
        let got = sh(json!({
            "nested": [[1]],
            "deep": {"a": {"b": 1}},
            "frac": 1.5,
            "fracs": [1, 2.5],
            "bad-name": "x",
            "1abc": "x",
            "_ok": "y",
            "": "x",
        }));
        assert_eq!(got, "declare _ok='y'\n");
    }

    #[test]
    fn odd_object_keys_are_quoted() {
        let got = sh(json!({"m": {"a'b": "c", "$(x)": "d"}}));
        assert_eq!(got, "declare -A m=(['$(x)']='d' ['a'\\''b']='c' )\n");
    }

    #[test]
    fn numbers_convert_as_nix_cxx_does() {
        let v: Value = serde_json::from_str(
            r#"{"a": 2.0, "b": -0.0, "c": 4294967297, "d": 1.00000001, "e": 3e9, "f": -7}"#,
        )
        .expect("json");
        assert_eq!(
            sh(v),
            "declare a=2\ndeclare b=0\ndeclare c=1\ndeclare d=1\ndeclare e=-2147483648\ndeclare f=-7\n"
        );
    }
}
