//! Connection settings shared by the publisher and the subscriber.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use watchtower::Error;
use watchtower::backoff::Backoff;
use watchtower::redact_url;

use crate::error::from_redis;

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
#[derive(Clone)]
pub struct RedisConfig {
    url: String,
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
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
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

    /// The stream key of `topic`.
    pub fn stream_key(&self, topic: &str) -> String {
        format!("{}{topic}", self.stream_prefix)
    }

    /// The topic of a stream key, if the key has the prefix.
    pub(crate) fn topic_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&*self.stream_prefix).filter(|t| !t.is_empty())
    }

    /// How long to wait for a connection, and for a reply.
    pub(crate) fn timeouts(&self) -> (Duration, Duration) {
        (self.connection_timeout, self.response_timeout)
    }

    /// The prefix of every stream key.
    pub(crate) fn prefix(&self) -> &Arc<str> {
        &self.stream_prefix
    }

    /// The URL without credentials, for messages.
    pub(crate) fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the settings and builds the client.
    pub(crate) fn client(&self) -> Result<Client, Error> {
        let shown = self.redacted_url();
        if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
            return Err(Error::config(format!(
                "Redis URL {shown:?} must start with redis:// or rediss://"
            )));
        }
        let info: ConnectionInfo = self
            .url
            .as_str()
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
        if self.database.is_some_and(|db| db < 0) {
            return Err(Error::config("the Redis database number must not be negative"));
        }
        if self.response_timeout.is_zero() || self.connection_timeout.is_zero() {
            return Err(Error::config("Redis timeouts must be greater than zero"));
        }
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

    /// A reconnecting multiplexed connection with these settings; a
    /// `response_timeout` of `extra` more than configured.
    pub(crate) async fn connect(&self, client: &Client, extra: Duration) -> Result<ConnectionManager, Error> {
        // The `redis` crate runs the reconnect loop of a multiplexed
        // connection; it waits within the bounds of this backoff.
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout + extra))
            .set_connection_timeout(Some(self.connection_timeout))
            .set_number_of_retries(self.reconnect_retries)
            .set_min_delay(backoff.initial())
            .set_max_delay(backoff.max())
            .set_pipeline_buffer_size(self.pipeline_buffer);
        client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| from_redis(e, &format!("connecting to {}", self.redacted_url())))
    }
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
    fn keys_and_topics() {
        let config = RedisConfig::default().stream_prefix("wt:");
        assert_eq!(config.stream_key("a.b"), "wt:a.b");
        assert_eq!(config.topic_of("wt:a.b"), Some("a.b"));
        assert_eq!(config.topic_of("other"), None);
        assert_eq!(config.topic_of("wt:"), None);
    }
}
