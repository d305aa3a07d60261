//! The shared client: [`RedisClient`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use watchtower::health::Health;
use watchtower::{Error, Transport};

use crate::config::RedisConfig;
use crate::conn::{Backend, Conn};
use crate::error::from_redis;
use crate::publisher::{RedisPublisher, RedisPublisherOptions};
use crate::subscriber::{RedisSubscriber, RedisSubscriberOptions};

/// A connection to Redis, shared by the publishers and subscribers made
/// from it: [`publisher`](RedisClient::publisher),
/// [`subscriber`](RedisClient::subscriber), and
/// [`health`](Transport::health) through [`Transport`].
///
/// It holds the checked [`RedisConfig`] and one multiplexed connection
/// that reconnects by itself, used for `PING`s, acknowledgements, claims
/// and [batches](RedisPublisher::batched). Cloning it is
/// cheap: clones share everything. Two kinds of connection are not shared,
/// for speed: each publisher writes its `XADD`s on a connection of its own
/// (over `redis://`; see [Batching](RedisPublisher#batching)), and each
/// subscription blocks in `XREADGROUP` on a connection of its own, so that
/// its waits never hold up the commands of others.
///
/// ```no_run
/// use watchtower::Transport;
/// use watchtower_redis::{RedisClient, RedisConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RedisClient::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// assert!(client.health().await.is_up());
/// let publisher = client.publisher();
/// let subscriber = client.subscriber();
/// # drop((publisher, subscriber));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    backend: Backend,
    conn: Conn,
    /// Where publishers spawn their connection tasks: the runtime the
    /// client was made on, whose timers and sockets its connections use.
    runtime: Handle,
}

impl fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl RedisClient {
    /// Checks `config` and opens the shared connection.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for a bad URL
    /// or setting; [`ErrorKind::Connection`](watchtower::ErrorKind::Connection)
    /// or [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout) if Redis
    /// cannot be reached; [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected)
    /// if it refuses the credentials. No message holds a password.
    pub async fn connect(config: RedisConfig) -> Result<RedisClient, Error> {
        let backend = config.backend()?;
        let runtime =
            Handle::try_current().map_err(|_| Error::config("RedisClient::connect needs a Tokio runtime"))?;
        let conn = backend.connect(&config, Duration::ZERO).await?;
        Ok(RedisClient {
            inner: Arc::new(Inner {
                config,
                backend,
                conn,
                runtime,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// A publisher with the default options: no trimming, structured
    /// entries, 4096 `XADD`s pending at most. See [`RedisPublisherOptions`].
    pub fn publisher(&self) -> RedisPublisher {
        RedisPublisher::new(self.clone(), RedisPublisherOptions::new())
    }

    /// A publisher with `options`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for an option
    /// out of range (a `max_len` of 0, a
    /// [`wait_for_replicas`](RedisPublisherOptions::wait_for_replicas)
    /// timeout of zero or not shorter than the response timeout).
    pub fn publisher_with(&self, options: RedisPublisherOptions) -> Result<RedisPublisher, Error> {
        options.validate(self.config().timeouts().1)?;
        Ok(RedisPublisher::new(self.clone(), options))
    }

    /// A subscriber with the default options and a unique consumer name.
    /// See [`RedisSubscriberOptions`].
    pub fn subscriber(&self) -> RedisSubscriber {
        RedisSubscriber::new(self.clone(), RedisSubscriberOptions::new().into_options())
    }

    /// A subscriber with `options`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for an option
    /// out of range (see [`RedisSubscriberOptions`]).
    pub fn subscriber_with(&self, options: RedisSubscriberOptions) -> Result<RedisSubscriber, Error> {
        options.validate()?;
        Ok(RedisSubscriber::new(self.clone(), options.into_options()))
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The shared multiplexed connection.
    pub(crate) fn conn(&self) -> &Conn {
        &self.inner.conn
    }

    pub(crate) fn runtime(&self) -> &Handle {
        &self.inner.runtime
    }
}

/// `PING` on a multiplexed connection; on a cluster, to one of the
/// masters (a cluster connection would otherwise ask every node, and a
/// node that died stays unanswering until the cluster forgets it).
pub(crate) async fn ping(mut conn: Conn) -> Result<(), Error> {
    conn.on_master(redis::cmd("PING"))
        .await
        .map(drop)
        .map_err(|e| from_redis(e, "PING"))
}

/// Whether the cluster serves every slot (`CLUSTER INFO` on one master).
async fn cluster_state(mut conn: Conn) -> Result<(), Error> {
    let info: String = conn
        .on_master(redis::cmd("CLUSTER").arg("INFO").clone())
        .await
        .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
        .map_err(|e| from_redis(e, "CLUSTER INFO"))?;
    if info.lines().any(|line| line.trim() == "cluster_state:ok") {
        Ok(())
    } else {
        Err(Error::new(
            watchtower::ErrorKind::Connection,
            "the cluster does not serve every slot (cluster_state is not ok)",
        ))
    }
}

impl Transport for RedisClient {
    const SYSTEM: &'static str = "redis";

    /// A `PING` round trip on the shared connection (on a cluster,
    /// `CLUSTER INFO` on a master, up when every slot is served):
    /// [`Up`](watchtower::health::Status::Up) when Redis answers, else
    /// [`Down`](watchtower::health::Status::Down) with the error and the
    /// URL without credentials.
    async fn health(&self) -> Health {
        let conn = self.inner.conn.clone();
        let result = match conn {
            Conn::Single(_) => ping(conn).await,
            Conn::Cluster(_) => cluster_state(conn).await,
        };
        match result {
            Ok(()) => Health::up(Self::SYSTEM),
            Err(e) => Health::down(
                Self::SYSTEM,
                format!("{} ({})", e.message(), self.inner.config.redacted_url()),
            ),
        }
    }
}
