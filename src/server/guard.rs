//! Request-smuggling guard for HTTP/1.x client connections.
//!
//! hyper, following RFC 9112 6.3, accepts a request carrying both Content-Length and
//! Transfer-Encoding (it drops the Content-Length, reads the body as chunked and
//! closes the connection afterwards), and folds repeated identical Content-Length
//! headers into one. Both are classic smuggling probes, and a proxy in front of other
//! HTTP parsers should refuse them outright. The headers hyper removed never reach the
//! handler, so this wrapper reads the client's bytes as they pass, finds each request
//! head (tracking body framing to know where the next head starts), and records the
//! index of the first head with ambiguous framing. The handler answers that request,
//! and any after it on the connection, with 400 and closes.
//!
//! The scan stops for good on HTTP/2 (the preface), after an Upgrade request, and on
//! anything it cannot follow (hyper rejects that itself): it never blocks or alters
//! a byte.
//!
//! Because the scan knows where each message ends, it also tells the accept loop when
//! a connection stands between requests with nothing half-read, which is when an idle
//! keep-alive connection may be parked (see [`crate::server`]).

use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::server::conn_state::ConnState;
use crate::server::io::{Hook, Wrapped};

/// Longest head the scan buffers; hyper refuses larger ones itself (431).
const MAX_HEAD: usize = 256 * 1024;
const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Head,
    /// Bytes of a Content-Length body still to come.
    Body(u64),
    /// In a chunk-size line; `value` so far, `digits` seen, `ext` inside an extension.
    ChunkSize {
        value: u64,
        digits: u32,
        ext: bool,
    },
    ChunkSizeLf {
        value: u64,
    },
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    /// Trailer section after the last chunk; `line` bytes in the current line.
    Trailer {
        line: usize,
        cr: bool,
    },
    Off,
}

/// An I/O stream whose reads are scanned for ambiguous request framing.
pub type FramingGuard<T> = Wrapped<SmugglingGuard<T>>;

/// The scan behind a [`FramingGuard`].
pub struct SmugglingGuard<T> {
    inner: T,
    scan: Scan,
    head: Vec<u8>,
    heads: u64,
    verdict: Arc<ConnState>,
}

impl<T> SmugglingGuard<T> {
    pub fn wrap(inner: T, verdict: Arc<ConnState>) -> FramingGuard<T> {
        Wrapped::new(Self::new(inner, verdict))
    }

    fn new(inner: T, verdict: Arc<ConnState>) -> Self {
        Self {
            inner,
            scan: Scan::Head,
            head: Vec::new(),
            heads: 0,
            verdict,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.scan {
                Scan::Off => return,
                Scan::Head if self.head.is_empty() => {
                    // Fast path: a whole head inside this read is judged in place.
                    match find_head_end(bytes) {
                        Some(end) => {
                            self.scan = judge_head(&bytes[..end], &mut self.heads, &self.verdict);
                            bytes = &bytes[end..];
                        }
                        None if bytes.len() > MAX_HEAD => return self.stop(),
                        None => {
                            self.head.extend_from_slice(bytes);
                            return;
                        }
                    }
                }
                Scan::Head => {
                    let searched = self.head.len().saturating_sub(3);
                    self.head.extend_from_slice(bytes);
                    let Some(end) = find_head_end(&self.head[searched..]).map(|e| searched + e)
                    else {
                        if self.head.len() > MAX_HEAD {
                            self.stop();
                        }
                        return;
                    };
                    let rest = self.head.len() - end;
                    self.scan = judge_head(&self.head[..end], &mut self.heads, &self.verdict);
                    bytes = &bytes[bytes.len() - rest..];
                    self.head.clear();
                }
                Scan::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[usize::try_from(n).unwrap_or(bytes.len())..];
                    self.scan = if left == n {
                        Scan::Head
                    } else {
                        Scan::Body(left - n)
                    };
                }
                Scan::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[usize::try_from(n).unwrap_or(bytes.len())..];
                    self.scan = if left == n {
                        Scan::ChunkDataCr
                    } else {
                        Scan::ChunkData(left - n)
                    };
                }
                state => {
                    self.scan = step_chunked(state, bytes[0]);
                    bytes = &bytes[1..];
                }
            }
        }
    }

    fn stop(&mut self) {
        self.scan = Scan::Off;
        self.head = Vec::new();
    }

    /// Publishes where the scan stands, after a read.
    fn publish(&self) {
        let at_rest = self.scan == Scan::Head && self.head.is_empty();
        self.verdict.publish_scan(at_rest, self.heads);
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Drops the spare capacity a head split across reads left behind.
    pub fn release_buffers(&mut self) {
        if self.head.is_empty() {
            self.head = Vec::new();
        }
    }
}

/// Parses one complete request head, records a bad verdict as head number `*heads`,
/// and returns the scan state for what follows it.
fn judge_head(head: &[u8], heads: &mut u64, verdict: &ConnState) -> Scan {
    // Uninitialized slots: initializing 128 headers (4 KiB) cost more than the parse.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper will refuse what httparse cannot parse; nothing more to follow.
        Ok(httparse::Status::Partial) | Err(_) => return Scan::Off,
    }
    if request.method == Some("PRI") {
        return Scan::Off; // the HTTP/2 preface
    }
    let index = *heads;
    *heads += 1;
    let (mut lengths, mut length, mut te, mut chunked, mut upgrade) =
        (0, None, false, false, false);
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if lengths > 1 || (lengths > 0 && te) {
        verdict.flag_bad_request(index);
        // The handler refuses it and closes: nothing after it matters.
        return Scan::Off;
    }
    match (upgrade, te, chunked, length) {
        (true, ..) => Scan::Off,
        (false, true, true, _) => Scan::ChunkSize {
            value: 0,
            digits: 0,
            ext: false,
        },
        (false, true, false, _) => Scan::Off,
        (false, false, _, Some(0) | None) => Scan::Head,
        (false, false, _, Some(n)) => Scan::Body(n),
    }
}

/// Offset just past the first blank line (`\r\n\r\n`) in `buf`.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// One byte of chunked framing outside chunk data (RFC 9112 7.1).
fn step_chunked(state: Scan, byte: u8) -> Scan {
    match state {
        Scan::ChunkSize { value, digits, ext } => match byte {
            b'\r' if digits > 0 => Scan::ChunkSizeLf { value },
            _ if ext => Scan::ChunkSize { value, digits, ext },
            b';' | b' ' | b'\t' if digits > 0 => Scan::ChunkSize {
                value,
                digits,
                ext: true,
            },
            _ => match char::from(byte).to_digit(16) {
                Some(d) if digits < 15 => Scan::ChunkSize {
                    value: value * 16 + u64::from(d),
                    digits: digits + 1,
                    ext,
                },
                _ => Scan::Off,
            },
        },
        Scan::ChunkSizeLf { value } => match (byte, value) {
            (b'\n', 0) => Scan::Trailer { line: 0, cr: false },
            (b'\n', n) => Scan::ChunkData(n),
            _ => Scan::Off,
        },
        Scan::ChunkDataCr if byte == b'\r' => Scan::ChunkDataLf,
        Scan::ChunkDataLf if byte == b'\n' => Scan::ChunkSize {
            value: 0,
            digits: 0,
            ext: false,
        },
        Scan::Trailer { line, cr: false } if byte == b'\r' => Scan::Trailer { line, cr: true },
        Scan::Trailer { line: 0, cr: true } if byte == b'\n' => Scan::Head,
        Scan::Trailer { cr: true, .. } if byte == b'\n' => Scan::Trailer { line: 0, cr: false },
        Scan::Trailer { line, cr: false } if line < 8192 => Scan::Trailer {
            line: line + 1,
            cr: false,
        },
        _ => Scan::Off,
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Hook for SmugglingGuard<T> {
    type Io = T;

    fn io(&mut self) -> Pin<&mut T> {
        Pin::new(&mut self.inner)
    }

    fn io_ref(&self) -> &T {
        &self.inner
    }

    fn after_read(&mut self, read: &[u8]) {
        if self.scan != Scan::Off && !read.is_empty() {
            self.feed(read);
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the verdicts for `n` requests.
    fn verdicts(input: &[u8], step: usize, n: usize) -> Vec<bool> {
        let verdict = Arc::new(ConnState::default());
        let mut guard = SmugglingGuard::new((), Arc::clone(&verdict));
        for piece in input.chunks(step) {
            guard.feed(piece);
        }
        (0..n).map(|_| verdict.next_request_is_bad()).collect()
    }

    const CLEAN_CL: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    const CLEAN_CHUNKED: &[u8] =
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
    const GET: &[u8] = b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
    const CL_TE: &[u8] =
        b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    const DUP_CL: &[u8] =
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\ncontent-length: 4\r\n\r\nabcd";

    #[test]
    fn clean_pipelined_requests_pass_in_any_split() {
        let input = [CLEAN_CL, CLEAN_CHUNKED, GET, CLEAN_CL].concat();
        for step in [1, 3, 7, 64, 4096] {
            assert_eq!(verdicts(&input, step, 4), [false; 4], "step {step}");
        }
    }

    #[test]
    fn ambiguous_framing_is_flagged_at_its_index() {
        for step in [1, 5, 4096] {
            let input = [GET, CLEAN_CHUNKED, CL_TE, GET].concat();
            assert_eq!(
                verdicts(&input, step, 4),
                [false, false, true, true],
                "step {step}"
            );
            let input = [CLEAN_CL, DUP_CL].concat();
            assert_eq!(verdicts(&input, step, 2), [false, true], "step {step}");
        }
    }

    #[test]
    fn body_bytes_that_look_like_a_head_are_not_judged() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let input = [head.as_bytes(), body, GET].concat();
        assert_eq!(verdicts(&input, 2, 2), [false, false]);
    }

    #[test]
    fn http2_and_upgrades_stop_the_scan() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(verdicts(&[&h2[..], CL_TE].concat(), 4096, 1), [false]);
        let upgrade =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(
            verdicts(&[&upgrade[..], CL_TE].concat(), 4096, 2),
            [false, false]
        );
    }
}
