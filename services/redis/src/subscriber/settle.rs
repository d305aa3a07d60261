//! Settling one delivery: acknowledge, nack, reject, progress, release on
//! drop.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::oneshot;
use watchtower::{Acker, Error};

use crate::acks::AckOp;
use crate::error::from_redis;

use super::shared::{Nack, Shared, StreamInfo};

/// The most entry ids acknowledged by one `XACK`.
pub(crate) const MAX_ACK_BATCH: usize = 1024;

/// Settles one Redis delivery. See [`RedisSubscriber`](crate::RedisSubscriber) for what each
/// settlement does.
pub struct RedisAcker {
    pub(super) shared: Arc<Shared>,
    pub(super) stream: Arc<StreamInfo>,
    pub(super) id: Arc<str>,
    pub(super) count: u32,
    pub(super) settled: bool,
    pub(super) held: Option<Held>,
}

/// Marks an entry as held by this consumer (read, not yet settled), so that
/// its own reclaiming does not deliver it a second time; dropped once the
/// entry is settled or released.
pub(super) struct Held {
    pub(super) shared: Arc<Shared>,
    pub(super) key: (Arc<str>, Arc<str>),
}

impl Held {
    /// Holds the entry, unless this consumer holds it already.
    pub(super) fn claim(shared: &Arc<Shared>, stream: &Arc<str>, id: &Arc<str>) -> Option<Held> {
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
