//! The training loop: epochs of SGD steps, each followed by evaluation, a line of metrics and a
//! checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

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
        let weights = self
            .options
            .finetune
            .as_ref()
            .and_then(|f| f.init_weights.as_ref());
        if let Some(weights) = weights {
            let report = super::finetune::init_run(&self.vs, weights, &self.run.path)?;
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
        trainer.state = trainer.run.load_latest(&trainer.vs, &mut trainer.sgd)?;
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
        let ddp = Ddp::new(group, &trainer.vs);
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
        self.run.save_checkpoint(&self.vs, &self.sgd, &self.state)
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

    /// Sets the switches of [`Trainer::switches`] for as long as the returned guard lives, and
    /// puts 4-D weights in channels-last order when asked.
    fn apply_settings(&self) -> Result<SwitchGuard> {
        if self.options.amp.is_some() && !self.vs.device().is_cuda() {
            bail!("--amp needs a CUDA device (libtorch's autocast here is CUDA-only)");
        }
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
        while let Some((x, y)) = batches.next_batch()? {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bar.abandon();
                return Ok(None);
            }
            lr = self
                .options
                .lr_at(epoch as f64 + self.state.batch as f64 / steps.max(1) as f64);
            let (loss, wrong) = self.train_step(&x, &y, lr)?;
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
        self.drain(&mut tally, pending)?;
        if let Some(ddp) = &self.ddp {
            tally = Tally::from_sums(&ddp.sum_f64(&tally.sums())?);
        }
        bar.finish_and_clear();
        if !batches.unreadable().is_empty() {
            eprintln!(
                "epoch {}: skipped {} unreadable file(s)",
                epoch + 1,
                batches.unreadable().len()
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
        let TrainedEpoch { tally, lr, seconds } = trained;
        Ok(EpochMetrics {
            epoch: self.state.epoch + 1,
            train_loss: tally.mean_loss(),
            train_error: tally.error(),
            val_loss,
            val_error,
            test_loss,
            test_error,
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
            let comm = ddp.take_comm_seconds();
            if ddp.rank() == 0 {
                eprintln!(
                    "{}: rank 0 of {}: gradient and buffer communication {comm:.2}s of the epoch's {:.1}s ({:.0}%)",
                    self.run.path.display(),
                    ddp.world_size(),
                    metrics.seconds,
                    100.0 * comm / metrics.seconds.max(1e-9)
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

    /// One optimizer step on a batch; returns the summed loss and the wrong predictions as
    /// tensors on the device, without waiting for them.
    fn train_step(&mut self, x: &Tensor, y: &Tensor, lr: f64) -> Result<(Tensor, Tensor)> {
        if let Some(ddp) = &mut self.ddp {
            ddp.sync_buffers()?;
        }
        let logits = self.forward(x, true)?;
        let loss = logits_loss(&logits, y, self.options.label_smoothing);
        self.sgd.zero_grad();
        if self.options.amp == Some(AutocastDtype::Fp16) {
            let scale = self.state.loss_scaler.scale;
            (&loss * scale).backward();
            self.all_reduce_grads()?;
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
            self.all_reduce_grads()?;
            self.sgd.step(lr);
        }
        let n = y.size()[0] as f64;
        Ok(tch::no_grad(|| {
            let wrong = logits.argmax(1, false).ne_tensor(y).sum(Kind::Int64);
            (loss.detach().to_kind(Kind::Double) * n, wrong)
        }))
    }

    /// Averages the gradients over the data-parallel ranks (DDP's reducer, after the backward).
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
