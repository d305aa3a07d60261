//! [`PostgresStore`]: marks as rows of one table, claimed with one
//! `INSERT ... ON CONFLICT`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use sqlx::postgres::{PgPool, PgPoolOptions};
use watchtower::{Error, ErrorKind, redact_url};

use super::store::{Begin, Claim, IdempotencyStore};

/// A shared [`IdempotencyStore`] on PostgreSQL (feature `postgres`): one
/// row per key in a table of the application's database, so consumers in
/// many processes recognise each other's duplicates, and a handler that
/// writes to the same database can record the key in its own transaction
/// ([`record_in`](PostgresStore::record_in)) for exactly-once effects.
///
/// The table, `watchtower_idempotency` by default:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS watchtower_idempotency (
///     key        TEXT PRIMARY KEY,
///     token      TEXT,                 -- the holder of an in-progress mark
///     done       BOOLEAN NOT NULL,
///     expires_at TIMESTAMPTZ NOT NULL  -- lease end, or end of the keep time
/// );
/// ```
///
/// * [`begin`](IdempotencyStore::begin) is one
///   `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE expires_at < now`:
///   PostgreSQL serialises concurrent inserts of one key, so of two
///   callers exactly one claims it, and a mark whose time has passed
///   (a crashed holder's lease, an old done mark) is taken over in the
///   same statement;
/// * [`complete`](IdempotencyStore::complete) sets `done` and the new
///   expiry; [`release`](IdempotencyStore::release) deletes the row if
///   the holder's token still holds it and it is not done.
///
/// Times are the database's clock (`clock_timestamp()`), so consumers on
/// machines whose clocks differ agree on when a lease ends. Rows past
/// their expiry are taken over by the next claim of their key and deleted
/// by [`purge`](PostgresStore::purge).
///
/// # Example
///
/// ```no_run
/// use watchtower_toolkit::idempotent::{IdempotentLayer, PostgresStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let store = PostgresStore::connect("postgres://postgres@127.0.0.1/app")
///     .await?
///     .table("billing_seen")?;
/// store.create_table().await?;
/// let layer = IdempotentLayer::new(store);
/// # drop(layer);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
}

/// The statements of one table, written once.
#[derive(Debug)]
struct Statements {
    table: String,
    begin: String,
    state: String,
    complete: String,
    release: String,
    record: String,
}

impl Statements {
    fn new(table: &str) -> Statements {
        Statements {
            table: table.to_owned(),
            begin: format!(
                "INSERT INTO {table} AS t (key, token, done, expires_at) \
                 VALUES ($1, $2, FALSE, clock_timestamp() + $3 * INTERVAL '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = EXCLUDED.token, done = FALSE, expires_at = EXCLUDED.expires_at \
                 WHERE t.expires_at < clock_timestamp() \
                 RETURNING TRUE"
            ),
            state: format!("SELECT done FROM {table} WHERE key = $1 AND expires_at >= clock_timestamp()"),
            // An upsert: a mark purged meanwhile is written again.
            complete: format!(
                "INSERT INTO {table} (key, token, done, expires_at) \
                 VALUES ($1, NULL, TRUE, clock_timestamp() + $2 * INTERVAL '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = NULL, done = TRUE, expires_at = EXCLUDED.expires_at"
            ),
            release: format!("DELETE FROM {table} WHERE key = $1 AND token = $2 AND NOT done"),
            record: format!(
                "INSERT INTO {table} AS t (key, token, done, expires_at) \
                 VALUES ($1, NULL, TRUE, clock_timestamp() + $2 * INTERVAL '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = NULL, done = TRUE, expires_at = EXCLUDED.expires_at \
                 WHERE NOT t.done OR t.expires_at < clock_timestamp() \
                 RETURNING TRUE"
            ),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

/// What [`PostgresStore::record_in`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The key is recorded as done in the caller's transaction: do the
    /// work in the same transaction and commit.
    New,
    /// The key was done already (committed by another transaction): the
    /// work was done, skip it.
    Duplicate,
}

impl PostgresStore {
    /// A store on an existing pool, with the table `watchtower_idempotency`.
    pub fn new(pool: PgPool) -> PostgresStore {
        PostgresStore {
            pool,
            sql: Arc::new(Statements::new("watchtower_idempotency")),
        }
    }

    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`)
    /// with a pool of up to 8 connections (enough for a consumer's
    /// concurrency: each claim holds one for one statement) that waits at
    /// most 5 s for a connection, so that a database that cannot be
    /// reached fails the event (it is nacked and comes back) rather than
    /// holding it. For other settings make the pool yourself and use
    /// [`new`](PostgresStore::new).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a URL that does not parse,
    /// [`ErrorKind::Connection`] if the database cannot be reached; the
    /// URL's password never appears in the error.
    pub async fn connect(url: &str) -> Result<PostgresStore, Error> {
        let options: sqlx::postgres::PgConnectOptions = url
            .parse()
            // The parser's message may quote the URL: leave it out.
            .map_err(|_| Error::config(format!("invalid PostgreSQL URL {}", redact_url(url))))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| {
                let e = failed(e);
                Error::new(
                    e.kind(),
                    format!(
                        "cannot connect to PostgreSQL at {}: {}",
                        redact_url(url),
                        e.message()
                    ),
                )
                .with_retryable(e.is_retryable())
            })?;
        Ok(PostgresStore::new(pool))
    }

    /// The table of the marks. Default `watchtower_idempotency`; give
    /// each consumer group its own, so that two groups that both must
    /// handle an event do not skip it for each other.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] unless `table` is a plain identifier
    /// (letters, digits, `_`, at most 63 bytes, not starting with a digit),
    /// optionally qualified by a schema (`billing.seen`).
    pub fn table(mut self, table: &str) -> Result<PostgresStore, Error> {
        let plain = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && !part.starts_with(|c: char| c.is_ascii_digit())
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return Err(Error::config(format!(
                "idempotency table `{table}` is not a plain SQL identifier"
            )));
        }
        self.sql = Arc::new(Statements::new(table));
        Ok(self)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The `CREATE TABLE IF NOT EXISTS` of the table, for the
    /// application's migrations.
    pub fn schema(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, token TEXT, \
             done BOOLEAN NOT NULL, expires_at TIMESTAMPTZ NOT NULL)",
            self.sql.table
        )
    }

    /// Creates the table unless it exists.
    ///
    /// # Errors
    ///
    /// The database's error.
    pub async fn create_table(&self) -> Result<(), Error> {
        self.execute(&self.schema()).await
    }

    /// Drops the table.
    ///
    /// # Errors
    ///
    /// The database's error.
    pub async fn drop_table(&self) -> Result<(), Error> {
        self.execute(&format!("DROP TABLE IF EXISTS {}", self.sql.table))
            .await
    }

    /// Deletes the rows whose time has passed; returns how many. Run it
    /// now and then (a claim takes over an expired row of its own key, so
    /// correctness does not depend on it).
    ///
    /// # Errors
    ///
    /// The database's error.
    pub async fn purge(&self) -> Result<u64, Error> {
        let sql = format!(
            "DELETE FROM {} WHERE expires_at < clock_timestamp()",
            self.sql.table
        );
        sqlx::query(&sql)
            .execute(&self.pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(failed)
    }

    async fn execute(&self, sql: &str) -> Result<(), Error> {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(failed)
    }

    /// Records `key` as done in the caller's own transaction (`&mut *tx`),
    /// remembered for `keep` after it commits: the handler's writes and
    /// the mark commit together or not at all, so its effects happen
    /// exactly once even if the process dies between the commit and the
    /// ack (the redelivery finds the key done).
    ///
    /// Two transactions recording one key at once: the second waits for
    /// the first to end, and gets [`Recorded::Duplicate`] if it committed,
    /// [`Recorded::New`] if it rolled back. An in-progress mark (the
    /// [`IdempotentLayer`](super::IdempotentLayer)'s claim) becomes done,
    /// so the store may be used with the layer (which then skips
    /// duplicates before they open a transaction) or without it.
    ///
    /// ```no_run
    /// use watchtower::Event;
    /// use watchtower_toolkit::idempotent::{PostgresStore, Recorded, default_key};
    ///
    /// # async fn handle(store: &PostgresStore, event: Event) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = store.pool().begin().await?;
    /// let keep = std::time::Duration::from_secs(24 * 3600);
    /// if store.record_in(&mut tx, &default_key(&event), keep).await? == Recorded::Duplicate {
    ///     return Ok(()); // done before: the transaction rolls back on drop
    /// }
    /// sqlx::query("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// The database's error (the transaction is then aborted, as after
    /// any failed statement).
    pub async fn record_in(
        &self,
        conn: &mut PgConnection,
        key: &str,
        keep: Duration,
    ) -> Result<Recorded, Error> {
        let row: Option<bool> = sqlx::query_scalar(&self.sql.record)
            .bind(key)
            .bind(millis(keep))
            .fetch_optional(conn)
            .await
            .map_err(failed)?;
        Ok(match row {
            Some(_) => Recorded::New,
            None => Recorded::Duplicate,
        })
    }
}

/// `d` in milliseconds for an interval, saturating at about 292 million
/// years (PostgreSQL's interval range is far wider than any keep time).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 1000).max(1)
}

/// A `sqlx` error as the kind a consumer can judge: a store that cannot be
/// reached, is busy or lost a race is worth a redelivery (the event is
/// nacked and comes back); a statement the database refuses is not.
fn failed(e: sqlx::Error) -> Error {
    // SQLSTATE classes: 08 connection exception, 40 transaction rollback
    // (serialization failure, deadlock), 53 insufficient resources, 57
    // operator intervention (shutdown).
    let transient = |code: &str| {
        ["08", "40", "53", "57"]
            .iter()
            .any(|class| code.starts_with(class))
    };
    let (kind, retryable) = match &e {
        sqlx::Error::Database(db) if db.code().is_some_and(|code| transient(&code)) => {
            (ErrorKind::Throttled, true)
        }
        sqlx::Error::Database(_) => (ErrorKind::Rejected, false),
        sqlx::Error::Configuration(_) => (ErrorKind::Config, false),
        sqlx::Error::PoolTimedOut => (ErrorKind::Timeout, true),
        sqlx::Error::PoolClosed => (ErrorKind::Closed, false),
        // I/O, TLS, protocol: the connection.
        _ => (ErrorKind::Connection, true),
    };
    // `sqlx` messages name no password.
    Error::new(kind, format!("idempotency store: {e}")).with_retryable(retryable)
}

impl IdempotencyStore for PostgresStore {
    fn begin(&self, key: &str, lease: Duration) -> impl Future<Output = Result<Begin, Error>> + Send {
        let claim = Claim::new(key);
        let this = self.clone();
        async move {
            let claimed: Option<bool> = sqlx::query_scalar(&this.sql.begin)
                .bind(claim.key())
                .bind(claim.token())
                .bind(millis(lease))
                .fetch_optional(&this.pool)
                .await
                .map_err(failed)?;
            if claimed.is_some() {
                return Ok(Begin::Claimed(claim));
            }
            let done: Option<bool> = sqlx::query_scalar(&this.sql.state)
                .bind(claim.key())
                .fetch_optional(&this.pool)
                .await
                .map_err(failed)?;
            // A mark that went away or expired between the two statements
            // is "in progress": the event comes back and claims it then.
            Ok(if done == Some(true) {
                Begin::Done
            } else {
                Begin::InProgress
            })
        }
    }

    fn complete(&self, claim: &Claim, keep: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        let key = claim.key().to_owned();
        let this = self.clone();
        async move {
            sqlx::query(&this.sql.complete)
                .bind(key)
                .bind(millis(keep))
                .execute(&this.pool)
                .await
                .map(drop)
                .map_err(failed)
        }
    }

    fn release(&self, claim: &Claim) -> impl Future<Output = Result<(), Error>> + Send {
        let claim = claim.clone();
        let this = self.clone();
        async move {
            sqlx::query(&this.sql.release)
                .bind(claim.key())
                .bind(claim.token())
                .execute(&this.pool)
                .await
                .map(drop)
                .map_err(failed)
        }
    }
}
