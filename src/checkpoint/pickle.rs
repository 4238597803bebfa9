//! A restricted unpickler for the files `torch.save` writes, and the pickler for the files this
//! crate writes back.
//!
//! It understands the opcodes of pickle protocols 2 to 5 that hold data (no `exec`-like opcodes)
//! and resolves only an allow-list of globals: `collections.OrderedDict`, `torch._utils`'s tensor
//! rebuilders, the typed storage classes, and a few plain helpers. Any other global (`os.system`,
//! `builtins.eval`, ...) fails the load with an error naming it; nothing from the file is ever
//! executed. Persistent ids (PyTorch's storages) are handed back as values for the caller to
//! resolve.
//!
//! Written for this crate: no maintained crate does this restricted job while also building
//! PyTorch's tensor records (serde-pickle refuses persistent ids and `REDUCE` of globals).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// Element types of PyTorch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// The `torch.*Storage` class name of this type.
    pub fn storage_name(self) -> &'static str {
        match self {
            DType::F64 => "DoubleStorage",
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    pub fn from_storage_name(name: &str) -> Option<Self> {
        [
            DType::F64,
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::I32,
            DType::I16,
            DType::I8,
            DType::U8,
            DType::Bool,
        ]
        .into_iter()
        .find(|d| d.storage_name() == name)
    }

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

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

    fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    fn ints(&self, what: &str) -> Result<Vec<i64>> {
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

/// The globals a checkpoint may name. Everything else is refused.
fn allowed_global(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_tensor")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
            | ("torch", "Size")
            | ("torch", "device")
            | ("builtins", "set")
            | ("builtins", "frozenset")
            | ("__builtin__", "set")
            | ("_codecs", "encode")
    ) || (module == "torch" && DType::from_storage_name(name).is_some())
}

/// Where persistent ids go: the caller turns `('storage', ...)` tuples into storage references.
fn persistent_load(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else {
        bail!("persistent id is a {}, expected a tuple", pid.kind());
    };
    match items.first().and_then(Value::as_str) {
        Some("storage") if items.len() >= 5 => {}
        _ => bail!("unsupported persistent id {items:?} (only PyTorch storages are allowed)"),
    }
    let dtype = match &items[1] {
        Value::Global(m, n) if m == "torch" => DType::from_storage_name(n)
            .with_context(|| format!("unsupported storage type torch.{n}"))?,
        other => bail!("storage type is {other:?}, expected a torch.*Storage class"),
    };
    let key = match &items[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => bail!("storage key is a {}, expected a string", other.kind()),
    };
    let location = items[3].as_str().unwrap_or("cpu").to_string();
    let numel = items[4]
        .as_int()
        .context("storage size is not an integer")?;
    if numel < 0 {
        bail!("storage {key} has negative size {numel}");
    }
    let view = match items.get(5) {
        None | Some(Value::None) => None,
        Some(Value::Tuple(v)) if v.len() == 3 => Some((
            v[0].as_str()
                .context("storage view key is not a string")?
                .to_string(),
            v[1].as_int()
                .context("storage view offset is not an integer")?,
            v[2].as_int()
                .context("storage view size is not an integer")?,
        )),
        Some(other) => bail!("unsupported storage view {other:?}"),
    };
    Ok(Value::Storage(StorageRef {
        dtype,
        key,
        location,
        numel,
        view,
    }))
}

/// Calls an allowed global with `args` (the `REDUCE` opcode).
fn call(module: &str, name: &str, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else {
        bail!(
            "{module}.{name} called with a {}, expected a tuple",
            args.kind()
        );
    };
    match (module, name) {
        ("collections", "OrderedDict") => match args.as_slice() {
            [] => Ok(Value::Dict(Vec::new())),
            [Value::List(pairs)] => pairs
                .iter()
                .map(|p| match p {
                    Value::Tuple(kv) | Value::List(kv) if kv.len() == 2 => {
                        Ok((kv[0].clone(), kv[1].clone()))
                    }
                    other => bail!("OrderedDict item is a {}, expected a pair", other.kind()),
                })
                .collect::<Result<_>>()
                .map(Value::Dict),
            _ => bail!("OrderedDict called with unsupported arguments"),
        },
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            if args.len() < 4 {
                bail!(
                    "{name} needs (storage, offset, size, stride), got {} arguments",
                    args.len()
                );
            }
            let Value::Storage(storage) = &args[0] else {
                bail!(
                    "{name}: first argument is a {}, expected a storage",
                    args[0].kind()
                );
            };
            let offset = args[1]
                .as_int()
                .context("tensor storage offset is not an integer")?;
            let size = args[2].ints("tensor size")?;
            let stride = args[3].ints("tensor stride")?;
            if size.len() != stride.len() {
                bail!(
                    "tensor has {} sizes but {} strides",
                    size.len(),
                    stride.len()
                );
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset,
                size,
                stride,
            }))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => bail!("{name}: first argument is not a tensor"),
            }
        }
        ("_codecs", "encode") => match args.first() {
            Some(Value::Str(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect())),
            _ => bail!("_codecs.encode: expected a string"),
        },
        _ => Ok(Value::Object(format!("{module}.{name}"), args)),
    }
}

/// Unpickles one pickle from `data`; returns the value and the number of bytes read.
pub fn unpickle(data: &[u8]) -> Result<(Value, usize)> {
    Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
    }
    .run()
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    copied: usize,
}

/// Bounds what a hostile file can make the reader allocate or hold: stack and memo sizes, the
/// nesting depth of values (deeper values could overflow the native stack when dropped), and the
/// number of nodes copied out of the memo (repeated `BINGET` of a growing list doubles it).
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
const MAX_DEPTH: usize = 256;
const MAX_COPIED: usize = 1 << 21;

/// Whether `v` nests at most `limit` levels deep (recursion bounded by `limit`).
fn within_depth(v: &Value, limit: usize) -> bool {
    if limit == 0 {
        return false;
    }
    match v {
        Value::Tuple(items) | Value::List(items) | Value::Object(_, items) => {
            items.iter().all(|i| within_depth(i, limit - 1))
        }
        Value::Dict(entries) => entries
            .iter()
            .all(|(k, v)| within_depth(k, limit - 1) && within_depth(v, limit - 1)),
        Value::PersistentId(inner) => within_depth(inner, limit - 1),
        _ => true,
    }
}

/// Nodes in `v`, counting no further than `cap`.
fn nodes(v: &Value, cap: usize) -> usize {
    let children = match v {
        Value::Tuple(items) | Value::List(items) | Value::Object(_, items) => {
            let mut n = 0;
            for i in items {
                n += nodes(i, cap.saturating_sub(n));
                if n >= cap {
                    break;
                }
            }
            n
        }
        Value::Dict(entries) => {
            let mut n = 0;
            for (k, v) in entries {
                n += nodes(k, cap.saturating_sub(n)) + nodes(v, cap.saturating_sub(n));
                if n >= cap {
                    break;
                }
            }
            n
        }
        _ => 0,
    };
    1 + children
}

/// For values put inside a container already on the stack (APPEND, SETITEMS, ...).
fn check_child(v: &Value) -> Result<()> {
    if !within_depth(v, MAX_DEPTH - 1) {
        bail!("pickle nests values more than {MAX_DEPTH} levels deep");
    }
    Ok(())
}

fn check_depth(v: &Value) -> Result<()> {
    if !within_depth(v, MAX_DEPTH) {
        bail!("pickle nests values more than {MAX_DEPTH} levels deep");
    }
    Ok(())
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len());
        let end = end
            .with_context(|| format!("pickle truncated at byte {} (wanted {n} more)", self.pos))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .context("pickle truncated inside a GLOBAL")?;
        let line = std::str::from_utf8(&rest[..end]).context("GLOBAL name is not UTF-8")?;
        self.pos += end + 1;
        Ok(line)
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(
            String::from_utf8(bytes.to_vec()).context("string is not UTF-8")?,
        ))
    }

    fn push(&mut self, v: Value) -> Result<()> {
        check_depth(&v)?;
        if self.stack.len() >= MAX_STACK {
            bail!("pickle stack exceeds {MAX_STACK} entries");
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|m| *m >= self.stack.len()) {
            bail!("pickle pops across a MARK at byte {}", self.pos);
        }
        self.stack
            .pop()
            .with_context(|| format!("pickle stack underflow at byte {}", self.pos))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .with_context(|| format!("pickle stack empty at byte {pos}"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .with_context(|| format!("no MARK before byte {}", self.pos))?;
        if mark > self.stack.len() {
            bail!("corrupt MARK at byte {}", self.pos);
        }
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&mut self, i: u32) -> Result<Value> {
        if let Some(v) = self.memo.get(&i) {
            self.copied += nodes(v, MAX_COPIED);
            if self.copied > MAX_COPIED {
                bail!("pickle copies more than {MAX_COPIED} values out of its memo");
            }
        }
        self.memo
            .get(&i)
            .cloned()
            .with_context(|| format!("memo entry {i} read before it was written"))
    }

    fn memo_put(&mut self, i: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            bail!("pickle memo exceeds {MAX_MEMO} entries");
        }
        let v = self
            .stack
            .last()
            .cloned()
            .context("MEMOIZE/PUT on an empty stack")?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        if !allowed_global(module, name) {
            bail!("refusing global `{module}.{name}`: a checkpoint may only hold tensors, containers and plain values");
        }
        self.push(Value::Global(module.to_string(), name.to_string()))
    }

    fn set_items(dict: &mut Value, items: Vec<Value>) -> Result<()> {
        items.iter().try_for_each(check_child)?;
        let Value::Dict(entries) = dict else {
            bail!("SETITEMS on a {}, expected a dict", dict.kind());
        };
        if !items.len().is_multiple_of(2) {
            bail!("SETITEMS with an odd number of values");
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match entries.iter_mut().find(|(existing, _)| *existing == k) {
                Some(slot) => slot.1 = v,
                None => entries.push((k, v)),
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<(Value, usize)> {
        loop {
            let at = self.pos;
            let op = self.u8().context("pickle ended without STOP")?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("unsupported pickle protocol {proto}");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: the length of the next frame; frames are read inline.
                }
                b'.' => {
                    let value = self.pop()?;
                    return Ok((value, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into()?);
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        let v = Value::BigInt(bytes.to_vec());
                        self.push(v)?;
                        continue;
                    }
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into()?);
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = usize::try_from(n).context("string length overflows")?;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    self.push(Value::Str(bytes.iter().map(|b| *b as char).collect()))?
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?;
                    self.push(Value::Str(bytes.iter().map(|b| *b as char).collect()))?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes))?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes))?
                }
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|m| *m > self.stack.len() - n)
                    {
                        bail!("TUPLE{n} without {n} values at byte {at}");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items))?
                }
                b']' => self.push(Value::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let mut dict = Value::Dict(Vec::new());
                    Self::set_items(&mut dict, items)?;
                    self.push(dict)?
                }
                b'a' => {
                    let v = self.pop()?;
                    check_child(&v)?;
                    match self.top()? {
                        Value::List(items) => items.push(v),
                        other => bail!("APPEND to a {} at byte {at}", other.kind()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    items.iter().try_for_each(check_child)?;
                    match self.top()? {
                        Value::List(list) => list.extend(items),
                        other => bail!("APPENDS to a {} at byte {at}", other.kind()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    Self::set_items(self.top()?, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    Self::set_items(self.top()?, items)?
                }
                0x8f => self.push(Value::List(Vec::new()))?, // EMPTY_SET, kept as a list
                0x90 => {
                    let items = self.pop_mark()?;
                    items.iter().try_for_each(check_child)?;
                    match self.top()? {
                        Value::List(list) => list.extend(items),
                        other => bail!("ADDITEMS to a {} at byte {at}", other.kind()),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => bail!("STACK_GLOBAL needs two strings at byte {at}"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let Value::Global(module, name) = callable else {
                        bail!(
                            "REDUCE on a {} at byte {at}: only allowed globals can be called",
                            callable.kind()
                        );
                    };
                    let v = call(&module, &name, args)?;
                    self.push(v)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let Value::Global(module, name) = class else {
                        bail!("NEWOBJ on a {} at byte {at}", class.kind());
                    };
                    let v = call(&module, &name, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: state for the object below it. Tensors and dicts carry none that
                    // matters for weights (e.g. a Parameter's `__dict__`); the state is dropped.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    self.push(v)?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                other => bail!("unsupported or forbidden pickle opcode 0x{other:02x} at byte {at}"),
            }
        }
    }
}

/// Writes the pickle (protocol 2) of an `OrderedDict` of tensors as `torch.save` does; the
/// storages are named `0`, `1`, ... in the order of `tensors`. Each tensor must be contiguous and
/// start at offset 0 of its own storage.
pub fn pickle_state_dict(tensors: &[(String, DType, Vec<i64>)]) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    let global = |out: &mut Vec<u8>, module: &str, name: &str| {
        out.push(b'c');
        out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    };
    let string = |out: &mut Vec<u8>, s: &str| {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let int = |out: &mut Vec<u8>, v: i64| {
        if (0..256).contains(&v) {
            out.extend_from_slice(&[b'K', v as u8]);
        } else if (i32::MIN as i64..=i32::MAX as i64).contains(&v) {
            out.push(b'J');
            out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            out.extend_from_slice(&[0x8a, 8]);
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    let tuple = |out: &mut Vec<u8>, values: &[i64]| {
        out.push(b'(');
        for v in values {
            int(out, *v);
        }
        out.push(b't');
    };
    let ordered_dict = |out: &mut Vec<u8>| {
        global(out, "collections", "OrderedDict");
        out.extend_from_slice(b")R");
    };
    ordered_dict(&mut out);
    out.push(b'(');
    for (i, (name, dtype, size)) in tensors.iter().enumerate() {
        string(&mut out, name);
        global(&mut out, "torch._utils", "_rebuild_tensor_v2");
        out.push(b'(');
        out.push(b'(');
        string(&mut out, "storage");
        global(&mut out, "torch", dtype.storage_name());
        string(&mut out, &i.to_string());
        string(&mut out, "cpu");
        int(&mut out, size.iter().product::<i64>());
        out.extend_from_slice(b"tQ");
        int(&mut out, 0);
        tuple(&mut out, size);
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1].max(1);
        }
        tuple(&mut out, &stride);
        out.push(0x89);
        ordered_dict(&mut out);
        out.extend_from_slice(b"tR");
    }
    out.extend_from_slice(b"u.");
    out
}
