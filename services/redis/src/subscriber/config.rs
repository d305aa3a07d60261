//! Settings of a subscriber: its options, their defaults, the dead-letter
//! choice.

use std::sync::Arc;
use std::time::Duration;

use watchtower::Error;

const DEFAULT_BATCH_SIZE: usize = 256;
const DEFAULT_BLOCK: Duration = Duration::from_secs(1);
const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
const DEFAULT_CLAIM_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_MAX_DELIVERIES: u32 = 5;
const DEFAULT_DEAD_LETTER_STREAM: &str = "watchtower:dead-letter";

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
pub(crate) struct Options {
    pub(super) consumer: Arc<str>,
    pub(super) batch_size: usize,
    pub(super) block: Duration,
    pub(super) claim_idle: Duration,
    pub(super) claim_interval: Duration,
    pub(super) rescan_interval: Duration,
    pub(super) max_deliveries: Option<u32>,
    pub(super) dead_letter: DeadLetter,
}

/// Options of one subscriber, for
/// [`RedisClient::subscriber_with`](crate::RedisClient::subscriber_with):
/// plain data, checked there.
///
/// ```
/// use std::time::Duration;
/// use watchtower_redis::{DeadLetter, RedisSubscriberOptions};
///
/// let options = RedisSubscriberOptions::new()
///     .consumer("billing-1")
///     .claim_idle(Duration::from_secs(60))
///     .dead_letter(DeadLetter::Poison);
/// # drop(options);
/// ```
#[derive(Debug, Clone)]
pub struct RedisSubscriberOptions {
    consumer: Option<Arc<str>>,
    options: Options,
}

impl Default for RedisSubscriberOptions {
    fn default() -> Self {
        RedisSubscriberOptions::new()
    }
}

impl RedisSubscriberOptions {
    /// The defaults, as each setter describes.
    pub fn new() -> RedisSubscriberOptions {
        RedisSubscriberOptions {
            consumer: None,
            options: Options {
                consumer: Arc::from(""),
                batch_size: DEFAULT_BATCH_SIZE,
                block: DEFAULT_BLOCK,
                claim_idle: DEFAULT_CLAIM_IDLE,
                claim_interval: DEFAULT_CLAIM_INTERVAL,
                rescan_interval: DEFAULT_RESCAN_INTERVAL,
                max_deliveries: Some(DEFAULT_MAX_DELIVERIES),
                dead_letter: DeadLetter::Stream(DEFAULT_DEAD_LETTER_STREAM.to_owned()),
            },
        }
    }

    /// This instance's consumer name in its groups. Default: a unique
    /// `watchtower-<uuid>` per subscriber. Set a name that survives
    /// restarts (a pod or host name) so that a restarted instance takes
    /// back its own pending entries at once rather than after the claim
    /// idle time.
    pub fn consumer(mut self, name: impl Into<Arc<str>>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Entries read at most per `XREADGROUP` (at least 1). While the consumer works
    /// through one batch, the next ones are read, so up to three batches are
    /// in memory. Default 256: large enough that a busy stream costs few
    /// round trips, small enough to bound prefetched work.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.options.batch_size = n;
        self
    }

    /// How long an `XREADGROUP` blocks when there is nothing to read (at
    /// least 1 ms). Default 1 s: it bounds how long a closed subscription
    /// lingers and how late newly found streams are read.
    pub fn block(mut self, block: Duration) -> Self {
        self.options.block = block;
        self
    }

    /// How long an entry stays pending before another consumer may reclaim
    /// it (at least 1 ms). Default 30 s, the JetStream ack-wait default, so
    /// that redelivery timing matches across transports.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.options.claim_idle = idle;
        self
    }

    /// How often to look for entries to reclaim (more than zero). Default
    /// 5 s.
    pub fn claim_interval(mut self, interval: Duration) -> Self {
        self.options.claim_interval = interval;
        self
    }

    /// How often wildcard patterns are resolved again for new streams
    /// (more than zero). Default 5 s.
    pub fn rescan_interval(mut self, interval: Duration) -> Self {
        self.options.rescan_interval = interval;
        self
    }

    /// Deliveries of one entry before it goes to the dead-letter path;
    /// `None` for no limit, else at least 1. Default 5.
    pub fn max_deliveries(mut self, max: Option<u32>) -> Self {
        self.options.max_deliveries = max;
        self
    }

    /// Where entries past [`max_deliveries`](Self::max_deliveries) go.
    /// Default: the stream `watchtower:dead-letter` (a stream name must
    /// not be empty).
    pub fn dead_letter(mut self, dead_letter: DeadLetter) -> Self {
        self.options.dead_letter = dead_letter;
        self
    }

    /// Checks the options.
    pub(crate) fn validate(&self) -> Result<(), Error> {
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
        if let Some(consumer) = &self.consumer
            && (consumer.is_empty() || consumer.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::config(
                "the consumer name must be non-empty, without whitespace",
            ));
        }
        if let DeadLetter::Stream(key) = &o.dead_letter
            && key.is_empty()
        {
            return Err(Error::config("the dead-letter stream name must not be empty"));
        }
        Ok(())
    }

    /// The options of a subscriber, its consumer name made unique unless
    /// set.
    pub(crate) fn into_options(self) -> Options {
        let consumer = self
            .consumer
            .unwrap_or_else(|| format!("watchtower-{}", uuid::Uuid::now_v7().simple()).into());
        Options {
            consumer,
            ..self.options
        }
    }
}
