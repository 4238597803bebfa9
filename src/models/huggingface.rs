//! Hugging Face's ResNets (transformers 5 `models/resnet`), run as the crate's
//! [`super::resnet::ResNet`]: a model folder (`config.json` and `model.safetensors`, its sharded
//! index, or `pytorch_model.bin`) is read into a [`ModelConfig`], a state_dict under torchvision's
//! key names, and the class names of `id2label`.
//!
//! The config maps as `embedding_size` -> the 7x7 stem's width, `hidden_sizes` -> the stage
//! output widths (`channels` times the expansion), `depths` -> `layers`, `layer_type` -> `block`,
//! `downsample_in_bottleneck` -> `stride_in_1x1` (ResNet v1: the stride on the first 1x1 conv),
//! `downsample_in_first_stage` -> a strided first stage, `num_channels` -> `in_channels`, the
//! labels -> `num_classes`. `ResNetForImageClassification` has `fc`; `ResNetModel` (and
//! `ResNetBackbone`'s weights) give the pooled features. Refused, with the field named: anything
//! but four stages, an activation other than ReLU, bottleneck widths not divisible by 4.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use super::resnet::{Architecture, BlockKind, ResNetConfig};
use crate::checkpoint::{ReadOptions, StateDict};
use crate::config::ModelConfig;

/// A Hugging Face model folder, read.
#[derive(Debug)]
pub struct Folder {
    /// The config that builds the model (`{"arch": "resnet50", ...}` where the folder holds a
    /// torchvision architecture, else `{"arch": "resnet", ...}`).
    pub config: ModelConfig,
    /// The weights, under torchvision's names (`conv1.weight`, `layer1.0.bn1.bias`, `fc.weight`).
    pub state: StateDict,
    /// `id2label` in class order, when it names every class exactly once.
    pub labels: Option<Vec<String>>,
    /// The weight files read.
    pub weights: Vec<PathBuf>,
}

/// The fields of transformers' `ResNetConfig` (and `PretrainedConfig`) that decide the network.
#[derive(Debug, Clone, Deserialize)]
pub struct HfResNetConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_num_channels")]
    pub num_channels: i64,
    #[serde(default = "d_embedding_size")]
    pub embedding_size: i64,
    #[serde(default = "d_hidden_sizes")]
    pub hidden_sizes: Vec<i64>,
    #[serde(default = "d_depths")]
    pub depths: Vec<i64>,
    #[serde(default = "d_layer_type")]
    pub layer_type: String,
    #[serde(default = "d_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub downsample_in_first_stage: bool,
    #[serde(default)]
    pub downsample_in_bottleneck: bool,
    #[serde(default)]
    pub num_labels: Option<i64>,
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn d_num_channels() -> i64 {
    3
}
fn d_embedding_size() -> i64 {
    64
}
fn d_hidden_sizes() -> Vec<i64> {
    vec![256, 512, 1024, 2048]
}
fn d_depths() -> Vec<i64> {
    vec![3, 4, 6, 3]
}
fn d_layer_type() -> String {
    "bottleneck".into()
}
fn d_hidden_act() -> String {
    "relu".into()
}

impl HfResNetConfig {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).context("invalid Hugging Face config")?;
        if let Some(t) = &config.model_type {
            ensure!(
                t == "resnet",
                "model_type: `{t}` is not a Hugging Face ResNet (\"resnet\")"
            );
        }
        Ok(config)
    }

    /// The number of classes: `num_labels`, else the size of `id2label`, else transformers'
    /// default of 2.
    pub fn num_labels(&self) -> i64 {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len() as i64))
            .unwrap_or(2)
    }

    /// `id2label` as a list in class order, if its keys are exactly `0..num_labels`.
    pub fn labels(&self) -> Option<Vec<String>> {
        let map = self.id2label.as_ref()?;
        let n = self.num_labels();
        if map.len() as i64 != n {
            return None;
        }
        (0..n).map(|i| map.get(&i.to_string()).cloned()).collect()
    }

    /// The architecture: what transformers' `ResNetModel` builds, in the crate's terms.
    pub fn architecture(&self) -> Result<Architecture> {
        let block = match self.layer_type.as_str() {
            "basic" => BlockKind::Basic,
            "bottleneck" => BlockKind::Bottleneck,
            other => bail!("layer_type: `{other}` is neither \"basic\" nor \"bottleneck\""),
        };
        ensure!(
            self.hidden_act == "relu",
            "hidden_act: `{}` cannot be represented (the ResNet uses ReLU)",
            self.hidden_act
        );
        let stages = |field: &str, v: &[i64]| -> Result<[i64; 4]> {
            v.try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{field}: {} stages cannot be represented (the ResNet has 4)",
                    v.len()
                )
            })
        };
        let layers = stages("depths", &self.depths)?;
        let hidden = stages("hidden_sizes", &self.hidden_sizes)?;
        let expansion = block.expansion();
        if let Some((i, h)) = hidden.iter().enumerate().find(|(_, h)| *h % expansion != 0) {
            bail!(
                "hidden_sizes[{i}]: {h} is not a multiple of {expansion}, the bottleneck's \
                 reduction, so the ResNet cannot represent it"
            );
        }
        let mut a = Architecture::torchvision(block, layers, 1, 64);
        a.channels = hidden.map(|h| h / expansion);
        a.stem_width = self.embedding_size;
        // transformers applies `downsample_in_bottleneck` to bottleneck layers only.
        a.stride_in_1x1 = block == BlockKind::Bottleneck && self.downsample_in_bottleneck;
        a.downsample_in_first_stage = self.downsample_in_first_stage;
        Ok(a)
    }

    /// The config that builds this network, with `fc` when `head`
    /// (`ResNetForImageClassification`) and the pooled features without
    /// (`ResNetModel`).
    pub fn model_config(&self, head: bool) -> Result<ModelConfig> {
        let a = self.architecture()?;
        let num_labels = self.num_labels();
        let config = ResNetConfig {
            num_classes: if head { num_labels } else { num_labels.max(1) },
            in_channels: self.num_channels,
            include_fc: head,
            ..ResNetConfig::default()
        };
        let config = ModelConfig::named_resnet(&a, config);
        config.validate()?;
        Ok(config)
    }
}

/// The torchvision name of a Hugging Face ResNet key (`resnet.` prefix optional), or `None` if
/// the key is not one of a ResNet's:
///
/// | Hugging Face | torchvision |
/// |---|---|
/// | `embedder.embedder.convolution` / `.normalization` | `conv1` / `bn1` |
/// | `encoder.stages.S.layers.B.layer.I.convolution` / `.normalization` | `layer{S+1}.B.conv{I+1}` / `bn{I+1}` |
/// | `encoder.stages.S.layers.B.shortcut.convolution` / `.normalization` | `layer{S+1}.B.downsample.0` / `.1` |
/// | `classifier.1` | `fc` |
pub fn torchvision_key(key: &str) -> Option<String> {
    let key = key.strip_prefix("resnet.").unwrap_or(key);
    if let Some(rest) = key.strip_prefix("classifier.1.") {
        return Some(format!("fc.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("embedder.embedder.") {
        return conv_or_norm(rest, "conv1", "bn1");
    }
    let rest = key.strip_prefix("encoder.stages.")?;
    let (stage, rest) = index(rest)?;
    let (block, rest) = index(rest.strip_prefix("layers.")?)?;
    let at = format!("layer{}.{block}", stage + 1);
    if let Some(rest) = rest.strip_prefix("shortcut.") {
        return conv_or_norm(
            rest,
            &format!("{at}.downsample.0"),
            &format!("{at}.downsample.1"),
        );
    }
    let (i, rest) = index(rest.strip_prefix("layer.")?)?;
    conv_or_norm(
        rest,
        &format!("{at}.conv{}", i + 1),
        &format!("{at}.bn{}", i + 1),
    )
}

/// `"12.rest"` -> `(12, "rest")`.
fn index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

fn conv_or_norm(rest: &str, conv: &str, norm: &str) -> Option<String> {
    if let Some(p) = rest.strip_prefix("convolution.") {
        Some(format!("{conv}.{p}"))
    } else {
        rest.strip_prefix("normalization.")
            .map(|p| format!("{norm}.{p}"))
    }
}

/// `state` under torchvision's names; a key that is not a Hugging Face ResNet's is an error.
pub fn to_torchvision(state: StateDict) -> Result<StateDict> {
    let entries = state
        .entries
        .into_iter()
        .map(|(k, t)| match torchvision_key(&k) {
            Some(name) => Ok((name, t)),
            None => bail!("`{k}` is not a key of a Hugging Face ResNet"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StateDict { entries })
}

/// Whether `path` is a model folder (a directory with a `config.json`).
pub fn is_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// The weight files of a folder, in the order transformers prefers them: `model.safetensors`, its
/// sharded index, `pytorch_model.bin`, its sharded index.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for single in ["model.safetensors", "pytorch_model.bin"] {
        let index = dir.join(format!("{single}.index.json"));
        if dir.join(single).is_file() {
            return Ok(vec![dir.join(single)]);
        }
        if index.is_file() {
            return shards(dir, &index);
        }
    }
    bail!(
        "{}: no model.safetensors or pytorch_model.bin (nor a sharded index of either)",
        dir.display()
    )
}

/// The files a sharded index's `weight_map` names, each once, in order.
fn shards(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let index: Index =
        serde_json::from_str(&text).with_context(|| format!("malformed {}", index.display()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for name in index.weight_map.values() {
        ensure!(
            !name.contains('/') && !name.contains('\\') && name != "..",
            "shard `{name}` is not a file of the folder"
        );
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// Reads a `ResNetForImageClassification` / `ResNetModel` folder: its config, its weights under
/// torchvision's names, and its labels. The weights decide whether there is a classifier.
pub fn read_folder(dir: &Path) -> Result<Folder> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let hf = HfResNetConfig::from_json(&text)
        .with_context(|| format!("in {}", config_path.display()))?;
    let weights = weight_files(dir)?;
    let mut entries = Vec::new();
    for file in &weights {
        entries.extend(StateDict::read(file, &ReadOptions::default())?.entries);
    }
    let state = to_torchvision(StateDict { entries })
        .with_context(|| format!("in the weights of {}", dir.display()))?;
    let fc_rows = state
        .get("fc.weight")
        .map(|fc| fc.size().first().copied().unwrap_or(0));
    let head = fc_rows.is_some();
    if let Some(rows) = fc_rows {
        ensure!(
            rows == hf.num_labels(),
            "{}: config.json has {} labels but classifier.1.weight has {rows} rows",
            dir.display(),
            hf.num_labels()
        );
    }
    let config = hf
        .model_config(head)
        .with_context(|| format!("in {}", config_path.display()))?;
    Ok(Folder {
        config,
        state,
        labels: hf.labels().filter(|_| head),
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_torchvision_names() {
        for (hf, tv) in [
            (
                "resnet.embedder.embedder.convolution.weight",
                "conv1.weight",
            ),
            (
                "embedder.embedder.normalization.running_var",
                "bn1.running_var",
            ),
            (
                "resnet.encoder.stages.0.layers.0.layer.2.normalization.num_batches_tracked",
                "layer1.0.bn3.num_batches_tracked",
            ),
            (
                "encoder.stages.3.layers.12.layer.0.convolution.weight",
                "layer4.12.conv1.weight",
            ),
            (
                "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight",
                "layer2.0.downsample.0.weight",
            ),
            (
                "resnet.encoder.stages.1.layers.0.shortcut.normalization.bias",
                "layer2.0.downsample.1.bias",
            ),
            ("classifier.1.weight", "fc.weight"),
        ] {
            assert_eq!(torchvision_key(hf).as_deref(), Some(tv), "{hf}");
        }
        for bad in [
            "classifier.0.weight",
            "resnet.pooler.weight",
            "encoder.stages.x.layers.0.layer.0.convolution.weight",
            "encoder.stages.0.layers.0.layer.0.activation.weight",
            "conv1.weight",
        ] {
            assert_eq!(torchvision_key(bad), None, "{bad}");
        }
    }

    /// microsoft/resnet-50's config.json (transformers 4.18): a torchvision ResNet-50.
    #[test]
    fn microsoft_resnet50_is_torchvisions_resnet50() {
        let text = r#"{"architectures": ["ResNetForImageClassification"], "depths": [3, 4, 6, 3],
            "downsample_in_first_stage": false, "embedding_size": 64, "hidden_act": "relu",
            "hidden_sizes": [256, 512, 1024, 2048], "id2label": {"0": "tench, Tinca tinca",
            "1": "goldfish"}, "layer_type": "bottleneck", "model_type": "resnet",
            "num_channels": 3, "torch_dtype": "float32"}"#;
        let hf = HfResNetConfig::from_json(text).unwrap();
        let config = hf.model_config(true).unwrap();
        assert_eq!(config.arch(), "resnet50");
        assert_eq!(config.resnet().unwrap().num_classes, 2);
        assert_eq!(
            hf.labels().unwrap(),
            ["tench, Tinca tinca".to_string(), "goldfish".into()]
        );
        let v1 = HfResNetConfig {
            downsample_in_bottleneck: true,
            ..hf.clone()
        };
        let config = v1.model_config(false).unwrap();
        assert_eq!(config.arch(), "resnet");
        let c = config.resnet().unwrap();
        assert_eq!((c.stride_in_1x1, c.include_fc), (Some(true), false));
        // microsoft/resnet-18: basic layers, 64..512.
        let basic = HfResNetConfig {
            layer_type: "basic".into(),
            hidden_sizes: vec![64, 128, 256, 512],
            depths: vec![2, 2, 2, 2],
            downsample_in_bottleneck: true,
            ..hf
        };
        assert_eq!(basic.model_config(true).unwrap().arch(), "resnet18");
    }

    #[test]
    fn what_cannot_be_represented_is_named() {
        let base = HfResNetConfig::from_json("{}").unwrap();
        for (change, expected) in [
            (
                r#"{"depths": [1, 1, 1]}"#,
                "depths: 3 stages cannot be represented",
            ),
            (r#"{"hidden_act": "gelu"}"#, "hidden_act: `gelu`"),
            (
                r#"{"hidden_sizes": [256, 512, 1024, 2050]}"#,
                "hidden_sizes[3]: 2050 is not a multiple of 4",
            ),
            (r#"{"layer_type": "preact"}"#, "layer_type: `preact`"),
            (r#"{"model_type": "convnext"}"#, "model_type: `convnext`"),
        ] {
            let result = HfResNetConfig::from_json(change).and_then(|c| c.model_config(true));
            let msg = format!("{:#}", result.unwrap_err());
            assert!(msg.contains(expected), "{change}: {msg}");
        }
        assert_eq!(base.model_config(true).unwrap().arch(), "resnet50");
    }

    #[test]
    fn labels_need_every_class_once() {
        let hf = HfResNetConfig::from_json(r#"{"id2label": {"0": "a", "2": "c"}}"#).unwrap();
        assert_eq!(hf.num_labels(), 2);
        assert_eq!(hf.labels(), None);
        let hf = HfResNetConfig::from_json(r#"{"id2label": {"1": "b", "0": "a"}}"#).unwrap();
        assert_eq!(hf.labels().unwrap(), ["a", "b"]);
    }
}
