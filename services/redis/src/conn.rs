//! The client's connections, to one Redis or to a Redis Cluster.
//!
//! A single Redis is reached through the `redis` crate's
//! [`ConnectionManager`]; a cluster through its cluster connection, which
//! keeps the slot map, a connection to each master, follows `MOVED` and
//! `ASK` redirections, and learns the new map after a failover. [`Conn`]
//! is either, so that every command of the transport is written once.
//!
//! A cluster answers a pipeline only if all its keys hash to one slot. A
//! pipeline of this transport may span streams (the `XACK`s of a batch,
//! the `XADD`s of a publisher's batch): on a cluster, [`Conn`] splits it
//! into one pipeline per slot, sends those at once, and puts the replies
//! back in order. Stream keys carry their topic as a hash tag on a cluster
//! (`prefix{topic}`), so that each topic's commands stay on one slot. A
//! command without a key (the `WAIT` after a slot's `XADD`s) goes with the
//! command before it, to the same master on the same connection.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{Arg, Client, Cmd, Pipeline, RedisFuture, RedisResult, ServerError, Value};
use watchtower::Error;
use watchtower::backoff::Backoff;

use crate::config::RedisConfig;
use crate::error::from_redis;

/// What connections are opened from: one Redis, or the seeds of a cluster.
// Held once per client, behind its `Arc`: the size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Backend {
    Single(Client),
    Cluster(ClusterClient),
}

impl Backend {
    /// A connection with `config`'s settings; a response timeout of
    /// `extra` more than configured (for blocking reads).
    pub(crate) async fn connect(&self, config: &RedisConfig, extra: Duration) -> Result<Conn, Error> {
        let (connection_timeout, response_timeout) = config.timeouts();
        let result = match self {
            Backend::Single(client) => {
                // The `redis` crate runs the reconnect loop of a multiplexed
                // connection; it waits within the bounds of this backoff.
                let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
                let settings = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout + extra))
                    .set_connection_timeout(Some(connection_timeout))
                    .set_number_of_retries(config.reconnect_retries_setting())
                    .set_min_delay(backoff.initial())
                    .set_max_delay(backoff.max())
                    .set_pipeline_buffer_size(config.pipeline_buffer_setting());
                client
                    .get_connection_manager_with_config(settings)
                    .await
                    .map(Conn::Single)
            }
            Backend::Cluster(client) => {
                let settings = ClusterConfig::new()
                    .set_response_timeout(response_timeout + extra)
                    .set_connection_timeout(connection_timeout);
                client
                    .get_async_connection_with_config(settings)
                    .await
                    .map(Conn::Cluster)
            }
        };
        result.map_err(|e| from_redis(e, &format!("connecting to {}", config.redacted_url())))
    }
}

/// A connection to one Redis or to a Redis Cluster; clones share it.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// The addresses (`host`, `port`) of the masters that serve slots, for
    /// commands every master must answer (`SCAN`); `None` on a single
    /// Redis.
    pub(crate) async fn masters(&mut self) -> Result<Option<Vec<(String, u16)>>, Error> {
        let Conn::Cluster(conn) = self else {
            return Ok(None);
        };
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(conn)
            .await
            .map_err(|e| from_redis(e, "CLUSTER NODES"))?;
        Ok(Some(serving_masters(&nodes)))
    }

    /// `cmd` (without a key) on one master of a cluster, or on the single
    /// Redis.
    pub(crate) async fn on_master(&mut self, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(conn) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
                conn.route_command(cmd, routing).await
            }
            conn => cmd.query_async(conn).await,
        }
    }

    /// `cmd` on the node at `host:port` of a cluster, or on the single
    /// Redis.
    pub(crate) async fn on_node(&mut self, node: Option<&(String, u16)>, cmd: Cmd) -> RedisResult<Value> {
        match (self, node) {
            (Conn::Cluster(conn), Some((host, port))) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                conn.route_command(cmd, routing).await
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

/// The masters with slots in a `CLUSTER NODES` reply.
fn serving_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let serving = fields.len() > 8 && fields[2].contains("master") && !fields[2].contains("fail");
            if !serving {
                return None;
            }
            let addr = fields[1].split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// The key a command of this transport works on: the second argument, the
/// third for the `XGROUP` and `XINFO` subcommands, the fourth for `EVAL`
/// (its first key).
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVAL") {
        args.nth(2)
    } else if name.eq_ignore_ascii_case(b"XGROUP") || name.eq_ignore_ascii_case(b"XINFO") {
        args.nth(1)
    } else {
        args.next()
    }
}

/// The replies of `pipeline`'s commands on a cluster: one pipeline per
/// slot, all at once, the replies put back in the order of the commands.
async fn split_by_slot(
    conn: &mut ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let mut slots: HashMap<Option<Slot>, Vec<usize>> = HashMap::new();
    let mut previous = None;
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        // A command without a key (a `WAIT`) goes with the one before it.
        let slot = key_of(cmd).map(Slot::for_key).or(previous);
        previous = slot;
        slots.entry(slot).or_default().push(i);
    }
    if slots.len() <= 1 || pipeline.is_transaction() {
        // One slot; or a transaction, whose keys this transport always
        // puts on one slot (a cluster refuses it otherwise).
        return conn.req_packed_commands(pipeline, offset, count).await;
    }
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let parts = slots.into_values().map(|indices| {
        let mut part = Pipeline::with_capacity(indices.len());
        for &i in &indices {
            part.add_command(commands[i].clone());
        }
        let mut conn = conn.clone();
        async move {
            let replies = conn.req_packed_commands(&part, 0, indices.len()).await;
            (indices, replies)
        }
    });
    let mut replies = vec![Value::Nil; commands.len()];
    for (indices, part) in join_all(parts).await {
        let part = match part {
            Ok(values) => values,
            Err(e) => match ServerError::try_from(e) {
                // A server's refusal of the whole part is each command's.
                Ok(refusal) => vec![Value::ServerError(refusal); indices.len()],
                Err(e) => return Err(e),
            },
        };
        for (i, value) in indices.into_iter().zip(part) {
            replies[i] = value;
        }
    }
    Ok(replies)
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => split_by_slot(conn, pipeline, offset, count).boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_transports_commands() {
        let mut xadd = redis::cmd("XADD");
        xadd.arg("events:{a.b}").arg("*").arg("data").arg("x");
        assert_eq!(key_of(&xadd), Some(&b"events:{a.b}"[..]));
        let mut destroy = redis::cmd("XGROUP");
        destroy.arg("DESTROY").arg("s").arg("g");
        assert_eq!(key_of(&destroy), Some(&b"s"[..]));
        assert_eq!(key_of(&redis::cmd("PING")), None);
        let mut eval = redis::cmd("EVAL");
        eval.arg("return 1").arg(1).arg("k{t}").arg("g");
        assert_eq!(key_of(&eval), Some(&b"k{t}"[..]));
        // The hash tag decides the slot.
        assert_eq!(Slot::for_key("a{t}"), Slot::for_key("dlq{t}"));
    }

    #[test]
    fn masters_serving_slots() {
        let nodes = "\
a 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
c 127.0.0.1:7003@17003 master,fail - 0 0 3 connected
d 127.0.0.1:7004@17004 slave a 0 0 1 connected
e 127.0.0.1:7005@17005 master - 0 0 4 connected 10923-16383
";
        assert_eq!(
            serving_masters(nodes),
            [
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002),
                ("127.0.0.1".to_owned(), 7005)
            ]
        );
    }
}
