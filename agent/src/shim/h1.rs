//! keyfence's own HTTP/1.1 client for the requests that carry no body to a
//! plain `http://` upstream (most API traffic: `GET`, `HEAD`, `DELETE`):
//! the request head is written straight to the connection and the response
//! read straight from it by whoever awaits it. hyper's client puts a channel,
//! a oneshot and a body channel between the request and its connection, each
//! a wake per request; here there are none. Requests with a body, TLS and
//! HTTP/2 upstreams stay with hyper (`super::upstream`).
//!
//! The response is framed as RFC 9112 §6.3 says, and strictly: a
//! `Content-Length` that is not one number, a chunk line that is not one, a
//! head over [`MAX_HEAD`] or with more than [`MAX_HEADERS`] fields, and a
//! `101` nobody asked for are errors (the client gets 502), never guesses. A
//! connection is used again only when its response ended exactly where its
//! framing said, on HTTP/1.1 without `Connection: close`: any byte left over
//! closes it, so one response can never be read as part of the next.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, Waker, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::{
    Method, Response, StatusCode, Version,
    body::{Body, Frame, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Largest response head read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (extensions included) and all trailers together.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;
/// Room made in the read buffer before each read.
const READ_ROOM: usize = 8 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The connection closed (or was reset) before a byte of the response
    /// came: on a kept connection, the upstream had closed it while idle.
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error("the upstream closed the connection in the middle of its response")]
    ClosedMidResponse,
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
}

impl H1Error {
    /// The request surely never reached the upstream's application, or the
    /// connection was closed under it before any answer: a kept connection
    /// gone stale, which an idempotent request may be sent again for.
    #[must_use]
    pub fn stale(&self) -> bool {
        match self {
            H1Error::ClosedBeforeAnswer => true,
            H1Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            _ => false,
        }
    }
}

/// An upstream connection and the bytes read from it but not yet used.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// The request head being written (kept: no allocation per request).
    out: Vec<u8>,
}

impl Conn {
    #[must_use]
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
        }
    }

    /// Nothing arrived on the idle connection since its last response: no
    /// close, and no byte (a server's `408` before it closes an idle
    /// connection would otherwise be read as the next request's answer).
    /// Free when the socket has not been readable since the last read (the
    /// last read was short, so tokio cleared its readiness); else one
    /// non-blocking read looks.
    #[must_use]
    pub fn idle_clean(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(_) => matches!(
                self.io.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Write the request head (origin form, HTTP/1.1, `parts`' headers as
    /// they are) and read the response head. `parts` must carry no body.
    pub async fn exchange(&mut self, parts: &request::Parts) -> Result<Head, H1Error> {
        encode_head(parts, &mut self.out);
        self.io.write_all(&self.out).await?;
        let head_request = parts.method == Method::HEAD;
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some(head) = parse_head(&mut self.buf, head_request)? {
                    return Ok(head);
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(H1Error::Malformed("response head over 64 KiB"));
                }
            }
            self.buf.reserve(READ_ROOM);
            let read = self.io.read_buf(&mut self.buf).await;
            match read {
                Ok(0) if answered => return Err(H1Error::ClosedMidResponse),
                Ok(0) => return Err(H1Error::ClosedBeforeAnswer),
                Ok(_) => {}
                Err(e) if !answered && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(H1Error::ClosedBeforeAnswer);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The request line and header fields of `parts`, in origin form.
fn encode_head(parts: &request::Parts, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head: what to pass on, how its body is framed, and whether the
/// connection may carry another request after it.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    pub reuse: bool,
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// At the CRLF after chunk data.
    DataEnd,
    /// In the trailer section; this many trailer bytes seen.
    Trailers(usize),
    Done,
}

/// Parse one final response head off the front of `buf` (informational
/// `1xx` heads before it are dropped); `None` while incomplete.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, H1Error> {
    loop {
        // Uninitialised: 128 fields would be 4 KiB to zero per response.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("more than 128 header fields"));
            }
            Err(_) => return Err(H1Error::Malformed("response head")),
        };
        let code = response.code.unwrap_or_default();
        if code == 101 {
            return Err(H1Error::Malformed(
                "101 Switching Protocols, never asked for",
            ));
        }
        if (100..200).contains(&code) {
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("status code"))?;
        let http11 = response.version == Some(1);
        // Header names are parsed now; values are cut from the head, which
        // is split off the buffer once (no copy per value).
        let base = buf.as_ptr().addr();
        let mut names = Vec::with_capacity(response.headers.len());
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| H1Error::Malformed("header name"))?;
            // A non-empty value is a slice of `buf`; an empty one need not
            // point into it.
            let start = if field.value.is_empty() {
                0
            } else {
                field.value.as_ptr().addr() - base
            };
            names.push((name, start, field.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(names.len());
        for (name, start, n) in names {
            let value = HeaderValue::from_maybe_shared(head.slice(start..start + n))
                .map_err(|_| H1Error::Malformed("header value"))?;
            headers.append(name, value);
        }
        let (framing, clean) = framing(status, &mut headers, head_request)?;
        let reuse = clean && http11 && !has_token(&headers, &header::CONNECTION, "close");
        return Ok(Some(Head {
            status,
            headers,
            framing,
            reuse,
        }));
    }
}

/// The body framing of a final response (RFC 9112 §6.3) and whether the
/// connection is clean after it. With `Transfer-Encoding`, `Content-Length`
/// is removed from what is passed on: it does not describe the body the
/// client will receive (§6.3 item 3).
fn framing(
    status: StatusCode,
    headers: &mut HeaderMap,
    head_request: bool,
) -> Result<(Framing, bool), H1Error> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Length(0), true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let both = headers.remove(header::CONTENT_LENGTH).is_some();
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty());
        return Ok(match last {
            // Both headers: a smuggling attempt, or a broken upstream;
            // decode as chunked and close after (§6.3 item 3).
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => (Framing::Chunked(Chunk::Size), !both),
            _ => (Framing::Close, false),
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n =
                content_length(part.trim_ascii()).ok_or(H1Error::Malformed("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Malformed("Content-Length values differ"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

/// A `Content-Length` number: decimal digits only, at most 18 of them.
fn content_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `token` is among the comma-separated values of `name`, any case.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// What the decoder got from the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    /// The body ended; the buffer holds what follows it.
    Done,
    /// More bytes are needed.
    More,
}

impl Framing {
    /// The next piece of body in `buf` (consumed from it).
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        match self {
            Framing::Length(0) => Ok(Decoded::Done),
            Framing::Length(left) => Ok(take_data(buf, left)),
            Framing::Close if buf.is_empty() => Ok(Decoded::More),
            Framing::Close => Ok(Decoded::Data(buf.split().freeze())),
            Framing::Chunked(chunk) => chunk.decode(buf),
        }
    }

    /// Nothing is left to read.
    fn done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunk::Done))
    }
}

/// Up to `left` bytes of `buf`.
fn take_data(buf: &mut BytesMut, left: &mut u64) -> Decoded {
    if buf.is_empty() {
        return Decoded::More;
    }
    let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
    *left -= n as u64;
    Decoded::Data(buf.split_to(n).freeze())
}

impl Chunk {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self {
                Chunk::Done => return Ok(Decoded::Done),
                Chunk::Data(0) => *self = Chunk::DataEnd,
                Chunk::Data(left) => return Ok(take_data(buf, left)),
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    *self = Chunk::Size;
                }
                Chunk::Size => {
                    let Some(line) = line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Trailers(seen) => {
                    let room = MAX_TRAILERS.saturating_sub(*seen);
                    let Some(line) = line(buf, room)? else {
                        return Ok(Decoded::More);
                    };
                    // Trailer fields are dropped: hyper's server would not
                    // send them on over HTTP/1 without a `TE: trailers`
                    // request anyway.
                    *self = if line.is_empty() {
                        Chunk::Done
                    } else {
                        Chunk::Trailers(*seen + line.len() + 2)
                    };
                }
            }
        }
    }
}

/// One CRLF-terminated line off the front of `buf` (without its CRLF);
/// `None` while incomplete. A line longer than `max`, or with a CR or LF of
/// its own, is an error.
fn line(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, H1Error> {
    let window = &buf[..buf.len().min(max.saturating_add(2))];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) if end > 0 && window[end - 1] == b'\r' => {
            if window[..end - 1].contains(&b'\r') {
                return Err(H1Error::Malformed("CR inside a chunk line"));
            }
            let line = buf.split_to(end + 1).freeze();
            Ok(Some(line.slice(..end - 1)))
        }
        Some(_) => Err(H1Error::Malformed("bare LF in a chunk line")),
        None if window.len() > max => Err(H1Error::Malformed("chunk line too long")),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits (at most 15), then nothing or
/// `;` extensions (ignored), optionally after spaces or tabs.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(H1Error::Malformed("chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(H1Error::Malformed("chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| H1Error::Malformed("chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| H1Error::Malformed("chunk size"))
}

/// Where a finished response's connection goes: the downstream connection's
/// idle slot, when it is empty (else the connection closes).
#[derive(Clone, Default)]
pub struct Slot(Arc<Mutex<Option<Conn>>>);

impl Slot {
    #[must_use]
    pub fn take(&self) -> Option<Conn> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    pub fn put(&self, conn: Conn) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(conn);
        }
    }
}

/// A response body read from its connection by the one polling it. When
/// it has ended exactly where its framing said, the connection goes back to
/// its [`Slot`] (if it may be used again); dropped earlier, it closes.
pub struct ResponseBody {
    conn: Option<Conn>,
    framing: Framing,
    reuse: bool,
    slot: Slot,
}

impl ResponseBody {
    /// The body of `head`, read from `conn`; an empty one gives the
    /// connection back at once.
    pub fn new(conn: Conn, head: &Head, slot: Slot) -> Self {
        let mut body = Self {
            conn: Some(conn),
            framing: head.framing,
            reuse: head.reuse,
            slot,
        };
        if body.framing.done() {
            body.finish();
        }
        body
    }

    /// The body ended: give the connection back if it is clean.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reuse
            && conn.buf.is_empty()
        {
            self.slot.put(conn);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.framing.done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            conn.buf.reserve(READ_ROOM);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) if this.framing == Framing::Close => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::ClosedMidResponse)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ if self.conn.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A response of `head` with `body`, as HTTP/1.1.
#[must_use]
pub fn response(head: Head, body: ResponseBody) -> Response<ResponseBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = Version::HTTP_11;
    *resp.headers_mut() = head.headers;
    resp
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    fn parse(text: &[u8]) -> Result<Option<Head>, H1Error> {
        parse_head(&mut BytesMut::from(text), false)
    }

    fn head(text: &str) -> Head {
        parse(text.as_bytes())
            .expect("a valid head")
            .expect("a complete head")
    }

    #[test]
    fn a_request_head_is_written_in_origin_form() {
        let req = hyper::Request::builder()
            .method("DELETE")
            .uri("/v1/keys?id=7")
            .header("host", "api.example")
            .header("x-forwarded-for", "198.51.100.7")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_head(&parts, &mut out);
        assert_eq!(
            out,
            b"DELETE /v1/keys?id=7 HTTP/1.1\r\nhost: api.example\r\nx-forwarded-for: 198.51.100.7\r\n\r\n"
        );
    }

    #[test]
    fn response_heads_are_framed_as_rfc_9112_says() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\n");
        assert_eq!(h.status, 200);
        assert_eq!((h.framing, h.reuse), (Framing::Length(3), true));
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);

        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!((h.framing, h.reuse), (Framing::Chunked(Chunk::Size), true));
        // Chunked not last: the body runs to the close.
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!((h.framing, h.reuse), (Framing::Close, false));
        // Both: chunked wins, Content-Length is not passed on, and the
        // connection is not used again.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((h.framing, h.reuse), (Framing::Chunked(Chunk::Size), false));
        assert!(!h.headers.contains_key("content-length"));
        // No length: until the close.
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.reuse), (Framing::Close, false));
        // Bodiless by status, whatever the headers say.
        for status in ["204 No Content", "304 Not Modified"] {
            let h = head(&format!(
                "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ));
            assert_eq!((h.framing, h.reuse), (Framing::Length(0), true));
        }
        // A HEAD response's length describes the GET's body.
        let h = parse_head(
            &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"[..]),
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(h.headers["content-length"], "99");
        // Empty values stay empty (and in place).
        let h = head("HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Spaces:   \r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            (&h.headers["x-empty"], &h.headers["x-spaces"]),
            (&HeaderValue::from_static(""), &HeaderValue::from_static(""))
        );
        // Repeated equal lengths are one length.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(4));
    }

    #[test]
    fn connections_are_reused_only_on_http11_without_close() {
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").reuse);
        assert!(
            !head("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n")
                .reuse
        );
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").reuse);
    }

    #[test]
    fn informational_heads_are_skipped_and_101_is_refused() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi"[..],
        );
        let h = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(h.status, 201);
        assert!(!h.headers.contains_key("link"));
        assert_eq!(&buf[..], b"hi");
        assert!(matches!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
            Err(H1Error::Malformed(_))
        ));
    }

    #[test]
    fn malformed_heads_are_errors_and_partial_ones_wait() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 999x OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
            b"SMTP 220 hello\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(H1Error::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut many = String::new();
        for i in 0..=MAX_HEADERS {
            let _ = write!(many, "X-{i}: v\r\n");
        }
        assert!(matches!(
            parse(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()),
            Err(H1Error::Malformed(_))
        ));
    }

    /// Decode `wire` fed to the decoder `step` bytes at a time: the body, and
    /// the bytes left after it.
    fn decode_in_steps(
        mut framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), H1Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match framing.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Done => return Ok((body, buf.to_vec())),
                Decoded::More if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Decoded::More => return Err(H1Error::ClosedMidResponse),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"4;name=\"v\"\r\nWiki\r\n5 ;x\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (body, rest) = decode_in_steps(Framing::Chunked(Chunk::Size), wire, step).unwrap();
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
            // What follows the body is left for the connection (and makes
            // it unfit for another request).
            assert!(b"NEXT".starts_with(&rest), "step {step}");
        }
        for step in 1..8 {
            let (body, rest) = decode_in_steps(Framing::Length(3), b"ok\nEXTRA", step).unwrap();
            assert_eq!(body, b"ok\n", "step {step}");
            assert!(b"EXTRA".starts_with(&rest), "step {step}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"4 x\r\nWiki\r\n0\r\n\r\n",
            b"4\nWiki\r\n0\r\n\r\n",
            b"4\r\nWikiXX0\r\n\r\n",
            b"4\r\r\nWiki\r\n0\r\n\r\n",
            b"1000000000000000\r\n",
            b"0\r\nX: 1\n\r\n",
        ] {
            assert!(
                matches!(
                    decode_in_steps(Framing::Chunked(Chunk::Size), bad, 1),
                    Err(H1Error::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A chunk line or trailers that never end are cut at their limit.
        let long = vec![b'1'; 1]
            .into_iter()
            .chain(std::iter::repeat_n(b';', MAX_CHUNK_LINE + 8))
            .collect::<Vec<_>>();
        assert!(matches!(
            decode_in_steps(Framing::Chunked(Chunk::Size), &long, 512),
            Err(H1Error::Malformed(_))
        ));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..=(MAX_TRAILERS / 8) {
            trailers.extend_from_slice(b"X: abc\r\n");
        }
        assert!(matches!(
            decode_in_steps(Framing::Chunked(Chunk::Size), &trailers, 4096),
            Err(H1Error::Malformed(_))
        ));
    }

    proptest::proptest! {
        /// Any chunking of any body, with extensions and trailers, read in
        /// any step: the same body, and nothing after it consumed.
        #[test]
        fn any_chunked_body_decodes_to_itself(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8),
            extension in proptest::bool::ANY,
            trailer in proptest::bool::ANY,
            step in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for chunk in &chunks {
                let ext = if extension { ";a=\"b c\"" } else { "" };
                wire.extend_from_slice(format!("{:X}{ext}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"X-Digest: abc\r\n");
            }
            wire.extend_from_slice(b"\r\nNEXT");
            let (body, rest) = decode_in_steps(Framing::Chunked(Chunk::Size), &wire, step).unwrap();
            proptest::prop_assert_eq!(body, chunks.concat());
            proptest::prop_assert!(b"NEXT".starts_with(&rest));
        }

        /// Arbitrary bytes as a chunked body or a response head: an answer
        /// or an error, never a panic, and never more body than bytes given.
        #[test]
        fn hostile_bytes_never_panic(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..600), step in 1usize..32) {
            if let Ok((body, _)) = decode_in_steps(Framing::Chunked(Chunk::Size), &wire, step) {
                proptest::prop_assert!(body.len() <= wire.len());
            }
            let _ = parse_head(&mut BytesMut::from(&wire[..]), false);
        }
    }
}
