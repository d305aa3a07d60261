//! The messaging metrics the core records (feature `metrics`): what a
//! recorder sees after a known run on the memory transport.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use tower::service_fn;
use watchtower::prelude::*;
use watchtower_memory::MemoryBroker;

/// Every series of a snapshot, by name and sorted labels.
type Series = HashMap<(String, Vec<(String, String)>), DebugValue>;

fn series(snapshotter: &Snapshotter) -> Series {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value): (CompositeKey, _, _, DebugValue)| {
            let (_, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

fn counter(all: &Series, name: &str, l: &[(&str, &str)]) -> u64 {
    match all.get(&(name.to_owned(), labels(l))) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name}: {other:?}"),
    }
}

fn histogram_count(all: &Series, name: &str, l: &[(&str, &str)]) -> usize {
    match all.get(&(name.to_owned(), labels(l))) {
        Some(DebugValue::Histogram(values)) => values.len(),
        None => 0,
        other => panic!("{name}: {other:?}"),
    }
}

fn gauge(all: &Series, name: &str, l: &[(&str, &str)]) -> f64 {
    match all.get(&(name.to_owned(), labels(l))) {
        Some(DebugValue::Gauge(g)) => g.into_inner(),
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_known_run_is_counted_under_the_opentelemetry_names() {
    // A recorder for this thread only; the current-thread runtime runs
    // every task here. One publish before it is installed must not count,
    // and must not stop later publishes from counting.
    let broker = MemoryBroker::new();
    let mut publisher = broker.publisher();
    publisher
        .publish(Event::new("orders.warmup", serde_json::Value::Null))
        .await
        .unwrap();

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    // 10 events: `fail` (3 of them) fails its first delivery and is
    // redelivered; `poison` (2) is refused for good and dead-lettered.
    let (seen, mut deliveries) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handle = broker
        .subscriber()
        .subscribe(
            ["orders"],
            service_fn(move |event: Event| {
                let _ = seen.send(());
                let attempt = event.extension(watchtower::ext::ATTEMPT).map(str::to_owned);
                async move {
                    match (event.ty(), attempt) {
                        ("fail", None) => Err(Error::new(ErrorKind::Handler, "first delivery fails")),
                        ("poison", _) => Err(Error::new(ErrorKind::Handler, "never").with_retryable(false)),
                        _ => Ok(()),
                    }
                }
            }),
        )
        .await
        .unwrap();
    for ty in [
        "ok", "ok", "ok", "ok", "ok", "fail", "fail", "fail", "poison", "poison",
    ] {
        publisher
            .publish(Event::new(ty, serde_json::Value::Null).with_topic("orders"))
            .await
            .unwrap();
    }
    // A publish the broker refuses: an invalid event.
    let mut invalid = Event::new("ok", serde_json::Value::Null).with_topic("orders");
    invalid.set_id("");
    assert!(publisher.publish(invalid).await.is_err());

    watchtower_test_support::within("13 deliveries", async {
        for _ in 0..13 {
            deliveries.recv().await.unwrap();
        }
    })
    .await;
    broker.wait_idle(Duration::from_secs(5)).await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(
        (stats.acked, stats.nacked, stats.dead_lettered),
        (8, 3, 2),
        "{stats}"
    );

    let all = series(&snapshotter);
    let dest = [
        ("messaging.system", "memory"),
        ("messaging.destination.name", "orders"),
    ];
    let publish = [dest[0], dest[1], ("messaging.operation.name", "publish")];
    assert_eq!(
        counter(&all, "messaging.client.sent.messages", &publish),
        10,
        "{all:#?}"
    );
    assert_eq!(
        histogram_count(&all, "messaging.client.operation.duration", &publish),
        10
    );
    let failed = [
        publish[0],
        publish[1],
        publish[2],
        ("error.type", "invalid_event"),
    ];
    assert_eq!(
        counter(&all, "messaging.client.sent.messages", &failed),
        1,
        "{all:#?}"
    );
    assert_eq!(
        counter(
            &all,
            "messaging.client.sent.messages",
            &[
                ("messaging.system", "memory"),
                ("messaging.destination.name", "orders.warmup"),
                ("messaging.operation.name", "publish")
            ]
        ),
        0,
        "published before the recorder was installed"
    );

    let process = [dest[0], dest[1], ("messaging.operation.name", "process")];
    assert_eq!(counter(&all, "messaging.client.consumed.messages", &process), 13);
    assert_eq!(histogram_count(&all, "messaging.process.duration", &dest), 8);
    assert_eq!(
        histogram_count(
            &all,
            "messaging.process.duration",
            &[dest[0], dest[1], ("error.type", "handler")]
        ),
        5
    );
    assert_eq!(counter(&all, "watchtower.consumer.acks", &dest), 8);
    assert_eq!(counter(&all, "watchtower.consumer.nacks", &dest), 3);
    assert_eq!(counter(&all, "watchtower.consumer.redeliveries", &dest), 3);
    assert_eq!(counter(&all, "watchtower.consumer.dead_letters", &dest), 2);
    assert_eq!(counter(&all, "watchtower.consumer.rejects", &dest), 2);
    assert_eq!(counter(&all, "watchtower.consumer.poison", &dest), 0);
    assert_eq!(gauge(&all, "watchtower.consumer.in_flight", &dest), 0.0);
    let kinds: Vec<MetricKind> = snapshotter
        .snapshot()
        .into_vec()
        .iter()
        .map(|(k, ..)| k.kind())
        .collect();
    assert!(kinds.contains(&MetricKind::Gauge));
}

#[tokio::test(flavor = "current_thread")]
async fn a_thousand_destinations_are_counted_each() {
    // More destinations than the per-thread table remembers: each is still
    // counted under its own name.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let broker = MemoryBroker::new();
    let mut publisher = broker.publisher();
    for round in 0..2 {
        for n in 0..1000 {
            publisher
                .publish(Event::new("t", serde_json::Value::Null).with_topic(format!("d.{n}")))
                .await
                .unwrap_or_else(|e| panic!("round {round}, d.{n}: {e}"));
        }
    }
    let all = series(&snapshotter);
    for n in 0..1000 {
        let d = format!("d.{n}");
        let l = [
            ("messaging.system", "memory"),
            ("messaging.destination.name", d.as_str()),
            ("messaging.operation.name", "publish"),
        ];
        assert_eq!(counter(&all, "messaging.client.sent.messages", &l), 2, "{d}");
    }
}
