//! Writing a request upstream: the head, then the body's frames as the client sends
//! them, one frame at a time so a slow backend holds the client's upload back.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::body::Body;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::client::error::ExchangeError;
use crate::client::request_body::UpstreamBody;

/// The request bytes still to write: the head, then the body's frames as they come.
pub struct Upload {
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
    pub fn new(head: Bytes, body: Option<UpstreamBody>, chunked: bool) -> Self {
        Self {
            pending: VecDeque::from([head]),
            head_held: body.is_some(),
            body,
            chunked,
        }
    }

    pub fn is_done(&self) -> bool {
        self.pending.is_empty() && self.body.is_none()
    }

    /// Stops writing; the connection is not reused.
    pub fn abandon(&mut self) {
        self.pending.clear();
        self.body = None;
        self.head_held = false;
    }

    /// Writes what is pending, then pulls the next frame of the body; one frame at a
    /// time, so a slow backend holds the client's upload back (backpressure). The
    /// head waits for the body's first frame: a body that fails at once (malformed
    /// chunked framing) never reaches the backend at all, and the head and the first
    /// bytes go out in one write.
    pub fn poll(
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
