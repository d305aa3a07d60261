//! A one-shot reply whose sender chooses when to wake the receiver.
//!
//! A task that answers many callers at once (a publisher's connection task
//! when a pipeline's replies come in, a backpressure worker when a burst
//! of calls completes) does better to fill in every answer first and wake
//! the callers afterwards: callers polled together in one task (a
//! `FuturesUnordered`, `buffer_unordered`, a `JoinSet`) are then woken once
//! and find all their answers, instead of being woken once per answer
//! while the sender is still filling in the rest, which on a multi-threaded
//! runtime makes two threads take turns for every answer.
//!
//! [`reply()`] makes the two ends. [`Replier::send`] fills in and wakes at
//! once, like a `oneshot` channel; [`Replier::fill`] fills in and returns a
//! [`Filled`] that wakes the receiver when it is dropped, so dropping a
//! `Vec` of them wakes every caller after the last answer is in. A replier
//! dropped without an answer resolves the [`Reply`] to `None`, so a caller
//! always learns that no answer will come.
//!
//! # Example
//!
//! ```
//! use watchtower::reply::reply;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (first_replier, first) = reply::<u32>();
//! let (second_replier, second) = reply::<u32>();
//! let filled = vec![first_replier.fill(1), second_replier.fill(2)];
//! drop(filled); // both callers woken here, after both answers are in
//! assert_eq!(first.await, Some(1));
//! assert_eq!(second.await, Some(2));
//!
//! let (replier, reply) = reply::<u32>();
//! drop(replier);
//! assert_eq!(reply.await, None);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

struct Inner<T> {
    value: Mutex<Option<T>>,
    /// The value is in, or will never come.
    done: AtomicBool,
    receiver: AtomicWaker,
}

impl<T> Inner<T> {
    fn finish(&self, value: Option<T>) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = value;
        self.done.store(true, Ordering::Release);
    }
}

/// Makes a replier and the reply it answers.
pub fn reply<T>() -> (Replier<T>, Reply<T>) {
    let inner = Arc::new(Inner {
        value: Mutex::new(None),
        done: AtomicBool::new(false),
        receiver: AtomicWaker::new(),
    });
    (
        Replier {
            inner: Some(inner.clone()),
        },
        Reply { inner },
    )
}

/// The answering end of a [`reply()`].
///
/// Dropped without an answer, it resolves the [`Reply`] to `None` and wakes
/// it.
pub struct Replier<T> {
    inner: Option<Arc<Inner<T>>>,
}

impl<T> Replier<T> {
    /// Answers and wakes the receiver at once.
    pub fn send(self, value: T) {
        drop(self.fill(value));
    }

    /// Answers without waking the receiver yet: it is woken when the
    /// returned [`Filled`] is dropped.
    pub fn fill(mut self, value: T) -> Filled<T> {
        let inner = self.inner.take();
        if let Some(inner) = &inner {
            inner.finish(Some(value));
        }
        Filled { inner }
    }

    /// Whether the receiver is gone, so that no one will read an answer.
    pub fn is_closed(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|inner| Arc::strong_count(inner) == 1)
    }
}

impl<T> Drop for Replier<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.finish(None);
            inner.receiver.wake();
        }
    }
}

impl<T> fmt::Debug for Replier<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replier")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// An answer filled in whose receiver is woken when this is dropped.
#[must_use = "dropping it wakes the receiver; keep it to wake later"]
pub struct Filled<T> {
    inner: Option<Arc<Inner<T>>>,
}

impl<T> Drop for Filled<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.receiver.wake();
        }
    }
}

impl<T> fmt::Debug for Filled<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filled").finish_non_exhaustive()
    }
}

/// The receiving end of a [`reply()`]: resolves to the answer, or to `None`
/// if the replier was dropped without one (or the answer was already
/// taken).
pub struct Reply<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Reply<T> {
    /// The answer if it is in, without waiting: `Poll::Pending` if it is
    /// not. Registers the task of `cx` to be woken when it comes.
    pub fn poll_reply(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if !self.inner.done.load(Ordering::Acquire) {
            self.inner.receiver.register(cx.waker());
            // Answered in between: the registration may have come too late.
            if !self.inner.done.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        Poll::Ready(
            self.inner
                .value
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        )
    }
}

impl<T> Future for Reply<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_reply(cx)
    }
}

impl<T> fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("done", &self.inner.done.load(Ordering::Acquire))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use tokio_test::task::spawn;
    use tokio_test::{assert_pending, assert_ready_eq};

    use super::reply;

    #[test]
    fn filled_wakes_only_when_dropped() {
        let (replier, reply) = reply::<&str>();
        let mut reply = spawn(reply);
        assert_pending!(reply.poll());
        let filled = replier.fill("1-0");
        assert!(!reply.is_woken());
        drop(filled);
        assert!(reply.is_woken());
        assert_ready_eq!(reply.poll(), Some("1-0"));
        // Taken: asked again, there is nothing, and no panic.
        assert_ready_eq!(reply.poll(), None);
    }

    #[test]
    fn send_wakes_at_once() {
        let (replier, reply) = reply::<u8>();
        let mut reply = spawn(reply);
        assert_pending!(reply.poll());
        replier.send(7);
        assert!(reply.is_woken());
        assert_ready_eq!(reply.poll(), Some(7));
    }

    #[test]
    fn a_dropped_replier_resolves_to_none_and_wakes() {
        let (replier, reply) = reply::<u8>();
        let mut reply = spawn(reply);
        assert_pending!(reply.poll());
        drop(replier);
        assert!(reply.is_woken());
        assert_ready_eq!(reply.poll(), None);
    }

    #[test]
    fn a_replier_knows_when_its_receiver_is_gone() {
        let (replier, reply) = reply::<u8>();
        assert!(!replier.is_closed());
        drop(reply);
        assert!(replier.is_closed());
        // Answering a receiver that is gone is harmless.
        replier.send(1);
    }
}
