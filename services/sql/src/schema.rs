//! The tables and every statement the transport runs, per database.
//!
//! Table names are made from the checked prefix (see
//! [`validate_prefix`](crate::config::validate_prefix)); everything that
//! comes from a caller is a bound parameter.

use crate::config::Backend;

/// The statements of one client, built once at connect.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) backend: Backend,
    pub(crate) events: String,
    pub(crate) groups: String,
    pub(crate) dead_letters: String,
    /// The `LISTEN/NOTIFY` channel of the events table (PostgreSQL).
    pub(crate) channel: String,
    pub(crate) ddl: Vec<String>,
    /// The name of the notify trigger, whose presence says the DDL ran.
    pub(crate) trigger: String,
    /// Inserting one event: `topic, event_id, body`.
    pub(crate) insert_one: String,
    /// The group's cursor, locked for this transaction; on SQLite also the
    /// first write, which takes the database's write lock.
    pub(crate) lock_group: String,
    /// Redelivering the group's due leases: `group, limit, visibility`.
    pub(crate) claim_due: String,
    /// Bodies of claimed leases (SQLite; PostgreSQL claims them in one
    /// statement).
    pub(crate) fetch: String,
    /// Events after the cursor: `cursor_tx, cursor_seq, limit`.
    pub(crate) next_events: String,
    /// `group, cursor_tx, cursor_seq`.
    pub(crate) move_cursor: String,
    /// The last event every subscription may see now.
    pub(crate) head: String,
    /// `group, tx, seq, ephemeral`; does nothing if the group exists.
    pub(crate) create_group: String,
    pub(crate) touch_group: String,
    pub(crate) delete_group_leases: String,
    pub(crate) delete_group: String,
    /// `group, visibility`, then `FROM events WHERE seq IN (...)`.
    pub(crate) insert_leases: String,
    /// `group`, then `(seq, ...)`.
    pub(crate) ack_many: String,
    /// `group, seq, deliveries, delay`: only the delivery it names.
    pub(crate) nack: String,
    /// Every lease of `group` visible at once.
    pub(crate) release_group: String,
    /// Events `group` has not settled.
    pub(crate) pending: String,
    pub(crate) forget_stale_groups: String,
    pub(crate) forget_orphan_leases: String,
    pub(crate) lowest_cursor: String,
    /// `tx, seq, retention, limit`.
    pub(crate) delete_settled: String,
    pub(crate) insert_dead_letter: String,
    pub(crate) list_dead_letters: String,
    pub(crate) delete_dead_letter: String,
    pub(crate) count_dead_letters: String,
    /// `event_id, attempt, error`.
    pub(crate) log_attempt: String,
    pub(crate) list_attempts: String,
}

/// Milliseconds since the Unix epoch, by the database's clock, so that all
/// members of a group agree on visibility whatever their own clocks say.
fn now(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "((extract(epoch from clock_timestamp()) * 1000)::bigint)",
        Backend::Sqlite => "(CAST(unixepoch('subsec') * 1000 AS INTEGER))",
    }
}

impl Sql {
    pub(crate) fn new(backend: Backend, prefix: &str) -> Sql {
        let now = now(backend);
        let events = format!("{prefix}events");
        let groups = format!("{prefix}groups");
        let leases = format!("{prefix}leases");
        let dead_letters = format!("{prefix}dead_letters");
        let attempts = format!("{prefix}attempts");
        let trigger = format!("{prefix}events_notify");
        let channel = format!("{prefix}events");
        let pg = backend == Backend::Postgres;
        // PostgreSQL placeholders are `$n`, SQLite's `?n`.
        let q = |sql: String| -> String { if pg { sql } else { sql.replace('$', "?") } };
        let ddl = if pg {
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {events} (
                        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        tx BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
                        topic TEXT NOT NULL,
                        event_id TEXT NOT NULL,
                        body BYTEA NOT NULL,
                        created_ms BIGINT NOT NULL DEFAULT {now})"
                ),
                format!("CREATE INDEX IF NOT EXISTS {events}_tx_seq_idx ON {events} (tx, seq)"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {groups} (
                        name TEXT PRIMARY KEY,
                        cursor_tx BIGINT NOT NULL,
                        cursor_seq BIGINT NOT NULL,
                        ephemeral BOOLEAN NOT NULL,
                        seen_ms BIGINT NOT NULL)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {leases} (
                        grp TEXT NOT NULL,
                        seq BIGINT NOT NULL,
                        deliveries INTEGER NOT NULL,
                        visible_ms BIGINT NOT NULL,
                        PRIMARY KEY (grp, seq))"
                ),
                format!("CREATE INDEX IF NOT EXISTS {leases}_seq_idx ON {leases} (seq)"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {dead_letters} (
                        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        event_id TEXT NOT NULL,
                        topic TEXT NOT NULL,
                        reason TEXT NOT NULL,
                        body BYTEA NOT NULL,
                        created_ms BIGINT NOT NULL DEFAULT {now})"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {attempts} (
                        event_id TEXT NOT NULL,
                        attempt BIGINT NOT NULL,
                        at_ms BIGINT NOT NULL DEFAULT {now},
                        error TEXT,
                        PRIMARY KEY (event_id, attempt))"
                ),
                format!(
                    "CREATE OR REPLACE FUNCTION {prefix}notify() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$"
                ),
                format!("DROP TRIGGER IF EXISTS {trigger} ON {events}"),
                format!(
                    "CREATE TRIGGER {trigger} AFTER INSERT ON {events} \
                     FOR EACH STATEMENT EXECUTE FUNCTION {prefix}notify()"
                ),
            ]
        } else {
            vec![
                // AUTOINCREMENT: a sequence number is never reused, even
                // after clean-up deleted the highest, so cursors stay right.
                format!(
                    "CREATE TABLE IF NOT EXISTS {events} (
                        seq INTEGER PRIMARY KEY AUTOINCREMENT,
                        tx INTEGER NOT NULL DEFAULT 0,
                        topic TEXT NOT NULL,
                        event_id TEXT NOT NULL,
                        body BLOB NOT NULL,
                        created_ms INTEGER NOT NULL DEFAULT {now})"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {groups} (
                        name TEXT PRIMARY KEY,
                        cursor_tx INTEGER NOT NULL,
                        cursor_seq INTEGER NOT NULL,
                        ephemeral INTEGER NOT NULL,
                        seen_ms INTEGER NOT NULL)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {leases} (
                        grp TEXT NOT NULL,
                        seq INTEGER NOT NULL,
                        deliveries INTEGER NOT NULL,
                        visible_ms INTEGER NOT NULL,
                        PRIMARY KEY (grp, seq))"
                ),
                format!("CREATE INDEX IF NOT EXISTS {leases}_seq_idx ON {leases} (seq)"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {dead_letters} (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        event_id TEXT NOT NULL,
                        topic TEXT NOT NULL,
                        reason TEXT NOT NULL,
                        body BLOB NOT NULL,
                        created_ms INTEGER NOT NULL DEFAULT {now})"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {attempts} (
                        event_id TEXT NOT NULL,
                        attempt INTEGER NOT NULL,
                        at_ms INTEGER NOT NULL DEFAULT {now},
                        error TEXT,
                        PRIMARY KEY (event_id, attempt))"
                ),
            ]
        };
        let claim_due = if pg {
            format!(
                "WITH due AS (
                    UPDATE {leases} SET deliveries = deliveries + 1, visible_ms = {now} + $3
                    WHERE grp = $1 AND seq IN (
                        SELECT seq FROM {leases} WHERE grp = $1 AND visible_ms <= {now}
                        ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)
                    RETURNING seq, deliveries)
                 SELECT due.seq, e.topic, e.body, due.deliveries FROM due JOIN {events} e ON e.seq = due.seq
                 ORDER BY due.seq"
            )
        } else {
            q(format!(
                "UPDATE {leases} SET deliveries = deliveries + 1, visible_ms = {now} + $3
                 WHERE grp = $1 AND seq IN (
                    SELECT seq FROM {leases} WHERE grp = $1 AND visible_ms <= {now} ORDER BY seq LIMIT $2)
                 RETURNING seq, deliveries"
            ))
        };
        let next_events = if pg {
            // Only events of transactions older than every running one:
            // an event of a transaction still running may hold a lower
            // sequence number than one already committed, and a cursor
            // past it would skip it when it commits.
            format!(
                "SELECT seq, tx, topic, body FROM {events}
                 WHERE (tx, seq) > ($1, $2) AND tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
                 ORDER BY tx, seq LIMIT $3"
            )
        } else {
            // SQLite has one writer at a time: sequence order is commit
            // order.
            q(format!(
                "SELECT seq, tx, topic, body FROM {events} WHERE $1 = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ))
        };
        let head = if pg {
            format!(
                "SELECT tx, seq FROM {events}
                 WHERE tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
                 ORDER BY tx DESC, seq DESC LIMIT 1"
            )
        } else {
            format!("SELECT tx, seq FROM {events} ORDER BY seq DESC LIMIT 1")
        };
        let lock_group = if pg {
            format!("SELECT cursor_tx, cursor_seq FROM {groups} WHERE name = $1 FOR UPDATE SKIP LOCKED")
        } else {
            q(format!(
                "UPDATE {groups} SET seen_ms = {now} WHERE name = $1 RETURNING cursor_tx, cursor_seq"
            ))
        };
        let delete_settled = if pg {
            format!(
                "DELETE FROM {events} WHERE seq IN (
                    SELECT seq FROM {events} e WHERE (e.tx, e.seq) <= ($1, $2) AND e.created_ms < {now} - $3
                    AND NOT EXISTS (SELECT 1 FROM {leases} l WHERE l.seq = e.seq) LIMIT $4)"
            )
        } else {
            q(format!(
                "DELETE FROM {events} WHERE seq IN (
                    SELECT seq FROM {events} e WHERE $1 = $1 AND e.seq <= $2 AND e.created_ms < {now} - $3
                    AND NOT EXISTS (SELECT 1 FROM {leases} l WHERE l.seq = e.seq) LIMIT $4)"
            ))
        };
        let ephemeral_true = if pg { "TRUE" } else { "1" };
        Sql {
            backend,
            ddl,
            trigger,
            channel,
            insert_one: q(format!(
                "INSERT INTO {events} (topic, event_id, body) VALUES ($1, $2, $3) RETURNING seq"
            )),
            lock_group,
            claim_due,
            fetch: format!("SELECT seq, topic, body FROM {events} WHERE seq IN "),
            next_events,
            move_cursor: q(format!(
                "UPDATE {groups} SET cursor_tx = $2, cursor_seq = $3, seen_ms = {now} WHERE name = $1"
            )),
            head,
            create_group: q(format!(
                "INSERT INTO {groups} (name, cursor_tx, cursor_seq, ephemeral, seen_ms)
                 VALUES ($1, $2, $3, $4, {now}) ON CONFLICT (name) DO NOTHING"
            )),
            touch_group: q(format!("UPDATE {groups} SET seen_ms = {now} WHERE name = $1")),
            delete_group_leases: q(format!("DELETE FROM {leases} WHERE grp = $1")),
            delete_group: q(format!("DELETE FROM {groups} WHERE name = $1")),
            insert_leases: q(format!(
                "INSERT INTO {leases} (grp, seq, deliveries, visible_ms) SELECT $1, seq, 1, {now} + $2 \
                 FROM {events} WHERE seq IN "
            )),
            ack_many: q(format!("DELETE FROM {leases} WHERE grp = $1 AND seq IN ")),
            nack: q(format!(
                "UPDATE {leases} SET visible_ms = {now} + $4 WHERE grp = $1 AND seq = $2 AND deliveries = $3"
            )),
            release_group: q(format!("UPDATE {leases} SET visible_ms = 0 WHERE grp = $1")),
            pending: q(format!(
                "SELECT (SELECT COUNT(*) FROM {events} e JOIN {groups} g ON g.name = $1
                         WHERE (e.tx, e.seq) > (g.cursor_tx, g.cursor_seq))
                      + (SELECT COUNT(*) FROM {leases} WHERE grp = $1)"
            )),
            forget_stale_groups: q(format!(
                "DELETE FROM {groups} WHERE ephemeral = {ephemeral_true} AND seen_ms < {now} - $1"
            )),
            forget_orphan_leases: format!(
                "DELETE FROM {leases} WHERE NOT EXISTS (SELECT 1 FROM {groups} g WHERE g.name = {leases}.grp)"
            ),
            lowest_cursor: format!(
                "SELECT cursor_tx, cursor_seq FROM {groups} ORDER BY cursor_tx, cursor_seq LIMIT 1"
            ),
            delete_settled,
            insert_dead_letter: q(format!(
                "INSERT INTO {dead_letters} (event_id, topic, reason, body) VALUES ($1, $2, $3, $4) RETURNING id"
            )),
            list_dead_letters: q(format!(
                "SELECT id, body FROM {dead_letters} WHERE id > $1 ORDER BY id LIMIT $2"
            )),
            delete_dead_letter: q(format!("DELETE FROM {dead_letters} WHERE id = $1")),
            count_dead_letters: format!("SELECT COUNT(*) FROM {dead_letters}"),
            log_attempt: q(format!(
                "INSERT INTO {attempts} (event_id, attempt, error) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
            )),
            list_attempts: q(format!(
                "SELECT attempt, at_ms, error FROM {attempts} WHERE event_id = $1 ORDER BY attempt"
            )),
            events,
            groups,
            dead_letters,
        }
    }

    /// The DDL as one script, for an application's own migrations.
    pub(crate) fn script(&self) -> String {
        let mut out = String::new();
        for statement in &self.ddl {
            out.push_str(statement);
            out.push_str(";\n");
        }
        out
    }
}
