//! What every transport client is.

use std::future::Future;

use crate::health::Health;

/// A transport client: the value `XClient::connect(config)` returns (or an
/// in-process equivalent such as `MemoryBroker::new()`), from which
/// publishers and subscribers are made.
///
/// Every transport implements it the same way, so that code generic over
/// transports (the health view of `watchtower-layers`, the conformance
/// suite, an application's own start-up checks) needs no adapter:
///
/// * [`SYSTEM`](Transport::SYSTEM) is the transport's `messaging.system`
///   name, declared once: it names the transport in [spans](crate::trace),
///   [deliveries](crate::Delivery::system) and [health](Health::system);
/// * [`health`](Transport::health) asks the connection how it is.
///
/// # Example
///
/// ```
/// use watchtower::Transport;
/// use watchtower::health::Status;
///
/// async fn all_up<T: Transport>(clients: &[T]) -> bool {
///     for client in clients {
///         if client.health().await.status() != Status::Up {
///             return false;
///         }
///     }
///     true
/// }
/// ```
pub trait Transport: Clone + Send + Sync + 'static {
    /// The transport's `messaging.system` name, as the OpenTelemetry
    /// semantic conventions spell it where they name one (`"nats"`,
    /// `"redis"`, `"rabbitmq"`).
    const SYSTEM: &'static str;

    /// How the client's connection is: [`Status::Up`](crate::health::Status::Up)
    /// only when the broker answered just now (a round trip, a `PING`) or,
    /// for clients without a request of their own, when the connection is
    /// open. Never fails: an unreachable broker is a
    /// [`Status::Down`](crate::health::Status::Down) health with the reason.
    fn health(&self) -> impl Future<Output = Health> + Send;
}
