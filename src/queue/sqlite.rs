//! The embedded durable shard-task queue: one SQLite file (WAL, `synchronous=FULL`), tasks with leases.
//!
//! A worker claims a task with a lease (owner, expiry, attempt) in one `BEGIN IMMEDIATE` transaction.
//! Heartbeats extend the lease; every write made under a lease is fenced on `(id, lease_owner, attempts)`,
//! so a worker whose lease expired and was taken over changes nothing. The reaper requeues expired leases
//! and dead-letters a task once it has used its attempts. Times are caller-supplied milliseconds so the
//! logic is testable without sleeping.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{EnqueueOutcome, Lease, QueueError, ReapReport, TaskSpec, TaskState};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id               INTEGER PRIMARY KEY,
    job_id           TEXT    NOT NULL,
    shard            INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    payload          TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'dead')),
    available_at     INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    last_error       TEXT,
    UNIQUE (job_id, shard)
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (state, priority DESC, available_at, id);
CREATE INDEX IF NOT EXISTS tasks_leases ON tasks (state, lease_expires_at);
";

/// The SQLite task queue. One connection behind a mutex: SQLite serialises writers anyway, and every
/// operation is one short transaction.
pub struct SqliteTaskQueue {
    conn: Mutex<Connection>,
}

impl SqliteTaskQueue {
    /// Opens (creating if needed) the queue file.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A queue that lives in memory (tests).
    pub fn in_memory() -> Result<Self, QueueError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, QueueError> {
        // WAL with FULL sync: a committed transaction survives power loss, not only a process crash.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a task; a second enqueue of the same `(job_id, shard)` is a no-op reported as a duplicate.
    pub fn enqueue(&self, task: &TaskSpec, now_ms: i64) -> Result<EnqueueOutcome, QueueError> {
        let conn = self.conn();
        let inserted = conn.execute(
            "INSERT INTO tasks (job_id, shard, priority, payload, state, available_at, max_attempts)
             VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6)
             ON CONFLICT (job_id, shard) DO NOTHING",
            params![task.job_id, task.shard as i64, task.priority, task.payload, now_ms, task.max_attempts],
        )?;
        Ok(if inserted == 1 { EnqueueOutcome::Created } else { EnqueueOutcome::Duplicate })
    }

    /// Claims the highest-priority available task for `owner` until `now_ms + ttl_ms`.
    pub fn lease(&self, owner: &str, now_ms: i64, ttl_ms: i64) -> Result<Option<Lease>, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                "SELECT id, job_id, shard, payload, attempts FROM tasks
                 WHERE state = 'queued' AND available_at <= ?1
                 ORDER BY priority DESC, available_at, id LIMIT 1",
                params![now_ms],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, u32>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, job_id, shard, payload, attempts)) = row else {
            return Ok(None);
        };
        let attempt = attempts + 1;
        let expires_at = now_ms + ttl_ms;
        tx.execute(
            "UPDATE tasks SET state = 'leased', lease_owner = ?2, lease_expires_at = ?3, attempts = ?4
             WHERE id = ?1",
            params![id, owner, expires_at, attempt],
        )?;
        tx.commit()?;
        Ok(Some(Lease {
            task_id: id,
            job_id,
            shard: shard as u64,
            payload,
            owner: owner.into(),
            attempt,
            expires_at,
        }))
    }

    /// Runs `sql` (with the lease fence as ?1..?3) and reports a lease that is no longer held.
    fn fenced(&self, lease: &Lease, sql: &str, extra: &[&dyn rusqlite::ToSql]) -> Result<(), QueueError> {
        let conn = self.conn();
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&lease.task_id, &lease.owner, &lease.attempt];
        values.extend_from_slice(extra);
        let changed = conn.execute(sql, values.as_slice())?;
        if changed == 1 { Ok(()) } else { Err(QueueError::LeaseLost { task_id: lease.task_id }) }
    }

    /// Extends a held lease to `now_ms + ttl_ms`.
    pub fn heartbeat(&self, lease: &mut Lease, now_ms: i64, ttl_ms: i64) -> Result<(), QueueError> {
        let expires_at = now_ms + ttl_ms;
        self.fenced(
            lease,
            "UPDATE tasks SET lease_expires_at = ?4
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'leased'",
            &[&expires_at],
        )?;
        lease.expires_at = expires_at;
        Ok(())
    }

    /// Marks the task done.
    pub fn complete(&self, lease: &Lease) -> Result<(), QueueError> {
        self.fenced(
            lease,
            "UPDATE tasks SET state = 'done', lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'leased'",
            &[],
        )
    }

    /// Gives the task back to run again after `delay_ms` (or dead-letters it if no attempts are left).
    pub fn retry_later(
        &self,
        lease: &Lease,
        now_ms: i64,
        delay_ms: i64,
        error: &str,
    ) -> Result<(), QueueError> {
        let available_at = now_ms + delay_ms;
        self.fenced(
            lease,
            "UPDATE tasks SET
                state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
                available_at = ?4, last_error = ?5, lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'leased'",
            &[&available_at, &error],
        )
    }

    /// Gives up on the task.
    pub fn dead_letter(&self, lease: &Lease, error: &str) -> Result<(), QueueError> {
        self.fenced(
            lease,
            "UPDATE tasks SET state = 'dead', last_error = ?4, lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'leased'",
            &[&error],
        )
    }

    /// Requeues every lease expired at `now_ms`; a task that has used its attempts goes dead instead.
    pub fn reap(&self, now_ms: i64) -> Result<ReapReport, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let dead = tx.execute(
            "UPDATE tasks SET state = 'dead', last_error = 'lease expired after the last attempt',
                lease_owner = NULL, lease_expires_at = NULL
             WHERE state = 'leased' AND lease_expires_at < ?1 AND attempts >= max_attempts",
            params![now_ms],
        )?;
        let requeued = tx.execute(
            "UPDATE tasks SET state = 'queued', available_at = ?1, last_error = 'lease expired',
                lease_owner = NULL, lease_expires_at = NULL
             WHERE state = 'leased' AND lease_expires_at < ?1",
            params![now_ms],
        )?;
        tx.commit()?;
        Ok(ReapReport { requeued, dead })
    }

    /// The state of one shard task, with its attempts and last error.
    pub fn task_state(
        &self,
        job_id: &str,
        shard: u64,
    ) -> Result<Option<(TaskState, u32, Option<String>)>, QueueError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT state, attempts, last_error FROM tasks WHERE job_id = ?1 AND shard = ?2",
                params![job_id, shard as i64],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, Option<String>>(2)?)),
            )
            .optional()?;
        row.map(|(state, attempts, error)| Ok((state.parse()?, attempts, error))).transpose()
    }
}
