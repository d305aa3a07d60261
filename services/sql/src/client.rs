//! The shared client: [`SqlClient`].

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Executor as _, Row as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use watchtower::backoff::Backoff;
use watchtower::health::Health;
use watchtower::{Error, ErrorKind, Transport};

use crate::acker::{AckJob, ack_writer};
use crate::config::{Backend, SqlConfig};
use crate::dead_letters::SqlDeadLetters;
use crate::error::from_sqlx;
use crate::publisher::{Job, SqlPublisher, writer};
use crate::schema::Sql;
use crate::subscriber::SqlSubscriber;

/// The pool of one of the two databases.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the client's pool, whichever database
/// it is: the statements differ per database (see [`Sql`]), the code that
/// binds and reads them does not.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::client::Db::Pg($pool) => $body,
            $crate::client::Db::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// A connection pool to PostgreSQL or SQLite, shared by the publishers and
/// subscribers made from it: [`publisher`](SqlClient::publisher),
/// [`subscriber`](SqlClient::subscriber), and
/// [`health`](Transport::health) through [`Transport`].
///
/// Cloning it is cheap: clones share the pool, the publishers' batching
/// writer and, on PostgreSQL, the one connection that `LISTEN`s for new
/// events.
///
/// ```no_run
/// use watchtower::Transport;
/// use watchtower_sql::{SqlClient, SqlConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = SqlClient::connect(SqlConfig::new("sqlite://events.db")).await?;
/// assert!(client.health().await.is_up());
/// let publisher = client.publisher();
/// let subscriber = client.subscriber();
/// # drop((publisher, subscriber));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: SqlConfig,
    pub(crate) db: Db,
    pub(crate) sql: Sql,
    /// Bumped whenever events may have arrived: by this client's
    /// publishers and settlements, and by `NOTIFY` on PostgreSQL.
    pub(crate) wake: watch::Sender<()>,
    /// Whether the `LISTEN` connection is up (PostgreSQL).
    listening: watch::Sender<bool>,
    writer: OnceLock<mpsc::Sender<Job>>,
    acks: OnceLock<mpsc::Sender<AckJob>>,
    listener: OnceLock<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
    }
}

impl fmt::Debug for SqlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl SqlClient {
    /// Checks `config`, opens the pool and, unless
    /// [`create_schema`](SqlConfig::create_schema) is off, creates the
    /// tables if they do not exist.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a bad URL, prefix or setting;
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if the database
    /// cannot be reached; [`ErrorKind::Rejected`] if it refuses the
    /// credentials or the DDL. No message holds a password.
    pub async fn connect(config: SqlConfig) -> Result<SqlClient, Error> {
        let backend = config.validate()?;
        let shown = config.redacted_url();
        let db = match backend {
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(&config.url)
                    .map_err(|_| Error::config(format!("invalid PostgreSQL URL {shown:?}")))?;
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(config.connect_timeout)
                    .connect_with(options)
                    .await
                    .map_err(|e| from_sqlx(e, &format!("connecting to {shown}")))?;
                Db::Pg(pool)
            }
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(&config.url)
                    .map_err(|_| Error::config(format!("invalid SQLite URL {shown:?}")))?
                    .create_if_missing(true)
                    // WAL: readers never wait for the writer; FULL: a
                    // committed event survives a power cut, not only a
                    // crash of the process.
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(config.connect_timeout.max(Duration::from_secs(5)));
                let pool = SqlitePoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(config.connect_timeout)
                    .connect_with(options)
                    .await
                    .map_err(|e| from_sqlx(e, &format!("opening {shown}")))?;
                Db::Sqlite(pool)
            }
        };
        let sql = Sql::new(backend, &config.prefix);
        let client = SqlClient {
            inner: Arc::new(Inner {
                config,
                db,
                sql,
                wake: watch::Sender::new(()),
                listening: watch::Sender::new(false),
                writer: OnceLock::new(),
                acks: OnceLock::new(),
                listener: OnceLock::new(),
            }),
        };
        if client.inner.config.create_schema {
            client.create_schema().await?;
        }
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }

    /// The DDL that creates this client's tables (and on PostgreSQL the
    /// trigger that sends `NOTIFY` on insert), for applications that run
    /// their own migrations with [`create_schema`](SqlConfig::create_schema)
    /// off.
    pub fn schema(&self) -> String {
        self.inner.sql.script()
    }

    /// A publisher: concurrent calls from all the client's publishers are
    /// written together in multi-row `INSERT`s. See [`SqlPublisher`].
    pub fn publisher(&self) -> SqlPublisher {
        SqlPublisher::new(self.clone())
    }

    /// A subscriber. See [`SqlSubscriber`].
    pub fn subscriber(&self) -> SqlSubscriber {
        SqlSubscriber::new(self.clone())
    }

    /// The durable dead-letter queue in this client's
    /// `<prefix>dead_letters` table. See [`SqlDeadLetters`].
    pub fn dead_letters(&self) -> SqlDeadLetters {
        SqlDeadLetters::new(self.clone())
    }

    /// The attempts logged by a [`RetryScheduleLayer`](crate::RetryScheduleLayer)
    /// for the event `event_id`, first first.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn attempts(&self, event_id: &str) -> Result<Vec<crate::Attempt>, Error> {
        crate::schedule::attempts(self, event_id).await
    }

    /// Whether this is PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        matches!(self.inner.db, Db::Pg(_))
    }

    /// The pool of a PostgreSQL client, to begin the transactions that
    /// [`SqlPublisher::publish_in`] writes into.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.inner.db {
            Db::Pg(pool) => Some(pool),
            Db::Sqlite(_) => None,
        }
    }

    /// The pool of a SQLite client, to begin the transactions that
    /// [`SqlPublisher::publish_in`] writes into.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.inner.db {
            Db::Sqlite(pool) => Some(pool),
            Db::Pg(_) => None,
        }
    }

    /// Deletes what nobody needs any more, and says how many events it
    /// deleted: events every consumer group has settled (older than the
    /// [retention](SqlConfig::retention)), subscriptions without a group
    /// that have not polled for ten clean-up intervals (their process
    /// died), and their leases. Subscriptions run it every
    /// [`cleanup_interval`](SqlConfig::cleanup_interval).
    ///
    /// A named consumer group holds events until it settles them, however
    /// long that takes; [`delete_group`](SqlClient::delete_group) removes a
    /// group that will never come back.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn cleanup(&self) -> Result<u64, Error> {
        let sql = &self.inner.sql;
        let stale = ms(self.inner.config.cleanup_interval * 10);
        let retention = ms(self.inner.config.retention);
        const CHUNK: i64 = 10_000;
        on_pool!(&self.inner.db, pool => {
            sqlx::query(&sql.forget_stale_groups).bind(stale).execute(pool).await
                .map_err(|e| from_sqlx(e, "forgetting stale subscriptions"))?;
            pool.execute(sql.forget_orphan_leases.as_str()).await
                .map_err(|e| from_sqlx(e, "forgetting orphan leases"))?;
            let lowest = sqlx::query(&sql.lowest_cursor).fetch_optional(pool).await
                .map_err(|e| from_sqlx(e, "reading cursors"))?;
            let Some(lowest) = lowest else { return Ok(0) };
            let (tx, seq): (i64, i64) = (lowest.try_get(0).map_err(|e| from_sqlx(e, "cursor"))?,
                lowest.try_get(1).map_err(|e| from_sqlx(e, "cursor"))?);
            let mut deleted = 0;
            loop {
                let n = sqlx::query(&sql.delete_settled)
                    .bind(tx).bind(seq).bind(retention).bind(CHUNK)
                    .execute(pool).await
                    .map_err(|e| from_sqlx(e, "deleting settled events"))?
                    .rows_affected();
                deleted += n;
                if n < CHUNK as u64 {
                    break;
                }
            }
            Ok(deleted)
        })
    }

    /// Deletes the consumer group `name`, its position and its unsettled
    /// deliveries, so that clean-up no longer keeps events for it. Stop
    /// its subscriptions first: a running member creates it again, at the
    /// start of the table.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn delete_group(&self, name: &str) -> Result<(), Error> {
        delete_group(&self.inner, name).await
    }

    /// Drops this client's tables, trigger and function: everything the
    /// transport stored under its prefix is gone. For tests and for
    /// uninstalling.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn drop_tables(&self) -> Result<(), Error> {
        let sql = &self.inner.sql;
        let prefix = &self.inner.config.prefix;
        let mut statements = vec![
            format!("DROP TABLE IF EXISTS {}", sql.events),
            format!("DROP TABLE IF EXISTS {}", sql.groups),
            format!("DROP TABLE IF EXISTS {prefix}leases"),
            format!("DROP TABLE IF EXISTS {}", sql.dead_letters),
            format!("DROP TABLE IF EXISTS {prefix}attempts"),
        ];
        if sql.backend == Backend::Postgres {
            statements.push(format!("DROP FUNCTION IF EXISTS {prefix}notify() CASCADE"));
        }
        on_pool!(&self.inner.db, pool => {
            for statement in &statements {
                pool.execute(statement.as_str()).await.map_err(|e| from_sqlx(e, "dropping tables"))?;
            }
            Ok(())
        })
    }

    /// Creates the tables, once per database even when many clients
    /// connect at the same time.
    async fn create_schema(&self) -> Result<(), Error> {
        let sql = &self.inner.sql;
        match &self.inner.db {
            Db::Pg(pool) => {
                // Done already: no lock on the events table at every start.
                let present: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_trigger WHERE tgname = $1")
                    .bind(&sql.trigger)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| from_sqlx(e, "reading the schema"))?;
                if present.is_some() {
                    return Ok(());
                }
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(|e| from_sqlx(e, "creating the schema"))?;
                // Concurrent `CREATE ... IF NOT EXISTS` of one name can
                // fail in PostgreSQL: one creator at a time.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(&sql.events)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| from_sqlx(e, "creating the schema"))?;
                for statement in &sql.ddl {
                    (&mut *tx)
                        .execute(statement.as_str())
                        .await
                        .map_err(|e| from_sqlx(e, "creating the schema"))?;
                }
                tx.commit()
                    .await
                    .map_err(|e| from_sqlx(e, "creating the schema"))?;
            }
            Db::Sqlite(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(|e| from_sqlx(e, "creating the schema"))?;
                for statement in &sql.ddl {
                    (&mut *tx)
                        .execute(statement.as_str())
                        .await
                        .map_err(|e| from_sqlx(e, "creating the schema"))?;
                }
                tx.commit()
                    .await
                    .map_err(|e| from_sqlx(e, "creating the schema"))?;
            }
        }
        Ok(())
    }

    /// The queue of the client's batching writer, started on first use.
    pub(crate) fn writer(&self) -> mpsc::Sender<Job> {
        self.inner
            .writer
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel(self.inner.config.publish_queue);
                tokio::spawn(writer(
                    self.inner.db.clone(),
                    self.inner.sql.events.clone(),
                    self.inner.config.publish_batch,
                    self.inner.config.statement_timeout,
                    self.inner.wake.clone(),
                    rx,
                ));
                tx
            })
            .clone()
    }

    /// The queue of the client's acknowledgement writer, started on first
    /// use; it stops with the client.
    pub(crate) fn acks(&self) -> mpsc::Sender<AckJob> {
        self.inner
            .acks
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel(4096);
                tokio::spawn(ack_writer(Arc::downgrade(&self.inner), rx));
                tx
            })
            .clone()
    }

    /// Starts the `LISTEN` task, once, on PostgreSQL, and waits until it
    /// listens, so that a subscription opened after this is woken by every
    /// later insert of any process (not only when it polls next). The wait
    /// is bounded by the statement timeout and 5 s: past it, subscriptions
    /// poll until the task listens.
    pub(crate) async fn listen(&self) {
        let Db::Pg(pool) = &self.inner.db else { return };
        self.inner.listener.get_or_init(|| {
            tokio::spawn(listen(
                pool.clone(),
                self.inner.sql.channel.clone(),
                self.inner.wake.clone(),
                self.inner.listening.clone(),
            ))
        });
        let mut listening = self.inner.listening.subscribe();
        let bound = self.inner.config.statement_timeout.min(Duration::from_secs(5));
        let _ = tokio::time::timeout(bound, listening.wait_for(|&up| up)).await;
    }
}

/// Deletes a group and its leases.
pub(crate) async fn delete_group(inner: &Inner, name: &str) -> Result<(), Error> {
    let sql = &inner.sql;
    on_pool!(&inner.db, pool => {
        sqlx::query(&sql.delete_group_leases).bind(name).execute(pool).await
            .map_err(|e| from_sqlx(e, "deleting a group"))?;
        sqlx::query(&sql.delete_group).bind(name).execute(pool).await
            .map_err(|e| from_sqlx(e, "deleting a group"))?;
        Ok(())
    })
}

/// Wakes the client's subscriptions on every `NOTIFY` of the events
/// table's trigger; after a lost connection too, since notifications sent
/// meanwhile are lost.
async fn listen(pool: PgPool, channel: String, wake: watch::Sender<()>, listening: watch::Sender<bool>) {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failures = 0;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "LISTEN connection failed; polling meanwhile");
                tokio::time::sleep(backoff.delay(failures)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            failures += 1;
            tracing::debug!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::time::sleep(backoff.delay(failures)).await;
            continue;
        }
        listening.send_replace(true);
        wake.send_replace(());
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => {
                    failures = 0;
                    wake.send_replace(());
                }
                // The connection was lost; the next call reconnects.
                Ok(None) => {
                    wake.send_replace(());
                }
                Err(e) => {
                    listening.send_replace(false);
                    failures += 1;
                    tracing::debug!(error = %e, "LISTEN connection lost; polling meanwhile");
                    tokio::time::sleep(backoff.delay(failures)).await;
                    break;
                }
            }
        }
    }
}

/// Milliseconds, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Transport for SqlClient {
    const SYSTEM: &'static str = "sql";

    /// A `SELECT 1` round trip through the pool: [`Up`](watchtower::health::Status::Up)
    /// when the database answers within the
    /// [connect timeout](SqlConfig::connect_timeout), else
    /// [`Down`](watchtower::health::Status::Down) with the error and the
    /// URL without credentials.
    async fn health(&self) -> Health {
        let timeout = self.inner.config.connect_timeout;
        let probe = async { on_pool!(&self.inner.db, pool => pool.execute("SELECT 1").await.map(drop)) };
        let reason = match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(())) => return Health::up(Self::SYSTEM),
            Ok(Err(e)) => from_sqlx(e, "SELECT 1").message().to_owned(),
            Err(_) => Error::new(ErrorKind::Timeout, format!("no answer within {timeout:?}"))
                .message()
                .to_owned(),
        };
        Health::down(
            Self::SYSTEM,
            format!("{reason} ({})", self.inner.config.redacted_url()),
        )
    }
}
