//! Parquet data parts in Hugging Face's image layout: an `image` column of struct {bytes, path} and the
//! sample's metadata as plain columns, with the `datasets` features in the file's `huggingface`
//! metadata, so `datasets.load_dataset("parquet", data_files=…)` decodes `image` as an `Image`.
//! Row groups hold [`PARQUET_ROWS_PER_GROUP`] rows, as `datasets` writes image datasets, so readers
//! stream a part a group at a time.

use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, Float32Builder, Int64Builder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, StructArray, UInt64Array};
use arrow_schema::{DataType, Field, Fields, Schema};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::arrow::{ArrowWriter, ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::metadata::{KeyValue, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;

use super::index::IndexRow;
use super::tar::Hashing;
use super::{DatasetError, Encoded, ImageFormat, PARQUET_ROWS_PER_GROUP, SampleContext};
use crate::storage::ObjectStore;

fn image_fields() -> Fields {
    Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)])
}

/// The data part schema, with `datasets`' features in its `huggingface` metadata (inside the stored
/// Arrow schema, where pyarrow and `datasets` read it). A labelled job's parts add a `label` column,
/// a `ClassLabel` of `class_names`.
pub fn schema(class_names: Option<&[String]>) -> Arc<Schema> {
    let metadata = std::collections::HashMap::from([("huggingface".to_string(), features(class_names))]);
    // Nullable, as `datasets` writes a ClassLabel column: it takes the feature from the metadata only where
    // the metadata's own Arrow field (nullable by default) equals the stored one.
    let label = class_names.map(|_| Field::new("label", DataType::Int64, true));
    Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("image", DataType::Struct(image_fields()), true),
            Field::new("index", DataType::UInt64, false),
            Field::new("seed", DataType::UInt64, false),
            Field::new("model", DataType::Utf8, false),
            Field::new("model_sha256", DataType::Utf8, false),
            Field::new("scheduler", DataType::Utf8, false),
            Field::new("steps", DataType::UInt32, false),
            Field::new("eta", DataType::Float32, false),
        ]
        .into_iter()
        .chain(label)
        .collect::<Vec<_>>(),
        metadata,
    ))
}

/// `datasets`' features of [`schema`] (what `Dataset.to_parquet` stores under the `huggingface` key).
fn features(class_names: Option<&[String]>) -> String {
    let value = |dtype: &str| serde_json::json!({"dtype": dtype, "_type": "Value"});
    let mut features = serde_json::json!({
        "image": {"_type": "Image"},
        "index": value("uint64"),
        "seed": value("uint64"),
        "model": value("string"),
        "model_sha256": value("string"),
        "scheduler": value("string"),
        "steps": value("uint32"),
        "eta": value("float32"),
    });
    if let (Some(names), Some(map)) = (class_names, features.as_object_mut()) {
        map.insert("label".into(), serde_json::json!({"names": names, "_type": "ClassLabel"}));
    }
    serde_json::json!({"info": {"features": features}}).to_string()
}

/// One Parquet part being written to a spool file, a row group at a time.
pub struct ParquetPart {
    writer: ArrowWriter<Hashing<BufWriter<File>>>,
    path: String,
    ext: &'static str,
    pending: Vec<Encoded>,
    rows: Vec<IndexRow>,
    schema: Arc<Schema>,
    labelled: bool,
}

impl ParquetPart {
    pub fn create(
        spool: &Path,
        path: String,
        image: ImageFormat,
        ctx: &SampleContext,
    ) -> Result<Self, DatasetError> {
        let class_names = ctx.class_names();
        let schema = schema(class_names.as_deref());
        let io = |source| DatasetError::Io { path: spool.display().to_string(), source };
        let file = File::create(spool).map_err(io)?;
        let props = WriterProperties::builder()
            // Encoded images do not compress further; the small columns are dictionary-encoded anyway.
            .set_compression(Compression::UNCOMPRESSED)
            .set_max_row_group_row_count(Some(PARQUET_ROWS_PER_GROUP as usize))
            // Also as a file key, as pyarrow writes it, for readers that do not decode the Arrow schema.
            .set_key_value_metadata(Some(vec![KeyValue::new(
                "huggingface".into(),
                features(class_names.as_deref()),
            )]))
            .build();
        let writer = ArrowWriter::try_new(
            Hashing::new(BufWriter::with_capacity(1 << 20, file)),
            Arc::clone(&schema),
            Some(props),
        )?;
        let labelled = class_names.is_some();
        let (ext, pending, rows) = (image.extension(), Vec::new(), Vec::new());
        Ok(Self { writer, path, ext, pending, rows, schema, labelled })
    }

    pub fn push(&mut self, sample: Encoded, ctx: &SampleContext) -> Result<(), DatasetError> {
        self.rows.push(IndexRow {
            index: sample.index,
            seed: sample.seed,
            sha256: crate::digest::sha256_hex(&sample.bytes),
            bytes: sample.bytes.len() as u64,
            file: self.path.clone(),
            member: None,
            offset: None,
            row: Some(self.rows.len() as u64),
        });
        self.pending.push(sample);
        if self.pending.len() as u64 >= PARQUET_ROWS_PER_GROUP {
            self.flush(ctx)?;
        }
        Ok(())
    }

    fn flush(&mut self, ctx: &SampleContext) -> Result<(), DatasetError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        let mut bytes = BinaryBuilder::with_capacity(n, self.pending.iter().map(|s| s.bytes.len()).sum());
        let mut path = StringBuilder::with_capacity(n, n * 13);
        let (mut index, mut seed) = (UInt64Builder::with_capacity(n), UInt64Builder::with_capacity(n));
        let (mut model, mut sha) = (StringBuilder::new(), StringBuilder::new());
        let mut scheduler = StringBuilder::new();
        let (mut steps, mut eta) = (UInt32Builder::with_capacity(n), Float32Builder::with_capacity(n));
        let mut label = Int64Builder::with_capacity(n);
        for s in self.pending.drain(..) {
            if self.labelled {
                let class = ctx.label(s.index).map(|(c, _)| i64::from(c));
                label.append_value(class.ok_or_else(|| {
                    DatasetError::Corrupt(format!("sample {} of a labelled job has no class", s.index))
                })?);
            }
            bytes.append_value(&s.bytes);
            path.append_value(format!("{:08}.{}", s.index, self.ext));
            index.append_value(s.index);
            seed.append_value(s.seed);
            model.append_value(&ctx.model);
            sha.append_value(&ctx.model_sha256);
            scheduler.append_value(&ctx.scheduler);
            steps.append_value(ctx.steps);
            eta.append_value(ctx.eta);
        }
        let image = StructArray::new(
            image_fields(),
            vec![Arc::new(bytes.finish()) as ArrayRef, Arc::new(path.finish())],
            None,
        );
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(image),
            Arc::new(index.finish()),
            Arc::new(seed.finish()),
            Arc::new(model.finish()),
            Arc::new(sha.finish()),
            Arc::new(scheduler.finish()),
            Arc::new(steps.finish()),
            Arc::new(eta.finish()),
        ];
        if self.labelled {
            columns.push(Arc::new(label.finish()));
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    /// Writes the last row group and the footer and syncs the spool file; returns the index rows, the
    /// SHA-256 and the size.
    pub fn finish(mut self, ctx: &SampleContext) -> Result<super::tar::Finished, DatasetError> {
        self.flush(ctx)?;
        let hashing = self.writer.into_inner()?;
        let (buf, sha, size) = hashing.finish();
        let file = buf
            .into_inner()
            .map_err(|e| DatasetError::Io { path: self.path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(|source| DatasetError::Io { path: self.path.clone(), source })?;
        Ok((self.rows, sha, size))
    }
}

/// The `(index, image bytes)` columns of a batch.
fn images(batch: &RecordBatch) -> Result<(&UInt64Array, &BinaryArray), DatasetError> {
    let corrupt = || DatasetError::Corrupt("parquet data part: no index or image.bytes column".into());
    let index = batch.column_by_name("index").and_then(|c| c.as_any().downcast_ref::<UInt64Array>());
    let image = batch.column_by_name("image").and_then(|c| c.as_any().downcast_ref::<StructArray>());
    let bytes =
        image.and_then(|s| s.column_by_name("bytes")).and_then(|c| c.as_any().downcast_ref::<BinaryArray>());
    Ok((index.ok_or_else(corrupt)?, bytes.ok_or_else(corrupt)?))
}

/// The index rows of a stored Parquet part (read back from a local copy), with the SHA-256 of each
/// stored image. Fails when its rows are not exactly samples `first..end` in order.
pub fn read_rows(
    local: &Path,
    path: &str,
    seed: u64,
    (first, end): (u64, u64),
) -> Result<Vec<IndexRow>, DatasetError> {
    let file =
        File::open(local).map_err(|source| DatasetError::Io { path: local.display().to_string(), source })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let (index, bytes) = images(&batch)?;
        for i in 0..batch.num_rows() {
            let data = bytes.value(i);
            rows.push(IndexRow {
                index: index.value(i),
                seed: seed + index.value(i),
                sha256: crate::digest::sha256_hex(data),
                bytes: data.len() as u64,
                file: path.to_string(),
                member: None,
                offset: None,
                row: Some(rows.len() as u64),
            });
        }
    }
    super::check_covers(path, rows, (first, end))
}

/// Reads a stored Parquet file through ranged GETs, so only its footer and the column chunks asked
/// for are fetched.
struct StoredParquet {
    store: Arc<dyn ObjectStore>,
    key: String,
    size: u64,
}

impl AsyncFileReader for StoredParquet {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.key, range.start, range.end - range.start)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?
                .ok_or_else(|| parquet::errors::ParquetError::General(format!("{} is missing", self.key)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new().load_and_finish(&mut *self, size).await?;
            Ok(Arc::new(metadata))
        })
    }
}

/// The encoded image at `row` of the stored Parquet part `key` (of `size` bytes): reads the footer and
/// the `image` column of the row's group only.
pub async fn read_image(
    store: Arc<dyn ObjectStore>,
    key: &str,
    size: u64,
    row: u64,
) -> Result<Bytes, DatasetError> {
    let reader = StoredParquet { store, key: key.to_string(), size };
    let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
    let group = (row / PARQUET_ROWS_PER_GROUP) as usize;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [0, 1]);
    let mut stream = builder.with_row_groups(vec![group]).with_projection(mask).build()?;
    let wanted = row % PARQUET_ROWS_PER_GROUP;
    let mut seen = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (_, bytes) = images(&batch)?;
        if wanted < seen + batch.num_rows() as u64 {
            return Ok(Bytes::copy_from_slice(bytes.value((wanted - seen) as usize)));
        }
        seen += batch.num_rows() as u64;
    }
    Err(DatasetError::Corrupt(format!("{key} has no row {row}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_hold_the_images_in_row_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let ctx = SampleContext {
            model: "m".into(),
            model_sha256: "0".repeat(64),
            scheduler: "ddpm".into(),
            steps: 3,
            eta: 0.0,
            seed: 5,
            classes: None,
        };
        let mut part =
            ParquetPart::create(&spool, "data/000000.parquet".into(), ImageFormat::Png, &ctx).unwrap();
        for index in 10..260u64 {
            let bytes = Bytes::from(vec![index as u8; 1 + index as usize % 7]);
            part.push(Encoded { index, seed: 5 + index, bytes }, &ctx).unwrap();
        }
        let (rows, sha, size) = part.finish(&ctx).unwrap();
        let stored = std::fs::read(&spool).unwrap();
        assert_eq!((crate::digest::sha256_hex(&stored), stored.len() as u64), (sha.clone(), size));
        assert_eq!(read_rows(&spool, "data/000000.parquet", 5, (10, 260)).unwrap(), rows);
        assert!(read_rows(&spool, "data/000000.parquet", 5, (10, 261)).is_err());

        let root = dir.path().join("store");
        let store: Arc<dyn ObjectStore> = Arc::new(crate::storage::local::LocalStore::new(&root).unwrap());
        store.put("p.parquet", stored.into(), "application/vnd.apache.parquet").await.unwrap();
        for row in [0u64, 99, 100, 249] {
            let got = read_image(Arc::clone(&store), "p.parquet", size, row).await.unwrap();
            let index = 10 + row;
            assert_eq!(got, Bytes::from(vec![index as u8; 1 + index as usize % 7]), "row {row}");
        }
    }
}
