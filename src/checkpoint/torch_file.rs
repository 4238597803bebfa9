//! Reading the files `torch.save` writes (the zip format of PyTorch >= 1.6 and the legacy format
//! before it) and the libtorch archives `torch.jit.save` and tch write, in pure Rust: the
//! unpickled object, and its tensors materialised from their storages on demand.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use anyhow::{bail, Context, Result};

use super::formats::{open_zip, sniff, Format, RawTensor};
use super::pickle::{self, TensorRef, Value};
use super::torchscript::{read_declarations, ScriptClasses};

/// The most bytes read from a zip record that is not a storage: `data.pkl` and `byteorder`,
/// and all of `code/` together (a deflated record could otherwise inflate without bound).
const MAX_PICKLE_BYTES: u64 = 1 << 28;
const MAX_CODE_BYTES: u64 = 1 << 26;

/// Reads the record `name` of `archive`, refusing more than `limit` bytes.
fn read_record(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    archive
        .by_name(name)
        .with_context(|| format!("cannot open {name}"))?
        .take(limit + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("cannot read {name}"))?;
    if out.len() as u64 > limit {
        bail!("{name} holds more than {limit} bytes");
    }
    Ok(out)
}

/// The module classes declared in the `code/` records of a libtorch archive.
fn script_classes(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    prefix: &str,
) -> Result<ScriptClasses> {
    let code = format!("{prefix}code/");
    let files: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.starts_with(&code) && n.ends_with(".py"))
        .map(|n| n.to_string())
        .collect();
    let mut classes = ScriptClasses::new();
    let mut budget = MAX_CODE_BYTES;
    for file in files {
        let source = read_record(archive, &file, budget)
            .with_context(|| format!("the code/ records hold more than {MAX_CODE_BYTES} bytes"))?;
        budget -= source.len() as u64;
        let module = file[code.len()..file.len() - ".py".len()].replace('/', ".");
        let source = String::from_utf8_lossy(&source);
        read_declarations(&module, &source, &mut classes).with_context(|| format!("in {file}"))?;
    }
    Ok(classes)
}

/// Reads storages by key, for resolving tensor records lazily.
trait Storages {
    fn read(&mut self, key: &str) -> Result<Vec<u8>>;
}

struct ZipStorages<'a> {
    archive: zip::ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
}

impl Storages for ZipStorages<'_> {
    fn read(&mut self, key: &str) -> Result<Vec<u8>> {
        let name = format!("{}data/{key}", self.prefix);
        let mut file = self
            .archive
            .by_name(&name)
            .with_context(|| format!("the archive has no storage record `{name}`"))?;
        let mut out = Vec::new();
        out.try_reserve_exact(file.size() as usize)
            .context("storage too large for memory")?;
        file.read_to_end(&mut out)
            .with_context(|| format!("cannot read storage record `{name}`"))?;
        Ok(out)
    }
}

struct LegacyStorages<'a> {
    records: HashMap<String, &'a [u8]>,
}

impl Storages for LegacyStorages<'_> {
    fn read(&mut self, key: &str) -> Result<Vec<u8>> {
        let bytes = self
            .records
            .get(key)
            .with_context(|| format!("the file has no storage `{key}`"))?;
        Ok(bytes.to_vec())
    }
}

/// A parsed `torch.save` file or libtorch archive: the unpickled object and the storages its
/// tensors point into.
pub struct TorchFile<'a> {
    pub format: Format,
    pub object: Value,
    /// The module classes a libtorch archive declares (empty for `torch.save` files).
    pub script_classes: ScriptClasses,
    storages: Box<dyn Storages + 'a>,
    cache: HashMap<String, Vec<u8>>,
}

impl<'a> TorchFile<'a> {
    /// Parses a file in either torch.save format, or a libtorch archive.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        match sniff(bytes)? {
            format @ (Format::TorchZip | Format::LibtorchArchive) => Self::parse_zip(bytes, format),
            Format::TorchLegacy => Self::parse_legacy(bytes),
            Format::Safetensors => bail!("this is a safetensors file, not a torch.save file"),
        }
    }

    fn parse_zip(bytes: &'a [u8], format: Format) -> Result<Self> {
        let mut archive = open_zip(bytes).context("corrupt zip archive")?;
        let pkl = archive
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .map(|n| n.to_string())
            .context("the zip archive has no data.pkl: not a torch.save file")?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let byteorder = format!("{prefix}byteorder");
        if archive.index_for_name(&byteorder).is_some() {
            let order = read_record(&mut archive, &byteorder, 16)?;
            let order = String::from_utf8_lossy(&order);
            if order.trim() != "little" {
                bail!("the checkpoint was written big-endian ({order:?}); only little-endian is supported");
            }
        }
        let data = read_record(&mut archive, &pkl, MAX_PICKLE_BYTES)?;
        let (object, _) = pickle::unpickle(&data).context("in data.pkl")?;
        let script_classes = match format {
            Format::LibtorchArchive => script_classes(&mut archive, &prefix)?,
            _ => ScriptClasses::new(),
        };
        Ok(Self {
            format,
            object,
            script_classes,
            storages: Box::new(ZipStorages { archive, prefix }),
            cache: HashMap::new(),
        })
    }

    fn parse_legacy(bytes: &'a [u8]) -> Result<Self> {
        let mut pos = 0;
        let mut next = |what: &str| -> Result<Value> {
            let (v, n) =
                pickle::unpickle(&bytes[pos..]).with_context(|| format!("legacy file: {what}"))?;
            pos += n;
            Ok(v)
        };
        let magic = 0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10].to_vec();
        if next("magic number")? != Value::BigInt(magic) {
            bail!("not a torch.save file: a pickle without PyTorch's legacy magic number");
        }
        let protocol = next("protocol version")?;
        if protocol != Value::Int(1001) {
            bail!("legacy file: protocol version {protocol:?}, expected 1001");
        }
        next("system info")?;
        let object = next("object")?;
        let keys = match next("storage keys")? {
            Value::List(keys) => keys,
            other => bail!("legacy file: storage key list is a {}", other.kind()),
        };
        let mut sizes = HashMap::new();
        collect_storages(&object, &mut sizes);
        let mut records = HashMap::new();
        for key in keys {
            let key = key
                .as_str()
                .context("legacy file: storage key is not a string")?
                .to_string();
            let element = sizes.get(&key).copied().unwrap_or(1);
            let header = bytes
                .get(pos..pos + 8)
                .context("legacy file truncated in a storage header")?;
            let numel = i64::from_le_bytes(header.try_into()?);
            let len = usize::try_from(numel)
                .ok()
                .and_then(|n| n.checked_mul(element))
                .context("legacy file: bad storage size")?;
            let start = pos + 8;
            let data = bytes
                .get(start..start.checked_add(len).context("storage size overflows")?)
                .with_context(|| format!("legacy file truncated in storage `{key}`"))?;
            records.insert(key, data);
            pos = start + len;
        }
        Ok(Self {
            format: Format::TorchLegacy,
            object,
            script_classes: ScriptClasses::new(),
            storages: Box::new(LegacyStorages { records }),
            cache: HashMap::new(),
        })
    }

    /// Materialises a tensor record as contiguous bytes, checking that it fits its storage.
    /// `last_use` releases the storage afterwards (and hands its buffer over without a copy when
    /// the tensor is the whole storage, contiguous).
    pub fn tensor(&mut self, t: &TensorRef, last_use: bool) -> Result<RawTensor> {
        let storage = &t.storage;
        let key = &storage.key;
        let base = storage.view.as_ref().map_or(0, |(_, offset, _)| *offset);
        if !self.cache.contains_key(key) {
            let bytes = self.storages.read(key)?;
            self.cache.insert(key.clone(), bytes);
        }
        let elem = storage.dtype.size();
        let declared = usize::try_from(storage.numel)
            .unwrap_or(usize::MAX)
            .saturating_mul(elem);
        let held = self.cache[key].len();
        if held < declared && storage.view.is_none() {
            bail!("storage `{key}` holds {held} bytes, its header says {declared}");
        }
        let numel = t.size.iter().try_fold(1i64, |a, s| a.checked_mul(*s));
        let whole = base + t.offset == 0
            && numel.is_some_and(|n| n >= 0 && n as usize * elem == held)
            && is_contiguous(&t.size, &t.stride);
        let data = if last_use && whole {
            self.cache.remove(key).unwrap_or_default()
        } else {
            let data = gather(&self.cache[key], elem, base + t.offset, &t.size, &t.stride)
                .with_context(|| format!("tensor of size {:?} in storage `{key}`", t.size))?;
            if last_use {
                self.cache.remove(key);
            }
            data
        };
        Ok(RawTensor {
            dtype: storage.dtype,
            shape: t.size.clone(),
            data,
        })
    }

    /// Materialises `refs` in order, releasing each storage after its last tensor.
    pub fn tensors(&mut self, refs: Vec<(String, TensorRef)>) -> Result<Vec<(String, RawTensor)>> {
        let mut uses: HashMap<String, usize> = HashMap::new();
        for (_, t) in &refs {
            *uses.entry(t.storage.key.clone()).or_default() += 1;
        }
        let mut out = Vec::with_capacity(refs.len());
        for (name, t) in refs {
            let left = uses.get_mut(&t.storage.key).map(|n| {
                *n -= 1;
                *n
            });
            let raw = self
                .tensor(&t, left == Some(0))
                .with_context(|| format!("tensor `{name}`"))?;
            out.push((name, raw));
        }
        Ok(out)
    }
}

fn is_contiguous(size: &[i64], stride: &[i64]) -> bool {
    let mut expected = 1i64;
    for (s, st) in size.iter().zip(stride).rev() {
        if *s != 1 && *st != expected {
            return false;
        }
        expected = expected.saturating_mul(*s);
    }
    true
}

fn collect_storages(v: &Value, sizes: &mut HashMap<String, usize>) {
    match v {
        Value::Tensor(t) => {
            sizes.insert(t.storage.key.clone(), t.storage.dtype.size());
        }
        Value::Storage(s) => {
            sizes.insert(s.key.clone(), s.dtype.size());
        }
        _ => v.children().for_each(|c| collect_storages(c, sizes)),
    }
}

/// Copies the strided view `(offset, size, stride)` of `bytes` (elements of `elem` bytes) into a
/// contiguous buffer, refusing views that reach outside `bytes`.
fn gather(bytes: &[u8], elem: usize, offset: i64, size: &[i64], stride: &[i64]) -> Result<Vec<u8>> {
    if size.iter().any(|s| *s < 0) || stride.iter().any(|s| *s < 0) || offset < 0 {
        bail!("negative size, stride or offset");
    }
    let numel = size
        .iter()
        .try_fold(1i64, |a, s| a.checked_mul(*s))
        .context("tensor size overflows")?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let last = size
        .iter()
        .zip(stride)
        .try_fold(offset, |a, (s, st)| {
            (s - 1).checked_mul(*st).and_then(|x| a.checked_add(x))
        })
        .context("tensor extent overflows")?;
    let available = (bytes.len() / elem) as i64;
    if last >= available {
        bail!("reaches element {last} but the storage has {available}");
    }
    let numel = numel as usize;
    let mut out = Vec::new();
    out.try_reserve_exact(numel * elem)
        .context("tensor too large for memory")?;
    if is_contiguous(size, stride) {
        let start = offset as usize * elem;
        out.extend_from_slice(&bytes[start..start + numel * elem]);
        return Ok(out);
    }
    let mut index = vec![0i64; size.len()];
    for _ in 0..numel {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<i64>();
        let at = at as usize * elem;
        out.extend_from_slice(&bytes[at..at + elem]);
        for d in (0..size.len()).rev() {
            index[d] += 1;
            if index[d] < size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}
