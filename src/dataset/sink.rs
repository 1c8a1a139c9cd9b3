//! Writing one shard's samples in a job's layout: images are encoded in parallel on the blocking pool,
//! put back in sample order, and stored as per-sample objects or streamed into data file parts on a
//! local spool file (never a whole part in memory), then uploaded create-only. The shard's index part
//! is written last, after every data file it lists.
//!
//! A part that is already stored (an earlier attempt of the shard, or a worker that lost its lease)
//! is kept: when its bytes differ from this attempt's (another device's floating-point), its members
//! are read back and indexed as stored, so the index always describes the bytes readers get.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use image::DynamicImage;
use tokio::sync::mpsc;

use super::index::{self, IndexRow};
use super::parquet::ParquetPart;
use super::tar::TarPart;
use super::{DatasetError, DatasetOptions, Encoded, PartKind, SampleContext, StoredFile};
use crate::storage::{ObjectStore, join_key, write_once};

/// Encodes and uploads in flight at once (per shard).
const IN_FLIGHT: usize = 8;

/// What a shard is and where it goes.
#[derive(Debug, Clone)]
pub struct ShardTarget {
    pub store: Arc<dyn ObjectStore>,
    /// The job's folder in the store.
    pub base: String,
    pub options: DatasetOptions,
    pub context: SampleContext,
    pub shard: u64,
    pub start: u64,
    pub end: u64,
    pub writer: index::Writer,
    /// Written into tar headers (seconds since the epoch): the job's creation time, fixed per job.
    pub mtime: u64,
    /// Where spool files go when the store has no staging folder of its own.
    pub scratch: PathBuf,
}

/// What a shard stored.
#[derive(Debug)]
pub struct ShardOutput {
    /// Data files (`webdataset`, `parquet`; empty for `files`).
    pub files: Vec<StoredFile>,
    pub index: StoredFile,
    /// Samples that an earlier writer had stored first (kept, and indexed as stored).
    pub adopted: u64,
}

/// Writes samples `start..end` of a shard as they arrive on `rx` (in any order); `on_image` sees each
/// image as it arrives (grids are made from them while the shard runs).
pub async fn write_shard(
    target: ShardTarget,
    mut rx: mpsc::Receiver<(u64, DynamicImage)>,
    mut on_image: impl FnMut(u64, &DynamicImage),
) -> Result<ShardOutput, DatasetError> {
    let encoding = target.options.encoding;
    let mut encoding_tasks: tokio::task::JoinSet<Result<Encoded, DatasetError>> = tokio::task::JoinSet::new();
    let mut sink = Sink::start(&target);
    // Encoded samples waiting for an earlier index (encodes finish out of order).
    let mut reorder: BTreeMap<u64, Encoded> = BTreeMap::new();
    let mut next = target.start;
    let mut received = 0u64;
    let seed = target.context.seed;
    loop {
        while encoding_tasks.len() >= IN_FLIGHT {
            if let Some(done) = encoding_tasks.join_next().await {
                let encoded = done.map_err(join_error)??;
                reorder.insert(encoded.index, encoded);
            }
            next = sink.feed(&mut reorder, next).await?;
        }
        let Some((index, img)) = rx.recv().await else { break };
        if !(target.start..target.end).contains(&index) {
            return Err(DatasetError::Corrupt(format!("sample {index} is not in shard {}", target.shard)));
        }
        received += 1;
        on_image(index, &img);
        encoding_tasks.spawn_blocking(move || {
            let bytes = encoding.encode(&img)?;
            Ok::<_, DatasetError>(Encoded { index, seed: seed + index, bytes })
        });
    }
    while let Some(done) = encoding_tasks.join_next().await {
        let encoded = done.map_err(join_error)??;
        reorder.insert(encoded.index, encoded);
        next = sink.feed(&mut reorder, next).await?;
    }
    let (files, mut rows, adopted) = sink.finish().await?;
    if received != target.end - target.start || next != target.end {
        return Err(DatasetError::Corrupt(format!(
            "shard {} got {received} of its {} samples",
            target.shard,
            target.end - target.start
        )));
    }
    rows.sort_by_key(|r| r.index);
    let what = format!("the index of shard {}", target.shard);
    let rows = super::check_covers(&what, rows, (target.start, target.end))?;
    let bytes = index::write(&rows, &target.writer, &target.context)?;
    let path = super::index_path(target.shard);
    // An index part stored by an earlier writer lists the same stored data (everything it lists was
    // adopted or written create-only), so it stands.
    let written =
        write_once(target.store.as_ref(), &join_key(&target.base, &path), bytes, PARQUET_TYPE).await?;
    let index = StoredFile {
        path,
        sha256: written.sha256,
        bytes: written.bytes,
        first: target.start,
        end: target.end,
    };
    Ok(ShardOutput { files, index, adopted })
}

const PARQUET_TYPE: &str = super::PARQUET_CONTENT_TYPE;

fn join_error(e: tokio::task::JoinError) -> DatasetError {
    DatasetError::Corrupt(format!("an encoding task failed: {e}"))
}

type PartsWritten = Result<(Vec<StoredFile>, Vec<IndexRow>, u64), DatasetError>;

/// Where encoded samples go, in sample order.
enum Sink {
    /// One object per sample, uploaded concurrently.
    Files {
        target: Arc<ShardTarget>,
        uploads: tokio::task::JoinSet<Result<(IndexRow, bool), DatasetError>>,
        rows: Vec<IndexRow>,
        adopted: u64,
    },
    /// Data file parts, written on a blocking thread.
    Parts { tx: Option<mpsc::Sender<Encoded>>, writer: Option<tokio::task::JoinHandle<PartsWritten>> },
}

impl Sink {
    fn start(target: &ShardTarget) -> Self {
        let target = Arc::new(target.clone());
        match target.options.format.parts() {
            None => {
                Sink::Files { target, uploads: tokio::task::JoinSet::new(), rows: Vec::new(), adopted: 0 }
            }
            Some(kind) => {
                let (tx, rx) = mpsc::channel(IN_FLIGHT * 4);
                let runtime = tokio::runtime::Handle::current();
                let writer = tokio::task::spawn_blocking(move || write_parts(&target, kind, rx, &runtime));
                Sink::Parts { tx: Some(tx), writer: Some(writer) }
            }
        }
    }

    /// Passes on the samples from `next` on that are ready; returns the next index still missing.
    async fn feed(&mut self, ready: &mut BTreeMap<u64, Encoded>, mut next: u64) -> Result<u64, DatasetError> {
        while let Some(sample) = ready.remove(&next) {
            next += 1;
            match self {
                Sink::Files { target, uploads, rows, adopted } => {
                    while uploads.len() >= IN_FLIGHT {
                        if let Some(done) = uploads.join_next().await {
                            let (row, was_there) = done.map_err(join_error)??;
                            rows.push(row);
                            *adopted += u64::from(was_there);
                        }
                    }
                    let target = Arc::clone(target);
                    uploads.spawn(async move { put_sample(&target, sample).await });
                }
                Sink::Parts { tx, writer } => {
                    let sent = match tx {
                        Some(tx) => tx.send(sample).await.is_ok(),
                        None => false,
                    };
                    if !sent {
                        // The part writer stopped: its error is the shard's.
                        tx.take();
                        let ended = match writer.take() {
                            Some(w) => w.await.map_err(join_error)?,
                            None => Ok(Default::default()),
                        };
                        return Err(ended.err().unwrap_or_else(|| {
                            DatasetError::Corrupt("the part writer ended before the shard".into())
                        }));
                    }
                }
            }
        }
        Ok(next)
    }

    async fn finish(self) -> Result<(Vec<StoredFile>, Vec<IndexRow>, u64), DatasetError> {
        match self {
            Sink::Files { mut uploads, mut rows, mut adopted, .. } => {
                while let Some(done) = uploads.join_next().await {
                    let (row, was_there) = done.map_err(join_error)??;
                    rows.push(row);
                    adopted += u64::from(was_there);
                }
                Ok((Vec::new(), rows, adopted))
            }
            Sink::Parts { tx, writer } => {
                drop(tx);
                match writer {
                    Some(w) => w.await.map_err(join_error)?,
                    None => Err(DatasetError::Corrupt("the part writer is gone".into())),
                }
            }
        }
    }
}

async fn put_sample(target: &ShardTarget, sample: Encoded) -> Result<(IndexRow, bool), DatasetError> {
    let image = target.options.encoding.image;
    let file = match target.context.label(sample.index) {
        Some((_, name)) => super::labelled_sample_path(sample.index, &name, image),
        None => super::sample_path(sample.index, image),
    };
    let written =
        write_once(target.store.as_ref(), &join_key(&target.base, &file), sample.bytes, image.content_type())
            .await?;
    let row = IndexRow {
        index: sample.index,
        seed: sample.seed,
        sha256: written.sha256,
        bytes: written.bytes,
        file,
        member: None,
        offset: None,
        row: None,
    };
    Ok((row, written.adopted))
}

/// A data file part being written to its spool file: samples in order, then its index rows, SHA-256 and
/// size.
trait PartWriter {
    fn push(&mut self, sample: Encoded, ctx: &SampleContext) -> Result<(), DatasetError>;
    fn finish(self: Box<Self>, ctx: &SampleContext) -> Result<super::tar::Finished, DatasetError>;
}

/// A tar part and the spool file it is written to (named in I/O errors).
struct TarWriter(TarPart, PathBuf);

impl PartWriter for TarWriter {
    fn push(&mut self, sample: Encoded, ctx: &SampleContext) -> Result<(), DatasetError> {
        self.0.push(&sample, ctx).map_err(io(&self.1))
    }

    fn finish(self: Box<Self>, _ctx: &SampleContext) -> Result<super::tar::Finished, DatasetError> {
        let TarWriter(part, spool) = *self;
        part.finish().map_err(io(&spool))
    }
}

impl PartWriter for ParquetPart {
    fn push(&mut self, sample: Encoded, ctx: &SampleContext) -> Result<(), DatasetError> {
        ParquetPart::push(self, sample, ctx)
    }

    fn finish(self: Box<Self>, ctx: &SampleContext) -> Result<super::tar::Finished, DatasetError> {
        ParquetPart::finish(*self, ctx)
    }
}

/// Opens a part of `kind` at `spool`, to be stored as `path`.
fn open_part(
    kind: PartKind,
    spool: &Path,
    path: String,
    target: &ShardTarget,
) -> Result<Box<dyn PartWriter>, DatasetError> {
    let image = target.options.encoding.image;
    Ok(match kind {
        PartKind::Tar => {
            let part = TarPart::create(spool, path, image, target.mtime).map_err(io(spool))?;
            Box::new(TarWriter(part, spool.to_path_buf()))
        }
        PartKind::Parquet => Box::new(ParquetPart::create(spool, path, image, &target.context)?),
    })
}

/// Writes a shard's parts from the samples on `rx` (in order); runs on a blocking thread.
fn write_parts(
    target: &ShardTarget,
    kind: PartKind,
    mut rx: mpsc::Receiver<Encoded>,
    runtime: &tokio::runtime::Handle,
) -> Result<(Vec<StoredFile>, Vec<IndexRow>, u64), DatasetError> {
    let parts = target.options.parts(target.start, target.end);
    let spool_dir = target.store.spool_dir().unwrap_or_else(|| target.scratch.clone());
    std::fs::create_dir_all(&spool_dir).map_err(io(&spool_dir))?;
    let (mut files, mut rows, mut adopted) = (Vec::new(), Vec::new(), 0);
    for &(part, first, end) in &parts {
        let path = target.options.data_path(target.shard, part, parts.len());
        let spool = Spool::create(spool_dir.join(format!("{}.part", uuid::Uuid::new_v4().simple())))?;
        let mut open = open_part(kind, &spool.0, path.clone(), target)?;
        for _ in first..end {
            let Some(sample) = rx.blocking_recv() else {
                return Err(DatasetError::Corrupt(format!("shard {} ended early", target.shard)));
            };
            open.push(sample, &target.context)?;
        }
        let (part_rows, sha256, size) = open.finish(&target.context)?;
        let stored = runtime.block_on(store_part(
            target,
            kind,
            &path,
            &spool,
            (first, end),
            part_rows,
            sha256,
            size,
        ))?;
        adopted += stored.2;
        rows.extend(stored.1);
        files.push(stored.0);
    }
    Ok((files, rows, adopted))
}

/// A spool file, locked while it lives (so [`sweep_abandoned`](crate::storage::local::sweep_abandoned)
/// leaves it alone) and removed when dropped (uploaded, adopted or abandoned).
struct Spool(PathBuf, #[allow(dead_code)] std::fs::File);

impl Spool {
    fn create(path: PathBuf) -> Result<Self, DatasetError> {
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        file.try_lock().map_err(|e| DatasetError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        Ok(Self(path, file))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io { path: path.display().to_string(), source }
}

/// Uploads a finished part create-only; when one is stored already, keeps it and indexes it as stored.
#[allow(clippy::too_many_arguments)]
async fn store_part(
    target: &ShardTarget,
    kind: PartKind,
    path: &str,
    spool: &Spool,
    (first, end): (u64, u64),
    rows: Vec<IndexRow>,
    sha256: String,
    size: u64,
) -> Result<(StoredFile, Vec<IndexRow>, u64), DatasetError> {
    let key = join_key(&target.base, path);
    if target.store.put_file_new(&key, &spool.0, &sha256, size, kind.content_type()).await?.is_some() {
        return Ok((StoredFile { path: path.into(), sha256, bytes: size, first, end }, rows, 0));
    }
    // Already stored: fetch it and compare.
    let copy = Spool::create(spool.0.with_extension("stored"))?;
    if !target.store.get_to_file(&key, &copy.0).await? {
        return Err(DatasetError::Corrupt(format!("{key} exists but cannot be read")));
    }
    let (stored_sha, stored_size) = {
        let local = copy.0.clone();
        tokio::task::spawn_blocking(move || {
            crate::digest::sha256_file(&local).map(|sha| (sha, local.metadata().map(|m| m.len())))
        })
        .await
        .map_err(join_error)?
        .map_err(io(&copy.0))?
    };
    let stored_size = stored_size.map_err(io(&copy.0))?;
    let count = end - first;
    let file = StoredFile { path: path.into(), sha256: stored_sha.clone(), bytes: stored_size, first, end };
    if stored_sha == sha256 {
        tracing::info!(path, "an earlier attempt stored this part with the same bytes; keeping it");
        return Ok((file, rows, count));
    }
    tracing::warn!(path, "an earlier attempt stored this part with other bytes; indexing what is stored");
    let (image, seed) = (target.options.encoding.image, target.context.seed);
    let (local, path_owned) = (copy.0.clone(), path.to_string());
    let stored_rows = tokio::task::spawn_blocking(move || match kind {
        PartKind::Tar => super::tar::read_rows(&local, &path_owned, image, seed, (first, end)),
        PartKind::Parquet => super::parquet::read_rows(&local, &path_owned, seed, (first, end)),
    })
    .await
    .map_err(join_error)??;
    Ok((file, stored_rows, count))
}

/// The encoded image of sample `row` of an index, read from where it is stored (a per-sample object,
/// a byte range of a tar part, or a row of a Parquet part).
pub async fn read_sample(
    store: &Arc<dyn ObjectStore>,
    base: &str,
    row: &IndexRow,
    file_size: impl Fn(&str) -> Option<u64>,
) -> Result<Bytes, DatasetError> {
    let key = join_key(base, &row.file);
    let missing = || DatasetError::Corrupt(format!("{key} is missing"));
    match (row.offset, row.row) {
        (Some(offset), _) => store.get_range(&key, offset, row.bytes).await?.ok_or_else(missing),
        (None, Some(r)) => {
            let size = file_size(&row.file).ok_or_else(missing)?;
            super::parquet::read_image(Arc::clone(store), &key, size, r).await
        }
        (None, None) => store.get(&key).await?.ok_or_else(missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{DataFormat, Encoding, index};
    use crate::storage::local::LocalStore;

    fn target(store: &Arc<dyn ObjectStore>, format: DataFormat, scratch: &Path) -> ShardTarget {
        let mut options = DatasetOptions::new(format, Encoding::default(), 1 << 20, (3, 4, 4), 1);
        options.samples_per_file = 4;
        ShardTarget {
            store: Arc::clone(store),
            base: "job".into(),
            options,
            context: SampleContext {
                model: "m".into(),
                model_sha256: "0".repeat(64),
                scheduler: "ddim".into(),
                steps: 1,
                eta: 0.0,
                seed: 10,
                classes: None,
            },
            shard: 3,
            start: 8,
            end: 18,
            writer: index::Writer { shard: 3, worker: "w".into(), attempt: 1 },
            mtime: 0,
            scratch: scratch.to_path_buf(),
        }
    }

    /// Runs one attempt of the shard with images whose pixels are `shade + index`, sent out of order.
    async fn attempt(target: ShardTarget, shade: u8) -> ShardOutput {
        let (tx, rx) = mpsc::channel(64);
        let writer = tokio::spawn(write_shard(target, rx, |_, _| {}));
        for index in (8..18u64).rev() {
            let px = vec![shade.wrapping_add(index as u8); 48];
            let img = DynamicImage::ImageRgb8(image::RgbImage::from_raw(4, 4, px).unwrap());
            tx.send((index, img)).await.unwrap();
        }
        drop(tx);
        writer.await.unwrap().unwrap()
    }

    /// A second attempt whose images differ (another device's rounding) finds every part stored: it
    /// keeps them, and its index describes the stored bytes, not its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_with_other_bytes_keeps_and_indexes_the_stored_parts() {
        for format in [DataFormat::Webdataset, DataFormat::Parquet, DataFormat::Files] {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()).unwrap());
            let first = attempt(target(&store, format, dir.path()), 0).await;
            assert_eq!(first.adopted, 0);
            let parts: Vec<_> = first.files.iter().map(|f| (f.path.as_str(), f.first, f.end)).collect();
            if format != DataFormat::Files {
                let ext = if format == DataFormat::Webdataset { "tar" } else { "parquet" };
                let want = [("000", 8, 12), ("001", 12, 16), ("002", 16, 18)]
                    .map(|(p, a, b)| (format!("data/000003-{p}.{ext}"), a, b));
                assert_eq!(parts, want.iter().map(|(p, a, b)| (p.as_str(), *a, *b)).collect::<Vec<_>>());
            }
            // Remove the index part so the second attempt gets to write its own.
            std::fs::remove_file(dir.path().join("job").join(crate::dataset::index_path(3))).unwrap();
            let second = attempt(target(&store, format, dir.path()), 100).await;
            assert_eq!(second.adopted, 10, "{format:?}");
            assert_eq!(second.files, first.files, "{format:?}: the stored parts stand");
            let stored = std::fs::read(dir.path().join("job").join(&second.index.path)).unwrap();
            let rows = index::read(stored.into()).unwrap();
            let first_rows: Vec<_> = rows.iter().map(|r| r.index).collect();
            assert_eq!(first_rows, (8..18).collect::<Vec<_>>());
            for row in rows {
                let bytes = read_sample(&store, "job", &row, |p| {
                    first.files.iter().find(|f| f.path == p).map(|f| f.bytes)
                })
                .await
                .unwrap();
                assert_eq!(crate::digest::sha256_hex(&bytes), row.sha256, "{format:?} {row:?}");
                let px = image::load_from_memory(&bytes).unwrap().to_rgb8();
                assert_eq!(px.as_raw()[0], row.index as u8, "{format:?}: the first attempt's pixels");
            }
            let staging = dir.path().join(crate::storage::local::STAGING_DIR);
            assert_eq!(
                std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
                0,
                "{format:?}: spools left"
            );
        }
    }
}
