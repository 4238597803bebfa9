//! Typed model configs: a JSON object tagged by `"arch"`, one builder from config to model.
//!
//! ```json
//! {"arch": "conv_sds_head", "n_layers": 5, "input_size": 512, "hidden_size": 768, "num_labels": 2}
//! {"arch": "sid_classifier", "num_categories_list": [3, 7], "num_numerical_features": 4, ...}
//! {"arch": "resnet50", "num_classes": 10}
//! {"arch": "timm", "name": "resnet50d", "num_classes": 10}
//! ```
//! A family is one variant whose config type validates itself; a torchvision constructor is one
//! line of [`TORCHVISION`], its name the `arch` tag; a timm constructor one line of [`TIMM`], its
//! name the `name` of `"arch": "timm"`. Unknown fields and impossible values are rejected with a
//! message naming the field.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::nn;

use crate::models::cifar::{CifarResNet, CifarResNetConfig};
use crate::models::conv_sds::{ConvSdsHead, ConvSdsHeadConfig, ConvSdsLayer, ConvSdsLayerConfig};
use crate::models::resnet::{Architecture, Constructor, ResNet, ResNetConfig, TORCHVISION};
use crate::models::sid::{SidClassifier, SidConfig, SidResidualBlock, SidResidualBlockConfig};
use crate::models::timm::{self, TIMM};
use crate::models::Model;

/// Every buildable model. serde reads and writes it through the impls below, which handle the
/// torchvision and timm constructors and leave every other `arch` to the derived code
/// (`remote = "Self"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", tag = "arch", rename_all = "snake_case")]
pub enum ModelConfig {
    /// `ConvSDSHead`, the seed's question-answering head.
    ConvSdsHead(ConvSdsHeadConfig),
    /// `ConvSDSLayer` alone.
    ConvSdsLayer(ConvSdsLayerConfig),
    /// `SiDClassifier`, the full SiD model.
    SidClassifier(SidConfig),
    /// `SiDResidualBlock` alone.
    SidResidualBlock(SidResidualBlockConfig),
    /// A ResNet given in full (`block`, `layers`, `groups`, `width_per_group`).
    Resnet(ResNetConfig),
    /// The paper's CIFAR networks (6n+2 layers).
    CifarResnet(CifarResNetConfig),
    /// A torchvision constructor (`{"arch": "resnet50", ...}`) with its keyword arguments.
    #[serde(skip)]
    Torchvision {
        constructor: &'static Constructor,
        config: ResNetConfig,
    },
    /// A timm constructor (`{"arch": "timm", "name": "resnet50d", ...}`) with its keyword
    /// arguments.
    #[serde(skip)]
    Timm {
        constructor: &'static Constructor,
        config: ResNetConfig,
    },
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut fields = serde_json::Map::deserialize(deserializer)?;
        let arch = fields
            .get("arch")
            .and_then(|a| a.as_str())
            .map(str::to_owned);
        if let Some(constructor) = arch.as_deref().and_then(Constructor::named) {
            fields.remove("arch");
            let config = ResNetConfig::deserialize(serde_json::Value::Object(fields))
                .map_err(D::Error::custom)?;
            return Ok(Self::Torchvision {
                constructor,
                config,
            });
        }
        if arch.as_deref() == Some("timm") {
            fields.remove("arch");
            let name = match fields.remove("name") {
                Some(serde_json::Value::String(name)) => name,
                Some(other) => {
                    return Err(D::Error::custom(format!(
                        "name: expected a timm model name, got {other}"
                    )))
                }
                None => return Err(D::Error::missing_field("name")),
            };
            let constructor = timm::named(&name).ok_or_else(|| {
                let names: Vec<&str> = TIMM.iter().map(|c| c.name).collect();
                D::Error::custom(format!(
                    "name: unknown timm ResNet `{name}`, expected one of: {}",
                    names.join(", ")
                ))
            })?;
            let config = ResNetConfig::deserialize(serde_json::Value::Object(fields))
                .map_err(D::Error::custom)?;
            return Ok(Self::Timm {
                constructor,
                config,
            });
        }
        ModelConfig::deserialize(serde_json::Value::Object(fields)).map_err(|e| {
            let names: Vec<&str> = TORCHVISION.iter().map(|c| c.name).collect();
            match e.to_string() {
                m if m.starts_with("unknown variant") => D::Error::custom(format!(
                    "{m}, `timm` (with a `name`), or a torchvision constructor: {}",
                    names.join(", ")
                )),
                m => D::Error::custom(m),
            }
        })
    }
}

impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tagged<'a> {
            arch: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            name: Option<&'a str>,
            #[serde(flatten)]
            config: &'a ResNetConfig,
        }
        match self {
            Self::Torchvision {
                constructor,
                config,
            } => Tagged {
                arch: constructor.name,
                name: None,
                config,
            }
            .serialize(serializer),
            Self::Timm {
                constructor,
                config,
            } => Tagged {
                arch: "timm",
                name: Some(constructor.name),
                config,
            }
            .serialize(serializer),
            other => ModelConfig::serialize(other, serializer),
        }
    }
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

    /// The torchvision constructor `name` with `config` as its keyword arguments.
    pub fn torchvision(name: &str, config: ResNetConfig) -> Option<Self> {
        Constructor::named(name).map(|constructor| Self::Torchvision {
            constructor,
            config,
        })
    }

    /// The ResNet of architecture `a` with the settings of `config`: under its torchvision
    /// constructor's name if it has one, else its timm constructor's, else given in full
    /// (`{"arch": "resnet", ...}`).
    pub fn named_resnet(a: &Architecture, config: ResNetConfig) -> Self {
        if let Some(c) = TORCHVISION.iter().find(|c| c.architecture == *a) {
            return Self::Torchvision {
                constructor: c,
                config,
            };
        }
        match timm::TIMM.iter().find(|c| c.architecture == *a) {
            Some(c) => Self::Timm {
                constructor: c,
                config,
            },
            None => Self::Resnet(config.with_architecture(a)),
        }
    }

    /// The timm constructor `name` with `config` as its keyword arguments.
    pub fn timm(name: &str, config: ResNetConfig) -> Option<Self> {
        timm::named(name).map(|constructor| Self::Timm {
            constructor,
            config,
        })
    }

    /// The `arch` tag.
    pub fn arch(&self) -> &'static str {
        match self {
            Self::ConvSdsHead(_) => "conv_sds_head",
            Self::ConvSdsLayer(_) => "conv_sds_layer",
            Self::SidClassifier(_) => "sid_classifier",
            Self::SidResidualBlock(_) => "sid_residual_block",
            Self::Resnet(_) => "resnet",
            Self::CifarResnet(_) => "cifar_resnet",
            Self::Torchvision { constructor, .. } => constructor.name,
            Self::Timm { .. } => "timm",
        }
    }

    /// The ImageNet-style ResNet config, for every ResNet arch.
    pub fn resnet(&self) -> Option<&ResNetConfig> {
        match self {
            Self::Torchvision { config, .. } | Self::Timm { config, .. } | Self::Resnet(config) => {
                Some(config)
            }
            _ => None,
        }
    }

    /// Checks every field; errors name the field (`bad conv_sds_head config: input_size: ...`).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::ConvSdsHead(c) => c.validate(),
            Self::ConvSdsLayer(c) => c.validate(),
            Self::SidClassifier(c) => c.validate_classifier(),
            Self::SidResidualBlock(c) => c.validate(),
            Self::Resnet(c) => c.resolve(None).map(drop),
            Self::CifarResnet(c) => c.validate(),
            Self::Torchvision {
                constructor,
                config,
            }
            | Self::Timm {
                constructor,
                config,
            } => config.resolve(Some(constructor)).map(drop),
        }
        .with_context(|| match self {
            Self::Timm { constructor, .. } => format!("bad timm {} config", constructor.name),
            _ => format!("bad {} config", self.arch()),
        })
    }

    /// Builds the model under `path`, its variables named like PyTorch's state_dict keys.
    pub fn build(&self, path: nn::Path) -> Result<Box<dyn Model>> {
        self.validate()?;
        Ok(match self {
            Self::ConvSdsHead(c) => Box::new(ConvSdsHead::new(path, c)),
            Self::ConvSdsLayer(c) => Box::new(ConvSdsLayer::new(path, c.input_size, c.hidden_dim)),
            Self::SidClassifier(c) => Box::new(SidClassifier::new(path, c)?),
            Self::SidResidualBlock(c) => Box::new(SidResidualBlock::from_config(path, c)),
            Self::Resnet(c) => Box::new(ResNet::new(path, &c.resolve(None)?)),
            Self::CifarResnet(c) => Box::new(CifarResNet::new(path, c)?),
            Self::Torchvision {
                constructor,
                config,
            }
            | Self::Timm {
                constructor,
                config,
            } => Box::new(ResNet::new(path, &config.resolve(Some(constructor))?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_with_the_arch_tag_first() {
        for text in [
            r#"{"arch":"resnet50","num_classes":10,"zero_init_residual":false,"replace_stride_with_dilation":[false,false,false],"norm":"batch_norm","shortcut":"B","plain":false,"in_channels":3,"include_fc":true}"#,
            r#"{"arch":"resnet","block":"bottleneck","layers":[3,4,6,3],"groups":32,"width_per_group":4,"num_classes":1000,"zero_init_residual":false,"replace_stride_with_dilation":[false,false,false],"norm":"batch_norm","shortcut":"B","plain":false,"in_channels":3,"include_fc":true}"#,
            r#"{"arch":"cifar_resnet","depth":20,"num_classes":10,"shortcut":"A","plain":false,"in_channels":1}"#,
        ] {
            let config = ModelConfig::from_json(text).unwrap();
            assert_eq!(serde_json::to_string(&config).unwrap(), text);
        }
        let config = ModelConfig::from_json(r#"{"arch": "wide_resnet50_2"}"#).unwrap();
        assert_eq!(config.arch(), "wide_resnet50_2");
        assert_eq!(
            config,
            ModelConfig::torchvision("wide_resnet50_2", ResNetConfig::default()).unwrap()
        );
    }

    #[test]
    fn timm_configs_name_their_constructor() {
        let text = r#"{"arch":"timm","name":"resnet50d","num_classes":10,"zero_init_residual":false,"replace_stride_with_dilation":[false,false,false],"norm":"batch_norm","shortcut":"B","plain":false,"in_channels":3,"include_fc":true}"#;
        let config = ModelConfig::from_json(text).unwrap();
        assert_eq!(serde_json::to_string(&config).unwrap(), text);
        assert_eq!(config.arch(), "timm");
        let args = ResNetConfig {
            num_classes: 10,
            ..Default::default()
        };
        assert_eq!(config, ModelConfig::timm("resnet50d", args).unwrap());
        // Repeating what the constructor fixes is allowed, changing it is not.
        ModelConfig::from_json(r#"{"arch": "timm", "name": "resnet26t", "stem_type": "deep_tiered", "avg_down": true}"#)
            .unwrap();
        for (json, expected) in [
            (r#"{"arch": "timm"}"#, "missing field `name`"),
            (
                r#"{"arch": "timm", "name": "ecaresnet50d"}"#,
                "unknown timm ResNet `ecaresnet50d`",
            ),
            (
                r#"{"arch": "timm", "name": 50}"#,
                "name: expected a timm model name",
            ),
            (
                r#"{"arch": "timm", "name": "resnet50d", "stem_width": 64}"#,
                "bad timm resnet50d config: stem_width: resnet50d fixes it to 32",
            ),
            (
                r#"{"arch": "timm", "name": "seresnet50", "attn_layer": "none"}"#,
                "attn_layer: seresnet50 fixes it to \"se\"",
            ),
            (
                r#"{"arch": "timm", "name": "resnet50", "depth": 50}"#,
                "unknown field `depth`",
            ),
        ] {
            let msg = format!("{:#}", ModelConfig::from_json(json).unwrap_err());
            assert!(msg.contains(expected), "{json}: {msg}");
        }
    }

    #[test]
    fn unknown_archs_and_fields_are_named() {
        let msg = format!(
            "{:#}",
            ModelConfig::from_json(r#"{"arch": "resnet9"}"#).unwrap_err()
        );
        assert!(
            msg.contains("unknown variant `resnet9`") && msg.contains("wide_resnet101_2"),
            "{msg}"
        );
        let msg = format!(
            "{:#}",
            ModelConfig::from_json(r#"{"arch": "resnet18", "depth": 3}"#).unwrap_err()
        );
        assert!(msg.contains("unknown field `depth`"), "{msg}");
        let msg = format!(
            "{:#}",
            ModelConfig::from_json(r#"{"depth": 3}"#).unwrap_err()
        );
        assert!(msg.contains("missing field `arch`"), "{msg}");
    }
}
