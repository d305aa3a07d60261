//! Poison messages end up in a dead-letter queue, with the broker's reason.
//!
//! A quorum queue with a delivery limit of 2 and a dead-letter exchange:
//! the handler fails on one event, which the broker redelivers, then
//! dead-letters (`x-death` reason `delivery_limit`). A second subscriber
//! drains the dead-letter queue and shows why each event is there.
//!
//! Run against the local broker (127.0.0.1:5672, guest/guest):
//!
//! ```sh
//! cargo run -p watchtower-rabbitmq --example rabbitmq_dlx
//! ```

use std::time::Duration;

use futures_util::StreamExt as _;
use tower::service_fn;
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber, SubscriberExt};
use watchtower_rabbitmq::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use watchtower_rabbitmq::{ExchangeKind, QueueOptions, RabbitClient, RabbitConfig};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EXCHANGE: &str = "watchtower-example.orders";
const DLX: &str = "watchtower-example.orders.dlx";
const DLQ: &str = "watchtower-example.orders.dead";

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = RabbitConfig::new(URL)
        .exchange(EXCHANGE, ExchangeKind::Topic)
        .connection_name("rabbitmq_dlx example");

    // Quorum queue "watchtower-example.orders.billing", at most 2 failed
    // deliveries, then to the dead-letter exchange and its queue.
    let client = RabbitClient::connect(config.clone()).await?;
    let subscriber = client.subscriber_with(
        QueueOptions::new()
            .quorum(true)
            .delivery_limit(2)
            .dead_letter_exchange(DLX)
            .dead_letter_queue(DLQ),
    );
    let handle = subscriber
        .subscribe_with(
            SubscribeOptions::new(["order.>"])?.group("billing")?,
            service_fn(|event: Event| async move {
                if event.json::<serde_json::Value>()?["card"] == "declined" {
                    println!("handler: {} failed", event.id());
                    return Err(Error::new(ErrorKind::Handler, "card declined"));
                }
                println!("handler: {} billed", event.id());
                Ok(())
            }),
        )
        .await?;

    let mut publisher = client.publisher().await?;
    publisher
        .publish(Event::new(
            "order.placed",
            serde_json::json!({"order": 1, "card": "ok"}),
        ))
        .await?;
    let doomed = Event::new(
        "order.placed",
        serde_json::json!({"order": 2, "card": "declined"}),
    );
    publisher.publish(doomed.clone()).await?;

    // Drain the dead-letter queue: the event, intact, and the broker's
    // reason as the `deadletter*` extensions.
    let dead = RabbitClient::connect(config.clone().exchange(DLX, ExchangeKind::Topic))
        .await?
        .subscriber_with(QueueOptions::new().queue(DLQ).passive(true));
    let mut dead_letters = dead.open(SubscribeOptions::new([">"])?).await?;
    match tokio::time::timeout(Duration::from_secs(30), dead_letters.next()).await {
        Ok(Some(Ok(delivery))) => {
            let event = delivery.event().cloned();
            if let Some(event) = &event {
                println!(
                    "dead letter: {} (same event: {}), reason {:?}, original topic {:?}",
                    event.id(),
                    event.id() == doomed.id(),
                    event.extension(ext::DEAD_LETTER_REASON),
                    event.extension(ext::DEAD_LETTER_TOPIC),
                );
            }
            delivery.ack().await?;
        }
        other => println!("no dead letter arrived: {other:?}"),
    }
    drop(dead_letters);
    let stats = handle.stop().await?;
    println!("consumer: {stats}");

    // The example cleans up after itself.
    let connection = watchtower_rabbitmq::lapin::Connection::connect(URL, Default::default())
        .await
        .map_err(|e| Error::new(ErrorKind::Connection, e.to_string()))?;
    if let Ok(channel) = connection.create_channel().await {
        for queue in [subscriber.group_queue("billing").as_str(), DLQ] {
            let _ = channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [EXCHANGE, DLX] {
            let _ = channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
