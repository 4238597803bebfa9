//! Finding the weights in a checkpoint and naming them as PyTorch does: training checkpoints that
//! nest the state_dict beside optimizer states and hyper-parameters, whole-module pickles,
//! TorchScript modules, and the prefixes wrappers add (DataParallel, torch.compile, Lightning,
//! AveragedModel). [`Layout`] says what was found where, for `inspect` to report.

use std::fmt;

use anyhow::{bail, Context, Result};

use super::formats::Format;
use super::module::{is_module, module_state_dict};
use super::pickle::{entry, TensorRef, Value};
use super::torchscript::{script_state_dict, ScriptClasses};

/// Where training scripts commonly put the weights inside a checkpoint dict, in the order tried.
pub const NESTED_KEYS: [&str; 7] = [
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "ema",
    "state_dict_ema",
    "model_ema",
];

/// Prefixes stripped whenever every key has them: DataParallel / DDP and torch.compile.
pub const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// The key Lightning writes into every checkpoint.
const LIGHTNING_VERSION: &str = "pytorch-lightning_version";

/// `torch.optim.swa_utils.AveragedModel`'s counter, beside the averaged model's `module.` keys.
const AVERAGED_MODEL_COUNTER: &str = "n_averaged";

/// What held the weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Holder {
    /// A mapping of names to tensors: a `state_dict()`, safetensors.
    StateDict,
    /// `torch.save(model)`: a pickled `nn.Module` of this class, whose state_dict was rebuilt
    /// from its `_parameters`, `_buffers` and `_modules`.
    Module { class: String },
    /// `torch.jit.save` (or tch's `.ot`): a TorchScript module of this class.
    TorchScript { class: String },
}

/// Where a checkpoint's weights were and what else it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub format: Format,
    pub holder: Holder,
    /// The entries descended into to reach the weights, outermost first (`["state_dict"]`);
    /// empty when the file's top level holds them.
    pub key: Vec<String>,
    /// The other top-level entries and their types (`("args", "argparse.Namespace")`).
    pub others: Vec<(String, String)>,
    /// The Lightning version that wrote the file, for Lightning checkpoints.
    pub lightning: Option<String>,
    /// Prefixes removed from the keys, in the order removed.
    pub stripped: Vec<String>,
    /// Entries left out of the state_dict (AveragedModel's `n_averaged`).
    pub dropped: Vec<String>,
}

impl Layout {
    pub fn new(format: Format, holder: Holder) -> Self {
        Self {
            format,
            holder,
            key: Vec::new(),
            others: Vec::new(),
            lightning: None,
            stripped: Vec::new(),
            dropped: Vec::new(),
        }
    }
}

/// One line: "torch.save file, weights under `model` (a pickled nn.Module of class X); also
/// holds optimizer (dict), args (argparse.Namespace); stripped `module.`".
impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.lightning {
            Some(version) => write!(f, "Lightning {version} checkpoint")?,
            None => write!(f, "{}", self.format)?,
        }
        if !self.key.is_empty() {
            write!(f, ", weights under `{}`", self.key.join("/"))?;
        }
        match &self.holder {
            Holder::StateDict => {}
            Holder::Module { class } => write!(f, " (a pickled nn.Module of class {class})")?,
            Holder::TorchScript { class } => write!(f, " (module class {class})")?,
        }
        if !self.others.is_empty() {
            let others: Vec<String> = self
                .others
                .iter()
                .map(|(k, kind)| format!("{k} ({kind})"))
                .collect();
            write!(f, "; also holds {}", others.join(", "))?;
        }
        if !self.stripped.is_empty() {
            let stripped: Vec<String> = self.stripped.iter().map(|p| format!("`{p}`")).collect();
            write!(f, "; stripped {}", stripped.join(", "))?;
        }
        if !self.dropped.is_empty() {
            write!(f, "; left out {}", self.dropped.join(", "))?;
        }
        Ok(())
    }
}

type Refs = Vec<(String, TensorRef)>;

/// A TorchScript class name without the `___torch_mangle_N` parts that the compiler inserts
/// when one process scripts several classes of the same name (as PyTorch prints it).
fn demangle(class: &str) -> String {
    class
        .split('.')
        .filter(|part| !part.starts_with("___torch_mangle_"))
        .collect::<Vec<_>>()
        .join(".")
}

/// The entries of a dict, or of an object of a dict subclass (Lightning's `AttributeDict`).
fn dict_entries(v: &Value) -> Option<&[(Value, Value)]> {
    match v {
        Value::Dict(entries) => Some(entries),
        Value::Object(o) if !o.entries.is_empty() => Some(&o.entries),
        _ => None,
    }
}

fn is_state_dict(entries: &[(Value, Value)]) -> bool {
    !entries.is_empty()
        && entries
            .iter()
            .all(|(k, v)| matches!((k, v), (Value::Str(_), Value::Tensor(_))))
}

/// The weights `v` is, if it is a state_dict or a pickled module.
fn weights(v: &Value) -> Result<Option<(Refs, Holder)>> {
    if let Value::Object(o) = v {
        if is_module(o) {
            let refs = module_state_dict(o)
                .with_context(|| format!("in the pickled {} module", o.class))?;
            let class = o.class.clone();
            return Ok(Some((refs, Holder::Module { class })));
        }
    }
    match dict_entries(v) {
        Some(entries) if is_state_dict(entries) => {
            let refs = entries
                .iter()
                .filter_map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                    _ => None,
                })
                .collect();
            Ok(Some((refs, Holder::StateDict)))
        }
        _ => Ok(None),
    }
}

fn describe(entries: &[(Value, Value)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .take(12)
        .map(|(k, v)| {
            let key = k.as_str().unwrap_or("<non-string key>");
            format!("{key}: {}", v.type_name())
        })
        .collect();
    format!(
        "{{{}{}}}",
        items.join(", "),
        if entries.len() > 12 { ", ..." } else { "" }
    )
}

/// Finds the weights in `v`: `v` itself, else the first of [`NESTED_KEYS`] that holds them (at
/// any depth). Returns the keys descended into.
fn search(v: &Value) -> Result<(Vec<String>, Refs, Holder)> {
    if let Some((refs, holder)) = weights(v)? {
        return Ok((Vec::new(), refs, holder));
    }
    let Some(entries) = dict_entries(v) else {
        match v {
            Value::Object(o) => bail!(
                "it holds a {} object (an instance of a class the reader does not run), not a \
                 state_dict or an nn.Module",
                o.class
            ),
            other => bail!(
                "it holds a {}, not a dict of tensors or an nn.Module",
                other.type_name()
            ),
        }
    };
    for nested in NESTED_KEYS {
        if let Some(inner @ (Value::Dict(_) | Value::Object(_))) = entry(entries, nested) {
            if let Ok((mut path, refs, holder)) = search(inner) {
                path.insert(0, nested.to_string());
                return Ok((path, refs, holder));
            }
        }
    }
    let non_tensors: Vec<String> = entries
        .iter()
        .filter(|(_, v)| !matches!(v, Value::Tensor(_)))
        .take(5)
        .map(|(k, v)| format!("{} ({})", k.as_str().unwrap_or("?"), v.type_name()))
        .collect();
    bail!(
        "no state_dict found: the checkpoint is {} with non-tensor entries {non_tensors:?}; name \
         the entry holding the weights with --key (tried {NESTED_KEYS:?})",
        describe(entries)
    )
}

/// The member `name` of a dict, of an object of a dict subclass, or of an object's attributes
/// (a module's submodules first).
fn member<'v>(v: &'v Value, name: &str) -> Option<&'v Value> {
    if let Some(found) = dict_entries(v).and_then(|e| entry(e, name)) {
        return Some(found);
    }
    let Value::Object(o) = v else { return None };
    let submodule = match o.attribute("_modules") {
        Some(Value::Dict(modules)) => entry(modules, name),
        _ => None,
    };
    submodule.or_else(|| o.attribute(name))
}

/// Descends along `path` (`a/b`), then searches there.
fn descend(object: &Value, path: &str) -> Result<(Vec<String>, Refs, Holder)> {
    let mut current = object;
    let mut keys = Vec::new();
    for part in path.split('/') {
        current = member(current, part).with_context(|| match dict_entries(current) {
            Some(entries) => format!("--key {path}: no entry `{part}` in {}", describe(entries)),
            None => format!(
                "--key {path}: `{part}` is inside a {}, not a dict",
                current.type_name()
            ),
        })?;
        keys.push(part.to_string());
    }
    let (inner, refs, holder) = search(current).with_context(|| format!("under --key {path}"))?;
    keys.extend(inner);
    Ok((keys, refs, holder))
}

/// Finds the weights in the unpickled `object` of a file in `format`: under `key` (`a/b`) when
/// given, else automatically (see [`search`]). `classes` are a TorchScript archive's module
/// classes. Names are as in the file; [`rename`] then makes them PyTorch's.
pub fn locate(
    object: &Value,
    format: Format,
    classes: &ScriptClasses,
    key: Option<&str>,
) -> Result<(Refs, Layout)> {
    if format == Format::LibtorchArchive {
        if key.is_some() {
            bail!("--key does not apply to a TorchScript archive: it holds one module");
        }
        let (refs, class) = script_state_dict(object, classes)?;
        let class = demangle(&class);
        return Ok((refs, Layout::new(format, Holder::TorchScript { class })));
    }
    let (path, refs, holder) = match key {
        Some(path) => descend(object, path)?,
        None => search(object).context("cannot find the weights in the checkpoint")?,
    };
    let mut layout = Layout::new(format, holder);
    if let (Some(top), Some(first)) = (dict_entries(object), path.first()) {
        layout.others = top
            .iter()
            .filter(|(k, _)| k.as_str() != Some(first))
            .map(|(k, v)| {
                let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                (key, v.type_name())
            })
            .collect();
        layout.lightning = entry(top, LIGHTNING_VERSION)
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    layout.key = path;
    Ok((refs, layout))
}

/// The first component (`model.`) every key has, if any.
fn common_first_component<T>(entries: &[(String, T)]) -> Option<String> {
    let (first, _) = entries.first()?.0.split_once('.')?;
    let prefix = format!("{first}.");
    entries
        .iter()
        .all(|(k, _)| k.starts_with(&prefix))
        .then_some(prefix)
}

/// Renames `entries` as the model's own state_dict names them, recording what it did in
/// `layout`: drops AveragedModel's counter, strips a Lightning module's attribute (`model.`),
/// strips [`WRAPPER_PREFIXES`] and `extra` while every key has one, then `extra` from the keys
/// that have it.
pub fn rename<T>(entries: &mut Vec<(String, T)>, layout: &mut Layout, extra: &[String]) {
    let averaged = entries.len() > 1
        && entries.iter().any(|(k, _)| k == AVERAGED_MODEL_COUNTER)
        && entries
            .iter()
            .all(|(k, _)| k == AVERAGED_MODEL_COUNTER || k.starts_with("module."));
    if averaged {
        entries.retain(|(k, _)| k != AVERAGED_MODEL_COUNTER);
        layout.dropped.push(AVERAGED_MODEL_COUNTER.to_string());
    }
    if layout.lightning.is_some() && layout.key == ["state_dict"] {
        if let Some(prefix) = common_first_component(entries) {
            strip(entries, &prefix);
            layout.stripped.push(prefix);
        }
    }
    loop {
        let prefix = WRAPPER_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(extra.iter().cloned())
            .find(|p| !entries.is_empty() && entries.iter().all(|(k, _)| k.starts_with(p)));
        let Some(prefix) = prefix else { break };
        strip(entries, &prefix);
        layout.stripped.push(prefix);
    }
    for prefix in extra {
        if strip(entries, prefix) {
            layout.stripped.push(prefix.clone());
        }
    }
}

/// Strips `prefix` from the keys that have it; whether any had.
fn strip<T>(entries: &mut [(String, T)], prefix: &str) -> bool {
    let mut any = false;
    for (k, _) in entries.iter_mut() {
        if let Some(rest) = k.strip_prefix(prefix) {
            *k = rest.to_string();
            any = true;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    #[test]
    fn mangled_torchscript_class_names_read_as_pytorch_prints_them() {
        assert_eq!(
            super::demangle("__torch__.torchvision.models.resnet.___torch_mangle_169.ResNet"),
            "__torch__.torchvision.models.resnet.ResNet"
        );
        assert_eq!(super::demangle("__torch__.Net"), "__torch__.Net");
    }
}
