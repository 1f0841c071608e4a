//! HTTP/1.1 to the backends, driven by the task of the request it carries.
//!
//! hyper's client runs each connection as a task of its own: a request went to it
//! through a channel, its response head came back through a oneshot and its body
//! through a third channel, so every proxied request woke three tasks, and that
//! machinery was a third of the proxy's user-space instructions (callgrind,
//! benches/instructions.sh). Here the request's own future writes the head (and any
//! body), reads the response head, and the response body reads the socket itself:
//! one task, woken by the socket.
//!
//! Framing follows RFC 9112 6.3 to the letter, and a response that cannot be framed
//! exactly is an error, never a guess: a pooled connection that lost track of where
//! one response ends would hand its rest to the next client. A connection goes back
//! to the pool only when its response ended exactly at the bytes read.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pool::ConnPool;
use crate::proxy::list_items;
use crate::upstream::UpstreamBody;

/// A response head larger than this is refused (hyper's default limit was ~400 KiB
/// of buffer; nginx's proxy_buffer_size is 4-8 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Response header fields beyond this many are refused (hyper's default, 100).
const MAX_HEADERS: usize = 100;
/// First read of a response: the head and, usually, the whole of a small body.
const HEAD_READ: usize = 8 * 1024;
/// Largest read while streaming a body.
const BODY_READ: usize = 64 * 1024;

/// Why an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("backend closed the connection before sending anything")]
    Closed,
    #[error("backend closed the connection in the middle of a response")]
    Incomplete,
    #[error("backend connection failed")]
    Io(#[source] std::io::Error),
    #[error("backend response is not valid HTTP/1.1: {0}")]
    Protocol(&'static str),
    /// The client's request body failed (too large, malformed, cut short): not the
    /// backend's doing.
    #[error("client request body failed")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A connection to a backend and the bytes read from it but not yet consumed.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub async fn connect(authority: &Authority, timeout: Duration) -> Result<Self, ExchangeError> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let stream = match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ExchangeError::Connect(authority.to_string(), e)),
            Err(_) => {
                return Err(ExchangeError::ConnectTimeout(
                    authority.to_string(),
                    timeout,
                ));
            }
        };
        // Heads are small writes that must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Whether an idle connection can take a request: the backend has sent nothing
    /// since the last response (no close, no stray bytes). It asks only for the
    /// readiness the runtime already knows from epoll: no system call.
    pub fn still_idle(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.buf.is_empty() && self.stream.poll_read_ready(&mut cx).is_pending()
    }

    /// Reads what the socket has into `buf`, with room for at least `want` bytes.
    /// The room is one more than asked, so a read that fills exactly what is wanted
    /// still comes back short and the runtime clears the socket's readiness (which
    /// [`Conn::still_idle`] relies on).
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(want + 1);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }

    /// Reads until a final response head (1xx other than 101 are skipped).
    /// `received` is set once any byte came.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        received: &mut bool,
    ) -> Poll<Result<Head, ExchangeError>> {
        loop {
            if !self.buf.is_empty()
                && let Some(head) = parse_head(&mut self.buf)?
            {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue; // 100 Continue, 103 Early Hints: the real one follows
                }
                return Poll::Ready(Ok(head));
            }
            match ready!(self.poll_fill(cx, HEAD_READ)) {
                Ok(0) if *received => return Poll::Ready(Err(ExchangeError::Incomplete)),
                Ok(0) => return Poll::Ready(Err(ExchangeError::Closed)),
                Ok(_) => *received = true,
                Err(e) => return Poll::Ready(Err(ExchangeError::Io(e))),
            }
        }
    }
}

/// Header fields the proxy sets on an upstream request; each replaces any field of
/// the same name the client sent (see [`Outgoing::new`]).
pub type SetFields = Vec<(HeaderName, HeaderValue)>;

/// A request head ready for the wire, and how its body is framed.
#[derive(Debug, Clone)]
pub struct Outgoing {
    head: Bytes,
    chunked: bool,
    head_request: bool,
    upgrade: bool,
}

impl Outgoing {
    /// Encodes `parts` in origin form: the client's fields, except those `set`
    /// replaces, then the fields in `set`. The framing header comes from the body: a
    /// client's Content-Length is kept; a body of unknown length goes chunked.
    pub fn new(
        parts: &http::request::Parts,
        set: &[(HeaderName, HeaderValue)],
        body: &UpstreamBody,
        authority: &Authority,
    ) -> Self {
        let h = &parts.headers;
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let method = parts.method.as_str();
        let fields: usize = h
            .iter()
            .chain(set.iter().map(|(n, v)| (n, v)))
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let mut head = Vec::with_capacity(method.len() + path.len() + fields + 64);
        head.extend_from_slice(method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let replaced = |name: &HeaderName| set.iter().any(|(n, _)| n == name);
        if !h.contains_key(header::HOST) && !replaced(&header::HOST) {
            head.extend_from_slice(b"host: ");
            head.extend_from_slice(authority.as_str().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let client = h.iter().filter(|(name, _)| !replaced(name));
        for (name, value) in client.chain(set.iter().map(|(n, v)| (n, v))) {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let mut chunked = false;
        if !h.contains_key(header::CONTENT_LENGTH) {
            if !body.is_end_stream() {
                if let Some(n) = body.size_hint().exact() {
                    head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
                } else {
                    head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    chunked = true;
                }
            } else if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                head.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        head.extend_from_slice(b"\r\n");
        Self {
            head: Bytes::from(head),
            chunked,
            head_request: parts.method == Method::HEAD,
            upgrade: replaced(&header::UPGRADE),
        }
    }
}

/// A failed exchange, and whether the backend sent any byte before it failed (a
/// request that got nothing back on a reused connection may be sent again).
#[derive(Debug)]
pub struct Failure {
    pub error: ExchangeError,
    pub received: bool,
}

/// Sends `out` (and `body`, if the request has one) on `conn` and waits for the
/// response head; the body streams after, from the returned [`PooledBody`], which
/// gives the connection back to `home` when the response ended cleanly.
pub async fn exchange(
    mut conn: Conn,
    out: &Outgoing,
    body: Option<UpstreamBody>,
    home: &Arc<ConnPool>,
) -> Result<Response<PooledBody>, Failure> {
    let mut upload = Upload::new(out.head.clone(), body, out.chunked);
    let mut write_error = None;
    let mut received = false;
    // The body is written while the head is awaited: a backend may answer (413, 401)
    // before reading all of it.
    let head = poll_fn(|cx| {
        if write_error.is_none() && !upload.is_done() {
            match upload.poll(&mut conn.stream, cx) {
                Poll::Ready(Err(e @ ExchangeError::ClientBody(_))) => return Poll::Ready(Err(e)),
                Poll::Ready(Err(e)) => {
                    upload.abandon();
                    write_error = Some(e);
                }
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        match ready!(conn.poll_head(cx, &mut received)) {
            Ok(head) => Poll::Ready(Ok(head)),
            // Nothing readable after a failed write: the write error says more.
            Err(ExchangeError::Closed) if write_error.is_some() => {
                Poll::Ready(Err(write_error.take().unwrap_or(ExchangeError::Closed)))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    })
    .await
    .map_err(|error| Failure { error, received })?;
    let (framing, keep) =
        framing(out, head.status, head.version, &head.headers).map_err(|error| Failure {
            error,
            received: true,
        })?;
    let mut response = Response::new(PooledBody {
        conn: Some(conn),
        framing,
        chunks: ChunkedDecoder::default(),
        upload,
        reusable: keep && write_error.is_none(),
        home: Arc::clone(home),
    });
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    if framing == Framing::Empty {
        response.body_mut().finish();
    }
    Ok(response)
}

/// The request bytes still to write: the head, then the body's frames as they come.
struct Upload {
    pending: VecDeque<Bytes>,
    body: Option<UpstreamBody>,
    chunked: bool,
    /// The head is not written before the body's first frame is in.
    head_held: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("pending", &self.pending.len())
            .field("body", &self.body.is_some())
            .finish()
    }
}

impl Upload {
    fn new(head: Bytes, body: Option<UpstreamBody>, chunked: bool) -> Self {
        Self {
            pending: VecDeque::from([head]),
            head_held: body.is_some(),
            body,
            chunked,
        }
    }

    fn is_done(&self) -> bool {
        self.pending.is_empty() && self.body.is_none()
    }

    /// Stops writing; the connection is not reused.
    fn abandon(&mut self) {
        self.pending.clear();
        self.body = None;
        self.head_held = false;
    }

    /// Writes what is pending, then pulls the next frame of the body; one frame at a
    /// time, so a slow backend holds the client's upload back (backpressure). The
    /// head waits for the body's first frame: a body that fails at once (malformed
    /// chunked framing) never reaches the backend at all, and the head and the first
    /// bytes go out in one write.
    fn poll(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ExchangeError>> {
        if self.head_held {
            ready!(self.pull(cx))?;
            self.head_held = false;
        }
        loop {
            if !self.pending.is_empty() {
                let mut slices = [IoSlice::new(&[]); 4];
                let count = self.pending.len().min(slices.len());
                for (slice, bytes) in slices.iter_mut().zip(&self.pending) {
                    *slice = IoSlice::new(bytes);
                }
                let written =
                    ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count]))
                        .map_err(ExchangeError::Io)?;
                if written == 0 {
                    return Poll::Ready(Err(ExchangeError::Io(
                        std::io::ErrorKind::WriteZero.into(),
                    )));
                }
                self.consume(written);
                continue;
            }
            if self.body.is_none() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.pull(cx))?;
        }
    }

    /// Takes the body's next frame into `pending`, framed.
    fn pull(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                // Trailers of a client's chunked body are not passed on.
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    if self.chunked {
                        self.pending
                            .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                        self.pending.push_back(data);
                        self.pending.push_back(Bytes::from_static(b"\r\n"));
                    } else {
                        self.pending.push_back(data);
                    }
                }
            }
            Some(Err(e)) => {
                self.abandon();
                return Poll::Ready(Err(ExchangeError::ClientBody(e)));
            }
            None => {
                self.body = None;
                if self.chunked {
                    self.pending.push_back(Bytes::from_static(b"0\r\n\r\n"));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn consume(&mut self, mut written: usize) {
        while let Some(front) = self.pending.front_mut() {
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.pending.pop_front();
        }
    }
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Parses the response head at the start of `buf` and consumes it; `None` while it
/// is incomplete. Header values share the buffer's bytes (no copies).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
    let (len, code, version, fields) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
            Ok(httparse::Status::Complete(_)) => {
                return Err(ExchangeError::Protocol("response head larger than 64 KiB"));
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(ExchangeError::Protocol("response head larger than 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ExchangeError::Protocol(
                    "more than 100 response header fields",
                ));
            }
            Err(_) => return Err(ExchangeError::Protocol("malformed response head")),
        };
        // Each name, and where its value lies, so the values can share the buffer's
        // bytes once it is frozen.
        let base = buf.as_ptr() as usize;
        let mut fields = Vec::with_capacity(response.headers.len());
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| ExchangeError::Protocol("invalid header name"))?;
            let start = field.value.as_ptr() as usize - base;
            fields.push((name, start, start + field.value.len()));
        }
        let version = if response.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        (len, response.code, version, fields)
    };
    let status = code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Protocol("invalid status code"))?;
    let head = buf.split_to(len).freeze();
    // Room for the fields the proxy adds to every response (pool, request id, a
    // sticky cookie): growing the map for them rehashed it on every request.
    let mut headers = HeaderMap::with_capacity(fields.len() + 3);
    for (name, start, end) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| ExchangeError::Protocol("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// Where a response body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: HEAD, 1xx, 204, 304.
    Empty,
    /// This many bytes still to read.
    Length(u64),
    Chunked,
    /// Until the backend closes.
    Close,
    /// 101 to an upgrade request: the connection now carries another protocol.
    Upgrade,
}

/// The framing of a response and whether its connection can be reused after it.
fn framing(
    out: &Outgoing,
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
) -> Result<(Framing, bool), ExchangeError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // An unrequested 101 is answered 502 by the proxy; the connection is spent.
        let framing = if out.upgrade {
            Framing::Upgrade
        } else {
            Framing::Empty
        };
        return Ok((framing, false));
    }
    let keep_alive = keeps_alive(version, headers);
    if out.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if let Some(te) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = te
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .unwrap_or_default();
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            // With a Content-Length too, chunked wins, but the connection is not
            // trusted after (RFC 9112 6.3, item 3).
            let both = headers.contains_key(header::CONTENT_LENGTH);
            return Ok((Framing::Chunked, keep_alive && !both));
        }
        return Ok((Framing::Close, false));
    }
    match content_length(headers)? {
        Some(n) => Ok((Framing::Length(n), keep_alive)),
        None => Ok((Framing::Close, false)),
    }
}

/// The one Content-Length of a response: repeated values must agree (RFC 9110 8.6).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ExchangeError> {
    let mut length = None;
    for item in list_items(&headers.get_all(header::CONTENT_LENGTH)) {
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err(ExchangeError::Protocol("invalid Content-Length"));
        }
        let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(ExchangeError::Protocol("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    Ok(length)
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told
/// `keep-alive`.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut keep = version == Version::HTTP_11;
    for token in list_items(&headers.get_all(header::CONNECTION)) {
        if token.eq_ignore_ascii_case(b"close") {
            return false;
        }
        if token.eq_ignore_ascii_case(b"keep-alive") {
            keep = true;
        }
    }
    keep
}

/// A backend's response body, read from its connection as the client takes it. At
/// the clean end of the response the connection goes back to its pool; a body
/// dropped early, an error, or a response that ends the connection closes it.
#[derive(Debug)]
pub struct PooledBody {
    conn: Option<Conn>,
    framing: Framing,
    chunks: ChunkedDecoder,
    /// The request body, when the backend answered before it was all written.
    upload: Upload,
    reusable: bool,
    home: Arc<ConnPool>,
}

impl PooledBody {
    /// The connection of a 101 response to an upgrade request, with any bytes of the
    /// new protocol already read.
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        if self.framing != Framing::Upgrade {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Upgraded {
            stream: conn.stream,
            leftover: conn.buf.freeze(),
        })
    }

    /// The response ended: the connection goes home if nothing is left over.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.upload.is_done()
            && conn.buf.is_empty()
        {
            self.home.put_back(conn);
        }
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if !this.upload.is_done() {
                match this.upload.poll(&mut conn.stream, cx) {
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                    Poll::Ready(Err(_)) => {
                        this.upload.abandon();
                        this.reusable = false;
                    }
                }
            }
            let want = match &mut this.framing {
                Framing::Empty | Framing::Upgrade | Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(*left)
                            .map_or(conn.buf.len(), |l| l.min(conn.buf.len()));
                        *left -= n as u64;
                        let data = conn.buf.split_to(n).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    usize::try_from(*left).map_or(BODY_READ, |l| l.min(BODY_READ))
                }
                Framing::Chunked => match this.chunks.decode(&mut conn.buf) {
                    Ok(Some(Chunk::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(Chunk::End)) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => BODY_READ,
                    Err(reason) => return this.fail(ExchangeError::Protocol(reason)),
                },
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    BODY_READ
                }
            };
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(ExchangeError::Incomplete),
                Ok(_) => {}
                Err(e) => return this.fail(ExchangeError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
            || matches!(
                self.framing,
                Framing::Empty | Framing::Upgrade | Framing::Length(0)
            )
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Empty | Framing::Upgrade => SizeHint::with_exact(0),
            Framing::Chunked | Framing::Close => SizeHint::default(),
        }
    }
}

/// A decoded piece of a chunked body.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
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
struct ChunkedDecoder {
    state: ChunkState,
}

impl ChunkedDecoder {
    /// The next piece, or `None` when `buf` holds no more of it.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, &'static str> {
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

/// A backend connection after a 101: the bytes of the new protocol read with the
/// response head come first, then the socket.
#[derive(Debug)]
pub struct Upgraded {
    stream: TcpStream,
    leftover: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.leftover.is_empty() {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover[..n]);
            this.leftover.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
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

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn out(head_request: bool, upgrade: bool) -> Outgoing {
        Outgoing {
            head: Bytes::new(),
            chunked: false,
            head_request,
            upgrade,
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let ok = StatusCode::OK;
        let v11 = Version::HTTP_11;
        let get = out(false, false);
        let f = |o: &Outgoing, s: u16, v: Version, h: &[(&str, &str)]| {
            framing(o, StatusCode::from_u16(s).unwrap(), v, &headers(h))
        };
        assert_eq!(
            f(&get, 200, v11, &[("content-length", "12")]).unwrap(),
            (Framing::Length(12), true)
        );
        assert_eq!(
            f(&get, 200, v11, &[("content-length", "7, 7")]).unwrap(),
            (Framing::Length(7), true)
        );
        assert_eq!(
            f(&out(true, false), 200, v11, &[("content-length", "99")]).unwrap(),
            (Framing::Empty, true)
        );
        assert_eq!(f(&get, 204, v11, &[]).unwrap(), (Framing::Empty, true));
        assert_eq!(
            f(&get, 304, v11, &[("content-length", "5")]).unwrap(),
            (Framing::Empty, true)
        );
        assert_eq!(
            f(&get, 200, v11, &[("transfer-encoding", "gzip, chunked")]).unwrap(),
            (Framing::Chunked, true)
        );
        assert_eq!(
            f(
                &get,
                200,
                v11,
                &[("transfer-encoding", "chunked"), ("content-length", "3")]
            )
            .unwrap(),
            (Framing::Chunked, false)
        );
        assert_eq!(
            f(&get, 200, v11, &[("transfer-encoding", "gzip")]).unwrap(),
            (Framing::Close, false)
        );
        assert_eq!(f(&get, 200, v11, &[]).unwrap(), (Framing::Close, false));
        assert_eq!(
            f(
                &get,
                200,
                v11,
                &[("connection", "close"), ("content-length", "1")]
            )
            .unwrap(),
            (Framing::Length(1), false)
        );
        assert_eq!(
            f(&get, 200, Version::HTTP_10, &[("content-length", "1")]).unwrap(),
            (Framing::Length(1), false)
        );
        assert_eq!(
            f(
                &get,
                200,
                Version::HTTP_10,
                &[("connection", "Keep-Alive"), ("content-length", "1")]
            )
            .unwrap(),
            (Framing::Length(1), true)
        );
        assert_eq!(
            f(&out(false, true), 101, v11, &[]).unwrap(),
            (Framing::Upgrade, false)
        );
        assert_eq!(f(&get, 101, v11, &[]).unwrap(), (Framing::Empty, false));
        for bad in ["5, 6", "-1", "", "1e3", "99999999999999999999"] {
            assert!(
                matches!(
                    f(&get, 200, v11, &[("content-length", bad)]),
                    Err(ExchangeError::Protocol(_))
                ),
                "{bad:?}"
            );
        }
        assert!(
            f(
                &get,
                200,
                v11,
                &[("content-length", "5"), ("content-length", "6")]
            )
            .is_err()
        );
        let _ = ok;
    }

    #[test]
    fn response_heads_parse_once_complete_and_skip_nothing() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n"[..]);
        assert!(parse_head(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\r\nhello");
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["content-length"], "5");
        assert_eq!(head.headers["x-a"], "b");
        assert_eq!(&buf[..], b"hello");
        let mut garbage = BytesMut::from(&b"HELLO WORLD\r\n\r\n"[..]);
        assert!(matches!(
            parse_head(&mut garbage),
            Err(ExchangeError::Protocol(_))
        ));
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        huge.extend_from_slice(&vec![b'a'; MAX_HEAD_BYTES]);
        assert!(matches!(
            parse_head(&mut huge),
            Err(ExchangeError::Protocol(_))
        ));
    }

    #[test]
    fn request_heads_are_origin_form_with_framing_from_the_body() {
        let authority: Authority = "127.0.0.1:9".parse().unwrap();
        let request = http::Request::post("http://127.0.0.1:9/a?b=1")
            .header("x-one", "1")
            .header("x-request-id", "from-client")
            .header("x-two", "2")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let set = [(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("from-proxy"),
        )];
        let out = Outgoing::new(&parts, &set, &UpstreamBody::Empty, &authority);
        assert_eq!(
            std::str::from_utf8(&out.head).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-one: 1\r\nx-two: 2\r\n\
             x-request-id: from-proxy\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(!out.chunked && !out.head_request && !out.upgrade);
        // An upgrade the proxy allowed: its fields come from `set`.
        let get = http::Request::get("/chat")
            .header("host", "app")
            .body(())
            .unwrap();
        let set = [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
        ];
        let out = Outgoing::new(&get.into_parts().0, &set, &UpstreamBody::Empty, &authority);
        assert_eq!(
            std::str::from_utf8(&out.head).unwrap(),
            "GET /chat HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        assert!(out.upgrade);
    }
}
