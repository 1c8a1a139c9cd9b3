//! S3-compatible object storage (AWS S3, Ceph RGW, SeaweedFS, MinIO, ...) through aws-sdk-s3.
//!
//! Every request body carries a SHA-256 computed here (`x-amz-checksum-sha256`), so the server
//! verifies what it stores and rejects a corrupted upload. Computing it ourselves rather than asking
//! the SDK for it also keeps bodies as plain in-memory payloads: no `aws-chunked` trailer encoding,
//! which several S3 clones reject, and no reliance on `checksum_algorithm`, which the SDK silently
//! drops when `RequestChecksumCalculation::WhenRequired` is configured.
//!
//! Large objects go up as a multipart upload. S3 makes such an object visible only when the upload
//! is completed, so `put` stays whole or nothing either way.
//!
//! `put_new` sends `If-None-Match: *` (on PutObject, or on CompleteMultipartUpload): S3 answers 412 when
//! the key exists and writes nothing. Servers that ignore the header (Garage 2.5, reference
//! s3-compatible.md §3.3) overwrite instead; on those a lease-less writer is not fenced out.
//!
//! Failures are told apart: a store out of reach or overloaded (no connection, timeouts, 5xx, 429) is
//! [`StorageError::Unavailable`], which the worker waits out without spending a shard's attempts.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Intercept, Region, RuntimeComponents};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, Metadata};
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_types::base64;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::{ObjectStore, PutOutcome, StorageError, check_key, join_key};

/// The smallest part S3 accepts in a multipart upload (every part but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Objects of at least this many bytes are uploaded in parts by default.
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 16 << 20;
/// The default size of each part of a multipart upload.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// S3 refuses uploads of more parts than this; bigger objects get bigger parts.
const MAX_PARTS: usize = 10_000;
/// Parts in flight at once: enough to fill a link without holding the whole object in many requests.
const PART_CONCURRENCY: usize = 4;
/// Hashing more than this inline would stall the async runtime's thread noticeably.
const INLINE_HASH_LIMIT: usize = 1 << 20;
/// Used when neither the environment nor a profile names a region: S3-compatible servers rarely
/// care, but SigV4 signing needs one.
const DEFAULT_REGION: &str = "us-east-1";

/// How [`S3Store::connect_with`] sets up its client on top of the standard AWS configuration chain.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Address buckets as `endpoint/bucket/key` instead of `bucket.endpoint/key`: needed by most
    /// self-hosted servers (Ceph RGW, SeaweedFS, MinIO).
    pub path_style: bool,
    /// Attempts per request, first one included, with the SDK's standard retry mode (exponential
    /// backoff with jitter). This overrides `AWS_MAX_ATTEMPTS` and profile settings.
    pub max_attempts: u32,
    /// Limit on establishing a connection; `None` keeps the SDK's default.
    pub connect_timeout: Option<Duration>,
    /// Limit on one attempt of one request (not on a whole `put` with its retries); `None` keeps the
    /// SDK's default (none: a stalled transfer is caught by its stalled-stream protection instead).
    pub attempt_timeout: Option<Duration>,
}

impl Default for S3Options {
    fn default() -> Self {
        Self { path_style: false, max_attempts: 5, connect_timeout: None, attempt_timeout: None }
    }
}

/// A bucket, or a prefix inside one, as an [`ObjectStore`].
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    multipart_threshold: usize,
    part_size: usize,
}

impl S3Store {
    /// A store on `bucket` under `prefix`, with credentials, region and endpoint from the standard
    /// AWS chain (`AWS_*` environment variables, profiles, web identity, IMDS, ...) and the default
    /// [`S3Options`] except for `path_style`.
    pub async fn connect(bucket: String, prefix: String, path_style: bool) -> Result<Self, StorageError> {
        Self::connect_with(bucket, prefix, &S3Options { path_style, ..S3Options::default() }).await
    }

    /// Like [`S3Store::connect`], with every option given.
    pub async fn connect_with(
        bucket: String,
        prefix: String,
        options: &S3Options,
    ) -> Result<Self, StorageError> {
        let region = RegionProviderChain::default_provider().or_else(Region::from_static(DEFAULT_REGION));
        let sdk = aws_config::defaults(BehaviorVersion::latest()).region(region).load().await;
        Self::from_sdk_config(&sdk, bucket, prefix, options)
    }

    /// A store whose client is built from an already loaded AWS configuration and `options`.
    pub fn from_sdk_config(
        sdk: &aws_config::SdkConfig,
        bucket: String,
        prefix: String,
        options: &S3Options,
    ) -> Result<Self, StorageError> {
        let mut config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(options.path_style)
            .retry_config(RetryConfig::standard().with_max_attempts(options.max_attempts.max(1)));
        if sdk.region().is_none() {
            config = config.region(Region::from_static(DEFAULT_REGION));
        }
        // Fields left unset keep the values loaded into `sdk` (the builder merges timeout configs);
        // `set_*(None)` would disable them instead.
        let mut timeouts = TimeoutConfig::builder();
        if let Some(limit) = options.connect_timeout {
            timeouts = timeouts.connect_timeout(limit);
        }
        if let Some(limit) = options.attempt_timeout {
            timeouts = timeouts.operation_attempt_timeout(limit);
        }
        config = config.timeout_config(timeouts.build());
        Self::from_client(Client::from_conf(config.build()), bucket, prefix)
    }

    /// A store using `client` as it is configured (endpoint, credentials, retries, ...).
    pub fn from_client(client: Client, bucket: String, prefix: String) -> Result<Self, StorageError> {
        if bucket.is_empty() {
            return Err(StorageError::InvalidDestination(format!("s3://{bucket}/{prefix}")));
        }
        Ok(Self {
            client,
            bucket,
            prefix: prefix.trim_matches('/').to_string(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
        })
    }

    /// Objects of at least `bytes` bytes are uploaded in parts (default 16 MiB).
    pub fn with_multipart_threshold(mut self, bytes: usize) -> Self {
        self.multipart_threshold = bytes;
        self
    }

    /// The size of each part of a multipart upload (default 8 MiB), raised to S3's minimum of 5 MiB
    /// and, for huge objects, to what keeps the upload within 10,000 parts.
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(MIN_PART_SIZE);
        self
    }

    /// The client the store sends its requests with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The prefix joined before every key, without leading or trailing `/` (possibly empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn remote(&self, key: &str, message: String) -> StorageError {
        StorageError::Remote { uri: self.uri(key), message }
    }

    /// GetObject of `key`: a byte range of it, or the whole object, verified against its stored
    /// checksum when the server returns one (a range has none). `None` when there is no object.
    async fn get_object(&self, key: &str, range: Option<String>) -> Result<Option<ByteStream>, StorageError> {
        check_key(key)?;
        let request = self.client.get_object().bucket(&self.bucket).key(join_key(&self.prefix, key));
        let request = match range {
            Some(range) => request.range(range),
            None => request.checksum_mode(ChecksumMode::Enabled),
        };
        match request.send().await {
            Ok(object) => Ok(Some(object.body)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Failure::of("GetObject", &e).into_error(self.uri(key))),
        }
    }

    /// A body cut off mid-transfer is the network's doing: worth another try later.
    fn body_error(&self, key: &str, e: impl std::error::Error) -> StorageError {
        StorageError::Unavailable {
            uri: self.uri(key),
            message: format!("GetObject: reading the body: {}", DisplayErrorContext(&e)),
        }
    }

    async fn put_single(
        &self,
        object_key: &str,
        bytes: Bytes,
        content_type: &str,
        sha256: &[u8],
        only_new: bool,
    ) -> Result<(), Failure> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(object_key)
            .content_type(content_type)
            .checksum_sha256(base64::encode(sha256))
            .set_if_none_match(only_new.then(|| "*".to_string()))
            .body(ByteStream::from(bytes))
            .customize()
            .interceptor(CountRetries)
            .send()
            .await
            .map_err(|e| Failure::of("PutObject", &e))?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        object_key: &str,
        parts: Vec<PartSource>,
        content_type: &str,
        only_new: bool,
    ) -> Result<(), Failure> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .customize()
            .interceptor(CountRetries)
            .send()
            .await
            .map_err(|e| Failure::of("CreateMultipartUpload", &e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| Failure::other("CreateMultipartUpload: the response has no UploadId".into()))?;

        let result = self.upload_parts_and_complete(object_key, upload_id, parts, only_new).await;
        if result.is_err() {
            // Parts of an unfinished upload are stored (and billed) until aborted. A failed
            // completion is aborted too: if it did complete after all, the abort only fails.
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(object_key)
                .upload_id(upload_id)
                .send()
                .await;
            if let Err(e) = abort {
                tracing::warn!(bucket = %self.bucket, key = object_key, upload_id,
                    "aborting a failed multipart upload failed: {}", describe("AbortMultipartUpload", &e));
            }
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        object_key: &str,
        upload_id: &str,
        parts: Vec<PartSource>,
        only_new: bool,
    ) -> Result<(), Failure> {
        let uploads = parts.into_iter().map(|part| async move {
            let part = part.load().await?;
            let checksum = base64::encode(part.sha256);
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(object_key)
                .upload_id(upload_id)
                .part_number(part.number)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(part.bytes))
                .customize()
                .interceptor(CountRetries)
                .send()
                .await
                .map_err(|e| Failure::of(&format!("UploadPart {}", part.number), &e))?;
            Ok::<_, Failure>(
                CompletedPart::builder()
                    .part_number(part.number)
                    .set_e_tag(uploaded.e_tag)
                    .checksum_sha256(uploaded.checksum_sha256.unwrap_or(checksum))
                    .build(),
            )
        });
        // `buffered` keeps the parts in order, as CompleteMultipartUpload requires.
        let completed: Vec<CompletedPart> =
            futures_util::stream::iter(uploads).buffered(PART_CONCURRENCY).try_collect().await?;

        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build())
            .set_if_none_match(only_new.then(|| "*".to_string()))
            .customize()
            .interceptor(CountRetries)
            .send()
            .await
            .map_err(|e| Failure::of("CompleteMultipartUpload", &e))?;
        Ok(())
    }

    /// Hashes and uploads an object; with `only_new`, `Ok(false)` when an object was at the key.
    async fn write(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
        only_new: bool,
    ) -> Result<Option<PutOutcome>, StorageError> {
        check_key(key)?;
        let object_key = join_key(&self.prefix, key);
        let started = Instant::now();

        // An upload needs at least one part, so an empty object always goes up whole.
        let multipart = !bytes.is_empty() && bytes.len() >= self.multipart_threshold;
        let part_size = multipart.then(|| self.part_size_for(bytes.len()));
        let (sha256, parts) = if bytes.len() <= INLINE_HASH_LIMIT {
            hash(&bytes, part_size)
        } else {
            let to_hash = bytes.clone();
            tokio::task::spawn_blocking(move || hash(&to_hash, part_size))
                .await
                .map_err(|e| self.remote(key, format!("hashing the object: {e}")))?
        };
        let result = match part_size {
            None => self.put_single(&object_key, bytes, content_type, &sha256, only_new).await,
            Some(_) => {
                let parts = parts.into_iter().map(PartSource::Ready).collect();
                self.put_multipart(&object_key, parts, content_type, only_new).await
            }
        };
        self.outcome(key, sha256, started, result, only_new)
    }

    /// Records an upload's duration and turns its result into `put_new`'s answer.
    fn outcome(
        &self,
        key: &str,
        sha256: [u8; 32],
        started: Instant,
        result: Result<(), Failure>,
        only_new: bool,
    ) -> Result<Option<PutOutcome>, StorageError> {
        let outcome = match &result {
            Ok(()) => "ok",
            Err(f) if f.class == Class::Exists => "exists",
            Err(_) => "error",
        };
        metrics::histogram!("ddpm_upload_duration_seconds", "backend" => "s3", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => Ok(Some(PutOutcome { uri: self.uri(key), sha256: hex::encode(sha256) })),
            // A conditional write lost to an existing object (or a concurrent one, HTTP 409: S3 asks
            // for a retry, and the retry would find the winner's object).
            Err(f) if only_new && matches!(f.class, Class::Exists | Class::Conflict) => Ok(None),
            Err(f) => Err(f.into_error(self.uri(key))),
        }
    }

    /// The part size for an object of `len` bytes.
    fn part_size_for(&self, len: usize) -> usize {
        self.part_size.max(len.div_ceil(MAX_PARTS))
    }
}

/// A part to upload: in memory, or a piece of a file read (and hashed) just before it goes up, so at
/// most [`PART_CONCURRENCY`] parts of a file are in memory at once.
enum PartSource {
    Ready(Part),
    File { number: i32, path: std::path::PathBuf, offset: u64, len: usize },
}

impl PartSource {
    async fn load(self) -> Result<Part, Failure> {
        match self {
            PartSource::Ready(part) => Ok(part),
            PartSource::File { number, path, offset, len } => {
                let shown = path.display().to_string();
                tokio::task::spawn_blocking(move || {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut buf = vec![0u8; len];
                    let mut file = std::fs::File::open(&path)?;
                    file.seek(SeekFrom::Start(offset))?;
                    file.read_exact(&mut buf)?;
                    Ok::<_, std::io::Error>(Part {
                        number,
                        sha256: Sha256::digest(&buf).into(),
                        bytes: buf.into(),
                    })
                })
                .await
                .map_err(|e| Failure::other(format!("reading part {number}: {e}")))?
                .map_err(|e| Failure::other(format!("reading part {number} of {shown}: {e}")))
            }
        }
    }
}

/// One part of a multipart upload (numbered from 1, as S3 does).
struct Part {
    number: i32,
    bytes: Bytes,
    sha256: [u8; 32],
}

/// The SHA-256 of the whole object and, when it goes up in parts of `part_size`, its parts.
fn hash(bytes: &Bytes, part_size: Option<usize>) -> ([u8; 32], Vec<Part>) {
    let whole = Sha256::digest(bytes).into();
    let parts = match part_size {
        None => Vec::new(),
        Some(size) => (0..bytes.len())
            .step_by(size)
            .zip(1..)
            .map(|(start, number)| {
                let part = bytes.slice(start..bytes.len().min(start + size));
                Part { number, sha256: Sha256::digest(&part).into(), bytes: part }
            })
            .collect(),
    };
    (whole, parts)
}

/// A one-line account of a failed request. A service error becomes its S3 code, HTTP status,
/// message and request id; `DisplayErrorContext` would add a dump of the whole raw response. Other
/// failures (connection, timeout, ...) keep `DisplayErrorContext`'s full chain of causes, whose
/// debug part names, e.g., the address that refused the connection.
fn describe<E>(operation: &str, err: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let SdkError::ServiceError(service) = err else {
        return format!("{operation}: {}", DisplayErrorContext(err));
    };
    let error = service.err();
    let mut text = format!(
        "{operation}: {} (HTTP {})",
        error.code().unwrap_or("error without an S3 code"),
        service.raw().status().as_u16()
    );
    if let Some(message) = error.message() {
        text.push_str(": ");
        text.push_str(message);
    }
    if let Some(id) = err.request_id() {
        text.push_str(&format!(" [request id {id}]"));
    }
    text
}

/// What kind of failure a request ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// 412: a conditional write found an object at the key.
    Exists,
    /// 409: a concurrent conditional write is in progress.
    Conflict,
    /// No answer, or the server is failing or throttling (5xx, 429): try again later.
    Unavailable,
    Other,
}

/// A failed request: its one-line account and class.
#[derive(Debug)]
struct Failure {
    message: String,
    class: Class,
}

impl Failure {
    fn of<E>(operation: &str, err: &SdkError<E, HttpResponse>) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
    {
        let class = match err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                Class::Unavailable
            }
            SdkError::ServiceError(service) => match service.raw().status().as_u16() {
                412 => Class::Exists,
                409 => Class::Conflict,
                429 | 500..=599 => Class::Unavailable,
                _ if matches!(service.err().code(), Some("SlowDown" | "Throttling" | "RequestTimeout")) => {
                    Class::Unavailable
                }
                _ => Class::Other,
            },
            _ => Class::Other,
        };
        Failure { message: describe(operation, err), class }
    }

    fn other(message: String) -> Self {
        Failure { message, class: Class::Other }
    }

    fn into_error(self, uri: String) -> StorageError {
        match self.class {
            Class::Unavailable => StorageError::Unavailable { uri, message: self.message },
            _ => StorageError::Remote { uri, message: self.message },
        }
    }
}

/// Whether a failed GetObject means "no such object" (rather than, e.g., no such bucket).
fn is_not_found(err: &SdkError<GetObjectError, HttpResponse>) -> bool {
    if err.as_service_error().is_some_and(GetObjectError::is_no_such_key) {
        return true;
    }
    // Some servers answer a bare 404 without an S3 error code.
    err.raw_response().is_some_and(|r| r.status().as_u16() == 404) && err.code() != Some("NoSuchBucket")
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<PutOutcome, StorageError> {
        self.write(key, bytes, content_type, false)
            .await?
            .ok_or_else(|| self.remote(key, "an unconditional write reported an existing object".into()))
    }

    async fn put_new(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<Option<PutOutcome>, StorageError> {
        self.write(key, bytes, content_type, true).await
    }

    async fn put_file_new(
        &self,
        key: &str,
        path: &std::path::Path,
        sha256: &str,
        size: u64,
        content_type: &str,
    ) -> Result<Option<PutOutcome>, StorageError> {
        let size = size as usize;
        if size < self.multipart_threshold || size == 0 {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|source| StorageError::Io { uri: path.display().to_string(), source })?;
            return self.write(key, bytes.into(), content_type, true).await;
        }
        check_key(key)?;
        let whole: [u8; 32] = hex::decode(sha256)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| self.remote(key, format!("not a SHA-256: {sha256:?}")))?;
        let started = Instant::now();
        let part_size = self.part_size_for(size);
        let parts = (0..size)
            .step_by(part_size)
            .zip(1..)
            .map(|(start, number)| PartSource::File {
                number,
                path: path.to_path_buf(),
                offset: start as u64,
                len: part_size.min(size - start),
            })
            .collect();
        let result = self.put_multipart(&join_key(&self.prefix, key), parts, content_type, true).await;
        self.outcome(key, whole, started, result, true)
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Bytes>, StorageError> {
        check_key(key)?;
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let Some(body) = self.get_object(key, Some(range)).await? else { return Ok(None) };
        let bytes = body.collect().await.map_err(|e| self.body_error(key, e))?.into_bytes();
        if bytes.len() as u64 != len {
            return Err(self.remote(key, format!("asked for {len} bytes at {offset}, got {}", bytes.len())));
        }
        Ok(Some(bytes))
    }

    async fn get_to_file(&self, key: &str, path: &std::path::Path) -> Result<bool, StorageError> {
        use tokio::io::AsyncWriteExt;
        let Some(mut body) = self.get_object(key, None).await? else { return Ok(false) };
        let io = |source| StorageError::Io { uri: path.display().to_string(), source };
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        while let Some(chunk) = body.try_next().await.map_err(|e| self.body_error(key, e))? {
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let Some(body) = self.get_object(key, None).await? else { return Ok(None) };
        Ok(Some(body.collect().await.map_err(|e| self.body_error(key, e))?.into_bytes()))
    }

    async fn delete_folder(&self, folder: &str) -> Result<u64, StorageError> {
        let folder = folder.trim_end_matches('/');
        check_key(folder)?;
        let prefix = format!("{}/", join_key(&self.prefix, folder));
        // Unfinished uploads first, so that none completes after the listing below.
        let (mut key_marker, mut upload_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_marker.take())
                .send()
                .await
                .map_err(|e| Failure::of("ListMultipartUploads", &e).into_error(self.uri(folder)))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else { continue };
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                    .map_err(|e| Failure::of("AbortMultipartUpload", &e).into_error(self.uri(folder)))?;
            }
            if page.is_truncated() != Some(true) || page.next_key_marker().is_none() {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            upload_marker = page.next_upload_id_marker().map(str::to_string);
        }
        let mut pages =
            self.client.list_objects_v2().bucket(&self.bucket).prefix(&prefix).into_paginator().send();
        let mut deleted = 0;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Failure::of("ListObjectsV2", &e).into_error(self.uri(folder)))?;
            // A listing page holds at most 1,000 keys: what one DeleteObjects takes.
            let objects = page
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.remote(folder, e.to_string()))?;
            if objects.is_empty() {
                continue;
            }
            let count = objects.len() as u64;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| self.remote(folder, e.to_string()))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| Failure::of("DeleteObjects", &e).into_error(self.uri(folder)))?;
            if let Some(error) = out.errors().first() {
                let message = format!(
                    "DeleteObjects: {} of {count} not deleted, the first {:?}: {} {}",
                    out.errors().len(),
                    error.key().unwrap_or_default(),
                    error.code().unwrap_or_default(),
                    error.message().unwrap_or_default()
                );
                return Err(self.remote(folder, message));
            }
            deleted += count;
        }
        Ok(deleted)
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, join_key(&self.prefix, key))
    }
}

/// Counts the retries of upload requests in `ddpm_upload_retries_total{operation}`: before each
/// attempt the orchestrator records its number in the config bag, and any attempt past the first
/// is a retry.
#[derive(Debug)]
struct CountRetries;

impl Intercept for CountRetries {
    fn name(&self) -> &'static str {
        "CountRetries"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<RequestAttempts>().is_some_and(|a| a.attempts() > 1) {
            let operation = cfg.load::<Metadata>().map_or("unknown", Metadata::name).to_string();
            metrics::counter!("ddpm_upload_retries_total", "operation" => operation).increment(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(prefix: &str) -> S3Store {
        let sdk = aws_config::SdkConfig::builder().behavior_version(BehaviorVersion::latest()).build();
        let options = S3Options { path_style: true, max_attempts: 2, ..S3Options::default() };
        S3Store::from_sdk_config(&sdk, "bkt".into(), prefix.into(), &options).unwrap()
    }

    #[test]
    fn uris_join_the_prefix() {
        assert_eq!(store("").uri("a/b.png"), "s3://bkt/a/b.png");
        assert_eq!(store("/jobs/x/").uri("a/b.png"), "s3://bkt/jobs/x/a/b.png");
        assert_eq!(store("/jobs/x/").prefix(), "jobs/x");
    }

    #[test]
    fn options_reach_the_client() {
        let config = store("").client().config().clone();
        assert_eq!(config.region().map(Region::as_ref), Some(DEFAULT_REGION));
        assert_eq!(config.retry_config().map(RetryConfig::max_attempts), Some(2));
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::from_static("eu-west-3"))
            .build();
        let s = S3Store::from_sdk_config(&sdk, "b".into(), String::new(), &S3Options::default()).unwrap();
        assert_eq!(s.client().config().region().map(Region::as_ref), Some("eu-west-3"));
        assert!(S3Store::from_sdk_config(&sdk, String::new(), String::new(), &S3Options::default()).is_err());
    }

    #[test]
    fn parts_cover_the_object_in_order() {
        let bytes = Bytes::from((0..23u8).collect::<Vec<_>>());
        let (whole, parts) = hash(&bytes, Some(10));
        assert_eq!(whole, <[u8; 32]>::from(Sha256::digest(&bytes)));
        let sizes: Vec<_> = parts.iter().map(|p| (p.number, p.bytes.len())).collect();
        assert_eq!(sizes, [(1, 10), (2, 10), (3, 3)]);
        assert_eq!(parts[2].sha256, <[u8; 32]>::from(Sha256::digest(&bytes[20..])));
        assert!(hash(&bytes, None).1.is_empty());

        let s = store("").with_part_size(1);
        assert_eq!(s.part_size_for(10), MIN_PART_SIZE);
        assert_eq!(s.part_size_for(MIN_PART_SIZE * MAX_PARTS + 1), MIN_PART_SIZE + 1);
    }

    #[tokio::test]
    async fn invalid_keys_fail_before_any_request() {
        let s = store("p");
        assert!(matches!(s.put("../x", Bytes::new(), "x").await, Err(StorageError::InvalidKey(_))));
        assert!(matches!(s.get("a//b").await, Err(StorageError::InvalidKey(_))));
    }
}
