//! Test support shared by the WatchTower crates' tests: names no other test
//! uses, free ports, waiting with a deadline, private broker processes a
//! test may kill, restart or freeze, a TCP proxy that cuts or stalls
//! connections to a broker, and clusters of private brokers
//! ([`NatsCluster`], [`RedisCluster`], [`RabbitCluster`]) for the tests of
//! scaling out.
//!
//! The shared brokers (NATS 4222, Redis 6379, RabbitMQ 5672) are never
//! stopped or reconfigured by a test: a test names what it creates with
//! [`unique`], and a fault test runs its own [`NatsServer`] or
//! [`RedisServer`], or puts a [`TcpProxy`] in front of a shared broker.
//!
//! # Example
//!
//! ```no_run
//! use watchtower_test_support::{NatsServer, TcpProxy, unique, within};
//!
//! # async fn f() {
//! let stream = unique("orders"); // a stream, subject token, key or queue name
//! let server = NatsServer::start().await; // nats-server -js on a free port
//! let proxy = TcpProxy::start(server.addr()).await.unwrap();
//! let url = format!("nats://{}", proxy.addr()); // connect a client here
//! proxy.cut(); // every open connection is closed
//! server.freeze().await; // the server answers nothing ...
//! server.resume(); // ... until it runs again
//! within("the client to reconnect", async { /* wait on the event */ }).await;
//! # let _ = (stream, url);
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

mod cluster;
#[cfg(feature = "faults")]
mod faults;
#[cfg(feature = "otel")]
pub mod otel;
mod process;
mod proxy;

pub use cluster::{NatsCluster, RabbitCluster, RedisCluster};
#[cfg(feature = "faults")]
pub use faults::{FaultRun, patient_retries, publish_through_faults};
pub use process::{Broker, BrokerProcess, Nats, NatsServer, Rabbit, RabbitNode, Redis, RedisServer};
pub use proxy::TcpProxy;
/// A name unique per process and call, made of `prefix`, `_` and lowercase
/// hex digits: a NATS subject token or stream name, a Redis key, a RabbitMQ
/// queue or exchange name. The conformance suite's own, so every test names
/// things one way.
pub use watchtower::conformance::unique;

/// The longest a test waits for what it expects: 30 s, generous for a
/// loaded CI machine (the conformance suite's [`WAIT`](watchtower::conformance::WAIT));
/// a passing test takes a fraction of it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test if it has not finished within
/// [`PATIENCE`].
///
/// # Panics
///
/// After [`PATIENCE`], with a message naming `what`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use watchtower_test_support::within;
///
/// let answer = within("the answer", async { 42 }).await;
/// assert_eq!(answer, 42);
/// # }
/// ```
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {PATIENCE:?}"))
}

/// A TCP port of 127.0.0.1 that nothing listened on when it was asked for,
/// and that no earlier call in this process returned.
///
/// The port is free, not reserved: bind it soon (a private broker does).
/// It is taken from below the range the system hands out to outgoing
/// connections (ports 20000 to 32767), so that a client connecting
/// somewhere meanwhile cannot take it; and it is never handed out twice in
/// a process, so that the ports of one cluster (client, route and bus
/// ports chosen before any server binds them) never clash.
///
/// # Panics
///
/// If no port can be bound.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher as _, RandomState};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let random = RandomState::new();
    for attempt in 0u64.. {
        let port = if attempt < 1000 {
            // A random port of the range, from the standard library's
            // randomly keyed hasher.
            20_000 + (random.hash_one(attempt) % 12_768) as u16
        } else {
            0
        };
        let bound = std::net::TcpListener::bind(("127.0.0.1", port))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port());
        let port = match bound {
            Ok(port) => port,
            Err(_) if port != 0 => continue,
            Err(e) => panic!("no free port on 127.0.0.1: {e}"),
        };
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    unreachable!("the loop returns a port")
}
