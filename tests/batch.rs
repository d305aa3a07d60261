//! Batch publishing through any `Service<Event>`: `OneByOne` and
//! `Pipelined` answer each event in order, hold the inner service's
//! window, and answer an event the service is not ready for with the
//! readiness error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, service_fn};
use watchtower::batch::{OneByOne, Pipelined};
use watchtower::{Error, ErrorKind, Event, PublishBatchExt, Receipt};

fn numbered(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new("t", serde_json::json!({ "i": i })))
        .collect()
}

/// A publisher that counts the calls in flight at once, and the most.
fn counting(
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
) -> impl Service<Event, Response = Receipt, Error = Error, Future: Send> + Clone + Send + 'static {
    service_fn(move |event: Event| {
        let (in_flight, most) = (in_flight.clone(), most.clone());
        async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // Let the other calls of the batch run meanwhile, if any were made.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if event.json::<serde_json::Value>().unwrap()["i"] == 3 {
                return Err(Error::new(ErrorKind::Rejected, "refused"));
            }
            Ok(Receipt::for_event(&event))
        }
    })
}

fn check(answers: &[Result<Receipt, Error>], events: &[Event]) {
    assert_eq!(answers.len(), events.len());
    for (i, (answer, event)) in answers.iter().zip(events).enumerate() {
        match answer {
            Ok(receipt) => assert_eq!(&*receipt.event_id, event.id()),
            Err(e) => {
                assert_eq!(i, 3);
                assert_eq!(e.kind(), ErrorKind::Rejected);
            }
        }
    }
    assert!(answers[3].is_err());
}

#[tokio::test]
async fn one_by_one_waits_for_each_answer_and_answers_in_order() {
    let (in_flight, most) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
    let mut batches = OneByOne::new(counting(in_flight, most.clone()));
    let events = numbered(50);
    let answers = batches.publish_batch(events.clone()).await.unwrap();
    check(&answers, &events);
    assert_eq!(most.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn pipelined_makes_every_call_the_window_allows_and_answers_in_order() {
    let (in_flight, most) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
    // A window of 4, freed only as answers are taken: the batch drives its
    // own answers while it waits for room.
    let mut batches = Pipelined::new(ConcurrencyLimitLayer::new(4).layer(counting(in_flight, most.clone())));
    let events = numbered(50);
    let answers = batches.publish_batch(events.clone()).await.unwrap();
    check(&answers, &events);
    assert_eq!(most.load(Ordering::SeqCst), 4);
}

/// Ready for the first two calls, then never again.
#[derive(Clone)]
struct Closing {
    calls: Arc<AtomicUsize>,
}

impl Service<Event> for Closing {
    type Response = Receipt;
    type Error = Error;
    type Future = std::future::Ready<Result<Receipt, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(if self.calls.load(Ordering::SeqCst) < 2 {
            Ok(())
        } else {
            Err(Error::closed("closed"))
        })
    }

    fn call(&mut self, event: Event) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Receipt::for_event(&event)))
    }
}

#[tokio::test]
async fn an_event_the_service_is_not_ready_for_is_answered_with_the_readiness_error() {
    for pipelined in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = Closing { calls: calls.clone() };
        let events = numbered(5);
        let mut answers = if pipelined {
            Pipelined::new(inner).publish_batch(events.clone()).await.unwrap()
        } else {
            OneByOne::new(inner).publish_batch(events.clone()).await.unwrap()
        };
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(answers[..2].iter().all(Result::is_ok));
        for (answer, event) in answers[2..].iter_mut().zip(&events[2..]) {
            let error = answer.as_mut().unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Closed);
            assert_eq!(error.take_event().unwrap().id(), event.id());
        }
    }
}
