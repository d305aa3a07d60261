//! A cluster of three private `nats-server`s with routes and clustered
//! JetStream: clients on different servers reach each other, the
//! conformance suite passes on replicated streams, and a server killed and
//! restarted under load loses nothing.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::{ServiceBuilder, ServiceExt as _};
use watchtower::conformance;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::dead_letter::Outcome;
use watchtower_layers::retry::RetryConfig;
use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig, StorageType, StreamConfig};
use watchtower_test_support::{NatsCluster, PATIENCE, unique, within};

use crate::conformance::{Core, Js};
use crate::support::numbered;

/// A client given the servers `urls`, reconnecting fast.
async fn connect(urls: &[String]) -> NatsClient {
    let mut config = NatsConfig::new(urls[0].clone())
        .max_reconnect_delay(Duration::from_millis(100))
        .request_timeout(Duration::from_secs(2));
    for url in &urls[1..] {
        config = config.server(url.clone());
    }
    NatsClient::connect(config).await.unwrap()
}

/// The port of the server `client` is connected to.
fn server_port(client: &NatsClient) -> u16 {
    client.raw().server_info().port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_one_server_receive_from_publishers_on_another() {
    let cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let on_first = connect(&urls[..1]).await;
    let on_second = connect(&urls[1..2]).await;
    let on_third = connect(&urls[2..]).await;
    assert_ne!(server_port(&on_first), server_port(&on_second));
    let topic = unique("routed");
    let mut sub = on_first
        .subscriber()
        .open(SubscribeOptions::new([format!("{topic}.>")]).unwrap())
        .await
        .unwrap();
    // Two members of one queue group, on the other two servers.
    let group = SubscribeOptions::new([format!("{topic}.>")])
        .unwrap()
        .group("g")
        .unwrap();
    let mut members = [
        on_first.subscriber().open(group.clone()).await.unwrap(),
        on_third.subscriber().open(group).await.unwrap(),
    ];
    let mut publisher = on_second.publisher();
    // Interest crosses the routes on its own time, and core NATS keeps
    // nothing for a subject without it: probe until the plain subscriber
    // and both members are known on the publisher's server.
    let probe = format!("{topic}.probe");
    within("the subscriptions to reach the second server", async {
        let mut seen = [false; 3];
        while !seen.iter().all(|&s| s) {
            publisher
                .publish(Event::new(probe.clone(), serde_json::json!({})))
                .await
                .unwrap();
            let short = Duration::from_millis(100);
            seen[0] |= matches!(tokio::time::timeout(short, sub.next()).await, Ok(Some(Ok(_))));
            for (member, seen) in members.iter_mut().zip(&mut seen[1..]) {
                // Drain what the probes brought this member.
                while let Ok(Some(Ok(_))) =
                    tokio::time::timeout(Duration::from_millis(20), member.next()).await
                {
                    *seen = true;
                }
            }
        }
    })
    .await;
    let sent = numbered(&format!("{topic}.e"), 200);
    for event in &sent {
        publisher.publish(event.clone()).await.unwrap();
    }
    on_second.raw().flush().await.unwrap();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let d = within("an event from the other server", sub.next())
            .await
            .unwrap()
            .unwrap();
        if d.topic() != probe {
            received.push(d.event().unwrap().clone());
        }
    }
    // One publisher, one route: in order, all of them.
    assert_eq!(received, sent);
    // The group shares them: each event once over both members.
    let mut shared = HashMap::new();
    let [first, second] = &mut members;
    while shared.len() < sent.len() {
        let next = within("the group's share", async {
            tokio::select! {
                d = first.next() => d,
                d = second.next() => d,
            }
        })
        .await
        .unwrap()
        .unwrap();
        if next.topic() != probe {
            *shared.entry(next.event().unwrap().id().to_owned()).or_insert(0) += 1;
        }
    }
    assert!(
        shared.values().all(|&n| n == 1),
        "an event reached the group twice"
    );
    let all: HashSet<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(shared.into_keys().collect::<HashSet<_>>(), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_core_nats_on_a_cluster() {
    let cluster = NatsCluster::start(3).await;
    let report = conformance::run(Core {
        client: connect(&cluster.urls()).await,
    })
    .await;
    report.assert_passed();
    assert!(report.passed().contains(&"consumer_groups"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_jetstream_with_three_replicas_publishing_through_another_server() {
    let cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let client = connect(&urls[..1]).await;
    let publishing = connect(&urls[1..2]).await;
    let report = conformance::run(Js {
        client,
        publishing,
        replicas: 3,
        expires: Some(Duration::from_secs(1)),
    })
    .await;
    report.assert_passed();
    assert!(report.skipped().is_empty(), "{report}");
}

/// The promise on a cluster: 10,000 events published through dead letter
/// + retry to a stream of three replicas and consumed at the same time,
/// the stream's leader killed after 3,000 and restarted after 6,000. Every
/// event is stored once (a retry of one whose acknowledgement was lost is
/// caught by `Nats-Msg-Id`) or dead-lettered, and every stored event is
/// consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_on_three_replicas_survive_the_leader_killed_and_restarted() {
    const EVENTS: usize = 10_000;
    const CONCURRENCY: usize = 256;

    let mut cluster = NatsCluster::start(3).await;
    let client = connect(&cluster.urls()).await;
    let name = unique("R3");
    let info = client
        .create_or_update_stream(StreamConfig {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            storage: StorageType::File,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(info.config.num_replicas, 3);

    // The consumer: a group member acknowledging everything, counting how
    // often each event came.
    let (seen_tx, mut seen) = tokio::sync::watch::channel(HashMap::<String, u32>::new());
    let mut sub = client
        .jetstream_subscriber(&name)
        .settings(
            ConsumerSettings::new()
                .ack_wait(Duration::from_secs(5))
                // A pull waiting on a killed server is given up soon.
                .expires(Duration::from_secs(1))
                .batch(200)
                .max_ack_pending(20_000),
        )
        .open(
            SubscribeOptions::new([format!("{name}.>")])
                .unwrap()
                .group("g")
                .unwrap(),
        )
        .await
        .unwrap();
    let consumer = tokio::spawn(async move {
        let mut errors = 0usize;
        while let Some(item) = sub.next().await {
            match item {
                Ok(d) => {
                    let id = d.event().expect("a valid event").id().to_owned();
                    // A lost acknowledgement brings the event again later.
                    let _ = d.ack().await;
                    seen_tx.send_modify(|seen| *seen.entry(id).or_default() += 1);
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
                        "{e}"
                    );
                    errors += 1;
                }
            }
        }
        errors
    });

    // A stream whose leader died answers "no responders" at once until its
    // replicas elect another, a second or a few: retries are bounded by
    // time, not by a count that fast answers use up.
    let dlq = MemoryDeadLetters::new(EVENTS);
    let publisher = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(
            RetryConfig::new()
                .max_attempts(1_000)
                .delays(Duration::from_millis(20), Duration::from_millis(500))
                .max_elapsed(Duration::from_secs(30)),
        )
        .service(client.jetstream_publisher().max_in_flight(512));
    let leader = stream_leader(&client, &name, &cluster).await;

    let sent = numbered(&format!("{name}.orders"), EVENTS);
    let started = Instant::now();
    let mut calls = FuturesUnordered::new();
    let mut pending = sent.iter().cloned();
    let (mut delivered, mut dead, mut duplicates, mut done) = (HashSet::new(), 0usize, 0usize, 0usize);
    let mut last = Instant::now();
    let mut longest_stall = Duration::ZERO;
    loop {
        while calls.len() < CONCURRENCY {
            let Some(event) = pending.next() else { break };
            calls.push(publisher.clone().oneshot(event));
        }
        let Some(result) = calls.next().await else { break };
        longest_stall = longest_stall.max(last.elapsed());
        last = Instant::now();
        match result.expect("nothing reaches the caller: delivered or dead-lettered") {
            Outcome::Delivered(receipt) => {
                duplicates += usize::from(receipt.duplicate);
                delivered.insert(receipt.event_id.to_string());
            }
            Outcome::DeadLettered(_) => dead += 1,
        }
        done += 1;
        if done == 3_000 {
            cluster.server_mut(leader).kill().await;
            last = Instant::now();
        }
        if done == 6_000 {
            cluster.restart(leader).await;
            last = Instant::now();
        }
    }
    let published_in = started.elapsed();
    assert_eq!(done, EVENTS);
    assert_eq!(
        delivered.len() + dead,
        EVENTS,
        "delivered + dead-lettered = published"
    );

    // Every delivered event is consumed.
    within(
        "every delivered event to be consumed",
        seen.wait_for(|seen| {
            seen.len() >= delivered.len() && delivered.iter().all(|id| seen.contains_key(id))
        }),
    )
    .await
    .unwrap();
    let consumed_in = started.elapsed();
    let seen = seen.borrow().clone();
    let all: HashSet<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    assert!(seen.keys().all(|id| all.contains(id)), "an event nobody sent");
    // Stored once each: the stream holds exactly the distinct events seen.
    let stored = admin("the stream's count", || client.stream_messages(&name)).await;
    let dead_ids: HashSet<String> = dlq.snapshot().iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(dead_ids.len(), dead);
    assert_eq!(
        seen.keys()
            .cloned()
            .chain(dead_ids.iter().cloned())
            .collect::<HashSet<_>>(),
        all,
        "an event is neither consumed nor dead-lettered"
    );
    let redelivered = seen.values().filter(|&&n| n > 1).count();
    consumer.abort();
    let _ = consumer.await;
    println!(
        "published {EVENTS} in {published_in:?}, consumed all in {consumed_in:?}; stored {stored}, \
         dead-lettered {dead}, retries caught by Nats-Msg-Id {duplicates}, consumed more than once \
         {redelivered}, longest publish stall {longest_stall:?}"
    );
    assert_eq!(
        stored as usize,
        seen.len(),
        "an event stored twice or never consumed"
    );
    admin("deleting the stream", || client.delete_stream(&name)).await;
}

/// Calls the JetStream API until it answers: right after a server of
/// the cluster comes back, a request may time out while the stream's
/// replicas elect a leader and catch up.
async fn admin<T, F>(what: &str, mut call: impl FnMut() -> F) -> T
where
    F: Future<Output = Result<T, watchtower::Error>>,
{
    within(what, async {
        loop {
            match call().await {
                Ok(value) => return value,
                Err(e) => assert!(e.to_string().contains("timed out"), "{what}: {e}"),
            }
        }
    })
    .await
}

/// The index of the server leading stream `name`.
async fn stream_leader(client: &NatsClient, name: &str, cluster: &NatsCluster) -> usize {
    let leader = tokio::time::timeout(PATIENCE, async {
        loop {
            let Ok(mut stream) = client.raw_jetstream().get_stream(name).await else {
                continue;
            };
            if let Ok(info) = stream.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            {
                return leader;
            }
        }
    })
    .await
    .expect("the stream has a leader");
    (0..3)
        .find(|&i| leader == format!("{}-{i}", cluster.name()))
        .unwrap_or_else(|| panic!("leader {leader:?} is not one of the cluster's servers"))
}
