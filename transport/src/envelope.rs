//! The versioned, checksummed wire envelope every TCP-like channel of replog uses (peer
//! links and the client port): a 16-byte header, then the payload.
//!
//! ```text
//! offset size field
//!  0     4    magic    b"RPLG"
//!  4     1    version  VERSION (a peer or client speaking another version is refused)
//!  5     1    kind     what the payload is (the channel defines its kinds)
//!  6     2    flags    0 (reserved; non-zero is refused)
//!  8     4    len      payload length, little-endian
//! 12     4    crc      CRC32C of bytes 0..12 and of the payload, little-endian
//! 16     len  payload
//! ```
//!
//! Decoding never panics and never trusts `len` beyond the decoder's limit: a frame
//! longer than the limit is refused from its header alone, before any of it is buffered.

use bytes::{Buf, Bytes, BytesMut};

/// The frame magic.
pub const MAGIC: [u8; 4] = *b"RPLG";
/// The envelope and protocol version spoken by this build.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: u8,
    /// The payload.
    pub payload: Bytes,
}

/// Why bytes are not a valid frame. Every variant closes the connection it came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not the magic: not a replog peer or client.
    #[error("bad magic {0:02x?} (not a replog frame)")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("protocol version {got} not supported (this build speaks {VERSION})")]
    Version {
        /// The version received.
        got: u8,
    },
    /// Reserved flags set.
    #[error("reserved flags {0:#06x} set")]
    Flags(u16),
    /// The length field exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The checksum does not match.
    #[error("checksum mismatch (header says {expected:#010x}, computed {computed:#010x})")]
    Checksum {
        /// From the header.
        expected: u32,
        /// Over the received bytes.
        computed: u32,
    },
}

fn crc(header12: &[u8], payload: &[&[u8]]) -> u32 {
    let mut c = crc32c::crc32c(header12);
    for p in payload {
        c = crc32c::crc32c_append(c, p);
    }
    c
}

/// The header of a frame of `kind` whose payload is the concatenation of `parts` (for
/// vectored writes: send the header, then the parts, without copying them).
pub fn header(kind: u8, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).expect("payload larger than 4 GiB");
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind;
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    let c = crc(&h[0..12], parts);
    h[12..16].copy_from_slice(&c.to_le_bytes());
    h
}

/// Appends a whole frame to `out`.
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&header(kind, &[payload]));
    out.extend_from_slice(payload);
}

/// Incremental decoder for a byte stream with a frame-size limit.
#[derive(Clone, Debug)]
pub struct Decoder {
    max: u32,
}

impl Decoder {
    /// A decoder refusing payloads above `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Decoder { max: max_payload }
    }

    /// Checks a header; returns the payload length it announces.
    pub fn check_header(&self, h: &[u8; HEADER_LEN]) -> Result<u32, FrameError> {
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if h[4] != VERSION {
            return Err(FrameError::Version { got: h[4] });
        }
        let flags = u16::from_le_bytes([h[6], h[7]]);
        if flags != 0 {
            return Err(FrameError::Flags(flags));
        }
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(len)
    }

    /// Takes one frame off the front of `buf` if a whole one is there (`Ok(None)`: need
    /// more bytes). After an error the stream is unusable: close it.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(&h) = buf.first_chunk::<HEADER_LEN>() else {
            // Refuse a wrong magic or version as soon as the bytes show it.
            let n = buf.len().min(4);
            if buf[..n] != MAGIC[..n] {
                let mut m = [0u8; 4];
                m[..n].copy_from_slice(&buf[..n]);
                return Err(FrameError::BadMagic(m));
            }
            return Ok(None);
        };
        let len = self.check_header(&h)? as usize;
        if buf.len() < HEADER_LEN + len {
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        let expected = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let computed = crc(&h[0..12], &[&buf[HEADER_LEN..HEADER_LEN + len]]);
        if expected != computed {
            return Err(FrameError::Checksum { expected, computed });
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        Ok(Some(Frame { kind: h[5], payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() {
        let mut out = Vec::new();
        encode(7, b"hello", &mut out);
        encode(9, b"", &mut out);
        let d = Decoder::new(1024);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in out {
            buf.extend_from_slice(&[b]);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => panic!("a frame fed a byte at a time does not decode: {e}"),
                }
            }
        }
        assert_eq!(
            frames,
            vec![Frame { kind: 7, payload: Bytes::from_static(b"hello") }, Frame { kind: 9, payload: Bytes::new() }]
        );
    }

    #[test]
    fn refuses_bad_input() {
        let d = Decoder::new(8);
        let mut out = Vec::new();
        encode(1, b"123456789", &mut out);
        assert!(matches!(d.decode(&mut BytesMut::from(&out[..])), Err(FrameError::TooLarge { len: 9, max: 8 })));
        let mut bad = Vec::new();
        encode(1, b"abc", &mut bad);
        bad[17] ^= 1;
        assert!(matches!(d.decode(&mut BytesMut::from(&bad[..])), Err(FrameError::Checksum { .. })));
        let mut v = Vec::new();
        encode(1, b"abc", &mut v);
        v[4] = 2;
        assert_eq!(d.decode(&mut BytesMut::from(&v[..])), Err(FrameError::Version { got: 2 }));
        assert!(matches!(d.decode(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..])), Err(FrameError::BadMagic(_))));
        assert!(matches!(d.decode(&mut BytesMut::from(&b"GE"[..])), Err(FrameError::BadMagic(_))));
    }
}
