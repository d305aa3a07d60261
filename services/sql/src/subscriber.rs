//! The subscriber, and the subscription: a task that claims events for its
//! group and hands them over one by one.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use sqlx::Row as _;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use watchtower::backoff::Backoff;
use watchtower::codec::structured;
use watchtower::{
    Capabilities, Delivery, Error, Poison, RawMessage, SubscribeOptions, Subscriber, Transport,
};

use crate::acker::SqlAcker;
use crate::client::{Db, SqlClient, delete_group, ms, on_pool};
use crate::error::{from_sqlx, timed};

/// Opens subscriptions on the events table.
///
/// # Groups
///
/// A subscription [in a group](SubscribeOptions::group) shares the group's
/// events with the group's other members, in this process or any other:
/// each event goes to one member, which holds a lease on it for the
/// [visibility timeout](crate::SqlConfig::visibility_timeout). A group is
/// a row with the position of the last event it took: it is created by
/// its first subscription **at the start of the table**, so that a group
/// receives every event still stored, including those written before it
/// first subscribed (the outbox's forwarder sees what the application
/// wrote while it was down). Members of one group subscribe to the same
/// patterns.
///
/// A subscription without a group is a group of its own that lives as long
/// as the subscription: it starts at the newest event (at the oldest stored
/// one with [`replay`](SubscribeOptions::replay)) and is deleted when the
/// subscription is dropped, or by clean-up if its process died.
///
/// # Claiming
///
/// A subscription's task claims, in one transaction, up to
/// [`batch_size`](crate::SqlConfig::batch_size) events, no more than its
/// consumer has room for: first its group's deliveries whose visibility
/// timeout passed or that were nacked (with `FOR UPDATE SKIP LOCKED` on
/// PostgreSQL, so members never wait for one another), then events after
/// the group's position. It claims again at once while a claim fills the
/// room it had or reads as many events as it asked for (events of other
/// topics move the position too, so a group behind many of them reads
/// past them page after page), and again after 10 ms (doubling while it
/// lasts, up to the poll interval) when
/// another member of its group was claiming (so that members share the
/// work rather than one taking it all while the others wait to be woken);
/// then as soon as a publisher of the same
/// client writes, on PostgreSQL whenever any process inserts (`LISTEN`;
/// `open` returns once the client listens, waiting at most 5 s), and
/// otherwise every [`poll_interval`](crate::SqlConfig::poll_interval).
///
/// # Order
///
/// A group takes events in the order they committed (on PostgreSQL: in the
/// order of their transactions, and only once every transaction that began
/// before theirs has ended, which is what makes the position never skip an
/// event that commits late; a transaction left open for minutes anywhere
/// in the database holds deliveries back for as long). Redeliveries come
/// before new events.
#[derive(Clone)]
pub struct SqlSubscriber {
    client: SqlClient,
}

impl fmt::Debug for SqlSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlSubscriber")
            .field("table", &self.client.inner.sql.events)
            .finish_non_exhaustive()
    }
}

impl SqlSubscriber {
    /// What the SQL transport can do: everything the conformance suite
    /// knows.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE
        .persistent(true)
        .consumer_groups(true)
        .ordered(true)
        .wildcards(true)
        .redelivery(true)
        .nack_delay(true)
        .replay(true);

    pub(crate) fn new(client: SqlClient) -> SqlSubscriber {
        SqlSubscriber { client }
    }

    /// The client it subscribes through.
    pub fn client(&self) -> &SqlClient {
        &self.client
    }
}

impl Subscriber for SqlSubscriber {
    type Acker = SqlAcker;
    type Subscription = SqlSubscription;

    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn open(&self, options: SubscribeOptions) -> Result<SqlSubscription, Error> {
        let client = self.client.clone();
        let inner = &client.inner;
        let (group, ephemeral): (Arc<str>, bool) = match options.group_name() {
            Some(name) => (name.into(), false),
            None => (format!("~{}", uuid::Uuid::now_v7().simple()).into(), true),
        };
        let start = if ephemeral && !options.is_replay() {
            on_pool!(&inner.db, pool => sqlx::query(&inner.sql.head).fetch_optional(pool).await
                .and_then(|row| row.map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?))).transpose())
                .map_err(|e| from_sqlx(e, "reading the newest event")))?
            .unwrap_or((0, 0))
        } else {
            (0, 0)
        };
        on_pool!(&inner.db, pool => sqlx::query(&inner.sql.create_group)
            .bind(&*group)
            .bind(start.0)
            .bind(start.1)
            .bind(ephemeral)
            .execute(pool)
            .await
            .map(drop)
            .map_err(|e| from_sqlx(e, "creating the group")))?;
        client.listen().await;
        let (tx, rx) = mpsc::channel(inner.config.batch_size);
        let room = Arc::new(Notify::new());
        tokio::spawn(run(client.clone(), group, ephemeral, options, tx, room.clone()));
        Ok(SqlSubscription { rx, room })
    }
}

/// A subscription on the events table: a stream of deliveries, fed by a
/// task that claims them. Dropping it stops the task; deliveries it had
/// claimed and not handed over are released.
pub struct SqlSubscription {
    rx: mpsc::Receiver<Result<Delivery<SqlAcker>, Error>>,
    room: Arc<Notify>,
}

impl fmt::Debug for SqlSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlSubscription")
            .field("buffered", &self.rx.len())
            .finish()
    }
}

impl Stream for SqlSubscription {
    type Item = Result<Delivery<SqlAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.rx.poll_recv(cx);
        if next.is_ready() {
            self.room.notify_one();
        }
        next
    }
}

/// How long a subscription first waits before claiming again when another
/// member of its group was claiming; the wait doubles while the group stays
/// held, up to the poll interval.
const BUSY_PAUSE: Duration = Duration::from_millis(10);

/// The subscription's task.
async fn run(
    client: SqlClient,
    group: Arc<str>,
    ephemeral: bool,
    options: SubscribeOptions,
    tx: mpsc::Sender<Result<Delivery<SqlAcker>, Error>>,
    room: Arc<Notify>,
) {
    let config = client.inner.config.clone();
    let mut wake = client.inner.wake.subscribe();
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failures = 0;
    // A member holding the group for long (a slow or stuck claim) is not
    // asked every 10 ms.
    let busy_backoff = Backoff::new(BUSY_PAUSE, config.poll_interval);
    let mut held = 0;
    let mut next_cleanup = Instant::now() + config.cleanup_interval;
    loop {
        wake.borrow_and_update();
        let free = tx.capacity().min(config.batch_size);
        let claimed = if free == 0 {
            timed(
                config.statement_timeout,
                "touching the group",
                touch(&client, &group),
            )
            .await
            .map(|()| (Vec::new(), false, false))
        } else {
            timed(
                config.statement_timeout,
                "claiming events",
                claim(&client, &group, ephemeral, &options, free),
            )
            .await
        };
        match claimed {
            Ok((deliveries, more, busy)) => {
                failures = 0;
                held = if busy { held + 1 } else { 0 };
                // Room left and events maybe left too (the claim filled
                // the room, or read a full page of events, some of them
                // for other patterns): look again at once rather than
                // after the poll interval.
                let again = free > 0 && (deliveries.len() == free || more);
                for delivery in deliveries {
                    if tx.send(Ok(delivery)).await.is_err() {
                        break;
                    }
                }
                if again && !tx.is_closed() {
                    continue;
                }
                if busy && free > 0 {
                    tokio::select! {
                        () = tokio::time::sleep(busy_backoff.delay(held)) => continue,
                        () = tx.closed() => break,
                    }
                }
            }
            Err(e) => {
                failures += 1;
                let wait = backoff.delay(failures);
                tracing::debug!(error = %e, ?wait, "claiming events failed");
                if tx.send(Err(e)).await.is_err() {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = tx.closed() => break,
                }
            }
        }
        if Instant::now() >= next_cleanup {
            next_cleanup = Instant::now() + config.cleanup_interval;
            if let Err(e) = client.cleanup().await {
                tracing::debug!(error = %e, "clean-up failed");
            }
        }
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(config.poll_interval) => {}
            () = room.notified(), if free == 0 => {}
            () = tx.closed() => break,
        }
    }
    if ephemeral && let Err(e) = delete_group(&client.inner, &group).await {
        tracing::debug!(error = %e, "a finished subscription's group is left to clean-up");
    }
}

/// Says the subscription is alive, for a subscription without room.
async fn touch(client: &SqlClient, group: &str) -> Result<(), Error> {
    let inner = &client.inner;
    on_pool!(&inner.db, pool => sqlx::query(&inner.sql.touch_group).bind(group).execute(pool).await
        .map(drop).map_err(|e| from_sqlx(e, "touching the group")))
}

/// One claimed row: `seq, topic, body, deliveries`.
type Claimed = (i64, String, Vec<u8>, i32);

/// Claims up to `limit` events for `group` in one transaction; with
/// whether more events may wait after the group's new position (it read
/// as many as it asked for, whether or not they matched the patterns).
async fn claim(
    client: &SqlClient,
    group: &Arc<str>,
    ephemeral: bool,
    options: &SubscribeOptions,
    limit: usize,
) -> Result<(Vec<Delivery<SqlAcker>>, bool, bool), Error> {
    let inner = &client.inner;
    let sql = &inner.sql;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let visibility = ms(inner.config.visibility_timeout);
    let fail = |e| from_sqlx(e, "claiming events");
    let (claimed, more, busy): (Vec<Claimed>, bool, bool) = on_pool!(&inner.db, pool => {
        let mut tx = pool.begin().await.map_err(fail)?;
        // On SQLite the first statement is a write, which takes the
        // database's write lock before anything is read.
        let cursor = sqlx::query(&sql.lock_group).bind(&**group).fetch_optional(&mut *tx).await
            .and_then(|row| row.map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?))).transpose())
            .map_err(fail)?;
        if cursor.is_none() {
            // The group is gone (clean-up removed it while this
            // subscription could not reach the database, or it was
            // deleted) or, on PostgreSQL, another member is claiming:
            // recreate a missing one, as `open` would have; the insert
            // does nothing to an existing one, locked or not.
            let start = if ephemeral {
                sqlx::query(&sql.head).fetch_optional(&mut *tx).await
                    .and_then(|row| row.map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?))).transpose())
                    .map_err(fail)?
                    .unwrap_or((0, 0))
            } else {
                (0, 0)
            };
            sqlx::query(&sql.create_group).bind(&**group).bind(start.0).bind(start.1).bind(ephemeral)
                .execute(&mut *tx).await.map_err(fail)?;
        }
        let due = sqlx::query(&sql.claim_due).bind(&**group).bind(limit).bind(visibility)
            .fetch_all(&mut *tx).await.map_err(fail)?;
        let mut claimed: Vec<Claimed> = Vec::with_capacity(due.len());
        if matches!(inner.db, Db::Pg(_)) {
            for row in &due {
                claimed.push((row.try_get(0).map_err(fail)?, row.try_get(1).map_err(fail)?,
                    row.try_get(2).map_err(fail)?, row.try_get(3).map_err(fail)?));
            }
        } else if !due.is_empty() {
            let mut counts = Vec::with_capacity(due.len());
            for row in &due {
                counts.push((row.try_get::<i64, _>(0).map_err(fail)?, row.try_get::<i32, _>(1).map_err(fail)?));
            }
            counts.sort_unstable();
            let fetch = format!("{}{}", sql.fetch, in_list(counts.iter().map(|c| c.0)));
            let rows = sqlx::query(&fetch).fetch_all(&mut *tx).await.map_err(fail)?;
            for row in &rows {
                let seq: i64 = row.try_get(0).map_err(fail)?;
                let count = counts.binary_search_by_key(&seq, |c| c.0).map_or(1, |i| counts[i].1);
                claimed.push((seq, row.try_get(1).map_err(fail)?, row.try_get(2).map_err(fail)?, count));
            }
            claimed.sort_unstable_by_key(|c| c.0);
        }
        let room = limit - claimed.len() as i64;
        let mut more = false;
        if let (Some((cursor_tx, cursor_seq)), true) = (cursor, room > 0) {
            let rows = sqlx::query(&sql.next_events).bind(cursor_tx).bind(cursor_seq).bind(room)
                .fetch_all(&mut *tx).await.map_err(fail)?;
            more = rows.len() as i64 == room;
            let mut last = None;
            let mut fresh = Vec::new();
            for row in &rows {
                let seq: i64 = row.try_get(0).map_err(fail)?;
                let tx_id: i64 = row.try_get(1).map_err(fail)?;
                let topic: String = row.try_get(2).map_err(fail)?;
                last = Some((tx_id, seq));
                if options.matches(&topic) {
                    fresh.push((seq, topic, row.try_get::<Vec<u8>, _>(3).map_err(fail)?, 1));
                }
            }
            if !fresh.is_empty() {
                let insert = format!("{}{}", sql.insert_leases, in_list(fresh.iter().map(|c| c.0)));
                sqlx::query(&insert).bind(&**group).bind(visibility).execute(&mut *tx).await.map_err(fail)?;
            }
            if let Some((last_tx, last_seq)) = last {
                sqlx::query(&sql.move_cursor).bind(&**group).bind(last_tx).bind(last_seq)
                    .execute(&mut *tx).await.map_err(fail)?;
            }
            claimed.extend(fresh);
        }
        tx.commit().await.map_err(fail)?;
        // No position read: another member held the group (or it was just
        // made again); its events are claimable soon.
        (claimed, more, cursor.is_none())
    });
    let deliveries = claimed
        .into_iter()
        .map(|(seq, topic, body, count)| delivery(client, group, seq, topic, body, count))
        .collect();
    Ok((deliveries, more, busy))
}

/// `(1,2,3)`: sequence numbers the database gave, never caller input.
pub(crate) fn in_list(seqs: impl Iterator<Item = i64>) -> String {
    let mut out = String::from("(");
    for (i, seq) in seqs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&seq.to_string());
    }
    out.push(')');
    out
}

fn delivery(
    client: &SqlClient,
    group: &Arc<str>,
    seq: i64,
    topic: String,
    body: Vec<u8>,
    count: i32,
) -> Delivery<SqlAcker> {
    let acker = SqlAcker::new(client.clone(), group.clone(), seq, count);
    let body = Bytes::from(body);
    let topic: Arc<str> = topic.into();
    let delivery = match structured::from_bytes(&body) {
        Ok(event) => Delivery::new(event, topic, acker),
        Err(error) => Delivery::poison(
            Poison::new(
                RawMessage {
                    topic,
                    headers: Vec::new(),
                    body,
                },
                error,
            ),
            acker,
        ),
    };
    delivery
        .with_delivery_count(u32::try_from(count).unwrap_or(1))
        .with_system(SqlClient::SYSTEM)
}
