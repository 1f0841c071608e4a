//! The client's request body as it is sent upstream: streamed through, never
//! buffered, and cut with [`BodyTooLarge`] once it passes `limits.max_body_bytes`.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A request body exceeded `limits.max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds max_body_bytes ({0})")]
pub struct BodyTooLarge(pub u64);

/// Reading the client's request body failed (malformed chunking, client gone): the
/// client's fault, not the backend's.
#[derive(Debug, thiserror::Error)]
#[error("reading the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// Held while the client's body is still arriving; dropped when it has all arrived,
/// failed or was abandoned (the server side counts uploads in progress with it).
pub type UntilEnd = Box<dyn Send + Sync>;

/// The body sent upstream: the client's body streamed through (with an optional size
/// limit), or nothing (a retried request, which only ever has an empty body).
pub enum UpstreamBody {
    Client {
        inner: Incoming,
        limit: Option<u64>,
        seen: u64,
        until_end: Option<UntilEnd>,
    },
    Empty,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        Self::Client {
            inner,
            limit,
            seen: 0,
            until_end: None,
        }
    }

    /// Keeps `token` until the client's body has all arrived (at once, when it has
    /// none), failed, or is dropped.
    #[must_use]
    pub fn holding(mut self, token: UntilEnd) -> Self {
        if let Self::Client {
            inner, until_end, ..
        } = &mut self
            && !inner.is_end_stream()
        {
            *until_end = Some(token);
        }
        self
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Client {
                inner,
                limit,
                seen,
                until_end,
            } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if inner.is_end_stream() {
                        *until_end = None;
                    }
                    if let Some(data) = frame.data_ref() {
                        *seen += data.len() as u64;
                        if let Some(limit) = *limit
                            && *seen > limit
                        {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    *until_end = None;
                    Poll::Ready(Some(Err(Box::new(ClientBodyError(e)))))
                }
                Poll::Ready(None) => {
                    *until_end = None;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Client { inner, .. } => inner.size_hint(),
        }
    }
}
