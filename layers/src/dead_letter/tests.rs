use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tower::{Layer, Service, ServiceExt, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event};

use super::*;
use crate::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use crate::retry::{Jitter, RetryConfig, RetryLayer};

fn by_type() -> impl Service<Event, Response = &'static str, Error = Error> + Clone {
    service_fn(|e: Event| async move {
        match e.ty() {
            "ok" => Ok("sent"),
            "timeout" => Err(Error::new(ErrorKind::Timeout, "no answer")),
            _ => Err(Error::new(ErrorKind::Rejected, "no such stream")),
        }
    })
}

#[tokio::test]
async fn delivered_events_pass_through() {
    let dlq = MemoryDeadLetters::new(10);
    let mut svc = DeadLetterLayer::new(dlq.clone()).layer(by_type());
    let outcome = svc.ready().await.unwrap().call(Event::empty("ok")).await.unwrap();
    assert_eq!(outcome.delivered(), Some("sent"));
    assert!(dlq.is_empty());
}

#[tokio::test]
async fn failed_events_are_annotated_and_kept() {
    let dlq = MemoryDeadLetters::new(10);
    let layer = DeadLetterLayer::new(dlq.clone());
    let mut svc = layer.layer(by_type());
    let event = Event::empty("bad").with_topic("orders.eu");
    let outcome = svc.ready().await.unwrap().call(event.clone()).await.unwrap();
    let dead = outcome.dead_lettered().expect("dead-lettered");
    assert_eq!(dead.error.kind(), ErrorKind::Rejected);
    let kept = dlq.drain();
    assert_eq!(kept.len(), 1);
    let kept = &kept[0];
    assert_eq!(kept.id(), event.id());
    assert_eq!(kept.extension(ext::DEAD_LETTER_KIND), Some("rejected"));
    assert_eq!(
        kept.extension(ext::DEAD_LETTER_REASON),
        Some("rejected: no such stream")
    );
    assert_eq!(kept.extension(ext::DEAD_LETTER_TOPIC), Some("orders.eu"));
    assert_eq!(kept.extension(ext::ATTEMPT), Some("1"));
    let time = kept.extension(ext::DEAD_LETTER_TIME).unwrap();
    assert!(time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).is_ok());
    assert_eq!(dead.event.id(), kept.id());
    assert_eq!(
        layer.handle().stats(),
        DeadLetterStats {
            dead_lettered: 1,
            failed: 0
        }
    );

    let err = Outcome::<()>::DeadLettered(dead).into_result().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadLettered);
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn with_topic_redirects_dead_letters() {
    let dlq = MemoryDeadLetters::new(10);
    let mut svc = DeadLetterLayer::with_topic(dlq.clone(), "dlq.orders").layer(by_type());
    let _ = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("bad"))
        .await
        .unwrap();
    let kept = dlq.drain();
    assert_eq!(kept[0].topic(), "dlq.orders");
    assert_eq!(kept[0].extension(ext::DEAD_LETTER_TOPIC), Some("bad"));
}

#[tokio::test(start_paused = true)]
async fn retry_below_reports_the_attempt_count() {
    let dlq = MemoryDeadLetters::new(10);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |_: Event| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(Error::new(ErrorKind::Timeout, "slow")) }
    });
    let mut svc = tower::ServiceBuilder::new()
        .layer(DeadLetterLayer::new(dlq.clone()))
        .layer(RetryLayer::new(
            RetryConfig::new().max_attempts(4).jitter(Jitter::None),
        ))
        .service(inner);
    let outcome = svc.ready().await.unwrap().call(Event::empty("x")).await.unwrap();
    assert!(outcome.is_dead_lettered());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let kept = dlq.drain();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].extension(ext::ATTEMPT), Some("4"));
    assert_eq!(kept[0].extension(ext::DEAD_LETTER_KIND), Some("timeout"));
}

#[tokio::test]
async fn readiness_failure_is_dead_lettered_without_calling_inner() {
    let dlq = MemoryDeadLetters::new(10);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |_: Event| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Error>(()) }
    });
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new());
    breaker.handle().force_open();
    let mut svc = tower::ServiceBuilder::new()
        .layer(DeadLetterLayer::new(dlq.clone()))
        .layer(breaker.clone())
        .service(inner);
    // Never fails poll_ready: the open breaker's error goes with the next event.
    let outcome = svc.ready().await.unwrap().call(Event::empty("x")).await.unwrap();
    assert_eq!(
        outcome.dead_lettered().unwrap().error.kind(),
        ErrorKind::CircuitOpen
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        dlq.drain()[0].extension(ext::DEAD_LETTER_KIND),
        Some("circuit_open")
    );
    breaker.handle().reset();
    let outcome = svc.ready().await.unwrap().call(Event::empty("y")).await.unwrap();
    assert!(outcome.is_delivered());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failing_dead_letter_service_returns_both_errors_and_the_event() {
    let dlq = MemoryDeadLetters::new(0);
    let layer = DeadLetterLayer::new(dlq.clone());
    let mut svc = layer.layer(by_type());
    let event = Event::empty("timeout");
    let mut err = svc.ready().await.unwrap().call(event.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.is_retryable());
    let both = DeadLetterFailed::find(&err).expect("both errors");
    assert_eq!(both.failure.kind(), ErrorKind::Timeout);
    assert_eq!(both.dead_letter_error.kind(), ErrorKind::Overloaded);
    assert!(err.to_string().contains("no answer") && err.to_string().contains("dead-letter queue is full"));
    assert_eq!(
        err.take_event().map(|e| e.id().to_owned()),
        Some(event.id().to_owned())
    );
    assert_eq!(
        layer.handle().stats(),
        DeadLetterStats {
            dead_lettered: 0,
            failed: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_dead_letters_round_trip_and_redrive() {
    let path = std::env::temp_dir().join(format!("watchtower-dlq-{}.jsonl", uuid_like()));
    let file = FileDeadLetters::open(&path).unwrap();
    let mut svc = DeadLetterLayer::new(file).layer(by_type());
    for i in 0..5 {
        let e = Event::new("bad", serde_json::json!({ "n": i })).with_topic(format!("orders.{i}"));
        assert!(
            svc.ready()
                .await
                .unwrap()
                .call(e)
                .await
                .unwrap()
                .is_dead_lettered()
        );
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"not json\n"))
        .unwrap();
    let file::FileContents {
        events,
        bad_lines: bad,
    } = FileDeadLetters::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, 6);
    assert_eq!(events.len(), 5);
    assert_eq!(events[3].topic(), "orders.3");
    assert_eq!(events[3].extension(ext::DEAD_LETTER_KIND), Some("rejected"));

    let target = MemoryDeadLetters::new(3);
    let report = redrive(events, &mut target.clone()).await;
    assert_eq!(report.redriven, 3);
    assert_eq!(report.failed.len(), 2, "the target is full after three");
    let sent = target.drain();
    assert_eq!(sent[0].topic(), "orders.0");
    assert_eq!(sent[0].extension(ext::DEAD_LETTER_KIND), None);
    assert_eq!(sent[0].extension(ext::ATTEMPT), None);
    assert_eq!(sent[2].json::<serde_json::Value>().unwrap()["n"], 2);
}

#[tokio::test]
async fn redrive_memory_puts_refused_events_back() {
    let dlq = MemoryDeadLetters::new(10);
    for ty in ["ok", "bad", "ok"] {
        dlq.push(Event::empty(ty)).unwrap();
    }
    let report = redrive_memory(&dlq, &mut by_type()).await;
    assert_eq!(report.redriven, 2);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].1.kind(), ErrorKind::Rejected);
    assert_eq!(dlq.drain().iter().map(Event::ty).collect::<Vec<_>>(), ["bad"]);
}

fn uuid_like() -> String {
    format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "")
        + Event::empty("x").id()
}
