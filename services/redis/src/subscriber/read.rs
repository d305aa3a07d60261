//! The read loop: the consumer's own pending entries, then new entries,
//! on the subscription's own connection.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use redis::Value;
use watchtower::backoff::{Backoff, Jitter};

use crate::conn::{Backend, Conn};

use crate::error::{from_redis, is_no_group};
use crate::wire::{self, Entry};

use super::deliver::Source;
use super::shared::{Shared, StreamInfo, Tx};

/// On a Redis Cluster, one [`read_loop`] per stream, each on a connection
/// of its own: one `XREADGROUP` cannot span slots, and a blocking read
/// holds its connection. A stream joined later (a pattern's rescan) gets
/// its loop when it is added.
pub(super) async fn cluster_reads(shared: Arc<Shared>, backend: Backend, tx: Tx) {
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).jitter(Jitter::Full);
    let mut reading: HashSet<Arc<str>> = HashSet::new();
    let mut failures = 0u32;
    loop {
        for stream in shared.snapshot() {
            if reading.contains(&stream.key) {
                continue;
            }
            match backend.connect(&shared.config, shared.options.block).await {
                Ok(conn) => {
                    failures = 0;
                    reading.insert(stream.key.clone());
                    tokio::spawn(read_loop(
                        shared.clone(),
                        conn,
                        tx.clone(),
                        Some(stream.key.clone()),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "connecting to read a stream failed; retrying");
                    failures = failures.saturating_add(1);
                    break;
                }
            }
        }
        let wait = if failures > 0 {
            backoff.delay(failures)
        } else {
            shared.options.rescan_interval
        };
        tokio::select! {
            _ = tx.closed() => return,
            _ = shared.added.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads the consumer's own pending entries, then new entries, on the
/// dedicated connection: of every stream of the subscription, or of the
/// stream `only`.
pub(super) async fn read_loop(shared: Arc<Shared>, mut conn: Conn, tx: Tx, only: Option<Arc<str>>) {
    let streams_read = |shared: &Shared| {
        let mut streams = shared.snapshot();
        if let Some(only) = &only {
            streams.retain(|s| s.key == *only);
        }
        streams
    };
    for stream in streams_read(&shared) {
        if !shared.check_unread_trimmed(&tx, &stream).await
            || !drain_own(&shared, &mut conn, &tx, &stream).await
        {
            return;
        }
    }
    // Failed reads are tried again from 50 ms, doubling up to 2 s.
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).jitter(Jitter::Full);
    let mut failures = 0u32;
    let mut reported = false;
    loop {
        // Wait until the consumer has room, so that nothing is read that
        // would only wait in memory.
        let Ok(permit) = tx.reserve().await else { return };
        drop(permit);
        let streams = streams_read(&shared);
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
                failures = 0;
                reported = false;
                for (key, entries) in per_stream {
                    let Some(stream) = shared.find(&key) else { continue };
                    if !shared.hand_over(&tx, &stream, entries, Source::New).await {
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
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff.delay(failures)) => {}
                }
            }
        }
    }
}

/// Delivers the entries this consumer received before but never
/// acknowledged (`XREADGROUP` from id `0`).
pub(super) async fn drain_own(
    shared: &Arc<Shared>,
    conn: &mut Conn,
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
        if !shared.hand_over(tx, stream, entries, Source::Pending).await {
            return false;
        }
    }
}
