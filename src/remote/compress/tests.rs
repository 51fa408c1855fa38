//! The codec alone, then a request/response exchange through a pipe pair
//! with a server thread, as the serve protocol uses it.

use super::*;
use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;

/// Compressible text, like a closure's files (not random bytes).
fn text(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    let mut i = 0u64;
    while v.len() < n {
        v.extend_from_slice(format!("line {i}: /nix/store/some-path-{}\n", i % 97).as_bytes());
        i += 1;
    }
    v.truncate(n);
    v
}

#[test]
fn each_flush_makes_a_frame_the_reader_decodes_whole() {
    let mut wire = Vec::new();
    let mut w = ZstdWriter::new(&mut wire, 3).expect("encoder");
    w.write_all(b"hello").unwrap();
    w.flush().unwrap();
    let first_frame = w.count().wire;
    assert!(first_frame > 0);
    // A flush with nothing written makes no frame.
    w.flush().unwrap();
    assert_eq!(w.count().wire, first_frame);
    let big = text(1 << 20);
    w.write_all(&big).unwrap();
    w.flush().unwrap();
    let count = w.count();
    assert_eq!(count.plain, 5 + (1 << 20));
    assert!(count.wire < count.plain / 4, "{count:?}");
    drop(w);
    let mut r = ZstdReader::new(&wire[..]).expect("decoder");
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(&got[..5], b"hello");
    assert!(got[5..] == big[..]);
    assert_eq!(r.count().wire, wire.len() as u64);
}

#[test]
fn a_long_message_reaches_the_wire_block_by_block_before_its_flush() {
    let data = text(1 << 20);
    let mut wire = Vec::new();
    let mut d = Deflater::new(1).expect("encoder");
    for piece in data.chunks(64 << 10) {
        d.write_to(&mut wire, piece).unwrap();
    }
    // Not flushed: what is on the wire already decodes to the message's
    // beginning (each finished block went out as it was made).
    let mut r = ZstdReader::new(&wire[..]).expect("decoder");
    let mut start = vec![0u8; 512 << 10];
    r.read_exact(&mut start).unwrap();
    assert!(start[..] == data[..start.len()]);
}

#[test]
fn a_frame_begins_with_small_blocks_the_peer_decodes_at_once() {
    let data = text(200 << 10);
    let mut wire = Vec::new();
    let mut d = Deflater::new(1).expect("encoder");
    // Written in one piece, not flushed: the first 16, 32 and 64 KiB each
    // ended a block of their own and are on the wire, well under 16 KiB
    // compressed for the first.
    d.write_to(&mut wire, &data[..(16 << 10) + 1]).unwrap();
    let first = wire.len();
    assert!(
        first > 0 && first < 16 << 10,
        "{first} bytes for the first block"
    );
    let mut r = ZstdReader::new(&wire[..]).expect("decoder");
    let mut start = vec![0u8; 16 << 10];
    r.read_exact(&mut start).unwrap();
    assert!(start[..] == data[..16 << 10]);
    d.write_to(&mut wire, &data[(16 << 10) + 1..]).unwrap();
    let mut r = ZstdReader::new(&wire[..]).expect("decoder");
    let mut start = vec![0u8; 64 << 10];
    r.read_exact(&mut start).unwrap();
    assert!(start[..] == data[..64 << 10]);
    // The next frame ramps again, and everything decodes whole.
    d.finish_frame(&mut wire).unwrap();
    let frame_end = wire.len();
    d.write_to(&mut wire, &data[..20 << 10]).unwrap();
    assert!(
        wire.len() > frame_end,
        "the second frame's first block went out"
    );
    d.finish_frame(&mut wire).unwrap();
    let mut got = Vec::new();
    ZstdReader::new(&wire[..])
        .expect("decoder")
        .read_to_end(&mut got)
        .unwrap();
    assert!(got[..data.len()] == data[..] && got[data.len()..] == data[..20 << 10]);
}

#[test]
fn a_stream_cut_inside_a_frame_is_an_error_not_an_end() {
    let mut wire = Vec::new();
    let mut w = ZstdWriter::new(&mut wire, 3).expect("encoder");
    w.write_all(&text(100_000)).unwrap();
    w.flush().unwrap();
    drop(w);
    for cut in [1, wire.len() / 2, wire.len() - 1] {
        let mut r = ZstdReader::new(&wire[..cut]).expect("decoder");
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}: {e}");
    }
}

#[test]
fn a_flipped_byte_is_refused() {
    let data = text(200_000);
    let mut wire = Vec::new();
    let mut w = ZstdWriter::new(&mut wire, 3).expect("encoder");
    w.write_all(&data).unwrap();
    w.flush().unwrap();
    drop(w);
    // Every position: the header, the blocks, the checksum at the end.
    let step = (wire.len() / 50).max(1);
    for i in (0..wire.len()).step_by(step).chain([wire.len() - 1]) {
        let mut bad = wire.clone();
        bad[i] ^= 0x10;
        let mut got = Vec::new();
        let res = ZstdReader::new(&bad[..])
            .expect("decoder")
            .read_to_end(&mut got);
        assert!(
            res.is_err(),
            "a flipped byte at {i} of {} went unnoticed",
            wire.len()
        );
    }
}

#[test]
fn plain_bytes_are_not_taken_for_zstd() {
    let mut r = ZstdReader::new(&b"Welcome to our build server!\n"[..]).expect("decoder");
    let e = r.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(
        e.to_string()
            .contains("zstd stream from the peer is corrupt"),
        "{e}"
    );
}

#[test]
fn compress_arg_round_trips_and_refuses_bad_levels() {
    assert_eq!(parse_compress_arg(&compress_arg(3)), Ok(3));
    assert_eq!(parse_compress_arg("zstd:19"), Ok(19));
    for bad in ["zstd:0", "zstd:20", "zstd:-1", "zstd:x", "gzip:3", "3", ""] {
        assert!(parse_compress_arg(bad).is_err(), "{bad}");
    }
}

/// A [`Transport`] over one end of a socket pair, without stderr.
struct SocketTransport(BufReader<UnixStream>, UnixStream);

impl Read for SocketTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for SocketTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.1.flush()
    }
}

impl Transport for SocketTransport {
    fn wait_reply(&mut self, _log: &mut dyn Write, _deadline: Option<Instant>) -> io::Result<()> {
        use std::io::BufRead;
        if self.0.fill_buf()?.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
    fn drain_log(&mut self, _log: &mut dyn Write) -> io::Result<()> {
        Ok(())
    }
}

/// Reads one length-prefixed message.
fn read_msg(r: &mut dyn Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 8];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let mut msg = vec![0; u64::from_le_bytes(len) as usize];
    r.read_exact(&mut msg)?;
    Ok(Some(msg))
}

fn write_msg(w: &mut dyn Write, msg: &[u8]) -> io::Result<()> {
    w.write_all(&(msg.len() as u64).to_le_bytes())?;
    w.write_all(msg)
}

#[test]
fn requests_and_replies_cross_a_pipe_pair_without_deadlock() {
    let (client_end, server_end) = UnixStream::pair().expect("socket pair");
    // The server: a plain handshake line, then zstd: each request answered
    // with its reverse (a big one for the big request), flushed per reply.
    let server = std::thread::spawn(move || -> io::Result<u64> {
        let mut input = BufReader::new(server_end.try_clone()?);
        let mut output = BufWriter::new(server_end);
        let mut hello = [0u8; 5];
        input.read_exact(&mut hello)?;
        output.write_all(b"olleh")?;
        output.flush()?;
        let mut input = ZstdReader::new(&mut input)?;
        let mut output = ZstdWriter::new(&mut output, 1)?;
        let mut n = 0;
        while let Some(mut msg) = read_msg(&mut input)? {
            msg.reverse();
            write_msg(&mut output, &msg)?;
            output.flush()?;
            n += 1;
        }
        Ok(n)
    });
    let mut t = ZstdTransport::new(SocketTransport(
        BufReader::new(client_end.try_clone().expect("clone")),
        client_end,
    ));
    t.write_all(b"hello").unwrap();
    t.flush().unwrap();
    t.wait_reply(&mut io::sink(), None).unwrap();
    let mut hello = [0u8; 5];
    t.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"olleh");
    t.start(3).unwrap();
    let big = text(3 << 20);
    for msg in [&b"a"[..], b"", &text(1000), &big, b"last"] {
        write_msg(&mut t, msg).unwrap();
        t.flush().unwrap();
        // The reply is awaited as the client does: wait_reply, then read.
        t.wait_reply(&mut io::sink(), None).unwrap();
        let reply = read_msg(&mut t).unwrap().expect("a reply");
        let mut want = msg.to_vec();
        want.reverse();
        assert!(reply == want, "reply to a message of {} bytes", msg.len());
    }
    let (sent, received) = t.counts();
    assert!(sent.wire < sent.plain / 4, "{sent:?}");
    assert!(received.wire < received.plain / 4, "{received:?}");
    // Closing the client's side between frames is a clean end for the server.
    drop(t);
    assert_eq!(server.join().expect("server thread").expect("server"), 5);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn messages_flushed_anywhere_decode_back(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..12),
            level in 1i32..=19,
        ) {
            let mut wire = Vec::new();
            let mut w = ZstdWriter::new(&mut wire, level).expect("encoder");
            for m in &messages {
                w.write_all(m).unwrap();
                w.flush().unwrap();
            }
            drop(w);
            let mut back = Vec::new();
            ZstdReader::new(&wire[..]).expect("decoder").read_to_end(&mut back).unwrap();
            prop_assert_eq!(back, messages.concat());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut out = Vec::new();
            let _ = ZstdReader::new(&data[..]).expect("decoder").take(1 << 20).read_to_end(&mut out);
        }
    }
}

/// A transport into memory that may refuse writes after `limit` bytes.
struct Memory {
    wire: Vec<u8>,
    limit: usize,
}

impl Read for Memory {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

impl Write for Memory {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.wire.len() + buf.len() > self.limit {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.wire.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Memory {
    fn wait_reply(&mut self, _: &mut dyn Write, _: Option<Instant>) -> io::Result<()> {
        Ok(())
    }
    fn drain_log(&mut self, _: &mut dyn Write) -> io::Result<()> {
        Ok(())
    }
}

fn memory(limit: usize) -> ZstdTransport<Memory> {
    let mut t = ZstdTransport::new(Memory {
        wire: Vec::new(),
        limit,
    });
    t.start(1).expect("zstd");
    t
}

#[test]
fn a_message_compressed_on_another_thread_follows_this_sides_frames() {
    let data = text(3 << 20);
    let mut t = memory(usize::MAX);
    // A command word of this side's, not flushed yet, then the message.
    t.write_all(b"command!").unwrap();
    let res = write_compressing(
        &mut t,
        1,
        |w| {
            for piece in data.chunks(100_000) {
                w.write_all(piece)?;
            }
            Ok(())
        },
        |e: io::Error| e,
    );
    res.expect("sent");
    let (sent, _) = t.counts();
    assert_eq!(sent.plain, 8 + data.len() as u64);
    let wire = t.into_inner().wire;
    assert_eq!(sent.wire, wire.len() as u64);
    let mut got = Vec::new();
    ZstdReader::new(&wire[..])
        .expect("decoder")
        .read_to_end(&mut got)
        .expect("whole frames");
    assert_eq!(&got[..8], b"command!");
    assert!(got[8..] == data[..]);
}

#[test]
fn a_failed_send_stops_the_compressing_thread_and_is_the_error() {
    let data = text(8 << 20);
    let mut t = memory(64 << 10);
    let mut written = 0usize;
    let res = write_compressing(
        &mut t,
        1,
        |w| {
            for piece in data.chunks(64 << 10) {
                w.write_all(piece)?;
                written += piece.len();
            }
            Ok(())
        },
        |e: io::Error| e,
    );
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    assert!(
        written < data.len(),
        "the thread stopped early ({written} bytes)"
    );
}

#[test]
fn the_writers_own_error_comes_through() {
    let mut t = memory(usize::MAX);
    let res: Result<(), String> = write_compressing(
        &mut t,
        1,
        |w| {
            w.write_all(&text(300_000)).map_err(|e| e.to_string())?;
            Err("a file changed while it was read".to_owned())
        },
        |e: io::Error| e.to_string(),
    );
    assert_eq!(res.unwrap_err(), "a file changed while it was read");
}
