//! Publish and consume over NATS: core subjects, then JetStream with the
//! fault-tolerance layers on the publisher.
//!
//! Needs a NATS server with JetStream on 127.0.0.1:4222 (`NATS_URL`
//! overrides it):
//!
//! ```text
//! cargo run -p watchtower-nats --example nats_pubsub
//! ```

use std::time::Duration;

use tower::{Service as _, ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event, PublishExt, SubscribeOptions, SubscriberExt, Transport};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
use watchtower_layers::retry::RetryConfig;
use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig, StreamConfig};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = NatsClient::connect(NatsConfig::new(url).name("nats_pubsub example")).await?;
    let health = client.health().await;
    if !health.is_up() {
        return Err(Error::new(
            watchtower::ErrorKind::Connection,
            format!("NATS is {}: {}", health.status(), health.reason().unwrap_or("")),
        ));
    }

    // Core NATS: fire-and-forget, wildcards, queue groups.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let core = client
        .subscriber()
        .subscribe(
            ["example.user.*"],
            service_fn(move |event: Event| {
                let _ = tx.send(event);
                async { Ok::<_, Error>(()) }
            }),
        )
        .await?;
    let mut publisher = client.publisher();
    publisher
        .publish(Event::new(
            "example.user.created",
            serde_json::json!({"user_id": 1}),
        ))
        .await?;
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        println!("core NATS delivered {} {}", event.ty(), event.id());
    }
    core.stop().await?;

    // JetStream: a stream, a durable consumer group, a layered publisher.
    client
        .create_or_update_stream(StreamConfig {
            name: "EXAMPLE_ORDERS".into(),
            subjects: vec!["example.order.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let consumer = client
        .jetstream_subscriber("EXAMPLE_ORDERS")
        .settings(
            ConsumerSettings::new()
                .max_deliver(5)
                .ack_wait(Duration::from_secs(10)),
        )
        .subscribe_with(
            SubscribeOptions::new(["example.order.*"])?.group("billing")?,
            service_fn(move |event: Event| {
                println!("billing handled {} {}", event.ty(), event.id());
                let _ = handled_tx.send(());
                async { Ok::<_, Error>(()) }
            }),
        )
        .await?;

    let dead_letters = MemoryDeadLetters::new(1000);
    let mut orders = ServiceBuilder::new()
        .dead_letter(dead_letters.clone())
        .retries(RetryConfig::new().max_attempts(5))
        .circuit_breaker(CircuitBreakerConfig::new().name("jetstream"))
        .service(client.jetstream_publisher());
    for n in 0..3 {
        let outcome = orders
            .ready()
            .await?
            .call(Event::new(
                "example.order.paid",
                serde_json::json!({ "order": n }),
            ))
            .await?;
        match outcome.delivered() {
            Some(receipt) => println!(
                "stored in {} at sequence {}",
                receipt.stream.as_deref().unwrap_or("?"),
                receipt.sequence.unwrap_or_default()
            ),
            None => println!("dead-lettered"),
        }
    }

    // Let the consumer catch up, then shut it down gracefully.
    for _ in 0..3 {
        let _ = tokio::time::timeout(Duration::from_secs(5), handled.recv()).await;
    }
    let stats = consumer.stop().await?;
    println!("consumer: {stats}; dead letters: {}", dead_letters.len());
    client.delete_stream("EXAMPLE_ORDERS").await?;
    Ok(())
}
