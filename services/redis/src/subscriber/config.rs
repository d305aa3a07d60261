//! Settings of a subscriber: the builder, its defaults, the dead-letter
//! choice.

use std::sync::Arc;
use std::time::Duration;

use watchtower::Error;

use crate::config::RedisConfig;

use super::RedisSubscriber;

/// Entries read per `XREADGROUP` unless set: 256, large enough that a busy
/// stream costs few round trips, small enough to bound prefetched work.
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// How long an idle `XREADGROUP` blocks unless set: 1 s. It bounds how
/// long a closed subscription lingers and how late newly found streams are
/// read.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(1);

/// How long an entry must sit unacknowledged before another consumer may
/// reclaim it, unless set: 30 s, the JetStream ack-wait default, so
/// redelivery timing matches across transports.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);

/// How often pending entries are checked for reclaiming unless set: 5 s.
pub const DEFAULT_CLAIM_INTERVAL: Duration = Duration::from_secs(5);

/// How often topic patterns are resolved again for new streams unless
/// set: 5 s.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Deliveries of one entry before it goes to the dead-letter path unless
/// set: 5.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// The dead-letter stream unless set.
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "watchtower:dead-letter";

/// Where an entry goes once it has been delivered more than the allowed
/// number of times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetter {
    /// Copied, with its fields and the `deadletter*` extensions, to this
    /// stream key (not prefixed), then acknowledged, in one transaction.
    Stream(String),
    /// Handed to the consumer as a [`Delivery::poison`](watchtower::Delivery::poison), which the consumer
    /// runtime sends to its poison path and then acknowledges.
    Poison,
}

#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) consumer: Arc<str>,
    pub(super) batch_size: usize,
    pub(super) block: Duration,
    pub(super) claim_idle: Duration,
    pub(super) claim_interval: Duration,
    pub(super) rescan_interval: Duration,
    pub(super) max_deliveries: Option<u32>,
    pub(super) dead_letter: DeadLetter,
}

/// Builds a [`RedisSubscriber`].
#[derive(Debug, Clone)]
pub struct RedisSubscriberBuilder {
    pub(super) config: RedisConfig,
    pub(super) options: Options,
}

impl RedisSubscriberBuilder {
    /// This instance's consumer name in its groups. Default: a unique
    /// `watchtower-<uuid>` per subscriber. Set a name that survives
    /// restarts (a pod or host name) so that a restarted instance takes
    /// back its own pending entries at once rather than after the claim
    /// idle time.
    pub fn consumer(mut self, name: impl Into<Arc<str>>) -> Self {
        self.options.consumer = name.into();
        self
    }

    /// Entries read at most per `XREADGROUP`. While the consumer works
    /// through one batch, the next ones are read, so up to three batches are
    /// in memory. Default [`DEFAULT_BATCH_SIZE`].
    pub fn batch_size(mut self, n: usize) -> Self {
        self.options.batch_size = n;
        self
    }

    /// How long an `XREADGROUP` blocks when there is nothing to read.
    /// Default [`DEFAULT_BLOCK`].
    pub fn block(mut self, block: Duration) -> Self {
        self.options.block = block;
        self
    }

    /// How long an entry stays pending before it may be reclaimed. Default
    /// [`DEFAULT_CLAIM_IDLE`].
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.options.claim_idle = idle;
        self
    }

    /// How often to look for entries to reclaim. Default
    /// [`DEFAULT_CLAIM_INTERVAL`].
    pub fn claim_interval(mut self, interval: Duration) -> Self {
        self.options.claim_interval = interval;
        self
    }

    /// How often wildcard patterns are resolved again. Default
    /// [`DEFAULT_RESCAN_INTERVAL`].
    pub fn rescan_interval(mut self, interval: Duration) -> Self {
        self.options.rescan_interval = interval;
        self
    }

    /// Deliveries of one entry before it goes to the dead-letter path;
    /// `None` for no limit. Default [`DEFAULT_MAX_DELIVERIES`].
    pub fn max_deliveries(mut self, max: Option<u32>) -> Self {
        self.options.max_deliveries = max;
        self
    }

    /// Where entries past [`max_deliveries`](Self::max_deliveries) go.
    /// Default: the stream [`DEFAULT_DEAD_LETTER_STREAM`].
    pub fn dead_letter(mut self, dead_letter: DeadLetter) -> Self {
        self.options.dead_letter = dead_letter;
        self
    }

    /// Checks the configuration and connects the shared connection.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for a bad setting; [`ErrorKind::Connection`](watchtower::ErrorKind::Connection),
    /// [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout) or [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected) if Redis cannot be
    /// reached or refuses the credentials.
    pub async fn connect(self) -> Result<RedisSubscriber, Error> {
        let o = &self.options;
        if o.batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        if o.block.as_millis() == 0 {
            return Err(Error::config("block must be at least 1 ms"));
        }
        if o.claim_idle.as_millis() == 0 || o.claim_interval.is_zero() || o.rescan_interval.is_zero() {
            return Err(Error::config(
                "claim_idle (at least 1 ms), claim_interval and rescan_interval must be greater than zero",
            ));
        }
        if o.max_deliveries == Some(0) {
            return Err(Error::config("max_deliveries must be at least 1"));
        }
        if o.consumer.is_empty() || o.consumer.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::config(
                "the consumer name must be non-empty, without whitespace",
            ));
        }
        if let DeadLetter::Stream(key) = &o.dead_letter
            && key.is_empty()
        {
            return Err(Error::config("the dead-letter stream name must not be empty"));
        }
        let client = self.config.client()?;
        let conn = self.config.connect(&client, Duration::ZERO).await?;
        Ok(RedisSubscriber {
            config: self.config,
            client,
            conn,
            options: Arc::new(self.options),
        })
    }
}
