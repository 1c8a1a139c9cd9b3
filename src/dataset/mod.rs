//! A job's samples as a dataset: how images are encoded ([`Encoding`]), how they are laid out
//! ([`DataFormat`]: one object per sample, WebDataset tars, or Hugging Face image Parquet files) and the
//! Parquet index every layout gets ([`index`]).
//!
//! Data files split a shard into parts of a fixed number of samples ([`DatasetOptions::samples_per_file`],
//! chosen at submission from the target size and an upper bound of a sample's encoded size), so a part's
//! key names the same samples on every attempt and on every device: a retry that finds a part already
//! stored keeps it and indexes what is stored ([`sink`]).

pub mod index;
pub mod parquet;
pub mod sink;
pub mod tar;

use bytes::Bytes;
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::imaging::ImageError;
use index::IndexRow;

/// How a job's samples are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One object per sample, `samples/<index:08>.<ext>`.
    #[default]
    Files,
    /// Tar shards `data/<shard:06>[-<part:03>].tar` with members `<index:08>.<ext>` and `<index:08>.json`.
    Webdataset,
    /// Parquet files `data/<shard:06>[-<part:03>].parquet` in Hugging Face's image layout.
    Parquet,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Files => "files",
            DataFormat::Webdataset => "webdataset",
            DataFormat::Parquet => "parquet",
        }
    }

    /// The kind of data file a layout packs its samples into; `None` for one object per sample.
    pub fn parts(self) -> Option<PartKind> {
        match self {
            DataFormat::Files => None,
            DataFormat::Webdataset => Some(PartKind::Tar),
            DataFormat::Parquet => Some(PartKind::Parquet),
        }
    }
}

/// A data file kind: how its parts are written ([`sink`]), typed and read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// A WebDataset tar ([`tar`]).
    Tar,
    /// A Hugging Face image Parquet file ([`parquet`]).
    Parquet,
}

impl PartKind {
    pub fn content_type(self) -> &'static str {
        match self {
            PartKind::Tar => "application/x-tar",
            PartKind::Parquet => PARQUET_CONTENT_TYPE,
        }
    }
}

/// Parquet files' media type (data parts and index parts).
pub const PARQUET_CONTENT_TYPE: &str = "application/vnd.apache.parquet";

/// How each sample's pixels are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    /// Lossless WebP: the decoded pixels equal the PNG's (WebP has no grayscale mode: a one-channel
    /// sample comes back with its gray value in R, G and B).
    Webp,
    /// Lossy, at [`Encoding::quality`].
    Jpeg,
}

impl ImageFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Webp => "webp",
            ImageFormat::Jpeg => "jpg",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Jpeg => "image/jpeg",
        }
    }
}

/// PNG deflate level when none is asked for: fast, since a dataset image is written once.
pub const DEFAULT_PNG_LEVEL: u8 = 0;
pub const DEFAULT_JPEG_QUALITY: u8 = 95;
/// Default target size of a data file (WebDataset's and Hugging Face's usual shard sizes are
/// 100 MB – 1 GB; this one keeps a part in a single S3 multipart upload of 32 parts).
pub const DEFAULT_TARGET_FILE_BYTES: u64 = 256 << 20;
/// Data file sizes accepted (64 KiB lets tests split small jobs into several parts).
pub const TARGET_FILE_BYTES: std::ops::RangeInclusive<u64> = (64 << 10)..=(4 << 30);
/// Rows per Parquet row group of image data, as `datasets` writes image datasets
/// (`config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS`): small enough to stream.
pub const PARQUET_ROWS_PER_GROUP: u64 = 100;

/// How one image is encoded. Every encoder here is deterministic: identical pixels give identical
/// bytes, so a retried shard writes what the first attempt wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoding {
    pub image: ImageFormat,
    /// PNG deflate level: 0 is the fast default, 1–9 zlib's levels.
    #[serde(default)]
    pub png_level: u8,
    /// JPEG quality, 1–100.
    #[serde(default = "default_quality")]
    pub quality: u8,
}

fn default_quality() -> u8 {
    DEFAULT_JPEG_QUALITY
}

impl Default for Encoding {
    fn default() -> Self {
        Self { image: ImageFormat::Png, png_level: DEFAULT_PNG_LEVEL, quality: DEFAULT_JPEG_QUALITY }
    }
}

impl Encoding {
    pub fn encode(&self, img: &DynamicImage) -> Result<Bytes, ImageError> {
        use image::ImageEncoder;
        let mut out = Vec::with_capacity(img.as_bytes().len() / 2);
        let (w, h, color) = (img.width(), img.height(), img.color().into());
        match self.image {
            ImageFormat::Png => {
                use image::codecs::png::{CompressionType, FilterType, PngEncoder};
                let level = match self.png_level {
                    0 => CompressionType::Fast,
                    n => CompressionType::Level(n.min(9)),
                };
                PngEncoder::new_with_quality(&mut out, level, FilterType::Adaptive).write_image(
                    img.as_bytes(),
                    w,
                    h,
                    color,
                )?
            }
            ImageFormat::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out).write_image(
                img.as_bytes(),
                w,
                h,
                color,
            )?,
            ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, self.quality)
                .write_image(img.as_bytes(), w, h, color)?,
        }
        Ok(out.into())
    }

    /// An upper bound of one encoded sample's size, used to size data files: lossless encoders store
    /// noise-like pixels at about their raw size (plus a filter byte per row and block overhead); JPEG
    /// at quality ≤ 95 stays well under a quarter of it.
    pub fn size_bound(&self, (channels, height, width): (u64, u64, u64)) -> u64 {
        let raw = channels * height * width;
        match self.image {
            ImageFormat::Png | ImageFormat::Webp => raw + height + raw / 64 + 1024,
            ImageFormat::Jpeg if self.quality > 95 => raw + 1024,
            ImageFormat::Jpeg => raw / 4 + 1024,
        }
    }
}

/// A job's dataset layout, fixed at submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetOptions {
    pub format: DataFormat,
    #[serde(flatten)]
    pub encoding: Encoding,
    pub target_file_bytes: u64,
    /// Samples per data file (`webdataset`, `parquet`), from the target size and
    /// [`Encoding::size_bound`]: parts of lossless images stay under the target.
    pub samples_per_file: u64,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self::new(DataFormat::Files, Encoding::default(), DEFAULT_TARGET_FILE_BYTES, (3, 32, 32), 1)
    }
}

/// Bytes a tar member costs beyond its data: its header and the padding to 512 bytes, twice (image and
/// JSON), plus the JSON itself.
const TAR_OVERHEAD: u64 = 4 * 512 + 512;

impl DatasetOptions {
    /// Options for samples of `shape` (channels, height, width) sampled in batches of `batch_size`: a
    /// file holds whole batches (at least one), so a shard of one file's worth of batches writes one file.
    pub fn new(
        format: DataFormat,
        encoding: Encoding,
        target_file_bytes: u64,
        shape: (u64, u64, u64),
        batch_size: u64,
    ) -> Self {
        let per_sample = encoding.size_bound(shape) + TAR_OVERHEAD;
        let batch = batch_size.max(1);
        let samples_per_file = (target_file_bytes / per_sample / batch).max(1) * batch;
        Self { format, encoding, target_file_bytes, samples_per_file }
    }

    /// The data file parts of a shard covering `start..end`: `(part, first, end)`.
    pub fn parts(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let per = self.samples_per_file.max(1);
        (0..(end - start).div_ceil(per))
            .map(|p| (p, start + p * per, (start + (p + 1) * per).min(end)))
            .collect()
    }

    /// The path of part `part` of shard `shard`, relative to the job's folder; a shard of one part has
    /// no part suffix.
    pub fn data_path(&self, shard: u64, part: u64, parts: usize) -> String {
        let ext = match self.format {
            DataFormat::Webdataset => "tar",
            DataFormat::Parquet | DataFormat::Files => "parquet",
        };
        if parts <= 1 { format!("data/{shard:06}.{ext}") } else { format!("data/{shard:06}-{part:03}.{ext}") }
    }
}

/// The path of sample `index` in the `files` layout, relative to its folder: the index in 8 digits, so
/// names sort in sample order.
pub fn sample_path(index: u64, image: ImageFormat) -> String {
    format!("samples/{index:08}.{}", image.extension())
}

/// A labelled sample's object in the `files` layout: `samples/<class name>/<index:08>.<ext>`, the
/// folder per class that `ImageFolder`-style loaders read.
pub fn labelled_sample_path(index: u64, class_name: &str, image: ImageFormat) -> String {
    format!("samples/{class_name}/{index:08}.{}", image.extension())
}

/// The path of shard `shard`'s index part, relative to the job's folder.
pub fn index_path(shard: u64) -> String {
    format!("index/part-{shard:06}.parquet")
}

/// What is known of every sample of a job besides its pixels: its WebDataset `.json` member, and
/// columns of the Parquet layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleContext {
    pub model: String,
    pub model_sha256: String,
    pub scheduler: String,
    pub steps: u32,
    pub eta: f32,
    /// The job's seed: sample `i` has seed `seed + i`.
    pub seed: u64,
    /// Each sample's class, for a class-conditional model's job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<crate::classes::ClassSpec>,
}

impl SampleContext {
    /// The `.json` member of sample `index`.
    pub fn json(&self, index: u64) -> Vec<u8> {
        let mut value = serde_json::json!({
            "index": index,
            "seed": self.seed + index,
            "model": {"name": self.model, "sha256": self.model_sha256},
            "scheduler": self.scheduler,
            "steps": self.steps,
            "eta": self.eta,
        });
        if let (Some((label, name)), Some(map)) = (self.label(index), value.as_object_mut()) {
            map.insert("label".into(), label.into());
            map.insert("label_name".into(), name.into());
        }
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// Sample `index`'s class and its name; `None` for an unconditional job.
    pub fn label(&self, index: u64) -> Option<(u32, String)> {
        let classes = self.classes.as_ref()?;
        let class = classes.class_of(index)?;
        Some((class, classes.name_of(class)))
    }

    /// The class names of the `ClassLabel` feature of labelled Parquet parts.
    pub fn class_names(&self) -> Option<Vec<String>> {
        self.classes.as_ref().map(crate::classes::ClassSpec::names_through_highest)
    }
}

/// One encoded sample on its way to a data file.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub index: u64,
    pub seed: u64,
    pub bytes: Bytes,
}

/// One data file or index part as stored: where (relative to the job's folder), its SHA-256 and size,
/// and the samples it holds (`first..end`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub first: u64,
    pub end: u64,
}

/// `rows` if they are exactly samples `first..end` in order; what `what` (a data file, or a shard's
/// index) holds otherwise.
fn check_covers(
    what: &str,
    rows: Vec<IndexRow>,
    (first, end): (u64, u64),
) -> Result<Vec<IndexRow>, DatasetError> {
    if rows.iter().map(|r| r.index).ne(first..end) {
        return Err(DatasetError::Corrupt(format!(
            "{what} holds {} samples, not each of samples {first}..{end} once in order",
            rows.len()
        )));
    }
    Ok(rows)
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("parquet: {0}")]
    Parquet(String),
    /// A stored object does not hold what its key promises.
    #[error("{0}")]
    Corrupt(String),
}

impl From<::parquet::errors::ParquetError> for DatasetError {
    fn from(e: ::parquet::errors::ParquetError) -> Self {
        DatasetError::Parquet(e.to_string())
    }
}

impl From<arrow_schema::ArrowError> for DatasetError {
    fn from(e: arrow_schema::ArrowError) -> Self {
        DatasetError::Parquet(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: u32, h: u32, gray: bool) -> DynamicImage {
        let n = (w * h * if gray { 1 } else { 3 }) as usize;
        let px: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        if gray {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, px).unwrap())
        } else {
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, px).unwrap())
        }
    }

    #[test]
    fn lossless_encodings_decode_to_the_same_pixels_and_are_deterministic() {
        for gray in [false, true] {
            let img = noise(32, 24, gray);
            for enc in [
                Encoding::default(),
                Encoding { png_level: 9, ..Encoding::default() },
                Encoding { image: ImageFormat::Webp, ..Encoding::default() },
            ] {
                let bytes = enc.encode(&img).unwrap();
                assert_eq!(bytes, enc.encode(&img).unwrap(), "{enc:?} is deterministic");
                let back = image::load_from_memory(&bytes).unwrap();
                if gray && enc.image == ImageFormat::Webp {
                    // WebP has no grayscale mode: the gray value comes back in each of R, G and B.
                    let rgb = back.to_rgb8();
                    assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
                    assert_eq!(back.to_luma8().as_raw(), img.as_bytes(), "{enc:?} gray={gray}");
                } else {
                    assert_eq!(back.as_bytes(), img.as_bytes(), "{enc:?} gray={gray}");
                }
                assert!(bytes.len() as u64 <= enc.size_bound((if gray { 1 } else { 3 }, 24, 32)));
            }
            let jpeg = Encoding { image: ImageFormat::Jpeg, quality: 80, ..Encoding::default() };
            let back = image::load_from_memory(&jpeg.encode(&img).unwrap()).unwrap();
            assert_eq!((back.width(), back.height()), (32, 24));
        }
    }

    #[test]
    fn parts_split_a_shard_by_sample_count() {
        let opts = DatasetOptions { samples_per_file: 4, ..DatasetOptions::default() };
        assert_eq!(opts.parts(10, 20), [(0, 10, 14), (1, 14, 18), (2, 18, 20)]);
        assert_eq!(opts.parts(0, 3), [(0, 0, 3)]);
        let tar = DatasetOptions { format: DataFormat::Webdataset, ..opts };
        assert_eq!(tar.data_path(7, 0, 1), "data/000007.tar");
        assert_eq!(tar.data_path(7, 2, 3), "data/000007-002.tar");
    }

    #[test]
    fn parts_of_lossless_images_stay_under_the_target() {
        let opts =
            DatasetOptions::new(DataFormat::Webdataset, Encoding::default(), 256 << 20, (3, 256, 256), 1);
        assert!(opts.samples_per_file > 1000, "{}", opts.samples_per_file);
        let per = Encoding::default().size_bound((3, 256, 256)) + TAR_OVERHEAD;
        assert!(opts.samples_per_file * per <= 256 << 20);
        let tiny = DatasetOptions::new(DataFormat::Parquet, Encoding::default(), 1, (3, 256, 256), 1);
        assert_eq!(tiny.samples_per_file, 1);
        let batched =
            DatasetOptions::new(DataFormat::Webdataset, Encoding::default(), 256 << 20, (3, 256, 256), 64);
        assert_eq!(batched.samples_per_file, opts.samples_per_file / 64 * 64);
    }
}
