//! The one error type of WatchTower, and the kinds of failure it names.
//!
//! Every transport and layer reports failures as an [`Error`]. Its
//! [`ErrorKind`] says *what* happened; [`Error::is_retryable`] says whether
//! trying again can help. Layers decide by kind, never by parsing text.
//!
//! ```
//! use watchtower::{Error, ErrorKind};
//!
//! let err = Error::new(ErrorKind::Connection, "connection refused");
//! assert!(err.is_retryable());
//! assert_eq!(err.to_string(), "connection failed: connection refused");
//!
//! let err = Error::new(ErrorKind::Rejected, "unknown stream");
//! assert!(!err.is_retryable());
//! ```
//!
//! Errors never carry secrets: transports redact credentials before they
//! build a message, and [`redact_url`] is there for them to do it.

use std::fmt;
use std::time::Duration;

use crate::Event;

/// A boxed error, the currency of tower's own middleware.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure happened.
///
/// Each kind has a default answer to "can a retry help?", see
/// [`ErrorKind::is_retryable`]; an [`Error`] may override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection to the broker or endpoint failed or was lost.
    Connection,
    /// The operation did not finish in time.
    Timeout,
    /// The broker or endpoint refused the event (bad request, unknown
    /// stream, unroutable message, 4xx answer).
    Rejected,
    /// The broker or endpoint asked the caller to slow down (429, 503).
    Throttled,
    /// The endpoint is gone for good (HTTP 410) and has been disabled.
    Gone,
    /// The event could not be encoded for the wire.
    Encode,
    /// A message could not be decoded into an event.
    Decode,
    /// The event breaks the CloudEvents rules (empty id, bad extension name).
    InvalidEvent,
    /// A topic or topic pattern is malformed.
    InvalidTopic,
    /// Configuration is invalid; found at construction, not at run time.
    Config,
    /// A circuit breaker is open and refused the call.
    CircuitOpen,
    /// A service is at capacity and refused the call.
    Overloaded,
    /// A bounded queue dropped the event (backpressure).
    Dropped,
    /// A consumer's handler failed (or panicked) on the event.
    Handler,
    /// The transport or subscription is closed.
    Closed,
    /// The event was sent to a dead-letter service (the caller's event is
    /// safe, but was not delivered).
    DeadLettered,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Whether a failure of this kind can go away on its own, so that
    /// retrying the same event may succeed.
    ///
    /// `Connection`, `Timeout`, `Throttled`, `CircuitOpen`, `Overloaded` and
    /// `Handler` are retryable; the rest are not.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::Throttled
                | ErrorKind::CircuitOpen
                | ErrorKind::Overloaded
                | ErrorKind::Handler
        )
    }

    /// A short lowercase name, stable across versions (used in dead-letter
    /// annotations and metrics labels).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Gone => "gone",
            ErrorKind::Encode => "encode",
            ErrorKind::Decode => "decode",
            ErrorKind::InvalidEvent => "invalid_event",
            ErrorKind::InvalidTopic => "invalid_topic",
            ErrorKind::Config => "config",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Dropped => "dropped",
            ErrorKind::Handler => "handler",
            ErrorKind::Closed => "closed",
            ErrorKind::DeadLettered => "dead_lettered",
            ErrorKind::Other => "other",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Gone => "endpoint gone",
            ErrorKind::Encode => "encode failed",
            ErrorKind::Decode => "decode failed",
            ErrorKind::InvalidEvent => "invalid event",
            ErrorKind::InvalidTopic => "invalid topic",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::CircuitOpen => "circuit breaker is open",
            ErrorKind::Overloaded => "service overloaded",
            ErrorKind::Dropped => "event dropped",
            ErrorKind::Handler => "handler failed",
            ErrorKind::Closed => "closed",
            ErrorKind::DeadLettered => "event dead-lettered",
            ErrorKind::Other => "error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A WatchTower failure: a kind, a message, and optionally its cause, a
/// retry-after hint and the event it concerns.
///
/// The message and the cause are written by WatchTower code, which redacts
/// credentials; `Display` and `Debug` show nothing else.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Box<str>,
    retryable: Option<bool>,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
    event: Option<Event>,
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<Box<str>>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                retryable: None,
                retry_after: None,
                source: None,
                event: None,
            }),
        }
    }

    /// A new error of `kind` caused by `source`; the message is the
    /// source's `Display`.
    pub fn from_source(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        let message = source.to_string();
        Error::new(kind, message).with_source(source)
    }

    /// Attaches the underlying cause, shown by [`std::error::Error::source`].
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Overrides whether a retry can help, whatever the kind says.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.inner.retryable = Some(retryable);
        self
    }

    /// Attaches a hint of when a retry may succeed (HTTP `Retry-After`, a
    /// broker's back-off). A retry layer waits at least this long.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.inner.retry_after = Some(after);
        self
    }

    /// Attaches the event the failure concerns, so that a layer above can
    /// keep it (the backpressure layer hands dropped events back this way).
    pub fn with_event(mut self, event: Event) -> Self {
        self.inner.event = Some(event);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message, without the kind's prefix.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// Whether retrying the same event can help.
    pub fn is_retryable(&self) -> bool {
        self.inner
            .retryable
            .unwrap_or_else(|| self.inner.kind.is_retryable())
    }

    /// When a retry may succeed, if the failing side said so.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// The event this failure concerns, if one was attached.
    pub fn event(&self) -> Option<&Event> {
        self.inner.event.as_ref()
    }

    /// Takes the attached event out of the error.
    pub fn take_event(&mut self) -> Option<Event> {
        self.inner.event.take()
    }

    /// Converts any boxed error into an [`Error`], recognising WatchTower's
    /// own errors and tower's `Elapsed` (timeout), `Overloaded` (load-shed)
    /// and `Closed` (buffer), so that tower middleware can sit in a
    /// WatchTower stack.
    ///
    /// A WatchTower error wrapped by other middleware (tower's `Buffer`
    /// wraps readiness failures) keeps its kind, retryability and
    /// retry-after hint; the wrapper stays as the source.
    pub fn from_boxed(err: BoxError) -> Self {
        let err = match err.downcast::<Error>() {
            Ok(err) => return *err,
            Err(err) => err,
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = err.source();
        while let Some(inner) = cause {
            if let Some(ours) = inner.downcast_ref::<Error>() {
                let mut wrapped =
                    Error::new(ours.kind(), err.to_string()).with_retryable(ours.is_retryable());
                wrapped.inner.retry_after = ours.retry_after();
                return wrapped.with_source(err);
            }
            cause = inner.source();
        }
        let kind = if err.is::<tower::timeout::error::Elapsed>() {
            ErrorKind::Timeout
        } else if err.is::<tower::load_shed::error::Overloaded>() {
            ErrorKind::Overloaded
        } else if err.is::<tower::buffer::error::Closed>() {
            ErrorKind::Closed
        } else {
            ErrorKind::Other
        };
        Error::from_source(kind, err)
    }

    /// Shorthand for an [`ErrorKind::Config`] error.
    pub fn config(message: impl Into<Box<str>>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// Shorthand for an [`ErrorKind::Decode`] error.
    pub fn decode(message: impl Into<Box<str>>) -> Self {
        Error::new(ErrorKind::Decode, message)
    }

    /// Shorthand for an [`ErrorKind::Closed`] error.
    pub fn closed(message: impl Into<Box<str>>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inner.message.is_empty() {
            f.write_str(self.inner.kind.describe())
        } else {
            write!(f, "{}: {}", self.inner.kind.describe(), self.inner.message)
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message)
            .field("retryable", &self.is_retryable());
        if let Some(after) = self.inner.retry_after {
            d.field("retry_after", &after);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", &format_args!("{source}"));
        }
        if let Some(event) = &self.inner.event {
            d.field("event_id", &event.id());
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<BoxError> for Error {
    fn from(err: BoxError) -> Self {
        Error::from_boxed(err)
    }
}

impl From<std::convert::Infallible> for Error {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// Removes the password (and any user-info) from a URL-like string, for
/// error messages and logs: `redis://user:secret@host:6379/0` becomes
/// `redis://***@host:6379/0`. Query strings are dropped, since tokens often
/// live there.
///
/// ```
/// assert_eq!(
///     watchtower::error::redact_url("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"),
///     "amqp://***@127.0.0.1:5672/%2f"
/// );
/// assert_eq!(watchtower::error::redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = match without_query.find("://") {
        Some(i) => (&without_query[..i + 3], &without_query[i + 3..]),
        None => ("", without_query),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => format!("{scheme}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_say_whether_retry_helps() {
        assert!(Error::new(ErrorKind::Timeout, "").is_retryable());
        assert!(!Error::new(ErrorKind::Decode, "x").is_retryable());
        assert!(
            Error::new(ErrorKind::Rejected, "x")
                .with_retryable(true)
                .is_retryable()
        );
    }

    #[test]
    fn boxed_tower_errors_keep_their_kind() {
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(Error::from(elapsed).kind(), ErrorKind::Timeout);
        let shed: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(Error::from(shed).kind(), ErrorKind::Overloaded);
        let ours: BoxError = Box::new(Error::new(ErrorKind::Gone, "410"));
        let back = Error::from(ours);
        assert_eq!(back.kind(), ErrorKind::Gone);
        assert_eq!(back.message(), "410");
    }

    #[tokio::test]
    async fn errors_wrapped_by_tower_buffer_keep_their_kind() {
        use tower::{Service, ServiceExt};
        struct Down;
        impl Service<Event> for Down {
            type Response = ();
            type Error = Error;
            type Future = std::future::Ready<Result<(), Error>>;
            fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Error>> {
                std::task::Poll::Ready(Err(Error::new(ErrorKind::Connection, "broker unreachable")
                    .with_retry_after(std::time::Duration::from_secs(2))))
            }
            fn call(&mut self, _: Event) -> Self::Future {
                std::future::ready(Ok(()))
            }
        }
        let mut buffered = tower::buffer::Buffer::new(Down, 4);
        let err = match buffered.ready().await {
            Err(e) => e,
            Ok(svc) => svc.call(Event::empty("t")).await.unwrap_err(),
        };
        let err = Error::from_boxed(err);
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(std::time::Duration::from_secs(2)));
    }

    #[test]
    fn redaction_hides_userinfo_and_query() {
        assert_eq!(
            redact_url("rediss://:hunter2@example:6380/1"),
            "rediss://***@example:6380/1"
        );
        assert_eq!(redact_url("http://h/p?token=abc"), "http://h/p");
        assert_eq!(redact_url("host:1@x"), "***@x");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn error_is_small() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }
}
