//! Training through libtorch on CPU or CUDA: SGD with momentum and weight decay, step or cosine
//! schedules with warmup, label smoothing, mixed precision on CUDA, per-epoch evaluation, a run
//! folder with metrics and atomic checkpoints, bit-exact resume, Ctrl-C and NaN handling.
//!
//! A run folder holds `model.json` (the model config), `run.json` (these options),
//! `metrics.jsonl` (one line per epoch) and `checkpoints/step-N/` (`model.pth`, a state_dict
//! PyTorch loads; `optimizer.safetensors`, the momentum buffers; `state.json`, where the run is),
//! with `checkpoints/LATEST` naming the newest complete one.

mod sgd;

pub use sgd::{is_norm_or_bias, Sgd};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use crate::backend::{AutocastDtype, SwitchGuard, Switches};
use crate::checkpoint::{self, load_state_dict, ReadOptions, StateDict};
use crate::config::ModelConfig;
use crate::data::{Augment, Batches, Dataset, Normalizer};
use crate::fs::write_atomic;
use crate::models::{Inputs, Model};

/// Set by a Ctrl-C handler; the trainer checkpoints and stops at the next batch.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Multiply by `gamma` (0.1) at each milestone epoch (default: 50% and 75% of the run, as
    /// the paper's 32k and 48k of 64k iterations).
    Step,
    /// Cosine decay to zero over the run.
    Cosine,
}

/// Everything that shapes a training run; saved in `run.json` so a resumed run continues alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: u64,
    pub batch_size: i64,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Apply weight decay to norm weights and biases too (the paper does).
    pub decay_norm_and_bias: bool,
    pub schedule: Schedule,
    /// Epochs at which the step schedule divides the rate by 10 (empty: 50% and 75%).
    pub milestones: Vec<u64>,
    /// Linear warmup from 0, in epochs (fractions allowed).
    pub warmup: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Train on the first N training examples only.
    pub subset: Option<i64>,
    /// Evaluate on the first N test examples only.
    #[serde(default)]
    pub test_subset: Option<i64>,
    /// Hold out the last N training examples as a validation set.
    pub validation: Option<i64>,
    pub augment: Option<Augment>,
    /// CUDA mixed precision.
    pub amp: Option<AutocastDtype>,
    /// Let cuDNN convolutions and cuBLAS matmuls use TF32 on CUDA. Off: fp32 means IEEE fp32
    /// (PyTorch's own default lets convolutions use TF32).
    #[serde(default)]
    pub tf32: bool,
    pub channels_last: bool,
    pub cudnn_benchmark: bool,
    /// Deterministic algorithms (libtorch's and cuDNN's), for reproducible GPU runs.
    #[serde(default)]
    pub deterministic: bool,
    /// Evaluate the test set every epoch (the experiment's curves need it).
    pub eval_test: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            decay_norm_and_bias: true,
            schedule: Schedule::Step,
            milestones: Vec::new(),
            warmup: 0.0,
            label_smoothing: 0.0,
            seed: 0,
            subset: None,
            test_subset: None,
            validation: None,
            augment: Some(Augment { pad: 4, flip: true }),
            amp: None,
            tf32: false,
            channels_last: false,
            cudnn_benchmark: false,
            deterministic: false,
            eval_test: true,
        }
    }
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("epochs: must be at least 1");
        }
        if self.batch_size < 1 {
            bail!("batch_size: must be at least 1, got {}", self.batch_size);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr: must be a positive number, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("momentum: must be in [0, 1), got {}", self.momentum);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("weight_decay: must be >= 0, got {}", self.weight_decay);
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "label_smoothing: must be in [0, 1), got {}",
                self.label_smoothing
            );
        }
        if !(self.warmup >= 0.0 && self.warmup.is_finite()) {
            bail!("warmup: must be >= 0 epochs, got {}", self.warmup);
        }
        Ok(())
    }

    /// The learning rate at `t` epochs into the run (fractional).
    pub fn lr_at(&self, t: f64) -> f64 {
        if self.warmup > 0.0 && t < self.warmup {
            return self.lr * t / self.warmup;
        }
        let epochs = self.epochs as f64;
        match self.schedule {
            Schedule::Step => {
                let milestones = if self.milestones.is_empty() {
                    vec![self.epochs / 2, self.epochs * 3 / 4]
                } else {
                    self.milestones.clone()
                };
                let passed = milestones
                    .iter()
                    .filter(|m| **m > 0 && t >= **m as f64)
                    .count();
                self.lr * 0.1f64.powi(passed as i32)
            }
            Schedule::Cosine => 0.5 * self.lr * (1.0 + (std::f64::consts::PI * t / epochs).cos()),
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub train_loss: f64,
    pub train_error: f64,
    pub val_loss: Option<f64>,
    pub val_error: Option<f64>,
    pub test_loss: Option<f64>,
    pub test_error: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// The epoch in progress (0-based) and the batches of it already trained.
    pub epoch: u64,
    pub batch: i64,
    pub global_step: u64,
    /// fp16 loss scaling (absent in checkpoints of runs without it).
    #[serde(default)]
    pub loss_scaler: LossScaler,
}

/// Dynamic loss scaling for fp16 training, as `torch.amp.GradScaler` with its defaults: the loss
/// is multiplied by `scale` before the backward; a step whose gradients hold inf or NaN is
/// skipped and halves the scale, and every `GROWTH_INTERVAL` clean steps in a row double it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
}

impl LossScaler {
    pub const INIT_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// Records whether the step's gradients were finite (the step is taken only if so).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.clean_steps = 0;
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: Self::INIT_SCALE,
            clean_steps: 0,
        }
    }
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Ctrl-C: a checkpoint was written first.
    Interrupted,
}

/// The run folder layout.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// The newest complete checkpoint folder, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.checkpoints().join("LATEST");
        if !pointer.exists() {
            return Ok(None);
        }
        let name = std::fs::read_to_string(&pointer)?.trim().to_string();
        let dir = self.checkpoints().join(&name);
        if !dir.is_dir() {
            bail!("{} names {name}, which does not exist", pointer.display());
        }
        Ok(Some(dir))
    }

    /// Reads every line of `metrics.jsonl`.
    pub fn read_metrics(&self) -> Result<Vec<EpochMetrics>> {
        let text = std::fs::read_to_string(self.metrics())
            .with_context(|| format!("cannot read {}", self.metrics().display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("bad line in metrics.jsonl: {l}"))
            })
            .collect()
    }
}

/// Sums over an epoch or an evaluation.
#[derive(Debug, Default)]
struct Tally {
    loss: f64,
    wrong: i64,
    seen: i64,
}

impl Tally {
    fn add(&mut self, loss_sum: f64, wrong: i64, n: i64) {
        self.loss += loss_sum;
        self.wrong += wrong;
        self.seen += n;
    }

    fn mean_loss(&self) -> f64 {
        self.loss / self.seen.max(1) as f64
    }

    fn error(&self) -> f64 {
        self.wrong as f64 / self.seen.max(1) as f64
    }
}

/// The data of a run, on its device.
pub struct RunData {
    pub train: Dataset,
    pub validation: Option<Dataset>,
    pub test: Dataset,
    pub normalizer: Normalizer,
}

impl RunData {
    /// Splits and moves `train`/`test` as `options` ask; normalisation statistics come from the
    /// full training set, so evaluation can recompute them.
    pub fn prepare(
        train: Dataset,
        test: Dataset,
        options: &TrainOptions,
        device: Device,
    ) -> Result<Self> {
        let normalizer = Normalizer::fit(&train, device);
        let (train, validation) = match options.validation {
            Some(n) => {
                let (t, v) = train.split_last(n)?;
                (t, Some(v))
            }
            None => (train, None),
        };
        let train = match options.subset {
            Some(n) if n < 1 => bail!("subset: must be at least 1, got {n}"),
            Some(n) => train.take(n),
            None => train,
        };
        let test = match options.test_subset {
            Some(n) if n < 1 => bail!("test_subset: must be at least 1, got {n}"),
            Some(n) => test.take(n),
            None => test,
        };
        Ok(Self {
            train: train.to_device(device),
            validation: validation.map(|v| v.to_device(device)),
            test: test.to_device(device),
            normalizer,
        })
    }
}

/// Trains one model in one run folder.
pub struct Trainer {
    pub vs: VarStore,
    pub model: Box<dyn Model>,
    pub config: ModelConfig,
    pub options: TrainOptions,
    pub run: RunDir,
    pub state: RunState,
    sgd: Sgd,
    pub quiet: bool,
    /// Device-to-host reads made by the training loop (loss and error sums, every
    /// [`READ_EVERY`] batches; plus one per step with fp16 loss scaling).
    pub host_reads: u64,
}

/// The training loop reads its loss and error sums back from the device every this many batches
/// (and at the end of each epoch): a NaN is caught within that window, and the GPU never waits
/// on the host in between.
pub const READ_EVERY: i64 = 20;

/// The training loss: mean cross-entropy of `logits` `[B, K]` (computed in fp32 whatever the
/// autocast dtype) against class indices `labels` `[B]`, with label smoothing as
/// `F.cross_entropy(..., label_smoothing=smoothing)`.
pub fn logits_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        labels,
        None,
        Reduction::Mean,
        -100,
        smoothing,
    )
}

impl Trainer {
    /// A new run in `dir` (which must not hold one already).
    pub fn create(
        dir: &Path,
        config: ModelConfig,
        options: TrainOptions,
        device: Device,
    ) -> Result<Self> {
        options.validate()?;
        let run = RunDir::new(dir);
        if run.checkpoints().join("LATEST").exists() || run.metrics().exists() {
            bail!(
                "{} already holds a run: use --resume {} or another --out",
                dir.display(),
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(
            &dir.join("model.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        write_atomic(
            &dir.join("run.json"),
            serde_json::to_string_pretty(&options)?.as_bytes(),
        )?;
        tch::manual_seed(options.seed as i64);
        let vs = VarStore::new(device);
        let model = config.build(vs.root())?;
        let sgd = Sgd::new(
            &vs,
            options.momentum,
            options.weight_decay,
            options.decay_norm_and_bias,
        );
        Ok(Self {
            vs,
            model,
            config,
            options,
            run,
            state: RunState::default(),
            sgd,
            quiet: false,
            host_reads: 0,
        })
    }

    /// Reopens the run in `dir` at its newest checkpoint; `epochs` may extend the run.
    pub fn resume(dir: &Path, device: Device, epochs: Option<u64>) -> Result<Self> {
        let run = RunDir::new(dir);
        let read_json = |name: &str| -> Result<String> {
            std::fs::read_to_string(dir.join(name))
                .with_context(|| format!("{} is not a run folder (no {name})", dir.display()))
        };
        let config = ModelConfig::from_json(&read_json("model.json")?)?;
        let mut options: TrainOptions =
            serde_json::from_str(&read_json("run.json")?).context("bad run.json")?;
        if let Some(e) = epochs {
            options.epochs = e;
        }
        options.validate()?;
        let vs = VarStore::new(device);
        let model = config.build(vs.root())?;
        let mut sgd = Sgd::new(
            &vs,
            options.momentum,
            options.weight_decay,
            options.decay_norm_and_bias,
        );
        let ckpt = run
            .latest()?
            .with_context(|| format!("{} has no checkpoint to resume from", dir.display()))?;
        let weights = StateDict::read(&ckpt.join("model.pth"), &ReadOptions::default())?;
        load_state_dict(&vs, &weights, true)?;
        sgd.load_state(&StateDict::read(
            &ckpt.join("optimizer.safetensors"),
            &ReadOptions::default(),
        )?)?;
        let state: RunState =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json"))?)?;
        Ok(Self {
            vs,
            model,
            config,
            options,
            run,
            state,
            sgd,
            quiet: false,
            host_reads: 0,
        })
    }

    /// Writes a checkpoint of the current state and points `LATEST` at it; older ones are removed.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let root = self.run.checkpoints();
        let name = format!("step-{}", self.state.global_step);
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        StateDict::from_var_store(&self.vs).save_torch(&dir.join("model.pth"))?;
        self.sgd
            .state()
            .save_safetensors(&dir.join("optimizer.safetensors"))?;
        write_atomic(
            &dir.join("state.json"),
            serde_json::to_string(&self.state)?.as_bytes(),
        )?;
        write_atomic(&root.join("LATEST"), name.as_bytes())?;
        for entry in std::fs::read_dir(&root)?.flatten() {
            let path = entry.path();
            if path.is_dir() && path != dir {
                let _ = std::fs::remove_dir_all(path);
            }
        }
        Ok(dir)
    }

    /// A batch `[B, C, H, W]` in the memory layout the model trains in: channels-last (NHWC
    /// strides) with `channels_last`, else as it is.
    pub fn input_layout(&self, images: &Tensor) -> Tensor {
        if self.options.channels_last {
            channels_last(images)
        } else {
            images.shallow_clone()
        }
    }

    fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut inputs = Inputs::new();
        inputs.insert("input".into(), self.input_layout(images));
        match self.options.amp {
            Some(_) => tch::autocast(true, || self.model.forward_named(&inputs, train)),
            None => self.model.forward_named(&inputs, train),
        }
    }

    /// Mean loss and error of `data` in eval mode.
    pub fn evaluate(&self, data: &Dataset, normalizer: &Normalizer) -> Result<(f64, f64)> {
        let mut tally = Tally::default();
        let mut batches = Batches::new(
            data,
            normalizer,
            self.options.batch_size.max(256),
            None,
            None,
        );
        tch::no_grad(|| -> Result<()> {
            while let Some((x, y)) = batches.next_batch()? {
                let logits = self.forward(&x, false)?;
                let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                    &y,
                    None,
                    Reduction::Sum,
                    -100,
                    0.0,
                );
                let wrong = logits
                    .argmax(1, false)
                    .ne_tensor(&y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                tally.add(loss.double_value(&[]), wrong, y.size()[0]);
            }
            Ok(())
        })?;
        Ok((tally.mean_loss(), tally.error()))
    }

    /// The libtorch switches this run's options ask for (TF32, cuDNN benchmark, determinism,
    /// autocast dtype), starting from `current`.
    pub fn switches(&self, current: Switches) -> Switches {
        let o = &self.options;
        Switches {
            tf32_cudnn: o.tf32,
            tf32_cublas: o.tf32,
            deterministic_algorithms: o.deterministic,
            deterministic_cudnn: o.deterministic,
            benchmark_cudnn: o.cudnn_benchmark && !o.deterministic,
            autocast_dtype: o.amp.unwrap_or(current.autocast_dtype),
        }
    }

    /// Sets the switches of [`Trainer::switches`] for as long as the returned guard lives, and
    /// puts 4-D weights in channels-last order when asked.
    fn apply_settings(&self) -> Result<SwitchGuard> {
        if self.options.amp.is_some() && !self.vs.device().is_cuda() {
            bail!("--amp needs a CUDA device (libtorch's autocast here is CUDA-only)");
        }
        let guard = SwitchGuard::new()?;
        self.switches(guard.saved()).apply()?;
        if self.options.channels_last {
            tch::no_grad(|| {
                for var in self.vs.variables().values().filter(|t| t.dim() == 4) {
                    var.shallow_clone().set_data(&channels_last(var));
                }
            });
        }
        Ok(guard)
    }

    /// One optimizer step on a batch; returns (summed loss, wrong predictions).
    /// A device-to-host read, counted (the hot loop keeps them rare).
    fn read_f64(&mut self, t: &Tensor) -> f64 {
        self.host_reads += 1;
        t.double_value(&[])
    }

    /// One optimizer step on a batch; returns the summed loss and the wrong predictions as
    /// tensors on the device, without waiting for them.
    fn train_step(&mut self, x: &Tensor, y: &Tensor, lr: f64) -> Result<(Tensor, Tensor)> {
        let logits = self.forward(x, true)?;
        let loss = logits_loss(&logits, y, self.options.label_smoothing);
        self.sgd.zero_grad();
        if self.options.amp == Some(AutocastDtype::Fp16) {
            let scale = self.state.loss_scaler.scale;
            (&loss * scale).backward();
            let grads = self.sgd.grads();
            let finite = tch::no_grad(|| {
                let all: Vec<Tensor> = grads.iter().map(|g| g.isfinite().all()).collect();
                Tensor::stack(&all, 0).all().to_kind(Kind::Double)
            });
            // One read per step, as GradScaler.step's `found_inf.item()`.
            let finite = self.read_f64(&finite) == 1.0;
            if finite {
                tch::no_grad(|| {
                    for g in &grads {
                        let _ = g.shallow_clone().g_div_scalar_(scale);
                    }
                });
                self.sgd.step(lr);
            }
            self.state.loss_scaler.update(finite);
        } else {
            loss.backward();
            self.sgd.step(lr);
        }
        let n = y.size()[0] as f64;
        Ok(tch::no_grad(|| {
            let wrong = logits.argmax(1, false).ne_tensor(y).sum(Kind::Int64);
            (loss.detach().to_kind(Kind::Double) * n, wrong)
        }))
    }

    /// Folds the device-side sums into `tally` (one read each) and stops on a non-finite loss.
    fn drain(
        &mut self,
        tally: &mut Tally,
        pending: &mut Option<(Tensor, Tensor, i64)>,
        first_batch: i64,
    ) -> Result<()> {
        let Some((loss, wrong, n)) = pending.take() else {
            return Ok(());
        };
        let loss = self.read_f64(&loss);
        let wrong = self.read_f64(&wrong.to_kind(Kind::Double)) as i64;
        if !loss.is_finite() {
            bail!(
                "the loss became {loss} in epoch {} between batches {} and {} (global step {}); \
                 training stopped, the last good checkpoint is kept{}",
                self.state.epoch + 1,
                first_batch + 1,
                self.state.batch,
                self.state.global_step,
                match self.run.latest() {
                    Ok(Some(dir)) => format!(" ({})", dir.display()),
                    _ => " (none was written yet)".to_string(),
                }
            );
        }
        tally.add(loss, wrong, n);
        Ok(())
    }

    /// Trains until `options.epochs`, evaluating and checkpointing after each epoch.
    pub fn run(&mut self, data: &RunData) -> Result<Outcome> {
        let _switches = self.apply_settings()?;
        let steps = Batches::new(
            &data.train,
            &data.normalizer,
            self.options.batch_size,
            None,
            None,
        )
        .len();
        while self.state.epoch < self.options.epochs {
            let epoch = self.state.epoch;
            let mut batches = Batches::new(
                &data.train,
                &data.normalizer,
                self.options.batch_size,
                Some((self.options.seed, epoch)),
                self.options.augment,
            );
            batches.skip_batches(self.state.batch)?;
            let bar = self.progress_bar(steps as u64, epoch);
            bar.set_position(self.state.batch as u64);
            let mut tally = Tally::default();
            let mut pending: Option<(Tensor, Tensor, i64)> = None;
            let mut window_start = self.state.batch;
            let start = Instant::now();
            let mut lr = self.options.lr_at(epoch as f64);
            while let Some((x, y)) = batches.next_batch()? {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    bar.abandon();
                    let dir = self.save_checkpoint()?;
                    eprintln!(
                        "interrupted: checkpoint written to {}; continue with --resume {}",
                        dir.display(),
                        self.run.path.display()
                    );
                    return Ok(Outcome::Interrupted);
                }
                lr = self
                    .options
                    .lr_at(epoch as f64 + self.state.batch as f64 / steps.max(1) as f64);
                let (loss_sum, wrong) = self.train_step(&x, &y, lr)?;
                pending = Some(match pending.take() {
                    Some((l, w, n)) => (l + loss_sum, w + wrong, n + y.size()[0]),
                    None => (loss_sum, wrong, y.size()[0]),
                });
                self.state.batch += 1;
                self.state.global_step += 1;
                bar.inc(1);
                if self.state.batch % READ_EVERY == 0 {
                    self.drain(&mut tally, &mut pending, window_start)?;
                    window_start = self.state.batch;
                    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!(
                        "loss {:.4}  err {:5.2}%  {:.0} img/s",
                        tally.mean_loss(),
                        100.0 * tally.error(),
                        tally.seen as f64 / elapsed
                    ));
                }
            }
            self.drain(&mut tally, &mut pending, window_start)?;
            bar.finish_and_clear();
            let seconds = start.elapsed().as_secs_f64();
            let (val_loss, val_error) = match &data.validation {
                Some(v) => {
                    let (l, e) = self.evaluate(v, &data.normalizer)?;
                    (Some(l), Some(e))
                }
                None => (None, None),
            };
            let (test_loss, test_error) = if self.options.eval_test {
                let (l, e) = self.evaluate(&data.test, &data.normalizer)?;
                (Some(l), Some(e))
            } else {
                (None, None)
            };
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                train_loss: tally.mean_loss(),
                train_error: tally.error(),
                val_loss,
                val_error,
                test_loss,
                test_error,
                lr,
                seconds,
                images_per_second: tally.seen as f64 / seconds.max(1e-9),
            };
            self.append_metrics(&metrics)?;
            self.state = RunState {
                epoch: epoch + 1,
                batch: 0,
                ..self.state
            };
            self.save_checkpoint()?;
            self.log_epoch(&metrics);
        }
        Ok(Outcome::Finished)
    }

    fn progress_bar(&self, steps: u64, epoch: u64) -> indicatif::ProgressBar {
        if self.quiet {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(steps);
        let style = indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{}/{}", epoch + 1, self.options.epochs));
        bar
    }

    fn append_metrics(&self, m: &EpochMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run.metrics())
            .with_context(|| format!("cannot open {}", self.run.metrics().display()))?;
        writeln!(f, "{}", serde_json::to_string(m)?)?;
        f.sync_data()?;
        Ok(())
    }

    fn log_epoch(&self, m: &EpochMetrics) {
        let pct =
            |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        eprintln!(
            "{}: epoch {}/{}  train loss {:.4} err {:.2}%  val err {}  test err {}  lr {:.4}  {:.1}s  {:.0} img/s",
            self.run.path.display(),
            m.epoch,
            self.options.epochs,
            m.train_loss,
            100.0 * m.train_error,
            pct(m.val_error),
            pct(m.test_error),
            m.lr,
            m.seconds,
            m.images_per_second
        );
    }
}

/// The same values in channels-last (NHWC) memory order, still indexed `[N, C, H, W]`; libtorch
/// picks its channels-last kernels from these strides (tch has no memory-format API).
///
/// The strides are exactly those of PyTorch's `t.to(memory_format=torch.channels_last)`, also
/// for one channel, where a permuted copy would keep NCHW strides.
pub fn channels_last(t: &Tensor) -> Tensor {
    let size = t.size();
    let [_, c, h, w] = size[..] else {
        return t.shallow_clone();
    };
    let strides = [h * w * c, 1, w * c, c];
    if t.stride() == strides {
        return t.shallow_clone();
    }
    let mut out = Tensor::empty_strided(&size, strides, (t.kind(), t.device()));
    out.copy_(t);
    out
}

/// Test error and the confusion matrix (`[true class][predicted class]` counts) of a model.
pub fn confusion(
    model: &dyn Model,
    data: &Dataset,
    normalizer: &Normalizer,
    batch_size: i64,
) -> Result<(f64, Vec<Vec<i64>>)> {
    let k = data.num_classes;
    let counts = Tensor::zeros([k * k], (Kind::Int64, Device::Cpu));
    let mut batches = Batches::new(data, normalizer, batch_size, None, None);
    tch::no_grad(|| -> Result<()> {
        while let Some((x, y)) = batches.next_batch()? {
            let mut inputs = Inputs::new();
            inputs.insert("input".into(), x);
            let pred = model.forward_named(&inputs, false)?.argmax(1, false);
            let cells = (y * k + pred).to_device(Device::Cpu);
            let _ = counts
                .shallow_clone()
                .index_add_(0, &cells, &cells.ones_like());
        }
        Ok(())
    })?;
    let flat: Vec<i64> = Vec::try_from(&counts)?;
    let matrix: Vec<Vec<i64>> = flat.chunks(k as usize).map(|r| r.to_vec()).collect();
    let total: i64 = flat.iter().sum();
    let correct: i64 = (0..k as usize).map(|i| matrix[i][i]).sum();
    Ok((1.0 - correct as f64 / total.max(1) as f64, matrix))
}

/// Reads the weights of a run's newest checkpoint (for `eval --run`).
pub fn latest_weights(run: &Path) -> Result<PathBuf> {
    let dir = RunDir::new(run)
        .latest()?
        .with_context(|| format!("{} has no checkpoint", run.display()))?;
    Ok(dir.join("model.pth"))
}

/// Loads weights into a fresh model on `device` (strict).
pub fn load_model(
    config: &ModelConfig,
    weights: &Path,
    device: Device,
) -> Result<(VarStore, Box<dyn Model>)> {
    let vs = VarStore::new(device);
    let model = config.build(vs.root())?;
    let state = StateDict::read(weights, &checkpoint::ReadOptions::default())?;
    load_state_dict(&vs, &state, true)?;
    Ok((vs, model))
}

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

/// Images per second of the training step (forward, cross-entropy, backward, SGD with momentum
/// 0.9 and weight decay 1e-4) on a fixed random batch; the twin of the python_ref benchmarks.
/// With `amp`, forward and loss run under autocast, backward and the SGD step outside it (as
/// `python_ref/bench_gpu.py` does).
pub fn benchmark(config: &ModelConfig, settings: &BenchSettings) -> Result<f64> {
    tch::manual_seed(0);
    let device = settings.device;
    let vs = VarStore::new(device);
    let model = config.build(vs.root())?;
    if settings.channels_last {
        tch::no_grad(|| {
            for var in vs.variables().values().filter(|t| t.dim() == 4) {
                var.shallow_clone().set_data(&channels_last(var));
            }
        });
    }
    let mut sgd = Sgd::new(&vs, 0.9, 1e-4, true);
    let x = Tensor::randn(settings.shape, (Kind::Float, device));
    let x = if settings.channels_last {
        channels_last(&x)
    } else {
        x
    };
    let y = Tensor::randint(10, [settings.shape[0]], (Kind::Int64, device));
    let mut inputs = Inputs::new();
    inputs.insert("input".into(), x);
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

/// Milliseconds per eval-mode forward of a random batch (under autocast with `amp`).
pub fn bench_inference(config: &ModelConfig, settings: &BenchSettings) -> Result<f64> {
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
    let seconds = tch::no_grad(|| {
        timed(settings, || {
            autocast(settings.amp, || model.forward_named(&inputs, false))
        })
    })?;
    Ok(seconds * 1e3)
}
