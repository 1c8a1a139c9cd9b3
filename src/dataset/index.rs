//! The Parquet index of a job: one part per shard, `index/part-<shard:06>.parquet`, one row per sample
//! saying where its encoded image lives and what its bytes hash to. Every layout gets one, so the
//! per-sample listing never has to sit in one process's memory (the manifest lists the parts).

use std::sync::Arc;

use arrow_array::builder::{StringBuilder, UInt32Builder, UInt64Builder};
use arrow_array::{Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::{DatasetError, SampleContext};

/// Where one sample is and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub index: u64,
    pub seed: u64,
    /// SHA-256 (hex) of the encoded image as stored.
    pub sha256: String,
    /// Size of the encoded image.
    pub bytes: u64,
    /// The object holding it, relative to the job's folder (`samples/…` or `data/…`).
    pub file: String,
    /// Its member in a tar (`<index:08>.<ext>`).
    pub member: Option<String>,
    /// Where its bytes start in the tar, for ranged reads.
    pub offset: Option<u64>,
    /// Its row in a Parquet data file.
    pub row: Option<u64>,
}

/// Who wrote an index part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub shard: u64,
    pub worker: String,
    pub attempt: u32,
}

pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("index", DataType::UInt64, false),
        Field::new("seed", DataType::UInt64, false),
        Field::new("sha256", DataType::Utf8, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("member", DataType::Utf8, true),
        Field::new("offset", DataType::UInt64, true),
        Field::new("row", DataType::UInt64, true),
        Field::new("shard", DataType::UInt64, false),
        Field::new("worker", DataType::Utf8, false),
        Field::new("attempt", DataType::UInt32, false),
        // A class-conditional job's labels (null for an unconditional one).
        Field::new("label", DataType::UInt32, true),
        Field::new("label_name", DataType::Utf8, true),
    ]))
}

/// The Parquet bytes of one index part (rows in sample order), each row's label from `context`.
pub fn write(rows: &[IndexRow], writer: &Writer, context: &SampleContext) -> Result<Bytes, DatasetError> {
    let n = rows.len();
    let mut index = UInt64Builder::with_capacity(n);
    let mut seed = UInt64Builder::with_capacity(n);
    let mut sha = StringBuilder::with_capacity(n, n * 64);
    let mut bytes = UInt64Builder::with_capacity(n);
    let mut file = StringBuilder::with_capacity(n, n * 24);
    let mut member = StringBuilder::with_capacity(n, n * 12);
    let mut offset = UInt64Builder::with_capacity(n);
    let mut row = UInt64Builder::with_capacity(n);
    let mut shard = UInt64Builder::with_capacity(n);
    let mut worker = StringBuilder::with_capacity(n, n * writer.worker.len());
    let mut attempt = UInt32Builder::with_capacity(n);
    let mut label = UInt32Builder::with_capacity(n);
    let mut label_name = StringBuilder::new();
    let layout = context.classes.as_ref().map(|c| c.layout());
    for r in rows {
        let class = layout.as_ref().and_then(|l| l.class_of(r.index));
        label.append_option(class);
        label_name.append_option(class.zip(context.classes.as_ref()).map(|(c, spec)| spec.name_of(c)));
        index.append_value(r.index);
        seed.append_value(r.seed);
        sha.append_value(&r.sha256);
        bytes.append_value(r.bytes);
        file.append_value(&r.file);
        member.append_option(r.member.as_deref());
        offset.append_option(r.offset);
        row.append_option(r.row);
        shard.append_value(writer.shard);
        worker.append_value(&writer.worker);
        attempt.append_value(writer.attempt);
    }
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(index.finish()),
            Arc::new(seed.finish()),
            Arc::new(sha.finish()),
            Arc::new(bytes.finish()),
            Arc::new(file.finish()),
            Arc::new(member.finish()),
            Arc::new(offset.finish()),
            Arc::new(row.finish()),
            Arc::new(shard.finish()),
            Arc::new(worker.finish()),
            Arc::new(attempt.finish()),
            Arc::new(label.finish()),
            Arc::new(label_name.finish()),
        ],
    )?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema(), Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(out.into())
}

/// The rows of an index part.
pub fn read(bytes: Bytes) -> Result<Vec<IndexRow>, DatasetError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let u64s = |name: &str| -> Result<&UInt64Array, DatasetError> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
                .ok_or_else(|| DatasetError::Corrupt(format!("index part: no u64 column {name}")))
        };
        let strs = |name: &str| -> Result<&StringArray, DatasetError> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| DatasetError::Corrupt(format!("index part: no string column {name}")))
        };
        let (index, seed, sha, size, file) =
            (u64s("index")?, u64s("seed")?, strs("sha256")?, u64s("bytes")?, strs("file")?);
        let (member, offset, row) = (strs("member")?, u64s("offset")?, u64s("row")?);
        let _attempts = batch
            .column_by_name("attempt")
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
            .ok_or_else(|| DatasetError::Corrupt("index part: no attempt column".into()))?;
        for i in 0..batch.num_rows() {
            rows.push(IndexRow {
                index: index.value(i),
                seed: seed.value(i),
                sha256: sha.value(i).to_string(),
                bytes: size.value(i),
                file: file.value(i).to_string(),
                member: member.is_valid(i).then(|| member.value(i).to_string()),
                offset: offset.is_valid(i).then(|| offset.value(i)),
                row: row.is_valid(i).then(|| row.value(i)),
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_parts_round_trip() {
        let rows = vec![
            IndexRow {
                index: 7,
                seed: 107,
                sha256: "ab".repeat(32),
                bytes: 812,
                file: "data/000001.tar".into(),
                member: Some("00000007.png".into()),
                offset: Some(1536),
                row: None,
            },
            IndexRow {
                index: 8,
                seed: u64::MAX,
                sha256: "cd".repeat(32),
                bytes: 1,
                file: "samples/00000008.png".into(),
                member: None,
                offset: None,
                row: Some(3),
            },
        ];
        let context = SampleContext {
            model: "m".into(),
            model_sha256: "00".repeat(32),
            scheduler: "ddim".into(),
            steps: 3,
            eta: 0.0,
            seed: 100,
            classes: None,
        };
        let bytes = write(&rows, &Writer { shard: 1, worker: "w".into(), attempt: 2 }, &context).unwrap();
        assert_eq!(read(bytes).unwrap(), rows);
    }
}
