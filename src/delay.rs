//! Delayed delivery: an event that must not be delivered before a time.
//!
//! The time travels with the event, in the [`deliverat`](crate::ext::DELIVER_AT)
//! extension (RFC 3339), so any publisher stack — layers, retries, a
//! dead-letter redrive — carries it unchanged. [`set_delay`] and
//! [`set_deliver_at`] write it; a transport that can hold an event back
//! honours it and removes it before delivery; every other transport
//! refuses the event with [`ErrorKind::Unsupported`] rather than deliver it
//! early ([`refuse`]).
//!
//! | transport | delayed delivery |
//! |---|---|
//! | memory | yes, held in the broker's process (lost with it, like everything the memory broker holds) |
//! | Redis | yes, in a sorted set beside the stream (on its slot on a Redis Cluster), moved into the stream by the publishers' own task when due |
//! | RabbitMQ | yes, in durable per-delay TTL queues on the broker that dead-letter into the exchange when due (no plugin; the delay rounded up by at most 1/16) |
//! | NATS, JetStream, WebSocket, webhook | refused with [`ErrorKind::Unsupported`] |
//!
//! A time in the past, or now, means "deliver at once".
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use watchtower::{delay, Event};
//!
//! let mut reminder = Event::new("invoice.reminder", serde_json::json!({"invoice": 7}));
//! delay::set_delay(&mut reminder, Duration::from_secs(3600));
//! assert!(delay::deliver_at(&reminder)?.is_some());
//! # Ok::<(), watchtower::Error>(())
//! ```

use std::time::Duration;

use time::OffsetDateTime;

use crate::error::{Error, ErrorKind};
use crate::event::{Event, ext};

/// Asks for `event` to be delivered no earlier than `at`.
pub fn set_deliver_at(event: &mut Event, at: OffsetDateTime) {
    event.insert_extension(ext::DELIVER_AT, crate::codec::format_time(at).into());
}

/// Asks for `event` to be delivered no earlier than `delay` from now
/// (saturating at the largest time the calendar holds).
pub fn set_delay(event: &mut Event, delay: Duration) {
    let now = OffsetDateTime::now_utc();
    let at = time::Duration::try_from(delay)
        .ok()
        .and_then(|d| now.checked_add(d))
        .unwrap_or_else(|| time::PrimitiveDateTime::MAX.assume_utc());
    set_deliver_at(event, at);
}

/// The time `event` must not be delivered before, if it has one.
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] if the extension is not an RFC 3339 time.
pub fn deliver_at(event: &Event) -> Result<Option<OffsetDateTime>, Error> {
    match event.extension(ext::DELIVER_AT) {
        None => Ok(None),
        Some(value) => crate::codec::parse_time(value).map(Some).map_err(|_| {
            Error::new(
                ErrorKind::InvalidEvent,
                format!("`{}` {value:?} is not an RFC 3339 time", ext::DELIVER_AT),
            )
        }),
    }
}

/// How long `event` must still wait: `None` if it has no delivery time or
/// the time has come.
///
/// # Errors
///
/// As [`deliver_at`].
pub fn remaining(event: &Event) -> Result<Option<Duration>, Error> {
    let Some(at) = deliver_at(event)? else {
        return Ok(None);
    };
    let left = at - OffsetDateTime::now_utc();
    Ok(left
        .is_positive()
        .then(|| Duration::try_from(left).unwrap_or(Duration::MAX)))
}

/// For transports that cannot delay: refuses an event that asks for a
/// delivery time, naming the transport.
///
/// # Errors
///
/// [`ErrorKind::Unsupported`] (not retryable) with the event attached, if
/// the event has a delivery time.
pub fn refuse(event: &Event, system: &str) -> Result<(), Error> {
    if event.extension(ext::DELIVER_AT).is_none() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "the {system} transport cannot delay delivery; event `{}` asks for `{}`",
            event.id(),
            ext::DELIVER_AT
        ),
    )
    .with_event(event.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_becomes_a_time_that_reads_back() {
        let mut event = Event::new("t", serde_json::json!({}));
        assert_eq!(remaining(&event).unwrap(), None);
        set_delay(&mut event, Duration::from_secs(60));
        let left = remaining(&event).unwrap().unwrap();
        assert!(left <= Duration::from_secs(60));
        assert!(left > Duration::ZERO);
        set_delay(&mut event, Duration::MAX);
        assert!(remaining(&event).unwrap().is_some());
        set_deliver_at(&mut event, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(remaining(&event).unwrap(), None);
    }

    #[test]
    fn a_malformed_time_is_an_invalid_event() {
        let event = Event::new("t", serde_json::json!({}))
            .with_extension(ext::DELIVER_AT, "tomorrow")
            .unwrap();
        assert_eq!(deliver_at(&event).unwrap_err().kind(), ErrorKind::InvalidEvent);
    }

    #[test]
    fn refuse_names_the_transport_and_keeps_the_event() {
        let plain = Event::new("t", serde_json::json!({}));
        refuse(&plain, "nats").unwrap();
        let mut delayed = plain.clone();
        set_delay(&mut delayed, Duration::from_secs(1));
        let mut error = refuse(&delayed, "nats").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unsupported);
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("the nats transport cannot delay"));
        assert_eq!(error.take_event().unwrap().id(), delayed.id());
    }
}
