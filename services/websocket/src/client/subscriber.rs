use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::{mpsc, oneshot};
use watchtower::{Acker, Capabilities, Delivery, Error, ErrorKind, SubscribeOptions, Subscriber};

use super::{Command, Handle, Subscription, lock};

/// Subscribes to topic patterns on the hub: a [`Subscriber`].
///
/// Each [`open`](Subscriber::open) sends a `subscribe` control message and
/// waits for the hub to confirm it, so events the hub publishes after
/// `open` returns reach the subscription. Subscriptions are sent again
/// after every reconnect. Consumer groups and replay are not supported
/// ([`CAPABILITIES`](WsSubscriber::CAPABILITIES)).
#[derive(Clone)]
pub struct WsSubscriber {
    handle: Arc<Handle>,
}

impl fmt::Debug for WsSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsSubscriber")
            .field("state", &*self.handle.shared.state.borrow())
            .finish()
    }
}

impl WsSubscriber {
    /// What the transport can do: wildcard patterns, and events from one
    /// publisher on one topic arrive in order. No persistence, no consumer
    /// groups, no redelivery, no replay: delivery is at most once.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE.wildcards(true).ordered(true);

    pub(crate) fn new(handle: Arc<Handle>) -> WsSubscriber {
        WsSubscriber { handle }
    }
}

impl Subscriber for WsSubscriber {
    type Acker = WsAcker;
    type Subscription = WsSubscription;

    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a consumer group or replay,
    /// [`ErrorKind::InvalidTopic`] if the hub finds a pattern invalid,
    /// [`ErrorKind::Rejected`] (not retryable) if the hub does not allow
    /// this connection a pattern or the subscription is over the
    /// connection's limits, [`ErrorKind::Throttled`] if the client sent
    /// control messages faster than the hub allows,
    /// [`ErrorKind::Timeout`] if the hub does not confirm within the
    /// [request timeout](crate::WsConfig::request_timeout), and
    /// [`ErrorKind::Closed`] if the client is closed.
    async fn open(&self, options: SubscribeOptions) -> Result<WsSubscription, Error> {
        if options.group_name().is_some() {
            return Err(Error::config("the websocket transport has no consumer groups"));
        }
        if options.is_replay() {
            return Err(Error::config("the websocket transport keeps no events to replay"));
        }
        let shared = &self.handle.shared;
        if shared.shutdown.is_cancelled() {
            return Err(Error::closed("websocket client is closed"));
        }
        let id = shared.next_sub.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(shared.config.subscription_buffer);
        let (confirmed, confirmation) = oneshot::channel();
        lock(&shared.subs).insert(
            id,
            Subscription {
                patterns: options.patterns().to_vec(),
                tx,
                confirmed: Some(confirmed),
            },
        );
        let subscription = WsSubscription {
            rx,
            id,
            handle: self.handle.clone(),
        };
        let _ = shared.commands.send(Command::Subscribe(id));
        let timeout: Duration = shared.config.request_timeout;
        match tokio::time::timeout(timeout, confirmation).await {
            Ok(Ok(Ok(()))) => Ok(subscription),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::closed("websocket client closed")),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("the hub did not confirm the subscription within {timeout:?}"),
            )),
        }
    }
}

/// A subscription's stream of deliveries. Dropping it unsubscribes.
///
/// An `Err` item is a failure the subscription survived: the connection
/// dropped ([`ErrorKind::Connection`]; it is being re-established, events
/// sent meanwhile are missed) or the hub dropped events because this client
/// fell behind ([`ErrorKind::Dropped`]). The stream ends when the client
/// closes.
pub struct WsSubscription {
    rx: mpsc::Receiver<Result<Delivery<WsAcker>, Error>>,
    id: u64,
    handle: Arc<Handle>,
}

impl fmt::Debug for WsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsSubscription").field("id", &self.id).finish()
    }
}

impl Stream for WsSubscription {
    type Item = Result<Delivery<WsAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for WsSubscription {
    fn drop(&mut self) {
        let shared = &self.handle.shared;
        if lock(&shared.subs).remove(&self.id).is_some() {
            let _ = shared.commands.send(Command::Unsubscribe(self.id));
        }
    }
}

/// Settles a WebSocket delivery: there is nothing to settle, since the hub
/// keeps no events. `ack`, `nack` and `reject` succeed and do nothing; a
/// nacked event is not delivered again.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct WsAcker;

impl Acker for WsAcker {
    async fn ack(self) -> Result<(), Error> {
        Ok(())
    }

    async fn nack(self, _delay: Option<Duration>) -> Result<(), Error> {
        Ok(())
    }

    async fn reject(self) -> Result<(), Error> {
        Ok(())
    }
}
