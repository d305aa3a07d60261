//! [`WebhookConfig`]: where and how a [`WebhookClient`](crate::WebhookClient)
//! delivers, validated once by [`WebhookClient::connect`](crate::WebhookClient::connect).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use watchtower::Error;

use crate::ContentMode;
use crate::guard::AllowList;
use crate::signature::{Secret, Signer, SigningKey};

/// The lower end of the Standard Webhooks recommendation (15–30 s).
const TIMEOUT: Duration = Duration::from_secs(15);
/// A healthy endpoint connects in far less.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Large enough for any reasonable event.
const MAX_PAYLOAD: usize = 1024 * 1024;
/// Enough of an error answer for a message.
const MAX_RESPONSE_BODY: usize = 4 * 1024;
/// Past the longest step of a usual retry schedule.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// Where and how to deliver: plain data, checked once by
/// [`WebhookClient::connect`](crate::WebhookClient::connect).
///
/// HTTP has no connection to hold, so "connecting" builds the HTTP client
/// (its connection pool, TLS and the SSRF guard) and checks this
/// configuration; nothing is sent until the first event.
///
/// ```
/// use std::time::Duration;
/// use watchtower_webhook::WebhookConfig;
///
/// let config = WebhookConfig::new("https://example.com/hooks")
///     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .timeout(Duration::from_secs(20))
///     .rate_limit(50, Duration::from_secs(1));
/// ```
#[derive(Clone)]
pub struct WebhookConfig {
    pub(crate) url: String,
    pub(crate) name: Option<String>,
    pub(crate) secrets: Vec<Signer>,
    /// The first malformed setting, reported by `connect`.
    pub(crate) error: Option<Arc<str>>,
    pub(crate) mode: ContentMode,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_payload: usize,
    pub(crate) max_response_body: usize,
    pub(crate) max_retry_after: Duration,
    pub(crate) https_only: bool,
    pub(crate) ssrf_guard: bool,
    pub(crate) allow: AllowList,
    pub(crate) rate: Option<(u32, Duration)>,
    pub(crate) disable_after: Option<Duration>,
    pub(crate) tls: Option<rustls::ClientConfig>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &watchtower::redact_url(&self.url))
            .field("name", &self.name)
            .field("secrets", &self.secrets.len())
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("https_only", &self.https_only)
            .field("ssrf_guard", &self.ssrf_guard)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// Delivery to `url` (`http` or `https`); at least one
    /// [`secret`](Self::secret) is required.
    pub fn new(url: impl Into<String>) -> Self {
        WebhookConfig {
            url: url.into(),
            name: None,
            secrets: Vec::new(),
            error: None,
            mode: ContentMode::Structured,
            timeout: TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            max_payload: MAX_PAYLOAD,
            max_response_body: MAX_RESPONSE_BODY,
            max_retry_after: MAX_RETRY_AFTER,
            https_only: false,
            ssrf_guard: true,
            allow: AllowList::new(),
            rate: None,
            disable_after: None,
            tls: None,
        }
    }

    fn fail(&mut self, err: &Error) {
        self.error.get_or_insert_with(|| Arc::from(err.message()));
    }

    /// Names the endpoint in errors, receipts and fan-out reports (default:
    /// the URL without credentials or query, so that no credential is shown).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Adds a signing key: a shared secret `whsec_<base64>` (`v1`
    /// signatures) or an Ed25519 signing key `whsk_<base64>` (`v1a`). With
    /// several, each request carries one signature per key (for rotation).
    /// Default none, and at least one is required; a bad one fails
    /// [`connect`](crate::WebhookClient::connect).
    pub fn secret(mut self, secret: &str) -> Self {
        match Signer::new(secret) {
            Ok(key) => self.secrets.push(key),
            Err(err) => self.fail(&err),
        }
        self
    }

    /// Adds a parsed secret (`v1`).
    pub fn secret_key(mut self, secret: Secret) -> Self {
        self.secrets.push(Signer::Symmetric(secret));
        self
    }

    /// Adds a parsed Ed25519 signing key (`v1a`).
    pub fn signing_key(mut self, key: SigningKey) -> Self {
        self.secrets.push(Signer::Asymmetric(key));
        self
    }

    /// Chooses structured or binary mode (default
    /// [`ContentMode::Structured`]: the signature then covers every
    /// attribute).
    pub fn mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }

    /// Binary mode: `ce-` headers, the data as body.
    pub fn binary_mode(self) -> Self {
        self.mode(ContentMode::Binary)
    }

    /// The time one request may take, body included (default 15 s: the
    /// lower end of the Standard Webhooks recommendation of 15–30 s, so that
    /// a hanging endpoint holds a connection for as short a time as the
    /// specification allows).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The time connecting may take (default 5 s: a healthy endpoint
    /// connects in far less).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest body sent (default 1 MiB: large enough for any
    /// reasonable event, small enough that an oversized one is caught here
    /// rather than by the receiver's limit); a larger event fails with a
    /// non-retryable [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How much of a response body is read, for error messages (default
    /// 4 KiB: the rest is never read, so an endpoint cannot make the
    /// publisher buffer megabytes).
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// The longest `Retry-After` taken from an endpoint (default 1 hour:
    /// past the longest step of a usual retry schedule, so an honest hint
    /// is kept, yet an endpoint cannot park an event for days or overflow a
    /// retry layer's timer). Longer hints, numbers past `u64::MAX` and
    /// far-future dates become this.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Refuses `http://` URLs (default off: both are allowed, for endpoints
    /// on a private network).
    pub fn https_only(mut self, https_only: bool) -> Self {
        self.https_only = https_only;
        self
    }

    /// Turns the SSRF guard off or on (default on: a URL from a user cannot
    /// reach private addresses). Off lets the publisher connect to any
    /// address; only for trusted URLs.
    pub fn ssrf_guard(mut self, enabled: bool) -> Self {
        self.ssrf_guard = enabled;
        self
    }

    /// Lets an address or CIDR network through the SSRF guard
    /// (`127.0.0.1`, `10.0.0.0/8`; default none); a malformed one fails
    /// [`connect`](crate::WebhookClient::connect).
    pub fn allow(mut self, net: &str) -> Self {
        if let Err(err) = self.allow.add(net) {
            self.fail(&err);
        }
        self
    }

    /// Replaces the SSRF guard's allow-list (default empty).
    pub fn allow_list(mut self, allow: AllowList) -> Self {
        self.allow = allow;
        self
    }

    /// At most `requests` per `per` to this endpoint, in bursts of up to
    /// `requests` (default unlimited: the endpoint's own answers, `429`
    /// with `Retry-After`, pace it). The publisher is not ready while it
    /// waits for a slot.
    pub fn rate_limit(mut self, requests: u32, per: Duration) -> Self {
        self.rate = Some((requests, per));
        self
    }

    /// Disables the endpoint once every attempt has failed for `window`:
    /// when an attempt fails `window` or more after the first failure since
    /// the last success (default never: only a `410 Gone` disables). A
    /// failure is any answer but 2xx, a timeout or a connection failure;
    /// an event refused before sending (too large, not encodable) does not
    /// count. The change is published on
    /// [`subscribe_health`](crate::WebhookClient::subscribe_health).
    /// Standard Webhooks senders commonly use days (Svix: 5 days), long
    /// enough to outlast an outage and a weekend.
    pub fn disable_after(mut self, window: Duration) -> Self {
        self.disable_after = Some(window);
        self
    }

    /// The TLS configuration (default: rustls with the ring provider and
    /// the platform's certificate verifier, HTTP/1.1).
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(config);
        self
    }
}
