//! Settlement: [`SqlAcker`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use std::sync::Weak;

use tokio::sync::mpsc;
use watchtower::reply::{Filled, Replier, reply};
use watchtower::{Acker, Error};

use crate::client::{Inner, SqlClient, ms, on_pool};
use crate::error::{from_sqlx, timed};
use crate::subscriber::in_list;

/// Settles one delivery of the SQL transport: its lease row in the group.
///
/// * `ack` and `reject` delete the lease: the group is done with the event;
/// * `nack` makes it visible again after the delay (at once without one),
///   to be delivered with a higher count;
/// * `progress` pushes its visibility another
///   [visibility timeout](crate::SqlConfig::visibility_timeout) away;
/// * dropped unsettled, it makes the event visible again at once (in a
///   task of its own); if the process dies instead, the visibility timeout
///   passes and another member of the group gets the event.
pub struct SqlAcker {
    client: SqlClient,
    group: Arc<str>,
    seq: i64,
    deliveries: i32,
    settled: bool,
}

impl fmt::Debug for SqlAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlAcker")
            .field("group", &self.group)
            .field("seq", &self.seq)
            .field("deliveries", &self.deliveries)
            .field("settled", &self.settled)
            .finish()
    }
}

impl SqlAcker {
    pub(crate) fn new(client: SqlClient, group: Arc<str>, seq: i64, deliveries: i32) -> SqlAcker {
        SqlAcker {
            client,
            group,
            seq,
            deliveries,
            settled: false,
        }
    }

    /// The event's sequence number in the events table.
    pub fn sequence(&self) -> i64 {
        self.seq
    }

    async fn delete(mut self) -> Result<(), Error> {
        self.settled = true;
        let (replier, reply) = reply();
        let job = AckJob {
            group: self.group.clone(),
            seq: self.seq,
            reply: replier,
        };
        if self.client.acks().send(job).await.is_err() {
            return Err(Error::closed(
                "the SQL client's acknowledgement writer has stopped",
            ));
        }
        reply.await.unwrap_or_else(|| {
            Err(Error::closed(
                "the SQL client's acknowledgement writer has stopped",
            ))
        })
    }
}

/// One acknowledgement waiting for its `DELETE`.
pub(crate) struct AckJob {
    group: Arc<str>,
    seq: i64,
    reply: Replier<Result<(), Error>>,
}

/// The client's acknowledgement writer: deletes the leases of everything
/// queued in one transaction (one statement per group), then answers.
/// Acknowledging one event costs a commit; on SQLite a commit is a disk
/// sync, which a batch shares.
pub(crate) async fn ack_writer(client: Weak<Inner>, mut queue: mpsc::Receiver<AckJob>) {
    const MAX: usize = 1000;
    let mut jobs = Vec::with_capacity(MAX);
    let mut filled: Vec<Filled<Result<(), Error>>> = Vec::with_capacity(MAX);
    while queue.recv_many(&mut jobs, MAX).await > 0 {
        let Some(inner) = client.upgrade() else { return };
        jobs.sort_unstable_by(|a, b| a.group.cmp(&b.group).then(a.seq.cmp(&b.seq)));
        let result = timed(
            inner.config.statement_timeout,
            "acknowledging",
            delete_leases(&inner, &jobs),
        )
        .await;
        for job in jobs.drain(..) {
            filled.push(job.reply.fill(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::new(e.kind(), e.message()).with_retryable(e.is_retryable())),
            }));
        }
        filled.clear();
    }
}

async fn delete_leases(inner: &Inner, jobs: &[AckJob]) -> Result<(), Error> {
    let fail = |e| from_sqlx(e, "acknowledging");
    on_pool!(&inner.db, pool => {
        let mut tx = pool.begin().await.map_err(fail)?;
        for chunk in jobs.chunk_by(|a, b| a.group == b.group) {
            let statement = format!("{}{}", inner.sql.ack_many, in_list(chunk.iter().map(|j| j.seq)));
            sqlx::query(&statement).bind(&*chunk[0].group).execute(&mut *tx).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    })
}

/// Makes the lease visible after `delay`, if it is still this delivery's.
async fn release(
    client: &SqlClient,
    group: &str,
    seq: i64,
    deliveries: i32,
    delay: Duration,
) -> Result<(), Error> {
    let inner = &client.inner;
    on_pool!(&inner.db, pool => sqlx::query(&inner.sql.nack)
        .bind(group)
        .bind(seq)
        .bind(deliveries)
        .bind(ms(delay))
        .execute(pool)
        .await
        .map(drop)
        .map_err(|e| from_sqlx(e, "releasing a delivery")))?;
    if delay.is_zero() {
        inner.wake.send_replace(());
    }
    Ok(())
}

impl Acker for SqlAcker {
    async fn ack(self) -> Result<(), Error> {
        self.delete().await
    }

    async fn nack(mut self, delay: Option<Duration>) -> Result<(), Error> {
        self.settled = true;
        release(
            &self.client,
            &self.group,
            self.seq,
            self.deliveries,
            delay.unwrap_or_default(),
        )
        .await
    }

    async fn reject(self) -> Result<(), Error> {
        self.delete().await
    }

    async fn progress(&self) -> Result<(), Error> {
        release(
            &self.client,
            &self.group,
            self.seq,
            self.deliveries,
            self.client.inner.config.visibility_timeout,
        )
        .await
    }
}

impl Drop for SqlAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Outside a runtime the visibility timeout brings the event back.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, group, seq, deliveries) =
                (self.client.clone(), self.group.clone(), self.seq, self.deliveries);
            runtime.spawn(async move {
                if let Err(e) = release(&client, &group, seq, deliveries, Duration::ZERO).await {
                    tracing::debug!(error = %e, "a dropped delivery waits for its visibility timeout");
                }
            });
        }
    }
}
