use std::sync::Arc;

use tower::Layer;

use super::config::CircuitBreakerConfig;
use super::service::CircuitBreaker;
use super::state::{Breaker, CircuitBreakerHandle};

/// Wraps services in one shared [`CircuitBreaker`].
///
/// Every service this layer wraps, and every clone of them, shares the
/// same breaker, so one layer guards one downstream. Use
/// [`handle`](Self::handle) to watch or steer it.
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer {
    handle: CircuitBreakerHandle,
}

impl CircuitBreakerLayer {
    /// A layer with a new breaker configured by `config`.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        CircuitBreakerLayer {
            handle: CircuitBreakerHandle {
                breaker: Breaker::new(config),
            },
        }
    }

    /// A handle on the breaker: state, metrics, force open, reset.
    pub fn handle(&self) -> CircuitBreakerHandle {
        self.handle.clone()
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        CircuitBreakerLayer::new(CircuitBreakerConfig::default())
    }
}

impl From<CircuitBreakerConfig> for CircuitBreakerLayer {
    fn from(config: CircuitBreakerConfig) -> Self {
        CircuitBreakerLayer::new(config)
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::with_breaker(inner, Arc::clone(&self.handle.breaker))
    }
}
