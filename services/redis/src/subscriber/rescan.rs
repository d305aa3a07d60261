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
        let prefix = glob_escape(self.config.prefix());
        let glob = if self.config.is_cluster() {
            // Braces are not special to Redis' glob.
            format!("{prefix}{{{}}}", pattern.to_glob())
        } else {
            format!("{prefix}{}", pattern.to_glob())
        };
        let mut conn = self.conn.clone();
        // On a cluster, every master holds some of the streams.
        let nodes = match conn.masters().await? {
            Some(masters) => masters.into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mut found = Vec::new();
        for node in &nodes {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&glob)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("stream");
                let reply = conn
                    .on_node(node.as_ref(), scan)
                    .await
                    .map_err(|e| from_redis(e, "SCAN"))?;
                let (next, keys): (u64, Vec<Vec<u8>>) =
                    redis::from_redis_value(reply).map_err(|e| from_redis(e.into(), "SCAN"))?;
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
                    break;
                }
                cursor = next;
            }
        }
        Ok(found)
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
