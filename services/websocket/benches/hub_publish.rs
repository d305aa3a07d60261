//! The cost of one publish into a hub, by how many connections and patterns
//! it holds: real WebSocket connections on 127.0.0.1, each subscribed to 10
//! patterns, and `WsHub::broadcast` timed (the fan-out runs inside it; the
//! writing to sockets happens afterwards on the connections' own tasks).
//!
//! * `one_connection/match`: 1 connection, the event matches it;
//! * `1000_connections/one_match`: 1,000 connections × 10 patterns, the
//!   event matches one of them;
//! * `1000_connections/no_match`: the same hub, an event nobody wants.
//!
//! `cargo bench -p watchtower-websocket --bench hub_publish`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use watchtower::prelude::*;
use watchtower_websocket::WsHub;

const PATTERNS: usize = 10;

/// A hub with `connections` clients subscribed to `PATTERNS` patterns each
/// (`c<i>.p<j>.*`, two of them wildcards of other shapes); the clients
/// drain what they receive.
fn hub_with(rt: &Runtime, connections: usize) -> WsHub {
    rt.block_on(async {
        let hub = WsHub::builder().max_control_rate(1_000).build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/events", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, hub.router::<()>("/events")).into_future());
        for i in 0..connections {
            let mut request = url.as_str().into_client_request().unwrap();
            request.headers_mut().insert(
                "sec-websocket-protocol",
                // The older hub speaks only the second.
                "watchtower.v1, cloudevents.json".parse().unwrap(),
            );
            let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
            let mut patterns: Vec<String> = (0..PATTERNS - 2).map(|j| format!("c{i}.p{j}.*")).collect();
            patterns.push(format!("c{i}.*.x"));
            patterns.push(format!("c{i}.q.>"));
            let subscribe = serde_json::json!({"wt": "subscribe", "id": "s", "patterns": patterns});
            ws.send(Message::text(subscribe.to_string())).await.unwrap();
            let reply = ws.next().await.unwrap().unwrap();
            assert!(reply.to_text().unwrap().contains("subscribed"), "{reply:?}");
            tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
        }
        assert_eq!(hub.connections(), connections);
        hub
    })
}

fn publish(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let matching = Event::new("c0.p3.x", serde_json::json!({"id": 1}));
    let nobody = Event::new("nobody.listens.here", serde_json::json!({"id": 1}));
    let mut group = c.benchmark_group("hub_publish");
    group.measurement_time(Duration::from_secs(5));

    let one = hub_with(&rt, 1);
    assert_eq!(one.broadcast(&matching).unwrap(), 1);
    group.bench_function("one_connection/match", |b| {
        b.iter(|| one.broadcast(&matching).unwrap())
    });

    let many = hub_with(&rt, 1_000);
    assert_eq!(many.broadcast(&matching).unwrap(), 1);
    assert_eq!(many.broadcast(&nobody).unwrap(), 0);
    group.bench_function("1000_connections/one_match", |b| {
        b.iter(|| many.broadcast(&matching).unwrap())
    });
    group.bench_function("1000_connections/no_match", |b| {
        b.iter(|| many.broadcast(&nobody).unwrap())
    });
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
