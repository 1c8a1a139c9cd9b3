//! Who may call the API and how: bearer tokens and roles, token rotation, TLS and mTLS with a test CA,
//! certificate reload, the CLI's exit codes and JSON, buf curl, the Python client, and `--wait`
//! (CLI and Python) across a server's SIGTERM and restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pki::Ca;
use common::service::{Server, request, signal, tiny_model};
use ddpm_worker::api::pb;
use ddpm_worker::api::pb::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const READER: &str = "reader-token-5a1f0c3e9b";
const ALICE: &str = "alice-token-77d2e41c0a";
const BOB: &str = "bob-token-0c8e12f4a9d3";
const ADMIN: &str = "admin-token-e3b9a6d0f1";

/// Sends `authorization: Bearer TOKEN` (nothing for `None`).
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Authed = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// A client of `server` that sends `token` (none for `None`).
async fn client_with(server: &Server, token: Option<&str>) -> Authed {
    let value = token.map(|t| format!("Bearer {t}").parse().unwrap());
    WorkerServiceClient::with_interceptor(server.try_channel().await.unwrap(), Bearer(value))
}

fn write_tokens(path: &Path, lines: &[&str]) {
    // Written whole and renamed into place, as a Kubernetes Secret update is.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn default_tokens(path: &Path) {
    write_tokens(
        path,
        &[
            "# test tokens",
            &format!("{READER} read ci"),
            &format!("{ALICE} submit alice"),
            &format!("{BOB} submit bob"),
            &format!("{ADMIN} admin ops"),
        ],
    );
}

/// Every RPC of WorkerService, called once, with its status code.
async fn every_rpc(client: &mut Authed, job_id: &str) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let mut codes = vec![
        ("SubmitJob", code(client.submit_job(request(1, pb::Scheduler::Ddim, 1, 1)).await.map(drop))),
        ("GetJob", code(client.get_job(pb::GetJobRequest { job_id: job_id.into() }).await.map(drop))),
        ("ListJobs", code(client.list_jobs(pb::ListJobsRequest::default()).await.map(drop))),
        (
            "CancelJob",
            code(client.cancel_job(pb::CancelJobRequest { job_id: job_id.into() }).await.map(drop)),
        ),
        ("RetryJob", code(client.retry_job(pb::RetryJobRequest { job_id: job_id.into() }).await.map(drop))),
        (
            "DeleteJob",
            code(client.delete_job(pb::DeleteJobRequest { job_id: job_id.into() }).await.map(drop)),
        ),
    ];
    let watch = client.watch_job(pb::WatchJobRequest { job_id: job_id.into() }).await;
    codes.push(("WatchJob", code(watch.map(drop))));
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_a_token_and_roles_decide_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    default_tokens(&tokens);
    let server = Server::start(dir.path(), &["--auth-token-file", tokens.to_str().unwrap()]).await;
    assert!(server.health().await.is_some(), "health answers without a token");

    let mut alice = client_with(&server, Some(ALICE)).await;
    let mut job_req = request(64, pb::Scheduler::Ddpm, 1000, 1);
    job_req.request_id = "shared-id".into();
    let job = alice.submit_job(job_req.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.owner, "alice");

    for token in [None, Some("wrong-token-0000000000"), Some(&ALICE[..ALICE.len() - 1])] {
        let mut stranger = client_with(&server, token).await;
        for (rpc, code) in every_rpc(&mut stranger, &job.job_id).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with {token:?}");
        }
    }
    // A token is never echoed back.
    let status = client_with(&server, Some("wrong-token-0000000000"))
        .await
        .get_job(pb::GetJobRequest { job_id: job.job_id.clone() })
        .await
        .unwrap_err();
    assert!(!status.message().contains("wrong-token"), "{status:?}");

    // read: reads only.
    let mut reader = client_with(&server, Some(READER)).await;
    let codes = every_rpc(&mut reader, &job.job_id).await;
    for (rpc, code) in codes {
        let wanted =
            if ["GetJob", "ListJobs", "WatchJob"].contains(&rpc) { Code::Ok } else { Code::PermissionDenied };
        assert_eq!(code, wanted, "{rpc} as a reader");
    }
    // Another submitter sees the job but may not cancel or retry it; its own request_id space is apart.
    let mut bob = client_with(&server, Some(BOB)).await;
    let seen = bob.get_job(pb::GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(seen.job.unwrap().owner, "alice");
    let denied = bob.cancel_job(pb::CancelJobRequest { job_id: job.job_id.clone() }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = bob.retry_job(pb::RetryJobRequest { job_id: job.job_id.clone() }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = bob.delete_job(pb::DeleteJobRequest { job_id: job.job_id.clone() }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let bobs = bob.submit_job(job_req.clone()).await.unwrap().into_inner().job.unwrap();
    assert_ne!(bobs.job_id, job.job_id, "the same request_id from another caller is another request");
    let again = alice.submit_job(job_req).await.unwrap().into_inner().job.unwrap();
    assert_eq!(again.job_id, job.job_id, "alice's retry of her request is her job");

    // The owner cancels its own job; admin cancels anyone's.
    let cancelled = alice.cancel_job(pb::CancelJobRequest { job_id: job.job_id.clone() }).await.unwrap();
    let cancelled = cancelled.into_inner().job.unwrap();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert_eq!(cancelled.error.unwrap().code, Code::Cancelled as i32);
    // Scripts tell a CANCELLED job by the exit code of `status --wait` (6).
    let (code, _, err) =
        cli(&["status", &job.job_id, "--wait", "--server", &server.url], &[("DDPM_TOKEN", READER)]);
    assert_eq!(code, 6, "{err}");
    let mut admin = client_with(&server, Some(ADMIN)).await;
    let cancelled = admin.cancel_job(pb::CancelJobRequest { job_id: bobs.job_id.clone() }).await.unwrap();
    assert_eq!(cancelled.into_inner().job.unwrap().state, pb::JobState::Cancelled as i32);
    // Admin deletes anyone's job (here with the CLI); then nobody finds it.
    let (code, out, err) = cli(&["delete", &bobs.job_id, "--server", &server.url], &[("DDPM_TOKEN", ADMIN)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("{}  deleted (CANCELLED", bobs.job_id)), "{out}");
    let gone = bob.get_job(pb::GetJobRequest { job_id: bobs.job_id.clone() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let (code, _, err) = cli(&["delete", &bobs.job_id, "--server", &server.url], &[("DDPM_TOKEN", ADMIN)]);
    assert_eq!(code, 3, "a job already deleted is not found: {err}");

    // Reflection follows the API's tokens.
    let reflect = |token: Option<&'static str>| {
        let channel = server.try_channel();
        async move {
            use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1::{
                ServerReflectionRequest, server_reflection_request::MessageRequest,
            };
            let mut client = ServerReflectionClient::new(channel.await.unwrap());
            let mut req = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]));
            if let Some(t) = token {
                req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            match client.server_reflection_info(req).await {
                Err(s) => s.code(),
                Ok(stream) => {
                    use tokio_stream::StreamExt;
                    let mut stream = stream.into_inner();
                    match stream.next().await {
                        Some(Ok(_)) => Code::Ok,
                        Some(Err(s)) => s.code(),
                        None => Code::Unknown,
                    }
                }
            }
        }
    };
    assert_eq!(reflect(None).await, Code::Unauthenticated);
    assert_eq!(reflect(Some(READER)).await, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    default_tokens(&tokens);
    let server = Server::start(dir.path(), &["--auth-token-file", tokens.to_str().unwrap()]).await;
    let list = |token: &'static str| {
        let server = &server;
        async move {
            let mut c = client_with(server, Some(token)).await;
            c.list_jobs(pb::ListJobsRequest::default()).await.err().map_or(Code::Ok, |s| s.code())
        }
    };
    assert_eq!(list(ALICE).await, Code::Ok);
    const NEW: &str = "rotated-token-9f8e7d6c5b";

    // Changed on disk: seen by the poll within seconds.
    write_tokens(&tokens, &[&format!("{NEW} submit alice"), &format!("{ADMIN} admin ops")]);
    let started = Instant::now();
    while list(ALICE).await == Code::Ok {
        assert!(started.elapsed() < Duration::from_secs(15), "the old token still works after 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(list(ALICE).await, Code::Unauthenticated);
    assert_eq!(list(NEW).await, Code::Ok);

    // SIGHUP: at once.
    write_tokens(&tokens, &[&format!("{ALICE} read alice")]);
    signal(server.pid(), "HUP");
    let started = Instant::now();
    while list(ALICE).await != Code::Ok {
        assert!(started.elapsed() < Duration::from_secs(2), "SIGHUP did not reload the tokens");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(list(NEW).await, Code::Unauthenticated);

    // A file that no longer parses keeps the tokens in force (and the server up).
    write_tokens(&tokens, &["short"]);
    signal(server.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(list(ALICE).await, Code::Ok);
}

/// `ddpm-worker` with `args`, its exit code and stdout.
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(common::bin())
        .args(args)
        .env_remove("DDPM_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Tls {
    dir: PathBuf,
    ca: PathBuf,
    server: common::pki::Pem,
    client: common::pki::Pem,
}

fn tls_files(dir: &Path, ca: &Ca) -> Tls {
    let dir = dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    Tls {
        ca: ca.write(&dir.join("ca.pem")),
        server: ca.issue(&dir, "server", &["localhost", "127.0.0.1"]),
        client: ca.issue(&dir, "client", &["client.test"]),
        dir,
    }
}

fn client_tls(ca: &Path, identity: Option<&common::pki::Pem>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(id) = identity {
        tls = tls
            .identity(Identity::from_pem(std::fs::read(&id.cert).unwrap(), std::fs::read(&id.key).unwrap()));
    }
    tls
}

fn serve_args(dir: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir).display()),
        "--output".into(),
        format!("file:{}", dir.join("jobs").display()),
        "--grace-seconds".into(),
        "1".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_cli_and_buf_curl_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_files(dir.path(), &Ca::new("ddpm test CA"));
    let tokens = dir.path().join("tokens");
    default_tokens(&tokens);
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, format!("{ALICE}\n")).unwrap();
    let args = serve_args(
        dir.path(),
        &[
            "--tls-cert".into(),
            tls.server.cert.display().to_string(),
            "--tls-key".into(),
            tls.server.key.display().to_string(),
            "--auth-token-file".into(),
            tokens.display().to_string(),
        ],
    );
    let server = Server::start_tls(dir.path(), &args, &[], client_tls(&tls.ca, None)).await;
    let url = server.url.clone();
    assert!(url.starts_with("https://"));
    let (ca, tf) = (tls.ca.to_str().unwrap(), token_file.to_str().unwrap());

    // The CLI: submit --wait over TLS with a token, JSON out.
    let submit = [
        "submit",
        "--server",
        &url,
        "--ca",
        ca,
        "--token-file",
        tf,
        "--model",
        "tiny",
        "--scheduler",
        "ddim",
        "--steps",
        "2",
        "--num-samples",
        "3",
        "--wait",
        "--output",
        "json",
    ];
    let (code, out, err) = cli(&submit, &[]);
    assert_eq!(code, 0, "{err}");
    let job: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED", "{job}");
    assert_eq!(job["owner"], "alice");
    assert!(job["samplesPerSecond"].as_f64().is_some_and(|r| r > 0.0), "a finished job's pace: {job}");
    assert!(job.get("estimatedFinishTime").is_none(), "no finish ahead of a finished job: {job}");
    let job_id = job["jobId"].as_str().unwrap().to_string();

    // submit --extend: the extended job's settings, the seeds after its; its manifest names it.
    let auth = ["--server", &url, "--ca", ca, "--token-file", tf];
    let extend =
        [&["submit", "--extend", &job_id, "--num-samples", "2", "--wait", "--output", "json"], &auth[..]];
    let (code, out, err) = cli(&extend.concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let more: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(more["state"], "JOB_STATE_SUCCEEDED", "{more}");
    assert_eq!(more["spec"]["extends"], job_id.as_str());
    let seed = |j: &serde_json::Value| j["spec"]["seed"].as_str().unwrap().parse::<u64>().unwrap();
    assert_eq!(seed(&more), seed(&job) + 3, "the seeds follow the extended job's");
    for field in ["model", "sampling", "batchSize"] {
        assert_eq!(more["spec"][field], job["spec"][field], "{field}");
    }
    let manifest = more["manifestUri"].as_str().unwrap().strip_prefix("file://").unwrap().to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(manifest["spec"]["extends"], job_id.as_str());
    // submit --spec: the Job that --output json printed, submitted again with a flag over it.
    let spec_file = dir.path().join("job.json");
    std::fs::write(&spec_file, &out).unwrap();
    let spec_path = spec_file.to_str().unwrap();
    let again =
        [&["submit", "--spec", spec_path, "--num-samples", "1", "--wait", "--output", "json"], &auth[..]];
    let (code, out, err) = cli(&again.concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let again: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (again["state"].as_str(), again["samplesTotal"].as_str()),
        (Some("JOB_STATE_SUCCEEDED"), Some("1"))
    );
    for field in ["model", "sampling", "batchSize", "seed", "extends"] {
        assert_eq!(again["spec"][field], more["spec"][field], "{field} comes from the file");
    }
    std::fs::write(&spec_file, "{\"model\": 3}").unwrap();
    let (code, _, err) = cli(&[&["submit", "--spec", spec_path], &auth[..]].concat(), &[]);
    assert!(code == 2 && err.contains("ddpm.v1.JobSpec"), "{code}: {err}");

    // Settings the extended job fixes are refused as arguments; an unknown job is named.
    let (code, _, err) = cli(
        &[&["submit", "--extend", &job_id, "--num-samples", "1", "--steps", "3"], &auth[..]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, err) =
        cli(&[&["submit", "--extend", "no-such-job", "--num-samples", "1"], &auth[..]].concat(), &[]);
    assert!(code == 2 && err.contains("spec.extends"), "{code}: {err}");

    // Exit codes: 0, 3 not found, 4 unauthenticated, 2 bad arguments, 7 unavailable (no CA: the
    // certificate is not trusted; a closed port).
    let (code, out, _) =
        cli(&["status", &job_id, "--server", &url, "--ca", ca, "--token-file", tf, "--output", "json"], &[]);
    assert_eq!(
        (code, serde_json::from_str::<serde_json::Value>(&out).unwrap()["jobId"].as_str()),
        (0, Some(job_id.as_str()))
    );
    let (code, _, err) = cli(&["status", "nope", "--server", &url, "--ca", ca, "--token-file", tf], &[]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = cli(&["status", &job_id, "--server", &url, "--ca", ca], &[]);
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = cli(&["list", "--server", &url, "--ca", ca], &[("DDPM_TOKEN", READER)]);
    assert_eq!(code, 0, "DDPM_TOKEN holds a token: {err}");
    let (code, _, err) = cli(
        &[
            "submit",
            "--server",
            &url,
            "--ca",
            ca,
            "--token-file",
            tf,
            "--model",
            "tiny",
            "--num-samples",
            "0",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("spec.num_samples"), "{err}");
    let (code, _, err) = cli(&["status", &job_id, "--server", &url, "--token-file", tf], &[]);
    assert_eq!(code, 7, "an untrusted certificate: {err}");
    let (code, _, err) = cli(&["list", "--server", "http://127.0.0.1:9", "--timeout-seconds", "2"], &[]);
    assert_eq!(code, 7, "a closed port: {err}");
    let (code, out, _) =
        cli(&["list", "--server", &url, "--ca", ca, "--token-file", tf, "--output", "json"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "one JSON job a line: {out}"
    );

    // models: one JSON model a line; a name the server does not have is exit 3 (NOT_FOUND).
    let (code, out, err) = cli(&[&["models", "--output", "json"], &auth[..]].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let model: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((model["name"].as_str(), model["channels"].as_u64()), (Some("tiny"), Some(3)), "{model}");
    assert_eq!(model["weightsSha256"].as_str().map(str::len), Some(64), "{model}");
    assert_eq!(model["devices"][0]["device"], "cpu", "the device that ran the jobs: {model}");
    let (code, out, err) = cli(&[&["models", "tiny"], &auth[..]].concat(), &[]);
    assert!(code == 0 && out.starts_with("tiny  3×"), "{code}: {out}{err}");
    let (code, _, err) = cli(&[&["models", "nope"], &auth[..]].concat(), &[]);
    assert_eq!(code, 3, "{err}");

    // buf curl (what the README shows), with the CA and a token, through reflection.
    if let Some(buf) = std::env::var_os("DDPM_BUF") {
        let out = Command::new(buf)
            .args([
                "curl",
                "--protocol",
                "grpc",
                "--cacert",
                ca,
                "-H",
                &format!("Authorization: Bearer {ALICE}"),
                "--reflect-header",
                "*",
            ])
            .args(["--data", &format!(r#"{{"jobId": "{job_id}"}}"#)])
            .arg(format!("{url}/ddpm.v1.WorkerService/GetJob"))
            .output()
            .unwrap();
        assert!(out.status.success(), "buf curl: {}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["job"]["state"], "JOB_STATE_SUCCEEDED");
    } else {
        panic!("DDPM_BUF is not set: run `make test` (it installs buf)");
    }

    // A renewed certificate, from another CA, is served to new connections without a restart.
    let other = Ca::new("renewed CA");
    let renewed = other.issue(&tls.dir, "renewed", &["localhost", "127.0.0.1"]);
    std::fs::rename(&renewed.key, &tls.server.key).unwrap();
    std::fs::rename(&renewed.cert, &tls.server.cert).unwrap();
    let other_ca = other.write(&tls.dir.join("other-ca.pem"));
    signal(server.pid(), "HUP");
    let started = Instant::now();
    loop {
        let (code, _, _) = cli(
            &["status", &job_id, "--server", &url, "--ca", other_ca.to_str().unwrap(), "--token-file", tf],
            &[],
        );
        if code == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the renewed certificate is not served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _, _) = cli(&["status", &job_id, "--server", &url, "--ca", ca, "--token-file", tf], &[]);
    assert_eq!(code, 7, "the old CA no longer matches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_files(dir.path(), &Ca::new("ddpm test CA"));
    let health_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let stranger_ca = Ca::new("someone else");
    let stranger = stranger_ca.issue(&tls.dir, "stranger", &["stranger.test"]);
    let args = serve_args(
        dir.path(),
        &[
            "--tls-cert".into(),
            tls.server.cert.display().to_string(),
            "--tls-key".into(),
            tls.server.key.display().to_string(),
            "--tls-client-ca".into(),
            tls.ca.display().to_string(),
            "--health-listen".into(),
            format!("127.0.0.1:{health_port}"),
        ],
    );
    let server = Server::start_tls(dir.path(), &args, &[], client_tls(&tls.ca, Some(&tls.client))).await;
    // Probes that cannot speak TLS (the kubelet's) get plaintext health on the health port, and only that.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(plain.clone());
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let api = WorkerServiceClient::new(plain).list_jobs(pb::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(api.code(), Code::Unimplemented, "the health port serves nothing else: {api:?}");
    let url = server.url.clone();
    let ca = tls.ca.to_str().unwrap();
    let (code, _, err) = cli(&["list", "--server", &url, "--ca", ca, "--timeout-seconds", "5"], &[]);
    assert_eq!(code, 7, "no client certificate: {err}");
    let (code, _, err) = cli(
        &["list", "--server", &url, "--ca", ca, "--cert", stranger.cert.to_str().unwrap()]
            .into_iter()
            .chain(["--key", stranger.key.to_str().unwrap(), "--timeout-seconds", "5"])
            .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(code, 7, "a certificate from another CA: {err}");
    let (code, _, err) = cli(
        &["list", "--server", &url, "--ca", ca, "--cert", tls.client.cert.to_str().unwrap()]
            .into_iter()
            .chain(["--key", tls.client.key.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // And the Rust client of the tests, with its certificate.
    let mut client = server.client().await;
    client.list_jobs(pb::ListJobsRequest::default()).await.unwrap();
}

/// The Python client's checks (clients/python/tests/check_client.py), and its wait and the CLI's
/// `submit --wait` across a SIGTERM and restart of the server mid-job, on TLS with tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_and_waits_survive_a_restart() {
    let python = std::env::var("DDPM_PYTHON").expect("DDPM_PYTHON is not set: run `make test`");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/tests/check_client.py");
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_files(dir.path(), &Ca::new("ddpm test CA"));
    let tokens = dir.path().join("tokens");
    default_tokens(&tokens);
    let (alice, bob) = (dir.path().join("alice.token"), dir.path().join("bob.token"));
    std::fs::write(&alice, ALICE).unwrap();
    std::fs::write(&bob, BOB).unwrap();
    let mut args = serve_args(
        dir.path(),
        &[
            "--tls-cert".into(),
            tls.server.cert.display().to_string(),
            "--tls-key".into(),
            tls.server.key.display().to_string(),
            "--auth-token-file".into(),
            tokens.display().to_string(),
        ],
    );
    let mut server = Server::start_tls(dir.path(), &args, &[], client_tls(&tls.ca, None)).await;
    let url = server.url.clone();
    let ca = tls.ca.to_str().unwrap().to_string();

    let (alice_file, bob_file) = (alice.to_str().unwrap(), bob.to_str().unwrap());
    let basic = ["basic", &url, "--ca", &ca, "--token-file", alice_file, "--other-token-file", bob_file];
    common::python("clients/python/tests/check_client.py", &basic, &[]);

    // The client as a package: built by `python -m build`, its sdist and wheel each installed into a fresh
    // venv with no index, and a job run through asyncio from each.
    let wheels = std::env::var("DDPM_CLIENT_WHEELS").expect("DDPM_CLIENT_WHEELS is not set: run `make test`");
    let work = dir.path().join("package");
    std::fs::create_dir_all(&work).unwrap();
    let packaged = [wheels.as_str(), work.to_str().unwrap(), &url, "--ca", &ca, "--token-file", alice_file];
    common::python("clients/python/tests/check_package.py", &packaged, &[]);

    // A Python wait and a CLI wait on long jobs; the server drains and restarts under them.
    let mut waiter = Command::new(&python)
        .arg(&script)
        .args(["wait", &url, "--ca", &ca, "--token-file", alice.to_str().unwrap(), "--samples", "16"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(waiter.stdout.take().unwrap()));
    let first = lines.next().expect("the script printed its job").unwrap();
    let python_job = first.strip_prefix("job ").unwrap().to_string();
    let cli_wait = Command::new(common::bin())
        .args(["submit", "--server", &url, "--ca", &ca, "--token-file", alice.to_str().unwrap()])
        .args(["--model", "tiny", "--scheduler", "ddpm", "--steps", "200", "--num-samples", "16"])
        .args(["--batch-size", "2", "--wait", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut alice_client = client_with(&server, Some(ALICE)).await;
    let started = Instant::now();
    loop {
        let job = alice_client
            .get_job(pb::GetJobRequest { job_id: python_job.clone() })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        if job.samples_done > 0 {
            assert!(job.samples_done < job.samples_total, "the job ended before the restart: make it longer");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(server.pid(), "TERM");
    assert!(server.wait_exit(Duration::from_secs(60)).await.success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port = server.port();
    drop(server);
    args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
    let server = Server::start_tls(dir.path(), &args, &[], client_tls(&tls.ca, None)).await;
    assert_eq!(server.port(), port);

    let python_out = tokio::task::spawn_blocking(move || {
        let status = waiter.wait().unwrap();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut waiter.stderr.take().unwrap(), &mut err).unwrap();
        (status, rest, err)
    });
    let (status, rest, err) =
        tokio::time::timeout(Duration::from_secs(300), python_out).await.unwrap().unwrap();
    assert!(status.success(), "the Python wait: {err}");
    let job: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(
        (job["jobId"].as_str(), job["state"].as_str()),
        (Some(python_job.as_str()), Some("JOB_STATE_SUCCEEDED"))
    );

    let cli_out = tokio::task::spawn_blocking(move || cli_wait.wait_with_output().unwrap());
    let out = tokio::time::timeout(Duration::from_secs(300), cli_out).await.unwrap().unwrap();
    assert!(out.status.success(), "the CLI wait: {}", String::from_utf8_lossy(&out.stderr));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED");
}

/// `completions SHELL`: a script the shell parses, naming the commands and their flags.
#[test]
fn shell_completions_name_the_commands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = cli(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {err}");
        // fish names a long flag `-l extend`.
        for word in ["submit", "models", "extend", "spec", "num-samples"] {
            let flag = if shell == "fish" || ["submit", "models"].contains(&word) {
                word.to_string()
            } else {
                format!("--{word}")
            };
            assert!(out.contains(&flag), "{shell}'s script names {flag}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("ddpm-worker.bash");
    std::fs::write(&script, cli(&["completions", "bash"], &[]).1).unwrap();
    let parsed = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(parsed.status.success(), "bash -n: {}", String::from_utf8_lossy(&parsed.stderr));
    let (code, _, _) = cli(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2, "an unknown shell is a usage error");
}
