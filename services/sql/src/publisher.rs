//! The publisher: [`SqlPublisher`], its batching writer, and publishing
//! inside the caller's transaction.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use sqlx::{Postgres, QueryBuilder, Row as _, Sqlite};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::PollSender;
use tower_service::Service;
use tracing::Instrument as _;
use watchtower::batch::{BatchFuture, BatchReceipts};
use watchtower::codec::structured;
use watchtower::reply::{Filled, Replier, Reply, reply};
use watchtower::trace::PublishTrace;
use watchtower::{Error, Event, Receipt, Transport, validate_topic};

use crate::client::{Db, SqlClient};
use crate::config::Backend;
use crate::error::{from_sqlx, timed};

/// One row of the events table, encoded.
pub(crate) struct Row {
    topic: Arc<str>,
    id: Arc<str>,
    body: Bytes,
}

impl Row {
    fn of(event: &Event, body: Bytes) -> Row {
        Row {
            topic: event.shared_topic(),
            id: Arc::from(event.id()),
            body,
        }
    }
}

/// One publish call waiting for its `INSERT`.
pub(crate) struct Job {
    row: Row,
    reply: Replier<Result<i64, Error>>,
}

impl AsRef<Row> for Job {
    fn as_ref(&self) -> &Row {
        &self.row
    }
}

impl AsRef<Row> for Row {
    fn as_ref(&self) -> &Row {
        self
    }
}

/// Publishes into the events table. Cheap to clone; clones share the
/// client's writer.
///
/// # Batching
///
/// Calls go into a queue of the client (its length is
/// [`publish_queue`](crate::SqlConfig::publish_queue)); one writer task
/// takes everything queued, up to
/// [`publish_batch`](crate::SqlConfig::publish_batch) calls, and writes it
/// with one multi-row `INSERT`, then answers each caller with its own
/// receipt, or every caller of the batch with the batch's error. A single
/// caller pays one round trip; many concurrent callers share one. A call
/// whose caller stopped waiting before its batch was written is not
/// written.
///
/// `poll_ready` is ready while the queue has room. The receipt's
/// `sequence` is the event's sequence number in the table and its `stream`
/// the table's name.
///
/// # Transactions
///
/// [`publish_in`](SqlPublisher::publish_in) writes an event with the
/// caller's own connection or transaction instead, so that it commits or
/// rolls back with the caller's other writes: the transactional outbox.
#[derive(Clone)]
pub struct SqlPublisher {
    client: SqlClient,
    queue: PollSender<Job>,
}

impl fmt::Debug for SqlPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlPublisher")
            .field("table", &self.client.inner.sql.events)
            .finish_non_exhaustive()
    }
}

/// What [`SqlPublisher::publish_in`] writes with: a `sqlx` transaction
/// or connection of PostgreSQL or SQLite (`&mut tx`, `&mut *tx`, a pooled
/// connection). Sealed.
pub trait OutboxConnection: Send + sealed::Sealed {
    /// Which database it is.
    #[doc(hidden)]
    const BACKEND: Backend;

    /// Inserts one row with `sql`, returning its sequence number.
    #[doc(hidden)]
    fn insert<'a>(&'a mut self, sql: &'a str, row: (&'a str, &'a str, &'a [u8])) -> Insert<'a>;
}

/// The future of [`OutboxConnection::insert`]: boxed, so that a caller's
/// future that awaits `publish_in` stays `Send` (as axum handlers and
/// `tokio::spawn` need), which the generic futures of `sqlx` do not
/// always let the compiler prove.
#[doc(hidden)]
pub type Insert<'a> = Pin<Box<dyn Future<Output = Result<i64, sqlx::Error>> + Send + 'a>>;

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgConnection {}
    impl Sealed for sqlx::SqliteConnection {}
    impl Sealed for sqlx::Transaction<'_, sqlx::Postgres> {}
    impl Sealed for sqlx::Transaction<'_, sqlx::Sqlite> {}
    impl Sealed for sqlx::pool::PoolConnection<sqlx::Postgres> {}
    impl Sealed for sqlx::pool::PoolConnection<sqlx::Sqlite> {}
}

macro_rules! outbox_connection {
    ($backend:expr, $($ty:ty => |$this:ident| $conn:expr;)+) => {$(
        impl OutboxConnection for $ty {
            const BACKEND: Backend = $backend;

            fn insert<'a>(&'a mut self, sql: &'a str, (topic, id, body): (&'a str, &'a str, &'a [u8])) -> Insert<'a> {
                let $this = self;
                Box::pin(sqlx::query_scalar(sql).bind(topic).bind(id).bind(body).fetch_one($conn))
            }
        }
    )+};
}

outbox_connection! {
    Backend::Postgres,
    sqlx::PgConnection => |this| this;
    sqlx::Transaction<'_, Postgres> => |this| &mut **this;
    sqlx::pool::PoolConnection<Postgres> => |this| &mut **this;
}

outbox_connection! {
    Backend::Sqlite,
    sqlx::SqliteConnection => |this| this;
    sqlx::Transaction<'_, Sqlite> => |this| &mut **this;
    sqlx::pool::PoolConnection<Sqlite> => |this| &mut **this;
}

impl SqlPublisher {
    pub(crate) fn new(client: SqlClient) -> SqlPublisher {
        let queue = PollSender::new(client.writer());
        SqlPublisher { client, queue }
    }

    /// Writes `event` with `conn`: the caller's transaction (`&mut tx`) or
    /// a connection of the client's database (`&mut *tx`, a pooled one). In a transaction,
    /// the event commits with the caller's other writes or not at all,
    /// and subscriptions see it only once it has committed.
    ///
    /// ```no_run
    /// use watchtower::Event;
    /// use watchtower_sql::{SqlClient, SqlConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = SqlClient::connect(SqlConfig::new("postgres://postgres@127.0.0.1/test")).await?;
    /// let publisher = client.publisher();
    /// let pool = client.pg_pool().expect("a PostgreSQL client");
    ///
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1").execute(&mut *tx).await?;
    /// publisher.publish_in(&mut tx, Event::new("account.debited", serde_json::json!({"id": 1}))).await?;
    /// tx.commit().await?; // the update and the event, or neither
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidEvent`](watchtower::ErrorKind::InvalidEvent) or
    /// [`ErrorKind::InvalidTopic`](watchtower::ErrorKind::InvalidTopic) for
    /// an event that cannot be published; [`ErrorKind::Config`](watchtower::ErrorKind::Config)
    /// if `conn` is not of the client's database; the database's error, by
    /// its kind, if the `INSERT` fails (the transaction is then aborted,
    /// as after any failed statement, on PostgreSQL).
    pub async fn publish_in<C: OutboxConnection>(
        &self,
        conn: &mut C,
        mut event: Event,
    ) -> Result<Receipt, Error> {
        let trace = PublishTrace::start(SqlClient::SYSTEM, &event.shared_topic(), &mut event);
        let span = trace.span().clone();
        let result = self.insert_in(conn, event).instrument(span).await;
        trace.finish(&result);
        result
    }

    async fn insert_in<C: OutboxConnection>(&self, conn: &mut C, event: Event) -> Result<Receipt, Error> {
        let backend = self.client.inner.sql.backend;
        if C::BACKEND != backend {
            return Err(Error::config(format!(
                "publish_in got a {:?} connection for a {backend:?} client",
                C::BACKEND
            )));
        }
        let body = encode(&event)?;
        let seq = conn
            .insert(
                &self.client.inner.sql.insert_one,
                (event.topic(), event.id(), &body),
            )
            .await
            .map_err(|e| from_sqlx(e, "inserting an event").with_event(event.clone()))?;
        // Subscriptions of this client look at once; others when they are
        // notified (PostgreSQL, at commit) or poll.
        self.client.inner.wake.send_replace(());
        Ok(self.receipt(&event, seq))
    }

    fn receipt(&self, event: &Event, seq: i64) -> Receipt {
        Receipt::for_event(event)
            .with_stream(self.client.inner.sql.events.as_str())
            .with_sequence(u64::try_from(seq).unwrap_or_default())
    }
}

/// Checks an event and encodes it as the structured CloudEvents JSON
/// stored in the `body` column.
fn encode(event: &Event) -> Result<Bytes, Error> {
    event
        .validate()
        .and_then(|()| validate_topic(event.topic()))
        .and_then(|()| structured::to_bytes(event))
        .map_err(|e| e.with_event(event.clone()))
}

impl Service<Event> for SqlPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.queue
            .poll_reserve(cx)
            .map_err(|_| Error::closed("the SQL publisher's writer has stopped"))
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        let trace = PublishTrace::start(SqlClient::SYSTEM, &event.shared_topic(), &mut event);
        let body = match encode(&event) {
            Ok(body) => body,
            Err(e) => {
                self.queue.abort_send();
                return ResponseFuture::failed(e, trace);
            }
        };
        let (replier, reply) = reply();
        let job = Job {
            row: Row::of(&event, body),
            reply: replier,
        };
        if self.queue.send_item(job).is_err() {
            return ResponseFuture::failed(
                Error::closed("the SQL publisher's queue is closed, or call came without poll_ready")
                    .with_event(event),
                trace,
            );
        }
        ResponseFuture {
            state: State::Waiting {
                reply,
                event: Some(event),
                table: self.client.inner.sql.events.clone().into(),
            },
            trace: Some(trace),
        }
    }
}

/// Publishes batches of events into the events table, each batch as **one
/// multi-row `INSERT`** (in chunks of
/// [`publish_batch`](crate::SqlConfig::publish_batch) rows, one statement
/// and commit each), answering each event with its own receipt or error,
/// in the batch's order (see [`watchtower::batch`]). Made by
/// [`SqlPublisher::batched`]; writes with the client's pool, outside the
/// publisher's queue.
///
/// * An event that cannot be stored (invalid, a bad topic) is answered
///   with its error and left out of the `INSERT`; the others go.
/// * A statement that fails fails its chunk: every event of it is
///   answered with the database's error, with its event attached, and
///   none of them is stored.
///
/// The rows of a chunk take sequence numbers in the batch's order, so
/// subscriptions receive a batch in order. `poll_ready` is always ready
/// (the pool waits for a connection, within the
/// [statement timeout](crate::SqlConfig::statement_timeout)).
///
/// ```no_run
/// use watchtower::{Event, PublishBatchExt};
/// use watchtower_sql::{SqlClient, SqlConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = SqlClient::connect(SqlConfig::new("postgres://postgres@127.0.0.1/test")).await?;
/// let mut batches = client.publisher().batched();
/// let events = (0..100).map(|n| Event::new("order.paid", serde_json::json!({"n": n}))).collect();
/// for answer in batches.publish_batch(events).await? {
///     answer?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlBatchPublisher {
    client: SqlClient,
}

impl fmt::Debug for SqlBatchPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlBatchPublisher")
            .field("table", &self.client.inner.sql.events)
            .finish_non_exhaustive()
    }
}

impl SqlPublisher {
    /// A batch publisher on this publisher's client: see
    /// [`SqlBatchPublisher`].
    pub fn batched(&self) -> SqlBatchPublisher {
        SqlBatchPublisher {
            client: self.client.clone(),
        }
    }
}

impl Service<Vec<Event>> for SqlBatchPublisher {
    type Response = BatchReceipts;
    type Error = Error;
    type Future = BatchFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, events: Vec<Event>) -> BatchFuture {
        let client = self.client.clone();
        Box::pin(async move {
            let inner = &client.inner;
            let table: Arc<str> = inner.sql.events.as_str().into();
            let mut answers = Vec::with_capacity(events.len());
            let mut rows = Vec::new();
            // The events of the rows, by their place in `answers`.
            let mut waiting = Vec::new();
            for mut event in events {
                let trace = PublishTrace::start(SqlClient::SYSTEM, &event.shared_topic(), &mut event);
                match encode(&event) {
                    Ok(body) => {
                        rows.push(Row::of(&event, body));
                        waiting.push((answers.len(), trace, event));
                        answers.push(Err(not_returned()));
                    }
                    Err(e) => {
                        let e = Err(e);
                        trace.finish(&e);
                        answers.push(e);
                    }
                }
            }
            let chunk = inner.config.publish_batch.max(1);
            let mut waiting = waiting.into_iter();
            for rows in rows.chunks(chunk) {
                let written = timed(
                    inner.config.statement_timeout,
                    "inserting events",
                    insert(&inner.db, &inner.sql.events, rows),
                )
                .await;
                for (n, (place, trace, event)) in waiting.by_ref().take(rows.len()).enumerate() {
                    let answer = match &written {
                        Ok(seqs) => match seqs.get(n).copied().flatten() {
                            Some(seq) => Ok(Receipt::for_event(&event)
                                .with_stream(table.clone())
                                .with_sequence(u64::try_from(seq).unwrap_or_default())),
                            None => Err(not_returned().with_event(event)),
                        },
                        Err(e) => Err(Error::new(e.kind(), e.message())
                            .with_retryable(e.is_retryable())
                            .with_event(event)),
                    };
                    trace.finish(&answer);
                    answers[place] = answer;
                }
            }
            inner.wake.send_replace(());
            Ok(answers)
        })
    }
}

enum State {
    Failed(Option<Error>),
    Waiting {
        reply: Reply<Result<i64, Error>>,
        event: Option<Event>,
        table: Arc<str>,
    },
}

/// The future of [`SqlPublisher::call`]: waits for the batch that holds
/// the event to be written.
///
/// # Cancel safety
///
/// Dropped before its batch is written, the event is not written; dropped
/// later, it is written all the same.
pub struct ResponseFuture {
    state: State,
    trace: Option<PublishTrace>,
}

impl ResponseFuture {
    fn failed(error: Error, trace: PublishTrace) -> ResponseFuture {
        ResponseFuture {
            state: State::Failed(Some(error)),
            trace: Some(trace),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = {
            let _entered = this.trace.as_ref().map(|t| t.span().enter());
            ready!(poll_state(&mut this.state, cx))
        };
        if let Some(trace) = this.trace.take() {
            trace.finish(&result);
        }
        Poll::Ready(result)
    }
}

fn poll_state(state: &mut State, cx: &mut Context<'_>) -> Poll<Result<Receipt, Error>> {
    let finished = || Error::closed("the publish future was polled after it finished");
    match state {
        State::Failed(error) => Poll::Ready(Err(error.take().unwrap_or_else(finished))),
        State::Waiting { reply, event, table } => {
            let answer = ready!(reply.poll_reply(cx));
            let Some(event) = event.take() else {
                return Poll::Ready(Err(finished()));
            };
            Poll::Ready(match answer {
                Some(Ok(seq)) => Ok(Receipt::for_event(&event)
                    .with_stream(table.clone())
                    .with_sequence(u64::try_from(seq).unwrap_or_default())),
                Some(Err(e)) => Err(e.with_event(event)),
                None => Err(Error::closed("the SQL publisher's writer has stopped").with_event(event)),
            })
        }
    }
}

/// The client's writer: takes what is queued, writes it in one `INSERT`,
/// answers every caller, wakes the subscriptions.
pub(crate) async fn writer(
    db: Db,
    table: String,
    max: usize,
    limit: std::time::Duration,
    wake: watch::Sender<()>,
    mut queue: mpsc::Receiver<Job>,
) {
    let mut jobs = Vec::with_capacity(max);
    let mut filled: Vec<Filled<Result<i64, Error>>> = Vec::with_capacity(max);
    while queue.recv_many(&mut jobs, max).await > 0 {
        jobs.retain(|job| !job.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        match timed(limit, "inserting events", insert(&db, &table, &jobs)).await {
            Ok(seqs) => {
                filled.extend(
                    jobs.drain(..)
                        .zip(seqs)
                        .map(|(job, seq)| job.reply.fill(seq.ok_or_else(not_returned))),
                );
            }
            Err(e) => {
                filled.extend(jobs.drain(..).map(|job| {
                    job.reply.fill(Err(
                        Error::new(e.kind(), e.message()).with_retryable(e.is_retryable())
                    ))
                }));
            }
        }
        wake.send_replace(());
        // Every caller of the batch is woken after the last answer is in.
        filled.clear();
    }
}

fn not_returned() -> Error {
    Error::new(
        watchtower::ErrorKind::Other,
        "the INSERT did not return the event",
    )
}

/// One multi-row `INSERT`; the sequence number of each row, matched by
/// event id (the order of `RETURNING` rows is not promised).
async fn insert<R: AsRef<Row>>(db: &Db, table: &str, jobs: &[R]) -> Result<Vec<Option<i64>>, Error> {
    let head = format!("INSERT INTO {table} (topic, event_id, body) ");
    let rows: Vec<(i64, String)> = match db {
        Db::Pg(pool) => {
            let mut query = QueryBuilder::<Postgres>::new(head);
            query.push_values(jobs, |mut row, job| {
                let job = job.as_ref();
                row.push_bind(&*job.topic)
                    .push_bind(&*job.id)
                    .push_bind(&job.body[..]);
            });
            query.push(" RETURNING seq, event_id");
            let rows = query.build().fetch_all(pool).await;
            rows.and_then(|rows| rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect())
        }
        Db::Sqlite(pool) => {
            let mut query = QueryBuilder::<Sqlite>::new(head);
            query.push_values(jobs, |mut row, job| {
                let job = job.as_ref();
                row.push_bind(&*job.topic)
                    .push_bind(&*job.id)
                    .push_bind(&job.body[..]);
            });
            query.push(" RETURNING seq, event_id");
            let rows = query.build().fetch_all(pool).await;
            rows.and_then(|rows| rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect())
        }
    }
    .map_err(|e| from_sqlx(e, "inserting events"))?;
    let mut seqs = vec![None; jobs.len()];
    for (i, (seq, id)) in rows.into_iter().enumerate() {
        if jobs.get(i).is_some_and(|job| *job.as_ref().id == *id) && seqs[i].is_none() {
            seqs[i] = Some(seq);
        } else if let Some(j) = (0..jobs.len()).find(|&j| seqs[j].is_none() && *jobs[j].as_ref().id == *id) {
            seqs[j] = Some(seq);
        }
    }
    Ok(seqs)
}
