//! Connection settings shared by the publisher and the subscriber.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::ClusterClientBuilder;
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use watchtower::Error;
use watchtower::redact_url;

use crate::conn::Backend;

const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_RECONNECT_RETRIES: usize = 3;
const DEFAULT_PIPELINE_BUFFER: usize = 1024;

/// Where and how to connect to Redis, and how topics map to stream keys:
/// plain data, checked once by [`RedisClient::connect`](crate::RedisClient::connect).
/// [`RedisConfig::default`] is the local Redis, `redis://127.0.0.1:6379`.
///
/// ```
/// use std::time::Duration;
/// use watchtower_redis::RedisConfig;
///
/// let config = RedisConfig::new("rediss://cache.example:6380")
///     .username("app")
///     .password("s3cret")
///     .database(2)
///     .response_timeout(Duration::from_secs(2))
///     .stream_prefix("events:");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.stream_key("user.created"), "events:user.created");
/// ```
///
/// # Redis Cluster
///
/// [`RedisConfig::cluster`] takes the addresses of some nodes of a Redis
/// Cluster (any of them lead to the rest). Each topic's stream then carries
/// the topic as a hash tag, `prefix{topic}`, so that a topic's stream and
/// its dead-letter stream (`watchtower:dead-letter{topic}`) share a slot;
/// topics spread over the masters by their hash. See the crate's
/// [Redis Cluster](crate#redis-cluster) section.
///
/// ```
/// use watchtower_redis::RedisConfig;
///
/// let config = RedisConfig::cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
///     .stream_prefix("events:");
/// assert_eq!(config.stream_key("user.created"), "events:{user.created}");
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    url: String,
    /// The seed nodes of a Redis Cluster; empty for a single Redis.
    cluster: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    database: Option<i64>,
    response_timeout: Duration,
    connection_timeout: Duration,
    reconnect_retries: usize,
    pipeline_buffer: usize,
    stream_prefix: Arc<str>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig::new(DEFAULT_URL)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cluster: Vec<String> = self.cluster.iter().map(|seed| redact_url(seed)).collect();
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("cluster", &cluster)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .field("pipeline_buffer", &self.pipeline_buffer)
            .field("stream_prefix", &self.stream_prefix)
            .finish()
    }
}

impl RedisConfig {
    /// Connects to `url`: `redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` for TLS (feature `tls`, on by default). The URL is
    /// checked by [`RedisClient::connect`](crate::RedisClient::connect).
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            cluster: Vec::new(),
            username: None,
            password: None,
            database: None,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            reconnect_retries: DEFAULT_RECONNECT_RETRIES,
            pipeline_buffer: DEFAULT_PIPELINE_BUFFER,
            stream_prefix: Arc::from(""),
        }
    }

    /// Connects to a Redis Cluster through `seeds`, the URLs of some of its
    /// nodes (`redis://host:port`; `rediss://` for TLS). The client learns
    /// the others and which serves which slots, follows `MOVED` and `ASK`
    /// redirections, and learns the new masters after a failover. The
    /// seeds are checked by [`RedisClient::connect`](crate::RedisClient::connect);
    /// a cluster has no database but 0.
    pub fn cluster<I, S>(seeds: I) -> RedisConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let cluster: Vec<String> = seeds.into_iter().map(Into::into).collect();
        RedisConfig {
            cluster: cluster.clone(),
            ..RedisConfig::new(cluster.first().cloned().unwrap_or_default())
        }
    }

    /// Whether this is a Redis Cluster's configuration.
    pub fn is_cluster(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// The ACL user name; overrides one in the URL.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// The password; overrides one in the URL. Never shown by `Debug` or in
    /// errors.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// The logical database; overrides one in the URL. Default 0.
    pub fn database(mut self, database: i64) -> Self {
        self.database = Some(database);
        self
    }

    /// How long a command may wait for its reply. Default 5 s: the `redis`
    /// crate's 500 ms turns a busy server or a large pipeline into spurious
    /// timeouts (and, through a retry layer, into duplicates). A
    /// subscriber's blocking reads wait their block time on top of this.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long opening a connection may take. Default 5 s.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Reconnection attempts (with exponential backoff from 100 ms) before
    /// a command fails. Default 3 (about 0.7 s of backoff), so that callers
    /// learn of an outage quickly and their retry layer, not the client,
    /// decides how long to keep trying. The
    /// publisher's own connection for `XADD`s makes one attempt whenever
    /// calls find it down, and fails the calls waiting for it if that
    /// attempt fails: its callers' retry layer decides how long to keep
    /// trying.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// Commands queued on the multiplexed connection before callers wait.
    /// Default 1024, so that many concurrent callers are pipelined rather
    /// than throttled by the `redis` crate's default of 50.
    pub fn pipeline_buffer(mut self, size: usize) -> Self {
        self.pipeline_buffer = size.max(1);
        self
    }

    /// A prefix put before every topic to make its stream key (`events:`
    /// makes `user.created` the stream `events:user.created`). Default: none,
    /// the stream is named after the topic.
    pub fn stream_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.stream_prefix = prefix.into();
        self
    }

    /// The stream key of `topic`: the prefix and the topic, the topic as
    /// a hash tag (`prefix{topic}`) on a [cluster](RedisConfig::cluster).
    pub fn stream_key(&self, topic: &str) -> String {
        if self.is_cluster() {
            format!("{}{{{topic}}}", self.stream_prefix)
        } else {
            format!("{}{topic}", self.stream_prefix)
        }
    }

    /// The topic of a stream key, if the key has the prefix (and the hash
    /// tag on a cluster).
    pub(crate) fn topic_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(&*self.stream_prefix)?;
        let topic = if self.is_cluster() {
            rest.strip_prefix('{')?.strip_suffix('}')?
        } else {
            rest
        };
        Some(topic).filter(|t| !t.is_empty())
    }

    /// The dead-letter stream of `topic`'s entries: `dlq` itself, or on a
    /// cluster `dlq{topic}`, on the slot of the topic's stream, so that an
    /// entry moves there and is acknowledged in one transaction.
    pub(crate) fn dead_letter_key(&self, dlq: &str, topic: &str) -> String {
        if self.is_cluster() {
            format!("{dlq}{{{topic}}}")
        } else {
            dlq.to_owned()
        }
    }

    /// Whether `key` is a dead-letter stream of `dlq`.
    pub(crate) fn is_dead_letter_key(&self, dlq: &str, key: &str) -> bool {
        if self.is_cluster() {
            key.strip_prefix(dlq).is_some_and(|rest| rest.starts_with('{'))
        } else {
            key == dlq
        }
    }

    /// How long to wait for a connection, and for a reply.
    pub(crate) fn timeouts(&self) -> (Duration, Duration) {
        (self.connection_timeout, self.response_timeout)
    }

    /// The prefix of every stream key.
    pub(crate) fn prefix(&self) -> &Arc<str> {
        &self.stream_prefix
    }

    /// The URL without credentials, for messages (the seeds, on a
    /// cluster).
    pub(crate) fn redacted_url(&self) -> String {
        if self.is_cluster() {
            let seeds: Vec<String> = self.cluster.iter().map(|seed| redact_url(seed)).collect();
            format!("cluster {}", seeds.join(","))
        } else {
            redact_url(&self.url)
        }
    }

    /// Reconnection attempts before a command fails.
    pub(crate) fn reconnect_retries_setting(&self) -> usize {
        self.reconnect_retries
    }

    /// Commands queued on a multiplexed connection before callers wait.
    pub(crate) fn pipeline_buffer_setting(&self) -> usize {
        self.pipeline_buffer
    }

    /// Checks the settings and builds what connections are made from.
    pub(crate) fn backend(&self) -> Result<Backend, Error> {
        if !self.is_cluster() {
            return self.client().map(Backend::Single);
        }
        if self.database.is_some_and(|db| db != 0) {
            return Err(Error::config("a Redis Cluster has no database but 0"));
        }
        let mut seeds = Vec::with_capacity(self.cluster.len());
        for seed in &self.cluster {
            let info = connection_info(seed)?;
            if info.redis_settings().db() != 0 {
                return Err(Error::config("a Redis Cluster has no database but 0"));
            }
            seeds.push(info);
        }
        self.check_timeouts()?;
        let mut builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout)
            .retries(u32::try_from(self.reconnect_retries).unwrap_or(u32::MAX));
        if let Some(user) = &self.username {
            builder = builder.username(user);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        builder.build().map(Backend::Cluster).map_err(|_| {
            Error::config(format!(
                "invalid Redis Cluster settings for {}",
                self.redacted_url()
            ))
        })
    }

    fn check_timeouts(&self) -> Result<(), Error> {
        if self.response_timeout.is_zero() || self.connection_timeout.is_zero() {
            return Err(Error::config("Redis timeouts must be greater than zero"));
        }
        Ok(())
    }

    /// Checks the settings of a single Redis and builds its client.
    pub(crate) fn client(&self) -> Result<Client, Error> {
        let shown = self.redacted_url();
        let info = connection_info(&self.url)?;
        if self.database.is_some_and(|db| db < 0) {
            return Err(Error::config("the Redis database number must not be negative"));
        }
        self.check_timeouts()?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        if let Some(db) = self.database {
            settings = settings.set_db(db);
        }
        let info = info.set_redis_settings(settings);
        Client::open(info).map_err(|_| Error::config(format!("invalid Redis settings for {shown:?}")))
    }
}

/// The connection settings in `url`, checked: `redis://` or `rediss://`
/// (with the `tls` feature), parsable. Errors never show a password.
fn connection_info(url: &str) -> Result<ConnectionInfo, Error> {
    let shown = redact_url(url);
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(Error::config(format!(
            "Redis URL {shown:?} must start with redis:// or rediss://"
        )));
    }
    let info: ConnectionInfo = url
        .into_connection_info()
        .map_err(|_| Error::config(format!("invalid Redis URL {shown:?}")))?;
    if let ConnectionAddr::TcpTls { .. } = info.addr() {
        if !cfg!(feature = "tls") {
            return Err(Error::config(format!(
                "{shown:?} asks for TLS, but watchtower-redis was built without its `tls` feature"
            )));
        }
        install_crypto_provider();
    }
    Ok(info)
}

#[cfg(feature = "tls")]
fn install_crypto_provider() {
    // Another part of the program may have installed one already; either
    // way a provider is in place afterwards.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(not(feature = "tls"))]
fn install_crypto_provider() {}

#[cfg(test)]
mod tests {
    use super::*;
    use watchtower::ErrorKind;

    #[test]
    fn bad_urls_are_config_errors_without_secrets() {
        for url in [
            "http://127.0.0.1:6379",
            "redis://:hunter2@[::1:6379",
            "redis://user:hunter2@host:notaport",
            "",
        ] {
            let err = RedisConfig::new(url).client().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let err = RedisConfig::default().database(-1).client().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let err = RedisConfig::default()
            .response_timeout(Duration::ZERO)
            .client()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }

    #[test]
    fn debug_hides_password() {
        let config = RedisConfig::new("redis://u:hunter2@h:1/0").password("s3cret");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn cluster_keys_carry_the_topic_as_hash_tag_and_bad_seeds_are_config_errors() {
        let config =
            RedisConfig::cluster(["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]).stream_prefix("wt:");
        assert!(config.is_cluster());
        assert_eq!(config.stream_key("a.b"), "wt:{a.b}");
        assert_eq!(config.topic_of("wt:{a.b}"), Some("a.b"));
        assert_eq!(config.topic_of("wt:a.b"), None);
        assert_eq!(config.dead_letter_key("dlq", "a.b"), "dlq{a.b}");
        assert!(config.is_dead_letter_key("dlq", "dlq{a.b}"));
        assert!(!config.is_dead_letter_key("dlq", "dlq"));
        assert!(config.backend().is_ok());
        for bad in [
            RedisConfig::cluster(["redis://127.0.0.1:7000/2"]),
            RedisConfig::cluster(["redis://127.0.0.1:7000"]).database(1),
            RedisConfig::cluster(["http://u:hunter2@127.0.0.1:7000"]),
            RedisConfig::cluster(Vec::<String>::new()),
        ] {
            let err = bad.backend().err().expect("a config error");
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let shown = format!("{:?}", RedisConfig::cluster(["redis://:hunter2@h:1"]));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn keys_and_topics() {
        let config = RedisConfig::default().stream_prefix("wt:");
        assert_eq!(config.stream_key("a.b"), "wt:a.b");
        assert_eq!(config.topic_of("wt:a.b"), Some("a.b"));
        assert_eq!(config.topic_of("other"), None);
        assert_eq!(config.topic_of("wt:"), None);
    }
}
