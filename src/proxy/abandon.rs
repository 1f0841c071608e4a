//! A request's end when someone gives up on it after it was forwarded: the client
//! (an HTTP/2 RST_STREAM, an HTTP/1.1 disconnect) before or during the response, or
//! the backend in the middle of a body. The backend did the work either way, so each
//! is counted and logged: a paced rapid-reset attack, or a backend that stalls
//! mid-body, must show on the dashboard and in the log, not only as a shorter
//! request count.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::{Body, Frame, SizeHint};
use tracing::{info, warn};

use crate::client::body::PooledBody;
use crate::observe::metrics::{Metrics, ResetStage};
use crate::observe::trace::RequestTrace;
use crate::proxy::error::ProxyError;
use crate::routing::PoolKind;
use crate::shadow::Tee;

/// Which request a note is about; its `proxied` log line, found by `request_id`,
/// has the rest (backend, status, time). Small, since every response body carries
/// one.
pub struct RequestNote {
    pub metrics: Arc<Metrics>,
    pub pool: PoolKind,
    pub request_id: HeaderValue,
    /// When the canary analysis judged the request as a success (its monotonic
    /// ms): a body cut later is its failure, in that request's slot. Set once the
    /// request is recorded ([`TrackedBody::judged`]).
    pub judged: Option<u64>,
    /// The request's server span (`[tracing]`), ended with the body.
    pub trace: Option<Box<RequestTrace>>,
}

impl RequestNote {
    fn client_reset(&mut self, stage: ResetStage, elapsed: Option<std::time::Duration>) {
        self.metrics.pool(self.pool).client_reset(stage);
        if let Some(trace) = &mut self.trace {
            trace.client_reset(stage.as_str());
        }
        info!(
            request_id = self.request_id.to_str().unwrap_or(""),
            pool = self.pool.as_str(),
            stage = stage.as_str(),
            duration_us = elapsed.map(|e| u64::try_from(e.as_micros()).unwrap_or(u64::MAX)),
            "client reset"
        );
    }
}

/// Counts a request whose handler was dropped before it answered: the client reset
/// it while the backend had it. Disarmed once the response is ready.
pub struct Unanswered<'a> {
    metrics: &'a Arc<Metrics>,
    pool: PoolKind,
    request_id: &'a HeaderValue,
    start: Instant,
    /// The request's server span, which a reset before the answer marks.
    trace: Option<Box<RequestTrace>>,
    armed: bool,
}

impl<'a> Unanswered<'a> {
    pub fn new(
        metrics: &'a Arc<Metrics>,
        pool: PoolKind,
        request_id: &'a HeaderValue,
        start: Instant,
        trace: Option<Box<RequestTrace>>,
    ) -> Self {
        Self {
            metrics,
            pool,
            request_id,
            start,
            trace,
            armed: true,
        }
    }

    /// The request's server span, while it waits for its answer.
    pub fn trace(&self) -> Option<&RequestTrace> {
        self.trace.as_deref()
    }

    /// The answer is ready: nothing to count; the span goes on with the response.
    pub fn answered(mut self) -> Option<Box<RequestTrace>> {
        self.armed = false;
        self.trace.take()
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Only on the rare drop path: the clones are not paid by answered requests.
            RequestNote {
                metrics: Arc::clone(self.metrics),
                pool: self.pool,
                request_id: self.request_id.clone(),
                judged: None,
                trace: self.trace.take(),
            }
            .client_reset(ResetStage::BeforeResponse, Some(self.start.elapsed()));
        }
    }
}

/// A backend's response body on its way to the client: a failure (the backend
/// stalled past `upstream_body_idle_ms`, cut the body short, broke its framing) is
/// counted as an upstream error and logged; a body the client stopped taking before
/// its end is counted as a client reset.
pub struct TrackedBody {
    inner: PooledBody,
    note: RequestNote,
    /// The body ended or failed: dropping it is no reset.
    over: bool,
    /// The shadow's copy of a mirrored request's body (`crate::shadow`).
    tee: Option<Tee>,
}

impl std::fmt::Debug for TrackedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBody")
            .field("inner", &self.inner)
            .field("over", &self.over)
            .finish_non_exhaustive()
    }
}

impl TrackedBody {
    pub fn new(inner: PooledBody, note: RequestNote) -> Self {
        Self {
            inner,
            note,
            over: false,
            tee: None,
        }
    }

    /// Hands the body's chunks to a mirrored request's comparison as they pass.
    #[must_use]
    pub fn teed(mut self, tee: Option<Tee>) -> Self {
        self.tee = tee;
        self.end_tee_if_over();
        self
    }

    /// hyper does not poll a body again once it says it has ended.
    fn end_tee_if_over(&mut self) {
        if self.inner.is_end_stream()
            && let Some(tee) = &mut self.tee
        {
            tee.end();
        }
    }

    /// When the analysis judged this request a success, if it did (only then does
    /// a cut body count against its pool).
    pub fn judged(&mut self, recorded_ms: Option<u64>) {
        self.note.judged = recorded_ms;
    }

    /// The request's server span: it ends when the body does.
    pub fn trace(&mut self, trace: Box<RequestTrace>) {
        self.note.trace = Some(trace);
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = ProxyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                this.over = true;
                this.tee = None;
                let error = ProxyError::from_exchange(error);
                let note = &mut this.note;
                if let Some(trace) = &mut note.trace {
                    trace.body_cut(&error.to_string());
                }
                if let Some(kind) = error.class().kind {
                    note.metrics.pool(note.pool).upstream_error(kind);
                    // For the canary analysis, a body cut by the backend is a failure
                    // of a judged request (never of one counted apart or capped).
                    if let Some(recorded_ms) = note.judged {
                        note.metrics
                            .recorder
                            .record_late_error(note.pool, recorded_ms);
                    }
                }
                warn!(
                    request_id = note.request_id.to_str().unwrap_or(""),
                    pool = note.pool.as_str(),
                    error = %error,
                    cause = error.cause(),
                    "response body cut"
                );
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                this.over = true;
                if let Some(tee) = &mut this.tee {
                    tee.end();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(tee), Some(data)) = (&mut this.tee, frame.data_ref()) {
                    tee.data(data);
                    this.end_tee_if_over();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if !self.over && !self.inner.is_end_stream() {
            self.note.client_reset(ResetStage::DuringResponse, None);
        }
    }
}
