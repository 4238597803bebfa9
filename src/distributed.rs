//! Data-parallel communication on PyTorch's own distributed engine (c10d), through
//! `csrc/distributed.cpp`: a process group from torchrun's environment (`MASTER_ADDR`,
//! `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`), Gloo on CPU and NCCL on CUDA, with
//! allreduce, broadcast and barrier over tch tensors. Errors and timeouts come back as `Err`,
//! naming the rank that failed and, when it can tell, the peer that exited.
//!
//! [`Ddp`] adds what `torch.nn.parallel.DistributedDataParallel` does around a training step:
//! parameters and buffers broadcast from rank 0, gradients averaged in buckets, and buffers
//! broadcast before each forward (`broadcast_buffers=True`).

use std::os::raw::{c_char, c_int, c_void};
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
    fn residual_pg_broadcast(
        pg: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn residual_pg_barrier(pg: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
}

/// DDP's default gradient bucket size (`bucket_cap_mb=25`).
pub const BUCKET_BYTES: i64 = 25 * 1024 * 1024;

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

/// Consecutive runs of `tensors` of one dtype and device holding at most `cap_bytes` each (a
/// tensor larger than the cap gets a bucket of its own).
pub fn buckets(tensors: &[Tensor], cap_bytes: i64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let same = i == start
            || (t.kind() == tensors[start].kind() && t.device() == tensors[start].device());
        if i > start && (!same || bytes + size > cap_bytes) {
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

/// Runs `op` on each bucket of `tensors` flattened into one contiguous tensor, then copies the
/// result back into the tensors (DDP's `_broadcast_coalesced` and bucketed allreduce).
fn coalesced(
    tensors: &[Tensor],
    cap_bytes: i64,
    scale: Option<f64>,
    mut op: impl FnMut(&Tensor) -> Result<()>,
) -> Result<()> {
    for range in buckets(tensors, cap_bytes) {
        let group = &tensors[range];
        let flat = tch::no_grad(|| {
            let parts: Vec<Tensor> = group
                .iter()
                .map(|t| match scale {
                    // DDP multiplies each gradient by 1/world_size while copying it into the bucket.
                    Some(s) => t.reshape([-1]) * s,
                    None => t.reshape([-1]),
                })
                .collect();
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
    pub group: ProcessGroup,
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    pub bucket_bytes: i64,
    /// Seconds spent in gradient and buffer communication since the last [`Ddp::take_comm_seconds`].
    comm_seconds: f64,
}

impl Ddp {
    /// Wraps the variables of `vs`: trainable ones are parameters, the rest buffers.
    pub fn new(group: ProcessGroup, vs: &tch::nn::VarStore) -> Self {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let (params, buffers): (Vec<_>, Vec<_>) =
            vars.into_iter().partition(|(_, t)| t.requires_grad());
        Self {
            group,
            params: params.into_iter().rev().map(|(_, t)| t).collect(),
            buffers: buffers.into_iter().map(|(_, t)| t).collect(),
            bucket_bytes: BUCKET_BYTES,
            comm_seconds: 0.0,
        }
    }

    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn world_size(&self) -> usize {
        self.group.world_size
    }

    /// Broadcasts parameters and buffers from rank 0 (DDP's construction).
    pub fn sync_module_states(&self) -> Result<()> {
        let all: Vec<Tensor> = self
            .params
            .iter()
            .chain(&self.buffers)
            .map(Tensor::shallow_clone)
            .collect();
        coalesced(&all, 250 * 1024 * 1024, None, |t| {
            self.group.broadcast(t, 0)
        })
        .context("broadcasting the model from rank 0")
    }

    /// Broadcasts the buffers from rank 0 (`broadcast_buffers=True`, before each forward).
    pub fn sync_buffers(&mut self) -> Result<()> {
        if self.buffers.is_empty() || self.group.world_size == 1 {
            return Ok(());
        }
        let start = std::time::Instant::now();
        coalesced(&self.buffers, self.bucket_bytes, None, |t| {
            self.group.broadcast(t, 0)
        })
        .context("broadcasting buffers from rank 0")?;
        self.comm_seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Averages the gradients over all ranks, bucket by bucket, in place.
    pub fn all_reduce_grads(&mut self) -> Result<()> {
        let start = std::time::Instant::now();
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let scale = 1.0 / self.group.world_size as f64;
        coalesced(&grads, self.bucket_bytes, Some(scale), |t| {
            self.group.all_reduce_sum(t)
        })
        .context("averaging gradients")?;
        self.comm_seconds += start.elapsed().as_secs_f64();
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

    /// The communication time accumulated since the last call, in seconds.
    pub fn take_comm_seconds(&mut self) -> f64 {
        std::mem::take(&mut self.comm_seconds)
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

/// Checks the collectives on this group (the `doctor --collectives` check): a small sum,
/// a sum of `large` floats, a broadcast, `repeats` sums in a row and a barrier; each result is
/// compared with what it must be. Returns one line per check.
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
