//! `residual infer`: a model with PyTorch weights on tensors (safetensors in, safetensors out) or
//! on images (top-k classes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use residual::checkpoint::{ReadOptions, StateDict};
use residual::device::{device_name, parse_device};
use residual::infer::{LoadSettings, LoadedModel, Prediction};
use residual::models::InferenceOptions;
use residual::preprocess::{CropMode, Interpolation, Pipeline, Preprocess, Resize};
use residual::{Inputs, ModelConfig};
use serde::Serialize;

use super::{serde_enum, WeightOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Model config (JSON with "arch"); not needed for a Hugging Face model folder.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Weights: .pth / .pt / .bin (torch.save), .safetensors or .ot, or a Hugging Face model
    /// folder (config.json + model.safetensors or pytorch_model.bin).
    #[arg(long)]
    weights: PathBuf,
    #[command(flatten)]
    weight_options: WeightOptions,
    /// Input tensors (safetensors), read by the names the model takes.
    #[arg(long, conflicts_with = "image")]
    input: Option<PathBuf>,
    /// The tensor to read for a single-input model (default `input`).
    #[arg(long, default_value = "input")]
    input_key: String,
    /// Where to write the result (safetensors, tensor `output`).
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    /// Images to classify. Preprocessing: torchvision's ImageNet evaluation transform unless
    /// --preprocess (or a model folder's config) says otherwise; the flags below override it.
    #[arg(long, num_args = 1..)]
    image: Vec<PathBuf>,
    /// Class names, one per line (default: those of a Hugging Face folder or of the training run
    /// that wrote the weights, else the ImageNet-1k classes).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    topk: i64,
    /// Preprocessing for --image: a timm config.json (its pretrained_cfg), a Hugging Face
    /// preprocessor_config.json, or residual's own JSON (input_size, interpolation, crop_pct,
    /// crop_mode, resize, mean, std, rescale_factor, normalize, pipeline).
    #[arg(long)]
    preprocess: Option<PathBuf>,
    /// Whose evaluation transform the pixels reproduce.
    #[arg(long, value_parser = serde_enum::<Pipeline>())]
    pipeline: Option<Pipeline>,
    /// Shorter side after resizing, before the center crop [default: 256].
    #[arg(long, conflicts_with = "crop_pct")]
    resize: Option<i64>,
    /// Square center crop [default: 224].
    #[arg(long, conflicts_with = "input_size")]
    crop: Option<i64>,
    /// The network's input: SIZE, HxW, or C,H,W as timm writes it (C is 3); resized by
    /// --crop-pct unless --resize is given.
    #[arg(long, value_parser = parse_input_size)]
    input_size: Option<[i64; 3]>,
    #[arg(long, value_parser = serde_enum::<Interpolation>())]
    interpolation: Option<Interpolation>,
    /// timm's crop_pct: resize to floor(side / crop_pct), then center-crop the input size.
    #[arg(long)]
    crop_pct: Option<f64>,
    /// timm's crop_mode: how the image is resized before the crop.
    #[arg(long, value_parser = serde_enum::<CropMode>())]
    crop_mode: Option<CropMode>,
    /// Per-channel mean, e.g. 0.5,0.5,0.5 (one value for all channels).
    #[arg(long, value_delimiter = ',', num_args = 1..=3)]
    mean: Option<Vec<f64>>,
    /// Per-channel standard deviation.
    #[arg(long, value_delimiter = ',', num_args = 1..=3)]
    std: Option<Vec<f64>>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// On CUDA, let cuDNN convolutions and cuBLAS matmuls use TF32 (faster on Ampere and later,
    /// ~1e-3 relative error); by default fp32 stays fp32, as on the CPU.
    #[arg(long)]
    tf32: bool,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Write the pooled features (the classifier's input) instead of the output.
    #[arg(long)]
    features: bool,
    /// Run in the checkpoint's floating-point dtype (e.g. half) instead of fp32.
    #[arg(long)]
    keep_dtype: bool,
    /// Accept missing or unexpected keys (listed on stderr).
    #[arg(long)]
    non_strict: bool,
    /// Run the model as built (PyTorch's eager eval forward, op for op) instead of its inference
    /// form with the batch norms folded into the convolutions.
    #[arg(long)]
    plain: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The top classes of one image, as `--json` prints them.
#[derive(Serialize)]
struct Classified<'a> {
    image: &'a Path,
    top: Vec<Prediction>,
}

impl Args {
    pub fn run(&self) -> Result<ExitCode> {
        let device = parse_device(&self.device)?;
        if device.is_cuda() {
            residual::infer::set_cuda_tf32(self.tf32)?;
        }
        let config = self
            .config
            .as_deref()
            .map(ModelConfig::from_file)
            .transpose()?;
        let settings = LoadSettings {
            read: self.weight_options.read_options(),
            keep_dtype: self.keep_dtype,
            non_strict: self.non_strict,
        };
        let mut loaded = LoadedModel::load_any(config, &self.weights, device, &settings)?;
        if self.one_forward() {
            loaded = loaded.into_one_forward()?;
        } else if !self.plain {
            loaded.model =
                residual::models::for_inference(loaded.model, &InferenceOptions::default())?;
        }
        if !loaded.report.is_clean() {
            eprint!("warning: {}", loaded.report);
        }
        if self.image.is_empty() {
            self.run_on_tensors(&loaded)
        } else {
            self.classify(&loaded)
        }
    }

    /// Images classified in one forward, by the inference form: run as
    /// [`LoadedModel::into_one_forward`] prepares them.
    fn one_forward(&self) -> bool {
        !self.plain
            && !self.image.is_empty()
            && self
                .batch_size
                .is_none_or(|batch| batch >= self.image.len())
    }

    fn run_on_tensors(&self, loaded: &LoadedModel) -> Result<ExitCode> {
        let (Some(input), Some(output)) = (&self.input, &self.output) else {
            bail!("give --input X.safetensors --output Y.safetensors, or --image FILE...");
        };
        let tensors = StateDict::read(input, &ReadOptions::default())?;
        let names = loaded.model.input_names();
        let mut inputs = Inputs::new();
        for name in names {
            let key = if names.len() == 1 {
                self.input_key.as_str()
            } else {
                name
            };
            let t = tensors.get(key).with_context(|| {
                let have: Vec<&str> = tensors.keys().collect();
                format!(
                    "{} has no tensor `{key}` (it has {have:?})",
                    input.display()
                )
            })?;
            inputs.insert(name.to_string(), t.shallow_clone());
        }
        let result = loaded.run(&inputs, self.batch_size, self.features)?;
        let out = StateDict {
            entries: vec![("output".to_string(), result.shallow_clone())],
        };
        out.save_safetensors(output)?;
        let device = loaded.vs.device();
        if self.json {
            println!(
                "{}",
                serde_json::json!({
                    "output": output,
                    "shape": result.size(),
                    "device": device_name(device),
                    "tf32": device.is_cuda() && self.tf32,
                })
            );
        } else {
            println!("wrote `output` {:?} to {}", result.size(), output.display());
        }
        Ok(ExitCode::SUCCESS)
    }

    fn classify(&self, loaded: &LoadedModel) -> Result<ExitCode> {
        let run_classes = match (&self.labels, &loaded.labels) {
            (None, None) => self.run_files()?.0,
            _ => None,
        };
        let labels = match (&self.labels, &loaded.labels, run_classes) {
            (None, Some(labels), _) => labels.clone(),
            (None, None, Some(classes)) => classes,
            (path, _, _) => residual::infer::labels(path.as_deref())?,
        };
        let preprocess = self.preprocess()?;
        let images = self
            .image
            .iter()
            .map(|p| preprocess.apply(p))
            .collect::<Result<Vec<_>>>()?;
        let mut inputs = Inputs::new();
        inputs.insert("input".into(), tch::Tensor::stack(&images, 0));
        let logits = loaded.run(&inputs, self.batch_size, false)?;
        let mut results = Vec::new();
        for (i, image) in self.image.iter().enumerate() {
            let top = residual::infer::predictions(&logits.get(i as i64), self.topk, &labels)?;
            if !self.json {
                println!("{}", image.display());
                for p in &top {
                    let percent = 100.0 * p.probability;
                    println!("  {percent:>6.2}%  {} ({})", p.label, p.index);
                }
            }
            results.push(Classified { image, top });
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&results)?);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The class names and evaluation transform saved by the `residual train` run that wrote
    /// --weights (an image-folder run's `classes.txt` and `preprocess.json`).
    fn run_files(&self) -> Result<(Option<Vec<String>>, Option<Preprocess>)> {
        match residual::train::run_folder_of(&self.weights) {
            Some(run) if self.weights.is_file() => residual::train::run_files(&run),
            _ => Ok((None, None)),
        }
    }

    /// The preprocessing for --image: --preprocess, else what a model folder given as --weights
    /// states, else the transform of the training run that wrote the weights, else torchvision's
    /// default; then the flags.
    fn preprocess(&self) -> Result<Preprocess> {
        let mut p = if let Some(path) = &self.preprocess {
            Preprocess::from_file(path)?
        } else if let (false, (_, Some(p))) = (self.weights.is_dir(), self.run_files()?) {
            eprintln!("preprocessing of the training run (preprocess.json)");
            p
        } else if self.weights.is_dir() {
            match residual::preprocess::for_model_folder(&self.weights)? {
                Some(p) => {
                    eprintln!("preprocessing from {}", self.weights.display());
                    p
                }
                None => Preprocess::torchvision_default(),
            }
        } else {
            Preprocess::torchvision_default()
        };
        if let Some(pipeline) = self.pipeline {
            p.pipeline = pipeline;
        }
        if let Some(interpolation) = self.interpolation {
            p.interpolation = interpolation;
        }
        // crop_pct, crop_mode and the input size decide the resize unless --resize is given.
        if let Some(crop_pct) = self.crop_pct {
            p.crop_pct = crop_pct;
            p.resize = None;
        }
        if let Some(crop_mode) = self.crop_mode {
            p.crop_mode = crop_mode;
            p.resize = None;
        }
        if let Some(input_size) = self.input_size {
            p.input_size = input_size;
            p.resize = None;
        }
        // --crop keeps the resize (torchvision's flags), --resize sets it.
        if let Some(crop) = self.crop {
            p.input_size = [3, crop, crop];
        }
        if let Some(resize) = self.resize {
            p.resize = Some(Resize::ShorterSide(resize));
        }
        if let Some(mean) = &self.mean {
            p.mean.clone_from(mean);
        }
        if let Some(std) = &self.std {
            p.std.clone_from(std);
        }
        // As before the other flags existed: --resize and --crop refuse a resize below the crop
        // (torchvision would pad).
        if let (true, Some(Resize::ShorterSide(resize))) =
            (self.resize.is_some() || self.crop.is_some(), p.resize)
        {
            let [_, h, w] = p.input_size;
            if resize < h.min(w) {
                let crop = if h == w {
                    h.to_string()
                } else {
                    format!("{h}x{w}")
                };
                bail!("--resize {resize} is smaller than the crop {crop}");
            }
        }
        p.validate().context("image preprocessing")?;
        Ok(p)
    }
}

/// `SIZE`, `HxW` or `C,H,W`.
fn parse_input_size(text: &str) -> Result<[i64; 3], String> {
    let parts: Vec<&str> = text.split([',', 'x']).map(str::trim).collect();
    let numbers = parts
        .iter()
        .map(|p| p.parse::<i64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("expected SIZE, HxW or C,H,W, got `{text}`"))?;
    match numbers.as_slice() {
        [s] => Ok([3, *s, *s]),
        [h, w] => Ok([3, *h, *w]),
        [c, h, w] => Ok([*c, *h, *w]),
        _ => Err(format!("expected SIZE, HxW or C,H,W, got `{text}`")),
    }
}
