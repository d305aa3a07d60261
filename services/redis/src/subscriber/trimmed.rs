//! Finding and reporting entries trimmed from a stream before they were
//! delivered or settled.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::conn::Conn;
use redis::Value;
use watchtower::{Error, ErrorKind};

use crate::wire::{self, Entry};

use super::shared::{Shared, StreamInfo, Tx};

/// What a consumer is told of entries trimmed while pending.
pub(super) const TRIMMED_PENDING: &str = "entries read but not acknowledged were trimmed from the stream (MAXLEN) before they could be delivered again";

/// What a consumer is told of entries trimmed before the group read them.
pub(super) const TRIMMED_UNREAD: &str =
    "entries were trimmed from the stream (MAXLEN) before the consumer group read them";

impl Shared {
    /// Reports `count` entries of `stream` trimmed before they were
    /// delivered or settled (`ids`, those known): counts them, logs them,
    /// and tells the consumer with an [`ErrorKind::Dropped`] item. Returns
    /// false once the subscription is closed.
    pub(super) async fn report_trimmed(
        &self,
        tx: &Tx,
        stream: &StreamInfo,
        count: u64,
        ids: &[String],
        what: &str,
    ) -> bool {
        let fresh: Vec<String>;
        let (count, ids) = if ids.is_empty() {
            (count, ids)
        } else {
            let mut gone = self
                .gone
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fresh = ids
                .iter()
                .filter(|id| gone.insert(&stream.key, id))
                .cloned()
                .collect();
            (fresh.len() as u64, &fresh[..])
        };
        if count == 0 {
            return true;
        }
        self.trimmed.fetch_add(count, Ordering::Relaxed);
        const SHOWN: usize = 16;
        let mut shown = ids
            .iter()
            .take(SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > SHOWN {
            shown.push_str(&format!(" and {} more", ids.len() - SHOWN));
        }
        tracing::warn!(
            stream = &*stream.key,
            group = &*self.group,
            count,
            ids = %shown,
            "{what}"
        );
        let message = if shown.is_empty() {
            format!("{count} {what} (stream {:?})", stream.key)
        } else {
            format!("{count} {what} (stream {:?}: {shown})", stream.key)
        };
        tx.send(Err(Error::new(ErrorKind::Dropped, message)))
            .await
            .is_ok()
    }

    /// Of the `asked` ids that an `XCLAIM` did not return, those no longer
    /// in the stream: Redis 7 drops them from the pending list without a
    /// word.
    pub(super) async fn vanished(&self, key: &str, asked: &[&str], got: &[Entry]) -> Vec<String> {
        let returned: HashSet<&str> = got.iter().map(|e| &*e.id).collect();
        let missing: Vec<&str> = asked
            .iter()
            .copied()
            .filter(|id| !returned.contains(id))
            .collect();
        missing_from_stream(&mut self.conn.clone(), key, missing).await
    }

    /// Finds entries of `stream` trimmed before any consumer of the group
    /// read them, and reports those not reported yet.
    ///
    /// The group's read counter (`entries-read`, Redis 7) says how many
    /// entries it has gone past; `entries-added` how many the stream ever
    /// had. When trimming has gone past the group's last-delivered id, the
    /// stream holds only entries after it, so the entries added after the
    /// group's position and no longer there were trimmed unread. Redis does
    /// not always know the read counter (a group created at `$` that has
    /// read nothing yet, a stream with entries deleted by `XDEL`): then
    /// nothing is reported.
    pub(super) async fn check_unread_trimmed(&self, tx: &Tx, stream: &StreamInfo) -> bool {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XINFO")
            .arg("STREAM")
            .arg(&*stream.key)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&*stream.key);
        let Ok((info, groups)) = pipe.query_async::<(Value, Value)>(&mut self.conn.clone()).await else {
            return true;
        };
        let Some(trimmed) = unread_trimmed(&info, &groups, &self.group) else {
            return true;
        };
        let (position, count) = trimmed;
        let new = {
            let mut seen = self
                .unread_trimmed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let reported = match seen.get(&stream.key) {
                Some((at, n)) if *at == position => *n,
                _ => 0,
            };
            seen.insert(stream.key.clone(), (position, count.max(reported)));
            count.saturating_sub(reported)
        };
        self.report_trimmed(tx, stream, new, &[], TRIMMED_UNREAD).await
    }
}

/// From `XINFO STREAM` and `XINFO GROUPS` replies: when entries were
/// trimmed before `group` read them, its last-delivered id and how many.
pub(super) fn unread_trimmed(info: &Value, groups: &Value, group: &str) -> Option<(String, u64)> {
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    let length = int(wire::field(info, "length"))?;
    let added = int(wire::field(info, "entries-added"))?;
    let first = match wire::field(info, "first-entry") {
        Some(Value::Array(entry)) => entry.first().and_then(wire::string_of),
        _ => None,
    };
    let Value::Array(groups) = groups else {
        return None;
    };
    let ours = groups
        .iter()
        .find(|g| wire::field(g, "name").and_then(wire::string_of).as_deref() == Some(group))?;
    let last = wire::field(ours, "last-delivered-id").and_then(wire::string_of)?;
    let read = int(wire::field(ours, "entries-read"))?;
    // Only when trimming has gone past the group's position does the
    // stream hold nothing but entries after it.
    let past = match first.as_deref() {
        Some(first) => wire::entry_id(first)? > wire::entry_id(&last)?,
        None => true,
    };
    if !past {
        return None;
    }
    let trimmed = added.checked_sub(read)?.checked_sub(length)?;
    (trimmed > 0).then_some((last, trimmed))
}

/// Those of `ids` no longer in the stream `key` (one `XRANGE` each, in one
/// pipeline; none when Redis cannot be asked).
pub(crate) async fn missing_from_stream(conn: &mut Conn, key: &str, ids: Vec<&str>) -> Vec<String> {
    if ids.is_empty() {
        return Vec::new();
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("XRANGE").arg(key).arg(*id).arg(*id);
    }
    match pipe.query_async::<Vec<Value>>(conn).await {
        Ok(found) => ids
            .into_iter()
            .zip(found)
            .filter(|(_, entries)| matches!(entries, Value::Array(e) if e.is_empty()))
            .map(|(id, _)| id.to_owned())
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "could not check for trimmed entries");
            Vec::new()
        }
    }
}
