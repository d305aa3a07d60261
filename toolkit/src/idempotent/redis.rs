//! [`RedisStore`]: marks as Redis keys, claimed with one atomic script.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use watchtower::{Error, ErrorKind, redact_url};

use super::store::{Begin, Claim, IdempotencyStore};

/// Claims a key unless it holds a live mark; one round trip. `SET NX PX`
/// alone cannot tell "done" from "in progress" in the same call, so the
/// check and the set are one script.
const BEGIN: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'claimed'
end
if v == 'done' then return 'done' end
return 'busy'
";

/// Deletes the mark only if this holder still has it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A shared [`IdempotencyStore`] on Redis (feature `redis`): one key per
/// mark under a prefix, holding the owner token while in progress and
/// `done` afterwards, each with a `PX` expiry, so consumers in many
/// processes recognise each other's duplicates and a crashed consumer's
/// marks expire on their own.
///
/// ```no_run
/// use watchtower_toolkit::idempotent::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?.prefix("billing:seen:");
/// # drop(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on an existing connection (it reconnects on its own).
    pub fn new(conn: ConnectionManager) -> RedisStore {
        RedisStore {
            conn,
            prefix: Arc::from("watchtower:idempotent:"),
        }
    }

    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`).
    ///
    /// The connection answers within 5 s or fails, and while Redis is
    /// unreachable a call fails after two quick reconnect attempts rather
    /// than holding the handler: the event is nacked and comes back. For
    /// other settings, make the `ConnectionManager` yourself and use
    /// [`new`](RedisStore::new).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a URL that does not parse,
    /// [`ErrorKind::Connection`] if Redis cannot be reached; the URL's
    /// credentials never appear in the error.
    pub async fn connect(url: &str) -> Result<RedisStore, Error> {
        let client = redis::Client::open(url)
            // The parser's message may quote the URL: leave it out.
            .map_err(|_| Error::config(format!("invalid Redis URL {}", redact_url(url))))?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    // The client's messages never hold the password.
                    format!("cannot connect to Redis at {}: {e}", redact_url(url)),
                )
            })?;
        Ok(RedisStore::new(conn))
    }

    /// The key prefix of the marks. Default `watchtower:idempotent:`;
    /// give each consumer group its own, so that two groups that both must
    /// handle an event do not skip it for each other.
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> RedisStore {
        self.prefix = prefix.into();
        self
    }

    fn key(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.prefix.len() + key.len());
        full.push_str(&self.prefix);
        full.push_str(key);
        full
    }
}

fn millis(d: Duration) -> u64 {
    // Redis refuses a zero expiry and one that overflows its clock; a
    // `Duration::MAX` becomes the longest it takes.
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64 / 2)
}

fn failed(e: redis::RedisError) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        ErrorKind::Connection
    } else {
        ErrorKind::Rejected
    };
    Error::new(kind, format!("idempotency store: {e}"))
}

impl IdempotencyStore for RedisStore {
    fn begin(&self, key: &str, lease: Duration) -> impl Future<Output = Result<Begin, Error>> + Send {
        let claim = Claim::new(key);
        let full = self.key(key);
        let mut conn = self.conn.clone();
        async move {
            let answer: String = redis::cmd("EVAL")
                .arg(BEGIN)
                .arg(1)
                .arg(&full)
                .arg(claim.token())
                .arg(millis(lease))
                .query_async(&mut conn)
                .await
                .map_err(failed)?;
            match answer.as_str() {
                "claimed" => Ok(Begin::Claimed(claim)),
                "done" => Ok(Begin::Done),
                _ => Ok(Begin::InProgress),
            }
        }
    }

    fn complete(&self, claim: &Claim, keep: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        let full = self.key(claim.key());
        let mut conn = self.conn.clone();
        async move {
            redis::cmd("SET")
                .arg(&full)
                .arg("done")
                .arg("PX")
                .arg(millis(keep))
                .query_async::<()>(&mut conn)
                .await
                .map_err(failed)
        }
    }

    fn release(&self, claim: &Claim) -> impl Future<Output = Result<(), Error>> + Send {
        let full = self.key(claim.key());
        let token = claim.token().to_owned();
        let mut conn = self.conn.clone();
        async move {
            redis::cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(&full)
                .arg(token)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(failed)
        }
    }
}
