//! The publisher's confirm-mode channels: opened per connection, each
//! replaced in place when it fails, and the exchange declared on them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::sync::Notify;
use watchtower::Error;

use super::Inner;
use crate::config::{PublishOptions, RabbitConfig, short};
use crate::confirms::Confirms;
use crate::connection::{Session, declare_kept, map_lapin_error};

/// The publisher's confirm-mode channels on one connection. A channel the
/// broker closes (or that fails) is replaced in its slot, on the same
/// connection, without disturbing the others.
pub(crate) struct Channels {
    pub(super) slots: Vec<Slot>,
    /// Notified whenever a replacement attempt ends.
    pub(super) repaired: Notify,
}

pub(crate) struct Slot {
    channel: RwLock<Arc<Published>>,
    /// A replacement is being opened.
    repairing: AtomicBool,
}

/// A publisher channel and, if messages can come back (`mandatory`), the
/// task that answers its confirms.
pub(crate) struct Published {
    channel: Arc<Channel>,
    pub(super) confirms: Option<Confirms>,
}

impl std::ops::Deref for Published {
    type Target = Channel;

    fn deref(&self) -> &Channel {
        &self.channel
    }
}

impl Slot {
    fn new(channel: Published) -> Slot {
        Slot {
            channel: RwLock::new(Arc::new(channel)),
            repairing: AtomicBool::new(false),
        }
    }

    pub(super) fn current(&self) -> Arc<Published> {
        match self.channel.read() {
            Ok(channel) => channel.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, channel: Published) {
        let channel = Arc::new(channel);
        match self.channel.write() {
            Ok(mut current) => *current = channel,
            Err(poisoned) => *poisoned.into_inner() = channel,
        }
    }
}

impl Channels {
    /// Whether any channel can take a publish now.
    pub(super) fn any_usable(&self) -> bool {
        self.slots.iter().any(|slot| slot.current().status().connected())
    }
}

pub(super) async fn open_channels(
    connection: &Connection,
    config: &RabbitConfig,
    options: &PublishOptions,
) -> Result<Channels, Error> {
    let mut slots = Vec::with_capacity(options.channels);
    for _ in 0..options.channels {
        slots.push(Slot::new(open_channel(connection, options).await?));
    }
    if let Some(slot) = slots.first() {
        declare_exchange(&slot.current(), config).await?;
    }
    Ok(Channels {
        slots,
        repaired: Notify::new(),
    })
}

/// Opens one channel, in confirm mode if confirms are on, and starts the
/// task that answers its confirms if messages can come back.
async fn open_channel(connection: &Connection, options: &PublishOptions) -> Result<Published, Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| map_lapin_error(&e, "open channel"))?;
    if options.confirms {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map_lapin_error(&e, "confirm.select"))?;
    }
    let channel = Arc::new(channel);
    // Without `mandatory` nothing comes back, and each caller can wait for
    // its own confirm: lapin matches confirms to publishes by delivery tag.
    let confirms = (options.confirms && options.is_mandatory()).then(|| Confirms::start(channel.clone()));
    Ok(Published { channel, confirms })
}

/// Replaces the failed channel in slot `index` of `session` with a new one
/// on the same connection, declaring the exchange again (or checking it,
/// if passive: the failure may have been a deleted exchange). Only one
/// replacement per slot runs at a time; if it fails, the whole connection
/// is re-established.
pub(super) fn repair(inner: &Inner, session: &Arc<Session<Channels>>, index: usize) {
    let Some(slot) = session.value.slots.get(index) else {
        return;
    };
    if slot.current().status().connected() || slot.repairing.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Outside a runtime nothing can open the channel: the link's own
        // task re-establishes the connection instead.
        slot.repairing.store(false, Ordering::Release);
        inner.link.invalidate(session.generation);
        return;
    };
    let (session, link, options) = (session.clone(), inner.link.clone(), inner.options.clone());
    runtime.spawn(async move {
        let opened = async {
            let channel = open_channel(&session.connection, &options).await?;
            declare_exchange(&channel, link.config()).await?;
            Ok::<_, Error>(channel)
        };
        let result = tokio::select! {
            result = opened => result,
            () = session.lost.cancelled() => {
                session.value.slots[index].repairing.store(false, Ordering::Release);
                session.value.repaired.notify_waiters();
                return;
            }
        };
        let slot = &session.value.slots[index];
        match result {
            Ok(channel) => {
                tracing::debug!(channel = channel.id(), "RabbitMQ publisher channel replaced");
                slot.replace(channel);
            }
            Err(e) => {
                tracing::warn!(error = %e, "replacing a RabbitMQ publisher channel failed; reconnecting");
                link.invalidate(session.generation);
            }
        }
        slot.repairing.store(false, Ordering::Release);
        session.value.repaired.notify_waiters();
    });
}

/// Replaces the channel in slot `index` of `session` after the broker
/// nacked a publish on it: closes it, then [`repair`]s the slot.
///
/// A nacked publish is retried, and a retry must not meet the same
/// channel's fault: after a quorum queue's leader node dies, a channel
/// opened on another node as the leader moves can go on nacking every
/// publish (RabbitMQ 3.10 measured: thousands of nacks over minutes, while
/// a new channel on the same node was confirmed at once). The publishes
/// still awaiting their confirm on the closed channel fail with a
/// retryable connection error (they may have been stored); a queue that
/// nacks because it is full (`reject-publish`) nacks on the new channel
/// too, at the cost of one channel opened per nack.
pub(super) fn retire(
    inner: &Arc<Inner>,
    session: &Arc<Session<Channels>>,
    index: usize,
    channel: &Arc<Published>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        inner.link.invalidate(session.generation);
        return;
    };
    if !channel.status().connected() {
        return;
    }
    let (inner, session, channel) = (inner.clone(), session.clone(), channel.clone());
    runtime.spawn(async move {
        // Already closing (another nack) or closed: the close fails, and
        // the repair below is all that is left to do.
        let _ = channel.close(200, "replaced after a nack".into()).await;
        repair(&inner, &session, index);
    });
}

pub(crate) async fn declare_exchange(channel: &Channel, config: &RabbitConfig) -> Result<(), Error> {
    let options = ExchangeDeclareOptions {
        passive: config.exchange_passive,
        durable: config.exchange_durable,
        ..ExchangeDeclareOptions::default()
    };
    let mut arguments = FieldTable::default();
    if let Some(alternate) = config
        .alternate_exchange
        .as_deref()
        .filter(|_| !config.exchange_passive)
    {
        declare_alternate(channel, alternate).await?;
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(alternate.as_bytes().into()),
        );
    }
    channel
        .exchange_declare(
            short("exchange name", &config.exchange)?,
            config.exchange_kind.to_lapin(),
            options,
            arguments,
        )
        .await
        .map_err(|e| map_lapin_error(&e, &format!("declare exchange {:?}", &*config.exchange)))
}

/// Declares the alternate exchange `name` (durable, fanout) and the
/// durable queue of the same name that keeps what it gets.
async fn declare_alternate(channel: &Channel, name: &str) -> Result<(), Error> {
    let what = format!("alternate exchange {name:?}");
    let name = short("alternate exchange name", name)?;
    let kind = lapin::ExchangeKind::Fanout;
    declare_kept(channel, (name.clone(), kind), name, ShortString::default(), &what).await
}

/// The next channel in turn that is open, and its slot; failed channels
/// passed over are being replaced. `None` if every channel failed.
pub(super) fn pick(inner: &Inner, session: &Arc<Session<Channels>>) -> Option<(usize, Arc<Published>)> {
    let slots = &session.value.slots;
    let start = match slots.len() {
        1 => 0,
        n => inner.next.fetch_add(1, Ordering::Relaxed) % n,
    };
    for k in 0..slots.len() {
        let index = (start + k) % slots.len();
        let channel = slots[index].current();
        if channel.status().connected() {
            return Some((index, channel));
        }
        repair(inner, session, index);
    }
    None
}
