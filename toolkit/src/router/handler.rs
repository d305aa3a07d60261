//! Ordinary async functions as handlers: [`Handler`] and
//! [`IntoHandlerResult`].

use std::future::{Future, ready};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::Service;
use watchtower::{BoxError, Error, ErrorKind, Event};

use super::extract::FromEvent;

/// The future of a routed call.
pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'static>>;

/// What a handler may return: `()` (the event was handled), or
/// `Result<(), E>` for any error that converts into a boxed error.
///
/// A [`watchtower::Error`] keeps its kind, so its retryability decides
/// what [`serve`](watchtower::serve()) does; any other error becomes an
/// [`ErrorKind::Handler`] error, which is retryable: the event is
/// redelivered after a growing delay until the runtime's delivery limit.
/// Return an error with [`with_retryable(false)`](Error::with_retryable)
/// to send an event straight to the dead-letter path.
pub trait IntoHandlerResult {
    /// Converts the handler's output.
    ///
    /// # Errors
    ///
    /// The handler's error, as a [`watchtower::Error`].
    fn into_handler_result(self) -> Result<(), Error>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), Error> {
        Ok(())
    }
}

impl<E: Into<BoxError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), Error> {
        self.map_err(handler_error)
    }
}

/// A handler's error: WatchTower's own as it is, anything else as a
/// (retryable) handler failure.
pub(crate) fn handler_error(e: impl Into<BoxError>) -> Error {
    match e.into().downcast::<Error>() {
        Ok(e) => *e,
        Err(e) => Error::from_source(ErrorKind::Handler, e),
    }
}

/// An async function that handles events: up to eight arguments that
/// implement [`FromEvent`], returning something that implements
/// [`IntoHandlerResult`].
///
/// Implemented for every such function and closure; the type parameter
/// `T` is the tuple of its argument types, which only serves to tell the
/// implementations apart.
///
/// ```
/// use serde::Deserialize;
/// use watchtower::Error;
/// use watchtower_toolkit::router::{Data, DeliveryCount, Router};
///
/// #[derive(Deserialize)]
/// struct Shipped { order: u64 }
///
/// async fn shipped(Data(s): Data<Shipped>, DeliveryCount(n): DeliveryCount) -> Result<(), Error> {
///     println!("order {} shipped (delivery {n})", s.order);
///     Ok(())
/// }
///
/// let router = Router::new().route("order.shipped", shipped);
/// # drop(router);
/// ```
pub trait Handler<T, S>: Clone + Send + Sync + 'static {
    /// Extracts the arguments from `event` and `state` and runs the
    /// function.
    fn call(
        &self,
        event: Event,
        state: &S,
    ) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'static>>;
}

macro_rules! impl_handler {
    ($($t:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, S, $($t,)*> Handler<($($t,)*), S> for F
        where
            F: Fn($($t),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoHandlerResult,
            $($t: FromEvent<S> + Send + 'static,)*
        {
            fn call(&self, event: Event, state: &S) -> BoxFuture {
                $(
                    let $t = match $t::from_event(&event, state) {
                        Ok(value) => value,
                        Err(e) => return Box::pin(ready(Err(e))),
                    };
                )*
                drop(event);
                let fut = (self)($($t),*);
                Box::pin(async move { fut.await.into_handler_result() })
            }
        }
    };
}

impl_handler!();
impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);
impl_handler!(T1, T2, T3, T4, T5, T6);
impl_handler!(T1, T2, T3, T4, T5, T6, T7);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8);

/// A handler with its state: what a route holds.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn call(&self, event: Event) -> BoxFuture;
}

pub(crate) struct Bound<H, T, S> {
    pub(crate) handler: H,
    pub(crate) state: S,
    pub(crate) _args: PhantomData<fn() -> T>,
}

impl<H, T, S> ErasedHandler for Bound<H, T, S>
where
    H: Handler<T, S>,
    T: 'static,
    S: Send + Sync + 'static,
{
    fn call(&self, event: Event) -> BoxFuture {
        self.handler.call(event, &self.state)
    }
}

/// A [`Handler`] with its state, as a `tower::Service<Event>`: always
/// ready, cheap to clone. Made by [`HandlerExt::with_state`], and what a
/// route layer wraps.
#[derive(Clone)]
pub struct HandlerService {
    pub(crate) handler: std::sync::Arc<dyn ErasedHandler>,
}

impl std::fmt::Debug for HandlerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerService").finish_non_exhaustive()
    }
}

impl Service<Event> for HandlerService {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> BoxFuture {
        self.handler.call(event)
    }
}

/// Turns a [`Handler`] into a `tower::Service<Event>` without a router, to
/// serve one typed handler or wrap it in layers of its own.
pub trait HandlerExt<T, S>: Handler<T, S> {
    /// The handler with `state` for its [`State`](super::State) extractor,
    /// as a service.
    ///
    /// ```
    /// use watchtower_toolkit::router::{Data, HandlerExt};
    ///
    /// async fn placed(Data(id): Data<u64>) {
    ///     println!("order {id}");
    /// }
    /// let service = placed.with_state(());
    /// # drop(service);
    /// ```
    fn with_state(self, state: S) -> HandlerService
    where
        T: 'static,
        S: Send + Sync + 'static,
    {
        HandlerService {
            handler: std::sync::Arc::new(Bound {
                handler: self,
                state,
                _args: PhantomData,
            }),
        }
    }
}

impl<H: Handler<T, S>, T, S> HandlerExt<T, S> for H {}
