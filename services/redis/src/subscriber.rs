//! The subscribing side: consumer groups, batched acknowledgements,
//! redelivery and reclaiming.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_core::Stream;
use redis::aio::ConnectionManager;
use redis::{Client, Value};
use tokio::sync::{mpsc, oneshot};
use watchtower::event::ext;
use watchtower::{
    Acker, Capabilities, Delivery, Error, ErrorKind, Poison, RawMessage, SubscribeOptions, Subscriber,
    TopicPattern,
};

use crate::acks::{AckOp, Trimmed, ack_loop};
use crate::config::RedisConfig;
use crate::error::{from_redis, is_busy_group, is_no_group};
use crate::wire::{self, Entry};

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

/// What a consumer is told of entries trimmed while pending.
const TRIMMED_PENDING: &str = "entries read but not acknowledged were trimmed from the stream (MAXLEN) before they could be delivered again";

/// What a consumer is told of entries trimmed before the group read them.
const TRIMMED_UNREAD: &str =
    "entries were trimmed from the stream (MAXLEN) before the consumer group read them";

/// The most entry ids acknowledged by one `XACK`.
pub(crate) const MAX_ACK_BATCH: usize = 1024;

/// Where an entry goes once it has been delivered more than the allowed
/// number of times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetter {
    /// Copied, with its fields and the `deadletter*` extensions, to this
    /// stream key (not prefixed), then acknowledged, in one transaction.
    Stream(String),
    /// Handed to the consumer as a [`Delivery::poison`], which the consumer
    /// runtime sends to its poison path and then acknowledges.
    Poison,
}

#[derive(Debug, Clone)]
struct Options {
    consumer: Arc<str>,
    batch_size: usize,
    block: Duration,
    claim_idle: Duration,
    claim_interval: Duration,
    rescan_interval: Duration,
    max_deliveries: Option<u32>,
    dead_letter: DeadLetter,
}

/// Subscribes to Redis Streams through consumer groups.
///
/// Each topic is a stream (named by [`RedisConfig::stream_prefix`] plus the
/// topic); each [`SubscribeOptions::group`] a consumer group, created on
/// first use (`XGROUP CREATE ... MKSTREAM`) at the end of the stream, or at
/// its start with [`replay`](SubscribeOptions::replay). Without a group a
/// subscription gets a group of its own, starting at `$` and destroyed when
/// the subscription and its deliveries are gone.
///
/// # Reading
///
/// On open, the consumer first reads its own pending entries (`XREADGROUP`
/// from id `0`: what it had received but not acknowledged before a
/// restart, which needs a stable [`consumer`](RedisSubscriberBuilder::consumer)
/// name), then new entries with `XREADGROUP ... COUNT n BLOCK ms ... >` on
/// a connection of its own, so that blocking reads never delay the
/// commands (acks, claims) on the shared connection. Several topics are
/// read with one `XREADGROUP`.
///
/// # Settling
///
/// * `ack` and `reject` are `XACK`. Acknowledgements from many deliveries
///   are gathered into one `XACK` per stream; each ack completes when its
///   batch is acknowledged.
/// * `nack` claims the entry again for this consumer (`XCLAIM`), at once or
///   after the delay, so it is delivered again with its delivery count one
///   higher.
/// * A delivery dropped unsettled is released: its idle time is set to the
///   claim idle time, so the next `XAUTOCLAIM` of any consumer in the group
///   takes it.
/// * Every [claim interval](RedisSubscriberBuilder::claim_interval), entries
///   of any consumer pending longer than the [claim idle
///   time](RedisSubscriberBuilder::claim_idle) are reclaimed with
///   `XAUTOCLAIM`, with their delivery counts; entries this consumer still
///   holds (read and not yet settled) are not delivered to it again, and
///   their delivery counts stay as they are (the claim only resets their
///   idle time). An entry that reading the consumer's own pending list and
///   reclaiming both come upon is delivered once.
///   Handlers that take longer than the claim idle time should call
///   [`Acker::progress`], or another consumer may take their entries.
/// * An entry delivered more than [`max_deliveries`](RedisSubscriberBuilder::max_deliveries)
///   times goes to the [`DeadLetter`] path instead and is acknowledged.
///
/// # Patterns
///
/// A pattern with `*` or `>` is resolved with `SCAN ... TYPE stream` and
/// [`TopicPattern::matches`] when the subscription opens, and again every
/// [rescan interval](RedisSubscriberBuilder::rescan_interval): a stream
/// created later is found by the next scan and read from its first entry,
/// so nothing published to it is missed, only delivered up to one rescan
/// interval (plus one block time) late. The dead-letter stream is never
/// matched.
///
/// # Example
///
/// ```no_run
/// use tower::service_fn;
/// use watchtower::{Event, SubscribeOptions, SubscriberExt};
/// use watchtower_redis::{RedisConfig, RedisSubscriber};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let subscriber = RedisSubscriber::builder(RedisConfig::default())
///     .consumer("billing-1")
///     .connect()
///     .await?;
/// let options = SubscribeOptions::new(["user.*"])?.group("billing")?;
/// let handle = subscriber
///     .subscribe_with(options, service_fn(|event: Event| async move {
///         println!("{}", event.ty());
///         Ok::<_, watchtower::Error>(())
///     }))
///     .await?;
/// # handle.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSubscriber {
    config: RedisConfig,
    client: Client,
    conn: ConnectionManager,
    options: Arc<Options>,
}

impl fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("config", &self.config)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisSubscriber`].
#[derive(Debug, Clone)]
pub struct RedisSubscriberBuilder {
    config: RedisConfig,
    options: Options,
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
    /// [`ErrorKind::Config`] for a bad setting; [`ErrorKind::Connection`],
    /// [`ErrorKind::Timeout`] or [`ErrorKind::Rejected`] if Redis cannot be
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

impl RedisSubscriber {
    /// A builder for a subscriber with `config`.
    pub fn builder(config: RedisConfig) -> RedisSubscriberBuilder {
        RedisSubscriberBuilder {
            config,
            options: Options {
                consumer: format!("watchtower-{}", uuid::Uuid::now_v7().simple()).into(),
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

    /// Connects with `config` and default options.
    ///
    /// # Errors
    ///
    /// As [`RedisSubscriberBuilder::connect`].
    pub async fn connect(config: RedisConfig) -> Result<RedisSubscriber, Error> {
        RedisSubscriber::builder(config).connect().await
    }

    /// This instance's consumer name.
    pub fn consumer(&self) -> &str {
        &self.options.consumer
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Sends a `PING` on the shared connection and waits for the answer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if Redis does not
    /// answer.
    pub async fn health(&self) -> Result<(), Error> {
        redis::cmd("PING")
            .query_async::<Value>(&mut self.conn.clone())
            .await
            .map(drop)
            .map_err(|e| from_redis(e, "PING"))
    }

    async fn open_subscription(&self, options: SubscribeOptions) -> Result<RedisSubscription, Error> {
        let (group, ephemeral): (Arc<str>, bool) = match options.group_name() {
            Some(name) => (name.into(), false),
            None => (
                format!("watchtower-{}", uuid::Uuid::now_v7().simple()).into(),
                true,
            ),
        };
        let start = if options.is_replay() { "0" } else { "$" };
        let read_conn = self.config.connect(&self.client, self.options.block).await?;
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (nack_tx, nack_rx) = mpsc::unbounded_channel();
        // Two batches wait while the subscription works through another, so
        // a slow read does not leave the consumer idle.
        let (tx, rx) = mpsc::channel(2);
        let shared = Arc::new(Shared {
            conn: self.conn.clone(),
            config: self.config.clone(),
            options: self.options.clone(),
            group: group.clone(),
            patterns: options.patterns().to_vec(),
            streams: Arc::new(RwLock::new(Vec::new())),
            held: Mutex::new(HashSet::new()),
            ack_tx,
            nack_tx,
            trimmed: Arc::new(AtomicU64::new(0)),
            unread_trimmed: Mutex::new(HashMap::new()),
            gone: Mutex::new(RecentIds::default()),
        });
        let mut initial = Vec::new();
        for pattern in options.patterns() {
            if pattern.is_wildcard() {
                initial.extend(shared.scan(pattern).await?);
            } else {
                initial.push(self.config.stream_key(pattern.as_str()));
            }
        }
        for key in initial {
            if let Err(e) = shared.add_stream(key, start).await {
                if ephemeral {
                    shared.destroy_groups().await;
                }
                return Err(e);
            }
        }
        tokio::spawn(ack_loop(
            self.conn.clone(),
            group,
            shared.options.consumer.clone(),
            shared.options.claim_idle,
            ephemeral.then(|| shared.streams.clone()),
            ack_rx,
            Trimmed {
                count: shared.trimmed.clone(),
                items: tx.downgrade(),
            },
        ));
        let trimmed = shared.trimmed.clone();
        tokio::spawn(read_loop(shared.clone(), read_conn, tx.clone()));
        tokio::spawn(maintain(shared, tx, nack_rx));
        Ok(RedisSubscription {
            rx,
            ready: VecDeque::new(),
            trimmed,
        })
    }
}

impl Subscriber for RedisSubscriber {
    type Acker = RedisAcker;
    type Subscription = RedisSubscription;

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .persistent(true)
            .consumer_groups(true)
            .ordered(true)
            .wildcards(true)
            .redelivery(true)
            .nack_delay(true)
            .replay(true)
    }

    fn open(
        &self,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<RedisSubscription, Error>> + Send {
        self.open_subscription(options)
    }
}

/// A stream being read.
#[derive(Debug)]
pub(crate) struct StreamInfo {
    pub(crate) key: Arc<str>,
    topic: Arc<str>,
}

/// What one subscription's tasks and ackers share.
struct Shared {
    conn: ConnectionManager,
    config: RedisConfig,
    options: Arc<Options>,
    group: Arc<str>,
    patterns: Vec<TopicPattern>,
    streams: Arc<RwLock<Vec<Arc<StreamInfo>>>>,
    held: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    ack_tx: mpsc::UnboundedSender<AckOp>,
    nack_tx: mpsc::UnboundedSender<Nack>,
    /// Entries found trimmed before they were delivered or settled.
    trimmed: Arc<AtomicU64>,
    /// Per stream: the group's last-delivered id when entries it had not
    /// read were last found trimmed, and how many had been reported.
    unread_trimmed: Mutex<HashMap<Arc<str>, (String, u64)>>,
    /// Pending entries lately reported trimmed: reading the consumer's own
    /// pending list and reclaiming can both come upon one before it leaves
    /// the pending list.
    gone: Mutex<RecentIds>,
}

/// The last [`RecentIds::CAPACITY`] entry ids seen, oldest dropped first.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<(Arc<str>, String)>,
    set: HashSet<(Arc<str>, String)>,
}

impl RecentIds {
    const CAPACITY: usize = 4096;

    /// Whether `id` of `stream` is new; remembers it.
    fn insert(&mut self, stream: &Arc<str>, id: &str) -> bool {
        let key = (stream.clone(), id.to_owned());
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() == Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key.clone());
        self.set.insert(key);
        true
    }
}

/// Deliveries travel in batches: one channel operation per read, not per
/// entry.
type Tx = mpsc::Sender<Item>;

/// What a subscription's tasks send it: a batch of deliveries, or an error
/// to report.
pub(crate) type Item = Result<Vec<Delivery<RedisAcker>>, Error>;

struct Nack {
    stream: Arc<StreamInfo>,
    id: Arc<str>,
    count: u32,
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Shared {
    fn snapshot(&self) -> Vec<Arc<StreamInfo>> {
        self.streams.read().map(|s| s.clone()).unwrap_or_default()
    }

    fn find(&self, key: &str) -> Option<Arc<StreamInfo>> {
        self.streams
            .read()
            .ok()
            .and_then(|s| s.iter().find(|s| &*s.key == key).cloned())
    }

    fn is_dead_letter_stream(&self, key: &str) -> bool {
        matches!(&self.options.dead_letter, DeadLetter::Stream(dlq) if dlq == key)
    }

    /// The existing stream keys matching `pattern`.
    async fn scan(&self, pattern: &TopicPattern) -> Result<Vec<String>, Error> {
        let glob = format!("{}{}", glob_escape(self.config.prefix()), pattern.to_glob());
        let mut conn = self.conn.clone();
        let mut cursor = 0u64;
        let mut found = Vec::new();
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&glob)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut conn)
                .await
                .map_err(|e| from_redis(e, "SCAN"))?;
            for key in keys {
                let Ok(key) = String::from_utf8(key) else { continue };
                if self.is_dead_letter_stream(&key) {
                    continue;
                }
                if self.config.topic_of(&key).is_some_and(|t| pattern.matches(t)) {
                    found.push(key);
                }
            }
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }

    /// Creates the group on `key` (and the stream if missing) and adds the
    /// stream to the read set.
    async fn add_stream(&self, key: String, start: &str) -> Result<(), Error> {
        self.create_group(&key, start).await?;
        let Some(topic) = self.config.topic_of(&key) else {
            return Ok(());
        };
        let info = Arc::new(StreamInfo {
            topic: topic.into(),
            key: key.into(),
        });
        if let Ok(mut streams) = self.streams.write()
            && !streams.iter().any(|s| s.key == info.key)
        {
            streams.push(info);
        }
        Ok(())
    }

    async fn create_group(&self, key: &str, start: &str) -> Result<(), Error> {
        let result = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(&*self.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async::<Value>(&mut self.conn.clone())
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_busy_group(&e) => Ok(()),
            Err(e) => Err(from_redis(e, &format!("XGROUP CREATE on {key:?}"))),
        }
    }

    /// Best effort: removes the group from every stream joined so far.
    async fn destroy_groups(&self) {
        let mut pipe = redis::pipe();
        for stream in self.snapshot() {
            pipe.cmd("XGROUP")
                .arg("DESTROY")
                .arg(&*stream.key)
                .arg(&*self.group)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut self.conn.clone()).await {
            tracing::debug!(error = %e, "could not remove a subscription's own consumer group");
        }
    }

    /// After a restart of a Redis without persistence, groups (and streams)
    /// are gone: they come back from the start, since every entry in the
    /// new stream is new.
    async fn recreate_groups(&self) -> Result<(), Error> {
        for stream in self.snapshot() {
            self.create_group(&stream.key, "0").await?;
        }
        Ok(())
    }

    /// Looks up the delivery counts of `ids` (all pending for this
    /// consumer) on `key`.
    async fn delivery_counts(&self, key: &str, entries: &[Entry]) -> Result<HashMap<String, u32>, Error> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let value: Value = redis::cmd("XPENDING")
            .arg(key)
            .arg(&*self.group)
            .arg(&*first.id)
            .arg(&*last.id)
            .arg(entries.len().max(1) * 2)
            .arg(&*self.options.consumer)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| from_redis(e, &format!("XPENDING on {key:?}")))?;
        Ok(wire::parse_pending(value)?.into_iter().collect())
    }

    /// Turns an entry into a delivery, or sends it to the dead-letter
    /// stream when it has been delivered too often. `None` when there is
    /// nothing to deliver.
    async fn delivery(
        self: &Arc<Self>,
        stream: &Arc<StreamInfo>,
        entry: Entry,
        count: u32,
    ) -> Option<Result<Delivery<RedisAcker>, Error>> {
        let Some(fields) = entry.fields else {
            // Deleted (trimmed) while pending: nothing left to deliver.
            let (done, _) = oneshot::channel();
            let _ = self.ack_tx.send(AckOp::Ack {
                stream: stream.key.clone(),
                id: entry.id,
                done,
            });
            return None;
        };
        let id = entry.id.clone();
        // Reading its own pending entries and reclaiming idle ones can both
        // come upon the same entry; the first to hold it delivers it.
        let held = Held::claim(self, &stream.key, &id)?;
        let acker = RedisAcker {
            shared: self.clone(),
            stream: stream.clone(),
            held: Some(held),
            id,
            count,
            settled: false,
        };
        let over = self.options.max_deliveries.is_some_and(|max| count > max);
        if over {
            match &self.options.dead_letter {
                DeadLetter::Stream(dlq) => {
                    let mut acker = acker;
                    return match self.dead_letter(dlq, stream, &entry.id, fields, count).await {
                        Ok(()) => {
                            acker.settled = true;
                            None
                        }
                        Err(e) => Some(Err(e)),
                    };
                }
                DeadLetter::Poison => {
                    let raw = RawMessage {
                        topic: stream.topic.clone(),
                        body: fields
                            .iter()
                            .find(|(n, _)| &n[..] == wire::DATA_FIELD.as_bytes())
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default(),
                        headers: fields
                            .into_iter()
                            .filter(|(n, _)| &n[..] != wire::DATA_FIELD.as_bytes())
                            .map(|(n, v)| (String::from_utf8_lossy(&n).into_owned(), v))
                            .collect(),
                    };
                    let error = Error::new(
                        ErrorKind::Rejected,
                        format!("delivered {count} times, more than the maximum"),
                    );
                    return Some(Ok(Delivery::poison(Poison::new(raw, error), acker)
                        .with_delivery_count(count)
                        .with_system("redis")));
                }
            }
        }
        let delivery = match wire::decode(&stream.topic, fields) {
            Ok(event) => Delivery::new(event, stream.topic.clone(), acker),
            Err(poison) => Delivery::poison(poison, acker),
        };
        Some(Ok(delivery.with_delivery_count(count).with_system("redis")))
    }

    /// Copies the entry to the dead-letter stream and acknowledges it, in
    /// one transaction.
    async fn dead_letter(
        &self,
        dlq: &str,
        stream: &StreamInfo,
        id: &str,
        fields: Vec<(bytes::Bytes, bytes::Bytes)>,
        count: u32,
    ) -> Result<(), Error> {
        let reason = format!(
            "delivered {count} times, more than the maximum of {}",
            self.options.max_deliveries.unwrap_or(count)
        );
        let mut xadd = redis::cmd("XADD");
        xadd.arg(dlq).arg("*");
        let marks = [
            (ext::DEAD_LETTER_REASON, reason.clone()),
            (ext::DEAD_LETTER_KIND, ErrorKind::Rejected.as_str().to_owned()),
            (ext::DEAD_LETTER_TOPIC, stream.topic.to_string()),
            (ext::ATTEMPT, count.to_string()),
        ];
        // A structured entry stays one: the marks go into its document.
        let document = wire::structured_event(&fields).and_then(|mut event| {
            for (name, value) in &marks {
                event.set_extension(name, value.as_str()).ok()?;
            }
            watchtower::codec::structured::to_vec(&event).ok()
        });
        if let Some(document) = document {
            wire::write_structured(&mut xadd, document);
        } else {
            for (name, value) in &fields {
                if !name.starts_with(b"deadletter") {
                    xadd.arg(&name[..]).arg(&value[..]);
                }
            }
            for (name, value) in &marks {
                xadd.arg(*name).arg(value);
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(xadd)
            .ignore()
            .cmd("XACK")
            .arg(&*stream.key)
            .arg(&*self.group)
            .arg(id)
            .ignore();
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| from_redis(e, &format!("dead-lettering an entry of {:?}", stream.key)))?;
        tracing::warn!(
            stream = &*stream.key,
            id,
            count,
            dlq,
            "entry sent to the dead-letter stream"
        );
        Ok(())
    }

    /// Hands entries to the consumer, as one batch; if the subscription is
    /// closed, dropping the deliveries releases them for others to reclaim.
    /// Returns false once the subscription is closed.
    async fn hand_over(
        self: &Arc<Self>,
        tx: &Tx,
        stream: &Arc<StreamInfo>,
        entries: Vec<Entry>,
        counts: impl Fn(&str) -> u32,
    ) -> bool {
        let mut batch = Vec::with_capacity(entries.len());
        let mut gone = Vec::new();
        for entry in entries {
            if entry.fields.is_none() {
                gone.push(entry.id.to_string());
            }
            let count = counts(&entry.id);
            match self.delivery(stream, entry, count).await {
                Some(Ok(delivery)) => batch.push(delivery),
                Some(Err(e)) => {
                    if !batch.is_empty() && tx.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                        return false;
                    }
                    if tx.send(Err(e)).await.is_err() {
                        return false;
                    }
                }
                None => {}
            }
        }
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return false;
        }
        self.report_trimmed(tx, stream, gone.len() as u64, &gone, TRIMMED_PENDING)
            .await
    }

    /// Reports `count` entries of `stream` trimmed before they were
    /// delivered or settled (`ids`, those known): counts them, logs them,
    /// and tells the consumer with an [`ErrorKind::Dropped`] item. Returns
    /// false once the subscription is closed.
    async fn report_trimmed(
        &self,
        tx: &Tx,
        stream: &StreamInfo,
        count: u64,
        ids: &[String],
        what: &str,
    ) -> bool {
        let fresh: Vec<String>;
        let (count, ids) = if ids.is_empty() {
            (count, ids)
        } else {
            let mut gone = self
                .gone
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fresh = ids
                .iter()
                .filter(|id| gone.insert(&stream.key, id))
                .cloned()
                .collect();
            (fresh.len() as u64, &fresh[..])
        };
        if count == 0 {
            return true;
        }
        self.trimmed.fetch_add(count, Ordering::Relaxed);
        const SHOWN: usize = 16;
        let mut shown = ids
            .iter()
            .take(SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > SHOWN {
            shown.push_str(&format!(" and {} more", ids.len() - SHOWN));
        }
        tracing::warn!(
            stream = &*stream.key,
            group = &*self.group,
            count,
            ids = %shown,
            "{what}"
        );
        let message = if shown.is_empty() {
            format!("{count} {what} (stream {:?})", stream.key)
        } else {
            format!("{count} {what} (stream {:?}: {shown})", stream.key)
        };
        tx.send(Err(Error::new(ErrorKind::Dropped, message)))
            .await
            .is_ok()
    }

    /// Of the `asked` ids that an `XCLAIM` did not return, those no longer
    /// in the stream: Redis 7 drops them from the pending list without a
    /// word.
    async fn vanished(&self, key: &str, asked: &[&str], got: &[Entry]) -> Vec<String> {
        let returned: HashSet<&str> = got.iter().map(|e| &*e.id).collect();
        let missing: Vec<&str> = asked
            .iter()
            .copied()
            .filter(|id| !returned.contains(id))
            .collect();
        missing_from_stream(&mut self.conn.clone(), key, missing).await
    }

    /// Finds entries of `stream` trimmed before any consumer of the group
    /// read them, and reports those not reported yet.
    ///
    /// The group's read counter (`entries-read`, Redis 7) says how many
    /// entries it has gone past; `entries-added` how many the stream ever
    /// had. When trimming has gone past the group's last-delivered id, the
    /// stream holds only entries after it, so the entries added after the
    /// group's position and no longer there were trimmed unread. Redis does
    /// not always know the read counter (a group created at `$` that has
    /// read nothing yet, a stream with entries deleted by `XDEL`): then
    /// nothing is reported.
    async fn check_unread_trimmed(&self, tx: &Tx, stream: &StreamInfo) -> bool {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XINFO")
            .arg("STREAM")
            .arg(&*stream.key)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&*stream.key);
        let Ok((info, groups)) = pipe.query_async::<(Value, Value)>(&mut self.conn.clone()).await else {
            return true;
        };
        let Some(trimmed) = unread_trimmed(&info, &groups, &self.group) else {
            return true;
        };
        let (position, count) = trimmed;
        let new = {
            let mut seen = self
                .unread_trimmed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let reported = match seen.get(&stream.key) {
                Some((at, n)) if *at == position => *n,
                _ => 0,
            };
            seen.insert(stream.key.clone(), (position, count.max(reported)));
            count.saturating_sub(reported)
        };
        self.report_trimmed(tx, stream, new, &[], TRIMMED_UNREAD).await
    }

    fn release(&self, stream: &Arc<str>, id: Arc<str>) {
        let _ = self.ack_tx.send(AckOp::Release {
            stream: stream.clone(),
            id,
        });
    }
}

/// Reads the consumer's own pending entries, then new entries, on the
/// dedicated connection.
async fn read_loop(shared: Arc<Shared>, mut conn: ConnectionManager, tx: Tx) {
    for stream in shared.snapshot() {
        if !shared.check_unread_trimmed(&tx, &stream).await
            || !drain_own(&shared, &mut conn, &tx, &stream).await
        {
            return;
        }
    }
    let mut backoff = Duration::from_millis(50);
    let mut reported = false;
    loop {
        // Wait until the consumer has room, so that nothing is read that
        // would only wait in memory.
        let Ok(permit) = tx.reserve().await else { return };
        drop(permit);
        let streams = shared.snapshot();
        if streams.is_empty() {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(shared.options.rescan_interval) => continue,
            }
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*shared.group)
            .arg(&*shared.options.consumer)
            .arg("COUNT")
            .arg(shared.options.batch_size)
            .arg("BLOCK")
            .arg(u64::try_from(shared.options.block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS");
        for s in &streams {
            cmd.arg(&*s.key);
        }
        for _ in &streams {
            cmd.arg(">");
        }
        let reply = cmd.query_async::<Value>(&mut conn).await;
        if tx.is_closed() {
            // Whatever was read goes back for reclaiming; and a stream
            // deleted meanwhile must not be created again.
            if let Ok(per_stream) = reply
                .map_err(drop)
                .and_then(|v| wire::parse_read(v).map_err(drop))
            {
                for (key, entries) in per_stream {
                    for entry in entries {
                        shared.release(&key.as_str().into(), entry.id);
                    }
                }
            }
            return;
        }
        let read = match reply {
            Ok(value) => wire::parse_read(value),
            Err(e) if is_no_group(&e) => {
                tracing::info!("consumer group or stream is gone; creating it again");
                shared.recreate_groups().await.map(|()| Vec::new())
            }
            Err(e) => Err(from_redis(e, "XREADGROUP")),
        };
        match read {
            Ok(per_stream) => {
                backoff = Duration::from_millis(50);
                reported = false;
                for (key, entries) in per_stream {
                    let Some(stream) = shared.find(&key) else { continue };
                    if !shared.hand_over(&tx, &stream, entries, |_| 1).await {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the streams failed; retrying");
                // One error item per outage, so the consumer sees it
                // without being flooded.
                if !reported {
                    reported = true;
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Delivers the entries this consumer received before but never
/// acknowledged (`XREADGROUP` from id `0`).
async fn drain_own(
    shared: &Arc<Shared>,
    conn: &mut ConnectionManager,
    tx: &Tx,
    stream: &Arc<StreamInfo>,
) -> bool {
    let mut cursor = "0".to_owned();
    loop {
        let reply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&*shared.group)
            .arg(&*shared.options.consumer)
            .arg("COUNT")
            .arg(shared.options.batch_size)
            .arg("STREAMS")
            .arg(&*stream.key)
            .arg(&cursor)
            .query_async::<Value>(conn)
            .await
            .map_err(|e| from_redis(e, "XREADGROUP (pending)"))
            .and_then(wire::parse_read);
        let entries: Vec<Entry> = match reply {
            Ok(per_stream) => per_stream.into_iter().flat_map(|(_, e)| e).collect(),
            Err(e) => {
                // Left pending; the periodic reclaim picks them up.
                tracing::warn!(error = %e, stream = &*stream.key, "could not read own pending entries");
                return !tx.is_closed();
            }
        };
        let Some(last) = entries.last() else { return true };
        cursor = last.id.to_string();
        let counts = shared
            .delivery_counts(&stream.key, &entries)
            .await
            .unwrap_or_default();
        if !shared
            .hand_over(tx, stream, entries, |id| counts.get(id).copied().unwrap_or(2))
            .await
        {
            return false;
        }
    }
}

/// Nack redelivery, reclaiming idle entries and finding new streams, on
/// the shared connection.
async fn maintain(shared: Arc<Shared>, tx: Tx, mut nacks: mpsc::UnboundedReceiver<Nack>) {
    let mut claim = tokio::time::interval(shared.options.claim_interval);
    claim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval(shared.options.rescan_interval);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await;
    let wildcards = shared.patterns.iter().any(TopicPattern::is_wildcard);
    let mut cursors: HashMap<Arc<str>, String> = HashMap::new();
    loop {
        let open = tokio::select! {
            _ = tx.closed() => false,
            Some(first) = nacks.recv() => {
                let mut batch = vec![first];
                while let Ok(more) = nacks.try_recv() {
                    batch.push(more);
                }
                redeliver(&shared, &tx, batch).await
            }
            _ = claim.tick() => reclaim(&shared, &tx, &mut cursors).await,
            _ = rescan.tick(), if wildcards => {
                rescan_streams(&shared).await;
                true
            }
        };
        if !open {
            return;
        }
    }
}

async fn redeliver(shared: &Arc<Shared>, tx: &Tx, batch: Vec<Nack>) -> bool {
    let mut by_stream: HashMap<Arc<str>, (Arc<StreamInfo>, Vec<Nack>)> = HashMap::new();
    for nack in batch {
        by_stream
            .entry(nack.stream.key.clone())
            .or_insert_with(|| (nack.stream.clone(), Vec::new()))
            .1
            .push(nack);
    }
    for (key, (stream, nacks)) in by_stream {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&*key)
            .arg(&*shared.group)
            .arg(&*shared.options.consumer)
            .arg(0);
        for n in &nacks {
            cmd.arg(&*n.id);
        }
        let claimed = cmd
            .query_async::<Value>(&mut shared.conn.clone())
            .await
            .map_err(|e| from_redis(e, &format!("XCLAIM on {key:?}")))
            .and_then(wire::parse_entries);
        match claimed {
            Ok(entries) => {
                let asked: Vec<&str> = nacks.iter().map(|n| &*n.id).collect();
                let gone = shared.vanished(&key, &asked, &entries).await;
                let counts: HashMap<&str, u32> = nacks.iter().map(|n| (&*n.id, n.count + 1)).collect();
                if !shared
                    .hand_over(tx, &stream, entries, |id| counts.get(id).copied().unwrap_or(2))
                    .await
                    || !shared
                        .report_trimmed(tx, &stream, gone.len() as u64, &gone, TRIMMED_PENDING)
                        .await
                {
                    return false;
                }
            }
            Err(e) => {
                // Still pending: the periodic reclaim delivers them later.
                tracing::warn!(error = %e, "could not redeliver nacked entries");
                if tx.send(Err(e)).await.is_err() {
                    return false;
                }
            }
        }
    }
    true
}

async fn reclaim(shared: &Arc<Shared>, tx: &Tx, cursors: &mut HashMap<Arc<str>, String>) -> bool {
    let idle = u64::try_from(shared.options.claim_idle.as_millis()).unwrap_or(u64::MAX);
    for stream in shared.snapshot() {
        if !shared.check_unread_trimmed(tx, &stream).await {
            return false;
        }
        let cursor = cursors
            .entry(stream.key.clone())
            .or_insert_with(|| "0-0".to_owned());
        // One pass over the pending entries per tick, at most a few batches.
        for _ in 0..16 {
            // Claimed by id alone, which resets the idle time without
            // counting a delivery: entries this consumer still holds (read,
            // being handled) are neither delivered again nor counted again.
            let claimed = redis::cmd("XAUTOCLAIM")
                .arg(&*stream.key)
                .arg(&*shared.group)
                .arg(&*shared.options.consumer)
                .arg(idle)
                .arg(&*cursor)
                .arg("COUNT")
                .arg(shared.options.batch_size)
                .arg("JUSTID")
                .query_async::<Value>(&mut shared.conn.clone())
                .await
                .map_err(|e| from_redis(e, &format!("XAUTOCLAIM on {:?}", stream.key)))
                .and_then(wire::parse_autoclaim_ids);
            let (next, mut ids, deleted) = match claimed {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::debug!(error = %e, "reclaiming failed; trying again later");
                    break;
                }
            };
            *cursor = next;
            if !shared
                .report_trimmed(tx, &stream, deleted.len() as u64, &deleted, TRIMMED_PENDING)
                .await
            {
                return false;
            }
            {
                let held = shared
                    .held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                ids.retain(|id| !held.contains(&(stream.key.clone(), Arc::from(id.as_str()))));
            }
            // The others are this consumer's now: claiming them again with
            // their contents counts the delivery.
            let entries = if ids.is_empty() {
                Vec::new()
            } else {
                let mut cmd = redis::cmd("XCLAIM");
                cmd.arg(&*stream.key)
                    .arg(&*shared.group)
                    .arg(&*shared.options.consumer)
                    .arg(0);
                for id in &ids {
                    cmd.arg(id);
                }
                match cmd
                    .query_async::<Value>(&mut shared.conn.clone())
                    .await
                    .map_err(|e| from_redis(e, &format!("XCLAIM on {:?}", stream.key)))
                    .and_then(wire::parse_entries)
                {
                    Ok(entries) => {
                        let asked: Vec<&str> = ids.iter().map(String::as_str).collect();
                        let gone = shared.vanished(&stream.key, &asked, &entries).await;
                        if !shared
                            .report_trimmed(tx, &stream, gone.len() as u64, &gone, TRIMMED_PENDING)
                            .await
                        {
                            return false;
                        }
                        entries
                    }
                    Err(e) => {
                        // Still pending: claimed again on a later pass.
                        tracing::debug!(error = %e, "reclaiming failed; trying again later");
                        break;
                    }
                }
            };
            if !entries.is_empty() {
                tracing::info!(
                    stream = &*stream.key,
                    count = entries.len(),
                    "reclaimed idle entries"
                );
                let counts = shared
                    .delivery_counts(&stream.key, &entries)
                    .await
                    .unwrap_or_default();
                if !shared
                    .hand_over(tx, &stream, entries, |id| counts.get(id).copied().unwrap_or(2))
                    .await
                {
                    return false;
                }
            }
            if cursor == "0-0" {
                break;
            }
        }
    }
    true
}

async fn rescan_streams(shared: &Arc<Shared>) {
    let known: HashSet<Arc<str>> = shared.snapshot().iter().map(|s| s.key.clone()).collect();
    for pattern in shared.patterns.iter().filter(|p| p.is_wildcard()) {
        let keys = match shared.scan(pattern).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::debug!(error = %e, "rescanning streams failed");
                return;
            }
        };
        for key in keys {
            if known.contains(key.as_str()) {
                continue;
            }
            // Created after the subscription opened: everything in it is new.
            if let Err(e) = shared.add_stream(key, "0").await {
                tracing::warn!(error = %e, "could not join a new stream");
            } else {
                tracing::debug!("joined a new stream matching the subscription");
            }
        }
    }
}

/// A subscription's deliveries. Dropping it stops reading; entries read
/// but not yet handed out are released for reclaiming.
pub struct RedisSubscription {
    rx: mpsc::Receiver<Result<Vec<Delivery<RedisAcker>>, Error>>,
    ready: VecDeque<Delivery<RedisAcker>>,
    trimmed: Arc<AtomicU64>,
}

impl RedisSubscription {
    /// Entries this subscription found trimmed from their stream (by a
    /// publisher's [`MaxLen`](crate::MaxLen), or `XTRIM`) before they were
    /// delivered or settled. Each time some are found, the subscription
    /// also yields an [`ErrorKind::Dropped`] item and logs a warning with
    /// their ids.
    ///
    /// What is found:
    ///
    /// * entries read but not acknowledged (this consumer's own, read again
    ///   when the subscription opens, or any consumer's, reclaimed after
    ///   the claim idle time, or nacked), trimmed before they could be
    ///   delivered again: Redis takes them off the pending list;
    /// * deliveries dropped unsettled (released for reclaiming) whose
    ///   entries were trimmed meanwhile (the item is left out if the
    ///   subscription is gone or its buffer full);
    /// * entries trimmed before any consumer of the group read them, when
    ///   the subscription opens and at every
    ///   [claim interval](RedisSubscriberBuilder::claim_interval), from the
    ///   group's read counter (Redis 7): counted, without their ids.
    ///
    /// What is not: entries trimmed unread while Redis does not know the
    /// group's read counter (a group created at the stream's end that has
    /// read nothing since, a stream with entries deleted by `XDEL`), and
    /// entries trimmed unread and gone past by the group between two
    /// checks (the group reads past the gap before the next claim
    /// interval). Size the trimming so that neither happens (see
    /// [`RedisPublisherBuilder::max_len`](crate::RedisPublisherBuilder::max_len)).
    pub fn trimmed(&self) -> u64 {
        self.trimmed.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RedisSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscription")
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl Stream for RedisSubscription {
    type Item = Result<Delivery<RedisAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(delivery) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(delivery)));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(batch)) => self.ready.extend(batch),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Settles one Redis delivery. See [`RedisSubscriber`] for what each
/// settlement does.
pub struct RedisAcker {
    shared: Arc<Shared>,
    stream: Arc<StreamInfo>,
    id: Arc<str>,
    count: u32,
    settled: bool,
    held: Option<Held>,
}

/// Marks an entry as held by this consumer (read, not yet settled), so that
/// its own reclaiming does not deliver it a second time; dropped once the
/// entry is settled or released.
struct Held {
    shared: Arc<Shared>,
    key: (Arc<str>, Arc<str>),
}

impl Held {
    /// Holds the entry, unless this consumer holds it already.
    fn claim(shared: &Arc<Shared>, stream: &Arc<str>, id: &Arc<str>) -> Option<Held> {
        let key = (stream.clone(), id.clone());
        let fresh = shared
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone());
        fresh.then(|| Held {
            shared: shared.clone(),
            key,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut held) = self.shared.held.lock() {
            held.remove(&self.key);
        }
    }
}

impl fmt::Debug for RedisAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAcker")
            .field("stream", &self.stream.key)
            .field("id", &self.id)
            .field("delivery_count", &self.count)
            .finish()
    }
}

impl RedisAcker {
    /// The stream key the entry is in.
    pub fn stream(&self) -> &str {
        &self.stream.key
    }

    /// The entry id.
    pub fn entry_id(&self) -> &str {
        &self.id
    }

    fn xack(mut self) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        self.settled = true;
        // Held until the acknowledgement is through: until then the entry is
        // still pending and must not be reclaimed here.
        let held = self.held.take();
        let (done, result) = oneshot::channel();
        let sent = self.shared.ack_tx.send(AckOp::Ack {
            stream: self.stream.key.clone(),
            id: self.id.clone(),
            done,
        });
        async move {
            let _held = held;
            if sent.is_err() {
                return Err(Error::closed("the acknowledgement task has stopped"));
            }
            result
                .await
                .unwrap_or_else(|_| Err(Error::closed("the acknowledgement task has stopped")))
        }
    }
}

impl Acker for RedisAcker {
    fn ack(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.xack()
    }

    fn nack(mut self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send {
        self.settled = true;
        // Let go first, so that the redelivery can hold the entry again.
        drop(self.held.take());
        let nack = Nack {
            stream: self.stream.clone(),
            id: self.id.clone(),
            count: self.count,
        };
        let tx = self.shared.nack_tx.clone();
        let result = match delay.filter(|d| !d.is_zero()) {
            None => tx.send(nack).map_err(drop),
            Some(delay) if !tx.is_closed() => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // If the subscription is gone by then, the entry stays
                    // pending and is reclaimed after the claim idle time.
                    let _ = tx.send(nack);
                });
                Ok(())
            }
            Some(_) => Err(()),
        };
        std::future::ready(result.map_err(|()| {
            Error::closed("the subscription is closed; the entry will be reclaimed after the claim idle time")
        }))
    }

    fn reject(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.xack()
    }

    fn progress(&self) -> impl Future<Output = Result<(), Error>> + Send {
        // Claiming the entry again for this consumer, without incrementing
        // its delivery count, resets its idle time.
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&*self.stream.key)
            .arg(&*self.shared.group)
            .arg(&*self.shared.options.consumer)
            .arg(0)
            .arg(&*self.id)
            .arg("JUSTID");
        let mut conn = self.shared.conn.clone();
        async move {
            cmd.query_async::<Value>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| from_redis(e, "XCLAIM (progress)"))
        }
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.release(&self.stream.key, self.id.clone());
        }
    }
}

/// From `XINFO STREAM` and `XINFO GROUPS` replies: when entries were
/// trimmed before `group` read them, its last-delivered id and how many.
fn unread_trimmed(info: &Value, groups: &Value, group: &str) -> Option<(String, u64)> {
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    let length = int(wire::field(info, "length"))?;
    let added = int(wire::field(info, "entries-added"))?;
    let first = match wire::field(info, "first-entry") {
        Some(Value::Array(entry)) => entry.first().and_then(wire::string_of),
        _ => None,
    };
    let Value::Array(groups) = groups else {
        return None;
    };
    let ours = groups
        .iter()
        .find(|g| wire::field(g, "name").and_then(wire::string_of).as_deref() == Some(group))?;
    let last = wire::field(ours, "last-delivered-id").and_then(wire::string_of)?;
    let read = int(wire::field(ours, "entries-read"))?;
    // Only when trimming has gone past the group's position does the
    // stream hold nothing but entries after it.
    let past = match first.as_deref() {
        Some(first) => wire::entry_id(first)? > wire::entry_id(&last)?,
        None => true,
    };
    if !past {
        return None;
    }
    let trimmed = added.checked_sub(read)?.checked_sub(length)?;
    (trimmed > 0).then_some((last, trimmed))
}

/// Those of `ids` no longer in the stream `key` (one `XRANGE` each, in one
/// pipeline; none when Redis cannot be asked).
pub(crate) async fn missing_from_stream(
    conn: &mut ConnectionManager,
    key: &str,
    ids: Vec<&str>,
) -> Vec<String> {
    if ids.is_empty() {
        return Vec::new();
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("XRANGE").arg(key).arg(*id).arg(*id);
    }
    match pipe.query_async::<Vec<Value>>(conn).await {
        Ok(found) => ids
            .into_iter()
            .zip(found)
            .filter(|(_, entries)| matches!(entries, Value::Array(e) if e.is_empty()))
            .map(|(id, _)| id.to_owned())
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "could not check for trimmed entries");
            Vec::new()
        }
    }
}
