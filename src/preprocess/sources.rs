//! Preprocessing from the files that come with weights: timm's `pretrained_cfg` and Hugging Face's
//! `preprocessor_config.json`, read by the rules of the libraries that wrote them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::{default_rescale_factor, CropMode, Interpolation, Pipeline, Preprocess, Resize};

/// transformers' `IMAGENET_STANDARD_MEAN` / `_STD`, the ConvNeXT and ViT processors' defaults.
const STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];
/// transformers' `OPENAI_CLIP_MEAN` / `_STD`, the BiT processor's defaults.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The preprocessing a model folder states: its `preprocessor_config.json` (Hugging Face), else
/// the `pretrained_cfg` of its `config.json` (a timm model saved by `save_for_hf` /
/// `push_to_hub`). `None` when neither file says (a transformers `config.json` alone does not).
pub fn for_model_folder(dir: &Path) -> Result<Option<Preprocess>> {
    let processor = dir.join("preprocessor_config.json");
    if processor.is_file() {
        let p = Preprocess::from_hf_preprocessor_config(&processor)?;
        p.validate()
            .with_context(|| format!("preprocessor config {}", processor.display()))?;
        return Ok(Some(p));
    }
    let config = dir.join("config.json");
    if config.is_file() {
        let value = super::read_json(&config)?;
        if is_timm_config(&value) {
            let p = timm(&value).with_context(|| format!("timm config {}", config.display()))?;
            p.validate()
                .with_context(|| format!("timm config {}", config.display()))?;
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// A timm `config.json`: `pretrained_cfg` inside, or the older flat form (`architecture` at the
/// top, no transformers `model_type`).
pub(super) fn is_timm_config(value: &Value) -> bool {
    value.get("pretrained_cfg").is_some_and(Value::is_object)
        || (value.get("architecture").is_some() && value.get("model_type").is_none())
}

/// Keys only a transformers image-processor config has.
pub(super) fn is_hf_preprocessor_config(value: &Value) -> bool {
    const KEYS: [&str; 9] = [
        "image_processor_type",
        "feature_extractor_type",
        "image_mean",
        "image_std",
        "resample",
        "do_resize",
        "do_normalize",
        "do_rescale",
        "size",
    ];
    value
        .as_object()
        .is_some_and(|o| KEYS.iter().any(|k| o.contains_key(*k)))
}

/// `resolve_data_config(pretrained_cfg=cfg)` (timm 1.0): each value from the config where it is
/// set (and, as timm tests it, truthy), else timm's default.
pub(super) fn timm(value: &Value) -> Result<Preprocess> {
    let cfg = match value.get("pretrained_cfg") {
        Some(inner) => inner,
        None => value,
    };
    let cfg = cfg
        .as_object()
        .context("pretrained_cfg is not a JSON object")?;
    let truthy = |key: &str| cfg.get(key).filter(|v| is_truthy(v));
    let mut p = Preprocess::default();
    if let Some(v) = cfg.get("input_size").filter(|v| !v.is_null()) {
        p.input_size = serde_json::from_value(v.clone())
            .with_context(|| format!("input_size {v} is not [channels, height, width]"))?;
    }
    if let Some(v) = truthy("interpolation") {
        p.interpolation = match v.as_str() {
            Some("random") => {
                bail!("interpolation \"random\" is a training augmentation, not an eval transform")
            }
            _ => serde_json::from_value(v.clone())
                .with_context(|| format!("unknown interpolation {v}"))?,
        };
    }
    if let Some(v) = truthy("mean") {
        p.mean = floats(v).context("mean")?;
    }
    if let Some(v) = truthy("std") {
        p.std = floats(v).context("std")?;
    }
    if let Some(v) = truthy("crop_pct") {
        p.crop_pct = v.as_f64().with_context(|| format!("crop_pct {v}"))?;
    }
    if let Some(v) = truthy("crop_mode") {
        p.crop_mode =
            serde_json::from_value(v.clone()).with_context(|| format!("unknown crop_mode {v}"))?;
    }
    Ok(p)
}

fn is_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A number or a list of numbers.
fn floats(v: &Value) -> Result<Vec<f64>> {
    match v {
        Value::Number(n) => Ok(vec![n.as_f64().context("not a number")?]),
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_f64().with_context(|| format!("{x} is not a number")))
            .collect(),
        other => bail!("expected a number or a list of numbers, got {other}"),
    }
}

/// The image processors whose eval transform is reproduced, with their class defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Processor {
    /// `ConvNextImageProcessor`, the one `AutoImageProcessor` gives Hugging Face's ResNets.
    ConvNext,
    Vit,
    Bit,
}

impl Processor {
    fn from_type(name: &str) -> Result<Self> {
        let base = name
            .trim_end_matches("Fast")
            .trim_end_matches("Pil")
            .trim_end_matches("ImageProcessor")
            .trim_end_matches("FeatureExtractor");
        Ok(match base {
            "ConvNext" => Self::ConvNext,
            "ViT" => Self::Vit,
            "Bit" => Self::Bit,
            _ => bail!(
                "image processor {name} is not supported (ConvNextImageProcessor, \
                 ViTImageProcessor, BitImageProcessor are)"
            ),
        })
    }

    /// transformers' `default_to_square`: whether a bare number `size` means height = width.
    fn default_to_square(self) -> bool {
        self == Self::Vit
    }
}

/// What transformers' processor does with these settings, by class: `ConvNextImageProcessor`
/// resizes the shorter side to `int(shortest_edge / crop_pct)` and center-crops `shortest_edge`
/// (from 384 on, it resizes to `shortest_edge` squared without a crop); the others resize to
/// `size` (`shortest_edge` keeps the aspect ratio) and center-crop `crop_size` when
/// `do_center_crop`.
pub(super) fn hugging_face(value: &Value) -> Result<Preprocess> {
    let cfg = value
        .as_object()
        .context("preprocessor config is not a JSON object")?;
    let type_name = ["image_processor_type", "feature_extractor_type"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_str));
    // A processor config without a type is taken as the ResNets' ConvNeXT one.
    let processor = match type_name {
        Some(name) => Processor::from_type(name)?,
        None => Processor::ConvNext,
    };
    let get = |key: &str| cfg.get(key).filter(|v| !v.is_null());
    let flag = |key: &str, default: bool| -> Result<bool> {
        get(key).map_or(Ok(default), |v| {
            v.as_bool()
                .with_context(|| format!("{key} {v} is not true or false"))
        })
    };
    if !flag("do_resize", true)? {
        bail!("do_resize is false: the input size would follow each image's size");
    }
    let interpolation = match get("resample") {
        Some(v) => {
            Interpolation::from_pil_code(v.as_i64().with_context(|| format!("resample {v}"))?)?
        }
        None if processor == Processor::Vit => Interpolation::Bilinear,
        None => Interpolation::Bicubic,
    };
    let (default_mean, default_std) = match processor {
        Processor::Bit => (CLIP_MEAN, CLIP_STD),
        Processor::ConvNext | Processor::Vit => (STANDARD_MEAN, STANDARD_STD),
    };
    let stat = |key: &str, default: [f64; 3]| -> Result<Vec<f64>> {
        match get(key) {
            Some(v) => floats(v).with_context(|| key.to_string()),
            None => Ok(default.to_vec()),
        }
    };
    let mean = stat("image_mean", default_mean)?;
    let std = stat("image_std", default_std)?;
    let rescale_factor = if flag("do_rescale", true)? {
        match get("rescale_factor") {
            Some(v) => v.as_f64().with_context(|| format!("rescale_factor {v}"))?,
            None => default_rescale_factor(),
        }
    } else {
        1.0
    };
    let size = match get("size") {
        Some(v) => SizeDict::parse(v, processor.default_to_square()).context("size")?,
        None => match processor {
            Processor::ConvNext => SizeDict::shortest_edge(384),
            Processor::Vit => SizeDict::square(224),
            Processor::Bit => SizeDict::shortest_edge(224),
        },
    };
    let do_center_crop = flag("do_center_crop", processor == Processor::Bit)?;
    let mut p = Preprocess {
        interpolation,
        crop_mode: CropMode::Center,
        mean,
        std,
        rescale_factor,
        normalize: flag("do_normalize", true)?,
        pipeline: Pipeline::Transformers,
        ..Preprocess::default()
    };
    if processor == Processor::ConvNext {
        if do_center_crop {
            bail!("do_center_crop after ConvNextImageProcessor's own crop is not supported");
        }
        let edge = size
            .shortest_edge
            .context("ConvNextImageProcessor needs size.shortest_edge")?;
        let crop_pct = match get("crop_pct") {
            Some(v) => v.as_f64().with_context(|| format!("crop_pct {v}"))?,
            None => 224.0 / 256.0,
        };
        p.input_size = [3, edge, edge];
        if edge < 384 {
            p.crop_pct = crop_pct;
            p.resize = Some(Resize::ShorterSide((edge as f64 / crop_pct) as i64));
        } else {
            p.crop_pct = 1.0;
            p.resize = Some(Resize::Exact([edge, edge]));
        }
        return Ok(p);
    }
    let resize = match (size.shortest_edge, size.height, size.width) {
        (Some(edge), None, None) => Resize::ShorterSide(edge),
        (None, Some(h), Some(w)) => Resize::Exact([h, w]),
        _ => bail!("size {size:?}: expected shortest_edge, or height and width"),
    };
    p.resize = Some(resize);
    if do_center_crop {
        let crop = match get("crop_size") {
            Some(v) => SizeDict::parse(v, true).context("crop_size")?,
            None => SizeDict::square(224),
        };
        let (Some(h), Some(w)) = (crop.height, crop.width) else {
            bail!("crop_size {crop:?}: expected height and width");
        };
        p.input_size = [3, h, w];
    } else {
        let Resize::Exact([h, w]) = resize else {
            bail!(
                "size.shortest_edge without do_center_crop: the input size would follow each \
                 image's aspect ratio"
            );
        };
        p.input_size = [3, h, w];
    }
    p.crop_pct = crop_pct_of(&p);
    Ok(p)
}

/// crop_pct as information for processors that resize to an explicit size.
fn crop_pct_of(p: &Preprocess) -> f64 {
    match p.resize {
        Some(Resize::ShorterSide(s)) => p.input_size[1].min(p.input_size[2]) as f64 / s as f64,
        _ => 1.0,
    }
}

/// transformers' size dictionary (`get_size_dict`): `{"shortest_edge"}`, `{"height", "width"}`,
/// or a bare number (a square or a shortest edge, by the class's `default_to_square`).
#[derive(Debug, Default)]
struct SizeDict {
    shortest_edge: Option<i64>,
    height: Option<i64>,
    width: Option<i64>,
}

impl SizeDict {
    fn shortest_edge(edge: i64) -> Self {
        Self {
            shortest_edge: Some(edge),
            ..Self::default()
        }
    }

    fn square(side: i64) -> Self {
        Self {
            height: Some(side),
            width: Some(side),
            ..Self::default()
        }
    }

    fn parse(v: &Value, default_to_square: bool) -> Result<Self> {
        let int = |x: &Value| {
            x.as_i64()
                .filter(|&n| n >= 1)
                .with_context(|| format!("{x} is not a positive integer"))
        };
        match v {
            Value::Number(_) if default_to_square => Ok(Self::square(int(v)?)),
            Value::Number(_) => Ok(Self::shortest_edge(int(v)?)),
            Value::Array(items) if items.len() == 2 => Ok(Self {
                height: Some(int(&items[0])?),
                width: Some(int(&items[1])?),
                ..Self::default()
            }),
            Value::Object(o) => Self::from_object(o, int),
            other => bail!("unexpected size {other}"),
        }
    }

    fn from_object(o: &Map<String, Value>, int: impl Fn(&Value) -> Result<i64>) -> Result<Self> {
        if let Some(key) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "shortest_edge" | "height" | "width"))
        {
            bail!("size key {key} is not supported (shortest_edge, height, width are)");
        }
        let field = |key: &str| o.get(key).filter(|v| !v.is_null()).map(&int).transpose();
        Ok(Self {
            shortest_edge: field("shortest_edge")?,
            height: field("height")?,
            width: field("width")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};
    use serde_json::json;

    #[test]
    fn microsoft_resnet50_processor() {
        // microsoft/resnet-50's preprocessor_config.json.
        let p = hugging_face(&json!({
            "crop_pct": 0.875, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "ConvNextFeatureExtractor",
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "resample": 3, "size": 224
        }))
        .unwrap();
        assert_eq!(p.input_size, [3, 224, 224]);
        assert_eq!(p.resize, Some(Resize::ShorterSide(256)));
        assert_eq!(p.interpolation, Interpolation::Bicubic);
        assert_eq!(p.mean, IMAGENET_MEAN);
        assert_eq!(p.pipeline, Pipeline::Transformers);
        let big = hugging_face(&json!({"size": {"shortest_edge": 384}})).unwrap();
        assert_eq!(big.resize, Some(Resize::Exact([384, 384])));
        assert_eq!(big.mean, STANDARD_MEAN);
    }

    #[test]
    fn unsupported_processors_are_named() {
        let err = hugging_face(&json!({"image_processor_type": "DetrImageProcessor"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DetrImageProcessor"), "{err}");
        let err = hugging_face(&json!({"image_processor_type": "ViTImageProcessor",
                                       "size": {"shortest_edge": 224}}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("aspect ratio"), "{err}");
    }

    #[test]
    fn timm_defaults_fill_the_gaps() {
        let p = timm(
            &json!({"pretrained_cfg": {"input_size": [3, 288, 288], "crop_pct": 1.0,
                                                "interpolation": "bilinear", "mean": null}}),
        )
        .unwrap();
        assert_eq!(p.input_size, [3, 288, 288]);
        assert_eq!(p.crop_pct, 1.0);
        assert_eq!(p.interpolation, Interpolation::Bilinear);
        assert_eq!(p.mean, IMAGENET_MEAN);
        assert_eq!(p.std, IMAGENET_STD);
        // crop_pct 0 is falsy to timm: the default stays.
        let flat = timm(&json!({"architecture": "resnet50", "crop_pct": 0})).unwrap();
        assert_eq!(flat.crop_pct, 0.875);
        assert!(is_timm_config(&json!({"architecture": "resnet50"})));
        assert!(!is_timm_config(
            &json!({"architecture": "x", "model_type": "resnet"})
        ));
    }
}
