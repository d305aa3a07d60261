//! Per-publisher options: trimming, content mode, pending `XADD`s.

use watchtower::Error;

use crate::wire::ContentMode;

const DEFAULT_MAX_PENDING: usize = 4096;

/// Trimming of a stream on every `XADD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxLen {
    /// `MAXLEN ~ n`: Redis trims whole macro nodes, so the stream keeps at
    /// least `n` entries and trimming stays cheap.
    Approx(u64),
    /// `MAXLEN = n`: exactly `n` entries, at a higher cost per `XADD`.
    Exact(u64),
}

/// Options of one publisher, for
/// [`RedisClient::publisher_with`](crate::RedisClient::publisher_with):
/// plain data, checked there.
///
/// ```
/// use watchtower_redis::{ContentMode, MaxLen, RedisPublisherOptions};
///
/// let options = RedisPublisherOptions::new()
///     .max_len(MaxLen::Approx(100_000))
///     .content_mode(ContentMode::Binary)
///     .max_pending(1024);
/// # drop(options);
/// ```
#[derive(Debug, Clone)]
pub struct RedisPublisherOptions {
    pub(super) max_len: Option<MaxLen>,
    pub(super) max_pending: usize,
    pub(super) mode: ContentMode,
}

impl Default for RedisPublisherOptions {
    fn default() -> Self {
        RedisPublisherOptions::new()
    }
}

impl RedisPublisherOptions {
    /// The defaults, as each setter describes.
    pub fn new() -> RedisPublisherOptions {
        RedisPublisherOptions {
            max_len: None,
            max_pending: DEFAULT_MAX_PENDING,
            mode: ContentMode::default(),
        }
    }

    /// Trims each stream on every `XADD`. Default: no trimming.
    ///
    /// Trimming deletes the oldest entries whether or not a consumer group
    /// has read or acknowledged them: an entry a consumer had not yet read
    /// is lost, and one it read but did not acknowledge can no longer be
    /// claimed again. Size `max_len` for the longest time consumers may
    /// fall behind or be down (events per second at the peak times that
    /// outage), not for the usual backlog. The subscriber reports what it
    /// finds trimmed (see
    /// [`RedisSubscription::trimmed`](crate::RedisSubscription::trimmed));
    /// an entry trimmed before any consumer of the group read it is
    /// counted only where Redis can tell (see there).
    ///
    /// A `max_len` of 0 is refused by
    /// [`publisher_with`](crate::RedisClient::publisher_with).
    pub fn max_len(mut self, max_len: MaxLen) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// How each event is written to its stream entry: one field per
    /// attribute plus `data` ([`ContentMode::Binary`]), or the CloudEvents
    /// JSON document in `data` beside a `content-type` field
    /// ([`ContentMode::Structured`]). Subscribers read both whatever this
    /// says. Default [`ContentMode::Structured`]; see
    /// [Content modes](crate#content-modes) for why.
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }

    /// How many `XADD`s may be queued or on the wire at once (at least 1);
    /// beyond that `poll_ready` waits. Default 4096: room for many batches
    /// in flight, while memory stays bounded.
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// Checks the options.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if matches!(self.max_len, Some(MaxLen::Approx(0) | MaxLen::Exact(0))) {
            return Err(Error::config("max_len must be at least 1"));
        }
        Ok(())
    }
}
