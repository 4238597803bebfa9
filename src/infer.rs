//! Inference from files: a model from its config and a PyTorch checkpoint, batched forward over
//! named input tensors, and image classification (preprocessing in [`crate::preprocess`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_state_dict, Checkpoint, ReadOptions, Weights};
use crate::config::ModelConfig;
use crate::models::huggingface;
use crate::models::{for_inference, InferenceOptions, Inputs, Model};
use crate::preprocess::Preprocess;

/// How weights meet the model.
#[derive(Debug, Clone, Default)]
pub struct LoadSettings {
    pub read: ReadOptions,
    /// Keep the checkpoint's floating-point dtype (e.g. half) instead of converting to fp32.
    pub keep_dtype: bool,
    /// Allow missing / unexpected keys (they are reported on stderr by the CLI).
    pub non_strict: bool,
}

/// A model built from `config` with the weights of `weights`, in eval use.
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: Box<dyn Model>,
    pub config: ModelConfig,
    pub report: crate::checkpoint::LoadReport,
    /// Class names that came with the weights (a Hugging Face folder's `id2label`).
    pub labels: Option<Vec<String>>,
    /// The floating-point kind of the weights, read once they are loaded.
    kind: Kind,
}

impl LoadedModel {
    /// `config` with the weights of the checkpoint file `weights`.
    pub fn load(
        config: ModelConfig,
        weights: &Path,
        device: Device,
        settings: &LoadSettings,
    ) -> Result<Self> {
        // Only the table is read here: a checkpoint that does not fit is refused unread.
        let state = Checkpoint::open(weights, &settings.read)?;
        Self::with_state(config, state, weights, device, settings)
    }

    /// A checkpoint file with `config`, or a Hugging Face model folder, whose `config.json` gives
    /// the config unless `config` is given and whose `id2label` gives the labels.
    pub fn load_any(
        config: Option<ModelConfig>,
        weights: &Path,
        device: Device,
        settings: &LoadSettings,
    ) -> Result<Self> {
        if !huggingface::is_folder(weights) {
            let config = config.with_context(|| {
                format!(
                    "{} is not a Hugging Face model folder (config.json + weights): give --config",
                    weights.display()
                )
            })?;
            return Self::load(config, weights, device, settings);
        }
        let folder = huggingface::read_folder(weights)?;
        let config = config.unwrap_or(folder.config);
        let mut loaded = Self::with_state(config, folder.state, weights, device, settings)?;
        loaded.labels = folder.labels;
        Ok(loaded)
    }

    fn with_state<W: Weights>(
        config: ModelConfig,
        state: W,
        weights: &Path,
        device: Device,
        settings: &LoadSettings,
    ) -> Result<Self> {
        let vs = VarStore::new(device);
        let model = config.build(vs.root())?;
        if settings.keep_dtype {
            let float_kinds: Vec<Kind> = state
                .metadata()
                .iter()
                .filter(|t| t.is_floating_point())
                .map(|t| t.kind)
                .collect();
            if let Some(kind) = float_kinds.first() {
                if float_kinds.iter().any(|k| k != kind) {
                    bail!(
                        "--keep-dtype: the checkpoint mixes floating-point dtypes {float_kinds:?}"
                    );
                }
                // Only floating-point variables: BatchNorm's int64 counters keep their type.
                tch::no_grad(|| {
                    for var in vs.variables().values().filter(|t| t.is_floating_point()) {
                        var.shallow_clone().set_data(&var.to_kind(*kind));
                    }
                });
            }
        }
        let report = load_state_dict(&vs, &state, !settings.non_strict)
            .with_context(|| format!("cannot load {} into {}", weights.display(), config.arch()))?;
        // The random init the checkpoint replaced left its temporaries in the heap.
        crate::memory::release_free_memory();
        let kind = vs
            .variables()
            .values()
            .find(|t| t.is_floating_point())
            .map_or(Kind::Float, |t| t.kind());
        Ok(Self {
            vs,
            model,
            config,
            report,
            labels: None,
            kind,
        })
    }

    /// The floating-point kind of the model's weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Replaces the model by its inference form for a single run
    /// ([`InferenceOptions::one_forward`]), then empties the variable store: the tensors folding
    /// replaced (each folded convolution's original weight, its batch norm) are freed instead of
    /// kept beside their folded copies (resnet18: 47 MB of `residual infer`'s ~500 MB peak).
    /// The model keeps every tensor it uses; no [`crate::Predictor`] can be made from `vs` after.
    pub fn into_one_forward(mut self) -> Result<Self> {
        self.model = for_inference(self.model, &InferenceOptions::one_forward())?;
        {
            let mut variables = self.vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
            variables.named_variables.clear();
            variables.trainable_variables.clear();
        }
        crate::memory::release_free_memory();
        Ok(self)
    }

    /// Runs the model in eval mode over `inputs` in batches of `batch_size` along dim 0 and
    /// concatenates the results; `features` asks for the model's features instead of its output.
    pub fn run(
        &self,
        inputs: &Inputs,
        batch_size: Option<usize>,
        features: bool,
    ) -> Result<Tensor> {
        let device = self.vs.device();
        let kind = self.kind();
        let mut moved = Inputs::new();
        for name in self.model.input_names() {
            let t = crate::models::input(inputs, name)?;
            let t = if t.is_floating_point() {
                t.to_kind(kind)
            } else {
                t.shallow_clone()
            };
            moved.insert(name.to_string(), t.to_device(device));
        }
        let batch = moved
            .values()
            .next()
            .map(|t| t.size().first().copied().unwrap_or(0))
            .unwrap_or(0);
        if let Some((name, t)) = moved.iter().find(|(_, t)| t.size().first() != Some(&batch)) {
            bail!(
                "input `{name}` has batch {:?}, the others {batch}",
                t.size().first()
            );
        }
        let step = batch_size.unwrap_or(batch.max(1) as usize).max(1) as i64;
        let mut outputs = Vec::new();
        tch::no_grad(|| -> Result<()> {
            let mut start = 0;
            while start < batch.max(1) {
                let len = step.min(batch - start).max(0);
                let chunk: Inputs = moved
                    .iter()
                    .map(|(k, t)| (k.clone(), t.narrow(0, start, len)))
                    .collect();
                let out = if features {
                    self.model.forward_features(&chunk, false)?
                } else {
                    self.model.forward_named(&chunk, false)?
                };
                outputs.push(out.to_device(Device::Cpu));
                start += step;
            }
            Ok(())
        })?;
        Ok(Tensor::cat(&outputs, 0))
    }
}

/// Whether fp32 work on CUDA may use TF32 (cuDNN convolutions and cuBLAS matmuls), for the whole
/// process. libtorch lets cuDNN convolutions use TF32 by default, which moves a resnet50's logits
/// by ~1e-3 relative on Ampere and later GPUs; `residual infer` calls this with `false` unless
/// `--tf32` is given, so CUDA results match the CPU's to fp32 rounding (~1e-6 relative).
pub fn set_cuda_tf32(allow: bool) -> Result<()> {
    use crate::backend::{set_flag, Flag};
    set_flag(Flag::AllowTf32Cudnn, allow)?;
    set_flag(Flag::AllowTf32Cublas, allow)
}

/// torchvision's ImageNet evaluation preprocessing (`ImageClassification`): resize the shorter side
/// to `resize` (bilinear, antialiased), center-crop `crop`, scale to [0, 1], normalise with the
/// ImageNet mean and std. Returns `[3, crop, crop]` float. [`Preprocess`] has the other transforms.
pub fn preprocess_image(path: &Path, resize: i64, crop: i64) -> Result<Tensor> {
    if resize < crop {
        bail!("--resize {resize} is smaller than the crop {crop}");
    }
    Preprocess::torchvision(resize, crop).apply(path)
}

/// Class names, one per line.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read labels {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The ImageNet-1k class names (torchvision's order), shipped with the crate.
pub const IMAGENET_CLASSES: &str = include_str!("../data/imagenet_classes.txt");

/// The class names in `path` (see [`read_labels`]), or without one the ImageNet-1k classes.
pub fn labels(path: Option<&Path>) -> Result<Vec<String>> {
    match path {
        Some(path) => read_labels(path),
        None => Ok(IMAGENET_CLASSES.lines().map(str::to_string).collect()),
    }
}

/// `(index, probability)` of the `k` most likely classes of `logits` `[num_classes]`.
pub fn top_k(logits: &Tensor, k: i64) -> Result<Vec<(i64, f64)>> {
    let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
    let k = k.min(probs.size()[0]);
    let (values, indices) = probs.topk(k, -1, true, true);
    Ok((0..k)
        .map(|i| (indices.int64_value(&[i]), values.double_value(&[i])))
        .collect())
}

/// One of the most likely classes of an input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub index: i64,
    /// The class name, or `class N` where `labels` has none.
    pub label: String,
    pub probability: f64,
}

/// The `k` most likely classes of `logits` `[num_classes]`, named from `labels`.
pub fn predictions(logits: &Tensor, k: i64, labels: &[String]) -> Result<Vec<Prediction>> {
    Ok(top_k(logits, k)?
        .into_iter()
        .map(|(index, probability)| Prediction {
            index,
            label: usize::try_from(index)
                .ok()
                .and_then(|i| labels.get(i))
                .cloned()
                .unwrap_or_else(|| format!("class {index}")),
            probability,
        })
        .collect())
}
