//! Typed routing: one handler per event type pattern, as ordinary async
//! functions.
//!
//! A [`Router`] is a `tower::Service<Event>` with `Response = ()` and
//! `Error = watchtower::Error`, so it plugs into
//! [`serve`](watchtower::serve()) (or any layer) like any handler. It looks
//! at each event's **type** and calls the handler of the most specific
//! [`TopicPattern`] that matches it:
//!
//! * an exact type beats any wildcard;
//! * between wildcards, the tokens are compared left to right, and at the
//!   first that differs a literal beats `*`, and `*` beats `>`: `order.*`
//!   beats `order.>`, `order.created.*` beats `order.*.created`, and
//!   `order.>` beats `*.*` (the longer literal prefix wins);
//! * the same pattern twice is a configuration error.
//!
//! An event no route matches goes to the [fallback](Router::fallback). By
//! default that is an [`ErrorKind::Rejected`] error, which is not
//! retryable, so `serve` sends the event to its dead-letter path with the
//! reason `no route for event type ...`: an event nobody handles is never
//! acknowledged silently.
//!
//! Handlers are async functions whose arguments are extractors
//! ([`FromEvent`]): [`Data<T>`] (the payload through serde; a payload that
//! does not decode is a non-retryable [`ErrorKind::Decode`] error, so the
//! event goes to the dead-letter path with serde's message), the
//! [`Event`] itself, its [`Attributes`], its [`Topic`], the
//! [`DeliveryCount`], and shared [`State<S>`]. A handler returns `()` or a
//! `Result<(), E>` (see [`IntoHandlerResult`]).
//!
//! Routers compose: [`route_layer`](Router::route_layer) wraps the routes
//! added so far in a tower layer (a timeout, a concurrency limit, the
//! idempotency layer), leaving later routes and the fallback alone;
//! [`nest`](Router::nest) mounts another router under a type prefix, and
//! [`merge`](Router::merge) joins two.
//!
//! # Configuration errors
//!
//! An invalid pattern or a pattern given twice does not panic: the router
//! remembers the first such error, [`check`](Router::check) returns it,
//! and the router's `poll_ready` fails with it, so `serve` stops at once
//! with that [`ErrorKind::Config`] error before taking any event from the
//! subscription.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use serde::Deserialize;
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//! use watchtower_toolkit::router::{Data, DeliveryCount, Router, State};
//!
//! #[derive(Deserialize)]
//! struct OrderPlaced { id: u64, total_cents: u64 }
//!
//! async fn placed(Data(order): Data<OrderPlaced>, State(shop): State<&'static str>) {
//!     println!("{shop}: order {} for {}", order.id, order.total_cents);
//! }
//!
//! async fn any_order(event: Event, DeliveryCount(n): DeliveryCount) -> Result<(), Error> {
//!     println!("{} (delivery {n})", event.ty());
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let router = Router::with_state("demo shop")
//!     .route("order.placed", placed)
//!     .route("order.>", any_order);
//! router.check()?;
//!
//! let broker = MemoryBroker::new();
//! let handle = broker.subscriber().subscribe(["order.>"], router).await?;
//! broker
//!     .publisher()
//!     .publish(Event::new("order.placed", serde_json::json!({"id": 7, "total_cents": 1250})))
//!     .await?;
//! broker.wait_idle(Duration::from_secs(5)).await;
//! assert_eq!(handle.stop().await?.acked, 1);
//! # Ok(()) }
//! ```
//!
//! [`TopicPattern`]: watchtower::TopicPattern
//! [`ErrorKind::Rejected`]: watchtower::ErrorKind::Rejected
//! [`ErrorKind::Decode`]: watchtower::ErrorKind::Decode
//! [`ErrorKind::Config`]: watchtower::ErrorKind::Config

mod extract;
mod handler;
mod table;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt as _};
use watchtower::{BoxError, Error, ErrorKind, Event};

pub use extract::{Attributes, Data, DeliveryCount, FromEvent, State, Topic};
pub use handler::{Handler, HandlerExt, HandlerService, IntoHandlerResult};

use handler::{Bound, BoxFuture, ErasedHandler};
use table::Table;

/// Dispatches events to handlers by event type pattern. See the
/// [module docs](self).
///
/// Cheap to clone: clones share the routes.
pub struct Router<S = ()> {
    state: S,
    table: Arc<Table>,
}

impl<S: Clone> Clone for Router<S> {
    fn clone(&self) -> Self {
        Router {
            state: self.state.clone(),
            table: self.table.clone(),
        }
    }
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.table.patterns())
            .field("custom_fallback", &self.table.fallback.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Router<()> {
    fn default() -> Self {
        Router::new()
    }
}

impl Router<()> {
    /// A router without state and without routes: every event goes to the
    /// fallback.
    pub fn new() -> Router<()> {
        Router::with_state(())
    }
}

/// What one route calls.
#[derive(Clone)]
pub(crate) enum Route {
    Handler(Arc<dyn ErasedHandler>),
    Service(BoxCloneSyncService<Event, (), Error>),
}

impl Route {
    fn call(&self, event: Event) -> BoxFuture {
        match self {
            Route::Handler(handler) => handler.call(event),
            // Readiness is awaited inside the call's future, as axum does:
            // a route's own backpressure (a concurrency limit) holds that
            // one event, not the whole router.
            Route::Service(service) => Box::pin(service.clone().oneshot(event)),
        }
    }

    fn into_service(self) -> RouteService {
        RouteService(self)
    }
}

/// A route as a service, for route layers to wrap: always ready (a wrapped
/// service's readiness is awaited in the call), cheap to clone.
#[derive(Clone)]
pub struct RouteService(Route);

impl fmt::Debug for RouteService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteService").finish_non_exhaustive()
    }
}

impl Service<Event> for RouteService {
    type Response = ();
    type Error = Error;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> RouteFuture {
        RouteFuture(self.0.call(event))
    }
}

fn boxed<T>(service: T) -> BoxCloneSyncService<Event, (), Error>
where
    T: Service<Event> + Clone + Send + Sync + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
{
    BoxCloneSyncService::new(
        service
            .map_response(|_| ())
            .map_err(|e| Error::from_boxed(e.into())),
    )
}

impl<S> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// A router whose handlers can take `state` with the [`State`]
    /// extractor.
    pub fn with_state(state: S) -> Router<S> {
        Router {
            state,
            table: Arc::new(Table::default()),
        }
    }

    /// Routes events whose type matches `pattern` to `handler`, an async
    /// function of extractors.
    ///
    /// An invalid pattern, or one already routed, is remembered as the
    /// router's configuration error (see [`check`](Router::check)).
    pub fn route<H, T>(self, pattern: &str, handler: H) -> Router<S>
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let bound = Bound {
            handler,
            state: self.state.clone(),
            _args: PhantomData,
        };
        self.add(pattern, Route::Handler(Arc::new(bound)))
    }

    /// Routes events whose type matches `pattern` to a tower service.
    pub fn route_service<T>(self, pattern: &str, service: T) -> Router<S>
    where
        T: Service<Event> + Clone + Send + Sync + 'static,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
    {
        self.add(pattern, Route::Service(boxed(service)))
    }

    fn add(mut self, pattern: &str, route: Route) -> Router<S> {
        Arc::make_mut(&mut self.table).insert(pattern, route);
        self
    }

    /// Handles events that no route matches with `handler`, instead of
    /// the default non-retryable [`ErrorKind::Rejected`] error.
    pub fn fallback<H, T>(mut self, handler: H) -> Router<S>
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let bound = Bound {
            handler,
            state: self.state.clone(),
            _args: PhantomData,
        };
        Arc::make_mut(&mut self.table).fallback = Some(Route::Handler(Arc::new(bound)));
        self
    }

    /// Handles events that no route matches with a tower service.
    pub fn fallback_service<T>(mut self, service: T) -> Router<S>
    where
        T: Service<Event> + Clone + Send + Sync + 'static,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
    {
        Arc::make_mut(&mut self.table).fallback = Some(Route::Service(boxed(service)));
        self
    }

    /// Wraps every route added so far in `layer`; routes added later and
    /// the fallback are not wrapped.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::timeout::TimeoutLayer;
    /// use watchtower_toolkit::router::Router;
    ///
    /// async fn slow() {}
    /// async fn fast() {}
    ///
    /// let router = Router::new()
    ///     .route("report.build", slow)
    ///     .route_layer(TimeoutLayer::new(Duration::from_secs(60)))
    ///     .route("ping", fast); // no timeout
    /// # drop(router);
    /// ```
    pub fn route_layer<L>(mut self, layer: L) -> Router<S>
    where
        L: Layer<RouteService>,
        L::Service: Service<Event> + Clone + Send + Sync + 'static,
        <L::Service as Service<Event>>::Error: Into<BoxError>,
        <L::Service as Service<Event>>::Future: Send + 'static,
    {
        Arc::make_mut(&mut self.table)
            .map_routes(|route| Route::Service(boxed(layer.layer(route.into_service()))));
        self
    }

    /// Mounts `router` under the type prefix `prefix`: its route `created`
    /// becomes `prefix.created`, its `*` becomes `prefix.*`. A custom
    /// fallback of `router` handles what no nested route matches under
    /// `prefix.>`.
    ///
    /// ```
    /// use watchtower_toolkit::router::Router;
    ///
    /// async fn created() {}
    /// async fn other_order_event() {}
    ///
    /// let orders = Router::new().route("created", created).fallback(other_order_event);
    /// let router = Router::new().nest("order", orders); // order.created, order.>
    /// router.check().unwrap();
    /// ```
    pub fn nest<S2>(mut self, prefix: &str, router: Router<S2>) -> Router<S> {
        let nested = Arc::unwrap_or_clone(router.table);
        Arc::make_mut(&mut self.table).nest(prefix, nested);
        self
    }

    /// Adds every route of `router` to this one. Its custom fallback, if
    /// it has one, becomes this router's, unless both have one, which is a
    /// configuration error.
    pub fn merge<S2>(mut self, router: Router<S2>) -> Router<S> {
        let other = Arc::unwrap_or_clone(router.table);
        Arc::make_mut(&mut self.table).merge(other);
        self
    }

    /// The first configuration error: a pattern that does not parse, one
    /// routed twice, two fallbacks merged.
    ///
    /// # Errors
    ///
    /// That error, of kind [`ErrorKind::Config`].
    pub fn check(&self) -> Result<(), Error> {
        match &self.table.error {
            Some(message) => Err(Error::new(ErrorKind::Config, message.clone())),
            None => Ok(()),
        }
    }

    /// The pattern of the route that would handle an event of type `ty`,
    /// or `None` if the fallback would.
    pub fn route_for(&self, ty: &str) -> Option<&str> {
        self.table.find(ty).map(|(pattern, _)| pattern)
    }
}

impl<S> Service<Event> for Router<S> {
    type Response = ();
    type Error = Error;
    type Future = RouteFuture;

    /// Ready, unless the router is misconfigured: then it fails with the
    /// configuration error (see [`Router::check`]).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match &self.table.error {
            Some(message) => Poll::Ready(Err(Error::new(ErrorKind::Config, message.clone()))),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, event: Event) -> RouteFuture {
        let future = match self.table.find(event.ty()) {
            Some((_, route)) => route.call(event),
            None => match &self.table.fallback {
                Some(route) => route.call(event),
                None => Box::pin(std::future::ready(Err(unrouted(&event)))),
            },
        };
        RouteFuture(future)
    }
}

fn unrouted(event: &Event) -> Error {
    Error::new(
        ErrorKind::Rejected,
        format!("no route for event type `{}`", event.ty()),
    )
    .with_retryable(false)
}

/// The future of a [`Router`] call.
pub struct RouteFuture(BoxFuture);

impl fmt::Debug for RouteFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteFuture").finish_non_exhaustive()
    }
}

impl std::future::Future for RouteFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}
