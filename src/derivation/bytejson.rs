//! A JSON reader whose strings are bytes, for what Nix's JSON writer prints.
//!
//! Nix 2.8 writes every byte of a string that is not `"`, `\` or a control
//! character raw (`libutil/json.cc`), so `nix show-derivation` of a
//! derivation holding latin1 bytes is not UTF-8, and a standard reader
//! (`serde_json`) refuses it. This reader takes the grammar of RFC 8259
//! with one change: inside a string literal any byte from 0x20 up but `"`
//! and `\` stands for itself, UTF-8 or not. Escapes mean what they always
//! mean (`\u00e9` is U+00E9, written as its UTF-8 bytes, and a surrogate pair
//! one character); control characters must be escaped, as the grammar says
//! and as Nix writes them. Outside strings the input must be ASCII JSON.
//!
//! The reader keeps object members in input order and refuses a repeated
//! key (JSON leaves the meaning open; for a derivation either reading could
//! be a surprise). Nesting is bounded ([`MAX_DEPTH`]), so hostile input
//! cannot overflow the stack.

use std::collections::HashSet;

use thiserror::Error;

/// How deeply arrays and objects may nest. A derivation needs 4 levels.
pub const MAX_DEPTH: usize = 64;

/// A JSON value with byte strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written (checked against the grammar, not converted).
    Number(String),
    /// A string: its bytes, escapes resolved.
    String(Vec<u8>),
    /// An array.
    Array(Vec<Value>),
    /// An object: members in input order, keys unique.
    Object(Vec<(Vec<u8>, Value)>),
}

impl Value {
    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

/// Why the input is not JSON, and where (a byte offset).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ByteJsonError {
    #[error("expected {expected} at byte {pos}")]
    Expected { expected: &'static str, pos: usize },
    #[error("unexpected end of input at byte {pos}")]
    Eof { pos: usize },
    #[error("control character 0x{byte:02x} in a string (it must be escaped) at byte {pos}")]
    Control { byte: u8, pos: usize },
    #[error("invalid escape at byte {pos}")]
    BadEscape { pos: usize },
    #[error("\\u escape of an unpaired surrogate at byte {pos}")]
    Surrogate { pos: usize },
    #[error("key '{key}' appears twice in one object at byte {pos}")]
    DuplicateKey { key: String, pos: usize },
    #[error("nested deeper than {MAX_DEPTH} levels at byte {pos}")]
    TooDeep { pos: usize },
    #[error("trailing bytes after the JSON value at byte {pos}")]
    Trailing { pos: usize },
}

/// Parses one JSON value (surrounded by optional whitespace) from `input`.
pub fn parse(input: &[u8]) -> Result<Value, ByteJsonError> {
    let mut r = Reader { input, pos: 0 };
    r.ws();
    let v = r.value(0)?;
    r.ws();
    if r.pos != input.len() {
        return Err(ByteJsonError::Trailing { pos: r.pos });
    }
    Ok(v)
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Result<u8, ByteJsonError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(ByteJsonError::Eof { pos: self.pos })
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.input.get(self.pos) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, lit: &'static str, v: Value) -> Result<Value, ByteJsonError> {
        if self.input[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(v)
        } else {
            Err(ByteJsonError::Expected {
                expected: lit,
                pos: self.pos,
            })
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ByteJsonError> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => Ok(Value::String(self.string()?)),
            b't' => self.literal("true", Value::Bool(true)),
            b'f' => self.literal("false", Value::Bool(false)),
            b'n' => self.literal("null", Value::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(ByteJsonError::Expected {
                expected: "a JSON value",
                pos: self.pos,
            }),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ByteJsonError> {
        if depth > MAX_DEPTH {
            return Err(ByteJsonError::TooDeep { pos: self.pos });
        }
        self.pos += 1;
        let mut members: Vec<(Vec<u8>, Value)> = Vec::new();
        // Linear in the number of members, however many there are.
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        self.ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return Err(ByteJsonError::Expected {
                    expected: "a string key",
                    pos: self.pos,
                });
            }
            let key_pos = self.pos;
            let key = self.string()?;
            if !seen.insert(key.clone()) {
                return Err(ByteJsonError::DuplicateKey {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    pos: key_pos,
                });
            }
            self.ws();
            if self.peek()? != b':' {
                return Err(ByteJsonError::Expected {
                    expected: "':'",
                    pos: self.pos,
                });
            }
            self.pos += 1;
            self.ws();
            let v = self.value(depth)?;
            members.push((key, v));
            self.ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => {
                    return Err(ByteJsonError::Expected {
                        expected: "',' or '}'",
                        pos: self.pos,
                    })
                }
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ByteJsonError> {
        if depth > MAX_DEPTH {
            return Err(ByteJsonError::TooDeep { pos: self.pos });
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek()? == b']' {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => {
                    return Err(ByteJsonError::Expected {
                        expected: "',' or ']'",
                        pos: self.pos,
                    })
                }
            }
        }
    }

    fn number(&mut self) -> Result<Value, ByteJsonError> {
        let start = self.pos;
        let digits = |r: &mut Self| -> Result<(), ByteJsonError> {
            let from = r.pos;
            while r.input.get(r.pos).is_some_and(u8::is_ascii_digit) {
                r.pos += 1;
            }
            if r.pos == from {
                return Err(ByteJsonError::Expected {
                    expected: "a digit",
                    pos: r.pos,
                });
            }
            Ok(())
        };
        if self.input[self.pos] == b'-' {
            self.pos += 1;
        }
        if self.input.get(self.pos) == Some(&b'0') {
            self.pos += 1;
        } else {
            digits(self)?;
        }
        if self.input.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.input.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.input.get(self.pos) {
                self.pos += 1;
            }
            digits(self)?;
        }
        let text = std::str::from_utf8(&self.input[start..self.pos])
            .expect("a number is ASCII: only digits, signs, '.', 'e' were consumed");
        Ok(Value::Number(text.to_owned()))
    }

    fn hex4(&mut self) -> Result<u32, ByteJsonError> {
        let pos = self.pos;
        let digits = self.input.get(pos..pos + 4).ok_or(ByteJsonError::Eof {
            pos: self.input.len(),
        })?;
        let s = std::str::from_utf8(digits).map_err(|_| ByteJsonError::BadEscape { pos })?;
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ByteJsonError::BadEscape { pos });
        }
        self.pos += 4;
        u32::from_str_radix(s, 16).map_err(|_| ByteJsonError::BadEscape { pos })
    }

    fn string(&mut self) -> Result<Vec<u8>, ByteJsonError> {
        self.pos += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            let b = self.peek()?;
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    let at = self.pos;
                    self.pos += 1;
                    let c = self.peek()?;
                    self.pos += 1;
                    match c {
                        b'"' | b'\\' | b'/' => out.push(c),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xd800..0xdc00).contains(&cp) {
                                if !self.input[self.pos..].starts_with(b"\\u") {
                                    return Err(ByteJsonError::Surrogate { pos: at });
                                }
                                self.pos += 2;
                                let low = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&low) {
                                    return Err(ByteJsonError::Surrogate { pos: at });
                                }
                                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                            }
                            let ch =
                                char::from_u32(cp).ok_or(ByteJsonError::Surrogate { pos: at })?;
                            let mut buf = [0; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(ByteJsonError::BadEscape { pos: at }),
                    }
                }
                0..=0x1f => {
                    return Err(ByteJsonError::Control {
                        byte: b,
                        pos: self.pos,
                    })
                }
                _ => {
                    // Copy the run of plain bytes at once.
                    let rest = &self.input[self.pos..];
                    let n = rest
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                        .unwrap_or(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    self.pos += n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> Value {
        Value::String(b.to_vec())
    }

    #[test]
    fn reads_raw_non_utf8_bytes_in_strings() {
        assert_eq!(
            parse(b"\"caf\xe9 \xff\x7f\"").unwrap(),
            s(b"caf\xe9 \xff\x7f")
        );
        assert_eq!(
            parse(b" { \"k\xe9\" : [ \"\xc3\xa9\" , 1.5e-3, true, null ] } ").unwrap(),
            Value::Object(vec![(
                b"k\xe9".to_vec(),
                Value::Array(vec![
                    s("é".as_bytes()),
                    Value::Number("1.5e-3".into()),
                    Value::Bool(true),
                    Value::Null
                ])
            )])
        );
    }

    #[test]
    fn escapes_mean_what_json_says() {
        assert_eq!(
            parse(br#""\"\\\/\b\f\n\r\t\u0001\u00e9\ud83d\ude00""#).unwrap(),
            s("\"\\/\u{8}\u{c}\n\r\t\u{1}é😀".as_bytes())
        );
    }

    #[test]
    fn refuses_what_is_not_json() {
        for (bad, want) in [
            (
                &b"\"a\nb\""[..],
                "control character 0x0a in a string (it must be escaped) at byte 2",
            ),
            (b"\"\\x\"", "invalid escape at byte 1"),
            (
                b"\"\\ud800\"",
                "\\u escape of an unpaired surrogate at byte 1",
            ),
            (
                b"\"\\udc00\"",
                "\\u escape of an unpaired surrogate at byte 1",
            ),
            (
                b"{\"a\":1,\"a\":2}",
                "key 'a' appears twice in one object at byte 7",
            ),
            (b"[1,]", "expected a JSON value at byte 3"),
            (b"{\"a\" 1}", "expected ':' at byte 5"),
            (b"[1] x", "trailing bytes after the JSON value at byte 4"),
            (b"01", "trailing bytes after the JSON value at byte 1"),
            (b"-", "expected a digit at byte 1"),
            (b"\"abc", "unexpected end of input at byte 4"),
            (b"tru", "expected true at byte 0"),
            (b"\xe9", "expected a JSON value at byte 0"),
        ] {
            assert_eq!(parse(bad).unwrap_err().to_string(), want, "{bad:?}");
        }
    }

    #[test]
    fn bounds_nesting() {
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(ok.as_bytes()).is_ok());
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(ByteJsonError::TooDeep { .. })
        ));
    }
}
