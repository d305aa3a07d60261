//! A real hub on 127.0.0.1 for the tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use futures_util::StreamExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use watchtower::{Delivery, Error, Event};
use watchtower_test_support::within;
use watchtower_websocket::{WsAcker, WsConfig, WsHub, WsSubscription};

pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `hub` at `/events` on a free port.
    pub async fn start(hub: &WsHub) -> Server {
        Server::start_on(hub, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Serves `hub` at `/events` on `addr`.
    pub async fn start_on(hub: &WsHub, addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let app = hub.router::<()>("/events");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { addr, task }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/events", self.addr)
    }

    pub fn config(&self) -> WsConfig {
        WsConfig::new(self.url())
    }

    /// Stops accepting connections and frees the port.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The next event of a subscription, skipping reported errors.
pub async fn next_event(sub: &mut WsSubscription) -> Event {
    loop {
        match within("the next event", sub.next()).await {
            Some(Ok(delivery)) => return event_of(delivery),
            Some(Err(_)) => continue,
            None => panic!("subscription ended"),
        }
    }
}

pub fn event_of(delivery: Delivery<WsAcker>) -> Event {
    delivery.event().cloned().expect("an event, not a poison message")
}

pub type Collected = tokio::sync::mpsc::UnboundedReceiver<Event>;

/// A handler that forwards every event into a channel.
pub fn collecting_handler() -> (
    impl tower::Service<Event, Response = (), Error = Error, Future: Send> + Clone + Send + Sync + 'static,
    Collected,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = tower::service_fn(move |event: Event| {
        let sent = tx.send(event);
        async move { sent.map_err(|_| Error::closed("test over")) }
    });
    (handler, rx)
}
