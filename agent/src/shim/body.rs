//! The request body on its way to the upstream, cut at the size limit. The
//! body streams (nothing is buffered), so a body without `Content-Length`
//! (chunked, or HTTP/2 without the header) is only known to be too large once
//! the limit is passed; the cut is remembered in a flag the proxy reads when
//! the upstream exchange ends, so the client is told 413 and not 502.

use std::{
    pin::Pin,
    sync::{
        Arc,
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

/// Set once the body it was handed to went over its limit.
#[derive(Clone, Debug, Default)]
pub struct Overflow(Arc<AtomicBool>);

impl Overflow {
    #[must_use]
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A body that ends with [`TooLarge`] (and marks its [`Overflow`]) at the
/// first data frame that takes it past `limit` bytes; that frame is not
/// passed on.
pub struct Capped<B> {
    inner: B,
    limit: usize,
    seen: usize,
    overflow: Overflow,
}

impl<B> Capped<B> {
    pub fn new(inner: B, limit: usize) -> (Self, Overflow) {
        let overflow = Overflow::default();
        let capped = Self {
            inner,
            limit,
            seen: 0,
            overflow: overflow.clone(),
        };
        (capped, overflow)
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
        if this.overflow.happened() {
            return Poll::Ready(Some(Err(TooLarge { limit: this.limit }.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.remaining());
                    if this.seen > this.limit {
                        this.overflow.mark();
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
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // An announced length over the limit is refused before streaming, so
        // the inner hint (which hyper turns into Content-Length) holds.
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
    }

    #[tokio::test]
    async fn one_huge_frame_is_caught_too() {
        let (body, overflow) = Capped::new(chunks(&[11]), 10);
        assert!(body.collect().await.is_err());
        assert!(overflow.happened());
    }
}
