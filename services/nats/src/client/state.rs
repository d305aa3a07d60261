//! What the connection's event callback keeps: up/down and closed, the
//! counters, the publishers waiting for the connection, and the
//! slow-consumer drops attributed to subscriptions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Waker;

/// What the connection's event callback keeps.
#[derive(Default)]
pub(crate) struct ConnState {
    pub(super) up: tokio::sync::watch::Sender<bool>,
    pub(super) closed: AtomicBool,
    pub(super) disconnects: AtomicU64,
    pub(super) slow_drops: AtomicU64,
    pub(super) waiters: Mutex<Vec<Waker>>,
    subscriptions: Mutex<HashMap<u64, Arc<DropCounter>>>,
    unattributed: Mutex<Vec<Arc<DropCounter>>>,
}

/// Messages a slow-consumer subscription lost, and the task to tell.
#[derive(Default)]
pub(crate) struct DropCounter {
    pub(crate) dropped: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl DropCounter {
    pub(crate) fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn add(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::AcqRel);
        if let Some(w) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            w.wake();
        }
    }
}

impl ConnState {
    /// Follows the connection going up (`true`) and down.
    pub(crate) fn watch_up(&self) -> tokio::sync::watch::Receiver<bool> {
        self.up.subscribe()
    }

    pub(super) fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                tracing::debug!("NATS connection established");
                self.up.send_replace(true);
                let waiters =
                    std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
                waiters.into_iter().for_each(Waker::wake);
            }
            async_nats::Event::Disconnected => {
                tracing::warn!("NATS connection lost; reconnecting");
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                self.up.send_replace(false);
            }
            // The client gives up after `max_reconnects` with this error and
            // no `Closed` event: the connection is closed for good all the same.
            async_nats::Event::Closed
            | async_nats::Event::ClientError(async_nats::ClientError::MaxReconnects) => {
                tracing::warn!("NATS connection closed");
                self.closed.store(true, Ordering::Release);
                self.up.send_replace(false);
                let waiters =
                    std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
                waiters.into_iter().for_each(Waker::wake);
            }
            async_nats::Event::SlowConsumer(sid) => self.slow_consumer(Some(sid)),
            async_nats::Event::ServerError(async_nats::ServerError::SlowConsumer(_)) => {
                tracing::warn!("NATS server reports this connection as a slow consumer");
                self.slow_consumer(None);
            }
            async_nats::Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
            async_nats::Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
            other => tracing::debug!(event = %other, "NATS connection event"),
        }
    }

    fn slow_consumer(&self, sid: Option<u64>) {
        self.slow_drops.fetch_add(1, Ordering::Relaxed);
        let counter = sid.and_then(|sid| {
            self.subscriptions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&sid)
                .cloned()
        });
        match counter {
            Some(counter) => counter.add(1),
            // A drop we cannot attribute is told to every subscription we
            // could not identify: over-reporting beats silence.
            None => self
                .unattributed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .for_each(|c| c.add(1)),
        }
    }

    pub(super) fn wait_connected(&self, waker: &Waker) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// Starts attributing slow-consumer drops of `sid` (or, if unknown,
    /// of any unidentified subscription) to the returned counter.
    pub(crate) fn register(&self, sid: Option<u64>) -> Arc<DropCounter> {
        let counter = Arc::new(DropCounter::default());
        match sid {
            Some(sid) => {
                self.subscriptions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(sid, counter.clone());
            }
            None => self
                .unattributed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(counter.clone()),
        }
        counter
    }

    pub(crate) fn unregister(&self, sid: Option<u64>, counter: &Arc<DropCounter>) {
        match sid {
            Some(sid) => {
                self.subscriptions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&sid);
            }
            None => self
                .unattributed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|c| !Arc::ptr_eq(c, counter)),
        }
    }
}

/// The subscription id async-nats gave `subscriber`.
///
/// async-nats reports slow consumers by subscription id but does not
/// expose the id; its `Debug` output does (`Subscriber { sid: 7, .. }`).
/// When that format changes this returns `None` and drops are reported to
/// every unidentified subscription instead.
pub(crate) fn subscription_id(subscriber: &async_nats::Subscriber) -> Option<u64> {
    let shown = format!("{subscriber:?}");
    let rest = shown.strip_prefix("Subscriber { sid: ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}
