//! The zstd stream of a peer (`remote::compress`): arbitrary bytes never
//! make the decoder panic, and what the encoder writes, flushed at
//! arbitrary message boundaries, decodes back to the same bytes.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use sandoff::remote::compress::{ZstdReader, ZstdWriter};

fuzz_target!(|data: &[u8]| {
    // As a peer's stream: an error or some bytes, never a panic.
    let mut out = Vec::new();
    if let Ok(mut r) = ZstdReader::new(data) {
        let _ = r.by_ref().take(16 << 20).read_to_end(&mut out);
    }

    // As messages: the first byte picks the level, each following byte
    // below 8 ends a message (a flush).
    let Some((&level, rest)) = data.split_first() else {
        return;
    };
    let mut wire = Vec::new();
    let mut w = ZstdWriter::new(&mut wire, i32::from(level % 19) + 1).expect("encoder");
    for chunk in rest.split_inclusive(|b| *b < 8) {
        w.write_all(chunk).expect("write");
        w.flush().expect("flush");
    }
    drop(w);
    let mut back = Vec::new();
    ZstdReader::new(&wire[..])
        .expect("decoder")
        .read_to_end(&mut back)
        .expect("decodes");
    assert_eq!(back, rest);
});
