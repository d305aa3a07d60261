//! The conformance suite on the WebSocket transport, with the hub as the
//! publisher and with a client publishing through a relaying hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use watchtower::conformance::{Harness, run};
use watchtower::{Capabilities, Error, Transport as _};
use watchtower_websocket::{WsClient, WsHub, WsPublisher, WsSubscriber};

use support::Server;

struct HubHarness {
    hub: WsHub,
    server: Server,
}

impl HubHarness {
    async fn new(relay: bool) -> HubHarness {
        // Room for the suite's 5000-event burst to one subscriber.
        let hub = WsHub::builder().outbound_capacity(16_384).relay(relay).build();
        let server = Server::start(&hub).await;
        HubHarness { hub, server }
    }

    async fn client(&self) -> Result<WsClient, Error> {
        WsClient::connect(self.server.config().subscription_buffer(16_384)).await
    }
}

impl Harness for HubHarness {
    type Publisher = WsHub;
    type Subscriber = WsSubscriber;

    fn name(&self) -> String {
        "websocket (hub publishing)".into()
    }

    fn system(&self) -> &'static str {
        WsClient::SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        WsSubscriber::CAPABILITIES
    }

    async fn publisher(&self, _namespace: &str) -> Result<WsHub, Error> {
        Ok(self.hub.clone())
    }

    async fn subscriber(&self, _namespace: &str) -> Result<WsSubscriber, Error> {
        Ok(self.client().await?.subscriber())
    }

    async fn publish_raw(&self, _namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        assert_eq!(self.hub.broadcast_raw(topic, body), 1);
        Ok(true)
    }
}

struct ClientHarness(HubHarness);

impl Harness for ClientHarness {
    type Publisher = WsPublisher;
    type Subscriber = WsSubscriber;

    fn name(&self) -> String {
        "websocket (client publishing through a relaying hub)".into()
    }

    fn system(&self) -> &'static str {
        WsClient::SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        WsSubscriber::CAPABILITIES
    }

    async fn publisher(&self, _namespace: &str) -> Result<WsPublisher, Error> {
        Ok(self.0.client().await?.publisher())
    }

    async fn subscriber(&self, _namespace: &str) -> Result<WsSubscriber, Error> {
        Ok(self.0.client().await?.subscriber())
    }

    async fn publish_raw(&self, namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        self.0.publish_raw(namespace, topic, body).await
    }
}

fn check(report: &watchtower::conformance::Report) {
    report.assert_passed();
    let mut passed = report.passed();
    passed.sort_unstable();
    assert_eq!(
        passed,
        [
            "concurrent_publishers",
            "many_topics",
            "ordered_100",
            "poison",
            "round_trip",
            "spans",
            "topic_carried",
            "topic_isolation",
            "wildcards",
        ],
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_the_hub_publishing() {
    check(&run(HubHarness::new(false).await).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_a_client_publishing() {
    check(&run(ClientHarness(HubHarness::new(true).await)).await);
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_the_hub() {
    let traces = watchtower_test_support::otel::Traces::capture();
    watchtower_test_support::otel::check_propagation(&HubHarness::new(false).await, &traces)
        .await
        .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_a_client_and_the_hub() {
    let traces = watchtower_test_support::otel::Traces::capture();
    watchtower_test_support::otel::check_propagation(&ClientHarness(HubHarness::new(true).await), &traces)
        .await
        .unwrap();
}
