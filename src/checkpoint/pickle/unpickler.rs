//! The restricted unpickler: a stack machine over the data opcodes, with bounded memory.
//!
//! Classes are never looked up and nothing is called: `REDUCE`, `NEWOBJ` and `BUILD` either run
//! one of the functions [`globals`](super::globals) implements or record their arguments in an
//! inert [`Object`]. An `Object` cannot be called or instantiated by any opcode.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};

use super::globals::{call, new_object, persistent_load, refused};
use super::opcodes::*;
use super::value::{Object, Value};

/// Bounds what a hostile file can make the reader allocate or hold: stack and memo sizes, the
/// nesting depth of values (deeper values could overflow the native stack when dropped), and the
/// number of nodes copied into and out of the memo (repeated `BINGET` of a growing list doubles
/// it).
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
const MAX_DEPTH: usize = 256;
const MAX_COPIED: usize = 1 << 21;

/// Unpickles one pickle from `data`; returns the value and the number of bytes read.
pub fn unpickle(data: &[u8]) -> Result<(Value, usize)> {
    Unpickler {
        input: Reader { data, pos: 0 },
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        pending: Vec::new(),
        fetched: fetched_memo_keys(data),
        copied: 0,
    }
    .run()
}

/// An opcode's inline argument.
enum Arg<'a> {
    None,
    Int(i64),
    Float(f64),
    Bytes(&'a [u8]),
    /// `module` and `name` of `GLOBAL` and `INST`.
    Lines(&'a str, &'a str),
}

/// Reads opcodes and their inline arguments, in the encodings of CPython's `pickletools`.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len());
        let end = end
            .with_context(|| format!("pickle truncated at byte {} (wanted {n} more)", self.pos))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into()?)
    }

    /// `n` bytes after an `N`-byte little-endian length.
    fn counted<const N: usize>(&mut self) -> Result<&'a [u8]> {
        let mut len = [0u8; 8];
        len[..N].copy_from_slice(&self.array::<N>()?);
        let n = usize::try_from(u64::from_le_bytes(len)).context("length overflows")?;
        self.take(n)
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

    fn op(&mut self) -> Result<(u8, Arg<'a>)> {
        let op = self.array::<1>().context("pickle ended without STOP")?[0];
        let arg = match op {
            PROTO | BININT1 | BINGET | BINPUT => Arg::Int(self.array::<1>()?[0] as i64),
            BININT2 => Arg::Int(u16::from_le_bytes(self.array()?) as i64),
            BININT => Arg::Int(i32::from_le_bytes(self.array()?) as i64),
            LONG_BINGET | LONG_BINPUT => Arg::Int(u32::from_le_bytes(self.array()?) as i64),
            FRAME => {
                self.array::<8>()?; // the length of the next frame; frames are read inline.
                Arg::None
            }
            BINFLOAT => Arg::Float(f64::from_be_bytes(self.array()?)),
            LONG1 | SHORT_BINUNICODE | SHORT_BINSTRING | SHORT_BINBYTES => {
                Arg::Bytes(self.counted::<1>()?)
            }
            LONG4 | BINUNICODE | BINSTRING | BINBYTES => Arg::Bytes(self.counted::<4>()?),
            BINUNICODE8 | BINBYTES8 | BYTEARRAY8 => Arg::Bytes(self.counted::<8>()?),
            GLOBAL | INST => Arg::Lines(self.line()?, self.line()?),
            _ => Arg::None,
        };
        Ok((op, arg))
    }
}

/// The memo keys that `BINGET` / `LONG_BINGET` read, from a first pass over the opcodes: only
/// those values are kept in the memo. (The pass reads as the unpickler does, so it stops at the
/// same place on a malformed pickle.)
fn fetched_memo_keys(data: &[u8]) -> HashSet<u32> {
    let mut input = Reader { data, pos: 0 };
    let mut keys = HashSet::new();
    while let Ok((op, arg)) = input.op() {
        match (op, arg) {
            (STOP, _) => break,
            (BINGET | LONG_BINGET, Arg::Int(i)) => {
                keys.insert(i as u32);
            }
            _ => {}
        }
    }
    keys
}

/// A memo slot.
enum Memo {
    /// Written but never read by the pickle: nothing is kept.
    Unread,
    /// The object at this stack index: it may still be filled (`SETITEMS`, `BUILD`, ...), so it
    /// is copied into the memo only when it leaves the stack, as Python's memo would alias it.
    OnStack(usize),
    Value(Value),
}

struct Unpickler<'a> {
    input: Reader<'a>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Memo>,
    /// `(stack index, memo key)` of the [`Memo::OnStack`] slots, by stack index.
    pending: Vec<(usize, u32)>,
    fetched: HashSet<u32>,
    copied: usize,
}

/// Whether `v` nests at most `limit` levels deep (recursion bounded by `limit`).
fn within_depth(v: &Value, limit: usize) -> bool {
    limit > 0 && v.children().all(|c| within_depth(c, limit - 1))
}

/// Nodes in `v`, counting no further than `cap`.
fn nodes(v: &Value, cap: usize) -> usize {
    let mut n = 1;
    for child in v.children() {
        if n >= cap {
            break;
        }
        n += nodes(child, cap - n);
    }
    n
}

/// Refuses values nested deeper than `limit` levels.
fn check_depth(v: &Value, limit: usize) -> Result<()> {
    if !within_depth(v, limit) {
        bail!("pickle nests values more than {MAX_DEPTH} levels deep");
    }
    Ok(())
}

/// For values put inside a container already on the stack (APPEND, SETITEMS, BUILD, ...).
fn check_child(v: &Value) -> Result<()> {
    check_depth(v, MAX_DEPTH - 1)
}

/// `SETITEM(S)` and `DICT`: sets `items` (key, value, key, value, ...) on a dict or on an object
/// of a dict subclass, replacing equal keys as a dict does.
fn set_items(target: &mut Value, items: Vec<Value>) -> Result<()> {
    items.iter().try_for_each(check_child)?;
    let entries = match target {
        Value::Dict(entries) => entries,
        Value::Object(o) => &mut o.entries,
        other => bail!("SETITEMS on a {}, expected a dict", other.kind()),
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

/// `APPEND(S)` and `ADDITEMS`: on a list (or set), or an object of a list or set subclass.
fn append(target: &mut Value, items: Vec<Value>, op: &str) -> Result<()> {
    items.iter().try_for_each(check_child)?;
    match target {
        Value::List(list) => list.extend(items),
        Value::Object(o) => o.items.extend(items),
        other => bail!("{op} to a {}", other.kind()),
    }
    Ok(())
}

/// `BUILD`: gives `state` to the object below it. An inert object records it (a `__dict__` update
/// is merged into the one it has); tensors (a Parameter's `__dict__`) and dicts (a state_dict's
/// `_metadata`) carry none that matters for weights, and it is dropped.
fn build(target: &mut Value, state: Value) -> Result<()> {
    check_child(&state)?;
    match target {
        Value::Object(o) => build_object(o, state),
        Value::Global(module, name) => bail!("BUILD on the class `{module}.{name}`"),
        _ => {}
    }
    Ok(())
}

fn build_object(o: &mut Object, state: Value) {
    match (&mut o.state, state) {
        (Some(Value::Dict(old)), Value::Dict(new)) => {
            for (k, v) in new {
                match old.iter_mut().find(|(existing, _)| *existing == k) {
                    Some(slot) => slot.1 = v,
                    None => old.push((k, v)),
                }
            }
        }
        (slot, state) => *slot = Some(state),
    }
}

fn check_global(module: &str, name: &str) -> Result<()> {
    if refused(module, name) {
        bail!(
            "refusing global `{module}.{name}`: it can run code, and a checkpoint never needs it"
        );
    }
    Ok(())
}

/// The class or function a construction opcode names: only a global, never an object.
fn callable(v: Value, op: &str, at: usize) -> Result<(String, String)> {
    match v {
        Value::Global(module, name) => Ok((module, name)),
        other => bail!(
            "{op} on a {} at byte {at}: only globals can be called",
            other.type_name()
        ),
    }
}

impl Unpickler<'_> {
    fn push(&mut self, v: Value) -> Result<()> {
        check_depth(&v, MAX_DEPTH)?;
        if self.stack.len() >= MAX_STACK {
            bail!("pickle stack exceeds {MAX_STACK} entries");
        }
        self.stack.push(v);
        Ok(())
    }

    fn count_copies(&mut self, v: &Value) -> Result<()> {
        self.copied += nodes(v, MAX_COPIED);
        if self.copied > MAX_COPIED {
            bail!("pickle copies more than {MAX_COPIED} values into or out of its memo");
        }
        Ok(())
    }

    /// Copies the memoised objects at stack index `len` and above into the memo, before they leave
    /// the stack (they are complete then).
    fn settle_memo(&mut self, len: usize) -> Result<()> {
        while let Some(&(index, key)) = self.pending.last() {
            if index < len {
                break;
            }
            self.pending.pop();
            if matches!(self.memo.get(&key), Some(Memo::OnStack(i)) if *i == index) {
                let v = self.stack[index].clone();
                self.count_copies(&v)?;
                self.memo.insert(key, Memo::Value(v));
            }
        }
        Ok(())
    }

    /// Removes the stack from `len` on.
    fn truncate(&mut self, len: usize) -> Result<Vec<Value>> {
        self.settle_memo(len)?;
        Ok(self.stack.split_off(len))
    }

    fn pop(&mut self) -> Result<Value> {
        let at = self.input.pos;
        if self.marks.last().is_some_and(|m| *m >= self.stack.len()) {
            bail!("pickle pops across a MARK at byte {at}");
        }
        let len = self
            .stack
            .len()
            .checked_sub(1)
            .with_context(|| format!("pickle stack underflow at byte {at}"))?;
        self.settle_memo(len)?;
        self.stack.pop().context("pickle stack underflow")
    }

    fn top(&mut self) -> Result<&mut Value> {
        let at = self.input.pos;
        self.stack
            .last_mut()
            .with_context(|| format!("pickle stack empty at byte {at}"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.input.pos;
        let mark = self
            .marks
            .pop()
            .with_context(|| format!("no MARK before byte {at}"))?;
        if mark > self.stack.len() {
            bail!("corrupt MARK at byte {at}");
        }
        self.truncate(mark)
    }

    fn memo_get(&mut self, key: u32) -> Result<Value> {
        let v = match self.memo.get(&key) {
            Some(Memo::Value(v)) => v.clone(),
            Some(Memo::OnStack(index)) => self.stack.get(*index).cloned().unwrap_or(Value::None),
            _ => bail!("memo entry {key} read before it was written"),
        };
        self.count_copies(&v)?;
        Ok(v)
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            bail!("pickle memo exceeds {MAX_MEMO} entries");
        }
        let index = self
            .stack
            .len()
            .checked_sub(1)
            .context("MEMOIZE/PUT on an empty stack")?;
        if self.fetched.contains(&key) {
            self.memo.insert(key, Memo::OnStack(index));
            self.pending.push((index, key));
        } else {
            self.memo.insert(key, Memo::Unread);
        }
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        check_global(module, name)?;
        self.push(Value::Global(module.to_string(), name.to_string()))
    }

    fn run(mut self) -> Result<(Value, usize)> {
        loop {
            let at = self.input.pos;
            match self.input.op()? {
                (PROTO, Arg::Int(protocol)) => {
                    if protocol > HIGHEST_PROTOCOL as i64 {
                        bail!("unsupported pickle protocol {protocol}");
                    }
                }
                (FRAME, _) => {}
                (STOP, _) => {
                    let value = self.pop()?;
                    return Ok((value, self.input.pos));
                }
                (MARK, _) => self.marks.push(self.stack.len()),
                (POP_MARK, _) => {
                    self.pop_mark()?;
                }
                (NONE, _) => self.push(Value::None)?,
                (NEWTRUE, _) => self.push(Value::Bool(true))?,
                (NEWFALSE, _) => self.push(Value::Bool(false))?,
                (BININT | BININT1 | BININT2, Arg::Int(i)) => self.push(Value::Int(i))?,
                (LONG1 | LONG4, Arg::Bytes(bytes)) => {
                    let v = if bytes.len() > 8 {
                        Value::BigInt(bytes.to_vec())
                    } else {
                        let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
                        let mut buf = [if negative { 0xff } else { 0 }; 8];
                        buf[..bytes.len()].copy_from_slice(bytes);
                        Value::Int(i64::from_le_bytes(buf))
                    };
                    self.push(v)?
                }
                (BINFLOAT, Arg::Float(v)) => self.push(Value::Float(v))?,
                (BINUNICODE | SHORT_BINUNICODE | BINUNICODE8, Arg::Bytes(bytes)) => {
                    let s = std::str::from_utf8(bytes).context("string is not UTF-8")?;
                    self.push(Value::Str(s.to_string()))?
                }
                // Python 2 `str`, as protocol 2 writes it: latin-1.
                (SHORT_BINSTRING | BINSTRING, Arg::Bytes(bytes)) => {
                    self.push(Value::Str(bytes.iter().map(|b| *b as char).collect()))?
                }
                (SHORT_BINBYTES | BINBYTES | BINBYTES8 | BYTEARRAY8, Arg::Bytes(bytes)) => {
                    self.push(Value::Bytes(bytes.to_vec()))?
                }
                (EMPTY_TUPLE, _) => self.push(Value::Tuple(Vec::new()))?,
                (TUPLE, _) => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                (op @ (TUPLE1 | TUPLE2 | TUPLE3), _) => {
                    let n = (op - TUPLE1 + 1) as usize;
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|m| *m > self.stack.len() - n)
                    {
                        bail!("TUPLE{n} without {n} values at byte {at}");
                    }
                    let items = self.truncate(self.stack.len() - n)?;
                    self.push(Value::Tuple(items))?
                }
                (EMPTY_LIST | EMPTY_SET, _) => self.push(Value::List(Vec::new()))?,
                (LIST | FROZENSET, _) => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                (EMPTY_DICT, _) => self.push(Value::Dict(Vec::new()))?,
                (DICT, _) => {
                    let items = self.pop_mark()?;
                    let mut dict = Value::Dict(Vec::new());
                    set_items(&mut dict, items)?;
                    self.push(dict)?
                }
                (APPEND, _) => {
                    let v = self.pop()?;
                    append(self.top()?, vec![v], "APPEND")
                        .with_context(|| format!("at byte {at}"))?
                }
                (APPENDS | ADDITEMS, _) => {
                    let items = self.pop_mark()?;
                    append(self.top()?, items, "APPENDS")
                        .with_context(|| format!("at byte {at}"))?
                }
                (SETITEM, _) => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    set_items(self.top()?, vec![k, v])?
                }
                (SETITEMS, _) => {
                    let items = self.pop_mark()?;
                    set_items(self.top()?, items)?
                }
                (GLOBAL, Arg::Lines(module, name)) => self.global(module, name)?,
                (STACK_GLOBAL, _) => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => bail!("STACK_GLOBAL needs two strings at byte {at}"),
                    }
                }
                (REDUCE, _) => {
                    let args = self.pop()?;
                    let (module, name) = callable(self.pop()?, "REDUCE", at)?;
                    let Value::Tuple(args) = args else {
                        bail!(
                            "{module}.{name} called with a {}, expected a tuple",
                            args.kind()
                        );
                    };
                    let v = call(&module, &name, args)?;
                    self.push(v)?
                }
                (INST, Arg::Lines(module, name)) => {
                    check_global(module, name)?;
                    let args = self.pop_mark()?;
                    let v = call(module, name, args)?;
                    self.push(v)?
                }
                (OBJ, _) => {
                    let mut args = self.pop_mark()?.into_iter();
                    let class = args.next().context("OBJ without a class")?;
                    let (module, name) = callable(class, "OBJ", at)?;
                    let v = call(&module, &name, args.collect())?;
                    self.push(v)?
                }
                (op @ (NEWOBJ | NEWOBJ_EX), _) => {
                    let kwargs = match op {
                        NEWOBJ_EX => match self.pop()? {
                            Value::Dict(kwargs) => kwargs,
                            other => bail!("NEWOBJ_EX keywords are a {}", other.kind()),
                        },
                        _ => Vec::new(),
                    };
                    let args = match self.pop()? {
                        Value::Tuple(args) => args,
                        other => bail!("NEWOBJ arguments are a {}", other.kind()),
                    };
                    let (module, name) = callable(self.pop()?, "NEWOBJ", at)?;
                    let v = new_object(&module, &name, args, kwargs)?;
                    self.push(v)?
                }
                (BUILD, _) => {
                    let state = self.pop()?;
                    build(self.top()?, state).with_context(|| format!("at byte {at}"))?
                }
                (BINPERSID, _) => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    self.push(v)?
                }
                (BINPUT | LONG_BINPUT, Arg::Int(key)) => self.memo_put(key as u32)?,
                (MEMOIZE, _) => self.memo_put(self.memo.len() as u32)?,
                (BINGET | LONG_BINGET, Arg::Int(key)) => {
                    let v = self.memo_get(key as u32)?;
                    self.push(v)?
                }
                (POP, _) => {
                    self.pop()?;
                }
                (DUP, _) => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                (other, _) => {
                    bail!("unsupported or forbidden pickle opcode 0x{other:02x} at byte {at}")
                }
            }
        }
    }
}
