//! Settlement: ack and reject settle, nack and drop requeue.

use std::fmt;
use std::future::{Future, ready};
use std::sync::Arc;
use std::time::Duration;

use watchtower::{Acker, Error};

use crate::group::{Group, Item};
use crate::state::Shared;

/// Settles a memory delivery. Dropped unsettled, it redelivers at once.
pub struct MemoryAcker {
    item: Option<Item>,
    group: Arc<Group>,
    shared: Arc<Shared>,
}

impl fmt::Debug for MemoryAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAcker")
            .field("settled", &self.item.is_none())
            .finish()
    }
}

impl MemoryAcker {
    pub(crate) fn new(item: Item, group: Arc<Group>, shared: Arc<Shared>) -> MemoryAcker {
        MemoryAcker {
            item: Some(item),
            group,
            shared,
        }
    }

    fn settle(mut self) {
        if self.item.take().is_some() {
            self.shared.settle();
        }
    }
}

impl Acker for MemoryAcker {
    fn ack(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.settle();
        ready(Ok(()))
    }

    fn nack(mut self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send {
        if let Some(item) = self.item.take() {
            self.shared.requeue(self.group.clone(), item, delay);
        }
        ready(Ok(()))
    }

    fn reject(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.settle();
        ready(Ok(()))
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.shared.requeue(self.group.clone(), item, None);
        }
    }
}
