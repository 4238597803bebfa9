//! `residual train`, and the data and optimisation settings it shares with `experiment`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use residual::backend::AutocastDtype;
use residual::data::{Augment, DataFormat};
use residual::device::parse_device;
use residual::distributed::{default_timeout, Backend, LaunchEnv, ProcessGroup};
use residual::train::{
    finetune_config, Clip, EmaOptions, FineTune, OptimizerKind, Outcome, RunData, Schedule,
    TrainOptions, Trainer,
};
use residual::ModelConfig;

use super::folder::FolderArgs;
use super::serde_enum;

#[derive(clap::Args)]
pub struct Args {
    /// Model config (JSON with "arch"); not needed with --resume, nor with --init-weights naming a
    /// Hugging Face model folder (its config.json gives the network).
    #[arg(long, required_unless_present_any = ["resume", "init_weights"])]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    /// Run folder: model.json, run.json, metrics.jsonl, checkpoints/.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (--epochs may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Under torchrun, batch norms in training use the statistics of the global batch (every
    /// rank's), as `nn.SyncBatchNorm`; with one process they are plain batch norms.
    #[arg(long)]
    sync_bn: bool,
    #[command(flatten)]
    finetune: FineTuneArgs,
}

/// Fine-tuning from a checkpoint.
#[derive(clap::Args)]
pub struct FineTuneArgs {
    /// Start from the weights of this checkpoint (torchvision, timm or Hugging Face: any file
    /// `inspect` reads, nested or whole-model, or a Hugging Face model folder). Every tensor whose
    /// name and shape match is loaded; the head (fc) is initialised fresh when its shape differs;
    /// anything else that does not fit is an error. The lists go to init_weights.json in the run.
    #[arg(long)]
    init_weights: Option<PathBuf>,
    /// Outputs of the classification head (overrides the config's num_classes).
    #[arg(long)]
    num_classes: Option<i64>,
    /// Train the head only: the backbone gets no gradient and no optimiser state.
    #[arg(long)]
    freeze_backbone: bool,
    /// The backbone's learning rate (the head keeps --lr; both follow --schedule).
    #[arg(long)]
    lr_backbone: Option<f64>,
    /// BatchNorm as torchvision's FrozenBatchNorm2d: statistics and affine values fixed.
    #[arg(long)]
    freeze_bn: bool,
    /// Initialise the head fresh even when the checkpoint's has the same shape (a new task with
    /// as many classes as the old one).
    #[arg(long)]
    fresh_head: bool,
}

impl FineTuneArgs {
    fn given(&self) -> bool {
        self.init_weights.is_some()
            || self.num_classes.is_some()
            || self.freeze_backbone
            || self.lr_backbone.is_some()
            || self.freeze_bn
            || self.fresh_head
    }

    /// The config and options of a new run, with these settings applied.
    fn apply(
        &self,
        config: Option<&PathBuf>,
        mut options: TrainOptions,
    ) -> Result<(ModelConfig, TrainOptions)> {
        let config = match (config, &self.init_weights) {
            (Some(c), _) => ModelConfig::from_file(c)?,
            (None, Some(w)) if residual::models::huggingface::is_folder(w) => {
                residual::models::huggingface::read_folder(w)?.config
            }
            _ => {
                bail!("give --config (only a Hugging Face model folder as --init-weights has one)")
            }
        };
        if !self.given() {
            return Ok((config, options));
        }
        let config = finetune_config(&config, self.num_classes, self.freeze_bn)?;
        options.finetune = Some(FineTune {
            init_weights: self.init_weights.clone(),
            freeze_backbone: self.freeze_backbone,
            lr_backbone: self.lr_backbone,
            freeze_bn: self.freeze_bn,
            fresh_head: self.fresh_head,
        });
        Ok((config, options))
    }
}

impl Args {
    pub fn run(&self) -> Result<ExitCode> {
        super::install_ctrl_c();
        let device = parse_device(&self.settings.device)?;
        let setup = match (&self.resume, &self.out) {
            (Some(_), _) if self.finetune.given() => bail!(
                "--resume continues a run as it was set up: the fine-tuning flags belong to a new run"
            ),
            (Some(dir), _) => (dir, None),
            (None, Some(out)) => (
                out,
                Some(
                    self.finetune
                        .apply(self.config.as_ref(), self.settings.options())?,
                ),
            ),
            _ => bail!("give --config and --out for a new run, or --resume RUN_DIR"),
        };
        let mut trainer = match (LaunchEnv::from_env()?, setup) {
            // Under torchrun: one data-parallel rank, on cuda:LOCAL_RANK with a CUDA device.
            (Some(env), (dir, setup)) => {
                let device = env.device(device);
                residual::device::check_available(device)?;
                let backend = Backend::for_device(device);
                let group = ProcessGroup::init(&env, backend, default_timeout()?)?;
                let epochs = self.settings.epochs;
                Trainer::create_distributed(dir, setup, epochs, device, group, &env)?
            }
            (None, (dir, None)) => Trainer::resume(dir, device, self.settings.epochs)?,
            (None, (out, Some((config, options)))) => {
                Trainer::create(out, config, options, device)?
            }
        };
        trainer.quiet |= self.settings.quiet;
        if let (true, Some(ddp)) = (self.sync_bn, &trainer.ddp) {
            ddp.enable_sync_batch_norm();
        }
        let data = self.settings.data(&trainer.options, trainer.vs.device())?;
        if trainer.is_writer() {
            data.write_run_files(&trainer.run.path, &trainer.config, &trainer.options)?;
        }
        if trainer.run(&data)? == Outcome::Interrupted {
            return Ok(ExitCode::from(130));
        }
        if !trainer.is_writer() {
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "finished {} epochs; metrics in {}, weights in {}",
            trainer.options.epochs,
            trainer.run.metrics().display(),
            residual::train::latest_weights(&trainer.run.path)?.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// The data and optimisation settings shared by `train` and `experiment`.
#[derive(clap::Args, Clone)]
pub struct Settings {
    /// Data folder (IDX: MNIST / Fashion-MNIST files; CIFAR-10/100 binaries; or an image folder:
    /// one sub-folder of images per class, in train/ and val/ or directly here).
    #[arg(long, default_value = residual::data::FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Data format (default: detected from the files): idx (`train-images-idx3-ubyte[.gz]`,
    /// `t10k-*`), cifar10 (`data_batch_{1..5}.bin`, `test_batch.bin`) or cifar100 (`train.bin`,
    /// `test.bin`; fine labels) or image-folder.
    #[arg(long, value_parser = serde_enum::<DataFormat>())]
    format: Option<DataFormat>,
    /// Epochs (default 10; with --resume, extends the run to this many).
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// No weight decay on norm weights and biases.
    #[arg(long)]
    no_decay_norm_bias: bool,
    /// Learning-rate schedule: step (divided by 10 at each milestone) or cosine (decays to zero
    /// over the run).
    #[arg(long, value_parser = serde_enum::<Schedule>(), default_value = "step")]
    schedule: Schedule,
    /// Epochs where the step schedule divides the rate by 10 (default: 50% and 75% of the run).
    #[arg(long, value_delimiter = ',')]
    milestones: Vec<u64>,
    /// Linear warmup from 0, in epochs (default 0; 1 for experiments).
    #[arg(long)]
    pub warmup: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CUDA mixed precision.
    #[arg(long, value_parser = serde_enum::<AutocastDtype>())]
    amp: Option<AutocastDtype>,
    /// Let CUDA convolutions and matmuls use TF32 (faster on Ampere and later; without it fp32
    /// is IEEE fp32, while PyTorch's default lets convolutions use TF32).
    #[arg(long)]
    tf32: bool,
    #[arg(long)]
    channels_last: bool,
    #[arg(long)]
    cudnn_benchmark: bool,
    /// Deterministic algorithms (libtorch and cuDNN), for reproducible GPU runs.
    #[arg(long)]
    deterministic: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N training images only.
    #[arg(long)]
    subset: Option<i64>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    test_subset: Option<i64>,
    /// Hold out the last N training images for validation.
    #[arg(long)]
    validation: Option<i64>,
    /// No padding/cropping/flipping.
    #[arg(long)]
    no_augment: bool,
    /// Crop augmentation without horizontal flips (digits).
    #[arg(long)]
    no_flip: bool,
    /// Log lines only, no progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    folder: FolderArgs,
    /// sgd (with --momentum) or adamw (torch.optim.AdamW: decoupled --weight-decay).
    #[arg(long, default_value = "sgd", value_parser = ["sgd", "adamw"])]
    optimizer: String,
    /// AdamW's betas.
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [0.9, 0.999])]
    betas: Vec<f64>,
    /// AdamW's eps.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Nesterov momentum (SGD; torch.optim.SGD(nesterov=True)).
    #[arg(long)]
    nesterov: bool,
    /// Scale the gradients so that their total norm is at most this before each step
    /// (torch.nn.utils.clip_grad_norm_; after unscaling with --amp fp16).
    #[arg(long, value_name = "MAX_NORM")]
    clip_grad_norm: Option<f64>,
    /// The norm --clip-grad-norm measures: 2 or inf.
    #[arg(long, default_value = "2", value_parser = ["2", "inf"])]
    clip_norm_type: String,
    /// Clamp every gradient element into [-V, V] before each step (clip_grad_value_).
    #[arg(long, value_name = "V", conflicts_with = "clip_grad_norm")]
    clip_grad_value: Option<f64>,
    /// Gradient accumulation: one optimiser step every N batches (the loss divided by N), an
    /// effective batch of N x --batch-size; the schedule counts optimiser steps.
    #[arg(long, value_name = "N", default_value_t = 1)]
    accumulate: u64,
    /// Keep an exponential moving average of the weights with this decay (timm's ModelEmaV3),
    /// evaluated beside the model each epoch and saved as `state_dict_ema` in the checkpoints.
    #[arg(long, value_name = "D")]
    ema_decay: Option<f64>,
    /// Warm the EMA's decay up as timm does: min(D, 1 - (1 + step)^(-2/3)).
    #[arg(long, requires = "ema_decay")]
    ema_warmup: bool,
}

impl Settings {
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs.unwrap_or(10),
            batch_size: self.batch_size,
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            decay_norm_and_bias: !self.no_decay_norm_bias,
            schedule: self.schedule,
            milestones: self.milestones.clone(),
            warmup: self.warmup.unwrap_or(0.0),
            label_smoothing: self.label_smoothing,
            seed: self.seed,
            subset: self.subset,
            test_subset: self.test_subset,
            validation: self.validation,
            augment: (!self.no_augment).then_some(Augment {
                pad: 4,
                flip: !self.no_flip,
            }),
            amp: self.amp,
            tf32: self.tf32,
            channels_last: self.channels_last,
            cudnn_benchmark: self.cudnn_benchmark,
            deterministic: self.deterministic,
            eval_test: true,
            optimizer: match self.optimizer.as_str() {
                "adamw" => OptimizerKind::Adamw {
                    betas: [self.betas[0], self.betas[1]],
                    eps: self.eps,
                },
                _ => OptimizerKind::Sgd,
            },
            nesterov: self.nesterov,
            clip: match (self.clip_grad_norm, self.clip_grad_value) {
                (Some(max_norm), _) => Some(Clip::Norm {
                    max_norm,
                    norm_type: if self.clip_norm_type == "inf" {
                        f64::INFINITY
                    } else {
                        2.0
                    },
                }),
                (None, Some(value)) => Some(Clip::Value { value }),
                (None, None) => None,
            },
            accumulate: self.accumulate,
            ema: self.ema_decay.map(|decay| EmaOptions {
                decay,
                warmup: self.ema_warmup,
            }),
            image_folder: self
                .is_image_folder()
                .then(|| self.folder.options(!self.no_augment, !self.no_flip)),
            finetune: None,
        }
    }

    /// Whether --data is an image folder (named by --format, or detected).
    fn is_image_folder(&self) -> bool {
        match self.format {
            Some(f) => f == DataFormat::ImageFolder,
            None => DataFormat::detect(&self.data).ok() == Some(DataFormat::ImageFolder),
        }
    }

    pub fn data(&self, options: &TrainOptions, device: tch::Device) -> Result<RunData> {
        if options.image_folder.is_some() {
            return RunData::from_image_folder(&self.data, options, device);
        }
        let (train, test) = residual::data::load(&self.data, self.format)?;
        RunData::prepare(train, test, options, device)
    }
}
