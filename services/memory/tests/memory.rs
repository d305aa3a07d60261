//! Behaviour of the memory transport beyond the conformance suite.

use std::time::Duration;

use futures_util::StreamExt as _;
use watchtower::health::Status;
use watchtower::prelude::*;
use watchtower_memory::{MemoryBroker, MemoryConfig};

fn options(patterns: &[&str]) -> SubscribeOptions {
    SubscribeOptions::new(patterns).unwrap()
}

async fn next(
    subscription: &mut (
             impl futures_util::Stream<Item = Result<Delivery<watchtower_memory::MemoryAcker>, Error>> + Unpin
         ),
) -> Delivery<watchtower_memory::MemoryAcker> {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
        .expect("no error")
}

#[tokio::test]
async fn close_fails_publishers_and_ends_subscriptions_after_what_they_hold() {
    let broker = MemoryBroker::new();
    let mut subscription = broker.subscriber().open(options(&["a"])).await.unwrap();
    let mut publisher = broker.publisher();
    let sent = Event::new("a", serde_json::json!(1));
    publisher.publish(sent.clone()).await.unwrap();
    broker.close();
    let err = publisher
        .publish(Event::new("a", serde_json::json!(2)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.event(), Some(&sent));
    delivery.ack().await.unwrap();
    assert!(subscription.next().await.is_none());
    let err = broker.subscriber().open(options(&["a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn retention_lets_a_late_subscriber_replay_in_order() {
    let broker = MemoryBroker::with_config(MemoryConfig::new().retention(3));
    let mut publisher = broker.publisher();
    let sent: Vec<Event> = (0..5)
        .map(|i| Event::new("orders.placed", serde_json::json!(i)))
        .collect();
    for event in &sent {
        publisher.publish(event.clone()).await.unwrap();
    }
    assert!(broker.subscriber().capabilities().replay);
    let mut replaying = broker
        .subscriber()
        .open(options(&["orders.*"]).replay(true))
        .await
        .unwrap();
    for expected in &sent[2..] {
        let delivery = next(&mut replaying).await;
        assert_eq!(delivery.event(), Some(expected));
        delivery.ack().await.unwrap();
    }
    let mut fresh = broker.subscriber().open(options(&["orders.*"])).await.unwrap();
    let later = Event::new("orders.placed", serde_json::json!(5));
    publisher.publish(later.clone()).await.unwrap();
    assert_eq!(
        next(&mut fresh).await.event(),
        Some(&later),
        "no replay without asking"
    );
    assert_eq!(next(&mut replaying).await.event(), Some(&later));
}

#[tokio::test]
async fn max_pending_refuses_with_the_event_attached() {
    let broker = MemoryBroker::with_config(MemoryConfig::new().max_pending(2));
    let _subscription = broker.subscriber().open(options(&["q"])).await.unwrap();
    let mut publisher = broker.publisher();
    for i in 0..2 {
        publisher
            .publish(Event::new("q", serde_json::json!(i)))
            .await
            .unwrap();
    }
    let refused = Event::new("q", serde_json::json!(2));
    let mut err = publisher.publish(refused.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert!(err.is_retryable());
    assert_eq!(err.take_event(), Some(refused));
}

#[tokio::test(start_paused = true)]
async fn nack_with_delay_redelivers_after_the_delay() {
    let broker = MemoryBroker::new();
    let mut subscription = broker.subscriber().open(options(&["d"])).await.unwrap();
    broker
        .publisher()
        .publish(Event::new("d", serde_json::json!(0)))
        .await
        .unwrap();
    let delivery = next(&mut subscription).await;
    delivery.nack(Some(Duration::from_secs(30))).await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(29), subscription.next()).await;
    assert!(early.is_err(), "redelivered before the delay");
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.delivery_count(), 2);
    delivery.ack().await.unwrap();
    assert!(broker.wait_idle(Duration::from_secs(1)).await);
}

#[tokio::test]
async fn dropping_an_unsettled_delivery_redelivers_it() {
    let broker = MemoryBroker::new();
    let mut subscription = broker.subscriber().open(options(&["r"])).await.unwrap();
    let sent = Event::new("r", serde_json::json!(0));
    broker.publisher().publish(sent.clone()).await.unwrap();
    drop(next(&mut subscription).await);
    let again = next(&mut subscription).await;
    assert_eq!((again.event(), again.delivery_count()), (Some(&sent), 2));
    again.ack().await.unwrap();
    assert_eq!(broker.outstanding(), 0);
}

#[tokio::test]
async fn an_ephemeral_subscription_leaves_no_trace_when_dropped() {
    let broker = MemoryBroker::new();
    let subscription = broker.subscriber().open(options(&["gone"])).await.unwrap();
    broker
        .publisher()
        .publish(Event::new("gone", serde_json::json!(0)))
        .await
        .unwrap();
    assert_eq!(broker.outstanding(), 1);
    drop(subscription);
    assert_eq!(broker.outstanding(), 0);
    broker
        .publisher()
        .publish(Event::new("gone", serde_json::json!(1)))
        .await
        .unwrap();
    assert_eq!(broker.outstanding(), 0, "published to nobody");
}

#[tokio::test]
async fn a_group_keeps_events_while_no_member_is_connected() {
    let broker = MemoryBroker::new();
    let group = options(&["jobs.>"]).group("workers").unwrap();
    drop(broker.subscriber().open(group.clone()).await.unwrap());
    let sent = Event::new("jobs.email", serde_json::json!({"to": "a@example.com"}));
    broker.publisher().publish(sent.clone()).await.unwrap();
    let mut member = broker.subscriber().open(group).await.unwrap();
    let delivery = next(&mut member).await;
    assert_eq!(delivery.event(), Some(&sent));
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn invalid_events_and_topics_are_refused() {
    let broker = MemoryBroker::new();
    let mut publisher = broker.publisher();
    let mut bad = Event::new("ok", serde_json::json!(0));
    bad.set_source("");
    assert_eq!(
        publisher.publish(bad).await.unwrap_err().kind(),
        ErrorKind::InvalidEvent
    );
    let wildcard_topic = Event::new("a.*", serde_json::json!(0));
    assert_eq!(
        publisher.publish(wildcard_topic).await.unwrap_err().kind(),
        ErrorKind::InvalidTopic
    );
    assert_eq!(
        broker.publish_raw("a..b", "x").unwrap_err().kind(),
        ErrorKind::InvalidTopic
    );
}

#[tokio::test]
async fn replay_follows_publish_order_not_event_time() {
    let broker = MemoryBroker::with_config(MemoryConfig::new().retention(10));
    let mut publisher = broker.publisher();
    let now = time::OffsetDateTime::now_utc();
    let mut sent = Vec::new();
    for (i, back) in [(0, 1), (1, 2), (2, 3)] {
        let event = Event::builder("audit")
            .time(now - time::Duration::hours(back))
            .json(&i)
            .unwrap()
            .build()
            .unwrap();
        publisher.publish(event.clone()).await.unwrap();
        sent.push(event);
    }
    let undated = Event::builder("audit").no_time().build().unwrap();
    publisher.publish(undated.clone()).await.unwrap();
    sent.push(undated);
    let mut replaying = broker
        .subscriber()
        .open(options(&["audit"]).replay(true))
        .await
        .unwrap();
    for expected in &sent {
        let delivery = next(&mut replaying).await;
        assert_eq!(delivery.event(), Some(expected));
        delivery.ack().await.unwrap();
    }
}

#[test]
fn publishing_to_new_topics_while_subscriptions_come_and_go_loses_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let broker = MemoryBroker::new();
        let group = options(&["t.>"]).group("all").unwrap();
        let subscription = broker.subscriber().open(group).await.unwrap();
        let churn = {
            let broker = broker.clone();
            tokio::spawn(async move {
                for _ in 0..2_000 {
                    drop(broker.subscriber().open(options(&["other"])).await.unwrap());
                    tokio::task::yield_now().await;
                }
            })
        };
        let publish = {
            let broker = broker.clone();
            tokio::task::spawn_blocking(move || {
                let mut publisher = broker.publisher();
                for i in 0..20_000 {
                    let event = Event::new(format!("t.{i}"), serde_json::json!(i));
                    tower::Service::call(&mut publisher, event).into_inner().unwrap();
                }
            })
        };
        publish.await.unwrap();
        churn.await.unwrap();
        assert_eq!(broker.outstanding(), 20_000, "events lost by a durable group");
        drop(subscription);
    });
}

/// Two members of a group wait; the one woken for an event goes away
/// without taking it: the other member is woken and gets it.
#[tokio::test]
async fn a_member_that_leaves_after_being_woken_passes_the_event_on() {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let woken = |f: &Arc<Flag>| f.0.swap(false, std::sync::atomic::Ordering::SeqCst);

    let broker = MemoryBroker::new();
    let opts = || options(&["job.*"]).group("workers").unwrap();
    let mut a = broker.subscriber().open(opts()).await.unwrap();
    let mut b = broker.subscriber().open(opts()).await.unwrap();
    let (fa, fb) = (Arc::new(Flag(false.into())), Arc::new(Flag(false.into())));
    let (wa, wb) = (Waker::from(fa.clone()), Waker::from(fb.clone()));
    assert!(a.poll_next_unpin(&mut Context::from_waker(&wa)).is_pending());
    assert!(b.poll_next_unpin(&mut Context::from_waker(&wb)).is_pending());

    broker.publisher().publish(Event::empty("job.run")).await.unwrap();
    let (woke_a, woke_b) = (woken(&fa), woken(&fb));
    assert!(woke_a ^ woke_b, "one event wakes exactly one member");
    let (mut stays, flag) = if woke_a {
        drop(a);
        (b, fb)
    } else {
        drop(b);
        (a, fa)
    };
    assert!(woken(&flag), "the remaining member is woken in its place");
    let waker = Waker::from(flag);
    match stays.poll_next_unpin(&mut Context::from_waker(&waker)) {
        Poll::Ready(Some(Ok(delivery))) => {
            assert_eq!(delivery.event().map(Event::ty), Some("job.run"));
            delivery.ack().await.unwrap();
        }
        _ => panic!("the remaining member gets the event"),
    }
    assert!(broker.wait_idle(Duration::from_secs(5)).await);
}

/// Events published to a group with several busy members are shared out:
/// every event is handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_members_handle_every_event_exactly_once() {
    let broker = MemoryBroker::new();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for _ in 0..4 {
        let seen = seen.clone();
        handles.push(
            broker
                .subscriber()
                .subscribe_with(
                    options(&["job.*"]).group("pool").unwrap(),
                    tower::service_fn(move |e: Event| {
                        let seen = seen.clone();
                        async move {
                            tokio::task::yield_now().await;
                            seen.lock().unwrap().push(e.id().to_owned());
                            Ok::<_, Error>(())
                        }
                    }),
                )
                .await
                .unwrap(),
        );
    }
    let mut publisher = broker.publisher();
    let mut ids = Vec::new();
    for i in 0..2_000 {
        let event = Event::new("job.run", serde_json::json!({ "i": i }));
        ids.push(event.id().to_owned());
        publisher.publish(event).await.unwrap();
    }
    assert!(broker.wait_idle(Duration::from_secs(10)).await);
    let mut acked = 0;
    for handle in handles {
        acked += handle.stop().await.unwrap().acked;
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "each event handled once");
    assert_eq!(acked, 2_000);
}

/// A member that goes away holding events it took but did not deliver
/// gives them back, in order, to the next member of its group.
#[tokio::test]
async fn events_a_member_took_but_did_not_deliver_go_to_the_next_member_in_order() {
    let broker = MemoryBroker::new();
    let opts = || options(&["job.*"]).group("g").unwrap();
    let mut first = broker.subscriber().open(opts()).await.unwrap();
    let mut publisher = broker.publisher();
    for i in 0..5 {
        publisher.publish(Event::empty(format!("job.{i}"))).await.unwrap();
    }
    let delivery = next(&mut first).await;
    assert_eq!(delivery.event().map(Event::ty), Some("job.0"));
    delivery.ack().await.unwrap();
    drop(first);
    let mut second = broker.subscriber().open(opts()).await.unwrap();
    for i in 1..5 {
        let delivery = next(&mut second).await;
        assert_eq!(delivery.event().map(Event::ty), Some(format!("job.{i}").as_str()));
        assert_eq!(delivery.delivery_count(), 1);
        delivery.ack().await.unwrap();
    }
    assert!(broker.wait_idle(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn health_is_up_until_close_then_down() {
    let broker = MemoryBroker::new();
    let health = broker.health().await;
    assert_eq!((health.system(), health.status()), ("memory", Status::Up));
    broker.close();
    let health = broker.health().await;
    assert_eq!(health.status(), Status::Down);
    assert_eq!(health.reason(), Some("memory broker is closed"));
}
