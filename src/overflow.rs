//! What a bounded queue does when it is full.

/// What a bounded queue does with a new event when it is full: the one
/// policy of every queue in WatchTower (the backpressure layer's queue, a
/// WebSocket client's outbox while it reconnects, ...).
///
/// Whichever is chosen, no event is lost silently: an event that does not
/// get in (or is pushed out) resolves its caller's call with an
/// [`ErrorKind::Dropped`](crate::ErrorKind::Dropped) error that carries it,
/// so a dead-letter layer above can keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Overflow {
    /// Wait for room: `poll_ready` stays pending until a slot frees up. The
    /// default: nothing is refused, callers slow down instead.
    #[default]
    Block,
    /// Refuse the new event: its call resolves at once with `Dropped`.
    DropNewest,
    /// Push the oldest queued event out (its call resolves with `Dropped`)
    /// and queue the new one.
    DropOldest,
}
