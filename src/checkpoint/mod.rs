//! State dicts: PyTorch key names mapped to tensors, read from files and loaded into a `VarStore`
//! by name, strictly by default, like `nn.Module.load_state_dict`.

mod load;

pub use load::{load_state_dict, LoadReport};

use std::path::Path;

use anyhow::{Context, Result};
use tch::Tensor;

/// Tensors by PyTorch state_dict key, in file order.
#[derive(Debug, Default)]
pub struct StateDict {
    pub entries: Vec<(String, Tensor)>,
}

impl StateDict {
    /// Reads a safetensors file.
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        let entries = Tensor::read_safetensors(path)
            .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
        Ok(Self { entries })
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
