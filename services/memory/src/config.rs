//! The broker's configuration.

/// Configures a [`MemoryBroker`](crate::MemoryBroker): plain data, read by
/// [`MemoryBroker::with_config`](crate::MemoryBroker::with_config).
///
/// ```
/// use watchtower_memory::{MemoryBroker, MemoryConfig};
///
/// let broker = MemoryBroker::with_config(MemoryConfig::new().retention(100).max_pending(10_000));
/// # drop(broker);
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MemoryConfig {
    pub(crate) retention: usize,
    pub(crate) max_pending: Option<usize>,
}

impl MemoryConfig {
    /// The defaults: no retention, unbounded queues.
    pub fn new() -> MemoryConfig {
        MemoryConfig::default()
    }

    /// Keeps the last `events` events of each topic for subscriptions that
    /// ask to [replay](watchtower::SubscribeOptions::replay). Default 0:
    /// nothing kept, since an embedded broker should not hold memory nobody
    /// asked for.
    pub fn retention(mut self, events: usize) -> Self {
        self.retention = events;
        self
    }

    /// Refuses a publish with
    /// [`ErrorKind::Overloaded`](watchtower::ErrorKind::Overloaded) when a
    /// matching subscription already holds `events` unconsumed events (0
    /// refuses every publish that a subscription matches). Default
    /// unbounded: publishing never fails for a slow consumer unless asked
    /// to.
    pub fn max_pending(mut self, events: usize) -> Self {
        self.max_pending = Some(events);
        self
    }
}
