//! The Samsung SDS question-answering head of the seed document (`ConvSDSLayer`, `ConvSDSHead`).
//!
//! The convolutions run over the *sequence* axis: a `[B, L, H]` input is read as `L` channels of
//! length `H`, so the model is tied to one sequence length `L = input_size`.
//!
//! Difference from the seed: the seed's `ConvSDSHead.forward` builds its conv layers on every call
//! (fresh random weights each time, never trained, never moved to the model's device). Here they
//! are built once, at construction, under the same names (`convs.{i}.conv1.weight`, ...), which
//! is what the seed's model holds after its first forward.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Reduction, Tensor};

use super::{input, layers, Dtype, Expect, Inputs, Model};
use crate::validate::at_least;

/// `ConvSDSLayer(input_size, hidden_dim)`:
/// `layer_norm(x + relu(conv2(conv1(x))))`, `[B, L, H] -> [B, L, H]` (or unbatched `[L, H]`, as
/// `nn.Conv1d` takes it) with `L = input_size`, `H = hidden_dim`; conv1 is `L -> 2L` channels,
/// k=3, pad=1; conv2 is `2L -> L`, k=1.
#[derive(Debug)]
pub struct ConvSdsLayer {
    pub conv1: nn::Conv1D,
    pub conv2: nn::Conv1D,
    pub layer_norm: nn::LayerNorm,
    pub input_size: i64,
    pub hidden_dim: i64,
}

impl ConvSdsLayer {
    pub fn new(path: nn::Path, input_size: i64, hidden_dim: i64) -> Self {
        Self {
            conv1: layers::conv1d(&path / "conv1", input_size, input_size * 2, 3, 1),
            conv2: layers::conv1d(&path / "conv2", input_size * 2, input_size, 1, 0),
            layer_norm: layers::layer_norm(&path / "layer_norm", hidden_dim),
            input_size,
            hidden_dim,
        }
    }

    fn expect(&self) -> Expect<'_> {
        expect_sequence(self.input_size, self.hidden_dim, &self.conv1.ws)
    }
}

impl nn::Module for ConvSdsLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        let out = x.apply(&self.conv1).apply(&self.conv2);
        (x + out.relu()).apply(&self.layer_norm)
    }
}

impl Model for ConvSdsLayer {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, _train: bool) -> Result<Tensor> {
        let x = input(inputs, "input")?;
        self.expect().check(x)?;
        Ok(nn::Module::forward(self, x))
    }
}

/// `[B, input_size, hidden]` or `[input_size, hidden]` in the dtype and on the device of `weight`.
fn expect_sequence(input_size: i64, hidden: i64, weight: &Tensor) -> Expect<'_> {
    Expect {
        name: "input",
        dims: vec![None, Some(input_size), Some(hidden)],
        labels: &["B", "L", "H"],
        unbatched: true,
        dtype: Dtype::Model,
        weight,
    }
}

/// Defaults are the seed's: `ConvSDSHead()` is 5 layers over 512 tokens of a 768-wide encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvSdsHeadConfig {
    #[serde(default = "default_n_layers")]
    pub n_layers: i64,
    #[serde(default = "default_input_size")]
    pub input_size: i64,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "default_num_labels")]
    pub num_labels: i64,
}

fn default_n_layers() -> i64 {
    5
}
fn default_input_size() -> i64 {
    512
}
fn default_hidden_size() -> i64 {
    768
}
fn default_num_labels() -> i64 {
    2
}

impl ConvSdsHeadConfig {
    pub fn validate(&self) -> Result<()> {
        at_least(
            1,
            [
                ("n_layers", self.n_layers),
                ("input_size", self.input_size),
                ("hidden_size", self.hidden_size),
                ("num_labels", self.num_labels),
            ],
        )
    }
}

impl Default for ConvSdsHeadConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// `ConvSDSLayer` on its own: `{"arch": "conv_sds_layer", "input_size": L, "hidden_dim": H}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvSdsLayerConfig {
    pub input_size: i64,
    pub hidden_dim: i64,
}

impl ConvSdsLayerConfig {
    pub fn validate(&self) -> Result<()> {
        at_least(
            1,
            [
                ("input_size", self.input_size),
                ("hidden_dim", self.hidden_dim),
            ],
        )
    }
}

/// `ConvSDSHead(n_layers, input_size, hidden_size, num_labels)`:
/// `classifier(convs(x))`, `[B, L, H] -> [B, L, num_labels]` (or `[L, H] -> [L, num_labels]`).
#[derive(Debug)]
pub struct ConvSdsHead {
    pub convs: Vec<ConvSdsLayer>,
    pub classifier: nn::Linear,
    pub config: ConvSdsHeadConfig,
}

impl ConvSdsHead {
    pub fn new(path: nn::Path, config: &ConvSdsHeadConfig) -> Self {
        let convs_path = &path / "convs";
        let convs = (0..config.n_layers)
            .map(|i| ConvSdsLayer::new(&convs_path / i, config.input_size, config.hidden_size))
            .collect();
        Self {
            convs,
            classifier: layers::linear(
                &path / "classifier",
                config.hidden_size,
                config.num_labels,
                Some(layers::BiasInit::Uniform),
            ),
            config: config.clone(),
        }
    }

    /// Checked forward: `[B, L, H] -> [B, L, num_labels]` (or unbatched).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.features(x)?.apply(&self.classifier))
    }

    /// The hidden states after the conv layers, `[B, L, H]` (or unbatched).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        expect_sequence(c.input_size, c.hidden_size, &self.classifier.ws).check(x)?;
        Ok(self.run_convs(x))
    }

    fn run_convs(&self, x: &Tensor) -> Tensor {
        self.convs
            .iter()
            .fold(x.shallow_clone(), |h, layer| h.apply(layer))
    }

    /// `(start_logits, end_logits)`, each `[B, L]`: the two label columns of a 2-label head.
    pub fn forward_qa(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.config.num_labels != 2 {
            bail!(
                "forward_qa needs num_labels = 2 (start, end), this head has {}",
                self.config.num_labels
            );
        }
        split_span_logits(&self.try_forward(x)?)
    }
}

impl nn::Module for ConvSdsHead {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.run_convs(x).apply(&self.classifier)
    }
}

impl Model for ConvSdsHead {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, _train: bool) -> Result<Tensor> {
        self.try_forward(input(inputs, "input")?)
    }

    fn forward_features(&self, inputs: &Inputs, _train: bool) -> Result<Tensor> {
        self.features(input(inputs, "input")?)
    }
}

/// Splits `[B, L, 2]` logits into `(start [B, L], end [B, L])`.
pub fn split_span_logits(logits: &Tensor) -> Result<(Tensor, Tensor)> {
    let size = logits.size();
    if size.len() != 3 || size[2] != 2 {
        bail!("span logits must be [B, L, 2], got {size:?}");
    }
    let parts = logits.split(1, -1);
    Ok((parts[0].squeeze_dim(-1), parts[1].squeeze_dim(-1)))
}

/// The span loss of extractive question answering, `(CE(start) + CE(end)) / 2`, as Hugging Face's
/// `*ForQuestionAnswering` heads compute it: positions are clamped to `[0, L]` and position `L`
/// (anything beyond the sequence) is ignored. Logits `[B, L]`, positions int64 `[B]`.
pub fn span_loss(
    start_logits: &Tensor,
    end_logits: &Tensor,
    start_positions: &Tensor,
    end_positions: &Tensor,
) -> Result<Tensor> {
    let size = start_logits.size();
    if size.len() != 2 || end_logits.size() != size {
        bail!(
            "span logits must both be [B, L], got {:?} and {:?}",
            size,
            end_logits.size()
        );
    }
    let (batch, length) = (size[0], size[1]);
    for (name, positions) in [
        ("start_positions", start_positions),
        ("end_positions", end_positions),
    ] {
        if positions.size() != [batch] || positions.kind() != Kind::Int64 {
            bail!(
                "{name} must be int64 [{batch}], got {:?} {:?}",
                positions.kind(),
                positions.size()
            );
        }
    }
    let ce = |logits: &Tensor, positions: &Tensor| {
        let target = positions.clamp(0, length).to_device(logits.device());
        logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, length, 0.0)
    };
    Ok((ce(start_logits, start_positions) + ce(end_logits, end_positions)) / 2.0)
}
