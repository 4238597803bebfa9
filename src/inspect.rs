//! `residual inspect`: what a checkpoint holds, and which model it fits.
//!
//! The architecture is read off the key names and shapes (block kind and stage depths, groups and
//! width, shortcut option, norm layer, classes; the ConvSDS and SiD sizes), from the checkpoint's
//! table alone: no tensor is read and no model is built, so this takes the same time for any size
//! of file. With `check`, the guess is confirmed by building that model and comparing the
//! checkpoint with it as a strict load does. When nothing fits, [`NoMatch`] says why.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{Context, Result};
use serde::{Serialize, Serializer};
use tch::nn::VarStore;
use tch::Device;

use crate::checkpoint::{
    compare_state_dict, load_state_dict, Checkpoint, ReadOptions, TensorMeta, Weights,
};
use crate::config::ModelConfig;
use crate::models::cifar::CifarResNetConfig;
use crate::models::conv_sds::ConvSdsHeadConfig;
use crate::models::huggingface;
use crate::models::layers::NormKind;
use crate::models::resnet::{Architecture, BlockKind, ResNetConfig, ShortcutKind, CHANNELS};
use crate::models::sid::SidConfig;
use crate::models::timm::{AttnLayer, StemType};
use crate::preprocess::Preprocess;

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
    /// Where the weights were found in the file and what else it holds, in words
    /// ("torch.save file, weights under `model`; also holds optimizer (dict), args (argparse.Namespace)").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    /// The evaluation preprocessing a model folder names (`preprocessor_config.json`, or a timm
    /// `config.json`'s `pretrained_cfg`), as `infer --image` applies it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    pub tensors: usize,
    /// Elements of the trainable-looking tensors (everything but BatchNorm statistics and
    /// counters, and SiD's index offsets).
    pub parameters: i64,
    pub buffers: i64,
    pub bytes: i64,
    pub dtypes: Vec<String>,
    /// The config read off the keys (with [`checked`](Self::checked), the one that loads this
    /// checkpoint strictly), if one was found.
    #[serde(serialize_with = "sorted_keys")]
    pub config: Option<ModelConfig>,
    /// Whether the config was confirmed by building the model and comparing the checkpoint with
    /// it (names, shapes, dtypes), as `inspect --check` does.
    pub checked: bool,
    pub architecture: Option<String>,
    /// Why no config was found (absent when one was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_match: Option<NoMatch>,
    pub entries: Vec<Entry>,
}

/// A config as a JSON object with sorted keys, the form `inspect` has always printed.
fn sorted_keys<S: Serializer>(config: &Option<ModelConfig>, s: S) -> Result<S::Ok, S::Error> {
    config
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

/// A config that loads a checkpoint strictly, and the architecture in words.
#[derive(Debug, Clone)]
pub struct Identified {
    pub config: ModelConfig,
    pub description: String,
}

/// The families `inspect` recognises: the key that marks one, its name, and how its config is
/// read off the keys (tried in this order).
type Guess = fn(&Keys) -> Result<Identified, NoMatch>;
const FAMILIES: [(&str, &str, Guess); 4] = [
    ("convs.0.conv1.weight", "ConvSDSHead", guess_conv_sds),
    (SID_OFFSETS, "SiD classifier", guess_sid),
    ("conv1.weight", "ResNet", guess_resnet),
    ("conv1.0.weight", "ResNet with a deep stem", guess_resnet),
];

const SID_OFFSETS: &str = "model.embeddings.categorical_embedding_offsets";

/// Why a checkpoint fits no architecture `inspect` knows.
#[derive(Debug)]
pub enum NoMatch {
    /// None of the keys that mark a family.
    UnknownLayout,
    /// A key the family's config is read from is absent.
    MissingKey { family: &'static str, key: String },
    /// A key the config is read from has a shape it cannot be read from.
    BadTensor {
        family: &'static str,
        key: String,
        shape: Vec<i64>,
        expected: String,
    },
    /// The sizes read off the keys make no config of the family.
    Invalid {
        family: &'static str,
        error: anyhow::Error,
    },
    /// GroupNorm keeps no statistics and its group count is not in the weights.
    GroupNorm,
    /// The config read off the keys is invalid, or the checkpoint does not load into it strictly.
    Rejected {
        description: String,
        config: Box<ModelConfig>,
        error: anyhow::Error,
    },
}

impl fmt::Display for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoMatch::UnknownLayout => {
                let marks: Vec<String> = FAMILIES
                    .iter()
                    .map(|(key, family, _)| format!("{key}: {family}"))
                    .collect();
                write!(
                    f,
                    "none of the keys that mark a known family ({})",
                    marks.join("; ")
                )
            }
            NoMatch::MissingKey { family, key } => {
                write!(f, "{family} keys, but no `{key}`")
            }
            NoMatch::BadTensor {
                family,
                key,
                shape,
                expected,
            } => write!(
                f,
                "{family} keys, but `{key}` has shape {shape:?}, expected {expected}"
            ),
            NoMatch::Invalid { family, error } => {
                write!(
                    f,
                    "the {family} sizes read off the keys make no config: {error:#}"
                )
            }
            NoMatch::GroupNorm => write!(
                f,
                "ResNet with GroupNorm (no running statistics): the group count is not in the \
                 weights; give \"norm\": {{\"group_norm\": {{\"num_groups\": G}}}} in a config"
            ),
            NoMatch::Rejected {
                description,
                config,
                error,
            } => {
                let config = serde_json::to_value(config).map_err(|_| fmt::Error)?;
                write!(f, "read as {description} ({config}), but: {error:#}")
            }
        }
    }
}

impl Serialize for NoMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::error::Error for NoMatch {}

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

/// The summary of `state`, from its names, shapes and dtypes (a [`Checkpoint`]'s are read
/// without its storages; only SiD's small offsets tensor is ever read), with the architecture
/// confirmed by building it ([`identify`]).
pub fn summarize(state: &dyn Weights) -> Summary {
    summarize_with(state, true)
}

/// [`summarize`], the architecture confirmed by building it only with `check` (else read off
/// the keys alone, [`guess`]).
pub fn summarize_with(state: &dyn Weights, check: bool) -> Summary {
    let meta = state.metadata();
    let found = if check { identify(state) } else { guess(state) };
    summary_of(&meta, found, check)
}

/// The counts and entries of `meta`, with the architecture `found` (confirmed by a build when
/// `checked`).
fn summary_of(meta: &[TensorMeta], found: Result<Identified, NoMatch>, checked: bool) -> Summary {
    let mut parameters = 0;
    let mut buffers = 0;
    let mut bytes = 0;
    let mut dtypes = BTreeSet::new();
    let entries = meta
        .iter()
        .map(|t| {
            let n: i64 = t.shape.iter().product();
            if is_buffer(t.name) {
                buffers += n;
            } else {
                parameters += n;
            }
            bytes += n * t.kind.elt_size_in_bytes() as i64;
            dtypes.insert(format!("{:?}", t.kind));
            Entry {
                key: t.name.to_string(),
                shape: t.shape.clone(),
                dtype: format!("{:?}", t.kind),
            }
        })
        .collect();
    let (config, architecture, no_match) = match found {
        Ok(found) => (Some(found.config), Some(found.description), None),
        Err(why) => (None, None, Some(why)),
    };
    Summary {
        layout: None,
        preprocess: None,
        tensors: meta.len(),
        parameters,
        buffers,
        bytes,
        dtypes: dtypes.into_iter().collect(),
        config,
        checked,
        architecture,
        no_match,
        entries,
    }
}

/// The keys of one family, read with errors that name the key.
struct Keys<'a> {
    /// The values of integer tensor `i` (an index into `meta`), flattened; `None` where they
    /// cannot be read. Only SiD's small offsets tensor is ever read.
    ints: &'a dyn Fn(usize) -> Option<Vec<i64>>,
    meta: &'a [TensorMeta<'a>],
    family: &'static str,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&TensorMeta<'_>> {
        self.meta.iter().find(|t| t.name == key)
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.meta.iter().map(|t| t.name)
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The shape of `key`, which must have `rank` dimensions.
    fn shape(&self, key: &str, rank: usize) -> Result<Vec<i64>, NoMatch> {
        let t = self.get(key).ok_or_else(|| NoMatch::MissingKey {
            family: self.family,
            key: key.to_string(),
        })?;
        let shape = t.shape.clone();
        if shape.len() != rank {
            return Err(NoMatch::BadTensor {
                family: self.family,
                key: key.to_string(),
                shape,
                expected: format!("rank {rank}"),
            });
        }
        Ok(shape)
    }

    /// Dimension 0 of `key`.
    fn len(&self, key: &str) -> Result<i64, NoMatch> {
        Ok(self.shape(key, 1)?[0])
    }

    /// Dimension 0 of the matrix `key`.
    fn rows(&self, key: &str) -> Result<i64, NoMatch> {
        Ok(self.shape(key, 2)?[0])
    }

    /// Number of `prefix.{i}.` groups (`layer1.0.`, `layer1.1.`, ...).
    fn count_indexed(&self, prefix: &str) -> i64 {
        (0..)
            .take_while(|i| {
                let group = format!("{prefix}.{i}.");
                self.keys().any(|k| k.starts_with(&group))
            })
            .count() as i64
    }
}

/// The config that the checkpoint's keys and shapes suggest, with a description; no model is
/// built and no value is read (but SiD's small offsets tensor).
pub fn guess(state: &dyn Weights) -> Result<Identified, NoMatch> {
    let ints = |i| {
        let t = state.value(i).ok()?.reshape([-1]);
        Vec::try_from(&t).ok()
    };
    guess_from(&state.metadata(), &ints)
}

/// [`guess`] from the tensors' `meta`, reading integer tensors with `ints` (see [`Keys`]).
fn guess_from(
    meta: &[TensorMeta],
    ints: &dyn Fn(usize) -> Option<Vec<i64>>,
) -> Result<Identified, NoMatch> {
    let (_, family, guess) = FAMILIES
        .iter()
        .find(|(key, _, _)| meta.iter().any(|t| t.name == *key))
        .ok_or(NoMatch::UnknownLayout)?;
    guess(&Keys { ints, meta, family })
}

fn guess_conv_sds(keys: &Keys) -> Result<Identified, NoMatch> {
    let c1 = keys.shape("convs.0.conv1.weight", 3)?;
    let config = ConvSdsHeadConfig {
        n_layers: keys.count_indexed("convs"),
        input_size: c1[1],
        hidden_size: keys.len("convs.0.layer_norm.weight")?,
        num_labels: keys.rows("classifier.weight")?,
    };
    let description = format!(
        "ConvSDSHead, {} layers over {} tokens of width {}",
        config.n_layers, config.input_size, config.hidden_size
    );
    Ok(Identified {
        config: ModelConfig::ConvSdsHead(config),
        description,
    })
}

fn guess_resnet(keys: &Keys) -> Result<Identified, NoMatch> {
    let (conv1, stem_type, stem_width) = read_stem(keys)?;
    let in_channels = conv1[1];
    let norm = if !keys.has("bn1.running_mean") {
        return Err(NoMatch::GroupNorm);
    } else if !keys.has("bn1.num_batches_tracked") {
        NormKind::FrozenBatchNorm
    } else {
        NormKind::BatchNorm
    };
    let num_classes = keys
        .has("fc.weight")
        .then(|| keys.rows("fc.weight"))
        .transpose()?;
    let blocks: [i64; 4] = [1, 2, 3, 4].map(|i| keys.count_indexed(&format!("layer{i}")));
    // Blocks with a projection shortcut (`downsample.0` conv, or timm's pool then `.1` conv).
    let downsampled = keys
        .keys()
        .filter_map(|k| k.split_once(".downsample.").map(|(block, _)| block))
        .collect::<BTreeSet<_>>()
        .len() as i64;
    // timm's average-pool shortcut: a parameter-free pool at `downsample.0`, then conv and norm.
    let avg_down =
        keys.has("layer2.0.downsample.1.weight") && !keys.has("layer2.0.downsample.0.weight");
    let (shortcut, shortcut_note) = match downsampled {
        0 => (ShortcutKind::A, " (shortcut A, or plain: same weights)"),
        d if d == blocks.iter().sum::<i64>() => (ShortcutKind::C, " (shortcut C)"),
        _ => (ShortcutKind::B, ""),
    };
    if stem_type == StemType::Default && conv1[0] == 16 && blocks[3] == 0 && blocks[2] > 0 {
        let depth = 6 * blocks[0] + 2;
        let config = CifarResNetConfig {
            depth,
            num_classes: num_classes.ok_or_else(|| NoMatch::MissingKey {
                family: keys.family,
                key: "fc.weight".into(),
            })?,
            shortcut,
            plain: false,
            in_channels,
        };
        return Ok(Identified {
            config: ModelConfig::CifarResnet(config),
            description: format!("CIFAR ResNet-{depth}{shortcut_note}"),
        });
    }
    let architecture = Architecture {
        stem_type,
        stem_width,
        avg_down,
        ..read_blocks(keys, blocks)?
    };
    let config = ResNetConfig {
        num_classes: num_classes.unwrap_or(ResNetConfig::default().num_classes),
        include_fc: num_classes.is_some(),
        norm,
        shortcut,
        in_channels,
        ..ResNetConfig::default()
    };
    let config = match ModelConfig::named_resnet(&architecture, config) {
        ModelConfig::Resnet(c) => ModelConfig::Resnet(without_defaults(c)),
        named => named,
    };
    let name = describe_resnet(&config, &architecture);
    let classes =
        num_classes.map_or_else(|| "no classifier".to_string(), |n| format!("{n} classes"));
    let norm_note = match norm {
        NormKind::FrozenBatchNorm => ", FrozenBatchNorm",
        _ => "",
    };
    Ok(Identified {
        config,
        description: format!("{name}, {classes}{shortcut_note}{norm_note}"),
    })
}

/// The stem's first conv weight, its type and width: torchvision's `conv1`, or timm's deep
/// stems (`conv1.0` / `conv1.3` / `conv1.6`, the first narrower in the tiered one).
fn read_stem(keys: &Keys) -> Result<(Vec<i64>, StemType, i64), NoMatch> {
    if !keys.has("conv1.0.weight") {
        let conv1 = keys.shape("conv1.weight", 4)?;
        let width = conv1[0];
        return Ok((conv1, StemType::Default, width));
    }
    let first = keys.shape("conv1.0.weight", 4)?;
    let second = keys.shape("conv1.3.weight", 4)?;
    let stem_type = if first[0] != second[0] {
        StemType::DeepTiered
    } else {
        StemType::Deep
    };
    Ok((first, stem_type, second[0]))
}

/// Block kind, groups, width and stage widths read off the first block of each stage, and
/// squeeze-and-excitation; the stem and shortcut fields are torchvision's.
fn read_blocks(keys: &Keys, layers: [i64; 4]) -> Result<Architecture, NoMatch> {
    let bottleneck = keys.has("layer1.0.conv3.weight");
    let (block, last_conv) = if bottleneck {
        (BlockKind::Bottleneck, "conv3")
    } else {
        (BlockKind::Basic, "conv2")
    };
    let mut channels = [0; 4];
    for (i, c) in channels.iter_mut().enumerate() {
        let out = keys.shape(&format!("layer{}.0.{last_conv}.weight", i + 1), 4)?;
        *c = out[0] / block.expansion();
    }
    let conv2 = keys.shape("layer1.0.conv2.weight", 4)?;
    let groups = conv2[0] / conv2[1].max(1);
    // torchvision's width: floor(planes * width_per_group / 64) * groups for the first stage.
    let width_per_group = if bottleneck {
        conv2[0] / groups.max(1) * 64 / channels[0].max(1)
    } else {
        64
    };
    let attn_layer = if keys.has("layer1.0.se.fc1.weight") {
        AttnLayer::Se
    } else {
        AttnLayer::None
    };
    Ok(Architecture {
        channels,
        attn_layer,
        ..Architecture::torchvision(block, layers, groups, width_per_group)
    })
}

/// "torchvision resnet50", "timm resnet50d", or the architecture in words.
fn describe_resnet(config: &ModelConfig, a: &Architecture) -> String {
    match config {
        ModelConfig::Torchvision { constructor, .. } => format!("torchvision {}", constructor.name),
        ModelConfig::Timm { constructor, .. } => format!("timm {}", constructor.name),
        _ => {
            let mut extras = String::new();
            if a.stem_type != StemType::Default {
                extras += &format!(", {:?} stem of width {}", a.stem_type, a.stem_width);
            }
            if a.avg_down {
                extras += ", average-pool shortcuts";
            }
            if a.attn_layer == AttnLayer::Se {
                extras += ", squeeze-and-excitation";
            }
            if a.channels != CHANNELS {
                extras += &format!(", stage widths {:?}", a.channels);
            }
            let block = match a.block {
                BlockKind::Bottleneck => "bottleneck",
                BlockKind::Basic => "basic",
            };
            format!(
                "ResNet ({block}, layers {:?}, groups {}, width/group {}{extras})",
                a.layers, a.groups, a.width_per_group
            )
        }
    }
}

/// A ResNet given in full, with only the architecture fields that differ from torchvision's.
fn without_defaults(mut c: ResNetConfig) -> ResNetConfig {
    if c.channels == Some(CHANNELS) {
        c.channels = None;
    }
    if c.stem_type == Some(StemType::Default) {
        c.stem_type = None;
    }
    if c.stem_width == Some(64) {
        c.stem_width = None;
    }
    if c.avg_down == Some(false) {
        c.avg_down = None;
    }
    if c.attn_layer == Some(AttnLayer::None) {
        c.attn_layer = None;
    }
    if c.stride_in_1x1 == Some(false) {
        c.stride_in_1x1 = None;
    }
    if c.downsample_in_first_stage == Some(false) {
        c.downsample_in_first_stage = None;
    }
    c
}

fn guess_sid(keys: &Keys) -> Result<Identified, NoMatch> {
    // PyTorch keeps the offsets as a [1, n] buffer.
    let offsets: Vec<i64> = keys
        .meta
        .iter()
        .position(|t| t.name == SID_OFFSETS)
        .and_then(keys.ints)
        .unwrap_or_default();
    let Some(&last) = offsets.last() else {
        return Err(NoMatch::BadTensor {
            family: keys.family,
            key: SID_OFFSETS.into(),
            shape: keys
                .get(SID_OFFSETS)
                .map(|t| t.shape.clone())
                .unwrap_or_default(),
            expected: "at least one offset".into(),
        });
    };
    let table = keys.shape("model.embeddings.categorical_embeddings.weight", 2)?;
    let mut num_categories_list: Vec<i64> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    num_categories_list.push(table[0] - last);
    let layers = keys.count_indexed("model.layers");
    let hidden_size = keys.rows("model.layers.0.projection.weight")?;
    let attention_blocks = (keys.count_indexed("model.layers.1.attention") - 1).max(0);
    let sizes = serde_json::json!({
        "num_categories_list": num_categories_list,
        "num_numerical_features": keys.rows("model.embeddings.numerical_direction")?,
        "num_text_features": keys.count_indexed("model.embeddings.text_projections"),
        "text_input_size": keys.shape("model.embeddings.text_projections.0.weight", 2)?[1],
        "embedding_size": table[1],
        "hidden_size": hidden_size,
        "intermediate_size": keys.rows("model.layers.0.transform.0.feedforward.0.weight")?,
        "num_hidden_layers": layers,
        "num_transform_blocks": keys.count_indexed("model.layers.0.transform"),
        "num_attention_blocks": if layers > 1 { attention_blocks } else { 1 },
        "num_labels": keys.rows("classifier.weight")?,
    });
    // Dropout rates and the init scale are not in the weights: serde fills SidConfig's defaults.
    let config: SidConfig = serde_json::from_value(sizes).map_err(|e| NoMatch::Invalid {
        family: keys.family,
        error: e.into(),
    })?;
    Ok(Identified {
        config: ModelConfig::SidClassifier(config),
        description: format!("SiD classifier, {layers} layers, hidden {hidden_size}"),
    })
}

/// The config guessed from `state`, confirmed by the checks of a strict load (names, shapes and
/// dtypes; no value is read); or why there is none.
pub fn identify(state: &dyn Weights) -> Result<Identified, NoMatch> {
    let found = guess(state)?;
    let confirmed = (|| -> Result<()> {
        let vs = VarStore::new(Device::Cpu);
        found.config.build(vs.root())?;
        let (report, _) = compare_state_dict(&vs, state);
        if !report.is_clean() {
            anyhow::bail!("state_dict does not match the model:\n{report}");
        }
        Ok(())
    })();
    match confirmed {
        Ok(()) => Ok(found),
        Err(error) => Err(NoMatch::Rejected {
            description: found.description,
            config: Box::new(found.config),
            error,
        }),
    }
}

/// The summary as text.
pub fn format_summary(s: &Summary, all_keys: bool) -> String {
    let mut out = String::new();
    if let Some(layout) = &s.layout {
        out += &format!("file: {layout}\n");
    }
    if let Some(p) = &s.preprocess {
        let p = serde_json::to_string(p).unwrap_or_default();
        out += &format!("preprocess: {p}\n");
    }
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
    match (&s.architecture, &s.config) {
        (Some(a), Some(c)) => {
            let c = serde_json::to_value(c).unwrap_or_default();
            out += &format!("matches: {a}\nconfig: {c}\n");
            if !s.checked {
                out +=
                    "(read off the key names and shapes; --check builds the model and compares)\n";
            }
        }
        _ => {
            out += "matches: no known architecture (give --config to `residual infer`)\n";
            if let Some(why) = &s.no_match {
                out += &format!("why: {why}\n");
            }
        }
    }
    out
}

/// Reads a checkpoint's table (or a Hugging Face model folder) and summarises it; with `check`,
/// builds the architecture found and compares the checkpoint with it (a folder's is always
/// built: its config.json names it).
pub fn inspect(path: &std::path::Path, options: &ReadOptions, check: bool) -> Result<Summary> {
    if huggingface::is_folder(path) {
        return inspect_folder(path);
    }
    let checkpoint = Checkpoint::open(path, options)
        .with_context(|| format!("cannot inspect {}", path.display()))?;
    Ok(Summary {
        layout: Some(checkpoint.layout().to_string()),
        ..summarize_with(&checkpoint, check)
    })
}

/// [`inspect`] without `check` of a checkpoint file, calling no libtorch function (the
/// `residual-inspect` binary, which does not load libtorch): the same summary, from the table
/// alone. Model folders are refused: their architecture is confirmed by building it.
pub fn inspect_table(path: &std::path::Path, options: &ReadOptions) -> Result<Summary> {
    if huggingface::is_folder(path) {
        anyhow::bail!(
            "{} is a model folder: `residual inspect` reads those (it builds the model)",
            path.display()
        );
    }
    let checkpoint = Checkpoint::open(path, options)
        .with_context(|| format!("cannot inspect {}", path.display()))?;
    let ints = |i| table_ints(&checkpoint, options, i).ok();
    let meta = checkpoint.metadata();
    Ok(Summary {
        layout: Some(checkpoint.layout().to_string()),
        ..summary_of(&meta, guess_from(&meta, &ints), false)
    })
}

/// The values of the int64 tensor `i` of `checkpoint`, flattened in row-major order, read off
/// the mapped file without libtorch (what `value(i).reshape([-1])` gives).
fn table_ints(checkpoint: &Checkpoint, options: &ReadOptions, i: usize) -> Result<Vec<i64>> {
    let table = checkpoint.table();
    let (name, t) = &table.tensors[i];
    anyhow::ensure!(
        t.dtype == crate::checkpoint::DType::I64,
        "tensor `{name}` is {:?}, not int64",
        t.dtype
    );
    table.check_inflation([t.storage], options.inflate_limit())?;
    let file = std::fs::File::open(checkpoint.path())?;
    // SAFETY: read-only; the table's records were bound-checked against this file's length.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    let bytes = table.storage_bytes(&map, t.storage)?;
    let numel = t.numel();
    let mut out = Vec::with_capacity(numel);
    for flat in 0..numel {
        // The element's position in the storage: offset + Σ index_d · stride_d.
        let mut rest = flat as i64;
        let mut at = t.offset as i64;
        for (&size, &stride) in t.shape.iter().zip(&t.stride).rev() {
            at += rest % size * stride;
            rest /= size;
        }
        let start = at as usize * 8;
        let word = bytes
            .get(start..start + 8)
            .with_context(|| format!("tensor `{name}` past the end of its storage"))?;
        out.push(i64::from_le_bytes(word.try_into()?));
    }
    Ok(out)
}

/// A Hugging Face folder: its `config.json` gives the architecture (including what the weights
/// cannot show, such as where a bottleneck strides), confirmed by a strict load.
fn inspect_folder(dir: &std::path::Path) -> Result<Summary> {
    let folder = huggingface::read_folder(dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    let files: Vec<String> = folder
        .weights
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let labels = folder
        .labels
        .as_ref()
        .map_or_else(String::new, |l| format!("; {} labels (id2label)", l.len()));
    let layout = format!(
        "Hugging Face model folder: config.json + {}, keys mapped to torchvision's{labels}",
        files.join(" + ")
    );
    let summary = summarize(&folder.state);
    let vs = VarStore::new(Device::Cpu);
    folder.config.build(vs.root())?;
    let loaded = load_state_dict(&vs, &folder.state, false)?;
    let (config, architecture, no_match) = if loaded.is_clean() {
        let named = match &folder.config {
            ModelConfig::Torchvision { constructor, .. } => {
                format!("as torchvision {}", constructor.name)
            }
            ModelConfig::Timm { constructor, .. } => format!("as timm {}", constructor.name),
            _ => "given in full by config.json".to_string(),
        };
        (
            Some(folder.config.clone()),
            Some(format!("Hugging Face ResNet ({named})")),
            None,
        )
    } else {
        let error = anyhow::anyhow!("{loaded}");
        let rejected = NoMatch::Rejected {
            description: "the folder's config.json".into(),
            config: Box::new(folder.config.clone()),
            error,
        };
        (None, None, Some(rejected))
    };
    Ok(Summary {
        layout: Some(layout),
        preprocess: crate::preprocess::for_model_folder(dir)?,
        config,
        architecture,
        no_match,
        ..summary
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::StateDict;

    /// A state_dict of the model `config` builds, freshly initialised.
    fn state_of(config: &str) -> StateDict {
        let vs = VarStore::new(Device::Cpu);
        ModelConfig::from_json(config)
            .unwrap()
            .build(vs.root())
            .unwrap();
        StateDict::from_var_store(&vs)
    }

    fn identified(config: &str) -> Identified {
        identify(&state_of(config)).unwrap_or_else(|why| panic!("{config}: {why}"))
    }

    #[test]
    fn identifies_what_it_builds() {
        for (config, description) in [
            (
                r#"{"arch": "resnet18", "num_classes": 10}"#,
                "torchvision resnet18, 10 classes",
            ),
            (
                r#"{"arch": "resnext50_32x4d", "num_classes": 10}"#,
                "torchvision resnext50_32x4d, 10 classes",
            ),
            (
                r#"{"arch": "resnet", "block": "bottleneck", "layers": [1, 2, 1, 1], "groups": 2,
                    "width_per_group": 32, "num_classes": 7}"#,
                "ResNet (bottleneck, layers [1, 2, 1, 1], groups 2, width/group 32), 7 classes",
            ),
            (
                r#"{"arch": "timm", "name": "resnet26t", "num_classes": 10}"#,
                "timm resnet26t, 10 classes",
            ),
            (
                r#"{"arch": "timm", "name": "resnet50d", "num_classes": 10}"#,
                "timm resnet50d, 10 classes",
            ),
            (
                r#"{"arch": "timm", "name": "resnet50s", "num_classes": 10}"#,
                "timm resnet50s, 10 classes",
            ),
            (
                r#"{"arch": "timm", "name": "seresnext26d_32x4d", "num_classes": 10}"#,
                "timm seresnext26d_32x4d, 10 classes",
            ),
            (
                r#"{"arch": "timm", "name": "seresnet18", "num_classes": 10}"#,
                "timm seresnet18, 10 classes",
            ),
            (
                r#"{"arch": "timm", "name": "resnet10t", "num_classes": 10}"#,
                "timm resnet10t, 10 classes",
            ),
            (
                r#"{"arch": "resnet", "block": "basic", "layers": [2, 1, 1, 1], "groups": 1,
                    "width_per_group": 64, "stem_type": "deep",
                    "stem_width": 8, "avg_down": true, "attn_layer": "se",
                    "channels": [8, 16, 24, 32], "num_classes": 3}"#,
                "ResNet (basic, layers [2, 1, 1, 1], groups 1, width/group 64, Deep stem of width 8, \
                 average-pool shortcuts, squeeze-and-excitation, stage widths [8, 16, 24, 32]), 3 classes",
            ),
            (
                r#"{"arch": "resnet18", "norm": "frozen_batch_norm", "include_fc": false,
                    "in_channels": 1}"#,
                "torchvision resnet18, no classifier, FrozenBatchNorm",
            ),
            (
                r#"{"arch": "resnet18", "num_classes": 10, "shortcut": "C"}"#,
                "torchvision resnet18, 10 classes (shortcut C)",
            ),
            (
                r#"{"arch": "cifar_resnet", "depth": 20, "shortcut": "B", "in_channels": 1}"#,
                "CIFAR ResNet-20",
            ),
            (
                r#"{"arch": "conv_sds_head", "n_layers": 2, "input_size": 17, "hidden_size": 33,
                    "num_labels": 3}"#,
                "ConvSDSHead, 2 layers over 17 tokens of width 33",
            ),
            (
                r#"{"arch": "sid_classifier", "num_categories_list": [3, 7, 5],
                    "num_numerical_features": 4, "num_text_features": 2, "text_input_size": 24,
                    "embedding_size": 16, "hidden_size": 48, "intermediate_size": 80,
                    "num_hidden_layers": 3, "num_transform_blocks": 2, "num_labels": 5}"#,
                "SiD classifier, 3 layers, hidden 48",
            ),
        ] {
            let found = identified(config);
            assert_eq!(found.config, ModelConfig::from_json(config).unwrap());
            assert_eq!(found.description, description);
        }
    }

    #[test]
    fn plain_nets_read_as_shortcut_a() {
        let found = identified(r#"{"arch": "resnet18", "num_classes": 10, "plain": true}"#);
        let a = r#"{"arch": "resnet18", "num_classes": 10, "shortcut": "A"}"#;
        assert_eq!(found.config, ModelConfig::from_json(a).unwrap());
        assert_eq!(
            found.description,
            "torchvision resnet18, 10 classes (shortcut A, or plain: same weights)"
        );
    }

    #[test]
    fn says_why_nothing_matches() {
        let why = |state: &StateDict| identify(state).unwrap_err();
        assert!(matches!(
            why(&StateDict { entries: vec![] }),
            NoMatch::UnknownLayout
        ));
        let group_norm = r#"{"arch": "resnet18", "norm": {"group_norm": {"num_groups": 32}}}"#;
        assert!(matches!(why(&state_of(group_norm)), NoMatch::GroupNorm));
        let layer = state_of(r#"{"arch": "conv_sds_layer", "input_size": 64, "hidden_dim": 96}"#);
        assert_eq!(
            why(&layer).to_string(),
            "ResNet keys, but `conv1.weight` has shape [128, 64, 3], expected rank 4"
        );

        let mut resnet = state_of(r#"{"arch": "resnet18", "num_classes": 10}"#);
        resnet.entries.retain(|(k, _)| k != "layer4.1.bn2.weight");
        let message = why(&resnet).to_string();
        assert!(
            message.starts_with("read as torchvision resnet18, 10 classes ({\"arch\":\"resnet18\"")
                && message.contains("missing keys (1): layer4.1.bn2.weight"),
            "{message}"
        );
        for (key, t) in &mut resnet.entries {
            if key == "fc.weight" {
                *t = t.flatten(0, -1);
            }
        }
        assert_eq!(
            why(&resnet).to_string(),
            "ResNet keys, but `fc.weight` has shape [5120], expected rank 2"
        );
        let mut resnet = state_of(r#"{"arch": "resnet18", "num_classes": 10}"#);
        resnet.entries.retain(|(k, _)| k != "layer1.0.conv2.weight");
        assert_eq!(
            why(&resnet).to_string(),
            "ResNet keys, but no `layer1.0.conv2.weight`"
        );
    }

    #[test]
    fn only_check_builds_the_model_and_sees_a_missing_key() {
        let mut resnet = state_of(r#"{"arch": "resnet18", "num_classes": 10}"#);
        resnet.entries.retain(|(k, _)| k != "layer4.1.bn2.weight");
        let guessed = summarize_with(&resnet, false);
        assert!(!guessed.checked && guessed.no_match.is_none());
        assert_eq!(
            guessed.architecture.as_deref(),
            Some("torchvision resnet18, 10 classes")
        );
        assert!(format_summary(&guessed, false).ends_with(
            "(read off the key names and shapes; --check builds the model and compares)\n"
        ));
        let checked = summarize_with(&resnet, true);
        assert!(checked.checked && checked.config.is_none());
        let why = checked.no_match.unwrap().to_string();
        assert!(
            why.contains("missing keys (1): layer4.1.bn2.weight"),
            "{why}"
        );
    }

    #[test]
    fn summary_shows_the_config_or_why_not() {
        let summary = summarize(&state_of(r#"{"arch": "cifar_resnet", "depth": 8}"#));
        let json = serde_json::to_value(&summary).unwrap();
        // Keys sorted, as inspect has always printed them; no `no_match` when matched.
        assert_eq!(
            json["config"].to_string(),
            r#"{"arch":"cifar_resnet","depth":8,"in_channels":3,"num_classes":10,"plain":false,"shortcut":"A"}"#
        );
        assert!(json.get("no_match").is_none());
        let text = format_summary(&summary, false);
        assert!(text.contains("matches: CIFAR ResNet-8 (shortcut A, or plain: same weights)\nconfig: {\"arch\":\"cifar_resnet\",\"depth\":8,"), "{text}");

        let none = summarize(&StateDict { entries: vec![] });
        let json = serde_json::to_value(&none).unwrap();
        assert!(json["config"].is_null() && json["architecture"].is_null());
        assert!(json["no_match"]
            .as_str()
            .unwrap()
            .starts_with("none of the keys"));
        assert!(format_summary(&none, false).ends_with(
            "matches: no known architecture (give --config to `residual infer`)\nwhy: none of \
             the keys that mark a known family (convs.0.conv1.weight: ConvSDSHead; \
             model.embeddings.categorical_embedding_offsets: SiD classifier; conv1.weight: \
             ResNet; conv1.0.weight: ResNet with a deep stem)\n"
        ));
    }
}
