//! Framing: the 6-byte header, LZ4, and the streaming decoder.

use super::message::{decode_payload, encode_payload};
use super::{type_name, CodecError, Msg, COMPRESS_MIN, FLAG_LZ4, HEADER_LEN, MAX_FRAME};

/// LZ4 cannot expand better than this: a match costs at least one byte per 255 bytes of output.
/// An announced size beyond it is a lie, refused before the output buffer is allocated, so a tiny
/// hostile frame can never make us reserve megabytes.
const LZ4_MAX_RATIO: u64 = 255;

/// Appends `msg` to `out` as one frame, LZ4-compressed when that makes it smaller. On error `out`
/// is left as it was: a [`CodecError::FrameTooLarge`] tells the caller to split the batch.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let result = encode_payload(msg, out).and_then(|()| {
        let body = start + HEADER_LEN;
        let payload_len = out.len() - body;
        if payload_len + 2 > MAX_FRAME {
            return Err(CodecError::FrameTooLarge {
                len: (payload_len + 2) as u64,
                max: MAX_FRAME,
            });
        }
        let mut flags = 0;
        if payload_len > COMPRESS_MIN {
            let packed = lz4_flex::block::compress_prepend_size(&out[body..]);
            if packed.len() < payload_len {
                out.truncate(body);
                out.extend_from_slice(&packed);
                flags |= FLAG_LZ4;
            }
        }
        // Fits: at most MAX_FRAME, checked above, and compression only ever shrinks it.
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4] = msg.type_byte();
        out[start + 5] = flags;
        Ok(())
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Looks for one whole frame at the start of `buf`. `Ok(None)`: not all of it is there yet.
/// `Ok(Some((msg, n)))`: a message, and the `n` bytes of `buf` its frame took. No allocation
/// happens before the frame's length has been checked against `max_frame`, nor before the whole
/// frame is in `buf`.
pub fn decode_frame(buf: &[u8], max_frame: usize) -> Result<Option<(Msg, usize)>, CodecError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
    if len as u64 > max_frame as u64 {
        return Err(CodecError::FrameTooLarge {
            len: len as u64,
            max: max_frame,
        });
    }
    if len < 2 {
        return Err(CodecError::FrameTooShort { len });
    }
    let end = 4 + len as usize;
    let Some(frame) = buf.get(4..end) else {
        return Ok(None);
    };
    let (ty, flags, payload) = (frame[0], frame[1], &frame[2..]);
    let msg = type_name(ty).ok_or(CodecError::UnknownType(ty))?;
    if flags & !FLAG_LZ4 != 0 {
        return Err(CodecError::UnknownFlags { msg, flags });
    }
    let m = if flags & FLAG_LZ4 != 0 {
        let plain = decompress(msg, payload, max_frame.saturating_sub(2))?;
        decode_payload(ty, &plain)?
    } else {
        decode_payload(ty, payload)?
    };
    Ok(Some((m, end)))
}

/// Undoes `compress_prepend_size`, refusing before allocation any announced size over `max` or
/// beyond what the compressed bytes could possibly expand to, and insisting on exactly the
/// announced size.
fn decompress(msg: &'static str, payload: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
    let corrupt = |reason: String| CodecError::Decompress { msg, reason };
    let Some((size, packed)) = payload.split_first_chunk::<4>() else {
        return Err(corrupt(format!(
            "{} bytes, too short for the 4-byte decompressed size",
            payload.len()
        )));
    };
    let announced = u32::from_le_bytes(*size) as u64;
    if announced > max as u64 {
        return Err(CodecError::DecompressedTooLarge {
            msg,
            announced,
            max: max as u64,
        });
    }
    if announced > packed.len() as u64 * LZ4_MAX_RATIO {
        return Err(corrupt(format!(
            "{} compressed bytes cannot expand to the announced {announced}",
            packed.len()
        )));
    }
    let mut plain = vec![0u8; announced as usize];
    let n =
        lz4_flex::block::decompress_into(packed, &mut plain).map_err(|e| corrupt(e.to_string()))?;
    if n as u64 != announced {
        return Err(corrupt(format!(
            "expanded to {n} bytes, {announced} announced"
        )));
    }
    Ok(plain)
}

/// A streaming decoder: [`feed`](Decoder::feed) it bytes as they arrive, then call
/// [`next`](Decoder::next) until it returns `Ok(None)`.
///
/// An error is final: the stream can no longer be trusted, and every later call to `next`
/// returns the same error. The connection should be closed (after sending [`Msg::Error`]).
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    pos: usize,
    max_frame: usize,
    failed: Option<CodecError>,
}

/// Above this, an emptied buffer gives its memory back: one big body chunk should not pin
/// megabytes per connection forever.
const KEEP_CAPACITY: usize = 256 << 10;

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder with the protocol's [`MAX_FRAME`] limit.
    pub fn new() -> Decoder {
        Decoder::with_max_frame(MAX_FRAME)
    }

    /// A decoder with a lower frame limit, for example while the peer is not authenticated yet
    /// (handshake messages are tiny). Limits above [`MAX_FRAME`] are lowered to it.
    pub fn with_max_frame(max_frame: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            max_frame: max_frame.min(MAX_FRAME),
            failed: None,
        }
    }

    /// Changes the frame limit, for example to [`MAX_FRAME`] once the handshake is done.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(MAX_FRAME);
    }

    /// Bytes received but not decoded yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed first.
    // Not `Iterator::next`: an iterator that returned `None` is finished, while a decoder that
    // needs more bytes is not, and its errors are not items.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Msg>, CodecError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match decode_frame(&self.buf[self.pos..], self.max_frame) {
            Ok(Some((msg, n))) => {
                self.pos += n;
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                    if self.buf.capacity() > KEEP_CAPACITY {
                        self.buf.shrink_to(KEEP_CAPACITY);
                    }
                }
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.pos = 0;
                Err(e)
            }
        }
    }
}
