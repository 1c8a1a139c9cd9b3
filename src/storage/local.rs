//! A local directory as an object store: keys are paths under the root, written through a temporary
//! file, fsync and rename (or, for [`ObjectStore::put_new`], a hard link, which fails where a file
//! exists) so a crash never leaves half an object under its final name.
//!
//! Temporary files live in one staging folder, [`STAGING_DIR`] under the root, never beside the
//! outputs: a writer killed or frozen mid-write leaves nothing in a job's folder that its manifest does
//! not list.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectStore, PutOutcome, StorageError, check_key};
use crate::digest::sha256_hex;

/// The staging folder's name under the root; no key may start with it.
pub const STAGING_DIR: &str = ".ddpm-staging";

/// Files younger than this are never swept: a writer locks its file right after creating it.
const SWEEP_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes the files of `dir` that no process holds: what writers killed mid-write left behind. Every
/// writer holds a lock (flock(2)) on its staged or spooled file until the file is placed or dropped, and
/// the kernel releases it when the writer dies, so a file that can be locked and is a few seconds old is
/// abandoned. Returns how many were removed. The worker's reaper runs it on every pass.
pub fn sweep_abandoned(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let old = entry
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_file)
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= SWEEP_MIN_AGE);
        if !old {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else { continue };
        if file.try_lock().is_ok() && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed files abandoned by killed writers");
    }
    removed
}

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// The root is created on the first write; it is made absolute so URIs are usable anywhere.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        let root = std::path::absolute(&root)
            .map_err(|source| StorageError::Io { uri: root.display().to_string(), source })?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        if key.split('/').next() == Some(STAGING_DIR) {
            return Err(StorageError::InvalidKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }

    /// Writes `bytes` to a fresh, fsynced file in the staging folder, locked (see [`sweep_abandoned`])
    /// until the returned handle is dropped.
    fn stage(&self, bytes: &[u8]) -> std::io::Result<(PathBuf, std::fs::File)> {
        let dir = self.root.join(STAGING_DIR);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(uuid::Uuid::new_v4().simple().to_string());
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.try_lock().map_err(std::io::Error::other)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            Ok::<_, std::io::Error>(f)
        })();
        match written {
            Ok(f) => Ok((tmp, f)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Moves a staged file to `path`; with `replace` false, only if nothing is there (`Ok(false)`
    /// otherwise). The staged file is gone afterwards either way.
    fn publish(&self, tmp: &Path, path: &Path, replace: bool) -> std::io::Result<bool> {
        let dir = path.parent().unwrap_or(&self.root);
        let placed = std::fs::create_dir_all(dir).and_then(|()| {
            if replace {
                std::fs::rename(tmp, path).map(|()| true)
            } else {
                // link(2) fails with EEXIST instead of replacing: the create-only primitive.
                let linked = match std::fs::hard_link(tmp, path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                };
                let _ = std::fs::remove_file(tmp);
                linked
            }
        });
        if placed.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        let placed = placed?;
        if placed {
            // The new directory entry survives a power cut only once the directory is synced.
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(placed)
    }

    async fn write(
        &self,
        key: &str,
        bytes: Bytes,
        replace: bool,
    ) -> Result<Option<PutOutcome>, StorageError> {
        let path = self.path(key)?;
        let uri = self.uri(key);
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let io = |source| StorageError::Io { uri: uri.clone(), source };
            let sha256 = sha256_hex(&bytes);
            let (tmp, _lock) = store.stage(&bytes).map_err(io)?;
            let placed = store.publish(&tmp, &path, replace).map_err(io)?;
            Ok(placed.then(|| PutOutcome { uri: uri.clone(), sha256 }))
        })
        .await
        .map_err(|e| StorageError::Remote { uri: self.uri(key), message: e.to_string() })?
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, bytes: Bytes, _content_type: &str) -> Result<PutOutcome, StorageError> {
        self.write(key, bytes, true).await?.ok_or_else(|| StorageError::Remote {
            uri: self.uri(key),
            message: "rename did not place the file".into(),
        })
    }

    async fn put_new(
        &self,
        key: &str,
        bytes: Bytes,
        _content_type: &str,
    ) -> Result<Option<PutOutcome>, StorageError> {
        self.write(key, bytes, false).await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io { uri: self.uri(key), source }),
        }
    }

    async fn put_file_new(
        &self,
        key: &str,
        file: &Path,
        sha256: &str,
        _size: u64,
        _content_type: &str,
    ) -> Result<Option<PutOutcome>, StorageError> {
        let path = self.path(key)?;
        let uri = self.uri(key);
        let (store, file, sha256) = (self.clone(), file.to_path_buf(), sha256.to_string());
        tokio::task::spawn_blocking(move || {
            let io = |source| StorageError::Io { uri: uri.clone(), source };
            let staging = store.root.join(STAGING_DIR);
            // A file spooled in the staging folder is linked into place as it is (it was synced by
            // its writer); one from elsewhere is copied in first.
            let tmp = if file.parent() == Some(staging.as_path()) {
                file
            } else {
                std::fs::create_dir_all(&staging).map_err(io)?;
                let tmp = staging.join(uuid::Uuid::new_v4().simple().to_string());
                std::fs::copy(&file, &tmp).map_err(io)?;
                std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
                tmp
            };
            // The caller's spool file is locked by the caller, a copy only for an instant.
            let placed = store.publish(&tmp, &path, false).map_err(io)?;
            Ok(placed.then(|| PutOutcome { uri: uri.clone(), sha256 }))
        })
        .await
        .map_err(|e| StorageError::Remote { uri: self.uri(key), message: e.to_string() })?
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Bytes>, StorageError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.path(key)?;
        let uri = self.uri(key);
        tokio::task::spawn_blocking(move || {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(StorageError::Io { uri, source }),
            };
            let mut buf = vec![0u8; len as usize];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|source| StorageError::Io { uri, source })?;
            Ok(Some(buf.into()))
        })
        .await
        .map_err(|e| StorageError::Remote { uri: self.uri(key), message: e.to_string() })?
    }

    async fn get_to_file(&self, key: &str, to: &Path) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::copy(&path, to).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StorageError::Io { uri: self.uri(key), source }),
        }
    }

    async fn delete_folder(&self, folder: &str) -> Result<u64, StorageError> {
        let path = self.path(folder.trim_end_matches('/'))?;
        let uri = self.uri(folder);
        tokio::task::spawn_blocking(move || {
            let io = |source| StorageError::Io { uri: uri.clone(), source };
            let mut deleted = 0;
            // A writer may place a file while the folder goes (a worker that has not yet seen its
            // job cancelled): then the removal finds the folder not empty, and goes again.
            for _ in 0..3 {
                let files = walkdir::WalkDir::new(&path)
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|e| !e.file_type().is_dir())
                    .count() as u64;
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {
                        deleted += files;
                        if let Some(parent) = path.parent() {
                            std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
                        }
                        return Ok(deleted);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(deleted),
                    Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => continue,
                    Err(e) => return Err(io(e)),
                }
            }
            Err(io(std::io::Error::other("files kept appearing while the folder was deleted")))
        })
        .await
        .map_err(|e| StorageError::Remote { uri: self.uri(folder), message: e.to_string() })?
    }

    fn spool_dir(&self) -> Option<PathBuf> {
        Some(self.root.join(STAGING_DIR))
    }

    fn uri(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn put_then_get_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let out = store.put("a/b/c.json", Bytes::from_static(b"{}"), "application/json").await.unwrap();
        assert_eq!(out.sha256, sha256_hex(b"{}"));
        assert_eq!(out.uri, format!("file://{}", dir.path().join("a/b/c.json").display()));
        assert_eq!(store.get("a/b/c.json").await.unwrap().unwrap(), Bytes::from_static(b"{}"));
        assert!(store.get("a/b/missing").await.unwrap().is_none());
        assert!(store.put("../escape", Bytes::new(), "x").await.is_err());
        assert!(store.put(&format!("{STAGING_DIR}/x"), Bytes::new(), "x").await.is_err());
        // Only the final file is left: no temporary siblings, and the staging folder is empty.
        assert_eq!(names(&dir.path().join("a/b")), ["c.json"]);
        assert!(names(&dir.path().join(STAGING_DIR)).is_empty());
    }

    #[tokio::test]
    async fn deleting_a_folder_takes_what_is_under_it_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        for key in ["jobs/a/x.png", "jobs/a/sub/y.png", "jobs/ab/z.png", "jobs/b/w.png"] {
            store.put(key, Bytes::from_static(b"."), "image/png").await.unwrap();
        }
        assert_eq!(store.delete_folder("jobs/a").await.unwrap(), 2);
        assert_eq!(
            names(&dir.path().join("jobs")),
            ["ab", "b"],
            "a sibling that shares the name's start stays"
        );
        assert_eq!(store.delete_folder("jobs/a/").await.unwrap(), 0, "a folder already gone");
        assert!(store.delete_folder("../jobs").await.is_err());
    }

    #[tokio::test]
    async fn put_new_creates_once_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let first = store.put_new("s/1.png", Bytes::from_static(b"one"), "image/png").await.unwrap();
        assert_eq!(first.map(|p| p.sha256), Some(sha256_hex(b"one")));
        assert_eq!(store.put_new("s/1.png", Bytes::from_static(b"two"), "image/png").await.unwrap(), None);
        assert_eq!(store.get("s/1.png").await.unwrap().unwrap(), Bytes::from_static(b"one"));
        assert_eq!(names(&dir.path().join("s")), ["1.png"]);
        assert!(names(&dir.path().join(STAGING_DIR)).is_empty());
    }
}
