//! File formats: IDX (LeCun's MNIST format; Fashion-MNIST uses it), gzipped or not, and the
//! CIFAR-10 / CIFAR-100 binary versions.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::Dataset;

/// Which reader a data folder needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-*`.
    Idx,
    /// `data_batch_{1..5}.bin`, `test_batch.bin` (1 label byte + 3072 pixel bytes per record).
    Cifar10,
    /// `train.bin`, `test.bin` (coarse and fine label bytes + 3072 pixel bytes; fine labels used).
    Cifar100,
    /// One folder of images per class (torchvision's `ImageFolder`), in `train/` and `val/`
    /// (or `test/`), or directly in the folder (a share is then held out).
    ImageFolder,
}

impl DataFormat {
    /// The format whose files `dir` holds.
    pub fn detect(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("data folder {} does not exist", dir.display());
        }
        if find(dir, "train-images-idx3-ubyte").is_some() {
            Ok(DataFormat::Idx)
        } else if dir.join("data_batch_1.bin").exists() {
            Ok(DataFormat::Cifar10)
        } else if dir.join("train.bin").exists() && dir.join("test.bin").exists() {
            Ok(DataFormat::Cifar100)
        } else if super::is_image_folder(dir) {
            Ok(DataFormat::ImageFolder)
        } else {
            bail!(
                "{} holds neither IDX files (train-images-idx3-ubyte[.gz]), CIFAR binaries \
                 (data_batch_1.bin or train.bin) nor class folders of images; name the format \
                 with --format",
                dir.display()
            )
        }
    }
}

/// `dir/name` or `dir/name.gz`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.exists())
}

/// The bytes of a file, gunzipped when it is gzip.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is not valid gzip", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes: magic `0x00 0x00 0x08 ndim`, big-endian sizes, data.
pub fn parse_idx<'a>(bytes: &'a [u8], what: &str) -> Result<(Vec<i64>, &'a [u8])> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{what}: not an IDX file (bad magic number)");
    }
    if bytes[2] != 0x08 {
        bail!(
            "{what}: IDX element type 0x{:02x}, only unsigned bytes (0x08) are supported",
            bytes[2]
        );
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        bail!("{what}: truncated IDX header");
    }
    let dims: Vec<i64> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as i64)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d as usize))
        .context("IDX size overflows")?;
    let data = &bytes[header..];
    if data.len() != expected {
        bail!(
            "{what}: header says {dims:?} ({expected} bytes) but the file holds {} bytes",
            data.len()
        );
    }
    Ok((dims, data))
}

/// Reads `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]`.
pub fn read_idx_pair(dir: &Path, prefix: &str) -> Result<Dataset> {
    let images_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))
        .with_context(|| format!("{}: no {prefix}-images-idx3-ubyte[.gz]", dir.display()))?;
    let labels_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))
        .with_context(|| format!("{}: no {prefix}-labels-idx1-ubyte[.gz]", dir.display()))?;
    let image_bytes = read_maybe_gz(&images_path)?;
    let label_bytes = read_maybe_gz(&labels_path)?;
    let (dims, pixels) = parse_idx(&image_bytes, &images_path.display().to_string())?;
    let (ldims, labels) = parse_idx(&label_bytes, &labels_path.display().to_string())?;
    if dims.len() != 3 || ldims.len() != 1 {
        bail!(
            "{}: expected images [N, H, W] and labels [N], got {dims:?} and {ldims:?}",
            dir.display()
        );
    }
    if dims[0] != ldims[0] {
        bail!(
            "{}: {} images but {} labels",
            dir.display(),
            dims[0],
            ldims[0]
        );
    }
    let images = Tensor::from_slice(pixels).view([dims[0], 1, dims[1], dims[2]]);
    let labels = Tensor::from_slice(labels).to_kind(Kind::Int64);
    let classes = labels.max().int64_value(&[]).max(9) + 1;
    Dataset::new(images, labels, classes)
}

/// Reads CIFAR-10 (`data_batch_{1..5}.bin`, `test_batch.bin`) or CIFAR-100 (`train.bin`,
/// `test.bin`, fine labels).
pub fn read_cifar(dir: &Path, format: DataFormat) -> Result<(Dataset, Dataset)> {
    let (train_files, test_files, label_bytes, classes): (Vec<String>, Vec<String>, usize, i64) =
        match format {
            DataFormat::Cifar10 => (
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
                vec!["test_batch.bin".into()],
                1,
                10,
            ),
            DataFormat::Cifar100 => (vec!["train.bin".into()], vec!["test.bin".into()], 2, 100),
            DataFormat::Idx | DataFormat::ImageFolder => {
                bail!("read_cifar called for {format:?} data")
            }
        };
    let record = label_bytes + 3072;
    let read = |files: &[String]| -> Result<Dataset> {
        let mut labels = Vec::new();
        let mut pixels = Vec::new();
        for name in files {
            let path = dir.join(name);
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            if bytes.is_empty() || bytes.len() % record != 0 {
                bail!(
                    "{}: {} bytes is not a whole number of {record}-byte CIFAR records",
                    path.display(),
                    bytes.len()
                );
            }
            for rec in bytes.chunks_exact(record) {
                labels.push(rec[label_bytes - 1] as i64);
                pixels.extend_from_slice(&rec[label_bytes..]);
            }
        }
        let n = labels.len() as i64;
        Dataset::new(
            Tensor::from_slice(&pixels).view([n, 3, 32, 32]),
            Tensor::from_slice(&labels),
            classes,
        )
        .with_context(|| format!("in {}", dir.display()))
    };
    Ok((read(&train_files)?, read(&test_files)?))
}
