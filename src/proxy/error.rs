//! Why a request got no upstream response, and everything the proxy does about it.
//!
//! Each error's status, metric kind, retry and connection-close answers, body and
//! `Retry-After` come from one exhaustive match ([`ProxyError::class`]), and an
//! upstream client error becomes a proxy error in one place
//! ([`ProxyError::from_exchange`]), so a new variant cannot be half-handled.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::client::error::ExchangeError;
use crate::client::request_body::BodyTooLarge;
use crate::observe::metrics::UpstreamErrorKind;

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request cannot be proxied: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("no backend available in pool {0}")]
    NoBackend(&'static str),
    #[error("request body larger than max_body_bytes ({0})")]
    PayloadTooLarge(u64),
    #[error("the client's request body was malformed or cut short")]
    ClientBody,
    #[error("backend switched protocols without being asked")]
    BadGatewayUpgrade,
    #[error("connecting to the backend failed")]
    Connect(#[source] ExchangeError),
    #[error("backend sent no response headers within {0:?}")]
    Timeout(Duration),
    #[error("backend sent no byte of the response body for {0:?}")]
    BodyIdle(Duration),
    #[error("backend closed or broke the connection")]
    Reset(#[source] ExchangeError),
    #[error("backend sent an invalid response")]
    BadResponse(#[source] ExchangeError),
    /// The backend's connection limits were reached (`max_connections` open and the
    /// queue full, or no connection free within `pending_timeout_ms`): the backend
    /// never saw the request.
    #[error("backend at its connection limit")]
    Saturated(#[source] ExchangeError),
}

/// What the proxy does about one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    /// The `kind` label of `canarygate_upstream_errors_total`; `None` when the
    /// backend was never involved.
    pub kind: Option<UpstreamErrorKind>,
    /// Worth one more try on another backend: the backend never saw the request, or
    /// dropped it before answering.
    pub retryable: bool,
    /// The client connection must not be reused (its framing cannot be trusted).
    pub closes_connection: bool,
    pub body: &'static str,
    /// Send `Retry-After: 1`.
    pub retry_after: bool,
}

impl ProxyError {
    /// The one place errors are classified.
    pub fn class(&self) -> Class {
        let class = |status, kind, retryable, closes_connection, body| Class {
            status,
            kind,
            retryable,
            closes_connection,
            body,
            retry_after: false,
        };
        use UpstreamErrorKind as K;
        match self {
            Self::BadRequest(_) | Self::ClientBody => class(
                StatusCode::BAD_REQUEST,
                None,
                false,
                true,
                "400 bad request\n",
            ),
            Self::MethodNotAllowed => class(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                false,
                false,
                "405 method not allowed\n",
            ),
            Self::Saturated(_) => Class {
                retry_after: true,
                ..class(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    false,
                    false,
                    "503 backend busy: at its connection limit\n",
                )
            },
            Self::NoBackend(_) => Class {
                retry_after: true,
                ..class(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    false,
                    false,
                    "503 no backend available\n",
                )
            },
            Self::PayloadTooLarge(_) => class(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                false,
                true,
                "413 request body too large\n",
            ),
            Self::Connect(_) => class(
                StatusCode::BAD_GATEWAY,
                Some(K::Connect),
                true,
                false,
                "502 bad gateway: backend unreachable\n",
            ),
            Self::Reset(_) => class(
                StatusCode::BAD_GATEWAY,
                Some(K::Reset),
                true,
                false,
                "502 bad gateway: backend failed\n",
            ),
            Self::BadResponse(_) | Self::BadGatewayUpgrade => class(
                StatusCode::BAD_GATEWAY,
                Some(K::Protocol),
                false,
                false,
                "502 bad gateway: backend failed\n",
            ),
            Self::Timeout(_) | Self::BodyIdle(_) => class(
                StatusCode::GATEWAY_TIMEOUT,
                Some(K::Timeout),
                false,
                false,
                "504 gateway timeout: backend too slow\n",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.class().status
    }

    /// The `reason` label of `canarygate_upstream_pending_rejected_total` when the
    /// backend's connection limits refused the request.
    pub fn saturated_reason(&self) -> Option<&'static str> {
        match self {
            Self::Saturated(ExchangeError::PendingFull(_)) => Some("queue_full"),
            Self::Saturated(_) => Some("timeout"),
            _ => None,
        }
    }

    /// The one mapping of an upstream client error: the client's own body failing is
    /// 413 or 400 (the backend is not to blame); a connect error never reached the
    /// backend; a connection that closed or broke is a reset; anything the backend
    /// sent that is not HTTP is a bad response.
    pub fn from_exchange(error: ExchangeError) -> Self {
        match error {
            ExchangeError::ClientBody(cause) => match cause.downcast_ref::<BodyTooLarge>() {
                Some(BodyTooLarge(limit)) => Self::PayloadTooLarge(*limit),
                None => Self::ClientBody,
            },
            e @ (ExchangeError::Connect(..) | ExchangeError::ConnectTimeout(..)) => {
                Self::Connect(e)
            }
            e @ (ExchangeError::Closed | ExchangeError::Incomplete | ExchangeError::Io(_)) => {
                Self::Reset(e)
            }
            e @ ExchangeError::Protocol(_) => Self::BadResponse(e),
            e @ (ExchangeError::PendingFull(_) | ExchangeError::PendingTimeout(_)) => {
                Self::Saturated(e)
            }
            ExchangeError::BodyIdle(after) => Self::BodyIdle(after),
        }
    }

    /// The short plain-text answer the client gets.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let class = self.class();
        let mut response = Response::new(Full::new(Bytes::from_static(class.body.as_bytes())));
        *response.status_mut() = class.status;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if class.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// The innermost cause, for the log line.
    pub fn cause(&self) -> String {
        let mut error: &(dyn std::error::Error + 'static) = self;
        while let Some(source) = error.source() {
            error = source;
        }
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> std::io::Error {
        std::io::ErrorKind::ConnectionReset.into()
    }

    #[test]
    fn every_error_has_its_class() {
        use UpstreamErrorKind as K;
        // (error, status, kind, retryable, closes the connection, Retry-After)
        let table: Vec<(ProxyError, u16, Option<K>, bool, bool, bool)> = vec![
            (ProxyError::BadRequest("x"), 400, None, false, true, false),
            (ProxyError::ClientBody, 400, None, false, true, false),
            (ProxyError::MethodNotAllowed, 405, None, false, false, false),
            (
                ProxyError::NoBackend("canary"),
                503,
                None,
                false,
                false,
                true,
            ),
            (
                ProxyError::Saturated(ExchangeError::PendingFull(1)),
                503,
                None,
                false,
                false,
                true,
            ),
            (
                ProxyError::PayloadTooLarge(1),
                413,
                None,
                false,
                true,
                false,
            ),
            (
                ProxyError::BadGatewayUpgrade,
                502,
                Some(K::Protocol),
                false,
                false,
                false,
            ),
            (
                ProxyError::Connect(ExchangeError::Connect("a:1".into(), io())),
                502,
                Some(K::Connect),
                true,
                false,
                false,
            ),
            (
                ProxyError::Timeout(Duration::from_secs(1)),
                504,
                Some(K::Timeout),
                false,
                false,
                false,
            ),
            (
                ProxyError::BodyIdle(Duration::from_secs(1)),
                504,
                Some(K::Timeout),
                false,
                false,
                false,
            ),
            (
                ProxyError::Reset(ExchangeError::Closed),
                502,
                Some(K::Reset),
                true,
                false,
                false,
            ),
            (
                ProxyError::BadResponse(ExchangeError::Protocol("x")),
                502,
                Some(K::Protocol),
                false,
                false,
                false,
            ),
        ];
        for (error, status, kind, retryable, closes, retry_after) in table {
            let class = error.class();
            assert_eq!(
                (class.status.as_u16(), class.kind, class.retryable),
                (status, kind, retryable),
                "{error:?}"
            );
            assert_eq!(
                (class.closes_connection, class.retry_after),
                (closes, retry_after),
                "{error:?}"
            );
            assert!(class.body.starts_with(&status.to_string()), "{error:?}");
            let response = error.response();
            assert_eq!(response.status(), status);
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                retry_after
            );
        }
    }

    #[test]
    fn every_exchange_error_maps_once() {
        let mapped = |e| std::mem::discriminant(&ProxyError::from_exchange(e));
        let d = std::mem::discriminant;
        assert_eq!(
            mapped(ExchangeError::Connect("a:1".into(), io())),
            d(&ProxyError::Connect(ExchangeError::Closed))
        );
        assert_eq!(
            mapped(ExchangeError::ConnectTimeout("a:1".into(), Duration::ZERO)),
            d(&ProxyError::Connect(ExchangeError::Closed))
        );
        for reset in [
            ExchangeError::Closed,
            ExchangeError::Incomplete,
            ExchangeError::Io(io()),
        ] {
            assert_eq!(mapped(reset), d(&ProxyError::Reset(ExchangeError::Closed)));
        }
        for saturated in [
            ExchangeError::PendingFull(1),
            ExchangeError::PendingTimeout(Duration::ZERO),
        ] {
            let reason = ProxyError::from_exchange(saturated).saturated_reason();
            assert!(reason.is_some());
        }
        assert_eq!(
            ProxyError::from_exchange(ExchangeError::PendingFull(1)).saturated_reason(),
            Some("queue_full")
        );
        assert_eq!(ProxyError::Timeout(Duration::ZERO).saturated_reason(), None);
        assert_eq!(
            mapped(ExchangeError::Protocol("x")),
            d(&ProxyError::BadResponse(ExchangeError::Closed))
        );
        assert_eq!(
            mapped(ExchangeError::ClientBody(Box::new(BodyTooLarge(7)))),
            d(&ProxyError::PayloadTooLarge(7))
        );
        assert_eq!(
            mapped(ExchangeError::ClientBody(Box::new(io()))),
            d(&ProxyError::ClientBody)
        );
    }

    #[test]
    fn the_cause_is_the_innermost_error() {
        let error = ProxyError::Connect(ExchangeError::Connect("a:1".into(), io()));
        assert_eq!(error.cause(), io().to_string());
        assert_eq!(ProxyError::MethodNotAllowed.cause(), "method not allowed");
    }
}
