//! Turning read entries into deliveries, or into dead letters when they
//! were delivered too often, and handing them to the subscription.

use std::collections::HashMap;
use std::sync::Arc;

use redis::Value;
use tokio::sync::oneshot;
use watchtower::ext;
use watchtower::{Delivery, Error, ErrorKind, Poison, RawMessage, Transport as _};

use crate::acks::AckOp;
use crate::client::RedisClient;
use crate::error::from_redis;
use crate::wire::{self, Entry};

use super::config::DeadLetter;
use super::settle::{Held, RedisAcker};
use super::shared::{Shared, StreamInfo, Tx};
use super::trimmed::TRIMMED_PENDING;

impl Shared {
    /// The delivery counts of those of `entries` still pending for this
    /// consumer on `key`: an entry left out is no longer pending. `None`
    /// when that is unknown (the lookup failed, or its answer was cut
    /// short).
    async fn pending_counts(&self, key: &str, entries: &[(Entry, Held)]) -> Option<HashMap<String, u32>> {
        let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
            return Some(HashMap::new());
        };
        let limit = entries.len() * 2;
        let value: Result<Value, Error> = redis::cmd("XPENDING")
            .arg(key)
            .arg(&*self.group)
            .arg(&*first.id)
            .arg(&*last.id)
            .arg(limit)
            .arg(&*self.options.consumer)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| from_redis(e, &format!("XPENDING on {key:?}")));
        match value.and_then(wire::parse_pending) {
            // A full answer may have left some of the range out.
            Ok(rows) if rows.len() < limit => Some(rows.into_iter().collect()),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "could not look up delivery counts");
                None
            }
        }
    }

    /// Turns an entry into a delivery, or sends it to the dead-letter
    /// stream when it has been delivered too often. `None` when there is
    /// nothing to deliver.
    pub(super) async fn delivery(
        self: &Arc<Self>,
        stream: &Arc<StreamInfo>,
        entry: Entry,
        held: Held,
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
                    let dlq = self.config.dead_letter_key(dlq, &stream.topic);
                    return match self.dead_letter(&dlq, stream, &entry.id, fields, count).await {
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
                        .with_system(RedisClient::SYSTEM)
                        .with_group(Some(self.group.clone()))));
                }
            }
        }
        let delivery = match wire::decode(&stream.topic, fields) {
            Ok(event) => Delivery::new(event, stream.topic.clone(), acker),
            Err(poison) => Delivery::poison(poison, acker),
        };
        Some(Ok(delivery
            .with_delivery_count(count)
            .with_system(RedisClient::SYSTEM)
            .with_group(Some(self.group.clone()))))
    }

    /// Copies the entry to the dead-letter stream and acknowledges it, in
    /// one transaction.
    pub(super) async fn dead_letter(
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
    ///
    /// Entries read from a pending list ([`Source::Pending`]) may reach
    /// this consumer by two paths at once (its own pending entries read at
    /// start, idle entries reclaimed, nacked ones claimed back). Each entry
    /// is held first — the first path to hold it delivers it — and only
    /// then looked up in the pending list: an entry another path delivered
    /// and acknowledged between this path's read and now is no longer
    /// pending, and is not delivered a second time.
    pub(super) async fn hand_over(
        self: &Arc<Self>,
        tx: &Tx,
        stream: &Arc<StreamInfo>,
        entries: Vec<Entry>,
        source: Source,
    ) -> bool {
        let held: Vec<(Entry, Held)> = entries
            .into_iter()
            .filter_map(|entry| Held::claim(self, &stream.key, &entry.id).map(|held| (entry, held)))
            .collect();
        let counts = match source {
            Source::New => None,
            Source::Pending => Some(self.pending_counts(&stream.key, &held).await),
        };
        let mut batch = Vec::with_capacity(held.len());
        let mut gone = Vec::new();
        for (entry, held) in held {
            let count = match &counts {
                None => 1,
                Some(Some(pending)) => match pending.get(&*entry.id) {
                    Some(count) => *count,
                    // Acknowledged meanwhile (a trimmed entry stays pending).
                    None if entry.fields.is_some() => continue,
                    None => 2,
                },
                Some(None) => 2,
            };
            if entry.fields.is_none() {
                gone.push(entry.id.to_string());
            }
            match self.delivery(stream, entry, held, count).await {
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
}

/// Where the entries handed over were read.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    /// New entries (`XREADGROUP ... >`): delivered for the first time.
    New,
    /// Entries from a pending list: this consumer's own, reclaimed idle
    /// ones, nacked ones claimed back.
    Pending,
}
