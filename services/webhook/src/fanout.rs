//! [`WebhookFanOut`]: one event to every endpoint that wants it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::join_all;
use tower::layer::util::Identity;
use tower::{Layer, Service, ServiceExt};
use watchtower::{BoxError, Error, Event, TopicPattern};

use watchtower::health::Health;

use crate::{ENDPOINT_EXTENSION, WebhookClient, WebhookPublisher};

/// One endpoint of a fan-out: a client and the topics it wants.
#[derive(Debug, Clone)]
pub struct Endpoint {
    client: WebhookClient,
    filter: Vec<TopicPattern>,
}

impl Endpoint {
    /// An endpoint that receives every event.
    pub fn new(client: WebhookClient) -> Endpoint {
        Endpoint {
            client,
            filter: Vec::new(),
        }
    }

    /// Receives only events whose topic matches one of `patterns`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`](watchtower::ErrorKind::InvalidTopic) if a
    /// pattern is malformed or there is none.
    pub fn filter<I, S>(mut self, patterns: I) -> Result<Endpoint, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.filter = TopicPattern::parse_all(patterns)?;
        Ok(self)
    }

    fn wants(&self, topic: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|p| p.matches(topic))
    }
}

struct Route<S> {
    endpoint: Endpoint,
    service: S,
}

/// Sends each event to every matching endpoint.
///
/// Each [`Endpoint`] is a [`WebhookClient`] (its URL, secrets, rate limit)
/// and a filter of topic patterns (`user.*`, `order.>`; none means every
/// event). The fan-out wraps each endpoint's publisher in the same
/// `tower::Layer`, applied once per endpoint
/// ([`layer`](WebhookFanOutBuilder::layer)), or in a layer built for each
/// endpoint ([`layer_fn`](WebhookFanOutBuilder::layer_fn)): pass a
/// `ServiceBuilder` of retry, circuit-breaker and dead-letter layers and
/// each endpoint retries, trips and dead-letters on its own. A keyed
/// breaker shared by all endpoints keys them by [`endpoint_of`].
///
/// A call sends the event to the matching endpoints concurrently, each
/// waiting only for its own readiness (its rate limit, its breaker), so a
/// dead or slow endpoint never holds up the others. Each endpoint's copy
/// carries the [`ENDPOINT_EXTENSION`] extension naming it, so what reaches
/// a dead-letter queue says which endpoint failed (the sender does not put
/// it on the wire). Each endpoint's call opens its own publish span.
///
/// # Results
///
/// The response is a [`FanOutReport`] with every matched endpoint's
/// outcome. If any endpoint's stack still failed, the call fails: the
/// error's kind is the first failure's, it names every failed endpoint, it
/// is *not* retryable (retrying the whole fan-out would deliver again to
/// the endpoints that succeeded; retry inside the per-endpoint layer
/// instead), and its [`source`](std::error::Error::source) is the report.
///
/// An endpoint that is disabled (a `410 Gone`, or every attempt
/// failing for its [`disable_after`](crate::WebhookConfig::disable_after)
/// window) fails at once with
/// [`ErrorKind::Gone`](watchtower::ErrorKind::Gone) and holds up nothing;
/// [`WebhookFanOut::subscribe_health`] tells the application when that
/// happens.
///
/// The fan-out is always ready; bound it with tower's `ConcurrencyLimit`
/// in front if callers may outrun the endpoints.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use watchtower::{Event, PublishExt};
/// use watchtower_webhook::{Endpoint, WebhookClient, WebhookConfig, WebhookFanOut};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let billing = WebhookConfig::new("https://billing.example/hooks")
///     .name("billing")
///     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
/// let audit = WebhookConfig::new("https://audit.example/in")
///     .name("audit")
///     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .rate_limit(10, Duration::from_secs(1));
/// let billing = WebhookClient::connect(billing).await?;
/// let audit = WebhookClient::connect(audit).await?;
/// let mut fan_out = WebhookFanOut::builder()
///     // Any Clone layer: each endpoint gets its own instance.
///     .layer(ServiceBuilder::new().timeout(Duration::from_secs(30)))
///     .endpoint(Endpoint::new(billing).filter(["invoice.>"])?)
///     .endpoint(Endpoint::new(audit))
///     .build()?;
/// let report = fan_out.publish(Event::new("invoice.paid", serde_json::json!({}))).await?;
/// assert_eq!(report.outcomes().len(), 2);
/// # Ok(()) }
/// ```
pub struct WebhookFanOut<S> {
    routes: Arc<[Route<S>]>,
}

impl<S> Clone for WebhookFanOut<S> {
    fn clone(&self) -> Self {
        WebhookFanOut {
            routes: self.routes.clone(),
        }
    }
}

impl<S> fmt::Debug for WebhookFanOut<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookFanOut")
            .field(
                "endpoints",
                &self.routes.iter().map(|r| &r.endpoint).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl WebhookFanOut<()> {
    /// A builder with no endpoints and no layer.
    pub fn builder() -> WebhookFanOutBuilder<fn(&WebhookPublisher) -> Identity> {
        WebhookFanOutBuilder {
            make_layer: |_| Identity::new(),
            endpoints: Vec::new(),
        }
    }
}

impl<S> WebhookFanOut<S> {
    /// Each endpoint's name and health, as its client's
    /// [`health`](watchtower::Transport::health) answers: up, degraded
    /// while its last delivery failed, down while it is disabled (a `410
    /// Gone`, sustained failure, or by hand).
    pub fn health(&self) -> Vec<(Arc<str>, Health)> {
        self.routes
            .iter()
            .map(|r| (r.endpoint.client.name().clone(), r.endpoint.client.health_now()))
            .collect()
    }

    /// Each endpoint's name and a receiver of its enabled/disabled changes
    /// (see [`WebhookClient::subscribe_health`]): how the application learns
    /// that an endpoint was disabled by a `410 Gone` or by sustained
    /// failure ([`disable_after`](crate::WebhookConfig::disable_after)).
    pub fn subscribe_health(&self) -> Vec<(Arc<str>, tokio::sync::watch::Receiver<Health>)> {
        self.routes
            .iter()
            .map(|r| {
                (
                    r.endpoint.client.name().clone(),
                    r.endpoint.client.subscribe_health(),
                )
            })
            .collect()
    }

    /// The endpoints' clients, in the order they were added.
    pub fn clients(&self) -> impl Iterator<Item = &WebhookClient> {
        self.routes.iter().map(|r| &r.endpoint.client)
    }
}

/// The endpoint an event copy is bound for, as set by the fan-out in
/// [`ENDPOINT_EXTENSION`]: the key for a keyed circuit breaker, or what a
/// dead-letter consumer reads to know where a failed delivery was going.
pub fn endpoint_of(event: &Event) -> Option<&str> {
    event.extension(ENDPOINT_EXTENSION)
}

/// Configures a [`WebhookFanOut`]; from [`WebhookFanOut::builder`].
pub struct WebhookFanOutBuilder<F> {
    make_layer: F,
    endpoints: Vec<Endpoint>,
}

impl<F> fmt::Debug for WebhookFanOutBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookFanOutBuilder")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl<F> WebhookFanOutBuilder<F> {
    /// Wraps every endpoint's publisher in `layer` (one [`Layer::layer`] call
    /// per endpoint; use a `ServiceBuilder` for a stack).
    ///
    /// Whether endpoints share state depends on the layer: tower's
    /// `TimeoutLayer` or a retry layer hold none, while a layer that keeps
    /// one shared state for everything it wraps (a plain circuit-breaker
    /// layer) would join the endpoints together. For those, key them by
    /// [`endpoint_of`] (a keyed breaker) or build one per endpoint with
    /// [`layer_fn`](Self::layer_fn).
    pub fn layer<L>(self, layer: L) -> WebhookFanOutBuilder<impl Fn(&WebhookPublisher) -> L>
    where
        L: Clone,
    {
        self.layer_fn(move |_: &WebhookPublisher| layer.clone())
    }

    /// Wraps each endpoint's publisher in the layer `make(publisher)` returns, so
    /// each endpoint gets its own instance (its own breaker, its own
    /// dead-letter annotations).
    pub fn layer_fn<G, L>(self, make: G) -> WebhookFanOutBuilder<G>
    where
        G: Fn(&WebhookPublisher) -> L,
    {
        WebhookFanOutBuilder {
            make_layer: make,
            endpoints: self.endpoints,
        }
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Builds the fan-out.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if two endpoints
    /// have the same name (reports and dead letters could not tell them
    /// apart).
    pub fn build<L>(self) -> Result<WebhookFanOut<L::Service>, Error>
    where
        F: Fn(&WebhookPublisher) -> L,
        L: Layer<WebhookPublisher>,
    {
        let mut names: Vec<&str> = self.endpoints.iter().map(|e| &**e.client.name()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::config(format!(
                "two webhook endpoints are named {:?}; give each a distinct name",
                pair[0]
            )));
        }
        let routes = self
            .endpoints
            .into_iter()
            .map(|endpoint| {
                let publisher = endpoint.client.publisher();
                Route {
                    service: (self.make_layer)(&publisher).layer(publisher),
                    endpoint,
                }
            })
            .collect();
        Ok(WebhookFanOut { routes })
    }
}

/// What happened at one endpoint.
#[derive(Debug)]
#[non_exhaustive]
pub struct EndpointOutcome<R> {
    /// The endpoint's name.
    pub endpoint: Arc<str>,
    /// What its stack answered.
    pub result: Result<R, Error>,
}

/// Every matched endpoint's outcome for one event.
#[derive(Debug)]
pub struct FanOutReport<R> {
    event_id: Arc<str>,
    outcomes: Vec<EndpointOutcome<R>>,
}

impl<R> FanOutReport<R> {
    /// The event's id.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// Each matched endpoint's outcome, in the order endpoints were added.
    /// Empty when no endpoint's filter matched.
    pub fn outcomes(&self) -> &[EndpointOutcome<R>] {
        &self.outcomes
    }

    /// Takes the outcomes.
    pub fn into_outcomes(self) -> Vec<EndpointOutcome<R>> {
        self.outcomes
    }

    /// The endpoints whose stack answered `Ok` (with a dead-letter layer in
    /// the stack that includes events it dead-lettered; its response says
    /// which).
    pub fn succeeded(&self) -> impl Iterator<Item = &str> {
        self.outcomes
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| &*o.endpoint)
    }

    /// The endpoints whose stack failed, with the error.
    pub fn failed(&self) -> impl Iterator<Item = (&str, &Error)> {
        self.outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().err().map(|e| (&*o.endpoint, e)))
    }

    /// Whether every matched endpoint succeeded.
    pub fn is_success(&self) -> bool {
        self.outcomes.iter().all(|o| o.result.is_ok())
    }
}

impl<R: fmt::Debug> fmt::Display for FanOutReport<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.failed().count();
        write!(f, "{failed} of {} webhook endpoints failed", self.outcomes.len())?;
        for (i, (name, err)) in self.failed().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{name}: {err}")?;
        }
        Ok(())
    }
}

impl<R: fmt::Debug> std::error::Error for FanOutReport<R> {}

impl<R> FanOutReport<R>
where
    R: fmt::Debug + Send + Sync + 'static,
{
    fn into_result(self) -> Result<FanOutReport<R>, Error> {
        let Some(kind) = self.failed().next().map(|(_, e)| e.kind()) else {
            return Ok(self);
        };
        Err(Error::new(kind, self.to_string())
            .with_retryable(false)
            .with_source(self))
    }
}

/// The future of one fan-out.
///
/// Boxed: it joins one exchange per endpoint.
pub struct ResponseFuture<R> {
    inner: Pin<Box<dyn Future<Output = Result<FanOutReport<R>, Error>> + Send>>,
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<FanOutReport<R>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S> Service<Event> for WebhookFanOut<S>
where
    S: Service<Event> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: fmt::Debug + Send + Sync + 'static,
{
    type Response = FanOutReport<S::Response>;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    /// Always ready: each endpoint's readiness is awaited inside the call,
    /// so that one endpoint's breaker or rate limit does not hold up the
    /// others.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let topic = event.topic().to_owned();
        let calls: Vec<_> = self
            .routes
            .iter()
            .filter(|route| route.endpoint.wants(&topic))
            .map(|route| {
                let name = route.endpoint.client.name().clone();
                let mut copy = event.clone();
                // The name is a constant, valid extension name.
                let _ = copy.set_extension(ENDPOINT_EXTENSION, name.clone());
                let service = route.service.clone();
                async move {
                    let result = service
                        .oneshot(copy)
                        .await
                        .map_err(|e| Error::from_boxed(e.into()));
                    EndpointOutcome {
                        endpoint: name,
                        result,
                    }
                }
            })
            .collect();
        let event_id: Arc<str> = Arc::from(event.id());
        ResponseFuture {
            inner: Box::pin(async move {
                let outcomes = join_all(calls).await;
                FanOutReport { event_id, outcomes }.into_result()
            }),
        }
    }
}
