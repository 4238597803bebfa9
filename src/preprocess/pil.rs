//! Pillow's `Image.resize` on 8-bit RGB images, reimplemented step for step so that the pixels are
//! Pillow's own: the antialiased two-pass convolution of `ImagingResample` (filter support scaled by
//! the downscaling factor, coefficients normalised in double precision and quantised to 22-bit
//! fixed point, two passes each rounded and clipped to 0..=255, in Pillow 13's order), and for
//! `NEAREST` the affine scaling of `ImagingScaleAffine` (pixel centres, accumulated in double precision).
//!
//! timm's evaluation transform, torchvision's transforms on PIL images and transformers' PIL
//! backend all resize through this code.

use super::image::RgbImage;

/// Pillow's resampling filters (`PIL.Image.Resampling`), by their PIL codes 0..=5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// Half-width of the filter at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The filter's kernel, with Pillow's operation order (and its single-precision Hamming
    /// constants) so that the coefficients round the same way.
    fn kernel(self, x: f64) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fixed-point fraction bits of the 8-bit passes: 8 bits of result and two of headroom in an i32.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output position along one axis: the first input index, and the quantised weights of
/// the inputs from there on.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` to `out_size`
/// over the whole axis (the box `0..in_size`).
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    // The box is single precision in Pillow; whole-image boxes are exact in f32.
    let (in0, in1) = (0f32, in_size as f32);
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let mut taps = Taps {
        start: Vec::with_capacity(out_size),
        weights: Vec::with_capacity(out_size),
    };
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's (int) conversions truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let mut k: Vec<f64> = (0..count)
            .map(|x| filter.kernel(((x as i64 + xmin) as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        taps.start.push(xmin as usize);
        taps.weights.push(
            k.iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect(),
        );
    }
    taps
}

/// Rounds a fixed-point sum to 0..=255 (Pillow's `clip8`).
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One convolution pass along rows (`horizontal`) or columns, with Pillow's 32-bit integer sums
/// (`ImagingResampleHorizontal_8bpc` / `ImagingResampleVertical_8bpc`).
fn pass(image: &RgbImage, taps: &Taps, out_len: usize, horizontal: bool) -> RgbImage {
    let (out_h, out_w) = if horizontal {
        (image.height, out_len)
    } else {
        (out_len, image.width)
    };
    let mut out = vec![0u8; out_h * out_w * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    let row_len = image.width * 3;
    if horizontal {
        for (src_row, out_row) in image
            .data
            .chunks_exact(row_len)
            .zip(out.chunks_exact_mut(out_w * 3))
        {
            for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
                let start = taps.start[x] * 3;
                let weights = &taps.weights[x];
                let src = &src_row[start..start + 3 * weights.len()];
                let mut sums = [half; 3];
                for (p, &w) in src.chunks_exact(3).zip(weights) {
                    for c in 0..3 {
                        sums[c] = sums[c].wrapping_add(i32::from(p[c]).wrapping_mul(w));
                    }
                }
                for c in 0..3 {
                    px[c] = clip8(i64::from(sums[c]));
                }
            }
        }
    } else {
        let mut sums = vec![0i32; row_len];
        for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
            sums.iter_mut().for_each(|s| *s = half);
            let start = taps.start[y];
            for (t, &w) in taps.weights[y].iter().enumerate() {
                let src = &image.data[(start + t) * row_len..(start + t + 1) * row_len];
                for (s, &v) in sums.iter_mut().zip(src) {
                    *s = s.wrapping_add(i32::from(v).wrapping_mul(w));
                }
            }
            for (o, &s) in out_row.iter_mut().zip(&sums) {
                *o = clip8(i64::from(s));
            }
        }
    }
    RgbImage {
        height: out_h,
        width: out_w,
        data: out,
    }
}

/// `PIL.Image.resize((width, height), filter)` of an RGB image.
pub fn resize(image: &RgbImage, height: usize, width: usize, filter: Filter) -> RgbImage {
    if (height, width) == (image.height, image.width) {
        return image.clone();
    }
    if filter == Filter::Nearest {
        return nearest(image, height, width);
    }
    let horizontal = |im: &RgbImage| pass(im, &taps(image.width, width, filter), width, true);
    let vertical = |im: &RgbImage| pass(im, &taps(image.height, height, filter), height, false);
    match (width != image.width, height != image.height) {
        (true, false) => horizontal(image),
        (false, true) => vertical(image),
        // Pillow 13 runs the vertical pass first when it removes more than twice as many rows as
        // the horizontal pass removes columns (read from its binary; the
        // python_ref sizes cover both orders);
        // each pass rounds to 8 bits, so the order shows in the pixels.
        _ if vertical_first(image, height, width) => horizontal(&vertical(image)),
        _ => vertical(&horizontal(image)),
    }
}

fn vertical_first(image: &RgbImage, height: usize, width: usize) -> bool {
    let rows_removed = image.height as i64 - height as i64;
    let columns_removed = image.width as i64 - width as i64;
    rows_removed > 0 && rows_removed > 2 * columns_removed
}

/// Pillow's nearest-neighbour resize: output pixel centres mapped by the affine scale, source
/// coordinates accumulated step by step in double precision and truncated.
fn nearest(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    let positions = |in_size: usize, out_size: usize| -> Vec<Option<usize>> {
        let a = f64::from(in_size as f32) / out_size as f64;
        let mut pos = a * 0.5;
        (0..out_size)
            .map(|_| {
                let index = if pos < 0.0 { -1 } else { pos as i64 };
                pos += a;
                usize::try_from(index).ok().filter(|&i| i < in_size)
            })
            .collect()
    };
    let xs = positions(image.width, width);
    let ys = positions(image.height, height);
    let mut out = vec![0u8; height * width * 3];
    for (y, sy) in ys.iter().enumerate() {
        let Some(sy) = sy else { continue };
        for (x, sx) in xs.iter().enumerate() {
            let Some(sx) = sx else { continue };
            let p = (sy * image.width + sx) * 3;
            let o = (y * width + x) * 3;
            out[o..o + 3].copy_from_slice(&image.data[p..p + 3]);
        }
    }
    RgbImage {
        height,
        width,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(height: usize, width: usize) -> RgbImage {
        let data = (0..height * width * 3)
            .map(|i| ((i * 37) % 256) as u8)
            .collect();
        RgbImage {
            height,
            width,
            data,
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [
            Filter::Box,
            Filter::Bilinear,
            Filter::Hamming,
            Filter::Bicubic,
            Filter::Lanczos,
        ] {
            for (n_in, n_out) in [(200, 37), (13, 224), (61, 61), (7, 3)] {
                let t = taps(n_in, n_out, filter);
                for w in &t.weights {
                    let sum: i64 = w.iter().map(|&v| i64::from(v)).sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                        "{filter:?} {n_in}->{n_out}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let image = RgbImage {
            height: 9,
            width: 13,
            data: vec![200; 9 * 13 * 3],
        };
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let out = resize(&image, 40, 31, filter);
            assert!(out.data.iter().all(|&v| v == 200), "{filter:?}");
        }
    }

    #[test]
    fn nearest_picks_pixel_centres() {
        let image = ramp(4, 4);
        let out = resize(&image, 2, 2, Filter::Nearest);
        // Centres of 2x2 output pixels map to source pixels 1 and 3.
        for (y, sy) in [(0, 1), (1, 3)] {
            for (x, sx) in [(0, 1), (1, 3)] {
                assert_eq!(out.pixel(y, x), image.pixel(sy, sx));
            }
        }
        assert_eq!(resize(&image, 4, 4, Filter::Bicubic), image);
    }
}
