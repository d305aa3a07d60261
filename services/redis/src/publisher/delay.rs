//! Delayed delivery: a sorted set of events by due time beside each
//! stream, moved into the stream by the publishers' own task.
//!
//! An event with a future [`deliverat`](watchtower::ext::DELIVER_AT) is
//! written with `ZADD` to the sorted set `<stream key>#delayed` (no topic
//! holds `#`, so it never clashes with a stream), scored by its due time
//! in Unix milliseconds, rounded up; the member is the event as
//! structured CloudEvents JSON without the `deliverat` mark. The stream
//! key is then added to the index `<prefix>#delayed-streams`, a set of
//! the streams that may hold delayed events.
//!
//! A task per process and prefix (the mover) reads the index and runs, for
//! each stream in it, one script that takes the members due by the
//! server's clock, `XADD`s each to the stream and removes it, atomically,
//! so that many publishers in many processes move each event once. The
//! script names only its two keys, the set and the stream: on a Redis
//! Cluster the stream key carries the topic as its hash tag
//! (`prefix{topic}`), and so does its set (`prefix{topic}#delayed`), so
//! both live on one slot and the script runs on the master that serves
//! the topic. The index is a key of its own (wherever its slot is), only
//! read, added to and pruned, never part of a script.
//!
//! A stream whose set is empty is removed from the index; then the set is
//! counted again, and the stream put back if an event came meanwhile. A
//! scheduler adds to the set before the index, so an event is never left
//! in a set the index has lost.
//!
//! The mover starts with the first delayed event, and runs while a
//! publisher of the prefix lives or the index names streams; it sleeps
//! until the next due time, at most a second (to see events other
//! processes scheduled), and wakes at once for its own.
//!
//! Delayed events are stored structured whatever the publisher's content
//! mode, and without `MAXLEN` trimming; they wait while no process with a
//! publisher of this prefix runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::conn::Conn;
use redis::cluster_routing::Slot;
use time::OffsetDateTime;
use tokio::sync::Notify;
use watchtower::codec::{CLOUDEVENTS_JSON, structured};
use watchtower::{Error, Event, ext};

use crate::config::RedisConfig;
use crate::error::from_redis;
use crate::wire::{CONTENT_TYPE_FIELD, DATA_FIELD};

/// Events moved per script run: bounds the time Redis spends in one.
const BATCH: usize = 100;

/// The longest the mover sleeps, so that it sees within a second what
/// other processes scheduled.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Moves the due members of the set `KEYS[1]` into the stream `KEYS[2]`;
/// answers how many it moved and the milliseconds until the next is due
/// (-1 if none is left).
const MOVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', ARGV[2], ARGV[3], ARGV[4], m)
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, math.max(0, tonumber(nxt[2]) - now)} end
return {#due, -1}
";

/// The sorted set of the delayed events of `stream`.
pub(crate) fn set_key(stream: &str) -> String {
    format!("{stream}#delayed")
}

/// The index of the streams of `prefix` that may hold delayed events.
pub(crate) fn index_key(prefix: &str) -> String {
    format!("{prefix}#delayed-streams")
}

/// The movers of this process, one per server (or cluster) and prefix,
/// with the publishers that use each.
static MOVERS: std::sync::OnceLock<Mutex<HashMap<Arc<str>, Mover>>> = std::sync::OnceLock::new();

struct Mover {
    /// Publishers (and their clones) alive that write to this prefix.
    publishers: usize,
    running: bool,
    wake: Arc<Notify>,
}

fn movers() -> MutexGuard<'static, HashMap<Arc<str>, Mover>> {
    MOVERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// One publisher's share of the delays of its prefix. A mover starts with
/// the first delayed event, and runs while a publisher of the prefix is
/// alive in this process or streams are left in the index, so that an
/// event scheduled through a publisher dropped at once is still moved.
pub(super) struct Delays {
    /// The mover's name: where Redis is, and the index key.
    mover: Arc<str>,
    index: Arc<str>,
}

impl Drop for Delays {
    fn drop(&mut self) {
        if let Some(mover) = movers().get_mut(&self.mover) {
            mover.publishers = mover.publishers.saturating_sub(1);
            mover.wake.notify_one();
        }
    }
}

impl Delays {
    pub(super) fn new(config: &RedisConfig) -> Delays {
        let index: Arc<str> = index_key(config.prefix()).into();
        let mover: Arc<str> = format!("{} {index}", config.redacted_url()).into();
        movers()
            .entry(mover.clone())
            .or_insert_with(|| Mover {
                publishers: 0,
                running: false,
                wake: Arc::new(Notify::new()),
            })
            .publishers += 1;
        Delays { mover, index }
    }

    /// Schedules `event` (whose due time is `at`) for the stream
    /// `stream`, and makes sure the mover runs.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) on a cluster
    /// if the stream and its set do not share a slot (a stream prefix that
    /// spoils the topic's hash tag, such as one holding `{}`); else what
    /// Redis answered.
    pub(super) async fn schedule(
        &self,
        conn: Conn,
        runtime: &tokio::runtime::Handle,
        stream: &str,
        mut event: Event,
        at: OffsetDateTime,
    ) -> Result<(), Error> {
        let set = set_key(stream);
        if matches!(conn, Conn::Cluster(_)) && Slot::for_key(&set) != Slot::for_key(stream) {
            return Err(Error::config(format!(
                "delayed events of {stream:?} would live on another slot than the stream: \
                 the stream prefix must not spoil the topic's hash tag"
            )));
        }
        event.remove_extension(ext::DELIVER_AT);
        let json = structured::to_bytes(&event)?;
        let mut added = conn.clone();
        redis::cmd("ZADD")
            .arg(&set)
            .arg(due_millis(at))
            .arg(&*json)
            .query_async::<i64>(&mut added)
            .await
            .map_err(|e| from_redis(e, "ZADD of a delayed event"))?;
        // After the set, never before: see the module's docs.
        index_cmd(
            &mut added,
            "SADD",
            &self.index,
            stream,
            "SADD to the index of delayed events",
        )
        .await?;
        let wake = {
            let mut movers = movers();
            let mover = movers.entry(self.mover.clone()).or_insert_with(|| Mover {
                publishers: 1,
                running: false,
                wake: Arc::new(Notify::new()),
            });
            if !mover.running {
                mover.running = true;
                runtime.spawn(move_due(
                    conn,
                    self.mover.clone(),
                    self.index.clone(),
                    mover.wake.clone(),
                ));
            }
            mover.wake.clone()
        };
        wake.notify_one();
        Ok(())
    }
}

/// Unix milliseconds of `at`, rounded up, so that an event is never moved
/// before its time.
fn due_millis(at: OffsetDateTime) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    let millis = nanos.div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0);
    i64::try_from(millis.max(0)).unwrap_or(i64::MAX)
}

async fn move_due(mut conn: Conn, mover: Arc<str>, index: Arc<str>, wake: Arc<Notify>) {
    loop {
        let wait = match move_all(&mut conn, &index).await {
            Ok(Some(wait)) => wait,
            Ok(None) => {
                // Nothing left: stop, unless a publisher may add more.
                let mut movers = movers();
                if let Some(state) = movers.get_mut(&mover)
                    && state.publishers == 0
                {
                    movers.remove(&mover);
                    return;
                }
                MAX_SLEEP
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not move delayed events; trying again");
                MAX_SLEEP
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Moves what is due in every stream of the index; answers how long the
/// mover may sleep, or `None` if no stream has delayed events left.
async fn move_all(conn: &mut Conn, index: &str) -> Result<Option<Duration>, Error> {
    let streams: Vec<String> = redis::cmd("SMEMBERS")
        .arg(index)
        .query_async(conn)
        .await
        .map_err(|e| from_redis(e, "reading the index of delayed events"))?;
    let mut wait = None::<Duration>;
    for stream in streams {
        let set = set_key(&stream);
        let next = match run(conn, &set, &stream).await? {
            (moved, _) if moved >= BATCH as i64 => Duration::ZERO,
            (_, next) if next >= 0 => Duration::from_millis(u64::try_from(next).unwrap_or(0)),
            _ => match prune(conn, index, &stream, &set).await? {
                true => Duration::ZERO,
                false => continue,
            },
        };
        wait = Some(wait.map_or(next, |w| w.min(next)).min(MAX_SLEEP));
    }
    Ok(wait)
}

/// Removes `stream` from the index now that its set was found empty;
/// puts it back, and answers `true`, if an event came meanwhile.
async fn prune(conn: &mut Conn, index: &str, stream: &str, set: &str) -> Result<bool, Error> {
    let context = "pruning the index of delayed events";
    index_cmd(conn, "SREM", index, stream, context).await?;
    let left: i64 = redis::cmd("ZCARD")
        .arg(set)
        .query_async(conn)
        .await
        .map_err(|e| from_redis(e, context))?;
    if left > 0 {
        index_cmd(conn, "SADD", index, stream, context).await?;
    }
    Ok(left > 0)
}

/// `SADD` or `SREM` of `stream` on the index.
async fn index_cmd(
    conn: &mut Conn,
    name: &str,
    index: &str,
    stream: &str,
    context: &str,
) -> Result<(), Error> {
    redis::cmd(name)
        .arg(index)
        .arg(stream)
        .query_async::<i64>(conn)
        .await
        .map(drop)
        .map_err(|e| from_redis(e, context))
}

async fn run(conn: &mut Conn, set: &str, stream: &str) -> Result<(i64, i64), Error> {
    let answer: Vec<i64> = redis::cmd("EVAL")
        .arg(MOVE)
        .arg(2)
        .arg(set)
        .arg(stream)
        .arg(BATCH)
        .arg(CONTENT_TYPE_FIELD)
        .arg(CLOUDEVENTS_JSON)
        .arg(DATA_FIELD)
        .query_async(conn)
        .await
        .map_err(|e| from_redis(e, "moving delayed events"))?;
    match answer.as_slice() {
        [moved, next] => Ok((*moved, *next)),
        _ => Err(Error::decode("moving delayed events: unexpected reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_delayed_events_share_its_slot_on_a_cluster() {
        let stream = "events:{orders.paid}";
        assert_eq!(Slot::for_key(set_key(stream)), Slot::for_key(stream));
        assert_ne!(set_key(stream), index_key("events:"));
    }

    #[test]
    fn due_times_round_up_to_the_millisecond() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_000_000_001).unwrap();
        assert_eq!(due_millis(at), 1001);
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_000_000_000).unwrap();
        assert_eq!(due_millis(at), 1000);
        assert_eq!(
            due_millis(OffsetDateTime::UNIX_EPOCH - time::Duration::days(1)),
            0
        );
    }
}
