//! Shared test helpers: a real axum server on 127.0.0.1 and a sender
//! builder that may reach it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use watchtower_webhook::{WebhookClient, WebhookConfig, WebhookPublisher};

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const OTHER_SECRET: &str = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXkhIQ==";

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Serves `router` on a fresh 127.0.0.1 port.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// A port nothing listens on.
pub async fn dead_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A configuration for `url` with the test secret, 127.0.0.1 allowed.
pub fn sender(url: impl Into<String>) -> WebhookConfig {
    WebhookConfig::new(url).secret(SECRET).allow("127.0.0.1")
}

/// `WebhookClient::connect`, for configurations the test knows are valid.
pub trait Connect {
    /// The client.
    async fn connect(self) -> WebhookClient;
    /// A publisher of a fresh client.
    async fn publisher(self) -> WebhookPublisher;
}

impl Connect for WebhookConfig {
    async fn connect(self) -> WebhookClient {
        WebhookClient::connect(self).await.unwrap()
    }

    async fn publisher(self) -> WebhookPublisher {
        self.connect().await.publisher()
    }
}

/// A counter that can be awaited.
#[derive(Clone, Default)]
pub struct Counter {
    n: Arc<AtomicUsize>,
    changed: Arc<Notify>,
}

impl Counter {
    pub fn incr(&self) -> usize {
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed.notify_waiters();
        n
    }

    pub fn get(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    pub async fn wait_for(&self, n: usize) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.get() >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("counter stayed at {} below {n}", self.get()));
    }
}

/// A plain HTTP client for hand-made requests (rustls with ring, no roots:
/// tests speak plain HTTP to 127.0.0.1).
pub fn raw_client() -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .unwrap()
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A verifying receiver that records how often it handled each
/// `webhook-id`.
#[derive(Clone)]
pub struct Recorder {
    pub url: String,
    pub ids: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Events handled.
    pub handled: Counter,
    /// Requests seen (handled or not).
    pub requests: Counter,
}

impl Recorder {
    /// Distinct ids handled, and whether each was handled exactly once.
    pub fn distinct_once(&self) -> (usize, bool) {
        let ids = self.ids.lock().unwrap();
        (ids.len(), ids.values().all(|&n| n == 1))
    }
}

/// What a [`Recorder`] answers besides handling.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Verify and handle every request.
    Healthy,
    /// Answer every `n`th request `429` with `Retry-After: 1`, handle the rest.
    ThrottleEvery(usize),
    /// Answer every request with this status.
    Always(u16),
}

pub async fn recorder(behaviour: Behaviour) -> Recorder {
    use http_body_util::Full;
    use tower::{Layer, Service};
    use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};

    let ids: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let handled = Counter::default();
    let requests = Counter::default();
    let handler = {
        let ids = ids.clone();
        let handled = handled.clone();
        tower::service_fn(move |event: watchtower::Event| {
            *ids.lock().unwrap().entry(event.id().to_owned()).or_default() += 1;
            handled.incr();
            async { Ok::<_, watchtower::Error>(()) }
        })
    };
    let verifier = WebhookVerifier::new([SECRET]).unwrap();
    let inner = WebhookReceiverLayer::new(verifier).layer(handler);
    let seen = requests.clone();
    let service = tower::service_fn(move |request: http::Request<axum::body::Body>| {
        let mut inner = inner.clone();
        let n = seen.incr();
        async move {
            let status = match behaviour {
                Behaviour::Healthy => None,
                Behaviour::ThrottleEvery(k) => (n % k == 0).then_some(429),
                Behaviour::Always(code) => Some(code),
            };
            match status {
                None => inner.call(request).await,
                Some(code) => {
                    let mut response = http::Response::new(Full::new(bytes::Bytes::new()));
                    *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
                    response
                        .headers_mut()
                        .insert("retry-after", http::HeaderValue::from_static("1"));
                    Ok(response)
                }
            }
        }
    });
    let addr = serve(axum::Router::new().route_service("/hooks", service)).await;
    Recorder {
        url: format!("http://{addr}/hooks"),
        ids,
        handled,
        requests,
    }
}
