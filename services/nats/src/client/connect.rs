//! Making the connection: the server list checked, the configuration
//! turned into async-nats options, connect errors mapped to error kinds.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use watchtower::backoff::{Backoff, Jitter};
use watchtower::{Error, ErrorKind};

use super::state::ConnState;
use crate::config::{Auth, NatsConfig};

/// The first pause before a reconnect attempt; later ones double up to
/// [`NatsConfig::max_reconnect_delay`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(10);

pub(super) fn parse_servers(config: &NatsConfig) -> Result<Vec<ServerAddr>, Error> {
    if config.servers.is_empty() {
        return Err(Error::config("no NATS server given"));
    }
    if config.auth_set_twice {
        return Err(Error::config(
            "more than one kind of NATS credentials given (token, user/password, nkey, credentials)",
        ));
    }
    if config.subscription_capacity == 0 || config.client_capacity == 0 {
        return Err(Error::config(
            "NATS subscription and client capacities must be at least 1",
        ));
    }
    if config.connect_timeout.is_zero() || config.request_timeout.is_zero() {
        return Err(Error::config(
            "NATS connect and request timeouts must be positive",
        ));
    }
    config
        .servers
        .iter()
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|_| {
                Error::config(format!(
                    "invalid NATS server address {:?}",
                    watchtower::redact_url(s)
                ))
            })
        })
        .collect()
}

pub(super) async fn options(config: &NatsConfig, state: Arc<ConnState>) -> Result<ConnectOptions, Error> {
    let mut options = ConnectOptions::new();
    options = match &config.auth {
        Auth::None => options,
        Auth::Token(token) => options.token(token.clone()),
        Auth::UserPassword(user, password) => options.user_and_password(user.clone(), password.clone()),
        Auth::NKey(seed) => options.nkey(seed.clone()),
        Auth::CredsFile(path) => options.credentials_file(path).await.map_err(|e| {
            Error::config(format!(
                "cannot read NATS credentials file {}: {}",
                path.display(),
                e.kind()
            ))
        })?,
        Auth::Credentials(creds) => options
            .credentials(creds)
            .map_err(|_| Error::config("NATS credentials are not a valid .creds document"))?,
    };
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if config.tls_first {
        options = options.tls_first();
    }
    for pem in &config.root_certificates {
        options = options.add_root_certificates(pem.clone());
    }
    if let Some((cert, key)) = &config.client_certificate {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let backoff = Backoff::new(FIRST_RECONNECT_DELAY, config.max_reconnect_delay).jitter(Jitter::Full);
    options = options
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .ping_interval(config.ping_interval)
        .subscription_capacity(config.subscription_capacity)
        .client_capacity(config.client_capacity)
        .max_reconnects(config.max_reconnects)
        .reconnect_delay_callback(move |attempts| backoff.delay(u32::try_from(attempts).unwrap_or(u32::MAX)))
        .event_callback(move |event| {
            state.on_event(event);
            std::future::ready(())
        });
    if config.retry_initial_connect {
        options = options.retry_on_initial_connect();
    }
    Ok(options)
}

pub(super) fn connect_error(servers: &str, e: &async_nats::ConnectError) -> Error {
    let kind = match e.kind() {
        ConnectErrorKind::ServerParse
        | ConnectErrorKind::Authentication
        | ConnectErrorKind::AuthorizationViolation
        | ConnectErrorKind::Tls => ErrorKind::Config,
        ConnectErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, format!("cannot connect to NATS ({servers}): {}", e.kind()))
}
