//! `residual inspect`: what a checkpoint holds, and which model it fits.
//!
//! The architecture is read off the key names and shapes (block kind and stage depths, groups and
//! width, shortcut option, norm layer, classes; the ConvSDS and SiD sizes), then confirmed by
//! building that model and loading the checkpoint into it strictly.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::checkpoint::{load_state_dict, StateDict};
use crate::config::ModelConfig;

/// One tensor of the checkpoint.
#[derive(Debug, Serialize)]
pub struct Entry {
    pub key: String,
    pub shape: Vec<i64>,
    pub dtype: String,
}

/// What `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub tensors: usize,
    /// Elements of the trainable-looking tensors (everything but BatchNorm statistics and
    /// counters, and SiD's index offsets).
    pub parameters: i64,
    pub buffers: i64,
    pub bytes: i64,
    pub dtypes: Vec<String>,
    /// The config that loads this checkpoint strictly, if one was found.
    pub config: Option<serde_json::Value>,
    pub architecture: Option<String>,
    pub entries: Vec<Entry>,
}

fn is_buffer(key: &str) -> bool {
    [
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "categorical_embedding_offsets",
    ]
    .iter()
    .any(|b| key.ends_with(b))
}

pub fn summarize(state: &StateDict) -> Summary {
    let mut parameters = 0;
    let mut buffers = 0;
    let mut bytes = 0;
    let mut dtypes = BTreeSet::new();
    let entries = state
        .entries
        .iter()
        .map(|(k, t)| {
            let n = t.numel() as i64;
            if is_buffer(k) {
                buffers += n;
            } else {
                parameters += n;
            }
            bytes += n * t.kind().elt_size_in_bytes() as i64;
            dtypes.insert(format!("{:?}", t.kind()));
            Entry {
                key: k.clone(),
                shape: t.size(),
                dtype: format!("{:?}", t.kind()),
            }
        })
        .collect();
    let (config, architecture) = match identify(state) {
        Some((config, description)) => (serde_json::to_value(&config).ok(), Some(description)),
        None => (None, None),
    };
    Summary {
        tensors: state.len(),
        parameters,
        buffers,
        bytes,
        dtypes: dtypes.into_iter().collect(),
        config,
        architecture,
        entries,
    }
}

fn shape(state: &StateDict, key: &str) -> Option<Vec<i64>> {
    state.get(key).map(Tensor::size)
}

/// Number of `prefix.{i}.` groups (`layer1.0.`, `layer1.1.`, ...).
fn count_indexed(state: &StateDict, prefix: &str) -> i64 {
    (0..)
        .take_while(|i| {
            state
                .keys()
                .any(|k| k.starts_with(&format!("{prefix}.{i}.")))
        })
        .count() as i64
}

/// A config that the checkpoint's keys and shapes suggest, with a description.
fn guess(state: &StateDict) -> Option<(serde_json::Value, String)> {
    if let Some(c1) = shape(state, "convs.0.conv1.weight") {
        let hidden = shape(state, "convs.0.layer_norm.weight")?[0];
        let labels = shape(state, "classifier.weight")?[0];
        let n = count_indexed(state, "convs");
        let config = serde_json::json!({"arch": "conv_sds_head", "n_layers": n, "input_size": c1[1],
                                        "hidden_size": hidden, "num_labels": labels});
        return Some((
            config,
            format!(
                "ConvSDSHead, {n} layers over {} tokens of width {hidden}",
                c1[1]
            ),
        ));
    }
    if state
        .get("model.embeddings.categorical_embedding_offsets")
        .is_some()
    {
        return guess_sid(state);
    }
    let conv1 = shape(state, "conv1.weight")?;
    let in_channels = conv1[1];
    let norm = if state.get("bn1.running_mean").is_none() {
        None // GroupNorm: the group count is not in the weights
    } else if state.get("bn1.num_batches_tracked").is_none() {
        Some("frozen_batch_norm")
    } else {
        Some("batch_norm")
    };
    let fc = shape(state, "fc.weight");
    let blocks: Vec<i64> = (1..=4)
        .map(|i| count_indexed(state, &format!("layer{i}")))
        .collect();
    let bottleneck = state.get("layer1.0.conv3.weight").is_some();
    let downsampled = state
        .keys()
        .filter(|k| k.ends_with("downsample.0.weight"))
        .count() as i64;
    let total: i64 = blocks.iter().sum();
    let (shortcut, shortcut_note) = match downsampled {
        0 => ("A", " (shortcut A, or plain: same weights)"),
        d if d == total => ("C", " (shortcut C)"),
        _ => ("B", ""),
    };
    let mut config = serde_json::json!({"shortcut": shortcut, "in_channels": in_channels});
    if let Some(norm) = norm {
        config["norm"] = serde_json::json!(norm);
    }
    if let Some(fc) = &fc {
        config["num_classes"] = serde_json::json!(fc[0]);
    } else {
        config["include_fc"] = serde_json::json!(false);
    }
    if conv1[0] == 16 && blocks[3] == 0 && blocks[2] > 0 {
        let depth = 6 * blocks[0] + 2;
        let mut cifar = serde_json::json!({"arch": "cifar_resnet", "depth": depth, "shortcut": shortcut,
                                           "in_channels": in_channels});
        if let Some(fc) = &fc {
            cifar["num_classes"] = serde_json::json!(fc[0]);
        }
        return Some((cifar, format!("CIFAR ResNet-{depth}{shortcut_note}")));
    }
    let conv2 = shape(state, "layer1.0.conv2.weight")?;
    let (width, groups) = (conv2[0], conv2[0] / conv2[1].max(1));
    let width_per_group = if bottleneck {
        width / groups.max(1)
    } else {
        64
    };
    let block = if bottleneck { "bottleneck" } else { "basic" };
    let layers: [i64; 4] = blocks.clone().try_into().ok()?;
    let named = crate::models::resnet::TORCHVISION.iter().find(|c| {
        let a = c.architecture;
        (a.block == crate::models::resnet::BlockKind::Bottleneck) == bottleneck
            && a.layers == layers
            && a.groups == groups
            && a.width_per_group == width_per_group
    });
    let name = match named.map(|c| c.name) {
        Some(arch) => {
            config["arch"] = serde_json::json!(arch);
            format!("torchvision {arch}")
        }
        None => {
            config["arch"] = serde_json::json!("resnet");
            config["block"] = serde_json::json!(block);
            config["layers"] = serde_json::json!(layers);
            config["groups"] = serde_json::json!(groups);
            config["width_per_group"] = serde_json::json!(width_per_group);
            format!("ResNet ({block}, layers {layers:?}, groups {groups}, width/group {width_per_group})")
        }
    };
    let classes = fc.map_or_else(
        || "no classifier".to_string(),
        |fc| format!("{} classes", fc[0]),
    );
    let norm_note = match norm {
        Some("frozen_batch_norm") => ", FrozenBatchNorm",
        None => ", GroupNorm (give num_groups in the config)",
        _ => "",
    };
    Some((
        config,
        format!("{name}, {classes}{shortcut_note}{norm_note}"),
    ))
}

fn guess_sid(state: &StateDict) -> Option<(serde_json::Value, String)> {
    let offsets: Vec<i64> = Vec::try_from(
        state
            .get("model.embeddings.categorical_embedding_offsets")?
            .view([-1]),
    )
    .ok()?;
    let table = shape(state, "model.embeddings.categorical_embeddings.weight")?;
    let mut counts: Vec<i64> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    counts.push(table[0] - offsets.last()?);
    let text = count_indexed(state, "model.embeddings.text_projections");
    let text_shape = shape(state, "model.embeddings.text_projections.0.weight")?;
    let layers = count_indexed(state, "model.layers");
    let projection = shape(state, "model.layers.0.projection.weight")?;
    let ff = shape(state, "model.layers.0.transform.0.feedforward.0.weight")?;
    let attention_blocks = count_indexed(state, "model.layers.1.attention")
        .saturating_sub(1)
        .max(0);
    let config = serde_json::json!({
        "arch": "sid_classifier",
        "num_categories_list": counts,
        "num_numerical_features": shape(state, "model.embeddings.numerical_direction")?[0],
        "num_text_features": text,
        "text_input_size": text_shape[1],
        "embedding_size": table[1],
        "hidden_size": projection[0],
        "intermediate_size": ff[0],
        "num_hidden_layers": layers,
        "num_transform_blocks": count_indexed(state, "model.layers.0.transform"),
        "num_attention_blocks": if layers > 1 { attention_blocks } else { 1 },
        "num_labels": shape(state, "classifier.weight")?[0],
    });
    Some((
        config,
        format!("SiD classifier, {layers} layers, hidden {}", projection[0]),
    ))
}

/// The config guessed from `state`, confirmed by a strict load.
pub fn identify(state: &StateDict) -> Option<(ModelConfig, String)> {
    let (value, description) = guess(state)?;
    let config = ModelConfig::from_value(value).ok()?;
    let vs = VarStore::new(Device::Cpu);
    config.build(vs.root()).ok()?;
    load_state_dict(&vs, state, true).ok()?;
    Some((config, description))
}

/// The summary as text.
pub fn format_summary(s: &Summary, all_keys: bool) -> String {
    let mut out = String::new();
    let shown = if all_keys {
        s.entries.len()
    } else {
        s.entries.len().min(20)
    };
    for e in &s.entries[..shown] {
        out += &format!(
            "{:<60} {:<20} {}\n",
            e.key,
            format!("{:?}", e.shape),
            e.dtype
        );
    }
    if shown < s.entries.len() {
        out += &format!(
            "... {} more (--all to list them)\n",
            s.entries.len() - shown
        );
    }
    out += &format!(
        "{} tensors, {} parameters + {} buffer elements, {:.1} MB, dtypes {}\n",
        s.tensors,
        s.parameters,
        s.buffers,
        s.bytes as f64 / 1e6,
        s.dtypes.join(", ")
    );
    out += &match (&s.architecture, &s.config) {
        (Some(a), Some(c)) => format!("matches: {a}\nconfig: {c}\n"),
        _ => "matches: no known architecture (give --config to `residual infer`)\n".to_string(),
    };
    out
}

/// Reads a checkpoint and summarises it.
pub fn inspect(
    path: &std::path::Path,
    options: &crate::checkpoint::ReadOptions,
) -> Result<Summary> {
    let state = StateDict::read(path, options)
        .with_context(|| format!("cannot inspect {}", path.display()))?;
    Ok(summarize(&state))
}
