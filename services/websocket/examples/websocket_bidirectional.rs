//! Two-way events over WebSocket: a hub mounted in axum, and a client that
//! subscribes to what the hub publishes and publishes to the hub's handler.
//!
//! Self-contained: `cargo run -p watchtower-websocket --example websocket_bidirectional`.

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use tower::{ServiceBuilder, service_fn};
use watchtower::prelude::*;
use watchtower_websocket::covers;
use watchtower_websocket::{WsClient, WsConfig, WsHub};

/// A connection's identity: the topics its token grants.
struct Grant {
    read: TopicPattern,
    write: TopicPattern,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The server side: events from clients go to this handler.
    let (replies_tx, mut replies) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let hub = WsHub::builder()
        .handler(service_fn(move |event: Event| {
            let sent = replies_tx.send(event);
            async move { sent.map_err(|_| Error::closed("example over")) }
        }))
        .allowed_origins(["http://localhost:3000"])
        .authenticate(|headers: &HeaderMap| match headers.get("authorization") {
            Some(token) if token == "Bearer demo-token" => Ok(Grant {
                read: TopicPattern::new("order.*").map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?,
                write: TopicPattern::new("order.viewed").map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?,
            }),
            _ => Err(StatusCode::UNAUTHORIZED),
        })
        // Patterns are authorized whole: `order.>` or `>` would be refused.
        .can_subscribe(|grant: &Grant, pattern| covers(&grant.read, pattern))
        .can_publish(|grant: &Grant, event| grant.write.matches(event.topic()))
        .build();
    let app = Router::new().route("/events", hub.route());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/events", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, app).into_future());

    // The client side: subscribe, consume with the runtime, publish back.
    let config = WsConfig::new(&url)
        .bearer("demo-token")
        .overflow(Overflow::DropOldest)
        .queue_capacity(256);
    let client = WsClient::connect(config).await?;
    let mut publisher = ServiceBuilder::new()
        .map_err(Error::from_boxed)
        .timeout(Duration::from_secs(5))
        .service(client.publisher());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<()>();
    let consumer = client
        .subscriber()
        .subscribe(
            ["order.*"],
            service_fn(move |event: Event| {
                let seen_tx = seen_tx.clone();
                async move {
                    println!(
                        "client received {} {}",
                        event.ty(),
                        event.json::<serde_json::Value>()?
                    );
                    let _ = seen_tx.send(());
                    Ok::<_, Error>(())
                }
            }),
        )
        .await?;

    // Hub to client.
    let mut server_publisher = hub.clone();
    for id in 1..=3 {
        server_publisher
            .publish(Event::new("order.created", serde_json::json!({ "order": id })))
            .await?;
    }
    // Client to hub.
    publisher
        .publish(Event::new("order.viewed", serde_json::json!({ "order": 2 })))
        .await?;
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.recv()).await?;
    println!("hub received {:?}", reply.map(|e| e.ty().to_owned()));

    for _ in 1..=3 {
        tokio::time::timeout(Duration::from_secs(5), seen.recv()).await?;
    }
    let stats = consumer.stop().await?;
    println!("consumer: {stats}");
    println!("hub: {:?}", hub.stats());
    client.close().await;
    hub.shutdown().await;
    Ok(())
}
