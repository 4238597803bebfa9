//! The Samsung SDS question-answering head of the seed document (`ConvSDSLayer`, `ConvSDSHead`).
//!
//! The convolutions run over the *sequence* axis: a `[B, L, H]` input is read as `L` channels of
//! length `H`, so the model is tied to one sequence length `L = input_size`.
//!
//! Difference from the seed: the seed's `ConvSDSHead.forward` builds its conv layers on every call
//! (fresh random weights each time, never trained, never moved to the model's device). Here they
//! are built once, at construction, under the same names (`convs.{i}.conv1.weight`, ...), which
//! is what the seed's model holds after its first forward.

use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Reduction, Tensor};

use super::{input, layers, Dtype, Expect, Inputs, Model};
use crate::backend::{conv_pointwise, ConvGeometry};
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
    /// `conv2 ∘ conv1` as one convolution, once [`ConvSdsLayer::fuse_convs`] made it.
    fused: Option<FusedConv>,
}

/// `conv2(conv1(x))` as one `L -> L` convolution (kernel 3, padding 1): nothing lies between the
/// two, and conv2 is pointwise, so `W[o, i, k] = Σ_m W2[o, m] W1[m, i, k]` and
/// `b = W2 b1 + b2`. That is 3L² multiply-adds per position instead of 8L² (6L² in conv1, 2L² in
/// conv2), and half the weights.
#[derive(Debug)]
struct FusedConv {
    /// `[L, L, 3]`.
    weight: Tensor,
    bias: Tensor,
    /// `Some` where oneDNN runs it (CPU, float32): the weight reordered into oneDNN's blocked
    /// layout for the first input's size, filled by the first forward.
    packed: Option<OnceLock<Tensor>>,
}

impl FusedConv {
    /// conv1's padding over the sequence; the convolution runs as a 2-D one on `[B, L, 1, H]`.
    fn geometry(padding: i64) -> ConvGeometry {
        ConvGeometry {
            padding: [0, padding],
            stride: [1, 1],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

const CONV1_KERNEL: i64 = 3;
const CONV1_PADDING: i64 = 1;

impl ConvSdsLayer {
    pub fn new(path: nn::Path, input_size: i64, hidden_dim: i64) -> Self {
        Self {
            conv1: layers::conv1d(
                &path / "conv1",
                input_size,
                input_size * 2,
                CONV1_KERNEL,
                CONV1_PADDING,
            ),
            conv2: layers::conv1d(&path / "conv2", input_size * 2, input_size, 1, 0),
            layer_norm: layers::layer_norm(&path / "layer_norm", hidden_dim),
            input_size,
            hidden_dim,
            fused: None,
        }
    }

    fn expect(&self) -> Expect<'_> {
        expect_sequence(self.input_size, self.hidden_dim, &self.conv1.ws)
    }

    /// Replaces `conv2(conv1(x))` by one convolution for inference (`W = W2·W1`, `b = W2·b1 + b2`), its weights
    /// composed in float64 from the current ones; with `pack`, run by oneDNN on a pre-reordered
    /// weight with the ReLU fused where it can (CPU, float32). A training forward is refused
    /// from then on: the composed weights would not follow the trained ones.
    pub fn fuse_convs(&mut self, pack: bool) -> Result<()> {
        let (c1, c2) = (&self.conv1, &self.conv2);
        let (w1, w2) = (&c1.ws, &c2.ws);
        let [mid, l, k] = w1.size()[..] else {
            bail!("conv1.weight must be 3-D, got {:?}", w1.size());
        };
        // The geometry is fixed by `new` (tch keeps a conv's config private): conv1 stride 1,
        // padding CONV1_PADDING; conv2 pointwise.
        if k != CONV1_KERNEL || w2.size() != [l, mid, 1] {
            bail!(
                "expected conv1 and conv2 weights [2L, L, {CONV1_KERNEL}] and [L, 2L, 1], got {:?} \
                 and {:?}",
                w1.size(),
                w2.size()
            );
        }
        let (weight, bias) = tch::no_grad(|| {
            let double = |t: &Tensor| t.detach().to_kind(Kind::Double);
            let w2 = double(w2).squeeze_dim(2);
            let weight = w2.matmul(&double(w1).view([mid, l * k])).view([l, l, k]);
            let mut bias = match &c1.bs {
                Some(b1) => w2.mv(&double(b1)),
                None => Tensor::zeros([l], (Kind::Double, w1.device())),
            };
            if let Some(b2) = &c2.bs {
                bias += double(b2);
            }
            let kind = w1.kind();
            (weight.to_kind(kind), bias.to_kind(kind))
        });
        let packed = (pack
            && weight.device() == tch::Device::Cpu
            && weight.kind() == Kind::Float
            && tch::utils::has_mkldnn())
        .then(OnceLock::new);
        self.fused = Some(FusedConv {
            weight,
            bias,
            packed,
        });
        Ok(())
    }

    /// `layer_norm(x + relu(conv2(conv1(x))))` as built, or through the fused convolution.
    fn forward_checked(&self, x: &Tensor) -> Result<Tensor> {
        let Some(fused) = &self.fused else {
            return Ok(nn::Module::forward(self, x));
        };
        let padding = CONV1_PADDING;
        let out = match &fused.packed {
            Some(_) if x.dim() == 2 => {
                return Ok(self.forward_checked(&x.unsqueeze(0))?.squeeze_dim(0));
            }
            Some(cell) => {
                let x4 = x.unsqueeze(-2);
                let geometry = FusedConv::geometry(padding);
                let weight = match cell.get() {
                    Some(w) => w.shallow_clone(),
                    None => {
                        let g = &geometry;
                        let w = tch::no_grad(|| {
                            fused
                                .weight
                                .unsqueeze(2)
                                .f_to_mkldnn(Kind::Float)?
                                .f_mkldnn_reorder_conv2d_weight(
                                    g.padding,
                                    g.stride,
                                    g.dilation,
                                    g.groups,
                                    Some(x4.size().as_slice()),
                                )
                        })
                        .context("cannot pack the fused ConvSDS convolution for oneDNN")?;
                        cell.get_or_init(|| w).shallow_clone()
                    }
                };
                // The packed convolution writes channels-last; layer_norm wants contiguous rows,
                // and the addition runs faster on matching layouts.
                let mut out =
                    conv_pointwise(&x4, &weight, Some(&fused.bias), &geometry, true, None)?
                        .squeeze_dim(-2)
                        .contiguous();
                out += x;
                out
            }
            None => {
                x.conv1d(&fused.weight, Some(&fused.bias), [1], [padding], [1], 1)
                    .relu()
                    + x
            }
        };
        Ok(out.apply(&self.layer_norm))
    }

    fn refuse_training(&self, train: bool) -> Result<()> {
        if train && self.fused.is_some() {
            bail!(
                "this ConvSDS layer's convolutions are folded into one for inference; training                  needs the model as built"
            );
        }
        Ok(())
    }
}

impl nn::Module for ConvSdsLayer {
    /// The model as built (conv1, then conv2), fused or not.
    fn forward(&self, x: &Tensor) -> Tensor {
        let out = x.apply(&self.conv1).apply(&self.conv2);
        (x + out.relu()).apply(&self.layer_norm)
    }
}

impl Model for ConvSdsLayer {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.refuse_training(train)?;
        let x = input(inputs, "input")?;
        self.expect().check(x)?;
        self.forward_checked(x)
    }

    /// Folds conv2 into conv1 ([`ConvSdsLayer::fuse_convs`]): this model has no batch norm.
    fn fold_batch_norm(&mut self, pack: bool) -> Result<()> {
        self.fuse_convs(pack)
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
        self.convs
            .iter()
            .try_fold(x.shallow_clone(), |h, layer| layer.forward_checked(&h))
    }

    /// Folds each layer's conv2 into its conv1 for inference ([`ConvSdsLayer::fuse_convs`]).
    pub fn fuse_convs(&mut self, pack: bool) -> Result<()> {
        for (i, layer) in self.convs.iter_mut().enumerate() {
            layer
                .fuse_convs(pack)
                .with_context(|| format!("convs.{i}"))?;
        }
        Ok(())
    }

    fn refuse_training(&self, train: bool) -> Result<()> {
        self.convs
            .first()
            .map_or(Ok(()), |layer| layer.refuse_training(train))
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
    /// The model as built, fused or not.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.run_convs(x).apply(&self.classifier)
    }
}

impl Model for ConvSdsHead {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.refuse_training(train)?;
        self.try_forward(input(inputs, "input")?)
    }

    fn forward_features(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.refuse_training(train)?;
        self.features(input(inputs, "input")?)
    }

    /// Folds each layer's conv2 into its conv1 ([`ConvSdsHead::fuse_convs`]): this model has no
    /// batch norm.
    fn fold_batch_norm(&mut self, pack: bool) -> Result<()> {
        self.fuse_convs(pack)
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
