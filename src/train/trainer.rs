//! The training loop: epochs of SGD steps, each followed by evaluation, a line of metrics and a
//! checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::ema::Ema;
use super::loss::logits_loss;
use super::memory_format::{channels_last, vars_channels_last};
use super::metrics::{EpochMetrics, Tally};
use super::optimizer::Optimizer;
use super::options::TrainOptions;
use super::run_data::RunData;
use super::run_dir::{RunDir, RunState};
use crate::backend::{AutocastDtype, SwitchGuard, Switches};
use crate::config::ModelConfig;
use crate::data::EpochBatches;
use crate::distributed::{Ddp, LaunchEnv, ProcessGroup};
use crate::models::{Inputs, Model};

/// Set by a Ctrl-C handler; the trainer checkpoints and stops at the next batch.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The training loop reads its loss and error sums back from the device every this many batches
/// (and at the end of each epoch): a NaN is caught within that window, and the GPU never waits
/// on the host in between.
pub const READ_EVERY: i64 = 20;

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Ctrl-C: a checkpoint was written first.
    Interrupted,
}

/// Trains one model in one run folder.
pub struct Trainer {
    pub vs: VarStore,
    pub model: Box<dyn Model>,
    pub config: ModelConfig,
    pub options: TrainOptions,
    pub run: RunDir,
    pub state: RunState,
    /// The optimiser (SGD or AdamW, as the options say).
    sgd: Optimizer,
    /// The weights' moving average (`--ema-decay`).
    pub ema: Option<Ema>,
    pub quiet: bool,
    /// Device-to-host reads made by the training loop (loss and error sums, every
    /// [`READ_EVERY`] batches; plus one per step with fp16 loss scaling).
    pub host_reads: u64,
    /// Data-parallel training (`residual train` under torchrun): this rank's share of the work.
    pub ddp: Option<Ddp>,
    /// `RESIDUAL_FAULT_EXIT`: exit after this global step (tests of torchrun's restarts).
    fault_exit: Option<u64>,
}

/// Loss and error sums of the batches since the last read, still on the device.
struct Pending {
    loss: Tensor,
    wrong: Tensor,
    n: i64,
    /// The epoch's batch index of the first of them.
    first_batch: i64,
}

/// What the training part of an epoch measured.
struct TrainedEpoch {
    tally: Tally,
    /// The rate of the last step.
    lr: f64,
    seconds: f64,
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
        run.start(&config, &options)?;
        tch::manual_seed(options.seed as i64);
        let trainer = Self::build(run, config, options, device)?;
        trainer.init_weights()?;
        Ok(trainer)
    }

    /// A new fine-tuning run starts from `--init-weights` (see [`super::finetune::init_run`]); the
    /// report goes to stderr and into the run folder.
    fn init_weights(&self) -> Result<()> {
        let finetune = self.options.finetune.as_ref();
        if let Some((weights, ft)) = finetune.and_then(|f| Some((f.init_weights.as_ref()?, f))) {
            let report =
                super::finetune::init_run(&self.vs, weights, ft.fresh_head, &self.run.path)?;
            if self.is_writer() {
                eprint!("{report}");
                eprintln!(
                    "  (the full lists: {})",
                    self.run
                        .path
                        .join(super::finetune::INIT_REPORT_FILE)
                        .display()
                );
            }
        }
        Ok(())
    }

    /// Reopens the run in `dir` at its newest checkpoint; `epochs` may extend the run.
    pub fn resume(dir: &Path, device: Device, epochs: Option<u64>) -> Result<Self> {
        let run = RunDir::new(dir);
        let (config, mut options) = run.read_setup()?;
        if let Some(e) = epochs {
            options.epochs = e;
        }
        options.validate()?;
        let mut trainer = Self::build(run, config, options, device)?;
        trainer.state =
            trainer
                .run
                .load_latest(&trainer.vs, &mut trainer.sgd, trainer.ema.as_mut())?;
        Ok(trainer)
    }

    /// The model and optimiser of a run at step 0, from the global seed as it stands.
    fn build(
        run: RunDir,
        config: ModelConfig,
        options: TrainOptions,
        device: Device,
    ) -> Result<Self> {
        let vs = VarStore::new(device);
        let model = config.build(vs.root())?;
        if let Some(ft) = &options.finetune {
            ft.apply(&vs)?;
        }
        let sgd = Optimizer::new(&vs, &options);
        let ema = options.ema.map(|o| Ema::new(&vs, o));
        Ok(Self {
            vs,
            model,
            config,
            options,
            run,
            state: RunState::default(),
            sgd,
            ema,
            quiet: false,
            host_reads: 0,
            ddp: None,
            fault_exit: None,
        })
    }

    /// Rank `group.rank`'s trainer of a data-parallel run in `dir`, as `DistributedDataParallel`
    /// sets one up: rank 0 creates the run folder (the other ranks never write to it), and
    /// every rank then takes rank 0's parameters and buffers. With `resume` (or when torchrun
    /// restarted the group and the folder has a checkpoint), every rank reads the newest
    /// checkpoint instead, so the folder must be on a file system all nodes share.
    pub fn create_distributed(
        dir: &Path,
        setup: Option<(ModelConfig, TrainOptions)>,
        epochs: Option<u64>,
        device: Device,
        group: ProcessGroup,
        env: &LaunchEnv,
    ) -> Result<Self> {
        let restarted = env.restart_count > 0 && RunDir::new(dir).latest()?.is_some();
        let mut trainer = match setup {
            Some((config, options)) if !restarted => {
                options.validate()?;
                let run = RunDir::new(dir);
                if group.rank == 0 {
                    run.start(&config, &options)?;
                }
                tch::manual_seed(options.seed as i64);
                let trainer = Self::build(run, config, options, device)?;
                // Rank 0 reads the checkpoint; the others take its weights below.
                if group.rank == 0 {
                    trainer.init_weights()?;
                }
                trainer
            }
            _ => Self::resume(dir, device, epochs)?,
        };
        trainer.quiet |= group.rank != 0;
        trainer.fault_exit = crate::distributed::injected_exit(env);
        let ddp = Ddp::new(group, &trainer.vs)?;
        ddp.sync_module_states()?;
        let first = trainer.state.global_step == 0 && ddp.rank() == 0;
        trainer.ddp = Some(ddp);
        // A checkpoint at step 0, so that a restart before the first epoch ends resumes too.
        if first && trainer.run.latest()?.is_none() {
            trainer.save_checkpoint()?;
        }
        trainer.barrier()?;
        Ok(trainer)
    }

    /// Whether this process writes the run folder: always, except on data-parallel ranks > 0.
    pub fn is_writer(&self) -> bool {
        self.ddp.as_ref().is_none_or(|d| d.rank() == 0)
    }

    fn barrier(&self) -> Result<()> {
        match &self.ddp {
            Some(ddp) => ddp.group.barrier(),
            None => Ok(()),
        }
    }

    /// This rank's batches of epoch `epoch` (all of them without data parallelism).
    fn epoch_batches<'a>(
        &self,
        data: &'a RunData,
        epoch: Option<u64>,
    ) -> Result<Box<dyn EpochBatches + 'a>> {
        let shard = self
            .ddp
            .as_ref()
            .map_or((0, 1), |d| (d.rank(), d.world_size()));
        data.train_batches(
            self.options.batch_size,
            self.options.seed,
            epoch,
            self.options.augment,
            shard,
        )
    }

    /// Writes a checkpoint of the current state and points `LATEST` at it; older ones are removed.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        if !self.is_writer() {
            return Ok(self.run.path.clone());
        }
        self.run
            .save_checkpoint(&self.vs, &self.sgd, self.ema.as_ref(), &self.state)
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

    /// Logits `[B, K]` of a normalised batch, under autocast with `amp`.
    pub(super) fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut inputs = Inputs::new();
        inputs.insert("input".into(), self.input_layout(images));
        match self.options.amp {
            Some(_) => tch::autocast(true, || self.model.forward_named(&inputs, train)),
            None => self.model.forward_named(&inputs, train),
        }
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

    /// Sets the switches of [`Trainer::switches`] for as long as the returned guard lives, puts
    /// 4-D weights in channels-last order when asked, and keeps freed memory in the heap for the
    /// next step ([`crate::memory::keep_freed_memory`]).
    fn apply_settings(&self) -> Result<SwitchGuard> {
        if self.options.amp.is_some() && !self.vs.device().is_cuda() {
            bail!("--amp needs a CUDA device (libtorch's autocast here is CUDA-only)");
        }
        crate::memory::keep_freed_memory()?;
        let guard = SwitchGuard::new()?;
        self.switches(guard.saved()).apply()?;
        if self.options.channels_last {
            vars_channels_last(&self.vs);
        }
        Ok(guard)
    }

    /// Trains until `options.epochs`, evaluating and checkpointing after each epoch.
    pub fn run(&mut self, data: &RunData) -> Result<Outcome> {
        let _switches = self.apply_settings()?;
        let steps = self.epoch_batches(data, None)?.len();
        while self.state.epoch < self.options.epochs {
            let Some(trained) = self.train_epoch(data, steps)? else {
                let dir = self.save_checkpoint()?;
                eprintln!(
                    "interrupted: checkpoint written to {}; continue with --resume {}",
                    dir.display(),
                    self.run.path.display()
                );
                return Ok(Outcome::Interrupted);
            };
            let metrics = self.evaluate_epoch(data, trained)?;
            self.finish_epoch(&metrics)?;
        }
        Ok(Outcome::Finished)
    }

    /// Trains the rest of epoch `state.epoch` (of `steps` batches) from batch `state.batch`;
    /// `None` when Ctrl-C stopped it.
    fn train_epoch(&mut self, data: &RunData, steps: i64) -> Result<Option<TrainedEpoch>> {
        let epoch = self.state.epoch;
        let mut batches = self.epoch_batches(data, Some(epoch))?;
        batches.skip_batches(self.state.batch)?;
        let bar = self.progress_bar(steps as u64, epoch);
        bar.set_position(self.state.batch as u64);
        let mut tally = Tally::default();
        let mut pending: Option<Pending> = None;
        let start = Instant::now();
        let mut lr = self.options.lr_at(epoch as f64);
        // Gradient accumulation: the epoch's batches in groups of `accumulate` (the last one may
        // be smaller), one optimiser step per group; the schedule counts optimiser steps.
        let accumulate = self.options.accumulate.max(1) as i64;
        let updates = (steps + accumulate - 1) / accumulate;
        let mut accumulated = 0;
        while let Some((x, y)) = batches.next_batch()? {
            // Only between optimiser steps, so a checkpoint never lacks accumulated gradients.
            if accumulated == 0 && INTERRUPTED.load(Ordering::SeqCst) {
                bar.abandon();
                return Ok(None);
            }
            let group = self.state.batch / accumulate;
            let group_size = accumulate.min(steps - group * accumulate).max(1);
            lr = self
                .options
                .lr_at(epoch as f64 + group as f64 / updates.max(1) as f64);
            let (loss, wrong) = self.train_micro_batch(&x, &y, accumulated, group_size)?;
            accumulated += 1;
            if accumulated >= group_size {
                self.optimizer_step(lr)?;
                accumulated = 0;
            }
            let n = y.size()[0];
            pending = Some(match pending.take() {
                Some(p) => Pending {
                    loss: p.loss + loss,
                    wrong: p.wrong + wrong,
                    n: p.n + n,
                    ..p
                },
                None => Pending {
                    loss,
                    wrong,
                    n,
                    first_batch: self.state.batch,
                },
            });
            self.state.batch += 1;
            self.state.global_step += 1;
            if self.fault_exit == Some(self.state.global_step) {
                eprintln!(
                    "RESIDUAL_FAULT_EXIT: exiting after step {}",
                    self.state.global_step
                );
                std::process::exit(17);
            }
            bar.inc(1);
            if self.state.batch % READ_EVERY == 0 {
                self.drain(&mut tally, pending.take())?;
                let elapsed = start.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {:.4}  err {:5.2}%  {:.0} img/s",
                    tally.mean_loss(),
                    100.0 * tally.error(),
                    tally.seen as f64 / elapsed
                ));
            }
        }
        if accumulated > 0 {
            self.optimizer_step(lr)?;
        }
        self.drain(&mut tally, pending)?;
        let mut unreadable = batches.unreadable().len();
        if let Some(ddp) = &self.ddp {
            // The files every rank skipped, reported once by rank 0.
            let [loss, wrong, seen] = tally.sums();
            let summed = ddp.sum_f64(&[loss, wrong, seen, unreadable as f64])?;
            unreadable = summed[3].round() as usize;
            tally = Tally::from_sums(&summed[..3]);
        }
        bar.finish_and_clear();
        if unreadable > 0 && self.is_writer() {
            eprintln!(
                "epoch {}: skipped {unreadable} unreadable file(s)",
                epoch + 1
            );
        }
        Ok(Some(TrainedEpoch {
            tally,
            lr,
            seconds: start.elapsed().as_secs_f64(),
        }))
    }

    /// The epoch's metrics: its training figures, plus validation and test (when asked) in eval
    /// mode.
    fn evaluate_epoch(&self, data: &RunData, trained: TrainedEpoch) -> Result<EpochMetrics> {
        // Data-parallel ranks > 0 hold the same weights and write nothing: they skip evaluation.
        let evaluates = self.is_writer();
        let (val_loss, val_error) = match &data.validation {
            Some(v) if evaluates => {
                let (l, e) = self.evaluate(v, &data.normalizer)?;
                (Some(l), Some(e))
            }
            _ => (None, None),
        };
        let (test_loss, test_error) = if self.options.eval_test && evaluates {
            let (l, e) = self.evaluate(&data.test, &data.normalizer)?;
            (Some(l), Some(e))
        } else {
            (None, None)
        };
        let (mut ema_val, mut ema_test) = (None, None);
        if let Some(ema) = self.ema.as_ref().filter(|_| evaluates) {
            ema.swapped_in(&self.vs, || {
                if let Some(v) = &data.validation {
                    ema_val = Some(self.evaluate(v, &data.normalizer)?);
                }
                if self.options.eval_test {
                    ema_test = Some(self.evaluate(&data.test, &data.normalizer)?);
                }
                Ok(())
            })?;
        }
        let TrainedEpoch { tally, lr, seconds } = trained;
        Ok(EpochMetrics {
            epoch: self.state.epoch + 1,
            train_loss: tally.mean_loss(),
            train_error: tally.error(),
            val_loss,
            val_error,
            test_loss,
            test_error,
            ema_val_loss: ema_val.map(|(l, _)| l),
            ema_val_error: ema_val.map(|(_, e)| e),
            ema_test_loss: ema_test.map(|(l, _)| l),
            ema_test_error: ema_test.map(|(_, e)| e),
            lr,
            seconds,
            images_per_second: tally.seen as f64 / seconds.max(1e-9),
        })
    }

    /// Records a finished epoch: its line of metrics, then a checkpoint at the next epoch's start.
    fn finish_epoch(&mut self, metrics: &EpochMetrics) -> Result<()> {
        if self.is_writer() {
            self.run.append_metrics(metrics)?;
        }
        self.state = RunState {
            epoch: self.state.epoch + 1,
            batch: 0,
            ..self.state
        };
        self.save_checkpoint()?;
        if self.is_writer() {
            self.log_epoch(metrics);
        }
        if let Some(ddp) = &mut self.ddp {
            let comm = ddp.take_comm();
            if ddp.rank() == 0 {
                eprintln!(
                    "{}: rank 0 of {}: gradient and buffer communication not hidden by the backward {:.2}s of the epoch's {:.1}s ({:.0}%); {} of {} gradient buckets started during the backward",
                    self.run.path.display(),
                    ddp.world_size(),
                    comm.seconds,
                    metrics.seconds,
                    100.0 * comm.seconds / metrics.seconds.max(1e-9),
                    comm.overlapped,
                    comm.buckets
                );
            }
        }
        // Every rank goes on only once the checkpoint a restart would resume from is complete.
        self.barrier()
    }

    /// A device-to-host read, counted (the hot loop keeps them rare).
    fn read_f64(&mut self, t: &Tensor) -> f64 {
        self.host_reads += 1;
        t.double_value(&[])
    }

    /// The forward and backward of one micro-batch, the gradients added to those of the
    /// group's `done` earlier ones (zeroed before the first) with the loss divided by
    /// `group_size`; returns the summed loss and the wrong predictions as tensors on the device,
    /// without waiting for them. Data-parallel, the group's last backward allreduces the
    /// gradient buckets as they fill.
    fn train_micro_batch(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        done: i64,
        group_size: i64,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(ddp) = &mut self.ddp {
            ddp.sync_buffers()?;
        }
        let logits = self.forward(x, true)?;
        let loss = logits_loss(&logits, y, self.options.label_smoothing);
        if done == 0 {
            self.sgd.zero_grad();
        }
        if let (Some(ddp), true) = (&mut self.ddp, done + 1 >= group_size) {
            ddp.prepare_for_backward();
        }
        let share = if group_size > 1 {
            &loss / group_size as f64
        } else {
            loss.shallow_clone()
        };
        if self.options.amp == Some(AutocastDtype::Fp16) {
            (&share * self.state.loss_scaler.scale).backward();
        } else {
            share.backward();
        }
        let n = y.size()[0] as f64;
        Ok(tch::no_grad(|| {
            // Mixed batches: the wrong predictions are counted against the dominant class.
            let hard = if y.dim() == 2 {
                y.argmax(1, false)
            } else {
                y.shallow_clone()
            };
            let wrong = logits.argmax(1, false).ne_tensor(&hard).sum(Kind::Int64);
            (loss.detach().to_kind(Kind::Double) * n, wrong)
        }))
    }

    /// One optimiser step on the accumulated gradients: averaged over data-parallel ranks,
    /// unscaled and checked with fp16 loss scaling (the step is skipped when they overflowed),
    /// clipped, applied at rate `lr`; then the EMA follows.
    fn optimizer_step(&mut self, lr: f64) -> Result<()> {
        self.all_reduce_grads()?;
        if self.options.amp == Some(AutocastDtype::Fp16) {
            let scale = self.state.loss_scaler.scale;
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
                self.clip_grads();
                self.sgd.step(lr);
            }
            self.state.loss_scaler.update(finite);
        } else {
            self.clip_grads();
            self.sgd.step(lr);
        }
        self.state.optimizer_steps += 1;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.vs, self.state.optimizer_steps)?;
        }
        Ok(())
    }

    /// `--clip-grad-norm` / `--clip-grad-value`, on the unscaled gradients.
    fn clip_grads(&self) {
        if let Some(clip) = &self.options.clip {
            let _ = clip.apply(&self.sgd.grads());
        }
    }

    /// Averages the gradients over the data-parallel ranks (DDP's reducer: waits for the buckets
    /// launched during the backward).
    fn all_reduce_grads(&mut self) -> Result<()> {
        match &mut self.ddp {
            Some(ddp) => ddp.all_reduce_grads(),
            None => Ok(()),
        }
    }

    /// Folds the device-side sums into `tally` (one read each) and stops on a non-finite loss.
    fn drain(&mut self, tally: &mut Tally, pending: Option<Pending>) -> Result<()> {
        let Some(Pending {
            loss,
            wrong,
            n,
            first_batch,
        }) = pending
        else {
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

    fn log_epoch(&self, m: &EpochMetrics) {
        let pct =
            |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        let ema = if self.ema.is_some() {
            format!(
                "  ema val err {} test err {}",
                pct(m.ema_val_error),
                pct(m.ema_test_error)
            )
        } else {
            String::new()
        };
        eprintln!(
            "{}: epoch {}/{}  train loss {:.4} err {:.2}%  val err {}  test err {}{ema}  lr {:.4}  {:.1}s  {:.0} img/s",
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
