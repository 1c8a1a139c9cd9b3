//! `S3Store` against a real S3 server (SeaweedFS, see `common::seaweed`): round trips with their
//! checksums, missing objects, multipart uploads, prefixes, and failures that must be errors.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::interceptors::BeforeSerializationInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Credentials, Intercept};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::operation::upload_part::UploadPartInput;
use aws_sdk_s3::types::ChecksumMode;
use aws_smithy_types::base64;
use bytes::Bytes;
use common::seaweed::{BUCKET, SeaweedFs, unique_prefix};
use ddpm_worker::digest::sha256_hex;
use ddpm_worker::storage::s3::{MIN_PART_SIZE, S3Store};
use ddpm_worker::storage::{ObjectStore, StorageError};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sha2::{Digest, Sha256};

fn store(server: &SeaweedFs, prefix: &str) -> S3Store {
    S3Store::from_client(server.client(), BUCKET.into(), prefix.into()).unwrap()
}

/// Deterministic bytes that do not compress or repeat (xorshift64).
fn noise(len: usize, mut state: u64) -> Bytes {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// This test binary's metrics, recorded globally (the store records through the `metrics` macros).
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("installing the recorder"))
}

#[tokio::test]
async fn put_then_get_round_trips_with_its_sha256_and_uri() {
    let server = SeaweedFs::shared().await;
    let prefix = unique_prefix("round-trip");
    let store = store(&server, &prefix);
    let bytes = Bytes::from_static(br#"{"job":"1","samples":8}"#);

    let out = store.put("jobs/1/manifest.json", bytes.clone(), "application/json").await.unwrap();
    assert_eq!(out.sha256, sha256_hex(&bytes));
    assert_eq!(out.uri, format!("s3://{BUCKET}/{prefix}/jobs/1/manifest.json"));
    assert_eq!(store.get("jobs/1/manifest.json").await.unwrap(), Some(bytes));

    // The server stored the checksum we sent, and the content type.
    let head = server
        .client()
        .head_object()
        .bucket(BUCKET)
        .key(format!("{prefix}/jobs/1/manifest.json"))
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    let sent = base64::encode(hex::decode(&out.sha256).unwrap());
    assert_eq!(head.checksum_sha256(), Some(sent.as_str()));
    assert_eq!(head.content_type(), Some("application/json"));

    // A second put replaces the object.
    let newer = Bytes::from_static(b"{}");
    store.put("jobs/1/manifest.json", newer.clone(), "application/json").await.unwrap();
    assert_eq!(store.get("jobs/1/manifest.json").await.unwrap(), Some(newer));
}

#[tokio::test]
async fn put_new_creates_once_and_the_first_object_stays() {
    let server = SeaweedFs::shared().await;
    let store = store(&server, &unique_prefix("put-new"));
    let first = store.put_new("s/1.png", Bytes::from_static(b"first"), "image/png").await.unwrap();
    assert_eq!(first.map(|p| p.sha256), Some(sha256_hex(b"first")));
    // If-None-Match: * on an existing key: 412, nothing written.
    assert_eq!(store.put_new("s/1.png", Bytes::from_static(b"second"), "image/png").await.unwrap(), None);
    assert_eq!(store.get("s/1.png").await.unwrap(), Some(Bytes::from_static(b"first")));
    // The same through a multipart upload (the condition goes on CompleteMultipartUpload).
    let parts = store.clone().with_multipart_threshold(MIN_PART_SIZE).with_part_size(MIN_PART_SIZE);
    let big = noise(MIN_PART_SIZE + 10, 5);
    assert!(parts.put_new("s/big.bin", big.clone(), "application/octet-stream").await.unwrap().is_some());
    let other = noise(MIN_PART_SIZE + 10, 6);
    assert_eq!(parts.put_new("s/big.bin", other, "application/octet-stream").await.unwrap(), None);
    assert_eq!(store.get("s/big.bin").await.unwrap(), Some(big));
    // write_once adopts the stored object and reports its digest.
    let adopted =
        ddpm_worker::storage::write_once(&store, "s/1.png", Bytes::from_static(b"third"), "image/png")
            .await
            .unwrap();
    assert!(adopted.adopted);
    assert_eq!(adopted.sha256, sha256_hex(b"first"));
}

#[tokio::test]
async fn missing_objects_are_none_but_a_missing_bucket_is_an_error() {
    let server = SeaweedFs::shared().await;
    let store = store(&server, &unique_prefix("missing"));
    assert_eq!(store.get("nothing/here.png").await.unwrap(), None);

    let no_bucket =
        S3Store::from_client(server.client(), "ddpm-no-such-bucket".into(), String::new()).unwrap();
    match no_bucket.get("a.png").await {
        Err(StorageError::Remote { uri, message }) => {
            assert_eq!(uri, "s3://ddpm-no-such-bucket/a.png");
            assert!(message.contains("NoSuchBucket"), "{message}");
        }
        other => panic!("expected a Remote error, got {other:?}"),
    }
}

#[tokio::test]
async fn large_objects_go_up_in_parts_and_come_back_identical() {
    let server = SeaweedFs::shared().await;
    let prefix = unique_prefix("multipart");
    let store = store(&server, &prefix).with_multipart_threshold(MIN_PART_SIZE).with_part_size(MIN_PART_SIZE);
    let bytes = noise(12 << 20, 0x9e37_79b9_7f4a_7c15);

    let out = store.put("grid.png", bytes.clone(), "image/png").await.unwrap();
    assert_eq!(out.sha256, hex::encode(Sha256::digest(&bytes)));
    assert_eq!(out.uri, format!("s3://{BUCKET}/{prefix}/grid.png"));
    let back = store.get("grid.png").await.unwrap().expect("the object exists");
    assert!(back == bytes, "{} bytes came back for {} sent, or different ones", back.len(), bytes.len());

    // It really was a multipart upload (5 + 5 + 2 MiB), and no upload was left open.
    let client = server.client();
    let head = client.head_object().bucket(BUCKET).key(format!("{prefix}/grid.png")).send().await.unwrap();
    assert!(head.e_tag().is_some_and(|t| t.trim_matches('"').ends_with("-3")), "ETag {:?}", head.e_tag());
    assert_eq!(head.content_type(), Some("image/png"));
    let open = client.list_multipart_uploads().bucket(BUCKET).prefix(&prefix).send().await.unwrap();
    assert!(open.uploads().is_empty(), "{:?}", open.uploads());

    // Below the threshold, the same store sends one PutObject (a plain ETag, no part count).
    store.put("small.png", noise(1000, 7), "image/png").await.unwrap();
    let head = client.head_object().bucket(BUCKET).key(format!("{prefix}/small.png")).send().await.unwrap();
    assert!(head.e_tag().is_some_and(|t| !t.contains('-')), "ETag {:?}", head.e_tag());
}

/// Fails the upload of part 2 as a connection lost for good would, before anything is sent.
#[derive(Debug)]
struct FailPartTwo;

impl Intercept for FailPartTwo {
    fn name(&self) -> &'static str {
        "FailPartTwo"
    }

    fn read_before_execution(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let part = context.input().downcast_ref::<UploadPartInput>().and_then(UploadPartInput::part_number);
        if part == Some(2) { Err("injected failure of part 2".into()) } else { Ok(()) }
    }
}

#[tokio::test]
async fn a_failed_multipart_upload_is_aborted() {
    let server = SeaweedFs::shared().await;
    let prefix = unique_prefix("abort");
    let client = server.client_with(|c| c.interceptor(FailPartTwo));
    let failing = S3Store::from_client(client, BUCKET.into(), prefix.clone())
        .unwrap()
        .with_multipart_threshold(MIN_PART_SIZE)
        .with_part_size(MIN_PART_SIZE);

    match failing.put("big.bin", noise(11 << 20, 3), "application/octet-stream").await {
        Err(StorageError::Remote { uri, message }) => {
            assert_eq!(uri, format!("s3://{BUCKET}/{prefix}/big.bin"));
            assert!(message.contains("UploadPart 2") && message.contains("injected failure"), "{message}");
        }
        other => panic!("expected a Remote error, got {other:?}"),
    }
    // No object, and no upload left open with its parts stored.
    assert_eq!(store(&server, &prefix).get("big.bin").await.unwrap(), None);
    let open = server.client().list_multipart_uploads().bucket(BUCKET).prefix(&prefix).send().await.unwrap();
    assert!(open.uploads().is_empty(), "{:?}", open.uploads());
}

#[tokio::test]
async fn keys_are_joined_with_the_prefix() {
    let server = SeaweedFs::shared().await;
    let prefix = unique_prefix("prefix");
    let nested = store(&server, &format!("/{prefix}/a/b/"));
    let out = nested.put("c.txt", Bytes::from_static(b"nested"), "text/plain").await.unwrap();
    assert_eq!(out.uri, format!("s3://{BUCKET}/{prefix}/a/b/c.txt"));

    // The same object, seen through the bucket root and through a shorter prefix.
    let raw = server.client().get_object().bucket(BUCKET).key(format!("{prefix}/a/b/c.txt")).send().await;
    assert_eq!(raw.unwrap().body.collect().await.unwrap().into_bytes(), Bytes::from_static(b"nested"));
    let root = store(&server, "");
    assert_eq!(root.get(&format!("{prefix}/a/b/c.txt")).await.unwrap(), Some(Bytes::from_static(b"nested")));
    assert_eq!(store(&server, &prefix).get("a/b/c.txt").await.unwrap(), Some(Bytes::from_static(b"nested")));
    // A sibling prefix does not see it.
    assert_eq!(store(&server, &format!("{prefix}/a")).get("c.txt").await.unwrap(), None);
}

#[tokio::test]
async fn wrong_credentials_are_errors() {
    let server = SeaweedFs::shared().await;
    let prefix = unique_prefix("auth");
    let wrong = [
        (
            "SignatureDoesNotMatch",
            Credentials::new(common::seaweed::ACCESS_KEY, "not-the-secret", None, None, "t"),
        ),
        ("InvalidAccessKeyId", Credentials::new("nobody", "not-the-secret", None, None, "t")),
    ];
    for (what, credentials) in wrong {
        let client = server.client_with(|c| c.credentials_provider(credentials));
        let store = S3Store::from_client(client, BUCKET.into(), prefix.clone()).unwrap();
        match store.put("x.json", Bytes::from_static(b"{}"), "application/json").await {
            Err(StorageError::Remote { uri, message }) => {
                assert_eq!(uri, format!("s3://{BUCKET}/{prefix}/x.json"));
                // The S3 error in one line, without a dump of the response.
                assert!(message.starts_with(&format!("PutObject: {what} (HTTP 403)")), "{message}");
                assert!(!message.contains('\n') && message.len() < 400, "{message}");
            }
            other => panic!("{what}: expected a Remote error, got {other:?}"),
        }
        // Not "no such object": the read was refused.
        assert!(
            matches!(store.get("x.json").await, Err(StorageError::Remote { .. })),
            "{what}: get must fail"
        );
    }
    assert_eq!(store(&server, &prefix).get("x.json").await.unwrap(), None, "nothing was written");
}

#[tokio::test]
async fn a_closed_port_fails_quickly_after_its_retries() {
    let handle = metrics();
    // A port that nothing listens on (any more).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::from_static("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .credentials_provider(Credentials::new("k", "s", None, None, "t"))
            .force_path_style(true)
            .retry_config(
                RetryConfig::standard().with_max_attempts(3).with_max_backoff(Duration::from_millis(200)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .operation_timeout(Duration::from_secs(10))
                    .build(),
            )
            .build(),
    );
    let store = S3Store::from_client(client, "bkt".into(), "p".into()).unwrap();

    let started = Instant::now();
    let put = store.put("a.png", Bytes::from_static(b"png"), "image/png").await;
    let get = store.get("a.png").await;
    let elapsed = started.elapsed();
    for result in [put.map(|_| ()), get.map(|_| ())] {
        match result {
            // Unavailable, not Remote: the worker waits an outage out instead of failing the shard.
            Err(StorageError::Unavailable { uri, message }) => {
                assert_eq!(uri, "s3://bkt/p/a.png");
                assert!(message.to_lowercase().contains("connect"), "{message}");
            }
            other => panic!("expected an Unavailable error, got {other:?}"),
        }
    }
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    // The put was tried 3 times: 2 retries, counted, and its duration recorded.
    let text = handle.render();
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("ddpm_upload_retries_total{") && l.contains(r#"operation="PutObject""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(retries >= 2.0, "{text}");
    assert!(text.contains("ddpm_upload_duration_seconds"), "{text}");
}

/// A folder's objects go, more than one listing page of them, with an upload left unfinished under it;
/// a sibling whose name starts the same way, and everything else, stays.
#[tokio::test]
async fn deleting_a_folder_takes_its_objects_and_unfinished_uploads_and_nothing_else() {
    use futures_util::StreamExt;
    let server = SeaweedFs::shared().await;
    let prefix = unique_prefix("delete-folder");
    let store = store(&server, &prefix);
    let keys: Vec<String> = (0..1005).map(|i| format!("jobs/a/samples/{i:08}.png")).collect();
    let put = |key: String| {
        let store = store.clone();
        async move { store.put(&key, Bytes::from_static(b"."), "image/png").await.map(drop) }
    };
    futures_util::stream::iter(keys.into_iter().map(put))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<(), _>>()
        .unwrap();
    for key in ["jobs/ab/z.png", "jobs/b/w.png"] {
        store.put(key, Bytes::from_static(b"kept"), "image/png").await.unwrap();
    }
    let client = server.client();
    let unfinished = client
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(format!("{prefix}/jobs/a/data/000000.tar"))
        .send()
        .await
        .unwrap();
    assert!(unfinished.upload_id().is_some());

    assert_eq!(store.delete_folder("jobs/a").await.unwrap(), 1005);
    let left = client.list_objects_v2().bucket(BUCKET).prefix(format!("{prefix}/")).send().await.unwrap();
    let mut left: Vec<&str> = left.contents().iter().filter_map(|o| o.key()).collect();
    left.sort();
    assert_eq!(left, [format!("{prefix}/jobs/ab/z.png"), format!("{prefix}/jobs/b/w.png")]);
    let uploads = client
        .list_multipart_uploads()
        .bucket(BUCKET)
        .prefix(format!("{prefix}/jobs/a/"))
        .send()
        .await
        .unwrap();
    assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
    assert_eq!(store.delete_folder("jobs/a").await.unwrap(), 0, "a folder already gone");
}
