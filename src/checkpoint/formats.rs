//! Checkpoint file formats, in pure Rust (no libtorch): recognising a file, safetensors read into
//! [`RawTensor`]s, and writers of safetensors and `torch.save` files that PyTorch reads back.
//! The `torch.save` reader is [`super::torch_file`].

use std::fmt;
use std::io::{Cursor, Write};

use anyhow::{bail, Context, Result};

use super::pickle;
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

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::TorchZip => "torch.save file",
            Format::LibtorchArchive => "TorchScript archive",
            Format::TorchLegacy => "torch.save file (legacy format)",
            Format::Safetensors => "safetensors file",
        })
    }
}

/// Opens a zip archive that starts at the first byte, as `torch.save` and libtorch write them.
/// (The zip crate's search for a prefix before the archive misreads some valid files.)
pub fn open_zip(bytes: &[u8]) -> zip::result::ZipResult<zip::ZipArchive<Cursor<&[u8]>>> {
    let config = zip::read::Config {
        archive_offset: zip::read::ArchiveOffset::Known(0),
    };
    zip::ZipArchive::with_config(config, Cursor::new(bytes))
}

/// Recognises a checkpoint from its content (not its name).
pub fn sniff(bytes: &[u8]) -> Result<Format> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        let libtorch = open_zip(bytes).is_ok_and(|a| {
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
    let specs: Vec<(String, DType, Vec<i64>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
        .collect();
    let data: Vec<&RawTensor> = tensors.iter().map(|(_, t)| t).collect();
    torch_zip(&pickle::pickle_state_dict(&specs), &data, archive_name)
}

/// The `torch.save` zip file of a dict of state_dicts (`{"state_dict": ..., "state_dict_ema":
/// ...}`), as bytes.
pub fn torch_zip_bytes_nested(
    groups: &[(String, Vec<(String, RawTensor)>)],
    archive_name: &str,
) -> Result<Vec<u8>> {
    let specs: Vec<pickle::SpecGroup> = groups
        .iter()
        .map(|(key, tensors)| {
            let specs = tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
                .collect();
            (key.clone(), specs)
        })
        .collect();
    let data: Vec<&RawTensor> = groups
        .iter()
        .flat_map(|(_, g)| g.iter().map(|(_, t)| t))
        .collect();
    torch_zip(
        &pickle::pickle_nested_state_dicts(&specs),
        &data,
        archive_name,
    )
}

/// The zip archive of `torch.save`: the pickle, then storage `i` holding `storages[i]`.
fn torch_zip(pickled: &[u8], storages: &[&RawTensor], archive_name: &str) -> Result<Vec<u8>> {
    use zip::write::SimpleFileOptions;
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let aligned = stored.with_alignment(64).large_file(true);
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let name = |record: &str| format!("{archive_name}/{record}");
    zip.start_file(name("data.pkl"), stored)?;
    zip.write_all(pickled)?;
    zip.start_file(name(".format_version"), stored)?;
    zip.write_all(b"1")?;
    zip.start_file(name(".storage_alignment"), stored)?;
    zip.write_all(b"64")?;
    zip.start_file(name("byteorder"), stored)?;
    zip.write_all(b"little")?;
    for (i, t) in storages.iter().enumerate() {
        zip.start_file(name(&format!("data/{i}")), aligned)?;
        zip.write_all(&t.data)?;
    }
    zip.start_file(name("version"), stored)?;
    zip.write_all(b"3\n")?;
    Ok(zip.finish()?.into_inner())
}
