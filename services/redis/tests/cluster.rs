//! A private Redis Cluster: the conformance suite, topics spread over the
//! masters with their dead letters beside them, patterns resolved across
//! every master, and a master killed under 10,000 events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use redis::cluster::ClusterClient;
use tower::{ServiceBuilder, ServiceExt as _};
use watchtower::conformance::{Harness, run};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{
    Capabilities, Error, ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber, Transport,
};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::dead_letter::Outcome;
use watchtower_layers::retry::RetryConfig;
use watchtower_redis::{
    DeadLetter, RedisClient, RedisConfig, RedisPublisher, RedisSubscriber, RedisSubscriberOptions,
    RedisSubscription,
};
use watchtower_test_support::{RedisCluster, unique, within};

/// Settings for a cluster whose masters may die: short timeouts, so that
/// a command to a dead master fails within a second and is retried on the
/// new one.
fn config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig::cluster(cluster.urls())
        .response_timeout(Duration::from_secs(1))
        .connection_timeout(Duration::from_secs(1))
}

/// Short timings so that reclaiming and new streams show up within a case.
fn subscriber_options() -> RedisSubscriberOptions {
    RedisSubscriberOptions::new()
        .block(Duration::from_millis(200))
        .claim_idle(Duration::from_secs(5))
        .claim_interval(Duration::from_millis(100))
        .rescan_interval(Duration::from_millis(100))
}

/// A subscription of group `g` to `topics`.
async fn group_g(client: &RedisClient, topics: &[String]) -> RedisSubscription {
    client
        .subscriber_with(subscriber_options())
        .unwrap()
        .open(SubscribeOptions::new(topics).unwrap().group("g").unwrap())
        .await
        .unwrap()
}

struct OnCluster {
    config: RedisConfig,
    seeds: Vec<String>,
}

impl Harness for OnCluster {
    type Publisher = RedisPublisher;
    type Subscriber = RedisSubscriber;

    fn name(&self) -> String {
        "redis cluster".into()
    }

    fn system(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .persistent(true)
            .consumer_groups(true)
            .ordered(true)
            .wildcards(true)
            .redelivery(true)
            .nack_delay(true)
            .replay(true)
    }

    async fn publisher(&self, _namespace: &str) -> Result<RedisPublisher, Error> {
        Ok(RedisClient::connect(self.config.clone()).await?.publisher())
    }

    async fn subscriber(&self, _namespace: &str) -> Result<RedisSubscriber, Error> {
        RedisClient::connect(self.config.clone())
            .await?
            .subscriber_with(subscriber_options())
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }

    async fn publish_raw(&self, _namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        let mut conn = raw(&self.seeds).await;
        let _: String = redis::cmd("XADD")
            .arg(self.config.stream_key(topic))
            .arg("*")
            .arg("data")
            .arg(&body[..])
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, e.to_string()))?;
        Ok(true)
    }
}

async fn raw(seeds: &[String]) -> redis::cluster_async::ClusterConnection {
    ClusterClient::new(seeds.to_vec())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0).await;
    let report = run(OnCluster {
        config: config(&cluster),
        seeds: cluster.urls(),
    })
    .await;
    report.assert_passed();
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_spread_over_the_masters_with_their_dead_letters_beside_them() {
    let cluster = RedisCluster::start(3, 0).await;
    let config = config(&cluster);
    let client = RedisClient::connect(config.clone()).await.unwrap();
    assert!(client.health().await.is_up());
    let ns = unique("spread");
    let dlq = format!("{ns}:dlq");
    // A pattern subscription first: it must find streams on every master.
    let mut subscription = client
        .subscriber_with(
            subscriber_options()
                .max_deliveries(Some(1))
                .dead_letter(DeadLetter::Stream(dlq.clone())),
        )
        .unwrap()
        .open(
            SubscribeOptions::new([format!("{ns}.>")])
                .unwrap()
                .group("g")
                .unwrap()
                .replay(true),
        )
        .await
        .unwrap();
    let mut publisher = client.publisher();
    // Topics until every master holds one.
    let mut topics = Vec::new();
    let mut masters = HashSet::new();
    for i in 0.. {
        let topic = format!("{ns}.t{i}");
        masters.insert(cluster.master_of(&config.stream_key(&topic)).await);
        topics.push(topic);
        if masters.len() == 3 {
            break;
        }
    }
    let mut sent = HashMap::new();
    for topic in &topics {
        for n in 0..5 {
            let event = Event::new(topic.clone(), serde_json::json!({ "n": n }));
            let receipt = publisher.publish(event.clone()).await.unwrap();
            assert_eq!(receipt.stream.as_deref(), Some(config.stream_key(topic).as_str()));
            sent.insert(event.id().to_owned(), event);
        }
    }
    // Each event once, with the topic it was published to; every event of
    // one topic in order.
    let mut got: HashMap<String, Vec<Event>> = HashMap::new();
    let mut doomed = HashSet::new();
    let mut count = 0;
    while count < sent.len() {
        let delivery = within("an event from some master", subscription.next())
            .await
            .unwrap()
            .unwrap();
        let event = delivery.event().unwrap().clone();
        assert_eq!(delivery.topic(), event.topic());
        assert_eq!(sent.get(event.id()), Some(&event));
        // The first event of each topic is refused once: one delivery
        // allowed, so it goes to its topic's dead-letter stream.
        if event.data() == Event::new("x", serde_json::json!({ "n": 0 })).data() {
            doomed.insert(event.id().to_owned());
            delivery.nack(None).await.unwrap();
        } else {
            delivery.ack().await.unwrap();
        }
        got.entry(event.topic().to_owned()).or_default().push(event);
        count += 1;
    }
    for topic in &topics {
        let ids: Vec<&str> = got[topic].iter().map(Event::id).collect();
        let mut ordered = ids.clone();
        ordered.sort_unstable();
        assert_eq!(ids, ordered, "entries of {topic} out of order");
    }
    // The refused ones are in their topic's dead-letter stream, on the
    // master of the topic's stream.
    let mut conn = raw(&cluster.urls()).await;
    for topic in &topics {
        let dead_key = format!("{dlq}{{{topic}}}");
        assert_eq!(
            cluster.master_of(&dead_key).await,
            cluster.master_of(&config.stream_key(topic)).await
        );
        let entries = within("the dead letter", async {
            loop {
                let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&dead_key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if !entries.ids.is_empty() {
                    return entries;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(entries.ids.len(), 1, "{dead_key}");
        // A structured entry: the event's JSON document in `data`.
        let data: String = entries.ids[0].get("data").unwrap();
        let document: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert!(doomed.contains(document["id"].as_str().unwrap()));
    }
}

/// The promise on a cluster with replicas: 10,000 events published through
/// dead letter + retry over four topics and consumed at the same time, the
/// master of one topic's stream killed after 3,000; its replica takes
/// over. Every call ends delivered or dead-lettered. What the consumer gets
/// is counted: Redis replicates asynchronously, so entries the master
/// acknowledged in its last moments may not have reached the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_with_a_master_killed_are_delivered_or_dead_lettered() {
    const EVENTS: usize = 10_000;
    const CONCURRENCY: usize = 256;
    const TOPICS: usize = 4;

    let mut cluster = RedisCluster::start(3, 1).await;
    let config = config(&cluster);
    let client = RedisClient::connect(config.clone()).await.unwrap();
    let ns = unique("failover");
    let topics: Vec<String> = (0..TOPICS).map(|i| format!("{ns}.t{i}")).collect();

    let (seen_tx, mut seen) = tokio::sync::watch::channel(HashMap::<String, u32>::new());
    let mut subscription = group_g(&client, &topics).await;
    let consumer = tokio::spawn(async move {
        let mut errors = 0usize;
        while let Some(item) = subscription.next().await {
            match item {
                Ok(d) => {
                    let id = d.event().expect("a valid event").id().to_owned();
                    let _ = d.ack().await;
                    seen_tx.send_modify(|seen| *seen.entry(id).or_default() += 1);
                }
                Err(e) => {
                    assert!(
                        matches!(
                            e.kind(),
                            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Throttled
                        ),
                        "{e}"
                    );
                    errors += 1;
                }
            }
        }
        errors
    });

    let dlq = MemoryDeadLetters::new(EVENTS);
    let publisher = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(
            RetryConfig::new()
                .max_attempts(1_000)
                .delays(Duration::from_millis(20), Duration::from_millis(500))
                .max_elapsed(Duration::from_secs(30)),
        )
        .service(client.publisher());
    let victim = cluster.master_of(&config.stream_key(&topics[0])).await;

    let sent: Vec<Event> = (0..EVENTS)
        .map(|i| Event::new(topics[i % TOPICS].clone(), serde_json::json!({ "i": i })))
        .collect();
    let started = Instant::now();
    let mut calls = FuturesUnordered::new();
    let mut pending = sent.iter().cloned();
    let (mut delivered, mut dead, mut done) = (HashSet::new(), 0usize, 0usize);
    let (mut last, mut longest_stall) = (Instant::now(), Duration::ZERO);
    let mut killed_at = None;
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
                delivered.insert(receipt.event_id.to_string());
            }
            Outcome::DeadLettered(_) => dead += 1,
        }
        done += 1;
        if done == 3_000 {
            cluster.node_mut(victim).kill().await;
            killed_at = Some(Instant::now());
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
    assert_ne!(
        cluster.master_of(&config.stream_key(&topics[0])).await,
        victim,
        "a replica took over"
    );

    // The consumer gets what the surviving masters hold. Wait until it
    // has had everything delivered to the other topics, then for the rest
    // as long as entries keep coming.
    let others: HashSet<String> = sent
        .iter()
        .filter(|e| e.topic() != topics[0] && delivered.contains(e.id()))
        .map(|e| e.id().to_owned())
        .collect();
    within(
        "the other topics' events to be consumed",
        seen.wait_for(|seen| seen.len() >= others.len() && others.iter().all(|id| seen.contains_key(id))),
    )
    .await
    .unwrap();
    loop {
        let before = seen.borrow().len();
        if before >= delivered.len() {
            break;
        }
        let quiet = tokio::time::timeout(Duration::from_secs(3), seen.changed()).await;
        if quiet.is_err() {
            break;
        }
    }
    let seen = seen.borrow().clone();
    consumer.abort();
    let _ = consumer.await;
    let all: HashSet<String> = sent.iter().map(|e| e.id().to_owned()).collect();
    assert!(seen.keys().all(|id| all.contains(id)), "an event nobody sent");
    let lost: Vec<&String> = delivered.iter().filter(|id| !seen.contains_key(*id)).collect();
    let twice = seen.values().filter(|&&n| n > 1).count();
    println!(
        "published {EVENTS} in {published_in:?} (kill at {:?}): delivered {}, dead-lettered {dead}, \
         consumed {} ({twice} more than once), acknowledged but lost in the failover {}, \
         longest publish stall {longest_stall:?}",
        killed_at.map(|at| at - started),
        delivered.len(),
        seen.len(),
        lost.len()
    );
    // Nothing is lost from the masters that stayed up.
    assert!(lost.iter().all(|id| {
        sent.iter()
            .any(|e| e.id() == id.as_str() && e.topic() == topics[0])
    }));
}

/// 240 delayed events over eight topics (spread over the three masters),
/// due 100 ms to 1.5 s later, through a publisher that is dropped once it
/// has scheduled them: each is delivered once, no earlier than asked, and
/// the sorted sets beside the streams are empty at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_events_on_a_cluster_arrive_no_earlier_than_asked_and_none_is_lost() {
    const EVENTS: usize = 240;
    const TOPICS: usize = 8;

    let cluster = RedisCluster::start(3, 0).await;
    let config = RedisConfig::cluster(cluster.urls());
    let client = RedisClient::connect(config.clone()).await.unwrap();
    let ns = unique("delayed");
    let topics: Vec<String> = (0..TOPICS).map(|i| format!("{ns}.t{i}")).collect();
    let mut masters = HashSet::new();
    for topic in &topics {
        masters.insert(cluster.master_of(&config.stream_key(topic)).await);
    }
    assert!(masters.len() > 1, "the topics live on several masters");

    let mut subscription = group_g(&client, &topics).await;
    let mut due = HashMap::new();
    {
        let mut publisher = client.publisher();
        for i in 0..EVENTS {
            let mut event = Event::new(topics[i % TOPICS].clone(), serde_json::json!({ "i": i }));
            let millis = 100 + (i as u64 * 37) % 1_400;
            watchtower::delay::set_delay(&mut event, Duration::from_millis(millis));
            due.insert(
                event.id().to_owned(),
                watchtower::delay::deliver_at(&event).unwrap().unwrap(),
            );
            let receipt = publisher.publish(event).await.unwrap();
            assert_eq!(receipt.message_id, None, "held, not in the stream yet");
        }
    }

    let mut seen = HashSet::new();
    within("every delayed event", async {
        while seen.len() < EVENTS {
            let delivery = subscription.next().await.unwrap().unwrap();
            let at = time::OffsetDateTime::now_utc();
            let event = delivery.event().expect("a valid event").clone();
            delivery.ack().await.unwrap();
            let asked = due.get(event.id()).expect("an event of this test");
            assert!(
                at >= *asked,
                "{} delivered at {at}, asked for {asked}",
                event.id()
            );
            assert_eq!(event.extension(watchtower::ext::DELIVER_AT), None);
            assert!(
                seen.insert(event.id().to_owned()),
                "{} delivered twice",
                event.id()
            );
        }
    })
    .await;
    let mut conn = raw(&cluster.urls()).await;
    for topic in &topics {
        let key = config.stream_key(topic);
        let left: i64 = redis::cmd("ZCARD")
            .arg(format!("{key}#delayed"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "{key}");
        let stored: i64 = redis::cmd("XLEN").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(stored, (EVENTS / TOPICS) as i64, "each moved once into {key}");
    }
}
