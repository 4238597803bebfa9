//! [`Predictor`]: one model served to many threads. tch's tensors are `Send` but not `Sync`
//! (tch-rs #460, #751, #850), so a `Box<dyn Model>` cannot sit behind an `Arc` that several
//! threads call; a `Predictor` can.
//!
//! Design: a pool of worker threads, each owning one replica of the model that it built itself
//! (no model ever crosses a thread). The replicas' variables alias one set of weight storages
//! (`set_data` on a handle of the shared tensor: no copy), loaded once by the caller. Requests go
//! through one queue that every idle worker pulls from, each carrying its inputs and a one-shot
//! reply channel. The inference form of the model ([`crate::models::for_inference`], the default)
//! folds each replica's batch norms into new convolution weights, so those are one copy per
//! worker (the fully connected layer and everything unfolded stay shared); with `plain` every
//! weight is shared.
//!
//! Threads: libtorch's intra-op pool is OpenMP here, whose thread count is per calling thread
//! (`at::set_num_threads` calls `omp_set_num_threads`, and MKL's count is thread-local too), so
//! each worker sets its own ([`PredictorOptions::intra_op_threads`]); each worker that runs more
//! than one thread gets its own OpenMP team. By default the process's intra-op count (the
//! number of physical cores) is divided among the workers, so workers × threads ≈ cores: more
//! oversubscribes the cores and the spinning OpenMP threads take time from the other workers
//! (measured in the README). `at::set_num_threads` also stores a process-wide default that
//! threads pick up on their first parallel op; [`Predictor::with_weights`] puts the caller's
//! value back once its workers have set theirs.
//!
//! CUDA: each worker makes a stream of libtorch's pool its current stream for its whole life
//! ([`crate::cuda::StreamGuard`]), so the workers' kernels queue independently and may overlap on
//! the device; a worker waits for its stream before it hands a result back. The shared weights
//! are copied to the device once, on the caller's stream, which is waited for before the workers
//! start.
//! `inference.cuda_weights` casts that one shared copy to float16/bfloat16 before the workers
//! fold their batch norms (the fold computes in float64 from the cast weights);
//! `inference.cuda_graph` gives each worker its own CUDA graph.

pub mod bench;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::infer::{LoadSettings, LoadedModel, Prediction};
use crate::models::{InferenceOptions, Inputs};

/// How a [`Predictor`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictorOptions {
    /// Model replicas, one per worker thread (at least 1).
    pub workers: usize,
    /// libtorch intra-op threads of each worker; `None`: the caller's intra-op thread count
    /// (`tch::get_num_threads()`, by default the physical cores) divided by `workers`, at least 1.
    pub intra_op_threads: Option<usize>,
    /// Where the weights and the computation live; inputs are moved there, outputs come back on
    /// the CPU.
    pub device: Device,
    /// Run the model as built instead of its inference form ([`crate::models::for_inference`]).
    pub plain: bool,
    /// How the inference form is prepared (ignored with `plain`); its `threads` is ignored, the
    /// workers use `intra_op_threads`.
    pub inference: InferenceOptions,
}

impl Default for PredictorOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            intra_op_threads: None,
            device: Device::Cpu,
            plain: false,
            inference: InferenceOptions::default(),
        }
    }
}

/// One request: the model's named inputs and where its output goes.
struct Request {
    inputs: Inputs,
    reply: SyncSender<Result<Tensor>>,
}

/// A model that any number of threads may call at once (`Send + Sync`, so an `Arc<Predictor>`
/// can be shared by a server's handlers). Each call is one eval-mode forward without gradients,
/// run by whichever worker is free; see the [module docs](self) for the design. Dropping it
/// lets the workers finish the queued requests and joins them.
pub struct Predictor {
    /// `None` once shut down.
    queue: RwLock<Option<Sender<Request>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    config: ModelConfig,
    input_names: &'static [&'static str],
    kind: Kind,
    device: Device,
    worker_count: usize,
    intra_op_threads: usize,
    labels: Option<Vec<String>>,
    cuda_streams: Vec<i64>,
}

/// What a worker reports once its replica is built.
struct Ready {
    input_names: &'static [&'static str],
    /// The id of the worker's CUDA stream (`None` on the CPU).
    stream: Option<i64>,
}

impl Predictor {
    /// A predictor for `config` whose weights are the variables of `weights`, a `VarStore` the
    /// same config's model was built in (and loaded into). The workers alias these tensors'
    /// storage, on `options.device` (one copy is made there if they live elsewhere): in-place
    /// changes to them show in later predictions.
    pub fn with_weights(
        config: &ModelConfig,
        weights: &VarStore,
        options: &PredictorOptions,
    ) -> Result<Self> {
        if options.workers == 0 {
            bail!("a predictor needs at least 1 worker");
        }
        if options.intra_op_threads == Some(0) {
            bail!("intra_op_threads must be at least 1");
        }
        // Also initialises this thread's intra-op count, so the workers' settings cannot leak
        // into it (see the module docs).
        let caller_threads = tch::get_num_threads().max(1) as usize;
        let intra_op_threads = options
            .intra_op_threads
            .unwrap_or((caller_threads / options.workers).max(1));
        let device = options.device;
        let reduced = options.inference.cuda_weights.filter(|_| !options.plain);
        if device.is_cuda() {
            crate::cuda::device_index(device)
                .with_context(|| format!("a predictor on {device:?} cannot run"))?;
        } else if !options.plain && (reduced.is_some() || options.inference.cuda_graph) {
            bail!(
                "cuda_weights and cuda_graph need a CUDA device, the predictor runs on {device:?}"
            );
        }
        let reduced = reduced.map(|d| match d {
            crate::backend::AutocastDtype::Fp16 => Kind::Half,
            crate::backend::AutocastDtype::Bf16 => Kind::BFloat16,
        });
        let shared: HashMap<String, Tensor> = tch::no_grad(|| {
            weights
                .variables()
                .into_iter()
                .map(|(name, t)| {
                    let t = t.to_device(device);
                    match reduced {
                        Some(kind) if t.is_floating_point() => (name, t.to_kind(kind)),
                        _ => (name, t),
                    }
                })
                .collect()
        });
        if device.is_cuda() {
            // The workers read the weights from their own streams.
            crate::cuda::synchronize_current_stream(device)?;
        }
        let kind = shared
            .values()
            .find(|t| t.is_floating_point())
            .map_or(Kind::Float, Tensor::kind);

        let (queue, requests) = mpsc::channel::<Request>();
        let requests = Arc::new(Mutex::new(requests));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Ready>>();
        let mut handles = Vec::with_capacity(options.workers);
        for index in 0..options.workers {
            let weights: HashMap<String, Tensor> = shared
                .iter()
                .map(|(name, t)| (name.clone(), t.shallow_clone()))
                .collect();
            let worker = Worker {
                config: config.clone(),
                weights,
                device,
                kind,
                inference: (!options.plain).then(|| InferenceOptions {
                    threads: None,
                    ..options.inference.clone()
                }),
                intra_op_threads,
                requests: Arc::clone(&requests),
            };
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("predictor-{index}"))
                .spawn(move || worker.run(ready));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(err) => {
                    drop(queue);
                    join_all(handles);
                    return Err(err).context("cannot start a predictor worker thread");
                }
            }
        }
        drop((ready_tx, shared));
        let mut input_names = None;
        let mut cuda_streams = Vec::new();
        let mut failure = None;
        for _ in 0..options.workers {
            match ready_rx.recv() {
                Ok(Ok(ready)) => {
                    input_names = Some(ready.input_names);
                    cuda_streams.extend(ready.stream);
                }
                Ok(Err(err)) => failure = failure.or(Some(err)),
                Err(_) => {
                    failure = failure.or(Some(anyhow!("a predictor worker died while starting")))
                }
            }
        }
        tch::set_num_threads(caller_threads as i32);
        if let Some(err) = failure {
            drop(queue);
            join_all(handles);
            return Err(err.context(format!("cannot start a predictor for {}", config.arch())));
        }
        Ok(Self {
            queue: RwLock::new(Some(queue)),
            workers: Mutex::new(handles),
            config: config.clone(),
            input_names: input_names.unwrap_or(&[]),
            kind,
            device,
            worker_count: options.workers,
            intra_op_threads,
            labels: None,
            cuda_streams,
        })
    }

    /// A predictor for a loaded model: its config, weights and class names.
    pub fn from_loaded(loaded: &LoadedModel, options: &PredictorOptions) -> Result<Self> {
        if loaded.vs.variables().is_empty() {
            bail!("this loaded model's weights were released (LoadedModel::into_one_forward)");
        }
        let mut predictor = Self::with_weights(&loaded.config, &loaded.vs, options)?;
        predictor.labels = loaded.labels.clone();
        Ok(predictor)
    }

    /// Loads a checkpoint or Hugging Face folder as [`LoadedModel::load_any`] does (on
    /// `options.device`) and serves it; the loaded copy is the workers' shared weights.
    pub fn load(
        config: Option<ModelConfig>,
        weights: &Path,
        settings: &LoadSettings,
        options: &PredictorOptions,
    ) -> Result<Self> {
        let loaded = LoadedModel::load_any(config, weights, options.device, settings)?;
        Self::from_loaded(&loaded, options)
    }

    /// Sets the class names [`Predictor::classify`] uses.
    pub fn with_labels(mut self, labels: Vec<String>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// The model's output for the named `inputs` (the names of [`Predictor::input_names`], batch
    /// first), on the CPU. Floating-point inputs are converted to the weights' dtype and every
    /// input moved to the predictor's device. Errors name what was wrong with the input; a
    /// worker that panics answers with an error and keeps serving.
    pub fn predict(&self, inputs: Inputs) -> Result<Tensor> {
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let queue = self.queue.read().unwrap_or_else(PoisonError::into_inner);
            let queue = queue
                .as_ref()
                .context("the predictor is shut down: it takes no more requests")?;
            queue
                .send(Request { inputs, reply })
                .map_err(|_| anyhow!("the predictor's workers have all exited"))?;
        }
        answer
            .recv()
            .map_err(|_| anyhow!("the predictor's worker exited without answering"))?
    }

    /// [`Predictor::predict`] for a model with one input, `input` (images `[B, C, H, W]`).
    pub fn predict_input(&self, input: Tensor) -> Result<Tensor> {
        let name = match self.input_names {
            [name] => *name,
            names => bail!(
                "{} takes {} inputs ({names:?}): use predict with named inputs",
                self.config.arch(),
                names.len()
            ),
        };
        self.predict(Inputs::from([(name.to_string(), input)]))
    }

    /// The `k` most likely classes of each image of `input` `[B, C, H, W]`, named by the
    /// predictor's labels (a Hugging Face folder's, [`Predictor::with_labels`]) or else the
    /// ImageNet-1k classes.
    pub fn classify(&self, input: Tensor, k: i64) -> Result<Vec<Vec<Prediction>>> {
        let logits = self.predict_input(input)?;
        let labels = match &self.labels {
            Some(labels) => labels.clone(),
            None => crate::infer::labels(None)?,
        };
        let rows = logits.size().first().copied().unwrap_or(0);
        (0..rows)
            .map(|i| crate::infer::predictions(&logits.get(i), k, &labels))
            .collect()
    }

    /// Stops taking requests, lets the workers answer the queued ones, and joins them; an error
    /// says a worker panicked outside a forward. Later calls of `predict` return an error.
    /// Dropping the predictor does the same.
    pub fn shutdown(&self) -> Result<()> {
        drop(
            self.queue
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let handles =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        let panicked = join_all(handles);
        if panicked > 0 {
            bail!("{panicked} predictor worker(s) panicked");
        }
        Ok(())
    }

    /// The names of the inputs [`Predictor::predict`] takes.
    pub fn input_names(&self) -> &'static [&'static str] {
        self.input_names
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The floating-point dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn workers(&self) -> usize {
        self.worker_count
    }

    /// The intra-op thread count of each worker.
    pub fn intra_op_threads(&self) -> usize {
        self.intra_op_threads
    }

    pub fn labels(&self) -> Option<&[String]> {
        self.labels.as_deref()
    }

    /// The ids of the workers' CUDA streams ([`crate::cuda::StreamGuard::id`]), one per worker
    /// in no particular order; empty on the CPU.
    pub fn cuda_streams(&self) -> &[i64] {
        &self.cuda_streams
    }
}

impl Drop for Predictor {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            eprintln!("warning: {err:#}");
        }
    }
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("arch", &self.config.arch())
            .field("workers", &self.worker_count)
            .field("intra_op_threads", &self.intra_op_threads)
            .field("device", &self.device)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Joins `handles`; returns how many panicked.
fn join_all(handles: Vec<JoinHandle<()>>) -> usize {
    handles
        .into_iter()
        .map(JoinHandle::join)
        .filter(Result::is_err)
        .count()
}

/// What a worker thread needs to build its replica and serve.
struct Worker {
    config: ModelConfig,
    weights: HashMap<String, Tensor>,
    device: Device,
    kind: Kind,
    /// `None`: the model as built.
    inference: Option<InferenceOptions>,
    intra_op_threads: usize,
    requests: Arc<Mutex<Receiver<Request>>>,
}

impl Worker {
    /// Builds the replica, reports on `ready` (its input names, or why it cannot run), then
    /// answers requests until the queue closes.
    fn run(self, ready: Sender<Result<Ready>>) {
        // The first call initialises this thread's count from the process default; only after
        // it does a set stick (libtorch re-initialises a thread on its first parallel op).
        tch::get_num_threads();
        tch::set_num_threads(self.intra_op_threads as i32);
        let Worker {
            config,
            weights,
            device,
            kind,
            inference,
            requests,
            ..
        } = self;
        // Held for the worker's life: the replica is built and run on this stream.
        let stream = match device
            .is_cuda()
            .then(|| crate::cuda::StreamGuard::new(device))
            .transpose()
        {
            Ok(stream) => stream,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let built = catch_unwind(AssertUnwindSafe(|| {
            replica(&config, weights, device, inference.as_ref())
        }))
        .unwrap_or_else(|_| Err(anyhow!("building the model panicked")));
        let model = match built {
            Ok(model) => model,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let _ = ready.send(Ok(Ready {
            input_names: model.input_names(),
            stream: stream.as_ref().map(crate::cuda::StreamGuard::id),
        }));
        drop(ready);
        loop {
            let request = {
                let requests = requests.lock().unwrap_or_else(PoisonError::into_inner);
                match requests.recv() {
                    Ok(request) => request,
                    Err(_) => return,
                }
            };
            let Request { inputs, reply } = request;
            let output = catch_unwind(AssertUnwindSafe(|| {
                let output = forward(model.as_ref(), inputs, device, kind)?;
                if let Some(stream) = &stream {
                    stream.synchronize()?;
                }
                Ok(output)
            }))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                Err(anyhow!("the forward panicked: {message}"))
            });
            // The caller may have stopped waiting; nothing to do then.
            let _ = reply.send(output);
        }
    }
}

/// The model of `config` built on this thread, its variables aliasing `weights` (same names and
/// shapes), in its inference form when `inference` is given.
fn replica(
    config: &ModelConfig,
    mut weights: HashMap<String, Tensor>,
    device: Device,
    inference: Option<&InferenceOptions>,
) -> Result<Box<dyn crate::models::Model>> {
    let vs = VarStore::new(device);
    let model = config.build(vs.root())?;
    let mut missing = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vs.variables() {
            let Some(shared) = weights.remove(&name) else {
                missing.push(name);
                continue;
            };
            if shared.size() != var.size() {
                bail!(
                    "`{name}`: the weights have shape {:?}, {} needs {:?}",
                    shared.size(),
                    config.arch(),
                    var.size()
                );
            }
            var.set_data(&shared);
        }
        Ok(())
    })?;
    let extra: Vec<String> = weights.into_keys().collect();
    for (names, what) in [(missing, "lack"), (extra, "have")] {
        if !names.is_empty() {
            bail!(
                "the weights {what} {} variables that {} {}: {}",
                names.len(),
                config.arch(),
                if what == "lack" { "has" } else { "lacks" },
                first_names(names)
            );
        }
    }
    match inference {
        Some(opts) => crate::models::for_inference(model, opts),
        None => Ok(model),
    }
}

/// One eval-mode forward of `inputs`, moved to `device` (floating ones in `kind`), output on the
/// CPU.
fn forward(
    model: &dyn crate::models::Model,
    inputs: Inputs,
    device: Device,
    kind: Kind,
) -> Result<Tensor> {
    let inputs: Inputs = inputs
        .into_iter()
        .map(|(name, t)| {
            let t = if t.is_floating_point() && t.kind() != kind {
                t.to_kind(kind)
            } else {
                t
            };
            (name, t.to_device(device))
        })
        .collect();
    let output = tch::no_grad(|| model.forward_named(&inputs, false))?;
    Ok(output.to_device(Device::Cpu))
}

/// The first few of `names` in order, and how many more.
fn first_names(mut names: Vec<String>) -> String {
    const SHOWN: usize = 4;
    names.sort();
    let more = names.len().saturating_sub(SHOWN);
    names.truncate(SHOWN);
    let mut text = names.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}
