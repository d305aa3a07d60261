//! The transactional outbox and its forwarder, against the local
//! PostgreSQL and NATS (`scripts/services-up` starts them):
//!
//! 1. an order and its `order.placed` event are written in one
//!    transaction (a second order is rolled back, and its event with it);
//! 2. the forwarder, `serve(sql_subscription, nats_publisher)`, hands the
//!    committed event to NATS, where a subscriber receives it.
//!
//! ```sh
//! cargo run -p watchtower-sql --example sql_outbox
//! ```

use std::time::Duration;

use tower::service_fn;
use watchtower::{Error, Event, SubscribeOptions, Subscriber as _, SubscriberExt as _, serve};
use watchtower_nats::{NatsClient, NatsConfig};
use watchtower_sql::{SqlClient, SqlConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("WATCHTOWER_SQL_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let prefix = format!("example_{}_", std::process::id());
    let outbox = SqlClient::connect(SqlConfig::new(url).table_prefix(&prefix)).await?;
    let pool = outbox
        .pg_pool()
        .ok_or("this example needs a PostgreSQL URL")?
        .clone();
    let orders = format!("{prefix}orders");
    sqlx::query(&format!(
        "CREATE TABLE {orders} (id BIGINT PRIMARY KEY, total BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await?;

    // Someone listening on the broker.
    let nats = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let listener = nats
        .subscriber()
        .subscribe(
            ["order.placed"],
            service_fn(move |event: Event| {
                let sent = tx.send(event);
                async move { sent.map_err(|_| Error::closed("example over")) }
            }),
        )
        .await?;

    // The business write and the event, in one transaction.
    let publisher = outbox.publisher();
    for (id, commit) in [(1_i64, true), (2, false)] {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("INSERT INTO {orders} (id, total) VALUES ($1, 990)"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let event = Event::new("order.placed", serde_json::json!({ "order": id }));
        publisher.publish_in(&mut tx, event).await?;
        if commit {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
    }

    // The forwarder: the consumer runtime, from the table to NATS.
    let subscription = outbox
        .subscriber()
        .open(SubscribeOptions::new([">"])?.group("forwarder")?)
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarder = tokio::spawn(
        serve(subscription, nats.publisher())
            .poison(outbox.dead_letters())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );

    let event = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await?
        .ok_or("the listener stopped")?;
    println!(
        "NATS received {} {}",
        event.ty(),
        String::from_utf8_lossy(event.data().map_or(&[][..], |d| &d[..]))
    );
    let _ = stop.send(());
    let stats = forwarder.await??;
    println!("forwarder: {stats}");
    listener.stop().await?;

    sqlx::query(&format!("DROP TABLE {orders}"))
        .execute(&pool)
        .await?;
    outbox.drop_tables().await?;
    Ok(())
}
