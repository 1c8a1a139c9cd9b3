//! The batch service end to end, its jobs: results, validation, idempotency, listing, cancelling,
//! failing and retrying. A real `serve` process with a tiny model, driven over gRPC.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::service::{
    Server, SpecMut, error_of, file_path, job_samples, manifest, request, tiny_model, wait_for, watch,
};
use ddpm_worker::api::pb;
use tonic::Code;
use tonic_types::StatusExt;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const RUNNING: i32 = pb::JobState::Running as i32;
const CANCELLED: i32 = pb::JobState::Cancelled as i32;
const FAILED: i32 = pb::JobState::Failed as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_to_success_and_match_generate_on_one_or_two_device_threads() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(7, pb::Scheduler::Ddim, 12, 2);
    let mut runs = Vec::new();
    for devices in ["cpu,cpu", "cpu"] {
        let data = dir.path().join(devices.replace(',', "-"));
        let server =
            Server::start(&data, &["--devices", devices, "--cpu-threads", "1", "--batches-per-shard", "1"])
                .await;
        let mut client = server.client().await;
        let job = client.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
        let spec = job.spec.clone().unwrap();
        assert_eq!((spec.seed, spec.batch_size, job.shards_total, job.samples_total), (Some(1000), 2, 4, 7));
        let events = watch(&mut client, &job.job_id).await;
        let last = events.last().unwrap();
        assert_eq!(last.state, SUCCEEDED, "{last:?}");
        assert_eq!((last.samples_done, last.shards_done), (7, 4));
        assert!(
            events.windows(2).all(|w| w[0].samples_done <= w[1].samples_done),
            "progress never goes back"
        );
        assert!(last.start_time.is_some() && last.finish_time.is_some());
        let m = manifest(last);
        assert_eq!(m["job_id"], job.job_id.as_str());
        assert_eq!(m["spec"]["seed"], 1000);
        assert_eq!(m["scheduler"]["_class_name"], "DDIMScheduler");
        assert_eq!(m["model"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(m["shards"].as_array().unwrap().len(), 4);
        let seeds: Vec<u64> = common::service::index_rows(last).iter().map(|r| r.seed).collect();
        assert_eq!(seeds, (1000..1007).collect::<Vec<_>>());
        // One grid of all 7 samples (the default), listed on the job and in the manifest.
        assert_eq!(last.grid_uris.len(), 1);
        assert!(file_path(&last.grid_uris[0]).is_file());
        assert_eq!(m["grids"].as_array().unwrap().len(), 1);
        runs.push(job_samples(last).await);
    }
    assert_eq!(runs[0], runs[1], "two device threads and one give byte-identical samples");

    // `generate` at the same batch size, with one intra-op thread as each device thread had.
    let out = dir.path().join("generate");
    let model = tiny_model(&dir.path().join("cpu"));
    let generated = generate_alone(&model, &out, "ddim", 12, 7, 1000, 2);
    assert_eq!(runs[0].len(), generated.len());
    for (i, (bytes, alone)) in runs[0].iter().zip(&generated).enumerate() {
        assert!(alone == bytes, "sample {i} differs from generate's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_are_checked_idempotent_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-samples", "1000"]).await;
    let mut client = server.client().await;

    // Every bad field is named, in one INVALID_ARGUMENT.
    let mut bad = request(0, pb::Scheduler::Unspecified, 0, 5000);
    bad.s().model = "nope".into();
    bad.s().labels.insert("bad key!".into(), "v".into());
    let status = client.submit_job(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    for f in [
        "spec.model",
        "spec.sampling.scheduler",
        "spec.sampling.steps",
        "spec.num_samples",
        "spec.batch_size",
        "spec.labels",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
    }
    let mut eta = request(2, pb::Scheduler::Ddpm, 10, 1);
    eta.s().sampling.as_mut().unwrap().eta = Some(0.5);
    let status = client.submit_job(eta).await.unwrap_err();
    assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "spec.sampling.eta");
    let too_many = client.submit_job(request(1001, pb::Scheduler::Ddim, 5, 1)).await.unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    let steps = client.submit_job(request(1, pb::Scheduler::Ddpm, 1001, 1)).await.unwrap_err();
    assert_eq!(steps.get_details_bad_request().unwrap().field_violations[0].field, "spec.sampling.steps");
    let mut bucket = request(1, pb::Scheduler::Ddim, 5, 1);
    bucket.s().output =
        Some(pb::OutputSpec { destination: "s3://b".into(), prefix: "../x".into(), ..Default::default() });
    let fields: Vec<String> = client
        .submit_job(bucket)
        .await
        .unwrap_err()
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["spec.output.prefix", "spec.output.destination"]);

    // The same request_id returns the same job (with the server-chosen seed); another request is refused.
    let mut req = request(2, pb::Scheduler::Ddim, 5, 1);
    req.s().seed = None;
    req.request_id = "req-1".into();
    req.s().labels.insert("team".into(), "a".into());
    let first = client.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
    let again = client.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
    let seed = |j: &pb::Job| j.spec.as_ref().and_then(|s| s.seed);
    assert_eq!((again.job_id.as_str(), seed(&again)), (first.job_id.as_str(), seed(&first)));
    assert_eq!(first.owner, "anonymous");
    req.s().num_samples = 3;
    let conflict = client.submit_job(req).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");

    let missing = client.get_job(pb::GetJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let empty = client.get_job(pb::GetJobRequest { job_id: String::new() }).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    // Listing: label filter, states, pages.
    for _ in 0..3 {
        client.submit_job(request(1, pb::Scheduler::Ddim, 5, 1)).await.unwrap();
    }
    let team_a =
        pb::ListJobsRequest { labels: [("team".to_string(), "a".to_string())].into(), ..Default::default() };
    let jobs = client.list_jobs(team_a).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [first.job_id.as_str()]);
    assert_eq!(jobs[0].request_id, "req-1", "listings show the request id");
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest { page_size: 3, page_token: token, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.into_iter().map(|j| j.job_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4);
    let bad_token =
        client.list_jobs(pb::ListJobsRequest { page_token: "xyz".into(), ..Default::default() }).await;
    assert_eq!(bad_token.unwrap_err().code(), Code::InvalidArgument);
    // Everything finishes.
    for id in &seen {
        let job = wait_for(&mut client, id, |j| j.state == SUCCEEDED).await;
        assert_eq!(job.samples_done, job.samples_total);
    }
    let done = pb::ListJobsRequest { states: vec![SUCCEEDED], ..Default::default() };
    assert_eq!(client.list_jobs(done).await.unwrap().into_inner().jobs.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_a_running_job_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    // Long enough that it is still sampling when cancelled: 1000 DDPM steps per batch.
    let job =
        client.submit_job(request(64, pb::Scheduler::Ddpm, 1000, 4)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.state == RUNNING).await;
    let cancelled = common::service::cancel_job(&mut client, &job.job_id).await;
    assert_eq!(cancelled.state, CANCELLED);
    assert!(cancelled.samples_done < 64);
    let events = watch(&mut client, &job.job_id).await;
    assert_eq!(events.last().unwrap().state, CANCELLED);
    // Cancelling again is a no-op; the worker is free for the next job, which succeeds quickly.
    let again = common::service::cancel_job(&mut client, &job.job_id).await;
    assert_eq!(again.state, CANCELLED);
    let next =
        client.submit_job(request(2, pb::Scheduler::Ddim, 5, 2)).await.unwrap().into_inner().job.unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        wait_for(&mut client, &next.job_id, |j| j.state == SUCCEEDED),
    )
    .await
    .expect("the cancelled job's shard stopped and freed the device");
    assert_eq!(done.samples_done, 2);
    let finished = client.cancel_job(pb::CancelJobRequest { job_id: next.job_id.clone() }).await.unwrap_err();
    assert_eq!(finished.code(), Code::FailedPrecondition);
    let after = common::service::get_job(&mut client, &job.job_id).await;
    assert_eq!(
        (after.state, after.samples_done),
        (CANCELLED, cancelled.samples_done),
        "nothing counted after cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failing_on_every_attempt_fails_its_job_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    // Outputs cannot be written under a regular file: every attempt of every shard fails.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let output = format!("file:{}", blocker.join("jobs").display());
    let model = format!("tiny={}", tiny_model(dir.path()).display());
    let args = ["--model", &model, "--output", &output, "--max-attempts", "2"].map(String::from);
    let server = Server::start_with(dir.path(), &args, &[]).await;
    let mut client = server.client().await;
    let job =
        client.submit_job(request(2, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    let failed = wait_for(&mut client, &job.job_id, |j| j.state == FAILED).await;
    assert!(error_of(&failed).contains("failed on every attempt"), "{}", error_of(&failed));
    assert!(error_of(&failed).contains("not-a-dir"), "the cause is kept: {}", error_of(&failed));
    let error = failed.error.as_ref().unwrap();
    assert_eq!(error.code, Code::Internal as i32, "a failed job's error is a google.rpc.Status");
    // Scripts tell a FAILED job by the exit code of `status --wait` (5).
    let out = Command::new(common::bin())
        .args(["status", &job.job_id, "--wait", "--server", &server.url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    // The server keeps serving.
    assert_eq!(
        server.health().await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_failure_is_reported_as_such_not_as_a_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--batches-per-shard", "32", "--max-attempts", "1"]).await;
    let mut client = server.client().await;
    // One shard of 32 one-sample batches: it is still sampling when its failed upload is collected
    // (the uploader keeps 8 writes in flight).
    let job =
        client.submit_job(request(32, pb::Scheduler::Ddpm, 50, 1)).await.unwrap().into_inner().job.unwrap();
    std::fs::create_dir_all(dir.path().join("jobs").join(&job.job_id).join("samples/00000000.png")).unwrap();
    let failed = wait_for(&mut client, &job.job_id, |j| j.state == FAILED).await;
    assert!(
        error_of(&failed).contains("Is a directory"),
        "the upload's error is the cause: {}",
        error_of(&failed)
    );
    assert!(!error_of(&failed).contains("cancelled"), "{}", error_of(&failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-request-bytes", "4096"]).await;
    let mut client = server.client().await;
    let mut req = request(1, pb::Scheduler::Ddim, 3, 1);
    req.s().labels.insert("blob".into(), "x".repeat(8192));
    let status = client.submit_job(req).await.unwrap_err();
    // tonic reports a message over max_decoding_message_size as OUT_OF_RANGE.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(client.submit_job(request(1, pb::Scheduler::Ddim, 3, 1)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("tiny={}", tiny_model(dir.path()).display());
    // An S3 destination, so that jobs may name buckets (nothing is written: every request is refused).
    let args = ["--model", &model, "--output", "s3://ddpm-out/jobs", "--s3-path-style"].map(String::from);
    let server = Server::start_with(dir.path(), &args, &[]).await;
    let mut client = server.client().await;
    let refused = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().len() < 2048, "error message of {} bytes", status.message().len());
        let v = status.get_details_bad_request().unwrap().field_violations;
        v.into_iter().map(|v| v.field).collect::<Vec<_>>()
    };
    let with_output = |destination: &str, prefix: &str| {
        let mut req = request(1, pb::Scheduler::Ddim, 3, 1);
        req.s().output = Some(pb::OutputSpec {
            destination: destination.into(),
            prefix: prefix.into(),
            ..Default::default()
        });
        req
    };
    for bucket in ["UPPER_case", "..", &"b".repeat(300), "ab", "-dash", "a..b", "192.168.1.1", "xn--abc"] {
        let status = client.submit_job(with_output(&format!("s3://{bucket}/x"), "")).await.unwrap_err();
        assert_eq!(refused(status), ["spec.output.destination"], "{bucket}");
    }
    for destination in ["s3://ddpm-out/jobs/../x", "s3://ddpm-out//jobs", "file:relative", "gs://x/y", "/abs"]
    {
        let status = client.submit_job(with_output(destination, "")).await.unwrap_err();
        assert_eq!(refused(status), ["spec.output.destination"], "{destination}");
    }
    let segment = "s".repeat(256);
    let long = format!("{}/x", "p/".repeat(520));
    for prefix in ["a\0b", "a\u{7}b", "a\\b", segment.as_str(), long.as_str(), "a/../b", ".ddpm-staging/x"] {
        let status = client.submit_job(with_output("", prefix)).await.unwrap_err();
        assert_eq!(refused(status), ["spec.output.prefix"], "{prefix:?}");
    }
    // Well-formed destinations outside the allowed ones (here only the default) are denied, named.
    for outside in ["s3://ok-bucket.name/jobs", "s3://ddpm-out", "s3://ddpm-out/jobsx", "file:/tmp"] {
        let status = client.submit_job(with_output(outside, "")).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{outside}: {status:?}");
        assert!(status.message().contains("output.destination"), "{status:?}");
    }
    let inside = client.submit_job(with_output("s3://ddpm-out/jobs/team", "a/b-c/d_e")).await.unwrap();
    let spec = inside.into_inner().job.unwrap().spec.unwrap();
    assert_eq!(spec.output.unwrap().destination, "s3://ddpm-out/jobs/team/a/b-c/d_e");
    // A huge value is named, not echoed whole (a trailer over 8 KiB turns into RESOURCE_EXHAUSTED).
    let mut huge = request(1, pb::Scheduler::Ddim, 3, 1);
    huge.s().model = "m".repeat(60_000);
    assert_eq!(refused(client.submit_job(huge).await.unwrap_err()), ["spec.model"]);
    let status = client.get_job(pb::GetJobRequest { job_id: "j".repeat(60_000) }).await.unwrap_err();
    assert_eq!(refused(status), ["job_id"]);
    // Priorities are a small documented range (each one is a consumer on a NATS queue).
    for priority in [11, -11, i32::MAX] {
        let mut req = request(1, pb::Scheduler::Ddim, 3, 1);
        req.s().priority = priority;
        assert_eq!(refused(client.submit_job(req).await.unwrap_err()), ["spec.priority"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_million_samples_are_queued_in_a_bounded_number_of_shards() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-samples", "10000000"]).await;
    let mut client = server.client().await;
    let small =
        client.submit_job(request(1, pb::Scheduler::Ddim, 3, 1)).await.unwrap().into_inner().job.unwrap();
    let mut other = server.client().await;
    let reader = tokio::spawn(async move {
        other
            .get_job(pb::GetJobRequest { job_id: small.job_id })
            .await
            .map(|r| r.into_inner().job.unwrap_or_default().job_id)
    });
    let big = client
        .submit_job(request(10_000_000, pb::Scheduler::Ddim, 3, 1))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert!(
        big.shards_total <= 4096,
        "{} shards: one per few batches would be 2.5 million",
        big.shards_total
    );
    assert_eq!(big.samples_total, 10_000_000);
    reader.await.unwrap().unwrap();
    let cancelled = client.cancel_job(pb::CancelJobRequest { job_id: big.job_id.clone() }).await.unwrap();
    assert_eq!(cancelled.into_inner().job.unwrap().state, CANCELLED);
    let queue = std::fs::metadata(dir.path().join("queue.sqlite")).unwrap().len();
    assert!(queue < 64 << 20, "queue file of {queue} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_is_retried_without_resampling_its_finished_shards() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--batches-per-shard", "1", "--max-attempts", "2", "--retry-seconds", "0.2"];
    let server = Server::start(dir.path(), &flags).await;
    let mut client = server.client().await;
    let job =
        client.submit_job(request(8, pb::Scheduler::Ddpm, 100, 2)).await.unwrap().into_inner().job.unwrap();
    // The last shard cannot write its last sample: a directory is in the way.
    let blocker = dir.path().join("jobs").join(&job.job_id).join("samples/00000007.png");
    std::fs::create_dir_all(&blocker).unwrap();
    let failed = wait_for(&mut client, &job.job_id, |j| j.state == FAILED).await;
    assert_eq!(failed.shards_done, 3, "{failed:?}");
    // GetJob tells how: three shards done at their first try, one failed on both of its attempts.
    let stats = failed.shard_stats.clone().unwrap();
    assert_eq!((stats.attempts, stats.retried, stats.failed), (5, 1, 1), "{stats:?}");
    assert_eq!(stats.runners.iter().map(|r| r.shards).sum::<u32>(), 3, "{stats:?}");
    assert!(stats.runners.iter().all(|r| r.device.starts_with("cpu") && !r.worker.is_empty()), "{stats:?}");
    let records = dir.path().join("jobs").join(&job.job_id).join("shards");
    let before = common::service::snapshot(&records);
    assert_eq!(before.len(), 3);
    let not_failed = client.retry_job(pb::RetryJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(not_failed.code(), Code::NotFound);

    std::fs::remove_dir(&blocker).unwrap();
    let retried = client.retry_job(pb::RetryJobRequest { job_id: job.job_id.clone() }).await.unwrap();
    let retried = retried.into_inner().job.unwrap();
    assert_eq!((retried.state, error_of(&retried).as_str(), retried.shards_done), (RUNNING, "", 3));
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!((done.samples_done, done.shards_done), (8, 4));
    let stats = done.shard_stats.clone().unwrap();
    assert_eq!((stats.attempts, stats.retried, stats.failed), (4, 0, 0), "the retry starts its count again");
    assert_eq!(stats.runners.iter().map(|r| r.shards).sum::<u32>(), 4, "{stats:?}");
    assert_eq!(job_samples(&done).await.len(), 8);
    let after = common::service::snapshot(&records);
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{} was rewritten", path.display());
    }
    let again = client.retry_job(pb::RetryJobRequest { job_id: job.job_id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "only a FAILED job can be retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grayscale_models_make_grayscale_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gray");
    let out = Command::new(common::bin())
        .args(["init-model", "--preset", "tiny", "--grayscale", "--out", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let args = [
        "--model".to_string(),
        format!("gray={}", model.display()),
        "--output".into(),
        format!("file:{}", dir.path().join("jobs").display()),
    ];
    let server = Server::start_with(dir.path(), &args, &[]).await;
    let mut client = server.client().await;
    let mut req = request(3, pb::Scheduler::Ddim, 5, 2);
    req.s().model = "gray".into();
    let job = client.submit_job(req).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    for png in job_samples(&done).await {
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.color(), img.width(), img.height()), (image::ColorType::L8, 16, 16));
    }
    let grid = image::open(file_path(&done.grid_uris[0])).unwrap();
    assert_eq!(grid.color(), image::ColorType::L8);
}

/// Small jobs queued behind a busy device share UNet batches (co-batching), and each one's images are
/// still byte-identical to `generate` running that job alone at the same batch size; with
/// `--co-batch false` the same jobs run one by one with the same images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_jobs_share_batches_and_keep_their_images() {
    let dir = tempfile::tempdir().unwrap();
    // (samples, seed) of three small jobs; together they fill one batch of 4.
    let small = [(1u64, 11u64), (2, 21), (1, 31)];
    let mut by_setting = Vec::new();
    for co_batch in ["true", "false"] {
        let data = dir.path().join(format!("co-batch-{co_batch}"));
        let server =
            Server::start(&data, &["--devices", "cpu", "--cpu-threads", "1", "--co-batch", co_batch]).await;
        let mut client = server.client().await;
        // A long first job keeps the device busy while the small ones queue.
        let blocker = client.submit_job(request(4, pb::Scheduler::Ddim, 400, 4)).await.unwrap().into_inner();
        let mut ids = Vec::new();
        for (samples, seed) in small {
            let mut req = request(samples, pb::Scheduler::Ddim, 12, 4);
            req.s().seed = Some(seed);
            ids.push(client.submit_job(req).await.unwrap().into_inner().job.unwrap().job_id);
        }
        let blocker = wait_for(&mut client, &blocker.job.unwrap().job_id, |j| j.state == SUCCEEDED).await;
        assert!(manifest(&blocker)["shards"][0].get("batched_with").is_none(), "a full batch shares nothing");
        let mut jobs = Vec::new();
        for id in &ids {
            let done = wait_for(&mut client, id, |j| j.state == SUCCEEDED).await;
            let shards = manifest(&done)["shards"].as_array().unwrap().clone();
            assert_eq!(shards.len(), 1);
            let shared: Vec<String> = shards[0]["batched_with"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            jobs.push((done, shared));
        }
        if co_batch == "true" {
            for (k, (_, shared)) in jobs.iter().enumerate() {
                let others: Vec<String> = ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != k)
                    .map(|(_, id)| format!("{id}/0"))
                    .collect();
                assert_eq!(shared, &others, "job {k} ran in one batch with the other two");
            }
        } else {
            assert!(jobs.iter().all(|(_, shared)| shared.is_empty()), "no co-batching when it is off");
        }
        let mut samples = Vec::new();
        for (done, _) in &jobs {
            samples.push(job_samples(done).await);
        }
        by_setting.push(samples);
    }
    assert_eq!(by_setting[0], by_setting[1], "co-batched and lone runs give the same bytes");

    // Each small job alone through `generate`, one intra-op thread as the device thread had.
    let model = tiny_model(&dir.path().join("co-batch-true"));
    for (k, (samples, seed)) in small.iter().enumerate() {
        let out = dir.path().join(format!("generate-{k}"));
        let generated = generate_alone(&model, &out, "ddim", 12, *samples, *seed, 4);
        assert_eq!(generated.len(), by_setting[0][k].len());
        for (i, (bytes, alone)) in by_setting[0][k].iter().zip(&generated).enumerate() {
            assert!(alone == bytes, "job {k} sample {i} differs from generate's");
        }
    }
}

/// Cancelling one job of a co-batched group stops only that job: the others finish with the images
/// they get alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_job_of_a_shared_batch_leaves_the_others_intact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--devices", "cpu", "--cpu-threads", "1"]).await;
    let mut client = server.client().await;
    let blocker = client.submit_job(request(4, pb::Scheduler::Ddim, 400, 4)).await.unwrap().into_inner();
    // 1000 DDPM steps: still sampling when the cancel comes.
    let mut ids = Vec::new();
    for seed in [11u64, 21] {
        let mut req = request(2, pb::Scheduler::Ddpm, 1000, 4);
        req.s().seed = Some(seed);
        ids.push(client.submit_job(req).await.unwrap().into_inner().job.unwrap().job_id);
    }
    wait_for(&mut client, &blocker.job.unwrap().job_id, |j| j.state == SUCCEEDED).await;
    wait_for(&mut client, &ids[1], |j| j.state == RUNNING).await;
    let cancelled = common::service::cancel_job(&mut client, &ids[0]).await;
    assert_eq!(cancelled.state, CANCELLED);
    let done = wait_for(&mut client, &ids[1], |j| j.state == SUCCEEDED).await;
    let shard = &manifest(&done)["shards"][0];
    assert_eq!(shard["batched_with"][0], format!("{}/0", ids[0]), "the two jobs shared a batch");
    assert_eq!(common::service::get_job(&mut client, &ids[0]).await.state, CANCELLED);

    let model = tiny_model(dir.path());
    let out = dir.path().join("generate");
    let generated = generate_alone(&model, &out, "ddpm", 1000, 2, 21, 4);
    let samples = job_samples(&done).await;
    assert_eq!(samples.len(), generated.len());
    for (i, (bytes, alone)) in samples.iter().zip(&generated).enumerate() {
        assert!(alone == bytes, "sample {i} differs from generate's");
    }
}

#[test]
fn client_calls_have_a_deadline() {
    // A server that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut child = Command::new(common::bin())
        .args(["submit", "--server", &url, "--model", "tiny", "--num-samples", "1"])
        .env("DDPM_TIMEOUT_SECONDS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = common::wait_or_kill(&mut child, Duration::from_secs(20));
    let status = status.expect("submit gave up within its deadline");
    assert!(!status.success());
    drop(silent);
}

/// The PNGs `generate` writes for `samples` samples from `seed` at batch size `batch` on the tiny
/// `model`, with one intra-op thread as a `--cpu-threads 1` device thread has.
fn generate_alone(
    model: &Path,
    out: &Path,
    scheduler: &str,
    steps: u32,
    samples: u64,
    seed: u64,
    batch: u32,
) -> Vec<Vec<u8>> {
    let status = Command::new(common::bin())
        .args(["generate", "--model", model.to_str().unwrap(), "--scheduler", scheduler])
        .args([
            "--steps",
            &steps.to_string(),
            "--num-samples",
            &samples.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .args(["--batch-size", &batch.to_string(), "--out", out.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success());
    (0..samples).map(|i| std::fs::read(out.join(format!("samples/{i:08}.png"))).unwrap()).collect()
}
