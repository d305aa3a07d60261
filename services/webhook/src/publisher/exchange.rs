//! One HTTP exchange: the event encoded and signed, the POST, and the
//! answer turned into a receipt or a typed error.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use watchtower::codec::{self, Binding};
use watchtower::{Error, ErrorKind, Event, Receipt};

use super::client::Shared;
use crate::signature;
use crate::{ContentMode, ENDPOINT_EXTENSION, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

fn header_value(shared: &Shared, what: &str, value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value).map_err(|_| {
        shared.error(
            ErrorKind::InvalidEvent,
            format_args!("{what} is not a valid HTTP header value"),
        )
    })
}

/// The request body and the headers that describe it.
fn encode(shared: &Shared, event: &Event) -> Result<(Bytes, HeaderMap), Error> {
    let mut headers = HeaderMap::new();
    let body = match shared.mode {
        ContentMode::Structured => {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(codec::CLOUDEVENTS_JSON),
            );
            codec::structured::to_bytes(event)?
        }
        ContentMode::Binary => {
            let mut failed = None;
            Binding::HTTP.write_headers(event, |name, value| {
                match (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    (Ok(name), Ok(value)) => {
                        headers.insert(name, value);
                    }
                    _ => failed = Some(name.to_owned()),
                }
            });
            if let Some(name) = failed {
                return Err(shared.error(
                    ErrorKind::Encode,
                    format_args!("attribute header {name:?} cannot be sent over HTTP"),
                ));
            }
            event.data().cloned().unwrap_or_default()
        }
    };
    Ok((body, headers))
}

pub(crate) async fn deliver(shared: Arc<Shared>, event: Event) -> Result<Receipt, Error> {
    if let Some(reason) = shared.disabled() {
        return Err(shared.error(ErrorKind::Gone, format_args!("disabled: {reason}")));
    }
    watchtower::delay::refuse(&event, "webhook")?;
    let wire = if event.extension(ENDPOINT_EXTENSION).is_some() {
        let mut wire = event.clone();
        wire.remove_extension(ENDPOINT_EXTENSION);
        wire
    } else {
        event.clone()
    };
    let (body, mut headers) = encode(&shared, &wire)?;
    if body.len() > shared.max_payload {
        return Err(shared
            .error(
                ErrorKind::Rejected,
                format_args!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    body.len(),
                    shared.max_payload
                ),
            )
            .with_retryable(false));
    }
    let timestamp = crate::unix_now();
    let signature = shared
        .keys
        .with_live(|keys| signature::sign_with(keys, wire.id(), timestamp, &body));
    headers.insert(WEBHOOK_ID, header_value(&shared, "the event id", wire.id())?);
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    headers.insert(
        WEBHOOK_SIGNATURE,
        header_value(&shared, "the signature", &signature)?,
    );

    let sent = shared
        .client
        .post(shared.url.clone())
        .headers(headers)
        .body(body)
        .send()
        .await;
    let result = match sent {
        Ok(response) => classify(&shared, response, &event).await,
        Err(err) => Err(shared.transport_error(err)),
    };
    shared.track(result.is_ok());
    result
}

async fn classify(shared: &Shared, mut response: reqwest::Response, event: &Event) -> Result<Receipt, Error> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(parse_retry_after)
        .map(|after| after.min(shared.max_retry_after));
    let body = read_bounded(&mut response, shared.max_response_body).await;
    if status.is_success() {
        return Ok(Receipt::new(shared.name.clone(), event));
    }
    let answered = Answer { status, body: &body };
    let err = match status.as_u16() {
        300..=399 => shared
            .error(
                ErrorKind::Rejected,
                format_args!("{answered} (redirects are not followed)"),
            )
            .with_retryable(false),
        410 => {
            let reason: Arc<str> = Arc::from(format!("answered {status}"));
            shared.disable(reason);
            tracing::warn!(endpoint = %shared.name, "webhook endpoint answered 410 Gone and is disabled");
            shared.error(ErrorKind::Gone, format_args!("{answered}; endpoint disabled"))
        }
        429 | 502 | 503 | 504 => {
            let err = shared.error(ErrorKind::Throttled, answered);
            match retry_after {
                Some(after) => err.with_retry_after(after),
                None => err,
            }
        }
        409 => shared
            .error(
                ErrorKind::Rejected,
                format_args!("{answered} (the endpoint already holds this webhook-id)"),
            )
            .with_retryable(false),
        400..=499 => shared.error(ErrorKind::Rejected, answered).with_retryable(false),
        // The endpoint failed, not the event: `Other` (retryable) counts
        // against a circuit breaker, where `Rejected` would not.
        500..=599 => shared.error(ErrorKind::Other, answered).with_retryable(true),
        _ => shared.error(ErrorKind::Other, answered),
    };
    Err(err)
}

/// "answered 404 Not Found: <start of the body>", for error messages.
struct Answer<'a> {
    status: StatusCode,
    body: &'a [u8],
}

impl fmt::Display for Answer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "answered {}", self.status)?;
        let text: String = String::from_utf8_lossy(self.body)
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        if !text.trim().is_empty() {
            write!(f, ": {}", text.trim())?;
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes of the body; the answer is the status, so a
/// body that fails to arrive changes nothing.
async fn read_bounded(response: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// `Retry-After` as delay-seconds (digits only; a number past `u64::MAX`
/// saturates to it) or an HTTP date (a past date is zero). `None` for
/// anything else. Never panics; cap the result before adding it to an
/// instant, as the sender does with
/// [`max_retry_after`](crate::WebhookConfig::max_retry_after).
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    parse_retry_after_bytes(value.as_bytes())
}

/// [`parse_retry_after`] of raw header bytes.
#[doc(hidden)]
pub fn parse_retry_after_bytes(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("7")),
            Some(Duration::from_secs(7))
        );
        let later = SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        let parsed = parse_retry_after(&HeaderValue::from_str(&date).unwrap()).unwrap();
        assert!(
            parsed <= Duration::from_secs(120) && parsed >= Duration::from_secs(100),
            "{parsed:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&past).unwrap()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn retry_after_saturates_and_refuses_what_is_not_a_number_or_date() {
        let max = Some(Duration::from_secs(u64::MAX));
        for (text, expect) in [
            ("18446744073709551615", max),
            ("18446744073709551616", max),
            ("99999999999999999999999999999999999999", max),
            ("0", Some(Duration::ZERO)),
            (" 12 ", Some(Duration::from_secs(12))),
            ("-1", None),
            ("+5", None),
            ("1.5", None),
            ("", None),
            ("Fri, 31 Dec 9999 23:59:59 GMT", None),
        ] {
            let got = parse_retry_after_bytes(text.as_bytes());
            if text.starts_with("Fri") {
                assert!(got.is_some_and(|d| d > Duration::from_secs(200 * 365 * 86_400)));
            } else {
                assert_eq!(got, expect, "{text:?}");
            }
        }
        assert_eq!(parse_retry_after_bytes(&[0xff, b'1']), None);
    }
}
