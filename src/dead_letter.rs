//! A bounded in-memory dead-letter queue.
//!
//! [`MemoryDeadLetters`] is a `Service<Event>` that keeps what it is given,
//! for inspection and redrive. It is the consumer runtime's default poison
//! path, and a dead-letter destination for tests and small deployments.
//!
//! **It is not durable**: what it holds lives in this process's memory and
//! is lost when the process exits or crashes, after the broker was told to
//! forget the message. The consumer runtime logs every event it sends to
//! its default queue at WARN for that reason. In production, dead-letter to
//! something that outlives the process: a stream or queue on the broker, or
//! a file.
//!
//! It never evicts: when full it refuses new events with
//! [`ErrorKind::Overloaded`], so the caller (which still holds the event)
//! decides, and nothing is lost silently.
//!
//! ```
//! use tower::{Service, ServiceExt};
//! use watchtower::{dead_letter::MemoryDeadLetters, Event};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let mut dlq = MemoryDeadLetters::new(100);
//! dlq.ready().await?.call(Event::new("order.failed", serde_json::json!({}))).await?;
//! assert_eq!(dlq.len(), 1);
//! assert_eq!(dlq.drain()[0].ty(), "order.failed");
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::Notify;
use tower::Service;

use crate::error::{Error, ErrorKind};
use crate::event::{Event, ext};

/// Marks `event` as dead-lettered: the `deadletterreason` (the error's
/// message), `deadletterkind`, `deadlettertopic` (`topic`, where it was
/// bound or came from) and `deadlettertime` extensions, and `attempt` when
/// given (kept if the event already has one and `attempts` is `None`).
///
/// ```
/// use watchtower::{dead_letter::annotate, Error, ErrorKind, Event};
///
/// let failed = Error::new(ErrorKind::Rejected, "unknown customer");
/// let event = annotate(Event::new("order.placed", serde_json::json!({})), &failed, "orders", Some(3));
/// assert_eq!(event.extension("deadletterkind"), Some("rejected"));
/// assert_eq!(event.extension("deadlettertopic"), Some("orders"));
/// assert_eq!(event.extension("attempt"), Some("3"));
/// ```
pub fn annotate(mut event: Event, error: &Error, topic: &str, attempts: Option<u32>) -> Event {
    match attempts {
        Some(n) => event.insert_extension(ext::ATTEMPT, n.to_string().into()),
        None if event.extension(ext::ATTEMPT).is_none() => event.insert_extension(ext::ATTEMPT, "1".into()),
        None => {}
    }
    event.insert_extension(ext::DEAD_LETTER_REASON, error.to_string().into());
    event.insert_extension(ext::DEAD_LETTER_KIND, error.kind().as_str().into());
    event.insert_extension(ext::DEAD_LETTER_TOPIC, topic.into());
    let now = crate::codec::format_time(time::OffsetDateTime::now_utc());
    event.insert_extension(ext::DEAD_LETTER_TIME, now.into());
    event
}

/// The default capacity: 10,000 events, enough to ride out a burst without
/// unbounded memory.
pub(crate) const DEFAULT_CAPACITY: usize = 10_000;

/// A bounded, cloneable in-memory dead-letter queue. Clones share the queue.
///
/// Not durable: its events are lost when the process exits (see the
/// [module docs](self)).
#[derive(Clone)]
pub struct MemoryDeadLetters {
    shared: Arc<Shared>,
}

struct Shared {
    events: Mutex<VecDeque<Event>>,
    capacity: usize,
    added: Notify,
}

impl MemoryDeadLetters {
    /// A queue that holds up to `capacity` events.
    pub fn new(capacity: usize) -> MemoryDeadLetters {
        MemoryDeadLetters {
            shared: Arc::new(Shared {
                events: Mutex::new(VecDeque::new()),
                capacity,
                added: Notify::new(),
            }),
        }
    }

    fn events(&self) -> MutexGuard<'_, VecDeque<Event>> {
        // A panic while holding this lock cannot leave the queue invalid.
        self.shared.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an event.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Overloaded`] (with the event attached) when full.
    pub fn push(&self, event: Event) -> Result<(), Error> {
        let mut events = self.events();
        if events.len() >= self.shared.capacity {
            return Err(Error::new(ErrorKind::Overloaded, "dead-letter queue is full").with_event(event));
        }
        events.push_back(event);
        drop(events);
        self.shared.added.notify_waiters();
        Ok(())
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.events().len()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// A copy of the held events, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events().iter().cloned().collect()
    }

    /// Removes and returns every held event, oldest first.
    pub fn drain(&self) -> Vec<Event> {
        self.events().drain(..).collect()
    }

    /// Waits until at least `n` events are held.
    pub async fn wait_for(&self, n: usize) {
        loop {
            let added = self.shared.added.notified();
            if self.len() >= n {
                return;
            }
            added.await;
        }
    }
}

impl Default for MemoryDeadLetters {
    fn default() -> Self {
        MemoryDeadLetters::new(DEFAULT_CAPACITY)
    }
}

impl fmt::Debug for MemoryDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDeadLetters")
            .field("len", &self.len())
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

impl Service<Event> for MemoryDeadLetters {
    type Response = ();
    type Error = Error;
    type Future = Ready<Result<(), Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        ready(self.push(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_when_full_and_hands_the_event_back() {
        let dlq = MemoryDeadLetters::new(1);
        dlq.push(Event::empty("a")).unwrap();
        let mut err = dlq.push(Event::empty("b")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Overloaded);
        assert_eq!(err.take_event().map(|e| e.ty().to_owned()).as_deref(), Some("b"));
        assert_eq!(dlq.len(), 1);
    }
}
