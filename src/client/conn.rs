//! One connection to a backend and the bytes read from it but not yet consumed.

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

/// A connection to a backend and the bytes read from it but not yet consumed.
#[derive(Debug)]
pub struct BackendConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
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
    /// [`BackendConn::still_idle`] relies on).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(want + 1);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
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
