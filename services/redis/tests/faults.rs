//! Faults: a private `redis-server` killed and restarted, connections cut
//! by a TCP proxy, credentials.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::future::poll_fn;
use std::time::Duration;

use futures_util::StreamExt as _;
use tower::{Service, service_fn};
use watchtower::Transport;
use watchtower::health::Status;
use watchtower::{Error, ErrorKind, Event, PublishBatchExt, PublishExt, SubscribeOptions, Subscriber, serve};
use watchtower_redis::{
    RedisClient, RedisConfig, RedisPublisher, RedisPublisherOptions, RedisSubscriberOptions,
};
use watchtower_test_support::{RedisServer, TcpProxy, unique};

use common::{URL, cleanup, numbered};

const WAIT: Duration = Duration::from_secs(20);

fn quick(url: &str) -> RedisConfig {
    RedisConfig::new(url)
        .reconnect_retries(1)
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
}

/// Publishes until Redis accepts the event (the first calls after a restart
/// may still see the old connection fail).
async fn publish_until_accepted(publisher: &mut RedisPublisher, event: Event) {
    tokio::time::timeout(WAIT, async {
        loop {
            match publisher.publish(event.clone()).await {
                Ok(_) => return,
                Err(e) => assert!(
                    matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
                    "{e:?}"
                ),
            }
        }
    })
    .await
    .expect("Redis accepts events again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reports_a_dead_server_and_recovers_after_restart() {
    let mut server = RedisServer::start().await;
    let client = RedisClient::connect(quick(&server.url())).await.unwrap();
    assert!(client.health().await.is_up());
    let mut publisher = client.publisher();
    publisher
        .publish(Event::new("fault.before", serde_json::json!({})))
        .await
        .unwrap();

    server.kill().await;
    let err = publisher
        .publish(Event::new("fault.during", serde_json::json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(!publisher.is_connected());
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down, "{health:?}");
    assert_eq!(health.system(), "redis");
    assert!(health.reason().is_some_and(|r| r.contains("PING")), "{health:?}");
    // Not ready while the server is down: readiness probes the connection.
    let ready = poll_fn(|cx| publisher.poll_ready(cx)).await;
    assert_eq!(ready.unwrap_err().kind(), ErrorKind::Connection);

    server.restart().await;
    tokio::time::timeout(WAIT, async {
        while poll_fn(|cx| publisher.poll_ready(cx)).await.is_err() {}
    })
    .await
    .expect("ready again after the restart");
    assert!(publisher.is_connected());
    let receipt = publisher
        .publish(Event::new("fault.after", serde_json::json!({})))
        .await
        .unwrap();
    assert!(receipt.message_id.is_some());
    let health = client.health().await;
    assert!(health.is_up(), "{health:?}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_reports_the_outage_and_resumes_after_restart() {
    let mut server = RedisServer::start().await;
    let subscriber = RedisClient::connect(quick(&server.url()))
        .await
        .unwrap()
        .subscriber_with(RedisSubscriberOptions::new().block(Duration::from_millis(200)))
        .unwrap();
    let mut subscription = subscriber
        .open(
            SubscribeOptions::new(["fault.events"])
                .unwrap()
                .group("g")
                .unwrap(),
        )
        .await
        .unwrap();
    let mut publisher = RedisClient::connect(quick(&server.url()))
        .await
        .unwrap()
        .publisher();
    let before = Event::new("fault.events", serde_json::json!({"n": 1}));
    publisher.publish(before.clone()).await.unwrap();
    let delivery = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event(), Some(&before));
    delivery.ack().await.unwrap();

    server.kill().await;
    let outage = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap();
    let err = outage.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err:?}"
    );

    // The new server has neither the stream nor the group: both come back,
    // and what is published after the restart is delivered.
    server.restart().await;
    let after = numbered("fault.events", 5);
    for event in &after {
        publish_until_accepted(&mut publisher, event.clone()).await;
    }
    let mut got = Vec::new();
    while got.len() < after.len() {
        match tokio::time::timeout(WAIT, subscription.next())
            .await
            .unwrap()
            .unwrap()
        {
            Ok(delivery) => {
                got.push(delivery.event().unwrap().clone());
                delivery.ack().await.unwrap();
            }
            // Further errors of the same outage are allowed.
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
                "{e:?}"
            ),
        }
    }
    assert_eq!(got, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_credentials_work_and_never_leak() {
    let mut server = RedisServer::with_args(&["--requirepass", "hunter2"]).await;
    let port = server.port();
    let url = server.url();
    let mut admin = common::raw(&format!("redis://:hunter2@127.0.0.1:{port}")).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">wonderland", "~*", "&*", "+@all"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut publisher = RedisClient::connect(quick(&url).username("alice").password("wonderland"))
        .await
        .unwrap()
        .publisher();
    publisher
        .publish(Event::new("acl.ok", serde_json::json!({})))
        .await
        .unwrap();
    // The default user, with the password in the URL.
    let with_url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    let default_client = RedisClient::connect(quick(&with_url)).await.unwrap();
    assert!(default_client.health().await.is_up());
    let mut default_user = default_client.publisher();
    default_user
        .publish(Event::new("acl.ok", serde_json::json!({})))
        .await
        .unwrap();
    assert!(!format!("{default_user:?}").contains("hunter2"));

    let err = RedisClient::connect(quick(&url).username("alice").password("not-the-password"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err:?}");
    assert!(!format!("{err} {err:?}").contains("not-the-password"));
    let err = RedisClient::connect(quick(&format!("redis://alice:bad-secret@127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err:?}");
    assert!(!format!("{err} {err:?}").contains("bad-secret"));

    // Down, and the reason names the server without the password.
    server.kill().await;
    let health = default_client.health().await;
    assert_eq!(health.status(), Status::Down, "{health:?}");
    let reason = health.reason().unwrap();
    assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    assert!(!format!("{health:?}").contains("hunter2"), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_through_cut_connections_loses_nothing() {
    let ns = unique("wtr_cut");
    let topic = format!("{ns}.work");
    let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap()).await.unwrap();
    let subscriber = RedisClient::connect(quick(&format!("redis://{}", proxy.addr())))
        .await
        .unwrap()
        .subscriber_with(
            RedisSubscriberOptions::new()
                .block(Duration::from_millis(200))
                .claim_idle(Duration::from_millis(500))
                .claim_interval(Duration::from_millis(100))
                .batch_size(50),
        )
        .unwrap();
    let subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let sent = tx.send(event.id().to_owned());
                async move { sent.map_err(|_| Error::closed("test over")) }
            }),
        )
        .with_graceful_shutdown(async {
            stopped.await.ok();
        })
        .into_future(),
    );
    // Published directly, past the proxy.
    let publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let sent = numbered(&topic, 1000);
    for chunk in sent.chunks(100) {
        for result in publisher.batched().publish_batch(chunk.to_vec()).await.unwrap() {
            result.unwrap();
        }
    }
    let expected: HashSet<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    let mut seen = HashSet::new();
    let mut handled = 0usize;
    let mut cuts = 0;
    tokio::time::timeout(WAIT * 2, async {
        while seen.len() < expected.len() {
            let id = rx.recv().await.unwrap();
            handled += 1;
            seen.insert(id);
            if (handled == 200 && cuts == 0) || (handled == 600 && cuts == 1) {
                proxy.cut();
                cuts += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("received {} of {} distinct events", seen.len(), expected.len()));
    assert_eq!(cuts, 2);
    assert_eq!(seen, expected);
    // The cuts force reconnects; the last events may have been read ahead
    // before the last cut, so the reconnect after it can come after them.
    tokio::time::timeout(WAIT, async {
        while proxy.accepted_connections() < 4 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} connections: the cuts forced no reconnect",
            proxy.accepted_connections()
        )
    });
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    // Acknowledgements lost in a cut make their entries come back: those are
    // the only duplicates.
    println!("handled {handled} for 1000 events; {stats}");
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_publishes_through_the_layers_with_two_cuts_lose_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{ServiceBuilder, ServiceExt as _};
    use watchtower::dead_letter::MemoryDeadLetters;
    use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
    use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome};
    use watchtower_layers::retry::{RetryConfig, RetryLayer};

    const N: usize = 10_000;
    let ns = unique("wtr_tenk");
    let topic = format!("{ns}.orders");
    let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap()).await.unwrap();
    let publisher = RedisClient::connect(quick(&format!("redis://{}", proxy.addr())))
        .await
        .unwrap()
        .publisher();
    let dlq = MemoryDeadLetters::new(2 * N);
    let opened = Arc::new(AtomicUsize::new(0));
    let on_open = opened.clone();
    let stack = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(dlq.clone()))
        .layer(RetryLayer::new(
            RetryConfig::new()
                .max_attempts(4)
                .delays(Duration::from_millis(10), Duration::from_millis(200))
                .max_elapsed(Duration::from_secs(5)),
        ))
        .layer(CircuitBreakerLayer::new(
            CircuitBreakerConfig::new()
                .minimum_calls(20)
                .open_wait(Duration::from_millis(200))
                .on_state_change(move |change| {
                    if change.to == State::Open {
                        on_open.fetch_add(1, Ordering::SeqCst);
                    }
                }),
        ))
        .service(publisher);

    let sent = numbered(&topic, N);
    let mut results = futures_util::stream::iter(sent.clone())
        .map(|event| stack.clone().oneshot(event))
        .buffer_unordered(64);
    let (mut delivered, mut dead_lettered, mut done) = (0usize, 0usize, 0usize);
    let mut down = false;
    while let Some(result) = tokio::time::timeout(WAIT * 3, results.next())
        .await
        .expect("publishing stalled")
    {
        match result.expect("the dead-letter service never fails here") {
            Outcome::Delivered(_) => delivered += 1,
            Outcome::DeadLettered(_) => dead_lettered += 1,
        }
        done += 1;
        if done == N * 3 / 10 {
            // First cut: every connection drops, reconnecting works at once.
            proxy.cut();
        }
        if done == N * 6 / 10 {
            // Second cut: Redis stays unreachable until events are being
            // dead-lettered.
            proxy.set_down(true);
            down = true;
        }
        if down && !dlq.is_empty() {
            proxy.set_down(false);
            down = false;
        }
    }
    proxy.set_down(false);
    drop(results);
    assert_eq!(done, N);
    assert_eq!(delivered + dead_lettered, N);
    assert!(dead_lettered > 0, "the outage dead-lettered events");
    assert!(opened.load(Ordering::SeqCst) > 0, "the circuit breaker opened");

    // Every event id is in the stream or among the dead letters.
    let mut conn = common::raw(URL).await;
    let mut in_stream: Vec<String> = Vec::with_capacity(N);
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(&topic)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(2000)
            .query_async::<redis::Value>(&mut conn)
            .await
            .map(|v| redis::from_redis_value(v).unwrap())
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        start = format!("({last}");
        for (_, fields) in page {
            in_stream.push(String::from_utf8(common::event_id(fields)).unwrap());
        }
    }
    let dead: Vec<String> = dlq.drain().iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(dead.len(), dead_lettered);
    let stream_ids: HashSet<&str> = in_stream.iter().map(String::as_str).collect();
    let all: HashSet<&str> = stream_ids
        .iter()
        .copied()
        .chain(dead.iter().map(String::as_str))
        .collect();
    let missing = sent.iter().filter(|e| !all.contains(e.id())).count();
    assert_eq!(
        missing, 0,
        "{missing} events neither in the stream nor dead-lettered"
    );
    assert!(in_stream.len() + dead.len() >= N);
    let duplicates = in_stream.len() - stream_ids.len();
    let both = dead.iter().filter(|id| stream_ids.contains(id.as_str())).count();
    // Duplicates come from XADDs that Redis executed but whose reply was
    // lost in a cut: the retry layer sent them again.
    println!(
        "{N} published: {} entries in the stream ({duplicates} duplicates), {} dead-lettered ({both} also in the stream)",
        in_stream.len(),
        dead.len()
    );
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_callers_timed_out_while_redis_was_frozen_are_not_sent() {
    use tower::{ServiceBuilder, ServiceExt as _};

    const N: usize = 10_000;
    let server = RedisServer::start().await;
    let ns = unique("wtr_abandoned");
    let topic = format!("{ns}.orders");
    let publisher = RedisClient::connect(
        // The connection itself outlasts the outage: only the callers'
        // own timeout ends their wait.
        RedisConfig::new(server.url()).response_timeout(Duration::from_secs(120)),
    )
    .await
    .unwrap()
    .publisher_with(RedisPublisherOptions::new().max_pending(2 * N))
    .unwrap();
    publisher
        .clone()
        .publish(Event::new(topic.clone(), serde_json::json!({})))
        .await
        .unwrap();

    server.freeze().await;
    let mut stack = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .service(publisher.clone());
    let events = numbered(&topic, N);
    let mut callers = tokio::task::JoinSet::new();
    for event in &events {
        let call = stack.ready().await.unwrap().call(event.clone());
        let id = event.id().to_owned();
        callers.spawn(async move { (id, call.await.is_ok()) });
    }
    let mut told_ok = HashSet::new();
    let mut timed_out = 0;
    while let Some(told) = callers.join_next().await {
        match told.unwrap() {
            (id, true) => {
                told_ok.insert(id);
            }
            (_, false) => timed_out += 1,
        }
    }
    // Nothing can succeed while the server is frozen.
    assert_eq!((told_ok.len(), timed_out), (0, N));
    server.resume();
    // The queue is first in, first out: once a later call is answered,
    // every one before it was sent or dropped.
    let mut last = publisher.clone();
    last.publish(Event::new(topic.clone(), serde_json::json!({"last": true})))
        .await
        .unwrap();

    let mut conn = common::raw(&server.url()).await;
    let entries: Vec<(String, std::collections::HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(publisher.config().stream_key(&topic))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let known: HashSet<&[u8]> = events.iter().map(|e| e.id().as_bytes()).collect();
    let mut stored = HashSet::new();
    for (_, fields) in &entries {
        let id = common::event_id(fields);
        if known.contains(&id[..]) {
            assert!(stored.insert(id.clone()), "{id:?} stored twice");
        }
    }
    let abandoned = publisher.abandoned();
    // The first call and the last are stored; of the timed-out ones, only
    // those already on the wire when their callers gave up (at most four
    // batches of 512), and every other one was dropped unsent.
    assert_eq!(entries.len(), stored.len() + 2);
    assert_eq!(stored.len() as u64 + abandoned, N as u64);
    assert!(
        stored.len() <= 4 * 512,
        "{} timed-out events stored",
        stored.len()
    );
}
