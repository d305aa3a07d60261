//! The broker handle: makes publishers and subscribers, reports health,
//! waits for idleness, closes.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use watchtower::health::Health;
use watchtower::{Error, RawMessage, Transport};

use crate::group::Message;
use crate::state::Shared;
use crate::{MemoryConfig, MemoryPublisher, MemorySubscriber};

/// An in-process broker. Cheap to clone; clones share the broker.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl MemoryBroker {
    /// A broker with the default [`MemoryConfig`]: no retention, unbounded
    /// queues. The in-process equivalent of a client's `connect`.
    pub fn new() -> MemoryBroker {
        MemoryBroker::with_config(MemoryConfig::new())
    }

    /// A broker configured by `config`. Every configuration is valid, so
    /// this cannot fail.
    pub fn with_config(config: MemoryConfig) -> MemoryBroker {
        MemoryBroker {
            shared: Arc::new(Shared::new(&config)),
        }
    }

    /// A publisher into this broker.
    pub fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher {
            shared: self.shared.clone(),
            route: None,
        }
    }

    /// A subscriber of this broker.
    pub fn subscriber(&self) -> MemorySubscriber {
        MemorySubscriber {
            shared: self.shared.clone(),
        }
    }

    /// Publishes raw bytes as if a foreign client had sent them: the body
    /// is decoded as CloudEvents JSON on delivery, and a body that does not
    /// decode reaches subscribers as a [`Poison`](watchtower::Poison) delivery.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`](watchtower::ErrorKind::InvalidTopic) for a bad topic, [`ErrorKind::Closed`](watchtower::ErrorKind::Closed)
    /// after [`close`](MemoryBroker::close).
    pub fn publish_raw(&self, topic: &str, body: impl Into<Bytes>) -> Result<(), Error> {
        let raw = RawMessage {
            topic: topic.into(),
            headers: Vec::new(),
            body: body.into(),
        };
        self.shared
            .publish(topic, Message::Raw(Box::new(raw)), None, None)
            .map(|_| ())
    }

    /// Events published and not yet settled by every group they went to.
    pub fn outstanding(&self) -> u64 {
        // Settled first: every settlement follows its enqueue, so this
        // never reads more settled than enqueued events.
        let settled = self.shared.settled.0.load(Ordering::SeqCst);
        self.shared
            .enqueued
            .0
            .load(Ordering::SeqCst)
            .saturating_sub(settled)
    }

    /// Waits until every published event has been settled (acked or
    /// rejected) by every subscription it went to, or `timeout` passes.
    /// Returns whether the broker became idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.shared.idle_waiters.0.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.shared.idle_waiters.0);
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.shared.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.outstanding() == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    /// Closes the broker: publishers fail with [`ErrorKind::Closed`](watchtower::ErrorKind::Closed), and
    /// subscriptions end once they have delivered what they hold.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let state = self.shared.state.read().unwrap_or_else(PoisonError::into_inner);
        for entry in state.groups.values() {
            entry.group.close();
        }
    }

    /// Whether [`close`](MemoryBroker::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("retention", &self.shared.retention)
            .field("max_pending", &self.shared.max_pending)
            .field("outstanding", &self.outstanding())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The broker is in the process: it is up until it is
/// [closed](MemoryBroker::close), then down.
impl Transport for MemoryBroker {
    const SYSTEM: &'static str = "memory";

    fn health(&self) -> impl Future<Output = Health> + Send {
        let health = if self.is_closed() {
            Health::down(Self::SYSTEM, "memory broker is closed")
        } else {
            Health::up(Self::SYSTEM)
        };
        std::future::ready(health)
    }
}
