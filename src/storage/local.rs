//! A local directory as an object store: keys are paths under the root, written through a temporary
//! file, fsync and rename so a crash never leaves half an object under its final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectStore, PutOutcome, StorageError, check_key};
use crate::generate::sha256_hex;

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
        Ok(self.root.join(key))
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, bytes: Bytes, _content_type: &str) -> Result<PutOutcome, StorageError> {
        let path = self.path(key)?;
        let uri = self.uri(key);
        tokio::task::spawn_blocking(move || {
            let sha256 = sha256_hex(&bytes);
            write_durably(&path, &bytes).map_err(|source| StorageError::Io { uri: uri.clone(), source })?;
            Ok(PutOutcome { uri, sha256 })
        })
        .await
        .map_err(|e| StorageError::Remote { uri: self.uri(key), message: e.to_string() })?
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io { uri: self.uri(key), source }),
        }
    }

    fn uri(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Only the final file is left: no temporary siblings.
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("a/b")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["c.json"]);
    }
}
