//! One shape for the I/O wrappers a client connection passes through (the smuggling
//! guard, the idle timeout, parking): each says only what it adds as a [`Hook`], and
//! [`Wrapped`] does the `AsyncRead`/`AsyncWrite` plumbing once for all of them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a wrapper adds to the stream it wraps; everything else passes through.
pub trait Hook: Unpin {
    type Io: AsyncRead + AsyncWrite + Unpin;

    fn io(&mut self) -> Pin<&mut Self::Io>;

    fn io_ref(&self) -> &Self::Io;

    /// Sees the bytes each successful read added (none at the end of the stream).
    fn after_read(&mut self, _read: &[u8]) {}

    /// Sees the outcome of every read and write before the caller does, and may
    /// replace it (a pending read that hit the idle deadline becomes an error).
    fn on_poll<T>(
        &mut self,
        _cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        poll
    }

    /// Whether a shutdown reaches the stream (not while a connection is parked).
    fn shuts_down(&self) -> bool {
        true
    }
}

/// A stream seen through its [`Hook`].
pub struct Wrapped<H>(H);

impl<H> Wrapped<H> {
    pub fn new(hook: H) -> Self {
        Self(hook)
    }

    pub fn hook(&self) -> &H {
        &self.0
    }

    pub fn hook_mut(&mut self) -> &mut H {
        &mut self.0
    }
}

impl<H: Hook> AsyncRead for Wrapped<H> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let hook = &mut self.get_mut().0;
        let before = buf.filled().len();
        let poll = hook.io().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            hook.after_read(&buf.filled()[before..]);
        }
        hook.on_poll(cx, poll)
    }
}

impl<H: Hook> AsyncWrite for Wrapped<H> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let hook = &mut self.get_mut().0;
        let poll = hook.io().poll_write(cx, buf);
        hook.on_poll(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let hook = &mut self.get_mut().0;
        let poll = hook.io().poll_write_vectored(cx, bufs);
        hook.on_poll(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.io_ref().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().0.io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let hook = &mut self.get_mut().0;
        if !hook.shuts_down() {
            return Poll::Ready(Ok(()));
        }
        hook.io().poll_shutdown(cx)
    }
}
