//! Typed model configs: a JSON object tagged by `"arch"`, one builder from config to model.
//!
//! ```json
//! {"arch": "conv_sds_head", "n_layers": 5, "input_size": 512, "hidden_size": 768, "num_labels": 2}
//! {"arch": "sid_classifier", "num_categories_list": [3, 7], "num_numerical_features": 4, ...}
//! ```
//! Unknown fields and impossible values are rejected with a message naming the field.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn;

use crate::models::conv_sds::{ConvSdsHead, ConvSdsHeadConfig, ConvSdsLayer, ConvSdsLayerConfig};
use crate::models::sid::{SidClassifier, SidConfig, SidResidualBlock, SidResidualBlockConfig};
use crate::models::Model;

/// Every buildable model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum ModelConfig {
    /// `ConvSDSHead`, the seed's question-answering head.
    ConvSdsHead(ConvSdsHeadConfig),
    /// `ConvSDSLayer` alone.
    ConvSdsLayer(ConvSdsLayerConfig),
    /// `SiDClassifier`, the full SiD model.
    SidClassifier(SidConfig),
    /// `SiDResidualBlock` alone.
    SidResidualBlock(SidResidualBlockConfig),
}

fn positive(field: &str, value: i64) -> Result<()> {
    if value < 1 {
        bail!("{field}: must be at least 1, got {value}");
    }
    Ok(())
}

impl ModelConfig {
    /// Parses a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).context("invalid model config")?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from a JSON value (e.g. a manifest entry).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let config: Self = serde_json::from_value(value).context("invalid model config")?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in config {}", path.display()))
    }

    /// The `arch` tag.
    pub fn arch(&self) -> &'static str {
        match self {
            Self::ConvSdsHead(_) => "conv_sds_head",
            Self::ConvSdsLayer(_) => "conv_sds_layer",
            Self::SidClassifier(_) => "sid_classifier",
            Self::SidResidualBlock(_) => "sid_residual_block",
        }
    }

    /// Checks every field; errors name the field (`conv_sds_head.input_size: ...`).
    pub fn validate(&self) -> Result<()> {
        let checked = match self {
            Self::ConvSdsHead(c) => positive("n_layers", c.n_layers)
                .and(positive("input_size", c.input_size))
                .and(positive("hidden_size", c.hidden_size))
                .and(positive("num_labels", c.num_labels)),
            Self::ConvSdsLayer(c) => {
                positive("input_size", c.input_size).and(positive("hidden_dim", c.hidden_dim))
            }
            Self::SidClassifier(c) => c.validate().and_then(|_| match c.num_labels {
                Some(_) => Ok(()),
                None => bail!("num_labels: must be set for a classifier"),
            }),
            Self::SidResidualBlock(c) => positive("hidden_size", c.hidden_size)
                .and(positive("intermediate_size", c.intermediate_size))
                .and(match c.hidden_dropout_prob {
                    p if (0.0..1.0).contains(&p) => Ok(()),
                    p => Err(anyhow::anyhow!(
                        "hidden_dropout_prob: must be in [0, 1), got {p}"
                    )),
                }),
        };
        checked.with_context(|| format!("bad {} config", self.arch()))
    }

    /// Builds the model under `path`, its variables named like PyTorch's state_dict keys.
    pub fn build(&self, path: nn::Path) -> Result<Box<dyn Model>> {
        self.validate()?;
        Ok(match self {
            Self::ConvSdsHead(c) => Box::new(ConvSdsHead::new(path, c)),
            Self::ConvSdsLayer(c) => Box::new(ConvSdsLayer::new(path, c.input_size, c.hidden_dim)),
            Self::SidClassifier(c) => Box::new(SidClassifier::new(path, c)?),
            Self::SidResidualBlock(c) => Box::new(SidResidualBlock::from_config(path, c)),
        })
    }
}
