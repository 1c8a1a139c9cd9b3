//! Job outputs as datasets: every layout opened by the readers people train with (the pinned
//! `webdataset`, `datasets` and `pyarrow` of the project venv), on a local directory and on S3, and
//! kept exactly-once through kill -9.

mod common;

use std::time::{Duration, Instant};

use common::service::{
    Server, SpecMut, check_job_folder, job_folder, request, run_readers, tiny_model, wait_for,
};
use ddpm_worker::api::pb;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;

/// A 40-sample job in `format`: data files of 12 samples (64 KiB of 16×16 images, in whole batches
/// of 4), grids of 8 that straddle shards, so parts, shard edges and grid reads are all exercised.
fn dataset_request(format: pb::OutputFormat, image: pb::ImageFormat) -> pb::SubmitJobRequest {
    let mut req = request(40, pb::Scheduler::Ddim, 3, 4);
    req.s().grid = Some(pb::GridSpec { samples_per_grid: 8, columns: 4 });
    req.s().output = Some(pb::OutputSpec {
        format: format as i32,
        image_format: image as i32,
        target_file_bytes: if format == pb::OutputFormat::Files { 0 } else { 64 << 10 },
        ..Default::default()
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layout_opens_in_the_readers_people_train_with() {
    let dir = tempfile::tempdir().unwrap();
    // Two shards of 20 samples: each writes a part of 12 and one of 8.
    let server = Server::start(dir.path(), &["--max-shards-per-job", "2"]).await;
    let mut client = server.client().await;
    let mut folders = Vec::new();
    for (format, image) in [
        (pb::OutputFormat::Files, pb::ImageFormat::Png),
        (pb::OutputFormat::Webdataset, pb::ImageFormat::Png),
        (pb::OutputFormat::Parquet, pb::ImageFormat::Png),
        (pb::OutputFormat::Webdataset, pb::ImageFormat::Webp),
        (pb::OutputFormat::Parquet, pb::ImageFormat::Jpeg),
    ] {
        let job = client.submit_job(dataset_request(format, image)).await.unwrap().into_inner().job.unwrap();
        assert_eq!(job.shards_total, 2, "{format:?}");
        let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
        assert_eq!(done.grid_uris.len(), 5);
        folders.push((format, image, job_folder(&done)));
    }
    let reference = folders[0].2.clone();
    let reference_samples = check_job_folder(&reference).await;
    for (format, image, folder) in &folders {
        let samples = check_job_folder(folder).await;
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
        if *format != pb::OutputFormat::Files {
            let paths: Vec<&str> =
                m["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
            let ext = if *format == pb::OutputFormat::Webdataset { "tar" } else { "parquet" };
            let want: Vec<String> = ["000000-000", "000000-001", "000001-000", "000001-001"]
                .iter()
                .map(|p| format!("data/{p}.{ext}"))
                .collect();
            assert_eq!(paths, want, "{format:?}");
        }
        // PNG bytes are the same whatever the layout; lossless WebP decodes to the same pixels.
        if *image == pb::ImageFormat::Png {
            assert_eq!(samples, reference_samples, "{format:?}: PNG bytes differ from the files layout's");
        }
        let lossless = *image != pb::ImageFormat::Jpeg;
        let summary = run_readers(folder, lossless.then_some(reference.as_path()));
        assert_eq!(summary["index_rows"], 40, "{summary}");
        match format {
            pb::OutputFormat::Webdataset => {
                assert_eq!(
                    (summary["webdataset_samples"].as_u64(), summary["datasets_rows"].as_u64()),
                    (Some(40), Some(40))
                );
            }
            pb::OutputFormat::Parquet => assert_eq!(summary["datasets_rows"], 40),
            _ => {}
        }
        if lossless {
            assert_eq!(summary["pixels_equal_reference"], 40, "{summary}");
        }
    }
    // The grids are the same pictures whatever the layout (PNG samples).
    for (_, image, folder) in &folders[1..3] {
        assert_eq!(*image, pb::ImageFormat::Png);
        for n in 0..5 {
            let grid = format!("grids/{n:05}.png");
            assert_eq!(
                std::fs::read(folder.join(&grid)).unwrap(),
                std::fs::read(reference.join(&grid)).unwrap()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_layout_requests_name_their_field() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    let mut req = dataset_request(pb::OutputFormat::Files, pb::ImageFormat::Png);
    req.s().output = Some(pb::OutputSpec {
        format: 9,
        image_format: pb::ImageFormat::Webp as i32,
        jpeg_quality: 101,
        png_level: 3,
        target_file_bytes: 1,
        ..Default::default()
    });
    let status = client.submit_job(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    for field in [
        "spec.output.format",
        "spec.output.jpeg_quality",
        "spec.output.png_level",
        "spec.output.target_file_bytes",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} not named in {fields:?}");
    }
}

/// Kills the server (kill -9) once some but not all of a job's shards are recorded, restarts it on the
/// same queue and folder, and checks the finished job: each sample once in the index and in the data,
/// every SHA-256 true, nothing left over (abandoned spool files are swept).
async fn survives_kill_9(format: pb::OutputFormat) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-shards-per-job", "4", "--cpu-threads", "1", "--lease-seconds", "2"];
    let mut server = Server::start(dir.path(), &args).await;
    let mut client = server.client().await;
    let mut req = dataset_request(format, pb::ImageFormat::Png);
    req.s().num_samples = 96;
    req.s().sampling = Some(pb::SamplingSpec { scheduler: pb::Scheduler::Ddim as i32, steps: 40, eta: None });
    let job = client.submit_job(req).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.shards_total, 4);
    let records = dir.path().join("jobs").join(&job.job_id).join("shards");
    let deadline = Instant::now() + Duration::from_secs(240);
    while std::fs::read_dir(&records).map(|d| d.count()).unwrap_or(0) < 1 {
        assert!(Instant::now() < deadline, "no shard was recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let partial = common::service::get_job(&mut client, &job.job_id).await;
    assert!(partial.shards_done < 4, "the job finished before the kill: make it longer");
    server.kill9();

    let server = Server::start(dir.path(), &args).await;
    let mut client = server.client().await;
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    let folder = job_folder(&done);
    assert_eq!(check_job_folder(&folder).await.len(), 96);
    run_readers(&folder, None);
    // The killed process's spool and staging files go once they are a few seconds old.
    let staging = dir.path().join("jobs").join(".ddpm-staging");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<_> =
            std::fs::read_dir(&staging).map(|d| d.filter_map(Result::ok).collect()).unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "files abandoned by the killed writer are still there: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webdataset_job_survives_kill_9() {
    survives_kill_9(pb::OutputFormat::Webdataset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_job_survives_kill_9() {
    survives_kill_9(pb::OutputFormat::Parquet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_job_survives_kill_9() {
    survives_kill_9(pb::OutputFormat::Files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webdataset_and_parquet_jobs_on_s3_open_in_the_readers() {
    use common::seaweed::{self, SeaweedFs};
    let s3 = SeaweedFs::shared().await;
    let prefix = seaweed::unique_prefix("datasets");
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir.path()).display()),
        "--output".into(),
        format!("s3://{}/{prefix}/jobs", seaweed::BUCKET),
        "--s3-path-style".into(),
        "--max-shards-per-job".into(),
        "2".into(),
        "--scratch-dir".into(),
        dir.path().join("scratch").display().to_string(),
    ];
    let env = seaweed::aws_env(s3.endpoint());
    let server = Server::start_with(&dir.path().join("data"), &args, &env).await;
    let mut client = server.client().await;
    let mut local = Vec::new();
    for format in [pb::OutputFormat::Files, pb::OutputFormat::Webdataset, pb::OutputFormat::Parquet] {
        let job = client
            .submit_job(dataset_request(format, pb::ImageFormat::Png))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
        let folder = dir.path().join(format!("{format:?}"));
        seaweed::download(&s3.client(), &format!("{prefix}/jobs/{}", job.job_id), &folder).await;
        local.push(folder);
    }
    let reference = check_job_folder(&local[0]).await;
    for folder in &local {
        assert_eq!(check_job_folder(folder).await, reference, "{}", folder.display());
        let summary = run_readers(folder, Some(local[0].as_path()));
        assert_eq!(summary["pixels_equal_reference"], 40, "{summary}");
    }
    // Parts were spooled in the scratch folder and nothing is left there.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("scratch"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// A class-conditional model's job (the parity fixtures' `tiny-class-table`: 4 named classes and a null
/// class, 8×8 gray) in every layout: each sample's label is where that layout's readers look for it
/// (checked by the readers' script), the same labels and pixels whatever the layout, guidance on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_jobs_carry_their_labels_in_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("models/tiny-class-table");
    let args = [
        "--model".to_string(),
        format!("shapes={}", model.display()),
        "--output".into(),
        format!("file:{}", dir.path().join("jobs").display()),
        "--max-shards-per-job".into(),
        "2".into(),
    ];
    let server = Server::start_with(dir.path(), &args, &[]).await;
    let mut client = server.client().await;
    let shown = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let m = &shown.models[0];
    assert_eq!((m.num_classes, m.null_class), (5, Some(4)));
    assert_eq!(m.class_names, ["circle", "square", "triangle", "star"]);
    let mut folders = Vec::new();
    for format in [pb::OutputFormat::Files, pb::OutputFormat::Webdataset, pb::OutputFormat::Parquet] {
        let mut req = dataset_request(format, pb::ImageFormat::Png);
        req.s().model = "shapes".into();
        req.s().num_samples = 22;
        // Class 3 first in the request, class 0 last: the labels follow class order, not the request's.
        req.s().classes = Some(pb::ClassSpec {
            counts: [(3, 5), (1, 9), (0, 8)].into_iter().collect(),
            guidance_scale: Some(2.5),
            ..Default::default()
        });
        let job = client.submit_job(req).await.unwrap().into_inner().job.unwrap();
        let spec = job.spec.as_ref().unwrap().classes.clone().unwrap();
        assert_eq!((spec.guidance_scale, spec.null_class), (Some(2.5), Some(4)), "resolved from labels.json");
        let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
        folders.push((format, job_folder(&done)));
    }
    let reference = folders[0].1.clone();
    let reference_samples = check_job_folder(&reference).await;
    for (format, folder) in &folders {
        assert_eq!(check_job_folder(folder).await, reference_samples, "{format:?}: PNG bytes");
        let summary = run_readers(folder, Some(&reference));
        let want = serde_json::json!({"0": 8, "1": 9, "3": 5});
        assert_eq!(summary["labelled"], want, "{format:?}: {summary}");
        assert_eq!(summary["pixels_equal_reference"], 22, "{summary}");
        match format {
            pb::OutputFormat::Parquet => {
                let names = serde_json::json!(["circle", "square", "triangle", "star"]);
                assert_eq!(summary["class_label_names"], names);
            }
            // torchvision's ImageFolder (pinned with the readers) finds every sample in its class's folder.
            pb::OutputFormat::Files => assert_eq!(summary["imagefolder"], 22, "{summary}"),
            _ => {}
        }
        // Grids of 8 consecutive samples give each class its own rows (of 4): grid 2 is samples 16..22,
        // the last square (a row of its own), then five stars (two rows).
        let grid = image::open(folder.join("grids/00002.png")).unwrap();
        assert_eq!((grid.width(), grid.height()), (4 * 8, 3 * 8), "{format:?}: grid 2");
    }
    // Labels the model does not have, guidance without a null class, or labels for an unconditional
    // model are refused with their field named.
    use tonic_types::StatusExt;
    let bad = |classes: pb::ClassSpec, model: &str| {
        let mut req = dataset_request(pb::OutputFormat::Files, pb::ImageFormat::Png);
        req.s().model = model.into();
        req.s().num_samples = 10;
        req.s().classes = Some(classes);
        req
    };
    for (req, field) in [
        (
            bad(pb::ClassSpec { counts: [(5, 10)].into_iter().collect(), ..Default::default() }, "shapes"),
            "spec.classes.counts",
        ),
        (
            bad(pb::ClassSpec { counts: [(1, 9)].into_iter().collect(), ..Default::default() }, "shapes"),
            "spec.classes.counts",
        ),
        (
            bad(pb::ClassSpec { guidance_scale: Some(f32::NAN), ..Default::default() }, "shapes"),
            "spec.classes.guidance_scale",
        ),
        (
            bad(pb::ClassSpec { names: vec!["../up".into()], ..Default::default() }, "shapes"),
            "spec.classes.names",
        ),
        (bad(pb::ClassSpec { uniform: true, ..Default::default() }, "nope"), "spec.model"),
    ] {
        let status = client.submit_job(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        let fields: Vec<String> =
            status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
        assert!(fields.iter().any(|f| f == field), "{field} not named in {fields:?}");
    }
}
