//! [`RabbitClient`]: the one way in. It owns a connection (healed in the
//! background) and makes publishers and subscribers.

use std::fmt;
use std::sync::Arc;

use lapin::Connection;
use watchtower::health::Health;
use watchtower::{Error, Transport};

use crate::config::{PublishOptions, QueueOptions, RabbitConfig};
use crate::connection::{Link, LinkGuard, LinkState, Setup, map_lapin_error};
use crate::publisher::{RabbitPublisher, declare_exchange};
use crate::request::RabbitRequester;
use crate::subscriber::RabbitSubscriber;

/// A connection to a RabbitMQ broker, from which publishers and
/// subscribers are made.
///
/// Cheap to clone: clones share the connection, which subscribers consume
/// on (one channel per subscription). The connection is re-opened with
/// backoff when it fails, and the exchange declared again. Each publisher
/// opens a connection of its own with the same configuration: RabbitMQ
/// throttles a connection that publishes faster than the broker takes
/// (flow control), and a consumer sharing it would have its acks held up
/// too.
///
/// The connection closes when [`close`](RabbitClient::close) is called or
/// the client, its clones, its subscribers and their subscriptions are
/// dropped.
#[derive(Clone)]
pub struct RabbitClient {
    link: Link<()>,
    guard: Arc<LinkGuard>,
}

impl fmt::Debug for RabbitClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitClient")
            .field("config", self.link.config())
            .finish_non_exhaustive()
    }
}

impl RabbitClient {
    /// Checks `config`, connects and declares the exchange (or checks it,
    /// if [passive](RabbitConfig::passive_exchange)).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for a URL that
    /// does not parse, a bad exchange name, refused credentials or an
    /// exchange that exists with other settings;
    /// [`ErrorKind::Connection`](watchtower::ErrorKind::Connection) or
    /// [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout) if the broker
    /// cannot be reached; [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected)
    /// if a passive exchange does not exist.
    pub async fn connect(config: RabbitConfig) -> Result<RabbitClient, Error> {
        let setup: Setup<()> = {
            let config = config.clone();
            Arc::new(move |connection: Arc<Connection>| {
                let config = config.clone();
                Box::pin(async move {
                    let channel = connection
                        .create_channel()
                        .await
                        .map_err(|e| map_lapin_error(&e, "open channel"))?;
                    declare_exchange(&channel, &config).await?;
                    let _ = channel.close(200, "declared".into()).await;
                    Ok(())
                })
            })
        };
        let (link, guard) = Link::connect(config, setup).await?;
        Ok(RabbitClient {
            link,
            guard: Arc::new(guard),
        })
    }

    /// A publisher with the default [`PublishOptions`].
    ///
    /// # Errors
    ///
    /// As [`publisher_with`](RabbitClient::publisher_with).
    pub async fn publisher(&self) -> Result<RabbitPublisher, Error> {
        self.publisher_with(PublishOptions::default()).await
    }

    /// A publisher: its own connection, its confirm-mode channels, the
    /// exchange declared (or checked) on it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for options the
    /// exchange cannot take (structured mode on a headers exchange), and
    /// as [`connect`](RabbitClient::connect).
    pub async fn publisher_with(&self, options: PublishOptions) -> Result<RabbitPublisher, Error> {
        RabbitPublisher::open(self.link.config().clone(), options).await
    }

    /// A requester: request–reply over direct reply-to, on a connection
    /// of its own. See [`RabbitRequester`].
    ///
    /// # Errors
    ///
    /// As [`connect`](RabbitClient::connect), for the requester's
    /// connection and channel.
    pub async fn requester(&self) -> Result<RabbitRequester, Error> {
        RabbitRequester::open(self.link.config().clone()).await
    }

    /// A subscriber with the default [`QueueOptions`], consuming on the
    /// client's connection.
    pub fn subscriber(&self) -> RabbitSubscriber {
        self.subscriber_with(QueueOptions::default())
    }

    /// A subscriber whose queues are declared from `queue`, consuming on
    /// the client's connection. Contradictory options fail with
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) when a
    /// subscription is opened.
    pub fn subscriber_with(&self, queue: QueueOptions) -> RabbitSubscriber {
        RabbitSubscriber::new(self.link.clone(), self.guard.clone(), queue)
    }

    /// The configuration the client connected with.
    pub fn config(&self) -> &RabbitConfig {
        self.link.config()
    }

    /// Closes the client's connection for every clone; open subscriptions
    /// end. Publishers, on connections of their own, are closed with
    /// [`RabbitPublisher::close`] or by dropping them.
    pub fn close(&self) {
        self.link.close();
    }

    /// Follows the connection's state: [`HealthChanges::changed`] resolves
    /// each time it goes down, comes back or closes, so that a readiness
    /// check or a test reads [`health`](Transport::health) again when
    /// there is something new instead of polling it. Changes that happen
    /// between two calls of `changed` are not missed.
    pub fn health_changes(&self) -> HealthChanges {
        HealthChanges(self.link.watch())
    }
}

/// The changes of a [`RabbitClient`]'s connection state, from
/// [`RabbitClient::health_changes`].
pub struct HealthChanges(tokio::sync::watch::Receiver<LinkState<()>>);

impl HealthChanges {
    /// Waits for the next change of the connection's state. `false` once
    /// the client's connection task has ended (the client is closed and
    /// nothing more can change).
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

impl fmt::Debug for HealthChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChanges").finish_non_exhaustive()
    }
}

impl Transport for RabbitClient {
    const SYSTEM: &'static str = "rabbitmq";

    /// Up while the connection is open and set up, degraded while it is
    /// being re-established (with the last failure, credentials removed),
    /// down once closed.
    fn health(&self) -> impl Future<Output = Health> + Send {
        let health = match self.link.state() {
            LinkState::Up(session) if session.connection.status().connected() => Health::up(Self::SYSTEM),
            LinkState::Closed => Health::down(Self::SYSTEM, "the RabbitMQ client was closed"),
            LinkState::Up(_) | LinkState::Connecting => {
                let last = self.link.health().last_error;
                Health::degraded(
                    Self::SYSTEM,
                    match last {
                        Some(reason) => format!("reconnecting: {reason}"),
                        None => "reconnecting".to_owned(),
                    },
                )
            }
        };
        std::future::ready(health)
    }
}
