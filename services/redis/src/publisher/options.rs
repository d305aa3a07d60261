//! Per-publisher options: trimming, content mode, pending `XADD`s,
//! replica acknowledgement.

use std::time::Duration;

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
    pub(super) replicas: Option<ReplicaAcks>,
}

/// `WAIT replicas timeout` after each batch of `XADD`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplicaAcks {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
}

impl ReplicaAcks {
    /// The `WAIT` command, its timeout in milliseconds (at least 1: 0
    /// would wait for ever).
    pub(crate) fn command(&self) -> redis::Cmd {
        let millis = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.replicas).arg(millis);
        cmd
    }
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
            replicas: None,
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

    /// Waits, after each batch of `XADD`s, until `replicas` replicas of
    /// the master that stored them have acknowledged them, for at most
    /// `timeout` (`WAIT replicas timeout`, sent on the same connection
    /// right after the batch; on a Redis Cluster one per master the batch
    /// wrote to). A caller hears of its event only then. Default: no
    /// waiting, a caller is answered as soon as the master has stored its
    /// event.
    ///
    /// If fewer replicas acknowledged within `timeout`, every caller of
    /// the batch (of that master) gets an [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout) error
    /// whose [source](std::error::Error::source) is a
    /// [`ReplicasNotAcknowledged`](crate::ReplicasNotAcknowledged) with
    /// the counts and the entry id. The event *is* stored on the master,
    /// and may or may not survive its failure: the error is retryable, and
    /// a retry stores it again (the consumer sees the event id twice).
    ///
    /// `WAIT` makes a write survive the failure of its master as long as
    /// a replica that acknowledged it is promoted; it does not make Redis
    /// strongly consistent (a failover may still promote a replica that
    /// missed it). It costs a round trip to the replicas per batch, and
    /// with it the publisher sends its batches on the `redis` crate's
    /// multiplexed connection rather than its own pipelined one.
    ///
    /// A `replicas` of 0, a zero `timeout`, or a `timeout` not shorter
    /// than the [response timeout](crate::RedisConfig::response_timeout)
    /// is refused by [`publisher_with`](crate::RedisClient::publisher_with).
    ///
    /// ```
    /// use std::time::Duration;
    /// use watchtower_redis::RedisPublisherOptions;
    ///
    /// let options = RedisPublisherOptions::new().wait_for_replicas(1, Duration::from_millis(500));
    /// # drop(options);
    /// ```
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some(ReplicaAcks { replicas, timeout });
        self
    }

    /// Checks the options, with the client's response timeout.
    pub(crate) fn validate(&self, response_timeout: Duration) -> Result<(), Error> {
        if matches!(self.max_len, Some(MaxLen::Approx(0) | MaxLen::Exact(0))) {
            return Err(Error::config("max_len must be at least 1"));
        }
        if let Some(acks) = self.replicas {
            if acks.replicas == 0 {
                return Err(Error::config("wait_for_replicas needs at least one replica"));
            }
            if acks.timeout.is_zero() {
                return Err(Error::config(
                    "the wait_for_replicas timeout must be greater than zero",
                ));
            }
            if acks.timeout >= response_timeout {
                return Err(Error::config(format!(
                    "the wait_for_replicas timeout ({:?}) must be shorter than the response timeout ({response_timeout:?})",
                    acks.timeout
                )));
            }
        }
        Ok(())
    }
}
