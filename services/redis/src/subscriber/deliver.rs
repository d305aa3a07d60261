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
    /// Looks up the delivery counts of `ids` (all pending for this
    /// consumer) on `key`.
    pub(super) async fn delivery_counts(
        &self,
        key: &str,
        entries: &[Entry],
    ) -> Result<HashMap<String, u32>, Error> {
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
    pub(super) async fn delivery(
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
    pub(super) async fn hand_over(
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
}
