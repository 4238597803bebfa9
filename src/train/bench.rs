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
#[derive(Debug, Clone, Copy)]
pub struct BenchSettings {
    pub shape: [i64; 4],
    pub steps: u64,
    pub warmup: u64,
    pub device: Device,
    pub amp: Option<AutocastDtype>,
    pub channels_last: bool,
}

/// Runs `f` under CUDA autocast when `amp` is set (the dtype is set by [`timed`]).
fn autocast<T>(amp: Option<AutocastDtype>, f: impl FnOnce() -> T) -> T {
    match amp {
        Some(_) => tch::autocast(true, f),
        None => f(),
    }
}

/// Seconds per call of `step` after `settings.warmup` untimed calls. Autocast is the caller's:
/// the training step casts only forward and loss, as PyTorch's `torch.autocast` recipe does.
fn timed(settings: &BenchSettings, mut step: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    if let Some(dtype) = settings.amp {
        if !settings.device.is_cuda() {
            bail!("--amp needs a CUDA device");
        }
        crate::backend::set_autocast_dtype(dtype)?;
    }
    for _ in 0..settings.warmup {
        let _ = step()?;
    }
    let sync = || {
        if let Device::Cuda(i) = settings.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    sync();
    let start = Instant::now();
    let mut last = None;
    for _ in 0..settings.steps {
        last = Some(step()?);
    }
    if let Some(t) = last {
        t.sum(Kind::Float).double_value(&[]);
    }
    sync();
    Ok(start.elapsed().as_secs_f64() / settings.steps.max(1) as f64)
}

/// A seeded model of `config` on the benchmark's device and its input: a random batch of
/// `settings.shape`, channels-last (weights too) when asked.
fn bench_model(
    config: &ModelConfig,
    settings: &BenchSettings,
) -> Result<(VarStore, Box<dyn Model>, Inputs)> {
    tch::manual_seed(0);
    let vs = VarStore::new(settings.device);
    let model = config.build(vs.root())?;
    let x = Tensor::randn(settings.shape, (Kind::Float, settings.device));
    let x = if settings.channels_last {
        channels_last(&x)
    } else {
        x
    };
    let mut inputs = Inputs::new();
    inputs.insert("input".into(), x);
    Ok((vs, model, inputs))
}

/// Images per second of the training step (forward, cross-entropy, backward, SGD with momentum
/// 0.9 and weight decay 1e-4) on a fixed random batch; the twin of the python_ref benchmarks.
/// With `amp`, forward and loss run under autocast, backward and the SGD step outside it (as
/// `python_ref/bench_gpu.py` does).
pub fn benchmark(config: &ModelConfig, settings: &BenchSettings) -> Result<f64> {
    let (vs, model, inputs) = bench_model(config, settings)?;
    if settings.channels_last {
        vars_channels_last(&vs);
    }
    let mut sgd = Sgd::new(&vs, 0.9, 1e-4, true);
    let y = Tensor::randint(10, [settings.shape[0]], (Kind::Int64, settings.device));
    let seconds = timed(settings, || {
        let loss = autocast(settings.amp, || -> Result<Tensor> {
            Ok(logits_loss(&model.forward_named(&inputs, true)?, &y, 0.0))
        })?;
        sgd.zero_grad();
        loss.backward();
        sgd.step(0.1);
        Ok(loss)
    })?;
    Ok(settings.shape[0] as f64 / seconds)
}

/// Milliseconds per eval-mode forward of a random batch (under autocast with `amp`), of the
/// inference form of the model ([`crate::models::for_inference`]) when `fast`, else of the model
/// as built.
pub fn bench_inference(config: &ModelConfig, settings: &BenchSettings, fast: bool) -> Result<f64> {
    let (_vs, model, inputs) = bench_model(config, settings)?;
    let model = if fast {
        crate::models::for_inference(model, &Default::default())?
    } else {
        model
    };
    let seconds = tch::no_grad(|| {
        timed(settings, || {
            autocast(settings.amp, || model.forward_named(&inputs, false))
        })
    })?;
    Ok(seconds * 1e3)
}
