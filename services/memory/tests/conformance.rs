//! The conformance suite on the memory transport, and proof that the suite
//! catches a transport that loses events.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use tower::Service;
use watchtower::conformance::{Harness, run};
use watchtower::{Capabilities, Error, Event, Receipt, Subscriber, Transport};
use watchtower_memory::{MemoryBroker, MemoryConfig, MemoryPublisher, MemorySubscriber};

struct MemoryHarness {
    broker: MemoryBroker,
}

impl Harness for MemoryHarness {
    type Publisher = MemoryPublisher;
    type Subscriber = MemorySubscriber;

    fn name(&self) -> String {
        "memory".into()
    }

    fn system(&self) -> &'static str {
        MemoryBroker::SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.subscriber().capabilities()
    }

    async fn publisher(&self, _namespace: &str) -> Result<MemoryPublisher, Error> {
        Ok(self.broker.publisher())
    }

    async fn subscriber(&self, _namespace: &str) -> Result<MemorySubscriber, Error> {
        Ok(self.broker.subscriber())
    }

    async fn publish_raw(&self, _namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        self.broker.publish_raw(topic, body)?;
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_transport_passes_every_case() {
    let report = run(MemoryHarness {
        broker: MemoryBroker::with_config(MemoryConfig::new().retention(100)),
    })
    .await;
    report.assert_passed();
    assert_eq!(report.passed().len(), 15, "{report}");
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_the_memory_transport() {
    let traces = watchtower_test_support::otel::Traces::capture();
    let harness = MemoryHarness {
        broker: MemoryBroker::new(),
    };
    watchtower_test_support::otel::check_propagation(&harness, &traces)
        .await
        .unwrap();
}

/// A publisher that acknowledges every tenth event without sending it.
#[derive(Clone)]
struct DropsEveryTenth {
    inner: MemoryPublisher,
    count: Arc<AtomicUsize>,
}

impl Service<Event> for DropsEveryTenth {
    type Response = Receipt;
    type Error = Error;
    type Future = std::future::Ready<Result<Receipt, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: Event) -> Self::Future {
        if self.count.fetch_add(1, Ordering::SeqCst) % 10 == 9 {
            std::future::ready(Ok(Receipt::for_event(&event)))
        } else {
            self.inner.call(event)
        }
    }
}

struct LossyHarness {
    broker: MemoryBroker,
}

impl Harness for LossyHarness {
    type Publisher = DropsEveryTenth;
    type Subscriber = MemorySubscriber;

    fn name(&self) -> String {
        "lossy memory".into()
    }

    fn system(&self) -> &'static str {
        MemoryBroker::SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        MemorySubscriber::CAPABILITIES
    }

    async fn publisher(&self, _namespace: &str) -> Result<DropsEveryTenth, Error> {
        Ok(DropsEveryTenth {
            inner: self.broker.publisher(),
            count: Arc::default(),
        })
    }

    async fn subscriber(&self, _namespace: &str) -> Result<MemorySubscriber, Error> {
        Ok(self.broker.subscriber())
    }

    fn patience(&self) -> std::time::Duration {
        // Failing cases wait this long for events that never come.
        std::time::Duration::from_millis(500)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_fails_a_transport_that_drops_every_tenth_event() {
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        run(LossyHarness {
            broker: MemoryBroker::new(),
        }),
    )
    .await
    .expect("suite finishes");
    let failed = report.failed();
    for case in [
        "ordered_100",
        "many_topics",
        "concurrent_publishers",
        "consumer_groups",
        "close_with_events_in_flight",
    ] {
        assert!(failed.contains(&case), "{case} should fail:\n{report}");
    }
    assert_eq!(report.skipped(), vec!["replay", "poison"], "{report}");
}
