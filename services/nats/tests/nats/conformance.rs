//! The shared conformance suite on core NATS and on JetStream.

use std::time::Duration;

use bytes::Bytes;
use watchtower::conformance::{self, Harness};
use watchtower::{Capabilities, Error, Transport};
use watchtower_nats::{
    ConsumerSettings, JetStreamPublisher, JetStreamSubscriber, NatsClient, NatsPublisher, NatsSubscriber,
};
use watchtower_nats::{StorageType, StreamConfig};

use crate::support::local;

/// Core NATS on `client`.
pub(crate) struct Core {
    pub(crate) client: NatsClient,
}

impl Harness for Core {
    type Publisher = NatsPublisher;
    type Subscriber = NatsSubscriber;

    fn name(&self) -> String {
        "nats (core)".into()
    }

    fn system(&self) -> &'static str {
        NatsClient::SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        NatsSubscriber::CAPABILITIES
    }

    async fn publisher(&self, _namespace: &str) -> Result<NatsPublisher, Error> {
        Ok(self.client.publisher())
    }

    async fn subscriber(&self, _namespace: &str) -> Result<NatsSubscriber, Error> {
        Ok(self.client.subscriber())
    }

    async fn publish_raw(&self, _namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        let raw = self.client.raw();
        raw.publish(topic.to_owned(), body)
            .await
            .map_err(|e| Error::new(watchtower::ErrorKind::Connection, e.to_string()))?;
        Ok(true)
    }
}

/// JetStream: subscribers on `client`, publishers on `publishing` (the
/// same client, or one connected to another server of a cluster), a
/// stream of `replicas` replicas per case.
pub(crate) struct Js {
    pub(crate) client: NatsClient,
    pub(crate) publishing: NatsClient,
    pub(crate) replicas: usize,
    /// How long a pull waits, if not the default: on a cluster a pull is
    /// lost when its consumer's leader changes, and is renewed when it
    /// expires or when the heartbeats (every half of this) stop.
    pub(crate) expires: Option<Duration>,
}

impl Js {
    /// Waits until a publish through `publishing` reaches the new stream:
    /// on a cluster, the stream's leader is elected and its interest
    /// reaches the other servers some time after the stream is created,
    /// and a publish before that finds no stream. The probe is purged
    /// before the case starts.
    async fn await_stream_reachable(&self, namespace: &str) -> Result<(), Error> {
        let js = self.publishing.raw_jetstream();
        let probe = format!("{namespace}.setup-probe");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(10);
        loop {
            let acked = match js.publish(probe.clone(), Bytes::from_static(b"{}")).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if acked {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(
                    watchtower::ErrorKind::Connection,
                    format!("stream {namespace} not reachable from the publishing server"),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        let stream = js
            .get_stream(namespace)
            .await
            .map_err(|e| Error::new(watchtower::ErrorKind::Connection, e.to_string()))?;
        stream
            .purge()
            .await
            .map_err(|e| Error::new(watchtower::ErrorKind::Connection, e.to_string()))?;
        Ok(())
    }
}

impl Harness for Js {
    type Publisher = JetStreamPublisher;
    type Subscriber = JetStreamSubscriber;

    fn name(&self) -> String {
        "nats (JetStream)".into()
    }

    fn system(&self) -> &'static str {
        NatsClient::SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        JetStreamSubscriber::CAPABILITIES
    }

    /// A stream per case, capturing everything under its namespace.
    async fn setup(&self, namespace: &str) -> Result<(), Error> {
        self.client
            .create_or_update_stream(StreamConfig {
                name: namespace.to_owned(),
                subjects: vec![format!("{namespace}.>")],
                storage: StorageType::Memory,
                max_age: Duration::from_secs(600),
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await?;
        if self.replicas > 1 {
            self.await_stream_reachable(namespace).await?;
        }
        Ok(())
    }

    async fn teardown(&self, namespace: &str) -> Result<(), Error> {
        self.client.delete_stream(namespace).await
    }

    async fn publisher(&self, _namespace: &str) -> Result<JetStreamPublisher, Error> {
        Ok(self.publishing.jetstream_publisher())
    }

    async fn subscriber(&self, namespace: &str) -> Result<JetStreamSubscriber, Error> {
        // A short ack wait so that events left unsettled come back within
        // the suite's patience; batches well under the 100 events of the
        // group case, so that both members of a group get some, yet large
        // enough that 5,000 events do not take hundreds of pull round trips
        // on a loaded machine.
        let mut settings = ConsumerSettings::new().ack_wait(Duration::from_secs(2)).batch(40);
        if let Some(expires) = self.expires {
            settings = settings.expires(expires);
        }
        Ok(self.client.jetstream_subscriber(namespace).settings(settings))
    }

    async fn publish_raw(&self, _namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        let ack = self
            .client
            .raw_jetstream()
            .publish(topic.to_owned(), body)
            .await
            .map_err(|e| Error::new(watchtower::ErrorKind::Connection, e.to_string()))?;
        ack.await
            .map_err(|e| Error::new(watchtower::ErrorKind::Rejected, e.to_string()))?;
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_core_nats() {
    let report = conformance::run(Core {
        client: local().await,
    })
    .await;
    report.assert_passed();
    // Core NATS is at-most-once: the persistence cases are skipped, with a reason.
    assert!(report.skipped().contains(&"nack_redelivery"));
    assert!(report.passed().contains(&"consumer_groups"));
    assert!(report.passed().contains(&"poison"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_jetstream() {
    let client = local().await;
    let report = conformance::run(Js {
        publishing: client.clone(),
        client,
        replicas: 1,
        expires: None,
    })
    .await;
    report.assert_passed();
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_core_nats() {
    let traces = watchtower_test_support::otel::Traces::capture();
    let harness = Core {
        client: local().await,
    };
    watchtower_test_support::otel::check_propagation(&harness, &traces)
        .await
        .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_jetstream() {
    let traces = watchtower_test_support::otel::Traces::capture();
    let client = local().await;
    let harness = Js {
        publishing: client.clone(),
        client,
        replicas: 1,
        expires: None,
    };
    watchtower_test_support::otel::check_propagation(&harness, &traces)
        .await
        .unwrap();
}
