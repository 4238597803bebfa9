//! CUDA streams and CUDA graphs for inference, through `csrc/cuda.cpp` (tch 0.24 exposes
//! neither): a per-thread stream guard ([`StreamGuard`], PyTorch's `torch.cuda.stream`), and a
//! forward captured once and replayed ([`CudaGraph`], [`GraphCache`]; PyTorch's
//! `torch.cuda.CUDAGraph`). Every function returns an error on a host without a CUDA device, or
//! with a build whose shim was compiled without the CUDA headers ([`shim_built`]).

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use crate::models::Inputs;

extern "C" {
    fn residual_cuda_shim_built() -> i32;
    fn residual_cuda_last_error() -> *const std::os::raw::c_char;
    fn residual_cuda_stream_enter(device: i32) -> *mut c_void;
    fn residual_cuda_stream_exit(guard: *mut c_void);
    fn residual_cuda_stream_synchronize(guard: *mut c_void) -> i32;
    fn residual_cuda_stream_id(guard: *mut c_void) -> i64;
    fn residual_cuda_current_stream_id(device: i32) -> i64;
    fn residual_cuda_device_synchronize(device: i32) -> i32;
    fn residual_cuda_current_stream_synchronize(device: i32) -> i32;
    fn residual_cuda_graph_new() -> *mut c_void;
    fn residual_cuda_graph_free(graph: *mut c_void);
    fn residual_cuda_graph_capture_begin(graph: *mut c_void, device: i32) -> i32;
    fn residual_cuda_graph_capture_end(graph: *mut c_void) -> i32;
    fn residual_cuda_graph_replay(graph: *mut c_void) -> i32;
}

/// Whether the shim was compiled with the CUDA headers (else every CUDA call here fails).
pub fn shim_built() -> bool {
    // SAFETY: plain C function returning a constant.
    unsafe { residual_cuda_shim_built() == 1 }
}

/// The message of the CUDA shim's last failure in this thread.
fn last_error() -> String {
    // SAFETY: points to a thread-local NUL-terminated string that lives until the next failure.
    unsafe { std::ffi::CStr::from_ptr(residual_cuda_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The index of `device`, or why CUDA work cannot run there.
pub fn device_index(device: Device) -> Result<i32> {
    let Device::Cuda(index) = device else {
        bail!("{device:?} is not a CUDA device");
    };
    if !shim_built() {
        bail!(
            "residual was built without its CUDA shim (no libtorch_cuda or CUDA headers when \
             csrc/cuda.cpp was compiled)"
        );
    }
    let count = tch::Cuda::device_count();
    if count == 0 {
        bail!("no CUDA device is available (libtorch sees none)");
    }
    if index as i64 >= count {
        bail!("CUDA device {index} does not exist ({count} visible)");
    }
    Ok(index as i32)
}

/// Waits until every queued kernel on `device` has finished (`torch.cuda.synchronize`).
pub fn synchronize(device: Device) -> Result<()> {
    let index = device_index(device)?;
    // SAFETY: plain C function; it catches every C++ exception.
    if unsafe { residual_cuda_device_synchronize(index) } != 0 {
        bail!("cannot synchronise {device:?}: {}", last_error());
    }
    Ok(())
}

/// Waits until the kernels queued on this thread's current stream on `device` have finished
/// (`torch.cuda.current_stream().synchronize()`); other threads' streams run on.
pub fn synchronize_current_stream(device: Device) -> Result<()> {
    let index = device_index(device)?;
    // SAFETY: plain C function; it catches every C++ exception.
    if unsafe { residual_cuda_current_stream_synchronize(index) } != 0 {
        bail!(
            "cannot synchronise the current stream of {device:?}: {}",
            last_error()
        );
    }
    Ok(())
}

/// The id of this thread's current stream on `device` (libtorch's `CUDAStream::id`; 0 is the
/// default stream).
pub fn current_stream_id(device: Device) -> Result<i64> {
    let index = device_index(device)?;
    // SAFETY: plain C function; it catches every C++ exception.
    Ok(unsafe { residual_cuda_current_stream_id(index) })
}

/// A stream of libtorch's pool made this thread's current stream on its device while the guard
/// lives (`with torch.cuda.stream(torch.cuda.Stream())`): kernels this thread launches there
/// queue on it, apart from other threads' streams. Not `Send`: libtorch keeps the current stream
/// per thread, so the guard is dropped in the thread that made it.
#[derive(Debug)]
#[must_use = "the stream stops being current when the guard is dropped"]
pub struct StreamGuard {
    guard: *mut c_void,
    device: Device,
    _per_thread: PhantomData<*const ()>,
}

impl StreamGuard {
    pub fn new(device: Device) -> Result<Self> {
        let index = device_index(device)?;
        // SAFETY: plain C function; it catches every C++ exception and returns null on failure.
        let guard = unsafe { residual_cuda_stream_enter(index) };
        if guard.is_null() {
            bail!("cannot take a CUDA stream on {device:?}: {}", last_error());
        }
        Ok(Self {
            guard,
            device,
            _per_thread: PhantomData,
        })
    }

    /// Waits until the kernels queued on this stream have finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `guard` is live (freed only by drop).
        if unsafe { residual_cuda_stream_synchronize(self.guard) } != 0 {
            bail!(
                "cannot synchronise a CUDA stream on {:?}: {}",
                self.device,
                last_error()
            );
        }
        Ok(())
    }

    /// The stream's id ([`current_stream_id`] while the guard lives).
    pub fn id(&self) -> i64 {
        // SAFETY: `guard` is live.
        unsafe { residual_cuda_stream_id(self.guard) }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // SAFETY: `guard` came from residual_cuda_stream_enter in this thread (the type is not
        // Send) and is released once.
        unsafe { residual_cuda_stream_exit(self.guard) }
    }
}

/// A CUDA graph (`torch.cuda.CUDAGraph`): the kernels one thread queues between
/// [`CudaGraph::capture`]'s start and end, recorded once with their tensors' addresses and
/// replayed as one launch. Its memory comes from a private pool of libtorch's caching allocator.
#[derive(Debug)]
pub struct CudaGraph {
    graph: *mut c_void,
}

impl CudaGraph {
    /// Records what `body` queues on `device` (on a side stream made current for it, after this
    /// thread's current stream has finished; a thread-local capture, so other threads may keep
    /// using CUDA). `body` must not wait for the GPU
    /// (`.item()`, copies to the CPU): that fails the capture.
    pub fn capture<T>(device: Device, body: impl FnOnce() -> Result<T>) -> Result<(Self, T)> {
        let index = device_index(device)?;
        // SAFETY: plain C function; it catches every C++ exception and returns null on failure.
        let graph = unsafe { residual_cuda_graph_new() };
        if graph.is_null() {
            bail!("cannot make a CUDA graph: {}", last_error());
        }
        let graph = Self { graph };
        // SAFETY: `graph.graph` is live; the C side catches every exception.
        if unsafe { residual_cuda_graph_capture_begin(graph.graph, index) } != 0 {
            bail!("cannot start a CUDA graph capture: {}", last_error());
        }
        let out = body();
        // Ends the capture whatever `body` did, so the thread leaves capture mode.
        // SAFETY: as above; a capture was begun on this graph.
        let ended = unsafe { residual_cuda_graph_capture_end(graph.graph) };
        let out = out.context("the captured work failed")?;
        if ended != 0 {
            bail!("cannot end the CUDA graph capture: {}", last_error());
        }
        Ok((graph, out))
    }

    /// Runs the recorded kernels again on this thread's current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `graph` is live and was captured.
        if unsafe { residual_cuda_graph_replay(self.graph) } != 0 {
            bail!("cannot replay a CUDA graph: {}", last_error());
        }
        Ok(())
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `graph` came from residual_cuda_graph_new and is freed once.
        unsafe { residual_cuda_graph_free(self.graph) }
    }
}

/// Graph replays done by every [`GraphCache`] of the process, for tests and benchmarks.
static REPLAYS: AtomicU64 = AtomicU64::new(0);

/// How many forwards every [`GraphCache`] of this process has answered by replaying a graph.
pub fn graph_replays() -> u64 {
    REPLAYS.load(Ordering::Relaxed)
}

/// Warm-up forwards before a capture, as `torch.cuda.graphs` advises: cuDNN's benchmark, lazy
/// initialisation and the allocator's first blocks happen outside the graph.
const WARMUP: usize = 2;

/// A forward captured as a [`CudaGraph`] for the first CUDA input shape it sees, then replayed for
/// inputs of that shape (names, sizes, dtypes and device): each input is copied into the graph's
/// static input, the graph is replayed, and a copy of its static output is returned. Other
/// shapes, CPU inputs, and everything after a capture that failed (reported once on stderr) run
/// eagerly.
#[derive(Debug, Default)]
pub struct GraphCache {
    state: Mutex<GraphState>,
}

#[derive(Debug, Default)]
enum GraphState {
    #[default]
    Empty,
    Ready(Captured),
    Failed,
}

#[derive(Debug)]
struct Captured {
    graph: CudaGraph,
    /// The tensors the graph reads, keyed and shaped like the inputs it was captured for.
    inputs: Inputs,
    /// The tensor the graph writes.
    output: Tensor,
}

/// What a captured graph is specific to: each input's name, size, dtype and device.
fn same_signature(a: &Inputs, b: &Inputs) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, ta), (kb, tb))| {
            ka == kb
                && ta.size() == tb.size()
                && ta.kind() == tb.kind()
                && ta.device() == tb.device()
        })
}

impl GraphCache {
    /// `eager(inputs)`, through the graph when the inputs allow it (see the type's docs).
    pub fn run(
        &self,
        inputs: &Inputs,
        eager: impl Fn(&Inputs) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut devices = inputs.values().map(Tensor::device);
        let device = match devices.next() {
            Some(device @ Device::Cuda(_)) if devices.all(|d| d == device) => device,
            _ => return eager(inputs),
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &*state {
            GraphState::Ready(captured) if same_signature(&captured.inputs, inputs) => {
                return captured.replay(inputs)
            }
            GraphState::Ready(_) | GraphState::Failed => return eager(inputs),
            GraphState::Empty => {}
        }
        match Captured::new(device, inputs, &eager) {
            Ok(captured) => {
                let out = captured.replay(inputs);
                *state = GraphState::Ready(captured);
                out
            }
            Err(err) => {
                eprintln!("warning: cannot capture the forward as a CUDA graph, running it eagerly: {err:#}");
                *state = GraphState::Failed;
                eager(inputs)
            }
        }
    }
}

impl Captured {
    fn new(
        device: Device,
        inputs: &Inputs,
        eager: &impl Fn(&Inputs) -> Result<Tensor>,
    ) -> Result<Self> {
        // Not the whole device: another worker may be capturing its own graph.
        synchronize_current_stream(device)?;
        {
            let side = StreamGuard::new(device)?;
            for _ in 0..WARMUP {
                drop(eager(inputs).context("warm-up forward before the CUDA graph capture")?);
            }
            side.synchronize()?;
        }
        let statics: Inputs = inputs.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        let (graph, output) = CudaGraph::capture(device, || eager(&statics))?;
        Ok(Self {
            graph,
            inputs: statics,
            output,
        })
    }

    fn replay(&self, inputs: &Inputs) -> Result<Tensor> {
        for (name, t) in inputs {
            let mut target = self.inputs[name].shallow_clone();
            target
                .f_copy_(t)
                .with_context(|| format!("cannot copy input `{name}` into the CUDA graph"))?;
        }
        self.graph.replay()?;
        REPLAYS.fetch_add(1, Ordering::Relaxed);
        // The next replay overwrites the static output.
        Ok(self.output.copy())
    }
}

/// [`bench_graph`]'s result: milliseconds per forward, eager and replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphBench {
    pub eager_ms: f64,
    pub graph_ms: f64,
    /// Rounds of `steps` calls each model ran, alternating.
    pub rounds: usize,
}

/// Milliseconds per eval forward of `config`'s inference form on a CUDA device, run eagerly and
/// replayed as a CUDA graph ([`GraphCache`]), on one random batch of `settings`: two models with
/// the same weights, each warmed up (`settings.warmup` calls; the graph's first call captures),
/// then timed in alternating rounds of `settings.steps` calls between stream synchronisations;
/// the median round of each. `settings.amp` runs both under autocast, `channels_last` feeds both
/// NHWC inputs.
pub fn bench_graph(
    config: &crate::config::ModelConfig,
    settings: &crate::train::BenchSettings,
) -> Result<GraphBench> {
    use crate::models::{for_inference, InferenceOptions};

    const ROUNDS: usize = 5;
    let device = settings.device;
    device_index(device).context("timing CUDA graphs needs a CUDA device")?;
    if settings.steps == 0 {
        bail!("timing CUDA graphs needs at least 1 step");
    }
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let model = config.build(vs.root())?;
    let mut graph_vs = tch::nn::VarStore::new(device);
    let graph_model = config.build(graph_vs.root())?;
    graph_vs.copy(&vs)?;
    let inputs = crate::train::bench_inputs(config, settings)?;
    let opts = InferenceOptions {
        cuda_dtype: settings.amp,
        channels_last: settings.channels_last,
        ..InferenceOptions::default()
    };
    let eager = for_inference(model, &opts)?;
    let graphed = for_inference(
        graph_model,
        &InferenceOptions {
            cuda_graph: true,
            ..opts
        },
    )?;
    let replays = graph_replays();
    for _ in 0..settings.warmup.max(2) {
        drop(eager.forward_named(&inputs, false)?);
        drop(graphed.forward_named(&inputs, false)?);
    }
    if graph_replays() == replays {
        bail!(
            "{} could not be captured as a CUDA graph (see the warning above)",
            config.arch()
        );
    }
    let round = |model: &dyn crate::models::Model| -> Result<f64> {
        synchronize_current_stream(device)?;
        let start = std::time::Instant::now();
        for _ in 0..settings.steps {
            drop(model.forward_named(&inputs, false)?);
        }
        synchronize_current_stream(device)?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / settings.steps as f64)
    };
    let (mut eager_ms, mut graph_ms) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        eager_ms.push(round(eager.as_ref())?);
        graph_ms.push(round(graphed.as_ref())?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(GraphBench {
        eager_ms: median(eager_ms),
        graph_ms: median(graph_ms),
        rounds: ROUNDS,
    })
}
