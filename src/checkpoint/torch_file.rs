//! Reading the files `torch.save` writes (the zip format of PyTorch >= 1.6 and the legacy format
//! before it) and the libtorch archives `torch.jit.save` and tch write, in pure Rust: the
//! unpickled object, and where each storage lies in the file (read by [`super::table`]).

use std::collections::HashMap;
use std::io::{Cursor, Read};

use anyhow::{bail, Context, Result};

use super::formats::{open_zip, sniff, Format};
use super::pickle::{self, Value};
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
    let file = archive
        .by_name(name)
        .with_context(|| format!("cannot open {name}"))?;
    // Refused on its header's word first; the `take` bounds a header that lies.
    if file.size() > limit {
        bail!(
            "{name} holds more than {limit} bytes (its zip header says {})",
            file.size()
        );
    }
    file.take(limit + 1)
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

/// Where a storage's bytes lie in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's name: its zip entry (`archive/data/0`), or the legacy storage key.
    pub name: String,
    /// Offset of its first byte in the file.
    pub start: usize,
    /// Bytes it takes in the file.
    pub stored: usize,
    /// Bytes it holds: `stored`, or what its zip header says it inflates to.
    pub len: usize,
    /// A deflated zip entry (written by zip tools other than `torch.save`).
    pub deflated: bool,
}

/// A parsed `torch.save` file or libtorch archive: the unpickled object and the storages its
/// tensors point into.
pub struct TorchFile<'a> {
    pub format: Format,
    pub object: Value,
    /// The module classes a libtorch archive declares (empty for `torch.save` files).
    pub script_classes: ScriptClasses,
    storages: Storages<'a>,
    /// Bytes in the file.
    size: usize,
    bytes: &'a [u8],
    /// The file `bytes` maps, where there is one: storage headers are read from it.
    file: Option<&'a std::fs::File>,
}

enum Storages<'a> {
    Zip {
        archive: zip::ZipArchive<Cursor<&'a [u8]>>,
        prefix: String,
    },
    Legacy(HashMap<String, Record>),
}

impl<'a> TorchFile<'a> {
    /// Parses a file in either torch.save format, or a libtorch archive.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        Self::parse_mapped(bytes, None)
    }

    /// [`parse`](Self::parse) of `bytes` mapped from `file`, which storage headers are read
    /// from.
    pub fn parse_mapped(bytes: &'a [u8], file: Option<&'a std::fs::File>) -> Result<Self> {
        let mut parsed = Self::parse_format(bytes)?;
        parsed.file = file;
        Ok(parsed)
    }

    fn parse_format(bytes: &'a [u8]) -> Result<Self> {
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
            storages: Storages::Zip { archive, prefix },
            size: bytes.len(),
            bytes,
            file: None,
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
            let record = Record {
                name: key.clone(),
                start,
                stored: data.len(),
                len: data.len(),
                deflated: false,
            };
            records.insert(key, record);
            pos = start + len;
        }
        Ok(Self {
            format: Format::TorchLegacy,
            object,
            script_classes: ScriptClasses::new(),
            storages: Storages::Legacy(records),
            size: bytes.len(),
            bytes,
            file: None,
        })
    }

    /// Where the storage `key` lies in the file, without reading it.
    pub fn record(&mut self, key: &str) -> Result<Record> {
        match &mut self.storages {
            Storages::Legacy(records) => records
                .get(key)
                .cloned()
                .with_context(|| format!("the file has no storage `{key}`")),
            Storages::Zip { archive, prefix } => {
                let name = format!("{prefix}data/{key}");
                let index = archive
                    .index_for_name(&name)
                    .with_context(|| format!("the archive has no storage record `{name}`"))?;
                let file = archive
                    .by_index_data(index)
                    .with_context(|| format!("cannot open storage record `{name}`"))?;
                // The local header gives where the data starts. It is read alone (from the file
                // when there is one): touching it through a mapping would map the pages around it,
                // and a checkpoint's headers are spread over all of it.
                let mut header = [0u8; 30];
                let at = file.header_start();
                match self.file {
                    Some(f) => std::os::unix::fs::FileExt::read_exact_at(f, &mut header, at)
                        .with_context(|| format!("cannot read the header of `{name}`"))?,
                    None => header.copy_from_slice(
                        usize::try_from(at)
                            .ok()
                            .and_then(|at| self.bytes.get(at..at.checked_add(30)?))
                            .with_context(|| format!("the header of `{name}` is past the end"))?,
                    ),
                }
                if header[..4] != [0x50, 0x4b, 0x03, 0x04] {
                    bail!("storage record `{name}` has no local header where the directory says");
                }
                let variable = u16::from_le_bytes([header[26], header[27]]) as u64
                    + u16::from_le_bytes([header[28], header[29]]) as u64;
                let start = at + 30 + variable;
                let deflated = match file.compression() {
                    zip::CompressionMethod::Stored => false,
                    zip::CompressionMethod::Deflated => true,
                    other => bail!("storage record `{name}` is compressed with {other}, which is not supported"),
                };
                let (stored, len) = (file.compressed_size(), file.size());
                if !deflated && stored != len {
                    bail!("storage record `{name}` is stored with {stored} bytes but says it holds {len}");
                }
                let fits = start
                    .checked_add(stored)
                    .is_some_and(|end| end <= self.size as u64);
                if !fits {
                    bail!("storage record `{name}` reaches past the end of the file");
                }
                Ok(Record {
                    name,
                    start: start as usize,
                    stored: stored as usize,
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                    deflated,
                })
            }
        }
    }
}

pub(crate) fn is_contiguous(size: &[i64], stride: &[i64]) -> bool {
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
