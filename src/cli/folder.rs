//! The flags of image-folder datasets, shared by `train` and `experiment`.

use residual::data::{AutoAugment, FolderOptions, Mix, TrainTransform};

/// The automatic augmentation policies (torchvision's).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AutoAugmentArg {
    /// `TrivialAugmentWide(num_magnitude_bins)`.
    Trivial,
    /// `RandAugment(num_ops, magnitude, num_magnitude_bins)`.
    Rand,
}

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
    /// Training batches each worker prepares ahead.
    #[arg(long, default_value_t = 2)]
    prefetch: usize,
    /// RandomResizedCrop's range of the crop's share of the image area.
    #[arg(long, value_parser = parse_range, default_value = "0.08,1")]
    scale: Range,
    /// RandomResizedCrop's range of aspect ratios (width / height).
    #[arg(long, value_parser = parse_range, default_value = "0.75,1.3333333333333333")]
    ratio: Range,
    /// ColorJitter's brightness, contrast, saturation and optional hue strengths, e.g.
    /// 0.4,0.4,0.4 or 0.4,0.4,0.4,0.1 (hue <= 0.5).
    #[arg(long, value_parser = parse_jitter)]
    color_jitter: Option<Jitter>,
    /// TrivialAugmentWide or RandAugment after the flip (PIL ops, nearest, fill 0).
    #[arg(long, value_enum)]
    auto_augment: Option<AutoAugmentArg>,
    /// The magnitude bins of --auto-augment.
    #[arg(long, default_value_t = 31)]
    magnitude_bins: usize,
    /// RandAugment's number of ops per image.
    #[arg(long, default_value_t = 2)]
    rand_augment_ops: usize,
    /// RandAugment's magnitude bin.
    #[arg(long, default_value_t = 9)]
    rand_augment_magnitude: usize,
    /// Mixup on training batches: lam ~ Beta(ALPHA, ALPHA) (timm's mixup_alpha, e.g. 0.2).
    #[arg(long, value_name = "ALPHA")]
    mixup: Option<f64>,
    /// Cutmix on training batches: lam ~ Beta(ALPHA, ALPHA) (timm's cutmix_alpha, e.g. 1.0);
    /// with --mixup too, each batch picks one (cutmix with probability 0.5).
    #[arg(long, value_name = "ALPHA")]
    cutmix: Option<f64>,
}

/// `--color-jitter`'s 3 or 4 comma-separated strengths.
#[derive(Clone, Debug)]
pub struct Jitter(Vec<f64>);

fn parse_jitter(s: &str) -> Result<Jitter, String> {
    let v = s
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<Vec<f64>, String>>()?;
    if !(3..=4).contains(&v.len()) {
        return Err(format!(
            "expected brightness,contrast,saturation[,hue], got {} values",
            v.len()
        ));
    }
    Ok(Jitter(v))
}

/// `--scale` / `--ratio`: two comma-separated numbers, `low,high`.
#[derive(Clone, Copy, Debug)]
pub struct Range([f64; 2]);

fn parse_range(s: &str) -> Result<Range, String> {
    let v = s
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<Vec<f64>, String>>()?;
    match v[..] {
        [lo, hi] => Ok(Range([lo, hi])),
        _ => Err(format!("expected low,high, got {} values", v.len())),
    }
}

impl FolderArgs {
    /// The options; `augment`: a training transform (RandomResizedCrop, flips when `flip`,
    /// ColorJitter when asked) instead of the evaluation transform.
    pub fn options(&self, augment: bool, flip: bool) -> FolderOptions {
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
        o.prefetch = self.prefetch;
        o.train_transform = augment.then(|| TrainTransform {
            scale: self.scale.0,
            ratio: self.ratio.0,
            flip,
            color_jitter: self.color_jitter.as_ref().map(|j| [j.0[0], j.0[1], j.0[2]]),
            hue: self.color_jitter.as_ref().and_then(|j| j.0.get(3).copied()),
            mix: (self.mixup.is_some() || self.cutmix.is_some())
                .then(|| Mix::new(self.mixup.unwrap_or(0.0), self.cutmix.unwrap_or(0.0))),
            auto_augment: self.auto_augment.map(|a| match a {
                AutoAugmentArg::Trivial => AutoAugment::TrivialAugmentWide {
                    num_magnitude_bins: self.magnitude_bins,
                },
                AutoAugmentArg::Rand => AutoAugment::RandAugment {
                    num_ops: self.rand_augment_ops,
                    magnitude: self.rand_augment_magnitude,
                    num_magnitude_bins: self.magnitude_bins,
                },
            }),
        });
        o
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_two_comma_separated_numbers() {
        assert_eq!(parse_range("0.08,1").unwrap().0, [0.08, 1.0]);
        assert_eq!(
            parse_range("0.75, 1.3333333333333333").unwrap().0,
            [0.75, 4.0 / 3.0]
        );
        assert!(parse_range("0.08").unwrap_err().contains("got 1 values"));
        assert!(parse_range("0.08,x").is_err());
    }
}
