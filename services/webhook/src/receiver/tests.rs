use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use watchtower::{Error, ErrorKind};

use super::claim::{ReplayCache, Seen};
use super::{Verified, VerifyError, VerifyErrorKind, WebhookVerifier, decode_event};
use crate::signature::Secret;
use crate::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const TIMESTAMP: i64 = 1614265330;
const PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn headers(id: &str, ts: i64, sig: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(WEBHOOK_ID, id.parse().unwrap());
    h.insert(WEBHOOK_TIMESTAMP, ts.to_string().parse().unwrap());
    h.insert(WEBHOOK_SIGNATURE, sig.parse().unwrap());
    h
}

fn verifier() -> WebhookVerifier {
    WebhookVerifier::new([SECRET]).unwrap()
}

fn kind(r: Result<Verified, VerifyError>) -> VerifyErrorKind {
    r.unwrap_err().kind()
}

#[test]
fn spec_vector_passes_within_tolerance() {
    let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    let ok = verifier().verify_at(&h, PAYLOAD, TIMESTAMP + 299).unwrap();
    assert_eq!(ok.id, MSG_ID);
    assert_eq!(ok.timestamp, TIMESTAMP);
    assert!(verifier().verify_at(&h, PAYLOAD, TIMESTAMP - 299).is_ok());
}

#[test]
fn stale_and_future_timestamps_are_refused() {
    let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    let old = verifier().verify_at(&h, PAYLOAD, TIMESTAMP + 301).unwrap_err();
    assert_eq!(old.kind(), VerifyErrorKind::TimestampTooOld);
    assert_eq!(old.status(), StatusCode::UNAUTHORIZED);
    let new = verifier().verify_at(&h, PAYLOAD, TIMESTAMP - 301).unwrap_err();
    assert_eq!(new.kind(), VerifyErrorKind::TimestampTooNew);
    assert_eq!(new.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn tampering_and_wrong_secrets_are_refused() {
    let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    let tampered = verifier()
        .verify_at(&h, br#"{"test": 2432232315}"#, TIMESTAMP)
        .unwrap_err();
    assert_eq!(tampered.kind(), VerifyErrorKind::InvalidSignature);
    assert_eq!(tampered.status(), StatusCode::UNAUTHORIZED);
    let wrong = WebhookVerifier::from_secrets(vec![Secret::from_bytes(&[9; 32]).unwrap()]);
    assert_eq!(
        kind(wrong.verify_at(&h, PAYLOAD, TIMESTAMP)),
        VerifyErrorKind::InvalidSignature
    );
    // One of several secrets is enough (rotation).
    let both = WebhookVerifier::from_secrets(vec![
        Secret::from_bytes(&[9; 32]).unwrap(),
        Secret::new(SECRET).unwrap(),
    ]);
    assert!(both.verify_at(&h, PAYLOAD, TIMESTAMP).is_ok());
}

#[test]
fn malformed_requests_are_bad_requests() {
    let v = verifier();
    let mut h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    h.remove(WEBHOOK_SIGNATURE);
    let missing = v.verify_at(&h, PAYLOAD, TIMESTAMP).unwrap_err();
    assert_eq!(missing.kind(), VerifyErrorKind::MissingHeader);
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let mut h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    h.insert(WEBHOOK_TIMESTAMP, HeaderValue::from_static("yesterday"));
    assert_eq!(
        kind(v.verify_at(&h, PAYLOAD, TIMESTAMP)),
        VerifyErrorKind::InvalidHeader
    );
    let err: Error = v.verify_at(&h, PAYLOAD, TIMESTAMP).unwrap_err().into();
    assert_eq!(err.kind(), ErrorKind::Rejected);
}

#[test]
fn oversized_bodies_are_refused() {
    let v = verifier().max_body(PAYLOAD.len() - 1);
    let err = v
        .verify_at(&headers(MSG_ID, TIMESTAMP, EXPECTED), PAYLOAD, TIMESTAMP)
        .unwrap_err();
    assert_eq!(err.kind(), VerifyErrorKind::BodyTooLarge);
    assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[test]
fn replays_are_refused_until_forgotten_or_expired() {
    let v = verifier().reject_replays(10);
    let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    assert!(v.verify_at(&h, PAYLOAD, TIMESTAMP).is_ok());
    let replay = v.verify_at(&h, PAYLOAD, TIMESTAMP + 1).unwrap_err();
    assert_eq!(replay.kind(), VerifyErrorKind::Replayed);
    assert_eq!(replay.status(), StatusCode::OK);
    // Clones share the memory.
    assert_eq!(
        kind(v.clone().verify_at(&h, PAYLOAD, TIMESTAMP)),
        VerifyErrorKind::Replayed
    );
    v.forget(MSG_ID);
    assert!(v.verify_at(&h, PAYLOAD, TIMESTAMP).is_ok());
    // A bad signature does not record the id.
    let forged = headers("msg_forged", TIMESTAMP, "v1,AAAA");
    assert_eq!(
        kind(v.verify_at(&forged, PAYLOAD, TIMESTAMP)),
        VerifyErrorKind::InvalidSignature
    );
    assert_eq!(v.replay.as_ref().unwrap().lock().entries.len(), 1);
}

#[test]
fn replay_memory_is_bounded() {
    let cache = ReplayCache::new(2);
    assert!(cache.claim("a", 100, 0).is_ok());
    assert!(cache.claim("b", 100, 0).is_ok());
    let c = cache.claim("c", 100, 0).unwrap();
    assert_eq!(cache.lock().entries.len(), 2);
    assert_eq!(cache.claim("c", 100, 0), Err(Seen::InProgress));
    cache.complete("c", c, 100);
    assert_eq!(cache.claim("c", 100, 0), Err(Seen::Done));
    // Expired ids are dropped.
    assert!(cache.claim("c", 300, 200).is_ok());
}

#[test]
fn a_stale_release_never_forgets_a_newer_claim() {
    let cache = ReplayCache::new(10);
    let first = cache.claim("a", 100, 0).unwrap();
    cache.remove("a");
    let second = cache.claim("a", 100, 0).unwrap();
    cache.release("a", first);
    assert_eq!(cache.claim("a", 100, 0), Err(Seen::InProgress));
    cache.release("a", second);
    assert!(cache.claim("a", 100, 0).is_ok());
}

#[test]
fn plain_webhooks_become_events() {
    let mut h = headers(MSG_ID, TIMESTAMP, EXPECTED);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let verified = Verified {
        id: MSG_ID.into(),
        timestamp: TIMESTAMP,
    };
    let body = Bytes::from_static(br#"{"type":"invoice.paid","data":{"n":1}}"#);
    let event = decode_event(&h, body.clone(), &verified).unwrap();
    assert_eq!(event.id(), MSG_ID);
    assert_eq!(event.ty(), "invoice.paid");
    assert_eq!(event.data(), Some(&body));
    let untyped = decode_event(&h, Bytes::from_static(PAYLOAD), &verified).unwrap();
    assert_eq!(untyped.ty(), "webhook");
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents+json"),
    );
    let err = decode_event(&h, Bytes::from_static(b"{not json"), &verified).unwrap_err();
    assert_eq!(err.kind(), VerifyErrorKind::InvalidEvent);
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
}
