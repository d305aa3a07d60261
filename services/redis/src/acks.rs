//! Batched acknowledgements: one `XACK` per stream for many deliveries.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::conn::Conn;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use redis::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use watchtower::{Error, ErrorKind};

use crate::error::{from_redis, kind_of};
use crate::subscriber::{Item, MAX_ACK_BATCH, StreamInfo, missing_from_stream};

/// `XACK` batches in flight at once: while they travel, new
/// acknowledgements gather into the next batch.
const MAX_IN_FLIGHT: usize = 8;

/// Where entries found trimmed are reported: the subscription's count, and
/// its stream of items (without keeping the subscription open).
#[derive(Clone)]
pub(crate) struct Trimmed {
    pub(crate) count: Arc<AtomicU64>,
    pub(crate) items: mpsc::WeakSender<Item>,
}

/// A request to the acknowledgement task.
#[derive(Debug)]
pub(crate) enum AckOp {
    /// Acknowledge the entry; answer on `done` once its batch is.
    Ack {
        stream: Arc<str>,
        id: Arc<str>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// Make an entry reclaimable at once (its delivery was dropped).
    Release { stream: Arc<str>, id: Arc<str> },
}

/// Runs until every acker and the subscription are gone, then destroys an
/// ephemeral group.
pub(crate) async fn ack_loop(
    conn: Conn,
    group: Arc<str>,
    consumer: Arc<str>,
    claim_idle: Duration,
    ephemeral: Option<Arc<RwLock<Vec<Arc<StreamInfo>>>>>,
    mut rx: mpsc::UnboundedReceiver<AckOp>,
    trimmed: Trimmed,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            op = rx.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match op {
                Some(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_ACK_BATCH {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    in_flight.push(send_batch(
                        conn.clone(),
                        group.clone(),
                        consumer.clone(),
                        claim_idle,
                        batch,
                        trimmed.clone(),
                    ));
                }
                None => open = false,
            },
        }
    }
    if let Some(streams) = ephemeral {
        let keys: Vec<Arc<str>> = streams
            .read()
            .map(|s| s.iter().map(|s| s.key.clone()).collect())
            .unwrap_or_default();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("XGROUP")
                .arg("DESTROY")
                .arg(&**key)
                .arg(&*group)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn.clone()).await {
            tracing::debug!(error = %e, "could not destroy a subscription's own consumer group");
        }
    }
}

/// Releases entries of `KEYS[1]` pending with consumer `ARGV[2]` of group
/// `ARGV[1]`: sets their idle time to `ARGV[3]` ms, as `XCLAIM ... IDLE`
/// does, if this consumer still owns them; answers the ids released, as
/// `XCLAIM ... JUSTID` would.
const RELEASE: &str = r"
local released = {}
for i = 4, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #pending > 0 then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    for _, id in ipairs(claimed) do
      table.insert(released, id)
    end
  end
end
return released
";

async fn send_batch(
    mut conn: Conn,
    group: Arc<str>,
    consumer: Arc<str>,
    claim_idle: Duration,
    batch: Vec<AckOp>,
    trimmed: Trimmed,
) {
    let mut acks: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
    let mut releases: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
    let mut waiters = Vec::with_capacity(batch.len());
    for op in batch {
        match op {
            AckOp::Ack { stream, id, done } => {
                acks.entry(stream).or_default().push(id);
                waiters.push(done);
            }
            AckOp::Release { stream, id } => releases.entry(stream).or_default().push(id),
        }
    }
    let mut pipe = redis::pipe();
    for (key, ids) in &acks {
        pipe.cmd("XACK").arg(&**key).arg(&*group);
        for id in ids {
            pipe.arg(&**id);
        }
        pipe.ignore();
    }
    let idle = u64::try_from(claim_idle.as_millis()).unwrap_or(u64::MAX);
    for (key, ids) in &releases {
        // Setting the idle time to the claim threshold makes the entries
        // due for the next `XAUTOCLAIM` of any consumer in the group; only
        // those this consumer still owns, lest an entry another consumer
        // has claimed meanwhile be taken back and delivered twice.
        pipe.cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&**key)
            .arg(&*group)
            .arg(&*consumer)
            .arg(idle);
        for id in ids {
            pipe.arg(&**id);
        }
    }
    let mut result = pipe.query_async::<Value>(&mut conn).await;
    if let Err(e) = &result
        && matches!(kind_of(e), ErrorKind::Connection | ErrorKind::Timeout)
    {
        // `XACK` and the release are idempotent: one more try on the
        // re-established connection spares a redelivery.
        result = pipe.query_async::<Value>(&mut conn).await;
    }
    match result {
        Ok(claimed) => {
            for done in waiters {
                let _ = done.send(Ok(()));
            }
            report_released_trimmed(&mut conn, &group, &releases, claimed, &trimmed).await;
        }
        Err(e) => {
            let err = from_redis(e, "XACK");
            tracing::debug!(error = %err, "acknowledgement batch failed");
            for done in waiters {
                let _ = done.send(Err(Error::new(err.kind(), err.message())));
            }
        }
    }
}

/// Released entries an `XCLAIM` did not return are no longer pending:
/// those no longer in the stream were trimmed, and Redis 7 took them off
/// the pending list without a word. Counts and logs them.
async fn report_released_trimmed(
    conn: &mut Conn,
    group: &str,
    releases: &HashMap<Arc<str>, Vec<Arc<str>>>,
    claimed: Value,
    trimmed: &Trimmed,
) {
    let Value::Array(replies) = claimed else {
        return;
    };
    for ((key, ids), reply) in releases.iter().zip(replies) {
        let returned: HashSet<String> = match reply {
            Value::Array(returned) => returned.iter().filter_map(crate::wire::string_of).collect(),
            _ => continue,
        };
        let asked: Vec<&str> = ids
            .iter()
            .map(|id| &**id)
            .filter(|id| !returned.contains(*id))
            .collect();
        let gone = missing_from_stream(conn, key, asked).await;
        if gone.is_empty() {
            continue;
        }
        const WHAT: &str = "entries delivered and released unsettled were trimmed from the stream (MAXLEN) before they could be delivered again";
        trimmed.count.fetch_add(gone.len() as u64, Ordering::Relaxed);
        let ids = gone.join(", ");
        tracing::warn!(stream = &**key, group, count = gone.len(), ids = %ids, "{WHAT}");
        // Without waiting: acknowledgements must not wait for the consumer.
        // A full queue (the reader is ahead of the consumer) gets the
        // report from a task of its own rather than losing it.
        if let Some(tx) = trimmed.items.upgrade() {
            let message = format!("{} {WHAT} (stream {key:?}: {ids})", gone.len());
            if let Err(TrySendError::Full(report)) = tx.try_send(Err(Error::new(ErrorKind::Dropped, message)))
            {
                tokio::spawn(async move {
                    let _ = tx.send(report).await;
                });
            }
        }
    }
}
