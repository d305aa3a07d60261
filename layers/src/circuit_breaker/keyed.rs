//! One breaker per key, with bounded memory.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tower::{Layer, Service};
use watchtower::{BoxError, Error, Event};

use super::config::CircuitBreakerConfig;
use super::future::ResponseFuture;
use super::state::{Breaker, CircuitBreakerHandle, State};
use crate::metrics::BreakerMetrics;

/// A registry of breakers, one per key, all built from one config.
///
/// When full, adding a key evicts the least recently used *closed* breaker
/// (or, if none is closed, the least recently used one), so memory stays
/// bounded and, as long as there is room, an open breaker is never
/// forgotten. Clones share the registry.
///
/// ```
/// use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, KeyedBreakers, State};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let breakers = KeyedBreakers::new(CircuitBreakerConfig::new(), 100);
/// let handle = breakers.get("https://example.com/hook".to_owned());
/// assert_eq!(handle.state(), State::Closed);
/// assert_eq!(breakers.len(), 1);
/// # }
/// ```
pub struct KeyedBreakers<K> {
    shared: Arc<Registry<K>>,
}

struct Registry<K> {
    config: CircuitBreakerConfig,
    max_keys: usize,
    map: Mutex<Lru<K>>,
    /// Shared by every key's breaker, without a state gauge.
    metrics: BreakerMetrics,
}

struct Lru<K> {
    entries: HashMap<K, (Arc<Breaker>, u64)>,
    clock: u64,
}

impl<K> Clone for KeyedBreakers<K> {
    fn clone(&self) -> Self {
        KeyedBreakers {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedBreakers<K> {
    /// A registry of at most `max_keys` breakers (at least 1). 1,024 is a
    /// good bound for the endpoints of a busy webhook sender: a few hundred
    /// kilobytes.
    pub fn new(config: CircuitBreakerConfig, max_keys: usize) -> Self {
        KeyedBreakers {
            shared: Arc::new(Registry {
                metrics: BreakerMetrics::new(&config.name, false),
                config,
                max_keys: max_keys.max(1),
                map: Mutex::new(Lru {
                    entries: HashMap::new(),
                    clock: 0,
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru<K>> {
        self.shared.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn breaker(&self, key: &K) -> Arc<Breaker> {
        let mut lru = self.lock();
        lru.clock += 1;
        let now = lru.clock;
        if let Some((breaker, used)) = lru.entries.get_mut(key) {
            *used = now;
            return breaker.clone();
        }
        if lru.entries.len() >= self.shared.max_keys {
            let victim = lru
                .entries
                .iter()
                .min_by_key(|(_, (b, used))| (b.state() != State::Closed, *used))
                .map(|(k, _)| k.clone());
            if let Some(victim) = victim {
                lru.entries.remove(&victim);
            }
        }
        let breaker = Breaker::with_metrics(self.shared.config.clone(), self.shared.metrics.clone());
        lru.entries.insert(key.clone(), (breaker.clone(), now));
        breaker
    }

    /// The breaker for `key`, created closed if it was not there.
    pub fn get(&self, key: K) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            breaker: self.breaker(&key),
        }
    }

    /// Handles on every live breaker.
    pub fn handles(&self) -> Vec<(K, CircuitBreakerHandle)> {
        self.lock()
            .entries
            .iter()
            .map(|(k, (b, _))| (k.clone(), CircuitBreakerHandle { breaker: b.clone() }))
            .collect()
    }

    /// How many breakers are live.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no breaker is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K> fmt::Debug for KeyedBreakers<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakers")
            .field("max_keys", &self.shared.max_keys)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Wraps services in a [`KeyedCircuitBreaker`]: one breaker per key, the
/// key taken from each event by `key_fn`.
#[derive(Clone)]
pub struct KeyedCircuitBreakerLayer<K, F> {
    breakers: KeyedBreakers<K>,
    key_fn: F,
}

impl<K, F> KeyedCircuitBreakerLayer<K, F>
where
    K: Eq + Hash + Clone,
    F: Fn(&Event) -> K + Clone,
{
    /// Breakers built from `config`, at most `max_keys` of them, keyed by
    /// `key_fn`.
    pub fn new(config: CircuitBreakerConfig, max_keys: usize, key_fn: F) -> Self {
        KeyedCircuitBreakerLayer {
            breakers: KeyedBreakers::new(config, max_keys),
            key_fn,
        }
    }

    /// The registry, to read or steer the breakers.
    pub fn breakers(&self) -> KeyedBreakers<K> {
        self.breakers.clone()
    }
}

impl<K, F> fmt::Debug for KeyedCircuitBreakerLayer<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("breakers", &self.breakers)
            .finish_non_exhaustive()
    }
}

impl<S, K: Clone, F: Clone> Layer<S> for KeyedCircuitBreakerLayer<K, F> {
    type Service = KeyedCircuitBreaker<S, K, F>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            breakers: self.breakers.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

/// One circuit breaker per key in front of `S`.
///
/// The key comes from the event, which `poll_ready` has not seen, so this
/// service is ready when `S` is and decides in `call`: an event whose
/// breaker is open resolves at once with [`ErrorKind::CircuitOpen`] and the
/// event attached, and `S` is not called. A caller that knows the key
/// before it has the event (a webhook sender with its URL) can ask
/// [`KeyedBreakers::get`] first.
///
/// [`ErrorKind::CircuitOpen`]: watchtower::ErrorKind::CircuitOpen
#[derive(Clone)]
pub struct KeyedCircuitBreaker<S, K, F> {
    inner: S,
    breakers: KeyedBreakers<K>,
    key_fn: F,
}

impl<S, K, F> KeyedCircuitBreaker<S, K, F> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, K, F> fmt::Debug for KeyedCircuitBreaker<S, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .field("breakers", &self.breakers)
            .finish_non_exhaustive()
    }
}

impl<S, K, F> Service<Event> for KeyedCircuitBreaker<S, K, F>
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
    K: Eq + Hash + Clone,
    F: Fn(&Event) -> K,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(|e| Error::from_boxed(e.into()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let breaker = self.breakers.breaker(&(self.key_fn)(&event));
        match breaker.acquire() {
            Ok(grant) => {
                let permit = breaker.start(grant);
                ResponseFuture::called(self.inner.call(event), permit)
            }
            Err(rejection) => {
                breaker.rejected();
                ResponseFuture::failed(breaker.open_error(&rejection).with_event(event))
            }
        }
    }
}
