//! Bad configuration fails at construction, with a clear error and no
//! secrets.

use std::time::Duration;

use watchtower::health::Health;
use watchtower::{ErrorKind, Transport};
use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig, SubjectTemplate};
use watchtower_test_support::{NatsServer, free_port, unique};

use crate::support::{LOCAL, local};

async fn connect_err(config: NatsConfig) -> watchtower::Error {
    NatsClient::connect(config)
        .await
        .expect_err("connect should fail")
}

#[tokio::test]
async fn invalid_addresses_and_options_are_config_errors() {
    let e = connect_err(NatsConfig::new("nats://user:hunter2@bad host:4222")).await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");

    let e = connect_err(NatsConfig::new(LOCAL).token("t0ken").user_password("u", "pw")).await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("more than one"), "{e}");

    let e = connect_err(NatsConfig::new(LOCAL).credentials_file("/nonexistent/app.creds")).await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("/nonexistent/app.creds"), "{e}");

    let e = connect_err(NatsConfig::new(LOCAL).credentials("not a creds file")).await;
    assert_eq!(e.kind(), ErrorKind::Config);

    let e = connect_err(NatsConfig::new(LOCAL).subscription_capacity(0)).await;
    assert_eq!(e.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn unreachable_server_is_a_connection_error_without_secrets() {
    let url = format!("nats://app:s3cret@127.0.0.1:{}", free_port());
    let e = connect_err(NatsConfig::new(url).connect_timeout(Duration::from_secs(2))).await;
    assert!(
        matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{e:?}"
    );
    assert!(e.is_retryable());
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("127.0.0.1"), "{shown}");
}

#[test]
fn debug_hides_every_secret() {
    let configs = [
        NatsConfig::new("nats://u:pw-in-url@h:4222").token("tok-secret"),
        NatsConfig::new(LOCAL).user_password("app", "pw-secret"),
        NatsConfig::new(LOCAL).nkey("SUAKEYSEEDSECRET"),
        NatsConfig::new(LOCAL).credentials("-----BEGIN NATS USER JWT----- jwt-secret"),
    ];
    for config in configs {
        let shown = format!("{config:?}");
        for secret in [
            "pw-in-url",
            "tok-secret",
            "pw-secret",
            "SUAKEYSEEDSECRET",
            "jwt-secret",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
    let shown = format!("{:?}", NatsConfig::new(LOCAL).user_password("app", "pw"));
    assert!(
        shown.contains("user/password") && shown.contains("app"),
        "{shown}"
    );
}

#[tokio::test]
async fn wrong_credentials_are_refused_at_connect() {
    // The shared broker has no auth; a private one with a token does.
    let server = NatsServer::with_args(&["--auth", "right-token"]).await;
    let url = server.url();
    let e = connect_err(NatsConfig::new(url.clone()).token("wrong-token")).await;
    assert_eq!(e.kind(), ErrorKind::Config, "{e:?}");
    assert!(!format!("{e} {e:?}").contains("wrong-token"));
    let ok = NatsClient::connect(NatsConfig::new(url).token("right-token"))
        .await
        .unwrap();
    assert_eq!(ok.health().await, Health::up("nats"));
}

#[tokio::test]
async fn bad_templates_names_and_consumer_settings() {
    assert_eq!(
        SubjectTemplate::new("a.{who}").unwrap_err().kind(),
        ErrorKind::Config
    );
    assert_eq!(
        SubjectTemplate::new("a.{topic").unwrap_err().kind(),
        ErrorKind::Config
    );
    assert_eq!(SubjectTemplate::new("").unwrap_err().kind(), ErrorKind::Config);

    let client = local().await;
    // Stream names and consumer settings are checked when a subscription
    // opens, before anything is asked of the server.
    use watchtower::{SubscribeOptions, Subscriber as _};
    let options = || SubscribeOptions::new(["a.b"]).unwrap();
    let open_err = |subscriber: watchtower_nats::JetStreamSubscriber| async move {
        subscriber.open(options()).await.map(|_| ()).unwrap_err()
    };
    let e = open_err(client.jetstream_subscriber("has.dots")).await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("has.dots"), "{e}");
    let subscriber = client.jetstream_subscriber("OK");
    let e = open_err(
        subscriber
            .clone()
            .settings(ConsumerSettings::new().backoff([Duration::from_secs(1)])),
    )
    .await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("max deliver"), "{e}");
    let e = open_err(subscriber.settings(ConsumerSettings::new().ack_wait(Duration::ZERO))).await;
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("ack wait"), "{e}");

    // A stream that does not exist is a configuration error at open.
    let e = open_err(client.jetstream_subscriber(unique("MISSING"))).await;
    assert_eq!(e.kind(), ErrorKind::Config, "{e:?}");
    assert!(e.to_string().contains("does not exist"), "{e}");
}
