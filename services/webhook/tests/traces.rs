//! One trace per event from the sender, through the retry and dead-letter
//! layers and a real HTTP exchange, to the receiver's handler.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_sdk::trace::SpanData;
use support::{Connect, SECRET, sender, serve};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, ErrorKind, Event};
use watchtower_layers::dead_letter::DeadLetterLayer;
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_test_support::otel::{Traces, attribute, event_names};
use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};

fn named<'a>(spans: &'a [SpanData], prefix: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name.starts_with(prefix)).collect()
}

fn parent_of(child: &SpanData, parent: &SpanData) -> bool {
    child.parent_span_id == parent.span_context.span_id()
        && child.span_context.trace_id() == parent.span_context.trace_id()
}

#[tokio::test(flavor = "current_thread")]
async fn a_webhook_is_one_trace_from_sender_to_handler() {
    let traces = Traces::capture();
    // The receiver: `flaky` fails its first request (500, retryable),
    // `refused` always (422, not retryable).
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        tower::service_fn(move |event: Event| {
            let n = {
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(event.ty().to_owned()).or_insert(0);
                *n += 1;
                *n
            };
            async move {
                match (event.ty(), n) {
                    ("flaky", 1) => Err(Error::new(ErrorKind::Handler, "first request fails")),
                    ("refused", _) => Err(Error::new(ErrorKind::Handler, "never").with_retryable(false)),
                    _ => Ok(()),
                }
            }
        })
    };
    let receiver = WebhookReceiverLayer::new(WebhookVerifier::new([SECRET]).unwrap()).layer(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", receiver)).await;

    let dlq = MemoryDeadLetters::new(8);
    let mut publisher = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(dlq.clone()))
        .layer(RetryLayer::new(
            RetryConfig::new()
                .max_attempts(3)
                .delays(Duration::from_millis(1), Duration::from_millis(1)),
        ))
        .service(sender(format!("http://{addr}/hooks")).publisher().await);

    let flaky = Event::new("flaky", serde_json::json!({"n": 1}));
    let refused = Event::new("refused", serde_json::json!({"n": 2}));
    let outcome = publisher
        .ready()
        .await
        .unwrap()
        .call(flaky.clone())
        .await
        .unwrap();
    assert!(outcome.is_delivered());
    let outcome = publisher
        .ready()
        .await
        .unwrap()
        .call(refused.clone())
        .await
        .unwrap();
    assert!(outcome.is_dead_lettered());
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        seen.lock().unwrap().clone(),
        HashMap::from([("flaky".into(), 2), ("refused".into(), 1)])
    );
    drop(publisher);

    // flaky: create → publish (failed) → process (failed); create → publish → process.
    let spans = traces.of_message(flaky.id());
    let create = named(&spans, "create");
    let publishes = named(&spans, "publish");
    let processes = named(&spans, "process");
    assert_eq!(
        (create.len(), publishes.len(), processes.len()),
        (1, 2, 2),
        "{spans:#?}"
    );
    assert!(event_names(create[0]).contains(&"retrying".to_owned()));
    for publish in &publishes {
        assert!(parent_of(publish, create[0]));
        assert_eq!(attribute(publish, "messaging.system").as_deref(), Some("webhook"));
        assert_eq!(
            processes.iter().filter(|p| parent_of(p, publish)).count(),
            1,
            "each attempt's request is processed under its publish span"
        );
    }
    let failed: Vec<_> = publishes
        .iter()
        .filter_map(|p| attribute(p, "error.type"))
        .collect();
    assert_eq!(failed, ["other"], "the 500 is the first attempt's error");
    let failed: Vec<_> = processes
        .iter()
        .filter_map(|p| attribute(p, "error.type"))
        .collect();
    assert_eq!(failed, ["handler"]);

    // refused: create → publish (rejected) → process (failed), then the
    // dead-lettering on the create span.
    let spans = traces.of_message(refused.id());
    let create = named(&spans, "create");
    let publish = named(&spans, "publish");
    let process = named(&spans, "process");
    assert_eq!(
        (create.len(), publish.len(), process.len()),
        (1, 1, 1),
        "{spans:#?}"
    );
    assert!(event_names(create[0]).contains(&"dead-lettering event".to_owned()));
    assert!(parent_of(publish[0], create[0]));
    assert!(parent_of(process[0], publish[0]));
    assert_eq!(attribute(publish[0], "error.type").as_deref(), Some("rejected"));
    assert_eq!(attribute(process[0], "error.type").as_deref(), Some("handler"));
}
