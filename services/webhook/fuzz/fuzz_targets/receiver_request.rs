//! A request as the receiver sees it: arbitrary `webhook-*`, `ce-` and
//! `content-type` header values and body, verified (with replay memory)
//! and decoded, binary mode accepted and refused. Any input must give a
//! typed answer, never a panic.
//!
//! The input is split at `\n` into: webhook-id, webhook-timestamp,
//! webhook-signature, content-type, ce-specversion, ce-id, ce-type, and the
//! rest is the body. A timestamp that parses is used as "now" too, and a
//! signature field of `!` is replaced by a valid signature of the request,
//! so that the paths after the signature check are reached.

#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use watchtower_webhook::WebhookVerifier;
use watchtower_webhook::Verified;
use watchtower_webhook::{Signer, VerifyKey, signature};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SIGNING_KEY: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";

/// Keys parsed once: deriving an Ed25519 public key per input would spend
/// the fuzzing time on key setup.
struct Keys {
    signers: [Signer; 2],
    verify: [VerifyKey; 2],
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    signers: [
        SIGNING_KEY.parse().expect("valid key"),
        SECRET.parse().expect("valid secret"),
    ],
    verify: [
        SIGNING_KEY.parse().expect("valid key"),
        SECRET.parse().expect("valid secret"),
    ],
});

const NAMES: [&str; 7] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "ce-specversion",
    "ce-id",
    "ce-type",
];

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(NAMES.len() + 1, |&b| b == b'\n');
    let mut headers = HeaderMap::new();
    for name in NAMES {
        let Some(value) = parts.next() else { break };
        // An empty field leaves the header out.
        if value.is_empty() {
            continue;
        }
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let body = Bytes::copy_from_slice(parts.next().unwrap_or_default());
    let now = headers
        .get("webhook-timestamp")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(1_614_265_330);
    let wants_valid = headers
        .get("webhook-signature")
        .is_some_and(|v| v.as_bytes() == b"!");
    if wants_valid {
        let id = headers.get("webhook-id").and_then(|v| v.to_str().ok());
        if let Some(id) = id {
            let header = signature::sign_with(&KEYS.signers, id, now, &body);
            if let Ok(value) = HeaderValue::from_str(&header) {
                headers.insert("webhook-signature", value);
            }
        }
    }
    for binary in [false, true] {
        let verifier = WebhookVerifier::from_keys(KEYS.verify.iter().cloned())
            .binary_mode(binary)
            .max_body(4096)
            .reject_replays(4);
        match verifier.verify_at(&headers, &body, now) {
            Ok(verified) => {
                let _ = verifier.decode(&headers, body.clone(), &verified);
                // The same request again is a duplicate.
                assert!(verifier.verify_at(&headers, &body, now).is_err());
            }
            Err(err) => {
                let _ = (err.status(), err.retry_after(), err.to_string());
            }
        }
        // Decoding is reachable for any headers, verified or not.
        let verified = Verified::new("msg_fuzz", now);
        let _ = verifier.decode(&headers, body.clone(), &verified);
    }
});
