//! The chunked transfer coding of response bodies (RFC 9112 7.1), decoded from a
//! buffer one byte state at a time, so a body split anywhere decodes the same.

use bytes::{Buf, Bytes, BytesMut};

/// A decoded piece of a chunked body.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    Data(Bytes),
    End,
}

/// Where a chunked decoder is (RFC 9112 7.1); sizes are hex, at most 15 digits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    SizeStart,
    Size(u64, u8),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer field line, or of the final empty line.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Decodes a chunked body from a buffer, consuming what it decodes. Chunk
/// extensions and trailer fields are read and dropped.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl ChunkedDecoder {
    /// The next piece, or `None` when `buf` holds no more of it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, &'static str> {
        use ChunkState as S;
        loop {
            match self.state {
                S::Done => return Ok(Some(Chunk::End)),
                S::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let left = left - n as u64;
                    self.state = if left == 0 { S::DataCr } else { S::Data(left) };
                    return Ok(Some(Chunk::Data(buf.split_to(n).freeze())));
                }
                _ => {}
            }
            let Some(&byte) = buf.first() else {
                return Ok(None);
            };
            buf.advance(1);
            self.state = match (self.state, byte) {
                (S::SizeStart, b) if b.is_ascii_hexdigit() => S::Size(hex(b), 1),
                (S::Size(_, 15), b) if b.is_ascii_hexdigit() => return Err("chunk size too large"),
                (S::Size(size, digits), b) if b.is_ascii_hexdigit() => {
                    S::Size(size * 16 + hex(b), digits + 1)
                }
                (S::Size(size, _), b';' | b' ' | b'\t') => S::Extension(size),
                (S::Size(size, _) | S::Extension(size), b'\r') => S::SizeLf(size),
                (S::Extension(size), b) if b != b'\n' => S::Extension(size),
                (S::SizeLf(0), b'\n') => S::TrailerStart,
                (S::SizeLf(size), b'\n') => S::Data(size),
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => S::SizeStart,
                (S::TrailerStart, b'\r') => S::EndLf,
                (S::TrailerLine, b'\r') => S::TrailerLf,
                (S::TrailerStart | S::TrailerLine, b) if b != b'\n' => S::TrailerLine,
                (S::TrailerLf, b'\n') => S::TrailerStart,
                (S::EndLf, b'\n') => S::Done,
                _ => return Err("malformed chunked body"),
            };
        }
    }
}

fn hex(b: u8) -> u64 {
    u64::from(match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], piece: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for part in input.chunks(piece) {
            buf.extend_from_slice(part);
            while let Some(chunk) = decoder.decode(&mut buf)? {
                match chunk {
                    Chunk::Data(data) => body.extend_from_slice(&data),
                    Chunk::End => return Ok((body, buf.is_empty())),
                }
            }
        }
        Ok((body, false))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        let wire = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-checksum: 1\r\nx-more: 2\r\n\r\n";
        for piece in 1..=wire.len() {
            let (body, clean_end) = decode_all(wire, piece).unwrap();
            assert_eq!(
                body, b"helloabcdefghijklmnopqrstuvwxyz",
                "split every {piece}"
            );
            assert!(clean_end, "split every {piece}");
        }
        // No trailers, uppercase hex, extension after whitespace.
        assert_eq!(
            decode_all(b"A \r\n0123456789\r\n0\r\n\r\n", 3).unwrap(),
            (b"0123456789".to_vec(), true)
        );
        // Bytes after the end stay in the buffer: the connection is not reused.
        assert_eq!(
            decode_all(b"0\r\n\r\nHTTP/1.1", 64).unwrap(),
            (Vec::new(), false)
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for wire in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5;ext\nhello",
            b"1000000000000000\r\n",
        ] {
            assert!(
                decode_all(wire, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        // 15 hex digits is the most a size may have.
        assert!(decode_all(b"fffffffffffffff\r\nab", 64).is_ok());
    }
}
