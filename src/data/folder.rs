//! Image-folder datasets as `torchvision.datasets.ImageFolder` reads them: one sub-folder per
//! class, classes indexed in sorted order, files of the same extensions in the same order; and
//! decoding to 8-bit RGB as `ImageOps.exif_transpose(Image.open(f)).convert("RGB")`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, ensure, Context, Result};
use image::{DynamicImage, ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::batch::SplitMix;
use super::pipeline::TrainTransform;
use super::Dataset;
use crate::preprocess::{
    CropMode, Interpolation, Pipeline, Preprocess, Resize, RgbImage, IMAGENET_MEAN, IMAGENET_STD,
};

/// How an image-folder dataset becomes network inputs; saved in `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderOptions {
    /// Side of the square input the network sees in training and evaluation.
    pub image_size: i64,
    /// Shorter side before the evaluation center crop (torchvision's `Resize`).
    pub resize: i64,
    /// The share of the images held out for testing when the folder has no `val/` or `test/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f64>,
    /// Per-channel normalisation (ImageNet's by default, as pretrained weights expect).
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Decoding threads; 0: one per core. The results do not depend on it.
    #[serde(default)]
    pub workers: usize,
    /// Training batches each worker may prepare ahead.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// The training transform, applied to the decoded images by worker threads each epoch;
    /// without it the training images go through the evaluation transform once, in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_transform: Option<TrainTransform>,
}

fn default_prefetch() -> usize {
    2
}

impl Default for FolderOptions {
    fn default() -> Self {
        Self::with_size(224)
    }
}

impl FolderOptions {
    /// Input `size`, resized to `floor(size / 0.875)` for evaluation (256 for 224).
    pub fn with_size(size: i64) -> Self {
        Self {
            image_size: size,
            resize: (size as f64 / 0.875).floor() as i64,
            val_fraction: None,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            workers: 0,
            prefetch: default_prefetch(),
            train_transform: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.image_size >= 1 && self.resize >= self.image_size,
            "image size {} and resize {}: the size must be at least 1 and the resize at least the size",
            self.image_size,
            self.resize
        );
        if let Some(f) = self.val_fraction {
            ensure!(
                f > 0.0 && f < 1.0,
                "val_fraction must be between 0 and 1, got {f}"
            );
        }
        if let Some(t) = &self.train_transform {
            t.validate()?;
        }
        self.eval_preprocess().validate()
    }

    /// The evaluation transform, as torchvision's `Resize(resize)`, `CenterCrop(image_size)`,
    /// `ToTensor()`, `Normalize(mean, std)` on a PIL image (bilinear, Pillow's resampling).
    pub fn eval_preprocess(&self) -> Preprocess {
        Preprocess {
            input_size: [3, self.image_size, self.image_size],
            interpolation: Interpolation::Bilinear,
            crop_pct: self.image_size as f64 / self.resize as f64,
            crop_mode: CropMode::Center,
            resize: Some(Resize::ShorterSide(self.resize)),
            mean: self.mean.clone(),
            std: self.std.clone(),
            rescale_factor: 1.0 / 255.0,
            normalize: true,
            pipeline: Pipeline::Timm,
        }
    }

    /// The decoding threads to start.
    pub fn threads(&self) -> usize {
        if self.workers == 0 {
            default_workers()
        } else {
            self.workers
        }
    }
}

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively at the end of the path.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// Image files and their class indices.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    /// Class names; a class's index is its position (sorted, as `find_classes`).
    pub classes: Vec<String>,
    /// `(path, class index)` in `make_dataset`'s order.
    pub samples: Vec<(PathBuf, i64)>,
}

impl ImageFolder {
    /// The classes and samples of `root` as `ImageFolder(root)` lists them: classes are the
    /// sorted names of its sub-folders; each class's files are walked recursively (symbolic
    /// links followed), folders in sorted path order and files sorted within each, keeping those
    /// whose lowercased path ends in one of [`IMG_EXTENSIONS`]. A class without such files is an
    /// error, as in torchvision.
    pub fn scan(root: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(root)
            .with_context(|| format!("cannot read image folder {}", root.display()))?;
        let mut classes = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", root.display()))?;
            // `entry.is_dir()` in Python follows symbolic links.
            if entry.path().is_dir() {
                classes.push(entry.file_name());
            }
        }
        classes.sort();
        ensure!(
            !classes.is_empty(),
            "{} has no class sub-folders (expected one folder of images per class)",
            root.display()
        );
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (index, class) in classes.iter().enumerate() {
            let mut dirs = Vec::new();
            walk(&root.join(class), &mut dirs)?;
            // sorted(os.walk(...)): by the folder's path string.
            dirs.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
            let before = samples.len();
            for (_, mut files) in dirs {
                files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
                samples.extend(
                    files
                        .into_iter()
                        .filter(|p| has_image_extension(p))
                        .map(|p| (p, index as i64)),
                );
            }
            if samples.len() == before {
                empty.push(class.to_string_lossy().into_owned());
            }
        }
        if !empty.is_empty() {
            bail!(
                "{}: found no valid file for the classes {}. Supported extensions are: {}",
                root.display(),
                empty.join(", "),
                IMG_EXTENSIONS.join(", ")
            );
        }
        let classes = classes
            .into_iter()
            .map(|c| {
                c.into_string()
                    .map_err(|c| anyhow::anyhow!("class folder name {c:?} is not UTF-8"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { classes, samples })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples at `indices`, with the same classes.
    pub fn select(&self, indices: &[usize]) -> Self {
        Self {
            classes: self.classes.clone(),
            samples: indices.iter().map(|&i| self.samples[i].clone()).collect(),
        }
    }

    /// `n` images drawn at random (seeded), in the folder's order; all of them when `n` is not
    /// smaller.
    pub fn sample(&self, n: usize, seed: u64) -> Self {
        if n >= self.len() {
            return self.clone();
        }
        let mut order = seeded_order(self.len(), seed, 0x5_a3b1e);
        order.truncate(n);
        order.sort_unstable();
        self.select(&order)
    }

    /// A seeded random split: `(kept, held out)` with `round(fraction * len)` held out, each
    /// part in the folder's order.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Self, Self)> {
        ensure!(
            fraction > 0.0 && fraction < 1.0,
            "the held-out fraction must be between 0 and 1, got {fraction}"
        );
        let n = self.len();
        let held = (fraction * n as f64).round() as usize;
        ensure!(
            held >= 1 && held < n,
            "holding out {fraction} of {n} images leaves no images on one side"
        );
        let order = seeded_order(n, seed, 0x5_0117);
        let (mut keep, mut out) = (order[..n - held].to_vec(), order[n - held..].to_vec());
        keep.sort_unstable();
        out.sort_unstable();
        Ok((self.select(&keep), self.select(&out)))
    }
}

/// A permutation of `0..n` drawn from `(seed, stream)` (Fisher-Yates).
fn seeded_order(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix::new(seed, stream);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

/// Every folder under `dir` (itself included) with the non-folder entries it holds, as
/// `os.walk(dir, followlinks=True)` gives them.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<PathBuf>)>) -> Result<()> {
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read folder {}", dir.display()))?
            .path();
        if path.is_dir() {
            subdirs.push(path);
        } else {
            files.push(path);
        }
    }
    out.push((dir.to_path_buf(), files));
    for sub in subdirs {
        walk(&sub, out)?;
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    let lower = path.to_string_lossy().to_lowercase();
    IMG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// Whether `dir` looks like an image-folder dataset: `train/` (with class folders), or class
/// folders directly.
pub fn is_image_folder(dir: &Path) -> bool {
    let has_subdirs = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|mut it| it.any(|e| e.is_ok_and(|e| e.path().is_dir())))
    };
    dir.join("train").is_dir() || has_subdirs(dir)
}

/// The training and held-out parts of an image-folder dataset: `DIR/train` and `DIR/val` (or
/// `DIR/test`), whose class lists must agree; or, when `DIR` holds the class folders itself, a
/// seeded split holding out `holdout` of the images.
pub fn folder_splits(
    dir: &Path,
    holdout: Option<f64>,
    seed: u64,
) -> Result<(ImageFolder, ImageFolder)> {
    let train_dir = dir.join("train");
    if train_dir.is_dir() {
        let test_dir = ["val", "test"]
            .iter()
            .map(|n| dir.join(n))
            .find(|d| d.is_dir());
        let train = ImageFolder::scan(&train_dir)?;
        let test = match (test_dir, holdout) {
            (Some(d), _) => ImageFolder::scan(&d)?,
            (None, Some(f)) => return train.split(f, seed),
            (None, None) => bail!(
                "{} has train/ but no val/ or test/: add one, or hold out a fraction of train/ \
                 with --val-fraction",
                dir.display()
            ),
        };
        ensure!(
            train.classes == test.classes,
            "{}: the class folders of train/ ({}) and of the held-out split ({}) differ",
            dir.display(),
            train.classes.join(", "),
            test.classes.join(", ")
        );
        return Ok((train, test));
    }
    let all = ImageFolder::scan(dir)?;
    all.split(holdout.unwrap_or(0.1), seed)
}

/// Decodes an image file to 8-bit RGB as `ImageOps.exif_transpose(Image.open(path)).convert("RGB")`
/// does: the EXIF orientation applied, grey replicated to three channels, alpha dropped (not
/// composited), palettes expanded. 16-bit PNGs follow Pillow's modes: colour keeps the high byte
/// of each sample, grey is clipped to 255 (Pillow's `I;16` to `RGB`). JPEG decoders differ
/// between libraries by a few grey levels; PNG, BMP, PPM/PGM and lossless WebP give Pillow's
/// pixels exactly.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let decode = || -> Result<RgbImage> {
        let mut decoder = ImageReader::open(path)?
            .with_guessed_format()?
            .into_decoder()?;
        let orientation = decoder.orientation()?;
        let mut image = DynamicImage::from_decoder(decoder)?;
        image.apply_orientation(orientation);
        let (width, height) = (image.width() as usize, image.height() as usize);
        let data = match image {
            DynamicImage::ImageLuma16(grey) => grey
                .into_raw()
                .into_iter()
                .flat_map(|v| [v.min(255) as u8; 3])
                .collect(),
            DynamicImage::ImageLumaA16(_)
            | DynamicImage::ImageRgb16(_)
            | DynamicImage::ImageRgba16(_) => image
                .into_rgba16()
                .into_raw()
                .chunks_exact(4)
                .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
                .collect(),
            other => other.into_rgb8().into_raw(),
        };
        ensure!(width >= 1 && height >= 1, "empty image {width}x{height}");
        Ok(RgbImage {
            height,
            width,
            data,
        })
    };
    decode().with_context(|| format!("cannot decode image {}", path.display()))
}

/// Worker threads for decoding: the machine's cores, at most 16.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(16))
}

/// Every image of `folder` decoded and put through `preprocess`'s resize and center crop (the
/// evaluation transform), on `workers` threads: uint8 `[N, 3, H, W]` in the folder's order.
/// Files that cannot be decoded are reported on stderr by path and left out; their paths are
/// returned.
pub fn decode_all(
    folder: &ImageFolder,
    preprocess: &Preprocess,
    workers: usize,
) -> Result<(Dataset, Vec<PathBuf>)> {
    preprocess.validate()?;
    let [_, h, w] = preprocess.input_size;
    let next = AtomicUsize::new(0);
    let n = folder.len();
    let mut results: Vec<Option<Result<Vec<u8>>>> = (0..n).map(|_| None).collect();
    let chunks: Vec<Vec<(usize, Result<Vec<u8>>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return done;
                        }
                        let path = &folder.samples[i].0;
                        let pixels = decode_rgb(path)
                            .and_then(|image| preprocess.pixels(&image))
                            .map(|p| to_chw_bytes(&p));
                        done.push((i, pixels));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a decoding thread panicked"))
            .collect()
    });
    for (i, r) in chunks.into_iter().flatten() {
        results[i] = Some(r);
    }
    let mut pixels = Vec::with_capacity(n * (3 * h * w) as usize);
    let mut labels = Vec::with_capacity(n);
    let mut skipped = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (path, label) = &folder.samples[i];
        match r.expect("every index is decoded once") {
            Ok(p) => {
                pixels.extend_from_slice(&p);
                labels.push(*label);
            }
            Err(e) => {
                eprintln!("skipping {}: {e:#}", path.display());
                skipped.push(path.clone());
            }
        }
    }
    let images = Tensor::from_slice(&pixels).view([labels.len() as i64, 3, h, w]);
    let data = Dataset::new(
        images,
        Tensor::from_slice(&labels),
        folder.classes.len() as i64,
    )?;
    Ok((data, skipped))
}

/// `H x W x 3` bytes to `3 x H x W`.
pub(crate) fn to_chw_bytes(image: &RgbImage) -> Vec<u8> {
    let plane = image.height * image.width;
    let mut out = vec![0u8; 3 * plane];
    for (p, px) in image.data.chunks_exact(3).enumerate() {
        out[p] = px[0];
        out[plane + p] = px[1];
        out[2 * plane + p] = px[2];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_match_case_insensitively() {
        assert!(has_image_extension(Path::new("a/B.JPG")));
        assert!(has_image_extension(Path::new("a/b.tiff")));
        assert!(has_image_extension(Path::new("a/b.webp")));
        assert!(!has_image_extension(Path::new("a/b.gif")));
        assert!(!has_image_extension(Path::new("a/jpg")));
    }
}
