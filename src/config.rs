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

use crate::models::cifar::{CifarResNet, CifarResNetConfig};
use crate::models::conv_sds::{ConvSdsHead, ConvSdsHeadConfig, ConvSdsLayer, ConvSdsLayerConfig};
use crate::models::resnet::{ResNet, ResNetConfig};
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
    /// torchvision's constructors; each fixes block, layers, groups and width_per_group.
    #[serde(rename = "resnet18")]
    Resnet18(ResNetConfig),
    #[serde(rename = "resnet34")]
    Resnet34(ResNetConfig),
    #[serde(rename = "resnet50")]
    Resnet50(ResNetConfig),
    #[serde(rename = "resnet101")]
    Resnet101(ResNetConfig),
    #[serde(rename = "resnet152")]
    Resnet152(ResNetConfig),
    #[serde(rename = "resnext50_32x4d")]
    Resnext50_32x4d(ResNetConfig),
    #[serde(rename = "resnext101_32x8d")]
    Resnext101_32x8d(ResNetConfig),
    #[serde(rename = "resnext101_64x4d")]
    Resnext101_64x4d(ResNetConfig),
    #[serde(rename = "wide_resnet50_2")]
    WideResnet50_2(ResNetConfig),
    #[serde(rename = "wide_resnet101_2")]
    WideResnet101_2(ResNetConfig),
    /// A ResNet given in full (`block`, `layers`, `groups`, `width_per_group`).
    #[serde(rename = "resnet")]
    Resnet(ResNetConfig),
    /// The paper's CIFAR networks (6n+2 layers).
    CifarResnet(CifarResNetConfig),
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
            Self::Resnet18(_) => "resnet18",
            Self::Resnet34(_) => "resnet34",
            Self::Resnet50(_) => "resnet50",
            Self::Resnet101(_) => "resnet101",
            Self::Resnet152(_) => "resnet152",
            Self::Resnext50_32x4d(_) => "resnext50_32x4d",
            Self::Resnext101_32x8d(_) => "resnext101_32x8d",
            Self::Resnext101_64x4d(_) => "resnext101_64x4d",
            Self::WideResnet50_2(_) => "wide_resnet50_2",
            Self::WideResnet101_2(_) => "wide_resnet101_2",
            Self::Resnet(_) => "resnet",
            Self::CifarResnet(_) => "cifar_resnet",
        }
    }

    /// The ImageNet-style ResNet config, for every ResNet arch.
    pub fn resnet(&self) -> Option<&ResNetConfig> {
        match self {
            Self::Resnet18(c)
            | Self::Resnet34(c)
            | Self::Resnet50(c)
            | Self::Resnet101(c)
            | Self::Resnet152(c)
            | Self::Resnext50_32x4d(c)
            | Self::Resnext101_32x8d(c)
            | Self::Resnext101_64x4d(c)
            | Self::WideResnet50_2(c)
            | Self::WideResnet101_2(c)
            | Self::Resnet(c) => Some(c),
            _ => None,
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
            Self::CifarResnet(c) => c.validate(),
            other => match other.resnet() {
                Some(c) => c.resolve(other.arch()).map(|_| ()),
                None => bail!("no validation for {}", other.arch()),
            },
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
            Self::CifarResnet(c) => Box::new(CifarResNet::new(path, c)?),
            other => {
                let config = other.resnet().context("every arch is built above")?;
                Box::new(ResNet::new(path, &config.resolve(other.arch())?))
            }
        })
    }
}
