//! `residual infer`: a model with PyTorch weights on tensors (safetensors in, safetensors out) or
//! on images (top-k classes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use residual::checkpoint::{ReadOptions, StateDict};
use residual::device::{device_name, parse_device};
use residual::infer::{LoadSettings, LoadedModel, Prediction};
use residual::{Inputs, ModelConfig};
use serde::Serialize;

use super::WeightOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Model config (JSON with "arch").
    #[arg(long)]
    config: PathBuf,
    /// Weights: .pth / .pt / .bin (torch.save), .safetensors or .ot.
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
    /// Images to classify (torchvision's evaluation preprocessing).
    #[arg(long, num_args = 1..)]
    image: Vec<PathBuf>,
    /// Class names, one per line (default: the ImageNet-1k classes).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    topk: i64,
    /// Shorter side after resizing, before the center crop.
    #[arg(long, default_value_t = 256)]
    resize: i64,
    #[arg(long, default_value_t = 224)]
    crop: i64,
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
        let config = ModelConfig::from_file(&self.config)?;
        let settings = LoadSettings {
            read: self.weight_options.read_options(),
            keep_dtype: self.keep_dtype,
            non_strict: self.non_strict,
        };
        let loaded = LoadedModel::load(config, &self.weights, device, &settings)?;
        if !loaded.report.is_clean() {
            eprint!("warning: {}", loaded.report);
        }
        if self.image.is_empty() {
            self.run_on_tensors(&loaded)
        } else {
            self.classify(&loaded)
        }
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
        let labels = residual::infer::labels(self.labels.as_deref())?;
        let images = self
            .image
            .iter()
            .map(|p| residual::infer::preprocess_image(p, self.resize, self.crop))
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
}
