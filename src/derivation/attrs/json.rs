//! JSON text exactly as Nix 2.8 writes it: `nlohmann::json::dump()` with no
//! indentation, so that `.attrs.json` is byte for byte what Nix writes.
//!
//! What that means, and why it is not `serde_json::to_string`:
//! - object keys sorted bytewise (nlohmann's objects are `std::map`s; our
//!   `serde_json` keeps insertion order, as another module needs);
//! - strings escape `"`, `\`, `\b`, `\f`, `\n`, `\r`, `\t` and the other
//!   bytes below 0x20 as `\u00xx` (lowercase hex); everything else,
//!   non-ASCII included, is written as is;
//! - floats in nlohmann's format: the shortest digits that read back, as
//!   `123.0`, `0.001` or `1e+100` (decimal notation for decimal exponents
//!   from -4 to 15, otherwise `d.ddde±XX` with at least two exponent
//!   digits); infinities and NaN (which JSON input cannot hold) as `null`.
//!   nlohmann finds the digits with Grisu2 and we with Rust's shortest
//!   round-trip formatting: they agree but for rare doubles where Grisu2
//!   is not the shortest, which structured attributes practically never hold.
//!
//! Reading `__json` with `serde_json` rather than nlohmann differs on two
//! inputs Nix's evaluator never writes: `-0` reads as the float `-0.0`
//! (nlohmann: the integer `0`), and a number beyond a double's range is an
//! error (nlohmann: infinity, written back as `null`).

use serde_json::Value;

/// `value` as `nlohmann::json::dump()` writes it.
pub fn dump(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&float(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal, escaped as nlohmann does with `ensure_ascii` off.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A double in nlohmann's `to_chars` format (see the module docs).
pub fn float(x: f64) -> String {
    if !x.is_finite() {
        return "null".to_owned();
    }
    let mut out = String::new();
    if x.is_sign_negative() {
        out.push('-');
    }
    let x = x.abs();
    if x == 0.0 {
        out.push_str("0.0");
        return out;
    }
    // Rust's `{:e}` gives the shortest round-trip digits: `d[.ddd]e<exp>`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes a decimal exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    // The value is 0.<digits> * 10^n, as nlohmann's format_buffer counts.
    let n = exp + 1;
    const MIN_EXP: i32 = -4;
    const MAX_EXP: i32 = 15;
    if k <= n && n <= MAX_EXP {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
        out.push_str(".0");
    } else if 0 < n && n <= MAX_EXP {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if MIN_EXP < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.abs()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_bytewise_and_nothing_is_indented() {
        let v: Value =
            serde_json::from_str(r#"{"b": 1, "B": [true, null], "a": {"é": "x", "z": -2}}"#)
                .expect("json");
        assert_eq!(dump(&v), r#"{"B":[true,null],"a":{"z":-2,"é":"x"},"b":1}"#);
    }

    #[test]
    fn strings_escape_controls_only() {
        let v = json!("q\"b\\\u{08}\u{0c}\n\r\t\u{01}\u{1f}\u{7f}/é☃");
        assert_eq!(
            dump(&v),
            "\"q\\\"b\\\\\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}/é☃\""
        );
    }

    #[test]
    fn floats_are_written_as_nlohmann_does() {
        for (x, want) in [
            (1.5, "1.5"),
            (2.0, "2.0"),
            (100.0, "100.0"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (0.001, "0.001"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456789012345.0, "123456789012345.0"),
            (1234567890123456.0, "1.234567890123456e+15"),
            (1e100, "1e+100"),
            (-2.5e-300, "-2.5e-300"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(float(x), want, "{x}");
        }
        assert_eq!(float(f64::INFINITY), "null");
    }

    #[test]
    fn numbers_keep_their_json_kind() {
        let v: Value =
            serde_json::from_str("[1, -1, 1.0, 1e2, 18446744073709551615]").expect("json");
        assert_eq!(dump(&v), "[1,-1,1.0,100.0,18446744073709551615]");
    }
}
