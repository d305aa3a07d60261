//! Nack redelivery and reclaiming idle entries, on the shared connection.

use std::collections::HashMap;
use std::sync::Arc;

use redis::Value;
use tokio::sync::mpsc;
use watchtower::TopicPattern;

use crate::error::from_redis;
use crate::wire::{self};

use super::deliver::Source;
use super::rescan::rescan_streams;
use super::shared::{Nack, Shared, StreamInfo, Tx};
use super::trimmed::TRIMMED_PENDING;

/// Nack redelivery, reclaiming idle entries and finding new streams, on
/// the shared connection.
pub(super) async fn maintain(shared: Arc<Shared>, tx: Tx, mut nacks: mpsc::UnboundedReceiver<Nack>) {
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

pub(super) async fn redeliver(shared: &Arc<Shared>, tx: &Tx, batch: Vec<Nack>) -> bool {
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
                if !shared.hand_over(tx, &stream, entries, Source::Pending).await
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

pub(super) async fn reclaim(shared: &Arc<Shared>, tx: &Tx, cursors: &mut HashMap<Arc<str>, String>) -> bool {
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
                if !shared.hand_over(tx, &stream, entries, Source::Pending).await {
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
