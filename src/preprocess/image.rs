//! 8-bit RGB images as the Python libraries hold them before their tensor conversion: decoding,
//! tensors in both directions, and the center crops (with their different padding and rounding).

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// An 8-bit RGB image, rows of interleaved R, G, B (PIL's and numpy's `H x W x 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Decodes an image file to RGB, as `PIL.Image.open(path).convert("RGB")` and torchvision's
    /// `decode_image(path, ImageReadMode.RGB)` do for 8-bit PNGs: grey replicated to three
    /// channels, alpha dropped (not composited), palettes expanded. (JPEG decoders differ between
    /// libraries by a few grey levels, so only PNGs give the Python pixels exactly.)
    pub fn load(path: &Path) -> Result<Self> {
        let chw = tch::vision::image::load(path)
            .with_context(|| format!("cannot decode image {}", path.display()))?;
        Self::from_chw(&chw).with_context(|| format!("image {}", path.display()))
    }

    /// From a uint8 `[3, H, W]` tensor (any strides).
    pub fn from_chw(t: &Tensor) -> Result<Self> {
        let &[c, h, w] = t.size().as_slice() else {
            bail!("expected an image tensor [3, H, W], got {:?}", t.size());
        };
        if c != 3 || t.kind() != Kind::Uint8 {
            bail!(
                "expected a uint8 RGB image [3, H, W], got {:?} {:?}",
                t.kind(),
                t.size()
            );
        }
        let hwc = t.permute([1, 2, 0]).contiguous().view([-1]);
        Ok(Self {
            height: h as usize,
            width: w as usize,
            data: Vec::<u8>::try_from(&hwc)?,
        })
    }

    /// uint8 `[3, H, W]`, laid out as torchvision's `pil_to_tensor` leaves it (a channels-last
    /// view of the `H x W x 3` bytes).
    pub fn to_chw(&self) -> Tensor {
        Tensor::from_slice(&self.data)
            .view([self.height as i64, self.width as i64, 3])
            .permute([2, 0, 1])
    }

    pub fn pixel(&self, y: usize, x: usize) -> [u8; 3] {
        let p = (y * self.width + x) * 3;
        [self.data[p], self.data[p + 1], self.data[p + 2]]
    }

    /// The `height x width` window at (`top`, `left`), which may reach outside the image; pixels
    /// outside are `fill`.
    fn window(&self, top: i64, left: i64, height: usize, width: usize, fill: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(height * width * 3);
        for y in 0..height as i64 {
            for x in 0..width as i64 {
                let (sy, sx) = (top + y, left + x);
                if (0..self.height as i64).contains(&sy) && (0..self.width as i64).contains(&sx) {
                    data.extend_from_slice(&self.pixel(sy as usize, sx as usize));
                } else {
                    data.extend_from_slice(&fill);
                }
            }
        }
        Self {
            height,
            width,
            data,
        }
    }

    /// A center crop to `height x width` by one library's rule (padding first where the image is
    /// smaller than the crop).
    pub fn center_crop(&self, height: usize, width: usize, rule: CropRule, fill: [u8; 3]) -> Self {
        let (top, left) = (
            rule.offset(self.height as i64, height as i64),
            rule.offset(self.width as i64, width as i64),
        );
        self.window(top, left, height, width, fill)
    }
}

/// How a library places a center crop: where the padding of a too-small side goes and how an odd
/// margin is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropRule {
    /// torchvision's `center_crop` (and timm's `center_crop_or_pad`): pad `(crop - size) // 2`
    /// before, then offset `int(round((size - crop) / 2))`, Python's round half to even.
    Torchvision,
    /// transformers' torchvision backend: the same padding, offset `int((size - crop) / 2)`.
    TransformersTorchvision,
    /// transformers' numpy `center_crop`: pad `ceil((crop - size) / 2)` before, offset
    /// `(size - crop) // 2`.
    TransformersNumpy,
}

impl CropRule {
    /// The crop's start along one side, in the unpadded image's coordinates (negative where
    /// padding comes first).
    fn offset(self, size: i64, crop: i64) -> i64 {
        if crop > size {
            let margin = crop - size;
            return match self {
                CropRule::Torchvision | CropRule::TransformersTorchvision => -(margin / 2),
                CropRule::TransformersNumpy => -((margin + 1) / 2),
            };
        }
        let margin = size - crop;
        match self {
            // round(margin / 2) with ties to even: the tie m/2 = k + 0.5 goes to the even of k, k+1.
            CropRule::Torchvision => {
                let half = margin / 2;
                if margin % 2 == 1 && half % 2 == 1 {
                    half + 1
                } else {
                    half
                }
            }
            CropRule::TransformersTorchvision | CropRule::TransformersNumpy => margin / 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_offsets_follow_each_library() {
        // Python: int(round(m / 2)) for m = 0..7 is 0, 0, 1, 2, 2, 2, 3, 4.
        let tv: Vec<i64> = (0..8)
            .map(|m| CropRule::Torchvision.offset(10 + m, 10))
            .collect();
        assert_eq!(tv, [0, 0, 1, 2, 2, 2, 3, 4]);
        let floor: Vec<i64> = (0..8)
            .map(|m| CropRule::TransformersTorchvision.offset(10 + m, 10))
            .collect();
        assert_eq!(floor, [0, 0, 1, 1, 2, 2, 3, 3]);
        // Padding a side of 7 to 10: torchvision puts 1 before, numpy 2.
        assert_eq!(CropRule::Torchvision.offset(7, 10), -1);
        assert_eq!(CropRule::TransformersNumpy.offset(7, 10), -2);
    }

    #[test]
    fn crops_pad_with_the_fill() {
        let image = RgbImage {
            height: 1,
            width: 2,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let out = image.center_crop(1, 4, CropRule::Torchvision, [9, 9, 9]);
        assert_eq!(out.data, [9, 9, 9, 1, 2, 3, 4, 5, 6, 9, 9, 9]);
        let chw = image.to_chw();
        assert_eq!(RgbImage::from_chw(&chw).unwrap(), image);
    }
}
