//! The pickle `torch.save` writes for a state_dict.

use super::opcodes::*;
use crate::checkpoint::DType;

/// Writes the pickle (protocol 2) of an `OrderedDict` of tensors as `torch.save` does; the
/// storages are named `0`, `1`, ... in the order of `tensors`. Each tensor must be contiguous and
/// start at offset 0 of its own storage.
pub fn pickle_state_dict(tensors: &[(String, DType, Vec<i64>)]) -> Vec<u8> {
    let mut out = vec![PROTO, 2];
    push_state_dict(&mut out, tensors, 0);
    out.push(STOP);
    out
}

/// One tensor of a pickled state_dict: its name, dtype and shape.
pub type TensorSpec = (String, DType, Vec<i64>);

/// A named state_dict of [`TensorSpec`]s (`"state_dict"`, `"state_dict_ema"`).
pub type SpecGroup = (String, Vec<TensorSpec>);

/// The pickle of a dict of state_dicts, `{"state_dict": OrderedDict, "state_dict_ema": ...}` as
/// training scripts save them; the storages are numbered on across the groups, in order.
pub fn pickle_nested_state_dicts(groups: &[SpecGroup]) -> Vec<u8> {
    let mut out = vec![PROTO, 2, EMPTY_DICT, MARK];
    let mut first = 0;
    for (key, tensors) in groups {
        push_string(&mut out, key);
        push_state_dict(&mut out, tensors, first);
        first += tensors.len();
    }
    out.extend_from_slice(&[SETITEMS, STOP]);
    out
}

fn push_string(out: &mut Vec<u8>, s: &str) {
    out.push(BINUNICODE);
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One `OrderedDict` of tensors whose storages are named from `first` on.
fn push_state_dict(out: &mut Vec<u8>, tensors: &[TensorSpec], first: usize) {
    let global = |out: &mut Vec<u8>, module: &str, name: &str| {
        out.push(GLOBAL);
        out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    };
    let string = push_string;
    let int = |out: &mut Vec<u8>, v: i64| {
        if (0..256).contains(&v) {
            out.extend_from_slice(&[BININT1, v as u8]);
        } else if (i32::MIN as i64..=i32::MAX as i64).contains(&v) {
            out.push(BININT);
            out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            out.extend_from_slice(&[LONG1, 8]);
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    let tuple = |out: &mut Vec<u8>, values: &[i64]| {
        out.push(MARK);
        for v in values {
            int(out, *v);
        }
        out.push(TUPLE);
    };
    let ordered_dict = |out: &mut Vec<u8>| {
        global(out, "collections", "OrderedDict");
        out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
    };
    ordered_dict(out);
    out.push(MARK);
    for (i, (name, dtype, size)) in tensors.iter().enumerate() {
        let i = first + i;
        string(out, name);
        global(out, "torch._utils", "_rebuild_tensor_v2");
        out.push(MARK);
        out.push(MARK);
        string(out, "storage");
        global(out, "torch", dtype.storage_name());
        string(out, &i.to_string());
        string(out, "cpu");
        int(out, size.iter().product::<i64>());
        out.extend_from_slice(&[TUPLE, BINPERSID]);
        int(out, 0);
        tuple(out, size);
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1].max(1);
        }
        tuple(out, &stride);
        out.push(NEWFALSE);
        ordered_dict(out);
        out.extend_from_slice(&[TUPLE, REDUCE]);
    }
    out.push(SETITEMS);
}
