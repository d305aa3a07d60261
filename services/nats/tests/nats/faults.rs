//! Faults: a private server killed and restarted, connections cut through
//! a TCP proxy. The shared broker is never touched.

use std::collections::HashSet;
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt as _;
use tower::Service;
use watchtower::health::Status;
use watchtower::{ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber, Transport};
use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig, StreamConfig, WhenDisconnected};
use watchtower_test_support::{NatsServer, PATIENCE, TcpProxy, unique};

use crate::support::numbered;

fn config(url: &str) -> NatsConfig {
    NatsConfig::new(url)
        .max_reconnect_delay(Duration::from_millis(100))
        .request_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_health_follow_the_connection() {
    let mut server = NatsServer::start().await;
    let client = NatsClient::connect(config(&server.url())).await.unwrap();
    let mut publisher = client.publisher();
    poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();

    server.kill().await;
    tokio::time::timeout(PATIENCE, client.disconnected())
        .await
        .unwrap();
    // Reconnecting, with publishers waiting for it: degraded, and why.
    let health = client.health().await;
    assert_eq!(health.status(), Status::Degraded, "{health:?}");
    assert_eq!(health.system(), "nats");
    assert!(
        health.reason().is_some_and(|r| r.contains("not connected")),
        "{health:?}"
    );
    // Not ready while the server is gone.
    let pending = poll_fn(|cx| Poll::Ready(publisher.poll_ready(cx).is_pending())).await;
    assert!(pending, "publisher ready while disconnected");
    // A publisher that fails fast instead says so in the call.
    let fail_fast = NatsClient::connect(
        config(&server.url())
            .retry_initial_connect(true)
            .when_disconnected(WhenDisconnected::Fail),
    )
    .await
    .unwrap();
    let mut failing = fail_fast.publisher();
    // Reconnecting with publishers failing meanwhile: down.
    let health = fail_fast.health().await;
    assert_eq!(health.status(), Status::Down, "{health:?}");
    assert!(
        health.reason().is_some_and(|r| r.contains("not connected")),
        "{health:?}"
    );
    poll_fn(|cx| failing.poll_ready(cx)).await.unwrap();
    let e = failing
        .call(Event::new("a.b", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection);
    assert!(e.is_retryable());

    server.restart().await;
    // The waiting publisher becomes ready by itself once reconnected.
    tokio::time::timeout(PATIENCE, poll_fn(|cx| publisher.poll_ready(cx)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.health().await.status(), Status::Up);
    publisher
        .publish(Event::new("a.b", serde_json::json!({})))
        .await
        .unwrap();
    assert!(client.stats().disconnects >= 1);
    assert!(client.stats().connects >= 2);
    tokio::time::timeout(PATIENCE, fail_fast.connected())
        .await
        .unwrap();
    failing
        .publish(Event::new("a.b", serde_json::json!({})))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_subscribe_time_out_on_a_server_that_does_not_answer() {
    // A frozen server keeps the TCP connection up: only a round trip to it
    // can tell that it is not answering.
    let server = NatsServer::start().await;
    let client = NatsClient::connect(config(&server.url()).request_timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    assert!(client.health().await.is_up());
    server.freeze().await;
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down, "{health:?}");
    assert!(
        health.reason().is_some_and(|r| r.contains("did not answer")),
        "{health:?}"
    );
    assert!(client.is_connected(), "the connection itself is still up");
    let e = client
        .subscriber()
        .open(SubscribeOptions::new(["frozen.>"]).unwrap())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    server.resume();
    assert!(client.health().await.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_consumer_resumes_after_server_restart_and_gets_unacked_again() {
    let mut server = NatsServer::start().await;
    let client = NatsClient::connect(config(&server.url())).await.unwrap();
    let name = unique("F");
    client
        .create_or_update_stream(StreamConfig {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let subscriber = client.jetstream_subscriber(&name).settings(
        ConsumerSettings::new()
            .ack_wait(Duration::from_secs(1))
            .batch(10)
            .double_ack(true),
    );
    let options = SubscribeOptions::new([format!("{name}.>")])
        .unwrap()
        .group("g")
        .unwrap();
    let mut sub = subscriber.open(options.clone()).await.unwrap();
    let mut publisher = client.jetstream_publisher();
    let sent = numbered(&format!("{name}.e"), 40);
    for event in &sent {
        publisher.publish(event.clone()).await.unwrap();
    }
    // Half acknowledged; one held unsettled across the restart.
    let mut acked = HashSet::new();
    let mut held = None;
    while acked.len() < 20 {
        match tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap() {
            Ok(d) => {
                let id = d.event().unwrap().id().to_owned();
                if held.is_none() {
                    held = Some(d);
                } else {
                    d.ack().await.unwrap();
                    acked.insert(id);
                }
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::Connection),
        }
    }
    let held_id = held.as_ref().unwrap().event().unwrap().id().to_owned();
    drop(held);
    drop(sub);

    // Acknowledgements were confirmed (double ack) and the server stops
    // cleanly, so none of them may be lost.
    server.restart_gracefully().await;
    tokio::time::timeout(PATIENCE, client.connected()).await.unwrap();
    // A new member of the group gets everything not acknowledged, the
    // unsettled one included.
    let mut sub = subscriber.open(options).await.unwrap();
    let mut rest = HashSet::new();
    while acked.len() + rest.len() < sent.len() {
        match tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap() {
            Ok(d) => {
                let id = d.event().unwrap().id().to_owned();
                assert!(!acked.contains(&id), "an acknowledged event came back");
                d.ack().await.unwrap();
                rest.insert(id);
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::Connection),
        }
    }
    assert!(rest.contains(&held_id));
    let all: HashSet<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(acked.union(&rest).cloned().collect::<HashSet<_>>(), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_carry_on_after_a_connection_cut() {
    let proxy = TcpProxy::start("127.0.0.1:4222".parse().unwrap()).await.unwrap();
    let client = NatsClient::connect(config(&format!("nats://{}", proxy.addr())))
        .await
        .unwrap();
    let direct = crate::support::local().await;
    let name = unique("CUT");
    crate::support::stream(&direct, &name).await;
    let mut core_sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("core{name}.>")]).unwrap())
        .await
        .unwrap();
    let mut js_sub = client
        .jetstream_subscriber(&name)
        .open(
            SubscribeOptions::new([format!("{name}.>")])
                .unwrap()
                .group("g")
                .unwrap(),
        )
        .await
        .unwrap();
    let mut core_pub = direct.publisher();
    let mut js_pub = direct.jetstream_publisher();

    for round in 0..2 {
        let core_event = Event::new(format!("core{name}.r{round}"), serde_json::json!({}));
        let js_event = Event::new(format!("{name}.r{round}"), serde_json::json!({}));
        if round == 1 {
            proxy.cut();
            tokio::time::timeout(PATIENCE, proxy.wait_accepted(2))
                .await
                .unwrap();
            // Core NATS keeps nothing: probe until the re-sent subscription
            // is in place on the server.
            let probe_topic = format!("core{name}.probe");
            tokio::time::timeout(PATIENCE, async {
                loop {
                    core_pub
                        .publish(Event::new(probe_topic.clone(), serde_json::json!({})))
                        .await
                        .unwrap();
                    if let Ok(Some(Ok(d))) =
                        tokio::time::timeout(Duration::from_millis(200), core_sub.next()).await
                        && d.topic() == probe_topic
                    {
                        break;
                    }
                }
            })
            .await
            .unwrap();
        }
        core_pub.publish(core_event.clone()).await.unwrap();
        js_pub.publish(js_event.clone()).await.unwrap();
        let d = loop {
            match tokio::time::timeout(PATIENCE, core_sub.next())
                .await
                .unwrap()
                .unwrap()
            {
                Ok(d) if d.topic().ends_with(".probe") => continue,
                Ok(d) => break d,
                Err(e) => assert_eq!(e.kind(), ErrorKind::Dropped),
            }
        };
        assert_eq!(d.event(), Some(&core_event));
        let d = loop {
            match tokio::time::timeout(PATIENCE, js_sub.next())
                .await
                .unwrap()
                .unwrap()
            {
                Ok(d) => break d,
                Err(e) => assert_eq!(e.kind(), ErrorKind::Connection, "{e}"),
            }
        };
        assert_eq!(d.event(), Some(&js_event));
        d.ack().await.unwrap();
    }
    assert!(client.stats().disconnects >= 1);
    direct.delete_stream(&name).await.unwrap();
}

/// The promise under faults: 10,000 JetStream publishes through dead
/// letter + retry + circuit breaker, the connection cut twice on the way;
/// every event ends up in the stream exactly once, or in the dead-letter
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_publishes_survive_two_cuts_exactly_once_or_dead_lettered() {
    use futures_util::stream::FuturesUnordered;
    use tower::{ServiceBuilder, ServiceExt as _};
    use watchtower::dead_letter::MemoryDeadLetters;
    use watchtower_layers::ServiceBuilderExt as _;
    use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
    use watchtower_layers::dead_letter::Outcome;
    use watchtower_layers::retry::RetryConfig;

    const EVENTS: usize = 10_000;
    const CONCURRENCY: usize = 256;

    let proxy = TcpProxy::start("127.0.0.1:4222".parse().unwrap()).await.unwrap();
    let client = NatsClient::connect(
        config(&format!("nats://{}", proxy.addr())).request_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let name = unique("DONE");
    crate::support::stream(&client, &name).await;

    let dlq = MemoryDeadLetters::new(EVENTS);
    let publisher = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(
            RetryConfig::new()
                .max_attempts(10)
                .delays(Duration::from_millis(20), Duration::from_millis(500))
                .max_elapsed(Duration::from_secs(30)),
        )
        .circuit_breaker(
            CircuitBreakerConfig::new()
                .name("jetstream")
                .minimum_calls(50)
                .open_wait(Duration::from_millis(200)),
        )
        .service(client.jetstream_publisher().max_in_flight(512));

    let sent = numbered(&format!("{name}.orders"), EVENTS);
    let mut calls = FuturesUnordered::new();
    let mut pending = sent.iter().cloned();
    let (mut delivered, mut dead, mut duplicates, mut done) = (HashSet::new(), 0usize, 0usize, 0usize);
    let mut cuts = 0;
    loop {
        while calls.len() < CONCURRENCY {
            let Some(event) = pending.next() else { break };
            calls.push(publisher.clone().oneshot(event));
        }
        let Some(result) = calls.next().await else { break };
        match result.expect("nothing reaches the caller: delivered or dead-lettered") {
            Outcome::Delivered(receipt) => {
                duplicates += usize::from(receipt.duplicate);
                delivered.insert(receipt.event_id.to_string());
            }
            Outcome::DeadLettered(_) => dead += 1,
        }
        done += 1;
        if (done == 3_000 && cuts == 0) || (done == 6_500 && cuts == 1) {
            proxy.cut();
            cuts += 1;
        }
    }
    assert_eq!(cuts, 2);
    assert_eq!(done, EVENTS);
    assert!(proxy.accepted_connections() >= 3, "the client never reconnected");
    assert_eq!(delivered.len() + dead, EVENTS);

    // Read the stream back from the start: each id at most once.
    tokio::time::timeout(PATIENCE, client.connected()).await.unwrap();
    let stored_count = client.stream_messages(&name).await.unwrap();
    let reader = client
        .jetstream_subscriber(&name)
        .settings(ConsumerSettings::new().batch(500).max_ack_pending(10_000));
    let mut sub = reader
        .open(SubscribeOptions::new([format!("{name}.>")]).unwrap().replay(true))
        .await
        .unwrap();
    let mut stored = HashSet::new();
    while (stored.len() as u64) < stored_count {
        let d = match tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap() {
            Ok(d) => d,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
                continue;
            }
        };
        let id = d.event().expect("a valid event").id().to_owned();
        assert!(stored.insert(id), "an event is stored twice");
        d.ack().await.unwrap();
    }
    assert_eq!(stored.len() as u64, stored_count);

    let dead_ids: HashSet<String> = dlq.snapshot().iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(dead_ids.len(), dead);
    assert!(
        delivered.is_subset(&stored),
        "a delivered receipt without a stored event"
    );
    let all: HashSet<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    let accounted: HashSet<String> = stored.union(&dead_ids).cloned().collect();
    assert_eq!(
        accounted, all,
        "an event is neither in the stream nor dead-lettered"
    );
    println!(
        "stored {} (of which {} confirmed as duplicates on retry), dead-lettered {}, dead-lettered but stored {}",
        stored.len(),
        duplicates,
        dead,
        dead_ids.intersection(&stored).count()
    );
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_for_good_is_down() {
    let mut server = NatsServer::start().await;
    let client = NatsClient::connect(config(&server.url()).max_reconnects(1))
        .await
        .unwrap();
    let mut publisher = client.publisher();
    server.kill().await;
    tokio::time::timeout(PATIENCE, client.disconnected())
        .await
        .unwrap();
    // A waiting publisher is woken when the client gives up, with the reason.
    let e = tokio::time::timeout(PATIENCE, poll_fn(|cx| publisher.poll_ready(cx)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert!(client.is_closed());
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down, "{health:?}");
    assert!(
        health.reason().is_some_and(|r| r.contains("closed")),
        "{health:?}"
    );
}
