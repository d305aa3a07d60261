//! Durable dead letters: [`SqlDeadLetters`].

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use sqlx::Row as _;
use tower_service::Service;
use watchtower::codec::structured;
use watchtower::{BoxError, Error, Event, Receipt, ext};

use crate::client::{SqlClient, on_pool};
use crate::error::from_sqlx;

/// A dead-letter queue in the `<prefix>dead_letters` table: a
/// `Service<Event>` that stores each event it is given, with its reason,
/// until it is inspected and redriven or removed. It survives the process,
/// unlike [`MemoryDeadLetters`](watchtower::dead_letter::MemoryDeadLetters).
///
/// Point the dead-letter layer of `watchtower-layers` at it, or use it as
/// the consumer runtime's dead-letter path:
///
/// ```no_run
/// # use watchtower_sql::{SqlClient, SqlConfig};
/// # async fn f(client: SqlClient, subscription: watchtower_sql::SqlSubscription,
/// #     handler: tower::util::BoxService<watchtower::Event, (), watchtower::Error>) {
/// let dlq = client.dead_letters();
/// // ServiceBuilder::new().layer(DeadLetterLayer::new(dlq.clone())).service(publisher)
/// watchtower::serve(subscription, handler).poison(dlq);
/// # }
/// ```
///
/// [`list`](SqlDeadLetters::list) shows what it holds, oldest first;
/// [`redrive`](SqlDeadLetters::redrive) publishes it again, removing each
/// event the target accepted and keeping the others.
#[derive(Clone)]
pub struct SqlDeadLetters {
    client: SqlClient,
}

impl fmt::Debug for SqlDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlDeadLetters")
            .field("table", &self.client.inner.sql.dead_letters)
            .finish()
    }
}

/// One stored dead letter.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id in the table, for [`SqlDeadLetters::remove`].
    pub id: i64,
    /// The event, with the `deadletter*` extensions it was stored with.
    pub event: Event,
}

/// What a [`SqlDeadLetters::redrive`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RedriveReport {
    /// Events the target accepted; they were removed.
    pub redriven: usize,
    /// Events it refused, by id, with the error; they are still stored.
    pub failed: Vec<(i64, Error)>,
}

impl SqlDeadLetters {
    pub(crate) fn new(client: SqlClient) -> SqlDeadLetters {
        SqlDeadLetters { client }
    }

    /// How many dead letters are stored.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn len(&self) -> Result<u64, Error> {
        let inner = &self.client.inner;
        let n: i64 = on_pool!(&inner.db, pool => sqlx::query_scalar(&inner.sql.count_dead_letters)
            .fetch_one(pool).await.map_err(|e| from_sqlx(e, "counting dead letters")))?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Whether none is stored.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }

    /// Up to `limit` dead letters with an id above `after` (`0` for the
    /// first), oldest first. A row that no longer decodes (written by
    /// something else) is returned as a poison event with its raw bytes.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn list(&self, after: i64, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let inner = &self.client.inner;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let fail = |e| from_sqlx(e, "reading dead letters");
        let rows: Vec<(i64, Vec<u8>)> = on_pool!(&inner.db, pool => {
            let rows = sqlx::query(&inner.sql.list_dead_letters).bind(after).bind(limit)
                .fetch_all(pool).await.map_err(fail)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push((row.try_get(0).map_err(fail)?, row.try_get(1).map_err(fail)?));
            }
            out
        });
        Ok(rows
            .into_iter()
            .map(|(id, body)| {
                let body = bytes::Bytes::from(body);
                let event = structured::from_bytes(&body).unwrap_or_else(|error| {
                    watchtower::Poison::new(
                        watchtower::RawMessage {
                            topic: inner.sql.dead_letters.as_str().into(),
                            headers: Vec::new(),
                            body,
                        },
                        error,
                    )
                    .into_event()
                });
                DeadLetter { id, event }
            })
            .collect())
    }

    /// Removes the dead letter `id`; `false` if there was none.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn remove(&self, id: i64) -> Result<bool, Error> {
        let inner = &self.client.inner;
        let n = on_pool!(&inner.db, pool => sqlx::query(&inner.sql.delete_dead_letter).bind(id)
            .execute(pool).await.map(|r| r.rows_affected()).map_err(|e| from_sqlx(e, "removing a dead letter")))?;
        Ok(n > 0)
    }

    /// Publishes up to `limit` dead letters, oldest first, into `service`,
    /// one at a time, and removes each one it accepts. Events are sent as
    /// stored: to send them back where they were going, without their
    /// dead-letter annotations, map them with `watchtower_layers`'s
    /// `dead_letter::restore`:
    ///
    /// ```no_run
    /// # use watchtower::Event;
    /// # async fn f(dlq: watchtower_sql::SqlDeadLetters, publisher: tower::util::BoxCloneService<Event, watchtower::Receipt, watchtower::Error>,
    /// #     restore: fn(Event) -> Event) -> Result<(), watchtower::Error> {
    /// use tower::ServiceExt;
    /// // restore = watchtower_layers::dead_letter::restore
    /// let report = dlq.redrive(1000, &mut publisher.map_request(restore)).await?;
    /// println!("{} redriven, {} still dead", report.redriven, report.failed.len());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// A database error reading or removing; the target's refusals are in
    /// the report, not errors.
    pub async fn redrive<S>(&self, limit: usize, service: &mut S) -> Result<RedriveReport, Error>
    where
        S: Service<Event>,
        S::Error: Into<BoxError>,
    {
        let mut report = RedriveReport::default();
        for letter in self.list(0, limit).await? {
            let result = match poll_fn(|cx| service.poll_ready(cx)).await {
                Ok(()) => service.call(letter.event).await.map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    self.remove(letter.id).await?;
                    report.redriven += 1;
                }
                Err(e) => {
                    let mut e = Error::from_boxed(e.into());
                    e.take_event();
                    report.failed.push((letter.id, e));
                }
            }
        }
        Ok(report)
    }
}

impl Service<Event> for SqlDeadLetters {
    type Response = Receipt;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            // Dead letters are written one by one: they are rare, and each
            // caller must know its own is stored.
            let body = structured::to_bytes(&event).map_err(|e| e.with_event(event.clone()))?;
            let reason = event.extension(ext::DEAD_LETTER_REASON).unwrap_or_default();
            let inner = &client.inner;
            let id: i64 = on_pool!(&inner.db, pool => sqlx::query_scalar(&inner.sql.insert_dead_letter)
                .bind(event.id())
                .bind(event.topic())
                .bind(reason)
                .bind(&body[..])
                .fetch_one(pool)
                .await
                .map_err(|e| from_sqlx(e, "storing a dead letter").with_event(event.clone())))?;
            Ok(Receipt::new(inner.sql.dead_letters.as_str(), &event)
                .with_sequence(u64::try_from(id).unwrap_or_default()))
        })
    }
}
