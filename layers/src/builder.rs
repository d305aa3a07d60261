//! One `ServiceBuilder` method per layer.

use tower::ServiceBuilder;
use tower::layer::util::Stack;

use crate::backpressure::BackpressureLayer;
use crate::circuit_breaker::CircuitBreakerLayer;
use crate::dead_letter::DeadLetterLayer;
use crate::retry::RetryLayer;

/// Adds the WatchTower layers to [`ServiceBuilder`], like tower-http's
/// `ServiceBuilderExt`.
///
/// Each method takes the layer or its config (`From` converts), so you can
/// keep the layer's handle for stats and health first.
///
/// # Order
///
/// `ServiceBuilder` wraps top to bottom: the first layer named is the
/// outermost. The recommended order is:
///
/// 1. **`dead_letter`, outermost**: it must see the *final* failure, after
///    every retry; placed below
///    `retries` it would turn the first transient
///    failure into a dead letter and the retry layer would see `Ok`.
/// 2. **`retries`**: above the breaker, so each retry asks the breaker
///    again, and an open breaker's `CircuitOpen` (with its time left as
///    `retry_after`) makes the retry wait or give up instead of hammering.
/// 3. **`circuit_breaker`**: above the queue, so it measures the real
///    service's failures and refuses work before it is queued.
/// 4. **`backpressure`, innermost**: right in front of the transport, so
///    the queue bounds what actually waits on it. Above retry it would let
///    each retry jump the queue; above the breaker it would queue work the
///    breaker then refuses.
///
/// Tower's own `Timeout` goes between the breaker and the queue (or below
/// the queue to time the call alone); its `Elapsed` error becomes
/// [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout), which the retry
/// layer retries and the breaker counts.
///
/// The wrong order is caught by types where it can be: `retry` requires
/// the service below to be `Clone` and a `dead_letter` below it changes the
/// response to [`Outcome`](crate::dead_letter::Outcome), which no publisher
/// signature (`Response = Receipt`) accepts. Where the types cannot tell,
/// the rule above stands.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
/// use watchtower::dead_letter::MemoryDeadLetters;
/// use watchtower::{Error, Event};
/// use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
/// use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
/// use watchtower_layers::retry::RetryConfig;
/// use watchtower_layers::ServiceBuilderExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
/// let dlq = MemoryDeadLetters::new(10_000);
/// let mut publisher = ServiceBuilder::new()
///     .dead_letter(dlq.clone())
///     .retries(RetryConfig::new().max_attempts(4))
///     .circuit_breaker(CircuitBreakerConfig::new().open_wait(Duration::from_secs(5)))
///     .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(2)))
///     .backpressure(BackpressureLayer::new(1024, Overflow::Block))
///     .service(service_fn(|_: Event| async { Ok::<_, Error>(()) }));
///
/// let outcome = publisher.ready().await?.call(Event::empty("user.created")).await?;
/// assert!(outcome.is_delivered());
/// # Ok(()) }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds a [`CircuitBreakerLayer`].
    fn circuit_breaker(
        self,
        layer: impl Into<CircuitBreakerLayer>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer, L>>;

    /// Adds a [`BackpressureLayer`].
    fn backpressure(self, layer: BackpressureLayer) -> ServiceBuilder<Stack<BackpressureLayer, L>>;

    /// Adds a [`RetryLayer`]. (Not `retry`: tower's own
    /// `ServiceBuilder::retry(policy)` is an inherent method and would
    /// win.)
    fn retries(self, layer: impl Into<RetryLayer>) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Adds a [`DeadLetterLayer`] sending to `dlq` (a `Service<Event>`) or
    /// a prepared layer.
    fn dead_letter<D>(
        self,
        dlq: impl Into<DeadLetterLayer<D>>,
    ) -> ServiceBuilder<Stack<DeadLetterLayer<D>, L>>;
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn circuit_breaker(
        self,
        layer: impl Into<CircuitBreakerLayer>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer, L>> {
        self.layer(layer.into())
    }

    fn backpressure(self, layer: BackpressureLayer) -> ServiceBuilder<Stack<BackpressureLayer, L>> {
        self.layer(layer)
    }

    fn retries(self, layer: impl Into<RetryLayer>) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(layer.into())
    }

    fn dead_letter<D>(
        self,
        dlq: impl Into<DeadLetterLayer<D>>,
    ) -> ServiceBuilder<Stack<DeadLetterLayer<D>, L>> {
        self.layer(dlq.into())
    }
}
