//! A verified request's body decoded into an event.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use watchtower::codec::{self, Binding};
use watchtower::{Error, Event};

use super::{Verified, VerifyError, VerifyErrorKind};

/// Decodes the event of a verified request with the default policy:
/// structured JSON or a plain webhook; binary mode is refused (see the
/// [receiver docs](crate::WebhookReceiverLayer) and [`WebhookVerifier::decode`](crate::WebhookVerifier::decode)).
///
/// # Errors
///
/// As [`WebhookVerifier::decode`](crate::WebhookVerifier::decode).
pub fn decode_event(headers: &HeaderMap, body: Bytes, verified: &Verified) -> Result<Event, VerifyError> {
    decode_with(headers, body, verified, false)
}

pub(super) fn decode_with(
    headers: &HeaderMap,
    body: Bytes,
    verified: &Verified,
    binary: bool,
) -> Result<Event, VerifyError> {
    let invalid = |e: Error| VerifyError::new(VerifyErrorKind::InvalidEvent, e.to_string());
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type.is_some_and(codec::is_structured) {
        return codec::structured::from_bytes(&body).map_err(invalid);
    }
    if headers.contains_key("ce-specversion") {
        if !binary {
            return Err(VerifyError::new(
                VerifyErrorKind::BinaryMode,
                "CloudEvents binary mode is not accepted: its ce- headers are not signed; \
                 send structured mode",
            ));
        }
        if headers.get("ce-id").map(HeaderValue::as_bytes) != Some(verified.id.as_bytes()) {
            return Err(VerifyError::new(
                VerifyErrorKind::IdMismatch,
                "ce-id is not the signed webhook-id",
            ));
        }
        let pairs = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()));
        return Binding::HTTP.decode(pairs, Some(body)).map_err(invalid);
    }
    let content_type = content_type.unwrap_or("application/octet-stream").to_owned();
    let ty = plain_type(&content_type, &body).unwrap_or_else(|| "webhook".to_owned());
    let mut event = Event::binary(ty, content_type, body);
    event.set_id(verified.id.as_str());
    event.set_source("/webhook");
    event.set_time(time::OffsetDateTime::from_unix_timestamp(verified.timestamp).ok());
    event.validate().map_err(invalid)?;
    Ok(event)
}

/// The `type` of a Standard Webhooks JSON payload, `{"type": "...", ...}`.
pub(super) fn plain_type(content_type: &str, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        r#type: Option<String>,
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !(essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")) {
        return None;
    }
    serde_json::from_slice::<Typed>(body)
        .ok()?
        .r#type
        .filter(|t| !t.is_empty())
}
