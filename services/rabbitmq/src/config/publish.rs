//! How publishers write and send events.

use std::time::Duration;

use watchtower::Error;

use super::{ExchangeKind, RabbitConfig};

/// How a publisher writes an event on an AMQP message. Receivers read
/// both modes, whichever a publisher uses.
///
/// Set with [`PublishOptions::content_mode`]. See the
/// [crate docs](crate#wire-format) for the measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// The whole event as one CloudEvents JSON object in the body
    /// (`content-type: application/cloudevents+json`), a JSON payload
    /// spliced in as is (`"data"`), any other as `"data_base64"`; no
    /// header table, only the `message-id`, `timestamp` and
    /// `delivery-mode` properties: for consumers that know the JSON event
    /// format but not the AMQP binding. It saves the consuming process a
    /// few µs per event, but costs the broker more CPU per event than
    /// binary mode in the crate's benchmark.
    Structured,
    /// Attributes as `cloudEvents_<attr>` headers (the CloudEvents AMQP
    /// binding's binary mode), `datacontenttype` as the `content-type`
    /// property, the payload alone as the body. The default: the faster
    /// mode to publish in the crate's benchmark, the mode headers
    /// exchanges route on, and what consumers that want the bare payload
    /// read.
    #[default]
    Binary,
}

/// How the publisher sends events.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub(crate) content_mode: Option<ContentMode>,
    pub(crate) confirms: bool,
    pub(crate) mandatory: Option<bool>,
    pub(crate) persistent: bool,
    pub(crate) channels: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) message_ttl: Option<Duration>,
}

/// Channels the publisher spreads events over unless set: 1. Confirms are
/// pipelined on it (up to 4,096 outstanding by default). In the
/// crate's benchmark (one durable classic queue, broker on the same two
/// cores) more channels did not publish faster: the broker's work per
/// message (about 1,470 Erlang reductions) was the same with 1, 2 or 4
/// channels and with 2 connections, and its CPU time per message slightly
/// higher with more channel processes. More channels help when one
/// channel process is the broker's bottleneck, e.g. routing to many queues.
const DEFAULT_PUBLISH_CHANNELS: usize = 1;

/// Unconfirmed events allowed at once unless set: 4,096, several
/// round trips' worth at high rates while bounding memory.
const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            content_mode: None,
            confirms: true,
            mandatory: None,
            persistent: true,
            channels: DEFAULT_PUBLISH_CHANNELS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            message_ttl: None,
        }
    }
}

impl PublishOptions {
    /// The defaults: binary mode, confirms, mandatory (unless the
    /// exchange has an alternate exchange), persistent, 1 channel, 4,096 in
    /// flight, no per-message TTL.
    pub fn new() -> PublishOptions {
        PublishOptions::default()
    }

    /// How events are written on the wire. Default [`ContentMode::Binary`]
    /// (see the [crate docs](crate#wire-format) for why). On a
    /// [headers exchange](ExchangeKind::Headers), which routes on the
    /// `cloudEvents_*` headers only binary mode writes, asking for
    /// structured mode fails when the publisher connects.
    pub fn content_mode(mut self, mode: ContentMode) -> PublishOptions {
        self.content_mode = Some(mode);
        self
    }

    /// The content mode events are written in on an exchange of `kind`.
    pub(crate) fn content_mode_for(&self, kind: ExchangeKind) -> Result<ContentMode, Error> {
        match (self.content_mode, kind) {
            (Some(ContentMode::Structured), ExchangeKind::Headers) => Err(Error::config(
                "a headers exchange routes on the cloudEvents_* headers, which only \
                 ContentMode::Binary writes",
            )),
            (Some(mode), _) => Ok(mode),
            (None, _) => Ok(ContentMode::Binary),
        }
    }

    /// Waits for the broker's publisher confirm before the call resolves
    /// (default on). Off, a call resolves once the frames are written, and
    /// an event lost on the way is not reported.
    pub fn confirms(mut self, on: bool) -> PublishOptions {
        self.confirms = on;
        self
    }

    /// Sets the `mandatory` flag: an event no queue is bound for comes
    /// back as an [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected) error instead of being dropped by
    /// the broker. Only reported with confirms on. Default on, unless the
    /// exchange has an [alternate exchange](RabbitConfig::alternate_exchange),
    /// which keeps such events.
    ///
    /// # Trade-off
    ///
    /// lapin hands a returned message to whichever confirm of its channel
    /// completes next, so with `mandatory` the publisher's channels each
    /// run a task that matches returns to their events by id and, before
    /// answering a batch of confirms, waits for one more round trip on the
    /// channel (a `basic.qos`) so that no return of the batch is still
    /// on its way (see the
    /// [crate docs](crate#mandatory-and-the-alternate-exchange)). That
    /// costs the process 2 to 4 µs of CPU per event (the hop through the
    /// task) and the broker one `basic.qos` per batch; in the benchmark,
    /// binary mode with `mandatory` published at 1.02 and 1.07 times raw
    /// lapin (medians of two runs), with an alternate exchange and
    /// without it at 1.07 (see the
    /// [publisher docs](crate::RabbitPublisher#performance)).
    /// Without `mandatory`, each caller waits for its own
    /// confirm directly, as raw lapin does, and the broker drops an event
    /// no binding routes while confirming it: safe only when every topic
    /// published has a binding, or the exchange has an alternate exchange.
    pub fn mandatory(mut self, on: bool) -> PublishOptions {
        self.mandatory = Some(on);
        self
    }

    /// Whether `mandatory` is set on an exchange configured as `config`.
    pub(crate) fn mandatory_for(&self, config: &RabbitConfig) -> bool {
        self.mandatory.unwrap_or(config.alternate_exchange.is_none())
    }

    /// Whether `mandatory` is set, once resolved by
    /// [`mandatory_for`](PublishOptions::mandatory_for).
    pub(crate) fn is_mandatory(&self) -> bool {
        self.mandatory.unwrap_or(true)
    }

    /// Persistent delivery mode (default on): durable queues keep the event
    /// across a broker restart.
    pub fn persistent(mut self, on: bool) -> PublishOptions {
        self.persistent = on;
        self
    }

    /// Confirm-mode channels to spread events over (1 to 64), in turn, for
    /// brokers where routing to many queues makes a single channel process
    /// the bottleneck. Default 1: in the crate's benchmark more channels did
    /// not publish faster (the broker's work per event was the same). Each call
    /// still resolves on its own event's confirm; a failed channel is
    /// replaced without disturbing the others (see the
    /// [publisher docs](crate::RabbitPublisher#channels)). Events of one caller
    /// that waits for each receipt keep their order; concurrent events may
    /// be reordered across channels.
    pub fn channels(mut self, n: usize) -> PublishOptions {
        self.channels = n.clamp(1, 64);
        self
    }

    /// Unconfirmed events allowed at once across all clones (at least 1);
    /// `poll_ready` is pending while the window is full. Default
    /// 4,096: several round trips' worth at high rates, while bounding
    /// memory.
    pub fn max_in_flight(mut self, n: usize) -> PublishOptions {
        self.max_in_flight = n.max(1);
        self
    }

    /// Per-message TTL (the `expiration` property): the broker drops or
    /// dead-letters an event not consumed within `ttl`.
    pub fn message_ttl(mut self, ttl: Duration) -> PublishOptions {
        self.message_ttl = Some(ttl);
        self
    }
}
