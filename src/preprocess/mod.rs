//! Image preprocessing for classification, pixel for pixel as the Python libraries whose weights
//! are used do it: torchvision's `ImageClassification` preset, timm's evaluation transform
//! (`create_transform(**resolve_data_config(...))`), and transformers' image processors
//! (`ConvNextImageProcessor`, which Hugging Face's ResNets use; `ViTImageProcessor`,
//! `BitImageProcessor`) in both their torchvision and PIL backends.
//!
//! A [`Preprocess`] is timm's data config (`input_size`, `interpolation`, `crop_pct`,
//! `crop_mode`, `mean`, `std`) plus an explicit `resize` (torchvision's `resize_size`) and the
//! [`Pipeline`] whose arithmetic is reproduced. It comes from [`Preprocess::torchvision_default`],
//! a timm `pretrained_cfg` ([`Preprocess::from_timm_pretrained_cfg`]), a Hugging Face
//! `preprocessor_config.json` ([`Preprocess::from_hf_preprocessor_config`]), a model folder
//! ([`for_model_folder`]) or its own JSON.

mod image;
pub mod pil;
mod sources;

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use image::{CropRule, RgbImage};
pub use sources::for_model_folder;

/// ImageNet's channel statistics (timm's `IMAGENET_DEFAULT_MEAN` / `_STD`, torchvision's).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Whose implementation the pixels reproduce. They differ in the resampling code (Pillow's
/// fixed-point filters, libtorch's float or uint8 kernels), in how a center crop rounds, and in
/// the float arithmetic of scaling and normalising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pipeline {
    /// torchvision's transforms on a decoded uint8 tensor (`weights.transforms()`, the
    /// `ImageClassification` preset): libtorch's antialiased resize in float, rounded back to
    /// uint8; crop offsets rounded half to even; `x / 255`, then `(x - mean) / std`.
    Torchvision,
    /// timm's evaluation transform on a PIL image (also torchvision's transforms on PIL images):
    /// Pillow's resize; otherwise as `torchvision`.
    Timm,
    /// transformers' image processors with their default torchvision backend, on the CPU:
    /// libtorch's uint8 resize kernels (as `torchvision.transforms.v2`), crop offsets rounded
    /// down, rescale fused into the normalisation: `(x - mean / r) / (std / r)`.
    Transformers,
    /// transformers' PIL backend (`backend="pil"`): Pillow's resize, numpy's crop, `x * r` in
    /// float64 then float32, then `(x - mean) / std`.
    TransformersPil,
}

/// The resampling filter (timm's names; PIL codes 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic,
/// 4 box, 5 hamming). `box`, `hamming` and `lanczos` exist only with Pillow's resize (the `timm`
/// and `transformers_pil` pipelines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
    Lanczos,
}

impl Interpolation {
    /// From a PIL resampling code, as `preprocessor_config.json` stores `resample`.
    pub fn from_pil_code(code: i64) -> Result<Self> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => bail!("unknown PIL resampling code {code} (0 to 5)"),
        })
    }

    fn pil_filter(self) -> pil::Filter {
        match self {
            Self::Nearest => pil::Filter::Nearest,
            Self::Bilinear => pil::Filter::Bilinear,
            Self::Bicubic => pil::Filter::Bicubic,
            Self::Box => pil::Filter::Box,
            Self::Hamming => pil::Filter::Hamming,
            Self::Lanczos => pil::Filter::Lanczos,
        }
    }
}

/// timm's `crop_mode`: how the image is resized before the center crop, when `resize` is not
/// given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    /// Keep the aspect ratio, the shorter side (relative to the input) to `side / crop_pct`.
    #[default]
    Center,
    /// Each side to `side / crop_pct`, aspect ratio not kept.
    Squash,
    /// Keep the aspect ratio, the longer side to `side / crop_pct`; pad with the mean colour.
    Border,
}

/// An explicit resize before the center crop: a number is the shorter side (torchvision's
/// `Resize(int)`: the longer becomes `int(size * long / short)`), `[h, w]` an exact size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resize {
    ShorterSide(i64),
    Exact([i64; 2]),
}

/// One image-classification preprocessing: resize, center crop to `input_size`, scale to [0, 1]
/// by `rescale_factor`, normalise by `mean` / `std`. JSON fields that are absent take timm's
/// defaults (`resolve_data_config`): 3x224x224, bicubic, crop_pct 0.875, center, ImageNet
/// statistics, the `timm` pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// `[channels, height, width]` of the result; channels is 3.
    #[serde(default = "default_input_size")]
    pub input_size: [i64; 3],
    #[serde(default = "default_interpolation")]
    pub interpolation: Interpolation,
    /// The crop's share of the resized image: the resize target is `floor(side / crop_pct)`.
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f64,
    #[serde(default)]
    pub crop_mode: CropMode,
    /// Overrides the resize that `crop_pct` and `crop_mode` give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<Resize>,
    /// One value per channel, or one for all.
    #[serde(default = "default_mean")]
    pub mean: Vec<f64>,
    #[serde(default = "default_std")]
    pub std: Vec<f64>,
    /// Multiplies the 0..=255 pixels (1/255; 1 where transformers' `do_rescale` is false).
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    /// Whether `mean` and `std` are applied (transformers' `do_normalize`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub normalize: bool,
    #[serde(default = "default_pipeline")]
    pub pipeline: Pipeline,
}

fn default_input_size() -> [i64; 3] {
    [3, 224, 224]
}
fn default_interpolation() -> Interpolation {
    Interpolation::Bicubic
}
fn default_crop_pct() -> f64 {
    0.875
}
fn default_mean() -> Vec<f64> {
    IMAGENET_MEAN.to_vec()
}
fn default_std() -> Vec<f64> {
    IMAGENET_STD.to_vec()
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_pipeline() -> Pipeline {
    Pipeline::Timm
}

impl Default for Preprocess {
    /// timm's defaults (`resolve_data_config` with nothing given).
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl Preprocess {
    /// torchvision's ImageNet evaluation preprocessing (`ResNet50_Weights.IMAGENET1K_V1.transforms()`):
    /// shorter side to 256 (bilinear, antialiased), center crop 224, ImageNet statistics.
    pub fn torchvision_default() -> Self {
        Self::torchvision(256, 224)
    }

    /// torchvision's `ImageClassification(crop_size=crop, resize_size=resize)`.
    pub fn torchvision(resize: i64, crop: i64) -> Self {
        Self {
            input_size: [3, crop, crop],
            interpolation: Interpolation::Bilinear,
            crop_pct: crop as f64 / resize as f64,
            crop_mode: CropMode::Center,
            resize: Some(Resize::ShorterSide(resize)),
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            rescale_factor: default_rescale_factor(),
            normalize: true,
            pipeline: Pipeline::Torchvision,
        }
    }

    /// timm's data config from a `pretrained_cfg` (as `resolve_data_config(pretrained_cfg=cfg)`
    /// resolves it, at the training input size): the `pretrained_cfg` object itself, or a timm
    /// model's whole `config.json` (`save_for_hf` / `push_to_hub`), whose `pretrained_cfg` is used.
    pub fn from_timm_pretrained_cfg(cfg: &serde_json::Value) -> Result<Self> {
        sources::timm(cfg)
    }

    /// What a Hugging Face `preprocessor_config.json` configures (`ConvNextImageProcessor`,
    /// `ViTImageProcessor`, `BitImageProcessor` and their older feature-extractor names), for
    /// transformers' default torchvision backend; set `pipeline` to `transformers_pil` for the
    /// PIL backend.
    pub fn from_hf_preprocessor_config(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        sources::hugging_face(&value)
            .with_context(|| format!("preprocessor config {}", path.display()))
    }

    /// A preprocessing file recognised by its fields: a timm `config.json` (with
    /// `pretrained_cfg`), a Hugging Face `preprocessor_config.json`, or this struct's JSON.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        let parsed = if sources::is_timm_config(&value) {
            sources::timm(&value)
        } else if sources::is_hf_preprocessor_config(&value) {
            sources::hugging_face(&value)
        } else {
            serde_json::from_value(value).map_err(Into::into)
        };
        let preprocess = parsed.with_context(|| format!("preprocessing {}", path.display()))?;
        preprocess
            .validate()
            .with_context(|| format!("preprocessing {}", path.display()))?;
        Ok(preprocess)
    }

    /// Checks the values the transforms would trip on.
    pub fn validate(&self) -> Result<()> {
        let [c, h, w] = self.input_size;
        ensure!(
            c == 3,
            "input_size {:?}: only 3-channel (RGB) inputs are supported",
            self.input_size
        );
        ensure!(
            h >= 1 && w >= 1,
            "input_size {:?}: height and width must be at least 1",
            self.input_size
        );
        ensure!(
            self.crop_pct.is_finite() && self.crop_pct > 0.0,
            "crop_pct must be a positive number, got {}",
            self.crop_pct
        );
        match self.resize {
            Some(Resize::ShorterSide(s)) => ensure!(s >= 1, "resize must be at least 1, got {s}"),
            Some(Resize::Exact([rh, rw])) => ensure!(
                rh >= 1 && rw >= 1,
                "resize must be at least 1x1, got [{rh}, {rw}]"
            ),
            None => {}
        }
        for (name, v) in [("mean", &self.mean), ("std", &self.std)] {
            ensure!(
                v.len() == 1 || v.len() == 3,
                "{name} needs 1 or 3 values, got {}",
                v.len()
            );
            ensure!(
                v.iter().all(|x| x.is_finite()),
                "{name} must be finite, got {v:?}"
            );
        }
        if self.normalize {
            ensure!(
                self.std.iter().all(|&s| s != 0.0),
                "std must not be 0, got {:?}",
                self.std
            );
        }
        ensure!(
            self.rescale_factor.is_finite() && self.rescale_factor > 0.0,
            "rescale_factor must be a positive number, got {}",
            self.rescale_factor
        );
        if matches!(
            self.pipeline,
            Pipeline::Torchvision | Pipeline::Transformers
        ) {
            ensure!(
                matches!(
                    self.interpolation,
                    Interpolation::Nearest | Interpolation::Bilinear | Interpolation::Bicubic
                ),
                "interpolation {:?} needs Pillow's resize: use the timm or transformers_pil pipeline",
                self.interpolation
            );
        }
        Ok(())
    }

    /// The image file as the network's input: float32 `[3, H, W]` (`input_size`).
    pub fn apply(&self, path: &Path) -> Result<Tensor> {
        self.validate()?;
        let image = RgbImage::load(path)?;
        let pixels = self
            .pixels(&image)
            .with_context(|| format!("cannot preprocess {}", path.display()))?;
        Ok(self.to_input(&pixels))
    }

    /// The resized and center-cropped image, before scaling and normalising (the PIL image or
    /// uint8 tensor the Python transforms hold at that point).
    pub fn pixels(&self, image: &RgbImage) -> Result<RgbImage> {
        self.validate()?;
        let (h, w) = self.resized_size(image.height, image.width)?;
        let resized = self.resample(image, h, w)?;
        let [_, ch, cw] = self.input_size;
        let (rule, fill) = match self.pipeline {
            Pipeline::Torchvision => (CropRule::Torchvision, [0; 3]),
            Pipeline::Timm => (CropRule::Torchvision, self.border_fill()),
            Pipeline::Transformers => (CropRule::TransformersTorchvision, [0; 3]),
            Pipeline::TransformersPil => (CropRule::TransformersNumpy, [0; 3]),
        };
        Ok(resized.center_crop(ch as usize, cw as usize, rule, fill))
    }

    /// timm's border mode pads with the mean colour, `round(255 * mean)`; the others with 0.
    fn border_fill(&self) -> [u8; 3] {
        if self.resize.is_some() || self.crop_mode != CropMode::Border {
            return [0; 3];
        }
        let mean = |c: usize| self.mean[c.min(self.mean.len() - 1)];
        [0, 1, 2].map(|c| round_half_even(255.0 * mean(c)).clamp(0.0, 255.0) as u8)
    }

    /// The size the image is resized to before the crop, by the library's own formulas.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        ensure!(height >= 1 && width >= 1, "empty image {height}x{width}");
        let (h, w) = (height as i64, width as i64);
        let [_, th, tw] = self.input_size;
        let resize = match self.resize {
            Some(r) => r,
            None => {
                // timm: scale_size = floor(side / crop_pct).
                let sh = (th as f64 / self.crop_pct).floor() as i64;
                let sw = (tw as f64 / self.crop_pct).floor() as i64;
                match self.crop_mode {
                    CropMode::Center if sh == sw => Resize::ShorterSide(sh),
                    CropMode::Center => keep_ratio(h, w, sh, sw, 0.0),
                    CropMode::Squash => Resize::Exact([sh, sw]),
                    CropMode::Border => keep_ratio(h, w, sh, sw, 1.0),
                }
            }
        };
        let (nh, nw) = match resize {
            Resize::Exact([nh, nw]) => (nh, nw),
            Resize::ShorterSide(s) => {
                // torchvision's _compute_resized_output_size: int(size * long / short).
                let long = |l: i64, short: i64| ((s * l) as f64 / short as f64) as i64;
                if w <= h {
                    (long(h, w), s)
                } else {
                    (s, long(w, h))
                }
            }
        };
        ensure!(
            nh >= 1 && nw >= 1,
            "a {height}x{width} image would be resized to {nh}x{nw}"
        );
        Ok((nh as usize, nw as usize))
    }

    fn resample(&self, image: &RgbImage, height: usize, width: usize) -> Result<RgbImage> {
        if (height, width) == (image.height, image.width) {
            return Ok(image.clone());
        }
        match self.pipeline {
            Pipeline::Timm | Pipeline::TransformersPil => Ok(pil::resize(
                image,
                height,
                width,
                self.interpolation.pil_filter(),
            )),
            Pipeline::Torchvision => torch_resize(image, height, width, self.interpolation, false),
            Pipeline::Transformers => torch_resize(image, height, width, self.interpolation, true),
        }
    }

    /// Scales and normalises the pixels: float32 `[3, H, W]`.
    pub fn to_input(&self, pixels: &RgbImage) -> Tensor {
        let x = pixels.to_chw().contiguous();
        let stat = |v: &[f64]| {
            let v3: Vec<f64> = (0..3).map(|c| v[c.min(v.len() - 1)]).collect();
            Tensor::from_slice(&v3).to_kind(Kind::Float).view([3, 1, 1])
        };
        let (mean, std) = (stat(&self.mean), stat(&self.std));
        let r = self.rescale_factor;
        match self.pipeline {
            // to_tensor / convert_image_dtype: x / 255, then Normalize.
            Pipeline::Torchvision | Pipeline::Timm => {
                let x = x.to_kind(Kind::Float) / (1.0 / r);
                if self.normalize {
                    (x - mean) / std
                } else {
                    x
                }
            }
            // TorchvisionBackend.rescale_and_normalize: the rescale folded into mean and std.
            Pipeline::Transformers => {
                if self.normalize {
                    (x.to_kind(Kind::Float) - mean * (1.0 / r)) / (std * (1.0 / r))
                } else {
                    x * r
                }
            }
            // numpy: image.astype(float64) * scale, to float32; (image - mean) / std in float32.
            Pipeline::TransformersPil => {
                let x = (x.to_kind(Kind::Double) * r).to_kind(Kind::Float);
                if self.normalize {
                    (x - mean) / std
                } else {
                    x
                }
            }
        }
    }
}

/// timm's `ResizeKeepRatio.get_params`: one ratio for both sides, between the one that fits the
/// shorter side (`longest` 0) and the longer (`longest` 1); sides rounded half to even.
fn keep_ratio(h: i64, w: i64, target_h: i64, target_w: i64, longest: f64) -> Resize {
    let ratio_h = h as f64 / target_h as f64;
    let ratio_w = w as f64 / target_w as f64;
    let ratio = ratio_h.max(ratio_w) * longest + ratio_h.min(ratio_w) * (1.0 - longest);
    Resize::Exact([
        round_half_even(h as f64 / ratio) as i64,
        round_half_even(w as f64 / ratio) as i64,
    ])
}

/// Python's `round` on floats (ties to even).
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// libtorch's resize as torchvision calls it on a uint8 image. `uint8_kernels`: the
/// `transforms.v2` path transformers uses, which hands uint8 to libtorch's own uint8 kernels
/// (bicubic always, bilinear where the CPU has AVX2) instead of resizing in float.
fn torch_resize(
    image: &RgbImage,
    height: usize,
    width: usize,
    interpolation: Interpolation,
    uint8_kernels: bool,
) -> Result<RgbImage> {
    let size = [height as i64, width as i64];
    let input = image.to_chw().unsqueeze(0);
    let native = uint8_kernels
        && match interpolation {
            Interpolation::Bicubic | Interpolation::Nearest => true,
            Interpolation::Bilinear => cpu_has_avx2(),
            _ => false,
        };
    let input = if native {
        input
    } else {
        // torchvision's v1 transforms resize a contiguous float copy.
        input.contiguous().to_kind(Kind::Float)
    };
    let out = match interpolation {
        Interpolation::Bilinear => {
            input.f_internal_upsample_bilinear2d_aa(size, false, None, None)?
        }
        Interpolation::Bicubic => {
            input.f_internal_upsample_bicubic2d_aa(size, false, None, None)?
        }
        // v2 (transformers maps PIL's NEAREST to NEAREST_EXACT); v1 `nearest`.
        Interpolation::Nearest if uint8_kernels => {
            input.f_internal_upsample_nearest_exact2d(size, None, None)?
        }
        Interpolation::Nearest => input.f_upsample_nearest2d(size, None, None)?,
        other => bail!("interpolation {other:?} needs Pillow's resize"),
    };
    let out = if native {
        out
    } else {
        out.clamp(0.0, 255.0).round().to_kind(Kind::Uint8)
    };
    RgbImage::from_chw(&out.squeeze_dim(0))
}

/// Whether libtorch's CPU capability is AVX2 or better (torchvision checks
/// `torch.backends.cpu.get_cpu_capability()` before using the uint8 bilinear kernel).
fn cpu_has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        let r: Vec<f64> = [0.5, 1.5, 2.5, -0.5, 2.4, 2.6, 3.0]
            .map(round_half_even)
            .to_vec();
        assert_eq!(r, [0.0, 2.0, 2.0, -0.0, 2.0, 3.0, 3.0]);
    }

    #[test]
    fn json_defaults_are_timms() {
        let p: Preprocess = serde_json::from_str(r#"{"crop_pct": 0.95}"#).unwrap();
        assert_eq!(p.input_size, [3, 224, 224]);
        assert_eq!(p.interpolation, Interpolation::Bicubic);
        assert_eq!(p.pipeline, Pipeline::Timm);
        assert_eq!(p.crop_pct, 0.95);
        // 224 / 0.95 = 235.79: timm resizes the shorter side to 235.
        assert_eq!(p.resized_size(300, 400).unwrap(), (235, 313));
        let typo = serde_json::from_str::<Preprocess>(r#"{"crop_pcct": 0.95}"#).unwrap_err();
        assert!(typo.to_string().contains("crop_pcct"), "{typo}");
        let round_trip: Preprocess = serde_json::from_str(
            &serde_json::to_string(&Preprocess::torchvision_default()).unwrap(),
        )
        .unwrap();
        assert_eq!(round_trip, Preprocess::torchvision_default());
    }

    #[test]
    fn resize_rules() {
        let tv = Preprocess::torchvision_default();
        // torchvision: int(256 * 420 / 300) = 358.
        assert_eq!(tv.resized_size(300, 420).unwrap(), (256, 358));
        assert_eq!(tv.resized_size(420, 300).unwrap(), (358, 256));
        let mut hw = Preprocess {
            input_size: [3, 40, 56],
            crop_pct: 1.0,
            ..Preprocess::default()
        };
        // ResizeKeepRatio: ratio = min(150 / 40, 200 / 56) = 3.5714...; round(150 / r) = 42.
        assert_eq!(hw.resized_size(150, 200).unwrap(), (42, 56));
        hw.crop_mode = CropMode::Squash;
        assert_eq!(hw.resized_size(150, 200).unwrap(), (40, 56));
        hw.crop_mode = CropMode::Border;
        assert_eq!(hw.resized_size(150, 200).unwrap(), (40, 53));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |p: Preprocess| p.validate().unwrap_err().to_string();
        let base = Preprocess::default();
        assert!(bad(Preprocess {
            input_size: [1, 28, 28],
            ..base.clone()
        })
        .contains("3-channel"));
        assert!(bad(Preprocess {
            crop_pct: 0.0,
            ..base.clone()
        })
        .contains("crop_pct"));
        assert!(bad(Preprocess {
            std: vec![0.2, 0.0, 0.2],
            ..base.clone()
        })
        .contains("std"));
        assert!(bad(Preprocess {
            mean: vec![0.5, 0.5],
            ..base.clone()
        })
        .contains("mean needs 1 or 3"));
        assert!(bad(Preprocess {
            interpolation: Interpolation::Lanczos,
            ..Preprocess::torchvision_default()
        })
        .contains("Pillow"));
    }
}
