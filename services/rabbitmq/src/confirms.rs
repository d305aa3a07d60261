//! The publisher confirms of one channel, each answered with the returned
//! message that belongs to it.
//!
//! The broker sends `basic.return` for an unroutable `mandatory` message
//! before the `basic.ack` that confirms it. lapin hands a returned message
//! to the next confirm it completes, and completes the confirms of an ack
//! with `multiple` set in no particular order (or completes another
//! message's single ack first), so a returned message can reach the
//! confirm of another publish: that caller would hear "unroutable" for an
//! event that was routed, and the unroutable event's caller "delivered".
//!
//! So the confirms of a channel are not awaited by their callers but by one
//! task per channel, which matches returned messages to their publish by
//! the event id they carry (`cloudEvents_id`, with `message_id` as a
//! second choice) and answers a confirm only once every returned message
//! that can belong to it is in: after a confirm completes, the task sends a
//! cheap request on the same channel (`basic.qos`) and waits for its answer.
//! lapin handles a channel's frames in order, so by then every ack frame
//! that arrived before it has been handled in full, with each returned
//! message handed to some confirm, and the task collects them all before it
//! answers the confirms it saw complete before it asked.
//!
//! The barrier also batches: the answer to `basic.qos` comes behind every
//! publish in flight on the channel, so confirms are answered, and window
//! slots freed, in batches, and the callers publish their next events in
//! bursts that the broker reads many to a packet. A local fence tried in
//! its place (lapin completes the confirms of one ack frame under one lock,
//! which `wait_for_confirms` takes first, so polling it once waits for the
//! frame in progress, with no frame to the broker) answered each confirm
//! as it came: in the same runs it was no faster alone (1.00 and 1.02
//! times raw lapin against 1.02 and 1.07) and slower under the four layers
//! (0.83 and 0.83 against 1.03 and 1.11), and cost both the process and
//! the broker more CPU per event (events trickled out a few at a time).
//!
//! A returned message can also ride on the confirm of a publish whose caller
//! has not handed its confirm to the task yet (lapin completed it before
//! that caller ran again). So every publish is announced before it is sent
//! ([`Confirms::announce`]), and after the barrier the task also waits until
//! every publish announced by then is tracked, or withdrawn by a caller that
//! went away or whose publish failed ([`Ticket`]'s drop).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::message::BasicReturnMessage;
use lapin::options::BasicQosOptions;
use lapin::types::AMQPValue;
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::mpsc;
use watchtower::reply::{Filled, Replier, Reply, reply};

/// What the broker said about one publish.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Confirmed, and not returned.
    Ack,
    /// Returned as unroutable (and then confirmed).
    Returned { code: u16, text: String },
    /// Nacked by the broker.
    Nack,
    /// The confirm failed (the channel or connection closed first).
    Failed(lapin::Error),
}

/// A publish waiting for its confirm.
struct Pending {
    id: Arc<str>,
    confirm: PublisherConfirm,
    reply: Replier<Outcome>,
}

/// A confirm that completed, not yet answered.
struct Completed {
    id: Arc<str>,
    result: Result<Confirmation, lapin::Error>,
    reply: Replier<Outcome>,
}

/// How long the task waits, after a barrier, for the confirms of publishes
/// already announced: a publish is announced just before it is sent and
/// tracked as soon as the send is done, so this is only reached by a caller
/// that holds its future without polling it.
const ANNOUNCED_WAIT: Duration = Duration::from_secs(5);

/// What a publish tells the confirm task, with the number it was
/// announced under.
enum Notice {
    /// Its confirm, to wait for.
    Track(u64, Pending),
    /// An announced publish that will not be tracked: its caller went away
    /// or its publish failed.
    Withdrawn(u64),
}

/// The handle on a channel's confirm task.
#[derive(Clone, Debug)]
pub(crate) struct Confirms {
    tx: mpsc::UnboundedSender<Notice>,
    /// Publishes announced on the channel so far.
    announced: Arc<AtomicU64>,
}

impl Confirms {
    /// Starts the confirm task of `channel`, whose messages can come back
    /// (`mandatory`).
    pub(crate) fn start(channel: Arc<Channel>) -> Confirms {
        let (tx, rx) = mpsc::unbounded_channel();
        let announced = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(channel, rx, announced.clone()));
        Confirms { tx, announced }
    }

    /// Announces a publish about to be sent on the channel; its ticket
    /// [tracks](Ticket::track) the confirm, or withdraws the publish when
    /// dropped.
    pub(crate) fn announce(&self) -> Ticket {
        let seq = self.announced.fetch_add(1, Ordering::SeqCst);
        Ticket {
            seq,
            tx: Some(self.tx.clone()),
        }
    }
}

/// An announced publish: tracked once its confirm is in hand, withdrawn if
/// dropped before.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// The number the publish was announced under (from 0, per channel).
    seq: u64,
    tx: Option<mpsc::UnboundedSender<Notice>>,
}

impl Ticket {
    /// Hands the confirm of the publish of event `id` to the task; the
    /// reply is `None` if the task is gone (its runtime shut down).
    pub(crate) fn track(mut self, id: Arc<str>, confirm: PublisherConfirm) -> Reply<Outcome> {
        let (replier, answer) = reply();
        // If the task is gone, the replier is dropped with the message and
        // the reply resolves to `None`.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Notice::Track(
                self.seq,
                Pending {
                    id,
                    confirm,
                    reply: replier,
                },
            ));
        }
        answer
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Notice::Withdrawn(self.seq));
        }
    }
}

async fn run(channel: Arc<Channel>, mut rx: mpsc::UnboundedReceiver<Notice>, announced: Arc<AtomicU64>) {
    let mut waiting = FuturesUnordered::new();
    let mut completed: Vec<Completed> = Vec::new();
    let mut returned: HashMap<Arc<str>, (u16, String)> = HashMap::new();
    let mut open = true;
    let mut accounted = Accounted::default();
    loop {
        if completed.is_empty() {
            tokio::select! {
                notice = rx.recv(), if open => match notice {
                    Some(notice) => take(notice, &mut waiting, &mut accounted),
                    None => open = false,
                },
                Some(done) = waiting.next(), if !waiting.is_empty() => {
                    completed.push(collect(done, &mut returned));
                }
                else => return,
            }
        }
        gather(
            &mut rx,
            &mut open,
            &mut waiting,
            &mut completed,
            &mut returned,
            &mut accounted,
        );
        if completed.is_empty() {
            continue;
        }
        let seen = completed.len();
        // Its answer comes after every frame that arrived before it. If it
        // fails, the channel closed: the frames before the close were
        // handled all the same.
        let _ = channel.basic_qos(0, BasicQosOptions::default()).await;
        // Every ack handled by now is for a publish announced by now: once
        // each of those is tracked (or withdrawn), every confirm that can
        // carry a returned message is in hand. Counted by number, not in
        // bulk: a publish announced later may be tracked first.
        let due = announced.load(Ordering::SeqCst);
        let in_hand = async {
            while accounted.below < due && open {
                match rx.recv().await {
                    Some(notice) => take(notice, &mut waiting, &mut accounted),
                    None => open = false,
                }
            }
        };
        // A caller holds its publish future without polling it: its
        // neighbours are not kept waiting for ever.
        if tokio::time::timeout(ANNOUNCED_WAIT, in_hand).await.is_err() {
            tracing::warn!(
                missing = due.saturating_sub(accounted.below),
                "publishes announced on a RabbitMQ channel were not handed to its confirm task in time; answering without them"
            );
        }
        gather(
            &mut rx,
            &mut open,
            &mut waiting,
            &mut completed,
            &mut returned,
            &mut accounted,
        );
        let filled: Vec<Filled<Outcome>> = completed
            .drain(..seen)
            .map(|done| {
                let outcome = match done.result {
                    Err(e) => Outcome::Failed(e),
                    Ok(Confirmation::Nack(_)) => {
                        returned.remove(&done.id);
                        Outcome::Nack
                    }
                    Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {
                        match returned.remove(&done.id) {
                            Some((code, text)) => Outcome::Returned { code, text },
                            None => Outcome::Ack,
                        }
                    }
                };
                done.reply.fill(outcome)
            })
            .collect();
        // Every answer of the round is in: now wake the callers.
        drop(filled);
    }
}

/// Counts a notice, and waits for the confirm it tracks.
fn take(notice: Notice, waiting: &mut FuturesUnordered<Wait>, accounted: &mut Accounted) {
    match notice {
        Notice::Track(seq, pending) => {
            accounted.add(seq);
            waiting.push(wait(pending));
        }
        Notice::Withdrawn(seq) => accounted.add(seq),
    }
}

/// The announced publishes tracked or withdrawn so far: every one numbered
/// below `below`, and those above it that came in early (callers run in
/// any order once their publishes are written).
#[derive(Default)]
struct Accounted {
    below: u64,
    early: BTreeSet<u64>,
}

impl Accounted {
    fn add(&mut self, seq: u64) {
        if seq != self.below {
            self.early.insert(seq);
            return;
        }
        self.below += 1;
        while self.early.first() == Some(&self.below) {
            self.early.pop_first();
            self.below += 1;
        }
    }
}

/// Waits for one confirm.
fn wait(pending: Pending) -> Wait {
    Wait(Some(pending))
}

/// The future of [`wait`].
struct Wait(Option<Pending>);

impl Future for Wait {
    type Output = Completed;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completed> {
        let Some(pending) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let result = ready!(Pin::new(&mut pending.confirm).poll(cx));
        let Some(Pending { id, reply, .. }) = self.0.take() else {
            return Poll::Pending;
        };
        Poll::Ready(Completed { id, result, reply })
    }
}

/// Takes what is ready now, without waiting: new publishes, and completed
/// confirms with their returned messages.
fn gather(
    rx: &mut mpsc::UnboundedReceiver<Notice>,
    open: &mut bool,
    waiting: &mut FuturesUnordered<Wait>,
    completed: &mut Vec<Completed>,
    returned: &mut HashMap<Arc<str>, (u16, String)>,
    accounted: &mut Accounted,
) {
    while *open {
        match rx.try_recv() {
            Ok(notice) => take(notice, waiting, accounted),
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => *open = false,
        }
    }
    while let Some(Some(done)) = waiting.next().now_or_never() {
        completed.push(collect(done, returned));
    }
}

/// Files the returned message a confirm carries under the event it belongs
/// to, which need not be the confirm's own.
fn collect(mut done: Completed, returned: &mut HashMap<Arc<str>, (u16, String)>) -> Completed {
    let message = match &mut done.result {
        Ok(Confirmation::Ack(message) | Confirmation::Nack(message)) => message.take(),
        _ => None,
    };
    if let Some(message) = message {
        let owner = owner(&message).map_or_else(|| done.id.clone(), Arc::from);
        returned.insert(owner, (message.reply_code, message.reply_text.to_string()));
    }
    done
}

/// The id of the event a returned message carries.
fn owner(message: &BasicReturnMessage) -> Option<String> {
    let properties = &message.properties;
    let header =
        properties
            .headers()
            .as_ref()
            .and_then(|headers| match headers.inner().get("cloudEvents_id")? {
                AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            });
    header.or_else(|| properties.message_id().as_ref().map(|id| id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::Accounted;

    #[test]
    fn accounted_counts_a_publish_only_once_every_earlier_one_is_in() {
        let mut accounted = Accounted::default();
        accounted.add(1);
        accounted.add(2);
        assert_eq!(accounted.below, 0, "publish 0 is still out");
        accounted.add(0);
        assert_eq!(accounted.below, 3);
        assert!(accounted.early.is_empty());
        accounted.add(4);
        accounted.add(3);
        assert_eq!(accounted.below, 5);
        assert!(accounted.early.is_empty());
    }
}
