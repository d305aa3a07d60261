//! The publisher's own connection for `XADD`s: bad replies, silence, the
//! handshake, databases, and TLS (which takes the redis crate's connection
//! instead).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceExt as _};
use watchtower::{Error, ErrorKind, Event, PublishExt as _};
use watchtower_redis::{RedisClient, RedisConfig, RedisPublisher};
use watchtower_test_support::{RedisServer, free_port, unique};

use common::{URL, cleanup, numbered};

/// What a [`Fake`] server does with the first connection that sends an
/// `XADD` (the publisher's own; its multiplexed connection, for `PING`
/// and `publish_batch`, opens with other commands). Every other
/// connection is passed on to the real Redis.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers with something that is not RESP.
    Garbage,
    /// Reads everything and never answers.
    Silent,
    /// Answers with `head`, then `tail` over and over until the client
    /// goes away.
    Flood {
        head: &'static [u8],
        tail: &'static [u8],
    },
    /// Answers with a reply one byte per write.
    Trickle(&'static [u8]),
}

struct Fake {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start(behaviour: Behaviour) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let done = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let done = done.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    let n = client.read(&mut buf).await.unwrap_or(0);
                    let xadd = buf[..n].windows(4).any(|w| w == b"XADD");
                    if xadd && !done.swap(true, Ordering::SeqCst) {
                        match behaviour {
                            Behaviour::Garbage => {
                                let _ = client.write_all(b"?what is this\r\n").await;
                            }
                            Behaviour::Silent => {}
                            Behaviour::Flood { head, tail } => {
                                let mut sent = client.write_all(head).await.is_ok();
                                while sent && !tail.is_empty() {
                                    sent = client.write_all(tail).await.is_ok();
                                }
                            }
                            Behaviour::Trickle(reply) => {
                                let _ = client.set_nodelay(true);
                                for byte in reply {
                                    if client.write_all(&[*byte]).await.is_err() {
                                        return;
                                    }
                                    let _ = client.flush().await;
                                    tokio::task::yield_now().await;
                                }
                            }
                        }
                        while client.read(&mut buf).await.unwrap_or(0) > 0 {}
                        return;
                    }
                    let mut redis = TcpStream::connect("127.0.0.1:6379").await.unwrap();
                    redis.write_all(&buf[..n]).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut redis).await;
                });
            }
        });
        Fake { port, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn acl(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("ACL");
    cmd.arg(args);
    cmd
}

async fn xlen(url: &str, key: &str) -> i64 {
    let mut conn = common::raw(url).await;
    redis::cmd("XLEN").arg(key).query_async(&mut conn).await.unwrap()
}

/// Calls for every event before awaiting any answer, so that they share
/// batches.
async fn publish_together(publisher: &mut RedisPublisher, events: &[Event]) -> Vec<Result<String, Error>> {
    let mut calls = Vec::new();
    for event in events {
        calls.push(publisher.ready().await.unwrap().call(event.clone()));
    }
    join_all(calls)
        .await
        .into_iter()
        .map(|r| r.map(|receipt| receipt.message_id.unwrap().to_string()))
        .collect()
}

/// The calls that were on the bad connection failed with `kind`, each with
/// its own event; the first call went out alone, on it. Calls still queued
/// when it broke went out on the next connection. How many succeeded.
fn succeeded(results: Vec<Result<String, Error>>, events: &[Event], kind: ErrorKind) -> usize {
    assert_eq!(results.len(), events.len());
    assert!(
        results[0].is_err(),
        "the first call went out on the bad connection"
    );
    let mut ok = 0;
    for (result, event) in results.into_iter().zip(events) {
        match result {
            Ok(_) => ok += 1,
            Err(err) => {
                assert_eq!(err.kind(), kind, "{err}");
                assert_eq!(err.event().map(Event::id), Some(event.id()), "{err}");
                assert!(err.message().contains("may or may not have been stored"), "{err}");
            }
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_fails_the_waiting_callers_and_the_next_call_connects_again() {
    let ns = unique("wtr_garbage");
    let topic = format!("{ns}.t");
    let fake = Fake::start(Behaviour::Garbage).await;
    let mut publisher = RedisClient::connect(RedisConfig::new(fake.url()))
        .await
        .unwrap()
        .publisher();
    let events = numbered(&topic, 20);
    let results = publish_together(&mut publisher, &events).await;
    let ok = succeeded(results, &events, ErrorKind::Connection);

    let receipt = publisher
        .publish(Event::new(topic.clone(), serde_json::json!({})))
        .await
        .unwrap();
    assert!(receipt.message_id.is_some());
    assert!(publisher.is_connected());
    // The garbage server stored nothing; the real one has the rest.
    assert_eq!(xlen(URL, &topic).await, ok as i64 + 1);
    cleanup(URL, &ns).await;
}

fn repeat(piece: &[u8], times: usize) -> &'static [u8] {
    piece.repeat(times).leak()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_replies_fail_the_call_at_their_limit_and_the_next_call_connects_again() {
    let nested = [b"*1000\r\n".as_slice(), repeat(b":1\r\n", 1000)].concat().leak();
    let cases: [(&[u8], &[u8], &str); 7] = [
        // Each array within a per-array cap, the reply a million elements.
        (b"*1000\r\n", nested, "too many elements"),
        (repeat(b"*1\r\n", 100), b"", "arrays nested too deep"),
        (
            b"$9223372036854775807\r\n",
            repeat(b"x", 65536),
            "reply too large",
        ),
        (
            b"*9223372036854775807\r\n",
            repeat(b":1\r\n", 4096),
            "too many elements",
        ),
        (b"$16000000\r\n", repeat(b"x", 65536), "reply too large"),
        (b"-", repeat(b"e", 65536), "reply too large"),
        (b"$5\r\nabcdefg", b"", "missing line end"),
    ];
    for (head, tail, why) in cases {
        let ns = unique("wtr_hostile");
        let topic = format!("{ns}.t");
        let fake = Fake::start(Behaviour::Flood { head, tail }).await;
        let mut publisher = RedisClient::connect(RedisConfig::new(fake.url()))
            .await
            .unwrap()
            .publisher();
        let event = Event::new(topic.clone(), serde_json::json!({}));
        let err = tokio::time::timeout(Duration::from_secs(20), publisher.publish(event.clone()))
            .await
            .expect("the call is answered")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{why}: {err}");
        assert!(err.message().contains(why), "{why}: {err}");
        assert_eq!(err.event().map(Event::id), Some(event.id()));
        publisher
            .publish(Event::new(topic.clone(), serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(xlen(URL, &topic).await, 1, "{why}");
        cleanup(URL, &ns).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_trickles_in_a_byte_at_a_time_answers_its_call() {
    let ns = unique("wtr_trickle");
    let topic = format!("{ns}.t");
    let fake = Fake::start(Behaviour::Trickle(b"$15\r\n1700000000000-7\r\n")).await;
    let mut publisher = RedisClient::connect(RedisConfig::new(fake.url()))
        .await
        .unwrap()
        .publisher();
    let receipt = publisher
        .publish(Event::new(topic.clone(), serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("1700000000000-7"));
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_the_waiting_callers() {
    let ns = unique("wtr_silent");
    let topic = format!("{ns}.t");
    let fake = Fake::start(Behaviour::Silent).await;
    let config = RedisConfig::new(fake.url()).response_timeout(Duration::from_millis(300));
    let mut publisher = RedisClient::connect(config).await.unwrap().publisher();
    let events = numbered(&topic, 5);
    let results = publish_together(&mut publisher, &events).await;
    let ok = succeeded(results, &events, ErrorKind::Timeout);

    let results = publish_together(&mut publisher, &events).await;
    let ids: HashSet<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(ids.len(), events.len());
    assert_eq!(xlen(URL, &topic).await, ok as i64 + 5);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_refused_when_connecting_again_fail_the_calls_without_the_secret() {
    let server = RedisServer::with_args(&["--requirepass", "hunter2"]).await;
    let port = server.port();
    let admin_url = format!("redis://:hunter2@127.0.0.1:{port}");
    let mut admin = common::raw(&admin_url).await;
    let _: () = acl(&["SETUSER", "bob", "on", ">first-secret", "~*", "&*", "+@all"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let config = RedisConfig::new(server.url())
        .username("bob")
        .password("first-secret");
    // The multiplexed connection is open; the `XADD` connection opens with
    // the first call, after the password changed.
    let mut publisher = RedisClient::connect(config).await.unwrap().publisher();
    let _: () = acl(&["SETUSER", "bob", "resetpass", ">second-secret"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let err = publisher
        .publish(Event::new("acl.t", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(err.message().contains("AUTH"), "{err}");
    assert!(!format!("{err} {err:?}").contains("secret"), "{err:?}");
    assert!(err.event().is_some());

    let _: () = acl(&["SETUSER", "bob", "resetpass", ">first-secret"])
        .query_async(&mut admin)
        .await
        .unwrap();
    publisher
        .publish(Event::new("acl.t", serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(xlen(&admin_url, "acl.t").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_in_the_url_is_selected() {
    let server = RedisServer::start().await;
    let port = server.port();
    let url = format!("redis://127.0.0.1:{port}/3");
    let mut publisher = RedisClient::connect(RedisConfig::new(&url))
        .await
        .unwrap()
        .publisher();
    let events = numbered("db.t", 10);
    let results = publish_together(&mut publisher, &events).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(xlen(&url, "db.t").await, 10);
    assert_eq!(xlen(&format!("redis://127.0.0.1:{port}/0"), "db.t").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_takes_the_pipelined_path_and_each_caller_gets_its_own_answer() {
    let dir = std::env::temp_dir().join(format!("wt-redis-{}", unique("wtr_tls")));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tls_port = free_port();
    let tls_port_arg = tls_port.to_string();
    let _server = RedisServer::with_args(&[
        "--tls-port",
        &tls_port_arg,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ])
    .await;
    // The certificate is self-signed: `#insecure` skips its verification.
    let url = format!("rediss://127.0.0.1:{tls_port}/#insecure");
    let mut publisher = RedisClient::connect(RedisConfig::new(&url))
        .await
        .unwrap()
        .publisher();
    let mut events = numbered("tls.t", 200);
    // One event to a key of another type fails alone.
    let mut conn = common::raw(&url).await;
    let _: () = redis::cmd("SET")
        .arg("tls.wrong")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    events.insert(100, Event::new("tls.wrong", serde_json::json!({})));
    let results = publish_together(&mut publisher, &events).await;
    let mut ids = HashSet::new();
    for (i, result) in results.into_iter().enumerate() {
        if i == 100 {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
            assert!(err.message().contains("WRONGTYPE"), "{err}");
        } else {
            assert!(ids.insert(result.unwrap()));
        }
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(xlen(&url, "tls.t").await, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_refusal_is_retryable_and_the_event_comes_back() {
    let server = RedisServer::with_args(&["--busy-reply-threshold", "20"]).await;
    let url = server.url();
    let mut publisher = RedisClient::connect(RedisConfig::new(&url))
        .await
        .unwrap()
        .publisher();
    publisher
        .publish(Event::new("busy.t", serde_json::json!({"n": 1})))
        .await
        .unwrap();
    let (mut probe, mut admin) = (common::raw(&url).await, common::raw(&url).await);
    let mut blocked = common::raw(&url).await;
    let script = tokio::spawn(async move {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<redis::Value>(&mut blocked)
            .await
    });
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match redis::cmd("PING").query_async::<String>(&mut probe).await {
                Err(e) if e.code() == Some("BUSY") => return,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("the script makes the server busy");

    let refused = Event::new("busy.t", serde_json::json!({"n": 2}));
    let err = publisher.publish(refused.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled, "{err}");
    assert!(err.is_retryable());
    assert!(err.message().contains("BUSY"), "{err}");
    assert_eq!(err.event().map(Event::id), Some(refused.id()));

    let _: () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(script.await.unwrap().is_err(), "the script was killed");
    publisher
        .publish(Event::new("busy.t", serde_json::json!({"n": 3})))
        .await
        .unwrap();
    assert_eq!(xlen(&url, "busy.t").await, 2);
}
