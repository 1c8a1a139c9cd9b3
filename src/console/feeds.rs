//! What the console's live pages show, read from the queue once however many browsers watch.
//!
//! A watched job has one feed: a task that reads the job every [`JOB_POLL`] (what `WatchJob` does per
//! stream), and when it changed, reads how its shards ran and which of its first grids are written,
//! then publishes the job's view on a [`watch`] channel. The job list has one feed too, reading the
//! newest [`LIST_SIZE`] jobs every [`LIST_POLL`]. Each browser's event stream only reads the channel: a
//! hundred viewers of a job cost the queue what one does. A feed's task stops when its last viewer
//! leaves.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::handlers::WorkerService;
use crate::api::pb;
use crate::job::{JobRecord, JobState};
use crate::queue::JobFilter;
use crate::worker::WorkerContext;
use crate::worker::outputs::{self, JobOutputs};

/// How often a watched job is read (as `WatchJob` reads it).
const JOB_POLL: Duration = Duration::from_millis(200);
/// How often a job in a final state is read (it may be retried or deleted).
const FINAL_POLL: Duration = Duration::from_secs(2);
/// How often the job list is read.
const LIST_POLL: Duration = Duration::from_secs(1);
/// Jobs the list shows: the newest.
pub const LIST_SIZE: usize = 200;
/// Grids a job page shows, at most (as GetJob's grid_uris).
const MAX_GRIDS: usize = 64;
/// How often an event stream looks whether the server is draining (it then ends, so that it does not
/// hold the graceful shutdown; the page reconnects to another replica or after the restart).
const DRAIN_CHECK: Duration = Duration::from_millis(500);

/// What a job feed holds.
#[derive(Debug, Clone)]
enum JobSnapshot {
    /// Not read yet.
    Pending,
    /// The view, serialized once for every viewer.
    Job { view: Arc<str>, state: JobState },
    /// The job is gone (deleted), or the queue said why it cannot be read.
    Gone(String),
}

/// A running feed: its channel, and its task, stopped when the last viewer drops the feed.
struct Feed<T> {
    rx: watch::Receiver<T>,
    task: tokio::task::AbortHandle,
    kind: &'static str,
}

impl<T> Feed<T> {
    fn new(rx: watch::Receiver<T>, task: tokio::task::AbortHandle, kind: &'static str) -> Arc<Feed<T>> {
        metrics::gauge!("ddpm_console_feeds", "kind" => kind).increment(1.0);
        Arc::new(Feed { rx, task, kind })
    }
}

impl<T> Drop for Feed<T> {
    fn drop(&mut self) {
        self.task.abort();
        metrics::gauge!("ddpm_console_feeds", "kind" => self.kind).decrement(1.0);
    }
}

/// Event streams open at once, at most: each holds a connection and a task.
pub const MAX_VIEWERS: usize = 1000;

/// One browser's event stream, counted while it is open (`ddpm_console_viewers`).
struct Viewing {
    kind: &'static str,
    open: Arc<AtomicUsize>,
}

impl Viewing {
    /// A place for one more stream, or `None` when [`MAX_VIEWERS`] are open.
    fn admit(open: &Arc<AtomicUsize>, kind: &'static str) -> Option<Viewing> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_VIEWERS).then_some(n + 1))
            .ok()?;
        metrics::gauge!("ddpm_console_viewers", "kind" => kind).increment(1.0);
        Some(Viewing { kind, open: Arc::clone(open) })
    }
}

impl Drop for Viewing {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("ddpm_console_viewers", "kind" => self.kind).decrement(1.0);
    }
}

/// The list feed's snapshot: the newest jobs, newest first, each with its view (serialized once).
type ListSnapshot = Option<Arc<Vec<(String, Arc<str>)>>>;

pub struct Feeds {
    service: WorkerService,
    jobs: Mutex<HashMap<String, Weak<Feed<JobSnapshot>>>>,
    list: Mutex<Weak<Feed<ListSnapshot>>>,
    /// Event streams open now.
    viewers: Arc<AtomicUsize>,
}

impl Feeds {
    pub fn new(service: WorkerService) -> Feeds {
        Feeds {
            service,
            jobs: Mutex::new(HashMap::new()),
            list: Mutex::new(Weak::new()),
            viewers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The view of a job: the job in the protobuf JSON mapping (`job`), and its first grids (`grids`:
    /// number, first and end sample, whether it is written yet).
    pub async fn job_view(&self, job: &pb::Job) -> Value {
        let record = match self.service.ctx.queue.job(&job.job_id).await {
            Ok(Some(record)) => record,
            _ => return json!({ "job": job_json(job), "grids": [] }),
        };
        let mut grids = Grids::default();
        grids.probe(&self.service, &record).await;
        json!({ "job": job_json(job), "grids": grids.to_json() })
    }

    fn job_feed(&self, id: &str) -> Arc<Feed<JobSnapshot>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(feed) = jobs.get(id).and_then(Weak::upgrade) {
            return feed;
        }
        jobs.retain(|_, f| f.strong_count() > 0);
        let (tx, rx) = watch::channel(JobSnapshot::Pending);
        let task = tokio::spawn(follow_job(self.service.clone(), id.to_string(), tx)).abort_handle();
        let feed = Feed::new(rx, task, "job");
        jobs.insert(id.to_string(), Arc::downgrade(&feed));
        feed
    }

    fn list_feed(&self) -> Arc<Feed<ListSnapshot>> {
        let mut list = self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(feed) = list.upgrade() {
            return feed;
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(follow_list(self.service.clone(), tx)).abort_handle();
        let feed = Feed::new(rx, task, "list");
        *list = Arc::downgrade(&feed);
        feed
    }

    /// A browser's stream of one job: `job` events (the view) as it changes, the last after a final
    /// state, or `gone` when it is deleted. `None` when [`MAX_VIEWERS`] streams are open.
    pub fn job_events(
        &self,
        ctx: Arc<WorkerContext>,
        id: &str,
    ) -> Option<impl Stream<Item = Result<Event, Infallible>> + Send + use<>> {
        let viewing = Viewing::admit(&self.viewers, "job")?;
        let feed = self.job_feed(id);
        let mut rx = feed.rx.clone();
        // The first wait returns at once, with the feed's current value.
        rx.mark_changed();
        struct Viewer {
            _viewing: Viewing,
            /// Keeps the feed running while this viewer watches.
            _feed: Arc<Feed<JobSnapshot>>,
            rx: watch::Receiver<JobSnapshot>,
            ctx: Arc<WorkerContext>,
            done: bool,
        }
        let viewer = Viewer { _viewing: viewing, _feed: feed, rx, ctx, done: false };
        Some(futures_util::stream::unfold(viewer, |mut v| async move {
            if v.done {
                return None;
            }
            loop {
                match next(&mut v.rx, &v.ctx).await {
                    Next::Changed => {}
                    Next::Closed => return None,
                    Next::Draining => {
                        v.done = true;
                        return Some((Ok(draining_event()), v));
                    }
                }
                let snapshot = v.rx.borrow_and_update().clone();
                match snapshot {
                    JobSnapshot::Pending => continue,
                    JobSnapshot::Gone(why) => {
                        v.done = true;
                        return Some((Ok(Event::default().event("gone").data(why)), v));
                    }
                    JobSnapshot::Job { view, state } => {
                        let event = Event::default().event("job").data(&*view);
                        if state.is_terminal() {
                            // The final state is sent; the page keeps it (a retry is the page's to ask).
                            v.done = true;
                        }
                        return Some((Ok(event), v));
                    }
                }
            }
        }))
    }

    /// A browser's stream of the job list: `snapshot` (every job, newest first) once the list is read,
    /// then `job` for each job that changed or came in, and `removed` (its id) for each that left.
    /// `None` when [`MAX_VIEWERS`] streams are open.
    pub fn list_events(
        &self,
        ctx: Arc<WorkerContext>,
    ) -> Option<impl Stream<Item = Result<Event, Infallible>> + Send + use<>> {
        let viewing = Viewing::admit(&self.viewers, "list")?;
        let feed = self.list_feed();
        let mut rx = feed.rx.clone();
        // The first wait returns at once, with the feed's current value.
        rx.mark_changed();
        struct Viewer {
            _viewing: Viewing,
            /// Keeps the feed running while this viewer watches.
            _feed: Arc<Feed<ListSnapshot>>,
            rx: watch::Receiver<ListSnapshot>,
            ctx: Arc<WorkerContext>,
            /// What this browser has: id → view.
            sent: Option<HashMap<String, Arc<str>>>,
            pending: std::collections::VecDeque<Event>,
            done: bool,
        }
        let viewer = Viewer {
            _viewing: viewing,
            _feed: feed,
            rx,
            ctx,
            sent: None,
            pending: Default::default(),
            done: false,
        };
        Some(futures_util::stream::unfold(viewer, |mut v| async move {
            loop {
                if let Some(event) = v.pending.pop_front() {
                    return Some((Ok(event), v));
                }
                if v.done {
                    return None;
                }
                match next(&mut v.rx, &v.ctx).await {
                    Next::Changed => {}
                    Next::Closed => return None,
                    Next::Draining => {
                        v.done = true;
                        v.pending.push_back(draining_event());
                        continue;
                    }
                }
                let Some(jobs) = v.rx.borrow_and_update().clone() else { continue };
                match v.sent.as_mut() {
                    None => {
                        let list: Vec<&str> = jobs.iter().map(|(_, view)| view.as_ref()).collect();
                        let list = format!("[{}]", list.join(","));
                        v.pending.push_back(Event::default().event("snapshot").data(list));
                        v.sent = Some(jobs.iter().map(|(id, view)| (id.clone(), Arc::clone(view))).collect());
                    }
                    Some(sent) => {
                        let now: HashMap<&str, &Arc<str>> =
                            jobs.iter().map(|(id, view)| (id.as_str(), view)).collect();
                        let removed: Vec<String> =
                            sent.keys().filter(|id| !now.contains_key(id.as_str())).cloned().collect();
                        for id in removed {
                            sent.remove(&id);
                            v.pending.push_back(Event::default().event("removed").data(id));
                        }
                        // Oldest first, so that a page inserting at the top keeps the newest on top.
                        for (id, view) in jobs.iter().rev() {
                            if sent.get(id).is_none_or(|old| !Arc::ptr_eq(old, view)) {
                                sent.insert(id.clone(), Arc::clone(view));
                                v.pending.push_back(Event::default().event("job").data(&**view));
                            }
                        }
                    }
                }
            }
        }))
    }
}

/// What a viewer's wait for its feed ended with.
enum Next {
    /// The feed has a new value (or, the first time, its current one).
    Changed,
    /// The server is draining: the stream ends, so that it does not hold the graceful shutdown.
    Draining,
    /// The feed is gone.
    Closed,
}

/// Waits for the feed's next value, looking every [`DRAIN_CHECK`] whether the server drains.
async fn next<T>(rx: &mut watch::Receiver<T>, ctx: &WorkerContext) -> Next {
    loop {
        tokio::select! {
            changed = rx.changed() => return if changed.is_ok() { Next::Changed } else { Next::Closed },
            _ = tokio::time::sleep(DRAIN_CHECK) => {
                if ctx.draining.load(Ordering::Relaxed) {
                    return Next::Draining;
                }
            }
        }
    }
}

fn draining_event() -> Event {
    Event::default().event("draining").data("the server is shutting down")
}

/// A job in the protobuf JSON mapping (what `--output json` and the Python client print).
fn job_json(job: &pb::Job) -> Value {
    serde_json::from_str(&crate::client::to_json(job, "ddpm.v1.Job")).unwrap_or(Value::Null)
}

/// Which of a job's first [`MAX_GRIDS`] grids are written (each by the shard that holds its samples,
/// as soon as that shard finishes).
#[derive(Debug, Default)]
struct Grids {
    ranges: Vec<outputs::GridRange>,
    written: Vec<bool>,
}

impl Grids {
    /// Looks for the grids not seen yet (all are there once the job SUCCEEDED).
    async fn probe(&mut self, service: &WorkerService, job: &JobRecord) {
        if self.ranges.is_empty() {
            self.ranges = outputs::grid_ranges(&job.spec).take(MAX_GRIDS).collect();
            self.written = vec![false; self.ranges.len()];
        }
        if job.state == JobState::Succeeded {
            self.written.iter_mut().for_each(|w| *w = true);
            return;
        }
        if job.samples_done == 0 || self.written.iter().all(|w| *w) {
            return;
        }
        let Ok(out) = service.ctx.outputs.for_job(&job.id, &job.spec).await else { return };
        for (range, written) in self.ranges.iter().zip(self.written.iter_mut()) {
            if !*written {
                *written = exists(&out, &out.grid_key(range.number)).await;
            }
        }
    }

    fn to_json(&self) -> Value {
        let grids: Vec<Value> = self
            .ranges
            .iter()
            .zip(&self.written)
            .map(|(g, w)| {
                json!({ "number": g.number, "path": outputs::grid_path(g.number), "first": g.first, "end": g.end, "written": w })
            })
            .collect();
        Value::Array(grids)
    }
}

async fn exists(out: &JobOutputs, key: &str) -> bool {
    matches!(out.store.get_range(key, 0, 1).await, Ok(Some(_)))
}

/// The task of a job feed: reads the job, and publishes its view when it changed.
async fn follow_job(service: WorkerService, id: String, tx: watch::Sender<JobSnapshot>) {
    let mut last: Option<JobRecord> = None;
    let mut grids = Grids::default();
    loop {
        let pause = match service.ctx.queue.job(&id).await {
            Ok(Some(job)) => {
                if last.as_ref() != Some(&job) {
                    let mut shown = service.to_pb(&job).await;
                    // How its shards ran, read again only when the job changed.
                    if let Ok(Some(stats)) = service.ctx.queue.shard_stats(&job.id).await {
                        shown.shard_stats = Some(crate::api::convert::shard_stats_to_pb(&stats));
                    }
                    grids.probe(&service, &job).await;
                    let view = json!({ "job": job_json(&shown), "grids": grids.to_json() }).to_string();
                    tx.send_replace(JobSnapshot::Job { view: view.into(), state: job.state });
                    last = Some(job);
                }
                if last.as_ref().is_some_and(|j| j.state.is_terminal()) { FINAL_POLL } else { JOB_POLL }
            }
            Ok(None) => {
                tx.send_replace(JobSnapshot::Gone(format!("job {id} is not found (deleted?)")));
                return;
            }
            // The queue is out of reach: the page keeps what it has, and the feed tries again.
            Err(e) => {
                tracing::debug!(job_id = id, error = %e, "console: the job could not be read");
                FINAL_POLL
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// The task of the list feed: reads the newest jobs, and publishes the list when any changed (a job's
/// view is made again only when its record changed).
async fn follow_list(service: WorkerService, tx: watch::Sender<ListSnapshot>) {
    let mut known: BTreeMap<String, (JobRecord, Arc<str>)> = BTreeMap::new();
    let filter = JobFilter::default();
    loop {
        match service.ctx.queue.list_jobs(&filter, None, LIST_SIZE).await {
            Ok(jobs) => {
                let mut list = Vec::with_capacity(jobs.len());
                let mut next = BTreeMap::new();
                for job in jobs {
                    let view = match known.remove(&job.id) {
                        Some((old, view)) if old == job => view,
                        _ => json!({ "job": job_json(&service.to_pb(&job).await) }).to_string().into(),
                    };
                    list.push((job.id.clone(), Arc::clone(&view)));
                    next.insert(job.id.clone(), (job, view));
                }
                known = next;
                // Published only when a job came, went or changed (its view is then a new one).
                let changed = tx.borrow().as_ref().is_none_or(|published| {
                    list.len() != published.len()
                        || list
                            .iter()
                            .zip(published.iter())
                            .any(|(a, b)| a.0 != b.0 || !Arc::ptr_eq(&a.1, &b.1))
                });
                if changed {
                    tx.send_replace(Some(Arc::new(list)));
                }
            }
            Err(e) => tracing::debug!(error = %e, "console: the job list could not be read"),
        }
        tokio::time::sleep(LIST_POLL).await;
    }
}
