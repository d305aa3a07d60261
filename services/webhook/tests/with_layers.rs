//! The sender and fan-out under the layers crate's retry, circuit breaker
//! and dead-letter layers, against real local endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use support::{Behaviour, Connect, recorder, sender};
use tower::{ServiceBuilder, ServiceExt};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::{ErrorKind, Event, PublishExt};
use watchtower_layers::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer, State,
};
use watchtower_layers::dead_letter::DeadLetterLayer;
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_webhook::{Endpoint, WebhookFanOut, WebhookPublisher, endpoint_of};

#[tokio::test]
async fn retries_wait_for_retry_after_and_keep_the_webhook_id() {
    // Every second request is answered 429 with `Retry-After: 1`.
    let endpoint = recorder(Behaviour::ThrottleEvery(2)).await;
    let waits = Arc::new(Mutex::new(Vec::new()));
    let seen = waits.clone();
    let retry = RetryConfig::new()
        .max_attempts(3)
        .delays(Duration::from_millis(1), Duration::from_millis(5))
        .on_retry(move |attempt| seen.lock().unwrap().push((attempt.error.kind(), attempt.delay)));
    let mut publisher = ServiceBuilder::new()
        .layer(RetryLayer::new(retry))
        .service(sender(&endpoint.url).publisher().await);

    let first = Event::new("user.created", serde_json::json!({"n": 1}));
    publisher.publish(first.clone()).await.unwrap(); // request 1: handled
    let second = Event::new("user.created", serde_json::json!({"n": 2}));
    publisher.publish(second.clone()).await.unwrap(); // request 2: 429, request 3: handled

    let waits = waits.lock().unwrap().clone();
    assert_eq!(waits.len(), 1);
    assert_eq!(waits[0].0, ErrorKind::Throttled);
    assert!(
        waits[0].1 >= Duration::from_secs(1),
        "the retry honoured Retry-After: {waits:?}"
    );
    assert_eq!(endpoint.requests.get(), 3);
    let ids = endpoint.ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids.get(second.id()), Some(&1), "the retry kept the webhook-id");
}

/// Done when: 1,000 events fanned out to three local endpoints, one always
/// failing and one throttling now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_fan_out_past_a_failing_and_a_throttling_endpoint() {
    const EVENTS: usize = 1000;
    let healthy = recorder(Behaviour::Healthy).await;
    let throttled = recorder(Behaviour::ThrottleEvery(50)).await;
    let failing = recorder(Behaviour::Always(500)).await;
    let dlq = MemoryDeadLetters::new(10 * EVENTS);
    let breakers: Arc<Mutex<Vec<(String, CircuitBreakerHandle)>>> = Arc::default();

    let registry = breakers.clone();
    let dead_letters = dlq.clone();
    let fan_out = WebhookFanOut::builder()
        // One stack per endpoint: its own breaker, its own retries.
        .layer_fn(move |sender: &WebhookPublisher| {
            let breaker = CircuitBreakerLayer::new(
                CircuitBreakerConfig::new()
                    .name(sender.name().clone())
                    .minimum_calls(10)
                    .open_wait(Duration::from_secs(600)),
            );
            registry
                .lock()
                .unwrap()
                .push((sender.name().to_string(), breaker.handle()));
            ServiceBuilder::new()
                .layer(DeadLetterLayer::new(dead_letters.clone()))
                .layer(RetryLayer::new(
                    RetryConfig::new()
                        .max_attempts(4)
                        .delays(Duration::from_millis(1), Duration::from_millis(20))
                        // An open breaker stays open for ten minutes: no use waiting.
                        .retry_if(|e| e.is_retryable() && e.kind() != ErrorKind::CircuitOpen),
                ))
                .layer(breaker)
        })
        .endpoint(Endpoint::new(
            sender(&healthy.url).name("healthy").connect().await,
        ))
        .endpoint(Endpoint::new(
            sender(&throttled.url).name("throttled").connect().await,
        ))
        .endpoint(Endpoint::new(
            sender(&failing.url).name("failing").connect().await,
        ))
        .build()
        .unwrap();

    let dead_lettered = Arc::new(Mutex::new(0usize));
    futures_util::stream::iter(0..EVENTS)
        .for_each_concurrent(64, |i| {
            let fan_out = fan_out.clone();
            let dead_lettered = dead_lettered.clone();
            async move {
                let event = Event::new("order.placed", serde_json::json!({"order": i}));
                let report = fan_out
                    .oneshot(event)
                    .await
                    .expect("every endpoint's stack answers Ok");
                for outcome in report.outcomes() {
                    let result = outcome.result.as_ref().unwrap();
                    match &*outcome.endpoint {
                        "failing" => {
                            assert!(result.is_dead_lettered());
                            *dead_lettered.lock().unwrap() += 1;
                        }
                        other => assert!(result.is_delivered(), "{other} dead-lettered an event"),
                    }
                }
            }
        })
        .await;

    // The healthy and throttled endpoints got every event exactly once.
    assert_eq!(healthy.distinct_once(), (EVENTS, true));
    assert_eq!(throttled.distinct_once(), (EVENTS, true));
    assert!(
        throttled.requests.get() > EVENTS,
        "some requests were throttled and retried"
    );
    // The failing endpoint's breaker opened, so it saw far fewer requests
    // than events, and all its deliveries are in the dead-letter queue.
    let states: Vec<(String, State)> = breakers
        .lock()
        .unwrap()
        .iter()
        .map(|(name, handle)| (name.clone(), handle.state()))
        .collect();
    assert_eq!(
        states,
        [
            ("healthy".to_owned(), State::Closed),
            ("throttled".to_owned(), State::Closed),
            ("failing".to_owned(), State::Open)
        ]
    );
    assert!(
        failing.requests.get() < EVENTS,
        "{} requests",
        failing.requests.get()
    );
    assert_eq!(failing.handled.get(), 0);
    assert_eq!(*dead_lettered.lock().unwrap(), EVENTS);
    let kept = dlq.drain();
    assert_eq!(kept.len(), EVENTS);
    let ids: HashSet<&str> = kept.iter().map(Event::id).collect();
    assert_eq!(ids.len(), EVENTS);
    assert!(kept.iter().all(|e| endpoint_of(e) == Some("failing")));
    assert!(kept.iter().all(|e| {
        matches!(e.extension(ext::DEAD_LETTER_KIND), Some("other" | "circuit_open"))
            && e.extension(ext::DEAD_LETTER_REASON).is_some()
    }));
    assert!(
        kept.iter()
            .any(|e| e.extension(ext::DEAD_LETTER_KIND) == Some("circuit_open"))
    );
}

#[tokio::test]
async fn one_keyed_breaker_keys_the_endpoints_by_name() {
    use watchtower_layers::circuit_breaker::KeyedCircuitBreakerLayer;

    let healthy = recorder(Behaviour::Healthy).await;
    let failing = recorder(Behaviour::Always(503)).await;
    let keyed = KeyedCircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .minimum_calls(5)
            .open_wait(Duration::from_secs(600)),
        100,
        |event: &Event| endpoint_of(event).unwrap_or_default().to_owned(),
    );
    let breakers = keyed.breakers();
    let mut fan_out = WebhookFanOut::builder()
        .layer(keyed)
        .endpoint(Endpoint::new(
            sender(&healthy.url).name("healthy").connect().await,
        ))
        .endpoint(Endpoint::new(
            sender(&failing.url).name("failing").connect().await,
        ))
        .build()
        .unwrap();
    for _ in 0..20 {
        let err = fan_out
            .publish(Event::new("a.b", serde_json::json!({})))
            .await
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Throttled | ErrorKind::CircuitOpen),
            "{err}"
        );
    }
    assert_eq!(breakers.get("failing".to_owned()).state(), State::Open);
    assert_eq!(breakers.get("healthy".to_owned()).state(), State::Closed);
    assert_eq!(failing.requests.get(), 5, "the open breaker stopped the requests");
    assert_eq!(healthy.handled.get(), 20);
}
