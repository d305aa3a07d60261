//! Delayed delivery: a sorted set of events by due time, moved into their
//! streams by the publishers' own task.
//!
//! An event with a future [`deliverat`](watchtower::ext::DELIVER_AT) is
//! written with `ZADD` to the sorted set `<prefix>#delayed` (no topic holds
//! `#`, so it never clashes with a stream), scored by its due time in
//! Unix milliseconds, rounded up. The member is the stream key, a newline
//! (no key holds one), and the event as structured CloudEvents JSON
//! without the `deliverat` mark. A task per publisher (and its clones)
//! runs one script that takes the members due by the server's clock,
//! `XADD`s each to its stream and removes it, atomically, so that many
//! publishers in many processes move each event once. One task per
//! process and set does it, started by the first delayed event, and runs
//! while a publisher of the prefix lives or events are left; it sleeps
//! until the next due time, at most a second (to see events other
//! processes scheduled), and wakes at once for its own.
//!
//! Delayed events are stored structured whatever the publisher's content
//! mode, and without `MAXLEN` trimming; they wait while no process with a
//! publisher of this prefix runs. The script names streams it was not given as keys, so
//! it needs a single Redis server, not a cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::conn::Conn;
use time::OffsetDateTime;
use tokio::sync::Notify;
use watchtower::codec::{CLOUDEVENTS_JSON, structured};
use watchtower::{Error, Event, ext};

use crate::error::from_redis;
use crate::wire::{CONTENT_TYPE_FIELD, DATA_FIELD};

/// Events moved per script run: bounds the time Redis spends in one.
const BATCH: usize = 100;

/// The longest the mover sleeps, so that it sees within a second what
/// other processes scheduled.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Moves the due members into their streams; answers how many it moved
/// and the milliseconds until the next is due (-1 if none is left).
const MOVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local nl = string.find(m, '\n', 1, true)
  if nl then
    redis.call('XADD', string.sub(m, 1, nl - 1), '*', ARGV[2], ARGV[3], ARGV[4], string.sub(m, nl + 1))
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, math.max(0, tonumber(nxt[2]) - now)} end
return {#due, -1}
";

/// The sorted set of a prefix.
pub(super) fn set_key(prefix: &str) -> String {
    format!("{prefix}#delayed")
}

/// The movers of this process, one per sorted set, with the publishers
/// that use each.
static MOVERS: std::sync::OnceLock<Mutex<HashMap<Arc<str>, Mover>>> = std::sync::OnceLock::new();

struct Mover {
    /// Publishers (and their clones) alive that write to this set.
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
/// alive in this process or events are left in the set, so that an event
/// scheduled through a publisher dropped at once is still moved.
pub(super) struct Delays {
    key: Arc<str>,
}

impl Drop for Delays {
    fn drop(&mut self) {
        if let Some(mover) = movers().get_mut(&self.key) {
            mover.publishers = mover.publishers.saturating_sub(1);
            mover.wake.notify_one();
        }
    }
}

impl Delays {
    pub(super) fn new(prefix: &str) -> Delays {
        let key: Arc<str> = set_key(prefix).into();
        movers()
            .entry(key.clone())
            .or_insert_with(|| Mover {
                publishers: 0,
                running: false,
                wake: Arc::new(Notify::new()),
            })
            .publishers += 1;
        Delays { key }
    }

    /// Schedules `event` (whose due time is `at`) for the stream
    /// `stream`, and makes sure the mover runs.
    pub(super) async fn schedule(
        &self,
        conn: Conn,
        runtime: &tokio::runtime::Handle,
        stream: &str,
        mut event: Event,
        at: OffsetDateTime,
    ) -> Result<(), Error> {
        event.remove_extension(ext::DELIVER_AT);
        let json = structured::to_bytes(&event)?;
        let mut member = Vec::with_capacity(stream.len() + 1 + json.len());
        member.extend_from_slice(stream.as_bytes());
        member.push(b'\n');
        member.extend_from_slice(&json);
        let score = due_millis(at);
        let mut added = conn.clone();
        redis::cmd("ZADD")
            .arg(&*self.key)
            .arg(score)
            .arg(member)
            .query_async::<i64>(&mut added)
            .await
            .map_err(|e| from_redis(e, "ZADD of a delayed event"))?;
        let wake = {
            let mut movers = movers();
            let mover = movers.entry(self.key.clone()).or_insert_with(|| Mover {
                publishers: 1,
                running: false,
                wake: Arc::new(Notify::new()),
            });
            if !mover.running {
                mover.running = true;
                runtime.spawn(move_due(conn, self.key.clone(), mover.wake.clone()));
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

async fn move_due(mut conn: Conn, key: Arc<str>, wake: Arc<Notify>) {
    loop {
        let wait = match run(&mut conn, &key).await {
            Ok((moved, _)) if moved >= BATCH as i64 => Duration::ZERO,
            Ok((_, next)) if next >= 0 => {
                Duration::from_millis(u64::try_from(next).unwrap_or(0)).min(MAX_SLEEP)
            }
            Ok(_) => {
                // Nothing left: stop, unless a publisher may add more.
                let mut movers = movers();
                if let Some(mover) = movers.get_mut(&key)
                    && mover.publishers == 0
                {
                    movers.remove(&key);
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

async fn run(conn: &mut Conn, key: &str) -> Result<(i64, i64), Error> {
    let answer: Vec<i64> = redis::cmd("EVAL")
        .arg(MOVE)
        .arg(1)
        .arg(key)
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
