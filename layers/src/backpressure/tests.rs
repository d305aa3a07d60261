use std::time::Duration;

use futures_util::FutureExt as _;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_test::mock::{self, Spawn};
use watchtower::{Error, ErrorKind, Event};

use super::*;

type Mock = mock::Mock<Event, &'static str>;
type Handle = mock::Handle<Event, &'static str>;

fn setup(capacity: usize, overflow: Overflow) -> (Backpressure<&'static str>, Handle, BackpressureHandle) {
    setup_with(BackpressureLayer::new(capacity, overflow))
}

/// With callers calling the service themselves when they can.
fn setup_direct(
    capacity: usize,
    overflow: Overflow,
) -> (Backpressure<&'static str>, Handle, BackpressureHandle) {
    setup_with(BackpressureLayer::new(capacity, overflow).direct(true))
}

fn setup_with(layer: BackpressureLayer) -> (Backpressure<&'static str>, Handle, BackpressureHandle) {
    let layer = layer.concurrency(1);
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    handle.allow(0);
    let stats = layer.handle();
    (layer.layer(inner), handle, stats)
}

async fn next(handle: &mut Handle) -> (Event, mock::SendResponse<&'static str>) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the worker sends the next event")
        .expect("a request")
}

#[tokio::test(start_paused = true)]
async fn block_keeps_poll_ready_pending_until_there_is_room() {
    let (svc, mut handle, stats) = setup(2, Overflow::Block);
    let mut a = Spawn::new(svc.clone());
    let mut c = Spawn::new(svc.clone());
    assert!(a.poll_ready().is_ready());
    let first = a.call(Event::empty("1"));
    assert!(a.poll_ready().is_ready());
    let second = a.call(Event::empty("2"));
    assert!(c.poll_ready().is_pending(), "two queued, capacity two");
    assert_eq!(stats.stats().depth, 2);

    handle.allow(1);
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "1");
    assert!(c.is_woken());
    assert!(c.poll_ready().is_ready(), "the worker took one: there is room");
    respond.send_response("one");
    assert_eq!(first.await.unwrap(), "one");
    handle.allow(1);
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "2");
    respond.send_response("two");
    assert_eq!(second.await.unwrap(), "two");
    assert_eq!(stats.stats().high_water, 2);
}

#[tokio::test(start_paused = true)]
async fn a_reserved_slot_is_released_when_the_service_is_dropped() {
    let (svc, _handle, _) = setup(1, Overflow::Block);
    let mut a = Spawn::new(svc.clone());
    let mut b = Spawn::new(svc);
    assert!(a.poll_ready().is_ready());
    assert!(b.poll_ready().is_pending());
    drop(a);
    assert!(b.is_woken());
    assert!(b.poll_ready().is_ready());
}

#[tokio::test(start_paused = true)]
async fn drop_newest_refuses_the_new_event_and_hands_it_back() {
    let (mut svc, mut handle, stats) = setup(1, Overflow::DropNewest);
    let first = svc.ready().await.unwrap().call(Event::empty("1"));
    let mut err = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("2"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Dropped);
    assert_eq!(err.take_event().unwrap().ty(), "2");
    assert_eq!(stats.stats().dropped_newest, 1);
    handle.allow(1);
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "1");
    respond.send_response("ok");
    assert_eq!(first.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn drop_oldest_evicts_the_oldest_to_its_own_caller() {
    let (mut svc, mut handle, stats) = setup(2, Overflow::DropOldest);
    let mut futures = Vec::new();
    for ty in ["1", "2", "3"] {
        futures.push(svc.ready().await.unwrap().call(Event::empty(ty)));
    }
    let mut f = futures.into_iter();
    let mut err = f.next().unwrap().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Dropped);
    assert_eq!(err.take_event().unwrap().ty(), "1");
    let s = stats.stats();
    assert_eq!((s.dropped_oldest, s.depth, s.high_water), (1, 2, 2));
    for ty in ["2", "3"] {
        handle.allow(1);
        let (event, respond) = next(&mut handle).await;
        assert_eq!(event.ty(), ty);
        respond.send_response("ok");
        assert_eq!(f.next().unwrap().await.unwrap(), "ok");
    }
}

#[tokio::test(start_paused = true)]
async fn inner_readiness_error_fails_one_event_and_work_goes_on() {
    let (mut svc, mut handle, _) = setup(4, Overflow::Block);
    let first = svc.ready().await.unwrap().call(Event::empty("1"));
    let second = svc.ready().await.unwrap().call(Event::empty("2"));
    handle.send_error(Error::new(ErrorKind::Connection, "reset"));
    let mut err = first.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(err.take_event().unwrap().ty(), "1");
    handle.allow(1);
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "2");
    respond.send_response("ok");
    assert_eq!(second.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn drains_the_queue_when_the_last_handle_goes() {
    let layer = BackpressureLayer::new(100, Overflow::Block).concurrency(3);
    let stats = layer.handle();
    let inner = service_fn(|e: Event| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, Error>(e.id().to_owned())
    });
    let (mut svc, worker) = Backpressure::pair(inner, &layer);
    let worker = tokio::spawn(worker);
    let mut futures = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..10 {
        let e = Event::empty("x");
        ids.push(e.id().to_owned());
        futures.push(tokio::spawn(svc.ready().await.unwrap().call(e)));
    }
    drop(svc);
    let mut answered = Vec::new();
    for f in futures {
        answered.push(f.await.unwrap().unwrap());
    }
    assert_eq!(answered, ids);
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap();
    let s = stats.stats();
    assert_eq!((s.depth, s.in_flight), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn queued_callers_get_their_event_back_when_the_worker_is_dropped() {
    let layer = BackpressureLayer::new(10, Overflow::Block);
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    handle.allow(0);
    let (mut svc, worker) = Backpressure::pair(inner, &layer);
    let fut = svc.ready().await.unwrap().call(Event::empty("kept"));
    drop(worker);
    let mut err = fut.await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(err.take_event().unwrap().ty(), "kept");
    assert_eq!(svc.ready().await.err().map(|e| e.kind()), Some(ErrorKind::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_caller_waiting_for_a_slot_is_refused_when_the_worker_goes() {
    let layer = BackpressureLayer::new(1, Overflow::Block);
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    handle.allow(0);
    let (mut svc, worker) = Backpressure::pair(inner, &layer);
    let queued = svc.ready().await.unwrap().call(Event::empty("queued"));
    let mut waiting = Spawn::new(svc.clone());
    assert!(waiting.poll_ready().is_pending(), "the only slot is taken");
    drop(worker);
    assert!(waiting.is_woken());
    match waiting.poll_ready() {
        Poll::Ready(Err(e)) => assert_eq!(e.kind(), ErrorKind::Closed),
        other => panic!("expected Closed, got {other:?}"),
    }
    let mut err = queued.await.unwrap_err();
    assert_eq!(err.take_event().unwrap().ty(), "queued");
}

/// Calls `svc` from `n` tasks at once, each with its own event type, and
/// checks that each gets the type of its own event back.
async fn each_caller_gets_its_own_answer(svc: &Backpressure<String>, n: usize) {
    let callers: Vec<_> = (0..n)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(Event::empty(format!("e{i}"))).await })
        })
        .collect();
    let mut answers = Vec::new();
    for caller in callers {
        answers.push(caller.await.unwrap().unwrap());
    }
    let expected: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
    assert_eq!(answers, expected, "every caller got its own answer");
}

#[tokio::test]
async fn many_blocked_callers_all_get_through_a_small_queue() {
    let layer = BackpressureLayer::new(2, Overflow::Block).concurrency(3);
    let svc = layer.layer(service_fn(|e: Event| async move {
        tokio::task::yield_now().await;
        Ok::<_, Error>(e.ty().to_owned())
    }));
    each_caller_gets_its_own_answer(&svc, 200).await;
    assert_eq!(layer.handle().stats().depth, 0);
}

#[tokio::test(start_paused = true)]
async fn with_nothing_queued_the_caller_calls_the_service_itself() {
    let (mut svc, mut handle, stats) = setup_direct(4, Overflow::Block);
    handle.allow(1);
    let answer = svc.ready().await.unwrap().call(Event::empty("1"));
    // No worker ran in between: the call was made in `call`.
    let (event, respond) = handle
        .next_request()
        .now_or_never()
        .expect("the inner service was called at once")
        .expect("a request");
    assert_eq!(event.ty(), "1");
    let s = stats.stats();
    assert_eq!((s.depth, s.high_water, s.in_flight), (0, 0, 1));
    respond.send_response("one");
    assert_eq!(answer.await.unwrap(), "one");
    assert_eq!(stats.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn callers_own_calls_count_towards_the_concurrency_and_nothing_is_overtaken() {
    // Concurrency 1: while the first call runs, the next ones queue.
    let (mut svc, mut handle, stats) = setup_direct(4, Overflow::Block);
    handle.allow(3);
    let first = svc.ready().await.unwrap().call(Event::empty("1"));
    let second = svc.ready().await.unwrap().call(Event::empty("2"));
    let third = svc.ready().await.unwrap().call(Event::empty("3"));
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "1");
    tokio::task::yield_now().await;
    assert!(
        handle.next_request().now_or_never().is_none(),
        "the worker waits while the caller's own call runs"
    );
    assert_eq!(stats.stats().depth, 2);
    respond.send_response("one");
    assert_eq!(first.await.unwrap(), "one");
    for (ty, answer) in [("2", second), ("3", third)] {
        let (event, respond) = next(&mut handle).await;
        assert_eq!(event.ty(), ty, "queued events keep their order");
        respond.send_response("ok");
        assert_eq!(answer.await.unwrap(), "ok");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_own_call_frees_its_place() {
    let (mut svc, mut handle, stats) = setup_direct(4, Overflow::Block);
    handle.allow(2);
    let first = svc.ready().await.unwrap().call(Event::empty("1"));
    let (_, _respond) = next(&mut handle).await;
    assert_eq!(stats.stats().in_flight, 1);
    drop(first);
    assert_eq!(stats.stats().in_flight, 0);
    let second = svc.ready().await.unwrap().call(Event::empty("2"));
    let (event, respond) = handle
        .next_request()
        .now_or_never()
        .expect("called at once again")
        .expect("a request");
    assert_eq!(event.ty(), "2");
    respond.send_response("two");
    assert_eq!(second.await.unwrap(), "two");
}

#[tokio::test(start_paused = true)]
async fn without_direct_calls_the_worker_gets_every_call() {
    let (mut svc, mut handle, stats) = setup(4, Overflow::Block);
    handle.allow(1);
    let answer = svc.ready().await.unwrap().call(Event::empty("1"));
    assert!(
        handle.next_request().now_or_never().is_none(),
        "queued, not called"
    );
    assert_eq!(stats.stats().depth, 1);
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "1");
    respond.send_response("one");
    assert_eq!(answer.await.unwrap(), "one");
}

#[tokio::test(start_paused = true)]
async fn a_worker_run_by_hand_gets_every_call() {
    let layer = BackpressureLayer::new(4, Overflow::Block)
        .concurrency(1)
        .direct(true);
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    handle.allow(1);
    let (mut svc, worker) = Backpressure::pair(inner, &layer);
    let answer = svc.ready().await.unwrap().call(Event::empty("1"));
    assert!(
        handle.next_request().now_or_never().is_none(),
        "queued, not called"
    );
    assert_eq!(layer.handle().stats().depth, 1);
    tokio::spawn(worker);
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "1");
    respond.send_response("one");
    assert_eq!(answer.await.unwrap(), "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_own_calls_and_the_workers_never_exceed_the_concurrency_together() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let inner = {
        let (running, most) = (running.clone(), most.clone());
        service_fn(move |e: Event| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Error>(e.ty().to_owned())
            }
        })
    };
    let layer = BackpressureLayer::new(8, Overflow::Block)
        .concurrency(3)
        .direct(true);
    let svc = layer.layer(inner);
    each_caller_gets_its_own_answer(&svc, 500).await;
    assert!(most.load(Ordering::SeqCst) <= 3, "at most 3 calls ran at once");
    let s = layer.handle().stats();
    assert_eq!((s.depth, s.in_flight), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn queued_calls_whose_callers_have_gone_are_never_started() {
    let layer = BackpressureLayer::new(10, Overflow::Block).concurrency(1);
    let stats = layer.handle();
    let (inner, mut handle): (Mock, Handle) = mock::pair();
    let (mut svc, worker) = Backpressure::pair(inner, &layer);
    let worker = tokio::spawn(worker);

    let stalled = tokio::spawn(svc.ready().await.unwrap().call(Event::empty("stalled")));
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "stalled");
    let dropped = svc.ready().await.unwrap().call(Event::empty("dropped"));
    let timed_out = svc.ready().await.unwrap().call(Event::empty("timed out"));
    let waiting = tokio::spawn(svc.ready().await.unwrap().call(Event::empty("waiting")));
    let cancelled = tokio::spawn(svc.ready().await.unwrap().call(Event::empty("cancelled")));
    assert_eq!(stats.stats().depth, 4);

    drop(dropped);
    let err = tokio::time::timeout(Duration::from_secs(1), timed_out).await;
    assert!(err.is_err(), "nothing answers while the first call stalls");
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());

    respond.send_response("first");
    assert_eq!(stalled.await.unwrap().unwrap(), "first");
    let (event, respond) = next(&mut handle).await;
    assert_eq!(event.ty(), "waiting", "the callers that left are skipped");
    respond.send_response("second");
    assert_eq!(waiting.await.unwrap().unwrap(), "second");

    drop(svc);
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap();
    assert!(handle.next_request().await.is_none(), "nothing else was called");
    let s = stats.stats();
    assert_eq!((s.depth, s.in_flight, s.abandoned), (0, 0, 3));
}

#[tokio::test(start_paused = true)]
async fn an_evicted_event_whose_caller_has_gone_counts_as_abandoned() {
    let (mut svc, mut handle, stats) = setup(2, Overflow::DropOldest);
    let gone = svc.ready().await.unwrap().call(Event::empty("gone"));
    let second = svc.ready().await.unwrap().call(Event::empty("2"));
    drop(gone);
    let third = svc.ready().await.unwrap().call(Event::empty("3"));
    let s = stats.stats();
    assert_eq!((s.dropped_oldest, s.abandoned, s.depth), (0, 1, 2));
    for (ty, fut) in [("2", second), ("3", third)] {
        handle.allow(1);
        let (event, respond) = next(&mut handle).await;
        assert_eq!(event.ty(), ty);
        respond.send_response("ok");
        assert_eq!(fut.await.unwrap(), "ok");
    }
}
