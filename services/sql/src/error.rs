//! `sqlx` errors as [`watchtower::Error`]s.

use watchtower::{Error, ErrorKind};

/// Maps a `sqlx` error to the kind a retry layer can judge, with `what`
/// the transport was doing. `sqlx` messages name no password (they show
/// connection options without it).
pub(crate) fn from_sqlx(e: sqlx::Error, what: &str) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => ErrorKind::Connection,
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => ErrorKind::Closed,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::TypeNotFound { .. } => {
            ErrorKind::Decode
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // PostgreSQL: serialization failure, deadlock, lock not
            // available, connection exceptions, too many connections,
            // shutdown; SQLite: busy, locked.
            Some(
                "40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03" | "5" | "6" | "517"
                | "262",
            ) => ErrorKind::Throttled,
            Some(code) if code.starts_with("08") => ErrorKind::Connection,
            _ => ErrorKind::Rejected,
        },
        _ => ErrorKind::Other,
    };
    let retryable = matches!(
        kind,
        ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Throttled
    );
    Error::new(kind, format!("{what}: {e}")).with_retryable(retryable)
}

/// `work`, failing with [`ErrorKind::Timeout`] after `limit`.
pub(crate) async fn timed<T>(
    limit: std::time::Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(
            Error::new(ErrorKind::Timeout, format!("{what}: no answer within {limit:?}"))
                .with_retryable(true),
        )
    })
}
