//! The client's reconnects, queue, acknowledgements and keepalive.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]
mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::net::TcpListener;
use tower::{Service as _, ServiceExt as _};
use watchtower::health::Status;
use watchtower::prelude::*;
use watchtower_test_support::{unique, within};
use watchtower_websocket::{ConnectionState, WsClient, WsConfig, WsHub};

use support::*;

async fn wait_state(client: &WsClient, want: fn(&ConnectionState) -> bool) {
    let mut states = client.state_changes();
    within("the connection state change", states.wait_for(want))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_after_a_server_restart_and_nothing_is_lost_silently() {
    let hub = WsHub::new();
    let server = Server::start(&hub).await;
    let addr = server.addr;
    let config = server
        .config()
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .queue_capacity(6)
        .overflow(Overflow::DropOldest);
    let client = WsClient::connect(config).await.unwrap();
    assert_eq!(client.health().await.status(), Status::Up);
    assert_eq!(hub.health().await.status(), Status::Up);
    let ns = unique("ws");
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.>")]).unwrap())
        .await
        .unwrap();
    let before = Event::new(format!("{ns}.before"), serde_json::json!({}));
    hub.clone().publish(before.clone()).await.unwrap();
    assert_eq!(next_event(&mut sub).await, before);

    // The server goes away: connections closed, port freed.
    hub.shutdown().await;
    let health = hub.health().await;
    assert_eq!((health.system(), health.status()), ("websocket", Status::Down));
    server.stop().await;
    wait_state(&client, |s| matches!(s, ConnectionState::Connecting { .. })).await;
    let health = client.health().await;
    assert_eq!(
        (health.system(), health.status()),
        ("websocket", Status::Degraded)
    );

    // Published while disconnected: the queue holds 6, the 4 oldest are
    // dropped and reported with their events.
    let mut publisher = client.publisher();
    let sent: Vec<Event> = (0..10)
        .map(|i| Event::new(format!("{ns}.offline"), serde_json::json!({"i": i})))
        .collect();
    let mut responses = Vec::new();
    for e in &sent {
        responses.push(publisher.ready().await.unwrap().call(e.clone()));
    }
    assert_eq!(publisher.queued(), 6);

    let (handler, mut from_clients) = collecting_handler();
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start_on(&hub, addr).await;
    within("the reconnect", client.connected()).await.unwrap();
    assert_eq!(client.health().await.status(), Status::Up);

    let (mut delivered, mut dropped) = (Vec::new(), Vec::new());
    for response in responses {
        match within("the publish result", response).await {
            Ok(receipt) => delivered.push(receipt.event_id.to_string()),
            Err(mut e) => {
                assert_eq!(e.kind(), ErrorKind::Dropped, "{e}");
                dropped.push(e.take_event().expect("the dropped event").id().to_owned());
            }
        }
    }
    assert_eq!(delivered.len() + dropped.len(), sent.len());
    assert_eq!(dropped.len(), 4);
    let ids: Vec<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(dropped, ids[..4]);
    assert_eq!(delivered, ids[4..]);
    for id in &delivered {
        let got = within("the hub's handler", from_clients.recv()).await.unwrap();
        assert_eq!(got.id(), id);
    }

    // Resubscribed: events published now arrive; the subscription said it
    // lost its connection in between.
    let after = Event::new(format!("{ns}.after"), serde_json::json!({}));
    assert_eq!(hub.broadcast(&after).unwrap(), 1);
    let mut errors = 0;
    let got = loop {
        match within("the event after the restart", sub.next()).await {
            Some(Ok(d)) => break event_of(d),
            Some(Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
                errors += 1;
            }
            None => panic!("subscription ended"),
        }
    };
    assert_eq!(got, after);
    assert_eq!(errors, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_queue_holds_events_until_the_hub_is_back() {
    // Nothing listens yet: the client queues, poll_ready blocks when full.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = watchtower_websocket::WsConfig::new(format!("ws://{addr}/events"))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .queue_capacity(3);
    let client = WsClient::lazy(config).unwrap();
    let mut publisher = client.publisher();
    let sent: Vec<Event> = (0..3)
        .map(|i| Event::new("q.a", serde_json::json!({"i": i})))
        .collect();
    let mut responses = Vec::new();
    for e in &sent {
        responses.push(publisher.ready().await.unwrap().call(e.clone()));
    }
    let mut ready = tokio_test_ready(&mut publisher);
    assert!(ready.as_mut().now_or_never().is_none(), "full queue: not ready");

    let (handler, mut from_clients) = collecting_handler();
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start_on(&hub, addr).await;
    for (response, e) in responses.into_iter().zip(&sent) {
        within("the publish", response).await.unwrap();
        assert_eq!(within("the handler", from_clients.recv()).await.unwrap(), *e);
    }
    within("readiness once the queue drained", ready).await.unwrap();
    server.stop().await;
}

fn tokio_test_ready(
    publisher: &mut watchtower_websocket::WsPublisher,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<(), Error>> + '_>> {
    Box::pin(async move { publisher.ready().await.map(|_| ()) })
}

trait NowOrNever: std::future::Future {
    fn now_or_never(self) -> Option<Self::Output>;
}

impl<F: std::future::Future> NowOrNever for F {
    fn now_or_never(self) -> Option<F::Output> {
        futures_util::FutureExt::now_or_never(self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acks_a_publish_resolves_on_the_hubs_verdict() {
    let handler = tower::service_fn(|event: Event| async move {
        if event.ty().ends_with("bad") {
            Err(Error::new(ErrorKind::Handler, "refused"))
        } else {
            Ok(())
        }
    });
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start(&hub).await;
    let client = WsClient::connect(server.config().acks(true)).await.unwrap();
    let mut publisher = client.publisher();
    publisher
        .publish(Event::new("x.good", serde_json::json!({})))
        .await
        .unwrap();
    let bad = Event::new("x.bad", serde_json::json!({}));
    let mut err = publisher.publish(bad.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(err.take_event(), Some(bad));

    // Close waits for the outstanding acknowledgements.
    let responses: Vec<_> = (0..50)
        .map(|i| publisher.call(Event::new("x.good", serde_json::json!({"i": i}))))
        .collect();
    client.close().await;
    for r in responses {
        r.await.unwrap();
    }
    let stats = hub.stats();
    assert_eq!((stats.received, stats.handler_errors), (52, 1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hub_is_detected_by_keepalive() {
    // A server that completes the upgrade and then never reads or answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_hdr_async(
                tcp,
                |_req: &_, mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    resp.headers_mut()
                        .insert("sec-websocket-protocol", "watchtower.v1".parse().unwrap());
                    Ok(resp)
                },
            )
            .await
            .unwrap();
            accepted_tx.send(ws).unwrap();
        }
    });
    let config = watchtower_websocket::WsConfig::new(format!("ws://{addr}/events"))
        .ping_interval(Duration::from_millis(20))
        .idle_timeout(Duration::from_millis(100))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50));
    let client = WsClient::connect(config).await.unwrap();
    let _first = within("the first connection", accepted.recv()).await.unwrap();
    // Silence from the hub: the client gives up on the connection and dials again.
    let _second = within("a reconnect", accepted.recv()).await.unwrap();
    drop(client);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_drops_clients_that_stop_answering_pings() {
    let hub = WsHub::builder()
        .ping_interval(Duration::from_millis(20))
        .idle_timeout(Duration::from_millis(100))
        .build();
    let server = Server::start(&hub).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(server.url()).unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "watchtower.v1".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    // The hub counts the connection once its side of the upgrade is done,
    // which may be just after the client's (and on a loaded machine the
    // silent client may be dropped again before this test looks).
    within("the hub accepting the client", async {
        while hub.stats().accepted == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(hub.stats().accepted, 1);
    // The client never reads, so never answers a ping.
    within("the hub dropping the silent client", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(ws);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_performs_the_handshake_and_ends_subscriptions() {
    let hub = WsHub::new();
    let server = Server::start(&hub).await;
    let client = WsClient::connect(server.config()).await.unwrap();
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new(["a.*"]).unwrap())
        .await
        .unwrap();
    let subscriber = client.subscriber();
    client.close().await;
    assert!(within("the end of the subscription", sub.next()).await.is_none());
    assert_eq!(
        subscriber
            .open(SubscribeOptions::new(["a.*"]).unwrap())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Closed
    );
    within("the hub seeing the close", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down);
    assert_eq!(health.reason(), Some("websocket client is closed"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_newest_refuses_at_once_and_close_returns_what_was_queued() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = watchtower_websocket::WsConfig::new(format!("ws://{addr}/events"))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .queue_capacity(2)
        .overflow(Overflow::DropNewest);
    let client = WsClient::lazy(config).unwrap();
    let mut publisher = client.publisher();
    let sent: Vec<Event> = (0..3)
        .map(|i| Event::new("q.a", serde_json::json!({"i": i})))
        .collect();
    let mut responses = Vec::new();
    for e in &sent {
        responses.push(publisher.ready().await.unwrap().call(e.clone()));
    }
    let third = responses.pop().unwrap();
    let mut err = within("the refusal", third).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Dropped);
    assert_eq!(err.take_event().as_ref(), Some(&sent[2]));

    client.close().await;
    for (response, e) in responses.into_iter().zip(&sent) {
        let mut err = within("the queued event coming back", response)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
        assert_eq!(err.take_event().as_ref(), Some(e));
    }
    let mut late = publisher.call(sent[0].clone()).await.unwrap_err();
    assert_eq!(late.kind(), ErrorKind::Closed);
    assert_eq!(late.take_event().as_ref(), Some(&sent[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_callers_timed_out_are_never_sent() {
    // Nothing listens: the client queues while its callers wait.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = watchtower_websocket::WsConfig::new(format!("ws://{addr}/events"))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .queue_capacity(6);
    let client = WsClient::lazy(config).unwrap();
    let mut publisher = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(50))
        .service(client.publisher());
    let ns = unique("ws");
    // More than the queue holds: slots of callers who gave up are reused,
    // and two are still queued when the hub comes back.
    for i in 0..8 {
        let event = Event::new(format!("{ns}.late"), serde_json::json!({"i": i}));
        let err = within("the timeout", async {
            publisher.ready().await.unwrap().call(event).await
        })
        .await
        .unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }

    // The hub comes back: only the event whose caller still waits arrives.
    let (handler, mut from_clients) = collecting_handler();
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start_on(&hub, addr).await;
    let waited = Event::new(format!("{ns}.waited"), serde_json::json!({}));
    within("the publish", client.publisher().publish(waited.clone()))
        .await
        .unwrap();
    assert_eq!(within("the handler", from_clients.recv()).await.unwrap(), waited);
    client.close().await;
    within("the connection to end", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        hub.stats().received,
        1,
        "the hub saw none of the timed-out events"
    );
    assert!(from_clients.try_recv().is_err());
    assert_eq!(client.abandoned(), 8);
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_header_or_url_fails_connect_with_a_config_error_that_hides_the_value() {
    let hub = WsHub::new();
    let server = Server::start(&hub).await;
    let config = server.config().bearer("s3cret\n");
    let err = WsClient::connect(config.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let err = WsClient::lazy(config).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = WsClient::connect(server.config().header("bad header", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = WsClient::connect(WsConfig::new("not a url")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(hub.stats().accepted, 0);
    server.stop().await;
}
