//! The embedded durable store: one SQLite file (WAL, `synchronous=FULL`) holding jobs, idempotency keys
//! and shard tasks with leases, so submitting a job, its dedup record and its tasks is one transaction.
//!
//! A worker claims a task with a lease (owner, expiry, attempt) in one `BEGIN IMMEDIATE` transaction.
//! Heartbeats extend the lease; every write made under a lease is fenced on `(id, lease_owner, attempts)`,
//! so a worker whose lease expired and was taken over changes nothing. The reaper requeues expired leases
//! and dead-letters a task once it has used its attempts. Times are caller-supplied milliseconds so the
//! logic is testable without sleeping.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::events::{EventKind, JobEvent};
use crate::job::{JobRecord, JobSpec, JobState, ShardPayload};
use crate::queue::plan::plan_shards;
use crate::queue::{
    EnqueueOutcome, IdempotencyKey, JobFilter, Lease, PageCursor, PendingEvent, Purge, QueueError,
    ReapReport, ShardCounts, ShardStats, SubmitOutcome, TaskSpec, TaskState,
};

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
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT    PRIMARY KEY,
    spec           TEXT    NOT NULL,
    state          TEXT    NOT NULL,
    priority       INTEGER NOT NULL,
    samples_done   INTEGER NOT NULL DEFAULT 0,
    shards_done    INTEGER NOT NULL DEFAULT 0,
    shards_total   INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    started_at     INTEGER,
    finished_at    INTEGER,
    updated_at     INTEGER NOT NULL,
    error          TEXT,
    manifest_uri   TEXT
);
CREATE TABLE IF NOT EXISTS idempotency (
    key            TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL,
    request_hash   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (state, priority DESC, available_at, id);
CREATE INDEX IF NOT EXISTS tasks_leases ON tasks (state, lease_expires_at);
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    job_id       TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    webhook      TEXT,
    body         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    reached      TEXT    NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS events_due ON events (available_at, seq);
";

/// The CloudEvents `source` of this store's events: `/ddpm-worker/sqlite`.
const EVENT_SOURCE: &str = "sqlite";

/// Events still waiting for a webhook after this long are dropped (the dispatch gives up after about
/// a day; without webhooks nothing takes them).
const EVENT_MAX_AGE_MS: i64 = 7 * 24 * 3600 * 1000;

/// Columns added after the tables' first release, as (table, column, definition): a file written by an
/// earlier version gains them when it is opened.
const ADDED_COLUMNS: [(&str, &str, &str); 6] = [
    // How many events the job has had: the next one's number.
    ("jobs", "events", "INTEGER NOT NULL DEFAULT 0"),
    // When the job was deleted (hidden from then on; its record goes once its cleanup is done).
    ("jobs", "deleted_at", "INTEGER"),
    // A deleted job's outputs stay (retention that keeps datasets).
    ("jobs", "keep_outputs", "INTEGER NOT NULL DEFAULT 0"),
    // A cancelled job's partial outputs were deleted.
    ("jobs", "outputs_removed", "INTEGER NOT NULL DEFAULT 0"),
    // The lease owner (`worker/device`) that completed the task.
    ("tasks", "done_by", "TEXT"),
    // A dead task was retired because its job ended, not dead-lettered on its own account.
    ("tasks", "retired", "INTEGER NOT NULL DEFAULT 0"),
];

/// The jobs whose cleanup is pending, without a scan of every job.
const CLEANUP_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS jobs_cleanup ON jobs (state, deleted_at, outputs_removed)";

/// The columns of a job record, as [`job_from_row`] reads them.
const JOB_COLUMNS: &str = "id, spec, state, samples_done, shards_done, shards_total, created_at, started_at,
    finished_at, error, manifest_uri";

/// The SQLite job store and task queue. One connection behind a mutex: SQLite serialises writers anyway, and every
/// operation is one short transaction.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
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
        for (table, column, definition) in ADDED_COLUMNS {
            let present: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                params![table, column],
                |r| r.get(0),
            )?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))?;
            }
        }
        conn.execute_batch(CLEANUP_INDEX)?;
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
        // A job is running from the moment one of its shards is.
        let started = tx.execute(
            "UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, ?2), updated_at = ?2
             WHERE id = ?1 AND state = 'queued'",
            params![job_id, now_ms],
        )?;
        if started == 1 {
            record_event(&tx, &job_id, false, now_ms)?;
        }
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
            "UPDATE tasks SET state = 'done', done_by = lease_owner, lease_owner = NULL, lease_expires_at = NULL
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

    /// Gives the task back without counting the attempt it used, available again at `now_ms + delay_ms`.
    pub fn release(&self, lease: &Lease, now_ms: i64, delay_ms: i64, reason: &str) -> Result<(), QueueError> {
        let available_at = now_ms + delay_ms;
        self.fenced(
            lease,
            "UPDATE tasks SET state = 'queued', available_at = ?4, attempts = attempts - 1, last_error = ?5,
                lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'leased'",
            &[&available_at, &reason],
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
        // The outbox's upkeep: events nobody delivered within their age.
        tx.execute("DELETE FROM events WHERE created_at < ?1", params![now_ms - EVENT_MAX_AGE_MS])?;
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

    // === jobs ===

    /// Records a job and queues its shard tasks in one transaction. With a request id already seen,
    /// returns that job instead if the request is the same, and refuses it if the request differs.
    pub fn submit(
        &self,
        spec: &JobSpec,
        idempotency: Option<&IdempotencyKey>,
        batches_per_shard: u64,
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<SubmitOutcome, QueueError> {
        let spec_json = serde_json::to_string(spec).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(IdempotencyKey { request_id: key, request_hash }) = idempotency {
            let seen: Option<(String, String)> = tx
                .query_row("SELECT job_id, request_hash FROM idempotency WHERE key = ?1", params![key], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if let Some((job_id, hash)) = seen {
                if &hash != request_hash {
                    return Err(QueueError::IdempotencyConflict { request_id: key.to_string(), job_id });
                }
                let job = get_job(&tx, &job_id)?
                    .ok_or_else(|| QueueError::Corrupt(format!("job {job_id} missing")))?;
                return Ok(SubmitOutcome { job, created: false });
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let shards = plan_shards(spec.num_samples, u64::from(spec.batch_size), batches_per_shard);
        tx.execute(
            "INSERT INTO jobs (id, spec, state, priority, shards_total, created_at, updated_at)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?5)",
            params![id, spec_json, spec.priority, shards.len() as i64, now_ms],
        )?;
        if let Some(IdempotencyKey { request_id: key, request_hash }) = idempotency {
            tx.execute(
                "INSERT INTO idempotency (key, job_id, request_hash) VALUES (?1, ?2, ?3)",
                params![key, id, request_hash],
            )?;
        }
        for shard in &shards {
            let payload = ShardPayload { start: shard.start, end: shard.end }.encode();
            tx.execute(
                "INSERT INTO tasks (job_id, shard, priority, payload, state, available_at, max_attempts)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6)",
                params![id, shard.index as i64, spec.priority, payload, now_ms, max_attempts],
            )?;
        }
        record_event(&tx, &id, false, now_ms)?;
        let job = get_job(&tx, &id)?.ok_or_else(|| QueueError::Corrupt(format!("job {id} missing")))?;
        tx.commit()?;
        Ok(SubmitOutcome { job, created: true })
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        get_job(&self.conn(), id)
    }

    /// Completes a shard under its lease and adds its samples to the job's progress (one transaction,
    /// fenced: a zombie's completion counts nothing). The first completed shard marks the job running.
    pub fn complete_shard(&self, lease: &Lease, samples: u64, now_ms: i64) -> Result<JobRecord, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE tasks SET state = 'done', done_by = lease_owner, lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'leased'",
            params![lease.task_id, lease.owner, lease.attempt],
        )?;
        if changed != 1 {
            return Err(QueueError::LeaseLost { task_id: lease.task_id });
        }
        tx.execute(
            "UPDATE jobs SET samples_done = samples_done + ?2, shards_done = shards_done + 1,
                state = CASE WHEN state = 'queued' THEN 'running' ELSE state END,
                started_at = COALESCE(started_at, ?3), updated_at = ?3
             WHERE id = ?1",
            params![lease.job_id, samples as i64, now_ms],
        )?;
        let job = get_job(&tx, &lease.job_id)?
            .ok_or_else(|| QueueError::Corrupt(format!("job {} missing", lease.job_id)))?;
        tx.commit()?;
        Ok(job)
    }

    /// Moves a job to a terminal state (unless it already is in one) and retires its unfinished tasks.
    pub fn finish_job(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        manifest_uri: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, QueueError> {
        debug_assert!(state.is_terminal());
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ended = tx.execute(
            "UPDATE jobs SET state = ?2, error = ?3, manifest_uri = ?4, finished_at = ?5, updated_at = ?5
             WHERE id = ?1 AND state IN ('queued', 'running')",
            params![id, state.as_str(), error, manifest_uri, now_ms],
        )?;
        if ended == 1 {
            record_event(&tx, id, false, now_ms)?;
        }
        tx.execute(
            "UPDATE tasks SET state = 'dead', retired = 1, last_error = ?2, lease_owner = NULL,
                lease_expires_at = NULL
             WHERE job_id = ?1 AND state IN ('queued', 'leased')",
            params![id, format!("job {}", state.as_str())],
        )?;
        let job = get_job(&tx, id)?;
        tx.commit()?;
        Ok(job)
    }

    /// Puts a FAILED job back to work: dead shards are queued again with no attempts used, done shards
    /// stay done, and the job is RUNNING (or QUEUED when nothing of it ran) with its error cleared.
    pub fn retry_job(&self, id: &str, now_ms: i64) -> Result<Option<JobRecord>, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE jobs SET state = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END,
                error = NULL, finished_at = NULL, updated_at = ?2
             WHERE id = ?1 AND state = 'failed' AND deleted_at IS NULL",
            params![id, now_ms],
        )?;
        if changed == 1 {
            record_event(&tx, id, false, now_ms)?;
            tx.execute(
                "UPDATE tasks SET state = 'queued', attempts = 0, retired = 0, available_at = ?2,
                    last_error = NULL
                 WHERE job_id = ?1 AND state = 'dead'",
                params![id, now_ms],
            )?;
        }
        let job = get_job(&tx, id)?;
        tx.commit()?;
        Ok(job)
    }

    /// Jobs with a dead-lettered shard that are not finished yet, with the shard's last error: the
    /// service marks them FAILED with that reason.
    pub fn jobs_with_dead_shards(&self) -> Result<Vec<(String, String)>, QueueError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT j.id, COALESCE(t.last_error, 'shard failed') FROM jobs j JOIN tasks t ON t.job_id = j.id
             WHERE t.state = 'dead' AND j.state IN ('queued', 'running') GROUP BY j.id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl SqliteStore {
    /// Jobs matching `filter`, newest first, at most `limit`, after `cursor`.
    pub fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let mut sql = String::from("SELECT id FROM jobs WHERE deleted_at IS NULL");
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if !filter.states.is_empty() {
            let marks = vec!["?"; filter.states.len()].join(", ");
            sql.push_str(&format!(" AND state IN ({marks})"));
            values.extend(filter.states.iter().map(|s| Box::new(s.as_str()) as Box<dyn rusqlite::ToSql>));
        }
        for (key, value) in &filter.labels {
            // A JSON path with the key quoted, so any label key (dots included) is one path step.
            sql.push_str(" AND json_extract(spec, ?) = ?");
            values.push(Box::new(format!("$.labels.{}", serde_json::Value::from(key.as_str()))));
            values.push(Box::new(value.clone()));
        }
        if let Some(c) = cursor {
            sql.push_str(" AND (created_at < ? OR (created_at = ? AND id < ?))");
            values.push(Box::new(c.created_at_ms));
            values.push(Box::new(c.created_at_ms));
            values.push(Box::new(c.id.clone()));
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        values.push(Box::new(limit as i64));
        let conn = self.conn();
        let ids: Vec<String> = {
            let mut stmt = conn.prepare(&sql)?;
            let params: Vec<&dyn rusqlite::ToSql> = values.iter().map(AsRef::as_ref).collect();
            let rows = stmt.query_map(params.as_slice(), |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        ids.iter()
            .map(|id| get_job(&conn, id)?.ok_or_else(|| QueueError::Corrupt(format!("job {id} missing"))))
            .collect()
    }

    /// Running jobs whose every shard is done but that nobody finalized for `stale_ms` (the worker that
    /// finished the last shard died before writing the manifest).
    pub fn jobs_to_finalize(&self, now_ms: i64, stale_ms: i64) -> Result<Vec<String>, QueueError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM jobs WHERE state = 'running' AND shards_done >= shards_total AND updated_at <= ?1",
        )?;
        let rows = stmt.query_map(params![now_ms - stale_ms], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many jobs are in each state (states without jobs are left out).
    pub fn job_counts(&self) -> Result<Vec<(JobState, u64)>, QueueError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT state, COUNT(*) FROM jobs WHERE deleted_at IS NULL GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|row| {
            let (state, n) = row?;
            let state =
                JobState::parse(&state).ok_or_else(|| QueueError::Corrupt(format!("job state {state:?}")))?;
            Ok((state, n as u64))
        })
        .collect()
    }

    /// Deletes finished job `id` (see [`crate::queue::JobStore::delete_job`]): hides it, frees its
    /// request id and retires nothing, since a finished job has no task left to run.
    pub fn delete_job(
        &self,
        id: &str,
        keep_outputs: bool,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(job) = get_job(&tx, id)? else { return Ok(None) };
        if job.state.is_terminal() {
            delete_finished(&tx, id, keep_outputs, now_ms)?;
        }
        tx.commit()?;
        Ok(Some(job))
    }

    /// Deletes up to `limit` jobs finished at `before_ms` or earlier, oldest first; returns their ids.
    pub fn expire_jobs(
        &self,
        before_ms: i64,
        keep_outputs: bool,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
                   AND deleted_at IS NULL AND finished_at <= ?1 ORDER BY finished_at, id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![before_ms, limit as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for id in &ids {
            delete_finished(&tx, id, keep_outputs, now_ms)?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Up to `limit` jobs whose cleanup is due at `before_ms`: deleted, or cancelled with their outputs
    /// not yet removed, at that time or earlier.
    pub fn jobs_to_purge(&self, before_ms: i64, limit: usize) -> Result<Vec<Purge>, QueueError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {JOB_COLUMNS}, deleted_at IS NOT NULL, keep_outputs, outputs_removed FROM jobs
              WHERE (state IN ('succeeded', 'failed', 'cancelled') AND deleted_at <= ?1)
                 OR (state = 'cancelled' AND deleted_at IS NULL AND outputs_removed = 0 AND finished_at <= ?1)
              ORDER BY COALESCE(deleted_at, finished_at), id LIMIT ?2"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![before_ms, limit as i64], |r| {
            let job = job_from_row(r)?;
            let (deleted, keep, removed): (bool, bool, bool) = (r.get(11)?, r.get(12)?, r.get(13)?);
            Ok(job.map(|job| {
                let cancelled = job.state == JobState::Cancelled && !removed;
                Purge { outputs: (deleted && !keep) || cancelled, record: deleted, job }
            }))
        })?;
        rows.collect::<Result<Result<_, _>, _>>()?
    }

    /// Up to `limit` events due at `now_ms`, oldest first, each held until `now_ms + claim_ms`.
    pub fn pending_events(
        &self,
        limit: usize,
        claim_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<PendingEvent>, QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pending: Vec<PendingEvent> = {
            let mut stmt = tx.prepare(
                "SELECT seq, id, job_id, kind, webhook, body, attempts, reached FROM events
                  WHERE available_at <= ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now_ms, limit as i64], event_from_row)?;
            rows.collect::<Result<Result<_, _>, _>>()??
        };
        for event in &pending {
            let seq: i64 = event.receipt.parse().unwrap_or_default();
            tx.execute(
                "UPDATE events SET available_at = ?2 WHERE seq = ?1",
                params![seq, now_ms + claim_ms],
            )?;
        }
        tx.commit()?;
        Ok(pending)
    }

    /// Records a delivery: the event goes when done (`retry_in_ms` `None`), else waits that long.
    pub fn event_delivered(
        &self,
        pending: &PendingEvent,
        reached: &std::collections::BTreeSet<String>,
        retry_in_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        let seq: i64 = pending
            .receipt
            .parse()
            .map_err(|_| QueueError::Corrupt(format!("event receipt {:?}", pending.receipt)))?;
        let conn = self.conn();
        match retry_in_ms {
            None => conn.execute("DELETE FROM events WHERE seq = ?1", params![seq])?,
            Some(delay) => {
                let reached =
                    serde_json::to_string(reached).map_err(|e| QueueError::Corrupt(e.to_string()))?;
                conn.execute(
                    "UPDATE events SET attempts = attempts + 1, reached = ?2, available_at = ?3 WHERE seq = ?1",
                    params![seq, reached, now_ms + delay],
                )?
            }
        };
        Ok(())
    }

    /// How job `id`'s shards ran; `None` when there is no such job.
    pub fn shard_stats(&self, id: &str) -> Result<Option<ShardStats>, QueueError> {
        let conn = self.conn();
        if get_job(&conn, id)?.is_none() {
            return Ok(None);
        }
        let (attempts, retried, failed): (i64, i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(attempts), 0), COALESCE(SUM(attempts > 1), 0),
                    COALESCE(SUM(state = 'dead' AND retired = 0), 0)
               FROM tasks WHERE job_id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut stmt = conn.prepare(
            "SELECT done_by, COUNT(*) FROM tasks WHERE job_id = ?1 AND state = 'done' AND done_by IS NOT NULL
              GROUP BY done_by",
        )?;
        let completed_by = stmt
            .query_map(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        Ok(Some(ShardStats {
            attempts: attempts as u64,
            retried: retried as u64,
            failed: failed as u64,
            completed_by,
        }))
    }

    /// Records a cleanup as done: a deleted job's record and tasks go; a cancelled job is marked.
    pub fn purged(&self, purge: &Purge) -> Result<(), QueueError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = &purge.job.id;
        if purge.record {
            let removed =
                tx.execute("DELETE FROM jobs WHERE id = ?1 AND deleted_at IS NOT NULL", params![id])?;
            if removed == 1 {
                tx.execute("DELETE FROM tasks WHERE job_id = ?1", params![id])?;
            }
        } else {
            tx.execute("UPDATE jobs SET outputs_removed = 1 WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Unfinished tasks of all jobs, queued and leased.
    pub fn shard_counts(&self) -> Result<ShardCounts, QueueError> {
        let (queued, leased, oldest): (i64, i64, Option<i64>) = self.conn().query_row(
            "SELECT COALESCE(SUM(state = 'queued'), 0), COALESCE(SUM(state = 'leased'), 0),
                    MIN(CASE WHEN state = 'queued' THEN available_at END)
               FROM tasks WHERE state IN ('queued', 'leased')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(ShardCounts { queued: queued as u64, leased: leased as u64, oldest_queued_at_ms: oldest })
    }
}

/// A row of the events table as a delivery (corrupt when its kind or reached set cannot be read).
fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<PendingEvent, QueueError>> {
    let (seq, id, kind, reached): (i64, String, String, String) =
        (r.get(0)?, r.get(1)?, r.get(3)?, r.get(7)?);
    let Ok(kind) = serde_json::from_value(kind.clone().into()) else {
        return Ok(Err(QueueError::Corrupt(format!("event {id}: kind {kind:?}"))));
    };
    let reached = match serde_json::from_str(&reached) {
        Ok(reached) => reached,
        Err(e) => return Ok(Err(QueueError::Corrupt(format!("event {id}: webhooks reached: {e}")))),
    };
    let event = JobEvent { id, job_id: r.get(2)?, kind, webhook: r.get(4)?, body: r.get(5)? };
    Ok(Ok(PendingEvent { event, attempts: r.get(6)?, reached, receipt: seq.to_string() }))
}

/// Records job `id`'s next event in the outbox (one step of the transaction that changed the job): the
/// state it is in now, or its deletion.
fn record_event(tx: &Connection, id: &str, deleted: bool, now_ms: i64) -> Result<(), QueueError> {
    tx.execute("UPDATE jobs SET events = events + 1 WHERE id = ?1", params![id])?;
    let sql = format!("SELECT {JOB_COLUMNS}, events FROM jobs WHERE id = ?1");
    let row = tx.query_row(&sql, params![id], |r| Ok((job_from_row(r)?, r.get::<_, i64>(11)?))).optional()?;
    let Some((job, number)) = row else { return Ok(()) };
    let job = job?;
    let kind = if deleted { EventKind::Deleted } else { EventKind::entering(job.state) };
    let event = JobEvent::new(&job, kind, number as u64, EVENT_SOURCE, now_ms);
    tx.execute(
        "INSERT INTO events (id, job_id, kind, webhook, body, created_at, available_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        params![event.id, event.job_id, kind.as_str(), event.webhook, event.body, now_ms],
    )?;
    Ok(())
}

/// Marks finished job `id` deleted at `now_ms` and frees its request id (one step of a transaction).
fn delete_finished(tx: &Connection, id: &str, keep_outputs: bool, now_ms: i64) -> Result<(), QueueError> {
    let deleted = tx.execute(
        "UPDATE jobs SET deleted_at = ?2, keep_outputs = ?3, updated_at = ?2 WHERE id = ?1 AND deleted_at IS NULL",
        params![id, now_ms, keep_outputs],
    )?;
    if deleted == 1 {
        record_event(tx, id, true, now_ms)?;
    }
    tx.execute("DELETE FROM idempotency WHERE job_id = ?1", params![id])?;
    Ok(())
}

/// Job `id`, unless there is none or it was deleted.
fn get_job(conn: &Connection, id: &str) -> Result<Option<JobRecord>, QueueError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND deleted_at IS NULL");
    conn.query_row(&sql, params![id], job_from_row).optional()?.transpose()
}

/// A row of [`JOB_COLUMNS`] as a record (corrupt when its spec or state cannot be read).
fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JobRecord, QueueError>> {
    let id: String = r.get(0)?;
    let (spec, state): (String, String) = (r.get(1)?, r.get(2)?);
    let spec = match serde_json::from_str(&spec) {
        Ok(spec) => spec,
        Err(e) => return Ok(Err(QueueError::Corrupt(format!("job {id} spec: {e}")))),
    };
    let Some(state) = JobState::parse(&state) else {
        return Ok(Err(QueueError::Corrupt(format!("job {id} state {state:?}"))));
    };
    Ok(Ok(JobRecord {
        spec,
        state,
        samples_done: r.get::<_, i64>(3)? as u64,
        shards_done: r.get::<_, i64>(4)? as u64,
        shards_total: r.get::<_, i64>(5)? as u64,
        created_at_ms: r.get(6)?,
        started_at_ms: r.get(7)?,
        finished_at_ms: r.get(8)?,
        error: r.get(9)?,
        manifest_uri: r.get(10)?,
        id,
    }))
}
