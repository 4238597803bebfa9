//! `residual bench-train` and `bench-infer`: the Rust half of python_ref/bench_train.py and
//! bench_gpu.py.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use residual::backend::{AutocastDtype, Switches};
use residual::device::{device_name, parse_device};
use residual::models::TorchScript;
use residual::predictor::bench::{throughput, LoadTest};
use residual::train::{BenchSettings, InferenceBench};
use residual::{ModelConfig, PredictorOptions};

use super::serde_enum;

#[derive(clap::Args)]
pub struct Args {
    /// `cifar_resnetN` (1x28x28 inputs) or a torchvision constructor (`resnet50`).
    #[arg(long, default_value = "cifar_resnet20", conflicts_with = "config")]
    arch: String,
    /// A model config file instead of `--arch` (any model: ResNets, ConvSDS, SiD); its inputs
    /// are random, of the shapes its config fixes (images of `--image-size`).
    #[arg(long)]
    config: Option<PathBuf>,
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
    #[arg(long, value_parser = serde_enum::<AutocastDtype>())]
    amp: Option<AutocastDtype>,
    #[arg(long)]
    channels_last: bool,
    /// Allow TF32 in cuDNN and cuBLAS (off by default, as in python_ref/bench_gpu.py).
    #[arg(long)]
    tf32: bool,
    #[arg(long)]
    json: bool,
    /// bench-infer: time the model as built instead of its inference form (batch norms folded
    /// into the convolutions).
    #[arg(long)]
    plain: bool,
    /// bench-infer: read the resident set size after these calls (warm-up included, from 1),
    /// reported as `rss_kb` with `--json`; e.g. `100,10000` shows whether memory grows.
    #[arg(long, value_delimiter = ',')]
    rss_at: Vec<u64>,
    /// bench-infer: time this TorchScript file (`torch.jit.save` of a module whose forward takes
    /// the model's inputs in order) instead, frozen and optimised for inference from Rust as
    /// `torch.jit.optimize_for_inference(torch.jit.freeze(m))` does; inputs as the model of
    /// `--arch`/`--config` takes them. With `--plain`, loaded as saved.
    #[arg(long)]
    jit: Option<PathBuf>,
    /// bench-infer: serve the model from a `residual::Predictor` with this many workers, called
    /// by `--clients` threads at once; reports images per second and the mean latency of a call.
    #[arg(long)]
    workers: Option<usize>,
    /// With --workers: intra-op threads of each worker (default: the cores divided among them).
    #[arg(long, requires = "workers")]
    worker_threads: Option<usize>,
    /// With --workers: client threads (default: one per worker).
    #[arg(long, requires = "workers")]
    clients: Option<usize>,
    /// bench-infer on CUDA: time the inference form eagerly and replayed as a CUDA graph, in
    /// alternating rounds (`residual::cuda::bench_graph`); reports the graph's `ms_per_batch`,
    /// `ms_per_batch_eager` and `graph_speedup`.
    #[arg(long, conflicts_with_all = ["plain", "workers", "rss_at"])]
    cuda_graph: bool,
}

/// What a benchmark times.
#[derive(Clone, Copy, PartialEq)]
pub enum Timed {
    /// Forward, loss, backward and SGD step, in images per second.
    Training,
    /// Eval-mode forward, in ms per batch.
    Inference,
}

impl Args {
    pub fn run(&self, timed: Timed) -> Result<ExitCode> {
        if self.plain && timed == Timed::Training {
            bail!("--plain is for bench-infer: training always runs the model as built");
        }
        if !self.rss_at.is_empty() && timed == Timed::Training {
            bail!("--rss-at is for bench-infer");
        }
        if self.cuda_graph && timed == Timed::Training {
            bail!("--cuda-graph is for bench-infer");
        }
        if cfg!(debug_assertions) {
            eprintln!(
                "WARNING: this is a debug build of residual: its timings are not what a release \
                 build runs (build with `cargo build --release` and run target/release/residual)"
            );
        }
        let device = parse_device(&self.device)?;
        // The switches python_ref/bench_gpu.py and bench_train.py set on the PyTorch side: TF32 as
        // asked (off by default), cuDNN benchmark on, cuDNN free to choose nondeterministic
        // algorithms. Set on every device (harmless on the CPU) and reported with the result, so
        // the scripts can check that both sides ran with the same ones.
        Switches {
            tf32_cudnn: self.tf32,
            tf32_cublas: self.tf32,
            deterministic_algorithms: false,
            deterministic_cudnn: false,
            benchmark_cudnn: true,
            ..Switches::current()?
        }
        .apply()?;
        let config = match &self.config {
            Some(path) => ModelConfig::from_file(path)?,
            None => residual::train::bench_config(&self.arch)?,
        };
        let name = match &self.config {
            Some(path) => path.display().to_string(),
            None => self.arch.clone(),
        };
        if let Some(workers) = self.workers {
            let channels = match &config {
                ModelConfig::CifarResnet(c) => c.in_channels,
                other => match other.resnet() {
                    Some(c) => c.in_channels,
                    None => bail!("--workers times image models, not a {} model", other.arch()),
                },
            };
            return self.run_predictor(timed, &config, channels, device, workers);
        }
        if self.jit.is_some() && (timed == Timed::Training || self.workers.is_some()) {
            bail!("--jit is for bench-infer, without --workers");
        }
        let settings = BenchSettings {
            batch_size: self.batch_size,
            image_size: self.image_size,
            steps: self.steps,
            warmup: self.warmup,
            device,
            amp: self.amp,
            channels_last: self.channels_last,
            rss_at: self.rss_at.clone(),
        };
        let mut extra = serde_json::Map::new();
        let (key, value) = match timed {
            Timed::Training => (
                "images_per_second",
                residual::train::benchmark(&config, &settings)?,
            ),
            Timed::Inference if self.cuda_graph => {
                let bench = residual::cuda::bench_graph(&config, &settings)?;
                let speedup = bench.eager_ms / bench.graph_ms;
                extra.insert("ms_per_batch_eager".into(), bench.eager_ms.into());
                extra.insert("graph_speedup".into(), speedup.into());
                if !self.json {
                    println!(
                        "{name} batch {}: eager {:.3} ms_per_batch, CUDA graph {:.3} ({speedup:.2}x)",
                        self.batch_size, bench.eager_ms, bench.graph_ms
                    );
                }
                ("ms_per_batch", bench.graph_ms)
            }
            Timed::Inference => {
                let bench = match &self.jit {
                    Some(path) => bench_script(path, !self.plain, &config, &settings)?,
                    None => residual::train::bench_inference(&config, &settings, !self.plain)?,
                };
                if !bench.ms_samples.is_empty() {
                    extra.insert("ms_samples".into(), bench.ms_samples.into());
                }
                if !self.rss_at.is_empty() {
                    let rss: serde_json::Map<_, _> = bench
                        .rss_kb
                        .iter()
                        .map(|(call, kb)| (call.to_string(), (*kb).into()))
                        .collect();
                    extra.insert("rss_kb".into(), rss.into());
                }
                ("ms_per_batch", bench.ms_per_batch)
            }
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
                "autocast": self.amp.map(|_| match timed {
                    Timed::Training => "forward and loss",
                    Timed::Inference => "forward",
                }),
            });
            let mut report = serde_json::json!({
                key: value,
                "threads": tch::get_num_threads(),
                "device": device_name(device),
                "switches": switches,
            });
            report.as_object_mut().expect("an object").extend(extra);
            println!("{report}");
        } else {
            println!("{name} batch {}: {value:.3} {key}", self.batch_size);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// bench-infer --workers: [`residual::predictor::bench::throughput`].
    fn run_predictor(
        &self,
        timed: Timed,
        config: &ModelConfig,
        channels: i64,
        device: tch::Device,
        workers: usize,
    ) -> Result<ExitCode> {
        if timed == Timed::Training || self.amp.is_some() || self.channels_last {
            bail!("--workers is for bench-infer, without --amp and --channels-last");
        }
        let test = LoadTest {
            options: PredictorOptions {
                workers,
                intra_op_threads: self.worker_threads,
                device,
                plain: self.plain,
                inference: Default::default(),
            },
            clients: self.clients.unwrap_or(workers),
            shape: [self.batch_size, channels, self.image_size, self.image_size],
            requests: self.steps as usize,
            warmup: self.warmup as usize,
        };
        let result = throughput(config, &test)?;
        if self.json {
            let mut value = serde_json::to_value(&result)?;
            value["device"] = device_name(device).into();
            println!("{value}");
        } else {
            println!(
                "{} batch {}, {} workers x {} threads, {} clients: {:.1} images/s, {:.3} ms per batch",
                self.arch,
                self.batch_size,
                result.workers,
                result.intra_op_threads,
                result.clients,
                result.images_per_second,
                result.ms_per_batch
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// bench-infer --jit: `path` loaded (frozen and optimised when `optimize`), timed on inputs of
/// `config`'s model, as [`residual::train::bench_inference`] times a model.
fn bench_script(
    path: &std::path::Path,
    optimize: bool,
    config: &ModelConfig,
    settings: &BenchSettings,
) -> Result<InferenceBench> {
    if settings.device != tch::Device::Cpu || settings.amp.is_some() {
        bail!("--jit runs on the CPU, without --amp");
    }
    let script = TorchScript::load(path, optimize)?;
    let inputs = residual::train::bench_inputs(config, settings)?;
    // The input order is the model's: build it once (on a throwaway store) to ask.
    let names = config
        .build(tch::nn::VarStore::new(tch::Device::Cpu).root())?
        .input_names();
    let args: Vec<&tch::Tensor> = names
        .iter()
        .map(|n| {
            inputs
                .get(*n)
                .with_context(|| format!("no input {n:?} for the script"))
        })
        .collect::<Result<_>>()?;
    let mut rss_kb = Vec::new();
    let mut calls = 0;
    let mut call = || -> Result<()> {
        drop(script.forward(&args)?);
        calls += 1;
        if settings.rss_at.contains(&calls) {
            rss_kb.extend(residual::train::resident_set_kb().map(|kb| (calls, kb)));
        }
        Ok(())
    };
    for _ in 0..settings.warmup {
        call()?;
    }
    let mut ms_samples = Vec::with_capacity(settings.steps as usize);
    for _ in 0..settings.steps {
        let start = std::time::Instant::now();
        call()?;
        ms_samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(InferenceBench {
        ms_per_batch: ms_samples.iter().sum::<f64>() / ms_samples.len().max(1) as f64,
        ms_samples,
        rss_kb,
    })
}
