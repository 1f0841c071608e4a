//! A backend's response body, read from its connection as the client takes it, and
//! the connection of a 101 handed over to a tunnel.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::client::chunked::{Chunk, ChunkedDecoder};
use crate::client::codec::Framing;
use crate::client::conn::BackendConn;
use crate::client::conn_pool::ConnPool;
use crate::client::error::ExchangeError;
use crate::client::upload::Upload;

/// Largest read while streaming a body. Each read's block lives until the client
/// took its bytes, so this is most of what a stalled HTTP/2 stream pins: 64 KiB
/// blocks made a never-reading HTTP/2 connection cost 15.5 MiB, 32 KiB 8.3 MiB (16 KiB:
/// 5.4 MiB, but large HTTP/1.1 downloads slowed by 10-20%).
const BODY_READ: usize = 32 * 1024;

/// A backend's response body, read from its connection as the client takes it. At
/// the clean end of the response the connection goes back to its pool; a body
/// dropped early, an error, or a response that ends the connection closes it.
#[derive(Debug)]
pub struct PooledBody {
    conn: Option<BackendConn>,
    framing: Framing,
    chunks: ChunkedDecoder,
    /// The request body, when the backend answered before it was all written.
    upload: Upload,
    reusable: bool,
    home: Arc<ConnPool>,
    /// The longest wait for the next byte of the body (`upstream_body_idle_ms`).
    idle: Duration,
    /// Armed the first time the body waits on the backend; re-armed after progress.
    idle_timer: Option<Pin<Box<Sleep>>>,
    /// Bytes came since the timer was last armed.
    progressed: bool,
}

impl PooledBody {
    /// The body of a response framed by `framing` on `conn`; `reusable` says whether
    /// the connection may go back to `home` once the body ended cleanly. A backend
    /// that sends no byte of it for `idle` fails it (the client's response is cut,
    /// never passed off as complete, and the connection is closed).
    pub fn new(
        conn: BackendConn,
        framing: Framing,
        upload: Upload,
        reusable: bool,
        home: Arc<ConnPool>,
        idle: Duration,
    ) -> Self {
        let mut body = Self {
            conn: Some(conn),
            framing,
            chunks: ChunkedDecoder::default(),
            upload,
            reusable,
            home,
            idle,
            idle_timer: None,
            progressed: false,
        };
        if framing == Framing::Empty {
            body.finish();
        }
        body
    }

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
            _slot: conn.slot,
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

    /// The backend has nothing to read yet: pending, unless it has been quiet for
    /// `idle` since the last byte (or since the body was first waited on).
    fn wait_for_backend(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let idle = self.idle;
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if std::mem::take(&mut self.progressed) {
            timer.as_mut().reset(Instant::now() + idle);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => self.fail(ExchangeError::BodyIdle(idle)),
            Poll::Pending => Poll::Pending,
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
            let filled = match conn.poll_fill(cx, want) {
                Poll::Ready(filled) => filled,
                Poll::Pending => return this.wait_for_backend(cx),
            };
            this.progressed = true;
            match filled {
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

/// A backend connection after a 101: the bytes of the new protocol read with the
/// response head come first, then the socket.
#[derive(Debug)]
pub struct Upgraded {
    stream: TcpStream,
    leftover: Bytes,
    /// A tunnel is an open connection to the backend: it counts against
    /// `max_connections` until it closes.
    _slot: Option<crate::client::conn::Held>,
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
