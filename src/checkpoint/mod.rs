//! State dicts: PyTorch key names mapped to tensors, read from the files PyTorch and tch write,
//! loaded into a `VarStore` by name (strictly by default, like `nn.Module.load_state_dict`), and
//! saved back in formats PyTorch loads.
//!
//! Reading needs no Python: `torch.save` files (zip and legacy) go through a restricted unpickler
//! ([`pickle`]) that builds tensors and refuses anything else; safetensors are memory-mapped; tch's
//! `.ot` goes through libtorch. Nested checkpoints (`{"state_dict": ...}`, `{"model": ...}`, EMA
//! copies) are unwrapped and DataParallel / torch.compile prefixes stripped.

mod dtype;
pub mod formats;
mod load;
pub mod pickle;

pub use dtype::{DType, DTypeNames, DTYPES};
pub use formats::RawTensor;
pub use load::{load_state_dict, LoadReport};

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use formats::{Format, TorchFile};
use pickle::{TensorRef, Value};

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
    /// Extra prefixes to strip from every key that has them (e.g. Lightning's `model.`).
    pub strip_prefixes: Vec<String>,
}

/// Where training scripts commonly put the weights inside a checkpoint dict, in the order tried.
pub const NESTED_KEYS: [&str; 7] = [
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "ema",
    "state_dict_ema",
    "model_ema",
];

/// Prefixes stripped whenever every key has them: DataParallel / DDP and torch.compile.
pub const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

fn is_state_dict(entries: &[(Value, Value)]) -> bool {
    !entries.is_empty()
        && entries
            .iter()
            .all(|(k, v)| matches!((k, v), (Value::Str(_), Value::Tensor(_))))
}

fn describe(entries: &[(Value, Value)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .take(12)
        .map(|(k, v)| format!("{}: {}", k.as_str().unwrap_or("<non-string key>"), v.kind()))
        .collect();
    format!(
        "{{{}{}}}",
        items.join(", "),
        if entries.len() > 12 { ", ..." } else { "" }
    )
}

fn entry<'v>(entries: &'v [(Value, Value)], key: &str) -> Option<&'v Value> {
    entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// Finds the state_dict in an unpickled checkpoint.
fn select(object: &Value, key: Option<&str>) -> Result<Vec<(String, TensorRef)>> {
    let Value::Dict(entries) = object else {
        bail!(
            "the checkpoint holds a {}, not a dict of tensors",
            object.kind()
        );
    };
    if let Some(path) = key {
        let mut current = object;
        for part in path.split('/') {
            let Value::Dict(entries) = current else {
                bail!(
                    "--key {path}: `{part}` is inside a {}, not a dict",
                    current.kind()
                );
            };
            current = entry(entries, part).with_context(|| {
                format!("--key {path}: no entry `{part}` in {}", describe(entries))
            })?;
        }
        return select(current, None).with_context(|| format!("under --key {path}"));
    }
    if is_state_dict(entries) {
        return Ok(entries
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                _ => None,
            })
            .collect());
    }
    for nested in NESTED_KEYS {
        if let Some(inner @ Value::Dict(_)) = entry(entries, nested) {
            if let Ok(found) = select(inner, None) {
                return Ok(found);
            }
        }
    }
    let non_tensors: Vec<String> = entries
        .iter()
        .filter(|(_, v)| !matches!(v, Value::Tensor(_)))
        .take(5)
        .map(|(k, v)| format!("{} ({})", k.as_str().unwrap_or("?"), v.kind()))
        .collect();
    bail!(
        "no state_dict found: the checkpoint is {} with non-tensor entries {non_tensors:?}; name \
         the entry holding the weights with --key (tried {NESTED_KEYS:?})",
        describe(entries)
    )
}

/// Strips the wrapper prefixes (while every key has one) and the requested ones.
fn strip_prefixes<T>(entries: &mut [(String, T)], extra: &[String]) {
    loop {
        let prefix = WRAPPER_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(extra.iter().cloned())
            .find(|p| {
                !entries.is_empty() && entries.iter().all(|(k, _)| k.starts_with(p.as_str()))
            });
        let Some(prefix) = prefix else { break };
        for (k, _) in entries.iter_mut() {
            *k = k[prefix.len()..].to_string();
        }
    }
    for prefix in extra {
        for (k, _) in entries.iter_mut() {
            if let Some(rest) = k.strip_prefix(prefix.as_str()) {
                *k = rest.to_string();
            }
        }
    }
}

/// Parses checkpoint bytes (torch.save zip or legacy, or safetensors) into raw tensors, without
/// libtorch. This is the surface the fuzz target exercises.
pub fn parse_bytes(bytes: &[u8], options: &ReadOptions) -> Result<Vec<(String, RawTensor)>> {
    let mut entries = match formats::sniff(bytes)? {
        Format::Safetensors => formats::read_safetensors(bytes)?,
        Format::LibtorchArchive => bail!(formats::LIBTORCH_ARCHIVE),
        Format::TorchZip | Format::TorchLegacy => {
            let mut file = TorchFile::parse(bytes)?;
            let refs = select(&file.object, options.key.as_deref())?;
            file.tensors(refs)?
        }
    };
    strip_prefixes(&mut entries, &options.strip_prefixes);
    Ok(entries)
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
    /// Reads a checkpoint: `torch.save` files (`.pth`, `.pt`, `.bin`, zip or legacy), safetensors,
    /// or tch's `.ot`; the format is recognised from the content.
    pub fn read(path: &Path, options: &ReadOptions) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            bail!("checkpoint {} is empty", path.display());
        }
        // SAFETY: the map is read-only and dropped before returning; a file changed underneath by
        // another process can at worst produce wrong values, which the parsers bound-check.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        if formats::sniff(&map).ok() == Some(Format::LibtorchArchive) {
            return Self::read_ot(path, options);
        }
        let raw = parse_bytes(&map, options)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        drop(map);
        let entries = raw
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_tensor()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { entries })
    }

    /// tch's `VarStore::save` format (a libtorch archive of named tensors); also the parameters of
    /// a TorchScript module.
    fn read_ot(path: &Path, options: &ReadOptions) -> Result<Self> {
        let mut entries = Tensor::load_multi(path)
            .with_context(|| format!("cannot read tch archive {}", path.display()))?;
        strip_prefixes(&mut entries, &options.strip_prefixes);
        Ok(Self { entries })
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
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let archive: String = stem
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let archive = if archive.is_empty() {
            "archive".to_string()
        } else {
            archive
        };
        crate::fs::write_atomic(path, &formats::torch_zip_bytes(&self.raw()?, &archive)?)
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
