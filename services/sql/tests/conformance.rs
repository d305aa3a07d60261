//! The WatchTower conformance suite on PostgreSQL and on SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use watchtower::conformance::{Harness, run};
use watchtower::{Capabilities, Error, ErrorKind, Subscriber};
use watchtower_sql::{SqlClient, SqlPublisher, SqlSubscriber};

use common::{Db, config, drop_tables};

/// One client per case, on tables named after the case's namespace.
struct SqlHarness {
    db: Db,
    clients: Mutex<HashMap<String, SqlClient>>,
}

impl SqlHarness {
    fn new(db: Db) -> SqlHarness {
        SqlHarness {
            db,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, namespace: &str) -> SqlClient {
        self.clients.lock().unwrap()[namespace].clone()
    }
}

impl Harness for SqlHarness {
    type Publisher = SqlPublisher;
    type Subscriber = SqlSubscriber;

    fn name(&self) -> String {
        format!("sql ({:?})", self.db)
    }

    fn system(&self) -> &'static str {
        "sql"
    }

    fn capabilities(&self) -> Capabilities {
        SqlSubscriber::CAPABILITIES
    }

    async fn setup(&self, namespace: &str) -> Result<(), Error> {
        let client = SqlClient::connect(config(self.db, namespace)).await?;
        self.clients.lock().unwrap().insert(namespace.to_owned(), client);
        Ok(())
    }

    async fn teardown(&self, namespace: &str) -> Result<(), Error> {
        let client = self.clients.lock().unwrap().remove(namespace);
        if let Some(client) = client {
            drop_tables(&client, self.db, namespace).await;
        }
        Ok(())
    }

    async fn publisher(&self, namespace: &str) -> Result<SqlPublisher, Error> {
        Ok(self.client(namespace).publisher())
    }

    async fn subscriber(&self, namespace: &str) -> Result<SqlSubscriber, Error> {
        Ok(self.client(namespace).subscriber())
    }

    async fn publish_raw(&self, namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        let client = self.client(namespace);
        let insert = format!(
            "INSERT INTO {} (topic, event_id, body) VALUES ($1, 'raw', $2)",
            client.config().events_table()
        );
        let result = match (client.pg_pool(), client.sqlite_pool()) {
            (Some(pool), _) => sqlx::query(&insert)
                .bind(topic)
                .bind(&body[..])
                .execute(pool)
                .await
                .map(drop),
            (_, Some(pool)) => sqlx::query(&insert)
                .bind(topic)
                .bind(&body[..])
                .execute(pool)
                .await
                .map(drop),
            _ => unreachable!(),
        };
        result.map_err(|e| Error::new(ErrorKind::Connection, e.to_string()))?;
        Ok(true)
    }
}

async fn conform(db: Db) {
    let harness = SqlHarness::new(db);
    let report = run(harness).await;
    report.assert_passed();
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_postgres() {
    conform(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_sqlite() {
    conform(Db::Sqlite).await;
}

#[tokio::test]
async fn capabilities_are_declared() {
    let tables = common::Tables::new(Db::Sqlite, "caps").await;
    assert_eq!(
        tables.client.subscriber().capabilities(),
        SqlSubscriber::CAPABILITIES
    );
    tables.drop_all().await;
}
