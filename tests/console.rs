//! The web console (`serve --console`): driven in a real browser (Debian's Chromium and chromedriver,
//! through Selenium: tests/console/browser.py), and watched by a hundred event streams at once.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nats::{NatsServer, unique_namespace};
use common::service::{Server, request, tiny_model};
use ddpm_worker::api::pb;

const READ: &str = "console-reader-token-0123456789";
const SUBMIT: &str = "console-submitter-token-0123456789";
const ADMIN: &str = "console-admin-token-0123456789";

fn write_tokens(path: &Path) {
    let text = format!("{READ} read viewer\n{SUBMIT} submit alice\n{ADMIN} admin ops\n");
    std::fs::write(path, text).unwrap();
}

fn digits_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/digits-16")
}

/// Where the browser test leaves its screenshots (kept after the run: the README's comes from there).
fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("console")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_sees_jobs_live_and_acts_as_its_token_allows() {
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("console"));
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens);
    let model = format!("digits={}", digits_model().display());
    let output = format!("file:{}", dir.path().join("jobs").display());
    // The console on a front end with no device: a job stays QUEUED until the browser script starts
    // the worker below, on the same queue and output folder.
    let front_args = [
        "--model",
        &model,
        "--output",
        &output,
        "--queue",
        &queue,
        "--devices",
        "none",
        "--console",
        "--auth-token-file",
        tokens.to_str().unwrap(),
    ]
    .map(String::from);
    let front = Server::start_with(&dir.path().join("front"), &front_args, &[]).await;
    let worker: Vec<String> = [
        common::bin().to_str().unwrap(),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--queue",
        &queue,
        "--model",
        &model,
        "--output",
        &output,
        "--devices",
        "cpu",
        "--cpu-threads",
        "1",
        "--scratch-dir",
        dir.path().join("worker-scratch").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let out = screenshots();
    let _ = std::fs::remove_dir_all(&out);
    let worker = serde_json::to_string(&worker).unwrap();
    let args: Vec<String> =
        [front.url.as_str(), READ, SUBMIT, ADMIN, "digits", out.to_str().unwrap(), &worker]
            .map(String::from)
            .to_vec();
    let result = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::python("tests/console/browser.py", &args, &[])
    })
    .await
    .unwrap();
    let seen: serde_json::Value =
        serde_json::from_slice(result.stdout.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).unwrap())
            .unwrap();
    assert!(seen["grid_width"].as_u64().unwrap() > 0, "{seen}");
    for (name, width) in [
        ("login", 1280),
        ("jobs-queued", 1280),
        ("jobs", 1280),
        ("job", 1280),
        ("job-cancelled", 1280),
        ("workers", 1280),
        ("jobs-phone", 390),
    ] {
        let shot = image::open(out.join(format!("{name}.png"))).unwrap_or_else(|e| panic!("{name}.png: {e}"));
        assert_eq!(shot.width(), width, "{name}.png");
    }
    drop(front);
}

/// Reads a Prometheus gauge's value from the metrics port (`None`: not exported yet).
async fn gauge(metrics: &str, name: &str, kind: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.ok()?.text().await.ok()?;
    let prefix = format!("{name}{{kind=\"{kind}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// A job's event stream as a browser holds it: the `job` events' views, until the stream ends.
async fn follow(client: reqwest::Client, url: String) -> Vec<serde_json::Value> {
    let mut response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut views = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: job") {
                let data: String = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                views.push(serde_json::from_str(&data).unwrap());
            }
        }
    }
    views
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_viewers_of_a_job_share_one_feed() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens);
    tiny_model(dir.path());
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let server = Server::start(
        dir.path(),
        &["--console", "--auth-token-file", tokens.to_str().unwrap(), "--metrics-listen", &metrics],
    )
    .await;
    let base = server.url.clone();
    let http = reqwest::Client::new();

    // Logging in sets the cookie; a wrong token and a missing header are refused.
    let login = |token: &str, header: bool| {
        let mut r = http
            .post(format!("{base}/console/api/login"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "token": token }).to_string());
        if header {
            r = r.header("x-ddpm-console", "1");
        }
        r.send()
    };
    assert_eq!(login("nope", true).await.unwrap().status(), 401);
    assert_eq!(login(READ, false).await.unwrap().status(), 403);
    let response = login(READ, true).await.unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains(READ), "the token is in the cookie as it was typed: {cookie}");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let viewer = reqwest::Client::builder()
        .default_headers([(reqwest::header::COOKIE, cookie.parse().unwrap())].into_iter().collect())
        .build()
        .unwrap();
    let session =
        viewer.get(format!("{base}/console/api/session")).send().await.unwrap().text().await.unwrap();
    let session: serde_json::Value = serde_json::from_str(&session).unwrap();
    assert_eq!(session["role"], "read");
    assert_eq!(http.get(format!("{base}/console/api/session")).send().await.unwrap().status(), 401);

    // A job long enough to be watched: 100 streams on it cost one feed.
    let mut grpc = server.client().await;
    let mut req = request(96, pb::Scheduler::Ddpm, 60, 8);
    req.spec.as_mut().unwrap().grid = Some(pb::GridSpec { samples_per_grid: 16, columns: 4 });
    let mut call = tonic::Request::new(req);
    call.metadata_mut().insert("authorization", format!("Bearer {SUBMIT}").parse().unwrap());
    let job = grpc.submit_job(call).await.unwrap().into_inner().job.unwrap();
    let url = format!("{base}/console/api/jobs/{}/events", job.job_id);
    let viewers: Vec<_> = (0..100).map(|_| tokio::spawn(follow(viewer.clone(), url.clone()))).collect();
    let start = Instant::now();
    loop {
        let (feeds, watching) = (
            gauge(&metrics, "ddpm_console_feeds", "job").await,
            gauge(&metrics, "ddpm_console_viewers", "job").await,
        );
        if watching == Some(100.0) {
            assert_eq!(feeds, Some(1.0), "100 viewers of one job should share one feed");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "viewers {watching:?}, feeds {feeds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut finals = Vec::new();
    for v in viewers {
        let views =
            tokio::time::timeout(Duration::from_secs(300), v).await.expect("the streams end").unwrap();
        let last = views.last().expect("a viewer got no job event").clone();
        // Progress comes in order, and every viewer ends on the same final view.
        let done: Vec<u64> =
            views.iter().map(|v| v["job"]["samplesDone"].as_str().unwrap_or("0").parse().unwrap()).collect();
        assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
        finals.push(last);
    }
    assert_eq!(finals[0]["job"]["state"], "JOB_STATE_SUCCEEDED", "{}", finals[0]);
    assert!(finals.iter().all(|f| f == &finals[0]));
    let grids = finals[0]["grids"].as_array().unwrap();
    assert_eq!(grids.len(), 6);
    assert!(grids.iter().all(|g| g["written"] == true));
    // The feed stops with its last viewer.
    let start = Instant::now();
    while gauge(&metrics, "ddpm_console_feeds", "job").await != Some(0.0) {
        assert!(start.elapsed() < Duration::from_secs(10), "the feed outlived its viewers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Files: grids through the server, a data file or a path out of the job refused.
    let files = format!("{base}/console/api/jobs/{}/files", job.job_id);
    let grid = viewer.get(format!("{files}/grids/00000.png")).send().await.unwrap();
    assert_eq!(grid.status(), 200);
    assert_eq!(grid.headers()["content-type"], "image/png");
    let png = image::load_from_memory(&grid.bytes().await.unwrap()).unwrap();
    assert!(png.width() > 0);
    // (A client resolves `..` segments itself; an encoded slash reaches the server as one segment.)
    for refused in
        ["samples/00000000.png", "grids/..%2Fmanifest.json", "index/..%2F..%2Fother%2Fmanifest.json"]
    {
        let status = viewer.get(format!("{files}/{refused}")).send().await.unwrap().status();
        assert_eq!(status, 400, "{refused}");
    }
    let missing = uuid::Uuid::new_v4();
    assert_eq!(viewer.get(format!("{base}/console/api/jobs/{missing}")).send().await.unwrap().status(), 404);
    // The page and its assets, with a CSP; gRPC on the same port is untouched (the call above).
    let page = http.get(format!("{base}/console/jobs/{}", job.job_id)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    assert!(page.text().await.unwrap().contains("/console/assets/console.js"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grids_on_s3_are_served_through_the_server() {
    use common::seaweed::{self, SeaweedFs};
    use common::service::wait_for;
    let s3 = SeaweedFs::shared().await;
    let prefix = seaweed::unique_prefix("console");
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let args = [
        "--model".to_string(),
        format!("tiny={}", model.display()),
        "--output".into(),
        format!("s3://{}/{prefix}/jobs", seaweed::BUCKET),
        "--s3-path-style".into(),
        "--console".into(),
    ];
    let server = Server::start_with(&dir.path().join("data"), &args, &seaweed::aws_env(s3.endpoint())).await;
    let mut grpc = server.client().await;
    let mut req = request(6, pb::Scheduler::Ddim, 4, 2);
    req.spec.as_mut().unwrap().grid = Some(pb::GridSpec { samples_per_grid: 4, columns: 2 });
    let job = grpc.submit_job(req).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut grpc, &job.job_id, |j| j.state == pb::JobState::Succeeded as i32).await;

    // No token file: the console is open, as the API is.
    let base = format!("{}/console/api/jobs/{}", server.url, job.job_id);
    let view: serde_json::Value =
        serde_json::from_str(&reqwest::get(&base).await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(view["job"]["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(view["job"]["shardStats"]["attempts"].as_u64().unwrap(), u64::from(job.shards_total));
    let grids = view["grids"].as_array().unwrap();
    assert_eq!(grids.len(), 2);
    for grid in grids {
        assert_eq!(grid["written"], true, "{grid}");
        let path = grid["path"].as_str().unwrap();
        let served = reqwest::get(format!("{base}/files/{path}")).await.unwrap().bytes().await.unwrap();
        let stored = s3
            .client()
            .get_object()
            .bucket(seaweed::BUCKET)
            .key(format!("{prefix}/jobs/{}/{path}", job.job_id))
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        assert_eq!(served, stored, "{path}");
    }
    let card = reqwest::get(format!("{base}/files/README.md")).await.unwrap();
    assert_eq!(card.status(), 200);
    assert!(card.text().await.unwrap().starts_with("---"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shares_the_ports_tls_and_its_cookie_is_secure() {
    use common::pki::Ca;
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let ca = Ca::new("ddpm console test CA");
    let ca_pem = ca.write(&tls_dir.join("ca.pem"));
    let cert = ca.issue(&tls_dir, "server", &["localhost", "127.0.0.1"]);
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens);
    let args = [
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir.path()).display()),
        "--output".into(),
        format!("file:{}", dir.path().join("jobs").display()),
        "--tls-cert".into(),
        cert.cert.display().to_string(),
        "--tls-key".into(),
        cert.key.display().to_string(),
        "--auth-token-file".into(),
        tokens.display().to_string(),
        "--console".into(),
    ];
    let client_tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&ca_pem).unwrap()));
    let server = Server::start_tls(dir.path(), &args, &[], client_tls).await;
    let base = server.url.replace("127.0.0.1", "localhost");
    assert!(base.starts_with("https://"), "{base}");
    // An HTTP/1.1 client over TLS (ALPN http/1.1): gRPC clients get h2 on the same port (the health
    // check that Server::start_tls waited for).
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca_pem).unwrap()).unwrap();
    let https = reqwest::Client::builder().add_root_certificate(root.clone()).http1_only().build().unwrap();
    let page = https.get(format!("{base}/console/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.version(), reqwest::Version::HTTP_11);
    // ... and one that offers h2 first, as browsers do, gets it.
    let h2 = reqwest::Client::builder().add_root_certificate(root).build().unwrap();
    let page = h2.get(format!("{base}/console/")).send().await.unwrap();
    assert_eq!((page.status(), page.version()), (reqwest::StatusCode::OK, reqwest::Version::HTTP_2));
    let login = https
        .post(format!("{base}/console/api/login"))
        .header("content-type", "application/json")
        .header("x-ddpm-console", "1")
        .body(serde_json::json!({ "token": ADMIN }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("Secure"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let session =
        https.get(format!("{base}/console/api/session")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(session.status(), 200);
    assert!(session.text().await.unwrap().contains("\"role\":\"admin\""));
    // Plain HTTP to a TLS port gets nothing.
    let plain = reqwest::get(base.replace("https://", "http://") + "/console/").await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // A token taken out of the file stops working at once, cookie or not.
    std::fs::write(&tokens, format!("{READ} read viewer\n")).unwrap();
    let start = Instant::now();
    loop {
        let status = https
            .get(format!("{base}/console/api/session"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .status();
        if status == 401 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the removed token still works: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads an event stream until it ends; returns the names of its events.
async fn event_names(mut response: reqwest::Response) -> Vec<String> {
    let mut text = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.lines().filter_map(|l| l.strip_prefix("event: ")).map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_open_streams_and_the_server_drains_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--console", "--grace-seconds", "30"]).await;
    let mut grpc = server.client().await;
    let job = grpc.submit_job(request(2, pb::Scheduler::Ddim, 2, 2)).await.unwrap().into_inner().job.unwrap();
    common::service::wait_for(&mut grpc, &job.job_id, |j| j.state == pb::JobState::Succeeded as i32).await;
    // Twenty browsers on the job list: open streams must not hold the drain until its deadline.
    let http = reqwest::Client::new();
    let mut streams = Vec::new();
    for _ in 0..20 {
        let response = http.get(format!("{}/console/api/jobs/events", server.url)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        streams.push(tokio::spawn(event_names(response)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    common::service::signal(server.pid(), "TERM");
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "the drain took {:?}", start.elapsed());
    for stream in streams {
        let names = tokio::time::timeout(Duration::from_secs(5), stream).await.unwrap().unwrap();
        assert_eq!(names.first().map(String::as_str), Some("snapshot"), "{names:?}");
        assert_eq!(names.last().map(String::as_str), Some("draining"), "{names:?}");
    }
}
