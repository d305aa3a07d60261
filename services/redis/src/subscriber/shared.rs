//! What one subscription's tasks and ackers share: the streams being
//! read, the entries held, the channels to the settling tasks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use crate::conn::Conn;
use redis::Value;
use tokio::sync::{Notify, mpsc};
use watchtower::{Delivery, Error, TopicPattern};

use crate::acks::AckOp;
use crate::config::RedisConfig;
use crate::error::{from_redis, is_busy_group};

use super::config::{DeadLetter, Options};
use super::settle::RedisAcker;

/// A stream being read.
#[derive(Debug)]
pub(crate) struct StreamInfo {
    pub(crate) key: Arc<str>,
    pub(super) topic: Arc<str>,
}

/// What one subscription's tasks and ackers share.
pub(super) struct Shared {
    pub(super) conn: Conn,
    pub(super) config: RedisConfig,
    pub(super) options: Arc<Options>,
    pub(super) group: Arc<str>,
    pub(super) patterns: Vec<TopicPattern>,
    pub(super) streams: Arc<RwLock<Vec<Arc<StreamInfo>>>>,
    pub(super) held: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    pub(super) ack_tx: mpsc::UnboundedSender<AckOp>,
    pub(super) nack_tx: mpsc::UnboundedSender<Nack>,
    /// Entries found trimmed before they were delivered or settled.
    pub(super) trimmed: Arc<AtomicU64>,
    /// Per stream: the group's last-delivered id when entries it had not
    /// read were last found trimmed, and how many had been reported.
    pub(super) unread_trimmed: Mutex<HashMap<Arc<str>, (String, u64)>>,
    /// Pending entries lately reported trimmed: reading the consumer's own
    /// pending list and reclaiming can both come upon one before it leaves
    /// the pending list.
    pub(super) gone: Mutex<RecentIds>,
    /// Told when a stream joins the read set.
    pub(super) added: Notify,
}

/// The last [`RecentIds::CAPACITY`] entry ids seen, oldest dropped first.
#[derive(Default)]
pub(super) struct RecentIds {
    pub(super) order: VecDeque<(Arc<str>, String)>,
    pub(super) set: HashSet<(Arc<str>, String)>,
}

impl RecentIds {
    const CAPACITY: usize = 4096;

    /// Whether `id` of `stream` is new; remembers it.
    pub(super) fn insert(&mut self, stream: &Arc<str>, id: &str) -> bool {
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
pub(super) type Tx = mpsc::Sender<Item>;

/// What a subscription's tasks send it: a batch of deliveries, or an error
/// to report.
pub(crate) type Item = Result<Vec<Delivery<RedisAcker>>, Error>;

pub(super) struct Nack {
    pub(super) stream: Arc<StreamInfo>,
    pub(super) id: Arc<str>,
}

impl Shared {
    pub(super) fn snapshot(&self) -> Vec<Arc<StreamInfo>> {
        self.streams.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub(super) fn find(&self, key: &str) -> Option<Arc<StreamInfo>> {
        self.streams
            .read()
            .ok()
            .and_then(|s| s.iter().find(|s| &*s.key == key).cloned())
    }

    pub(super) fn is_dead_letter_stream(&self, key: &str) -> bool {
        matches!(&self.options.dead_letter, DeadLetter::Stream(dlq) if self.config.is_dead_letter_key(dlq, key))
    }

    /// Creates the group on `key` (and the stream if missing) and adds the
    /// stream to the read set.
    pub(super) async fn add_stream(&self, key: String, start: &str) -> Result<(), Error> {
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
            self.added.notify_one();
        }
        Ok(())
    }

    pub(super) async fn create_group(&self, key: &str, start: &str) -> Result<(), Error> {
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
    pub(super) async fn destroy_groups(&self) {
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
    pub(super) async fn recreate_groups(&self) -> Result<(), Error> {
        for stream in self.snapshot() {
            self.create_group(&stream.key, "0").await?;
        }
        Ok(())
    }

    pub(super) fn release(&self, stream: &Arc<str>, id: Arc<str>) {
        let _ = self.ack_tx.send(AckOp::Release {
            stream: stream.clone(),
            id,
        });
    }
}
