//! A checkpoint's metadata: every tensor's name, dtype, shape, strides and the storage bytes it
//! views, read from the pickle or the safetensors header without reading a tensor byte, with
//! every view checked against its storage; and the storages read on demand, straight from the
//! file's bytes or inflated by streaming, never past what the tensors need nor over a limit.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

use anyhow::{bail, Context, Result};

use super::formats::{sniff, Format, RawTensor};
use super::locate::{self, Holder, Layout};
use super::pickle::TensorRef;
use super::torch_file::{is_contiguous, Record, TorchFile};
use super::{DType, ReadOptions};

/// One tensor of the table: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRecord {
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
    /// Offset of its first element in its storage, in elements.
    pub offset: usize,
    /// Its storage, an index into [`Table::storages`].
    pub storage: usize,
}

impl TensorRecord {
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|s| *s as usize).product()
    }

    /// Whether it is its whole storage, contiguous from the first byte.
    pub fn is_whole(&self, storage: &StorageRecord) -> bool {
        self.offset == 0
            && is_contiguous(&self.shape, &self.stride)
            && self.numel() * self.dtype.size() == storage.need
    }
}

/// One storage: where its bytes lie, and how many of them its tensors reach.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRecord {
    pub record: Record,
    pub dtype: DType,
    /// Bytes its tensors reach, from its first byte: all that is ever read or inflated of it.
    pub need: usize,
}

/// What a checkpoint holds, before any tensor is read.
#[derive(Debug, Clone)]
pub struct Table {
    pub layout: Layout,
    /// Tensors by state_dict key, in file order.
    pub tensors: Vec<(String, TensorRecord)>,
    pub storages: Vec<StorageRecord>,
}

impl Table {
    /// Reads the table of a checkpoint's bytes (torch.save zip or legacy, libtorch archive, or
    /// safetensors): the pickle or the header only.
    pub fn parse(bytes: &[u8], options: &ReadOptions) -> Result<Self> {
        Self::parse_mapped(bytes, None, options)
    }

    /// [`parse`](Self::parse) of `bytes` mapped from `file`, which storage headers are read from
    /// (so that the mapping is touched only where the zip directory and the pickle lie).
    pub fn parse_mapped(
        bytes: &[u8],
        file: Option<&std::fs::File>,
        options: &ReadOptions,
    ) -> Result<Self> {
        let format = sniff(bytes)?;
        if format == Format::Safetensors {
            let (mut tensors, storages) = safetensors_table(bytes)?;
            let mut layout = Layout::new(format, Holder::StateDict);
            locate::rename(&mut tensors, &mut layout, &options.strip_prefixes);
            return Ok(Self {
                layout,
                tensors,
                storages,
            });
        }
        let mut file = TorchFile::parse_mapped(bytes, file)?;
        let (mut refs, mut layout) = locate::locate(
            &file.object,
            file.format,
            &file.script_classes,
            options.key.as_deref(),
        )?;
        locate::rename(&mut refs, &mut layout, &options.strip_prefixes);
        let mut storages = Vec::new();
        let mut index: HashMap<(String, DType), usize> = HashMap::new();
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut tensors = Vec::with_capacity(refs.len());
        for (name, t) in refs {
            let record = match records.get(&t.storage.key) {
                Some(r) => r.clone(),
                None => {
                    let r = file
                        .record(&t.storage.key)
                        .with_context(|| format!("tensor `{name}`"))?;
                    records.insert(t.storage.key.clone(), r.clone());
                    r
                }
            };
            let (offset, need) =
                check_view(&t, &record).with_context(|| format!("tensor `{name}`"))?;
            let id = (t.storage.key.clone(), t.storage.dtype);
            let storage = *index.entry(id).or_insert_with(|| {
                storages.push(StorageRecord {
                    record,
                    dtype: t.storage.dtype,
                    need: 0,
                });
                storages.len() - 1
            });
            storages[storage].need = storages[storage].need.max(need);
            let record = TensorRecord {
                dtype: t.storage.dtype,
                shape: t.size,
                stride: t.stride,
                offset,
                storage,
            };
            tensors.push((name, record));
        }
        Ok(Self {
            layout,
            tensors,
            storages,
        })
    }

    /// Refuses to inflate `storages` (indices) if one of them, or all together, would take more
    /// than `limit` bytes; before anything is allocated.
    pub fn check_inflation(
        &self,
        storages: impl IntoIterator<Item = usize>,
        limit: u64,
    ) -> Result<()> {
        let mut total = 0u64;
        for s in storages {
            let s = &self.storages[s];
            if !s.record.deflated {
                continue;
            }
            let need = s.need as u64;
            if need > limit {
                bail!(
                    "storage record `{}` would inflate to {need} bytes for its tensors (its zip \
                     header says {}), over the limit of {limit} bytes for inflated storages \
                     (set by --inflate-limit or RESIDUAL_INFLATE_LIMIT; by default the available memory)",
                    s.record.name,
                    s.record.len
                );
            }
            total += need;
        }
        if total > limit {
            bail!(
                "the deflated storage records would inflate to {total} bytes together, over the \
                 limit of {limit} bytes for inflated storages (set by --inflate-limit or \
                 RESIDUAL_INFLATE_LIMIT; by default the available memory)"
            );
        }
        Ok(())
    }

    /// The first [`need`](StorageRecord::need) bytes of storage `s`: a slice of `bytes` when it
    /// is stored, inflated into a new buffer when it is deflated (check
    /// [`check_inflation`](Self::check_inflation) first).
    pub fn storage_bytes<'b>(&self, bytes: &'b [u8], s: usize) -> Result<Cow<'b, [u8]>> {
        let storage = &self.storages[s];
        let r = &storage.record;
        if !r.deflated {
            return Ok(Cow::Borrowed(&bytes[r.start..r.start + storage.need]));
        }
        let mut out = Vec::new();
        out.try_reserve_exact(storage.need)
            .with_context(|| format!("storage record `{}` too large for memory", r.name))?;
        out.resize(storage.need, 0);
        self.inflate_into(bytes, s, &mut out)?;
        Ok(Cow::Owned(out))
    }

    /// Inflates the first `dst.len()` bytes of the deflated storage `s` into `dst`, by streaming.
    pub fn inflate_into(&self, bytes: &[u8], s: usize, dst: &mut [u8]) -> Result<()> {
        let r = &self.storages[s].record;
        let compressed = &bytes[r.start..r.start + r.stored];
        let mut inflater = flate2::read::DeflateDecoder::new(compressed);
        let mut filled = 0;
        while filled < dst.len() {
            match inflater.read(&mut dst[filled..]) {
                Ok(0) => bail!(
                    "storage record `{}` inflates to {filled} bytes, fewer than the {} its tensors need",
                    r.name,
                    dst.len()
                ),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot inflate storage record `{}`", r.name))
                }
            }
        }
        Ok(())
    }

    /// Every tensor as contiguous bytes, in order; each storage is read (or inflated, within
    /// `limit` bytes) once and released after its last tensor.
    pub fn raw_tensors(&self, bytes: &[u8], limit: u64) -> Result<Vec<(String, RawTensor)>> {
        self.check_inflation(0..self.storages.len(), limit)?;
        let mut uses = vec![0usize; self.storages.len()];
        for (_, t) in &self.tensors {
            uses[t.storage] += 1;
        }
        let mut held: HashMap<usize, Cow<[u8]>> = HashMap::new();
        let mut out = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            if let std::collections::hash_map::Entry::Vacant(e) = held.entry(t.storage) {
                e.insert(self.storage_bytes(bytes, t.storage)?);
            }
            uses[t.storage] -= 1;
            let data = if uses[t.storage] == 0 && t.is_whole(&self.storages[t.storage]) {
                held.remove(&t.storage).unwrap_or_default().into_owned()
            } else {
                let data = gather(
                    &held[&t.storage],
                    t.dtype.size(),
                    t.offset,
                    &t.shape,
                    &t.stride,
                )
                .with_context(|| format!("tensor `{name}`"))?;
                if uses[t.storage] == 0 {
                    held.remove(&t.storage);
                }
                data
            };
            out.push((
                name.clone(),
                RawTensor {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data,
                },
            ));
        }
        Ok(out)
    }
}

/// The offset (elements) and the extent (bytes from the storage's start) of the view `t` of a
/// storage held in `record`, refusing views that reach outside it.
fn check_view(t: &TensorRef, record: &Record) -> Result<(usize, usize)> {
    let storage = &t.storage;
    let key = &storage.key;
    let elem = storage.dtype.size();
    let declared = usize::try_from(storage.numel)
        .unwrap_or(usize::MAX)
        .saturating_mul(elem);
    let held = record.len;
    if held < declared && storage.view.is_none() {
        bail!("storage `{key}` holds {held} bytes, its header says {declared}");
    }
    let base = storage.view.as_ref().map_or(0, |(_, offset, _)| *offset);
    let offset = base
        .checked_add(t.offset)
        .context("tensor offset overflows")?;
    extent(offset, &t.size, &t.stride, held / elem)
        .map(|(offset, end)| (offset, end * elem))
        .with_context(|| format!("tensor of size {:?} in storage `{key}`", t.size))
}

/// The offset and the end (one past the last element reached, 0 when empty) of the strided view
/// `(offset, size, stride)` of `available` elements, refusing views that reach outside them.
fn extent(offset: i64, size: &[i64], stride: &[i64], available: usize) -> Result<(usize, usize)> {
    if size.len() != stride.len() {
        bail!("{} sizes but {} strides", size.len(), stride.len());
    }
    if size.iter().any(|s| *s < 0) || stride.iter().any(|s| *s < 0) || offset < 0 {
        bail!("negative size, stride or offset");
    }
    let numel = size
        .iter()
        .try_fold(1i64, |a, s| a.checked_mul(*s))
        .context("tensor size overflows")?;
    if numel == 0 {
        return Ok((0, 0));
    }
    let last = size
        .iter()
        .zip(stride)
        .try_fold(offset, |a, (s, st)| {
            (s - 1).checked_mul(*st).and_then(|x| a.checked_add(x))
        })
        .context("tensor extent overflows")?;
    if last as u64 >= available as u64 {
        bail!("reaches element {last} but the storage has {available}");
    }
    Ok((offset as usize, last as usize + 1))
}

/// The tensors of a safetensors file (names in file order), each its own storage.
type Tensors = Vec<(String, TensorRecord)>;

fn safetensors_table(bytes: &[u8]) -> Result<(Tensors, Vec<StorageRecord>)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("corrupt safetensors file: {e}"))?;
    let mut views: Vec<(usize, String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            (start, name, view)
        })
        .collect();
    views.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut tensors = Vec::with_capacity(views.len());
    let mut storages = Vec::with_capacity(views.len());
    for (start, name, view) in views {
        let dtype = DType::from_safetensors(view.dtype())
            .with_context(|| format!("{name}: unsupported safetensors dtype {:?}", view.dtype()))?;
        let shape = view
            .shape()
            .iter()
            .map(|s| i64::try_from(*s))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{name}: shape {:?} overflows", view.shape()))?;
        let len = view.data().len();
        storages.push(StorageRecord {
            record: Record {
                name: name.clone(),
                start,
                stored: len,
                len,
                deflated: false,
            },
            dtype,
            need: len,
        });
        let record = TensorRecord {
            dtype,
            stride: contiguous_strides(&shape),
            shape,
            offset: 0,
            storage: storages.len() - 1,
        };
        tensors.push((name, record));
    }
    Ok((tensors, storages))
}

pub(crate) fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1].max(1);
    }
    strides
}

/// Copies the strided view `(offset, size, stride)` of `bytes` (elements of `elem` bytes, checked
/// by [`extent`] to lie within them) into a contiguous buffer.
/// (A view with zero strides can be far larger than its storage: it is allocated fallibly.)
fn gather(
    bytes: &[u8],
    elem: usize,
    offset: usize,
    size: &[i64],
    stride: &[i64],
) -> Result<Vec<u8>> {
    let numel: usize = size.iter().map(|s| *s as usize).product();
    let len = numel.checked_mul(elem).context("tensor size overflows")?;
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .context("tensor too large for memory")?;
    if numel == 0 {
        return Ok(out);
    }
    if is_contiguous(size, stride) {
        let start = offset * elem;
        out.extend_from_slice(&bytes[start..start + len]);
        return Ok(out);
    }
    let mut index = vec![0usize; size.len()];
    for _ in 0..numel {
        let at = offset
            + index
                .iter()
                .zip(stride)
                .map(|(i, s)| i * *s as usize)
                .sum::<usize>();
        let at = at * elem;
        out.extend_from_slice(&bytes[at..at + elem]);
        for d in (0..size.len()).rev() {
            index[d] += 1;
            if index[d] < size[d] as usize {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}
