//! The hub against hostile or careless clients: floods of subscriptions,
//! topics they may not read or write, foreign origins, strict CloudEvents
//! clients, slow handlers and oversized frames. Real WebSocket clients
//! against a real server on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use watchtower::codec::structured;
use watchtower::prelude::*;
use watchtower_test_support::{unique, within};
use watchtower_websocket::WsHub;
use watchtower_websocket::covers;

use support::*;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw client on `subprotocol`, with extra headers; the URL may carry a query.
async fn raw(
    url: &str,
    subprotocol: &str,
    headers: &[(&'static str, &str)],
) -> Result<Ws, tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", subprotocol.parse().unwrap());
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(response.headers()["sec-websocket-protocol"], subprotocol);
    Ok(ws)
}

/// The next text frame as a JSON object, skipping pings and pongs.
async fn next_json(ws: &mut Ws) -> HashMap<String, serde_json::Value> {
    loop {
        match within("a frame", ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("{text}: {e}"));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn subscribe(ws: &mut Ws, id: &str, patterns: &[String]) -> HashMap<String, serde_json::Value> {
    let frame = serde_json::json!({"wt": "subscribe", "id": id, "patterns": patterns});
    ws.send(Message::text(frame.to_string())).await.unwrap();
    next_json(ws).await
}

fn upgrade_status(result: Result<Ws, tungstenite::Error>) -> StatusCode {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status(),
        Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_patterns_is_refused_past_the_limits_and_the_hub_keeps_delivering() {
    let hub = WsHub::builder().max_control_rate(10_000).build();
    let server = Server::start(&hub).await;
    let ns = unique("ws");
    let mut flooder = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();

    // 200 patterns fit the default 256 per connection.
    let first: Vec<String> = (0..200).map(|i| format!("{ns}.p{i}.*")).collect();
    let reply = subscribe(&mut flooder, "0", &first).await;
    assert_eq!((&reply["wt"], &reply["id"]), (&"subscribed".into(), &"0".into()));
    // 100,000 more in 40 frames of 2,500: every one refused whole.
    for frame in 1..=40 {
        let patterns: Vec<String> = (0..2500).map(|i| format!("{ns}.q{frame}x{i}")).collect();
        let reply = subscribe(&mut flooder, &frame.to_string(), &patterns).await;
        assert_eq!(reply["wt"], "error", "{reply:?}");
        assert_eq!(reply["code"], "limit", "{reply:?}");
        assert_eq!(reply["re"], frame.to_string());
    }
    // Replacing subscription 0 with 57 more than allowed is refused too; 56
    // more (256 in all) are not.
    let too_many: Vec<String> = (0..257).map(|i| format!("{ns}.r{i}")).collect();
    assert_eq!(subscribe(&mut flooder, "0", &too_many).await["code"], "limit");
    let long = vec![format!("{ns}.{}", "x".repeat(300))];
    assert_eq!(subscribe(&mut flooder, "long", &long).await["code"], "limit");
    let long_id = "i".repeat(129);
    let reply = subscribe(&mut flooder, &long_id, &[format!("{ns}.t")]).await;
    assert_eq!((&reply["code"], reply.get("re")), (&"limit".into(), None));
    let more: Vec<String> = (0..56).map(|i| format!("{ns}.s{i}")).collect();
    assert_eq!(subscribe(&mut flooder, "1", &more).await["wt"], "subscribed");
    assert_eq!(
        subscribe(&mut flooder, "2", &[format!("{ns}.t")]).await["code"],
        "limit"
    );
    // Subscriptions are counted as well: 32 by default.
    let mut counted = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();
    for i in 0..32 {
        let reply = subscribe(&mut counted, &i.to_string(), &[format!("{ns}.c{i}")]).await;
        assert_eq!(reply["wt"], "subscribed");
    }
    assert_eq!(
        subscribe(&mut counted, "32", &[format!("{ns}.c32")]).await["code"],
        "limit"
    );
    assert_eq!(hub.stats().limited, 45);

    // The hub still delivers: to a client of its own, and to the flooder on
    // the patterns it was granted, not on those it was refused.
    let client = watchtower_websocket::WsClient::connect(server.config())
        .await
        .unwrap();
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.orders.*")]).unwrap())
        .await
        .unwrap();
    let event = Event::new(format!("{ns}.orders.created"), serde_json::json!({"id": 7}));
    assert_eq!(hub.broadcast(&event).unwrap(), 1);
    assert_eq!(next_event(&mut sub).await, event);
    let refused = Event::new(format!("{ns}.q3x7"), serde_json::json!({}));
    assert_eq!(
        hub.broadcast(&refused).unwrap(),
        0,
        "a refused pattern is not held"
    );
    let granted = Event::new(format!("{ns}.p199.x"), serde_json::json!({}));
    assert_eq!(hub.broadcast(&granted).unwrap(), 1);
    let got = next_json(&mut flooder).await;
    assert_eq!(got["type"], granted.ty());
    // Leaving releases the patterns.
    drop(flooder);
    within("the flooder's patterns released", async {
        while hub.broadcast(&granted).unwrap() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_past_the_rate_are_refused_and_the_connection_stays() {
    let hub = WsHub::builder().max_control_rate(5).build();
    let server = Server::start(&hub).await;
    let mut ws = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();
    for i in 0..20 {
        let frame = serde_json::json!({"wt": "unsubscribe", "id": i.to_string()});
        ws.send(Message::text(frame.to_string())).await.unwrap();
    }
    let mut replies = Vec::new();
    for _ in 0..20 {
        replies.push(next_json(&mut ws).await);
    }
    // A burst of five passes; the rest arrive far faster than five a second.
    for (i, reply) in replies.iter().take(5).enumerate() {
        assert_eq!(
            (&reply["wt"], &reply["id"]),
            (&"unsubscribed".into(), &i.to_string().into())
        );
    }
    let limited: Vec<_> = replies
        .iter()
        .filter(|r| r["wt"] == "error" && r["code"] == "rate_limited")
        .collect();
    assert!(limited.len() >= 10, "{replies:?}");
    assert_eq!(
        limited.len() + replies.iter().filter(|r| r["wt"] == "unsubscribed").count(),
        20
    );
    assert_eq!(hub.stats().limited, limited.len() as u64);
    // Still open.
    assert_eq!(hub.stats().connections, 1);
    server.stop().await;
}

/// Who a connection is, in the tests below.
struct User {
    may_read: Vec<TopicPattern>,
    may_write: Vec<TopicPattern>,
}

fn authorizing_hub(ns: &str, relay: bool) -> (WsHub, Collected) {
    let (handler, handled) = collecting_handler();
    let ns = ns.to_owned();
    let hub = WsHub::builder()
        .handler(handler)
        .relay(relay)
        .allowed_origins(["https://app.example.com"])
        .authenticate(move |headers| {
            let pattern = |p: &str| TopicPattern::new(&format!("{ns}.{p}")).unwrap();
            match headers.get("authorization").and_then(|v| v.to_str().ok()) {
                Some("Bearer alice") => Ok(User {
                    may_read: vec![pattern("orders.*")],
                    may_write: vec![pattern("orders.*")],
                }),
                Some("Bearer root") => Ok(User {
                    may_read: vec![pattern(">")],
                    may_write: vec![pattern(">")],
                }),
                _ => Err(axum::http::StatusCode::UNAUTHORIZED),
            }
        })
        .can_subscribe(|user: &User, pattern| user.may_read.iter().any(|a| covers(a, pattern)))
        .can_publish(|user: &User, event| user.may_write.iter().any(|a| a.matches(event.topic())))
        .build();
    (hub, handled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_cannot_read_or_write_admin_topics() {
    let ns = unique("ws");
    let (hub, mut handled) = authorizing_hub(&ns, true);
    let server = Server::start(&hub).await;
    let mut alice = raw(
        &server.url(),
        "watchtower.v1",
        &[("authorization", "Bearer alice")],
    )
    .await
    .unwrap();
    let mut root = raw(
        &server.url(),
        "watchtower.v1",
        &[("authorization", "Bearer root")],
    )
    .await
    .unwrap();

    // Subscribing: a pattern wider than what alice may read is refused whole.
    for patterns in [
        vec![format!("{ns}.admin.>")],
        vec![format!("{ns}.>")],
        vec![format!("{ns}.orders.>")],
        vec![format!("{ns}.orders.*"), format!("{ns}.admin.payroll.updated")],
    ] {
        let reply = subscribe(&mut alice, "a", &patterns).await;
        assert_eq!(
            (&reply["code"], &reply["re"]),
            (&"forbidden".into(), &"a".into()),
            "{patterns:?}"
        );
    }
    assert_eq!(
        subscribe(&mut alice, "a", &[format!("{ns}.orders.*")]).await["wt"],
        "subscribed"
    );
    assert_eq!(
        subscribe(&mut root, "r", &[format!("{ns}.admin.>")]).await["wt"],
        "subscribed"
    );

    let payroll = Event::new(
        format!("{ns}.admin.payroll.updated"),
        serde_json::json!({"salary": 1}),
    );
    let order = Event::new(format!("{ns}.orders.created"), serde_json::json!({"id": 1}));
    assert_eq!(hub.broadcast(&payroll).unwrap(), 1, "root only");
    assert_eq!(hub.broadcast(&order).unwrap(), 1, "alice only");
    // Alice's next frame is the order: the payroll event never reached her.
    assert_eq!(next_json(&mut alice).await["type"], order.ty());
    assert_eq!(next_json(&mut root).await["type"], payroll.ty());

    // Publishing: alice may not write into admin topics, neither to the
    // handler nor through the relay.
    let forged = Event::builder(format!("{ns}.admin.payroll.updated"))
        .source("/payroll")
        .json(&serde_json::json!({"salary": 1_000_000}))
        .unwrap()
        .build()
        .unwrap();
    let text = String::from_utf8(structured::to_vec(&forged).unwrap()).unwrap();
    alice.send(Message::text(text)).await.unwrap();
    let reply = next_json(&mut alice).await;
    assert_eq!(
        (&reply["code"], &reply["re"]),
        (&"forbidden".into(), &forged.id().into())
    );
    // With acknowledgements on, the refusal is a nack.
    alice
        .send(Message::text(r#"{"wt":"options","acks":true}"#))
        .await
        .unwrap();
    let text = String::from_utf8(structured::to_vec(&forged).unwrap()).unwrap();
    alice.send(Message::text(text)).await.unwrap();
    let reply = next_json(&mut alice).await;
    assert_eq!(
        (&reply["wt"], &reply["id"]),
        (&"nack".into(), &forged.id().into())
    );
    // An allowed event goes through; it is the first the handler and root see.
    let allowed = Event::new(format!("{ns}.orders.paid"), serde_json::json!({"id": 1}));
    let text = String::from_utf8(structured::to_vec(&allowed).unwrap()).unwrap();
    alice.send(Message::text(text)).await.unwrap();
    // Alice reads `orders.*`, so the relay hands her own event back to her;
    // it may overtake the acknowledgement, which comes after the handler.
    let mut frames = [next_json(&mut alice).await, next_json(&mut alice).await];
    frames.sort_by_key(|frame| frame.contains_key("wt"));
    assert_eq!(frames[0]["id"], allowed.id(), "the relayed event");
    assert_eq!(frames[0]["type"], allowed.ty());
    assert_eq!(
        (&frames[1]["wt"], &frames[1]["id"]),
        (&"ack".into(), &allowed.id().into())
    );
    assert_eq!(within("the handler", handled.recv()).await.unwrap(), allowed);
    assert!(handled.try_recv().is_err(), "nothing else was handled");
    let stats = hub.stats();
    assert_eq!(stats.forbidden, 6, "{stats:?}");
    assert_eq!(stats.received, 3, "{stats:?}");

    // The client sees a refused subscription as a rejection.
    let client = watchtower_websocket::WsClient::connect(server.config().bearer("alice"))
        .await
        .unwrap();
    let err = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.admin.>")]).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(!err.is_retryable());
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allow_list_are_refused() {
    let ns = unique("ws");
    let (hub, _handled) = authorizing_hub(&ns, false);
    let server = Server::start(&hub).await;
    let auth = ("authorization", "Bearer alice");
    let evil = raw(
        &server.url(),
        "watchtower.v1",
        &[auth, ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(upgrade_status(evil), StatusCode::FORBIDDEN);
    let good = raw(
        &server.url(),
        "watchtower.v1",
        &[auth, ("origin", "https://APP.example.com")],
    )
    .await;
    assert_eq!(upgrade_status(good), StatusCode::SWITCHING_PROTOCOLS);
    // No Origin header: not a browser; authentication decides.
    let program = raw(&server.url(), "watchtower.v1", &[auth]).await;
    assert_eq!(upgrade_status(program), StatusCode::SWITCHING_PROTOCOLS);
    let anonymous = raw(&server.url(), "watchtower.v1", &[]).await;
    assert_eq!(upgrade_status(anonymous), StatusCode::UNAUTHORIZED);
    let stats = hub.stats();
    assert_eq!((stats.refused, stats.accepted), (2, 2));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudevents_json_client_receives_cloudevents_only() {
    let ns = unique("ws");
    let (hub, _handled) = authorizing_hub(&ns, false);
    let server = Server::start(&hub).await;
    let auth = [("authorization", "Bearer alice")];
    let query = |patterns: &[&str]| {
        let mut url = format!("{}?", server.url());
        for p in patterns {
            url.push_str(&format!("topic={}&", p.replace('*', "%2A").replace('>', "%3E")));
        }
        url
    };
    // Refused and invalid patterns in the URL refuse the upgrade.
    let admin = raw(&query(&[&format!("{ns}.admin.>")]), "cloudevents.json", &auth).await;
    assert_eq!(upgrade_status(admin), StatusCode::FORBIDDEN);
    let invalid = raw(&query(&["a..b"]), "cloudevents.json", &auth).await;
    assert_eq!(upgrade_status(invalid), StatusCode::BAD_REQUEST);

    let mut strict = raw(&query(&[&format!("{ns}.orders.*")]), "cloudevents.json", &auth)
        .await
        .unwrap();
    // Everything that would get a control message on watchtower.v1: a
    // subscribe, garbage, a binary frame, an event alice may not send.
    strict
        .send(Message::text(r#"{"wt":"subscribe","id":"1","patterns":[">"]}"#))
        .await
        .unwrap();
    strict.send(Message::text("garbage")).await.unwrap();
    strict
        .send(Message::binary(Bytes::from_static(b"\x00")))
        .await
        .unwrap();
    let forged = Event::new(format!("{ns}.admin.x"), serde_json::json!({}));
    let text = String::from_utf8(structured::to_vec(&forged).unwrap()).unwrap();
    strict.send(Message::text(text)).await.unwrap();
    within("the hub reading the frames", async {
        while hub.stats().invalid_frames < 3 || hub.stats().forbidden < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let sent: Vec<Event> = (0..5)
        .map(|i| Event::new(format!("{ns}.orders.created"), serde_json::json!({"i": i})))
        .collect();
    for event in &sent {
        assert_eq!(hub.broadcast(event).unwrap(), 1);
    }
    let admin_event = Event::new(format!("{ns}.admin.payroll.updated"), serde_json::json!({}));
    assert_eq!(hub.broadcast(&admin_event).unwrap(), 0);
    // Every text frame is a CloudEvent, and they are the five events.
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match within("an event", strict.next()).await {
            Some(Ok(Message::Text(text))) => {
                let event = structured::from_slice(text.as_bytes())
                    .unwrap_or_else(|e| panic!("not a CloudEvent: {text}: {e}"));
                got.push(event);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, sent);
    // Nothing else arrives before an event published afterwards.
    let last = Event::new(format!("{ns}.orders.last"), serde_json::json!({}));
    hub.broadcast(&last).unwrap();
    match within("the last event", strict.next()).await {
        Some(Ok(Message::Text(text))) => assert_eq!(structured::from_slice(text.as_bytes()).unwrap(), last),
        other => panic!("unexpected {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_does_not_stop_pongs_or_control_messages() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = {
        let gate = gate.clone();
        tower::service_fn(move |event: Event| {
            let gate = gate.clone();
            let handled_tx = handled_tx.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                handled_tx.send(event).unwrap();
                Ok::<_, Error>(())
            }
        })
    };
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start(&hub).await;
    let mut ws = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();
    let events: Vec<Event> = (0..3)
        .map(|i| Event::new("slow.work", serde_json::json!({"i": i})))
        .collect();
    for event in &events {
        let text = String::from_utf8(structured::to_vec(event).unwrap()).unwrap();
        ws.send(Message::text(text)).await.unwrap();
    }
    // The handler is stuck on the first event; the connection still answers.
    ws.send(Message::Ping(Bytes::from_static(b"still there?")))
        .await
        .unwrap();
    match within("the pong", ws.next()).await {
        Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"still there?"),
        other => panic!("expected a pong, got {other:?}"),
    }
    assert_eq!(
        subscribe(&mut ws, "s", &["x.*".to_owned()]).await["wt"],
        "subscribed"
    );
    assert!(handled.try_recv().is_err(), "the handler is still blocked");
    gate.add_permits(3);
    for event in &events {
        assert_eq!(&within("the handler", handled.recv()).await.unwrap(), event);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_frame_closes_its_connection_only() {
    let hub = WsHub::builder().max_message_size(64 * 1024).build();
    let server = Server::start(&hub).await;
    let mut bystander = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();
    assert_eq!(
        subscribe(&mut bystander, "b", &["news.*".to_owned()]).await["wt"],
        "subscribed"
    );
    let mut attacker = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();
    // One frame of 16 MiB announced; the hub stops at the header's length.
    let huge = "x".repeat(16 << 20);
    let _ = attacker.send(Message::text(huge)).await;
    let mut closed_with = None;
    while let Some(Ok(frame)) = within("the attacker's connection ending", attacker.next()).await {
        if let Message::Close(Some(close)) = frame {
            closed_with = Some(u16::from(close.code));
        }
    }
    assert_eq!(closed_with, Some(1009));
    within("the hub dropping the attacker", async {
        while hub.connections() > 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let event = Event::new("news.today", serde_json::json!({}));
    assert_eq!(hub.broadcast(&event).unwrap(), 1);
    assert_eq!(next_json(&mut bystander).await["type"], "news.today");
    assert_eq!(hub.stats().invalid_frames, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_queued_for_a_client_that_left_waiting_for_acks_are_not_handled() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let handler = {
        let gate = gate.clone();
        tower::service_fn(move |event: Event| {
            let gate = gate.clone();
            let handled_tx = handled_tx.clone();
            let _ = started_tx.send(());
            async move {
                gate.acquire().await.unwrap().forget();
                handled_tx.send(event).unwrap();
                Ok::<_, Error>(())
            }
        })
    };
    let hub = WsHub::builder().handler(handler).build();
    let server = Server::start(&hub).await;
    let mut ws = raw(&server.url(), "watchtower.v1", &[]).await.unwrap();
    ws.send(Message::text(r#"{"wt":"options","acks":true}"#))
        .await
        .unwrap();
    let events: Vec<Event> = (0..3)
        .map(|i| Event::new("acked.work", serde_json::json!({"i": i})))
        .collect();
    for event in &events {
        let text = String::from_utf8(structured::to_vec(event).unwrap()).unwrap();
        ws.send(Message::text(text)).await.unwrap();
    }
    // The first event is in the handler, two wait; the client leaves, and
    // the hub answers its close while the handler is still stuck.
    within("the handler starting", started.recv()).await.unwrap();
    ws.close(None).await.unwrap();
    loop {
        match within("the hub's close", ws.next()).await {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{e}"),
        }
    }
    gate.add_permits(3);
    assert_eq!(within("the handler", handled.recv()).await.unwrap(), events[0]);
    within("the connection to end", async {
        while hub.connections() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(handled.try_recv().is_err(), "the queued events were not handled");
    let stats = hub.stats();
    assert_eq!((stats.received, stats.abandoned), (3, 2), "{stats:?}");
    server.stop().await;
}
