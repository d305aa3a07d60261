//! The support itself, against real `nats-server` and `redis-server`
//! processes.

use std::collections::HashSet;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use watchtower_test_support::{NatsServer, RedisServer, TcpProxy, unique, within};

/// The first line a client gets from `addr` (NATS greets with `INFO`).
async fn greeting(stream: &mut TcpStream) -> String {
    let mut line = String::new();
    within("the greeting", BufReader::new(stream).read_line(&mut line))
        .await
        .expect("read the greeting");
    line
}

#[test]
fn unique_names_are_distinct_tokens_none_starting_another() {
    let names: Vec<String> = (0..1000).map(|_| unique("wt_case")).collect();
    assert_eq!(names.iter().collect::<HashSet<_>>().len(), names.len());
    for name in &names {
        let tail = name.strip_prefix("wt_case_").expect("the prefix and `_`");
        assert!(
            tail.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{name}"
        );
        assert_eq!(tail.len(), names[0].len() - "wt_case_".len(), "{name}");
    }
    for a in &names {
        assert_eq!(
            names.iter().filter(|b| b.starts_with(a.as_str())).count(),
            1,
            "{a}"
        );
    }
}

#[tokio::test]
async fn a_nats_server_greets_and_comes_back_on_its_port_after_a_restart() {
    let mut server = NatsServer::start().await;
    let port = server.port();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    let mut before = TcpStream::connect(server.addr()).await.unwrap();
    assert!(greeting(&mut before).await.starts_with("INFO "));

    server.restart().await;
    assert_eq!(server.port(), port);
    // The killed server's connection is closed.
    let mut rest = Vec::new();
    // Closed: an end of stream or a reset, either way the read returns.
    let _ = within("the old connection to close", before.read_to_end(&mut rest)).await;
    let mut after = TcpStream::connect(server.addr()).await.unwrap();
    assert!(greeting(&mut after).await.starts_with("INFO "));
}

#[tokio::test]
async fn a_redis_server_takes_extra_arguments_and_is_empty_after_a_restart() {
    let mut server = RedisServer::with_args(&["--requirepass", "hunter2"]).await;
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    let mut conn = TcpStream::connect(server.addr()).await.unwrap();
    conn.write_all(b"PING\r\n").await.unwrap();
    assert!(greeting(&mut conn).await.starts_with("-NOAUTH"));

    let mut conn = TcpStream::connect(server.addr()).await.unwrap();
    conn.write_all(b"AUTH hunter2\r\nSET k v\r\n").await.unwrap();
    let mut replies = BufReader::new(&mut conn);
    for _ in 0..2 {
        let mut line = String::new();
        within("a reply", replies.read_line(&mut line)).await.unwrap();
        assert_eq!(line, "+OK\r\n");
    }

    server.restart().await;
    let mut conn = TcpStream::connect(server.addr()).await.unwrap();
    conn.write_all(b"AUTH hunter2\r\nEXISTS k\r\n").await.unwrap();
    let mut replies = BufReader::new(&mut conn);
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        within("a reply", replies.read_line(&mut line)).await.unwrap();
        lines.push(line);
    }
    assert_eq!(lines, ["+OK\r\n", ":0\r\n"]);
}

#[tokio::test]
async fn the_proxy_forwards_and_cuts_open_connections() {
    let server = NatsServer::start().await;
    let proxy = TcpProxy::start(server.addr()).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(greeting(&mut client).await.starts_with("INFO "));
    proxy.wait_accepted(1).await;
    assert_eq!(proxy.open_connections(), 1);

    proxy.cut();
    let mut rest = Vec::new();
    // Closed: an end of stream or a reset, either way the read returns.
    let _ = within("the cut connection to close", client.read_to_end(&mut rest)).await;
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(greeting(&mut again).await.starts_with("INFO "));
    assert_eq!(proxy.accepted_connections(), 2);
}
