//! What every request–reply implementation shares: the table of callers
//! waiting for their reply ([`Correlator`]), the deadline they wait under
//! ([`Waiter::wait`]), and how a failure travels back as an error reply
//! ([`error_reply`], [`from_reply`]).
//!
//! The toolkit's requester over a reply topic and the transports' native
//! requesters (NATS inboxes, RabbitMQ direct reply-to) are built on these,
//! so that a reply, a timeout, a late reply and a responder's failure look
//! the same to a caller whatever carries them:
//!
//! * the reply: `Ok(event)`;
//! * no reply within the timeout: [`ErrorKind::Timeout`] (retryable), the
//!   caller's entry removed from the table; a reply that comes later is
//!   dropped and counted ([`Correlator::late_replies`]);
//! * nobody listens on the request's topic, where the transport can tell
//!   at once (NATS's no-responders status, a RabbitMQ request no binding
//!   routes): [`ErrorKind::Rejected`], retryable (a responder may start),
//!   with a [`NoResponders`] as its [source](std::error::Error::source);
//! * the responder's handler failed: an error reply (type
//!   [`ERROR_REPLY_TYPE`], the error in the [`ext::ERROR_KIND`],
//!   [`ext::ERROR_MESSAGE`] and [`ext::ERROR_RETRYABLE`] extensions) that
//!   [`from_reply`] turns back into an [`Error`] of the same kind.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use watchtower::request::Correlator;
//! use watchtower::{Event, ErrorKind};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let table = Correlator::new();
//! let waiter = table.register("request-1").unwrap();
//! // The transport's reply task answers by key.
//! assert!(table.answer("request-1", Ok(Event::new("pong", serde_json::json!(1)))));
//! let reply = waiter.wait(async { Ok(()) }, Duration::from_secs(1)).await.unwrap();
//! assert_eq!(reply.ty(), "pong");
//!
//! // A caller whose reply does not come in time.
//! let waiter = table.register("request-2").unwrap();
//! let error = waiter.wait(async { Ok(()) }, Duration::from_millis(1)).await.unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::Timeout);
//! assert_eq!(table.in_flight(), 0);
//! assert!(!table.answer("request-2", Ok(Event::new("pong", serde_json::json!(2)))));
//! assert_eq!(table.late_replies(), 1);
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, ErrorKind};
use crate::event::{Event, ext};

/// The type of an error reply.
pub const ERROR_REPLY_TYPE: &str = "watchtower.reply.error";

type Answer = Result<Event, Error>;

#[derive(Default)]
struct Table {
    pending: Mutex<HashMap<Arc<str>, oneshot::Sender<Answer>>>,
    late: AtomicU64,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, oneshot::Sender<Answer>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The callers waiting for a reply, by correlation key (an event id, an
/// inbox token). Cheap to clone: clones share the table.
#[derive(Clone, Default)]
pub struct Correlator {
    table: Arc<Table>,
}

impl fmt::Debug for Correlator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Correlator")
            .field("in_flight", &self.in_flight())
            .field("late_replies", &self.late_replies())
            .finish()
    }
}

impl Correlator {
    /// An empty table.
    pub fn new() -> Correlator {
        Correlator::default()
    }

    /// Enters a caller waiting under `key`. The entry leaves the table when
    /// it is answered or when the [`Waiter`] is dropped (its caller timed
    /// out or stopped waiting).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidEvent`], not retryable, if a caller already
    /// waits under `key` (two requests with one event id in flight).
    pub fn register(&self, key: impl Into<Arc<str>>) -> Result<Waiter, Error> {
        let key = key.into();
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.table.lock();
            if pending.contains_key(&key) {
                return Err(Error::new(
                    ErrorKind::InvalidEvent,
                    format!("a request with id `{key}` is already waiting for its reply"),
                )
                .with_retryable(false));
            }
            pending.insert(key.clone(), tx);
        }
        Ok(Waiter {
            table: self.table.clone(),
            key,
            rx,
        })
    }

    /// Hands `answer` to the caller waiting under `key`. Returns `false`
    /// when nobody waits (a late reply, a duplicate): the answer is
    /// dropped and counted in [`late_replies`](Correlator::late_replies).
    pub fn answer(&self, key: &str, answer: Result<Event, Error>) -> bool {
        let waiter = self.table.lock().remove(key);
        match waiter.map(|tx| tx.send(answer)) {
            Some(Ok(())) => true,
            _ => {
                self.table.late.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key, "a reply nobody waits for; dropping it");
                false
            }
        }
    }

    /// Ends every wait at once with `error` (the reply channel is gone).
    pub fn fail_all(&self, error: &Error) {
        let waiting: Vec<_> = self.table.lock().drain().collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(Error::new(error.kind(), error.message())));
        }
    }

    /// Callers waiting now.
    pub fn in_flight(&self) -> usize {
        self.table.lock().len()
    }

    /// Replies that came when nobody waited for them any more (after their
    /// caller's timeout, or a second reply to one request), since the
    /// table was made.
    pub fn late_replies(&self) -> u64 {
        self.table.late.load(Ordering::Relaxed)
    }
}

/// One caller's place in a [`Correlator`]; dropping it removes the entry.
pub struct Waiter {
    table: Arc<Table>,
    key: Arc<str>,
    rx: oneshot::Receiver<Answer>,
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
    }
}

impl Waiter {
    /// The key the caller waits under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Waits for `sent` (the request's publish) and then for the answer,
    /// both within `timeout` from now; the entry is removed on every path.
    ///
    /// # Errors
    ///
    /// `sent`'s error; [`ErrorKind::Timeout`] if the publish or the reply
    /// takes longer than `timeout`; [`ErrorKind::Closed`] if the reply
    /// channel ended first; the error an answer carries (see
    /// [`from_reply`]).
    pub async fn wait<F>(mut self, sent: F, timeout: Duration) -> Result<Event, Error>
    where
        F: Future<Output = Result<(), Error>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let elapsed = |key: &str| {
            Error::new(
                ErrorKind::Timeout,
                format!("no reply to request `{key}` within {timeout:?}"),
            )
        };
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(elapsed(&self.key)),
        }
        match tokio::time::timeout_at(deadline, &mut self.rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Error::closed("the reply channel closed before the reply came")),
            Err(_) => Err(elapsed(&self.key)),
        }
    }
}

/// Why a request failed at once: nobody listens on its topic. The source
/// of the [`ErrorKind::Rejected`] error a native requester returns then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoResponders {
    topic: Box<str>,
}

impl NoResponders {
    /// The request's topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The error a caller gets: [`ErrorKind::Rejected`], retryable (a
    /// responder may subscribe later), with this as its source.
    pub fn error(topic: &str) -> Error {
        let no = NoResponders { topic: topic.into() };
        Error::new(ErrorKind::Rejected, no.to_string())
            .with_retryable(true)
            .with_source(no)
    }

    /// Whether `error` is a [`NoResponders`] failure.
    pub fn is(error: &Error) -> bool {
        std::error::Error::source(error).is_some_and(|s| s.is::<NoResponders>())
    }
}

impl fmt::Display for NoResponders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no responders for a request on `{}`", self.topic)
    }
}

impl std::error::Error for NoResponders {}

/// The reply a responder sends when its handler failed with `error`.
pub fn error_reply(error: &Error) -> Event {
    let mut reply = Event::empty(ERROR_REPLY_TYPE);
    // Names are valid: checked by the tests of this module.
    let _ = reply.set_extension(ext::ERROR_KIND, error.kind().as_str());
    let _ = reply.set_extension(ext::ERROR_MESSAGE, error.to_string());
    let _ = reply.set_extension(
        ext::ERROR_RETRYABLE,
        if error.is_retryable() { "true" } else { "false" },
    );
    reply
}

/// A reply, or the error an [error reply](error_reply) carries.
///
/// # Errors
///
/// An error of the kind, message and retryability the error reply names.
pub fn from_reply(reply: Event) -> Result<Event, Error> {
    let Some(kind) = reply.extension(ext::ERROR_KIND) else {
        return Ok(reply);
    };
    let kind = ErrorKind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind)
        .unwrap_or(ErrorKind::Other);
    let message = reply.extension(ext::ERROR_MESSAGE).unwrap_or_default();
    let mut error = Error::new(kind, format!("the responder failed: {message}"));
    if let Some(retryable) = reply.extension(ext::ERROR_RETRYABLE) {
        error = error.with_retryable(retryable == "true");
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reply_reads_back_as_the_same_error() {
        for name in [
            ext::REPLY_TO,
            ext::ERROR_KIND,
            ext::ERROR_MESSAGE,
            ext::ERROR_RETRYABLE,
        ] {
            crate::validate_extension_name(name).unwrap();
        }
        let reply = error_reply(&Error::new(ErrorKind::Rejected, "no such account"));
        assert_eq!(reply.extension(ext::ERROR_KIND), Some("rejected"));
        assert_eq!(reply.extension(ext::ERROR_RETRYABLE), Some("false"));
        assert_eq!(
            reply.extension(ext::ERROR_MESSAGE),
            Some("rejected: no such account")
        );
        let error = from_reply(reply).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert!(!error.is_retryable());
        for kind in ErrorKind::ALL {
            let back = from_reply(error_reply(&Error::new(kind, "x"))).unwrap_err();
            assert_eq!(back.kind(), kind);
        }
    }

    #[test]
    fn no_responders_is_told_apart_by_its_source() {
        let error = NoResponders::error("math.add");
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert!(error.is_retryable());
        assert!(NoResponders::is(&error));
        assert!(!NoResponders::is(&Error::new(ErrorKind::Rejected, "other")));
        assert!(error.to_string().contains("no responders"), "{error}");
    }

    #[tokio::test]
    async fn a_key_in_use_is_refused_and_a_dropped_waiter_leaves_nothing() {
        let table = Correlator::new();
        let waiter = table.register("a").unwrap();
        assert_eq!(table.register("a").unwrap_err().kind(), ErrorKind::InvalidEvent);
        assert_eq!(table.in_flight(), 1);
        drop(waiter);
        assert_eq!(table.in_flight(), 0);
        let waiter = table.register("a").unwrap();
        table.fail_all(&Error::closed("gone"));
        let error = waiter
            .wait(async { Ok(()) }, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Closed);
    }
}
