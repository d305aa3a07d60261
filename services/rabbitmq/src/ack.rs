//! Settling deliveries on one channel, with batched acknowledgements.
//!
//! Handlers finish out of order, but AMQP can acknowledge a whole prefix of
//! delivery tags with one `basic.ack(multiple = true)`. The window keeps the
//! state of every unsettled tag; an ack marks its tag, and whoever finds no
//! flush running acknowledges the longest settled prefix in one frame (and
//! keeps flushing until nothing is left, so an ack marked during a flush is
//! never stranded). A tag is only covered by a multiple ack once its own
//! handler has finished, so nothing is acknowledged early. Nacks and rejects
//! are sent one by one before their tag counts as settled, so a later
//! multiple ack never covers a message meant for redelivery. If the front of
//! the window stays busy (a slow handler, a delayed nack) while many later
//! acks wait, those are sent singly, so the prefetch window never stalls.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use watchtower::Error;

use crate::connection::map_lapin_error;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Delivered, handler not finished.
    Pending,
    /// Handled; the ack is not sent yet.
    Acked,
    /// Settled with the broker (nack, reject or a single ack sent), or a
    /// tag that was never delivered here.
    Done,
}

struct State {
    /// The tag of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot>,
    /// Slots in `Acked` state.
    held: usize,
    flushing: bool,
}

pub(crate) struct AckWindow {
    channel: Channel,
    state: Mutex<State>,
    hold_limit: usize,
}

impl fmt::Debug for AckWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckWindow")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

enum Settle {
    Nack,
    Reject,
}

impl AckWindow {
    pub(crate) fn new(channel: Channel, prefetch: u16) -> AckWindow {
        AckWindow {
            channel,
            state: Mutex::new(State {
                base: 1,
                slots: VecDeque::with_capacity(usize::from(prefetch)),
                held: 0,
                flushing: false,
            }),
            hold_limit: usize::from(prefetch / 2).max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half
        // updated (every update is a single assignment or pop), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new delivery. Returns `false` if the tag is out of order
    /// (never seen on a single-consumer channel), in which case it is
    /// settled singly.
    pub(crate) fn track(&self, tag: u64) -> bool {
        let mut state = self.lock();
        let next = state.base + state.slots.len() as u64;
        if tag < next {
            return false;
        }
        for _ in next..tag {
            state.slots.push_back(Slot::Done);
        }
        state.slots.push_back(Slot::Pending);
        true
    }

    fn mark(&self, tag: u64, slot: Slot) {
        let mut state = self.lock();
        if let Some(index) = tag.checked_sub(state.base)
            && let Some(s) = state.slots.get_mut(index as usize)
            && *s == Slot::Pending
        {
            *s = slot;
            if slot == Slot::Acked {
                state.held += 1;
            }
        }
    }

    /// Acknowledges `tag` (possibly later, batched with others).
    pub(crate) async fn ack(self: &Arc<Self>, tag: u64, tracked: bool) -> Result<(), Error> {
        if !tracked {
            return self.send_ack(tag, false).await;
        }
        self.mark(tag, Slot::Acked);
        self.flush().await
    }

    /// Asks for redelivery of `tag`.
    pub(crate) async fn nack(self: &Arc<Self>, tag: u64, tracked: bool) -> Result<(), Error> {
        self.settle(tag, tracked, Settle::Nack).await
    }

    /// Rejects `tag` without requeue (to the dead-letter exchange, if any).
    pub(crate) async fn reject(self: &Arc<Self>, tag: u64, tracked: bool) -> Result<(), Error> {
        self.settle(tag, tracked, Settle::Reject).await
    }

    /// Nacks `tag` after `delay`, holding its prefetch slot meanwhile.
    pub(crate) fn nack_later(self: &Arc<Self>, tag: u64, tracked: bool, delay: Duration) {
        let window = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(e) = window.nack(tag, tracked).await {
                tracing::debug!(error = %e, "delayed nack failed; the broker redelivers on channel close");
            }
        });
    }

    /// Nacks from a context that cannot wait (a dropped acker).
    pub(crate) fn nack_detached(self: &Arc<Self>, tag: u64, tracked: bool) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let window = self.clone();
            handle.spawn(async move {
                let _ = window.nack(tag, tracked).await;
            });
        }
    }

    /// Acks from a context that cannot wait (a message filtered out).
    pub(crate) fn ack_detached(self: &Arc<Self>, tag: u64, tracked: bool) {
        let window = self.clone();
        tokio::spawn(async move {
            let _ = window.ack(tag, tracked).await;
        });
    }

    async fn settle(self: &Arc<Self>, tag: u64, tracked: bool, how: Settle) -> Result<(), Error> {
        let sent = match how {
            Settle::Nack => self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| map_lapin_error(&e, "basic.nack")),
            Settle::Reject => self
                .channel
                .basic_reject(tag, BasicRejectOptions { requeue: false })
                .await
                .map_err(|e| map_lapin_error(&e, "basic.reject")),
        };
        if !tracked {
            return sent;
        }
        // Only now may a multiple ack pass this tag: its own frame is out.
        self.mark(tag, Slot::Done);
        sent?;
        self.flush().await
    }

    async fn send_ack(&self, tag: u64, multiple: bool) -> Result<(), Error> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| map_lapin_error(&e, "basic.ack"))
    }

    async fn flush(&self) -> Result<(), Error> {
        {
            let mut state = self.lock();
            if state.flushing {
                return Ok(());
            }
            state.flushing = true;
        }
        let mut guard = FlushGuard {
            window: self,
            armed: true,
        };
        loop {
            let work = {
                let mut state = self.lock();
                let mut last_acked = None;
                while let Some(&slot) = state.slots.front() {
                    if slot == Slot::Pending {
                        break;
                    }
                    if slot == Slot::Acked {
                        last_acked = Some(state.base);
                        state.held -= 1;
                    }
                    state.slots.pop_front();
                    state.base += 1;
                }
                let mut singles = Vec::new();
                if state.held >= self.hold_limit {
                    let base = state.base;
                    for (i, slot) in state.slots.iter_mut().enumerate() {
                        if *slot == Slot::Acked {
                            *slot = Slot::Done;
                            singles.push(base + i as u64);
                        }
                    }
                    state.held = 0;
                }
                if last_acked.is_none() && singles.is_empty() {
                    // Decided under the lock, so an ack marked after this
                    // point finds no flush running and flushes itself.
                    state.flushing = false;
                    guard.armed = false;
                    None
                } else {
                    Some((last_acked, singles))
                }
            };
            let Some((multiple, singles)) = work else {
                return Ok(());
            };
            if let Some(tag) = multiple {
                self.send_ack(tag, true).await?;
            }
            for tag in singles {
                self.send_ack(tag, false).await?;
            }
        }
    }
}

/// Lets the next ack flush, even if this flush was cancelled or failed.
struct FlushGuard<'a> {
    window: &'a AckWindow,
    armed: bool,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.window.lock().flushing = false;
        }
    }
}
