//! torchvision's PIL colour and geometry operations on 8-bit RGB images (`ImageEnhance`,
//! `ImageOps`, `Image.transform` with nearest sampling, PIL's HSV conversions), and the
//! automatic augmentations built on them: `TrivialAugmentWide` and `RandAugment`
//! (torchvision.transforms.autoaugment, PIL path, nearest interpolation, fill 0).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::batch::SplitMix;
use crate::preprocess::RgbImage;

/// PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
pub(crate) fn luma(px: &[u8]) -> u8 {
    ((19595 * px[0] as u32 + 38470 * px[1] as u32 + 7471 * px[2] as u32 + 0x8000) >> 16) as u8
}

/// PIL's `Image.blend(degenerate, image, factor)`: `d + factor * (x - d)` in float32, clipped,
/// truncated.
pub(crate) fn blend(x: u8, degenerate: u8, factor: f32) -> u8 {
    let v = degenerate as f32 + factor * (x as f32 - degenerate as f32);
    v.clamp(0.0, 255.0) as u8
}

/// `F.adjust_brightness`: blends with black.
pub fn adjust_brightness(image: &RgbImage, factor: f32) -> RgbImage {
    map_pixels(image, |v| blend(v, 0, factor))
}

/// `F.adjust_contrast`: blends with the rounded mean grey level.
pub fn adjust_contrast(image: &RgbImage, factor: f32) -> RgbImage {
    let n = (image.width * image.height).max(1) as f64;
    let sum: f64 = image.data.chunks_exact(3).map(|p| luma(p) as f64).sum();
    let mean = (sum / n + 0.5) as u8;
    map_pixels(image, |v| blend(v, mean, factor))
}

/// `F.adjust_saturation`: blends with the image's grey version.
pub fn adjust_saturation(image: &RgbImage, factor: f32) -> RgbImage {
    let mut out = image.clone();
    for px in out.data.chunks_exact_mut(3) {
        let g = luma(px);
        px.iter_mut().for_each(|v| *v = blend(*v, g, factor));
    }
    out
}

/// `F.adjust_hue` (`hue_factor` in [-0.5, 0.5]): PIL's RGB to HSV, the hue byte shifted by
/// `int(hue_factor * 255)` modulo 256, back to RGB.
pub fn adjust_hue(image: &RgbImage, hue_factor: f64) -> RgbImage {
    let shift = ((hue_factor * 255.0) as i32) as u8;
    let mut out = image.clone();
    for px in out.data.chunks_exact_mut(3) {
        let [h, s, v] = rgb_to_hsv(px);
        px.copy_from_slice(&hsv_to_rgb(h.wrapping_add(shift), s, v));
    }
    out
}

/// Pillow's `rgb2hsv_row` (Convert.c), float32 and float64 steps as in C.
fn rgb_to_hsv(px: &[u8]) -> [u8; 3] {
    let (r, g, b) = (px[0], px[1], px[2]);
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32;
    let clip8 = |v: f64| (v as i32).clamp(0, 255) as u8;
    [clip8(h as f64 * 255.0), clip8(s as f64 * 255.0), maxc]
}

/// Pillow's `hsv2rgb` (Convert.c).
fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let h6 = h as f32 as f64 * 6.0 / 255.0;
    let i = h6.floor() as i32;
    let f = (h6 - i as f32 as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let clip8 = |x: f64| (x.round() as i32).clamp(0, 255) as u8;
    let p = clip8(vf * (1.0 - fs as f64));
    let q = clip8(vf * (1.0 - (fs * f) as f64));
    let t = clip8(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// `F.adjust_sharpness`: blends with PIL's `ImageFilter.SMOOTH` (3x3 kernel 1,1,1,1,5,1,1,1,1
/// / 13 in float32, rounded by a 0.5 offset; the border pixels are kept).
pub fn adjust_sharpness(image: &RgbImage, factor: f32) -> RgbImage {
    let (h, w) = (image.height, image.width);
    let mut smooth = image.data.clone();
    if h >= 3 && w >= 3 {
        let (k1, k5) = (1.0f32 / 13.0, 5.0f32 / 13.0);
        let at = |y: usize, x: usize, c: usize| image.data[(y * w + x) * 3 + c] as f32;
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                for c in 0..3 {
                    let row = |yy: usize, mid: f32| {
                        at(yy, x - 1, c) * k1 + at(yy, x, c) * mid + at(yy, x + 1, c) * k1
                    };
                    let mut ss = 0.5f32;
                    ss += row(y + 1, k1);
                    ss += row(y, k5);
                    ss += row(y - 1, k1);
                    smooth[(y * w + x) * 3 + c] = ss.clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    let data = image
        .data
        .iter()
        .zip(&smooth)
        .map(|(&x, &d)| blend(x, d, factor))
        .collect();
    RgbImage {
        data,
        ..image.clone()
    }
}

fn map_pixels(image: &RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    RgbImage {
        data: image.data.iter().map(|&v| f(v)).collect(),
        ..image.clone()
    }
}

/// One look-up table per channel (`Image.point` on RGB).
fn apply_luts(image: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = image.clone();
    for px in out.data.chunks_exact_mut(3) {
        for (c, v) in px.iter_mut().enumerate() {
            *v = luts[c][*v as usize];
        }
    }
    out
}

fn histograms(image: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in image.data.chunks_exact(3) {
        for c in 0..3 {
            h[c][px[c] as usize] += 1;
        }
    }
    h
}

/// `F.posterize` (`ImageOps.posterize`): keeps the top `bits` bits.
pub fn posterize(image: &RgbImage, bits: u32) -> RgbImage {
    let mask = !((1u32 << (8 - bits.clamp(1, 8))) - 1) as u8;
    map_pixels(image, |v| v & mask)
}

/// `F.solarize` (`ImageOps.solarize`): inverts the values at or above `threshold`.
pub fn solarize(image: &RgbImage, threshold: f64) -> RgbImage {
    map_pixels(image, |v| if (v as f64) < threshold { v } else { 255 - v })
}

/// `F.autocontrast` (`ImageOps.autocontrast`, no cutoff): each channel stretched to 0..255.
pub fn autocontrast(image: &RgbImage) -> RgbImage {
    let hist = histograms(image);
    let luts = hist.map(|h| {
        let mut lut = [0u8; 256];
        let lo = h.iter().position(|&n| n > 0).unwrap_or(255);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        for (ix, v) in lut.iter_mut().enumerate() {
            *v = if hi <= lo {
                ix as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                ((ix as f64 * scale + offset) as i64).clamp(0, 255) as u8
            };
        }
        lut
    });
    apply_luts(image, &luts)
}

/// `F.equalize` (`ImageOps.equalize`): per-channel histogram equalisation.
pub fn equalize(image: &RgbImage) -> RgbImage {
    let hist = histograms(image);
    let luts = hist.map(|h| {
        let mut lut: [u8; 256] = std::array::from_fn(|i| i as u8);
        let nonzero: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
        if nonzero.len() <= 1 {
            return lut;
        }
        let step = (nonzero.iter().sum::<u64>() - nonzero[nonzero.len() - 1]) / 255;
        if step == 0 {
            return lut;
        }
        let mut n = step / 2;
        for (i, v) in lut.iter_mut().enumerate() {
            *v = (n / step).min(255) as u8;
            n += h[i];
        }
        lut
    });
    apply_luts(image, &luts)
}

/// torchvision's `_get_inverse_affine_matrix` (PIL's output-to-input map), angles in degrees.
fn inverse_affine_matrix(
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    shear: [f64; 2],
) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear[0].to_radians(), shear[1].to_radians());
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    // scale = 1: the division by it is exact.
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// PIL's `Image.transform(size, AFFINE, a, NEAREST)` with black outside the input: Pillow's
/// `ImagingScaleAffine` when the map has no rotation or shear, else its 16.16 fixed-point
/// `affine_fixed` (images under 32768 pixels a side).
fn affine_nearest(image: &RgbImage, a: [f64; 6]) -> RgbImage {
    let (h, w) = (image.height, image.width);
    let mut out = vec![0u8; image.data.len()];
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let mut put = |y: usize, x: usize, xin: i64, yin: i64| {
        if xin >= 0 && (xin as usize) < w && yin >= 0 && (yin as usize) < h {
            let src = (yin as usize * w + xin as usize) * 3;
            out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&image.data[src..src + 3]);
        }
    };
    if a[1] == 0.0 && a[3] == 0.0 {
        let mut xo = a[2] + a[0] * 0.5;
        let mut xin = Vec::with_capacity(w);
        for _ in 0..w {
            xin.push(coord(xo));
            xo += a[0];
        }
        let mut yo = a[5] + a[4] * 0.5;
        for y in 0..h {
            let yin = coord(yo);
            for (x, &xi) in xin.iter().enumerate() {
                put(y, x, xi, yin);
            }
            yo += a[4];
        }
    } else {
        let fix = |v: f64| {
            let v = v * 65536.0 + 0.5;
            (if v < 0.0 { v.floor() } else { v }) as i32
        };
        let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
        let mut a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
        let mut a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
        for y in 0..h {
            let (mut xx, mut yy) = (a2, a5);
            for x in 0..w {
                put(y, x, (xx >> 16) as i64, (yy >> 16) as i64);
                xx = xx.wrapping_add(a0);
                yy = yy.wrapping_add(a3);
            }
            a2 = a2.wrapping_add(a1);
            a5 = a5.wrapping_add(a4);
        }
    }
    RgbImage {
        data: out,
        ..image.clone()
    }
}

/// `F.affine` on a PIL image with angle 0, scale 1, nearest sampling and fill 0.
fn affine(
    image: &RgbImage,
    translate: [f64; 2],
    shear: [f64; 2],
    center: Option<[f64; 2]>,
) -> RgbImage {
    let center = center.unwrap_or([image.width as f64 * 0.5, image.height as f64 * 0.5]);
    affine_nearest(image, inverse_affine_matrix(center, 0.0, translate, shear))
}

/// Python's `round(x, 15)`: through the correctly rounded decimal string.
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// `F.rotate` on a PIL image (`Image.rotate(angle, NEAREST, fillcolor=0)`): counter-clockwise
/// by `angle` degrees about the centre, same size; multiples of 90 degrees on square images
/// (and 180 on any) are exact transposes, as Pillow does.
pub fn rotate(image: &RgbImage, angle: f64) -> RgbImage {
    // Python's `angle % 360.0`.
    let mut angle = angle % 360.0;
    if angle < 0.0 {
        angle += 360.0;
    }
    let (h, w) = (image.height, image.width);
    let transpose = |f: &dyn Fn(usize, usize) -> (usize, usize)| {
        let mut data = Vec::with_capacity(image.data.len());
        for y in 0..h {
            for x in 0..w {
                let (sy, sx) = f(y, x);
                let s = (sy * w + sx) * 3;
                data.extend_from_slice(&image.data[s..s + 3]);
            }
        }
        RgbImage {
            data,
            ..image.clone()
        }
    };
    if angle == 0.0 {
        return image.clone();
    }
    if angle == 180.0 {
        return transpose(&|y, x| (h - 1 - y, w - 1 - x));
    }
    if h == w && angle == 90.0 {
        return transpose(&|y, x| (x, w - 1 - y));
    }
    if h == w && angle == 270.0 {
        return transpose(&|y, x| (h - 1 - x, y));
    }
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let r = -angle.to_radians();
    let mut m = [
        round15(r.cos()),
        round15(r.sin()),
        0.0,
        round15(-r.sin()),
        round15(r.cos()),
        0.0,
    ];
    let (x, y) = (-cx, -cy);
    // Pillow adds the matrix's zero offsets here, which changes nothing.
    m[2] = m[0] * x + m[1] * y + cx;
    m[5] = m[3] * x + m[4] * y + cy;
    affine_nearest(image, m)
}

/// The operations of torchvision's `RandAugment` and `TrivialAugmentWide`, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AugmentOp {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

impl AugmentOp {
    pub const ALL: [AugmentOp; 14] = [
        AugmentOp::Identity,
        AugmentOp::ShearX,
        AugmentOp::ShearY,
        AugmentOp::TranslateX,
        AugmentOp::TranslateY,
        AugmentOp::Rotate,
        AugmentOp::Brightness,
        AugmentOp::Color,
        AugmentOp::Contrast,
        AugmentOp::Sharpness,
        AugmentOp::Posterize,
        AugmentOp::Solarize,
        AugmentOp::AutoContrast,
        AugmentOp::Equalize,
    ];

    /// Whether a drawn magnitude is negated with probability 1/2.
    pub fn signed(self) -> bool {
        use AugmentOp::*;
        matches!(
            self,
            ShearX
                | ShearY
                | TranslateX
                | TranslateY
                | Rotate
                | Brightness
                | Color
                | Contrast
                | Sharpness
        )
    }

    /// torchvision's `_apply_op` on a PIL image (nearest interpolation, fill 0).
    pub fn apply(self, image: &RgbImage, magnitude: f64) -> RgbImage {
        use AugmentOp::*;
        let shear = || magnitude.atan().to_degrees();
        match self {
            Identity => image.clone(),
            ShearX => affine(image, [0.0, 0.0], [shear(), 0.0], Some([0.0, 0.0])),
            ShearY => affine(image, [0.0, 0.0], [0.0, shear()], Some([0.0, 0.0])),
            TranslateX => affine(image, [magnitude.trunc(), 0.0], [0.0, 0.0], None),
            TranslateY => affine(image, [0.0, magnitude.trunc()], [0.0, 0.0], None),
            Rotate => rotate(image, magnitude),
            Brightness => adjust_brightness(image, (1.0 + magnitude) as f32),
            Color => adjust_saturation(image, (1.0 + magnitude) as f32),
            Contrast => adjust_contrast(image, (1.0 + magnitude) as f32),
            Sharpness => adjust_sharpness(image, (1.0 + magnitude) as f32),
            Posterize => posterize(image, magnitude as u32),
            Solarize => solarize(image, magnitude),
            AutoContrast => autocontrast(image),
            Equalize => equalize(image),
        }
    }
}

/// `torch.linspace(start, end, steps)` in float32 as ATen's CPU kernel computes it on x86-64
/// with AVX2 or AVX-512 (its kernels are built with FMA contraction): the first half
/// `fma(step, i, start)`, the second `fma(-step, steps - 1 - i, end)`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f64> {
    let step = (end - start) / (steps - 1).max(1) as f32;
    (0..steps)
        .map(|i| {
            let v = if i < steps / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            };
            v as f64
        })
        .collect()
}

/// TrivialAugmentWide or RandAugment, as torchvision's (PIL path, nearest interpolation, fill 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AutoAugment {
    /// `TrivialAugmentWide(num_magnitude_bins)`: one op, a uniformly drawn magnitude bin.
    TrivialAugmentWide { num_magnitude_bins: usize },
    /// `RandAugment(num_ops, magnitude, num_magnitude_bins)`: `num_ops` ops at bin `magnitude`.
    RandAugment {
        num_ops: usize,
        magnitude: usize,
        num_magnitude_bins: usize,
    },
}

impl AutoAugment {
    /// `TrivialAugmentWide()`'s defaults: 31 bins.
    pub fn trivial_augment_wide() -> Self {
        AutoAugment::TrivialAugmentWide {
            num_magnitude_bins: 31,
        }
    }

    /// `RandAugment()`'s defaults: 2 ops at magnitude 9 of 31 bins.
    pub fn rand_augment() -> Self {
        AutoAugment::RandAugment {
            num_ops: 2,
            magnitude: 9,
            num_magnitude_bins: 31,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            AutoAugment::TrivialAugmentWide { num_magnitude_bins } => ensure!(
                num_magnitude_bins >= 2,
                "TrivialAugmentWide needs at least 2 magnitude bins, got {num_magnitude_bins}"
            ),
            AutoAugment::RandAugment {
                magnitude,
                num_magnitude_bins,
                ..
            } => ensure!(
                num_magnitude_bins >= 2 && magnitude < num_magnitude_bins,
                "RandAugment's magnitude must be a bin in 0..{num_magnitude_bins} (at least 2 bins), got {magnitude}"
            ),
        }
        Ok(())
    }

    /// The magnitudes of `op` for an `height x width` image (`_augmentation_space`); `None` for
    /// the ops without one (magnitude 0).
    pub fn magnitudes(&self, op: AugmentOp, height: usize, width: usize) -> Option<Vec<f64>> {
        use AugmentOp::*;
        let wide = matches!(self, AutoAugment::TrivialAugmentWide { .. });
        let bins = match *self {
            AutoAugment::TrivialAugmentWide { num_magnitude_bins }
            | AutoAugment::RandAugment {
                num_magnitude_bins, ..
            } => num_magnitude_bins,
        };
        let lin = |end: f64| Some(linspace_f32(0.0, end as f32, bins));
        match op {
            Identity | AutoContrast | Equalize => None,
            ShearX | ShearY => lin(if wide { 0.99 } else { 0.3 }),
            TranslateX => lin(if wide {
                32.0
            } else {
                150.0 / 331.0 * width as f64
            }),
            TranslateY => lin(if wide {
                32.0
            } else {
                150.0 / 331.0 * height as f64
            }),
            Rotate => lin(if wide { 135.0 } else { 30.0 }),
            Brightness | Color | Contrast | Sharpness => lin(if wide { 0.99 } else { 0.9 }),
            Posterize => {
                // `8 - (arange(bins) / ((bins - 1) / k)).round().int()`, in float32.
                let k = if wide { 6.0 } else { 4.0 };
                let div = ((bins - 1) as f64 / k) as f32;
                Some(
                    (0..bins)
                        .map(|i| 8.0 - (i as f32 / div).round_ties_even() as f64)
                        .collect(),
                )
            }
            Solarize => Some(linspace_f32(255.0, 0.0, bins)),
        }
    }

    /// The ops and signed magnitudes drawn for an `height x width` image.
    pub fn draw(&self, height: usize, width: usize, rng: &mut SplitMix) -> Vec<(AugmentOp, f64)> {
        let n = AugmentOp::ALL.len() as u64;
        let pick = |bin: Option<usize>, rng: &mut SplitMix| {
            let op = AugmentOp::ALL[rng.below(n) as usize];
            let mut m = match self.magnitudes(op, height, width) {
                Some(ms) => ms[bin.unwrap_or_else(|| rng.below(ms.len() as u64) as usize)],
                None => 0.0,
            };
            if op.signed() && rng.below(2) == 1 {
                m = -m;
            }
            (op, m)
        };
        match *self {
            AutoAugment::TrivialAugmentWide { .. } => vec![pick(None, rng)],
            AutoAugment::RandAugment {
                num_ops, magnitude, ..
            } => (0..num_ops).map(|_| pick(Some(magnitude), rng)).collect(),
        }
    }

    /// The augmented image, with the draws of `rng`.
    pub fn apply(&self, image: RgbImage, rng: &mut SplitMix) -> RgbImage {
        let mut out = image;
        for (op, m) in self.draw(out.height, out.width, rng) {
            if op != AugmentOp::Identity {
                out = op.apply(&out, m);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trips_grey_and_primaries() {
        for px in [
            [0u8, 0, 0],
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [90, 90, 90],
        ] {
            let [h, s, v] = rgb_to_hsv(&px);
            assert_eq!(hsv_to_rgb(h, s, v), px, "{px:?}");
        }
        assert_eq!(rgb_to_hsv(&[0, 0, 255]), [170, 255, 255]);
    }

    #[test]
    fn linspace_matches_torch_at_its_ends() {
        let v = linspace_f32(0.0, 135.0, 31);
        assert_eq!((v[0], v[20], v[30]), (0.0, 90.0, 135.0));
        let t = AutoAugment::trivial_augment_wide();
        let p = t.magnitudes(AugmentOp::Posterize, 4, 4).unwrap();
        assert_eq!((p[0], p[30]), (8.0, 2.0));
    }
}
