//! Helpers shared by the Redis integration tests: raw Redis access, clean-up,
//! stream entries. Names, deadlines and private servers come from
//! `watchtower-test-support`.

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::time::Duration;

use redis::aio::MultiplexedConnection;

pub const URL: &str = "redis://127.0.0.1:6379";

pub async fn raw(url: &str) -> MultiplexedConnection {
    // The client's 500 ms default is too short on a loaded test machine.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(20)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Deletes every key starting with `prefix`.
pub async fn cleanup(url: &str, prefix: &str) {
    let mut conn = raw(url).await;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Entries pending in `group` on `key`.
pub async fn pending(conn: &mut MultiplexedConnection, key: &str, group: &str) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => panic!("unexpected XPENDING reply {items:?}"),
        },
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

/// Waits (with Redis blocking, not sleeping) until `key` has an entry after
/// `after`, and returns the entries' fields.
pub async fn wait_entries(
    conn: &mut MultiplexedConnection,
    key: &str,
    after: &str,
) -> Vec<(String, Vec<(String, Vec<u8>)>)> {
    let reply: redis::Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(20_000)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .query_async(conn)
        .await
        .unwrap();
    let redis::Value::Array(streams) = reply else {
        panic!("no entries in {key} within 20 s: {reply:?}")
    };
    let mut out = Vec::new();
    for stream in streams {
        let redis::Value::Array(parts) = stream else {
            panic!()
        };
        let redis::Value::Array(entries) = &parts[1] else {
            panic!()
        };
        for entry in entries {
            let redis::Value::Array(e) = entry else { panic!() };
            let id: String = redis::from_redis_value_ref(&e[0]).unwrap();
            let flat: Vec<Vec<u8>> = redis::from_redis_value_ref(&e[1]).unwrap();
            let fields = flat
                .chunks(2)
                .map(|c| (String::from_utf8(c[0].clone()).unwrap(), c[1].clone()))
                .collect();
            out.push((id, fields));
        }
    }
    out
}

/// `n` events to `topic`, each carrying its number.
pub fn numbered(topic: &str, n: usize) -> Vec<watchtower::Event> {
    (0..n)
        .map(|i| watchtower::Event::new(topic.to_owned(), serde_json::json!({"i": i})))
        .collect()
}

/// The event id of an entry's fields, in either content mode: the `id`
/// field (binary), or the `id` of the document in `data` (structured).
#[allow(dead_code)]
pub fn event_id<N: AsRef<[u8]>, V: AsRef<[u8]>>(fields: impl IntoIterator<Item = (N, V)>) -> Vec<u8> {
    let mut data = None;
    for (name, value) in fields {
        match name.as_ref() {
            b"id" => return value.as_ref().to_vec(),
            b"data" => data = Some(value.as_ref().to_vec()),
            _ => {}
        }
    }
    let document: serde_json::Value = serde_json::from_slice(&data.expect("an id or a data field")).unwrap();
    document["id"]
        .as_str()
        .expect("a document with an id")
        .as_bytes()
        .to_vec()
}
