//! The batch service on a shared NATS JetStream queue (a real nats-server started by the tests):
//! workers sharing jobs, large jobs, zombies and cancels across workers, and readiness.

mod common;

use std::time::Duration;

use common::service::{Server, SpecMut, job_samples, manifest, request, tiny_model, wait_for};
use ddpm_worker::api::pb;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const CANCELLED: i32 = pb::JobState::Cancelled as i32;

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
    let samples = job_samples(&done).await;
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

/// `serve` flags for a worker on the NATS queue `queue` with the tiny model and outputs under `dir`.
fn nats_args(dir: &std::path::Path, queue: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir).display()),
        "--output".into(),
        format!("file:{}", dir.join("jobs").display()),
        "--queue".into(),
        queue.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_thousand_shard_job_is_queued_in_bounded_batches_and_small_jobs_still_run() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("large"));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-shards-per-job", "20000", "--batches-per-shard", "1", "--grace-seconds", "1"];
    let mut server =
        Server::start_with(&dir.path().join("a"), &nats_args(dir.path(), &queue, &flags), &[]).await;
    let mut client = server.client().await;
    let big = tokio::time::timeout(
        Duration::from_secs(60),
        client.submit_job(request(20_000, pb::Scheduler::Ddim, 2, 1)),
    )
    .await
    .expect("SubmitJob of 20,000 shards answered")
    .unwrap()
    .into_inner()
    .job
    .unwrap();
    assert_eq!(big.shards_total, 20_000);
    // A small job of higher priority runs while the big one is being queued and sampled.
    let mut small = request(2, pb::Scheduler::Ddim, 3, 2);
    small.s().priority = 5;
    let small = client.submit_job(small).await.unwrap().into_inner().job.unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(120),
        wait_for(&mut client, &small.job_id, |j| j.state == SUCCEEDED),
    )
    .await
    .expect("the small job finished");
    assert_eq!(done.samples_done, 2);
    let cancelled = tokio::time::timeout(
        Duration::from_secs(120),
        client.cancel_job(pb::CancelJobRequest { job_id: big.job_id.clone() }),
    )
    .await
    .expect("CancelJob answered")
    .unwrap();
    assert_eq!(cancelled.into_inner().job.unwrap().state, CANCELLED);
    // The server still drains and exits on SIGTERM.
    common::service::signal(server.pid(), "TERM");
    let status = server.wait_exit(Duration::from_secs(45)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_cannot_change_recorded_outputs_on_nats() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("zombie"));
    let dir = tempfile::tempdir().unwrap();
    common::service::a_zombie_cannot_change_recorded_outputs(dir.path(), &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_worker_keeps_the_other_from_recording_shards() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("cancel"));
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats every 15 s: the other worker learns of the cancel from its record fence, not from them.
    let flags = ["--batches-per-shard", "1", "--cpu-threads", "1"];
    let a = Server::start_with(&dir.path().join("a"), &nats_args(dir.path(), &queue, &flags), &[]).await;
    let b = Server::start_with(&dir.path().join("b"), &nats_args(dir.path(), &queue, &flags), &[]).await;
    let mut client = a.client().await;
    let job =
        client.submit_job(request(16, pb::Scheduler::Ddpm, 200, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.shards_done >= 2).await;
    let cancelled = common::service::cancel_job(&mut client, &job.job_id).await;
    assert_eq!(cancelled.state, CANCELLED);
    // Long enough for both workers' running shards to finish sampling.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let records =
        std::fs::read_dir(dir.path().join("jobs").join(&job.job_id).join("shards")).unwrap().count();
    let after = common::service::get_job(&mut client, &job.job_id).await;
    assert_eq!(after.shards_done, cancelled.shards_done, "nothing counted after the cancel");
    assert_eq!(records as u32, cancelled.shards_done, "shard records written after the cancel");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_queue() {
    use common::nats::{NatsServer, unique_namespace};
    use common::outage::Proxy;
    use tonic_health::pb::health_check_response::ServingStatus;
    let nats = NatsServer::shared().await;
    let mut proxy = Proxy::start(nats.url().trim_start_matches("nats://").parse().unwrap()).await;
    let queue = format!("nats://{}/{}", proxy.addr(), unique_namespace("ready"));
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("a"),
        &nats_args(dir.path(), &queue, &["--lease-seconds", "4"]),
        &[],
    )
    .await;
    let until = |want: ServingStatus, limit: Duration| {
        let server = &server;
        async move {
            let started = std::time::Instant::now();
            while started.elapsed() < limit {
                if server.health().await == Some(want as i32) {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("health did not become {want:?} within {limit:?}");
        }
    };
    until(ServingStatus::Serving, Duration::from_secs(5)).await;
    proxy.cut();
    until(ServingStatus::NotServing, Duration::from_secs(60)).await;
    // Liveness stays SERVING: a restart would not bring the queue back.
    let channel =
        tonic::transport::Endpoint::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let live = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: "liveness".into() })
        .await
        .unwrap();
    assert_eq!(live.into_inner().status, ServingStatus::Serving as i32);
    proxy.restore();
    until(ServingStatus::Serving, Duration::from_secs(90)).await;
    // And it works again.
    let mut client = server.client().await;
    let job =
        client.submit_job(request(2, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
}

/// Runs `serve` with `args` and `env` until it exits (at most a minute); its exit code and output.
fn serve_exit(args: &[String], env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(common::bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = common::wait_or_kill(&mut child, Duration::from_secs(60)).and_then(|s| s.code());
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    (code, out)
}

/// A NATS server with TLS that verifies clients (mTLS) and wants a user and password: a front end
/// without devices takes the job (its password from a file), a worker runs it (its password from the
/// environment), both over tls://.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_mutual_tls_with_a_password_through_a_front_end_without_devices() {
    use common::nats::{NatsConfig, NatsServer, unique_namespace};
    use common::pki::Ca;
    use ddpm_worker::queue::nats::{NatsAuth, NatsClientOptions, Secret};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("nats test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let server_pem = ca.issue(dir.path(), "nats", &["127.0.0.1"]);
    let client_pem = ca.issue(dir.path(), "worker", &["worker.test"]);
    let mut config = NatsConfig::tls(&server_pem, Some(&ca_file), r#"user: ddpm, password: "s3cret pass""#);
    config.client = NatsClientOptions {
        require_tls: true,
        ca: Some(ca_file.clone()),
        client_cert: Some((client_pem.cert.clone(), client_pem.key.clone())),
        auth: NatsAuth::UserPassword { user: "ddpm".into(), password: Secret::new("s3cret pass") },
        name: None,
    };
    let nats = NatsServer::start(&config).await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("mtls"));
    assert!(queue.starts_with("tls://127.0.0.1:"), "{queue}");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "s3cret pass\n").unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let tls = [
        "--nats-ca".to_string(),
        path(&ca_file),
        "--nats-cert".into(),
        path(&client_pem.cert),
        "--nats-key".into(),
        path(&client_pem.key),
        "--nats-user".into(),
        "ddpm".into(),
    ];
    let mut front_args = nats_args(dir.path(), &queue, &["--devices", "none", "--batches-per-shard", "1"]);
    front_args.extend(tls.iter().cloned());
    front_args.extend(["--nats-password-file".to_string(), path(&password_file)]);
    let front =
        Server::start_with(&dir.path().join("front"), &front_args, &[("HOSTNAME", "front".into())]).await;
    let mut worker_args = nats_args(dir.path(), &queue, &["--cpu-threads", "1"]);
    worker_args.extend(tls.iter().cloned());
    let env = [("HOSTNAME", "worker".to_string()), ("DDPM_NATS_PASSWORD", "s3cret pass".to_string())];
    let _worker = Server::start_with(&dir.path().join("worker"), &worker_args, &env).await;

    let mut client = front.client().await;
    let job =
        client.submit_job(request(4, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!((done.samples_done, done.shards_done), (4, 2));
    assert_eq!(job_samples(&done).await.len(), 4);
    let m = manifest(&done);
    for shard in m["shards"].as_array().unwrap() {
        let worker = shard["worker"].as_str().unwrap();
        assert!(worker.starts_with("worker-"), "a shard ran on {worker}, not on the worker");
    }
}

/// Wrong credentials, an untrusted server certificate and unusable files stop `serve` before it
/// listens (exit 2), with a message that names what to fix; right ones connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_nats_credentials_or_certificates_stop_serve_at_startup() {
    use common::nats::{NatsConfig, NatsServer, unique_namespace};
    use common::pki::Ca;
    use ddpm_worker::queue::nats::{NatsAuth, NatsClientOptions, NatsOptions, NatsQueue, Secret};
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let ca = Ca::new("nats test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let stranger_file = Ca::new("another CA").write(&dir.path().join("stranger.pem"));
    let server_pem = ca.issue(dir.path(), "nats", &["127.0.0.1"]);
    let mut config = NatsConfig::tls(&server_pem, None, "user: ddpm, password: right");
    config.client = NatsClientOptions {
        ca: Some(ca_file.clone()),
        auth: NatsAuth::UserPassword { user: "ddpm".into(), password: Secret::new("right") },
        ..Default::default()
    };
    let tls_server = NatsServer::start(&config).await;
    let token_server = NatsServer::start(&NatsConfig {
        extra: "authorization { token: \"t0ken\" }\n".into(),
        client: NatsClientOptions { auth: NatsAuth::Token(Secret::new("t0ken")), ..Default::default() },
        ..Default::default()
    })
    .await;
    let tls_queue = format!("{}/{}", tls_server.url(), unique_namespace("refused"));
    let token_queue = format!("{}/{}", token_server.url(), unique_namespace("refused"));
    std::fs::write(dir.path().join("wrong"), "wrong\n").unwrap();
    std::fs::write(dir.path().join("right"), "right\n").unwrap();
    std::fs::write(dir.path().join("bad.creds"), "not a credentials file\n").unwrap();
    let file = |name: &str| path(&dir.path().join(name));
    let user = |password: &str| {
        vec!["--nats-user".to_string(), "ddpm".into(), "--nats-password-file".into(), file(password)]
    };
    let with = |flags: Vec<String>, more: &[String]| [flags, more.to_vec()].concat();
    let ca_flag = |f: &std::path::Path| vec!["--nats-ca".to_string(), path(f)];
    let cases: Vec<(&str, String, Vec<String>, Vec<&str>)> = vec![
        (
            "wrong password",
            tls_queue.clone(),
            with(user("wrong"), &ca_flag(&ca_file)),
            vec!["the NATS server refused the user and password", "check --nats-user"],
        ),
        (
            "untrusted server certificate",
            tls_queue.clone(),
            with(user("right"), &ca_flag(&stranger_file)),
            vec!["TLS with the NATS server failed", "not signed by a CA in --nats-ca"],
        ),
        ("no credentials", tls_queue.clone(), ca_flag(&ca_file), vec!["the server wants credentials"]),
        (
            "missing password file",
            tls_queue.clone(),
            with(user("absent"), &ca_flag(&ca_file)),
            vec!["--nats-password-file", "absent"],
        ),
        (
            "CA file without a certificate",
            tls_queue.clone(),
            with(user("right"), &ca_flag(&dir.path().join("right"))),
            vec!["--nats-ca", "no PEM certificate"],
        ),
        (
            "wrong token",
            token_queue.clone(),
            vec!["--nats-token-file".into(), file("wrong")],
            vec!["the NATS server refused the token", "--nats-token-file"],
        ),
        (
            "malformed credentials file",
            token_queue.clone(),
            vec!["--nats-creds".into(), file("bad.creds")],
            vec!["--nats-creds", "bad.creds"],
        ),
    ];
    for (case, queue, flags, wants) in cases {
        let args = with(nats_args(dir.path(), &queue, &[]), &flags);
        let started = std::time::Instant::now();
        let (code, out) = serve_exit(&args, &[]);
        assert_eq!(code, Some(2), "{case}: a bad NATS setting exits 2:\n{out}");
        assert!(started.elapsed() < Duration::from_secs(30), "{case}: no retrying: {:?}", started.elapsed());
        assert!(!out.contains("listening on"), "{case}: no port was bound:\n{out}");
        assert!(!out.contains("panicked"), "{case}: no panic:\n{out}");
        for want in wants {
            assert!(out.contains(want), "{case}: the message says {want:?}:\n{out}");
        }
    }
    // The right token and password connect.
    let token = NatsClientOptions { auth: NatsAuth::Token(Secret::new("t0ken")), ..Default::default() };
    NatsQueue::connect_with(&token_server.url(), &token, &unique_namespace("token"), NatsOptions::default())
        .await
        .unwrap();
    NatsQueue::connect_with(
        &tls_server.url(),
        &config.client,
        &unique_namespace("pw"),
        NatsOptions::default(),
    )
    .await
    .unwrap();
}
