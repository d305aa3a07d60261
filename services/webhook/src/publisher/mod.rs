//! The publishing side: configuration, client, publisher and the HTTP
//! exchange.

mod client;
mod config;
mod exchange;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::Instrument;
use watchtower::trace::PublishTrace;
use watchtower::{Error, Event, Receipt, Transport};

pub use client::WebhookClient;
pub use config::WebhookConfig;
pub use exchange::{parse_retry_after, parse_retry_after_bytes};

use client::Shared;

/// The `webhook-id` header.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The `webhook-timestamp` header.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The `webhook-signature` header.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The extension the fan-out sets on each endpoint's copy of an event, so
/// that a dead-letter queue shows which endpoint failed. The sender does not
/// send it.
pub const ENDPOINT_EXTENSION: &str = "webhookendpoint";

/// How the event travels in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// The CloudEvents JSON document as body, `application/cloudevents+json`.
    #[default]
    Structured,
    /// The event's data as body, its type in `content-type`, attributes in
    /// `ce-` headers (CloudEvents HTTP binary mode).
    ///
    /// The Standard Webhooks signature covers the id, the timestamp and the
    /// body, not the `ce-` headers, so this crate's receiver refuses binary
    /// mode unless told otherwise
    /// ([`WebhookVerifier::binary_mode`](crate::WebhookVerifier::binary_mode)).
    Binary,
}

/// Sends events to one webhook endpoint, signed; a `Service<Event>` from
/// [`WebhookClient::publisher`].
///
/// Each event is POSTed with the Standard Webhooks headers: `webhook-id`
/// (the event id, the same on every retry so the receiver can deduplicate),
/// `webhook-timestamp` (fresh per attempt) and `webhook-signature` (one
/// signature per active key over the exact bytes sent: `v1,` for a shared
/// secret, `v1a,` for an Ed25519 signing key). The body
/// is the CloudEvents structured JSON by default, or the event's data with
/// `ce-` headers in [`ContentMode::Binary`].
///
/// The answer decides the result:
///
/// | answer | result |
/// |---|---|
/// | 2xx | `Ok(Receipt)` |
/// | 3xx | [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected), not retryable: redirects are not followed |
/// | 410 | [`ErrorKind::Gone`](watchtower::ErrorKind::Gone); the endpoint is disabled until [`WebhookClient::enable`] |
/// | 429, 502, 503, 504 | [`ErrorKind::Throttled`](watchtower::ErrorKind::Throttled), retryable, with `Retry-After` as [`Error::retry_after`](watchtower::Error::retry_after) (capped, see [`max_retry_after`](crate::WebhookConfig::max_retry_after)) |
/// | 409 | [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected), not retryable: see below |
/// | other 4xx | [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected), not retryable |
/// | other 5xx | [`ErrorKind::Other`](watchtower::ErrorKind::Other), retryable (the endpoint failed, not the event) |
/// | timeout | [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout), retryable |
/// | connection failure | [`ErrorKind::Connection`](watchtower::ErrorKind::Connection), retryable |
/// | address refused by the SSRF guard | [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected), not retryable |
///
/// # Disabled endpoints
///
/// An endpoint is disabled by a `410 Gone`, by [`WebhookClient::disable`],
/// or, with [`disable_after`](WebhookConfig::disable_after), when
/// every attempt has failed for a whole window. A disabled endpoint fails
/// each delivery with [`ErrorKind::Gone`](watchtower::ErrorKind::Gone) without a request (a dead-letter
/// layer then keeps the events) until [`WebhookClient::enable`]. Every
/// change between enabled and disabled is published on a `tokio::sync::watch` channel
/// ([`WebhookClient::subscribe_health`]), so the application can tell the
/// endpoint's owner.
///
/// # Key rotation
///
/// [`WebhookClient::rotate`] starts signing with a new key at run time and
/// keeps signing with the old ones for a grace period, so every request
/// carries both signatures (space-separated, as the specification allows)
/// until the receiver has the new key; a receiver holding either accepts.
///
/// Retries, circuit breaking and dead-lettering are layers on top
/// (`watchtower-layers`, whose retry layer waits on the core's
/// `Backoff`); the publisher makes one attempt per call and has no retry
/// loop of its own.
///
/// A `409 Conflict` is final. Receivers that deduplicate by `webhook-id`
/// answer it when they already hold the id, so every retry with the same id
/// would conflict again; the event goes to the dead-letter queue, where the
/// answer can be looked at, instead of being retried until the schedule
/// runs out. (This crate's receiver never answers `409`: a duplicate of a
/// handled delivery gets `200`, an attempt still in progress `503`.)
///
/// `Retry-After` is read as delay-seconds or an HTTP date; a number too
/// large for 64 bits saturates, and any hint is capped at
/// [`max_retry_after`](crate::WebhookConfig::max_retry_after), so that an
/// endpoint cannot park an event (or overflow a timer) with
/// `Retry-After: 18446744073709551615`.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use watchtower::{Event, PublishExt};
/// use watchtower_webhook::{WebhookClient, WebhookConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let config = WebhookConfig::new("https://example.com/hooks")
///     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .timeout(Duration::from_secs(20))
///     .rate_limit(50, Duration::from_secs(1));
/// let mut publisher = WebhookClient::connect(config).await?.publisher();
/// let receipt = publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
/// println!("delivered {}", receipt.event_id);
/// # Ok(()) }
/// ```
///
/// Clones share the endpoint: its HTTP connection pool, its rate limit and
/// its health.
pub struct WebhookPublisher {
    shared: Arc<Shared>,
    slot: Slot,
}

/// The rate-limit reservation of one clone.
enum Slot {
    None,
    Waiting(Pin<Box<Sleep>>),
    Reserved,
}

impl WebhookPublisher {
    fn new(shared: Arc<Shared>) -> WebhookPublisher {
        WebhookPublisher {
            shared,
            slot: Slot::None,
        }
    }

    /// The endpoint's name (by default its URL without credentials or query).
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }
}

impl Clone for WebhookPublisher {
    fn clone(&self) -> Self {
        WebhookPublisher::new(self.shared.clone())
    }
}

impl fmt::Debug for WebhookPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WebhookPublisher").field(&self.shared).finish()
    }
}

impl Service<Event> for WebhookPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some(rate) = &self.shared.rate else {
            return Poll::Ready(Ok(()));
        };
        loop {
            match &mut self.slot {
                Slot::Reserved => return Poll::Ready(Ok(())),
                Slot::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.slot = Slot::Reserved;
                }
                Slot::None => {
                    let start = rate.reserve();
                    self.slot = if start <= Instant::now() {
                        Slot::Reserved
                    } else {
                        Slot::Waiting(Box::pin(tokio::time::sleep_until(start)))
                    };
                }
            }
        }
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        if let (Some(rate), Slot::None | Slot::Waiting(_)) = (&self.shared.rate, &self.slot) {
            // Called without waiting for readiness: take a slot anyway, so
            // the budget still counts this request.
            rate.reserve();
        }
        self.slot = Slot::None;
        let trace = PublishTrace::start(WebhookClient::SYSTEM, &event.shared_topic(), &mut event);
        let span = trace.span().clone();
        let shared = self.shared.clone();
        ResponseFuture {
            inner: Box::pin(
                async move {
                    let result = exchange::deliver(shared, event).await;
                    trace.finish(&result);
                    result
                }
                .instrument(span),
            ),
        }
    }
}

/// The future of one delivery.
///
/// Boxed: it holds an HTTP exchange, whose cost dwarfs one allocation.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>,
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use watchtower::ErrorKind;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_holds_readiness_across_clones() {
        use futures_util::FutureExt;
        use tower::ServiceExt;

        let config = WebhookConfig::new("https://x.example/")
            .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .rate_limit(2, Duration::from_secs(1));
        let sender = WebhookClient::from_config(config).unwrap().publisher();
        let mut a = sender.clone();
        let mut b = sender.clone();
        let event = || Event::new("t", serde_json::json!({}));
        for _ in 0..2 {
            assert!(matches!(a.ready().now_or_never(), Some(Ok(_))));
            // The future is lazy: dropping it sends nothing.
            drop(a.call(event()));
        }
        assert!(a.ready().now_or_never().is_none(), "the burst is spent");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(a.ready().now_or_never().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(a.ready().now_or_never(), Some(Ok(_))));
        // The clone shares the budget: its slot comes 500 ms later.
        assert!(b.ready().now_or_never().is_none());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(b.ready().now_or_never(), Some(Ok(_))));
    }

    #[test]
    fn configuration_is_checked_at_connect() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let kind = |c: WebhookConfig| WebhookClient::from_config(c).unwrap_err().kind();
        assert_eq!(
            kind(WebhookConfig::new("not a url").secret(secret)),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookConfig::new("ftp://x.example/").secret(secret)),
            ErrorKind::Config
        );
        assert_eq!(kind(WebhookConfig::new("https://x.example/")), ErrorKind::Config);
        assert_eq!(
            kind(
                WebhookConfig::new("http://x.example/")
                    .secret(secret)
                    .https_only(true)
            ),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookConfig::new("https://x.example/").secret("whsec_short")),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookConfig::new("http://10.0.0.1/").secret(secret)),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookConfig::new("http://[fd00::1]/").secret(secret)),
            ErrorKind::Config
        );
        let ok = WebhookConfig::new("https://user:pw@x.example/hook?token=t").secret(secret);
        let ok = WebhookClient::from_config(ok).unwrap();
        assert_eq!(&**ok.name(), "https://***@x.example/hook");
        let shown = format!("{ok:?}");
        assert!(!shown.contains("pw") && !shown.contains("MfKQ"), "{shown}");
        let allowed = WebhookConfig::new("http://10.0.0.1/")
            .secret(secret)
            .allow("10.0.0.0/8");
        assert!(WebhookClient::from_config(allowed).is_ok());
        // The configuration's Debug shows no secret either.
        let config = WebhookConfig::new("https://user:pw@x.example/").secret(secret);
        let shown = format!("{config:?}");
        assert!(!shown.contains("pw") && !shown.contains("MfKQ"), "{shown}");
    }
}
