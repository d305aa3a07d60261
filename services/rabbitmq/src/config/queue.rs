//! How subscribers' queues are declared and consumed.

use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use watchtower::Error;

use super::{check_name, millis};

/// What a queue does when it is full (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueOverflow {
    /// Drop (or dead-letter) the oldest messages: the broker's default.
    DropHead,
    /// Refuse new messages; with confirms on, the publisher gets a
    /// retryable [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected) error.
    RejectPublish,
    /// Refuse new messages and dead-letter them (classic queues only).
    RejectPublishDlx,
}

impl QueueOverflow {
    fn as_str(self) -> &'static str {
        match self {
            QueueOverflow::DropHead => "drop-head",
            QueueOverflow::RejectPublish => "reject-publish",
            QueueOverflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// Prefetch unless set: 256 unacknowledged deliveries per subscription,
/// enough to keep a fast consumer busy across a network round trip.
const DEFAULT_PREFETCH: u16 = 256;

/// How a subscriber's queue is declared and consumed.
///
/// A subscription with a consumer group consumes from a durable queue named
/// `<prefix><group>` (the prefix defaults to `<exchange>.`), shared by every
/// member of the group; one without a group gets an exclusive, auto-delete
/// queue that lives as long as its connection.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub(crate) prefix: Option<Arc<str>>,
    pub(crate) queue: Option<Arc<str>>,
    pub(crate) passive: bool,
    pub(crate) quorum: bool,
    pub(crate) delivery_limit: Option<u32>,
    pub(crate) dead_letter_exchange: Option<Arc<str>>,
    pub(crate) dead_letter_routing_key: Option<Arc<str>>,
    pub(crate) dead_letter_queue: Option<Arc<str>>,
    pub(crate) message_ttl: Option<Duration>,
    pub(crate) expires: Option<Duration>,
    pub(crate) max_length: Option<u64>,
    pub(crate) max_length_bytes: Option<u64>,
    pub(crate) overflow: Option<QueueOverflow>,
    pub(crate) prefetch: u16,
    pub(crate) binding_arguments: FieldTable,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            prefix: None,
            queue: None,
            passive: false,
            quorum: false,
            delivery_limit: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            dead_letter_queue: None,
            message_ttl: None,
            expires: None,
            max_length: None,
            max_length_bytes: None,
            overflow: None,
            prefetch: DEFAULT_PREFETCH,
            binding_arguments: FieldTable::default(),
        }
    }
}

impl QueueOptions {
    /// The defaults: classic queues, no dead-lettering, prefetch 256.
    pub fn new() -> QueueOptions {
        QueueOptions::default()
    }

    /// The prefix of group queue names. Default `<exchange>.`. Longer
    /// than 200 bytes fails with [`ErrorKind::Config`](watchtower::ErrorKind::Config) when the
    /// subscriber is made.
    pub fn queue_prefix(mut self, prefix: &str) -> QueueOptions {
        self.prefix = Some(prefix.into());
        self
    }

    /// Consume from this exact queue, whatever the group, for queues
    /// managed elsewhere (a dead-letter queue being drained).
    ///
    /// Default none: the queue follows the group. An empty or too long
    /// name fails with [`ErrorKind::Config`](watchtower::ErrorKind::Config) when the subscriber is made.
    pub fn queue(mut self, name: &str) -> QueueOptions {
        self.queue = Some(name.into());
        self
    }

    /// Only check that the queue exists (a passive declare), and bind
    /// nothing.
    pub fn passive(mut self, passive: bool) -> QueueOptions {
        self.passive = passive;
        self
    }

    /// Declare group queues as quorum queues (`x-queue-type: quorum`):
    /// replicated, with the `x-delivery-count` header and a delivery limit.
    pub fn quorum(mut self, quorum: bool) -> QueueOptions {
        self.quorum = quorum;
        self
    }

    /// Whether queues are declared as quorum queues.
    pub fn is_quorum(&self) -> bool {
        self.quorum
    }

    /// After this many failed deliveries (nacks with requeue) a quorum
    /// queue dead-letters the message (`x-delivery-limit`).
    pub fn delivery_limit(mut self, limit: u32) -> QueueOptions {
        self.delivery_limit = Some(limit);
        self
    }

    /// Dead-letter rejected, expired and over-limit messages to this
    /// exchange (`x-dead-letter-exchange`).
    ///
    /// Default none: the broker drops what it would dead-letter. An empty
    /// or too long name fails with [`ErrorKind::Config`](watchtower::ErrorKind::Config) when the
    /// subscriber is made.
    pub fn dead_letter_exchange(mut self, exchange: &str) -> QueueOptions {
        self.dead_letter_exchange = Some(exchange.into());
        self
    }

    /// The routing key dead-lettered messages get
    /// (`x-dead-letter-routing-key`); by default they keep their own.
    /// Longer than 255 bytes fails with [`ErrorKind::Config`](watchtower::ErrorKind::Config) when the
    /// subscriber is made.
    pub fn dead_letter_routing_key(mut self, key: &str) -> QueueOptions {
        self.dead_letter_routing_key = Some(key.into());
        self
    }

    /// Also declare the dead-letter exchange (durable, topic) and a durable
    /// queue of this name bound to it with `#`, so dead letters are kept.
    /// Needs [`dead_letter_exchange`](QueueOptions::dead_letter_exchange).
    /// Default none. An empty or too long name, or no dead-letter
    /// exchange, fails with [`ErrorKind::Config`](watchtower::ErrorKind::Config) when the subscriber is
    /// made.
    pub fn dead_letter_queue(mut self, queue: &str) -> QueueOptions {
        self.dead_letter_queue = Some(queue.into());
        self
    }

    /// Messages older than `ttl` are dropped or dead-lettered
    /// (`x-message-ttl`).
    pub fn message_ttl(mut self, ttl: Duration) -> QueueOptions {
        self.message_ttl = Some(ttl);
        self
    }

    /// A group queue unused (no consumers, no declarations) for `idle` is
    /// deleted by the broker (`x-expires`), for short-lived groups.
    pub fn expires(mut self, idle: Duration) -> QueueOptions {
        self.expires = Some(idle);
        self
    }

    /// At most `n` messages in the queue (`x-max-length`); see
    /// [`overflow`](QueueOptions::overflow).
    pub fn max_length(mut self, n: u64) -> QueueOptions {
        self.max_length = Some(n);
        self
    }

    /// At most `n` bytes of bodies in the queue (`x-max-length-bytes`).
    pub fn max_length_bytes(mut self, n: u64) -> QueueOptions {
        self.max_length_bytes = Some(n);
        self
    }

    /// What happens when the queue is full (`x-overflow`).
    pub fn overflow(mut self, overflow: QueueOverflow) -> QueueOptions {
        self.overflow = Some(overflow);
        self
    }

    /// Unacknowledged deliveries per subscription (`basic.qos`), the
    /// backpressure bound between broker and consumer (at least 1).
    /// Default 256: enough unacknowledged deliveries to keep a fast
    /// consumer busy across a network round trip.
    pub fn prefetch(mut self, n: u16) -> QueueOptions {
        self.prefetch = n.max(1);
        self
    }

    /// Arguments of each binding, for headers exchanges (`x-match` and the
    /// header values).
    pub fn binding_arguments(mut self, arguments: FieldTable) -> QueueOptions {
        self.binding_arguments = arguments;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.prefix.as_ref().is_some_and(|p| p.len() > 200) {
            return Err(Error::config("queue prefix is longer than 200 bytes"));
        }
        if let Some(name) = &self.queue {
            check_name("queue", name)?;
        }
        if let Some(name) = &self.dead_letter_exchange {
            check_name("dead-letter exchange", name)?;
        }
        if self
            .dead_letter_routing_key
            .as_ref()
            .is_some_and(|k| k.len() > 255)
        {
            return Err(Error::config("dead-letter routing key is longer than 255 bytes"));
        }
        if let Some(name) = &self.dead_letter_queue {
            check_name("dead-letter queue", name)?;
        }
        if self.dead_letter_queue.is_some() && self.dead_letter_exchange.is_none() {
            return Err(Error::config("a dead-letter queue needs a dead-letter exchange"));
        }
        if self.delivery_limit.is_some() && !self.quorum {
            return Err(Error::config(
                "a delivery limit needs quorum queues (QueueOptions::quorum(true))",
            ));
        }
        if self.quorum && self.overflow == Some(QueueOverflow::RejectPublishDlx) {
            return Err(Error::config(
                "quorum queues do not support reject-publish-dlx overflow",
            ));
        }
        Ok(())
    }

    /// The `x-` arguments of a durable group queue.
    pub(crate) fn arguments(&self, durable: bool) -> FieldTable {
        let mut args = FieldTable::default();
        if self.quorum && durable {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        if let Some(limit) = self.delivery_limit.filter(|_| durable && self.quorum) {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_bytes().into()),
            );
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(key.as_bytes().into()),
            );
        }
        if let Some(ttl) = self.message_ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(ttl)));
        }
        if let Some(idle) = self.expires.filter(|_| durable) {
            args.insert("x-expires".into(), AMQPValue::LongLongInt(millis(idle).max(1)));
        }
        if let Some(n) = self.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(n.min(i64::MAX as u64) as i64),
            );
        }
        if let Some(n) = self.max_length_bytes {
            args.insert(
                "x-max-length-bytes".into(),
                AMQPValue::LongLongInt(n.min(i64::MAX as u64) as i64),
            );
        }
        if let Some(overflow) = self.overflow {
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(overflow.as_str().into()),
            );
        }
        args
    }
}
