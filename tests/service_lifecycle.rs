//! The batch service's life: start-up checks, kill -9 and restart, SIGTERM drains, health, reflection
//! and metrics, and workers that lose their lease while writing. Real `serve` processes, over gRPC.

mod common;

use std::process::Command;
use std::time::Duration;

use common::service::{Server, job_samples, manifest, request, signal, tiny_model, wait_for};
use ddpm_worker::api::pb;
use tonic::Code;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const RUNNING: i32 = pb::JobState::Running as i32;

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
    let samples = job_samples(&done).await;
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
    let status = server.wait_exit(Duration::from_secs(30)).await;
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
    for name in ["ddpm.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "ddpm.v1.WorkerService".into(),
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
    // The queue's shard counts, from the reaper's next pass: nothing left once the job is done.
    let started = std::time::Instant::now();
    let mut text = http_get(&metrics_addr, "/metrics");
    while !(text.contains("ddpm_queue_shards{queue=\"sqlite\",state=\"queued\"} 0")
        && text.contains("ddpm_queue_shards{queue=\"sqlite\",state=\"leased\"} 0"))
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no empty ddpm_queue_shards in:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        text = http_get(&metrics_addr, "/metrics");
    }
    for series in [
        "ddpm_images_generated_total{model=\"tiny\",device=\"cpu\"} 3",
        "ddpm_jobs_submitted_total{result=\"created\"} 1",
        "ddpm_jobs_finished_total{state=\"succeeded\"} 1",
        "ddpm_shard_duration_seconds_bucket{model=\"tiny\",device=\"cpu\",",
        "ddpm_step_duration_seconds_count{model=\"tiny\",device=\"cpu\"}",
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
async fn a_zombie_cannot_change_recorded_outputs_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    // Two processes on one SQLite file (the same host): the queue is shared, the outputs too.
    let queue = format!("sqlite:{}", dir.path().join("queue.sqlite").display());
    common::service::a_zombie_cannot_change_recorded_outputs(dir.path(), &queue).await;
}

/// Runs `serve` on a model folder; returns its exit code, or `None` if it was still running (then
/// killed) after `limit`, and what it printed.
fn serve_exit(model: &std::path::Path, data: &std::path::Path, limit: Duration) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = Command::new(common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--model"])
        .arg(format!("m={}", model.display()))
        .arg("--queue")
        .arg(format!("sqlite:{}", data.join("queue.sqlite").display()))
        .arg("--output")
        .arg(format!("file:{}", data.join("jobs").display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = common::wait_or_kill(&mut child, limit).and_then(|status| status.code());
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    (code, out)
}

#[test]
fn models_that_cannot_work_are_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_model(dir.path());
    fn edit_json(path: &std::path::Path, key: &str, value: serde_json::Value) {
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        json[key] = value;
        std::fs::write(path, json.to_string()).unwrap();
    }
    type Edit = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, &str, Edit)> = vec![
        (
            "huge sample_size",
            "sample_size",
            Box::new(|m| edit_json(&m.join("config.json"), "sample_size", 100_000.into())),
        ),
        (
            "truncated weights",
            "safetensors",
            Box::new(|m| {
                let path = m.join("diffusion_pytorch_model.safetensors");
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            }),
        ),
        (
            "one channel, RGB weights",
            "conv_in",
            Box::new(|m| {
                edit_json(&m.join("config.json"), "in_channels", 1.into());
                edit_json(&m.join("config.json"), "out_channels", 1.into());
            }),
        ),
        (
            "no training steps",
            "num_train_timesteps",
            Box::new(|m| edit_json(&m.join("scheduler_config.json"), "num_train_timesteps", 0.into())),
        ),
    ];
    for (i, (case, named, edit)) in cases.iter().enumerate() {
        let model = dir.path().join(format!("bad-{i}"));
        std::fs::create_dir_all(&model).unwrap();
        for entry in std::fs::read_dir(&good).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
        }
        edit(&model);
        let (code, out) = serve_exit(&model, &dir.path().join(format!("data-{i}")), Duration::from_secs(60));
        assert_eq!(code, Some(2), "{case}: a bad configuration exits 2 before serving:\n{out}");
        assert!(!out.contains("listening on"), "{case}: no port was bound:\n{out}");
        assert!(out.contains(named), "{case}: the message names {named}:\n{out}");
    }
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Waits until health service `service` reports `status`, at most `limit`.
async fn wait_health(server: &Server, service: &str, status: i32, limit: Duration) {
    let started = std::time::Instant::now();
    while server.health_of(service).await != Some(status) {
        assert!(started.elapsed() < limit, "{service:?} did not turn {status} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_warming_up_turns_liveness_off() {
    let dir = tempfile::tempdir().unwrap();
    let fault = [("DDPM_TEST_FAULT", "warmup-panic".to_string())];
    let mut server = Server::start_listening(dir.path(), &[], &fault).await;
    wait_health(&server, "liveness", NOT_SERVING, Duration::from_secs(30)).await;
    assert_eq!(server.health().await, Some(NOT_SERVING), "not ready either");
    let mut client = server.client().await;
    let refused = client.submit_job(request(2, pb::Scheduler::Ddim, 3, 2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("lost a device"), "{refused:?}");
    // The orchestrator's SIGTERM: it drains and says it failed.
    signal(server.pid(), "TERM");
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_computing_gives_its_shard_back_and_turns_liveness_off() {
    let dir = tempfile::tempdir().unwrap();
    let fault = [("DDPM_TEST_FAULT", "device-lost".to_string())];
    // One attempt per shard: had the lost device spent it, the job would be FAILED.
    let mut server = Server::start_listening(dir.path(), &["--max-attempts", "1"], &fault).await;
    wait_health(&server, "", SERVING, Duration::from_secs(60)).await;
    assert_eq!(server.health_of("liveness").await, Some(SERVING));
    let mut client = server.client().await;
    let job =
        client.submit_job(request(4, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    wait_health(&server, "liveness", NOT_SERVING, Duration::from_secs(10)).await;
    let after = client.get_job(pb::GetJobRequest { job_id: job.job_id.clone() }).await.unwrap();
    let after = after.into_inner().job.unwrap();
    assert_ne!(after.state, pb::JobState::Failed as i32, "the device's fault is not the job's: {after:?}");
    assert_eq!(after.shards_done, 0);
    signal(server.pid(), "TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(30)).await.code(), Some(1));
    drop(server);
    // Restarted on a working device, the job finishes: no attempt was spent on the lost device.
    let server = Server::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    let done = wait_for(&mut client, &job.job_id, |j| {
        j.state != pb::JobState::Queued as i32 && j.state != pb::JobState::Running as i32
    })
    .await;
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
}
