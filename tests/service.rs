//! The batch service end to end: a real `serve` process with a tiny model, driven over gRPC.

mod common;

use std::process::Command;
use std::time::Duration;

use common::service::{Server, file_path, manifest, request, tiny_model, wait_for, watch};
use ddpm_worker::api::pb;
use tonic::Code;
use tonic_types::StatusExt;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const RUNNING: i32 = pb::JobState::Running as i32;
const CANCELLED: i32 = pb::JobState::Cancelled as i32;

/// The PNGs of a finished job, by sample index, checked against the manifest's hashes.
fn job_samples(job: &pb::Job) -> Vec<Vec<u8>> {
    let m = manifest(job);
    let manifest_path = file_path(&job.manifest_uri);
    // The manifest sits at <root>/<prefix>/<job_id>/manifest.json; sample keys are relative to <root>.
    let depth = m["samples"][0]["key"].as_str().unwrap().split('/').count() - 2;
    let mut root = manifest_path.parent().unwrap().to_path_buf();
    for _ in 0..depth {
        root.pop();
    }
    let samples = m["samples"].as_array().unwrap();
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            assert_eq!(s["index"].as_u64().unwrap(), i as u64, "every index once, in order");
            let bytes = std::fs::read(root.join(s["key"].as_str().unwrap())).unwrap();
            assert_eq!(ddpm_worker::generate::sha256_hex(&bytes), s["sha256"].as_str().unwrap());
            bytes
        })
        .collect()
}

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
        assert_eq!((job.seed, job.batch_size, job.shards_total, job.samples_total), (1000, 2, 4, 7));
        let events = watch(&mut client, &job.job_id).await;
        let last = events.last().unwrap();
        assert_eq!(last.state, SUCCEEDED, "{last:?}");
        assert_eq!((last.samples_done, last.shards_done), (7, 4));
        assert!(
            events.windows(2).all(|w| w[0].samples_done <= w[1].samples_done),
            "progress never goes back"
        );
        assert!(last.started_at.is_some() && last.finished_at.is_some());
        let m = manifest(last);
        assert_eq!(m["job_id"], job.job_id.as_str());
        assert_eq!(m["spec"]["seed"], 1000);
        assert_eq!(m["scheduler"]["_class_name"], "DDIMScheduler");
        assert_eq!(m["model"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(m["shards"].as_array().unwrap().len(), 4);
        let seeds: Vec<u64> =
            m["samples"].as_array().unwrap().iter().map(|s| s["seed"].as_u64().unwrap()).collect();
        assert_eq!(seeds, (1000..1007).collect::<Vec<_>>());
        // One grid of all 7 samples (the default), listed on the job and in the manifest.
        assert_eq!(last.grid_uris.len(), 1);
        assert!(file_path(&last.grid_uris[0]).is_file());
        assert_eq!(m["grids"].as_array().unwrap().len(), 1);
        runs.push(job_samples(last));
    }
    assert_eq!(runs[0], runs[1], "two device threads and one give byte-identical samples");

    // `generate` at the same batch size, with one intra-op thread as each device thread had.
    let out = dir.path().join("generate");
    let model = tiny_model(&dir.path().join("cpu"));
    let status = Command::new(common::bin())
        .args(["generate", "--model", model.to_str().unwrap(), "--scheduler", "ddim", "--steps", "12"])
        .args(["--num-samples", "7", "--seed", "1000", "--batch-size", "2", "--out", out.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success());
    for (i, bytes) in runs[0].iter().enumerate() {
        let generated = std::fs::read(out.join(format!("samples/{i:08}.png"))).unwrap();
        assert!(&generated == bytes, "sample {i} differs from generate's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_are_checked_idempotent_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-samples", "1000"]).await;
    let mut client = server.client().await;

    // Every bad field is named, in one INVALID_ARGUMENT.
    let mut bad = request(0, pb::Scheduler::Unspecified, 0, 5000);
    bad.model = "nope".into();
    bad.labels.insert("bad key!".into(), "v".into());
    let status = client.submit_job(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    for f in ["model", "sampling.scheduler", "sampling.steps", "num_samples", "batch_size", "labels"] {
        assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
    }
    let mut eta = request(2, pb::Scheduler::Ddpm, 10, 1);
    eta.sampling.as_mut().unwrap().eta = Some(0.5);
    let status = client.submit_job(eta).await.unwrap_err();
    assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "sampling.eta");
    let too_many = client.submit_job(request(1001, pb::Scheduler::Ddim, 5, 1)).await.unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    let steps = client.submit_job(request(1, pb::Scheduler::Ddpm, 1001, 1)).await.unwrap_err();
    assert_eq!(steps.get_details_bad_request().unwrap().field_violations[0].field, "sampling.steps");
    let mut bucket = request(1, pb::Scheduler::Ddim, 5, 1);
    bucket.output = Some(pb::OutputSpec { bucket: "b".into(), prefix: "../x".into() });
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
    assert_eq!(fields, ["output.bucket", "output.prefix"]);

    // The same request_id returns the same job (with the server-chosen seed); another request is refused.
    let mut req = request(2, pb::Scheduler::Ddim, 5, 1);
    req.seed = None;
    req.request_id = "req-1".into();
    req.labels.insert("team".into(), "a".into());
    let first = client.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
    let again = client.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!((again.job_id.as_str(), again.seed), (first.job_id.as_str(), first.seed));
    req.num_samples = 3;
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
    let cancelled =
        client.cancel_job(pb::CancelJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(cancelled.state, CANCELLED);
    assert!(cancelled.samples_done < 64);
    let events = watch(&mut client, &job.job_id).await;
    assert_eq!(events.last().unwrap().state, CANCELLED);
    // Cancelling again is a no-op; the worker is free for the next job, which succeeds quickly.
    let again =
        client.cancel_job(pb::CancelJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
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
    let after = client.get_job(pb::GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(
        (after.state, after.samples_done),
        (CANCELLED, cancelled.samples_done),
        "nothing counted after cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_job_after_restart_without_redoing_finished_shards() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--lease-seconds", "1", "--batches-per-shard", "1"];
    let mut server = Server::start(dir.path(), &flags).await;
    let mut client = server.client().await;
    let job =
        client.submit_job(request(16, pb::Scheduler::Ddpm, 100, 2)).await.unwrap().into_inner().job.unwrap();
    let before = wait_for(&mut client, &job.job_id, |j| j.shards_done >= 2).await;
    assert!(before.shards_done < 8, "the job finished before the kill: make it longer");
    server.kill9();
    let first_worker: Vec<u64> = {
        let root = dir.path().join("jobs").join(&job.job_id).join("shards");
        std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy()[..6].parse().unwrap())
            .collect()
    };
    assert!(first_worker.len() as u32 >= before.shards_done);

    let server = Server::start(dir.path(), &flags).await;
    let mut client = server.client().await;
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!((done.samples_done, done.shards_done), (16, 8));
    let m = manifest(&done);
    let samples = job_samples(&done);
    assert_eq!(samples.len(), 16);
    // Shards recorded before the kill kept their first attempt's record: they were not sampled again.
    let workers: Vec<&str> =
        m["shards"].as_array().unwrap().iter().map(|s| s["worker"].as_str().unwrap()).collect();
    let first = workers[first_worker[0] as usize];
    for shard in &first_worker {
        assert_eq!(workers[*shard as usize], first, "shard {shard} was recomputed");
    }
    assert!(workers.iter().any(|w| *w != first), "the restarted server finished the rest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero_and_another_server_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--grace-seconds", "0.5", "--batches-per-shard", "1"];
    let mut server = Server::start(dir.path(), &flags).await;
    let mut client = server.client().await;
    let job =
        client.submit_job(request(8, pb::Scheduler::Ddpm, 100, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.state == RUNNING).await;
    // A client following the job must not hold the shutdown up: its stream ends with UNAVAILABLE.
    let mut watcher =
        client.watch_job(pb::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    let kill = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watcher.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    });
    let status = ended.await.expect("the watch stream ended").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    // Nothing is left leased: the running shard finished or was given back without spending an attempt.
    {
        use ddpm_worker::queue::TaskState;
        let store = ddpm_worker::queue::sqlite::SqliteStore::open(&dir.path().join("queue.sqlite")).unwrap();
        for shard in 0..u64::from(job.shards_total) {
            let (state, attempts, _) = store.task_state(&job.job_id, shard).unwrap().unwrap();
            assert_ne!(state, TaskState::Leased, "shard {shard} was left leased");
            if state == TaskState::Queued {
                assert_eq!(attempts, 0, "shard {shard}: a drained shard keeps its attempts");
            }
        }
    }
    // A new server picks the job up at once (no lease to wait out) and finishes it.
    let server = Server::start(dir.path(), &["--batches-per-shard", "1"]).await;
    let mut client = server.client().await;
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!(done.samples_done, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_health_and_metrics_describe_the_service() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let server = Server::start(dir.path(), &["--metrics-listen", &metrics_addr]).await;
    assert_eq!(
        server.health().await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    );

    // Both reflection versions list the API and health services (grpcurl ≤ 1.8 speaks only v1alpha).
    let channel =
        tonic::transport::Endpoint::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut v1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        ..Default::default()
    };
    let mut stream = v1.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in ["ddpm.v1.Worker", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "ddpm.v1.Worker".into(),
        )),
        ..Default::default()
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let response = stream.next().await.unwrap().unwrap().message_response.unwrap();
    assert!(
        matches!(response, v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f) if !f.file_descriptor_proto.is_empty()),
        "{response:?}"
    );

    // A job's work shows up in the metrics.
    let mut client = server.client().await;
    let job =
        client.submit_job(request(3, pb::Scheduler::Ddim, 4, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    let text = http_get(&metrics_addr, "/metrics");
    for series in [
        "ddpm_images_generated_total 3",
        "ddpm_jobs_submitted_total{result=\"created\"} 1",
        "ddpm_jobs_finished_total{state=\"succeeded\"} 1",
        "ddpm_shard_duration_seconds_bucket",
        "ddpm_step_duration_seconds_count",
        "ddpm_queue_depth",
    ] {
        assert!(text.contains(series), "{series} not in:\n{text}");
    }
}

/// A plain HTTP/1.0 GET (the metrics endpoint), returning the body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_outputs_live_on_s3() {
    use common::seaweed::{self, SeaweedFs};
    let s3 = SeaweedFs::shared().await;
    let client = s3.client();
    let prefix = seaweed::unique_prefix("service");
    // The tiny model, uploaded as a diffusers folder.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        let key = format!("{prefix}/models/tiny/{}", path.file_name().unwrap().to_string_lossy());
        let body = aws_sdk_s3::primitives::ByteStream::from(std::fs::read(&path).unwrap());
        client.put_object().bucket(seaweed::BUCKET).key(key).body(body).send().await.unwrap();
    }
    let args = [
        "--model".to_string(),
        format!("tiny=s3://{}/{prefix}/models/tiny", seaweed::BUCKET),
        "--model-cache".into(),
        dir.path().join("cache").display().to_string(),
        "--output".into(),
        format!("s3://{}/{prefix}/jobs", seaweed::BUCKET),
        "--s3-path-style".into(),
    ];
    let env = [
        ("AWS_ENDPOINT_URL", s3.endpoint()),
        ("AWS_ACCESS_KEY_ID", seaweed::ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", seaweed::SECRET_KEY.to_string()),
        ("AWS_REGION", seaweed::REGION.to_string()),
    ];
    let server = Server::start_with(&dir.path().join("data"), &args, &env).await;
    let mut grpc = server.client().await;
    let mut req = request(5, pb::Scheduler::Ddim, 4, 2);
    req.grid = Some(pb::GridSpec { samples_per_grid: 2, columns: 2 });
    let job = grpc.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut grpc, &job.job_id, |j| j.state == SUCCEEDED).await;
    let manifest_key = format!("{prefix}/jobs/{}/manifest.json", job.job_id);
    assert_eq!(done.manifest_uri, format!("s3://{}/{manifest_key}", seaweed::BUCKET));
    assert_eq!(done.grid_uris.len(), 3);
    let get = |key: String| {
        let client = client.clone();
        async move {
            let out = client.get_object().bucket(seaweed::BUCKET).key(key).send().await.unwrap();
            out.body.collect().await.unwrap().into_bytes()
        }
    };
    let m: serde_json::Value = serde_json::from_slice(&get(manifest_key).await).unwrap();
    assert_eq!(m["model"]["source"], format!("s3://{}/{prefix}/models/tiny", seaweed::BUCKET));
    for s in m["samples"].as_array().unwrap() {
        let bytes = get(s["key"].as_str().unwrap().to_string()).await;
        assert_eq!(ddpm_worker::generate::sha256_hex(&bytes), s["sha256"].as_str().unwrap());
        image::load_from_memory(&bytes).unwrap();
    }
    // Grids of 2: [0,2) and [2,4) lie in one shard each, [4,5) too; every grid is there.
    assert_eq!(m["grids"].as_array().unwrap().len(), 3);

    // A job may pick its own prefix (and bucket) on an S3 server.
    req.output = Some(pb::OutputSpec { bucket: String::new(), prefix: format!("{prefix}/custom") });
    let job = grpc.submit_job(req).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut grpc, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!(
        done.manifest_uri,
        format!("s3://{}/{prefix}/custom/{}/manifest.json", seaweed::BUCKET, job.job_id)
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
    let failed = wait_for(&mut client, &job.job_id, |j| j.state == pb::JobState::Failed as i32).await;
    assert!(failed.error.contains("failed on every attempt"), "{}", failed.error);
    assert!(failed.error.contains("not-a-dir"), "the cause is kept: {}", failed.error);
    // The server keeps serving.
    assert_eq!(
        server.health().await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-request-bytes", "4096"]).await;
    let mut client = server.client().await;
    let mut req = request(1, pb::Scheduler::Ddim, 3, 1);
    req.labels.insert("blob".into(), "x".repeat(8192));
    let status = client.submit_job(req).await.unwrap_err();
    // tonic reports a message over max_decoding_message_size as OUT_OF_RANGE.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(client.submit_job(request(1, pb::Scheduler::Ddim, 3, 1)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_nats_queue() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("service"));
    let dir = tempfile::tempdir().unwrap();
    let model = format!("tiny={}", tiny_model(dir.path()).display());
    let output = format!("file:{}", dir.path().join("jobs").display());
    let args = |_: &str| {
        [
            "--model",
            &model,
            "--output",
            &output,
            "--queue",
            &queue,
            "--batches-per-shard",
            "1",
            "--cpu-threads",
            "1",
        ]
        .map(String::from)
    };
    // Each worker has its own data folder but they share the queue and the output directory.
    let a = Server::start_with(&dir.path().join("a"), &args("a"), &[]).await;
    let b = Server::start_with(&dir.path().join("b"), &args("b"), &[]).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    let job =
        client_a.submit_job(request(12, pb::Scheduler::Ddpm, 60, 2)).await.unwrap().into_inner().job.unwrap();
    // Either worker answers for the job; both take shards.
    let done = wait_for(&mut client_b, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!((done.samples_done, done.shards_done), (12, 6));
    let samples = job_samples(&done);
    assert_eq!(samples.len(), 12);
    let m = manifest(&done);
    let mut workers: Vec<&str> =
        m["shards"].as_array().unwrap().iter().map(|s| s["worker"].as_str().unwrap()).collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 2, "both workers sampled shards: {workers:?}");
    let listed = client_a.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(listed.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [job.job_id.as_str()]);
}
