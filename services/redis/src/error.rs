//! Mapping `redis` crate errors to WatchTower's error kinds, and the
//! transport's own error conditions.

use std::fmt;
use std::sync::Arc;

use redis::{RedisError, RetryMethod};
use watchtower::{Error, ErrorKind};

/// Fewer replicas than asked acknowledged an `XADD` within the timeout of
/// [`wait_for_replicas`](crate::RedisPublisherOptions::wait_for_replicas):
/// the event is stored on the master (as `entry_id`) but may be lost if
/// the master fails before a replica has it.
///
/// It is the [source](std::error::Error::source) of the caller's
/// [`ErrorKind::Timeout`] error:
///
/// ```
/// use watchtower_redis::ReplicasNotAcknowledged;
///
/// fn replicas_missing(error: &watchtower::Error) -> Option<&ReplicasNotAcknowledged> {
///     std::error::Error::source(error)?.downcast_ref()
/// }
/// # assert!(replicas_missing(&watchtower::Error::closed("x")).is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicasNotAcknowledged {
    /// The stream the event was stored in.
    pub stream: Arc<str>,
    /// Its entry id on the master.
    pub entry_id: Arc<str>,
    /// How many replicas acknowledged it within the timeout.
    pub acknowledged: u32,
    /// How many were asked for.
    pub wanted: u32,
}

impl fmt::Display for ReplicasNotAcknowledged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} replicas acknowledged entry {} of {:?} in time",
            self.acknowledged, self.wanted, self.entry_id, self.stream
        )
    }
}

impl std::error::Error for ReplicasNotAcknowledged {}

impl ReplicasNotAcknowledged {
    /// The caller's error: a retryable [`ErrorKind::Timeout`] with this
    /// as its source.
    pub(crate) fn into_error(self) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!("XADD stored but not replicated: {self}"),
        )
        .with_retryable(true)
        .with_source(self)
    }
}

/// Converts a `redis` error into an [`Error`] of the matching kind, with
/// `context` (which must not hold credentials) before the client's text.
pub(crate) fn from_redis(err: RedisError, context: &str) -> Error {
    let kind = kind_of(&err);
    // The client's messages name commands, keys and server replies, never
    // the password: `AUTH` failures read "WRONGPASS invalid username-password pair".
    Error::new(kind, format!("{context}: {err}"))
}

pub(crate) fn kind_of(err: &RedisError) -> ErrorKind {
    if err.is_timeout() {
        return ErrorKind::Timeout;
    }
    if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
        return ErrorKind::Connection;
    }
    match err.kind() {
        redis::ErrorKind::AuthenticationFailed => ErrorKind::Rejected,
        redis::ErrorKind::InvalidClientConfig => ErrorKind::Config,
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => ErrorKind::Decode,
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension => match err.retry_method() {
            RetryMethod::WaitAndRetry | RetryMethod::RetryImmediately => ErrorKind::Throttled,
            RetryMethod::Reconnect | RetryMethod::ReconnectFromInitialConnections => ErrorKind::Connection,
            _ => ErrorKind::Rejected,
        },
        _ => match err.retry_method() {
            RetryMethod::Reconnect | RetryMethod::ReconnectFromInitialConnections => ErrorKind::Connection,
            _ => ErrorKind::Other,
        },
    }
}

/// Whether a server error says a consumer group (or its stream) is gone,
/// as after a restart of a Redis without persistence.
pub(crate) fn is_no_group(err: &RedisError) -> bool {
    err.code() == Some("NOGROUP")
}

/// Whether a server error says the group already exists.
pub(crate) fn is_busy_group(err: &RedisError) -> bool {
    err.code() == Some("BUSYGROUP")
}
