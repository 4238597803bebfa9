//! Checkpoint file formats, in pure Rust (no libtorch): the files `torch.save` writes (the zip
//! format of PyTorch >= 1.6 and the legacy format before it) and safetensors, read into
//! [`RawTensor`]s; and writers for both that PyTorch reads back.

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};

use anyhow::{bail, Context, Result};

use super::pickle::{self, TensorRef, Value};
use super::DType;

/// A tensor as bytes: contiguous, little-endian, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// What a file is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` since PyTorch 1.6 (a zip archive with `data.pkl`).
    TorchZip,
    /// A libtorch archive: a zip that also holds `constants.pkl`, as TorchScript modules
    /// (`torch.jit.save`) and tch's `.ot` files do.
    LibtorchArchive,
    /// `torch.save(..., _use_new_zipfile_serialization=False)` (a sequence of pickles).
    TorchLegacy,
    Safetensors,
}

/// Recognises a checkpoint from its content (not its name).
pub fn sniff(bytes: &[u8]) -> Result<Format> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        let libtorch = zip::ZipArchive::new(Cursor::new(bytes)).is_ok_and(|a| {
            a.file_names()
                .filter_map(|n| n.ok())
                .any(|n| n.ends_with("constants.pkl"))
        });
        return Ok(if libtorch {
            Format::LibtorchArchive
        } else {
            Format::TorchZip
        });
    }
    if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        return Ok(Format::TorchLegacy);
    }
    if bytes.len() >= 9 {
        let n = u64::from_le_bytes(bytes[..8].try_into()?);
        if n > 1 && n <= (bytes.len() - 8) as u64 && bytes[8] == b'{' {
            return Ok(Format::Safetensors);
        }
    }
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    bail!("not a PyTorch checkpoint (neither a torch.save zip or legacy file, nor safetensors)")
}

pub(super) const LIBTORCH_ARCHIVE: &str =
    "this is a TorchScript archive (torch.jit.save), not a torch.save state_dict";

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

/// A parsed `torch.save` file: the unpickled object and the storages its tensors point into.
pub struct TorchFile<'a> {
    pub object: Value,
    storages: Box<dyn Storages + 'a>,
    cache: HashMap<String, Vec<u8>>,
}

impl<'a> TorchFile<'a> {
    /// Parses a file in either torch.save format.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        match sniff(bytes)? {
            Format::TorchZip => Self::parse_zip(bytes),
            Format::TorchLegacy => Self::parse_legacy(bytes),
            Format::Safetensors => bail!("this is a safetensors file, not a torch.save file"),
            Format::LibtorchArchive => bail!(LIBTORCH_ARCHIVE),
        }
    }

    fn parse_zip(bytes: &'a [u8]) -> Result<Self> {
        let mut archive =
            zip::ZipArchive::new(Cursor::new(bytes)).context("corrupt zip archive")?;
        let pkl = archive
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .map(|n| n.to_string())
            .context("the zip archive has no data.pkl: not a torch.save file")?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        if let Ok(mut f) = archive.by_name(&format!("{prefix}byteorder")) {
            let mut order = String::new();
            f.read_to_string(&mut order)
                .context("unreadable byteorder record")?;
            if order.trim() != "little" {
                bail!("the checkpoint was written big-endian ({order:?}); only little-endian is supported");
            }
        }
        let mut data = Vec::new();
        archive
            .by_name(&pkl)
            .context("cannot open data.pkl")?
            .read_to_end(&mut data)
            .context("cannot read data.pkl")?;
        let (object, _) = pickle::unpickle(&data).context("in data.pkl")?;
        Ok(Self {
            object,
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
            object,
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

/// Reads a safetensors file's tensors, in file order.
pub fn read_safetensors(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("corrupt safetensors file: {e}"))?;
    let mut out = Vec::new();
    let mut names: Vec<(usize, String)> = Vec::new();
    for (name, view) in st.tensors() {
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        names.push((start, name));
    }
    names.sort();
    for (_, name) in names {
        let view = st
            .tensor(&name)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let dtype = DType::from_safetensors(view.dtype())
            .with_context(|| format!("{name}: unsupported safetensors dtype {:?}", view.dtype()))?;
        let shape = view.shape().iter().map(|s| *s as i64).collect();
        out.push((
            name,
            RawTensor {
                dtype,
                shape,
                data: view.data().to_vec(),
            },
        ));
    }
    Ok(out)
}

/// The safetensors file of `tensors`, as bytes.
pub fn safetensors_bytes(tensors: &[(String, RawTensor)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let shape = t.shape.iter().map(|s| *s as usize).collect();
            let view = safetensors::tensor::TensorView::new(t.dtype.safetensors(), shape, &t.data)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None)
        .map_err(|e| anyhow::anyhow!("cannot write safetensors: {e}"))
}

/// The `torch.save` zip file of an `OrderedDict` of `tensors`, as bytes: what
/// `torch.save(state_dict, path)` writes (pickle protocol 2, one storage record per tensor,
/// 64-byte aligned), readable by `torch.load(path, weights_only=True)`.
pub fn torch_zip_bytes(tensors: &[(String, RawTensor)], archive_name: &str) -> Result<Vec<u8>> {
    use zip::write::SimpleFileOptions;
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let aligned = stored.with_alignment(64).large_file(true);
    let specs: Vec<(String, DType, Vec<i64>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let name = |record: &str| format!("{archive_name}/{record}");
    zip.start_file(name("data.pkl"), stored)?;
    zip.write_all(&pickle::pickle_state_dict(&specs))?;
    zip.start_file(name(".format_version"), stored)?;
    zip.write_all(b"1")?;
    zip.start_file(name(".storage_alignment"), stored)?;
    zip.write_all(b"64")?;
    zip.start_file(name("byteorder"), stored)?;
    zip.write_all(b"little")?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(name(&format!("data/{i}")), aligned)?;
        zip.write_all(&t.data)?;
    }
    zip.start_file(name("version"), stored)?;
    zip.write_all(b"3\n")?;
    Ok(zip.finish()?.into_inner())
}
