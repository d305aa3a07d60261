//! Private broker clusters on free ports: three routed `nats-server`s with
//! clustered JetStream, a Redis Cluster of masters with replicas, and a
//! RabbitMQ cluster for quorum queues.

use std::fmt;
use std::time::Duration;

use tokio::process::Command;

use crate::process::{Broker as _, NatsServer, Rabbit, RabbitNode, RedisServer};
use crate::{PATIENCE, free_port, unique};

/// How often cluster state is asked for while waiting on it: the
/// brokers change it on their own timers (a Redis failover after its node
/// timeout), which no log line a test can wait on reports on every node.
const POLL: Duration = Duration::from_millis(50);

/// `nats-server`s with JetStream routed into one cluster, each on a free
/// client port and a free route port with a store of its own. A server may
/// be killed and restarted (same ports, same store) through
/// [`server_mut`](NatsCluster::server_mut); the cluster is killed on drop.
///
/// # Example
///
/// ```no_run
/// use watchtower_test_support::NatsCluster;
///
/// # async fn f() {
/// let mut cluster = NatsCluster::start(3).await;
/// let servers = cluster.urls(); // nats://127.0.0.1:p1, ...
/// cluster.server_mut(1).kill().await;
/// cluster.restart(1).await; // back in the cluster, JetStream caught up
/// # let _ = servers;
/// # }
/// ```
pub struct NatsCluster {
    name: String,
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` routed servers and waits until each has JetStream
    /// ready (its metadata leader elected).
    ///
    /// # Panics
    ///
    /// If `size` is 0, or a server does not start or see a leader within
    /// [`PATIENCE`].
    pub async fn start(size: usize) -> NatsCluster {
        assert!(size > 0, "a cluster of at least one server");
        let name = unique("wt");
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut servers = Vec::with_capacity(size);
        for (i, &own) in route_ports.iter().enumerate() {
            let routes: Vec<String> = route_ports
                .iter()
                .filter(|&&port| port != own)
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect();
            let server_name = format!("{name}-{i}");
            let cluster = format!("nats://127.0.0.1:{own}");
            let routes = routes.join(",");
            let mut args = vec![
                "--server_name",
                &server_name,
                "--cluster_name",
                &name,
                "--cluster",
                &cluster,
            ];
            if !routes.is_empty() {
                args.extend(["--routes", &routes]);
            }
            servers.push(NatsServer::with_args(&args).await);
        }
        let cluster = NatsCluster { name, servers };
        for i in 0..size {
            cluster.jetstream_ready(i).await;
        }
        cluster
    }

    async fn jetstream_ready(&self, i: usize) {
        if self.servers.len() > 1 {
            self.servers[i].wait_for_log("metadata leader").await;
        }
    }

    /// The cluster's name (`--cluster_name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client URLs of all servers, `nats://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &NatsServer {
        &self.servers[i]
    }

    /// Server `i`, to kill, stop, freeze or restart.
    pub fn server_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// Starts server `i` again (killing it first if it runs) and waits
    /// until it is back in the cluster with a JetStream metadata leader:
    /// up to three times [`PATIENCE`], since a server that was killed first
    /// rebuilds its file store before it rejoins, which on a loaded machine
    /// has taken longer than `PATIENCE` alone.
    pub async fn restart(&mut self, i: usize) {
        self.servers[i].restart().await;
        if self.servers.len() > 1 {
            self.servers[i]
                .wait_for_log_within("metadata leader", PATIENCE * 3)
                .await;
        }
    }
}

impl fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCluster")
            .field("name", &self.name)
            .field("servers", &self.servers)
            .finish()
    }
}

/// A Redis Cluster on free ports: `masters` masters sharing the 16,384
/// slots, each with `replicas` replicas, without persistence, a node
/// timeout of one second so that a killed master's replica takes over
/// within a few seconds. Killed on drop.
///
/// Nodes are numbered in creation order: `0..masters` start as masters.
/// After a failover, [`master_of`](RedisCluster::master_of) tells who
/// serves a key.
///
/// # Example
///
/// ```no_run
/// use watchtower_test_support::RedisCluster;
///
/// # async fn f() {
/// let mut cluster = RedisCluster::start(3, 1).await;
/// let seeds = cluster.urls(); // redis://127.0.0.1:p1, ...
/// let owner = cluster.master_of("orders").await;
/// cluster.node_mut(owner).kill().await;
/// cluster.wait_until_healthy().await; // a replica took over its slots
/// # let _ = seeds;
/// # }
/// ```
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters × (1 + replicas)` nodes, joins them with
    /// `redis-cli --cluster create`, and waits until every slot is served
    /// and every replica is in sync.
    ///
    /// # Panics
    ///
    /// If fewer than 3 masters are asked for (Redis' minimum), a node does
    /// not start, or the cluster is not healthy within [`PATIENCE`].
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        assert!(masters >= 3, "Redis Cluster needs at least 3 masters");
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let bus = free_port().to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // A replica takes over however long it was cut off.
                "--cluster-replica-validity-factor",
                "0",
            ];
            nodes.push(RedisServer::with_args(&args).await);
        }
        let cluster = RedisCluster { nodes };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(cluster.nodes.iter().map(|node| node.addr().to_string()));
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let output = tokio::time::timeout(PATIENCE, create.output())
            .await
            .expect("redis-cli --cluster create within the patience")
            .expect("redis-cli");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_healthy().await;
        cluster
    }

    /// The seed URLs of all nodes, `redis://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Node `i`, to kill, freeze or restart.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: it has at least three).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `redis-cli -p <port of node i> args...`, its output, or `None` if
    /// the node does not answer.
    pub async fn cli(&self, i: usize, args: &[&str]) -> Option<String> {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.nodes[i].port().to_string()])
            .args(args)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// The node serving `key` as master now, as the running nodes see it.
    ///
    /// # Panics
    ///
    /// If no running node answers, or none serves the key's slot.
    pub async fn master_of(&self, key: &str) -> usize {
        let (i, _) = self.any_running().expect("a running node");
        let slot: u16 = self
            .cli(i, &["CLUSTER", "KEYSLOT", key])
            .await
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = self.cli(i, &["CLUSTER", "NODES"]).await.expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
                match (ends.next(), ends.next()) {
                    (Some(Ok(first)), Some(Ok(last))) => (first..=last).contains(&slot),
                    (Some(Ok(only)), None) => only == slot,
                    _ => false,
                }
            });
            if serves {
                let port = node_port(fields[1]);
                if let Some(found) = self.nodes.iter().position(|node| Some(node.port()) == port) {
                    return found;
                }
            }
        }
        panic!("no master serves slot {slot} of {key:?}");
    }

    /// The running nodes that replicate node `master`, as the running
    /// nodes see it.
    ///
    /// # Panics
    ///
    /// If no running node answers.
    pub async fn replicas_of(&self, master: usize) -> Vec<usize> {
        let (i, _) = self.any_running().expect("a running node");
        let nodes = self.cli(i, &["CLUSTER", "NODES"]).await.expect("CLUSTER NODES");
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        let Some(id) = lines
            .iter()
            .find(|fields| fields.len() > 3 && node_port(fields[1]) == Some(self.nodes[master].port()))
            .map(|fields| fields[0])
        else {
            return Vec::new();
        };
        lines
            .iter()
            .filter(|fields| fields.len() > 3 && fields[2].contains("slave") && fields[3] == id)
            .filter_map(|fields| {
                let port = node_port(fields[1])?;
                self.nodes
                    .iter()
                    .position(|node| node.port() == port && node.is_running())
            })
            .collect()
    }

    fn any_running(&self) -> Option<(usize, &RedisServer)> {
        self.nodes.iter().enumerate().find(|(_, node)| node.is_running())
    }

    /// Waits until every running node says `cluster_state:ok`, no running
    /// node is a master without slots while a master is missing, and every
    /// running replica's link to its master is up: after a start, a
    /// failover, or a node's restart.
    ///
    /// # Panics
    ///
    /// If that is not so within [`PATIENCE`].
    pub async fn wait_until_healthy(&self) {
        tokio::time::timeout(PATIENCE, async {
            while !self.healthy().await {
                tokio::time::sleep(POLL).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the Redis Cluster was not healthy within {PATIENCE:?}"));
    }

    async fn healthy(&self) -> bool {
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let Some(info) = self.cli(i, &["CLUSTER", "INFO"]).await else {
                return false;
            };
            if !info.contains("cluster_state:ok") {
                return false;
            }
            let Some(replication) = self.cli(i, &["INFO", "replication"]).await else {
                return false;
            };
            if replication.contains("role:slave") && !replication.contains("master_link_status:up") {
                return false;
            }
        }
        // Every slot is served by a running master.
        let Some((i, _)) = self.any_running() else {
            return false;
        };
        let Some(nodes) = self.cli(i, &["CLUSTER", "NODES"]).await else {
            return false;
        };
        !nodes.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 8 && fields[2].contains("master") && fields[2].contains("fail")
        })
    }
}

/// The client port of a node's address in `CLUSTER NODES`
/// (`127.0.0.1:7001@17001`).
fn node_port(addr: &str) -> Option<u16> {
    addr.split(['@', ','])
        .next()
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse().ok())
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCluster")
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// A RabbitMQ cluster of private nodes ([`RabbitNode`]) on free ports,
/// joined with `rabbitmqctl join_cluster`, for quorum queues replicated
/// across nodes. Each node has its own node name (`wt<port>@localhost`),
/// ports, database and logs, and all share one Erlang cookie; the shared
/// broker on 5672 is never touched. Killed on drop.
///
/// Starting one takes 20 to 35 s on two busy cores (the nodes boot side
/// by side in about 14 s; each join restarts the joining node's
/// application, about 3 s).
///
/// # Example
///
/// ```no_run
/// use watchtower_test_support::RabbitCluster;
///
/// # async fn f() {
/// let mut cluster = RabbitCluster::start(3).await;
/// let urls = cluster.urls(); // amqp://guest:guest@127.0.0.1:p1/%2f, ...
/// let leader = cluster.leader_of("orders.billing").await; // a quorum queue's
/// cluster.node_mut(leader).kill().await;
/// # let _ = urls;
/// # }
/// ```
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Starts `size` nodes side by side, joins nodes `1..size` to node 0,
    /// and waits until every node runs its application in one cluster.
    ///
    /// # Panics
    ///
    /// If `size` is 0, a node does not start, or a join fails.
    pub async fn start(size: usize) -> RabbitCluster {
        assert!(size > 0, "a cluster of at least one node");
        let mut starting = tokio::task::JoinSet::new();
        for _ in 0..size {
            starting.spawn(RabbitNode::start());
        }
        let mut nodes = Vec::with_capacity(size);
        while let Some(node) = starting.join_next().await {
            nodes.push(node.expect("a RabbitMQ node started"));
        }
        let cluster = RabbitCluster { nodes };
        let first = cluster.nodes[0].node_name();
        for node in &cluster.nodes[1..] {
            for args in [&["stop_app"][..], &["join_cluster", &first], &["start_app"]] {
                cluster
                    .ctl_on(node, args)
                    .await
                    .unwrap_or_else(|e| panic!("rabbitmqctl -n {} {args:?} failed: {e}", node.node_name()));
            }
        }
        cluster
    }

    async fn ctl_on(&self, node: &RabbitNode, args: &[&str]) -> Result<String, String> {
        tokio::time::timeout(Rabbit::STARTUP, node.ctl(args))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", Rabbit::STARTUP)))
    }

    /// The AMQP URLs of all nodes, `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::amqp_url).collect()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &RabbitNode {
        &self.nodes[i]
    }

    /// Node `i`, to kill, stop or restart (it rejoins the cluster: its
    /// database remembers it).
    pub fn node_mut(&mut self, i: usize) -> &mut RabbitNode {
        &mut self.nodes[i]
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: it has at least one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node that leads quorum queue `queue` (of the default virtual
    /// host) now, as a running node sees it.
    ///
    /// # Panics
    ///
    /// If no running node answers, or none names a leader of `queue`.
    pub async fn leader_of(&self, queue: &str) -> usize {
        let asked = self
            .nodes
            .iter()
            .find(|node| node.is_running())
            .expect("a running node");
        let listed = self
            .ctl_on(
                asked,
                &["list_queues", "name", "leader", "--quiet", "--no-table-headers"],
            )
            .await
            .unwrap_or_else(|e| panic!("rabbitmqctl list_queues failed: {e}"));
        let leader = listed
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .unwrap_or_else(|| panic!("no quorum queue {queue:?} with a leader in:\n{listed}"));
        self.nodes
            .iter()
            .position(|node| node.node_name() == leader)
            .unwrap_or_else(|| panic!("the leader {leader} of {queue:?} is none of the cluster's nodes"))
    }
}

impl fmt::Debug for RabbitCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitCluster")
            .field("nodes", &self.nodes)
            .finish()
    }
}
