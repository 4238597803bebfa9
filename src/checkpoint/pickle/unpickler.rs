//! The restricted unpickler: a stack machine over the data opcodes, with bounded memory.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use super::globals::{allowed_global, call, persistent_load};
use super::opcodes::*;
use super::value::Value;

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

/// For values put inside a container already on the stack (APPEND, SETITEMS, ...).
fn check_child(v: &Value) -> Result<()> {
    check_depth(v, MAX_DEPTH - 1)
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
        check_depth(&v, MAX_DEPTH)?;
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

    /// Pushes a string of latin-1 bytes (Python 2 `str`, as protocol 2 writes them).
    fn latin1(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?;
        self.push(Value::Str(bytes.iter().map(|b| *b as char).collect()))
    }

    fn bytes(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?.to_vec();
        self.push(Value::Bytes(bytes))
    }

    fn run(mut self) -> Result<(Value, usize)> {
        loop {
            let at = self.pos;
            let op = self.u8().context("pickle ended without STOP")?;
            match op {
                PROTO => {
                    let proto = self.u8()?;
                    if proto > HIGHEST_PROTOCOL {
                        bail!("unsupported pickle protocol {proto}");
                    }
                }
                FRAME => {
                    self.u64()?; // the length of the next frame; frames are read inline.
                }
                STOP => {
                    let value = self.pop()?;
                    return Ok((value, self.pos));
                }
                MARK => self.marks.push(self.stack.len()),
                NONE => self.push(Value::None)?,
                NEWTRUE => self.push(Value::Bool(true))?,
                NEWFALSE => self.push(Value::Bool(false))?,
                BININT => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into()?);
                    self.push(Value::Int(v as i64))?
                }
                BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                BININT2 => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                LONG1 => {
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
                BINFLOAT => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into()?);
                    self.push(Value::Float(v))?
                }
                BINUNICODE => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                SHORT_BINUNICODE => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                BINUNICODE8 => {
                    let n = self.u64()?;
                    let n = usize::try_from(n).context("string length overflows")?;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                SHORT_BINSTRING => {
                    let n = self.u8()? as usize;
                    self.latin1(n)?
                }
                BINSTRING => {
                    let n = self.u32()? as usize;
                    self.latin1(n)?
                }
                SHORT_BINBYTES => {
                    let n = self.u8()? as usize;
                    self.bytes(n)?
                }
                BINBYTES => {
                    let n = self.u32()? as usize;
                    self.bytes(n)?
                }
                EMPTY_TUPLE => self.push(Value::Tuple(Vec::new()))?,
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = (op - TUPLE1 + 1) as usize;
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|m| *m > self.stack.len() - n)
                    {
                        bail!("TUPLE{n} without {n} values at byte {at}");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items))?
                }
                EMPTY_LIST => self.push(Value::List(Vec::new()))?,
                LIST => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                EMPTY_DICT => self.push(Value::Dict(Vec::new()))?,
                DICT => {
                    let items = self.pop_mark()?;
                    let mut dict = Value::Dict(Vec::new());
                    Self::set_items(&mut dict, items)?;
                    self.push(dict)?
                }
                APPEND => {
                    let v = self.pop()?;
                    check_child(&v)?;
                    match self.top()? {
                        Value::List(items) => items.push(v),
                        other => bail!("APPEND to a {} at byte {at}", other.kind()),
                    }
                }
                APPENDS => {
                    let items = self.pop_mark()?;
                    items.iter().try_for_each(check_child)?;
                    match self.top()? {
                        Value::List(list) => list.extend(items),
                        other => bail!("APPENDS to a {} at byte {at}", other.kind()),
                    }
                }
                SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    Self::set_items(self.top()?, vec![k, v])?
                }
                SETITEMS => {
                    let items = self.pop_mark()?;
                    Self::set_items(self.top()?, items)?
                }
                EMPTY_SET => self.push(Value::List(Vec::new()))?, // kept as a list
                ADDITEMS => {
                    let items = self.pop_mark()?;
                    items.iter().try_for_each(check_child)?;
                    match self.top()? {
                        Value::List(list) => list.extend(items),
                        other => bail!("ADDITEMS to a {} at byte {at}", other.kind()),
                    }
                }
                FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => bail!("STACK_GLOBAL needs two strings at byte {at}"),
                    }
                }
                REDUCE => {
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
                NEWOBJ => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let Value::Global(module, name) = class else {
                        bail!("NEWOBJ on a {} at byte {at}", class.kind());
                    };
                    let v = call(&module, &name, args)?;
                    self.push(v)?
                }
                BUILD => {
                    // The state for the object below it. Tensors and dicts carry none that
                    // matters for weights (e.g. a Parameter's `__dict__`); the state is dropped.
                    self.pop()?;
                    self.top()?;
                }
                BINPERSID => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    self.push(v)?
                }
                BINPUT => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                MEMOIZE => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                BINGET => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                LONG_BINGET => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                POP => {
                    self.pop()?;
                }
                DUP => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                other => bail!("unsupported or forbidden pickle opcode 0x{other:02x} at byte {at}"),
            }
        }
    }
}
