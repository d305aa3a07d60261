//! The kind of exchange events go to.

/// The kind of exchange events are published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routing keys matched against `*`/`#` binding patterns: the default,
    /// and the only kind on which wildcard subscriptions are exact.
    #[default]
    Topic,
    /// Routing key equal to the binding key.
    Direct,
    /// Every bound queue gets every event; subscribers filter by topic.
    Fanout,
    /// Routing on headers (the `cloudEvents_*` attributes); subscribers
    /// bind with [`QueueOptions::binding_arguments`](crate::QueueOptions::binding_arguments) and filter by topic.
    Headers,
}

impl ExchangeKind {
    pub(crate) fn to_lapin(self) -> lapin::ExchangeKind {
        match self {
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        }
    }
}
