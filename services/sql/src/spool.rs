//! A local spool: [`spool`] and [`Spool`].

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;
use tower_service::Service;
use watchtower::backoff::Backoff;
use watchtower::{BoxError, Error, Event, Receipt, ServeStats, SubscribeOptions, Subscriber as _, serve};

use crate::client::{SqlClient, on_pool};
use crate::config::SqlConfig;
use crate::dead_letters::SqlDeadLetters;
use crate::error::from_sqlx;
use crate::publisher::{ResponseFuture, SqlPublisher};

/// The consumer group of a spool's forwarder.
const GROUP: &str = "spool";

/// Opens (or creates) the SQLite spool at `path` in front of `publisher`.
/// See [`Spool`].
///
/// # Errors
///
/// As [`Spool::open`].
pub async fn spool<S>(path: impl AsRef<Path>, publisher: S) -> Result<Spool, Error>
where
    S: Service<Event> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    Spool::open(path, publisher).await
}

/// A local spool: events are written to a SQLite file first and forwarded
/// to `publisher` (any `Service<Event>`: a broker's publisher or a stack of
/// layers over one) by a task of the spool, in the order they were
/// written, so a service keeps accepting events while its broker is down.
///
/// It is composition, not a new mechanism: [`Spool`] publishes through the
/// SQL transport's [`SqlPublisher`], and its task is
/// `serve(subscription, publisher)` over a subscription in the group
/// `spool`, with concurrency 1, and with the publisher wrapped so that a
/// retryable failure (the broker is down) is retried with a growing delay
/// (100 ms to 5 s) rather than nacked: the spool stays in order. An event
/// the publisher refuses for good (not retryable) goes to the spool's
/// [dead letters](Spool::dead_letters), in the same file.
///
/// A spool file belongs to one process at a time: opening it releases what
/// the last process had claimed and not forwarded, which is forwarded
/// again (at least once: an event the broker had stored just before a
/// crash is sent twice).
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_nats::{NatsClient, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let nats = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// let mut events = watchtower_sql::spool("/var/lib/orders/spool.db", nats.jetstream_publisher()).await?;
/// // Answered once the event is in the spool file, broker up or not.
/// events.publish(Event::new("order.placed", serde_json::json!({"id": 7}))).await?;
/// let stats = events.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Spool {
    client: SqlClient,
    publisher: SqlPublisher,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<ServeStats, Error>>,
    stats: watchtower::StatsHandle,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("client", &self.client)
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens the spool at `path` (created if missing) with the default
    /// settings of [`SqlConfig`], in front of `publisher`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if the path is
    /// not UTF-8; the database's error if the file cannot be opened.
    pub async fn open<S>(path: impl AsRef<Path>, publisher: S) -> Result<Spool, Error>
    where
        S: Service<Event> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let path = path.as_ref();
        let path = path
            .to_str()
            .ok_or_else(|| Error::config(format!("spool path {} is not UTF-8", path.display())))?;
        Spool::open_with(SqlConfig::new(format!("sqlite://{path}")), publisher).await
    }

    /// Opens a spool with `config` (a SQLite file, or PostgreSQL), in front
    /// of `publisher`.
    ///
    /// # Errors
    ///
    /// As [`SqlClient::connect`].
    pub async fn open_with<S>(config: SqlConfig, publisher: S) -> Result<Spool, Error>
    where
        S: Service<Event> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        // A spool's deliveries wait for the broker as long as it takes:
        // they are released when the spool is opened again, not on a timer.
        let config = config.visibility_timeout(Duration::from_secs(365 * 24 * 3600));
        let client = SqlClient::connect(config).await?;
        let inner = &client.inner;
        on_pool!(&inner.db, pool => sqlx::query(&inner.sql.release_group).bind(GROUP).execute(pool).await
            .map(drop).map_err(|e| from_sqlx(e, "releasing the spool's deliveries")))?;
        let subscription = client
            .subscriber()
            .open(SubscribeOptions::new([">"])?.group(GROUP)?)
            .await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = serve(subscription, Persist::new(publisher))
            .concurrency(1)
            .shutdown_timeout(Duration::from_secs(1))
            .poison(client.dead_letters())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            });
        let stats = runtime.stats();
        let task = tokio::spawn(runtime.into_future());
        Ok(Spool {
            publisher: client.publisher(),
            client,
            stop: Some(stop),
            task,
            stats,
        })
    }

    /// A publisher into the spool, to share between tasks.
    pub fn publisher(&self) -> SqlPublisher {
        self.publisher.clone()
    }

    /// The spool's SQL client.
    pub fn client(&self) -> &SqlClient {
        &self.client
    }

    /// Events refused for good by the publisher, and messages in the spool
    /// that did not decode.
    pub fn dead_letters(&self) -> SqlDeadLetters {
        self.client.dead_letters()
    }

    /// What the forwarding task did so far: `acked` is the number of events
    /// forwarded.
    pub fn stats(&self) -> ServeStats {
        self.stats.snapshot()
    }

    /// How many events are in the spool, not yet forwarded.
    ///
    /// # Errors
    ///
    /// A database error, by its kind.
    pub async fn pending(&self) -> Result<u64, Error> {
        let inner = &self.client.inner;
        let n: i64 = on_pool!(&inner.db, pool => sqlx::query_scalar(&inner.sql.pending).bind(GROUP)
            .fetch_one(pool).await.map_err(|e| from_sqlx(e, "counting the spool")))?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Stops forwarding: waits up to a second for the event being
    /// forwarded, and returns what the task did. What is still in the spool
    /// is forwarded when it is opened again.
    ///
    /// # Errors
    ///
    /// If the forwarding task failed.
    pub async fn shutdown(mut self) -> Result<ServeStats, Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| Error::closed(format!("the spool's task failed: {e}")))?
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Service<Event> for Spool {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.publisher.poll_ready(cx)
    }

    fn call(&mut self, event: Event) -> ResponseFuture {
        self.publisher.call(event)
    }
}

/// The spool's handler: the publisher, with every retryable failure
/// retried until it succeeds, so that events leave in order.
#[derive(Clone)]
struct Persist<S> {
    inner: S,
    backoff: Backoff,
}

impl<S> Persist<S> {
    fn new(inner: S) -> Persist<S> {
        Persist {
            inner,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

impl<S> Service<Event> for Persist<S>
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
        let (mut inner, backoff) = (self.inner.clone(), self.backoff);
        Box::pin(async move {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let call = inner
                    .ready()
                    .await
                    .map(|ready| ready.call(event.clone()))
                    .map_err(|e| Error::from_boxed(e.into()));
                let error = match call {
                    Ok(call) => match call.await {
                        Ok(_) => return Ok(()),
                        Err(e) => Error::from_boxed(e.into()),
                    },
                    Err(e) => e,
                };
                if !error.is_retryable() {
                    return Err(error);
                }
                let wait = error.retry_after().unwrap_or_else(|| backoff.delay(attempt));
                tracing::debug!(error = %error, ?wait, "the spool waits for its broker");
                tokio::time::sleep(wait).await;
            }
        })
    }
}
