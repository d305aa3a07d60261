//! JetStream: persistent streams, acknowledged publishing, durable
//! consumers.
//!
//! * [`JetStreamPublisher`]: a `tower::Service<Event>` that awaits each
//!   PubAck, deduplicates retries by event id (`Nats-Msg-Id`) and pipelines
//!   concurrent callers;
//! * [`JetStreamSubscriber`]: pull consumers with explicit acks — a durable
//!   consumer per group, `nack` with delay, `reject` as `+TERM`,
//!   `progress` as `+WPI`, the delivery count from the message metadata,
//!   max-deliver and back-off from [`ConsumerSettings`]; messages are
//!   pulled in batches, asked for again when fewer than half a batch are
//!   owed (each request counted as owed before it is sent, so a fast
//!   reader never stalls on a miscount), and asked for anew when the
//!   connection comes back or the server's heartbeats stop;
//! * [`NatsClient::create_or_update_stream`] and friends, here, to set
//!   streams and consumers up from configuration.

mod acks;
mod publisher;
mod pull;
mod subscriber;

pub(crate) use acks::{AckReceiver, Acks};
pub use async_nats::jetstream::consumer::pull::Config as ConsumerConfig;
pub use async_nats::jetstream::stream::{Config as StreamConfig, Info as StreamInfo, StorageType};
pub use publisher::JetStreamPublisher;
pub use subscriber::{ConsumerSettings, JetStreamAcker, JetStreamSubscriber, JetStreamSubscription};

use watchtower::{Error, ErrorKind};

use crate::client::NatsClient;

pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let bad = name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if bad {
        let shown: String = name.chars().take(64).collect();
        return Err(Error::config(format!(
            "invalid JetStream {what} name {shown:?}: must be non-empty, without '.', '*', '>', slashes or whitespace"
        )));
    }
    Ok(())
}

fn admin_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Rejected, format!("{what}: {e}"))
}

impl NatsClient {
    /// Creates the stream `config` describes, or updates it to match.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for an invalid name, [`ErrorKind::Rejected`]
    /// if the server refused the configuration (overlapping subjects, a
    /// change it cannot make).
    pub async fn create_or_update_stream(&self, config: StreamConfig) -> Result<StreamInfo, Error> {
        validate_name("stream", &config.name)?;
        let name = config.name.clone();
        self.raw_jetstream()
            .create_or_update_stream(config)
            .await
            .map_err(|e| admin_error(&format!("cannot create or update JetStream stream {name:?}"), e))
    }

    /// Deletes the stream named `name` with its messages and consumers.
    /// Deleting a stream that does not exist succeeds.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Rejected`] if the server refused.
    pub async fn delete_stream(&self, name: &str) -> Result<(), Error> {
        validate_name("stream", name)?;
        match self.raw_jetstream().delete_stream(name).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::DeleteStreamErrorKind::JetStream(js) if js.code() == 404
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(admin_error(
                &format!("cannot delete JetStream stream {name:?}"),
                e,
            )),
        }
    }

    /// Creates the pull consumer `config` describes on `stream`, or updates
    /// it to match (a durable consumer is named by
    /// [`durable_name`](ConsumerConfig::durable_name)).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for invalid names, [`ErrorKind::Rejected`] if
    /// the server refused the configuration.
    pub async fn create_or_update_consumer(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<async_nats::jetstream::consumer::Info, Error> {
        validate_name("stream", stream)?;
        if let Some(name) = &config.durable_name {
            validate_name("consumer", name)?;
        }
        self.raw_jetstream()
            .create_consumer_on_stream(config, stream)
            .await
            .map(|consumer| consumer.cached_info().clone())
            .map_err(|e| admin_error(&format!("cannot create or update a consumer on {stream:?}"), e))
    }

    /// Deletes the consumer `name` of `stream`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Rejected`] if the server refused or it does not exist.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), Error> {
        validate_name("stream", stream)?;
        validate_name("consumer", name)?;
        self.raw_jetstream()
            .delete_consumer_from_stream(name, stream)
            .await
            .map(|_| ())
            .map_err(|e| admin_error(&format!("cannot delete consumer {name:?} of {stream:?}"), e))
    }

    /// The number of messages `stream` holds now.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Rejected`] if the stream does not exist.
    pub async fn stream_messages(&self, stream: &str) -> Result<u64, Error> {
        validate_name("stream", stream)?;
        let mut handle = self
            .raw_jetstream()
            .get_stream(stream)
            .await
            .map_err(|e| admin_error(&format!("cannot read JetStream stream {stream:?}"), e))?;
        let info = handle
            .info()
            .await
            .map_err(|e| admin_error(&format!("cannot read JetStream stream {stream:?}"), e))?;
        Ok(info.state.messages)
    }
}
