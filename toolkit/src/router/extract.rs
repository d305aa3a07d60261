//! What a handler can take as arguments: [`FromEvent`] and its
//! implementations.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use watchtower::{Error, Event, ext};

/// Something a handler takes as an argument, made from the event it
/// handles and the router's state (the router's counterpart of axum's
/// `FromRequestParts`).
///
/// Extraction is synchronous: everything a handler can take is in the
/// event or the state already, so no extractor waits for I/O, and a failed
/// extraction costs no allocation beyond its error.
///
/// # Errors
///
/// An extractor that fails fails the event: the router answers its error
/// without calling the handler, and [`serve`](watchtower::serve()) settles
/// the delivery by that error's kind (see [`Data`]).
///
/// # Example
///
/// ```
/// use watchtower::{Error, ErrorKind, Event};
/// use watchtower_toolkit::router::FromEvent;
///
/// /// The tenant an event belongs to, from its `tenant` extension.
/// struct Tenant(String);
///
/// impl<S> FromEvent<S> for Tenant {
///     fn from_event(event: &Event, _state: &S) -> Result<Self, Error> {
///         event
///             .extension("tenant")
///             .map(|t| Tenant(t.to_owned()))
///             .ok_or_else(|| Error::new(ErrorKind::InvalidEvent, "no tenant extension").with_retryable(false))
///     }
/// }
/// ```
pub trait FromEvent<S>: Sized {
    /// Extracts `Self`.
    ///
    /// # Errors
    ///
    /// When the event does not carry what `Self` needs.
    fn from_event(event: &Event, state: &S) -> Result<Self, Error>;
}

impl<S> FromEvent<S> for Event {
    fn from_event(event: &Event, _state: &S) -> Result<Self, Error> {
        Ok(event.clone())
    }
}

impl<S, T: FromEvent<S>> FromEvent<S> for Option<T> {
    fn from_event(event: &Event, state: &S) -> Result<Self, Error> {
        Ok(T::from_event(event, state).ok())
    }
}

impl<S, T: FromEvent<S>> FromEvent<S> for Result<T, Error> {
    fn from_event(event: &Event, state: &S) -> Result<Self, Error> {
        Ok(T::from_event(event, state))
    }
}

/// The event's JSON payload, deserialised with serde.
///
/// # Errors
///
/// A payload that is missing, not JSON, or does not deserialise into `T`
/// fails with [`ErrorKind::Decode`](watchtower::ErrorKind::Decode), which
/// is not retryable: [`serve`](watchtower::serve()) sends the event at once
/// to its dead-letter path, with serde's message as the
/// `deadletterreason` and `decode` as the `deadletterkind`, instead of
/// redelivering a payload that will never decode. Take `Option<Data<T>>`
/// or `Result<Data<T>, Error>` to handle a bad payload yourself.
///
/// ```
/// use serde::Deserialize;
/// use watchtower_toolkit::router::Data;
///
/// #[derive(Deserialize)]
/// struct OrderPlaced { id: u64 }
///
/// async fn placed(Data(order): Data<OrderPlaced>) {
///     println!("order {}", order.id);
/// }
/// # let _ = placed;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Data<T>(pub T);

impl<S, T: DeserializeOwned> FromEvent<S> for Data<T> {
    fn from_event(event: &Event, _state: &S) -> Result<Self, Error> {
        match event.json() {
            Ok(data) => Ok(Data(data)),
            // The core's decode error says what serde said; name the event
            // type so that the dead letter says which route refused it.
            Err(e) => Err(Error::new(
                e.kind(),
                format!("payload of `{}` does not decode: {}", event.ty(), e.message()),
            )
            .with_retryable(false)
            .with_source(e)),
        }
    }
}

impl<T> Deref for Data<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Data<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The router's shared state, given to
/// [`Router::with_state`](super::Router::with_state), cloned into each
/// call (wrap large state in an `Arc`).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use watchtower_toolkit::router::{Router, State};
///
/// async fn count(State(seen): State<Arc<AtomicU64>>) {
///     seen.fetch_add(1, Ordering::Relaxed);
/// }
///
/// let router = Router::with_state(Arc::new(AtomicU64::new(0))).route("order.*", count);
/// # drop(router);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State<S>(pub S);

impl<S: Clone> FromEvent<S> for State<S> {
    fn from_event(_event: &Event, state: &S) -> Result<Self, Error> {
        Ok(State(state.clone()))
    }
}

impl<S> Deref for State<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.0
    }
}

/// How many times the transport has delivered this event: 1 the first
/// time.
///
/// [`serve`](watchtower::serve()) writes the transport's delivery count
/// into the event's `attempt` extension when it is above 1; this reads it
/// back (1 when it is absent or not a number). A handler that must know
/// whether an earlier attempt may have done part of its work reads it
/// here.
///
/// ```
/// use watchtower_toolkit::router::DeliveryCount;
///
/// async fn handler(DeliveryCount(count): DeliveryCount) {
///     if count > 1 {
///         println!("delivered {count} times; checking for earlier effects");
///     }
/// }
/// # let _ = handler;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryCount(pub u32);

impl<S> FromEvent<S> for DeliveryCount {
    fn from_event(event: &Event, _state: &S) -> Result<Self, Error> {
        let count = event
            .extension(ext::ATTEMPT)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        Ok(DeliveryCount(count))
    }
}

/// The event's CloudEvents attributes and extensions, read through the
/// event (cheap: the event is shared, not copied).
///
/// ```
/// use watchtower_toolkit::router::Attributes;
///
/// async fn handler(attributes: Attributes) {
///     println!("{} from {}, tenant {:?}", attributes.id(), attributes.source(), attributes.extension("tenant"));
/// }
/// # let _ = handler;
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Attributes(Event);

impl Attributes {
    /// The event's `id`.
    pub fn id(&self) -> &str {
        self.0.id()
    }

    /// The event's `type`.
    pub fn ty(&self) -> &str {
        self.0.ty()
    }

    /// The event's `source`.
    pub fn source(&self) -> &str {
        self.0.source()
    }

    /// The event's `subject`, if set.
    pub fn subject(&self) -> Option<&str> {
        self.0.subject()
    }

    /// The topic the event arrived on.
    pub fn topic(&self) -> &str {
        self.0.topic()
    }

    /// The extension `name`, if set.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.0.extension(name)
    }

    /// Every extension, sorted by name.
    pub fn extensions(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.0.extensions()
    }

    /// The whole event.
    pub fn event(&self) -> &Event {
        &self.0
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attributes")
            .field("id", &self.id())
            .field("type", &self.ty())
            .field("source", &self.source())
            .finish_non_exhaustive()
    }
}

impl<S> FromEvent<S> for Attributes {
    fn from_event(event: &Event, _state: &S) -> Result<Self, Error> {
        Ok(Attributes(event.clone()))
    }
}

/// The topic the event arrived on (its subject, stream or routing key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(pub Arc<str>);

impl<S> FromEvent<S> for Topic {
    fn from_event(event: &Event, _state: &S) -> Result<Self, Error> {
        Ok(Topic(event.shared_topic()))
    }
}

impl Deref for Topic {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}
