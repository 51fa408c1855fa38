//! Text from builds made safe for a terminal.
//!
//! A build log, or a message a build machine sends back, is written by the
//! build, not by us: printed as it is, its escape sequences reach the
//! user's terminal, which may then set the clipboard (OSC 52), the window
//! title, or worse. [`filter`] keeps what Nix's `filterANSIEscapes` keeps
//! (SGR colour sequences, so coloured compiler output stays coloured) and
//! drops the rest. Logs on disk stay as the build wrote them; this is only
//! for what goes to a terminal.
//!
//! A leaf module: it depends on nothing else in the crate.

use std::io::{self, Write};

const ESC: char = '\u{1b}';
/// The 8-bit forms of CSI and OSC (C1 controls).
const C1_CSI: char = '\u{9b}';
const C1_OSC: char = '\u{9d}';

/// Returns `bytes` (lossily decoded: invalid UTF-8 becomes U+FFFD) with
/// every escape sequence and control character removed, except:
///
/// - SGR sequences `ESC [ <digits and ;> m` (colours), kept;
/// - newline, kept;
/// - tab, expanded with spaces to the next multiple of 8 columns.
///
/// Other CSI sequences (`ESC [ ... final`), OSC strings (`ESC ] ...` ended
/// by BEL or `ESC \`, or by the end of the text), other escapes (`ESC` and
/// the bytes that make up the sequence), the other C0 controls, DEL and the
/// C1 controls (U+0080 to U+009F; their CSI and OSC forms with the
/// sequence they introduce) are dropped. The output therefore never holds
/// ESC except at the start of an SGR sequence, and no other control
/// character but `\n`.
pub fn filter(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut column = 0usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ESC => match chars.peek() {
                Some('[') => {
                    chars.next();
                    csi(&mut chars, &mut out);
                }
                Some(']') => {
                    chars.next();
                    osc(&mut chars);
                }
                _ => other_escape(&mut chars),
            },
            C1_CSI => {
                // Never kept: a colour is written with `ESC [` by every
                // program that means it, and 8-bit CSI is what a hostile
                // log would use to slip past a 7-bit filter.
                csi(&mut chars, &mut String::new());
            }
            C1_OSC => osc(&mut chars),
            '\n' => {
                out.push('\n');
                column = 0;
            }
            '\t' => {
                out.push(' ');
                column += 1;
                while !column.is_multiple_of(8) {
                    out.push(' ');
                    column += 1;
                }
            }
            c if c.is_control() => {}
            c => {
                out.push(c);
                column += 1;
            }
        }
    }
    out
}

/// After `ESC [`: parameter bytes (0x30-0x3F), intermediate bytes
/// (0x20-0x2F), then a final byte (0x40-0x7E). Appends the sequence to
/// `out` only when it is SGR with plain numeric parameters.
fn csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, out: &mut String) {
    let mut params = String::new();
    while let Some(&c) = chars.peek() {
        if ('\u{30}'..='\u{3f}').contains(&c) {
            params.push(c);
            chars.next();
        } else {
            break;
        }
    }
    let mut intermediates = false;
    while let Some(&c) = chars.peek() {
        if ('\u{20}'..='\u{2f}').contains(&c) {
            intermediates = true;
            chars.next();
        } else {
            break;
        }
    }
    let final_byte = match chars.peek() {
        Some(&c) if ('\u{40}'..='\u{7e}').contains(&c) => {
            chars.next();
            Some(c)
        }
        _ => None,
    };
    let plain = params.chars().all(|c| c.is_ascii_digit() || c == ';');
    if final_byte == Some('m') && plain && !intermediates {
        out.push(ESC);
        out.push('[');
        out.push_str(&params);
        out.push('m');
    }
}

/// After `ESC ]`: everything up to and including BEL or `ESC \` (the
/// string terminator), or to the end of the text.
fn osc(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => return,
            ESC => {
                if chars.peek() == Some(&'\\') {
                    chars.next();
                }
                return;
            }
            _ => {}
        }
    }
}

/// After a lone `ESC`: intermediate bytes (0x20-0x2F) and one final byte
/// (0x30-0x7E), as in `ESC ( B` or `ESC c` (a full reset).
fn other_escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(&c) = chars.peek() {
        if ('\u{20}'..='\u{2f}').contains(&c) {
            chars.next();
        } else {
            break;
        }
    }
    if let Some(&c) = chars.peek() {
        if ('\u{30}'..='\u{7e}').contains(&c) {
            chars.next();
        }
    }
}

/// How many bytes of escaped bad input an error message quotes at most:
/// a whole store path or hook request fits, a flood does not.
pub const QUOTE_MAX: usize = 320;

/// A short quote of `text` for a one-line error message: escaped as a
/// Rust string literal (so no control character or newline gets through),
/// cut after at most [`QUOTE_MAX`] bytes of escaped text, with `…` and the
/// full length when cut. Bad input may be huge: an error shows enough to
/// find it, not all of it.
pub fn quote_short(text: &str) -> String {
    let mut quoted = String::from("\"");
    for (i, c) in text.char_indices() {
        // As `{:?}` of a str writes it (a single quote stays as it is).
        let escaped = match c {
            '\'' => "'".to_owned(),
            c => c.escape_debug().to_string(),
        };
        if quoted.len() + escaped.len() > QUOTE_MAX {
            return format!("{quoted}\"… ({} bytes, cut at {i})", text.len());
        }
        quoted.push_str(&escaped);
    }
    quoted.push('"');
    quoted
}

/// `text` cut to its first `max_chars` characters, with `…` when cut (for
/// a message that may quote bad input at length).
pub fn shorten(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

/// A writer that passes whole lines through [`filter`] to `inner` (a
/// terminal). A line longer than [`Writer::MAX_LINE`] is filtered and
/// written in pieces, so a build printing no newline cannot grow the
/// buffer without bound; what is left at [`Writer::flush`] or drop is
/// written too.
pub struct Writer<W: Write> {
    inner: W,
    partial: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// The most bytes held back waiting for a newline.
    pub const MAX_LINE: usize = 64 * 1024;

    /// Filters what is written before it reaches `inner`.
    pub fn new(inner: W) -> Writer<W> {
        Writer {
            inner,
            partial: Vec::new(),
        }
    }

    fn emit_partial(&mut self) -> io::Result<()> {
        if !self.partial.is_empty() {
            let piece = std::mem::take(&mut self.partial);
            self.inner.write_all(filter(&piece).as_bytes())?;
        }
        Ok(())
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..=i]);
            self.emit_partial()?;
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > Self::MAX_LINE {
            self.emit_partial()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit_partial()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for Writer<W> {
    fn drop(&mut self) {
        // Nothing to report an error to here; the line is lost as it would
        // be on a closed terminal.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> String {
        filter(s.as_bytes())
    }

    #[test]
    fn keeps_plain_text_and_sgr_colours() {
        assert_eq!(f("hello, wörld\n"), "hello, wörld\n");
        assert_eq!(f("\x1b[1;31merror\x1b[0m:"), "\x1b[1;31merror\x1b[0m:");
        assert_eq!(f("\x1b[m"), "\x1b[m");
    }

    #[test]
    fn drops_osc_52_clipboard_and_title_sequences() {
        assert_eq!(f("a\x1b]52;c;ZXZpbA==\x07b"), "ab");
        assert_eq!(f("a\x1b]0;pwned\x1b\\b"), "ab");
        assert_eq!(f("a\x1b]2;unterminated"), "a");
        assert_eq!(f("a\u{9d}0;title\u{9c}b"), "ab");
    }

    #[test]
    fn drops_other_csi_sequences() {
        assert_eq!(f("a\x1b[2Jb"), "ab");
        assert_eq!(f("a\x1b[?1049hb"), "ab");
        assert_eq!(
            f("a\x1b[6nb"),
            "ab",
            "a device status report asks for input"
        );
        assert_eq!(f("a\x1b[?1mb"), "ab", "private parameters are not colours");
        assert_eq!(f("a\x1b[1 mb"), "ab", "intermediate bytes are not colours");
        assert_eq!(f("a\u{9b}31mb"), "ab", "8-bit CSI is dropped whole");
        assert_eq!(f("a\x1b["), "a");
    }

    #[test]
    fn drops_other_escapes_and_controls() {
        assert_eq!(f("a\x1bcb"), "ab", "ESC c resets the terminal");
        assert_eq!(f("a\x1b(Bb"), "ab");
        assert_eq!(f("a\x1bPq#0\x1b\\b"), "aq#0b", "DCS loses its introducer");
        assert_eq!(f("a\x07\x08\r\x0b\x0c\x7f\u{85}b\x1b"), "ab");
        assert_eq!(f("a\0b"), "ab");
    }

    #[test]
    fn expands_tabs_to_multiples_of_eight() {
        assert_eq!(f("\tx"), "        x");
        assert_eq!(f("abc\tx\n\ty"), "abc     x\n        y");
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        assert_eq!(filter(b"a\xffb\xc2"), "a\u{fffd}b\u{fffd}");
        // A C1 CSI written as a bare byte is not UTF-8: it cannot act as one.
        assert_eq!(filter(b"a\x9b2Jb"), "a\u{fffd}2Jb");
    }

    #[test]
    fn quotes_are_short_and_escaped() {
        assert_eq!(quote_short("a\x1b]0;x\x07"), "\"a\\u{1b}]0;x\\u{7}\"");
        assert_eq!(quote_short("'say' \"hi\""), format!("{:?}", "'say' \"hi\""));
        let long = "x".repeat(1000);
        let q = quote_short(&long);
        let kept = QUOTE_MAX - 1;
        assert_eq!(
            q,
            format!("\"{}\"… (1000 bytes, cut at {kept})", "x".repeat(kept))
        );
        let q = quote_short(&"\x1b".repeat(1000));
        assert!(q.len() < QUOTE_MAX + 40, "{q}");
        assert_eq!(shorten("abcd", 4), "abcd");
        assert_eq!(shorten("abcdé", 4), "abcd…");
    }

    #[test]
    fn writer_filters_line_by_line_and_bounds_its_buffer() {
        let mut out = Vec::new();
        {
            let mut w = Writer::new(&mut out);
            w.write_all(b"one\x1b]0;t\x07 \x1b[32mok\x1b[0m\ntw")
                .expect("write");
            w.write_all(b"o\x1b[2J\n").expect("write");
            w.write_all(b"last").expect("write");
        }
        assert_eq!(out, b"one \x1b[32mok\x1b[0m\ntwo\nlast");
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.write_all(&vec![b'x'; Writer::<Vec<u8>>::MAX_LINE + 1])
            .expect("write");
        assert!(w.partial.is_empty());
    }

    /// Whether `s` holds a control character or ESC anywhere but at the
    /// start of `ESC [ <digits;> m`.
    fn unsafe_at(s: &str) -> Option<usize> {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == 0x1b {
                let mut j = i + 1;
                if b.get(j) != Some(&b'[') {
                    return Some(i);
                }
                j += 1;
                while b.get(j).is_some_and(|c| c.is_ascii_digit() || *c == b';') {
                    j += 1;
                }
                if b.get(j) != Some(&b'm') {
                    return Some(i);
                }
                i = j + 1;
                continue;
            }
            i += 1;
        }
        s.char_indices()
            .find(|&(_, c)| c.is_control() && c != '\n' && c != '\x1b')
            .map(|(i, _)| i)
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn hostile() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(b"\x1b".to_vec()),
                Just(b"\x1b[".to_vec()),
                Just(b"\x1b]".to_vec()),
                Just(b"\x07".to_vec()),
                Just(b"\x1b\\".to_vec()),
                Just("\u{9b}".as_bytes().to_vec()),
                Just("\u{9d}".as_bytes().to_vec()),
                Just(b"m".to_vec()),
                Just(b";".to_vec()),
                Just(b"\t".to_vec()),
                Just(b"\n".to_vec()),
                prop::collection::vec(any::<u8>(), 0..4),
                "[0-9;?]{0,3}".prop_map(String::into_bytes),
            ];
            prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
        }

        proptest! {
            #[test]
            fn output_holds_no_escape_but_sgr_and_no_control_but_newline(
                input in hostile()
            ) {
                let out = filter(&input);
                prop_assert_eq!(unsafe_at(&out), None, "{:?} -> {:?}", input, out);
            }

            #[test]
            fn any_bytes_are_safe(input in prop::collection::vec(any::<u8>(), 0..200)) {
                let out = filter(&input);
                prop_assert_eq!(unsafe_at(&out), None, "{:?} -> {:?}", input, out);
            }

            #[test]
            fn text_without_controls_is_unchanged(s in "[^\\p{Cc}]{0,60}") {
                prop_assert_eq!(filter(s.as_bytes()), s);
            }
        }
    }
}
