//! Where a job's outputs go: an [`ObjectStore`] per destination. The embedded default is a local
//! directory ([`local::LocalStore`]); S3-compatible storage goes through aws-sdk-s3 ([`s3`]).
//!
//! Keys are `/`-separated paths relative to the store's root (a directory, or a bucket). Every `put`
//! is whole or nothing: a reader never sees half an object, so the manifest, written last, is the
//! commit record of a job.
//!
//! Job outputs are written with [`ObjectStore::put_new`], which creates an object only where none is
//! (`If-None-Match: *` on S3, a hard link on a directory). A worker that lost its lease while writing
//! (paused, partitioned) can therefore never replace what another attempt recorded: the first object
//! at a key is the one every record lists ([`write_once`]).

pub mod local;
pub mod s3;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{uri}: {source}")]
    Io { uri: String, source: std::io::Error },
    /// The store refused or failed the request after its retries.
    #[error("{uri}: {message}")]
    Remote { uri: String, message: String },
    /// The store could not be reached or answered that it is overloaded (connection refused, timeouts,
    /// HTTP 5xx, throttling) after its retries: worth trying again later, not a fault of the request.
    #[error("{uri}: store unavailable: {message}")]
    Unavailable { uri: String, message: String },
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("invalid destination {0:?}: expected file:DIR or s3://BUCKET[/PREFIX]")]
    InvalidDestination(String),
}

/// An object as written: its URI and the SHA-256 of its bytes (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    pub uri: String,
    pub sha256: String,
}

impl StorageError {
    /// Whether the store was out of reach rather than the request at fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }
}

#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug + 'static {
    /// Writes `bytes` at `key`, replacing what was there.
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<PutOutcome, StorageError>;
    /// Writes `bytes` at `key` only if no object is there; `None` when one was (nothing is written).
    async fn put_new(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<Option<PutOutcome>, StorageError>;
    /// Uploads the file at `path` (of `size` bytes and SHA-256 `sha256`, hex) to `key` only if no
    /// object is there, streaming it rather than reading it whole; `None` when one was. The file may be
    /// consumed (moved into place).
    async fn put_file_new(
        &self,
        key: &str,
        path: &std::path::Path,
        sha256: &str,
        size: u64,
        content_type: &str,
    ) -> Result<Option<PutOutcome>, StorageError>;
    /// The object at `key`, or `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError>;
    /// `len` bytes of the object at `key` from `offset`, or `None` when there is no object.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Bytes>, StorageError>;
    /// Copies the object at `key` to the file `path`, streaming; `false` when there is no object.
    async fn get_to_file(&self, key: &str, path: &std::path::Path) -> Result<bool, StorageError>;
    /// Deletes every object under the folder `folder` (a key prefix; `/` is added, so `a/b` never
    /// takes `a/bc/…`) and any upload left unfinished there. Returns how many objects were deleted;
    /// deleting a folder that holds nothing is not an error.
    async fn delete_folder(&self, folder: &str) -> Result<u64, StorageError>;
    /// A folder for files on their way to [`ObjectStore::put_file_new`] from which it can place them
    /// without a copy (the local store's staging folder); `None` when any local folder will do.
    fn spool_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The URI a user would use to fetch `key` (`file:///…` or `s3://bucket/key`).
    fn uri(&self, key: &str) -> String;
}

/// An object as [`write_once`] left it: ours, or the one an earlier writer put there first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub uri: String,
    /// The SHA-256 of the bytes stored at the key (hex), whoever wrote them.
    pub sha256: String,
    /// Their size.
    pub bytes: u64,
    /// The object was there already and is kept.
    pub adopted: bool,
}

/// Creates `key` with `bytes`, or, when another writer created it first, keeps that object and reports
/// the SHA-256 of what is stored (verify-and-adopt): records then list what readers will get.
pub async fn write_once(
    store: &dyn ObjectStore,
    key: &str,
    bytes: Bytes,
    content_type: &str,
) -> Result<Written, StorageError> {
    let size = bytes.len() as u64;
    if let Some(put) = store.put_new(key, bytes, content_type).await? {
        return Ok(Written { uri: put.uri, sha256: put.sha256, bytes: size, adopted: false });
    }
    let stored = store.get(key).await?.ok_or_else(|| StorageError::Remote {
        uri: store.uri(key),
        message: "the store refused a create because the object exists, but it cannot be read".into(),
    })?;
    let sha256 = crate::digest::sha256_hex(&stored);
    Ok(Written { uri: store.uri(key), sha256, bytes: stored.len() as u64, adopted: true })
}

/// A key must be a relative path without empty, `.` or `..` segments, so it cannot escape its root.
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok { Ok(()) } else { Err(StorageError::InvalidKey(key.to_string())) }
}

/// S3's bucket naming rules (general purpose buckets): 3–63 characters of lowercase letters, digits,
/// '.' and '-', starting and ending with a letter or digit, no "..", not an IP address, and none of
/// the reserved prefixes and suffixes.
pub fn check_bucket(name: &str) -> Result<(), String> {
    let chars_ok =
        name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ends_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if !(3..=63).contains(&name.len()) || !chars_ok || !ends_ok {
        return Err(
            "3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
                .into(),
        );
    }
    if name.contains("..") || name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("no \"..\" and not an IP address".into());
    }
    let reserved = ["xn--", "sthree-", "amzn-s3-demo-"].iter().any(|p| name.starts_with(p))
        || ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"].iter().any(|s| name.ends_with(s));
    if reserved {
        return Err("uses a prefix or suffix S3 reserves".into());
    }
    Ok(())
}

/// An output prefix: a relative path of at most 1,024 bytes whose segments are 1–255 bytes, without
/// '.' or '..' segments, backslashes, NUL or other control characters.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > 1024 {
        return Err(format!("{} bytes; at most 1024", prefix.len()));
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return Err("no control characters or backslashes".into());
    }
    if prefix.split('/').any(|seg| seg.len() > 255) {
        return Err("a path segment is longer than 255 bytes".into());
    }
    if prefix.split('/').next() == Some(local::STAGING_DIR) {
        return Err(format!("{} is reserved", local::STAGING_DIR));
    }
    check_key(prefix).map_err(|_| "not a relative path without empty, '.' or '..' segments".into())
}

/// Joins a prefix (possibly empty, with or without a trailing `/`) and a key.
pub fn join_key(prefix: &str, key: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}/{key}") }
}

/// An output destination: `file:DIR` or `s3://BUCKET[/PREFIX]`. A job's resolved destination is kept
/// in its spec (untagged, so a record reads back as the variant its fields name).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Destination {
    File { root: std::path::PathBuf, prefix: String },
    S3 { bucket: String, prefix: String },
}

impl Destination {
    /// The prefix inside the bucket or root.
    pub fn prefix(&self) -> &str {
        match self {
            Destination::File { prefix, .. } | Destination::S3 { prefix, .. } => prefix,
        }
    }

    /// The same bucket or root with `prefix` in place of this one's.
    pub fn with_prefix(&self, prefix: String) -> Destination {
        match self {
            Destination::File { root, .. } => Destination::File { root: root.clone(), prefix },
            Destination::S3 { bucket, .. } => Destination::S3 { bucket: bucket.clone(), prefix },
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Destination::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Destination::File { root, prefix } if prefix.is_empty() => write!(f, "file:{}", root.display()),
            Destination::File { root, prefix } => write!(f, "file:{}", root.join(prefix).display()),
        }
    }
}

impl std::str::FromStr for Destination {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, StorageError> {
        let invalid = || StorageError::InvalidDestination(s.to_string());
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid());
            }
            return Ok(Destination::S3 { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() });
        }
        let dir = s.strip_prefix("file://").or_else(|| s.strip_prefix("file:")).ok_or_else(invalid)?;
        if dir.is_empty() {
            return Err(invalid());
        }
        Ok(Destination::File { root: dir.into(), prefix: String::new() })
    }
}

/// The store for `dest`: a [`local::LocalStore`] rooted at `root/prefix`, or an [`s3::S3Store`]
/// configured from the standard AWS chain (see [`s3::S3Store::connect`]); `path_style` only
/// matters for S3.
pub async fn open_store(dest: &Destination, path_style: bool) -> Result<Arc<dyn ObjectStore>, StorageError> {
    Ok(match dest {
        Destination::File { root, prefix } => {
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(local::LocalStore::new(root)?)
            } else {
                // The prefix becomes part of the root, so it must not climb out of it either.
                check_key(prefix)?;
                Arc::new(local::LocalStore::new(root.join(prefix))?)
            }
        }
        Destination::S3 { bucket, prefix } => {
            Arc::new(s3::S3Store::connect(bucket.clone(), prefix.clone(), path_style).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_their_root() {
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        check_key("jobs/1/samples/00000001.png").unwrap();
        assert_eq!(join_key("", "a/b"), "a/b");
        assert_eq!(join_key("/p/q/", "a"), "p/q/a");
    }

    #[test]
    fn buckets_and_prefixes_follow_the_rules() {
        for ok in ["abc", "my-bucket.v2", "a1b2c3"] {
            check_bucket(ok).unwrap();
        }
        let long = "a".repeat(64);
        for bad in ["ab", "UPPER", "under_score", "-a", "a-", "a..b", "10.0.0.1", "xn--x", "x-s3alias", &long]
        {
            assert!(check_bucket(bad).is_err(), "{bad}");
        }
        for ok in ["a", "a/b/c", "x-y_z.w"] {
            check_prefix(ok).unwrap();
        }
        let deep = "a/".repeat(513) + "a";
        for bad in ["a\0b", "tab\tx", "a\\b", "../a", "a//b", ".ddpm-staging", &"s".repeat(256), &deep] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(
            "s3://bkt/some/prefix/".parse::<Destination>().unwrap(),
            Destination::S3 { bucket: "bkt".into(), prefix: "some/prefix".into() }
        );
        assert_eq!(
            "s3://bkt".parse::<Destination>().unwrap(),
            Destination::S3 { bucket: "bkt".into(), prefix: String::new() }
        );
        assert_eq!(
            "file:out/jobs".parse::<Destination>().unwrap(),
            Destination::File { root: "out/jobs".into(), prefix: String::new() }
        );
        for bad in ["out", "s3://", "file:", "gs://b"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn file_destinations_honour_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Destination::File { root: dir.path().into(), prefix: "/p/q/".into() };
        let store = open_store(&dest, false).await.unwrap();
        let out = store.put("a.json", Bytes::from_static(b"{}"), "application/json").await.unwrap();
        assert_eq!(out.uri, format!("file://{}", dir.path().join("p/q/a.json").display()));
        assert_eq!(std::fs::read(dir.path().join("p/q/a.json")).unwrap(), b"{}");

        let plain = Destination::File { root: dir.path().into(), prefix: String::new() };
        let plain = open_store(&plain, false).await.unwrap();
        assert_eq!(plain.get("p/q/a.json").await.unwrap().unwrap(), Bytes::from_static(b"{}"));

        let escaping = Destination::File { root: dir.path().into(), prefix: "../x".into() };
        assert!(matches!(open_store(&escaping, false).await, Err(StorageError::InvalidKey(_))));
    }

    #[tokio::test]
    async fn the_first_write_wins_and_later_writers_adopt_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = local::LocalStore::new(dir.path()).unwrap();
        let first = write_once(&store, "j/a.png", Bytes::from_static(b"first"), "image/png").await.unwrap();
        assert!(!first.adopted);
        let second = write_once(&store, "j/a.png", Bytes::from_static(b"second"), "image/png").await.unwrap();
        assert!(second.adopted);
        assert_eq!(second.sha256, crate::digest::sha256_hex(b"first"));
        assert_eq!(store.get("j/a.png").await.unwrap().unwrap(), Bytes::from_static(b"first"));
    }
}
