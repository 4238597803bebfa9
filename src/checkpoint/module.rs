//! `torch.save(model)`: the state_dict of a pickled `nn.Module`, rebuilt from the attributes that
//! `Module.state_dict` reads, without running the module's class.

use anyhow::{bail, Context, Result};

use super::pickle::{entry, Object, TensorRef, Value};

const REGISTRIES: [&str; 3] = ["_parameters", "_buffers", "_modules"];

/// Whether `o` is a pickled `nn.Module`: its `__dict__` holds the three registries.
pub fn is_module(o: &Object) -> bool {
    o.attributes()
        .is_some_and(|a| REGISTRIES.iter().all(|r| entry(a, r).is_some()))
}

/// What `module.state_dict()` gives (PyTorch's `Module.state_dict` and `_save_to_state_dict`):
/// the module's parameters, then its persistent buffers, then each submodule's entries under
/// `name.`, in registration order; `None` entries are skipped. Hooks and `get_extra_state` are
/// code, so they are not run (a module that overrides `get_extra_state` would add
/// `_extra_state`).
pub fn module_state_dict(module: &Object) -> Result<Vec<(String, TensorRef)>> {
    let mut out = Vec::new();
    collect(module, "", &mut out)?;
    Ok(out)
}

fn collect(module: &Object, prefix: &str, out: &mut Vec<(String, TensorRef)>) -> Result<()> {
    let class = &module.class;
    let registry = |name: &str| match module.attribute(name) {
        Some(Value::Dict(entries)) => Ok(entries.as_slice()),
        other => bail!(
            "`{prefix}{name}` of the {class} module is a {}, expected a dict",
            other.map_or("missing entry".into(), Value::type_name)
        ),
    };
    let non_persistent: Vec<&str> = match module.attribute("_non_persistent_buffers_set") {
        None => Vec::new(),
        Some(Value::List(names)) => names.iter().filter_map(Value::as_str).collect(),
        Some(other) => bail!(
            "`{prefix}_non_persistent_buffers_set` of the {class} module is a {}, expected a set",
            other.type_name()
        ),
    };
    for (registry_name, skipped) in [("_parameters", &[][..]), ("_buffers", &non_persistent)] {
        for (name, value) in registry(registry_name)? {
            let name = name
                .as_str()
                .with_context(|| format!("a key of `{prefix}{registry_name}` is not a string"))?;
            match value {
                Value::Tensor(t) if !skipped.contains(&name) => {
                    out.push((format!("{prefix}{name}"), t.clone()))
                }
                Value::Tensor(_) | Value::None => {}
                other => bail!(
                    "`{prefix}{name}` in {registry_name} of the {class} module is a {}, not a \
                     tensor",
                    other.type_name()
                ),
            }
        }
    }
    for (name, value) in registry("_modules")? {
        let name = name
            .as_str()
            .with_context(|| format!("a key of `{prefix}_modules` is not a string"))?;
        match value {
            Value::None => {}
            Value::Object(child) if is_module(child) => {
                collect(child, &format!("{prefix}{name}."), out)?
            }
            other => bail!(
                "submodule `{prefix}{name}` of the {class} module is a {}, not a pickled \
                 nn.Module",
                other.type_name()
            ),
        }
    }
    Ok(())
}
