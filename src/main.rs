//! `residual`: the command-line tool, a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use residual::backend::AutocastDtype;
use residual::checkpoint::{ReadOptions, StateDict};
use residual::data::{Augment, DataFormat};
use residual::device::{device_name, parse_device};
use residual::doctor::Report;
use residual::infer::{LoadSettings, LoadedModel};
use residual::inspect;
use residual::parity::{self, Manifest};
use residual::train::{RunData, Schedule, TrainOptions, Trainer};
use residual::{Inputs, ModelConfig};
use tch::Device;

#[derive(Parser)]
#[command(
    name = "residual",
    version,
    about = "Residual networks from PyTorch on libtorch, with parity checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the libtorch, CUDA and cuDNN this binary runs with; fails unless libtorch is 2.11.x.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare every ported module with the PyTorch references (forward and gradients).
    Parity {
        /// Where to run: cpu, cuda or all (cuda is skipped, with a note, when there is no GPU).
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceChoice,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder written by python_ref/export.py (default: target/python_ref).
        #[arg(long)]
        artifacts: Option<PathBuf>,
        /// Run only the cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run a model on tensors or images with PyTorch weights.
    Infer(Box<InferArgs>),
    /// List a checkpoint's tensors and name the architecture it fits.
    Inspect {
        weights: PathBuf,
        #[command(flatten)]
        weight_options: WeightOptions,
        /// List every key (default: the first 20).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Train a model on image data into a run folder (or continue one with --resume).
    Train {
        /// Model config (JSON with "arch"); not needed with --resume.
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        #[command(flatten)]
        train: TrainArgs,
        /// Run folder: model.json, run.json, metrics.jsonl, checkpoints/.
        #[arg(long, required_unless_present = "resume")]
        out: Option<PathBuf>,
        /// Continue the run in this folder from its last checkpoint (--epochs may extend it).
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Test error and confusion matrix of trained weights.
    Eval {
        /// Model config; or take config and weights from a run folder with --run.
        #[arg(long, required_unless_present = "run")]
        config: Option<PathBuf>,
        #[arg(long, required_unless_present = "run")]
        weights: Option<PathBuf>,
        #[arg(long)]
        run: Option<PathBuf>,
        #[arg(long, default_value = residual::data::FASHION_MNIST_DIR)]
        data: PathBuf,
        #[arg(long, value_enum)]
        format: Option<DataFormat>,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 512)]
        batch_size: i64,
        #[arg(long)]
        json: bool,
    },
    /// Time the training step (images/s): the Rust half of python_ref/bench_train.py and
    /// bench_gpu.py.
    BenchTrain(BenchArgs),
    /// Time eval-mode inference (ms per batch).
    BenchInfer(BenchArgs),
    /// Reproduce an experiment of the ResNet paper.
    #[command(subcommand)]
    Experiment(ExperimentKind),
    /// Convert between checkpoint formats, by extension: .pth/.pt/.bin, .safetensors, .ot.
    Convert {
        from: PathBuf,
        to: PathBuf,
        #[command(flatten)]
        weight_options: WeightOptions,
    },
}

/// Where the weights are inside a checkpoint.
#[derive(clap::Args)]
struct WeightOptions {
    /// The entry holding the state_dict in a nested checkpoint (`a/b` for deeper ones); by default
    /// the file itself, then state_dict, model_state_dict, model, module, ema, ...
    #[arg(long)]
    key: Option<String>,
    /// A key prefix to strip, e.g. `model.` for Lightning checkpoints (`module.` and `_orig_mod.`
    /// are always stripped when every key has them). Repeatable.
    #[arg(long = "strip-prefix")]
    strip_prefix: Vec<String>,
}

impl WeightOptions {
    fn read_options(&self) -> ReadOptions {
        ReadOptions {
            key: self.key.clone(),
            strip_prefixes: self.strip_prefix.clone(),
        }
    }
}

#[derive(clap::Args)]
struct InferArgs {
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

/// The data and optimisation settings shared by `train` and `experiment`.
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Data folder (IDX: MNIST / Fashion-MNIST files; or CIFAR-10/100 binaries).
    #[arg(long, default_value = residual::data::FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Data format (default: detected from the files).
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    /// Epochs (default 10; with --resume, extends the run to this many).
    #[arg(long)]
    epochs: Option<u64>,
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
    #[arg(long, value_enum, default_value = "step")]
    schedule: Schedule,
    /// Epochs where the step schedule divides the rate by 10 (default: 50% and 75% of the run).
    #[arg(long, value_delimiter = ',')]
    milestones: Vec<u64>,
    /// Linear warmup from 0, in epochs (default 0; 1 for experiments).
    #[arg(long)]
    warmup: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CUDA mixed precision.
    #[arg(long, value_enum)]
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
    quiet: bool,
}

impl TrainArgs {
    fn options(&self) -> TrainOptions {
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
        }
    }

    fn data(&self, options: &TrainOptions, device: tch::Device) -> Result<RunData> {
        let (train, test) = residual::data::load(&self.data, self.format)?;
        RunData::prepare(train, test, options, device)
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    /// `cifar_resnetN` (1x28x28 inputs) or a torchvision constructor (`resnet50`).
    #[arg(long, default_value = "cifar_resnet20")]
    arch: String,
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
    /// Input image side (28 for the CIFAR-style nets on Fashion-MNIST, 224 for ImageNet nets).
    #[arg(long, default_value_t = 28)]
    image_size: i64,
    #[arg(long, default_value_t = 30)]
    steps: u64,
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum)]
    amp: Option<AutocastDtype>,
    #[arg(long)]
    channels_last: bool,
    /// Allow TF32 in cuDNN and cuBLAS (off by default, as in python_ref/bench_gpu.py).
    #[arg(long)]
    tf32: bool,
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    fn run(&self, train: bool) -> Result<ExitCode> {
        let device = parse_device(&self.device)?;
        // The switches python_ref/bench_gpu.py and bench_train.py set on the PyTorch side: TF32 as
        // asked (off by default), cuDNN benchmark on, cuDNN free to choose nondeterministic
        // algorithms. Set on every device (harmless on the CPU) and reported with the result, so
        // the scripts can check that both sides ran with the same ones.
        use residual::backend::Switches;
        Switches {
            tf32_cudnn: self.tf32,
            tf32_cublas: self.tf32,
            deterministic_algorithms: false,
            deterministic_cudnn: false,
            benchmark_cudnn: true,
            ..Switches::current()?
        }
        .apply()?;
        let config = residual::train::bench_config(&self.arch)?;
        let channels = if self.arch.starts_with("cifar_resnet") {
            1
        } else {
            3
        };
        let settings = residual::train::BenchSettings {
            shape: [self.batch_size, channels, self.image_size, self.image_size],
            steps: self.steps,
            warmup: self.warmup,
            device,
            amp: self.amp,
            channels_last: self.channels_last,
        };
        let (key, value) = if train {
            (
                "images_per_second",
                residual::train::benchmark(&config, &settings)?,
            )
        } else {
            (
                "ms_per_batch",
                residual::train::bench_inference(&config, &settings)?,
            )
        };
        if self.json {
            let now = Switches::current()?;
            let switches = serde_json::json!({
                "tf32_cudnn": now.tf32_cudnn,
                "tf32_cublas": now.tf32_cublas,
                "cudnn_benchmark": now.benchmark_cudnn,
                "cudnn_deterministic": now.deterministic_cudnn,
                "deterministic_algorithms": now.deterministic_algorithms,
                // What runs under autocast with --amp (null without).
                "autocast": self.amp.map(|_| if train { "forward and loss" } else { "forward" }),
            });
            println!(
                "{}",
                serde_json::json!({
                    key: value,
                    "threads": tch::get_num_threads(),
                    "device": device_name(device),
                    "switches": switches,
                })
            );
        } else {
            println!("{} batch {}: {value:.3} {key}", self.arch, self.batch_size);
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Subcommand)]
enum ExperimentKind {
    /// Plain vs residual CIFAR-style nets at several depths (ResNet paper, figure 6).
    Degradation {
        #[arg(long, value_delimiter = ',', default_value = "20,56")]
        depths: Vec<i64>,
        /// Train every network with this many seeds (--seed, --seed + 1, ...).
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        #[command(flatten)]
        train: TrainArgs,
        /// Report folder.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceChoice {
    Cpu,
    Cuda,
    All,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { json } => doctor(json),
        Command::Parity {
            device,
            json,
            artifacts,
            filter,
        } => parity_report(device, json, artifacts, filter.as_deref()),
        Command::Infer(args) => infer(&args),
        Command::Train {
            config,
            train,
            out,
            resume,
        } => train_command(config, &train, out, resume),
        Command::Eval {
            config,
            weights,
            run,
            data,
            format,
            device,
            batch_size,
            json,
        } => eval_command(
            config, weights, run, &data, format, &device, batch_size, json,
        ),
        Command::BenchTrain(args) => args.run(true),
        Command::BenchInfer(args) => args.run(false),
        Command::Experiment(ExperimentKind::Degradation {
            depths,
            seeds,
            train,
            out,
        }) => {
            install_ctrl_c();
            let device = parse_device(&train.device)?;
            // He et al. warm up their deepest net at a tenth of the rate; a linear warmup over
            // the first epoch keeps every depth from diverging at lr 0.1.
            let options = TrainOptions {
                warmup: train.warmup.unwrap_or(1.0),
                ..train.options()
            };
            let data = train.data(&options, device)?;
            let plan = residual::experiment::Plan { depths, seeds };
            match residual::experiment::degradation(
                &data,
                &plan,
                &options,
                &out,
                device,
                train.quiet,
            )? {
                Some(findings) => {
                    println!("{}", findings.summary);
                    for path in residual::experiment::outputs(&out) {
                        println!("wrote {}", path.display());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                None => Ok(ExitCode::from(130)),
            }
        }
        Command::Inspect {
            weights,
            weight_options,
            all,
            json,
        } => {
            let summary = inspect::inspect(&weights, &weight_options.read_options())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", inspect::format_summary(&summary, all));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert {
            from,
            to,
            weight_options,
        } => {
            let state = StateDict::read(&from, &weight_options.read_options())?;
            state.save(&to)?;
            println!("wrote {} tensors to {}", state.len(), to.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn install_ctrl_c() {
    // First Ctrl-C: checkpoint at the next batch and stop. The handler cannot fail the run.
    let _ = ctrlc::set_handler(|| {
        residual::train::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst)
    });
}

fn train_command(
    config: Option<PathBuf>,
    args: &TrainArgs,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
) -> Result<ExitCode> {
    install_ctrl_c();
    let device = parse_device(&args.device)?;
    let mut trainer = match (&resume, &config, &out) {
        (Some(dir), _, _) => Trainer::resume(dir, device, args.epochs)?,
        (None, Some(config), Some(out)) => {
            Trainer::create(out, ModelConfig::from_file(config)?, args.options(), device)?
        }
        _ => bail!("give --config and --out for a new run, or --resume RUN_DIR"),
    };
    trainer.quiet = args.quiet;
    let data = args.data(&trainer.options, device)?;
    let outcome = trainer.run(&data)?;
    if outcome == residual::train::Outcome::Interrupted {
        return Ok(ExitCode::from(130));
    }
    println!(
        "finished {} epochs; metrics in {}, weights in {}",
        trainer.options.epochs,
        trainer.run.metrics().display(),
        residual::train::latest_weights(&trainer.run.path)?.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn eval_command(
    config: Option<PathBuf>,
    weights: Option<PathBuf>,
    run: Option<PathBuf>,
    data: &std::path::Path,
    format: Option<DataFormat>,
    device: &str,
    batch_size: i64,
    json: bool,
) -> Result<ExitCode> {
    let device = parse_device(device)?;
    let (config, weights) = match run {
        Some(run) => (
            config.unwrap_or_else(|| run.join("model.json")),
            weights.map_or_else(|| residual::train::latest_weights(&run), Ok)?,
        ),
        None => (
            config.context("--config is required")?,
            weights.context("--weights is required")?,
        ),
    };
    let config = ModelConfig::from_file(&config)?;
    let (train, test) = residual::data::load(data, format)?;
    let normalizer = residual::data::Normalizer::fit(&train, device);
    let test = test.to_device(device);
    let (_vs, model) = residual::train::load_model(&config, &weights, device)?;
    let (error, matrix) =
        residual::train::confusion(model.as_ref(), &test, &normalizer, batch_size)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"test_error": error, "confusion": matrix, "images": test.len()})
        );
    } else {
        println!("test error {:.2}% on {} images", 100.0 * error, test.len());
        println!("confusion matrix (rows: true class, columns: predicted):");
        for (i, row) in matrix.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|c| format!("{c:5}")).collect();
            println!("{i:>3} {}", cells.join(""));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn infer(args: &InferArgs) -> Result<ExitCode> {
    let device = parse_device(&args.device)?;
    if device.is_cuda() {
        residual::infer::set_cuda_tf32(args.tf32)?;
    }
    let config = ModelConfig::from_file(&args.config)?;
    let settings = LoadSettings {
        read: args.weight_options.read_options(),
        keep_dtype: args.keep_dtype,
        non_strict: args.non_strict,
    };
    let loaded = LoadedModel::load(config, &args.weights, device, &settings)?;
    if !loaded.report.is_clean() {
        eprint!("warning: {}", loaded.report);
    }
    if !args.image.is_empty() {
        return classify(args, &loaded);
    }
    let (Some(input), Some(output)) = (&args.input, &args.output) else {
        bail!("give --input X.safetensors --output Y.safetensors, or --image FILE...");
    };
    let tensors = StateDict::read(input, &ReadOptions::default())?;
    let mut inputs = Inputs::new();
    let names = loaded.model.input_names();
    for name in names {
        let key = if names.len() == 1 {
            args.input_key.as_str()
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
    let result = loaded.run(&inputs, args.batch_size, args.features)?;
    let out = StateDict {
        entries: vec![("output".to_string(), result.shallow_clone())],
    };
    out.save_safetensors(output)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "output": output,
                "shape": result.size(),
                "device": device_name(device),
                "tf32": device.is_cuda() && args.tf32,
            })
        );
    } else {
        println!("wrote `output` {:?} to {}", result.size(), output.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn classify(args: &InferArgs, loaded: &LoadedModel) -> Result<ExitCode> {
    let labels = match &args.labels {
        Some(path) => residual::infer::read_labels(path)?,
        None => residual::infer::IMAGENET_CLASSES
            .lines()
            .map(str::to_string)
            .collect(),
    };
    let images = args
        .image
        .iter()
        .map(|p| residual::infer::preprocess_image(p, args.resize, args.crop))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs = Inputs::new();
    inputs.insert("input".into(), tch::Tensor::stack(&images, 0));
    let logits = loaded.run(&inputs, args.batch_size, false)?;
    let mut results = Vec::new();
    for (i, path) in args.image.iter().enumerate() {
        let top = residual::infer::top_k(&logits.get(i as i64), args.topk)?;
        let classes: Vec<serde_json::Value> = top
            .iter()
            .map(|(index, p)| {
                let label = labels
                    .get(*index as usize)
                    .cloned()
                    .unwrap_or_else(|| format!("class {index}"));
                serde_json::json!({"index": index, "label": label, "probability": p})
            })
            .collect();
        if !args.json {
            println!("{}", path.display());
            for c in &classes {
                let p = c["probability"].as_f64().unwrap_or(0.0) * 100.0;
                println!(
                    "  {p:>6.2}%  {} ({})",
                    c["label"].as_str().unwrap_or(""),
                    c["index"]
                );
            }
        }
        results.push(serde_json::json!({"image": path, "top": classes}));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor(json: bool) -> Result<ExitCode> {
    let report = Report::collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    report.check()?;
    Ok(ExitCode::SUCCESS)
}

fn parity_report(
    choice: DeviceChoice,
    json: bool,
    artifacts: Option<PathBuf>,
    filter: Option<&str>,
) -> Result<ExitCode> {
    let dir = artifacts.unwrap_or_else(parity::default_artifacts_dir);
    let manifest = Manifest::load(&dir).context("cannot run the parity report")?;
    let cuda = tch::Cuda::is_available();
    let mut devices = Vec::new();
    if matches!(choice, DeviceChoice::Cpu | DeviceChoice::All) {
        devices.push(Device::Cpu);
    }
    if matches!(choice, DeviceChoice::Cuda | DeviceChoice::All) {
        if cuda {
            devices.push(Device::Cuda(0));
        } else {
            eprintln!("skipped: no CUDA device");
        }
    }
    let rows = parity::run_all(&manifest, &devices, filter);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", parity::format_table(&rows));
        let failed = rows.iter().filter(|r| !r.pass).count();
        let on: Vec<String> = devices.iter().map(|d| device_name(*d)).collect();
        println!(
            "{} of {} rows pass on {} (references from PyTorch {})",
            rows.len() - failed,
            rows.len(),
            on.join(", "),
            manifest.torch_version
        );
    }
    Ok(if rows.iter().all(|r| r.pass) && !rows.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
