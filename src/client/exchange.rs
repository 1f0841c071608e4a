//! One exchange on one backend connection, and [`send`], which takes the
//! connection from the pool (or opens one) and resends where RFC 9112 9.3.1 allows.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Body as _;
use tracing::debug;

use crate::client::body::PooledBody;
use crate::client::codec::{Outgoing, framing};
use crate::client::conn::BackendConn;
use crate::client::conn_pool::{ConnPool, ConnPools};
use crate::client::error::ExchangeError;
use crate::client::request_body::UpstreamBody;
use crate::client::upload::Upload;

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
    mut conn: BackendConn,
    out: &Outgoing,
    body: Option<UpstreamBody>,
    home: &Arc<ConnPool>,
    body_idle: Duration,
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
    let mut headers = head.headers;
    let (framing, keep) =
        framing(out, head.status, head.version, &mut headers).map_err(|error| Failure {
            error,
            received: true,
        })?;
    let reusable = keep && write_error.is_none();
    let mut response = Response::new(PooledBody::new(
        conn,
        framing,
        upload,
        reusable,
        Arc::clone(home),
        body_idle,
    ));
    // The response keeps the default version: an intermediary sends its own
    // (RFC 9110 6.2), never the backend's HTTP/1.0.
    *response.status_mut() = head.status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Connection settings read per exchange, so a reload applies to new connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectSettings {
    pub connect_timeout: Duration,
    pub idle_ms: u64,
    /// The longest wait for the next byte of a response body.
    pub body_idle: Duration,
}

/// Sends `req`, with the fields in `set` (see [`Outgoing::new`]), to `authority` on
/// a connection from `pools` (see [`ConnPools::acquire`]). A body-less
/// idempotent request that a reused connection answered with nothing (the backend
/// had closed it) is sent again on another one (RFC 9112 9.3.1).
pub async fn send(
    pools: &ConnPools,
    authority: &Authority,
    req: Request<UpstreamBody>,
    set: &[(HeaderName, HeaderValue)],
    settings: ConnectSettings,
) -> Result<Response<PooledBody>, ExchangeError> {
    let (parts, body) = req.into_parts();
    let out = Outgoing::new(&parts, set, &body, authority);
    let resendable = body.is_end_stream() && parts.method.is_idempotent();
    let mut body = (!body.is_end_stream()).then_some(body);
    loop {
        let (conn, reused) = pools
            .acquire(settings.idle_ms, settings.connect_timeout)
            .await?;
        let home = pools.local();
        match exchange(conn, &out, body.take(), home, settings.body_idle).await {
            Ok(response) => return Ok(response),
            Err(failure) if reused && resendable && !failure.received => {
                debug!(%authority, error = %failure.error, "reused connection failed; sending again");
            }
            Err(failure) => return Err(failure.error),
        }
    }
}
