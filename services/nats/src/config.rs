//! Connection settings: [`NatsConfig`], [`WhenDisconnected`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use watchtower::redact_url;

/// How the connection authenticates.
#[derive(Clone, Default)]
pub(crate) enum Auth {
    #[default]
    None,
    Token(String),
    UserPassword(String, String),
    NKey(String),
    CredsFile(PathBuf),
    Credentials(String),
}

impl Auth {
    fn name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Token(_) => "token",
            Auth::UserPassword(..) => "user/password",
            Auth::NKey(_) => "nkey",
            Auth::CredsFile(_) => "credentials file",
            Auth::Credentials(_) => "credentials",
        }
    }
}

/// What a publisher does while the connection is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenDisconnected {
    /// `poll_ready` stays pending until the connection is back: callers
    /// wait, nothing fails. The default, since it is what "not ready"
    /// means in tower.
    #[default]
    Wait,
    /// `poll_ready` is ready and calls fail at once with a retryable
    /// [`ErrorKind::Connection`](watchtower::ErrorKind::Connection) error,
    /// so that a circuit breaker, retry or dead-letter layer above can act.
    Fail,
}

/// Settings of a NATS connection: servers, credentials, TLS, timeouts,
/// reconnection; [`NatsClient::connect`](crate::NatsClient::connect)
/// takes it.
///
/// [`NatsConfig`] is validated when the connection is made
/// ([`NatsClient::connect`](crate::NatsClient::connect)): an unparsable
/// server address, two kinds of credentials at once or a credentials file
/// that cannot be read fail there with an
/// [`ErrorKind::Config`](watchtower::ErrorKind::Config) error, not later.
///
/// Secrets (token, password, nkey seed, credentials) never appear in its
/// `Debug` output or in errors; server URLs are shown with their user-info
/// removed.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use watchtower_nats::NatsConfig;
///
/// let config = NatsConfig::new("nats://127.0.0.1:4222")
///     .server("nats://127.0.0.1:4223")
///     .user_password("app", "s3cret")
///     .name("billing")
///     .connect_timeout(Duration::from_secs(2));
/// let shown = format!("{config:?}");
/// assert!(shown.contains("billing"));
/// assert!(!shown.contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct NatsConfig {
    pub(crate) servers: Vec<String>,
    pub(crate) auth: Auth,
    pub(crate) auth_set_twice: bool,
    pub(crate) name: Option<String>,
    pub(crate) tls_required: bool,
    pub(crate) tls_first: bool,
    pub(crate) root_certificates: Vec<PathBuf>,
    pub(crate) client_certificate: Option<(PathBuf, PathBuf)>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) max_reconnect_delay: Duration,
    pub(crate) max_reconnects: Option<usize>,
    pub(crate) retry_initial_connect: bool,
    pub(crate) subscription_capacity: usize,
    pub(crate) client_capacity: usize,
    pub(crate) when_disconnected: WhenDisconnected,
}

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 65_536;
const DEFAULT_CLIENT_CAPACITY: usize = 2048;

impl NatsConfig {
    /// Settings for one server (`nats://host:port`, `tls://host:port`, or
    /// `host:port`), with no credentials.
    pub fn new(server: impl Into<String>) -> NatsConfig {
        NatsConfig {
            servers: vec![server.into()],
            auth: Auth::None,
            auth_set_twice: false,
            name: None,
            tls_required: false,
            tls_first: false,
            root_certificates: Vec::new(),
            client_certificate: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            max_reconnect_delay: DEFAULT_MAX_RECONNECT_DELAY,
            max_reconnects: None,
            retry_initial_connect: false,
            subscription_capacity: DEFAULT_SUBSCRIPTION_CAPACITY,
            client_capacity: DEFAULT_CLIENT_CAPACITY,
            when_disconnected: WhenDisconnected::Wait,
        }
    }

    /// Adds a server to the list the client connects and fails over to.
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.servers.push(server.into());
        self
    }

    fn set_auth(mut self, auth: Auth) -> Self {
        if !matches!(self.auth, Auth::None) {
            self.auth_set_twice = true;
        }
        self.auth = auth;
        self
    }

    /// Authenticates with a token.
    pub fn token(self, token: impl Into<String>) -> Self {
        self.set_auth(Auth::Token(token.into()))
    }

    /// Authenticates with a user name and password.
    pub fn user_password(self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.set_auth(Auth::UserPassword(user.into(), password.into()))
    }

    /// Authenticates with an nkey seed (`SU...`).
    pub fn nkey(self, seed: impl Into<String>) -> Self {
        self.set_auth(Auth::NKey(seed.into()))
    }

    /// Authenticates with a `.creds` file (JWT and nkey seed), read at
    /// connect time.
    pub fn credentials_file(self, path: impl Into<PathBuf>) -> Self {
        self.set_auth(Auth::CredsFile(path.into()))
    }

    /// Authenticates with the contents of a `.creds` file.
    pub fn credentials(self, creds: impl Into<String>) -> Self {
        self.set_auth(Auth::Credentials(creds.into()))
    }

    /// The connection name shown by the server's monitoring.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Requires TLS (also implied by `tls://` URLs). TLS uses rustls.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.tls_required = required;
        self
    }

    /// Starts TLS before the server's `INFO` (servers with
    /// `handshake_first`).
    pub fn tls_first(mut self) -> Self {
        self.tls_first = true;
        self.tls_required = true;
        self
    }

    /// Trusts the CA certificates in this PEM file, in addition to the
    /// system's.
    pub fn root_certificate(mut self, pem: impl Into<PathBuf>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM) for mutual TLS.
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// How long one connection attempt may take. Default 5 s, async-nats'
    /// own connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long JetStream API calls, publish acknowledgements and the
    /// health round trip may take. Default 5 s, the JetStream client
    /// default.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How often the client pings the server. Default 10 s: frequent
    /// enough to notice a dead connection in about 20 s (two missed pongs)
    /// without measurable traffic.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// The longest pause between reconnect attempts. Default 2 s:
    /// attempts back off exponentially (with full jitter) from 10 ms up to
    /// this, so a restarted server is found again within a couple of
    /// seconds.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// Gives up after this many failed reconnect attempts in a row; the
    /// connection is then closed for good. Default: never give up.
    pub fn max_reconnects(mut self, attempts: usize) -> Self {
        self.max_reconnects = Some(attempts);
        self
    }

    /// Keeps trying when the first connection fails instead of returning
    /// the error (publishers stay not ready until it succeeds).
    pub fn retry_initial_connect(mut self, retry: bool) -> Self {
        self.retry_initial_connect = retry;
        self
    }

    /// Messages a core subscription buffers before the client drops them
    /// (reported as [`ErrorKind::Dropped`](watchtower::ErrorKind::Dropped)
    /// items). Default 65 536 messages, async-nats' default.
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity;
        self
    }

    /// Outgoing commands the client queues before publishes wait. Default
    /// 2048, async-nats' default outgoing queue.
    pub fn client_capacity(mut self, capacity: usize) -> Self {
        self.client_capacity = capacity;
        self
    }

    /// What publishers on this connection do while it is down. Default
    /// [`WhenDisconnected::Wait`].
    pub fn when_disconnected(mut self, policy: WhenDisconnected) -> Self {
        self.when_disconnected = policy;
        self
    }

    /// The server list with credentials removed, for messages.
    pub(crate) fn servers_redacted(&self) -> String {
        self.servers
            .iter()
            .map(|s| redact_url(s))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Default for NatsConfig {
    /// `nats://127.0.0.1:4222`, no credentials.
    fn default() -> Self {
        NatsConfig::new("nats://127.0.0.1:4222")
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        let mut d = f.debug_struct("NatsConfig");
        d.field("servers", &servers).field("auth", &self.auth.name());
        if let Auth::UserPassword(user, _) = &self.auth {
            d.field("user", user);
        }
        if let Auth::CredsFile(path) = &self.auth {
            d.field("credentials_file", path);
        }
        d.field("name", &self.name)
            .field("tls_required", &self.tls_required)
            .field("root_certificates", &self.root_certificates)
            .field(
                "client_certificate",
                &self.client_certificate.as_ref().map(|(cert, _)| cert),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("max_reconnects", &self.max_reconnects)
            .field("retry_initial_connect", &self.retry_initial_connect)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("when_disconnected", &self.when_disconnected)
            .finish()
    }
}
