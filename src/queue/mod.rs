//! Durable queue of shard tasks. The embedded default is one SQLite file ([`sqlite::SqliteTaskQueue`]);
//! the gRPC service drives it from an actor, and a distributed engine can follow behind the same
//! operations (enqueue with dedup, lease, heartbeat, complete, retry later, dead-letter, reap).

pub mod sqlite;

use std::str::FromStr;

/// A shard of a job to run: `payload` is the shard's JSON spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub job_id: String,
    pub shard: u64,
    /// Higher runs first.
    pub priority: i32,
    pub payload: String,
    pub max_attempts: u32,
}

/// A task claimed by a worker until `expires_at` (ms). `attempt` fences every write made under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub task_id: i64,
    pub job_id: String,
    pub shard: u64,
    pub payload: String,
    pub owner: String,
    pub attempt: u32,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Created,
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    Leased,
    Done,
    Dead,
}

impl FromStr for TaskState {
    type Err = QueueError;

    fn from_str(s: &str) -> Result<Self, QueueError> {
        match s {
            "queued" => Ok(TaskState::Queued),
            "leased" => Ok(TaskState::Leased),
            "done" => Ok(TaskState::Done),
            "dead" => Ok(TaskState::Dead),
            other => Err(QueueError::Corrupt(format!("unknown task state {other:?}"))),
        }
    }
}

/// What one reaper pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReapReport {
    pub requeued: usize,
    pub dead: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lease expired and the task was taken over (or finished): the caller must stop working on it.
    #[error("lease on task {task_id} is no longer held")]
    LeaseLost { task_id: i64 },
    #[error("queue store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("queue store is corrupt: {0}")]
    Corrupt(String),
}

#[cfg(test)]
mod tests {
    use super::sqlite::SqliteTaskQueue;
    use super::*;

    fn task(job: &str, shard: u64, priority: i32) -> TaskSpec {
        TaskSpec {
            job_id: job.into(),
            shard,
            priority,
            payload: format!("{{\"shard\":{shard}}}"),
            max_attempts: 2,
        }
    }

    #[test]
    fn enqueue_is_idempotent_per_shard() {
        let q = SqliteTaskQueue::in_memory().unwrap();
        assert_eq!(q.enqueue(&task("j", 0, 0), 0).unwrap(), EnqueueOutcome::Created);
        assert_eq!(q.enqueue(&task("j", 0, 0), 1).unwrap(), EnqueueOutcome::Duplicate);
        assert_eq!(q.enqueue(&task("j", 1, 0), 1).unwrap(), EnqueueOutcome::Created);
    }

    #[test]
    fn leases_go_by_priority_then_age_and_only_once() {
        let q = SqliteTaskQueue::in_memory().unwrap();
        q.enqueue(&task("a", 0, 0), 0).unwrap();
        q.enqueue(&task("b", 0, 5), 1).unwrap();
        q.enqueue(&task("a", 1, 0), 2).unwrap();
        let first = q.lease("w1", 10, 1000).unwrap().unwrap();
        assert_eq!((first.job_id.as_str(), first.shard, first.attempt), ("b", 0, 1));
        let second = q.lease("w2", 10, 1000).unwrap().unwrap();
        assert_eq!((second.job_id.as_str(), second.shard), ("a", 0));
        let third = q.lease("w1", 10, 1000).unwrap().unwrap();
        assert_eq!((third.job_id.as_str(), third.shard), ("a", 1));
        assert!(q.lease("w3", 10, 1000).unwrap().is_none());
    }

    #[test]
    fn an_expired_lease_is_fenced_after_takeover() {
        let q = SqliteTaskQueue::in_memory().unwrap();
        q.enqueue(&task("j", 0, 0), 0).unwrap();
        let mut zombie = q.lease("w1", 0, 100).unwrap().unwrap();
        q.heartbeat(&mut zombie, 50, 100).unwrap();
        assert_eq!(zombie.expires_at, 150);
        // w1 stalls past its lease; the reaper requeues and w2 takes the task over.
        assert_eq!(q.reap(200).unwrap(), ReapReport { requeued: 1, dead: 0 });
        let fresh = q.lease("w2", 200, 100).unwrap().unwrap();
        assert_eq!(fresh.attempt, 2);
        // Every write of the zombie changes nothing.
        assert!(matches!(q.heartbeat(&mut zombie, 210, 100), Err(QueueError::LeaseLost { .. })));
        assert!(matches!(q.complete(&zombie), Err(QueueError::LeaseLost { .. })));
        assert!(matches!(q.dead_letter(&zombie, "x"), Err(QueueError::LeaseLost { .. })));
        assert_eq!(q.task_state("j", 0).unwrap().unwrap().0, TaskState::Leased);
        q.complete(&fresh).unwrap();
        assert_eq!(q.task_state("j", 0).unwrap().unwrap().0, TaskState::Done);
        assert!(matches!(q.complete(&fresh), Err(QueueError::LeaseLost { .. })));
    }

    #[test]
    fn attempts_run_out_into_the_dead_letters() {
        let q = SqliteTaskQueue::in_memory().unwrap();
        q.enqueue(&task("j", 0, 0), 0).unwrap();
        let l1 = q.lease("w", 0, 100).unwrap().unwrap();
        q.retry_later(&l1, 10, 50, "cuda error").unwrap();
        assert!(q.lease("w", 20, 100).unwrap().is_none(), "not available before its delay");
        let l2 = q.lease("w", 60, 100).unwrap().unwrap();
        assert_eq!(l2.attempt, 2);
        // The second (last) attempt expires: the reaper dead-letters instead of requeueing.
        assert_eq!(q.reap(1000).unwrap(), ReapReport { requeued: 0, dead: 1 });
        let (state, attempts, error) = q.task_state("j", 0).unwrap().unwrap();
        assert_eq!((state, attempts), (TaskState::Dead, 2));
        assert_eq!(error.as_deref(), Some("lease expired after the last attempt"));
        assert!(q.lease("w", 2000, 100).unwrap().is_none());
    }

    #[test]
    fn the_queue_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite");
        {
            let q = SqliteTaskQueue::open(&path).unwrap();
            q.enqueue(&task("j", 0, 0), 0).unwrap();
            q.enqueue(&task("j", 1, 0), 0).unwrap();
            let l = q.lease("w", 0, 100).unwrap().unwrap();
            q.complete(&l).unwrap();
            // The process dies holding a lease on shard 1.
            q.lease("w", 0, 100).unwrap().unwrap();
        }
        let q = SqliteTaskQueue::open(&path).unwrap();
        assert_eq!(q.task_state("j", 0).unwrap().unwrap().0, TaskState::Done);
        assert_eq!(q.reap(500).unwrap().requeued, 1);
        let l = q.lease("w2", 500, 100).unwrap().unwrap();
        assert_eq!((l.shard, l.attempt), (1, 2));
    }
}
