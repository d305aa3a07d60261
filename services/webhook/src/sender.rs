//! [`WebhookSender`]: signed delivery of events to one HTTP endpoint.
//!
//! Each event is POSTed with the Standard Webhooks headers: `webhook-id`
//! (the event id, the same on every retry so the receiver can deduplicate),
//! `webhook-timestamp` (fresh per attempt) and `webhook-signature` (one
//! signature per active key over the exact bytes sent: `v1,` for a shared
//! secret, `v1a,` for an Ed25519 signing key). The body
//! is the CloudEvents structured JSON by default, or the event's data with
//! `ce-` headers in [`ContentMode::Binary`].
//!
//! The answer decides the result:
//!
//! | answer | result |
//! |---|---|
//! | 2xx | `Ok(Receipt)` |
//! | 3xx | [`ErrorKind::Rejected`], not retryable: redirects are not followed |
//! | 410 | [`ErrorKind::Gone`]; the endpoint is disabled until [`WebhookSender::enable`] |
//! | 429, 502, 503, 504 | [`ErrorKind::Throttled`], retryable, with `Retry-After` as [`Error::retry_after`] (capped, see [`max_retry_after`](WebhookSenderBuilder::max_retry_after)) |
//! | 409 | [`ErrorKind::Rejected`], not retryable: see below |
//! | other 4xx | [`ErrorKind::Rejected`], not retryable |
//! | other 5xx | [`ErrorKind::Other`], retryable (the endpoint failed, not the event) |
//! | timeout | [`ErrorKind::Timeout`], retryable |
//! | connection failure | [`ErrorKind::Connection`], retryable |
//! | address refused by the SSRF guard | [`ErrorKind::Rejected`], not retryable |
//!
//! # Disabled endpoints
//!
//! An endpoint is disabled by a `410 Gone`, by [`WebhookSender::disable`],
//! or, with [`disable_after`](WebhookSenderBuilder::disable_after), when
//! every attempt has failed for a whole window. A disabled endpoint fails
//! each delivery with [`ErrorKind::Gone`] without a request (a dead-letter
//! layer then keeps the events) until [`WebhookSender::enable`]. Every
//! change of [`Health`] is published on a `tokio::sync::watch` channel
//! ([`WebhookSender::subscribe_health`]), so the application can tell the
//! endpoint's owner.
//!
//! # Key rotation
//!
//! [`WebhookSender::rotate`] starts signing with a new key at run time and
//! keeps signing with the old ones for a grace period, so every request
//! carries both signatures (space-separated, as the specification allows)
//! until the receiver has the new key; a receiver holding either accepts.
//!
//! Retries, circuit breaking and dead-lettering are layers on top; the
//! sender makes one attempt per call.
//!
//! A `409 Conflict` is final. Receivers that deduplicate by `webhook-id`
//! answer it when they already hold the id, so every retry with the same id
//! would conflict again; the event goes to the dead-letter queue, where the
//! answer can be looked at, instead of being retried until the schedule
//! runs out. (This crate's receiver never answers `409`: a duplicate of a
//! handled delivery gets `200`, an attempt still in progress `503`.)
//!
//! `Retry-After` is read as delay-seconds or an HTTP date; a number too
//! large for 64 bits saturates, and any hint is capped at
//! [`max_retry_after`](WebhookSenderBuilder::max_retry_after), so that an
//! endpoint cannot park an event (or overflow a timer) with
//! `Retry-After: 18446744073709551615`.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use watchtower::{Event, PublishExt};
//! use watchtower_webhook::WebhookSender;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let mut sender = WebhookSender::builder("https://example.com/hooks")
//!     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .timeout(Duration::from_secs(20))
//!     .rate_limit(50, Duration::from_secs(1))
//!     .build()?;
//! let receipt = sender.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! println!("delivered {}", receipt.event_id);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::Service;
use watchtower::codec::{self, Binding};
use watchtower::{Error, ErrorKind, Event, Receipt};

use crate::rate::RateLimiter;
use crate::signature::{self, KeyRing, Secret, Signer, SigningKey};
use crate::ssrf::{AllowList, Guard, Refused};

/// The `webhook-id` header.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The `webhook-timestamp` header.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The `webhook-signature` header.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The extension the fan-out sets on each endpoint's copy of an event, so
/// that a dead-letter queue shows which endpoint failed. The sender does not
/// send it.
pub const ENDPOINT_EXTENSION: &str = "webhookendpoint";

/// 15 s: the lower end of the Standard Webhooks recommendation (15–30 s),
/// so that a hanging endpoint holds a connection for as short a time as the
/// spec allows.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// 5 s to establish a connection; a healthy endpoint connects in far less.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// 1 MiB: large enough for any reasonable event, small enough that an
/// oversized one is caught here rather than by the receiver's limit.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// 4 KiB of a response body is read (for error messages); the rest is
/// never read, so an endpoint cannot make the sender buffer megabytes.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 4 * 1024;

const USER_AGENT: &str = concat!("watchtower-webhook/", env!("CARGO_PKG_VERSION"));

/// How the event travels in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// The CloudEvents JSON document as body, `application/cloudevents+json`.
    #[default]
    Structured,
    /// The event's data as body, its type in `content-type`, attributes in
    /// `ce-` headers (CloudEvents HTTP binary mode).
    ///
    /// The Standard Webhooks signature covers the id, the timestamp and the
    /// body, not the `ce-` headers, so this crate's receiver refuses binary
    /// mode unless told otherwise
    /// ([`WebhookVerifier::binary_mode`](crate::WebhookVerifier::binary_mode)).
    Binary,
}

/// Whether an endpoint takes deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Deliveries are attempted.
    Active,
    /// The endpoint answered `410 Gone`, failed for the whole
    /// [`disable_after`](WebhookSenderBuilder::disable_after) window, or was
    /// disabled by hand; deliveries fail with [`ErrorKind::Gone`] without a
    /// request until [`WebhookSender::enable`].
    Disabled {
        /// Why it was disabled.
        reason: Arc<str>,
    },
}

impl Health {
    /// Whether deliveries are attempted.
    pub fn is_active(&self) -> bool {
        matches!(self, Health::Active)
    }
}

/// Sends events to one webhook endpoint; a `Service<Event>`. See the
/// [module docs](self).
///
/// Clones share the endpoint: its HTTP connection pool, its rate limit and
/// its health.
pub struct WebhookSender {
    shared: Arc<Shared>,
    slot: Slot,
}

/// The rate-limit reservation of one clone.
enum Slot {
    None,
    Waiting(Pin<Box<Sleep>>),
    Reserved,
}

struct Shared {
    name: Arc<str>,
    url: reqwest::Url,
    client: reqwest::Client,
    keys: KeyRing<Signer>,
    mode: ContentMode,
    max_payload: usize,
    max_response_body: usize,
    max_retry_after: Duration,
    rate: Option<RateLimiter>,
    health: watch::Sender<Health>,
    disable_after: Option<Duration>,
    /// Whether the last attempt failed, read before taking the lock below
    /// on every success.
    failing: AtomicBool,
    /// When the current run of failures began.
    failing_since: Mutex<Option<Instant>>,
}

impl WebhookSender {
    /// A builder for a sender to `url`.
    pub fn builder(url: impl Into<String>) -> WebhookSenderBuilder {
        WebhookSenderBuilder::new(url.into())
    }

    /// The endpoint's name (by default its URL without credentials or query).
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// Whether the endpoint takes deliveries.
    pub fn health(&self) -> Health {
        self.shared.health.borrow().clone()
    }

    /// Every change of the endpoint's [`Health`], as it happens: disabled
    /// by a `410 Gone`, by sustained failure
    /// ([`disable_after`](WebhookSenderBuilder::disable_after)) or by hand,
    /// and enabled again. The receiver starts at the current health.
    ///
    /// ```no_run
    /// # async fn watch(sender: watchtower_webhook::WebhookSender) {
    /// let mut health = sender.subscribe_health();
    /// while health.changed().await.is_ok() {
    ///     if let watchtower_webhook::Health::Disabled { reason } = &*health.borrow() {
    ///         eprintln!("webhook endpoint {} disabled: {reason}", sender.name());
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
            let changed = !health.is_active();
            *health = Health::Active;
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
    /// knows only the new one both accept it. Applies to every clone.
    /// `Duration::ZERO` retires the old keys at once.
    pub fn rotate(&self, key: impl Into<Signer>, grace: Duration) {
        self.shared.keys.rotate(key.into(), grace);
    }
}

impl Clone for WebhookSender {
    fn clone(&self) -> Self {
        WebhookSender {
            shared: self.shared.clone(),
            slot: Slot::None,
        }
    }
}

impl fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSender")
            .field("name", &self.shared.name)
            .field("keys", &self.shared.keys.live_len())
            .field("mode", &self.shared.mode)
            .field("health", &self.health())
            .finish()
    }
}

impl Service<Event> for WebhookSender {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some(rate) = &self.shared.rate else {
            return Poll::Ready(Ok(()));
        };
        loop {
            match &mut self.slot {
                Slot::Reserved => return Poll::Ready(Ok(())),
                Slot::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.slot = Slot::Reserved;
                }
                Slot::None => {
                    let start = rate.reserve();
                    self.slot = if start <= Instant::now() {
                        Slot::Reserved
                    } else {
                        Slot::Waiting(Box::pin(tokio::time::sleep_until(start)))
                    };
                }
            }
        }
    }

    fn call(&mut self, event: Event) -> ResponseFuture {
        if let (Some(rate), Slot::None | Slot::Waiting(_)) = (&self.shared.rate, &self.slot) {
            // Called without waiting for readiness: take a slot anyway, so
            // the budget still counts this request.
            rate.reserve();
        }
        self.slot = Slot::None;
        ResponseFuture {
            inner: Box::pin(deliver(self.shared.clone(), event)),
        }
    }
}

/// The future of one delivery.
///
/// Boxed: it holds an HTTP exchange, whose cost dwarfs one allocation.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>,
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Shared {
    fn failing_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.failing_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Disables the endpoint unless it is already; true if it was active.
    fn disable(&self, reason: Arc<str>) -> bool {
        self.health.send_if_modified(|health| {
            if !health.is_active() {
                return false;
            }
            *health = Health::Disabled { reason };
            true
        })
    }

    /// Counts one attempt that reached the endpoint (or tried to), for
    /// [`WebhookSenderBuilder::disable_after`].
    fn track(&self, ok: bool) {
        let Some(window) = self.disable_after else {
            return;
        };
        if ok {
            if self.failing.swap(false, Ordering::Relaxed) {
                *self.failing_since() = None;
            }
            return;
        }
        self.failing.store(true, Ordering::Relaxed);
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

    fn error(&self, kind: ErrorKind, what: impl fmt::Display) -> Error {
        Error::new(kind, format!("endpoint {}: {what}", self.name))
    }

    fn transport_error(&self, err: reqwest::Error) -> Error {
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

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn header_value(shared: &Shared, what: &str, value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value).map_err(|_| {
        shared.error(
            ErrorKind::InvalidEvent,
            format_args!("{what} is not a valid HTTP header value"),
        )
    })
}

/// The request body and the headers that describe it.
fn encode(shared: &Shared, event: &Event) -> Result<(Bytes, HeaderMap), Error> {
    let mut headers = HeaderMap::new();
    let body = match shared.mode {
        ContentMode::Structured => {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(codec::CLOUDEVENTS_JSON),
            );
            codec::structured::to_bytes(event)?
        }
        ContentMode::Binary => {
            let mut failed = None;
            Binding::HTTP.write_headers(event, |name, value| {
                match (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    (Ok(name), Ok(value)) => {
                        headers.insert(name, value);
                    }
                    _ => failed = Some(name.to_owned()),
                }
            });
            if let Some(name) = failed {
                return Err(shared.error(
                    ErrorKind::Encode,
                    format_args!("attribute header {name:?} cannot be sent over HTTP"),
                ));
            }
            event.data().cloned().unwrap_or_default()
        }
    };
    Ok((body, headers))
}

async fn deliver(shared: Arc<Shared>, event: Event) -> Result<Receipt, Error> {
    if let Health::Disabled { reason } = &*shared.health.borrow() {
        return Err(shared.error(ErrorKind::Gone, format_args!("disabled: {reason}")));
    }
    let wire = if event.extension(ENDPOINT_EXTENSION).is_some() {
        let mut wire = event.clone();
        wire.remove_extension(ENDPOINT_EXTENSION);
        wire
    } else {
        event.clone()
    };
    let (body, mut headers) = encode(&shared, &wire)?;
    if body.len() > shared.max_payload {
        return Err(shared
            .error(
                ErrorKind::Rejected,
                format_args!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    body.len(),
                    shared.max_payload
                ),
            )
            .with_retryable(false));
    }
    let timestamp = unix_now();
    let signature = shared
        .keys
        .with_live(|keys| signature::sign_with(keys, wire.id(), timestamp, &body));
    headers.insert(WEBHOOK_ID, header_value(&shared, "the event id", wire.id())?);
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    headers.insert(
        WEBHOOK_SIGNATURE,
        header_value(&shared, "the signature", &signature)?,
    );

    let sent = shared
        .client
        .post(shared.url.clone())
        .headers(headers)
        .body(body)
        .send()
        .await;
    let result = match sent {
        Ok(response) => classify(&shared, response, &event).await,
        Err(err) => Err(shared.transport_error(err)),
    };
    shared.track(result.is_ok());
    result
}

async fn classify(shared: &Shared, mut response: reqwest::Response, event: &Event) -> Result<Receipt, Error> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(parse_retry_after)
        .map(|after| after.min(shared.max_retry_after));
    let body = read_bounded(&mut response, shared.max_response_body).await;
    if status.is_success() {
        return Ok(Receipt::new(shared.name.clone(), event));
    }
    let answered = Answer { status, body: &body };
    let err = match status.as_u16() {
        300..=399 => shared
            .error(
                ErrorKind::Rejected,
                format_args!("{answered} (redirects are not followed)"),
            )
            .with_retryable(false),
        410 => {
            let reason: Arc<str> = Arc::from(format!("answered {status}"));
            shared.disable(reason);
            tracing::warn!(endpoint = %shared.name, "webhook endpoint answered 410 Gone and is disabled");
            shared.error(ErrorKind::Gone, format_args!("{answered}; endpoint disabled"))
        }
        429 | 502 | 503 | 504 => {
            let err = shared.error(ErrorKind::Throttled, answered);
            match retry_after {
                Some(after) => err.with_retry_after(after),
                None => err,
            }
        }
        409 => shared
            .error(
                ErrorKind::Rejected,
                format_args!("{answered} (the endpoint already holds this webhook-id)"),
            )
            .with_retryable(false),
        400..=499 => shared.error(ErrorKind::Rejected, answered).with_retryable(false),
        // The endpoint failed, not the event: `Other` (retryable) counts
        // against a circuit breaker, where `Rejected` would not.
        500..=599 => shared.error(ErrorKind::Other, answered).with_retryable(true),
        _ => shared.error(ErrorKind::Other, answered),
    };
    Err(err)
}

/// "answered 404 Not Found: <start of the body>", for error messages.
struct Answer<'a> {
    status: StatusCode,
    body: &'a [u8],
}

impl fmt::Display for Answer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "answered {}", self.status)?;
        let text: String = String::from_utf8_lossy(self.body)
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        if !text.trim().is_empty() {
            write!(f, ": {}", text.trim())?;
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes of the body; the answer is the status, so a
/// body that fails to arrive changes nothing.
async fn read_bounded(response: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// `Retry-After` as delay-seconds (digits only; a number past `u64::MAX`
/// saturates to it) or an HTTP date (a past date is zero). `None` for
/// anything else. Never panics; cap the result before adding it to an
/// instant, as the sender does with
/// [`max_retry_after`](WebhookSenderBuilder::max_retry_after).
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    parse_retry_after_bytes(value.as_bytes())
}

/// [`parse_retry_after`] of raw header bytes.
#[doc(hidden)]
pub fn parse_retry_after_bytes(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Configures a [`WebhookSender`]; from [`WebhookSender::builder`].
pub struct WebhookSenderBuilder {
    url: String,
    name: Option<String>,
    secrets: Vec<Signer>,
    error: Option<Error>,
    mode: ContentMode,
    timeout: Duration,
    connect_timeout: Duration,
    max_payload: usize,
    max_response_body: usize,
    max_retry_after: Duration,
    https_only: bool,
    ssrf_guard: bool,
    allow: AllowList,
    rate: Option<(u32, Duration)>,
    disable_after: Option<Duration>,
    tls: Option<rustls::ClientConfig>,
}

impl fmt::Debug for WebhookSenderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSenderBuilder")
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

impl WebhookSenderBuilder {
    fn new(url: String) -> Self {
        WebhookSenderBuilder {
            url,
            name: None,
            secrets: Vec::new(),
            error: None,
            mode: ContentMode::Structured,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
            max_retry_after: Duration::from_secs(60 * 60),
            https_only: false,
            ssrf_guard: true,
            allow: AllowList::new(),
            rate: None,
            disable_after: None,
            tls: None,
        }
    }

    /// Names the endpoint in errors, receipts and fan-out reports (default:
    /// the URL without credentials or query).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Adds a signing key: a shared secret `whsec_<base64>` (`v1`
    /// signatures) or an Ed25519 signing key `whsk_<base64>` (`v1a`). With
    /// several, each request carries one signature per key (for rotation).
    /// At least one is required; a bad one fails [`build`](Self::build).
    pub fn secret(mut self, secret: &str) -> Self {
        match Signer::new(secret) {
            Ok(key) => self.secrets.push(key),
            Err(err) => {
                self.error.get_or_insert(err);
            }
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

    /// Chooses structured (default) or binary mode.
    pub fn mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }

    /// Binary mode: `ce-` headers, the data as body.
    pub fn binary_mode(self) -> Self {
        self.mode(ContentMode::Binary)
    }

    /// The time one request may take, body included (default
    /// [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The time connecting may take (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest body sent (default [`DEFAULT_MAX_PAYLOAD`]); a larger
    /// event fails with a non-retryable [`ErrorKind::Rejected`].
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How much of a response body is read (default
    /// [`DEFAULT_MAX_RESPONSE_BODY`]).
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

    /// Refuses `http://` URLs (default: off, both are allowed).
    pub fn https_only(mut self, https_only: bool) -> Self {
        self.https_only = https_only;
        self
    }

    /// Turns the SSRF guard off or on (default: on). Off lets the sender
    /// connect to any address; only for trusted URLs.
    pub fn ssrf_guard(mut self, enabled: bool) -> Self {
        self.ssrf_guard = enabled;
        self
    }

    /// Lets an address or CIDR network through the SSRF guard
    /// (`127.0.0.1`, `10.0.0.0/8`); a malformed one fails
    /// [`build`](Self::build).
    pub fn allow(mut self, net: &str) -> Self {
        if let Err(err) = self.allow.add(net) {
            self.error.get_or_insert(err);
        }
        self
    }

    /// Replaces the SSRF guard's allow-list.
    pub fn allow_list(mut self, allow: AllowList) -> Self {
        self.allow = allow;
        self
    }

    /// At most `requests` per `per` to this endpoint, in bursts of up to
    /// `requests` (default: unlimited). The sender is not ready while it
    /// waits for a slot.
    pub fn rate_limit(mut self, requests: u32, per: Duration) -> Self {
        self.rate = Some((requests, per));
        self
    }

    /// Disables the endpoint once every attempt has failed for `window`:
    /// when an attempt fails `window` or more after the first failure since
    /// the last success (default: never; only a `410 Gone` disables). A
    /// failure is any answer but 2xx, a timeout or a connection failure;
    /// an event refused before sending (too large, not encodable) does not
    /// count. The change is published on
    /// [`subscribe_health`](WebhookSender::subscribe_health). Standard
    /// Webhooks senders commonly use days (Svix: 5 days), long enough to
    /// outlast an outage and a weekend.
    pub fn disable_after(mut self, window: Duration) -> Self {
        self.disable_after = Some(window);
        self
    }

    /// The TLS configuration (default: rustls with the ring provider and
    /// the platform's certificate verifier).
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Builds the sender.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the URL is not an `http(s)` URL (or not
    /// `https` with [`https_only`](Self::https_only)), no secret was given or
    /// one is malformed, an allow-list entry is malformed, the URL is an IP
    /// address the SSRF guard refuses, or the TLS or HTTP client cannot be
    /// set up.
    pub fn build(self) -> Result<WebhookSender, Error> {
        if let Some(err) = self.error {
            return Err(err);
        }
        let shown = watchtower::redact_url(&self.url);
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| Error::config(format!("webhook URL {shown:?} is invalid: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if !self.https_only => {}
            "http" => return Err(Error::config(format!("webhook URL {shown:?} is not https"))),
            other => {
                return Err(Error::config(format!(
                    "webhook URL {shown:?} has scheme {other:?}, expected http or https"
                )));
            }
        }
        if self.secrets.is_empty() {
            return Err(Error::config(format!("webhook endpoint {shown:?} has no secret")));
        }
        let guard = Guard::new(self.allow);
        if self.ssrf_guard {
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
        let tls = match self.tls {
            Some(tls) => tls,
            None => default_tls()?,
        };
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .user_agent(USER_AGENT)
            .https_only(self.https_only)
            .tls_backend_preconfigured(tls);
        if self.ssrf_guard {
            client = client.dns_resolver(Arc::new(guard));
        }
        let client = client
            .build()
            .map_err(|e| Error::config(format!("webhook HTTP client: {}", e.without_url())))?;
        let name: Arc<str> = Arc::from(self.name.unwrap_or(shown));
        Ok(WebhookSender {
            shared: Arc::new(Shared {
                name,
                url,
                client,
                keys: KeyRing::new(self.secrets),
                mode: self.mode,
                max_payload: self.max_payload,
                max_response_body: self.max_response_body,
                max_retry_after: self.max_retry_after,
                rate: self.rate.map(|(n, per)| RateLimiter::new(n, per)),
                health: watch::Sender::new(Health::Active),
                disable_after: self.disable_after,
                failing: AtomicBool::new(false),
                failing_since: Mutex::new(None),
            }),
            slot: Slot::None,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("7")),
            Some(Duration::from_secs(7))
        );
        let later = SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        let parsed = parse_retry_after(&HeaderValue::from_str(&date).unwrap()).unwrap();
        assert!(
            parsed <= Duration::from_secs(120) && parsed >= Duration::from_secs(100),
            "{parsed:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&past).unwrap()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn retry_after_saturates_and_refuses_what_is_not_a_number_or_date() {
        let max = Some(Duration::from_secs(u64::MAX));
        for (text, expect) in [
            ("18446744073709551615", max),
            ("18446744073709551616", max),
            ("99999999999999999999999999999999999999", max),
            ("0", Some(Duration::ZERO)),
            (" 12 ", Some(Duration::from_secs(12))),
            ("-1", None),
            ("+5", None),
            ("1.5", None),
            ("", None),
            ("Fri, 31 Dec 9999 23:59:59 GMT", None),
        ] {
            let got = parse_retry_after_bytes(text.as_bytes());
            if text.starts_with("Fri") {
                assert!(got.is_some_and(|d| d > Duration::from_secs(200 * 365 * 86_400)));
            } else {
                assert_eq!(got, expect, "{text:?}");
            }
        }
        assert_eq!(parse_retry_after_bytes(&[0xff, b'1']), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_holds_readiness_across_clones() {
        use futures_util::FutureExt;
        use tower::ServiceExt;

        let sender = WebhookSender::builder("https://x.example/")
            .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .rate_limit(2, Duration::from_secs(1))
            .build()
            .unwrap();
        let mut a = sender.clone();
        let mut b = sender.clone();
        let event = || Event::new("t", serde_json::json!({}));
        for _ in 0..2 {
            assert!(matches!(a.ready().now_or_never(), Some(Ok(_))));
            // The future is lazy: dropping it sends nothing.
            drop(a.call(event()));
        }
        assert!(a.ready().now_or_never().is_none(), "the burst is spent");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(a.ready().now_or_never().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(a.ready().now_or_never(), Some(Ok(_))));
        // The clone shares the budget: its slot comes 500 ms later.
        assert!(b.ready().now_or_never().is_none());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(b.ready().now_or_never(), Some(Ok(_))));
    }

    #[test]
    fn configuration_is_checked_at_build() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let kind = |b: WebhookSenderBuilder| b.build().unwrap_err().kind();
        assert_eq!(
            kind(WebhookSender::builder("not a url").secret(secret)),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookSender::builder("ftp://x.example/").secret(secret)),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookSender::builder("https://x.example/")),
            ErrorKind::Config
        );
        assert_eq!(
            kind(
                WebhookSender::builder("http://x.example/")
                    .secret(secret)
                    .https_only(true)
            ),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookSender::builder("https://x.example/").secret("whsec_short")),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookSender::builder("http://10.0.0.1/").secret(secret)),
            ErrorKind::Config
        );
        assert_eq!(
            kind(WebhookSender::builder("http://[fd00::1]/").secret(secret)),
            ErrorKind::Config
        );
        let ok = WebhookSender::builder("https://user:pw@x.example/hook?token=t")
            .secret(secret)
            .build()
            .unwrap();
        assert_eq!(&**ok.name(), "https://***@x.example/hook");
        let shown = format!("{ok:?}");
        assert!(!shown.contains("pw") && !shown.contains("MfKQ"), "{shown}");
        assert!(
            WebhookSender::builder("http://10.0.0.1/")
                .secret(secret)
                .allow("10.0.0.0/8")
                .build()
                .is_ok()
        );
    }
}
