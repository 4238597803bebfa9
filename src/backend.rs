//! Global libtorch switches that tch 0.24 does not expose, set through `csrc/backend.cpp`.
//!
//! libtorch lets cuDNN convolutions use TF32 by default, which alone moves fp32 results by ~1e-3 on
//! Ampere and later GPUs; parity runs switch it off with [`set_flag`].

use std::ffi::c_void;
use std::marker::PhantomData;

use anyhow::{bail, Result};
use tch::Tensor;

extern "C" {
    fn residual_set_flag(flag: i32, value: i32) -> i32;
    fn residual_get_flag(flag: i32) -> i32;
    fn residual_torch_header_version() -> *const std::os::raw::c_char;
    fn residual_set_autocast_cuda_dtype(dtype: i32) -> i32;
    fn residual_autocast_cuda_dtype() -> i32;
    fn residual_autocast_cuda_enabled() -> i32;
    fn residual_cuda_device_name(index: i32, buf: *mut std::os::raw::c_char, len: i32) -> i32;
    fn residual_last_error() -> *const std::os::raw::c_char;
    fn residual_inference_mode_enter() -> *mut c_void;
    fn residual_inference_mode_exit(guard: *mut c_void);
    fn residual_inference_mode_enabled() -> i32;
    fn residual_conv_pointwise(
        x: *const c_void,
        w: *const c_void,
        b: *const c_void,
        geometry: *const i64,
        groups: i64,
        relu: i32,
        other: *const c_void,
        out: *mut *mut c_void,
    ) -> i32;
    fn residual_linear_pointwise(
        x: *const c_void,
        w: *const c_void,
        b: *const c_void,
        out: *mut *mut c_void,
    ) -> i32;
    fn residual_reorder_linear_weight(w: *const c_void, batch: i64, out: *mut *mut c_void) -> i32;
    fn residual_conv_pointwise_add_(
        x: *const c_void,
        w: *const c_void,
        b: *const c_void,
        geometry: *const i64,
        groups: i64,
        relu: i32,
        other: *const c_void,
        out: *mut *mut c_void,
    ) -> i32;
}

/// A global libtorch switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `torch.backends.cudnn.allow_tf32` (on by default in libtorch).
    AllowTf32Cudnn = 0,
    /// `torch.backends.cuda.matmul.allow_tf32` (off by default).
    AllowTf32Cublas = 1,
    /// `torch.use_deterministic_algorithms`.
    DeterministicAlgorithms = 2,
    /// `torch.backends.cudnn.deterministic`.
    DeterministicCudnn = 3,
    /// `torch.backends.cudnn.benchmark`.
    BenchmarkCudnn = 4,
}

/// Sets a switch for the whole process.
pub fn set_flag(flag: Flag, on: bool) -> Result<()> {
    // SAFETY: plain C function; it catches every C++ exception.
    if unsafe { residual_set_flag(flag as i32, on as i32) } != 0 {
        bail!("libtorch refused to set {flag:?} to {on}");
    }
    Ok(())
}

/// Reads a switch back from libtorch.
pub fn flag(flag: Flag) -> Result<bool> {
    // SAFETY: plain C function; it catches every C++ exception.
    match unsafe { residual_get_flag(flag as i32) } {
        0 => Ok(false),
        1 => Ok(true),
        _ => bail!("libtorch could not report {flag:?}"),
    }
}

/// Settings for fp32 parity: no TF32 anywhere, deterministic cuDNN.
pub fn strict_fp32() -> Result<()> {
    set_flag(Flag::AllowTf32Cudnn, false)?;
    set_flag(Flag::AllowTf32Cublas, false)?;
    set_flag(Flag::DeterministicCudnn, true)?;
    set_flag(Flag::BenchmarkCudnn, false)
}

/// Every global libtorch switch at once: read with [`Switches::current`], set with
/// [`Switches::apply`]. libtorch keeps these per process, so code that changes them for a while
/// holds a [`SwitchGuard`], which puts the previous values back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    pub tf32_cudnn: bool,
    pub tf32_cublas: bool,
    pub deterministic_algorithms: bool,
    pub deterministic_cudnn: bool,
    pub benchmark_cudnn: bool,
    pub autocast_dtype: AutocastDtype,
}

impl Switches {
    pub fn current() -> Result<Self> {
        Ok(Self {
            tf32_cudnn: flag(Flag::AllowTf32Cudnn)?,
            tf32_cublas: flag(Flag::AllowTf32Cublas)?,
            deterministic_algorithms: flag(Flag::DeterministicAlgorithms)?,
            deterministic_cudnn: flag(Flag::DeterministicCudnn)?,
            benchmark_cudnn: flag(Flag::BenchmarkCudnn)?,
            autocast_dtype: autocast_dtype()?,
        })
    }

    pub fn apply(&self) -> Result<()> {
        set_flag(Flag::AllowTf32Cudnn, self.tf32_cudnn)?;
        set_flag(Flag::AllowTf32Cublas, self.tf32_cublas)?;
        set_flag(Flag::DeterministicAlgorithms, self.deterministic_algorithms)?;
        set_flag(Flag::DeterministicCudnn, self.deterministic_cudnn)?;
        set_flag(Flag::BenchmarkCudnn, self.benchmark_cudnn)?;
        set_autocast_dtype(self.autocast_dtype)
    }
}

/// Restores the switches that were in force when it was created, when dropped.
#[derive(Debug)]
#[must_use = "the switches are restored when the guard is dropped"]
pub struct SwitchGuard {
    saved: Switches,
}

impl SwitchGuard {
    pub fn new() -> Result<Self> {
        Ok(Self {
            saved: Switches::current()?,
        })
    }

    /// The switches that will be restored.
    pub fn saved(&self) -> Switches {
        self.saved
    }
}

impl Drop for SwitchGuard {
    fn drop(&mut self) {
        if let Err(err) = self.saved.apply() {
            eprintln!("warning: could not restore libtorch switches: {err:#}");
        }
    }
}

/// The libtorch version of the headers this crate was compiled against.
pub fn header_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string literal.
    unsafe { std::ffi::CStr::from_ptr(residual_torch_header_version()) }
        .to_string_lossy()
        .into_owned()
}

/// The name of CUDA device `index` as the driver reports it (`NVIDIA H100 80GB HBM3`), if any.
pub fn cuda_device_name(index: usize) -> Option<String> {
    let mut buf = [0 as std::os::raw::c_char; 256];
    // SAFETY: the buffer outlives the call and its length is passed; the C side NUL-terminates.
    let rc = unsafe { residual_cuda_device_name(index as i32, buf.as_mut_ptr(), buf.len() as i32) };
    if rc != 0 {
        return None;
    }
    // SAFETY: NUL-terminated by the C side on success.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The reduced precision CUDA autocast uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutocastDtype {
    Fp16,
    Bf16,
}

/// Sets the dtype of CUDA autocast regions (libtorch's default is fp16; tch cannot choose).
pub fn set_autocast_dtype(dtype: AutocastDtype) -> Result<()> {
    let code = match dtype {
        AutocastDtype::Fp16 => 0,
        AutocastDtype::Bf16 => 1,
    };
    // SAFETY: plain C function; it catches every C++ exception.
    if unsafe { residual_set_autocast_cuda_dtype(code) } != 0 {
        bail!("libtorch refused to set the autocast dtype to {dtype:?}");
    }
    Ok(())
}

/// Whether CUDA autocast is on here (`tch::autocast(true, ..)`); false when libtorch cannot say.
pub fn autocast_enabled() -> bool {
    // SAFETY: plain C function; it catches every C++ exception.
    unsafe { residual_autocast_cuda_enabled() == 1 }
}

/// The dtype CUDA autocast currently uses.
pub fn autocast_dtype() -> Result<AutocastDtype> {
    // SAFETY: plain C function; it catches every C++ exception.
    match unsafe { residual_autocast_cuda_dtype() } {
        0 => Ok(AutocastDtype::Fp16),
        1 => Ok(AutocastDtype::Bf16),
        other => bail!("unexpected autocast dtype code {other}"),
    }
}

/// The message of the shim's last failure in this thread.
fn last_error() -> String {
    // SAFETY: points to a thread-local NUL-terminated string that lives until the next failure.
    unsafe { std::ffi::CStr::from_ptr(residual_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// libtorch's `c10::InferenceMode` (PyTorch's `torch.inference_mode()`) in this thread while it
/// lives: no autograd graph, no version counters or views tracking, and the tensors made under it
/// are inference tensors (`Tensor::is_inference`), which autograd refuses to save. tch has no such
/// guard; `tch::no_grad` only stops the graph. Not `Send`: libtorch keeps the mode per thread, so
/// the guard must be dropped in the thread that made it.
#[derive(Debug)]
#[must_use = "inference mode ends when the guard is dropped"]
pub struct InferenceMode {
    guard: *mut c_void,
    _per_thread: PhantomData<*const ()>,
}

impl InferenceMode {
    pub fn new() -> Result<Self> {
        // SAFETY: plain C function; it catches every C++ exception and returns null on failure.
        let guard = unsafe { residual_inference_mode_enter() };
        if guard.is_null() {
            bail!("cannot enter libtorch's inference mode: {}", last_error());
        }
        Ok(Self {
            guard,
            _per_thread: PhantomData,
        })
    }

    /// Whether this thread runs in inference mode now.
    pub fn is_enabled() -> bool {
        // SAFETY: plain C function reading a thread-local flag.
        unsafe { residual_inference_mode_enabled() == 1 }
    }
}

impl Drop for InferenceMode {
    fn drop(&mut self) {
        // SAFETY: `guard` came from residual_inference_mode_enter in this thread (the type is not
        // Send) and is released once.
        unsafe { residual_inference_mode_exit(self.guard) }
    }
}

/// Runs `f` under [`InferenceMode`].
pub fn inference_mode<T>(f: impl FnOnce() -> T) -> Result<T> {
    let _guard = InferenceMode::new()?;
    Ok(f())
}

/// The geometry of a 2-D convolution for [`conv_pointwise`]: padding, stride and dilation
/// (height, width each) and the group count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub padding: [i64; 2],
    pub stride: [i64; 2],
    pub dilation: [i64; 2],
    pub groups: i64,
}

impl ConvGeometry {
    /// Padding, stride and dilation, two each, in the order the C++ shim reads them.
    fn shim_numbers(&self) -> [i64; 6] {
        let [p0, p1] = self.padding;
        let [s0, s1] = self.stride;
        let [d0, d1] = self.dilation;
        [p0, p1, s0, s1, d0, d1]
    }
}

/// `relu(conv2d(x, weight, bias) + add)` (ReLU when `relu`, the sum when `add` is given) as one
/// oneDNN op, `torch.ops.mkldnn._convolution_pointwise` (PyTorch's Inductor emits the same): the
/// bias, the addition and the ReLU are applied to the convolution's output tile while it is still
/// in cache. CPU only; `weight` may be dense or reordered by `Tensor::mkldnn_reorder_conv2d_weight`.
pub fn conv_pointwise(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: &ConvGeometry,
    relu: bool,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let g = geometry;
    let numbers = g.shim_numbers();
    let ptr = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: every pointer is a live at::Tensor owned by the caller or null where allowed;
    // `numbers` holds the six values read; the C side catches every C++ exception and on success
    // hands over a new at::Tensor, owned from here on by the returned Tensor.
    let rc = unsafe {
        residual_conv_pointwise(
            ptr(Some(x)),
            ptr(Some(weight)),
            ptr(bias),
            numbers.as_ptr(),
            g.groups,
            relu as i32,
            ptr(add),
            &mut out,
        )
    };
    owned_tensor(rc, out, "oneDNN convolution")
}

/// [`conv_pointwise`] with `add`, computed into `add`'s own memory (oneDNN's sum post-op,
/// `torch.ops.mkldnn._convolution_pointwise_`) when nothing else can see it: `add` is the only
/// handle on its tensor and storage, channels-last with more than one pixel, `weight` packed and one
/// group. Otherwise (`add` shared, another layout) it hands `add` back untouched (`Ok(Err(add))`)
/// for [`conv_pointwise`]. The out-of-place form costs an output allocation and, in libtorch
/// 2.11, a copy of that uninitialised output into channels-last order (README, "Inference fast
/// path").
pub fn conv_pointwise_add_into(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: &ConvGeometry,
    relu: bool,
    add: Tensor,
) -> Result<std::result::Result<Tensor, Tensor>> {
    let g = geometry;
    let numbers = g.shim_numbers();
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: every pointer is a live at::Tensor owned by the caller (`add` by this function) or
    // null where allowed; `numbers` holds the six values read; the C side catches every C++
    // exception, writes into `add` only when this is its one handle, and on 1 hands over a new
    // at::Tensor on the same tensor, owned from here on by the returned Tensor.
    let rc = unsafe {
        residual_conv_pointwise_add_(
            x.as_ptr() as *const c_void,
            weight.as_ptr() as *const c_void,
            bias.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void),
            numbers.as_ptr(),
            g.groups,
            relu as i32,
            add.as_ptr() as *const c_void,
            &mut out,
        )
    };
    match rc {
        // SAFETY: `out` is a heap at::Tensor made for us, as tch's own generated calls return them.
        1 if !out.is_null() => Ok(Ok(unsafe { Tensor::from_ptr(out as *mut _) })),
        0 => Ok(Err(add)),
        _ => bail!("oneDNN convolution failed: {}", last_error()),
    }
}

/// `x @ weight.T + bias` as oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`), `weight`
/// reordered by [`reorder_linear_weight`]; `x` is `[*, in]`, float32 on the CPU.
pub fn linear_pointwise(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: every pointer is a live at::Tensor owned by the caller or null where allowed; the
    // C side catches every C++ exception and on success hands over a new at::Tensor, owned from
    // here on by the returned Tensor.
    let rc = unsafe {
        residual_linear_pointwise(
            x.as_ptr() as *const c_void,
            weight.as_ptr() as *const c_void,
            bias.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void),
            &mut out,
        )
    };
    owned_tensor(rc, out, "oneDNN linear")
}

/// A float32 CPU `[out, in]` weight in oneDNN's layout for inputs of `batch` rows
/// (`torch.ops.mkldnn._reorder_linear_weight`), for [`linear_pointwise`].
pub fn reorder_linear_weight(weight: &Tensor, batch: i64) -> Result<Tensor> {
    let dense = weight.detach();
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `dense` is a live at::Tensor; the C side catches every C++ exception and on success
    // hands over a new at::Tensor.
    let rc =
        unsafe { residual_reorder_linear_weight(dense.as_ptr() as *const c_void, batch, &mut out) };
    owned_tensor(rc, out, "oneDNN weight reorder")
}

/// The tensor a shim call returning 0 handed over through `out`, or its failure as an error.
fn owned_tensor(rc: i32, out: *mut c_void, what: &str) -> Result<Tensor> {
    if rc != 0 || out.is_null() {
        bail!("{what} failed: {}", last_error());
    }
    // SAFETY: on 0 the shim's `out` is a heap at::Tensor made for us, as tch's own generated
    // calls return them, and nothing else owns it.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}
