//! Faults: connections cut under load (through a TCP proxy, or closed by
//! the broker with `rabbitmqctl close_connection` on connections these
//! tests opened), stalled peers. The shared broker itself is never touched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{Notify, mpsc};
use tower::service_fn;
use watchtower::health::{Health, Status};
use watchtower::{Event, PublishExt, SubscribeOptions, Subscriber, Transport, serve};
use watchtower_rabbitmq::{RabbitClient, RabbitConfig, RabbitPublisher};
use watchtower_test_support::{TcpProxy, unique, within};

use common::{Admin, config};

fn via(proxy: &TcpProxy, exchange: &str) -> RabbitConfig {
    RabbitConfig::new(&format!("amqp://guest:guest@{}/%2f", proxy.addr()))
        .exchange(exchange, watchtower_rabbitmq::ExchangeKind::Topic)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connection_name(format!("fault {exchange}"))
}

/// Publishes `event` until the broker confirms it, retrying what is
/// retryable (what a retry layer would do).
async fn publish_until_confirmed(publisher: &mut RabbitPublisher, event: Event) -> usize {
    let mut failures = 0;
    loop {
        match publisher.publish(event.clone()).await {
            Ok(_) => return failures,
            Err(e) if e.is_retryable() => failures += 1,
            Err(e) => panic!("not retryable: {e}"),
        }
    }
}

/// Waits until `counter` reaches `n`.
async fn reach(counter: &AtomicUsize, notify: &Notify, n: usize) {
    loop {
        let notified = notify.notified();
        if counter.load(Ordering::SeqCst) >= n {
            return;
        }
        notified.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reconnects_when_the_connection_is_cut_twice() {
    let exchange = unique("wt-cut-pub");
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    // The queue is declared on the broker directly, so it outlives the cuts.
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let subscription = subscriber
        .open(SubscribeOptions::new(["cut.*"]).unwrap().group("all").unwrap())
        .await
        .unwrap();
    drop(subscription);
    let publisher = common::publisher(via(&proxy, &exchange)).await.unwrap();

    let total = 600;
    let confirmed = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut sent = HashSet::new();
    for t in 0..6 {
        let events: Vec<Event> = (0..total / 6)
            .map(|i| Event::new("cut.x", serde_json::json!({"t": t, "i": i})))
            .collect();
        sent.extend(events.iter().map(|e| e.id().to_owned()));
        let (mut publisher, confirmed, progress, failures) = (
            publisher.clone(),
            confirmed.clone(),
            progress.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for event in events {
                failures.fetch_add(
                    publish_until_confirmed(&mut publisher, event).await,
                    Ordering::SeqCst,
                );
                confirmed.fetch_add(1, Ordering::SeqCst);
                progress.notify_waiters();
            }
        }));
    }
    within("first third", reach(&confirmed, &progress, total / 3)).await;
    proxy.cut();
    within("second third", reach(&confirmed, &progress, 2 * total / 3)).await;
    proxy.cut();
    for task in tasks {
        within("publishers", task).await.unwrap();
    }
    assert_eq!(confirmed.load(Ordering::SeqCst), total);
    // Two reconnects after two cuts.
    assert!(proxy.accepted_connections() >= 3);

    // Every confirmed event is in the queue (a retried one possibly twice).
    let admin = Admin::connect().await;
    let queue = subscriber.group_queue("all");
    let mut got = HashSet::new();
    let depth = admin.depth(&queue).await as usize;
    assert!(depth >= total, "{depth} in the queue");
    while let Some(message) = admin.get(&queue).await {
        let id = message.properties.message_id().as_ref().unwrap().to_string();
        got.insert(id);
    }
    assert_eq!(got, sent);
    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_resumes_after_a_cut_and_loses_nothing() {
    let exchange = unique("wt-cut-sub");
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    let subscriber = common::subscriber(via(&proxy, &exchange)).await.unwrap();
    let options = SubscribeOptions::new(["c.*"]).unwrap().group("resume").unwrap();
    let subscription = subscriber.open(options).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let _ = tx.send(event.id().to_owned());
                async { Ok::<_, watchtower::Error>(()) }
            }),
        )
        .concurrency(8)
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .into_future(),
    );
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();
    let events: Vec<Event> = (0..300)
        .map(|i| Event::new("c.x", serde_json::json!({"i": i})))
        .collect();
    let sent: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let publishing = tokio::spawn(async move {
        for event in events {
            publisher.publish(event).await.unwrap();
        }
    });
    let mut got = HashSet::new();
    while got.len() < 100 {
        got.insert(within("first 100", rx.recv()).await.unwrap());
    }
    proxy.cut();
    while got.len() < sent.len() {
        got.insert(within("the rest", rx.recv()).await.unwrap());
    }
    within("publishing", publishing).await.unwrap();
    assert_eq!(got, sent);
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert!(stats.stream_errors >= 1, "the cut was reported: {stats}");
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("resume")).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

/// The broker's process ids of the connections named `name`.
async fn connection_pids(name: &str) -> Vec<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "--silent"])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(name))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closed_connection_is_detected_and_reopened() {
    let exchange = unique("wt-forced");
    let name = format!("forced-close {exchange}");
    let cfg = config(&exchange)
        .connection_name(name.clone())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let subscriber = common::subscriber(cfg.clone()).await.unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["f.*"]).unwrap().group("forced").unwrap())
        .await
        .unwrap();
    let mut publisher = common::publisher(cfg).await.unwrap();
    let pids = within("connections listed", async {
        loop {
            let pids = connection_pids(&name).await;
            if pids.len() == 2 {
                return pids;
            }
        }
    })
    .await;
    for pid in &pids {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "fault test"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }
    // The subscription reports the loss once, then resumes.
    let first = within("loss reported", subscription.next()).await.unwrap();
    assert!(first.is_err());
    let event = Event::new("f.after", serde_json::json!({}));
    within("publish after reconnect", async {
        loop {
            match publisher.publish(event.clone()).await {
                Ok(_) => break,
                Err(e) => assert!(e.is_retryable(), "{e}"),
            }
        }
    })
    .await;
    let delivery = within("delivery after reconnect", async {
        loop {
            match subscription.next().await {
                Some(Ok(d)) => return d,
                Some(Err(_)) => continue,
                None => panic!("subscription ended"),
            }
        }
    })
    .await;
    assert_eq!(delivery.event().map(Event::id), Some(event.id()));
    delivery.ack().await.unwrap();
    drop(subscription);
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("forced")).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_peer_is_detected_by_heartbeat() {
    let exchange = unique("wt-stall");
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    let cfg = via(&proxy, &exchange)
        .heartbeat(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1));
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    drop(
        subscriber
            .open(SubscribeOptions::new(["s.*"]).unwrap().group("stall").unwrap())
            .await
            .unwrap(),
    );
    let mut publisher = common::publisher(cfg).await.unwrap();
    publisher
        .publish(Event::new("s.before", serde_json::json!({})))
        .await
        .unwrap();
    proxy.set_stalled(true);
    // The confirm never comes; the heartbeat notices the dead peer.
    let err = within(
        "stall noticed",
        publisher.publish(Event::new("s.during", serde_json::json!({}))),
    )
    .await
    .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    proxy.set_stalled(false);
    proxy.cut();
    within("publish after the stall", async {
        loop {
            if publisher
                .publish(Event::new("s.after", serde_json::json!({})))
                .await
                .is_ok()
            {
                break;
            }
        }
    })
    .await;
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("stall")).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

/// Reads the client's health each time its connection changes until it
/// has `status`, within the deadline.
async fn health_becomes(client: &RabbitClient, status: Status) -> Health {
    let mut changes = client.health_changes();
    within("health", async {
        loop {
            let health = client.health().await;
            if health.status() == status {
                return health;
            }
            assert!(changes.changed().await, "the connection task ended at {health}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_connection_up_degraded_up_down() {
    let exchange = unique("wt-health-fault");
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    let client = RabbitClient::connect(via(&proxy, &exchange)).await.unwrap();
    let health = client.health().await;
    assert_eq!(health.status(), Status::Up);
    assert_eq!(health.system(), RabbitClient::SYSTEM);

    // The broker unreachable: degraded while reconnecting, with a reason
    // that names no credentials.
    proxy.set_down(true);
    let degraded = health_becomes(&client, Status::Degraded).await;
    let reason = degraded.reason().unwrap_or_default();
    assert!(reason.starts_with("reconnecting"), "{reason}");
    assert!(!reason.contains("guest"), "{reason}");

    // Back: up again, on a new connection.
    proxy.set_down(false);
    health_becomes(&client, Status::Up).await;
    assert!(proxy.accepted_connections() >= 2);

    client.close();
    let down = client.health().await;
    assert_eq!(down.status(), Status::Down);
    Admin::connect().await.delete_exchange(&exchange).await;
}
