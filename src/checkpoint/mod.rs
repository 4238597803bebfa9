//! State dicts: PyTorch key names mapped to tensors, read from the files PyTorch and tch write,
//! loaded into a `VarStore` by name (strictly by default, like `nn.Module.load_state_dict`), and
//! saved back in formats PyTorch loads.
//!
//! Reading needs no Python and runs nothing from the file: `torch.save` files (zip and legacy),
//! TorchScript archives and tch's `.ot` go through a restricted unpickler ([`pickle`]) that builds
//! tensors and keeps any other object as inert data; safetensors are memory-mapped. Reading is
//! lazy ([`Checkpoint`]): the pickle or header gives a [`Table`] of names, dtypes, shapes and
//! storage places first, checked against the model before any storage is read; storages are then
//! copied once from the mapped file (inflated by streaming when deflated, within
//! [`ReadOptions::inflate_limit`]). The weights
//! are found wherever training scripts put them ([`locate`]): nested checkpoints
//! (`{"state_dict": ...}`, `{"model": ...}`, EMA copies), whole pickled modules
//! (`torch.save(model)`), TorchScript modules; DataParallel, torch.compile and Lightning prefixes
//! are stripped. [`Layout`] says what was found where.

mod dtype;
pub mod formats;
mod load;
pub mod locate;
mod module;
pub mod pickle;
mod reader;
pub mod table;
pub mod torch_file;
pub mod torchscript;

pub use dtype::{DType, DTypeNames, DTYPES};
pub use formats::{Format, RawTensor};
pub use load::{compare_state_dict, load_state_dict, LoadReport, TensorMeta, Weights};
pub use locate::{Holder, Layout, NESTED_KEYS, WRAPPER_PREFIXES};
pub use reader::Checkpoint;
pub use table::{StorageRecord, Table, TensorRecord};

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::Tensor;

/// Tensors by PyTorch state_dict key, in file order.
#[derive(Debug, Default)]
pub struct StateDict {
    pub entries: Vec<(String, Tensor)>,
}

/// How to find the state_dict inside a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// The entry holding the state_dict (`--key`); `a/b` descends twice. Without it the reader
    /// tries the checkpoint itself, then [`NESTED_KEYS`].
    pub key: Option<String>,
    /// Extra prefixes to strip from every key that has them.
    pub strip_prefixes: Vec<String>,
    /// The most bytes that deflated storages may inflate to in one read (`--inflate-limit`);
    /// without it, `RESIDUAL_INFLATE_LIMIT`, else the available memory.
    pub inflate_limit: Option<u64>,
}

/// The environment variable that sets [`ReadOptions::inflate_limit`] when it is not given.
pub const INFLATE_LIMIT_ENV: &str = "RESIDUAL_INFLATE_LIMIT";

impl ReadOptions {
    /// The limit on inflated bytes: [`inflate_limit`](Self::inflate_limit), else
    /// `RESIDUAL_INFLATE_LIMIT` (bytes), else `MemAvailable` from /proc/meminfo (16 GiB where
    /// there is none).
    pub fn inflate_limit(&self) -> u64 {
        if let Some(limit) = self.inflate_limit {
            return limit;
        }
        if let Some(limit) = std::env::var(INFLATE_LIMIT_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            return limit;
        }
        available_memory().unwrap_or(16 << 30)
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parses checkpoint bytes (torch.save zip or legacy, libtorch archive, or safetensors) into raw
/// tensors named as PyTorch's state_dict names them, without libtorch; and says where they were.
/// This is the surface the fuzz target exercises.
pub fn parse_described(
    bytes: &[u8],
    options: &ReadOptions,
) -> Result<(Vec<(String, RawTensor)>, Layout)> {
    let table = Table::parse(bytes, options)?;
    let tensors = table.raw_tensors(bytes, options.inflate_limit())?;
    Ok((tensors, table.layout))
}

/// The tensor records (names, dtypes, shapes, storage keys) that a `torch.save` pickle
/// (`data.pkl`) holds, found and named as [`parse_described`] finds and names them, without
/// reading any storage. This is the surface the unpickler fuzz target exercises.
pub fn locate_records(
    pickle: &[u8],
    options: &ReadOptions,
) -> Result<(Vec<(String, pickle::TensorRef)>, Layout)> {
    let (object, _) = pickle::unpickle(pickle)?;
    let (mut refs, mut layout) = locate::locate(
        &object,
        Format::TorchZip,
        &torchscript::ScriptClasses::new(),
        options.key.as_deref(),
    )?;
    locate::rename(&mut refs, &mut layout, &options.strip_prefixes);
    Ok((refs, layout))
}

/// [`parse_described`] without the description.
pub fn parse_bytes(bytes: &[u8], options: &ReadOptions) -> Result<Vec<(String, RawTensor)>> {
    Ok(parse_described(bytes, options)?.0)
}

impl RawTensor {
    /// A CPU tensor with these bytes.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::f_from_data_size(
            &self.data,
            &self.shape,
            self.dtype.kind(),
        )?)
    }

    /// The bytes of `t` (any device, any layout).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let dtype = DType::from_kind(t.kind())?;
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let mut data = vec![0u8; t.numel() * dtype.size()];
        t.f_copy_data_u8(&mut data, t.numel())?;
        Ok(Self {
            dtype,
            shape: t.size(),
            data,
        })
    }
}

impl StateDict {
    /// Reads a checkpoint: `torch.save` files (`.pth`, `.pt`, `.bin`, `.ckpt`, zip or legacy,
    /// whatever else they hold), TorchScript archives, safetensors, or tch's `.ot`; the format is
    /// recognised from the content.
    pub fn read(path: &Path, options: &ReadOptions) -> Result<Self> {
        Ok(Self::read_described(path, options)?.0)
    }

    /// [`read`](Self::read), and where in the file the weights were.
    pub fn read_described(path: &Path, options: &ReadOptions) -> Result<(Self, Layout)> {
        let checkpoint = Checkpoint::open(path, options)?;
        Ok((checkpoint.to_state_dict()?, checkpoint.layout().clone()))
    }

    /// Reads a safetensors file.
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        Self::read(path, &ReadOptions::default())
    }

    /// The state of a `VarStore`, sorted by name.
    pub fn from_var_store(vs: &tch::nn::VarStore) -> Self {
        let mut entries: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self { entries }
    }

    fn raw(&self) -> Result<Vec<(String, RawTensor)>> {
        self.entries
            .iter()
            .map(|(k, t)| Ok((k.clone(), RawTensor::from_tensor(t)?)))
            .collect()
    }

    /// Writes safetensors, atomically.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        crate::fs::write_atomic(path, &formats::safetensors_bytes(&self.raw()?)?)
    }

    /// Writes what `torch.save(state_dict, path)` writes, atomically; PyTorch reads it with
    /// `torch.load(path, weights_only=True)`.
    pub fn save_torch(&self, path: &Path) -> Result<()> {
        let archive = archive_name(path);
        crate::fs::write_atomic(path, &formats::torch_zip_bytes(&self.raw()?, &archive)?)
    }

    /// Writes what `torch.save({key: state_dict, ...}, path)` writes for `groups` (a training
    /// checkpoint's `state_dict` and `state_dict_ema`), atomically.
    pub fn save_torch_nested(path: &Path, groups: &[(&str, &StateDict)]) -> Result<()> {
        let raw = groups
            .iter()
            .map(|(key, sd)| Ok((key.to_string(), sd.raw()?)))
            .collect::<Result<Vec<_>>>()?;
        crate::fs::write_atomic(
            path,
            &formats::torch_zip_bytes_nested(&raw, &archive_name(path))?,
        )
    }

    /// Writes tch's `.ot` (a libtorch archive), atomically.
    pub fn save_ot(&self, path: &Path) -> Result<()> {
        let named: Vec<(&str, &Tensor)> =
            self.entries.iter().map(|(k, t)| (k.as_str(), t)).collect();
        crate::fs::replace_atomically(path, |tmp| Ok(Tensor::save_multi(&named, tmp)?))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes in the format the extension names: `.safetensors`, `.pth` / `.pt` / `.bin`
    /// (torch.save), or `.ot` (tch).
    pub fn save(&self, path: &Path) -> Result<()> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => self.save_safetensors(path),
            Some("pth" | "pt" | "bin") => self.save_torch(path),
            Some("ot") => self.save_ot(path),
            _ => bail!(
                "cannot tell the format of {}: use .safetensors, .pth, .pt, .bin or .ot",
                path.display()
            ),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of elements over all tensors.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.numel()).sum()
    }
}

/// The folder name inside a `torch.save` zip: the file's stem in letters, digits and `_`, as
/// torch names it (`archive` when nothing is left).
fn archive_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let archive: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if archive.is_empty() {
        "archive".to_string()
    } else {
        archive
    }
}
