//! The inference form of a model ([`for_inference`]): what `residual infer` and `bench-infer` run
//! by default, set by [`InferenceOptions`].

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Inputs, Model};
use crate::backend::{self, AutocastDtype, Flag, InferenceMode};

/// How [`for_inference`] prepares a model and how its forward runs. The defaults are the fastest
/// measured fp32 path (README, "Inference fast path"); every field has a serde default, so
/// `{}` is a valid options file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceOptions {
    /// Reorder the weights of the folded convolutions into oneDNN's blocked layout once and run
    /// each convolution with its bias, ReLU and residual addition fused (CPU, float32; ignored
    /// elsewhere).
    pub pack_mkldnn: bool,
    /// Run under libtorch's `c10::InferenceMode` ([`InferenceMode`]) rather than only without
    /// gradients.
    pub inference_mode: bool,
    /// Hand inputs to the model in channels-last (NHWC) memory order: a win for cuDNN, mostly
    /// with `cuda_dtype`; on the CPU the packed convolutions pick their own layout.
    pub channels_last: bool,
    /// Intra-op threads (`torch.set_num_threads`), set for the process by [`for_inference`];
    /// `None` keeps libtorch's choice.
    pub threads: Option<usize>,
    /// On CUDA, compute in float16 or bfloat16 (autocast: convolutions and matmuls in the
    /// reduced type, reductions in float32); outputs come back as float32. Ignored on the CPU.
    pub cuda_dtype: Option<AutocastDtype>,
    /// cuDNN benchmark mode (`torch.backends.cudnn.benchmark`) on the first CUDA forward: each
    /// new input shape is timed once to choose the fastest convolution algorithms.
    pub cudnn_benchmark: bool,
    /// Keep freed memory in the C allocator's heap for the next forward (glibc: `mallopt`
    /// `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` raised to 2 GiB, for the whole process). Without
    /// it every activation over 32 MiB is a fresh `mmap` whose pages the kernel faults in and
    /// zeroes on each call: a quarter of the time of a resnet at batch 32 (README, "Inference fast
    /// path"). The price is a peak RSS that stays at the largest forward's. No-op off glibc.
    pub keep_freed_memory: bool,
    /// On CUDA, weights stored in float16 or bfloat16: the caller casts them before
    /// [`for_inference`] ([`crate::predictor::Predictor`] does, once for all its workers), the
    /// floating inputs are cast to that type at entry and outputs come back as float32.
    pub cuda_weights: Option<AutocastDtype>,
    /// On CUDA, capture the eval forward as a CUDA graph for the first input shape and replay it
    /// for inputs of that shape ([`crate::cuda::GraphCache`]); other shapes run eagerly.
    pub cuda_graph: bool,
}

impl Default for InferenceOptions {
    fn default() -> Self {
        Self {
            pack_mkldnn: true,
            inference_mode: true,
            channels_last: false,
            threads: None,
            cuda_dtype: None,
            cudnn_benchmark: true,
            keep_freed_memory: true,
            cuda_weights: None,
            cuda_graph: false,
        }
    }
}

impl InferenceOptions {
    /// The defaults for a model that runs a single forward (`residual infer` on a batch of
    /// images): no weights packed for oneDNN and no freed memory kept for a next call, which
    /// cost a reorder, a third copy of the weights and a larger heap that no later call repays.
    pub fn one_forward() -> Self {
        Self {
            pack_mkldnn: false,
            keep_freed_memory: false,
            ..Self::default()
        }
    }
}

/// The inference-only form of `model`, the fast path of `residual infer` and `bench-infer`:
/// every batch norm folded into the convolution before it ([`Model::fold_batch_norm`]), those
/// convolutions packed for oneDNN with ReLU and residual additions fused into them
/// (`opts.pack_mkldnn`), and a forward that runs under `c10::InferenceMode` and without
/// gradients. Its eval-mode outputs match the model as built to float rounding (~1e-6 relative
/// in fp32, `tests/inference.rs`); a training forward is refused where a norm was folded and
/// runs the model as built elsewhere. Each ConvSDS layer's two convolutions become one
/// ([`super::conv_sds::ConvSdsLayer::fuse_convs`]); the SiD classifier's linear layers run on
/// weights packed for oneDNN (`opts.pack_mkldnn`); GroupNorm stays as it is.
pub fn for_inference(mut model: Box<dyn Model>, opts: &InferenceOptions) -> Result<Box<dyn Model>> {
    if let Some(threads) = opts.threads {
        if threads == 0 {
            bail!("threads must be at least 1");
        }
        tch::set_num_threads(threads as i32);
    }
    if opts.keep_freed_memory {
        crate::memory::keep_freed_memory()?;
    }
    model
        .fold_batch_norm(opts.pack_mkldnn)
        .context("cannot fold the batch norms for inference")?;
    if !opts.keep_freed_memory {
        // Folding computes in float64: its temporaries are twice the weights' size.
        crate::memory::release_free_memory();
    }
    Ok(Box::new(Fast {
        inner: model,
        opts: opts.clone(),
        graph: Default::default(),
    }))
}

/// A model prepared by [`for_inference`].
#[derive(Debug)]
struct Fast {
    inner: Box<dyn Model>,
    opts: InferenceOptions,
    graph: crate::cuda::GraphCache,
}

impl Fast {
    /// `f(inputs)` in the mode the options ask for; a training forward runs as it is.
    fn run(
        &self,
        inputs: &Inputs,
        train: bool,
        f: impl Fn(&dyn Model, &Inputs) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if train {
            return f(self.inner.as_ref(), inputs);
        }
        let cuda = inputs.values().any(|t| t.device().is_cuda());
        if cuda && self.opts.cudnn_benchmark {
            backend::set_flag(Flag::BenchmarkCudnn, true)?;
        }
        let _mode = if self.opts.inference_mode {
            Some(InferenceMode::new()?)
        } else {
            None
        };
        tch::no_grad(|| {
            let half = self.opts.cuda_weights.filter(|_| cuda).map(|d| match d {
                AutocastDtype::Fp16 => tch::Kind::Half,
                AutocastDtype::Bf16 => tch::Kind::BFloat16,
            });
            let prepared;
            let inputs = if self.opts.channels_last || half.is_some() {
                prepared = inputs
                    .iter()
                    .map(|(k, t)| {
                        let t = match half {
                            Some(kind) if t.is_floating_point() => t.to_kind(kind),
                            _ => t.shallow_clone(),
                        };
                        let t = if self.opts.channels_last {
                            channels_last(&t)
                        } else {
                            t
                        };
                        (k.clone(), t)
                    })
                    .collect();
                &prepared
            } else {
                inputs
            };
            let out = match self.opts.cuda_dtype {
                Some(dtype) if cuda => {
                    backend::set_autocast_dtype(dtype)?;
                    tch::autocast(true, || f(self.inner.as_ref(), inputs))?
                }
                _ if half.is_none() => return f(self.inner.as_ref(), inputs),
                _ => f(self.inner.as_ref(), inputs)?,
            };
            Ok(if out.is_floating_point() {
                out.to_kind(tch::Kind::Float)
            } else {
                out
            })
        })
    }
}

impl Model for Fast {
    fn input_names(&self) -> &'static [&'static str] {
        self.inner.input_names()
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.run(inputs, train, |m, x| {
            if self.opts.cuda_graph && !train {
                self.graph.run(x, |x| m.forward_named(x, false))
            } else {
                m.forward_named(x, train)
            }
        })
    }

    fn forward_features(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.run(inputs, train, |m, x| m.forward_features(x, train))
    }

    fn fold_batch_norm(&mut self, pack: bool) -> Result<()> {
        self.inner.fold_batch_norm(pack)
    }
}

/// A floating-point 4-D tensor in channels-last (NHWC) memory order, others as they are.
fn channels_last(t: &Tensor) -> Tensor {
    let size = t.size();
    let [_, c, h, w] = size[..] else {
        return t.shallow_clone();
    };
    let strides = [h * w * c, 1, w * c, c];
    if !t.is_floating_point() || t.stride() == strides {
        return t.shallow_clone();
    }
    let mut out = Tensor::empty_strided(&size, strides, (t.kind(), t.device()));
    out.copy_(t);
    out
}

extern "C" {
    fn residual_jit_last_error() -> *const std::os::raw::c_char;
    fn residual_jit_load(
        path: *const std::os::raw::c_char,
        optimize: i32,
        out: *mut *mut std::ffi::c_void,
    ) -> i32;
    fn residual_jit_free(module: *mut std::ffi::c_void);
    fn residual_jit_forward(
        module: *mut std::ffi::c_void,
        inputs: *const *const std::ffi::c_void,
        n: i32,
        out: *mut *mut std::ffi::c_void,
    ) -> i32;
}

fn jit_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    unsafe { std::ffi::CStr::from_ptr(residual_jit_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A TorchScript module (`torch.jit.save`) run from Rust on the CPU, optionally frozen and
/// optimised for inference as PyTorch's `torch.jit.optimize_for_inference(torch.jit.freeze(m))`
/// does (tch loads modules but has neither pass). `bench-infer --jit` times it against
/// [`for_inference`]; the README's "Inference fast path" has the comparison.
#[derive(Debug)]
pub struct TorchScript {
    module: std::ptr::NonNull<std::ffi::c_void>,
}

impl TorchScript {
    /// Loads `path` in eval mode; `optimize` freezes it and runs `optimize_for_inference`.
    pub fn load(path: &std::path::Path, optimize: bool) -> Result<Self> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .with_context(|| format!("{}: a path with a NUL byte", path.display()))?;
        let mut out = std::ptr::null_mut();
        // SAFETY: `c_path` is NUL-terminated and lives across the call; the shim writes a new
        // module to `out` only on success and catches every C++ exception.
        let rc = unsafe { residual_jit_load(c_path.as_ptr(), optimize as i32, &mut out) };
        match std::ptr::NonNull::new(out) {
            Some(module) if rc == 0 => Ok(Self { module }),
            _ => bail!(
                "cannot load TorchScript {}: {}",
                path.display(),
                jit_error()
            ),
        }
    }

    /// `module.forward(*inputs)` under `c10::InferenceMode`; the module must return one tensor.
    pub fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let ptrs: Vec<*const std::ffi::c_void> =
            inputs.iter().map(|t| t.as_ptr() as *const _).collect();
        let mut out = std::ptr::null_mut();
        // SAFETY: `ptrs` are live at::Tensors borrowed for the call, `module` is ours; the shim
        // catches every C++ exception and on success hands over a new at::Tensor.
        let rc = unsafe {
            residual_jit_forward(
                self.module.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len() as i32,
                &mut out,
            )
        };
        if rc != 0 || out.is_null() {
            bail!("TorchScript forward failed: {}", jit_error());
        }
        // SAFETY: `out` is a heap at::Tensor made for us, as tch's generated calls return them.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }
}

impl Drop for TorchScript {
    fn drop(&mut self) {
        // SAFETY: `module` came from residual_jit_load and is freed once.
        unsafe { residual_jit_free(self.module.as_ptr()) }
    }
}
