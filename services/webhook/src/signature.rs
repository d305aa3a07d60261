//! Standard Webhooks 1.0 signatures: secrets, signing and checking.
//!
//! A signature is `v1,` followed by the base64 HMAC-SHA256, under the
//! endpoint's secret, of `"{webhook-id}.{webhook-timestamp}.{body}"`.
//! Secrets are written `whsec_<base64>`; several may be active at once
//! (during a rotation), in which case the `webhook-signature` header holds
//! one space-separated signature per secret and a receiver accepts any.
//!
//! # Example
//!
//! ```
//! use watchtower_webhook::signature::{self, Secret};
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

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use watchtower::Error;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of secrets in their text form.
pub const SECRET_PREFIX: &str = "whsec_";

/// The shortest secret accepted, in bytes: 24, the Standard Webhooks
/// minimum, so that a key cannot be brute-forced from signatures.
pub const MIN_SECRET_LEN: usize = 24;

/// The signature scheme this crate writes and reads (HMAC-SHA256).
pub const VERSION: &str = "v1";

/// A signing secret.
///
/// Parsed from `whsec_<base64>` (the prefix is optional). The key is held
/// ready for HMAC, so signing does not hash it again. `Debug` never shows
/// the key.
#[derive(Clone)]
pub struct Secret {
    mac: HmacSha256,
}

impl Secret {
    /// A secret from its text form, `whsec_<base64>`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if the text is not
    /// base64 or the key is shorter than [`MIN_SECRET_LEN`] bytes. The message
    /// never contains the secret.
    pub fn new(text: &str) -> Result<Secret, Error> {
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text).trim();
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| Error::config("webhook secret is not valid base64 (expected `whsec_<base64>`)"))?;
        Secret::from_bytes(&key)
    }

    /// A secret from raw key bytes.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if the key is
    /// shorter than [`MIN_SECRET_LEN`] bytes.
    pub fn from_bytes(key: &[u8]) -> Result<Secret, Error> {
        if key.len() < MIN_SECRET_LEN {
            return Err(Error::config(format!(
                "webhook secret is {} bytes, at least {MIN_SECRET_LEN} are required",
                key.len()
            )));
        }
        let mac = HmacSha256::new_from_slice(key)
            .map_err(|_| Error::config("webhook secret cannot key HMAC-SHA256"))?;
        Ok(Secret { mac })
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The base64 signature of one message, without the `v1,` prefix.
    pub fn signature(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        STANDARD.encode(self.mac(msg_id, timestamp, body).finalize().into_bytes())
    }

    /// Whether `signature` (raw bytes) is this secret's signature of the
    /// message, compared in constant time.
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], signature: &[u8]) -> bool {
        self.mac(msg_id, timestamp, body).verify_slice(signature).is_ok()
    }
}

impl FromStr for Secret {
    type Err = Error;

    fn from_str(s: &str) -> Result<Secret, Error> {
        Secret::new(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
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
/// by any of `secrets` over the message. Each comparison is constant-time;
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
