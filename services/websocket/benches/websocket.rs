//! Benchmarks of the WebSocket transport on 127.0.0.1:
//!
//! * hub fan-out: small events published into a hub with 100 connected
//!   clients; events delivered per second in total (a burst), and the
//!   publish-to-receive latency of paced events (p50, p99);
//! * client publish: small events from one client to a hub's handler,
//!   through `WsPublisher` and through a raw tokio-tungstenite connection
//!   writing the same frames (the same guarantee: written to the socket),
//!   and with acknowledgements.
//!
//! `cargo bench -p watchtower-websocket --bench websocket`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tower::{Service as _, ServiceExt as _};
use watchtower::codec::structured;
use watchtower::prelude::*;
use watchtower_websocket::{WsClient, WsConfig, WsHub};

const CLIENTS: usize = 100;
const BURST: usize = 2_000;
const PACED: usize = 500;
/// The gap between paced events: light load, so the latency is the
/// transport's rather than queueing behind other events.
const PACE: Duration = Duration::from_millis(5);
const PUBLISH: usize = 50_000;

async fn serve(hub: &WsHub) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/events", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, hub.router::<()>("/events")).into_future());
    url
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn fan_out() {
    let hub = WsHub::builder().outbound_capacity(BURST * 2).build();
    let url = serve(&hub).await;
    let start = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let client = WsClient::connect(WsConfig::new(&url).subscription_buffer(BURST * 2))
            .await
            .unwrap();
        let mut sub = client
            .subscriber()
            .open(SubscribeOptions::new(["bench.>"]).unwrap())
            .await
            .unwrap();
        let (received, done, lat_tx) = (received.clone(), done.clone(), lat_tx.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = sub.next().await {
                let event = delivery.event().unwrap();
                if event.ty() == "bench.paced" {
                    let sent: u64 = event.json::<u64>().unwrap();
                    let now = start.elapsed().as_nanos() as u64;
                    let _ = lat_tx.send(Duration::from_nanos(now - sent));
                }
                if received.fetch_add(1, Ordering::Relaxed) + 1 == (CLIENTS * BURST) as u64 {
                    done.notify_one();
                }
            }
        });
        clients.push(client);
    }
    drop(lat_tx);

    // Burst: throughput.
    let mut publisher = hub.clone();
    let t0 = Instant::now();
    for i in 0..BURST {
        publisher
            .ready()
            .await
            .unwrap()
            .call(Event::new("bench.burst", serde_json::json!(i)))
            .await
            .unwrap();
    }
    let publish_time = t0.elapsed();
    tokio::time::timeout(Duration::from_secs(120), done.notified())
        .await
        .expect("all delivered");
    let elapsed = t0.elapsed();
    let delivered = received.load(Ordering::Relaxed);
    println!(
        "hub fan-out burst: {BURST} events x {CLIENTS} clients = {delivered} deliveries in {elapsed:?} \
         ({:.0} deliveries/s; publishing took {publish_time:?}); dropped {}",
        delivered as f64 / elapsed.as_secs_f64(),
        hub.stats().dropped,
    );

    // Paced: latency.
    for _ in 0..PACED {
        let sent = start.elapsed().as_nanos() as u64;
        hub.broadcast(&Event::new("bench.paced", serde_json::json!(sent)))
            .unwrap();
        tokio::time::sleep(PACE).await;
    }
    let mut latencies = Vec::with_capacity(PACED * CLIENTS);
    while latencies.len() < PACED * CLIENTS {
        match tokio::time::timeout(Duration::from_secs(30), lat_rx.recv()).await {
            Ok(Some(l)) => latencies.push(l),
            _ => break,
        }
    }
    latencies.sort_unstable();
    println!(
        "hub fan-out latency ({PACED} events, one per {PACE:?}, x {CLIENTS} clients = {} deliveries): \
         p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    for c in clients {
        c.close().await;
    }
    hub.shutdown().await;
}

/// Publish-to-receive latency with a single subscriber: the transport's
/// own latency, without 100 clients sharing the CPU.
async fn single_client_latency() {
    let hub = WsHub::new();
    let url = serve(&hub).await;
    let client = WsClient::connect(WsConfig::new(&url)).await.unwrap();
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new(["bench.one"]).unwrap())
        .await
        .unwrap();
    let mut latencies = Vec::with_capacity(PACED);
    for i in 0..PACED {
        let t0 = Instant::now();
        hub.broadcast(&Event::new("bench.one", serde_json::json!(i)))
            .unwrap();
        sub.next().await.unwrap().unwrap();
        latencies.push(t0.elapsed());
        tokio::time::sleep(PACE).await;
    }
    latencies.sort_unstable();
    println!(
        "hub to one client latency ({PACED} events): p50 {:?}, p99 {:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
    );
    client.close().await;
    hub.shutdown().await;
}

/// A hub whose handler counts events and signals at `n`.
async fn counting_hub(n: u64) -> (WsHub, String, Arc<Notify>, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let hub = WsHub::builder()
        .handler(tower::service_fn(move |_event: Event| {
            if c.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d.notify_one();
            }
            std::future::ready(Ok::<_, Error>(()))
        }))
        .build();
    let url = serve(&hub).await;
    (hub, url, done, count)
}

fn small_events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new("bench.publish", serde_json::json!({ "i": i, "user": "abc" })))
        .collect()
}

async fn client_publish(acks: bool) -> f64 {
    let n = if acks { PUBLISH / 5 } else { PUBLISH };
    let (hub, url, done, _) = counting_hub(n as u64).await;
    let client = WsClient::connect(WsConfig::new(&url).acks(acks).queue_capacity(4096))
        .await
        .unwrap();
    let events = small_events(n);
    let mut publisher = client.publisher();
    let t0 = Instant::now();
    let mut responses = futures_util::stream::FuturesUnordered::new();
    for event in events {
        responses.push(publisher.ready().await.unwrap().call(event));
        // Keep the window bounded like a real producer would.
        while responses.len() >= 4096 {
            responses.next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = responses.next().await {
        r.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), done.notified())
        .await
        .expect("all handled");
    let elapsed = t0.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "client publish{}: {n} events in {elapsed:?} ({rate:.0} events/s)",
        if acks { " with acks" } else { "" }
    );
    client.close().await;
    hub.shutdown().await;
    rate
}

async fn raw_publish() -> f64 {
    let (hub, url, done, _) = counting_hub(PUBLISH as u64).await;
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "cloudevents.json".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let events = small_events(PUBLISH);
    let t0 = Instant::now();
    for chunk in events.chunks(64) {
        for event in chunk {
            let text = String::from_utf8(structured::to_vec(event).unwrap()).unwrap();
            ws.feed(Message::text(text)).await.unwrap();
        }
        ws.flush().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), done.notified())
        .await
        .expect("all handled");
    let elapsed = t0.elapsed();
    let rate = PUBLISH as f64 / elapsed.as_secs_f64();
    println!("raw tokio-tungstenite publish: {PUBLISH} events in {elapsed:?} ({rate:.0} events/s)");
    let _ = ws.close(None).await;
    hub.shutdown().await;
    rate
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        fan_out().await;
        single_client_latency().await;
        let raw = raw_publish().await;
        let ours = client_publish(false).await;
        println!("client publish / raw: {:.2}", ours / raw);
        client_publish(true).await;
    });
}
