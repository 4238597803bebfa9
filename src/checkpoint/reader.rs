//! [`Checkpoint`]: a checkpoint file memory-mapped with its [`Table`] read and nothing else. Its
//! tensors are read on demand: into a model's variables straight from the mapped bytes (one copy,
//! to any device), or into new tensors that share storages as `torch.load`'s do. Deflated
//! storages are inflated by streaming, within a limit checked before anything is allocated.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use tch::{Device, Tensor};

use super::load::{TensorMeta, Weights};
use super::table::{Table, TensorRecord};
use super::{Layout, ReadOptions, StateDict};

/// A checkpoint file opened lazily: its [`Table`] is read, its storages are not.
pub struct Checkpoint {
    path: PathBuf,
    /// Stored storages are read from the file straight into their tensors (one copy from the
    /// page cache, and no page of the mapping made resident).
    file: File,
    map: Mmap,
    table: Table,
    /// The most bytes inflated from deflated storages in one read.
    limit: u64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.table.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Maps `path` and reads its table (the pickle, or the safetensors header): no tensor byte is
    /// read, so this takes the same time for any size of file.
    pub fn open(path: &Path, options: &ReadOptions) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            bail!("checkpoint {} is empty", path.display());
        }
        // SAFETY: the map is read-only; a file changed underneath by another process can at worst
        // produce wrong values, which the parsers bound-check.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let table = Table::parse_mapped(&map, Some(&file), options)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            map,
            table,
            limit: options.inflate_limit(),
        })
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn layout(&self) -> &Layout {
        &self.table.layout
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every tensor: each storage copied once from the file (or inflated) into a new CPU
    /// tensor, and each tensor a view of its storage, as `torch.load` gives them.
    pub fn to_state_dict(&self) -> Result<StateDict> {
        self.table
            .check_inflation(0..self.table.storages.len(), self.limit)
            .with_context(|| format!("cannot read checkpoint {}", self.path.display()))?;
        let mut storages: HashMap<usize, Tensor> = HashMap::new();
        let mut entries = Vec::with_capacity(self.table.tensors.len());
        for (name, t) in &self.table.tensors {
            let storage = match storages.entry(t.storage) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    e.insert(self.storage_tensor(t.storage).with_context(|| {
                        format!("cannot read checkpoint {}", self.path.display())
                    })?)
                }
            };
            let tensor = view(storage, t).with_context(|| format!("tensor `{name}`"))?;
            entries.push((name.clone(), tensor));
        }
        Ok(StateDict { entries })
    }

    /// A new CPU tensor holding the first `need` bytes of storage `s`: read once from the file,
    /// or inflated straight into it.
    fn storage_tensor(&self, s: usize) -> Result<Tensor> {
        let storage = &self.table.storages[s];
        let elem = storage.dtype.size();
        let tensor = Tensor::f_empty(
            [(storage.need / elem) as i64],
            (storage.dtype.kind(), Device::Cpu),
        )?;
        if storage.need > 0 {
            // SAFETY: a new contiguous CPU tensor of `need` bytes, written only here.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, storage.need)
            };
            self.fill(s, dst)?;
        }
        Ok(tensor)
    }

    /// Writes the first `dst.len()` bytes of storage `s` into `dst`: inflated, or read from the
    /// file with no intermediate buffer.
    fn fill(&self, s: usize, dst: &mut [u8]) -> Result<()> {
        let record = &self.table.storages[s].record;
        if record.deflated {
            return self.table.inflate_into(&self.map, s, dst);
        }
        self.file
            .read_exact_at(dst, record.start as u64)
            .with_context(|| format!("cannot read storage `{}`", record.name))
    }

    /// Drops the mapped pages of storage `s` from this process's memory once they are copied
    /// (the page cache keeps them), so that the mapping never doubles the resident size.
    fn release(&self, s: usize) {
        let record = &self.table.storages[s].record;
        if record.stored > 0 {
            // SAFETY: the mapping is read-only and file-backed: dropped pages read back from the
            // file, unchanged.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    record.start,
                    record.stored,
                )
            };
        }
    }

    /// Copies the tensors of storage `s` into their variables: read or inflated into the variable
    /// itself when it is the storage's only tensor and takes its bytes as they are (a contiguous
    /// CPU tensor of the same dtype); else over the mapped bytes when the storage is stored (no
    /// host copy: a CUDA variable gets them straight from the mapping), or through one new
    /// storage tensor.
    fn copy_storage(&self, s: usize, list: Vec<(usize, Tensor)>) -> Result<()> {
        let storage = &self.table.storages[s];
        let elem = storage.dtype.size();
        if storage.need == 0 {
            return Ok(());
        }
        if let [(i, dst)] = list.as_slice() {
            let t = &self.table.tensors[*i].1;
            let direct = t.is_whole(storage)
                && dst.device() == Device::Cpu
                && dst.kind() == storage.dtype.kind()
                && dst.is_contiguous();
            if direct {
                // SAFETY: `dst` is a contiguous CPU tensor of exactly `need` bytes (whole view,
                // same dtype, shapes compared).
                let out = unsafe {
                    std::slice::from_raw_parts_mut(dst.data_ptr() as *mut u8, storage.need)
                };
                return self.fill(s, out);
            }
        }
        let start = storage.record.start;
        let mapped =
            !storage.record.deflated && (self.map.as_ptr() as usize + start).is_multiple_of(elem);
        let source = if mapped {
            // SAFETY: `need` bytes from `start` lie within the mapping (checked by the table), are
            // aligned to the element, and outlive this tensor, dropped below; nothing writes them.
            unsafe {
                Tensor::f_from_blob(
                    self.map.as_ptr().add(start),
                    &[(storage.need / elem) as i64],
                    &[1],
                    storage.dtype.kind(),
                    Device::Cpu,
                )?
            }
        } else {
            self.storage_tensor(s)?
        };
        tch::no_grad(|| -> Result<()> {
            for (i, mut dst) in list {
                let (name, t) = &self.table.tensors[i];
                let src = view(&source, t).with_context(|| format!("tensor `{name}`"))?;
                dst.f_copy_(&src)
                    .with_context(|| format!("tensor `{name}`"))?;
            }
            Ok(())
        })?;
        drop(source);
        if mapped {
            self.release(s);
        }
        Ok(())
    }
}

/// The tensor `t` over its storage tensor (bounds were checked by the table; libtorch checks
/// them again).
fn view(storage: &Tensor, t: &TensorRecord) -> Result<Tensor> {
    Ok(storage.f_as_strided(&t.shape, &t.stride, Some(t.offset as i64))?)
}

impl Weights for Checkpoint {
    fn metadata(&self) -> Vec<TensorMeta<'_>> {
        self.table
            .tensors
            .iter()
            .map(|(name, t)| TensorMeta {
                name,
                shape: t.shape.clone(),
                kind: t.dtype.kind(),
            })
            .collect()
    }

    fn copy_into(&self, pairs: Vec<(usize, Tensor)>) -> Result<()> {
        let mut by_storage: BTreeMap<usize, Vec<(usize, Tensor)>> = BTreeMap::new();
        for (i, dst) in pairs {
            by_storage
                .entry(self.table.tensors[i].1.storage)
                .or_default()
                .push((i, dst));
        }
        let context = || format!("cannot read checkpoint {}", self.path.display());
        self.table
            .check_inflation(by_storage.keys().copied(), self.limit)
            .with_context(context)?;
        for (s, list) in by_storage {
            self.copy_storage(s, list).with_context(context)?;
        }
        Ok(())
    }

    fn value(&self, i: usize) -> Result<Tensor> {
        let (name, t) = &self.table.tensors[i];
        let s = t.storage;
        self.table
            .check_inflation([s], self.limit)
            .with_context(|| format!("tensor `{name}`"))?;
        Ok(view(&self.storage_tensor(s)?, t)?.contiguous())
    }
}
