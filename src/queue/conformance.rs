//! The behaviour every [`Queue`] backend must have, as one suite: the SQLite store runs it in its unit
//! tests, and a distributed backend runs the same functions against its real server.
//!
//! Leases use real time with short TTLs, so a backend whose timers live on its server is tested as is.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{IdempotencyKey, JobFilter, PageCursor, Queue, QueueError, ShardCounts, ShardStats};
use crate::job::{JobSpec, JobState, ShardPayload};
use crate::schedulers::SchedulerKind;

/// Runs every check, each on a fresh queue from `make` (async, so a backend can connect to its server).
pub async fn run_all<Q: Queue + Clone, F: Future<Output = Q>>(make: impl Fn() -> F) {
    submit_is_atomic_and_idempotent(make().await).await;
    concurrent_resubmits_make_one_job(make().await).await;
    leases_follow_priority_and_are_exclusive(make().await).await;
    expired_leases_are_fenced_and_requeued(make().await).await;
    failures_run_out_into_dead_letters(make().await).await;
    released_tasks_keep_their_attempts(make().await).await;
    failed_jobs_can_be_retried_without_redoing_finished_shards(make().await).await;
    finishing_a_job_retires_its_shards(make().await).await;
    listing_filters_and_pages(make().await).await;
    finished_shards_make_a_job_ready_to_finalize(make().await).await;
    shards_are_counted_by_state(make().await).await;
    deleted_jobs_vanish_and_are_cleaned_up_after_the_grace(make().await).await;
    cancelled_jobs_have_their_outputs_cleaned_up_once(make().await).await;
    retention_deletes_what_finished_long_enough_ago(make().await).await;
    shard_stats_count_attempts_failures_and_runners(make().await).await;
    job_events_wait_in_the_outbox_until_delivered(make().await).await;
}

pub fn spec(num_samples: u64, batch_size: u32, priority: i32, labels: &[(&str, &str)]) -> JobSpec {
    JobSpec {
        request_id: String::new(),
        owner: String::new(),
        model: "tiny".into(),
        scheduler: SchedulerKind::Ddim,
        steps: 10,
        eta: None,
        num_samples,
        seed: 7,
        batch_size,
        samples_per_grid: 16,
        grid_columns: 4,
        output: None,
        priority,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        dataset: Default::default(),
        trace_context: BTreeMap::from([
            ("traceparent".into(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            ("tracestate".into(), "congo=t61rcWkgMzE".into()),
        ]),
        extends: None,
        webhook: None,
        classes: None,
    }
}

fn key(id: &str, hash: &str) -> IdempotencyKey {
    IdempotencyKey { request_id: id.into(), request_hash: hash.into() }
}

const LONG: Duration = Duration::from_secs(60);

pub async fn submit_is_atomic_and_idempotent(q: impl Queue) {
    let first = q.submit(&spec(10, 2, 0, &[]), Some(&key("r1", "h1")), 2, 3).await.unwrap();
    assert!(first.created);
    assert_eq!((first.job.state, first.job.shards_total, first.job.samples_done), (JobState::Queued, 3, 0));
    // The whole spec is stored, the submitter's trace context with it (workers elsewhere read it back).
    assert_eq!(q.job(&first.job.id).await.unwrap().unwrap().spec, spec(10, 2, 0, &[]));
    let again = q.submit(&spec(99, 2, 0, &[]), Some(&key("r1", "h1")), 2, 3).await.unwrap();
    assert!(!again.created);
    assert_eq!((again.job.id.as_str(), again.job.spec.num_samples), (first.job.id.as_str(), 10));
    let conflict = q.submit(&spec(10, 2, 0, &[]), Some(&key("r1", "other")), 2, 3).await.unwrap_err();
    assert!(matches!(conflict, QueueError::IdempotencyConflict { .. }), "{conflict}");
    // Every shard is queued, batch-aligned, exactly once.
    let mut ranges = Vec::new();
    while let Some(l) = q.lease("w", LONG).await.unwrap() {
        let p: ShardPayload = l.range().unwrap();
        ranges.push((l.shard, p.start, p.end));
    }
    ranges.sort();
    assert_eq!(ranges, [(0, 0, 4), (1, 4, 8), (2, 8, 10)]);
    assert_eq!(q.job(&first.job.id).await.unwrap().unwrap().state, JobState::Running);
    assert!(q.job("no-such-job").await.unwrap().is_none());
}

pub async fn concurrent_resubmits_make_one_job(q: impl Queue + Clone) {
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move { q.submit(&spec(4, 2, 0, &[]), Some(&key("same", "h")), 1, 3).await })
        })
        .collect();
    let mut ids = Vec::new();
    let mut created = 0;
    for h in handles {
        let out = h.await.unwrap().unwrap();
        created += usize::from(out.created);
        ids.push(out.job.id);
    }
    ids.dedup();
    assert_eq!((ids.len(), created), (1, 1));
    assert_eq!(q.depth().await.unwrap(), 2, "one set of shard tasks");
}

pub async fn leases_follow_priority_and_are_exclusive(q: impl Queue) {
    let low = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let high = q.submit(&spec(2, 2, 5, &[]), None, 1, 3).await.unwrap().job.id;
    let a = q.lease("w1", LONG).await.unwrap().unwrap();
    let b = q.lease("w2", LONG).await.unwrap().unwrap();
    assert_eq!((a.job_id.as_str(), b.job_id.as_str()), (high.as_str(), low.as_str()));
    assert_eq!((a.attempt, a.owner.as_str()), (1, "w1"));
    assert!(q.lease("w3", LONG).await.unwrap().is_none());
}

pub async fn expired_leases_are_fenced_and_requeued(q: impl Queue) {
    let id = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let mut zombie = q.lease("w1", Duration::from_millis(200)).await.unwrap().unwrap();
    q.heartbeat(&mut zombie, Duration::from_millis(50)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(q.reap().await.unwrap().requeued, 1);
    let fresh = q.lease("w2", LONG).await.unwrap().unwrap();
    assert_eq!((fresh.shard, fresh.attempt), (zombie.shard, 2));
    assert!(matches!(q.heartbeat(&mut zombie, LONG).await, Err(QueueError::LeaseLost { .. })));
    assert!(matches!(q.complete_shard(&zombie, 2).await, Err(QueueError::LeaseLost { .. })));
    assert!(matches!(q.retry_later(&zombie, Duration::ZERO, "x").await, Err(QueueError::LeaseLost { .. })));
    let job = q.complete_shard(&fresh, 2).await.unwrap();
    assert_eq!((job.samples_done, job.shards_done), (2, 1));
    // A completion counts once.
    assert!(matches!(q.complete_shard(&fresh, 2).await, Err(QueueError::LeaseLost { .. })));
    assert_eq!(q.job(&id).await.unwrap().unwrap().samples_done, 2);
}

pub async fn failures_run_out_into_dead_letters(q: impl Queue) {
    let id = q.submit(&spec(2, 2, 0, &[]), None, 1, 2).await.unwrap().job.id;
    let l1 = q.lease("w", LONG).await.unwrap().unwrap();
    q.retry_later(&l1, Duration::from_millis(150), "cuda error").await.unwrap();
    assert!(q.lease("w", LONG).await.unwrap().is_none(), "not available before its delay");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let l2 = q.lease("w", LONG).await.unwrap().unwrap();
    assert_eq!(l2.attempt, 2);
    q.retry_later(&l2, Duration::ZERO, "cuda error again").await.unwrap();
    assert!(q.lease("w", LONG).await.unwrap().is_none(), "dead after its last attempt");
    assert_eq!(q.jobs_with_dead_shards().await.unwrap(), [(id.clone(), "cuda error again".to_string())]);
    let failed = q.finish_job(&id, JobState::Failed, Some("shard 0: cuda error again"), None).await.unwrap();
    assert_eq!(failed.unwrap().state, JobState::Failed);
    assert!(q.jobs_with_dead_shards().await.unwrap().is_empty());
}

pub async fn released_tasks_keep_their_attempts(q: impl Queue) {
    q.submit(&spec(2, 2, 0, &[]), None, 1, 1).await.unwrap();
    let l = q.lease("w", LONG).await.unwrap().unwrap();
    q.release(&l, Duration::ZERO, "draining").await.unwrap();
    let again = q.lease("w", LONG).await.unwrap().unwrap();
    assert_eq!(again.attempt, 1, "a drained shard does not spend its single attempt");
    // An outage postpones the shard without spending its attempt either.
    q.release(&again, Duration::from_millis(150), "store unavailable").await.unwrap();
    assert!(q.lease("w", LONG).await.unwrap().is_none(), "not available before its delay");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another worker takes it (the fence is owner and attempt: a given-back attempt is reused).
    let later = q.lease("w2", LONG).await.unwrap().unwrap();
    assert_eq!(later.attempt, 1);
    assert!(matches!(q.release(&again, Duration::ZERO, "x").await, Err(QueueError::LeaseLost { .. })));
}

pub async fn failed_jobs_can_be_retried_without_redoing_finished_shards(q: impl Queue) {
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 1).await.unwrap().job.id;
    let done = q.lease("w", LONG).await.unwrap().unwrap();
    let failing = q.lease("w", LONG).await.unwrap().unwrap();
    q.complete_shard(&done, 2).await.unwrap();
    q.retry_later(&failing, Duration::ZERO, "store refused").await.unwrap();
    assert_eq!(q.jobs_with_dead_shards().await.unwrap().len(), 1);
    q.finish_job(&id, JobState::Failed, Some("store refused"), None).await.unwrap();
    let queued = q.submit(&spec(2, 2, 0, &[]), None, 1, 1).await.unwrap().job.id;
    assert_eq!(q.retry_job(&queued).await.unwrap().unwrap().state, JobState::Queued, "only FAILED jobs");
    assert!(q.retry_job("no-such-job").await.unwrap().is_none());
    let job = q.retry_job(&id).await.unwrap().unwrap();
    assert_eq!((job.state, job.error.as_deref(), job.finished_at_ms), (JobState::Running, None, None));
    assert_eq!((job.shards_done, job.samples_done), (1, 2), "finished shards stay finished");
    assert!(q.jobs_with_dead_shards().await.unwrap().is_empty());
    // The dead shard runs again with a fresh attempt; the other job's shard is leased too.
    let mut leased = Vec::new();
    while let Some(l) = q.lease("w", LONG).await.unwrap() {
        leased.push((l.job_id.clone(), l.shard, l.attempt));
    }
    leased.sort();
    let mut expected = vec![(id.clone(), failing.shard, 1), (queued.clone(), 0, 1)];
    expected.sort();
    assert_eq!(leased, expected);
}

pub async fn finishing_a_job_retires_its_shards(q: impl Queue) {
    let id = q.submit(&spec(6, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let running = q.lease("w", LONG).await.unwrap().unwrap();
    let job = q.finish_job(&id, JobState::Cancelled, None, None).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.finished_at_ms.is_some());
    assert!(q.lease("w", LONG).await.unwrap().is_none());
    let mut running = running;
    assert!(matches!(q.heartbeat(&mut running, LONG).await, Err(QueueError::LeaseLost { .. })));
    // The first terminal state is final.
    let again = q.finish_job(&id, JobState::Succeeded, None, Some("x")).await.unwrap().unwrap();
    assert_eq!((again.state, again.manifest_uri), (JobState::Cancelled, None));
    assert_eq!(q.depth().await.unwrap(), 0);
}

pub async fn listing_filters_and_pages(q: impl Queue) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        ids.push(q.submit(&spec(2, 2, 0, &[("team", team), ("x.y", "z")]), None, 1, 3).await.unwrap().job.id);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    q.finish_job(&ids[0], JobState::Cancelled, None, None).await.unwrap();
    let mut counts = q.job_counts().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(counts, [(JobState::Cancelled, 1), (JobState::Queued, 4)]);
    let all = JobFilter::default();
    let mut seen = Vec::new();
    let mut cursor: Option<PageCursor> = None;
    loop {
        let page = q.list_jobs(&all, cursor.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        cursor = Some(PageCursor { created_at_ms: last.created_at_ms, id: last.id.clone() });
        seen.extend(page.iter().map(|j| j.id.clone()));
    }
    let newest_first: Vec<_> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    let team_a = JobFilter { labels: [("team".to_string(), "a".to_string())].into(), ..Default::default() };
    assert_eq!(q.list_jobs(&team_a, None, 10).await.unwrap().len(), 3);
    let dotted = JobFilter { labels: [("x.y".to_string(), "z".to_string())].into(), ..Default::default() };
    assert_eq!(q.list_jobs(&dotted, None, 10).await.unwrap().len(), 5);
    let cancelled_a = JobFilter { states: vec![JobState::Cancelled], ..team_a.clone() };
    let found = q.list_jobs(&cancelled_a, None, 10).await.unwrap();
    assert_eq!(found.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [ids[0].as_str()]);
    let queued_or_running =
        JobFilter { states: vec![JobState::Queued, JobState::Running], ..Default::default() };
    assert_eq!(q.list_jobs(&queued_or_running, None, 10).await.unwrap().len(), 4);
}

pub async fn finished_shards_make_a_job_ready_to_finalize(q: impl Queue) {
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let a = q.lease("w", LONG).await.unwrap().unwrap();
    let b = q.lease("w", LONG).await.unwrap().unwrap();
    q.complete_shard(&a, 2).await.unwrap();
    assert!(q.jobs_to_finalize(Duration::ZERO).await.unwrap().is_empty());
    let job = q.complete_shard(&b, 2).await.unwrap();
    assert_eq!((job.shards_done, job.shards_total, job.samples_done), (2, 2, 4));
    assert!(q.jobs_to_finalize(LONG).await.unwrap().is_empty(), "its finisher still has time");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(q.jobs_to_finalize(Duration::from_millis(1)).await.unwrap(), std::slice::from_ref(&id));
    q.finish_job(&id, JobState::Succeeded, None, Some("file:///m.json")).await.unwrap();
    assert!(q.jobs_to_finalize(Duration::ZERO).await.unwrap().is_empty());
}

/// The queue's counts of unfinished shards (what autoscaling reads): a lease moves a shard from
/// queued to leased, a retry (even one still waiting out its delay) back; completed and dead-lettered
/// shards leave the counts, and so do a cancelled job's.
pub async fn shards_are_counted_by_state(q: impl Queue) {
    let counts = |queued: u64, leased: u64| (queued, leased);
    let pair = |c: ShardCounts| (c.queued, c.leased);
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(0, 0));
    assert_eq!(q.shard_counts().await.unwrap().oldest_queued_at_ms, None, "no shard waits");
    // Job a: 3 shards of one attempt each; job b: 2 shards of 3 attempts. Leases come oldest first.
    let before = crate::queue::now_ms();
    let a = q.submit(&spec(6, 2, 0, &[]), None, 1, 1).await.unwrap().job.id;
    let b = q.submit(&spec(4, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(5, 0));
    let oldest = q.shard_counts().await.unwrap().oldest_queued_at_ms.expect("shards wait");
    assert!((before..=crate::queue::now_ms()).contains(&oldest), "the first shard waits since it was queued");
    let l1 = q.lease("w1", LONG).await.unwrap().unwrap();
    let l2 = q.lease("w2", LONG).await.unwrap().unwrap();
    assert_eq!((l1.job_id.as_str(), l2.job_id.as_str()), (a.as_str(), a.as_str()));
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(3, 2));
    assert_eq!(q.depth().await.unwrap(), 5);
    q.complete_shard(&l1, 2).await.unwrap();
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(3, 1));
    q.retry_later(&l2, Duration::ZERO, "boom").await.unwrap();
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(3, 0), "a dead-lettered shard is not counted");
    let l3 = q.lease("w1", LONG).await.unwrap().unwrap();
    q.complete_shard(&l3, 2).await.unwrap();
    let l4 = q.lease("w1", LONG).await.unwrap().unwrap();
    assert_eq!(l4.job_id, b);
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(1, 1));
    q.retry_later(&l4, LONG, "boom").await.unwrap();
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(2, 0), "a delayed retry counts as queued");
    for id in [&a, &b] {
        q.finish_job(id, JobState::Cancelled, None, None).await.unwrap();
    }
    assert_eq!(pair(q.shard_counts().await.unwrap()), counts(0, 0));
    assert_eq!(q.shard_counts().await.unwrap().oldest_queued_at_ms, None);
}

/// DeleteJob's part in the store: only a finished job is deleted; from then on it is not found, listed
/// or counted, its request id makes a new job, and its cleanup is due after the grace (outputs and
/// record), once: after `purged` nothing of it is left to clean.
pub async fn deleted_jobs_vanish_and_are_cleaned_up_after_the_grace(q: impl Queue) {
    let keyed = spec(4, 2, 0, &[("team", "a")]);
    let id = q.submit(&keyed, Some(&key("r-del", "h")), 1, 3).await.unwrap().job.id;
    let other = q.submit(&spec(4, 2, 0, &[("team", "a")]), None, 1, 3).await.unwrap().job.id;
    // Unfinished: returned as it is, not deleted.
    let running = q.delete_job(&id, false).await.unwrap().unwrap();
    assert_eq!(running.state, JobState::Queued);
    assert!(q.job(&id).await.unwrap().is_some());
    let lease = q.lease("w", LONG).await.unwrap().unwrap();
    q.finish_job(&id, JobState::Cancelled, Some("deleted by request"), None).await.unwrap();
    let deleted = q.delete_job(&id, false).await.unwrap().unwrap();
    assert_eq!((deleted.id.as_str(), deleted.state), (id.as_str(), JobState::Cancelled));
    assert!(q.job(&id).await.unwrap().is_none(), "a deleted job is not found");
    assert!(q.delete_job(&id, false).await.unwrap().is_none(), "nor deleted twice");
    assert!(q.retry_job(&id).await.unwrap().is_none());
    assert!(q.finish_job(&id, JobState::Failed, None, None).await.unwrap().is_none());
    let team_a = JobFilter { labels: [("team".to_string(), "a".to_string())].into(), ..Default::default() };
    let listed: Vec<String> =
        q.list_jobs(&team_a, None, 10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(listed, std::slice::from_ref(&other));
    assert_eq!(q.job_counts().await.unwrap(), [(JobState::Queued, 1)]);
    let mut zombie = lease;
    assert!(matches!(q.heartbeat(&mut zombie, LONG).await, Err(QueueError::LeaseLost { .. })));
    // Its request id is free again: the same request makes a new job.
    let again = q.submit(&keyed, Some(&key("r-del", "h")), 1, 3).await.unwrap();
    assert!(again.created && again.job.id != id);
    // The cleanup waits for the grace, then lists the job once per pass until it is recorded as done.
    assert!(q.jobs_to_purge(LONG, 10).await.unwrap().is_empty(), "its workers may still write");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let due = q.jobs_to_purge(Duration::from_millis(1), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].job.id.as_str(), due[0].outputs, due[0].record), (id.as_str(), true, true));
    q.purged(&due[0]).await.unwrap();
    assert!(q.jobs_to_purge(Duration::ZERO, 10).await.unwrap().is_empty());
    assert!(q.job(&id).await.unwrap().is_none());
    assert!(q.job(&other).await.unwrap().is_some(), "another job is untouched");
}

/// A cancelled job's outputs are due for deletion after the grace, and only once; its record stays.
pub async fn cancelled_jobs_have_their_outputs_cleaned_up_once(q: impl Queue) {
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let done = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    q.finish_job(&id, JobState::Cancelled, None, None).await.unwrap();
    q.finish_job(&done, JobState::Failed, Some("boom"), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let due = q.jobs_to_purge(Duration::from_millis(1), 10).await.unwrap();
    assert_eq!(due.len(), 1, "a failed job keeps its outputs for a retry");
    assert_eq!((due[0].job.id.as_str(), due[0].outputs, due[0].record), (id.as_str(), true, false));
    q.purged(&due[0]).await.unwrap();
    assert!(q.jobs_to_purge(Duration::ZERO, 10).await.unwrap().is_empty());
    assert_eq!(q.job(&id).await.unwrap().unwrap().state, JobState::Cancelled);
}

/// Retention deletes finished jobs once they are old enough, oldest first, up to the limit; the ones
/// still running and the young ones stay. With `keep_outputs` the cleanup removes the record only.
pub async fn retention_deletes_what_finished_long_enough_ago(q: impl Queue) {
    let mut finished = Vec::new();
    for _ in 0..3 {
        let id = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
        q.finish_job(&id, JobState::Succeeded, None, Some("file:///m.json")).await.unwrap();
        finished.push(id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let running = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    assert!(q.expire_jobs(LONG, true, 10).await.unwrap().is_empty(), "none is old enough");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let expired = q.expire_jobs(Duration::from_millis(1), true, 2).await.unwrap();
    assert_eq!(expired, finished[..2], "the oldest first, up to the limit");
    assert!(q.job(&finished[0]).await.unwrap().is_none());
    assert!(q.job(&finished[2]).await.unwrap().is_some());
    assert!(q.job(&running).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let due = q.jobs_to_purge(Duration::from_millis(1), 10).await.unwrap();
    let mut plan: Vec<(&str, bool, bool)> =
        due.iter().map(|p| (p.job.id.as_str(), p.outputs, p.record)).collect();
    plan.sort();
    let mut expected = [(finished[0].as_str(), false, true), (finished[1].as_str(), false, true)];
    expected.sort();
    assert_eq!(plan, expected, "deleted, records to remove, objects kept");
}

/// How a job's shards ran: the attempts they took, those retried, those that failed on their own
/// account (not the ones retired with their job), and who completed them.
pub async fn shard_stats_count_attempts_failures_and_runners(q: impl Queue) {
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    assert_eq!(q.shard_stats(&id).await.unwrap().unwrap(), ShardStats::default());
    let first = q.lease("w1/cpu", LONG).await.unwrap().unwrap();
    let second = q.lease("w2/cuda:0", LONG).await.unwrap().unwrap();
    q.complete_shard(&first, 2).await.unwrap();
    q.retry_later(&second, Duration::ZERO, "boom").await.unwrap();
    let again = q.lease("w2/cuda:0", LONG).await.unwrap().unwrap();
    assert_eq!((again.shard, again.attempt), (second.shard, 2));
    q.complete_shard(&again, 2).await.unwrap();
    let stats = q.shard_stats(&id).await.unwrap().unwrap();
    let runners = [("w1/cpu".to_string(), 1), ("w2/cuda:0".to_string(), 1)].into();
    assert_eq!(stats, ShardStats { attempts: 3, retried: 1, failed: 0, completed_by: runners });

    // One attempt per shard: the first fails for good, the job fails, and its other shard is retired.
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 1).await.unwrap().job.id;
    let doomed = q.lease("w1/cpu", LONG).await.unwrap().unwrap();
    q.retry_later(&doomed, Duration::ZERO, "boom").await.unwrap();
    q.finish_job(&id, JobState::Failed, Some("a shard failed"), None).await.unwrap();
    let stats = q.shard_stats(&id).await.unwrap().unwrap();
    assert_eq!(stats, ShardStats { attempts: 1, retried: 0, failed: 1, completed_by: Default::default() });
    assert!(q.shard_stats("no-such-job").await.unwrap().is_none());
}

/// Events due now, polled for up to 5 s until `n` are there (a backend's redelivery may take a moment).
async fn due_events(q: &impl Queue, n: usize) -> Vec<super::PendingEvent> {
    let mut due = Vec::new();
    for _ in 0..100 {
        due.extend(q.pending_events(16, LONG).await.unwrap());
        if due.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    due.sort_by(|a, b| a.event.id.cmp(&b.event.id));
    due
}

/// The outbox of job events: each change of a job is recorded with it, handed out (to one taker at a
/// time) until it is delivered, with the attempts made and the webhooks it reached so far.
pub async fn job_events_wait_in_the_outbox_until_delivered(q: impl Queue) {
    use crate::events::EventKind;
    let id = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let first = due_events(&q, 1).await;
    assert_eq!(first.len(), 1);
    let queued = &first[0];
    assert_eq!((queued.event.id.clone(), queued.event.kind), (format!("{id}.1"), EventKind::Queued));
    assert_eq!((queued.attempts, queued.reached.len()), (0, 0));
    let body: serde_json::Value = serde_json::from_str(&queued.event.body).unwrap();
    assert_eq!(
        (body["type"].as_str(), body["subject"].as_str()),
        (Some("dev.ddpm.job.queued"), Some(id.as_str()))
    );
    assert!(q.pending_events(16, LONG).await.unwrap().is_empty(), "a taken event is the taker's");
    let reached: std::collections::BTreeSet<String> = ["http://hooks.example/a".to_string()].into();
    q.event_delivered(queued, &reached, Some(Duration::ZERO)).await.unwrap();
    let again = due_events(&q, 1).await;
    assert_eq!((again[0].event.id.as_str(), again[0].attempts), (queued.event.id.as_str(), 1));
    assert_eq!(again[0].reached, reached, "the webhooks it reached are kept for its next try");
    q.event_delivered(&again[0], &reached, None).await.unwrap();

    let lease = q.lease("w", LONG).await.unwrap().unwrap();
    assert_eq!(lease.job_id, id);
    q.finish_job(&id, JobState::Cancelled, Some("cancelled by request"), None).await.unwrap();
    let next = due_events(&q, 2).await;
    let kinds: Vec<(String, EventKind)> = next.iter().map(|p| (p.event.id.clone(), p.event.kind)).collect();
    assert_eq!(kinds, [(format!("{id}.2"), EventKind::Running), (format!("{id}.3"), EventKind::Cancelled)]);
    for pending in &next {
        q.event_delivered(pending, &Default::default(), None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(q.pending_events(16, LONG).await.unwrap().is_empty(), "delivered events are gone");
}
