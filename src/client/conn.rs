//! One connection to a backend and the bytes read from it but not yet consumed.
//!
//! It carries its place under its backend's `max_connections` ([`Held`]: the pool's
//! slot, opaque here so this file needs nothing from the pool): the connection
//! counts against the limit for exactly as long as it lives.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use http::StatusCode;
use http::uri::Authority;
use tokio::net::TcpStream;

use crate::client::codec::{Head, parse_head};
use crate::client::error::ExchangeError;

/// First read of a response: the head and, usually, the whole of a small body.
const HEAD_READ: usize = 8 * 1024;

/// Whatever a connection holds while it lives and gives back when it closes (by
/// being dropped with it).
pub struct Held(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

impl Held {
    pub fn new(guard: impl std::any::Any + Send + Sync) -> Self {
        Self(Box::new(guard))
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

/// A connection to a backend and the bytes read from it but not yet consumed.
#[derive(Debug)]
pub struct BackendConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Its place under the backend's `max_connections` (none for a connection made
    /// outside a pool).
    pub slot: Option<Held>,
    /// The worker thread whose runtime the socket is registered with.
    pub worker: usize,
}

impl BackendConn {
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
            slot: None,
            worker: crate::worker::index(),
        })
    }

    /// The connection registered with the calling worker's runtime: one handed over
    /// from another worker (through the queue, or taken from its idle stack) leaves
    /// that runtime's reactor and joins this one's, so its readiness never depends
    /// on another thread's event loop. Two `epoll_ctl` calls, only when it moved.
    pub fn rehome(self) -> std::io::Result<Self> {
        let here = crate::worker::index();
        if self.worker == here {
            return Ok(self);
        }
        let Self {
            stream, buf, slot, ..
        } = self;
        let stream = TcpStream::from_std(stream.into_std()?)?;
        Ok(Self {
            stream,
            buf,
            slot,
            worker: here,
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
    /// The room is made only once the socket is readable, so a request waiting for its
    /// backend holds no buffer (thousands in flight held 8 KiB each). It is one more
    /// than asked, so a read that fills exactly what is wanted still comes back short
    /// and the runtime clears the socket's readiness (which
    /// [`BackendConn::still_idle`] relies on).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() <= want {
            ready!(self.stream.poll_read_ready(cx))?;
        }
        self.buf.reserve(want + 1);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }

    /// Frees the read buffer of a connection with nothing left in it, so an idle
    /// connection, and the next request's wait for its response, hold none.
    pub fn shed_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Reads until a final response head (1xx other than 101 are skipped).
    /// `received` is set once any byte came.
    pub fn poll_head(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::conn_pool::{ConnLimits, ConnPools};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A request waiting for its backend holds no read buffer; one is made when the
    /// response arrives and given back when the connection returns to its pool.
    #[tokio::test]
    async fn the_read_buffer_exists_only_while_there_is_something_to_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (conn, accepted) = tokio::join!(
            BackendConn::connect(&authority, Duration::from_secs(5)),
            listener.accept()
        );
        let mut conn = conn.unwrap();
        let (mut backend, _) = accepted.unwrap();

        let mut received = false;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(conn.poll_head(&mut cx, &mut received).is_pending());
        assert_eq!(conn.buf.capacity(), 0, "waiting, it holds a buffer");

        backend
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .unwrap();
        let head = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| conn.poll_head(cx, &mut received)),
        )
        .await
        .expect("the head within 5 s")
        .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(&conn.buf[..], b"hi");

        drop(conn.buf.split_to(2)); // the body, consumed
        let pools = ConnPools::new(authority, ConnLimits::default());
        pools.local().put_back(conn);
        let conn = pools
            .local()
            .checkout(60_000)
            .expect("the idle connection back");
        assert_eq!(conn.buf.capacity(), 0, "idle, it holds a buffer");
    }
}
