//! Test support of the NATS tests: the local broker, streams, events.
//! Names, deadlines and private servers come from
//! `watchtower-test-support`.

use std::time::Duration;

use tower::Service;
use watchtower::Event;
use watchtower_nats::{NatsClient, NatsConfig};
use watchtower_nats::{StorageType, StreamConfig};

/// The shared broker every machine runs.
pub const LOCAL: &str = "nats://127.0.0.1:4222";

pub async fn local() -> NatsClient {
    NatsClient::connect(NatsConfig::new(LOCAL).name("watchtower-nats-tests"))
        .await
        .expect("the local NATS broker at 127.0.0.1:4222")
}

/// A memory stream named `name` capturing `name.>`.
pub async fn stream(client: &NatsClient, name: &str) {
    client
        .create_or_update_stream(StreamConfig {
            name: name.to_owned(),
            subjects: vec![format!("{name}.>")],
            storage: StorageType::Memory,
            max_age: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("create stream");
}

/// `n` events to `topic`, each carrying its number.
pub fn numbered(topic: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new(topic.to_owned(), serde_json::json!({ "i": i })))
        .collect()
}

/// Calls `publisher` with every event, each after its `poll_ready`, and
/// returns the futures unawaited.
pub async fn call_all<S>(publisher: &mut S, events: &[Event]) -> Vec<S::Future>
where
    S: Service<Event>,
    S::Error: std::fmt::Debug,
{
    let mut futures = Vec::with_capacity(events.len());
    for event in events {
        std::future::poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
        futures.push(publisher.call(event.clone()));
    }
    futures
}
