//! The wire format: request heads encoded in origin form, response heads parsed with
//! their values sharing the read buffer, and where a response body ends (RFC 9112
//! 6.3) and whether its connection may carry another request after it.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, StatusCode, Version};
use hyper::body::Body as _;

use crate::client::error::ExchangeError;
use crate::client::request_body::UpstreamBody;
use crate::http1::list_items;

/// A response head larger than this is refused (hyper's default limit was ~400 KiB
/// of buffer; nginx's proxy_buffer_size is 4-8 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Response header fields beyond this many are refused (hyper's default, 100).
const MAX_HEADERS: usize = 100;

/// Header fields the proxy sets on an upstream request; each replaces any field of
/// the same name the client sent (see [`Outgoing::new`]).
pub type SetFields = Vec<(HeaderName, HeaderValue)>;

/// A request head ready for the wire, and how its body is framed.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub head: Bytes,
    pub chunked: bool,
    pub head_request: bool,
    pub upgrade: bool,
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

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Parses the response head at the start of `buf` and consumes it; `None` while it
/// is incomplete. Header values share the buffer's bytes (no copies).
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
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
pub enum Framing {
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
/// The framing fields are made to say what the proxy will send: no Content-Length
/// beside chunked (RFC 9112 6.3: a proxy MUST remove it), and one Content-Length
/// value for a list of equal ones (RFC 9110 8.6). Transfer-Encoding goes later, with
/// the other hop-by-hop fields.
pub fn framing(
    out: &Outgoing,
    status: StatusCode,
    version: Version,
    headers: &mut HeaderMap,
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
    if out.head_request || status.is_informational() {
        return Ok((Framing::Empty, keep_alive));
    }
    let has_coding = headers.contains_key(header::TRANSFER_ENCODING);
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // No body, whatever the fields say; a backend that announced one may send
        // it anyway, so its connection is not trusted after.
        let announced = has_coding
            || (status == StatusCode::NO_CONTENT
                && !matches!(content_length(headers)?, (None | Some(0), _)));
        return Ok((Framing::Empty, keep_alive && !announced));
    }
    if has_coding {
        // Only `chunked` alone is understood: another coding passed on undecoded
        // would reach the client as content (nginx answers 502 the same way).
        let chunked_only = {
            let values = headers.get_all(header::TRANSFER_ENCODING);
            let mut codings = list_items(&values);
            codings
                .next()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                && codings.next().is_none()
        };
        if !chunked_only {
            return Err(ExchangeError::Protocol("unsupported transfer coding"));
        }
        // Chunked wins over a Content-Length, but the connection is not trusted
        // after (RFC 9112 6.3, item 3); nor after Transfer-Encoding in an HTTP/1.0
        // response (RFC 9112 6.1: faulty framing, close after the message).
        let had_length = headers.remove(header::CONTENT_LENGTH).is_some();
        let clean = version == Version::HTTP_11 && !had_length;
        return Ok((Framing::Chunked, keep_alive && clean));
    }
    match content_length(headers)? {
        (Some(n), true) => Ok((Framing::Length(n), keep_alive)),
        (Some(n), false) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Ok((Framing::Length(n), keep_alive))
        }
        (None, _) => Ok((Framing::Close, false)),
    }
}

/// The one Content-Length of a response: repeated values must agree (RFC 9110 8.6).
/// Also whether it was written as one plain value (else it is sent as one).
fn content_length(headers: &HeaderMap) -> Result<(Option<u64>, bool), ExchangeError> {
    let (mut length, mut items) = (None, 0);
    for item in list_items(&headers.get_all(header::CONTENT_LENGTH)) {
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err(ExchangeError::Protocol("invalid Content-Length"));
        }
        let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(ExchangeError::Protocol("conflicting Content-Length values"));
        }
        length = Some(n);
        items += 1;
    }
    Ok((length, items <= 1))
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

#[cfg(test)]
mod tests {
    use super::*;

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
            framing(o, StatusCode::from_u16(s).unwrap(), v, &mut headers(h))
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
            f(&get, 200, v11, &[("transfer-encoding", "Chunked")]).unwrap(),
            (Framing::Chunked, true)
        );
        // Codings the proxy does not apply are refused, not passed on as content.
        for coding in [
            "gzip, chunked",
            "chunked, gzip",
            "gzip",
            "chunked, chunked",
            "",
        ] {
            assert!(
                matches!(
                    f(&get, 200, v11, &[("transfer-encoding", coding)]),
                    Err(ExchangeError::Protocol(_))
                ),
                "{coding:?}"
            );
        }
        // HTTP/1.0 with chunked: read, then never reused, keep-alive or not.
        assert_eq!(
            f(
                &get,
                200,
                Version::HTTP_10,
                &[
                    ("transfer-encoding", "chunked"),
                    ("connection", "keep-alive")
                ]
            )
            .unwrap(),
            (Framing::Chunked, false)
        );
        // 204 and 304 have no body; one announced anyway spends the connection.
        assert_eq!(
            f(&get, 204, v11, &[("content-length", "0")]).unwrap(),
            (Framing::Empty, true)
        );
        assert_eq!(
            f(&get, 204, v11, &[("content-length", "5")]).unwrap(),
            (Framing::Empty, false)
        );
        assert_eq!(
            f(&get, 304, v11, &[("transfer-encoding", "chunked")]).unwrap(),
            (Framing::Empty, false)
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
    fn framing_fields_say_what_is_sent() {
        let get = out(false, false);
        let sent = |fields: &[(&str, &str)]| {
            let mut h = headers(fields);
            framing(&get, StatusCode::OK, Version::HTTP_11, &mut h).unwrap();
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert!(sent(&[("content-length", "3"), ("transfer-encoding", "chunked")]).is_empty());
        assert_eq!(sent(&[("content-length", "5, 5")]), ["5"]);
        assert_eq!(
            sent(&[("content-length", "5"), ("content-length", "5")]),
            ["5"]
        );
        assert_eq!(sent(&[("content-length", "7")]), ["7"]);
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
