//! The request body on its way to the upstream, cut at the size limit. The
//! body streams (nothing is buffered), so a body without `Content-Length`
//! (chunked, or HTTP/2 without the header) is only known to be too large once
//! the limit is passed; the cut is remembered in a flag the proxy reads when
//! the upstream exchange ends, so the client is told 413 and not 502.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Buf as _;
use hyper::body::{Body, Frame, SizeHint};

/// The body passed more than its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct TooLarge {
    pub limit: usize,
}

struct Shared<B> {
    happened: AtomicBool,
    /// The request body, parked here when it overflowed.
    body: Mutex<Option<B>>,
}

/// Tells whether the body it was handed to went over its limit, and keeps
/// that body from then on.
pub struct Overflow<B>(Arc<Shared<B>>);

impl<B> Overflow<B> {
    #[must_use]
    pub fn happened(&self) -> bool {
        self.0.happened.load(Ordering::Acquire)
    }

    /// The request body, once it overflowed. Dropping an HTTP/2 request body
    /// before the response is sent resets the stream with `CANCEL`, and the
    /// client never sees the 413; hold it in the answer instead ([`Holding`]).
    #[must_use]
    pub fn take_body(&self) -> Option<B> {
        self.0
            .body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// A body that ends with [`TooLarge`] (and marks its [`Overflow`]) at the
/// first data frame that takes it past `limit` bytes; that frame is not
/// passed on, and the inner body is handed to the [`Overflow`].
pub struct Capped<B> {
    inner: Option<B>,
    limit: usize,
    seen: usize,
    overflow: Arc<Shared<B>>,
}

impl<B> Capped<B> {
    pub fn new(inner: B, limit: usize) -> (Self, Overflow<B>) {
        let shared = Arc::new(Shared {
            happened: AtomicBool::new(false),
            body: Mutex::new(None),
        });
        let capped = Self {
            inner: Some(inner),
            limit,
            seen: 0,
            overflow: Arc::clone(&shared),
        };
        (capped, Overflow(shared))
    }
}

impl<B> Body for Capped<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Some(Err(TooLarge { limit: this.limit }.into())));
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.remaining());
                    if this.seen > this.limit {
                        *this
                            .overflow
                            .body
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = this.inner.take();
                        this.overflow.happened.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(TooLarge { limit: this.limit }.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        // An announced length over the limit is refused before streaming, so
        // the inner hint (which hyper turns into Content-Length) holds.
        self.inner
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

/// A response body that keeps `held` (the request body it answers) alive
/// until the response has been sent: then HTTP/2 ends the request stream
/// with `NO_ERROR` after the answer, as RFC 9113 §8.1 asks of a server that
/// answers before reading the whole request.
pub struct Holding<B, H> {
    inner: B,
    _held: H,
}

impl<B, H> Holding<B, H> {
    pub fn new(inner: B, held: H) -> Self {
        Self { inner, _held: held }
    }
}

impl<B: Body + Unpin, H: Unpin> Body for Holding<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use bytes::Bytes;
    use http_body_util::BodyExt as _;

    use super::*;

    /// A body of the given chunks, with no length announced (like chunked).
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(sizes: &[usize]) -> Chunks {
        Chunks(sizes.iter().map(|&n| Bytes::from(vec![b'a'; n])).collect())
    }

    #[tokio::test]
    async fn a_body_up_to_the_limit_passes_whole() {
        let (body, overflow) = Capped::new(chunks(&[4, 4, 2]), 10);
        let collected = body.collect().await.expect("within the limit");
        assert_eq!(collected.to_bytes().len(), 10);
        assert!(!overflow.happened());
        assert!(overflow.take_body().is_none());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_mid_stream_fails_and_is_marked() {
        let (mut body, overflow) = Capped::new(chunks(&[4, 4, 3, 100]), 10);
        let mut passed = 0;
        let error = loop {
            match body.frame().await {
                Some(Ok(frame)) => passed += frame.into_data().map_or(0, |d| d.len()),
                Some(Err(e)) => break e,
                None => panic!("the body ended without passing its limit"),
            }
        };
        // The frame that crossed the limit was not passed on.
        assert_eq!(passed, 8);
        assert!(error.is::<TooLarge>(), "{error}");
        assert!(overflow.happened());
        // And it stays failed if polled again.
        assert!(matches!(body.frame().await, Some(Err(_))));
        // The rest of the request body is kept for the answer to hold.
        let rest = overflow.take_body().expect("the parked request body");
        assert_eq!(rest.0.len(), 1, "the chunks after the one that crossed");
        assert!(overflow.take_body().is_none());
    }

    #[tokio::test]
    async fn one_huge_frame_is_caught_too() {
        let (body, overflow) = Capped::new(chunks(&[11]), 10);
        assert!(body.collect().await.is_err());
        assert!(overflow.happened());
    }

    #[tokio::test]
    async fn holding_passes_the_answer_and_drops_the_held_body_with_it() {
        let held = Arc::new(());
        let answer = Holding::new(chunks(&[3, 2]), Arc::clone(&held));
        assert_eq!(Arc::strong_count(&held), 2);
        let collected = answer.collect().await.expect("the answer");
        assert_eq!(collected.to_bytes().len(), 5);
        assert_eq!(Arc::strong_count(&held), 1, "dropped with the answer");
    }
}
