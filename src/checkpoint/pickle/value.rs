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

/// An instance of a class the reader does not run (`argparse.Namespace`, an `nn.Module`, a user's
/// class): what the pickle gave it, kept as data. Nothing can call it or look anything up on it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object {
    /// `module.qualname`, as the pickle names the class.
    pub class: String,
    /// Positional arguments of its construction (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `INST`, `OBJ`).
    pub args: Vec<Value>,
    /// Keyword arguments of its construction (`NEWOBJ_EX`).
    pub kwargs: Vec<(Value, Value)>,
    /// What `BUILD` gave it: its `__dict__` (updates merged) or its `__setstate__` argument.
    pub state: Option<Value>,
    /// Items appended to it (`APPEND`, `APPENDS`, `ADDITEMS`): a list or set subclass.
    pub items: Vec<Value>,
    /// Entries set on it (`SETITEM`, `SETITEMS`): a dict subclass, in insertion order.
    pub entries: Vec<(Value, Value)>,
}

impl Object {
    pub fn new(class: String, args: Vec<Value>) -> Self {
        Self {
            class,
            args,
            ..Self::default()
        }
    }

    /// Its `__dict__`, where `BUILD` gave it one.
    pub fn attributes(&self) -> Option<&[(Value, Value)]> {
        match &self.state {
            Some(Value::Dict(attributes)) => Some(attributes),
            _ => None,
        }
    }

    pub fn attribute(&self, name: &str) -> Option<&Value> {
        entry(self.attributes()?, name)
    }
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
    /// Lists, and sets and frozensets in the order the pickle lists their members.
    List(Vec<Value>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A global (`module`, `qualname`) not yet called: one of the functions the reader implements
    /// (tensor rebuilders, `OrderedDict`, ...) or any other name, which calling only records.
    Global(String, String),
    /// A persistent id not yet resolved.
    PersistentId(Box<Value>),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An instance of a class the reader does not run (`torch.Size`, `argparse.Namespace`, ...).
    Object(Box<Object>),
}

/// The value under the string key `key`.
pub fn entry<'v>(entries: &'v [(Value, Value)], key: &str) -> Option<&'v Value> {
    entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A tuple or list of integers, or a `torch.Size` of one.
    pub(crate) fn ints(&self, what: &str) -> Result<Vec<i64>> {
        match self {
            Value::Tuple(items) | Value::List(items) => items
                .iter()
                .map(|v| {
                    v.as_int()
                        .with_context(|| format!("{what}: not an integer: {v:?}"))
                })
                .collect(),
            Value::Object(o) if o.class == "torch.Size" && o.args.len() == 1 => {
                o.args[0].ints(what)
            }
            other => bail!("{what}: expected a tuple of integers, got {other:?}"),
        }
    }

    /// The values this one holds directly (a dict's keys and values, an object's arguments and
    /// state, ...).
    pub fn children(&self) -> Box<dyn Iterator<Item = &Value> + '_> {
        match self {
            Value::Tuple(items) | Value::List(items) => Box::new(items.iter()),
            Value::Dict(entries) => Box::new(entries.iter().flat_map(|(k, v)| [k, v])),
            Value::PersistentId(inner) => Box::new(std::iter::once(inner.as_ref())),
            Value::Object(o) => Box::new(
                o.args
                    .iter()
                    .chain(o.kwargs.iter().flat_map(|(k, v)| [k, v]))
                    .chain(o.state.iter())
                    .chain(o.items.iter())
                    .chain(o.entries.iter().flat_map(|(k, v)| [k, v])),
            ),
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

    /// [`kind`](Self::kind), with the class of an object (`argparse.Namespace`) and the name of a
    /// global.
    pub fn type_name(&self) -> String {
        match self {
            Value::Object(o) => o.class.clone(),
            Value::Global(module, name) => format!("{module}.{name}"),
            other => other.kind().to_string(),
        }
    }
}
