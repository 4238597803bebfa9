//! The globals a checkpoint may name and what naming them builds. PyTorch's tensor rebuilders
//! (over the storages that persistent ids name), `OrderedDict` and sets are implemented here; any
//! other class becomes an inert [`Object`] that records its arguments; the few globals that only
//! a hostile file names are refused.

use anyhow::{bail, Context, Result};

use super::value::{Object, StorageRef, TensorRef, Value};
use crate::checkpoint::DType;

/// Modules whose every global runs programs, imports code or touches files and sockets.
const REFUSED_MODULES: [&str; 15] = [
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pty",
    "ctypes",
    "marshal",
    "pickle",
    "_pickle",
    "webbrowser",
];

/// Builtins that evaluate code, reach attributes by name or open files.
const REFUSED_BUILTINS: [&str; 16] = [
    "eval",
    "exec",
    "compile",
    "open",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "exit",
    "quit",
    "help",
];

/// Globals only a hostile file names. The reader would not call them either (an unknown global
/// only becomes a placeholder), but a file that names them is refused outright, by name.
pub(super) fn refused(module: &str, name: &str) -> bool {
    let package = module.split('.').next().unwrap_or(module);
    REFUSED_MODULES.contains(&package)
        || (matches!(module, "builtins" | "__builtin__") && REFUSED_BUILTINS.contains(&name))
}

/// The globals the reader implements.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Function {
    OrderedDict,
    Set,
    /// `torch._utils._rebuild_tensor_v2` and its predecessor: a view of a storage.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(_with_state)`: an `nn.Parameter` of a tensor.
    RebuildParameter,
    /// `torch._utils._rebuild_from_type_v2`: a tensor subclass, read as the plain tensor.
    RebuildFromType,
    /// `_codecs.encode`: how protocol 2 writes `bytes`.
    Encode,
    /// `copyreg._reconstructor`: how protocols 0 and 1 write instances.
    Reconstructor,
}

fn function(module: &str, name: &str) -> Option<Function> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Function::OrderedDict,
        ("builtins" | "__builtin__", "set" | "frozenset") => Function::Set,
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Function::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Function::RebuildParameter
        }
        ("torch._utils", "_rebuild_from_type_v2") => Function::RebuildFromType,
        ("_codecs", "encode") => Function::Encode,
        ("copyreg" | "copy_reg", "_reconstructor") => Function::Reconstructor,
        _ => return None,
    })
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

/// `module.name(*args)` (`REDUCE`, `INST`, `OBJ`): the implemented functions run; any other
/// global becomes an [`Object`] recording `args`.
pub(super) fn call(module: &str, name: &str, args: Vec<Value>) -> Result<Value> {
    let Some(implemented) = function(module, name) else {
        return Ok(Value::Object(Box::new(Object::new(
            format!("{module}.{name}"),
            args,
        ))));
    };
    match implemented {
        Function::OrderedDict => match args.as_slice() {
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
        Function::Set => match args.as_slice() {
            [] => Ok(Value::List(Vec::new())),
            [Value::List(items) | Value::Tuple(items)] => Ok(Value::List(items.clone())),
            _ => bail!("{module}.{name} called with unsupported arguments"),
        },
        Function::RebuildTensor => rebuild_tensor(name, &args),
        Function::RebuildParameter => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => bail!("{name}: first argument is not a tensor"),
        },
        Function::RebuildFromType => match args.as_slice() {
            [Value::Global(m, n), _, Value::Tuple(inner), ..]
                if matches!(
                    function(m, n),
                    Some(Function::RebuildTensor | Function::RebuildParameter)
                ) =>
            {
                call(m, n, inner.clone())
            }
            _ => bail!("{name}: expected (a tensor rebuilder, type, arguments, state)"),
        },
        Function::Encode => match args.first() {
            Some(Value::Str(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect())),
            _ => bail!("_codecs.encode: expected a string"),
        },
        Function::Reconstructor => match args.as_slice() {
            [Value::Global(m, n), _base, state] => {
                let args = match state {
                    Value::None => Vec::new(),
                    state => vec![state.clone()],
                };
                new_object(m, n, args, Vec::new())
            }
            _ => bail!("copyreg._reconstructor: expected (class, base, state)"),
        },
    }
}

/// `cls.__new__(cls, *args, **kwargs)` (`NEWOBJ`, `NEWOBJ_EX`): an empty dict or set for those
/// classes, an [`Object`] for any other; functions cannot be instantiated.
pub(super) fn new_object(
    module: &str,
    name: &str,
    args: Vec<Value>,
    kwargs: Vec<(Value, Value)>,
) -> Result<Value> {
    match function(module, name) {
        None => Ok(Value::Object(Box::new(Object {
            class: format!("{module}.{name}"),
            args,
            kwargs,
            ..Object::default()
        }))),
        Some(Function::OrderedDict) => Ok(Value::Dict(Vec::new())),
        Some(Function::Set) => Ok(Value::List(Vec::new())),
        Some(_) => bail!("`{module}.{name}` is a function: it cannot be instantiated"),
    }
}

fn rebuild_tensor(name: &str, args: &[Value]) -> Result<Value> {
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
