//! `webhook-signature` header parsing and checking: arbitrary header text
//! against HMAC and Ed25519 keys, never a panic, never a match.

#![no_main]

use libfuzzer_sys::fuzz_target;
use watchtower_webhook::{VerifyKey, signature};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let keys = [
        VerifyKey::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret"),
        VerifyKey::new("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=").expect("valid key"),
    ];
    for _ in signature::parse_header(header) {}
    // A signature nobody made with these keys never verifies.
    assert!(!signature::verify_any(
        &keys,
        "msg_fuzz",
        1_614_265_330,
        b"fuzzed body",
        header
    ));
    // Keys parsed from arbitrary text: an error, never a panic.
    let _ = VerifyKey::new(header);
    let _ = watchtower_webhook::Signer::new(header);
});
