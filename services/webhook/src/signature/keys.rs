//! The key types: secrets, Ed25519 signing and public keys, and the
//! signer/verifier sums of them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::Mac;
use std::fmt;
use std::str::FromStr;
use watchtower::Error;

use super::{
    HmacSha256, MIN_SECRET_LEN, PUBLIC_KEY_PREFIX, SECRET_PREFIX, SIGNING_KEY_PREFIX, VERSION,
    VERSION_ASYMMETRIC,
};

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

    pub(super) fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
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

/// The bytes that are signed: `"{msg_id}.{timestamp}.{body}"`.
pub(crate) fn signed_content(msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let timestamp = timestamp.to_string();
    let mut content = Vec::with_capacity(msg_id.len() + timestamp.len() + body.len() + 2);
    content.extend_from_slice(msg_id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

fn decode_key<const N: usize>(text: &str, prefix: &str, what: &str) -> Result<[u8; N], Error> {
    let encoded = text.strip_prefix(prefix).unwrap_or(text).trim();
    let bytes = STANDARD.decode(encoded).map_err(|_| {
        Error::config(format!(
            "{what} is not valid base64 (expected `{prefix}<base64>`)"
        ))
    })?;
    <[u8; N]>::try_from(bytes.as_slice())
        .map_err(|_| Error::config(format!("{what} is {} bytes, expected {N}", bytes.len())))
}

/// An Ed25519 signing key, for `v1a` signatures.
///
/// Parsed from `whsk_<base64>` of the 32-byte seed (the prefix is
/// optional), as the Standard Webhooks libraries write it. The key is wiped
/// from memory on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// A signing key from its text form, `whsk_<base64 seed>`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if the text is
    /// not base64 of 32 bytes. The message never contains the key.
    pub fn new(text: &str) -> Result<SigningKey, Error> {
        let seed = decode_key::<32>(text, SIGNING_KEY_PREFIX, "webhook signing key")?;
        Ok(SigningKey::from_seed(&seed))
    }

    /// A signing key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> SigningKey {
        SigningKey {
            key: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    /// The public key that checks this key's signatures; give it to the
    /// receiver.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
        }
    }

    /// The base64 signature of one message, without the `v1a,` prefix.
    pub fn signature(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        use ed25519_dalek::Signer as _;
        let signature = self.key.sign(&signed_content(msg_id, timestamp, body));
        STANDARD.encode(signature.to_bytes())
    }
}

impl FromStr for SigningKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<SigningKey, Error> {
        SigningKey::new(s)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// An Ed25519 public key, to check `v1a` signatures.
///
/// Parsed from `whpk_<base64>` of its 32 bytes (the prefix is optional);
/// `Display` writes that form. Not secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// A public key from its text form, `whpk_<base64>`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if the text is
    /// not base64 of 32 bytes, or the bytes are not a usable Ed25519 key
    /// (not a curve point, or a weak key of small order).
    pub fn new(text: &str) -> Result<PublicKey, Error> {
        PublicKey::from_bytes(&decode_key::<32>(text, PUBLIC_KEY_PREFIX, "webhook public key")?)
    }

    /// A public key from its 32 bytes.
    ///
    /// # Errors
    ///
    /// As [`PublicKey::new`].
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, Error> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map_err(|_| Error::config("webhook public key is not an Ed25519 key"))?;
        if key.is_weak() {
            return Err(Error::config("webhook public key is a weak Ed25519 key"));
        }
        Ok(PublicKey { key })
    }

    /// Whether `signature` (raw bytes) is a valid signature of the message
    /// by this key's signing key (strict verification: no malleable
    /// signatures).
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], signature: &[u8]) -> bool {
        self.verify_content(&signed_content(msg_id, timestamp, body), signature)
    }

    pub(super) fn verify_content(&self, content: &[u8], signature: &[u8]) -> bool {
        ed25519_dalek::Signature::from_slice(signature)
            .is_ok_and(|signature| self.key.verify_strict(content, &signature).is_ok())
    }
}

impl FromStr for PublicKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<PublicKey, Error> {
        PublicKey::new(s)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A key that signs: a shared [`Secret`] (`v1`) or an Ed25519
/// [`SigningKey`] (`v1a`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Signer {
    /// HMAC-SHA256, `v1`.
    Symmetric(Secret),
    /// Ed25519, `v1a`.
    Asymmetric(SigningKey),
}

impl Signer {
    /// A key from its text form: `whsk_…` is an Ed25519 signing key,
    /// anything else a secret (`whsec_…`).
    ///
    /// # Errors
    ///
    /// As [`Secret::new`] and [`SigningKey::new`].
    pub fn new(text: &str) -> Result<Signer, Error> {
        if text.starts_with(SIGNING_KEY_PREFIX) {
            SigningKey::new(text).map(Signer::Asymmetric)
        } else {
            Secret::new(text).map(Signer::Symmetric)
        }
    }

    /// `v1,<base64>` or `v1a,<base64>` for one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        match self {
            Signer::Symmetric(secret) => {
                format!("{VERSION},{}", secret.signature(msg_id, timestamp, body))
            }
            Signer::Asymmetric(key) => {
                format!("{VERSION_ASYMMETRIC},{}", key.signature(msg_id, timestamp, body))
            }
        }
    }
}

impl From<Secret> for Signer {
    fn from(secret: Secret) -> Signer {
        Signer::Symmetric(secret)
    }
}

impl From<SigningKey> for Signer {
    fn from(key: SigningKey) -> Signer {
        Signer::Asymmetric(key)
    }
}

impl FromStr for Signer {
    type Err = Error;

    fn from_str(s: &str) -> Result<Signer, Error> {
        Signer::new(s)
    }
}

/// A key that checks signatures: a shared [`Secret`] (`v1`) or an Ed25519
/// [`PublicKey`] (`v1a`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum VerifyKey {
    /// HMAC-SHA256, `v1`.
    Symmetric(Secret),
    /// Ed25519, `v1a`.
    Asymmetric(PublicKey),
}

impl VerifyKey {
    /// A key from its text form: `whpk_…` is an Ed25519 public key, `whsk_…`
    /// a signing key whose public key is taken, anything else a secret
    /// (`whsec_…`).
    ///
    /// # Errors
    ///
    /// As [`Secret::new`], [`PublicKey::new`] and [`SigningKey::new`].
    pub fn new(text: &str) -> Result<VerifyKey, Error> {
        if text.starts_with(PUBLIC_KEY_PREFIX) {
            PublicKey::new(text).map(VerifyKey::Asymmetric)
        } else if text.starts_with(SIGNING_KEY_PREFIX) {
            SigningKey::new(text).map(|key| VerifyKey::Asymmetric(key.public_key()))
        } else {
            Secret::new(text).map(VerifyKey::Symmetric)
        }
    }
}

impl From<Secret> for VerifyKey {
    fn from(secret: Secret) -> VerifyKey {
        VerifyKey::Symmetric(secret)
    }
}

impl From<PublicKey> for VerifyKey {
    fn from(key: PublicKey) -> VerifyKey {
        VerifyKey::Asymmetric(key)
    }
}

impl FromStr for VerifyKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<VerifyKey, Error> {
        VerifyKey::new(s)
    }
}
