//! Image classification data: IDX (MNIST / Fashion-MNIST) and CIFAR-10/100 binary readers,
//! image-folder datasets (torchvision's `ImageFolder`), and batching with the ResNet paper's augmentation, on the training device.

mod augment;
mod batch;
mod folder;
mod formats;
mod mix;
mod pipeline;

pub use augment::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, adjust_sharpness,
    autocontrast, equalize, posterize, rotate, solarize, AugmentOp, AutoAugment,
};
pub use batch::{distributed_shard, Augment, Batches, Normalizer, SplitMix};
pub use folder::{
    decode_all, decode_rgb, default_workers, folder_splits, is_image_folder, FolderOptions,
    ImageFolder, IMG_EXTENSIONS,
};
pub use formats::{read_cifar, read_idx_pair, DataFormat};
pub use mix::{beta, mix_batch, Mix, MixDraw};
pub use pipeline::{
    batch_rng, random_resized_crop_params, resized_crop, sample_rng, EpochBatches, FolderStream,
    StreamBatches, TrainTransform,
};

use std::path::Path;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Fashion-MNIST as Debian's `dataset-fashion-mnist` installs it.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Images `[N, C, H, W]` uint8 and labels `[N]` int64.
#[derive(Debug)]
pub struct Dataset {
    pub images: Tensor,
    pub labels: Tensor,
    pub num_classes: i64,
}

impl Dataset {
    pub fn new(images: Tensor, labels: Tensor, num_classes: i64) -> Result<Self> {
        let n = images.size()[0];
        if images.dim() != 4 || images.kind() != Kind::Uint8 {
            bail!(
                "images must be uint8 [N, C, H, W], got {:?} {:?}",
                images.kind(),
                images.size()
            );
        }
        if labels.size() != [n] {
            bail!("{n} images but {:?} labels", labels.size());
        }
        if n > 0 {
            let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
            if lo < 0 || hi >= num_classes {
                bail!("labels span [{lo}, {hi}], outside [0, {num_classes})");
            }
        }
        Ok(Self {
            images,
            labels: labels.to_kind(Kind::Int64),
            num_classes,
        })
    }

    pub fn len(&self) -> i64 {
        self.images.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[C, H, W]` of one image.
    pub fn image_shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// The first `n` examples.
    pub fn take(&self, n: i64) -> Self {
        let n = n.min(self.len());
        Self {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
            num_classes: self.num_classes,
        }
    }

    /// Splits off the last `n` examples (e.g. a validation set).
    pub fn split_last(&self, n: i64) -> Result<(Self, Self)> {
        if n <= 0 || n >= self.len() {
            bail!("cannot hold out {n} of {} examples", self.len());
        }
        let keep = self.len() - n;
        let part = |start, len| Self {
            images: self.images.narrow(0, start, len),
            labels: self.labels.narrow(0, start, len),
            num_classes: self.num_classes,
        };
        Ok((part(0, keep), part(keep, n)))
    }

    /// The same data on `device` (moved once; batches are then cut there).
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            num_classes: self.num_classes,
        }
    }
}

/// Reads the train and test sets of `dir` in `format` (or the format its files show).
pub fn load(dir: &Path, format: Option<DataFormat>) -> Result<(Dataset, Dataset)> {
    let format = match format {
        Some(f) => f,
        None => DataFormat::detect(dir)?,
    };
    match format {
        DataFormat::Idx => {
            let train = read_idx_pair(dir, "train")?;
            let test = read_idx_pair(dir, "t10k")?;
            Ok((train, test))
        }
        DataFormat::Cifar10 | DataFormat::Cifar100 => read_cifar(dir, format),
        DataFormat::ImageFolder => bail!(
            "{} is an image folder: it is read with its transforms (FolderOptions), see \
             RunData::from_image_folder",
            dir.display()
        ),
    }
}
