//! Speed of the training step and of inference on a fixed random batch (`residual bench-train`,
//! `bench-infer`), the twins of the python_ref benchmarks.

use std::time::Instant;

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::loss::logits_loss;
use super::memory_format::{channels_last, vars_channels_last};
use super::sgd::Sgd;
use crate::backend::AutocastDtype;
use crate::config::ModelConfig;
use crate::models::{Inputs, Model};

/// A model config from a short name: `cifar_resnet20` (1-channel input) or any torchvision
/// constructor name (`resnet50`).
pub fn bench_config(arch: &str) -> Result<ModelConfig> {
    let json = match arch.strip_prefix("cifar_resnet") {
        Some(depth) => format!(r#"{{"arch": "cifar_resnet", "depth": {depth}, "in_channels": 1}}"#),
        None => format!(r#"{{"arch": "{arch}"}}"#),
    };
    ModelConfig::from_json(&json)
}

/// Settings shared by the training and inference benchmarks.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub batch_size: i64,
    /// Image side of the (CIFAR) ResNets; the other models' inputs follow from their config.
    pub image_size: i64,
    pub steps: u64,
    pub warmup: u64,
    pub device: Device,
    pub amp: Option<AutocastDtype>,
    pub channels_last: bool,
    /// Inference: the calls (warm-up included, counted from 1) after which the resident set
    /// size is read.
    pub rss_at: Vec<u64>,
}

impl BenchSettings {
    /// One timed call and no warm-up, on the CPU, float32, contiguous inputs: the settings
    /// for [`bench_inputs`] alone; change the rest with struct update syntax.
    pub fn one_call(batch_size: i64, image_size: i64) -> Self {
        Self {
            batch_size,
            image_size,
            steps: 1,
            warmup: 0,
            device: Device::Cpu,
            amp: None,
            channels_last: false,
            rss_at: Vec::new(),
        }
    }
}

/// What [`bench_inference`] measured.
#[derive(Debug, Clone)]
pub struct InferenceBench {
    /// Mean over the timed calls.
    pub ms_per_batch: f64,
    /// Each timed call on the CPU (empty on CUDA, where calls return before the kernels finish).
    pub ms_samples: Vec<f64>,
    /// `(call, kB)`: the resident set size after that call, for each of `rss_at` reached (empty
    /// where /proc/self/status cannot be read).
    pub rss_kb: Vec<(u64, u64)>,
}

/// Random inputs for one batch of `config`'s model, named as its forward takes them: images
/// `[B, in_channels, S, S]` for the ResNets, `[B, input_size, hidden_size]` for ConvSDS,
/// `[B, hidden_size]` for a SiD block, and SiD's `categorical` (valid indices), `numerical` and
/// `text`. Images are channels-last when asked.
pub fn bench_inputs(config: &ModelConfig, settings: &BenchSettings) -> Result<Inputs> {
    let (b, s, device) = (settings.batch_size, settings.image_size, settings.device);
    let float = (Kind::Float, device);
    let mut inputs = Inputs::new();
    let image = |channels: i64| {
        let x = Tensor::randn([b, channels, s, s], float);
        match settings.channels_last {
            true => channels_last(&x),
            false => x,
        }
    };
    let input = match config {
        ModelConfig::CifarResnet(c) => image(c.in_channels),
        ModelConfig::ConvSdsHead(c) => Tensor::randn([b, c.input_size, c.hidden_size], float),
        ModelConfig::ConvSdsLayer(c) => Tensor::randn([b, c.input_size, c.hidden_dim], float),
        ModelConfig::SidResidualBlock(c) => Tensor::randn([b, c.hidden_size], float),
        ModelConfig::SidClassifier(c) => {
            let columns: Vec<Tensor> = c
                .num_categories_list
                .iter()
                .map(|&n| Tensor::randint(n, [b], (Kind::Int64, device)))
                .collect();
            inputs.insert("categorical".into(), Tensor::stack(&columns, 1));
            inputs.insert(
                "numerical".into(),
                Tensor::randn([b, c.num_numerical_features], float),
            );
            let text = [b, c.num_text_features, c.text_input_size];
            inputs.insert("text".into(), Tensor::randn(text, float));
            return Ok(inputs);
        }
        other => match other.resnet() {
            Some(c) => image(c.in_channels),
            None => bail!("bench: no inputs known for a {} model", other.arch()),
        },
    };
    inputs.insert("input".into(), input);
    Ok(inputs)
}

/// What [`timed`] measured.
struct Timing {
    /// Mean seconds per timed call.
    seconds: f64,
    /// Each timed call's seconds, on the CPU only.
    samples: Vec<f64>,
    /// `(call, kB)` for the calls of `BenchSettings::rss_at`.
    rss_kb: Vec<(u64, u64)>,
}

/// Runs `f` under CUDA autocast when `amp` is set (the dtype is set by [`timed`]).
fn autocast<T>(amp: Option<AutocastDtype>, f: impl FnOnce() -> T) -> T {
    match amp {
        Some(_) => tch::autocast(true, f),
        None => f(),
    }
}

/// Seconds per call of `step` after `settings.warmup` untimed calls, each timed call's seconds
/// (on the CPU), and the resident set size after the calls of `settings.rss_at`. Autocast is the
/// caller's: the training step casts only forward and loss, as PyTorch's `torch.autocast` recipe
/// does.
fn timed(settings: &BenchSettings, mut step: impl FnMut() -> Result<Tensor>) -> Result<Timing> {
    if let Some(dtype) = settings.amp {
        if !settings.device.is_cuda() {
            bail!("--amp needs a CUDA device");
        }
        crate::backend::set_autocast_dtype(dtype)?;
    }
    let mut rss = Vec::with_capacity(settings.rss_at.len());
    let mut calls = 0;
    let mut call = |step: &mut dyn FnMut() -> Result<Tensor>| -> Result<Tensor> {
        let out = step()?;
        calls += 1;
        if settings.rss_at.contains(&calls) {
            if let Some(kb) = resident_set_kb() {
                rss.push((calls, kb));
            }
        }
        Ok(out)
    };
    for _ in 0..settings.warmup {
        let _ = call(&mut step)?;
    }
    let sync = || {
        if let Device::Cuda(i) = settings.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    sync();
    let mut samples = Vec::with_capacity(settings.steps as usize);
    let start = Instant::now();
    let mut last = None;
    for _ in 0..settings.steps {
        let t = Instant::now();
        last = Some(call(&mut step)?);
        samples.push(t.elapsed().as_secs_f64());
    }
    if let Some(t) = last {
        t.sum(Kind::Float).double_value(&[]);
    }
    sync();
    let seconds = start.elapsed().as_secs_f64() / settings.steps.max(1) as f64;
    if settings.device != Device::Cpu {
        samples.clear();
    }
    Ok(Timing {
        seconds,
        samples,
        rss_kb: rss,
    })
}

/// The resident set size of this process in kB (`VmRSS` of /proc/self/status), where the
/// system has one.
pub fn resident_set_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A seeded model of `config` on the benchmark's device and its random inputs
/// ([`bench_inputs`]).
fn bench_model(
    config: &ModelConfig,
    settings: &BenchSettings,
) -> Result<(VarStore, Box<dyn Model>, Inputs)> {
    tch::manual_seed(0);
    let vs = VarStore::new(settings.device);
    let model = config.build(vs.root())?;
    let inputs = bench_inputs(config, settings)?;
    Ok((vs, model, inputs))
}

/// Images per second of the training step (forward, cross-entropy, backward, SGD with momentum
/// 0.9 and weight decay 1e-4) on a fixed random batch; the twin of the python_ref benchmarks.
/// With `amp`, forward and loss run under autocast, backward and the SGD step outside it (as
/// `python_ref/bench_gpu.py` does).
pub fn benchmark(config: &ModelConfig, settings: &BenchSettings) -> Result<f64> {
    let classes = match config {
        ModelConfig::CifarResnet(c) => c.num_classes,
        other => match other.resnet() {
            Some(c) => c.num_classes,
            None => bail!(
                "bench-train times image classifiers, not a {} model",
                other.arch()
            ),
        },
    };
    let (vs, model, inputs) = bench_model(config, settings)?;
    if settings.channels_last {
        vars_channels_last(&vs);
    }
    // As `residual train` runs its steps (`Trainer::run`).
    crate::memory::keep_freed_memory()?;
    let mut sgd = Sgd::new(&vs, 0.9, 1e-4, true);
    let y = Tensor::randint(
        classes.min(10),
        [settings.batch_size],
        (Kind::Int64, settings.device),
    );
    let timing = timed(settings, || {
        let loss = autocast(settings.amp, || -> Result<Tensor> {
            Ok(logits_loss(&model.forward_named(&inputs, true)?, &y, 0.0))
        })?;
        sgd.zero_grad();
        loss.backward();
        sgd.step(0.1);
        Ok(loss)
    })?;
    Ok(settings.batch_size as f64 / timing.seconds)
}

/// Milliseconds per eval-mode forward of a random batch (under autocast with `amp`), of the
/// inference form of the model ([`crate::models::for_inference`]) when `fast`, else of the model
/// as built.
pub fn bench_inference(
    config: &ModelConfig,
    settings: &BenchSettings,
    fast: bool,
) -> Result<InferenceBench> {
    let (_vs, model, inputs) = bench_model(config, settings)?;
    let model = if fast {
        crate::models::for_inference(model, &Default::default())?
    } else {
        model
    };
    let timing = tch::no_grad(|| {
        timed(settings, || {
            autocast(settings.amp, || model.forward_named(&inputs, false))
        })
    })?;
    Ok(InferenceBench {
        ms_per_batch: timing.seconds * 1e3,
        ms_samples: timing.samples.iter().map(|s| s * 1e3).collect(),
        rss_kb: timing.rss_kb,
    })
}
