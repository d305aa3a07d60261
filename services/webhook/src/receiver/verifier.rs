//! [`WebhookVerifier`]: the receiving side's configuration and the
//! check of one request.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use watchtower::{Error, Event};

use super::claim::{Held, ReplayCache, Seen};
use super::decode::decode_with;
use super::{Claim, Verified, VerifyError, VerifyErrorKind};
use crate::signature::{self, KeyRing, Secret, VerifyKey};
use crate::unix_now;
use crate::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

/// ±5 minutes, the Standard Webhooks recommendation.
const TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// The publisher's default payload limit.
const MAX_BODY: usize = 1024 * 1024;

/// The `webhook-*` headers of a request whose timestamp is within the
/// tolerance; the signature is not checked yet.
pub(super) struct SignedHeaders<'a> {
    pub(super) id: &'a str,
    pub(super) timestamp: i64,
    pub(super) signatures: &'a str,
}

/// Checks requests against one or more keys. See the [receiver docs](crate::WebhookReceiverLayer).
///
/// Cloning is cheap; clones share the keys (a [rotation](Self::rotate)
/// applies to all) and the replay memory.
#[derive(Clone)]
pub struct WebhookVerifier {
    pub(super) keys: Arc<KeyRing<VerifyKey>>,
    pub(super) tolerance: Duration,
    pub(super) max_body: usize,
    pub(super) body_timeout: Duration,
    pub(super) binary_mode: bool,
    pub(super) in_progress_retry_after: Duration,
    pub(super) replay: Option<Arc<ReplayCache>>,
}

impl fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("keys", &self.keys.live_len())
            .field("tolerance", &self.tolerance)
            .field("max_body", &self.max_body)
            .field("body_timeout", &self.body_timeout)
            .field("binary_mode", &self.binary_mode)
            .field("reject_replays", &self.replay.is_some())
            .finish()
    }
}

impl WebhookVerifier {
    /// A verifier accepting signatures by any of `keys`: shared secrets
    /// `whsec_<base64>` (`v1` signatures) and Ed25519 public keys
    /// `whpk_<base64>` (`v1a`), in any mix.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if a key is malformed or there is none.
    pub fn new<I, S>(keys: I) -> Result<WebhookVerifier, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keys = keys
            .into_iter()
            .map(|key| VerifyKey::new(key.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(Error::config("at least one webhook key is required"));
        }
        Ok(WebhookVerifier::from_keys(keys))
    }

    /// A verifier from parsed secrets.
    pub fn from_secrets(secrets: impl Into<Arc<[Secret]>>) -> WebhookVerifier {
        let secrets: Arc<[Secret]> = secrets.into();
        WebhookVerifier::from_keys(secrets.iter().cloned().map(VerifyKey::Symmetric))
    }

    /// A verifier from parsed keys, secrets and public keys alike.
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyKey>) -> WebhookVerifier {
        WebhookVerifier {
            keys: Arc::new(KeyRing::new(keys.into_iter().collect())),
            tolerance: TOLERANCE,
            max_body: MAX_BODY,
            body_timeout: Duration::from_secs(10),
            binary_mode: false,
            in_progress_retry_after: Duration::from_secs(5),
            replay: None,
        }
    }

    /// How far a timestamp may be from now, either way (default ±5
    /// minutes, the Standard Webhooks recommendation: wide enough for clock
    /// skew, narrow enough that a captured request soon stops working).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The largest body accepted (default 1 MiB, the publisher's default
    /// payload limit); a larger one is answered `413`.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Accepts signatures by `key` from now on, and by the keys accepted
    /// until now for `grace` longer, so that requests the sender signed
    /// with the old key (or with both, during its own rotation) keep
    /// passing. Applies to every clone, the one inside a
    /// [`WebhookReceiverLayer`](crate::WebhookReceiverLayer) included. `Duration::ZERO` retires the old
    /// keys at once.
    pub fn rotate(&self, key: impl Into<VerifyKey>, grace: Duration) {
        self.keys.rotate(key.into(), grace);
    }

    /// The largest body accepted.
    pub fn max_body_len(&self) -> usize {
        self.max_body
    }

    /// The time the whole body may take to arrive once the headers passed
    /// (default 10 s: a sender sends its body right after the headers, and
    /// Standard Webhooks senders give up on a request after 15–30 s, so a
    /// body slower than that is a stalled or hostile client holding a
    /// connection). A late body is answered `408 Request Timeout`.
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Accepts CloudEvents binary mode (default: refused with `415`).
    ///
    /// The trade-off: the signature does not cover the `ce-` headers, so
    /// with binary mode accepted, anyone holding one captured request can
    /// replay it within the tolerance with other `ce-type`, `ce-source`,
    /// `ce-subject`, … and the handler sees those forged attributes (only
    /// the data and the id are authenticated). The receiver does require
    /// `ce-id` to equal the signed `webhook-id` (else `401`), so a forged
    /// request is still a replay of the same id. Accept binary mode only
    /// from senders that cannot send structured mode, and let the handler
    /// trust nothing but the id and the data.
    pub fn binary_mode(mut self, accept: bool) -> Self {
        self.binary_mode = accept;
        self
    }

    /// The `Retry-After` sent with the `503` that answers a retry arriving
    /// while the same `webhook-id` is still being handled (default 5 s: a
    /// handler is expected to finish in a few seconds, and a sender that
    /// heeds the header then learns the outcome on its next attempt).
    pub fn in_progress_retry_after(mut self, after: Duration) -> Self {
        self.in_progress_retry_after = after;
        self
    }

    /// Refuses a verified `webhook-id` seen before within the tolerance
    /// window, remembering up to `capacity` ids (the oldest are forgotten
    /// first when full). Ids are keyed by the verified `webhook-id`; see
    /// the [receiver docs](crate::WebhookReceiverLayer) for how in-progress, failed and handled ids
    /// are answered.
    pub fn reject_replays(mut self, capacity: usize) -> Self {
        self.replay = Some(Arc::new(ReplayCache::new(capacity)));
        self
    }

    /// Verifies a request now. With replay memory, the id counts as handled
    /// from here on: call [`forget`](Self::forget) if handling fails, or use
    /// [`claim`](Self::claim) instead, which does it on every path.
    ///
    /// # Errors
    ///
    /// A [`VerifyError`] saying why the request is refused.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify_at(headers, body, unix_now())
    }

    /// Verifies a request as if the time were `now` (Unix seconds).
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify).
    pub fn verify_at(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        let signed = self.signed_headers(headers, now)?;
        self.check_signature(&signed, body)?;
        let claim = self.claim_id(&signed, now)?;
        claim.complete();
        Ok(Verified {
            id: signed.id.to_owned(),
            timestamp: signed.timestamp,
        })
    }

    /// Verifies a request now and, with replay memory, marks its id as in
    /// progress until the returned [`Claim`] is [completed](Claim::complete)
    /// (the id is then handled) or dropped (the id is forgotten, so the
    /// sender's retry is accepted). Without replay memory the claim does
    /// nothing.
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify); [`VerifyErrorKind::InProgress`] while
    /// another claim on the same id is alive.
    pub fn claim(&self, headers: &HeaderMap, body: &[u8]) -> Result<(Verified, Claim), VerifyError> {
        let now = unix_now();
        let signed = self.signed_headers(headers, now)?;
        self.check_signature(&signed, body)?;
        let claim = self.claim_id(&signed, now)?;
        let verified = Verified {
            id: signed.id.to_owned(),
            timestamp: signed.timestamp,
        };
        Ok((verified, claim))
    }

    /// The three `webhook-*` headers, present and text, with the timestamp
    /// within the tolerance: all that can be checked without the body.
    pub(super) fn signed_headers<'a>(
        &self,
        headers: &'a HeaderMap,
        now: i64,
    ) -> Result<SignedHeaders<'a>, VerifyError> {
        let id = header(headers, WEBHOOK_ID)?;
        let timestamp = header(headers, WEBHOOK_TIMESTAMP)?;
        let signatures = header(headers, WEBHOOK_SIGNATURE)?;
        let timestamp: i64 = timestamp.trim().parse().map_err(|_| {
            VerifyError::new(
                VerifyErrorKind::InvalidHeader,
                "webhook-timestamp is not an integer",
            )
        })?;
        let tolerance = self.tolerance_secs();
        if now.saturating_sub(timestamp) > tolerance {
            return Err(VerifyError::new(
                VerifyErrorKind::TimestampTooOld,
                "webhook-timestamp is too old",
            ));
        }
        if timestamp.saturating_sub(now) > tolerance {
            return Err(VerifyError::new(
                VerifyErrorKind::TimestampTooNew,
                "webhook-timestamp is in the future",
            ));
        }
        Ok(SignedHeaders {
            id,
            timestamp,
            signatures,
        })
    }

    pub(super) fn tolerance_secs(&self) -> i64 {
        i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX)
    }

    pub(super) fn check_signature(&self, signed: &SignedHeaders<'_>, body: &[u8]) -> Result<(), VerifyError> {
        if body.len() > self.max_body {
            return Err(too_large(self.max_body));
        }
        let matched = self.keys.with_live(|keys| {
            signature::verify_any(keys, signed.id, signed.timestamp, body, signed.signatures)
        });
        if !matched {
            return Err(VerifyError::new(
                VerifyErrorKind::InvalidSignature,
                "no matching webhook signature",
            ));
        }
        Ok(())
    }

    /// Marks the verified id in progress in the replay memory.
    pub(super) fn claim_id(&self, signed: &SignedHeaders<'_>, now: i64) -> Result<Claim, VerifyError> {
        let Some(replay) = &self.replay else {
            return Ok(Claim { held: None });
        };
        let expires = signed.timestamp.saturating_add(self.tolerance_secs());
        match replay.claim(signed.id, expires, now) {
            Ok(token) => Ok(Claim {
                held: Some(Held {
                    cache: replay.clone(),
                    id: signed.id.into(),
                    token,
                    expires,
                }),
            }),
            Err(Seen::Done) => Err(VerifyError::new(
                VerifyErrorKind::Replayed,
                "duplicate: webhook-id was already received and handled",
            )),
            Err(Seen::InProgress) => {
                let mut err = VerifyError::new(
                    VerifyErrorKind::InProgress,
                    "webhook-id is being handled by an earlier attempt; retry later",
                );
                err.retry_after = Some(self.in_progress_retry_after);
                Err(err)
            }
        }
    }

    /// Verifies a request and decodes its event. With replay memory the id
    /// counts as handled, as with [`verify`](Self::verify).
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify), and those of [`decode`](Self::decode)
    /// (the id is then forgotten for replay purposes, since nothing was
    /// accepted).
    pub fn event(&self, headers: &HeaderMap, body: Bytes) -> Result<Event, VerifyError> {
        let verified = self.verify(headers, &body)?;
        self.decode(headers, body, &verified)
            .inspect_err(|_| self.forget(&verified.id))
    }

    /// Decodes the event of a verified request: structured JSON, binary mode
    /// if [accepted](Self::binary_mode), or a plain webhook (see the
    /// [receiver docs](crate::WebhookReceiverLayer)).
    ///
    /// # Errors
    ///
    /// [`VerifyErrorKind::InvalidEvent`] if the body or headers are not a
    /// valid event, [`VerifyErrorKind::BinaryMode`] for binary mode when it
    /// is not accepted, [`VerifyErrorKind::IdMismatch`] if its `ce-id` is
    /// not the `webhook-id`.
    pub fn decode(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        verified: &Verified,
    ) -> Result<Event, VerifyError> {
        decode_with(headers, body, verified, self.binary_mode)
    }

    /// Forgets a `webhook-id` for replay purposes, so the same id is accepted
    /// again (after its handler failed, so the sender's retry gets through).
    pub fn forget(&self, id: &str) {
        if let Some(replay) = &self.replay {
            replay.remove(id);
        }
    }
}

/// Verifies a request against `secrets` with the default tolerance and body
/// limit and no replay memory.
///
/// # Errors
///
/// As [`WebhookVerifier::verify`].
pub fn verify(secrets: &[Secret], headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
    WebhookVerifier::from_secrets(secrets.to_vec()).verify(headers, body)
}

pub(super) fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    let value = headers
        .get(name)
        .ok_or_else(|| VerifyError::new(VerifyErrorKind::MissingHeader, format!("missing {name} header")))?;
    value
        .to_str()
        .map_err(|_| VerifyError::new(VerifyErrorKind::InvalidHeader, format!("{name} is not text")))
}

pub(super) fn too_large(limit: usize) -> VerifyError {
    VerifyError::new(
        VerifyErrorKind::BodyTooLarge,
        format!("body is larger than {limit} bytes"),
    )
}
