//! A durable retry schedule with an attempts log: [`RetryScheduleLayer`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::Row as _;
use tower::ServiceExt as _;
use tower_layer::Layer;
use tower_service::Service;
use watchtower::{BoxError, Error, Event};

use crate::client::{SqlClient, on_pool};
use crate::error::from_sqlx;

/// The waits between attempts: after the `n`th failed attempt the event is
/// tried again after the `n`th wait; after the last, it is given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Arc<[Duration]>,
}

impl RetrySchedule {
    /// The given waits, in order.
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> RetrySchedule {
        RetrySchedule {
            delays: delays.into_iter().collect(),
        }
    }

    /// The schedule webhook senders commonly use (Standard Webhooks'
    /// example): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, so seven attempts over
    /// about 17 h 35 min.
    pub fn webhook() -> RetrySchedule {
        RetrySchedule::new([
            Duration::from_secs(5),
            Duration::from_secs(5 * 60),
            Duration::from_secs(30 * 60),
            Duration::from_secs(2 * 3600),
            Duration::from_secs(5 * 3600),
            Duration::from_secs(10 * 3600),
        ])
    }

    /// The waits.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

/// One attempt in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Attempt {
    /// 1 for the first.
    pub attempt: u32,
    /// When it ended, in milliseconds since the Unix epoch (the database's
    /// clock).
    pub at_ms: i64,
    /// The error, `None` if it succeeded.
    pub error: Option<String>,
}

/// Retries a handler on a schedule of hours, durably: a layer for the
/// handler of a SQL subscription (a webhook sender, any `Service<Event>`).
///
/// Each attempt is written to the `<prefix>attempts` table. When the
/// handler fails with a retryable error and the schedule has a wait left,
/// the layer fails with that wait as the error's
/// [retry-after hint](Error::retry_after); the consumer runtime nacks the
/// delivery with it, and the SQL transport keeps the event invisible for
/// that long **in the table**, so the schedule survives restarts and is
/// shared by every process of the group. After the last wait, or on an
/// error that is not retryable, the error is passed on as not retryable,
/// and the runtime dead-letters the event (with a [`SqlDeadLetters`](crate::SqlDeadLetters)
/// path, durably).
///
/// ```no_run
/// use tower::ServiceBuilder;
/// use watchtower::{SubscribeOptions, Subscriber, serve};
/// use watchtower_sql::{RetrySchedule, RetryScheduleLayer, SqlClient};
///
/// # async fn f(outbox: SqlClient, sender: tower::util::BoxCloneService<watchtower::Event, (), watchtower::Error>) -> Result<(), watchtower::Error> {
/// let subscription = outbox.subscriber().open(SubscribeOptions::new(["webhook.>"])?.group("webhooks")?).await?;
/// let handler = ServiceBuilder::new()
///     .layer(RetryScheduleLayer::new(&outbox, RetrySchedule::webhook()))
///     .service(sender);
/// serve(subscription, handler).poison(outbox.dead_letters()).await?;
/// # Ok(()) }
/// ```
///
/// The runtime's [`max_deliveries`](watchtower::Serve::max_deliveries)
/// must exceed the schedule's length (its default, 10, exceeds the
/// webhook schedule's 7 attempts).
#[derive(Clone)]
pub struct RetryScheduleLayer {
    client: SqlClient,
    schedule: RetrySchedule,
}

impl fmt::Debug for RetryScheduleLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryScheduleLayer")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl RetryScheduleLayer {
    /// Logs attempts through `client`, retrying on `schedule`.
    pub fn new(client: &SqlClient, schedule: RetrySchedule) -> RetryScheduleLayer {
        RetryScheduleLayer {
            client: client.clone(),
            schedule,
        }
    }
}

impl<S> Layer<S> for RetryScheduleLayer {
    type Service = RetryScheduled<S>;

    fn layer(&self, inner: S) -> RetryScheduled<S> {
        RetryScheduled {
            inner,
            client: self.client.clone(),
            schedule: self.schedule.clone(),
        }
    }
}

/// The service of [`RetryScheduleLayer`].
#[derive(Clone)]
pub struct RetryScheduled<S> {
    inner: S,
    client: SqlClient,
    schedule: RetrySchedule,
}

impl<S> fmt::Debug for RetryScheduled<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryScheduled")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl<S> RetryScheduled<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> Service<Event> for RetryScheduled<S>
where
    S: Service<Event> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let (inner, client, schedule) = (self.inner.clone(), self.client.clone(), self.schedule.clone());
        Box::pin(async move {
            let attempt = attempts(&client, event.id()).await?.len() as u32 + 1;
            let id = event.id().to_owned();
            let call = inner
                .oneshot(event)
                .await
                .map(drop)
                .map_err(|e| Error::from_boxed(e.into()));
            let logged = call.as_ref().err().map(|e| e.to_string());
            log(&client, &id, attempt, logged.as_deref()).await?;
            let Err(mut error) = call else { return Ok(()) };
            error.take_event();
            match schedule.delays().get(attempt as usize - 1) {
                Some(&wait) if error.is_retryable() => Err(error.with_retry_after(wait)),
                _ => Err(error.with_retryable(false)),
            }
        })
    }
}

async fn log(client: &SqlClient, id: &str, attempt: u32, error: Option<&str>) -> Result<(), Error> {
    let inner = &client.inner;
    on_pool!(&inner.db, pool => sqlx::query(&inner.sql.log_attempt)
        .bind(id)
        .bind(i64::from(attempt))
        .bind(error)
        .execute(pool)
        .await
        .map(drop)
        .map_err(|e| from_sqlx(e, "logging an attempt")))
}

/// The attempts logged for event `id`, first first.
///
/// # Errors
///
/// A database error, by its kind.
pub(crate) async fn attempts(client: &SqlClient, id: &str) -> Result<Vec<Attempt>, Error> {
    let inner = &client.inner;
    let fail = |e| from_sqlx(e, "reading attempts");
    on_pool!(&inner.db, pool => {
        let rows = sqlx::query(&inner.sql.list_attempts).bind(id).fetch_all(pool).await.map_err(fail)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(Attempt {
                attempt: u32::try_from(row.try_get::<i64, _>(0).map_err(fail)?).unwrap_or_default(),
                at_ms: row.try_get(1).map_err(fail)?,
                error: row.try_get(2).map_err(fail)?,
            });
        }
        Ok(out)
    })
}
