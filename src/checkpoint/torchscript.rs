//! TorchScript archives (`torch.jit.save`, and tch's `.ot`, which libtorch writes the same way):
//! the state_dict of the scripted module, from the module objects in `data.pkl` and the parameter
//! and buffer names their classes declare in `code/`. The code is only scanned for those two
//! declarations; nothing is compiled or run.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use super::pickle::{entry, Object, TensorRef, Value};

/// What a scripted module class declares, in order (`__parameters__ = ["weight", "bias", ]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScriptClass {
    pub parameters: Vec<String>,
    pub buffers: Vec<String>,
}

/// The module classes an archive declares, by qualified name
/// (`__torch__.torchvision.models.resnet.ResNet`).
pub type ScriptClasses = HashMap<String, ScriptClass>;

/// `["a", "b", ]` as its strings.
fn string_list(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let name = s.strip_prefix('"')?.strip_suffix('"')?;
            (!name.contains(['"', '\\'])).then(|| name.to_string())
        })
        .collect()
}

/// Adds the module classes declared in `source`, the file `code/<module as a path>.py`.
pub fn read_declarations(module: &str, source: &str, classes: &mut ScriptClasses) -> Result<()> {
    let mut current: Option<String> = None;
    for line in source.lines() {
        if let Some(rest) = line.strip_prefix("class ") {
            let name = rest.split(['(', ':']).next().unwrap_or_default().trim();
            current = Some(format!("{module}.{name}"));
            continue;
        }
        if !line.starts_with(' ') {
            current = None;
            continue;
        }
        let Some(class) = &current else { continue };
        let line = line.trim();
        for (field, parameters) in [("__parameters__ = ", true), ("__buffers__ = ", false)] {
            if let Some(list) = line.strip_prefix(field) {
                let names = string_list(list)
                    .with_context(|| format!("cannot read `{line}` of class {class}"))?;
                let declared = classes.entry(class.clone()).or_default();
                if parameters {
                    declared.parameters = names;
                } else {
                    declared.buffers = names;
                }
            }
        }
    }
    Ok(())
}

/// The state_dict `scripted.state_dict()` gives: each module's parameters, then its buffers (all
/// of them: TorchScript keeps non-persistent buffers too), then its submodules' entries under
/// `name.`, in attribute order; `None` entries are skipped. tch's `|` in names becomes `.`, as tch
/// reads it. Returns the entries and the root module's class.
pub fn script_state_dict(
    root: &Value,
    classes: &ScriptClasses,
) -> Result<(Vec<(String, TensorRef)>, String)> {
    let Value::Object(module) = root else {
        bail!(
            "the TorchScript archive holds a {}, not a module",
            root.type_name()
        );
    };
    let class = classes.get(&module.class).with_context(|| {
        format!(
            "the TorchScript archive declares no module class `{}` in its code/",
            module.class
        )
    })?;
    let mut out = Vec::new();
    collect(module, class, "", classes, &mut out)?;
    Ok((out, module.class.clone()))
}

fn collect(
    module: &Object,
    class: &ScriptClass,
    prefix: &str,
    classes: &ScriptClasses,
    out: &mut Vec<(String, TensorRef)>,
) -> Result<()> {
    let attributes = module.attributes().with_context(|| {
        format!(
            "the scripted module `{prefix}` ({}) has no attributes",
            module.class
        )
    })?;
    for name in class.parameters.iter().chain(&class.buffers) {
        match entry(attributes, name) {
            Some(Value::Tensor(t)) => {
                out.push((format!("{prefix}{name}").replace('|', "."), t.clone()))
            }
            Some(Value::None) => {}
            other => bail!(
                "`{prefix}{name}` of the scripted {} is a {}, not a tensor",
                module.class,
                other.map_or("missing attribute".into(), Value::type_name)
            ),
        }
    }
    for (name, value) in attributes {
        let Value::Object(child) = value else {
            continue;
        };
        let Some(child_class) = classes.get(&child.class) else {
            continue;
        };
        let name = name
            .as_str()
            .context("a scripted module's attribute name is not a string")?;
        collect(
            child,
            child_class,
            &format!("{prefix}{name}."),
            classes,
            out,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_read_per_class() {
        let source = "class Conv2d(Module):\n  __parameters__ = [\"weight\", \"bias\", ]\n  \
                      __buffers__ = []\n  weight : Tensor\n  def forward(self: __torch__.X) -> \
                      Tensor:\n    return x\nclass Block(Module):\n  __parameters__ = []\n  \
                      __buffers__ = [\"running_mean\", ]\ndef helper(x: int) -> int:\n  \
                      __parameters__ = [\"not\", ]\n  return x\n";
        let mut classes = ScriptClasses::new();
        read_declarations("__torch__.m", source, &mut classes).unwrap();
        assert_eq!(classes.len(), 2);
        assert_eq!(
            classes["__torch__.m.Conv2d"].parameters,
            vec!["weight".to_string(), "bias".to_string()]
        );
        assert!(classes["__torch__.m.Conv2d"].buffers.is_empty());
        assert_eq!(
            classes["__torch__.m.Block"].buffers,
            vec!["running_mean".to_string()]
        );
        assert_eq!(string_list("[\"a|b\", ]"), Some(vec!["a|b".to_string()]));
        assert_eq!(string_list("[a]"), None);
        assert!(read_declarations(
            "m",
            "class A(Module):\n  __parameters__ = [x]\n",
            &mut classes
        )
        .is_err());
    }
}
