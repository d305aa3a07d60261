//! [`WebhookClient`]: one endpoint's HTTP client, signing keys, rate limit
//! and health, shared by every publisher made from it.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use watchtower::health::{Health, Status};
use watchtower::{Error, ErrorKind, Transport};

use super::WebhookPublisher;
use crate::ContentMode;
use crate::WebhookConfig;
use crate::guard::{Guard, Refused};
use crate::rate::RateLimiter;
use crate::signature::{KeyRing, Signer};

const USER_AGENT: &str = concat!("watchtower-webhook/", env!("CARGO_PKG_VERSION"));

/// One webhook endpoint, ready to deliver: the HTTP client (its connection
/// pool, TLS, SSRF guard), the signing keys, the rate limit and the
/// endpoint's health. Cheap to clone; clones share all of it.
///
/// HTTP holds no connection between requests, so
/// [`connect`](Self::connect) builds the client and checks the
/// [`WebhookConfig`] without sending anything; an unreachable endpoint
/// shows in the first delivery's error and in [`health`](Transport::health).
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_webhook::{WebhookClient, WebhookConfig};
///
/// # async fn run() -> Result<(), watchtower::Error> {
/// let client = WebhookClient::connect(
///     WebhookConfig::new("https://example.com/hooks").secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
/// )
/// .await?;
/// let mut publisher = client.publisher();
/// publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WebhookClient {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) url: reqwest::Url,
    pub(crate) client: reqwest::Client,
    pub(crate) keys: KeyRing<Signer>,
    pub(crate) mode: ContentMode,
    pub(crate) max_payload: usize,
    pub(crate) max_response_body: usize,
    pub(crate) max_retry_after: Duration,
    pub(crate) rate: Option<RateLimiter>,
    /// Up while deliveries are attempted, Down while disabled.
    health: watch::Sender<Health>,
    disable_after: Option<Duration>,
    /// Whether the last attempt failed, read before taking the lock below
    /// on every success.
    failing: AtomicBool,
    /// When the current run of failures began.
    failing_since: Mutex<Option<Instant>>,
}

impl WebhookClient {
    /// Builds the HTTP client for `config`'s endpoint and checks the
    /// configuration. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if the URL is not an `http(s)` URL (or not
    /// `https` with [`https_only`](WebhookConfig::https_only)), no secret
    /// was given or one is malformed, an allow-list entry is malformed, the
    /// URL is an IP address the SSRF guard refuses, or the TLS or HTTP
    /// client cannot be set up.
    pub async fn connect(config: WebhookConfig) -> Result<WebhookClient, Error> {
        Self::from_config(config)
    }

    pub(crate) fn from_config(config: WebhookConfig) -> Result<WebhookClient, Error> {
        if let Some(err) = config.error {
            return Err(Error::config(err.to_string()));
        }
        let shown = watchtower::redact_url(&config.url);
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| Error::config(format!("webhook URL {shown:?} is invalid: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if !config.https_only => {}
            "http" => return Err(Error::config(format!("webhook URL {shown:?} is not https"))),
            other => {
                return Err(Error::config(format!(
                    "webhook URL {shown:?} has scheme {other:?}, expected http or https"
                )));
            }
        }
        if config.secrets.is_empty() {
            return Err(Error::config(format!("webhook endpoint {shown:?} has no secret")));
        }
        let guard = Guard::new(config.allow);
        if config.ssrf_guard {
            let literal = url.host_str().and_then(|host| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .ok()
            });
            if let Some(ip) = literal.filter(|ip| !guard.permits(*ip)) {
                return Err(Error::config(format!(
                    "webhook URL {shown:?}: {ip} is not a public address (refused by the SSRF guard; \
                     allow it explicitly if it is meant)"
                )));
            }
        }
        let tls = match config.tls {
            Some(tls) => tls,
            None => default_tls()?,
        };
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(USER_AGENT)
            .https_only(config.https_only)
            .tls_backend_preconfigured(tls);
        if config.ssrf_guard {
            client = client.dns_resolver(Arc::new(guard));
        }
        let client = client
            .build()
            .map_err(|e| Error::config(format!("webhook HTTP client: {}", e.without_url())))?;
        let name: Arc<str> = Arc::from(config.name.unwrap_or(shown));
        Ok(WebhookClient {
            shared: Arc::new(Shared {
                name,
                url,
                client,
                keys: KeyRing::new(config.secrets),
                mode: config.mode,
                max_payload: config.max_payload,
                max_response_body: config.max_response_body,
                max_retry_after: config.max_retry_after,
                rate: config.rate.map(|(n, per)| RateLimiter::new(n, per)),
                health: watch::Sender::new(Health::up(Self::SYSTEM)),
                disable_after: config.disable_after,
                failing: AtomicBool::new(false),
                failing_since: Mutex::new(None),
            }),
        })
    }

    /// A publisher to the endpoint: a `Service<Event>` making one signed
    /// POST per call. Publishers share the client's rate limit and health.
    pub fn publisher(&self) -> WebhookPublisher {
        WebhookPublisher::new(self.shared.clone())
    }

    /// The endpoint's name (by default its URL without credentials or query).
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// Whether the endpoint is disabled (a `410 Gone`, the
    /// [`disable_after`](WebhookConfig::disable_after) window, or
    /// [`disable`](Self::disable)); deliveries then fail with
    /// [`ErrorKind::Gone`](watchtower::ErrorKind::Gone) without a request.
    pub fn is_disabled(&self) -> bool {
        self.shared.disabled().is_some()
    }

    /// Every change between enabled ([`Status::Up`]) and disabled
    /// ([`Status::Down`], with the reason), as it happens: disabled by a
    /// `410 Gone`, by sustained failure
    /// ([`disable_after`](WebhookConfig::disable_after)) or by hand, and
    /// enabled again. The receiver starts at the current state. (Recent
    /// failures of an enabled endpoint show as
    /// [`Status::Degraded`] in [`health`](Transport::health), not here.)
    ///
    /// ```no_run
    /// # async fn watch(client: watchtower_webhook::WebhookClient) {
    /// let mut health = client.subscribe_health();
    /// while health.changed().await.is_ok() {
    ///     if let Some(reason) = health.borrow().reason() {
    ///         eprintln!("webhook endpoint {} disabled: {reason}", client.name());
    ///     }
    /// }
    /// # }
    /// ```
    pub fn subscribe_health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    /// Re-enables a disabled endpoint; its failure window starts afresh.
    pub fn enable(&self) {
        *self.shared.failing_since() = None;
        self.shared.failing.store(false, Ordering::Relaxed);
        self.shared.health.send_if_modified(|health| {
            let changed = health.status() != Status::Up;
            *health = Health::up(Self::SYSTEM);
            changed
        });
    }

    /// Disables the endpoint, as a `410 Gone` would.
    pub fn disable(&self, reason: impl Into<Arc<str>>) {
        self.shared.disable(reason.into());
    }

    /// Signs with `key` from now on, and with the keys in use until now for
    /// `grace` longer: during the grace period each request carries every
    /// signature, so a receiver that knows only the old key and one that
    /// knows only the new one both accept it. Applies to every publisher
    /// of this client. `Duration::ZERO` retires the old keys at once.
    pub fn rotate(&self, key: impl Into<Signer>, grace: Duration) {
        self.shared.keys.rotate(key.into(), grace);
    }

    /// The health now, without waiting: what [`Transport::health`] answers.
    pub(crate) fn health_now(&self) -> Health {
        self.shared.health_now()
    }
}

/// The endpoint's health from the publishers' recent outcomes:
/// [`Status::Up`] while the last attempt succeeded (or none was made),
/// [`Status::Degraded`] while the last attempt failed,
/// [`Status::Down`] while the endpoint is disabled. It sends no request
/// of its own: a webhook endpoint has no cheap probe, and a request would
/// be a delivery.
impl Transport for WebhookClient {
    const SYSTEM: &'static str = "webhook";

    fn health(&self) -> impl Future<Output = Health> + Send {
        std::future::ready(self.health_now())
    }
}

impl fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookClient")
            .field("name", &self.name)
            .field("keys", &self.keys.live_len())
            .field("mode", &self.mode)
            .field("health", &self.health_now())
            .finish()
    }
}

impl Shared {
    fn failing_since(&self) -> MutexGuard<'_, Option<Instant>> {
        self.failing_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn health_now(&self) -> Health {
        let health = self.health.borrow().clone();
        if health.status() == Status::Up && self.failing.load(Ordering::Relaxed) {
            return Health::degraded(WebhookClient::SYSTEM, "the last delivery failed");
        }
        health
    }

    /// Why the endpoint is disabled, if it is.
    pub(crate) fn disabled(&self) -> Option<String> {
        let health = self.health.borrow();
        (health.status() == Status::Down).then(|| health.reason().unwrap_or("disabled").to_owned())
    }

    /// Disables the endpoint unless it is already; true if it was active.
    pub(crate) fn disable(&self, reason: Arc<str>) -> bool {
        self.health.send_if_modified(|health| {
            if health.status() == Status::Down {
                return false;
            }
            *health = Health::down(WebhookClient::SYSTEM, reason.to_string());
            true
        })
    }

    /// Counts one attempt that reached the endpoint (or tried to), for the
    /// degraded health and [`WebhookConfig::disable_after`].
    pub(crate) fn track(&self, ok: bool) {
        if ok {
            if self.failing.swap(false, Ordering::Relaxed) {
                *self.failing_since() = None;
            }
            return;
        }
        self.failing.store(true, Ordering::Relaxed);
        let Some(window) = self.disable_after else {
            return;
        };
        let now = Instant::now();
        let since = *self.failing_since().get_or_insert(now);
        if now.duration_since(since) >= window {
            let reason = format!("every attempt failed for {}s", window.as_secs());
            if self.disable(Arc::from(reason)) {
                tracing::warn!(
                    endpoint = %self.name,
                    window_secs = window.as_secs(),
                    "webhook endpoint failed for the whole window and is disabled"
                );
            }
        }
    }

    pub(crate) fn error(&self, kind: ErrorKind, what: impl fmt::Display) -> Error {
        Error::new(kind, format!("endpoint {}: {what}", self.name))
    }

    pub(crate) fn transport_error(&self, err: reqwest::Error) -> Error {
        let err = err.without_url();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut innermost = String::new();
        while let Some(e) = cause {
            if let Some(refused) = e.downcast_ref::<Refused>() {
                return self.error(ErrorKind::Rejected, refused).with_retryable(false);
            }
            innermost = e.to_string();
            cause = e.source();
        }
        let kind = if err.is_timeout() {
            ErrorKind::Timeout
        } else if err.is_builder() {
            ErrorKind::Encode
        } else {
            ErrorKind::Connection
        };
        let outer = err.to_string();
        let message = if innermost.is_empty() || innermost == outer {
            outer
        } else {
            format!("{outer}: {innermost}")
        };
        self.error(kind, message).with_source(err)
    }
}

/// rustls with ring and the platform verifier, HTTP/1.1.
fn default_tls() -> Result<rustls::ClientConfig, Error> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
