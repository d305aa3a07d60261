//! The subscribing side: consumer groups, batched acknowledgements,
//! redelivery and reclaiming.
//!
//! One file per job: `config` the options and their defaults, `shared` what
//! a subscription's tasks share, `read` the read loop, `deliver` entries
//! into deliveries (or dead letters), `reclaim` nack redelivery and
//! reclaiming, `rescan` wildcard patterns, `trimmed` entries trimmed
//! before they were settled, `settle` the acker, `subscription` the
//! stream of deliveries.

mod config;
mod deliver;
mod read;
mod reclaim;
mod rescan;
mod settle;
mod shared;
mod subscription;
mod trimmed;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{Notify, mpsc};
use watchtower::{Capabilities, Error, SubscribeOptions, Subscriber};

use crate::acks::{Trimmed, ack_loop};
use crate::client::RedisClient;
use crate::config::RedisConfig;
use crate::conn::Backend;

pub use config::{DeadLetter, RedisSubscriberOptions};
pub(crate) use settle::MAX_ACK_BATCH;
pub use settle::RedisAcker;
pub(crate) use shared::{Item, StreamInfo};
pub use subscription::RedisSubscription;
pub(crate) use trimmed::missing_from_stream;

use config::Options;
use read::{cluster_reads, read_loop};
use reclaim::maintain;
use shared::{RecentIds, Shared};

/// Subscribes to Redis Streams through consumer groups. Made by
/// [`RedisClient::subscriber`] or [`RedisClient::subscriber_with`]; clones
/// share the client and the options.
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
/// restart, which needs a stable [`consumer`](RedisSubscriberOptions::consumer)
/// name), then new entries with `XREADGROUP ... COUNT n BLOCK ms ... >` on
/// a connection of its own, so that blocking reads never delay the
/// commands (acks, claims) on the client's shared connection. Several topics are
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
/// * Every [claim interval](RedisSubscriberOptions::claim_interval), entries
///   of any consumer pending longer than the [claim idle
///   time](RedisSubscriberOptions::claim_idle) are reclaimed with
///   `XAUTOCLAIM`, with their delivery counts; entries this consumer still
///   holds (read and not yet settled) are not delivered to it again, and
///   their delivery counts stay as they are (the claim only resets their
///   idle time). An entry that reading the consumer's own pending list and
///   reclaiming both come upon is delivered once.
///   Handlers that take longer than the claim idle time should call
///   [`Acker::progress`](watchtower::Acker::progress), or another consumer may take their entries.
/// * An entry delivered more than [`max_deliveries`](RedisSubscriberOptions::max_deliveries)
///   times goes to the [`DeadLetter`] path instead and is acknowledged.
///
/// # Patterns
///
/// A pattern with `*` or `>` is resolved with `SCAN ... TYPE stream` and
/// [`TopicPattern::matches`](watchtower::TopicPattern::matches) when the subscription opens, and again every
/// [rescan interval](RedisSubscriberOptions::rescan_interval): a stream
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
/// use watchtower_redis::{RedisClient, RedisConfig, RedisSubscriberOptions};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RedisClient::connect(RedisConfig::default()).await?;
/// let subscriber = client.subscriber_with(RedisSubscriberOptions::new().consumer("billing-1"))?;
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
    client: RedisClient,
    options: Arc<Options>,
}

impl fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("config", self.client.config())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisSubscriber {
    pub(crate) fn new(client: RedisClient, options: Options) -> RedisSubscriber {
        RedisSubscriber {
            client,
            options: Arc::new(options),
        }
    }

    /// This instance's consumer name.
    pub fn consumer(&self) -> &str {
        &self.options.consumer
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        self.client.config()
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
        let config = self.client.config();
        let read_conn = match self.client.backend() {
            Backend::Single(_) => Some(self.client.backend().connect(config, self.options.block).await?),
            Backend::Cluster(_) => None,
        };
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (nack_tx, nack_rx) = mpsc::unbounded_channel();
        // Two batches wait while the subscription works through another, so
        // a slow read does not leave the consumer idle.
        let (tx, rx) = mpsc::channel(2);
        let shared = Arc::new(Shared {
            conn: self.client.conn().clone(),
            config: config.clone(),
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
            added: Notify::new(),
        });
        let mut initial = Vec::new();
        for pattern in options.patterns() {
            if pattern.is_wildcard() {
                initial.extend(shared.scan(pattern).await?);
            } else {
                initial.push(config.stream_key(pattern.as_str()));
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
            self.client.conn().clone(),
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
        match read_conn {
            Some(conn) => tokio::spawn(read_loop(shared.clone(), conn, tx.clone(), None)),
            None => tokio::spawn(cluster_reads(
                shared.clone(),
                self.client.backend().clone(),
                tx.clone(),
            )),
        };
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
