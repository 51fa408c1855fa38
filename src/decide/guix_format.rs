//! Guix's `machines.scm`, read by a small, safe Scheme evaluator.
//!
//! Guix `primitive-load`s the file, so it may hold any Scheme. sandoff never
//! executes it: a reader turns the text into data, and an evaluator gives
//! meaning to exactly the forms real machine files use (`list`, `quote`/`'`,
//! `string-append`, `getenv` and `build-machine`) over strings, numbers and
//! booleans. Anything else (`define`, `let`, a variable, a vector, a
//! character) is an error naming its line, so a file that needs a real
//! Scheme is refused loudly rather than misread.
//!
//! `build-machine` takes Guix's fields with Guix's defaults (see
//! `guix/scripts/offload.scm`): `port` 22, `parallel-builds` 1, `speed` 1.0,
//! `features` `'()`, `overload-threshold` 0.8, `compression`
//! `"zlib@openssh.com,zlib"`, `compression-level` 3, `daemon-socket`
//! `"/var/guix/daemon-socket/socket"`, `private-key` `$HOME/.ssh/id_rsa`.
//! `name`, `user`, `host-key` and `systems` (or the deprecated `system`) are
//! required.

use std::collections::BTreeSet;

use thiserror::Error;

use super::machines::{
    self, Compression, GuixExtras, Machine, MachineError, MachineFormat, MachineName,
};
use crate::termsafe;

/// How deeply lists may nest; deeper input is refused instead of risking
/// the stack.
const MAX_DEPTH: usize = 64;

/// Why a `machines.scm` was refused. Every variant names the file and line.
#[derive(Debug, Error, PartialEq)]
pub enum GuixMachinesError {
    #[error("{file}:{line}: {what}")]
    Syntax {
        file: String,
        line: usize,
        what: String,
    },
    #[error("{file}:{line}: unsupported form '{form}' (machines.scm may only use list, quote, string-append, getenv and build-machine)")]
    Unsupported {
        file: String,
        line: usize,
        form: String,
    },
    #[error("{file}:{line}: {procedure}: {what}")]
    BadArgument {
        file: String,
        line: usize,
        procedure: &'static str,
        what: String,
    },
    #[error("{file}:{line}: build-machine: unknown field '{field}'")]
    UnknownField {
        file: String,
        line: usize,
        field: String,
    },
    #[error("{file}:{line}: build-machine: field '{field}' given twice")]
    DuplicateField {
        file: String,
        line: usize,
        field: String,
    },
    #[error("{file}:{line}: build-machine: field '{field}' {what}")]
    BadField {
        file: String,
        line: usize,
        field: &'static str,
        what: String,
    },
    #[error("{file}:{line}: build-machine: missing required field '{field}'")]
    MissingField {
        file: String,
        line: usize,
        field: &'static str,
    },
    #[error("{file}:{line}: build-machine: {source}")]
    Machine {
        file: String,
        line: usize,
        #[source]
        source: MachineError,
    },
    #[error("{file}: the file's value is {what}, not a list of build-machine records")]
    NotMachineList { file: String, what: String },
}

/// A datum as read, with the line it starts on.
#[derive(Clone, Debug, PartialEq)]
struct Datum {
    line: usize,
    kind: DatumKind,
}

#[derive(Clone, Debug, PartialEq)]
enum DatumKind {
    Str(String),
    /// A number and whether it is exact (`2` is, `2.` and `1.5` are not).
    Num(f64, bool),
    Bool(bool),
    Symbol(String),
    List(Vec<Datum>),
}

struct Reader<'a> {
    text: &'a [u8],
    pos: usize,
    line: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self, line: usize, what: impl Into<String>) -> GuixMachinesError {
        GuixMachinesError::Syntax {
            file: self.file.to_owned(),
            line,
            what: what.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn peek2(&self) -> Option<u8> {
        self.text.get(self.pos + 1).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        if b == b'\n' {
            self.line += 1;
        }
        Some(b)
    }

    /// Skips whitespace and all three kinds of comment (`#;` needs to read
    /// the datum it comments out, hence the depth).
    fn skip_atmosphere(&mut self, depth: usize) -> Result<(), GuixMachinesError> {
        loop {
            match (self.peek(), self.peek2()) {
                (Some(b), _) if b.is_ascii_whitespace() => {
                    self.bump();
                }
                (Some(b';'), _) => {
                    while let Some(b) = self.bump() {
                        if b == b'\n' {
                            break;
                        }
                    }
                }
                (Some(b'#'), Some(b'|')) => self.skip_block_comment()?,
                (Some(b'#'), Some(b';')) => {
                    let line = self.line;
                    self.pos += 2;
                    if self.read(depth + 1)?.is_none() {
                        return Err(self.err(line, "'#;' comments out nothing"));
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// `#| ... |#`, which nests in Guile.
    fn skip_block_comment(&mut self) -> Result<(), GuixMachinesError> {
        let start = self.line;
        self.pos += 2;
        let mut level = 1usize;
        while level > 0 {
            match (self.peek(), self.peek2()) {
                (Some(b'|'), Some(b'#')) => {
                    self.pos += 2;
                    level -= 1;
                }
                (Some(b'#'), Some(b'|')) => {
                    self.pos += 2;
                    level += 1;
                }
                (Some(_), _) => {
                    self.bump();
                }
                (None, _) => return Err(self.err(start, "unterminated '#|' comment")),
            }
        }
        Ok(())
    }

    /// Reads the next datum, `None` at the end of the text.
    fn read(&mut self, depth: usize) -> Result<Option<Datum>, GuixMachinesError> {
        if depth > MAX_DEPTH {
            return Err(self.err(self.line, format!("lists nested deeper than {MAX_DEPTH}")));
        }
        self.skip_atmosphere(depth)?;
        let line = self.line;
        let Some(b) = self.peek() else {
            return Ok(None);
        };
        let kind = match b {
            b'(' | b'[' => {
                let close = if b == b'(' { b')' } else { b']' };
                self.bump();
                let mut items = Vec::new();
                loop {
                    self.skip_atmosphere(depth)?;
                    match self.peek() {
                        Some(c) if c == close => {
                            self.bump();
                            break;
                        }
                        Some(b')') | Some(b']') => {
                            return Err(self.err(self.line, "mismatched closing bracket"))
                        }
                        None => return Err(self.err(line, "unterminated list")),
                        Some(_) => {}
                    }
                    let item = self
                        .read(depth + 1)?
                        .ok_or_else(|| self.err(line, "unterminated list"))?;
                    if item.kind == DatumKind::Symbol(".".to_owned()) {
                        return Err(self.err(item.line, "dotted pairs are not supported"));
                    }
                    items.push(item);
                }
                DatumKind::List(items)
            }
            b')' | b']' => return Err(self.err(line, "unexpected ')'")),
            b'\'' => {
                self.bump();
                let quoted = self
                    .read(depth + 1)?
                    .ok_or_else(|| self.err(line, "quote of nothing"))?;
                DatumKind::List(vec![
                    Datum {
                        line,
                        kind: DatumKind::Symbol("quote".to_owned()),
                    },
                    quoted,
                ])
            }
            b'`' | b',' => {
                return Err(GuixMachinesError::Unsupported {
                    file: self.file.to_owned(),
                    line,
                    form: if b == b'`' { "quasiquote" } else { "unquote" }.to_owned(),
                })
            }
            b'"' => DatumKind::Str(self.read_string()?),
            b'#' => self.read_hash(line)?,
            _ => self.read_atom(),
        };
        Ok(Some(Datum { line, kind }))
    }

    fn read_hash(&mut self, line: usize) -> Result<DatumKind, GuixMachinesError> {
        let token = self.token();
        match token.as_str() {
            "#t" | "#true" => Ok(DatumKind::Bool(true)),
            "#f" | "#false" => Ok(DatumKind::Bool(false)),
            _ => Err(GuixMachinesError::Unsupported {
                file: self.file.to_owned(),
                line,
                form: token,
            }),
        }
    }

    /// The characters up to the next delimiter.
    fn token(&mut self) -> String {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b.is_ascii_whitespace() || b"()[]\";'`,".contains(&b) {
                break;
            }
            self.bump();
        }
        // Delimiters are ASCII, so the slice ends on a character boundary.
        String::from_utf8_lossy(&self.text[start..self.pos]).into_owned()
    }

    fn read_atom(&mut self) -> DatumKind {
        let token = self.token();
        match parse_number(&token) {
            Some((v, exact)) => DatumKind::Num(v, exact),
            None => DatumKind::Symbol(token),
        }
    }

    fn read_string(&mut self) -> Result<String, GuixMachinesError> {
        let start = self.line;
        self.bump();
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(b) = self.bump() else {
                return Err(self.err(start, "unterminated string"));
            };
            match b {
                b'"' => break,
                b'\\' => {
                    let line = self.line;
                    let Some(e) = self.bump() else {
                        return Err(self.err(start, "unterminated string"));
                    };
                    let c: char = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'a' => '\u{7}',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'v' => '\u{b}',
                        b'0' => '\0',
                        b'x' => self.hex_escape(2, line)?,
                        b'u' => self.hex_escape(4, line)?,
                        b'U' => self.hex_escape(6, line)?,
                        b'\n' => {
                            // A line continuation: the newline and the next
                            // line's leading blanks vanish.
                            while matches!(self.peek(), Some(b' ' | b'\t')) {
                                self.bump();
                            }
                            continue;
                        }
                        other => {
                            return Err(self
                                .err(line, format!("unknown string escape '\\{}'", other as char)))
                        }
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| self.err(start, "string is not valid UTF-8"))
    }

    fn hex_escape(&mut self, digits: usize, line: usize) -> Result<char, GuixMachinesError> {
        let mut v: u32 = 0;
        for _ in 0..digits {
            let d = self
                .bump()
                .and_then(|b| (b as char).to_digit(16))
                .ok_or_else(|| self.err(line, format!("'\\x' escape needs {digits} hex digits")))?;
            v = v * 16 + d;
        }
        char::from_u32(v)
            .ok_or_else(|| self.err(line, format!("escape U+{v:X} is not a character")))
    }
}

/// Scheme decimal numbers: `22`, `-3`, `2.`, `.5`, `1.5`, `1e3`. Exact when
/// written without `.` or exponent. Anything else (`1/2`, `#x10`, `+inf.0`)
/// is not a number here, and so becomes an unsupported symbol.
fn parse_number(t: &str) -> Option<(f64, bool)> {
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    if body.is_empty()
        || !body
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        || !body.bytes().any(|b| b.is_ascii_digit())
        || !body
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    let exact = body.bytes().all(|b| b.is_ascii_digit());
    let v: f64 = t.parse().ok()?;
    v.is_finite().then_some((v, exact))
}

/// A value of the evaluator.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Str(String),
    Num(f64, bool),
    Bool(bool),
    Symbol(String),
    List(Vec<Value>),
    Machine(Box<Machine>),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            // Quoted short: a string may be huge (or `getenv` of a secret).
            Value::Str(s) => format!("the string {}", termsafe::quote_short(s)),
            Value::Num(n, _) => format!("the number {n}"),
            Value::Bool(true) => "#t".to_owned(),
            Value::Bool(false) => "#f".to_owned(),
            Value::Symbol(s) => format!(
                "the symbol '{}",
                termsafe::shorten(&s.escape_debug().to_string(), termsafe::QUOTE_MAX)
            ),
            Value::List(l) => format!("a list of {} item(s)", l.len()),
            Value::Machine(_) => "a build-machine".to_owned(),
        }
    }
}

/// The environment `getenv` sees; passed in to keep parsing pure.
pub trait Env {
    /// The variable's value, `None` when unset.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

struct Evaluator<'a> {
    file: &'a str,
    env: &'a dyn Env,
}

impl Evaluator<'_> {
    fn unsupported(&self, line: usize, form: impl Into<String>) -> GuixMachinesError {
        GuixMachinesError::Unsupported {
            file: self.file.to_owned(),
            line,
            form: form.into(),
        }
    }

    fn eval(&self, d: &Datum) -> Result<Value, GuixMachinesError> {
        match &d.kind {
            DatumKind::Str(s) => Ok(Value::Str(s.clone())),
            DatumKind::Num(n, e) => Ok(Value::Num(*n, *e)),
            DatumKind::Bool(b) => Ok(Value::Bool(*b)),
            // No variables exist: a bare symbol is a reference to one.
            DatumKind::Symbol(s) => Err(self.unsupported(d.line, s.clone())),
            DatumKind::List(items) => {
                let Some((head, args)) = items.split_first() else {
                    return Err(self.unsupported(d.line, "()"));
                };
                let DatumKind::Symbol(op) = &head.kind else {
                    return Err(self.unsupported(d.line, "a call of a non-symbol"));
                };
                match op.as_str() {
                    "list" => Ok(Value::List(
                        args.iter()
                            .map(|a| self.eval(a))
                            .collect::<Result<_, _>>()?,
                    )),
                    "quote" => match args {
                        [one] => Ok(quote(one)),
                        _ => Err(self.bad_arg(d.line, "quote", "takes exactly one datum")),
                    },
                    "string-append" => {
                        let mut out = String::new();
                        for (i, a) in args.iter().enumerate() {
                            match self.eval(a)? {
                                Value::Str(s) => out.push_str(&s),
                                other => {
                                    return Err(self.bad_arg(
                                        a.line,
                                        "string-append",
                                        format!(
                                            "argument {} is {}, not a string",
                                            i + 1,
                                            other.describe()
                                        ),
                                    ))
                                }
                            }
                        }
                        Ok(Value::Str(out))
                    }
                    "getenv" => match args {
                        [one] => match self.eval(one)? {
                            Value::Str(name) => Ok(self
                                .env
                                .var(&name)
                                .map(Value::Str)
                                .unwrap_or(Value::Bool(false))),
                            other => Err(self.bad_arg(
                                one.line,
                                "getenv",
                                format!("argument is {}, not a string", other.describe()),
                            )),
                        },
                        _ => Err(self.bad_arg(d.line, "getenv", "takes exactly one argument")),
                    },
                    "build-machine" => self.build_machine(d.line, args),
                    other => Err(self.unsupported(d.line, other)),
                }
            }
        }
    }

    fn bad_arg(
        &self,
        line: usize,
        procedure: &'static str,
        what: impl Into<String>,
    ) -> GuixMachinesError {
        GuixMachinesError::BadArgument {
            file: self.file.to_owned(),
            line,
            procedure,
            what: what.into(),
        }
    }

    fn build_machine(&self, line: usize, args: &[Datum]) -> Result<Value, GuixMachinesError> {
        let mut fields = Fields::default();
        for arg in args {
            let DatumKind::List(parts) = &arg.kind else {
                return Err(self.bad_arg(
                    arg.line,
                    "build-machine",
                    "expects (field value) clauses",
                ));
            };
            let [name, value] = parts.as_slice() else {
                return Err(self.bad_arg(
                    arg.line,
                    "build-machine",
                    "a clause must be (field value)",
                ));
            };
            let DatumKind::Symbol(field) = &name.kind else {
                return Err(self.bad_arg(
                    arg.line,
                    "build-machine",
                    "a field name must be a symbol",
                ));
            };
            let value = self.eval(value)?;
            fields.set(self.file, arg.line, field, value)?;
        }
        let machine = fields.finish(self.file, line, self.env)?;
        Ok(Value::Machine(Box::new(machine)))
    }
}

/// `'datum`: the datum as a value, unevaluated.
fn quote(d: &Datum) -> Value {
    match &d.kind {
        DatumKind::Str(s) => Value::Str(s.clone()),
        DatumKind::Num(n, e) => Value::Num(*n, *e),
        DatumKind::Bool(b) => Value::Bool(*b),
        DatumKind::Symbol(s) => Value::Symbol(s.clone()),
        DatumKind::List(items) => Value::List(items.iter().map(quote).collect()),
    }
}

/// The fields of one `build-machine` as given, before defaults.
#[derive(Default)]
struct Fields {
    given: Vec<(String, usize, Value)>,
}

const FIELDS: [&str; 14] = [
    "name",
    "port",
    "systems",
    "system",
    "user",
    "private-key",
    "host-key",
    "compression",
    "compression-level",
    "daemon-socket",
    "overload-threshold",
    "parallel-builds",
    "speed",
    "features",
];

impl Fields {
    fn set(
        &mut self,
        file: &str,
        line: usize,
        field: &str,
        value: Value,
    ) -> Result<(), GuixMachinesError> {
        if !FIELDS.contains(&field) {
            return Err(GuixMachinesError::UnknownField {
                file: file.to_owned(),
                line,
                field: field.to_owned(),
            });
        }
        if self.given.iter().any(|(f, _, _)| f == field) {
            return Err(GuixMachinesError::DuplicateField {
                file: file.to_owned(),
                line,
                field: field.to_owned(),
            });
        }
        self.given.push((field.to_owned(), line, value));
        Ok(())
    }

    fn take(&self, field: &str) -> Option<(usize, &Value)> {
        self.given
            .iter()
            .find(|(f, _, _)| f == field)
            .map(|(_, l, v)| (*l, v))
    }

    fn finish(self, file: &str, line: usize, env: &dyn Env) -> Result<Machine, GuixMachinesError> {
        let bad =
            |field: &'static str, l: usize, v: &Value, want: &str| GuixMachinesError::BadField {
                file: file.to_owned(),
                line: l,
                field,
                what: format!("is {}, expected {want}", v.describe()),
            };
        let missing = |field: &'static str| GuixMachinesError::MissingField {
            file: file.to_owned(),
            line,
            field,
        };
        let string = |field: &'static str| -> Result<Option<String>, GuixMachinesError> {
            match self.take(field) {
                None => Ok(None),
                Some((_, Value::Str(s))) => Ok(Some(s.clone())),
                Some((l, v)) => Err(bad(field, l, v, "a string")),
            }
        };
        let strings = |field: &'static str| -> Result<Option<BTreeSet<String>>, GuixMachinesError> {
            match self.take(field) {
                None | Some((_, Value::Bool(false))) => Ok(None),
                Some((l, Value::List(items))) => items
                    .iter()
                    .map(|i| match i {
                        Value::Str(s) => Ok(s.clone()),
                        other => Err(bad(field, l, other, "a list of strings")),
                    })
                    .collect::<Result<_, _>>()
                    .map(Some),
                Some((l, v)) => Err(bad(field, l, v, "a list of strings")),
            }
        };
        let integer =
            |field: &'static str, min: i64, max: i64| -> Result<Option<i64>, GuixMachinesError> {
                match self.take(field) {
                    None => Ok(None),
                    Some((_, Value::Num(n, true))) if *n >= min as f64 && *n <= max as f64 => {
                        Ok(Some(*n as i64))
                    }
                    Some((l, v)) => Err(bad(
                        field,
                        l,
                        v,
                        &format!("an exact integer from {min} to {max}"),
                    )),
                }
            };

        let name = string("name")?.ok_or_else(|| missing("name"))?;
        let user = string("user")?.ok_or_else(|| missing("user"))?;
        // `name` is the host ssh connects to; neither it nor `user` is shown
        // when refused (see `check_host`).
        let machine_err = |source| GuixMachinesError::Machine {
            file: file.to_owned(),
            line,
            source,
        };
        machines::check_host(&name).map_err(machine_err)?;
        machines::check_user(&user).map_err(machine_err)?;
        let host_key = string("host-key")?.ok_or_else(|| missing("host-key"))?;
        let systems = match strings("systems")? {
            Some(s) => s,
            None => match string("system") {
                Ok(Some(s)) => {
                    tracing::warn!("{file}:{line}: the 'system' field is deprecated, please use 'systems' instead");
                    BTreeSet::from([s])
                }
                Ok(None) => return Err(missing("systems")),
                Err(e) => {
                    // `(system #f)` is the record's default: treat it as absent.
                    if matches!(self.take("system"), Some((_, Value::Bool(false)))) {
                        return Err(missing("systems"));
                    }
                    return Err(e);
                }
            },
        };
        let port = integer("port", 1, 65535)?.unwrap_or(22);
        let max_jobs = integer("parallel-builds", 0, i64::from(u32::MAX))?.unwrap_or(1);
        let speed = match self.take("speed") {
            None => 1.0,
            Some((_, Value::Num(n, _))) => *n,
            Some((l, v)) => return Err(bad("speed", l, v, "a number")),
        };
        let overload_threshold = match self.take("overload-threshold") {
            None => Some(0.8),
            Some((_, Value::Bool(false))) => None,
            Some((_, Value::Num(n, _))) => Some(*n),
            Some((l, v)) => return Err(bad("overload-threshold", l, v, "a number or #f")),
        };
        let private_key = match self.take("private-key") {
            Some((_, Value::Bool(false))) => None,
            Some(_) => string("private-key")?,
            // Guix's `user-openssh-private-key`.
            None => env.var("HOME").map(|h| format!("{h}/.ssh/id_rsa")),
        };
        let features = strings("features")?.unwrap_or_default();
        let defaults = GuixExtras::default();
        // A bad level is reported at its own line.
        let level_line = self.take("compression-level").map_or(line, |(l, _)| l);
        let extras = GuixExtras {
            overload_threshold,
            compression: string("compression")?.unwrap_or(defaults.compression),
            compression_level: integer("compression-level", i64::MIN, i64::MAX)?
                .unwrap_or(defaults.compression_level),
            daemon_socket: string("daemon-socket")?.unwrap_or(defaults.daemon_socket),
        };
        let given_level = self
            .take("compression-level")
            .map(|_| extras.compression_level);
        let compression =
            Compression::from_guix(&extras.compression, given_level).map_err(|source| {
                GuixMachinesError::Machine {
                    file: file.to_owned(),
                    line: level_line,
                    source,
                }
            })?;
        let machine_name =
            MachineName::new(&name).map_err(|source| GuixMachinesError::Machine {
                file: file.to_owned(),
                line,
                source,
            })?;
        let host_in_uri = if name.contains(':') {
            format!("[{name}]")
        } else {
            name.clone()
        };
        let machine = Machine {
            name: machine_name,
            format: MachineFormat::Guix,
            store_uri: format!("ssh://{user}@{host_in_uri}:{port}"),
            host: Some(name),
            systems,
            user: Some(user),
            port: Some(port as u16),
            private_key,
            max_jobs: max_jobs as u32,
            speed_factor: speed,
            supported_features: features,
            mandatory_features: BTreeSet::new(),
            host_key: Some(host_key),
            compression,
            guix: Some(extras),
        };
        machine
            .check()
            .map_err(|source| GuixMachinesError::Machine {
                file: file.to_owned(),
                line,
                source,
            })?;
        Ok(machine)
    }
}

/// Reads and evaluates a `machines.scm`. `file` names it in errors; `env`
/// answers `getenv` (and gives `HOME` for the default private key). The
/// value of the last top-level form must be a list of `build-machine`s.
pub fn parse(text: &str, file: &str, env: &dyn Env) -> Result<Vec<Machine>, GuixMachinesError> {
    let mut reader = Reader {
        text: text.as_bytes(),
        pos: 0,
        line: 1,
        file,
    };
    let eval = Evaluator { file, env };
    let mut last: Option<Value> = None;
    while let Some(datum) = reader.read(0)? {
        last = Some(eval.eval(&datum)?);
    }
    match last {
        Some(Value::List(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::Machine(m) => Ok(*m),
                other => Err(GuixMachinesError::NotMachineList {
                    file: file.to_owned(),
                    what: format!("a list holding {}", other.describe()),
                }),
            })
            .collect(),
        Some(other) => Err(GuixMachinesError::NotMachineList {
            file: file.to_owned(),
            what: other.describe(),
        }),
        None => Err(GuixMachinesError::NotMachineList {
            file: file.to_owned(),
            what: "empty (no expression)".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOME").then(|| "/root".to_owned())
    }

    fn p(text: &str) -> Result<Vec<Machine>, GuixMachinesError> {
        parse(text, "machines.scm", &env)
    }

    const MINIMAL: &str = r#"(list (build-machine (name "a") (systems (list "x86_64-linux")) (user "u") (host-key "ssh-ed25519 AAAA")))"#;

    #[test]
    fn applies_guix_defaults() {
        let m = &p(MINIMAL).unwrap()[0];
        assert_eq!(m.port, Some(22));
        assert_eq!(m.max_jobs, 1);
        assert_eq!(m.speed_factor, 1.0);
        assert!(m.supported_features.is_empty());
        assert_eq!(m.private_key.as_deref(), Some("/root/.ssh/id_rsa"));
        assert_eq!(m.guix, Some(GuixExtras::default()));
        // Guix's default is on (zlib level 3 for libssh): zstd at sandoff's
        // default level.
        assert_eq!(
            m.compression,
            Compression::On {
                level: Compression::DEFAULT_LEVEL
            }
        );
        assert_eq!(m.store_uri, "ssh://u@a:22");
    }

    #[test]
    fn reads_every_field() {
        let m = &p(r#"
            ;; a comment
            #| block #| nested |# still |#
            (list #;(build-machine (name "ignored"))
              (build-machine
                (name "b") (port 2222) (systems '("aarch64-linux" "armhf-linux"))
                (user "alice") (private-key (string-append (getenv "HOME") "/.ssh/k"))
                (host-key "ssh-rsa AAAAB3") (compression "none") (compression-level 9)
                (daemon-socket "/s") (overload-threshold #f) (parallel-builds 4)
                (speed 2.) (features (list "kvm" "big-parallel"))))"#)
        .unwrap()[0];
        assert_eq!(m.name.as_str(), "b");
        assert_eq!(m.port, Some(2222));
        assert_eq!(m.systems.len(), 2);
        assert_eq!(m.private_key.as_deref(), Some("/root/.ssh/k"));
        assert_eq!(m.max_jobs, 4);
        assert_eq!(m.speed_factor, 2.0);
        assert_eq!(m.supported_features.len(), 2);
        let g = m.guix.as_ref().unwrap();
        assert_eq!(g.overload_threshold, None);
        assert_eq!((g.compression.as_str(), g.compression_level), ("none", 9));
        assert_eq!(m.compression, Compression::Off);
        assert_eq!(g.daemon_socket, "/s");
    }

    #[test]
    fn compression_fields_set_compression() {
        let with = |fields: &str| {
            p(&MINIMAL.replace(
                "(host-key \"ssh-ed25519 AAAA\")",
                &format!("(host-key \"ssh-ed25519 AAAA\") {fields}"),
            ))
        };
        assert_eq!(
            with("(compression-level 1)").unwrap()[0].compression,
            Compression::On { level: 1 }
        );
        assert_eq!(
            with("(compression \"zlib\") (compression-level 12)").unwrap()[0].compression,
            Compression::On { level: 12 }
        );
        assert_eq!(
            with("(compression \"none\")").unwrap()[0].compression,
            Compression::Off
        );
        let e = with("\n(compression-level 0)").unwrap_err();
        assert!(
            matches!(
                &e,
                GuixMachinesError::Machine {
                    line: 2,
                    source: MachineError::BadCompressionLevel { level: 0 },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("zstd level from 1 to 19"), "{e}");
    }

    #[test]
    fn accepts_deprecated_system_field() {
        let m = &p(r#"(list (build-machine (name "a") (system "mips64el-linux") (user "u") (host-key "k")))"#)
            .unwrap()[0];
        assert_eq!(m.systems, BTreeSet::from(["mips64el-linux".to_owned()]));
    }

    #[test]
    fn refuses_other_forms_with_line() {
        let e = p("(define x 1)\n(list)").unwrap_err();
        assert_eq!(
            e,
            GuixMachinesError::Unsupported {
                file: "machines.scm".into(),
                line: 1,
                form: "define".into()
            }
        );
        let e = p("\n\n(list (build-machine (name x)))")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("machines.scm:3: unsupported form 'x'"), "{e}");
        assert!(p("(list #\\a)").is_err());
        assert!(p("`(a)").is_err());
        assert!(p("(list #(1 2))").is_err());
    }

    #[test]
    fn names_missing_required_fields() {
        for (field, text) in [
            (
                "name",
                r#"(list (build-machine (systems '("s")) (user "u") (host-key "k")))"#,
            ),
            (
                "user",
                r#"(list (build-machine (name "a") (systems '("s")) (host-key "k")))"#,
            ),
            (
                "host-key",
                r#"(list (build-machine (name "a") (systems '("s")) (user "u")))"#,
            ),
            (
                "systems",
                r#"(list (build-machine (name "a") (user "u") (host-key "k")))"#,
            ),
        ] {
            let e = p(text).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("machines.scm:1: build-machine: missing required field '{field}'")
            );
        }
    }

    #[test]
    fn getenv_of_unset_variable_is_false() {
        let e = p(
            r#"(list (build-machine (name "a") (systems '("s")) (user "u") (host-key "k")
                     (private-key (string-append (getenv "NOPE") "/k"))))"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("string-append: argument 1 is #f, not a string"),
            "{e}"
        );
    }

    #[test]
    fn reads_string_escapes_and_numbers() {
        // The escapes are in fields that take any string (`name` and `user`
        // must be a host and a user name).
        let m = &p(
            r#"(list (build-machine (name "h") (systems '("s")) (user "u") (private-key "a\x62;") (daemon-socket "u\tv") (host-key "k \
                     l") (speed 1.5)))"#,
        );
        // Guile's `\xHH` takes two digits; `;` is then an ordinary character.
        let m = &m.as_ref().unwrap()[0];
        assert_eq!(m.private_key.as_deref(), Some("ab;"));
        assert_eq!(
            m.guix.as_ref().map(|g| g.daemon_socket.as_str()),
            Some("u\tv")
        );
        assert_eq!(m.host_key.as_deref(), Some("k l"));
        assert_eq!(parse_number("2."), Some((2.0, false)));
        assert_eq!(parse_number("22"), Some((22.0, true)));
        assert_eq!(parse_number("-.5"), Some((-0.5, false)));
        assert_eq!(parse_number("inf"), None);
        assert_eq!(parse_number("1/2"), None);
    }

    #[test]
    fn value_must_be_a_list_of_machines() {
        assert!(p("")
            .unwrap_err()
            .to_string()
            .contains("not a list of build-machine"));
        assert!(p("\"x\"").is_err());
        assert!(p("(list 1)").is_err());
        assert_eq!(p("(list)").unwrap(), vec![]);
        assert_eq!(p("'()").unwrap(), vec![]);
    }

    #[test]
    fn refuses_bad_field_values() {
        let e = p(r#"(list (build-machine (name "a") (systems '("s")) (user "u") (host-key "k") (port "22")))"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field 'port' is the string \"22\", expected an exact integer"),
            "{e}"
        );
        assert!(p(r#"(list (build-machine (name "a") (name "b")))"#).is_err());
        assert!(p(r#"(list (build-machine (nom "a")))"#).is_err());
        assert!(p(r#"(list (build-machine (name "a") (systems '("s")) (user "u") (host-key "k") (speed 0)))"#).is_err());
    }

    #[test]
    fn refuses_host_names_that_are_not_host_names_without_showing_them() {
        for name in [
            "a b",
            "a/b",
            "/etc/shadow",
            "a\\x1b;]0;t\\a",
            "-oProxyCommand=x",
        ] {
            let text = format!(
                r#"(list
 (build-machine (name "{name}") (systems '("s")) (user "u") (host-key "k")))"#
            );
            let e = p(&text).unwrap_err();
            assert!(
                matches!(
                    e,
                    GuixMachinesError::Machine {
                        line: 2,
                        source: MachineError::BadHost,
                        ..
                    }
                ),
                "{name}: {e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.starts_with("machines.scm:2: build-machine: the host is not a host name"),
                "{msg}"
            );
            assert!(!msg.contains(name), "{msg}");
        }
        let e =
            p(r#"(list (build-machine (name "h") (systems '("s")) (user "a/b") (host-key "k")))"#)
                .unwrap_err();
        assert!(
            matches!(
                e,
                GuixMachinesError::Machine {
                    source: MachineError::BadUser,
                    ..
                }
            ),
            "{e:?}"
        );
        for name in ["build.example.org", "10.0.0.2", "fe80::1"] {
            let text = format!(
                r#"(list (build-machine (name "{name}") (systems '("s")) (user "u") (host-key "k")))"#
            );
            assert_eq!(p(&text).expect(name)[0].host.as_deref(), Some(name));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = "(".repeat(10_000);
        assert!(p(&text).is_err());
        let text = format!("{}{}", "'".repeat(10_000), "a");
        assert!(p(&text).is_err());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_panics(text in "[()\"'#|;\\\\a-z0-9. \n-]{0,160}") {
            let _ = parse(&text, "machines.scm", &|_: &str| None);
        }

        #[test]
        fn strings_round_trip_through_the_reader(s in "[ -~]{0,40}") {
            // Written as Guile's `write` would, read back unchanged.
            let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
            let text = format!(
                r#"(list (build-machine (name "a") (systems '("s")) (user "u") (host-key "{escaped}")))"#
            );
            let m = parse(&text, "machines.scm", &|_: &str| None).unwrap();
            prop_assert_eq!(m[0].host_key.as_deref(), Some(s.as_str()));
        }
    }
}
