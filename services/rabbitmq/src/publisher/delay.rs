//! Delayed delivery without a plugin: per-delay TTL queues that
//! dead-letter into the publisher's exchange. See the
//! [crate docs](crate#delayed-delivery) for the design.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::time::Instant;
use watchtower::{Error, ErrorKind, Event, ext};

/// The first part of a delay queue's name; received messages dead-lettered
/// from such a queue are delayed events, not dead letters.
pub(crate) const DELAY_QUEUE_PREFIX: &str = "watchtower.delay.";

/// How long a declaration is trusted before the next publish to the queue
/// declares it again.
const REDECLARE: Duration = Duration::from_secs(60);

/// How long an unused delay queue outlives its TTL: longer than
/// [`REDECLARE`], so a message published just before the next declaration
/// expires before its queue does.
const LINGER: Duration = Duration::from_secs(180);

/// The longest delay: 2^31 - 1 ms (about 24.8 days), which every RabbitMQ
/// version takes as a queue TTL.
const MAX_DELAY_MS: u64 = (1 << 31) - 1;

/// Where the publisher sends an event.
#[derive(Debug)]
pub(crate) enum Route {
    /// To the exchange, with the topic as the routing key.
    Exchange,
    /// To a direct reply-to address, through the default exchange.
    Reply,
    /// To the delay queue of its bucket, through the default exchange.
    Delay(DelayQueue),
}

/// A delay queue and what it is declared with.
#[derive(Debug)]
pub(crate) struct DelayQueue {
    pub(crate) name: ShortString,
    ttl_ms: u64,
    topic: ShortString,
}

/// Where `event` goes; an event with a delivery time loses the mark (a
/// time now or past is delivered at once, one ahead through a delay
/// queue).
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] for a delivery time that is not a time;
/// [`ErrorKind::Unsupported`] for a delay beyond about 24 days.
pub(crate) fn route(event: &mut Event, exchange: &str) -> Result<Route, Error> {
    if event.topic().starts_with(crate::request::REPLY_ADDRESS_PREFIX) {
        return Ok(Route::Reply);
    }
    if event.extension(ext::DELIVER_AT).is_none() {
        return Ok(Route::Exchange);
    }
    let Some(remaining) = watchtower::delay::remaining(event)? else {
        event.remove_extension(ext::DELIVER_AT);
        return Ok(Route::Exchange);
    };
    let ttl_ms = bucket(remaining);
    if ttl_ms > MAX_DELAY_MS {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the rabbitmq transport delays delivery by at most {MAX_DELAY_MS} ms; event `{}` asks for {remaining:?}",
                event.id()
            ),
        )
        .with_event(event.clone()));
    }
    let topic = crate::config::short("routing key", event.topic())?;
    event.remove_extension(ext::DELIVER_AT);
    Ok(Route::Delay(DelayQueue {
        name: queue_name(exchange, ttl_ms, event.topic()),
        ttl_ms,
        topic,
    }))
}

/// `delay` rounded up to its bucket, in milliseconds: exact below 32 ms,
/// else to 5 significant bits.
pub(crate) fn bucket(delay: Duration) -> u64 {
    let nanos = delay.as_nanos();
    let ms = u64::try_from(nanos.div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    if ms < 32 {
        return ms;
    }
    let unit = 1u64 << (63 - ms.leading_zeros() - 4);
    ms.div_ceil(unit).saturating_mul(unit)
}

fn queue_name(exchange: &str, ttl_ms: u64, topic: &str) -> ShortString {
    let name = format!("{DELAY_QUEUE_PREFIX}{exchange}.{ttl_ms}ms.{topic}");
    if let Ok(name) = ShortString::try_new(name) {
        return name;
    }
    // FNV-1a: stable across processes and versions, so that publishers
    // share the queue.
    let hash = exchange
        .bytes()
        .chain([0])
        .chain(topic.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{DELAY_QUEUE_PREFIX}{hash:016x}.{ttl_ms}ms").into()
}

/// The delay queues a publisher has declared, and when.
#[derive(Default)]
pub(crate) struct Declared(Mutex<HashMap<ShortString, Instant>>);

impl Declared {
    /// The names of the queues declared.
    pub(crate) fn names(&self) -> Vec<String> {
        let declared = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        declared.keys().map(|name| name.as_str().to_owned()).collect()
    }

    /// Declares `queue` on `channel` unless it was declared less than a
    /// minute ago, dead-lettering to `exchange`.
    pub(crate) async fn ensure(
        &self,
        channel: &Channel,
        queue: &DelayQueue,
        exchange: &ShortString,
    ) -> Result<(), lapin::Error> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&queue.name)
            .is_some_and(|at| at.elapsed() < REDECLARE);
        if fresh {
            return Ok(());
        }
        let now = Instant::now();
        let mut arguments = FieldTable::default();
        let ttl = i64::try_from(queue.ttl_ms).unwrap_or(i64::MAX);
        let linger = i64::try_from(LINGER.as_millis()).unwrap_or(i64::MAX);
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(ttl.saturating_add(linger)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.as_str().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.topic.as_str().into()),
        );
        channel
            .queue_declare(queue.name.clone(), QueueDeclareOptions::durable(), arguments)
            .await?;
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(queue.name.clone(), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_by_less_than_a_sixteenth() {
        assert_eq!(bucket(Duration::ZERO), 1);
        assert_eq!(bucket(Duration::from_micros(1)), 1);
        assert_eq!(bucket(Duration::from_millis(31)), 31);
        assert_eq!(bucket(Duration::from_millis(32)), 32);
        assert_eq!(bucket(Duration::from_millis(33)), 34);
        assert_eq!(bucket(Duration::from_millis(1000)), 1024);
        for ms in [33u64, 100, 999, 1001, 65_537, 3_600_000, 86_400_000] {
            let b = bucket(Duration::from_millis(ms));
            assert!(b >= ms, "{ms} -> {b}");
            assert!((b - ms) * 16 < ms, "{ms} -> {b}");
        }
        // Buckets are few: one doubling has at most 16.
        let distinct: std::collections::HashSet<u64> =
            (1024..2048).map(|ms| bucket(Duration::from_millis(ms))).collect();
        assert!(distinct.len() <= 17, "{}", distinct.len());
    }

    #[test]
    fn queue_names_fit_amqp() {
        let long = "t".repeat(250);
        let name = queue_name("events", 1024, &long);
        assert!(name.as_str().starts_with(DELAY_QUEUE_PREFIX));
        assert_eq!(name, queue_name("events", 1024, &long), "stable");
        assert_eq!(
            queue_name("events", 1024, "order.paid").as_str(),
            "watchtower.delay.events.1024ms.order.paid"
        );
    }

    #[test]
    fn a_past_time_routes_to_the_exchange_without_the_mark() {
        let mut event = Event::new("t", serde_json::json!({}));
        watchtower::delay::set_deliver_at(&mut event, time::OffsetDateTime::UNIX_EPOCH);
        assert!(matches!(route(&mut event, "x").unwrap(), Route::Exchange));
        assert_eq!(event.extension(ext::DELIVER_AT), None);
        watchtower::delay::set_delay(&mut event, Duration::from_secs(2));
        let Route::Delay(queue) = route(&mut event, "x").unwrap() else {
            panic!("not delayed");
        };
        assert_eq!(queue.ttl_ms, 2048);
        assert_eq!(event.extension(ext::DELIVER_AT), None);
        watchtower::delay::set_delay(&mut event, Duration::from_secs(40 * 86_400));
        assert_eq!(route(&mut event, "x").unwrap_err().kind(), ErrorKind::Unsupported);
    }
}
