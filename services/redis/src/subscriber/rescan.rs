//! Resolving wildcard patterns to streams, at open and periodically.

use std::collections::HashSet;
use std::sync::Arc;

use watchtower::{Error, TopicPattern};

use crate::error::from_redis;

use super::shared::Shared;

pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Shared {
    /// The existing stream keys matching `pattern`.
    pub(super) async fn scan(&self, pattern: &TopicPattern) -> Result<Vec<String>, Error> {
        let glob = format!("{}{}", glob_escape(self.config.prefix()), pattern.to_glob());
        let mut conn = self.conn.clone();
        let mut cursor = 0u64;
        let mut found = Vec::new();
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&glob)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut conn)
                .await
                .map_err(|e| from_redis(e, "SCAN"))?;
            for key in keys {
                let Ok(key) = String::from_utf8(key) else { continue };
                if self.is_dead_letter_stream(&key) {
                    continue;
                }
                if self.config.topic_of(&key).is_some_and(|t| pattern.matches(t)) {
                    found.push(key);
                }
            }
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }
}

pub(super) async fn rescan_streams(shared: &Arc<Shared>) {
    let known: HashSet<Arc<str>> = shared.snapshot().iter().map(|s| s.key.clone()).collect();
    for pattern in shared.patterns.iter().filter(|p| p.is_wildcard()) {
        let keys = match shared.scan(pattern).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::debug!(error = %e, "rescanning streams failed");
                return;
            }
        };
        for key in keys {
            if known.contains(key.as_str()) {
                continue;
            }
            // Created after the subscription opened: everything in it is new.
            if let Err(e) = shared.add_stream(key, "0").await {
                tracing::warn!(error = %e, "could not join a new stream");
            } else {
                tracing::debug!("joined a new stream matching the subscription");
            }
        }
    }
}
