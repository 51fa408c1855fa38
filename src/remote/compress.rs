//! zstd over the serve protocol's streams, between sandoff peers.
//!
//! # Negotiation
//!
//! A stock `nix-store --serve` speaks plain bytes only, so compression is
//! asked for where the client already knows its peer is sandoff: on the
//! remote command line ([`crate::remote::ssh::remote_command`] adds
//! `--compress zstd:LEVEL`). A sandoff too old to know the option refuses
//! it on stderr before the handshake (never garbled data); the offloader
//! then starts it again without the option, on the same connection. A stock Nix peer never gets zstd; when
//! its entry asks for compression the SSH transport compresses instead
//! (zlib, [`WireCompression::SshZlib`]).
//!
//! # Where the compressed streams start
//!
//! After the handshake, in both directions: the client's `SERVE_MAGIC_1`
//! and version and the server's `SERVE_MAGIC_2` and version are plain, so
//! that a remote program that is not a serve server (a shell banner, an
//! error) is still diagnosed from what it printed; the client's first
//! command and the server's first reply are the first compressed bytes.
//! The client may send that first command right behind its greeting,
//! before it has read the server's ([`crate::remote::client::Hello`]):
//! it compresses from there on ([`ZstdTransport::start_sending`]) and
//! decompresses once the server's greeting is read
//! ([`ZstdTransport::start_receiving`]).
//! Neither side reads ahead across that point: the server's decoder reads
//! from the same buffered stdin the handshake was read from, and the
//! client's server never sends anything it was not asked for. Stderr (the
//! build log, the store-directory refusal) is never compressed.
//!
//! # Framing
//!
//! The protocol is request/response: a side that has written a message
//! flushes and waits for the answer, so a flush must put every byte of the
//! message on the wire. Each flush ends a zstd frame ([`Deflater::finish_frame`]),
//! with zstd's content checksum; large messages (a NAR, an export stream)
//! go out block by block as the encoder fills them and end their frame at
//! the flush that ends the message. One frame per message costs a few bytes
//! of header and forgets the window between messages, which only the small
//! messages would have used; in exchange a stream that ends is either at a
//! frame boundary (a clean end) or inside a frame (an error, never taken
//! for a clean end), and every frame is checked against its checksum.
//!
//! Nothing is traded away for it: the protocol above still reads the same
//! bytes and checks the NAR hashes of the uncompressed NARs, as without
//! compression. A corrupt frame fails the read with
//! [`io::ErrorKind::InvalidData`], which ends the session.

use std::io::{self, Read, Write};
use std::time::Instant;

use zstd::stream::raw::{CParameter, DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::transport::Transport;

/// What the decoder reads from the wire at a time.
const IN_BUF: usize = 128 * 1024;
/// What the decoder hands out at a time, and what the encoder collects
/// before writing it to the wire: zstd's block size.
const OUT_BUF: usize = 128 * 1024;

/// The first blocks of a frame end early, at these many plain bytes into
/// the frame (then every [`OUT_BUF`], as zstd's own blocks): the peer can
/// decode nothing of a block before all of it has arrived, and right after
/// the handshake a TCP connection sends only its first congestion window
/// (~14-40 KiB) before it waits a round trip for acknowledgements. A first
/// block of 128 KiB (~64 KiB compressed) thus reached the peer a round trip
/// later than a small one would.
const RAMP: [u64; 3] = [16 * 1024, 32 * 1024, 64 * 1024];

/// The largest window a peer may use (zstd's `windowLogMax`): what levels
/// up to 19 use, so a peer cannot make this side allocate more.
const WINDOW_LOG_MAX: u32 = 23;

/// How the streams to one machine are compressed, once its serve program
/// is known: what the entry's [`Compression`](crate::decide::machines::Compression)
/// means for that peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireCompression {
    /// Plain bytes.
    None,
    /// zstd at this level, both directions (a sandoff peer).
    Zstd { level: i32 },
    /// SSH's zlib compression (a stock Nix peer whose entry asks for
    /// compression).
    SshZlib,
}

impl WireCompression {
    /// How the `compression` of a machine entry is carried to a peer that
    /// is sandoff (`sandoff_peer`) or a stock Nix serve program.
    pub fn choose(c: crate::decide::machines::Compression, sandoff_peer: bool) -> WireCompression {
        match (sandoff_peer, c.zstd_level()) {
            (true, Some(level)) => WireCompression::Zstd { level },
            (true, None) => WireCompression::None,
            (false, _) if c.ssh_zlib() => WireCompression::SshZlib,
            (false, _) => WireCompression::None,
        }
    }
}

impl std::fmt::Display for WireCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireCompression::None => f.write_str("none"),
            WireCompression::Zstd { level } => write!(f, "zstd level {level}"),
            WireCompression::SshZlib => f.write_str("SSH zlib"),
        }
    }
}

/// The value of `sandoff serve --compress`: `zstd:LEVEL`.
pub fn compress_arg(level: i32) -> String {
    format!("zstd:{level}")
}

/// Parses the value of `sandoff serve --compress` ([`compress_arg`]).
pub fn parse_compress_arg(s: &str) -> Result<i32, String> {
    let level = s
        .strip_prefix("zstd:")
        .ok_or_else(|| format!("'{s}' is not zstd:LEVEL"))?;
    let level: i64 = level
        .parse()
        .map_err(|_| format!("'{s}': the level is not a number"))?;
    match crate::decide::machines::Compression::on(level) {
        Ok(c) => Ok(c.zstd_level().expect("on has a level")),
        Err(e) => Err(e.to_string()),
    }
}

/// Byte counts of one direction: what the protocol wrote or read, and what
/// crossed the wire for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCount {
    /// Uncompressed bytes, as the protocol sees them.
    pub plain: u64,
    /// Bytes on the wire (compressed, or the same as `plain`).
    pub wire: u64,
}

/// The compressing half: plain bytes in, zstd frames out.
pub struct Deflater {
    encoder: Encoder<'static>,
    /// Compressed bytes not yet written.
    out: Vec<u8>,
    /// Bytes given since the frame began (an empty message makes no frame).
    in_frame: bool,
    /// Plain bytes given since the frame began.
    frame_plain: u64,
    count: ByteCount,
}

impl Deflater {
    /// An encoder at zstd `level`, each frame checksummed.
    pub fn new(level: i32) -> io::Result<Deflater> {
        let mut encoder = Encoder::new(level)?;
        encoder.set_parameter(CParameter::ChecksumFlag(true))?;
        Ok(Deflater {
            encoder,
            out: Vec::with_capacity(OUT_BUF),
            in_frame: false,
            frame_plain: 0,
            count: ByteCount::default(),
        })
    }

    /// Compresses all of `data` and writes to `wire` whatever blocks the
    /// encoder finished. A block goes out as soon as it is made, not when
    /// a buffer of them is full: the peer starts on a long message (an
    /// export stream) a block after it began, not a buffer after (measured:
    /// 2,000 small paths began importing 20-25 ms earlier on a 1 Gbit/s
    /// link). Small messages make no block before the flush. The first
    /// blocks of a frame are smaller (`RAMP`), so that the first of them
    /// fits in what the connection sends before its first round trip.
    pub fn write_to(&mut self, wire: &mut dyn Write, data: &[u8]) -> io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            // Up to the next early block end, if the frame is still young.
            let ramp = RAMP.iter().find(|&&at| at > self.frame_plain);
            let take = ramp.map_or(rest.len(), |&at| {
                usize::try_from(at - self.frame_plain).map_or(rest.len(), |n| n.min(rest.len()))
            });
            let (now, later) = rest.split_at(take);
            self.compress(wire, now)?;
            if ramp.is_some_and(|&at| self.frame_plain == at) {
                self.end_block(wire)?;
            }
            rest = later;
        }
        self.drain(wire)
    }

    /// Feeds `data` to the encoder, writing out full buffers.
    fn compress(&mut self, wire: &mut dyn Write, data: &[u8]) -> io::Result<()> {
        let mut src = InBuffer::around(data);
        while src.pos() < data.len() {
            self.make_room(wire)?;
            let pos = self.out.len();
            let mut dst = OutBuffer::around_pos(&mut self.out, pos);
            self.encoder.run(&mut src, &mut dst)?;
        }
        self.in_frame |= !data.is_empty();
        self.frame_plain += data.len() as u64;
        self.count.plain += data.len() as u64;
        Ok(())
    }

    /// Ends the current block, inside the frame (the window is kept).
    fn end_block(&mut self, wire: &mut dyn Write) -> io::Result<()> {
        loop {
            self.make_room(wire)?;
            let pos = self.out.len();
            let mut dst = OutBuffer::around_pos(&mut self.out, pos);
            if self.encoder.flush(&mut dst)? == 0 {
                return Ok(());
            }
        }
    }

    /// Ends the frame (if anything was written since the last one) and
    /// writes everything to `wire`, so that the peer can decode the whole
    /// message. Does not flush `wire` itself.
    pub fn finish_frame(&mut self, wire: &mut dyn Write) -> io::Result<()> {
        if self.in_frame {
            loop {
                self.make_room(wire)?;
                let pos = self.out.len();
                let mut dst = OutBuffer::around_pos(&mut self.out, pos);
                let left = self.encoder.finish(&mut dst, true)?;
                if left == 0 {
                    break;
                }
            }
            self.in_frame = false;
            self.frame_plain = 0;
        }
        self.drain(wire)
    }

    /// What was compressed so far.
    pub fn count(&self) -> ByteCount {
        self.count
    }

    /// Writes the buffer out when it is full.
    fn make_room(&mut self, wire: &mut dyn Write) -> io::Result<()> {
        if self.out.len() == self.out.capacity() {
            self.drain(wire)?;
        }
        Ok(())
    }

    fn drain(&mut self, wire: &mut dyn Write) -> io::Result<()> {
        if !self.out.is_empty() {
            wire.write_all(&self.out)?;
            self.count.wire += self.out.len() as u64;
            self.out.clear();
        }
        Ok(())
    }
}

/// The decompressing half: zstd frames in, plain bytes out.
pub struct Inflater {
    decoder: Decoder<'static>,
    input: Box<[u8]>,
    in_pos: usize,
    in_end: usize,
    output: Box<[u8]>,
    out_pos: usize,
    out_end: usize,
    /// The last decoding filled the output: the decoder may hold more.
    maybe_more: bool,
    /// Inside a frame: the stream may not end here.
    in_frame: bool,
    count: ByteCount,
}

impl Inflater {
    /// A decoder that refuses windows larger than levels up to 19 use.
    pub fn new() -> io::Result<Inflater> {
        let mut decoder = Decoder::new()?;
        decoder.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
        Ok(Inflater {
            decoder,
            input: vec![0; IN_BUF].into_boxed_slice(),
            in_pos: 0,
            in_end: 0,
            output: vec![0; OUT_BUF].into_boxed_slice(),
            out_pos: 0,
            out_end: 0,
            maybe_more: false,
            in_frame: false,
            count: ByteCount::default(),
        })
    }

    /// Whether decoded bytes wait to be read.
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out_end
    }

    /// What was decompressed so far.
    pub fn count(&self) -> ByteCount {
        self.count
    }

    /// Decodes what the input buffer holds (or what the decoder still
    /// holds) until there is output or nothing left to decode. Whether
    /// there is output now.
    fn decode_buffered(&mut self) -> io::Result<bool> {
        while !self.has_output() && (self.in_pos < self.in_end || self.maybe_more) {
            let mut src = InBuffer::around(&self.input[self.in_pos..self.in_end]);
            let mut dst = OutBuffer::around(&mut self.output[..]);
            let hint = self.decoder.run(&mut src, &mut dst).map_err(corrupt)?;
            let (used, made) = (src.pos(), dst.pos());
            self.in_pos += used;
            self.out_pos = 0;
            self.out_end = made;
            self.maybe_more = made == self.output.len();
            self.count.plain += made as u64;
            if used > 0 || made > 0 {
                // 0: a frame ended and everything it held was handed out.
                // (A call that did nothing says nothing: between frames
                // it hints at the next frame's header.)
                self.in_frame = hint != 0;
            } else if self.in_pos < self.in_end {
                // zstd always takes input into an empty output buffer.
                return Err(corrupt(io::Error::other("the decoder made no progress")));
            } else {
                break;
            }
        }
        Ok(self.has_output())
    }

    /// Reads once from `wire` into the input buffer (after decoding what it
    /// held): false at the end of the stream, which must be between frames.
    fn fill(&mut self, wire: &mut dyn Read) -> io::Result<bool> {
        let n = loop {
            match wire.read(&mut self.input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        self.in_pos = 0;
        self.in_end = n;
        self.count.wire += n as u64;
        if n == 0 && self.in_frame {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the zstd stream from the peer ended inside a frame (truncated)",
            ));
        }
        Ok(n > 0)
    }

    /// Reads decoded bytes into `buf`, reading from `wire` as needed: at
    /// least one byte, or 0 at a clean end.
    pub fn read_from(&mut self, wire: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !self.decode_buffered()? {
            if !self.fill(wire)? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out_end - self.out_pos);
        buf[..n].copy_from_slice(&self.output[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

fn corrupt(e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the zstd stream from the peer is corrupt: {e}"),
    )
}

/// A `Read` of zstd frames (the server's stdin).
pub struct ZstdReader<R: Read> {
    inner: R,
    inflater: Inflater,
}

impl<R: Read> ZstdReader<R> {
    /// Decodes what `inner` carries.
    pub fn new(inner: R) -> io::Result<ZstdReader<R>> {
        Ok(ZstdReader {
            inner,
            inflater: Inflater::new()?,
        })
    }

    /// What was read so far.
    pub fn count(&self) -> ByteCount {
        self.inflater.count()
    }
}

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inflater.read_from(&mut self.inner, buf)
    }
}

/// A `Write` of zstd frames, one per flush (the server's stdout).
pub struct ZstdWriter<W: Write> {
    inner: W,
    deflater: Deflater,
}

impl<W: Write> ZstdWriter<W> {
    /// Compresses at `level` into `inner`.
    pub fn new(inner: W, level: i32) -> io::Result<ZstdWriter<W>> {
        Ok(ZstdWriter {
            inner,
            deflater: Deflater::new(level)?,
        })
    }

    /// What was written so far.
    pub fn count(&self) -> ByteCount {
        self.deflater.count()
    }
}

impl<W: Write> Write for ZstdWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.deflater.write_to(&mut self.inner, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.deflater.finish_frame(&mut self.inner)?;
        self.inner.flush()
    }
}

/// A client [`Transport`] that is plain until [`ZstdTransport::start`],
/// then zstd both ways (see the module docs for where that is). Each
/// direction may also switch on its own ([`ZstdTransport::start_sending`],
/// [`ZstdTransport::start_receiving`]): a client that sends its first
/// request right behind its greeting compresses it before it has read the
/// server's plain greeting. It counts the bytes either way, so that callers
/// can say what crossed the wire.
pub struct ZstdTransport<T: Transport> {
    inner: T,
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
    level: Option<i32>,
    /// Counted while plain.
    plain_sent: u64,
    plain_received: u64,
}

impl<T: Transport> ZstdTransport<T> {
    /// `inner`, plain for now.
    pub fn new(inner: T) -> ZstdTransport<T> {
        ZstdTransport {
            inner,
            deflater: None,
            inflater: None,
            level: None,
            plain_sent: 0,
            plain_received: 0,
        }
    }

    /// From the next byte on, both directions are zstd, this side
    /// compressing at `level`. Call it right after the handshake (nothing
    /// written since the last flush).
    pub fn start(&mut self, level: i32) -> io::Result<()> {
        self.start_sending(level)?;
        self.start_receiving()
    }

    /// From the next byte written on, this side compresses at `level`.
    /// Call it after a flush (the client's greeting).
    pub fn start_sending(&mut self, level: i32) -> io::Result<()> {
        self.deflater = Some(Deflater::new(level)?);
        self.level = Some(level);
        Ok(())
    }

    /// From the next byte read on, what the server sends is zstd. Call it
    /// once the server's greeting has been read, and nothing after it:
    /// the greeting is read exactly, so nothing compressed was read plain.
    pub fn start_receiving(&mut self) -> io::Result<()> {
        self.inflater = Some(Inflater::new()?);
        Ok(())
    }

    /// The level this side compresses at, if it does.
    pub fn level(&self) -> Option<i32> {
        self.level
    }

    /// Writes `compressed`, zstd made elsewhere from `plain` bytes (by a
    /// [`Deflater`] on another thread), as if they had been written here.
    /// Only at a frame boundary (after a flush): the chunks of that other
    /// encoder's frames follow this side's whole frames.
    pub fn write_compressed(&mut self, compressed: &[u8], plain: u64) -> io::Result<()> {
        let Some(deflater) = &mut self.deflater else {
            return Err(io::Error::other("this side does not compress"));
        };
        if deflater.in_frame {
            return Err(io::Error::other("inside a frame of this side's"));
        }
        self.inner.write_all(compressed)?;
        deflater.count.plain += plain;
        deflater.count.wire += compressed.len() as u64;
        Ok(())
    }

    /// Bytes sent and received so far (the handshake included).
    pub fn counts(&self) -> (ByteCount, ByteCount) {
        let plain = |n| ByteCount { plain: n, wire: n };
        let (mut sent, mut received) = (plain(self.plain_sent), plain(self.plain_received));
        if let Some(d) = &self.deflater {
            let s = d.count();
            sent.plain += s.plain;
            sent.wire += s.wire;
        }
        if let Some(i) = &self.inflater {
            let r = i.count();
            received.plain += r.plain;
            received.wire += r.wire;
        }
        (sent, received)
    }

    /// The transport underneath.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The transport underneath, for closing it.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Transport> Read for ZstdTransport<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inflater {
            Some(inflater) => inflater.read_from(&mut self.inner, buf),
            None => {
                let n = self.inner.read(buf)?;
                self.plain_received += n as u64;
                Ok(n)
            }
        }
    }
}

impl<T: Transport> Write for ZstdTransport<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.deflater {
            Some(deflater) => {
                deflater.write_to(&mut self.inner, buf)?;
                Ok(buf.len())
            }
            None => {
                let n = self.inner.write(buf)?;
                self.plain_sent += n as u64;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(deflater) = &mut self.deflater {
            deflater.finish_frame(&mut self.inner)?;
        }
        self.inner.flush()
    }
}

impl<T: Transport> Transport for ZstdTransport<T> {
    fn wait_reply(&mut self, log: &mut dyn Write, deadline: Option<Instant>) -> io::Result<()> {
        let Some(inflater) = &mut self.inflater else {
            return self.inner.wait_reply(log, deadline);
        };
        // Decoded bytes are a reply; compressed ones only once they decode
        // to something (half a block decodes to nothing yet).
        while !inflater.decode_buffered()? {
            self.inner.wait_reply(log, deadline)?;
            // Readable now: this read does not block.
            if !inflater.fill(&mut self.inner)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the serve server closed its output",
                ));
            }
        }
        Ok(())
    }

    fn drain_log(&mut self, log: &mut dyn Write) -> io::Result<()> {
        self.inner.drain_log(log)
    }
}

/// Writes what `write` produces (one long message, an export stream) to
/// `t`, compressed at `level` on a thread of its own while this thread
/// encrypts and sends what it made: one thread doing both in turn was the
/// limit of large copies (~200 MB/s at level 1, `bench/offload`). A send
/// that fails stops the thread at its next chunk and is the error
/// (`io_err` of it); otherwise `write`'s own result is. Call it after a
/// flush: the thread's frames follow `t`'s whole frames.
pub fn write_compressing<T: Transport, E: Send>(
    t: &mut ZstdTransport<T>,
    level: i32,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E> + Send,
    io_err: impl Fn(io::Error) -> E + Sync,
) -> Result<(), E> {
    // The frame of what was written before (the command word) ends here.
    t.flush().map_err(&io_err)?;
    std::thread::scope(|scope| {
        // A few blocks in flight: enough to keep both threads busy.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, u64)>(8);
        let io_err = &io_err;
        let compressor = scope.spawn(move || {
            let mut shipper = Shipper {
                deflater: Deflater::new(level).map_err(io_err)?,
                out: Vec::new(),
                plain: 0,
                tx,
            };
            write(&mut shipper)?;
            shipper.finish().map_err(io_err)
        });
        let mut sent = Ok(());
        for (chunk, plain) in rx.iter() {
            if let Err(e) = t.write_compressed(&chunk, plain) {
                sent = Err(e);
                break;
            }
        }
        // The thread's next send fails now, if it was not done.
        drop(rx);
        let produced = compressor
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match sent {
            Err(e) => Err(io_err(e)),
            Ok(()) => produced,
        }
    })
}

/// The compressing end of [`write_compressing`]: plain bytes in, chunks
/// of zstd frames out to the sending thread, each as the encoder finishes
/// a block.
struct Shipper {
    deflater: Deflater,
    out: Vec<u8>,
    /// Plain bytes given since the last chunk went.
    plain: u64,
    tx: std::sync::mpsc::SyncSender<(Vec<u8>, u64)>,
}

impl Shipper {
    fn ship(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let chunk = (
            std::mem::take(&mut self.out),
            std::mem::take(&mut self.plain),
        );
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the sending thread stopped"))
    }

    fn finish(mut self) -> io::Result<()> {
        self.deflater.finish_frame(&mut self.out)?;
        self.ship()
    }
}

impl Write for Shipper {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.deflater.write_to(&mut self.out, buf)?;
        self.plain += buf.len() as u64;
        self.ship()?;
        Ok(buf.len())
    }

    /// Blocks go as they are made; the frame ends with the stream.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
