//! The values the restricted unpickler builds.

use anyhow::{bail, Context, Result};

use crate::checkpoint::DType;

/// A storage reference from a persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub dtype: DType,
    pub key: String,
    pub location: String,
    pub numel: i64,
    /// Legacy (pre-1.6) files can reference a view of a storage: `(view_key, offset, numel)`.
    pub view: Option<(String, i64, i64)>,
}

/// A tensor record: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// A value of the restricted pickle language.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An allowed global not yet called (a class or function).
    Global(String, String),
    /// A persistent id not yet resolved.
    PersistentId(Box<Value>),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// `torch.Size`, `torch.device` and similar plain records, kept as their arguments.
    Object(String, Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub(super) fn ints(&self, what: &str) -> Result<Vec<i64>> {
        match self {
            Value::Tuple(items) | Value::List(items) | Value::Object(_, items) => items
                .iter()
                .map(|v| {
                    v.as_int()
                        .with_context(|| format!("{what}: not an integer: {v:?}"))
                })
                .collect(),
            other => bail!("{what}: expected a tuple of integers, got {other:?}"),
        }
    }

    /// The values this one holds directly (a dict's keys and values, a tuple's items, ...).
    pub fn children(&self) -> Box<dyn Iterator<Item = &Value> + '_> {
        match self {
            Value::Tuple(items) | Value::List(items) | Value::Object(_, items) => {
                Box::new(items.iter())
            }
            Value::Dict(entries) => Box::new(entries.iter().flat_map(|(k, v)| [k, v])),
            Value::PersistentId(inner) => Box::new(std::iter::once(inner.as_ref())),
            _ => Box::new(std::iter::empty()),
        }
    }

    /// A short description for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(..) => "class",
            Value::PersistentId(_) => "persistent id",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Object(..) => "object",
        }
    }
}
