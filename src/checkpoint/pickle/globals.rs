//! The globals a checkpoint may name, and what calling them builds: PyTorch's tensor rebuilders
//! (over the storages that persistent ids name), `OrderedDict`, and plain records.

use anyhow::{bail, Context, Result};

use super::value::{StorageRef, TensorRef, Value};
use crate::checkpoint::DType;

/// The globals a checkpoint may name. Everything else is refused.
pub(super) fn allowed_global(module: &str, name: &str) -> bool {
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
pub(super) fn persistent_load(pid: Value) -> Result<Value> {
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
pub(super) fn call(module: &str, name: &str, args: Value) -> Result<Value> {
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
