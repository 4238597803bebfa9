//! SiD, the gated-MLP tabular model of affjljoo3581/Job-Recommend-Competition (`src/modeling.py`,
//! commit bb41cdd), whose `SiDResidualBlock` the seed document shows.
//!
//! Inputs: `categorical` int64 `[B, C]`, `numerical` float `[B, N]`, `text` float `[B, T, D]`
//! (one D-wide vector per text feature). They are embedded into `[B, F, E]` (`F = C + N + T`); each
//! layer re-weights those embeddings with an attention over features computed from the previous
//! hidden state, projects them to `[B, H]`, transforms them with residual blocks, and adds the
//! result to the hidden state through stochastic depth.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::layers::{self, BiasInit};
use super::{input, Dtype, Expect, Inputs, Model};
use crate::validate::{at_least, probability};

/// The original `SiDConfig`, field for field, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidConfig {
    pub num_categories_list: Vec<i64>,
    pub num_numerical_features: i64,
    pub num_text_features: i64,
    pub text_input_size: i64,
    #[serde(default = "d_embedding_size")]
    pub embedding_size: i64,
    #[serde(default = "d_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "d_num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_one")]
    pub num_transform_blocks: i64,
    #[serde(default = "d_one")]
    pub num_attention_blocks: i64,
    #[serde(default = "d_half")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d_half")]
    pub attention_dropout_prob: f64,
    #[serde(default = "d_half")]
    pub drop_path_prob: f64,
    #[serde(default = "d_embed_init_std")]
    pub embed_init_std: f64,
    #[serde(default)]
    pub num_labels: Option<i64>,
}

fn d_embedding_size() -> i64 {
    64
}
fn d_hidden_size() -> i64 {
    256
}
fn d_intermediate_size() -> i64 {
    1024
}
fn d_num_hidden_layers() -> i64 {
    18
}
fn d_one() -> i64 {
    1
}
fn d_half() -> f64 {
    0.5
}
fn d_embed_init_std() -> f64 {
    0.02
}

impl SidConfig {
    pub fn num_categorical_features(&self) -> i64 {
        self.num_categories_list.len() as i64
    }

    pub fn num_total_categories(&self) -> i64 {
        self.num_categories_list.iter().sum()
    }

    pub fn num_total_features(&self) -> i64 {
        self.num_categorical_features() + self.num_numerical_features + self.num_text_features
    }

    pub fn total_embedding_size(&self) -> i64 {
        self.num_total_features() * self.embedding_size
    }

    /// Rejects configs the model cannot be built from, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.num_categories_list.is_empty() {
            bail!("num_categories_list: needs at least one categorical feature");
        }
        let counts = self.num_categories_list.iter().enumerate();
        at_least(
            1,
            counts.map(|(i, n)| (format!("num_categories_list[{i}]"), *n)),
        )?;
        at_least(1, [("num_text_features", self.num_text_features)])
            .context("the model stacks one projection per text feature")?;
        at_least(
            0,
            [
                ("num_numerical_features", self.num_numerical_features),
                ("num_transform_blocks", self.num_transform_blocks),
                ("num_attention_blocks", self.num_attention_blocks),
            ],
        )?;
        at_least(
            1,
            [
                ("text_input_size", self.text_input_size),
                ("embedding_size", self.embedding_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
            ],
        )?;
        at_least(1, self.num_labels.map(|n| ("num_labels", n)))?;
        probability(
            false,
            [
                ("hidden_dropout_prob", self.hidden_dropout_prob),
                ("attention_dropout_prob", self.attention_dropout_prob),
            ],
        )?;
        probability(true, [("drop_path_prob", self.drop_path_prob)])?;
        if !(self.embed_init_std.is_finite() && self.embed_init_std >= 0.0) {
            bail!(
                "embed_init_std: must be a finite non-negative number, got {}",
                self.embed_init_std
            );
        }
        Ok(())
    }

    /// [`Self::validate`] for a `SiDClassifier`, which also needs `num_labels`.
    pub fn validate_classifier(&self) -> Result<()> {
        self.validate()?;
        self.classifier_labels().map(drop)
    }

    /// `num_labels`, the width of `SiDClassifier`'s output.
    pub fn classifier_labels(&self) -> Result<i64> {
        self.num_labels
            .context("num_labels: must be set for a classifier")
    }
}

/// Stochastic depth as the original writes it: in training, each row is kept when `u > p`
/// (`u ~ U[0, 1)`) and kept rows are divided by `p`, not by `1 - p` as in the usual formulation.
/// The port mirrors this for parity; with the default `p = 0.5` the two agree.
#[derive(Debug, Clone, Copy)]
pub struct StochasticDepth {
    pub drop_path_prob: f64,
}

impl nn::ModuleT for StochasticDepth {
    /// `[B, ...] -> [B, ...]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.drop_path_prob == 0.0 || !train {
            return xs.shallow_clone();
        }
        let mut mask_shape = vec![1i64; xs.dim()];
        mask_shape[0] = xs.size()[0];
        let mask = Tensor::rand(&mask_shape, (Kind::Float, xs.device()));
        let mask = mask.gt(self.drop_path_prob).to_kind(xs.kind()) / self.drop_path_prob;
        mask * xs
    }
}

/// `SiDEmbeddings`: `[B, C]`, `[B, N]`, `[B, T, D]` -> `[B, C + N + T, E]`.
///
/// One embedding table holds every categorical feature; feature `i`'s indices are shifted by the
/// buffer `categorical_embedding_offsets` (`[1, C]`, the cumulative category counts). A numerical
/// value `x` embeds as `x * direction + anchor`; each text vector goes through its own bias-free
/// linear map.
#[derive(Debug)]
pub struct SidEmbeddings {
    pub categorical_embeddings: nn::Embedding,
    pub numerical_direction: Tensor,
    pub numerical_anchor: Tensor,
    pub text_projections: Vec<nn::Linear>,
    pub categorical_embedding_offsets: Tensor,
}

impl SidEmbeddings {
    pub fn new(path: nn::Path, config: &SidConfig) -> Self {
        let std = config.embed_init_std;
        let normal = nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let e = config.embedding_size;
        let embedding_config = nn::EmbeddingConfig {
            ws_init: normal,
            ..Default::default()
        };
        let text = &path / "text_projections";
        let counts = &config.num_categories_list;
        let mut offsets = vec![0i64; counts.len()];
        for i in 1..counts.len() {
            offsets[i] = offsets[i - 1] + counts[i - 1];
        }
        let offsets = Tensor::from_slice(&offsets)
            .view([1, -1])
            .to_device(path.device());
        Self {
            categorical_embeddings: nn::embedding(
                &path / "categorical_embeddings",
                config.num_total_categories(),
                e,
                embedding_config,
            ),
            numerical_direction: path.var(
                "numerical_direction",
                &[config.num_numerical_features, e],
                normal,
            ),
            numerical_anchor: path.var(
                "numerical_anchor",
                &[config.num_numerical_features, e],
                normal,
            ),
            text_projections: (0..config.num_text_features)
                .map(|i| layers::linear(&text / i, config.text_input_size, e, None))
                .collect(),
            categorical_embedding_offsets: path.add(
                "categorical_embedding_offsets",
                offsets,
                false,
            ),
        }
    }

    /// Fails where `nn.Embedding` would: an index plus its feature's offset outside the shared
    /// table `[0, total)`. As in PyTorch, an index past its own feature's count but inside the
    /// table reads the next feature's rows; a single column is broadcast over every feature.
    fn check_categories(&self, categorical: &Tensor) -> Result<()> {
        let index = categorical + &self.categorical_embedding_offsets;
        let total = self.categorical_embeddings.ws.size()[0];
        let bad = index.lt(0).logical_or(&index.ge(total));
        if bad.any().int64_value(&[]) != 0 {
            let first = bad.nonzero().get(0);
            let (row, col) = (first.int64_value(&[0]), first.int64_value(&[1]));
            let value = categorical.int64_value(&[row, col.min(categorical.size()[1] - 1)]);
            let offset = self.categorical_embedding_offsets.int64_value(&[0, col]);
            bail!(
                "input `categorical`: row {row}, feature {col} has index {value}, which with the \
                 feature's offset {offset} is outside the embedding table [0, {total}) \
                 (nn.Embedding refuses it too)"
            );
        }
        Ok(())
    }

    /// Checked forward (see the type's doc for shapes).
    pub fn forward(
        &self,
        categorical: &Tensor,
        numerical: &Tensor,
        text: &Tensor,
    ) -> Result<Tensor> {
        self.check_categories(categorical)?;
        let categorical = categorical + &self.categorical_embedding_offsets;
        let categorical = categorical.apply(&self.categorical_embeddings);
        let numerical =
            numerical.unsqueeze(-1) * &self.numerical_direction + &self.numerical_anchor;
        let stacked: Vec<Tensor> = self
            .text_projections
            .iter()
            .map(|l| l.ws.transpose(0, 1))
            .collect();
        let text = Tensor::einsum(
            "btm,tmn->btn",
            &[text, &Tensor::stack(&stacked, 0)],
            None::<i64>,
        );
        Ok(Tensor::cat(&[categorical, numerical, text], 1))
    }
}

/// `SiDResidualBlock`: `h + dropout(a * sigmoid(g))` with `[a, g] = chunk(FF(h), 2, dim=1)` and
/// `FF = Linear(H, I) -> GELU -> Linear(I, 2H)`; `[B, H] -> [B, H]`.
#[derive(Debug)]
pub struct SidResidualBlock {
    /// `feedforward.0` and `feedforward.2` (index 1 is the parameter-free GELU).
    pub feedforward: (layers::Linear, layers::Linear),
    pub dropout: f64,
    pub hidden_size: i64,
}

/// `{"arch": "sid_residual_block", "hidden_size": H, "intermediate_size": I, ...}`: the block alone,
/// with PyTorch's default Linear init (inside SiD the model re-initialises biases to zero).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidResidualBlockConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    #[serde(default = "d_half")]
    pub hidden_dropout_prob: f64,
}

impl SidResidualBlockConfig {
    pub fn validate(&self) -> Result<()> {
        at_least(
            1,
            [
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
            ],
        )?;
        probability(false, [("hidden_dropout_prob", self.hidden_dropout_prob)])
    }
}

impl SidResidualBlock {
    pub fn new(
        path: nn::Path,
        hidden: i64,
        intermediate: i64,
        dropout: f64,
        bias: BiasInit,
    ) -> Self {
        let ff = &path / "feedforward";
        Self {
            feedforward: (
                layers::linear(&ff / 0, hidden, intermediate, Some(bias)).into(),
                layers::linear(&ff / 2, intermediate, hidden * 2, Some(bias)).into(),
            ),
            dropout,
            hidden_size: hidden,
        }
    }

    pub fn from_config(path: nn::Path, config: &SidResidualBlockConfig) -> Self {
        Self::new(
            path,
            config.hidden_size,
            config.intermediate_size,
            config.hidden_dropout_prob,
            BiasInit::Uniform,
        )
    }
}

impl nn::ModuleT for SidResidualBlock {
    fn forward_t(&self, h: &Tensor, train: bool) -> Tensor {
        let out = h
            .apply(&self.feedforward.0)
            .gelu("none")
            .apply(&self.feedforward.1);
        let parts = out.chunk(2, 1);
        let gated = &parts[0] * parts[1].sigmoid();
        h + gated.dropout(self.dropout, train)
    }
}

impl Model for SidResidualBlock {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        let h = input(inputs, "input")?;
        Expect {
            name: "input",
            dims: vec![None, Some(self.hidden_size)],
            labels: &["B", "H"],
            unbatched: false,
            dtype: Dtype::Model,
            weight: &self.feedforward.0.ws,
        }
        .check(h)?;
        Ok(nn::ModuleT::forward_t(self, h, train))
    }
}

/// The attention of a `SiDLayer` (`attention` in PyTorch): residual blocks
/// (`attention.0..n-1`), then `Linear(H, F)` (`attention.n`) and a sigmoid; `[B, H] -> [B, F]`.
#[derive(Debug)]
pub struct SidAttention {
    pub blocks: Vec<SidResidualBlock>,
    pub linear: layers::Linear,
}

impl nn::ModuleT for SidAttention {
    fn forward_t(&self, h: &Tensor, train: bool) -> Tensor {
        let h = self
            .blocks
            .iter()
            .fold(h.shallow_clone(), |h, b| h.apply_t(b, train));
        h.apply(&self.linear).sigmoid()
    }
}

/// `SiDLayer`. With a previous hidden state `h` (every layer but the first):
/// `h + droppath(transform(projection(flatten(emb * dropout(attention(h))))))`; the first layer has
/// no attention and no residual: `transform(projection(flatten(emb)))`. `emb` is `[B, F, E]`,
/// the result `[B, H]`.
#[derive(Debug)]
pub struct SidLayer {
    pub attention: Option<SidAttention>,
    pub attention_dropout: f64,
    pub projection: layers::Linear,
    pub transform: Vec<SidResidualBlock>,
    pub droppath: StochasticDepth,
}

impl SidLayer {
    pub fn new(path: nn::Path, config: &SidConfig, use_attention: bool) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let block = |p: nn::Path| {
            SidResidualBlock::new(p, h, i, config.hidden_dropout_prob, BiasInit::Zeros)
        };
        let attention = use_attention.then(|| {
            let att = &path / "attention";
            let n = config.num_attention_blocks;
            SidAttention {
                blocks: (0..n).map(|j| block(&att / j)).collect(),
                linear: layers::linear(
                    &att / n,
                    h,
                    config.num_total_features(),
                    Some(BiasInit::Zeros),
                )
                .into(),
            }
        });
        let transform = &path / "transform";
        Self {
            attention,
            attention_dropout: config.attention_dropout_prob,
            projection: layers::linear(
                &path / "projection",
                config.total_embedding_size(),
                h,
                Some(BiasInit::Zeros),
            )
            .into(),
            transform: (0..config.num_transform_blocks)
                .map(|j| block(&transform / j))
                .collect(),
            droppath: StochasticDepth {
                drop_path_prob: config.drop_path_prob,
            },
        }
    }

    pub fn forward_t(&self, embeddings: &Tensor, hidden: Option<&Tensor>, train: bool) -> Tensor {
        let embeddings = match (&self.attention, hidden) {
            (Some(attention), Some(h)) => {
                let probs = h
                    .apply_t(attention, train)
                    .dropout(self.attention_dropout, train);
                embeddings * probs.unsqueeze(-1)
            }
            _ => embeddings.shallow_clone(),
        };
        let out = embeddings.flatten(1, -1).apply(&self.projection);
        let out = self.transform.iter().fold(out, |o, b| o.apply_t(b, train));
        match hidden {
            Some(h) => h + out.apply_t(&self.droppath, train),
            None => out,
        }
    }
}

/// `SiDModel`: embeddings, `num_hidden_layers` layers, LayerNorm; inputs as the module doc, output
/// `[B, H]`.
#[derive(Debug)]
pub struct SidModel {
    pub embeddings: SidEmbeddings,
    pub layers: Vec<SidLayer>,
    pub normalization: nn::LayerNorm,
    pub config: SidConfig,
}

impl SidModel {
    pub fn new(path: nn::Path, config: &SidConfig) -> Result<Self> {
        config.validate()?;
        let layers_path = &path / "layers";
        Ok(Self {
            embeddings: SidEmbeddings::new(&path / "embeddings", config),
            layers: (0..config.num_hidden_layers)
                .map(|i| SidLayer::new(&layers_path / i, config, i > 0))
                .collect(),
            normalization: layers::layer_norm(&path / "normalization", config.hidden_size),
            config: config.clone(),
        })
    }

    /// Checks the three inputs' shapes, dtypes and device.
    pub fn check_inputs(
        &self,
        categorical: &Tensor,
        numerical: &Tensor,
        text: &Tensor,
    ) -> Result<()> {
        let (c, e) = (&self.config, &self.embeddings);
        // Batch sizes must agree (PyTorch concatenates the three along the features); a single
        // feature column is broadcast over every feature, as PyTorch's arithmetic does.
        let features = |t: &Tensor, n: i64| match t.size().get(1) {
            Some(1) => Some(1),
            _ => Some(n),
        };
        let expect = |name, dims, labels, dtype, weight| Expect {
            name,
            dims,
            labels,
            unbatched: false,
            dtype,
            weight,
        };
        let categories = features(categorical, c.num_categorical_features());
        expect(
            "categorical",
            vec![None, categories],
            &["B", "C"],
            Dtype::Index,
            &e.categorical_embeddings.ws,
        )
        .check(categorical)?;
        let batch = Some(categorical.size()[0]);
        expect(
            "numerical",
            vec![batch, features(numerical, c.num_numerical_features)],
            &["B", "N"],
            Dtype::PromotesToModel,
            &e.numerical_direction,
        )
        .check(numerical)?;
        let text_weight = &e.text_projections[0].ws;
        expect(
            "text",
            vec![
                batch,
                features(text, c.num_text_features),
                Some(c.text_input_size),
            ],
            &["B", "T", "D"],
            Dtype::Model,
            text_weight,
        )
        .check(text)
    }

    pub fn forward_t(
        &self,
        categorical: &Tensor,
        numerical: &Tensor,
        text: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.check_inputs(categorical, numerical, text)?;
        let embeddings = self.embeddings.forward(categorical, numerical, text)?;
        let mut hidden: Option<Tensor> = None;
        for layer in &self.layers {
            hidden = Some(layer.forward_t(&embeddings, hidden.as_ref(), train));
        }
        let hidden = hidden.context("a SiD model needs at least one layer")?;
        Ok(hidden.apply(&self.normalization))
    }
}

/// `SiDClassifier`: `classifier(model(...))`, `[B, num_labels]` logits. The classifier keeps
/// PyTorch's default Linear init (it is outside `SiDModel`, whose init covers the rest).
#[derive(Debug)]
pub struct SidClassifier {
    pub model: SidModel,
    pub classifier: layers::Linear,
}

impl SidClassifier {
    pub fn new(path: nn::Path, config: &SidConfig) -> Result<Self> {
        let num_labels = config.classifier_labels()?;
        Ok(Self {
            model: SidModel::new(&path / "model", config)?,
            classifier: layers::linear(
                &path / "classifier",
                config.hidden_size,
                num_labels,
                Some(BiasInit::Uniform),
            )
            .into(),
        })
    }

    /// Every linear layer of the blocks, the attention heads, the projections and the classifier
    /// (the text projections, used as matrices, stay as they are).
    fn linears_mut(&mut self) -> Vec<&mut layers::Linear> {
        let mut out = Vec::new();
        for layer in &mut self.model.layers {
            let mut blocks: Vec<&mut SidResidualBlock> = layer.transform.iter_mut().collect();
            if let Some(attention) = &mut layer.attention {
                blocks.extend(attention.blocks.iter_mut());
                out.push(&mut attention.linear);
            }
            for block in blocks {
                out.push(&mut block.feedforward.0);
                out.push(&mut block.feedforward.1);
            }
            out.push(&mut layer.projection);
        }
        out.push(&mut self.classifier);
        out
    }

    /// Refuses a training forward once the linear layers are packed for oneDNN (no autograd
    /// through the packed weights).
    fn check_train(&self, train: bool) -> Result<()> {
        if train && self.classifier.is_packed() {
            anyhow::bail!(
                "this SiD classifier is in its inference form (linear layers packed for oneDNN): \
                 a training forward needs the model as built"
            );
        }
        Ok(())
    }

    pub fn forward_t(
        &self,
        categorical: &Tensor,
        numerical: &Tensor,
        text: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self
            .model
            .forward_t(categorical, numerical, text, train)?
            .apply(&self.classifier))
    }
}

impl Model for SidClassifier {
    fn input_names(&self) -> &'static [&'static str] {
        &["categorical", "numerical", "text"]
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.check_train(train)?;
        let [categorical, numerical, text] = sid_inputs(inputs)?;
        self.forward_t(categorical, numerical, text, train)
    }

    /// The normalised hidden state of `SiDModel`, `[B, H]`.
    fn forward_features(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.check_train(train)?;
        let [categorical, numerical, text] = sid_inputs(inputs)?;
        self.model.forward_t(categorical, numerical, text, train)
    }

    /// SiD has no norm to fold; with `pack`, its linear layers run through oneDNN on weights
    /// packed once ([`layers::Linear::pack`]).
    fn fold_batch_norm(&mut self, pack: bool) -> Result<()> {
        if pack {
            for linear in self.linears_mut() {
                linear.pack();
            }
        }
        Ok(())
    }
}

/// `categorical`, `numerical` and `text` of `inputs`.
fn sid_inputs(inputs: &Inputs) -> Result<[&Tensor; 3]> {
    Ok([
        input(inputs, "categorical")?,
        input(inputs, "numerical")?,
        input(inputs, "text")?,
    ])
}
