//! Standard Webhooks 1.0 signatures: secrets, signing and checking.
//!
//! Both schemes of the specification sign
//! `"{webhook-id}.{webhook-timestamp}.{body}"`:
//!
//! * `v1,` followed by the base64 HMAC-SHA256 under a shared [`Secret`]
//!   (`whsec_<base64>`): sender and receiver hold the same key.
//! * `v1a,` followed by the base64 Ed25519 signature under a
//!   [`SigningKey`] (`whsk_<base64 of the 32-byte seed>`), checked with its
//!   [`PublicKey`](crate::PublicKey) (`whpk_<base64>`): the receiver holds only the public
//!   key, so a leaked receiver configuration cannot forge requests.
//!
//! Several keys may be active at once (during a rotation): the
//! `webhook-signature` header then holds one space-separated signature per
//! key, and a receiver accepts the request if any one of them verifies
//! under any of its keys. [`Signer`] and [`VerifyKey`] hold either kind.
//!
//! # Example
//!
//! ```
//! use watchtower_webhook::{Secret, signature};
//!
//! let secret: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse()?;
//! let header = signature::sign(
//!     &[secret.clone()],
//!     "msg_p5jXN8AQM9LWM0D4loKWxJek",
//!     1614265330,
//!     br#"{"test": 2432232314}"#,
//! );
//! assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
//! assert!(signature::matches(
//!     &[secret],
//!     "msg_p5jXN8AQM9LWM0D4loKWxJek",
//!     1614265330,
//!     br#"{"test": 2432232314}"#,
//!     &header,
//! ));
//! # Ok::<(), watchtower::Error>(())
//! ```
//!
//! Ed25519: the sender keeps the signing key, the receiver gets only the
//! public key.
//!
//! ```
//! use watchtower_webhook::{Signer, SigningKey, VerifyKey, signature};
//!
//! let key: SigningKey = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=".parse()?;
//! let public = key.public_key().to_string(); // "whpk_…", for the receiver
//! let header = signature::sign_with(
//!     &[Signer::from(key)],
//!     "msg_p5jXN8AQM9LWM0D4loKWxJek",
//!     1614265330,
//!     br#"{"test": 2432232314}"#,
//! );
//! assert!(header.starts_with("v1a,tQ9V2XOqn7jL"));
//! assert!(signature::verify_any(
//!     &[VerifyKey::new(&public)?],
//!     "msg_p5jXN8AQM9LWM0D4loKWxJek",
//!     1614265330,
//!     br#"{"test": 2432232314}"#,
//!     &header,
//! ));
//! # Ok::<(), watchtower::Error>(())
//! ```

use std::sync::RwLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::Instant;
use watchtower::Error;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The prefix of Ed25519 signing keys in their text form.
pub const SIGNING_KEY_PREFIX: &str = "whsk_";

/// The prefix of Ed25519 public keys in their text form.
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";

/// The asymmetric signature scheme (Ed25519).
pub const VERSION_ASYMMETRIC: &str = "v1a";

/// The prefix of secrets in their text form.
pub const SECRET_PREFIX: &str = "whsec_";

/// The shortest secret accepted, in bytes: 24, the Standard Webhooks
/// minimum, so that a key cannot be brute-forced from signatures.
pub const MIN_SECRET_LEN: usize = 24;

/// The signature scheme this crate writes and reads (HMAC-SHA256).
pub const VERSION: &str = "v1";

pub(crate) mod keys;

pub(crate) use keys::{Secret, Signer, SigningKey, VerifyKey, signed_content};

/// The `webhook-signature` header value for a message: one signature per
/// key (`v1,…` or `v1a,…`), separated by spaces.
pub fn sign_with<'a>(
    keys: impl IntoIterator<Item = &'a Signer>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut header = String::new();
    for key in keys {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str(&key.sign(msg_id, timestamp, body));
    }
    header
}

/// The entries of a `webhook-signature` header: `(version, signature)`
/// pairs, malformed entries (no comma, not base64) skipped. At most 16
/// entries are read, so a huge header costs no more than that.
#[doc(hidden)]
pub fn parse_header(header: &str) -> impl Iterator<Item = (&str, Vec<u8>)> {
    header
        .split(' ')
        .filter(|entry| !entry.is_empty())
        .take(16)
        .filter_map(|entry| entry.split_once(','))
        .filter_map(|(version, sig)| STANDARD.decode(sig).ok().map(|sig| (version, sig)))
}

/// Whether any signature in a `webhook-signature` header value verifies
/// under any of `keys`: `v1` entries against the secrets (constant-time),
/// `v1a` entries against the public keys. Other versions and malformed
/// entries are skipped.
pub fn verify_any<'a>(
    keys: impl IntoIterator<Item = &'a VerifyKey> + Clone,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let mut content: Option<Vec<u8>> = None;
    for (version, candidate) in parse_header(header) {
        let ok = match version {
            VERSION => keys.clone().into_iter().any(|key| match key {
                VerifyKey::Symmetric(secret) => secret.verify(msg_id, timestamp, body, &candidate),
                VerifyKey::Asymmetric(_) => false,
            }),
            VERSION_ASYMMETRIC => {
                let content = content.get_or_insert_with(|| signed_content(msg_id, timestamp, body));
                keys.clone().into_iter().any(|key| match key {
                    VerifyKey::Asymmetric(public) => public.verify_content(content, &candidate),
                    VerifyKey::Symmetric(_) => false,
                })
            }
            _ => false,
        };
        if ok {
            return true;
        }
    }
    false
}

/// The keys in use, shared by a sender's or verifier's clones, rotated at
/// run time: a rotation adds a key and retires the others after a grace
/// period, during which all of them sign (or verify).
pub(crate) struct KeyRing<K> {
    keys: RwLock<Vec<(K, Option<Instant>)>>,
}

impl<K> KeyRing<K> {
    pub(crate) fn new(keys: Vec<K>) -> KeyRing<K> {
        KeyRing {
            keys: RwLock::new(keys.into_iter().map(|k| (k, None)).collect()),
        }
    }

    /// Calls `f` with the keys not yet retired, newest first.
    pub(crate) fn with_live<R>(&self, f: impl FnOnce(Live<'_, K>) -> R) -> R {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        f(Live {
            iter: keys.iter(),
            now: Instant::now(),
        })
    }

    /// How many keys are live.
    pub(crate) fn live_len(&self) -> usize {
        self.with_live(|live| live.count())
    }

    /// Puts `key` first and retires every other key `grace` from now (or
    /// sooner, if it was retiring already).
    pub(crate) fn rotate(&self, key: K, grace: Duration) {
        let now = Instant::now();
        let until = now.checked_add(grace);
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.retain(|(_, retire)| retire.is_none_or(|at| at > now));
        for (_, retire) in keys.iter_mut() {
            // A grace too long for the clock never ends.
            *retire = match (*retire, until) {
                (Some(at), Some(until)) => Some(at.min(until)),
                (at, None) => at,
                (None, until) => until,
            };
        }
        keys.insert(0, (key, None));
    }
}

/// The live keys of a [`KeyRing`].
#[derive(Clone)]
pub(crate) struct Live<'a, K> {
    iter: std::slice::Iter<'a, (K, Option<Instant>)>,
    now: Instant,
}

impl<'a, K> Iterator for Live<'a, K> {
    type Item = &'a K;

    fn next(&mut self) -> Option<&'a K> {
        let now = self.now;
        self.iter
            .by_ref()
            .find(|(_, retire)| retire.is_none_or(|at| at > now))
            .map(|(key, _)| key)
    }
}

/// Parses several secrets.
///
/// # Errors
///
/// As [`Secret::new`], and [`ErrorKind::Config`](watchtower::ErrorKind::Config)
/// if there are none.
pub fn parse_secrets<I, S>(secrets: I) -> Result<Vec<Secret>, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let secrets = secrets
        .into_iter()
        .map(|s| Secret::new(s.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    if secrets.is_empty() {
        return Err(Error::config("at least one webhook secret is required"));
    }
    Ok(secrets)
}

/// The `webhook-signature` header value for a message: one `v1,<base64>`
/// per secret, separated by spaces.
pub fn sign(secrets: &[Secret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut header = String::with_capacity(secrets.len() * 48);
    for secret in secrets {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str(VERSION);
        header.push(',');
        header.push_str(&secret.signature(msg_id, timestamp, body));
    }
    header
}

/// Whether any `v1` signature in a `webhook-signature` header value was made
/// by any of `secrets` over the message ([`verify_any`] also checks `v1a`). Each comparison is constant-time;
/// signatures of other versions and malformed entries are skipped.
pub fn matches(secrets: &[Secret], msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let candidates: Vec<Vec<u8>> = header
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
        .collect();
    if candidates.is_empty() {
        return false;
    }
    secrets.iter().any(|secret| {
        let mac = secret.mac(msg_id, timestamp, body);
        candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PublicKey;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret() -> Secret {
        SECRET.parse().unwrap()
    }

    #[test]
    fn spec_vector_signs() {
        assert_eq!(sign(&[secret()], MSG_ID, TIMESTAMP, PAYLOAD), EXPECTED);
        // The prefix is optional.
        let bare: Secret = SECRET.trim_start_matches("whsec_").parse().unwrap();
        assert_eq!(sign(&[bare], MSG_ID, TIMESTAMP, PAYLOAD), EXPECTED);
    }

    #[test]
    fn spec_vector_verifies() {
        assert!(matches(&[secret()], MSG_ID, TIMESTAMP, PAYLOAD, EXPECTED));
        // Among other versions and several signatures, as the spec allows.
        let header = format!("v1a,AAAA v1,bm90IGl0 {EXPECTED}");
        assert!(matches(&[secret()], MSG_ID, TIMESTAMP, PAYLOAD, &header));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let s = [secret()];
        assert!(!matches(&s, MSG_ID, TIMESTAMP + 1, PAYLOAD, EXPECTED));
        assert!(!matches(&s, "msg_other", TIMESTAMP, PAYLOAD, EXPECTED));
        assert!(!matches(
            &s,
            MSG_ID,
            TIMESTAMP,
            br#"{"test": 2432232315}"#,
            EXPECTED
        ));
        assert!(!matches(
            &s,
            MSG_ID,
            TIMESTAMP,
            PAYLOAD,
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!matches(&s, MSG_ID, TIMESTAMP, PAYLOAD, ""));
        assert!(!matches(&s, MSG_ID, TIMESTAMP, PAYLOAD, "v1,@@@"));
        let other = Secret::from_bytes(&[7u8; 32]).unwrap();
        assert!(!matches(&[other], MSG_ID, TIMESTAMP, PAYLOAD, EXPECTED));
    }

    #[test]
    fn rotation_signs_with_every_secret() {
        let old = secret();
        let new = Secret::from_bytes(&[42u8; 32]).unwrap();
        let header = sign(&[new.clone(), old.clone()], MSG_ID, TIMESTAMP, PAYLOAD);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], EXPECTED);
        assert!(matches(&[old], MSG_ID, TIMESTAMP, PAYLOAD, &header));
        assert!(matches(&[new], MSG_ID, TIMESTAMP, PAYLOAD, &header));
    }

    // The Standard Webhooks reference libraries' Ed25519 vector.
    const SIGNING_KEY: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
    const EXPECTED_V1A: &str =
        "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag==";

    fn verify_keys(keys: &[VerifyKey], header: &str) -> bool {
        verify_any(keys, MSG_ID, TIMESTAMP, PAYLOAD, header)
    }

    #[test]
    fn spec_vectors_sign_and_verify_for_v1_and_v1a() {
        let v1 = Signer::new(SECRET).unwrap();
        assert_eq!(v1.sign(MSG_ID, TIMESTAMP, PAYLOAD), EXPECTED);
        let v1a = Signer::new(SIGNING_KEY).unwrap();
        assert!(matches!(v1a, Signer::Asymmetric(_)));
        assert_eq!(v1a.sign(MSG_ID, TIMESTAMP, PAYLOAD), EXPECTED_V1A);
        // The prefix is optional.
        let bare: SigningKey = SIGNING_KEY.trim_start_matches("whsk_").parse().unwrap();
        assert_eq!(
            format!("v1a,{}", bare.signature(MSG_ID, TIMESTAMP, PAYLOAD)),
            EXPECTED_V1A
        );

        let public = SigningKey::new(SIGNING_KEY).unwrap().public_key();
        let text = public.to_string();
        assert!(text.starts_with("whpk_"), "{text}");
        let keys = [VerifyKey::new(&text).unwrap()];
        assert!(verify_keys(&keys, EXPECTED_V1A));
        // The spec's other cases: a wrong-length and an empty signature,
        // and the valid one among other versions.
        assert!(!verify_keys(
            &keys,
            "v1a,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
        ));
        assert!(!verify_keys(&keys, "v1a,"));
        let multi = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= \
             {EXPECTED_V1A} v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
        );
        assert!(verify_keys(&keys, &multi));
        // A v1a signature never passes as v1, nor a v1 one under a public key.
        assert!(!verify_keys(&keys, EXPECTED));
        assert!(!verify_keys(&keys, &EXPECTED_V1A.replacen("v1a", "v1", 1)));
        let secret_keys = [VerifyKey::new(SECRET).unwrap()];
        assert!(verify_keys(&secret_keys, EXPECTED));
        assert!(!verify_keys(&secret_keys, EXPECTED_V1A));
        // Mixed keys accept either.
        let mixed = [secret_keys[0].clone(), keys[0].clone()];
        assert!(verify_keys(&mixed, EXPECTED) && verify_keys(&mixed, EXPECTED_V1A));
        // Any change breaks it.
        assert!(!verify_any(&keys, MSG_ID, TIMESTAMP + 1, PAYLOAD, EXPECTED_V1A));
        assert!(!verify_any(&keys, MSG_ID, TIMESTAMP, b"{}", EXPECTED_V1A));
        // A signing key given to a verifier stands for its public key.
        assert!(verify_keys(&[VerifyKey::new(SIGNING_KEY).unwrap()], EXPECTED_V1A));
    }

    #[test]
    fn bad_asymmetric_keys_are_config_errors_without_the_key() {
        let err = SigningKey::new("whsk_c2hvcnQ=").unwrap_err();
        assert_eq!(err.kind(), watchtower::ErrorKind::Config);
        assert!(PublicKey::new("whpk_not base64").is_err());
        // The identity point is a weak key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(PublicKey::from_bytes(&identity).is_err());
        assert_eq!(
            format!("{:?}", SigningKey::new(SIGNING_KEY).unwrap()),
            "SigningKey(***)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_signs_with_both_keys_for_the_grace_period_only() {
        let ring = KeyRing::new(vec![Signer::new(SECRET).unwrap()]);
        let header = || ring.with_live(|keys| sign_with(keys, MSG_ID, TIMESTAMP, PAYLOAD));
        assert_eq!(header(), EXPECTED);
        ring.rotate(Signer::new(SIGNING_KEY).unwrap(), Duration::from_secs(60));
        assert_eq!(header(), format!("{EXPECTED_V1A} {EXPECTED}"));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(ring.live_len(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(header(), EXPECTED_V1A);
        // A second rotation never extends an earlier retirement.
        let ring = KeyRing::new(vec![1u8]);
        ring.rotate(2, Duration::from_secs(10));
        ring.rotate(3, Duration::from_secs(100));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(ring.with_live(|k| k.copied().collect::<Vec<_>>()), [3, 2]);
        ring.rotate(4, Duration::ZERO);
        assert_eq!(ring.with_live(|k| k.copied().collect::<Vec<_>>()), [4]);
    }

    #[test]
    fn bad_secrets_are_config_errors_without_the_secret() {
        let err = Secret::new("whsec_not base64!").unwrap_err();
        assert_eq!(err.kind(), watchtower::ErrorKind::Config);
        assert!(!err.to_string().contains("not base64!"));
        let short = Secret::new("whsec_c2hvcnQ=").unwrap_err();
        assert_eq!(short.kind(), watchtower::ErrorKind::Config);
        assert!(parse_secrets(Vec::<String>::new()).is_err());
        assert_eq!(format!("{:?}", secret()), "Secret(***)");
    }
}
