//! The batch service on S3-compatible storage (a real SeaweedFS started by the tests): models and
//! outputs in a bucket, and outages of the store.

mod common;

use std::time::Duration;

use common::service::{Server, SpecMut, error_of, request, tiny_model, wait_for};
use ddpm_worker::api::pb;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const FAILED: i32 = pb::JobState::Failed as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_outputs_live_on_s3() {
    use common::seaweed::{self, SeaweedFs};
    let s3 = SeaweedFs::shared().await;
    let client = s3.client();
    let prefix = seaweed::unique_prefix("service");
    // The tiny model, uploaded as a diffusers folder.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    seaweed::upload(&client, &model, &format!("{prefix}/models/tiny")).await;
    let args = [
        "--model".to_string(),
        format!("tiny=s3://{}/{prefix}/models/tiny", seaweed::BUCKET),
        "--model-cache".into(),
        dir.path().join("cache").display().to_string(),
        "--output".into(),
        format!("s3://{}/{prefix}/jobs", seaweed::BUCKET),
        "--s3-path-style".into(),
        "--allow-output".into(),
        format!("s3://{}/{prefix}/shared", seaweed::BUCKET),
    ];
    let env = seaweed::aws_env(s3.endpoint());
    let server = Server::start_with(&dir.path().join("data"), &args, &env).await;
    let mut grpc = server.client().await;
    let mut req = request(5, pb::Scheduler::Ddim, 4, 2);
    req.s().grid = Some(pb::GridSpec { samples_per_grid: 2, columns: 2 });
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
    let local = dir.path().join("job");
    seaweed::download(&client, &format!("{prefix}/jobs/{}", job.job_id), &local).await;
    for png in common::service::check_job_folder(&local).await {
        image::load_from_memory(&png).unwrap();
    }
    // Grids of 2: [0,2) and [2,4) lie in one shard each, [4,5) too; every grid is there.
    assert_eq!(m["grids"].as_array().unwrap().len(), 3);

    // The Python client extends a Parquet job on S3 and opens both as datasets through s3fs.
    let mut parquet = req.clone();
    parquet.s().output =
        Some(pb::OutputSpec { format: pb::OutputFormat::Parquet as i32, ..Default::default() });
    let job = grpc.submit_job(parquet).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut grpc, &job.job_id, |j| j.state == SUCCEEDED).await;
    let aws: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::python("clients/python/tests/check_client.py", &["s3", &server.url, "--job", &job.job_id], &aws);

    // A job may pick a prefix under the default output, and a destination within an allowed one.
    req.s().output = Some(pb::OutputSpec { prefix: "custom".into(), ..Default::default() });
    let job = grpc.submit_job(req.clone()).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut grpc, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!(
        done.manifest_uri,
        format!("s3://{}/{prefix}/jobs/custom/{}/manifest.json", seaweed::BUCKET, job.job_id)
    );
    let destination = format!("s3://{}/{prefix}/shared/team", seaweed::BUCKET);
    req.s().output = Some(pb::OutputSpec { destination, ..Default::default() });
    let job = grpc.submit_job(req).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut grpc, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!(
        done.manifest_uri,
        format!("s3://{}/{prefix}/shared/team/{}/manifest.json", seaweed::BUCKET, job.job_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_postpones_shards_and_the_job_still_succeeds() {
    use common::outage::Proxy;
    use common::seaweed::{self, SeaweedFs};
    let s3 = SeaweedFs::shared().await;
    let target = s3.endpoint().trim_start_matches("http://").parse().unwrap();
    let mut proxy = Proxy::start(target).await;
    let prefix = seaweed::unique_prefix("outage");
    let dir = tempfile::tempdir().unwrap();
    // A single attempt per shard: the outage must spend none of it.
    let args = [
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir.path()).display()),
        "--output".into(),
        format!("s3://{}/{prefix}/jobs", seaweed::BUCKET),
        "--s3-path-style".into(),
        "--batches-per-shard".into(),
        "1".into(),
        "--max-attempts".into(),
        "1".into(),
    ];
    let env = seaweed::aws_env(format!("http://{}", proxy.addr()));
    let server = Server::start_with(dir.path(), &args, &env).await;
    let mut grpc = server.client().await;
    let job =
        grpc.submit_job(request(24, pb::Scheduler::Ddpm, 100, 2)).await.unwrap().into_inner().job.unwrap();
    let before = wait_for(&mut grpc, &job.job_id, |j| j.shards_done >= 2).await;
    assert!(before.shards_done < 12, "the job finished before the outage: make it longer");
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = common::service::get_job(&mut grpc, &job.job_id).await;
    assert_ne!(during.state, FAILED, "the outage failed the job: {}", error_of(&during));
    proxy.restore();
    let done = wait_for(&mut grpc, &job.job_id, |j| j.state == SUCCEEDED || j.state == FAILED).await;
    assert_eq!(done.state, SUCCEEDED, "{}", error_of(&done));

    // Every listed object is there with its SHA-256, and nothing else is under the job's folder.
    let local = dir.path().join("job");
    seaweed::download(&s3.client(), &format!("{prefix}/jobs/{}", job.job_id), &local).await;
    assert_eq!(common::service::check_job_folder(&local).await.len(), 24);
}
