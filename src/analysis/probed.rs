//! The crate's residual models seen as [`Probed`] networks of [`Unit`]s: the paper's CIFAR nets,
//! torchvision's and timm's ResNets (blocks), the ConvSDS head (its layers) and the SiD classifier
//! (its residual blocks).

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::{Probed, Unit};
use crate::models::cifar::CifarResNet;
use crate::models::conv_sds::{ConvSdsHead, ConvSdsLayer};
use crate::models::resnet::{global_pool, stem, Block, ResNet, Stem};
use crate::models::sid::{SidClassifier, SidResidualBlock};
use crate::models::{input, Inputs};

impl Unit for Block {
    fn branch_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Block::branch_t(self, x, train)
    }
    fn shortcut_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Block::shortcut_t(self, x, train)
    }
    fn join(&self, branch: Tensor, shortcut: Tensor) -> Tensor {
        Block::join(self, branch, shortcut)
    }
    fn skip_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Block::skip_t(self, x, train)
    }
    fn reshapes(&self) -> bool {
        Block::reshapes(self)
    }
    fn weights(&self) -> Vec<(&'static str, &Tensor)> {
        self.conv_weights()
    }
}

/// `layer1..` as stages of `layer{s}.{i}` units.
fn stages_of<'a>(layers: &[&'a Vec<Block>]) -> Vec<Vec<(String, &'a dyn Unit)>> {
    layers
        .iter()
        .enumerate()
        .map(|(s, blocks)| {
            blocks
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("layer{}.{i}", s + 1), b as &dyn Unit))
                .collect()
        })
        .collect()
}

impl Probed for CifarResNet {
    fn stem_t(&self, x: &Inputs, train: bool) -> Result<Tensor> {
        stem(&self.conv1, &self.bn1, input(x, "input")?, train)
    }
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>> {
        stages_of(&[&self.layer1, &self.layer2, &self.layer3])
    }
    fn head_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(global_pool(h).apply(&self.fc))
    }
    fn stem_weights(&self) -> Vec<(String, &Tensor)> {
        vec![("conv1.weight".into(), &self.conv1.ws)]
    }
    fn head_weights(&self) -> Vec<(String, &Tensor)> {
        vec![("fc.weight".into(), &self.fc.ws)]
    }
    fn residual(&self) -> bool {
        !self.layer1.first().is_some_and(Block::is_plain)
    }
}

/// torchvision's and timm's ResNets: the stem (`conv1` or the deep stem, `bn1`, ReLU, max pool),
/// `layer1..layer4`, global pooling and `fc`.
impl Probed for ResNet {
    fn stem_t(&self, x: &Inputs, train: bool) -> Result<Tensor> {
        let h = self.conv1.forward_t(input(x, "input")?, train)?;
        let h = self.bn1.forward_t(&h, train).context("bn1")?.relu();
        Ok(h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false))
    }
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>> {
        stages_of(&[&self.layer1, &self.layer2, &self.layer3, &self.layer4])
    }
    fn head_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        match &self.fc {
            Some(fc) => Ok(global_pool(h).apply(fc)),
            None => {
                bail!("the model is built without `fc` (include_fc: false): no logits to probe")
            }
        }
    }
    fn stem_weights(&self) -> Vec<(String, &Tensor)> {
        match &self.conv1 {
            Stem::Conv(c) => vec![("conv1.weight".into(), &c.ws)],
            Stem::Deep(d) => vec![
                ("conv1.0.weight".into(), &d.conv0.ws),
                ("conv1.3.weight".into(), &d.conv3.ws),
                ("conv1.6.weight".into(), &d.conv6.ws),
            ],
        }
    }
    fn head_weights(&self) -> Vec<(String, &Tensor)> {
        self.fc
            .iter()
            .map(|fc| ("fc.weight".into(), &fc.ws))
            .collect()
    }
    fn residual(&self) -> bool {
        !self.layer1.first().is_some_and(Block::is_plain)
    }
}

/// A `ConvSDSLayer` is `layer_norm(x + relu(conv2(conv1(x))))`: its branch is
/// `relu(conv2(conv1(x)))`, its shortcut the identity; deleted, it is `layer_norm(x)`.
impl Unit for ConvSdsLayer {
    fn branch_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(x.apply(&self.conv1).apply(&self.conv2).relu())
    }
    fn shortcut_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(x.shallow_clone())
    }
    fn join(&self, branch: Tensor, shortcut: Tensor) -> Tensor {
        (shortcut + branch).apply(&self.layer_norm)
    }
    fn skip_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(x.apply(&self.layer_norm))
    }
    fn reshapes(&self) -> bool {
        false
    }
    fn weights(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("conv1.weight", &self.conv1.ws),
            ("conv2.weight", &self.conv2.ws),
        ]
    }
}

/// The ConvSDS head: no stem (its input `[B, L, H]` is checked), the `convs` as one stage, the
/// classifier as head (per-position logits `[B, L, num_labels]`).
impl Probed for ConvSdsHead {
    fn stem_t(&self, x: &Inputs, _train: bool) -> Result<Tensor> {
        let x = input(x, "input")?;
        let c = &self.config;
        if x.dim() != 3 || x.size()[1..] != [c.input_size, c.hidden_size] {
            bail!(
                "input: expected [B, {}, {}], got {:?}",
                c.input_size,
                c.hidden_size,
                x.size()
            );
        }
        // A new leaf, so that the probes can take the gradient at the input.
        Ok(x.detach().set_requires_grad(true))
    }
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>> {
        vec![self
            .convs
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("convs.{i}"), l as &dyn Unit))
            .collect()]
    }
    fn head_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(h.apply(&self.classifier))
    }
    fn stem_weights(&self) -> Vec<(String, &Tensor)> {
        Vec::new()
    }
    fn head_weights(&self) -> Vec<(String, &Tensor)> {
        vec![("classifier.weight".into(), &self.classifier.ws)]
    }
    fn residual(&self) -> bool {
        true
    }
}

/// A `SiDResidualBlock` is `h + dropout(a * sigmoid(g))`: its branch is the gated, dropped-out
/// feed-forward, its shortcut the identity; deleted, it is `h`.
impl Unit for SidResidualBlock {
    fn branch_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let out = h
            .apply(&self.feedforward.0)
            .gelu("none")
            .apply(&self.feedforward.1);
        let parts = out.chunk(2, 1);
        Ok((&parts[0] * parts[1].sigmoid()).dropout(self.dropout, train))
    }
    fn shortcut_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(h.shallow_clone())
    }
    fn join(&self, branch: Tensor, shortcut: Tensor) -> Tensor {
        shortcut + branch
    }
    fn skip_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(h.shallow_clone())
    }
    fn reshapes(&self) -> bool {
        false
    }
    fn weights(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("feedforward.0.weight", &self.feedforward.0.ws),
            ("feedforward.2.weight", &self.feedforward.1.ws),
        ]
    }
}

/// The SiD classifier. Its residual blocks are the units: per layer `i`, the attention blocks
/// (`model.layers.{i}.attention.{j}`, from layer 1 on) and the transform blocks
/// (`model.layers.{i}.transform.{j}`), each chain a stage. They do not form one chain: the
/// attention blocks read the previous hidden state and gate the embeddings, which every layer
/// reads again, and each layer from 1 on adds its output to the hidden state. The stem is the
/// embedding `[B, F, E]`, the head `classifier(normalization(h))`.
impl Probed for SidClassifier {
    fn stem_t(&self, x: &Inputs, _train: bool) -> Result<Tensor> {
        let (c, n, t) = (
            input(x, "categorical")?,
            input(x, "numerical")?,
            input(x, "text")?,
        );
        self.model.check_inputs(c, n, t)?;
        self.model.embeddings.forward(c, n, t)
    }
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>> {
        let mut stages = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            if let Some(a) = &layer.attention {
                stages.push(sid_chain(&format!("model.layers.{i}.attention"), &a.blocks));
            }
            stages.push(sid_chain(
                &format!("model.layers.{i}.transform"),
                &layer.transform,
            ));
        }
        stages
    }
    /// `SiDLayer.forward` of every layer, the blocks run by `next`.
    fn body_t(
        &self,
        embeddings: &Tensor,
        train: bool,
        next: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut chain = |h: Tensor, blocks: usize| (0..blocks).try_fold(h, |h, _| next(&h));
        let mut hidden: Option<Tensor> = None;
        for layer in &self.model.layers {
            let gated = match (&layer.attention, &hidden) {
                (Some(a), Some(h)) => {
                    let probs = chain(h.shallow_clone(), a.blocks.len())?
                        .apply(&a.linear)
                        .sigmoid()
                        .dropout(layer.attention_dropout, train);
                    embeddings * probs.unsqueeze(-1)
                }
                _ => embeddings.shallow_clone(),
            };
            let out = gated.flatten(1, -1).apply(&layer.projection);
            let out = chain(out, layer.transform.len())?;
            hidden = Some(match hidden {
                Some(h) => h + out.apply_t(&layer.droppath, train),
                None => out,
            });
        }
        hidden.context("a SiD model needs at least one layer")
    }
    fn head_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(h.apply(&self.model.normalization).apply(&self.classifier))
    }
    fn stem_weights(&self) -> Vec<(String, &Tensor)> {
        let e = &self.model.embeddings;
        let mut w = vec![
            (
                "model.embeddings.categorical_embeddings.weight".into(),
                &e.categorical_embeddings.ws,
            ),
            (
                "model.embeddings.numerical_direction".into(),
                &e.numerical_direction,
            ),
            (
                "model.embeddings.numerical_anchor".into(),
                &e.numerical_anchor,
            ),
        ];
        for (i, t) in e.text_projections.iter().enumerate() {
            w.push((
                format!("model.embeddings.text_projections.{i}.weight"),
                &t.ws,
            ));
        }
        w
    }
    fn head_weights(&self) -> Vec<(String, &Tensor)> {
        vec![("classifier.weight".into(), &self.classifier.ws)]
    }
    /// In run order: the embeddings, then per layer its attention blocks and `attention.{n}`,
    /// `projection`, its transform blocks; the classifier.
    fn weights(&self) -> Vec<(String, &Tensor)> {
        let mut all = self.stem_weights();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let prefix = format!("model.layers.{i}");
            if let Some(a) = &layer.attention {
                for (name, b) in sid_chain(&format!("{prefix}.attention"), &a.blocks) {
                    all.extend(unit_weights(&name, b));
                }
                let linear = format!("{prefix}.attention.{}.weight", a.blocks.len());
                all.push((linear, &a.linear.ws));
            }
            all.push((format!("{prefix}.projection.weight"), &layer.projection.ws));
            for (name, b) in sid_chain(&format!("{prefix}.transform"), &layer.transform) {
                all.extend(unit_weights(&name, b));
            }
        }
        all.extend(self.head_weights());
        all
    }
    fn residual(&self) -> bool {
        true
    }
    /// The embeddings reach every layer, and the blocks sit inside the layers' branches.
    fn chain(&self) -> bool {
        false
    }
    fn stochastic(&self) -> bool {
        let c = &self.model.config;
        c.hidden_dropout_prob > 0.0 || c.attention_dropout_prob > 0.0 || c.drop_path_prob > 0.0
    }
}

/// SiD's blocks under `prefix` as a stage (`prefix.{j}`).
fn sid_chain<'a>(prefix: &str, blocks: &'a [SidResidualBlock]) -> Vec<(String, &'a dyn Unit)> {
    blocks
        .iter()
        .enumerate()
        .map(|(j, b)| (format!("{prefix}.{j}"), b as &dyn Unit))
        .collect()
}

/// A unit's weights named in full (`name.conv1.weight`).
pub(super) fn unit_weights<'a>(name: &str, unit: &'a dyn Unit) -> Vec<(String, &'a Tensor)> {
    unit.weights()
        .into_iter()
        .map(|(layer, w)| (format!("{name}.{layer}"), w))
        .collect()
}
