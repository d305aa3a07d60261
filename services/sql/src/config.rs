//! The configuration: [`SqlConfig`].

use std::fmt;
use std::time::Duration;

use watchtower::{Error, redact_url};

/// The longest table prefix: PostgreSQL identifiers hold 63 bytes, and the
/// longest name made from the prefix adds 15 (`_leases_seq_idx`).
const MAX_PREFIX_LEN: usize = 48;

/// Which database a client, or a connection given to
/// [`SqlPublisher::publish_in`](crate::SqlPublisher::publish_in), is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// Where the database is and how the transport uses it: plain data,
/// checked once by [`SqlClient::connect`](crate::SqlClient::connect).
///
/// [`SqlConfig::default`] is a SQLite file `watchtower.db` in the working
/// directory, the embedded default.
///
/// ```
/// use std::time::Duration;
/// use watchtower_sql::SqlConfig;
///
/// let config = SqlConfig::new("postgres://app:s3cret@db.example/orders")
///     .table_prefix("outbox_")
///     .poll_interval(Duration::from_millis(200))
///     .visibility_timeout(Duration::from_secs(60));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.events_table(), "outbox_events");
/// ```
#[derive(Clone)]
pub struct SqlConfig {
    pub(crate) url: String,
    pub(crate) prefix: String,
    pub(crate) poll_interval: Duration,
    pub(crate) visibility_timeout: Duration,
    pub(crate) batch_size: usize,
    pub(crate) publish_batch: usize,
    pub(crate) publish_queue: usize,
    pub(crate) retention: Duration,
    pub(crate) cleanup_interval: Duration,
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) create_schema: bool,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig::new("sqlite://watchtower.db")
    }
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("table_prefix", &self.prefix)
            .field("poll_interval", &self.poll_interval)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("batch_size", &self.batch_size)
            .field("publish_batch", &self.publish_batch)
            .field("publish_queue", &self.publish_queue)
            .field("retention", &self.retention)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("create_schema", &self.create_schema)
            .finish()
    }
}

impl SqlConfig {
    /// Connects to `url`: `postgres://user[:password]@host[:port]/database`
    /// (or `postgresql://`), or `sqlite://path/to/file.db` (the file is
    /// created if missing; `sqlite:///abs/path.db` for an absolute path).
    /// The URL is checked by [`SqlClient::connect`](crate::SqlClient::connect).
    pub fn new(url: impl Into<String>) -> SqlConfig {
        SqlConfig {
            url: url.into(),
            prefix: "watchtower_".to_owned(),
            poll_interval: Duration::from_millis(500),
            visibility_timeout: Duration::from_secs(30),
            batch_size: 64,
            publish_batch: 1000,
            publish_queue: 4096,
            retention: Duration::ZERO,
            cleanup_interval: Duration::from_secs(60),
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            create_schema: true,
        }
    }

    /// The prefix of the transport's table names: `<prefix>events`,
    /// `<prefix>groups`, `<prefix>leases`, `<prefix>dead_letters`. Default
    /// `watchtower_`. Lowercase ASCII letters, digits and `_`, starting with
    /// a letter or `_`, at most 48 bytes: it is spliced into SQL, so it is
    /// checked by [`SqlClient::connect`](crate::SqlClient::connect).
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How often a subscription looks for new events when nothing woke it.
    /// Default 500 ms. Subscriptions are woken at once by publishers of the
    /// same client, and on PostgreSQL by `LISTEN/NOTIFY` from any process;
    /// polling is the fallback (and the only way a SQLite subscription
    /// learns of another process's events).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a delivered event stays invisible to the other members of
    /// its group before it is delivered again, unless it is settled first
    /// (or its handler reports [progress](watchtower::Delivery::progress)).
    /// Default 30 s, JetStream's `AckWait` default. A delivery dropped
    /// unsettled is made visible again at once.
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// How many events a subscription claims in one transaction, at most.
    /// Default 64: enough to amortise the round trip, few enough that
    /// members of a group share a burst.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// How many concurrent publish calls go into one multi-row `INSERT`, at
    /// most. Default 1000 (SQLite takes at most 32,766 bound values, three
    /// per row).
    pub fn publish_batch(mut self, n: usize) -> Self {
        self.publish_batch = n;
        self
    }

    /// How many publish calls may wait for their `INSERT`, across the
    /// client's publishers, before `poll_ready` waits. Default 4096.
    pub fn publish_queue(mut self, n: usize) -> Self {
        self.publish_queue = n;
        self
    }

    /// How long an event every group has settled is kept before clean-up
    /// deletes it (for replaying subscriptions and for inspection).
    /// Default 0: deleted at the next clean-up. Events some group has not
    /// settled are never deleted.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How often subscriptions run the clean-up of settled events and of
    /// forgotten subscriptions. Default 60 s. [`SqlClient::cleanup`](crate::SqlClient::cleanup)
    /// runs it on demand.
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// The most connections the client's pool opens. Default 10; a
    /// PostgreSQL client with subscribers opens one more, to `LISTEN`.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How long connecting, or waiting for a pooled connection, may take.
    /// Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the transport's own work may take, per batch: a publish
    /// batch's `INSERT`, a claim, a batch of acknowledgements. Default
    /// 30 s. Past it the callers get [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout)
    /// (a publish may then have been stored all the same) and the
    /// connection is dropped, so that a database that stopped answering
    /// does not hold callers forever. Not applied to
    /// [`publish_in`](crate::SqlPublisher::publish_in), which runs in the
    /// caller's transaction.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether [`SqlClient::connect`](crate::SqlClient::connect) creates
    /// the tables (idempotent `CREATE ... IF NOT EXISTS`). Default `true`;
    /// turn it off where the application's own migrations create them
    /// ([`SqlClient::schema`](crate::SqlClient::schema) prints the DDL).
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// The events table's name.
    pub fn events_table(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The URL without credentials, for messages.
    pub(crate) fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks every setting; says which database the URL names.
    pub(crate) fn validate(&self) -> Result<Backend, Error> {
        validate_prefix(&self.prefix)?;
        let backend = if self.url.starts_with("postgres://") || self.url.starts_with("postgresql://") {
            Backend::Postgres
        } else if self.url.starts_with("sqlite:") {
            if self.url.contains(":memory:") || self.url.contains("mode=memory") {
                return Err(Error::config(
                    "an in-memory SQLite database is not shared between connections: use a file",
                ));
            }
            Backend::Sqlite
        } else {
            return Err(Error::config(format!(
                "SQL URL {:?} must start with postgres://, postgresql:// or sqlite://",
                self.redacted_url()
            )));
        };
        for (name, d) in [
            ("poll_interval", self.poll_interval),
            ("visibility_timeout", self.visibility_timeout),
            ("cleanup_interval", self.cleanup_interval),
            ("connect_timeout", self.connect_timeout),
            ("statement_timeout", self.statement_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::config(format!(
                    "SqlConfig::{name} must be greater than zero"
                )));
            }
        }
        if self.batch_size == 0 || self.publish_queue == 0 || self.max_connections == 0 {
            return Err(Error::config(
                "SqlConfig batch_size, publish_queue and max_connections must be greater than zero",
            ));
        }
        if self.publish_batch == 0 || self.publish_batch > 10_000 {
            return Err(Error::config("SqlConfig::publish_batch must be within 1..=10000"));
        }
        Ok(backend)
    }
}

/// Checks a table prefix: it is spliced into SQL.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let mut bytes = prefix.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !first_ok
        || prefix.len() > MAX_PREFIX_LEN
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::config(format!(
            "table prefix {:?} must be 1 to {MAX_PREFIX_LEN} lowercase ASCII letters, digits or '_', \
             not starting with a digit",
            prefix.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use watchtower::ErrorKind;

    #[test]
    fn prefixes_are_identifiers() {
        for ok in ["watchtower_", "a", "_x1", "outbox_v2_"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_PREFIX_LEN + 1);
        for bad in [
            "",
            "1abc",
            "Upper",
            "a-b",
            "a;drop table x",
            "a b",
            "é",
            long.as_str(),
        ] {
            assert_eq!(
                validate_prefix(bad).unwrap_err().kind(),
                ErrorKind::Config,
                "{bad}"
            );
        }
    }

    #[test]
    fn urls_and_settings_are_checked_without_secrets() {
        assert_eq!(
            SqlConfig::new("postgres://u:p@h/db").validate().unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            SqlConfig::new("sqlite://x.db").validate().unwrap(),
            Backend::Sqlite
        );
        for url in [
            "mysql://u:hunter2@h/db",
            "",
            "http://u:hunter2@h",
            "sqlite::memory:",
        ] {
            let err = SqlConfig::new(url).validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let base = || SqlConfig::new("sqlite://x.db");
        for bad in [
            base().poll_interval(Duration::ZERO),
            base().visibility_timeout(Duration::ZERO),
            base().batch_size(0),
            base().publish_batch(0),
            base().publish_batch(10_001),
            base().max_connections(0),
            base().table_prefix("bad-prefix"),
        ] {
            assert_eq!(bad.validate().unwrap_err().kind(), ErrorKind::Config, "{bad:?}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", SqlConfig::new("postgres://app:hunter2@db/x"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
