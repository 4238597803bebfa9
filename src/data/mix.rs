//! Batch-level mixup and cutmix with soft targets, as timm's `Mixup(mixup_alpha, cutmix_alpha,
//! prob=1.0, switch_prob, mode="batch", correct_lam=True)`: one `lam ~ Beta(alpha, alpha)` per
//! batch, each image mixed with the image at the mirrored batch position (`x.flip(0)`); label
//! smoothing is applied by the loss (the same targets as timm's `mixup_target(..., smoothing)`).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::batch::SplitMix;

/// Mixup and/or cutmix strengths; an alpha of 0 turns that one off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// Mixup's Beta(alpha, alpha) (timm's `mixup_alpha`).
    pub mixup_alpha: f64,
    /// Cutmix's Beta(alpha, alpha) (timm's `cutmix_alpha`).
    pub cutmix_alpha: f64,
    /// With both on, the probability that a batch uses cutmix (timm's `switch_prob`, 0.5).
    pub switch_prob: f64,
}

/// What one batch draws: the weight of its own images and, for cutmix, the pasted box
/// `(top, bottom, left, right)` (rows `top..bottom`, columns `left..right`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixDraw {
    pub lam: f64,
    pub cutmix_box: Option<(usize, usize, usize, usize)>,
}

impl Mix {
    pub fn new(mixup_alpha: f64, cutmix_alpha: f64) -> Self {
        Self {
            mixup_alpha,
            cutmix_alpha,
            switch_prob: 0.5,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.mixup_alpha >= 0.0
                && self.cutmix_alpha >= 0.0
                && self.mixup_alpha.is_finite()
                && self.cutmix_alpha.is_finite()
                && self.mixup_alpha + self.cutmix_alpha > 0.0,
            "mixup and cutmix alphas must be >= 0, one of them > 0, got {} and {}",
            self.mixup_alpha,
            self.cutmix_alpha
        );
        ensure!(
            (0.0..=1.0).contains(&self.switch_prob),
            "the mixup/cutmix switch probability must be in [0, 1], got {}",
            self.switch_prob
        );
        Ok(())
    }

    /// timm's `_params_per_batch` and `cutmix_bbox_and_lam` for `height x width` images: for
    /// cutmix, a box of sides `int(side * sqrt(1 - lam))` centred on a uniform pixel, clipped
    /// to the image, and `lam` corrected to `1 - box area / image area`.
    pub fn draw(&self, height: usize, width: usize, rng: &mut SplitMix) -> MixDraw {
        let use_cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => uniform(rng) < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        let alpha = if use_cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        let lam = beta(alpha, rng);
        if !use_cutmix {
            return MixDraw {
                lam,
                cutmix_box: None,
            };
        }
        let ratio = (1.0 - lam).sqrt();
        let (cut_h, cut_w) = (
            (height as f64 * ratio) as usize,
            (width as f64 * ratio) as usize,
        );
        let cy = rng.below(height as u64) as usize;
        let cx = rng.below(width as u64) as usize;
        let top = cy.saturating_sub(cut_h / 2);
        let bottom = (cy + cut_h / 2).min(height);
        let left = cx.saturating_sub(cut_w / 2);
        let right = (cx + cut_w / 2).min(width);
        let area = (bottom - top) * (right - left);
        MixDraw {
            lam: 1.0 - area as f64 / (height * width) as f64,
            cutmix_box: Some((top, bottom, left, right)),
        }
    }
}

/// Mixes a batch of `labels.len()` images (`pixels`: `[B, C, H, W]` float32, `height x width`)
/// in place with its mirror (image `i` with image `B - 1 - i`) and returns the soft targets
/// `[B, num_classes]`: `lam * one_hot(y) + (1 - lam) * one_hot(y.flip(0))`.
pub fn mix_batch(
    pixels: &mut [f32],
    labels: &[i64],
    num_classes: usize,
    height: usize,
    width: usize,
    draw: MixDraw,
) -> Vec<f32> {
    let b = labels.len();
    let image = pixels.len() / b.max(1);
    let plane = height * width;
    let original = pixels.to_vec();
    let lam = draw.lam as f32;
    let rest = (1.0 - draw.lam) as f32;
    for i in 0..b {
        let j = b - 1 - i;
        let (dst, src) = (
            &mut pixels[i * image..(i + 1) * image],
            &original[j * image..(j + 1) * image],
        );
        match draw.cutmix_box {
            None => {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = *d * lam + *s * rest;
                }
            }
            Some((top, bottom, left, right)) => {
                for c in 0..image / plane {
                    for y in top..bottom {
                        let row = c * plane + y * width;
                        dst[row + left..row + right].copy_from_slice(&src[row + left..row + right]);
                    }
                }
            }
        }
    }
    let mut targets = vec![0f32; b * num_classes];
    for (i, &y) in labels.iter().enumerate() {
        let mirrored = labels[b - 1 - i];
        targets[i * num_classes + y as usize] += lam;
        targets[i * num_classes + mirrored as usize] += rest;
    }
    targets
}

/// Uniform in [0, 1) with 53 random bits.
fn uniform(rng: &mut SplitMix) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut SplitMix) -> f64 {
    let u = 1.0 - uniform(rng);
    let v = uniform(rng);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// A Gamma(`shape`, 1) draw: Marsaglia and Tsang's method, boosted for shapes below 1.
fn gamma(shape: f64, rng: &mut SplitMix) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - uniform(rng);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = uniform(rng);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A Beta(`alpha`, `alpha`) draw (`np.random.beta(alpha, alpha)`).
pub fn beta(alpha: f64, rng: &mut SplitMix) -> f64 {
    let x = gamma(alpha, rng);
    let y = gamma(alpha, rng);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        // Both underflowed (tiny alphas): Beta(a, a) puts half its mass near each end.
        f64::from(u8::from(uniform(rng) < 0.5))
    }
}
