//! Test support of the RabbitMQ tests: a configuration for a fresh
//! exchange and a raw lapin connection for checks and clean-up. Names and
//! deadlines come from `watchtower-test-support`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use watchtower_rabbitmq::{
    ExchangeKind, PublishOptions, QueueOptions, RabbitClient, RabbitConfig, RabbitPublisher, RabbitSubscriber,
};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A configuration for a fresh exchange.
pub fn config(exchange: &str) -> RabbitConfig {
    RabbitConfig::new(URL)
        .exchange(exchange, ExchangeKind::Topic)
        .connection_name(format!("test {exchange}"))
}

/// A raw connection to the broker, for what the transport does not do.
pub struct Admin {
    pub connection: Connection,
    pub channel: lapin::Channel,
}

impl Admin {
    pub async fn connect() -> Admin {
        let connection = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        Admin { connection, channel }
    }

    /// A queue bound to `exchange` for `key`, for reading what other
    /// clients see.
    pub async fn bound_queue(&self, exchange: &str, key: &str) -> String {
        let queue = watchtower_test_support::unique("wt-raw");
        self.channel
            .queue_declare(queue.as_str().into(), Default::default(), Default::default())
            .await
            .unwrap();
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                key.into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        queue
    }

    pub async fn delete_exchange(&self, name: &str) {
        let _ = self
            .channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
    }

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }

    /// Messages ready in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = channel.close(200, "ok".into()).await;
        q.message_count()
    }

    /// Takes one message off `queue`, acknowledging it.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::Delivery> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()?;
        Some(message.delivery)
    }

    /// Publishes raw bytes, as a foreign client would.
    pub async fn publish_raw(&self, exchange: &str, key: &str, properties: BasicProperties, body: &[u8]) {
        self.channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// A publisher on a client of `config`.
pub async fn publisher(config: RabbitConfig) -> Result<RabbitPublisher, watchtower::Error> {
    RabbitClient::connect(config).await?.publisher().await
}

/// A publisher with `options` on a client of `config`.
pub async fn publisher_with(
    config: RabbitConfig,
    options: PublishOptions,
) -> Result<RabbitPublisher, watchtower::Error> {
    RabbitClient::connect(config).await?.publisher_with(options).await
}

/// A subscriber on a client of `config`.
pub async fn subscriber(config: RabbitConfig) -> Result<RabbitSubscriber, watchtower::Error> {
    Ok(RabbitClient::connect(config).await?.subscriber())
}

/// A subscriber with `queue` on a client of `config`.
pub async fn subscriber_with(
    config: RabbitConfig,
    queue: QueueOptions,
) -> Result<RabbitSubscriber, watchtower::Error> {
    Ok(RabbitClient::connect(config).await?.subscriber_with(queue))
}
