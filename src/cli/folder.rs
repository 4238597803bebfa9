//! The flags of image-folder datasets, shared by `train` and `experiment`.

use residual::data::FolderOptions;

/// Image folders (one sub-folder of images per class, in `train/` and `val/`, or directly in
/// `--data`).
#[derive(clap::Args, Clone)]
pub struct FolderArgs {
    /// Side of the square network input for image folders.
    #[arg(long, default_value_t = 224)]
    image_size: i64,
    /// Shorter side before the evaluation center crop [default: image size / 0.875].
    #[arg(long)]
    eval_resize: Option<i64>,
    /// The share of the images held out for testing when the folder has no val/ or test/
    /// [default: 0.1].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Per-channel normalisation mean for image folders [default: ImageNet's].
    #[arg(long, value_delimiter = ',', num_args = 3)]
    image_mean: Option<Vec<f64>>,
    /// Per-channel normalisation std for image folders [default: ImageNet's].
    #[arg(long, value_delimiter = ',', num_args = 3)]
    image_std: Option<Vec<f64>>,
    /// Decoding threads [default: one per core].
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

impl FolderArgs {
    pub fn options(&self) -> FolderOptions {
        let mut o = FolderOptions::with_size(self.image_size);
        if let Some(r) = self.eval_resize {
            o.resize = r;
        }
        o.val_fraction = self.val_fraction;
        if let Some(m) = &self.image_mean {
            o.mean.clone_from(m);
        }
        if let Some(s) = &self.image_std {
            o.std.clone_from(s);
        }
        o.workers = self.workers;
        o
    }
}
