//! Deleting jobs, and what the cleanup removes after them: DeleteJob on both queues (SQLite, NATS) and
//! both stores (a local folder, S3), a cancelled job's partial objects, and the retention. Each check
//! lists every object under the outputs' root before and after, with its SHA-256: the job's objects
//! are gone, every other object is there with the same bytes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::service::{Server, get_job, request, tiny_model, wait_for};
use ddpm_worker::api::pb;
use ddpm_worker::api::pb::worker_service_client::WorkerServiceClient as WorkerClient;
use ddpm_worker::digest::sha256_hex;
use tonic::Code;
use tonic::transport::Channel;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const RUNNING: i32 = pb::JobState::Running as i32;
const CANCELLED: i32 = pb::JobState::Cancelled as i32;

/// A short lease, so that the cleanup's grace (twice the lease) passes within the test.
const FLAGS: [&str; 6] = ["--lease-seconds", "2", "--batches-per-shard", "1", "--cpu-threads", "1"];

/// Where the server under test writes its jobs.
enum Outputs {
    Local(PathBuf),
    S3 { client: aws_sdk_s3::Client, prefix: String },
}

impl Outputs {
    /// Every object under the root, by key relative to it (`<job id>/…`), with its SHA-256.
    async fn objects(&self) -> BTreeMap<String, String> {
        match self {
            Outputs::Local(root) => walkdir::WalkDir::new(root)
                .into_iter()
                .map(Result::unwrap)
                .filter(|e| e.file_type().is_file())
                .map(|e| e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned())
                .filter(|key| !key.starts_with(".ddpm-staging"))
                .map(|key| {
                    let sha = sha256_hex(&std::fs::read(root.join(&key)).unwrap());
                    (key, sha)
                })
                .collect(),
            Outputs::S3 { client, prefix } => {
                let dir = tempfile::tempdir().unwrap();
                let keys = common::seaweed::download(client, prefix, dir.path()).await;
                keys.into_iter()
                    .map(|key| {
                        let sha = sha256_hex(&std::fs::read(dir.path().join(&key)).unwrap());
                        (key, sha)
                    })
                    .collect()
            }
        }
    }
}

impl Outputs {
    /// The keys under the root, read while a cleanup may be deleting some of them: `None` when the
    /// walk met a folder or object that went meanwhile (ask again), never a partial listing.
    async fn keys(&self) -> Option<Vec<String>> {
        match self {
            Outputs::Local(root) => walkdir::WalkDir::new(root)
                .into_iter()
                .filter(|e| e.as_ref().map_or(true, |e| e.file_type().is_file()))
                .map(|e| e.ok().map(|e| e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned()))
                .filter(|key| key.as_ref().is_none_or(|k| !k.starts_with(".ddpm-staging")))
                .collect(),
            Outputs::S3 { client, prefix } => Some(
                common::seaweed::list(client, prefix)
                    .await
                    .into_iter()
                    .map(|key| key.strip_prefix(&format!("{prefix}/")).unwrap().to_string())
                    .collect(),
            ),
        }
    }
}

/// The objects of job `id` among `objects`.
fn of_job(objects: &BTreeMap<String, String>, id: &str) -> BTreeMap<String, String> {
    objects
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{id}/")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Polls until `done` holds, for at most a minute.
async fn eventually<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn not_found(client: &mut WorkerClient<Channel>, id: &str) -> bool {
    client.get_job(pb::GetJobRequest { job_id: id.into() }).await.is_err_and(|e| e.code() == Code::NotFound)
}

async fn submit(client: &mut WorkerClient<Channel>, req: pb::SubmitJobRequest) -> pb::Job {
    client.submit_job(req).await.unwrap().into_inner().job.unwrap()
}

/// DeleteJob of a finished job and of a running one, and a cancel, on the server at `client`: each job's
/// objects go (the running one's also those written after the delete), a kept job's all stay.
async fn delete_and_cancel_leave_only_the_other_jobs_objects(
    client: &mut WorkerClient<Channel>,
    out: &Outputs,
) {
    let kept = submit(client, request(4, pb::Scheduler::Ddim, 3, 2)).await;
    let done = submit(client, request(6, pb::Scheduler::Ddim, 3, 2)).await;
    for job in [&kept, &done] {
        wait_for(client, &job.job_id, |j| j.state == SUCCEEDED).await;
    }
    let before = out.objects().await;
    let (kept_objects, done_objects) = (of_job(&before, &kept.job_id), of_job(&before, &done.job_id));
    assert!(kept_objects.len() >= 6 && done_objects.len() >= 8, "{before:?}");

    // A finished job: its objects go before the call returns, the other job's all stay.
    let deleted =
        client.delete_job(pb::DeleteJobRequest { job_id: done.job_id.clone() }).await.unwrap().into_inner();
    let job = deleted.job.unwrap();
    assert_eq!((job.job_id.as_str(), job.state), (done.job_id.as_str(), SUCCEEDED));
    assert_eq!(deleted.objects_deleted, done_objects.len() as u64);
    assert_eq!(out.objects().await, kept_objects, "only the deleted job's objects are gone");
    assert!(not_found(client, &done.job_id).await);
    let again = client.delete_job(pb::DeleteJobRequest { job_id: done.job_id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let listed = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(listed.iter().all(|j| j.job_id != done.job_id), "a deleted job is not listed");

    // A running job is cancelled, then deleted; a second one is only cancelled. Each has written
    // objects by then (a shard of 2 samples, 200 DDPM steps, takes seconds here).
    let slow = || request(40, pb::Scheduler::Ddpm, 200, 2);
    let mut stopped = Vec::new();
    for delete in [true, false] {
        let job = submit(client, slow()).await;
        let id = job.job_id.clone();
        eventually("a shard of the slow job is done", || {
            let (mut client, id) = (client.clone(), id.clone());
            async move { get_job(&mut client, &id).await.shards_done >= 1 }
        })
        .await;
        if delete {
            let deleted =
                client.delete_job(pb::DeleteJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
            assert_eq!(deleted.job.unwrap().state, CANCELLED, "a running job is cancelled, then deleted");
            assert!(not_found(client, &id).await);
        } else {
            assert_eq!(common::service::cancel_job(client, &id).await.state, CANCELLED);
        }
        stopped.push(id);
    }
    let (deleting, cancelling) = (&stopped[0], &stopped[1]);
    // After the grace, nothing of either is left (not even what a shard wrote after the call), and
    // the cancelled job is still there to be seen.
    let kept_folder = format!("{}/", kept.job_id);
    eventually("the deleted and the cancelled job's objects are gone", || {
        let kept_folder = kept_folder.clone();
        // Keys only: the objects are being deleted meanwhile, so one listed may be gone when read.
        async move { out.keys().await.is_some_and(|keys| keys.iter().all(|k| k.starts_with(&kept_folder))) }
    })
    .await;
    assert_eq!(out.objects().await, kept_objects, "every object of the kept job, with its bytes");
    assert_eq!(get_job(client, cancelling).await.state, CANCELLED);
    assert!(not_found(client, deleting).await);
}

/// Where the test server keeps its queue and its outputs.
#[derive(Clone, Copy)]
enum Setup {
    Sqlite,
    Nats,
}

/// Starts a server on `queue` writing to a local folder or to S3, and runs the checks.
async fn delete_and_cancel_on(queue: Setup, s3: bool) {
    use common::nats::{NatsServer, unique_namespace};
    use common::seaweed::{self, SeaweedFs};
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--model".to_string(), format!("tiny={}", tiny_model(dir.path()).display())];
    let mut env = Vec::new();
    // The shared servers run while someone holds them: this test, to its end.
    let seaweed = if s3 { Some(SeaweedFs::shared().await) } else { None };
    let nats = if let Setup::Nats = queue { Some(NatsServer::shared().await) } else { None };
    let out = if let Some(server) = &seaweed {
        let prefix = format!("{}/jobs", seaweed::unique_prefix("cleanup"));
        args.extend([
            "--output".into(),
            format!("s3://{}/{prefix}", seaweed::BUCKET),
            "--s3-path-style".into(),
        ]);
        env.extend(seaweed::aws_env(server.endpoint()));
        Outputs::S3 { client: server.client(), prefix }
    } else {
        args.extend(["--output".into(), format!("file:{}", dir.path().join("jobs").display())]);
        Outputs::Local(dir.path().join("jobs"))
    };
    if let Some(nats) = &nats {
        args.extend(["--queue".into(), format!("{}/{}", nats.url(), unique_namespace("cleanup"))]);
    }
    args.extend(FLAGS.map(String::from));
    let server = Server::start_with(dir.path(), &args, &env).await;
    let mut client = server.client().await;
    delete_and_cancel_leave_only_the_other_jobs_objects(&mut client, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_cancel_on_sqlite_and_a_local_folder() {
    delete_and_cancel_on(Setup::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_cancel_on_sqlite_and_s3() {
    delete_and_cancel_on(Setup::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_cancel_on_nats_and_a_local_folder() {
    delete_and_cancel_on(Setup::Nats, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_cancel_on_nats_and_s3() {
    delete_and_cancel_on(Setup::Nats, true).await;
}

/// Retention deletes a job once it ended long enough ago; told to keep outputs, its dataset stays
/// whole (the manifest and every file it lists), only the record goes. A job that has not ended stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_ended_jobs_and_can_keep_their_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = FLAGS.to_vec();
    flags.extend(["--job-retention-seconds", "1", "--job-retention-keeps-outputs"]);
    let server = Server::start(dir.path(), &flags).await;
    let mut client = server.client().await;
    let ended = submit(&mut client, request(4, pb::Scheduler::Ddim, 3, 2)).await;
    let finished = wait_for(&mut client, &ended.job_id, |j| j.state == SUCCEEDED).await;
    let running = submit(&mut client, request(40, pb::Scheduler::Ddpm, 1000, 2)).await;
    let outputs = Outputs::Local(dir.path().join("jobs"));
    let objects = of_job(&outputs.objects().await, &ended.job_id);
    eventually("the ended job is deleted", || {
        let mut client = client.clone();
        let id = ended.job_id.clone();
        async move { not_found(&mut client, &id).await }
    })
    .await;
    // Past the grace too: the record is removed, and the dataset was kept.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(of_job(&outputs.objects().await, &ended.job_id), objects);
    // Whole: every file the manifest and index list, with its SHA-256, every sample once.
    let samples = common::service::check_job_folder(&dir.path().join("jobs").join(&ended.job_id)).await;
    assert_eq!(samples.len() as u64, finished.samples_total);
    assert_eq!(get_job(&mut client, &running.job_id).await.state, RUNNING, "a running job stays");
}
