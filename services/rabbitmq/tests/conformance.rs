//! The transport conformance suite against the local RabbitMQ, with
//! classic and with quorum queues.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use watchtower::conformance::{Harness, run};
use watchtower::{Capabilities, Error};
use watchtower_rabbitmq::{QueueOptions, RabbitClient, RabbitPublisher, RabbitSubscriber};

use common::{Admin, config};

/// The groups the suite joins, whose queues teardown deletes.
const GROUPS: [&str; 5] = ["nackers", "survivors", "alpha", "beta", "workers"];

struct RabbitHarness {
    quorum: bool,
}

impl Harness for RabbitHarness {
    type Publisher = RabbitPublisher;
    type Subscriber = RabbitSubscriber;

    fn system(&self) -> &'static str {
        <RabbitClient as watchtower::Transport>::SYSTEM
    }

    fn name(&self) -> String {
        if self.quorum {
            "rabbitmq (quorum queues)"
        } else {
            "rabbitmq"
        }
        .to_owned()
    }

    fn capabilities(&self) -> Capabilities {
        RabbitSubscriber::CAPABILITIES
    }

    async fn teardown(&self, namespace: &str) -> Result<(), Error> {
        let admin = Admin::connect().await;
        for group in GROUPS {
            admin.delete_queue(&format!("{namespace}.{group}")).await;
        }
        admin.delete_exchange(namespace).await;
        admin.close().await;
        Ok(())
    }

    async fn publisher(&self, namespace: &str) -> Result<RabbitPublisher, Error> {
        common::publisher(config(namespace)).await
    }

    async fn subscriber(&self, namespace: &str) -> Result<RabbitSubscriber, Error> {
        // Queues of groups the teardown does not know still go away.
        let queue = QueueOptions::new()
            .quorum(self.quorum)
            .expires(Duration::from_secs(120));
        common::subscriber_with(config(namespace), queue).await
    }

    async fn publish_raw(&self, namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        let admin = Admin::connect().await;
        admin
            .publish_raw(namespace, topic, lapin::BasicProperties::default(), &body)
            .await;
        admin.close().await;
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_classic_queues() {
    let report = run(RabbitHarness { quorum: false }).await;
    println!("{report}");
    report.assert_passed();
    // A queue holds only what was published after it was bound: no replay.
    assert_eq!(report.skipped(), ["replay"], "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_quorum_queues() {
    let report = run(RabbitHarness { quorum: true }).await;
    println!("{report}");
    report.assert_passed();
    // A queue holds only what was published after it was bound: no replay.
    assert_eq!(report.skipped(), ["replay"], "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_rabbitmq() {
    let traces = watchtower_test_support::otel::Traces::capture();
    watchtower_test_support::otel::check_propagation(&RabbitHarness { quorum: false }, &traces)
        .await
        .unwrap();
}
