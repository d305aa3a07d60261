//! Gathers concurrent `XADD`s into pipelines.
//!
//! Each command sent on its own costs the multiplexed connection a message,
//! a response slot and a wake-up; a pipeline of many costs about as much
//! as one. The first command after a quiet spell goes out at once; while a
//! few pipelines are on the wire, the commands arriving meanwhile gather
//! into the next one. Concurrency is bounded by the callers, who each wait
//! for their own reply.

use std::sync::Arc;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use redis::aio::ConnectionManager;
use redis::{Cmd, Value};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use watchtower::{Error, ErrorKind};

use crate::error::from_redis;
use crate::publisher::Health;

/// Pipelines on the wire at once.
const MAX_IN_FLIGHT: usize = 4;

/// Commands in one pipeline at most.
const MAX_BATCH: usize = 512;

/// One command, where its reply goes, and its slot in the publisher's
/// queue, given back once the reply is in.
pub(crate) struct Request {
    pub(crate) cmd: Cmd,
    pub(crate) done: oneshot::Sender<Result<Value, Error>>,
    pub(crate) slot: OwnedSemaphorePermit,
}

/// Sends requests until every sender is gone.
pub(crate) async fn batch_loop(
    conn: ConnectionManager,
    health: Arc<Health>,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            request = rx.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match request {
                Some(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    in_flight.push(send(conn.clone(), health.clone(), batch));
                }
                None => open = false,
            },
        }
    }
}

async fn send(mut conn: ConnectionManager, health: Arc<Health>, batch: Vec<Request>) {
    if batch.len() == 1 {
        let Some(Request { cmd, done, slot }) = batch.into_iter().next() else {
            return;
        };
        let result = cmd
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| from_redis(e, "XADD"));
        health.observe(&result);
        drop(slot);
        let _ = done.send(result);
        return;
    }
    let mut pipe = redis::Pipeline::with_capacity(batch.len());
    // Each command's server error becomes its own reply, for its caller.
    pipe.ignore_errors();
    let mut waiters = Vec::with_capacity(batch.len());
    for Request { cmd, done, slot } in batch {
        pipe.add_command(cmd);
        waiters.push((done, slot));
    }
    let result = pipe
        .query_async::<Vec<Value>>(&mut conn)
        .await
        .map_err(|e| from_redis(e, "XADD pipeline"));
    health.observe(&result);
    match result {
        Ok(replies) => {
            let mut replies = replies.into_iter();
            for (done, slot) in waiters {
                drop(slot);
                let reply = replies
                    .next()
                    .ok_or_else(|| Error::decode("XADD pipeline: missing reply"));
                let _ = done.send(reply);
            }
        }
        Err(e) => {
            for (done, slot) in waiters {
                drop(slot);
                let _ = done.send(Err(Error::new(e.kind(), e.message())));
            }
        }
    }
}

/// A reply that is a server error becomes a [`ErrorKind::Rejected`] error.
pub(crate) fn server_error(reply: Value, key: &str) -> Result<Value, Error> {
    match reply {
        Value::ServerError(e) => Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "XADD to {key:?}: {} {}",
                e.code(),
                e.details().unwrap_or_default()
            ),
        )),
        other => Ok(other),
    }
}
