//! Data-parallel communication on PyTorch's own distributed engine (c10d), through
//! `csrc/distributed.cpp`: a process group from torchrun's environment (`MASTER_ADDR`,
//! `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`), Gloo on CPU and NCCL on CUDA, with
//! allreduce, broadcast and barrier over tch tensors. Errors and timeouts come back as `Err`,
//! naming the rank that failed and, when it can tell, the peer that exited.
//!
//! [`Ddp`] adds what `torch.nn.parallel.DistributedDataParallel` does around a training step:
//! parameters and buffers broadcast from rank 0, gradients averaged in buckets that are
//! allreduced from autograd hooks while the backward runs, and buffers broadcast before each
//! forward (`broadcast_buffers=True`). With [`Ddp::enable_sync_batch_norm`]
//! the model's batch norms in training mode become `torch.nn.SyncBatchNorm`: statistics of the
//! global batch, with a backward that reduces over the ranks too.

use std::cell::RefCell;
use std::os::raw::{c_char, c_int, c_void};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn residual_dist_backends() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn residual_pg_new(
        store_host: *const c_char,
        store_port: c_int,
        serve_store: c_int,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        backend: c_int,
        gloo_device: *const c_char,
        timeout_ms: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut c_void;
    fn residual_pg_free(pg: *mut c_void);
    fn residual_pg_allreduce_sum(
        pg: *mut c_void,
        tensor: *mut c_void,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_pg_allreduce(
        pg: *mut c_void,
        tensor: *mut c_void,
        op: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_pg_allgather(
        pg: *mut c_void,
        input: *mut c_void,
        output: *mut c_void,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_pg_broadcast(
        pg: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_pg_barrier(pg: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn residual_pg_sync_batch_norm(
        pg: *mut c_void,
        input: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut c_void,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_reducer_new(
        pg: *mut c_void,
        params: *const *mut c_void,
        n: c_int,
        bucket_ends: *const i64,
        n_buckets: c_int,
        scale: f64,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut c_void;
    fn residual_reducer_arm(reducer: *mut c_void);
    fn residual_reducer_finish(
        reducer: *mut c_void,
        hook_seconds: *mut f64,
        launched: *mut c_int,
        buckets: *mut c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_reducer_free(reducer: *mut c_void);
}

/// DDP's default gradient bucket size (`bucket_cap_mb=25`).
pub const BUCKET_BYTES: i64 = 25 * 1024 * 1024;

/// DDP's cap on the first gradient bucket (`dist._DEFAULT_FIRST_BUCKET_BYTES`): a small first
/// bucket starts communicating early in the backward.
pub const FIRST_BUCKET_BYTES: i64 = 1024 * 1024;

/// The collective backends compiled into this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Backends {
    pub gloo: bool,
    pub nccl: bool,
}

/// Which of Gloo (needs gloo's headers at build time) and NCCL (needs libtorch_cuda and `nccl.h`)
/// this build has.
pub fn backends() -> Backends {
    // SAFETY: plain C function returning a constant.
    let bits = unsafe { residual_dist_backends() };
    Backends {
        gloo: bits & 1 != 0,
        nccl: bits & 2 != 0,
    }
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' tensors (`dist.ReduceOp`; Gloo has no
/// `AVG`, see [`ProcessGroup::all_reduce_mean`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Product,
    Min,
    Max,
}

/// A c10d backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// What PyTorch picks for a device: NCCL for CUDA tensors, Gloo for CPU ones.
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }
}

/// Where this process sits in a job launched by torchrun (or set by hand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `TORCHELASTIC_RESTART_COUNT`: how often torchrun restarted the group (0 on the first try).
    pub restart_count: u64,
    /// torchrun's agent already serves the store at `MASTER_ADDR:MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`); else rank 0 serves it.
    pub agent_store: bool,
}

impl LaunchEnv {
    /// Reads torchrun's variables; `None` when `WORLD_SIZE` is unset (a plain single process).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`LaunchEnv::from_env`], from any variable lookup.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |key: &str, default: Option<&str>| -> Result<u64> {
            let value = get(key)
                .or_else(|| default.map(str::to_string))
                .with_context(|| {
                    format!("WORLD_SIZE is set but {key} is not (launch with torchrun)")
                })?;
            value
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{key}={value:?} is not a non-negative integer"))
        };
        let world_size = world
            .trim()
            .parse::<usize>()
            .with_context(|| format!("WORLD_SIZE={world:?} is not a positive integer"))?;
        if world_size == 0 {
            bail!("WORLD_SIZE must be at least 1");
        }
        let rank = number("RANK", None)? as usize;
        if rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let port = number("MASTER_PORT", Some("29500"))?;
        let master_port =
            u16::try_from(port).with_context(|| format!("MASTER_PORT={port} is not a port"))?;
        Ok(Some(Self {
            rank,
            world_size,
            local_rank: number("LOCAL_RANK", Some("0"))? as usize,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            restart_count: number("TORCHELASTIC_RESTART_COUNT", Some("0"))?,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
        }))
    }

    /// The device of this rank: `cuda:LOCAL_RANK` when `device` is CUDA, else `device`.
    pub fn device(&self, device: Device) -> Device {
        match device {
            Device::Cuda(_) => Device::Cuda(self.local_rank),
            other => other,
        }
    }
}

/// How long a collective may wait for its peers: `RESIDUAL_DIST_TIMEOUT` seconds, default 1800
/// (PyTorch's default process-group timeout).
pub fn default_timeout() -> Result<Duration> {
    match std::env::var("RESIDUAL_DIST_TIMEOUT") {
        Ok(v) => {
            let s: f64 = v.trim().parse().with_context(|| {
                format!("RESIDUAL_DIST_TIMEOUT={v:?} is not a number of seconds")
            })?;
            if !(s > 0.0 && s < 2.0e6) {
                bail!("RESIDUAL_DIST_TIMEOUT must be between 0 and 2e6 seconds, got {s}");
            }
            Ok(Duration::from_secs_f64(s))
        }
        Err(_) => Ok(Duration::from_secs(1800)),
    }
}

const ERR_LEN: usize = 4096;

fn c_string(s: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

fn message(buf: &[c_char]) -> String {
    // SAFETY: the C side NUL-terminates whatever it writes, and the buffer starts zeroed.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// A c10d process group: every rank of the job holds one.
pub struct ProcessGroup {
    ptr: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
    pub backend: Backend,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup({:?}, rank {} of {})",
            self.backend, self.rank, self.world_size
        )
    }
}

impl ProcessGroup {
    /// Joins the group `env` describes (`init_process_group`): a TCPStore rendezvous at
    /// `MASTER_ADDR:MASTER_PORT`, then the backend. Gloo binds to `MASTER_ADDR` when that is a
    /// loopback address, else to `GLOO_SOCKET_IFNAME` when set, else to this host's name.
    pub fn init(env: &LaunchEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        let gloo_device = match std::env::var("GLOO_SOCKET_IFNAME") {
            _ if env.master_addr.starts_with("127.") || env.master_addr == "localhost" => {
                format!("host:{}", env.master_addr)
            }
            Ok(iface) if !iface.is_empty() => format!("iface:{iface}"),
            _ => "default".to_string(),
        };
        // torchrun's agent store lives across restarts: each attempt gets its own keys.
        let prefix = format!("residual/attempt_{}", env.restart_count);
        let host = c_string(&env.master_addr)?;
        let prefix = c_string(&prefix)?;
        let gloo_device = c_string(&gloo_device)?;
        let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        let mut err = vec![0 as c_char; ERR_LEN];
        // SAFETY: every pointer is a live NUL-terminated string or the error buffer with its length.
        let ptr = unsafe {
            residual_pg_new(
                host.as_ptr(),
                env.master_port as c_int,
                (!env.agent_store) as c_int,
                prefix.as_ptr(),
                env.rank as c_int,
                env.world_size as c_int,
                match backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                gloo_device.as_ptr(),
                timeout_ms,
                err.as_mut_ptr(),
                ERR_LEN as c_int,
            )
        };
        if ptr.is_null() {
            bail!("{}", message(&err));
        }
        Ok(Self {
            ptr,
            rank: env.rank,
            world_size: env.world_size,
            backend,
        })
    }

    fn check_tensor(&self, t: &Tensor, what: &str) -> Result<()> {
        if !t.is_contiguous() {
            bail!("{what}: the tensor must be contiguous");
        }
        let device_ok = match self.backend {
            Backend::Gloo => t.device() == Device::Cpu,
            Backend::Nccl => t.device().is_cuda(),
        };
        if !device_ok {
            bail!(
                "{what}: a {:?} process group cannot reduce a tensor on {:?}",
                self.backend,
                t.device()
            );
        }
        Ok(())
    }

    fn call(&self, f: impl FnOnce(*mut c_char) -> c_int) -> Result<()> {
        let mut err = vec![0 as c_char; ERR_LEN];
        if f(err.as_mut_ptr()) != 0 {
            bail!("{}", message(&err));
        }
        Ok(())
    }

    /// Sums `t` over all ranks, in place (`dist.all_reduce(t, SUM)`).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.check_tensor(t, "allreduce")?;
        // SAFETY: `as_ptr` is tch's `at::Tensor*`, alive for the call; the C side catches all.
        self.call(|err| unsafe {
            residual_pg_allreduce_sum(self.ptr, t.as_ptr() as *mut c_void, err, ERR_LEN as c_int)
        })
    }

    /// Reduces `t` over all ranks with `op`, in place (`dist.all_reduce(t, op)`).
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.check_tensor(t, "allreduce")?;
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Product => 1,
            ReduceOp::Min => 2,
            ReduceOp::Max => 3,
        };
        // SAFETY: as in `all_reduce_sum`.
        self.call(|err| unsafe {
            residual_pg_allreduce(
                self.ptr,
                t.as_ptr() as *mut c_void,
                op,
                err,
                ERR_LEN as c_int,
            )
        })
    }

    /// Every rank's `t` stacked in rank order: `[world_size, *t.size()]`
    /// (`dist.all_gather_into_tensor`).
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.check_tensor(t, "allgather")?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(t.size());
        let out = Tensor::empty(shape.as_slice(), (t.kind(), t.device()));
        // SAFETY: both are live `at::Tensor*`; `out` is contiguous and shaped for the gather.
        self.call(|err| unsafe {
            residual_pg_allgather(
                self.ptr,
                t.as_ptr() as *mut c_void,
                out.as_ptr() as *mut c_void,
                err,
                ERR_LEN as c_int,
            )
        })?;
        Ok(out)
    }

    /// Averages `t` over all ranks, in place: each rank's share is divided by the world size
    /// before the sum, as DDP divides gradients (Gloo has no average).
    pub fn all_reduce_mean(&self, t: &Tensor) -> Result<()> {
        if self.world_size > 1 {
            tch::no_grad(|| {
                let _ = t
                    .shallow_clone()
                    .g_mul_scalar_(1.0 / self.world_size as f64);
            });
        }
        self.all_reduce_sum(t)
    }

    /// Copies rank `root`'s `t` into every rank's, in place (`dist.broadcast`).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.check_tensor(t, "broadcast")?;
        // SAFETY: as in `all_reduce_sum`.
        self.call(|err| unsafe {
            residual_pg_broadcast(
                self.ptr,
                t.as_ptr() as *mut c_void,
                root as c_int,
                err,
                ERR_LEN as c_int,
            )
        })
    }

    /// `torch.nn.SyncBatchNorm` in training mode: `input` (`[N, C, *]`) normalised with the mean
    /// and biased variance of the whole global batch (every rank's `input` together), scaled by
    /// `weight` and shifted by `bias`; `running_mean` / `running_var` move towards the global
    /// mean and unbiased variance by `momentum`. Differentiable: its backward sums the
    /// per-channel gradient terms over the ranks, so every rank must run it, in the same order.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        input: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        running_mean: Option<&Tensor>,
        running_var: Option<&Tensor>,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        if input.dim() < 2 {
            bail!("SyncBatchNorm: expected [N, C, *], got {:?}", input.size());
        }
        let device_ok = match self.backend {
            Backend::Gloo => input.device() == Device::Cpu,
            Backend::Nccl => input.device().is_cuda(),
        };
        if !device_ok {
            bail!(
                "SyncBatchNorm: a {:?} process group cannot reduce a tensor on {:?}",
                self.backend,
                input.device()
            );
        }
        let ptr =
            |t: Option<&Tensor>| t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut c_void);
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: every tensor pointer is tch's `at::Tensor*` (or null), alive for the call; on
        // success `out` is a new `at::Tensor*` whose ownership passes to the returned Tensor.
        self.call(|err| unsafe {
            residual_pg_sync_batch_norm(
                self.ptr,
                input.as_ptr() as *mut c_void,
                ptr(weight),
                ptr(bias),
                ptr(running_mean),
                ptr(running_var),
                momentum,
                eps,
                &mut out,
                err,
                ERR_LEN as c_int,
            )
        })?;
        // SAFETY: see above; `call` returned Ok, so `out` was written.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// Waits until every rank reaches this point (`dist.barrier()`).
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the C side catches all.
        self.call(|err| unsafe { residual_pg_barrier(self.ptr, err, ERR_LEN as c_int) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `residual_pg_new` and is freed once.
        unsafe { residual_pg_free(self.ptr) }
    }
}

thread_local! {
    /// The group whose ranks synchronise batch norms (`--sync-bn`), while a [`Ddp`] enables it.
    static SYNC_BN: RefCell<Option<Rc<ProcessGroup>>> = const { RefCell::new(None) };
}

/// The training-mode batch norm of `Norm2d` when `--sync-bn` is on and the group has more than
/// one rank (as `SyncBatchNorm`, which falls back to `F.batch_norm` for a world of 1): the
/// output of [`ProcessGroup::sync_batch_norm`]; `None` otherwise, for the plain batch norm.
pub fn sync_batch_norm(
    input: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Result<Option<Tensor>> {
    SYNC_BN.with(|cell| match cell.borrow().as_ref() {
        Some(group) if group.world_size > 1 => group
            .sync_batch_norm(
                input,
                Some(weight),
                Some(bias),
                Some(running_mean),
                Some(running_var),
                momentum,
                eps,
            )
            .map(Some),
        _ => Ok(None),
    })
}

/// Consecutive runs of `tensors` of one dtype and device holding at most `cap_bytes` each (a
/// tensor larger than the cap gets a bucket of its own).
pub fn buckets(tensors: &[Tensor], cap_bytes: i64) -> Vec<std::ops::Range<usize>> {
    buckets_after_first(tensors, cap_bytes, cap_bytes)
}

/// As [`buckets`], with the first bucket capped at `first_cap_bytes` (DDP's gradient buckets:
/// [`FIRST_BUCKET_BYTES`], then [`BUCKET_BYTES`]).
pub fn buckets_after_first(
    tensors: &[Tensor],
    first_cap_bytes: i64,
    cap_bytes: i64,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let same = i == start
            || (t.kind() == tensors[start].kind() && t.device() == tensors[start].device());
        let cap = if out.is_empty() {
            first_cap_bytes
        } else {
            cap_bytes
        };
        if i > start && (!same || bytes + size > cap) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// The gradient reducer of `csrc/distributed.cpp` (DDP's `Reducer`): hooks on the parameters'
/// gradient accumulators that allreduce each bucket as soon as its gradients are in.
struct Reducer(*mut c_void);

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: made by `residual_reducer_new`, freed once, before its process group.
        unsafe { residual_reducer_free(self.0) }
    }
}

/// Runs `op` on each bucket of `tensors` flattened into one contiguous tensor, then copies the
/// result back into the tensors (DDP's `_broadcast_coalesced`).
fn coalesced(
    tensors: &[Tensor],
    cap_bytes: i64,
    mut op: impl FnMut(&Tensor) -> Result<()>,
) -> Result<()> {
    for range in buckets(tensors, cap_bytes) {
        let group = &tensors[range];
        let flat = tch::no_grad(|| {
            let parts: Vec<Tensor> = group.iter().map(|t| t.reshape([-1])).collect();
            Tensor::cat(&parts, 0)
        });
        op(&flat)?;
        tch::no_grad(|| {
            let mut offset = 0;
            for t in group {
                let n = t.numel() as i64;
                t.shallow_clone()
                    .copy_(&flat.narrow(0, offset, n).view_as(t));
                offset += n;
            }
        });
    }
    Ok(())
}

/// What `DistributedDataParallel` does around the steps of one model: the parameters in DDP's
/// gradient order (the reverse of registration order, here the reverse of name order) and the
/// buffers (BatchNorm statistics) that rank 0 broadcasts.
pub struct Ddp {
    /// Declared first: dropped before the group it reduces over.
    reducer: Reducer,
    pub group: Rc<ProcessGroup>,
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    pub bucket_bytes: i64,
    /// What communication cost since the last [`Ddp::take_comm`].
    comm: CommStats,
}

/// Communication of one rank over some steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Seconds spent on gradient and buffer communication that the backward did not hide:
    /// buffer broadcasts, the hooks' copies into buckets and launches, and the wait for the
    /// gradient buckets after the backward.
    pub seconds: f64,
    /// Gradient buckets reduced.
    pub buckets: u64,
    /// Of those, the buckets launched during the backward (the rest waited for its end).
    pub overlapped: u64,
}

impl Ddp {
    /// Wraps the variables of `vs`: trainable ones are parameters, the rest buffers; hooks the
    /// parameters' gradients into buckets of [`FIRST_BUCKET_BYTES`], then [`BUCKET_BYTES`].
    pub fn new(group: ProcessGroup, vs: &tch::nn::VarStore) -> Result<Self> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let (params, buffers): (Vec<_>, Vec<_>) =
            vars.into_iter().partition(|(_, t)| t.requires_grad());
        let params: Vec<Tensor> = params.into_iter().rev().map(|(_, t)| t).collect();
        let ends: Vec<i64> = buckets_after_first(&params, FIRST_BUCKET_BYTES, BUCKET_BYTES)
            .into_iter()
            .map(|r| r.end as i64)
            .collect();
        let ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut err = vec![0 as c_char; ERR_LEN];
        // SAFETY: `ptrs` are tch's `at::Tensor*`, alive for the call (the C side keeps copies);
        // `ends` has one entry per bucket; the C side catches all.
        let reducer = unsafe {
            residual_reducer_new(
                group.ptr,
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                ends.as_ptr(),
                ends.len() as c_int,
                1.0 / group.world_size as f64,
                err.as_mut_ptr(),
                ERR_LEN as c_int,
            )
        };
        if reducer.is_null() {
            bail!("{}", message(&err));
        }
        Ok(Self {
            reducer: Reducer(reducer),
            group: Rc::new(group),
            params,
            buffers: buffers.into_iter().map(|(_, t)| t).collect(),
            bucket_bytes: BUCKET_BYTES,
            comm: CommStats::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn world_size(&self) -> usize {
        self.group.world_size
    }

    /// Makes this thread's training-mode batch norms `SyncBatchNorm`s over this group
    /// (`nn.SyncBatchNorm.convert_sync_batchnorm`), until the `Ddp` is dropped.
    pub fn enable_sync_batch_norm(&self) {
        SYNC_BN.with(|cell| *cell.borrow_mut() = Some(Rc::clone(&self.group)));
    }

    /// Whether [`Ddp::enable_sync_batch_norm`] is in force.
    pub fn sync_batch_norm_enabled(&self) -> bool {
        SYNC_BN.with(|cell| {
            cell.borrow()
                .as_ref()
                .is_some_and(|g| Rc::ptr_eq(g, &self.group))
        })
    }

    /// Broadcasts parameters and buffers from rank 0 (DDP's construction).
    pub fn sync_module_states(&self) -> Result<()> {
        let all: Vec<Tensor> = self
            .params
            .iter()
            .chain(&self.buffers)
            .map(Tensor::shallow_clone)
            .collect();
        coalesced(&all, 250 * 1024 * 1024, |t| self.group.broadcast(t, 0))
            .context("broadcasting the model from rank 0")
    }

    /// Broadcasts the buffers from rank 0 (`broadcast_buffers=True`, before each forward).
    pub fn sync_buffers(&mut self) -> Result<()> {
        if self.buffers.is_empty() || self.group.world_size == 1 {
            return Ok(());
        }
        let start = std::time::Instant::now();
        coalesced(&self.buffers, self.bucket_bytes, |t| {
            self.group.broadcast(t, 0)
        })
        .context("broadcasting buffers from rank 0")?;
        self.comm.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Makes the next backward the step's last (DDP's `prepare_for_backward`; the backwards of
    /// earlier micro-batches run as under `no_sync`): each gradient bucket is allreduced
    /// asynchronously as soon as all its gradients are accumulated, while the backward goes on.
    pub fn prepare_for_backward(&mut self) {
        // SAFETY: a live reducer; no backward is running on another thread.
        unsafe { residual_reducer_arm(self.reducer.0) }
    }

    /// Averages the gradients over all ranks, in place: waits for the buckets launched during
    /// the backward and reduces the others (all of them when [`Ddp::prepare_for_backward`] was
    /// not called).
    pub fn all_reduce_grads(&mut self) -> Result<()> {
        let start = std::time::Instant::now();
        let mut hook_seconds = 0.0;
        let (mut launched, mut buckets): (c_int, c_int) = (0, 0);
        let mut err = vec![0 as c_char; ERR_LEN];
        // SAFETY: a live reducer, out-parameters and the error buffer with its length.
        let rc = unsafe {
            residual_reducer_finish(
                self.reducer.0,
                &mut hook_seconds,
                &mut launched,
                &mut buckets,
                err.as_mut_ptr(),
                ERR_LEN as c_int,
            )
        };
        if rc != 0 {
            bail!("averaging gradients: {}", message(&err));
        }
        self.comm.seconds += start.elapsed().as_secs_f64() + hook_seconds;
        self.comm.buckets += buckets as u64;
        self.comm.overlapped += launched as u64;
        Ok(())
    }

    /// Sums a few host numbers over all ranks (epoch loss and error tallies), in f64.
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        let t = match self.group.backend {
            Backend::Gloo => t,
            Backend::Nccl => t.to_device(self.params.first().map_or(Device::Cpu, Tensor::device)),
        };
        self.group.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    }

    /// The communication accumulated since the last call.
    pub fn take_comm(&mut self) -> CommStats {
        std::mem::take(&mut self.comm)
    }
}

impl Drop for Ddp {
    fn drop(&mut self) {
        SYNC_BN.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().is_some_and(|g| Rc::ptr_eq(g, &self.group)) {
                *cell = None;
            }
        });
    }
}

/// `RESIDUAL_FAULT_EXIT=RANK:STEP`: a fault injected for tests of failure handling; rank `RANK`
/// exits with status 17 once it has done `STEP` steps, on torchrun's first attempt only.
pub fn injected_exit(env: &LaunchEnv) -> Option<u64> {
    let spec = std::env::var("RESIDUAL_FAULT_EXIT").ok()?;
    let (rank, step) = spec.split_once(':')?;
    (rank.trim().parse::<usize>().ok()? == env.rank && env.restart_count == 0)
        .then(|| step.trim().parse().ok())
        .flatten()
}

/// Checks the collectives on this group (the `doctor --collectives` check): a small sum, a sum
/// of `large` floats, broadcasts from rank 0 and from the last rank, sum / product / min / max
/// (and average) in 8 dtypes, an allgather, `repeats` sums in a row and a barrier; each result
/// is compared with what it must be (exactly). Returns one line per check.
pub fn check_collectives(
    group: &ProcessGroup,
    device: Device,
    large: i64,
    repeats: usize,
) -> Result<Vec<String>> {
    let (rank, world) = (group.rank as f64, group.world_size as f64);
    let mut lines = Vec::new();
    let t = Tensor::from_slice(&[rank + 1.0, 10.0 * (rank + 1.0)]).to_device(device);
    group.all_reduce_sum(&t)?;
    let want = world * (world + 1.0) / 2.0;
    let got = Vec::<f64>::try_from(&t.to_kind(Kind::Double))?;
    if got != [want, 10.0 * want] {
        bail!("allreduce sum: got {got:?}, want [{want}, {}]", 10.0 * want);
    }
    lines.push(format!("allreduce sum of rank+1: {want} on every rank"));

    let big = Tensor::arange(large, (Kind::Float, device)).remainder(1000) + rank;
    group.all_reduce_sum(&big)?;
    let expected = Tensor::arange(large, (Kind::Float, device)).remainder(1000) * world
        + world * (world - 1.0) / 2.0;
    let diff = (&big - &expected).abs().max().double_value(&[]);
    if diff != 0.0 {
        bail!("allreduce of {large} floats differs from the expected sum by {diff}");
    }
    lines.push(format!(
        "allreduce of {large} floats ({} MB): exact",
        large * 4 / (1024 * 1024)
    ));

    let b = Tensor::full([1000], rank, (Kind::Float, device));
    group.broadcast(&b, 0)?;
    if b.abs().max().double_value(&[]) != 0.0 {
        bail!("broadcast from rank 0 did not arrive");
    }
    lines.push("broadcast from rank 0: arrived".into());

    // The reduce ops and dtypes, each result exact (small integers in every dtype).
    let last = world - 1.0;
    let kinds = [
        Kind::Float,
        Kind::Double,
        Kind::Half,
        Kind::BFloat16,
        Kind::Int,
        Kind::Int64,
        Kind::Int8,
        Kind::Uint8,
    ];
    // Ranks above 3 multiply by 4 so that the product stays small; sums fit int8 up to 4 ranks.
    let product: f64 = (0..group.world_size)
        .map(|r| (r as f64 + 1.0).min(4.0))
        .product();
    for kind in kinds {
        let base = || Tensor::arange(16, (Kind::Double, device));
        let mine = || (base() + rank).to_kind(kind);
        let checks: [(ReduceOp, Tensor, Tensor); 4] = [
            (ReduceOp::Sum, mine(), base() * world + world * last / 2.0),
            (ReduceOp::Max, mine(), base() + last),
            (ReduceOp::Min, mine(), base()),
            (
                ReduceOp::Product,
                Tensor::full([16], (rank + 1.0).min(4.0), (kind, device)),
                Tensor::full([16], product, (Kind::Double, device)),
            ),
        ];
        for (op, t, want) in checks {
            group.all_reduce(&t, op)?;
            let diff = (t.to_kind(Kind::Double) - want)
                .abs()
                .max()
                .double_value(&[]);
            if diff != 0.0 {
                bail!("allreduce {op:?} of {kind:?} is off by {diff}");
            }
        }
        if matches!(
            kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            let t = (base() * 2.0 + rank).to_kind(kind);
            group.all_reduce_mean(&t)?;
            let want = base() * 2.0 + last / 2.0;
            let diff = (t.to_kind(Kind::Double) - want)
                .abs()
                .max()
                .double_value(&[]);
            if diff != 0.0 {
                bail!("allreduce average of {kind:?} is off by {diff}");
            }
        }
    }
    lines.push(format!(
        "allreduce sum, product, min, max (and average for floats) of {} dtypes: exact",
        kinds.len()
    ));

    let root = group.world_size - 1;
    let b = Tensor::full([1000], rank + 5.0, (Kind::Double, device));
    group.broadcast(&b, root)?;
    if b.ne(last + 5.0).any().int64_value(&[]) != 0 {
        bail!("broadcast from rank {root} did not arrive");
    }
    lines.push(format!("broadcast from rank {root}: arrived"));

    let gathered = group.all_gather(&Tensor::full([3], rank, (Kind::Int64, device)))?;
    let want = Tensor::arange(group.world_size as i64, (Kind::Int64, device))
        .unsqueeze(1)
        .expand([-1, 3], false);
    if gathered.ne_tensor(&want).any().int64_value(&[]) != 0 {
        bail!("allgather returned {gathered:?}");
    }
    lines.push("allgather: every rank's tensor in rank order".into());

    let acc = Tensor::zeros([4096], (Kind::Float, device));
    for _ in 0..repeats {
        let step = Tensor::ones([4096], (Kind::Float, device));
        group.all_reduce_sum(&step)?;
        let _ = acc.shallow_clone().g_add_(&step);
    }
    let total = acc.mean(Kind::Double).double_value(&[]);
    if total != repeats as f64 * world {
        bail!(
            "{repeats} allreduces in a row summed to {total}, not {}",
            repeats as f64 * world
        );
    }
    lines.push(format!("{repeats} allreduces in a row: exact"));
    group.barrier()?;
    lines.push("barrier: passed".into());
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launch_env_reads_torchrun_variables_and_rejects_bad_ones() {
        assert_eq!(LaunchEnv::from_lookup(lookup(&[])).unwrap(), None);
        let env = LaunchEnv::from_lookup(lookup(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (3, 4, 1));
        assert_eq!(
            (env.master_addr.as_str(), env.master_port),
            ("node0", 29400)
        );
        assert_eq!((env.restart_count, env.agent_store), (2, true));
        assert_eq!(env.device(Device::Cuda(0)), Device::Cuda(1));
        assert_eq!(env.device(Device::Cpu), Device::Cpu);
        for bad in [
            vec![("WORLD_SIZE", "2")],
            vec![("WORLD_SIZE", "2"), ("RANK", "2")],
            vec![("WORLD_SIZE", "0"), ("RANK", "0")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
        ] {
            assert!(LaunchEnv::from_lookup(lookup(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn buckets_hold_at_most_the_cap_and_one_dtype() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = |n: i64| Tensor::zeros([n], (Kind::Double, Device::Cpu));
        // 4 bytes per float: a cap of 40 bytes holds 10 floats.
        let ts = [f(4), f(6), f(1), f(20), d(2), d(2)];
        assert_eq!(buckets(&ts, 40), vec![0..2, 2..3, 3..4, 4..6]);
        assert!(buckets(&[], 40).is_empty());
        // DDP's gradient buckets: a smaller first one (here 20 bytes: 5 floats).
        assert_eq!(
            buckets_after_first(&ts, 20, 40),
            vec![0..1, 1..3, 3..4, 4..6]
        );
    }
}
