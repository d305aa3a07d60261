//! Publishing through any `Service<Event>`: [`PublishExt`](crate::PublishExt).

use std::future::{Future, poll_fn};

use tower::Service;

use crate::error::{BoxError, Error};
use crate::event::Event;

/// The publishing convention and its conveniences.
///
/// A publisher is a `tower::Service<Event>` whose response is a
/// [`Receipt`](crate::Receipt) of what the broker acknowledged and whose
/// error converts into [`Error`]. [`PublishExt::publish`] waits for
/// readiness and calls it, for code that publishes one event at a time.
///
/// ```
/// use watchtower::{Event, PublishExt, dead_letter::MemoryDeadLetters};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let mut sink = MemoryDeadLetters::default(); // any Service<Event> will do
/// sink.publish(Event::new("user.created", serde_json::json!({"user_id": 1}))).await?;
/// assert_eq!(sink.len(), 1);
/// # Ok(()) }
/// ```
///
/// `publish(event)` on any `Service<Event>`.
pub trait PublishExt: Service<Event> {
    /// Waits until the service is ready, then sends `event`.
    ///
    /// # Errors
    ///
    /// The service's readiness or call error, converted to [`Error`].
    fn publish(&mut self, event: Event) -> impl Future<Output = Result<Self::Response, Error>> + Send + '_
    where
        Self: Send,
        Self::Future: Send,
        Self::Error: Into<BoxError>;
}

/// Waits until `service` is ready, then calls it with `request`; both
/// errors converted to [`Error`].
pub(crate) async fn ready_then_call<S, R>(service: &mut S, request: R) -> Result<S::Response, Error>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| Error::from_boxed(e.into()))?;
    service
        .call(request)
        .await
        .map_err(|e| Error::from_boxed(e.into()))
}

impl<S> PublishExt for S
where
    S: Service<Event>,
{
    // Written out rather than `async fn` so the future is declared `Send`.
    #[allow(clippy::manual_async_fn)]
    fn publish(&mut self, event: Event) -> impl Future<Output = Result<Self::Response, Error>> + Send + '_
    where
        Self: Send,
        Self::Future: Send,
        Self::Error: Into<BoxError>,
    {
        ready_then_call(self, event)
    }
}
