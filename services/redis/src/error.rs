//! Mapping `redis` crate errors to WatchTower's error kinds.

use redis::{RedisError, RetryMethod};
use watchtower::{Error, ErrorKind};

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
