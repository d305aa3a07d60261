//! The hub and client against a real server on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self, Message};
use tower::{Service as _, ServiceExt as _};
use watchtower::TopicPattern;
use watchtower::prelude::*;
use watchtower_test_support::{unique, within};
use watchtower_websocket::{SlowClient, WsClient, WsHub};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_both_ways() {
    let (handler, mut from_clients) = collecting_handler();
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start(&hub).await;
    let client = WsClient::connect(server.config()).await.unwrap();
    let ns = unique("ws");

    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.user.*")]).unwrap())
        .await
        .unwrap();
    assert_eq!(hub.stats().connections, 1);

    // Hub to client, including an event routed to a topic other than its type.
    let plain = Event::new(
        format!("{ns}.user.created"),
        serde_json::json!({"id": 1, "name": "Zoë"}),
    );
    let routed =
        Event::new("user.renamed", serde_json::json!({"id": 1})).with_topic(format!("{ns}.user.renamed"));
    let elsewhere = Event::new(format!("{ns}.order.created"), serde_json::json!({}));
    let mut publisher = hub.clone();
    for e in [&elsewhere, &plain, &routed] {
        publisher.publish(e.clone()).await.unwrap();
    }
    let got = next_event(&mut sub).await;
    assert_eq!(got, plain);
    let got = next_event(&mut sub).await;
    assert_eq!(got, routed);
    assert_eq!(got.topic(), format!("{ns}.user.renamed"));
    assert_eq!(
        hub.broadcast(&elsewhere).unwrap(),
        0,
        "nobody subscribed to orders"
    );

    // Client to hub.
    let sent = Event::builder(format!("{ns}.cmd"))
        .subject("s")
        .extension("tenant", "acme")
        .data("application/octet-stream", &b"\x00\x01binary"[..])
        .build()
        .unwrap();
    let receipt = client.publisher().publish(sent.clone()).await.unwrap();
    assert_eq!(&*receipt.event_id, sent.id());
    let got = within("the handler receiving the event", from_clients.recv())
        .await
        .unwrap();
    assert_eq!(got, sent);
    let stats = hub.stats();
    assert_eq!(
        (stats.received, stats.handler_errors, stats.invalid_frames),
        (1, 0, 0)
    );

    // Dropping the subscription unsubscribes.
    drop(sub);
    within("the unsubscribe", async {
        while hub.broadcast(&plain).unwrap() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.other")]).unwrap())
        .await
        .unwrap();

    client.close().await;
    within("the hub seeing the client leave", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The broadcasts that waited for the unsubscribe may have filled this
    // client's buffer at the hub: a report of the drops may come first.
    within("the subscription ending with the client", async {
        loop {
            match sub.next().await {
                None => break,
                Some(Err(e)) if e.kind() == watchtower::ErrorKind::Dropped => continue,
                Some(other) => panic!("the subscription ends with the client, not {other:?}"),
            }
        }
    })
    .await;
    let mut publisher = client.publisher();
    let err = publisher.ready().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_each_get_exactly_their_events() {
    let hub = WsHub::new();
    let server = Server::start(&hub).await;
    let ns = unique("ws");
    let end = format!("{ns}.end");
    let pattern = |i: usize| match i {
        0..50 => format!("{ns}.t{i}"),
        50..90 => format!("{ns}.g{}.*", i % 5),
        _ => format!("{ns}.>"),
    };
    let mut clients = Vec::new();
    for i in 0..100 {
        let client = WsClient::connect(server.config()).await.unwrap();
        let sub = client
            .subscriber()
            .open(SubscribeOptions::new([pattern(i), end.clone()]).unwrap())
            .await
            .unwrap();
        clients.push((client, sub));
    }
    let mut events = Vec::new();
    for t in 0..50 {
        events.push(Event::new(format!("{ns}.t{t}"), serde_json::json!({"t": t})));
    }
    for g in 0..5 {
        for k in 0..2 {
            events.push(Event::new(format!("{ns}.g{g}.x{k}"), serde_json::json!({"g": g})));
        }
        events.push(Event::new(
            format!("{ns}.g{g}.x.deep"),
            serde_json::json!({"g": g}),
        ));
    }
    let mut publisher = hub.clone();
    for e in &events {
        publisher.publish(e.clone()).await.unwrap();
    }
    publisher
        .publish(Event::new(end.clone(), serde_json::json!({})))
        .await
        .unwrap();

    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (client, mut sub))| {
            let pattern = TopicPattern::new(&pattern(i)).unwrap();
            let expected: Vec<String> = events
                .iter()
                .filter(|e| pattern.matches(e.topic()))
                .map(|e| e.id().to_owned())
                .collect();
            let end = end.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let e = next_event(&mut sub).await;
                    if e.topic() == end {
                        break;
                    }
                    got.push(e.id().to_owned());
                }
                drop(client);
                (i, got, expected)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        let (i, got, expected) = task.await.unwrap();
        assert_eq!(got, expected, "client {i} with pattern {}", pattern(i));
        assert!(!expected.is_empty());
        total += got.len();
    }
    // 50 exact + 40 * 2 wildcard (x0, x1) + 10 * 65 everything.
    assert_eq!(total, 50 + 40 * 2 + 10 * 65);
    server.stop().await;
}

/// A client that subscribes and then never reads.
async fn stalled_client(
    server: &Server,
    topic: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = server.url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "watchtower.v1".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "watchtower.v1");
    ws.send(Message::text(format!(
        r#"{{"wt":"subscribe","id":"slow","patterns":["{topic}"]}}"#
    )))
    .await
    .unwrap();
    // The hub may ping first (some tests ping every few milliseconds).
    let reply = within("the subscription confirmation", async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => break other,
            }
        }
    })
    .await;
    assert_eq!(reply.to_text().unwrap(), r#"{"wt":"subscribed","id":"slow"}"#);
    ws
}

async fn slow_client_does_not_delay_others(policy: SlowClient) -> watchtower_websocket::HubStats {
    let hub = WsHub::builder().outbound_capacity(16).slow_client(policy).build();
    let server = Server::start(&hub).await;
    let topic = format!("{}.feed", unique("ws"));
    let stalled = stalled_client(&server, &topic).await;
    let client = WsClient::connect(server.config()).await.unwrap();
    let mut fast = client
        .subscriber()
        .open(SubscribeOptions::new([&topic]).unwrap())
        .await
        .unwrap();
    // 2000 events of 8 KiB: far more than the stalled client's socket
    // buffers hold, so its queue overflows while the fast client keeps up.
    let payload = "x".repeat(8 * 1024);
    let mut publisher = hub.clone();
    for i in 0..2000 {
        let event = Event::new(topic.clone(), serde_json::json!({"i": i, "pad": payload}));
        publisher.publish(event.clone()).await.unwrap();
        match within("the fast client's event", fast.next()).await {
            Some(Ok(d)) => assert_eq!(event_of(d), event, "fast client, event {i}"),
            Some(Err(e)) => panic!("fast client lost events: {e}"),
            None => panic!("fast subscription ended"),
        }
    }
    let stats = hub.stats();
    drop(stalled);
    server.stop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_loses_its_oldest_events_and_does_not_delay_others() {
    let stats = slow_client_does_not_delay_others(SlowClient::DropOldest).await;
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!(stats.slow_disconnects, 0, "{stats:?}");
    assert_eq!(stats.published, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_disconnected_and_does_not_delay_others() {
    let stats = slow_client_does_not_delay_others(SlowClient::Disconnect).await;
    assert_eq!(stats.slow_disconnects, 1, "{stats:?}");
    assert_eq!(stats.dropped, 0, "{stats:?}");
}

fn control(message: &Message) -> HashMap<String, serde_json::Value> {
    serde_json::from_str(message.to_text().unwrap()).unwrap_or_else(|e| panic!("{message:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_the_connection_survives_oversized_ones_close_it() {
    let dlq = MemoryDeadLetters::new(16);
    let hub = WsHub::builder()
        .max_message_size(4096)
        .poison(dlq.clone())
        .build();
    let server = Server::start(&hub).await;
    let mut request = server.url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "watchtower.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    let bad: [(Message, &str); 5] = [
        (Message::text("not json at all"), "malformed"),
        (Message::text(r#"{"specversion":"1.0","id":"1"}"#), "malformed"),
        (Message::text(r#"{"hello":"world"}"#), "malformed"),
        (Message::text(r#"{"wt":"ack","id":"1"}"#), "unsupported"),
        (Message::binary(&b"\xff\x00binary"[..]), "binary"),
    ];
    for (frame, code) in bad {
        ws.send(frame).await.unwrap();
        let reply = within("the error reply", ws.next()).await.unwrap().unwrap();
        let reply = control(&reply);
        assert_eq!(reply["wt"], "error");
        assert_eq!(reply["code"], code, "{reply:?}");
    }
    ws.send(Message::text(
        r#"{"wt":"subscribe","id":"a","patterns":["bad..pattern"]}"#,
    ))
    .await
    .unwrap();
    let reply = control(&within("the error reply", ws.next()).await.unwrap().unwrap());
    assert_eq!(
        (&reply["code"], &reply["re"]),
        (&"invalid_pattern".into(), &"a".into())
    );
    // Still connected and working.
    ws.send(Message::text(
        r#"{"wt":"subscribe","id":"a","patterns":["ok.*"]}"#,
    ))
    .await
    .unwrap();
    let reply = control(&within("the confirmation", ws.next()).await.unwrap().unwrap());
    assert_eq!(reply["wt"], "subscribed");
    let event = Event::new("ok.go", serde_json::json!({}));
    assert_eq!(hub.broadcast(&event).unwrap(), 1);
    let frame = within("the event", ws.next()).await.unwrap().unwrap();
    assert_eq!(
        watchtower::codec::structured::from_slice(frame.to_text().unwrap().as_bytes()).unwrap(),
        event
    );
    assert_eq!(hub.stats().invalid_frames, 5);
    // The frames that were not events reached the poison path with their bytes.
    let poisoned = dlq.drain();
    let bodies: Vec<&[u8]> = poisoned.iter().map(|e| &e.data().unwrap()[..]).collect();
    assert_eq!(
        bodies,
        [
            &b"not json at all"[..],
            br#"{"specversion":"1.0","id":"1"}"#,
            br#"{"hello":"world"}"#,
            b"\xff\x00binary",
        ]
    );
    assert!(poisoned.iter().all(|e| e.ty() == watchtower::POISON_EVENT_TYPE));

    // Too large: an error, then the close handshake with 1009.
    ws.send(Message::text("x".repeat(8192))).await.unwrap();
    let reply = control(&within("the error reply", ws.next()).await.unwrap().unwrap());
    assert_eq!(reply["code"], "too_large");
    match within("the close frame", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(
        within("the end of the connection", ws.next()).await,
        None | Some(Err(tungstenite::Error::ConnectionClosed))
    ));
    within("the hub dropping the connection", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(hub.stats().invalid_frames, 6);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_refused() {
    let hub = WsHub::builder()
        .authenticate(|headers| match headers.get("authorization") {
            Some(v) if v == "Bearer right" => Ok(()),
            Some(_) => Err(axum::http::StatusCode::FORBIDDEN),
            None => Err(axum::http::StatusCode::UNAUTHORIZED),
        })
        .build();
    let server = Server::start(&hub).await;

    let err = WsClient::connect(server.config()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(!err.is_retryable());
    let err = WsClient::connect(server.config().bearer("wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!format!("{err:?}").contains("wrong"), "no token in errors");

    // A lazy client gives up, and its queued event comes back with the error.
    let client = WsClient::lazy(server.config().bearer("wrong")).unwrap();
    let mut publisher = client.publisher();
    let event = Event::new("a.b", serde_json::json!({}));
    // Whether the event is queued before the client gives up or not, it
    // comes back.
    match publisher.ready().await {
        Ok(ready) => {
            let pending = ready.call(event.clone());
            let mut err = within("the publish failing", pending).await.unwrap_err();
            assert_eq!(err.take_event().as_ref(), Some(&event));
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::Closed),
    }
    within(
        "the client giving up",
        client
            .state_changes()
            .wait_for(|s| matches!(s, watchtower_websocket::ConnectionState::Closed(Some(_)))),
    )
    .await
    .unwrap();
    let health = client.health().await;
    assert_eq!(health.status(), watchtower::health::Status::Down);
    assert!(
        health
            .reason()
            .is_some_and(|r| r.starts_with("websocket client gave up")),
        "{health}"
    );
    assert!(!health.to_string().contains("wrong"), "{health}");
    assert_eq!(publisher.ready().await.unwrap_err().kind(), ErrorKind::Closed);
    let mut err = publisher.call(event.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(err.take_event(), Some(event));

    let client = WsClient::connect(server.config().bearer("right")).await.unwrap();
    assert!(client.health().await.is_up());
    let stats = hub.stats();
    assert_eq!((stats.refused, stats.accepted), (3, 1));
    assert!(!format!("{:?}", server.config().bearer("right")).contains("right"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_dropped_even_while_a_write_to_it_is_blocked() {
    let hub = WsHub::builder()
        .outbound_capacity(16)
        .ping_interval(Duration::from_millis(20))
        .idle_timeout(Duration::from_millis(200))
        .build();
    let server = Server::start(&hub).await;
    let topic = format!("{}.feed", unique("ws"));
    let stalled = stalled_client(&server, &topic).await;
    let payload = "x".repeat(64 * 1024);
    // Enough to fill the socket buffers, so the hub's writer blocks.
    for i in 0..200 {
        hub.broadcast(&Event::new(
            topic.clone(),
            serde_json::json!({"i": i, "pad": payload}),
        ))
        .unwrap();
        tokio::task::yield_now().await;
    }
    within("the hub dropping the stalled client", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(stalled);
    server.stop().await;
}
