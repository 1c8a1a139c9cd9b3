//! WebDataset tar parts: for each sample, a `<index:08>.<ext>` member with the encoded image and a
//! `<index:08>.json` member with its metadata, in sample order, as `webdataset.TarWriter` writes them
//! (the library groups consecutive members by the name before the first dot).
//!
//! Headers are deterministic (ustar, mode 0444, owner 0, the job's creation time), so a retried shard
//! writes the same bytes for the same images.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::index::IndexRow;
use super::{DatasetError, Encoded, ImageFormat, SampleContext};

/// A writer that hashes and counts what passes through it.
pub struct Hashing<W> {
    inner: W,
    sha: Sha256,
    written: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, sha: Sha256::new(), written: 0 }
    }

    pub fn position(&self) -> u64 {
        self.written
    }

    /// The inner writer, the SHA-256 (hex) and the size of everything written.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.sha.finalize()), self.written)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One tar part being written to a spool file.
pub struct TarPart {
    builder: tar::Builder<Hashing<BufWriter<File>>>,
    /// The part's path relative to the job's folder (for its index rows).
    path: String,
    ext: &'static str,
    mtime: u64,
    rows: Vec<IndexRow>,
}

/// A finished part: index rows, SHA-256 and size.
pub type Finished = (Vec<IndexRow>, String, u64);

impl TarPart {
    pub fn create(spool: &Path, path: String, image: ImageFormat, mtime: u64) -> std::io::Result<Self> {
        let file = File::create(spool)?;
        let mut builder = tar::Builder::new(Hashing::new(BufWriter::with_capacity(1 << 20, file)));
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(Self { builder, path, ext: image.extension(), mtime, rows: Vec::new() })
    }

    fn append(&mut self, name: &str, data: &[u8]) -> std::io::Result<u64> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o444);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.mtime);
        header.set_entry_type(tar::EntryType::Regular);
        // Names are 12–13 bytes: one 512-byte header, no long-name extension, so the data starts
        // right after it.
        let offset = self.builder.get_ref().position() + 512;
        self.builder.append_data(&mut header, name, data)?;
        Ok(offset)
    }

    pub fn push(&mut self, sample: &Encoded, ctx: &SampleContext) -> std::io::Result<()> {
        let member = format!("{:08}.{}", sample.index, self.ext);
        let offset = self.append(&member, &sample.bytes)?;
        self.append(&format!("{:08}.json", sample.index), &ctx.json(sample.index))?;
        // WebDataset's class member: the label as decimal text (its decoders read `.cls` as an int).
        if let Some((label, _)) = ctx.label(sample.index) {
            self.append(&format!("{:08}.cls", sample.index), label.to_string().as_bytes())?;
        }
        self.rows.push(IndexRow {
            index: sample.index,
            seed: sample.seed,
            sha256: crate::digest::sha256_hex(&sample.bytes),
            bytes: sample.bytes.len() as u64,
            file: self.path.clone(),
            member: Some(member),
            offset: Some(offset),
            row: None,
        });
        Ok(())
    }

    /// Writes the end-of-archive blocks and syncs the spool file.
    pub fn finish(self) -> std::io::Result<Finished> {
        let hashing = self.builder.into_inner()?;
        let (buf, sha, size) = hashing.finish();
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((self.rows, sha, size))
    }
}

/// The index rows of a stored tar part (read back from a local copy): every image member with the
/// SHA-256 of its stored bytes. Fails when the members are not exactly `first..end` in order.
pub fn read_rows(
    local: &Path,
    path: &str,
    image: ImageFormat,
    seed: u64,
    (first, end): (u64, u64),
) -> Result<Vec<IndexRow>, DatasetError> {
    let io = |source| DatasetError::Io { path: local.display().to_string(), source };
    let mut archive = tar::Archive::new(File::open(local).map_err(io)?);
    let mut rows = Vec::new();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let name = entry.path().map_err(io)?.to_string_lossy().into_owned();
        let Some((stem, ext)) = name.split_once('.') else { continue };
        if ext != image.extension() {
            continue;
        }
        let index: u64 =
            stem.parse().map_err(|_| DatasetError::Corrupt(format!("{path}: unexpected member {name}")))?;
        let offset = entry.raw_file_position();
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(io)?;
        rows.push(IndexRow {
            index,
            seed: seed + index,
            sha256: crate::digest::sha256_hex(&data),
            bytes: data.len() as u64,
            file: path.to_string(),
            member: Some(name),
            offset: Some(offset),
            row: None,
        });
    }
    super::check_covers(path, rows, (first, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_indexed_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("part");
        let ctx = SampleContext {
            model: "m".into(),
            model_sha256: "0".repeat(64),
            scheduler: "ddim".into(),
            steps: 2,
            eta: 0.0,
            seed: 100,
            classes: None,
        };
        let mut part =
            TarPart::create(&spool, "data/000000.tar".into(), ImageFormat::Png, 1_700_000_000).unwrap();
        for (index, len) in [(4u64, 3usize), (5, 700), (6, 512)] {
            let bytes = bytes::Bytes::from(vec![index as u8; len]);
            part.push(&Encoded { index, seed: 100 + index, bytes }, &ctx).unwrap();
        }
        let (rows, sha, size) = part.finish().unwrap();
        let stored = std::fs::read(&spool).unwrap();
        assert_eq!((crate::digest::sha256_hex(&stored), stored.len() as u64), (sha, size));
        for r in &rows {
            let at = r.offset.unwrap() as usize;
            assert_eq!(&stored[at..at + r.bytes as usize], vec![r.index as u8; r.bytes as usize].as_slice());
        }
        assert_eq!(read_rows(&spool, "data/000000.tar", ImageFormat::Png, 100, (4, 7)).unwrap(), rows);
        assert!(read_rows(&spool, "data/000000.tar", ImageFormat::Png, 100, (4, 8)).is_err());
    }
}
