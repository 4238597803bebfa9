//! The CIFAR networks of the ResNet paper (§4.2): `6n + 2` layers (n = 3, 5, 7, 9, 18 gives
//! ResNet-20/32/44/56/110). A 3x3 conv to 16 channels, three stages of `n` basic blocks with
//! 16, 32 and 64 filters (stride 2 at the start of stages 2 and 3), global average pooling and a
//! linear classifier; `[B, in_channels, H, W] -> [B, num_classes]` for any `H, W >= 1`. The paper
//! uses shortcut option A (parameter-free); B and C are selectable, and `plain` removes the
//! shortcuts (the paper's plain nets). Weights are initialised like torchvision's ResNet (Kaiming
//! normal, fan-out).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::layers::{self, conv3x3, BiasInit, Conv2d, Norm2d, NormKind};
use super::resnet::{
    global_pool, run_stages, stem, Block, BlockKind, BlockSettings, ShortcutKind, StageBuilder,
};
use super::{input, Inputs, Model};
use crate::validate::at_least;

/// `{"arch": "cifar_resnet", "depth": 56, "shortcut": "A", "plain": false, "in_channels": 1, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CifarResNetConfig {
    /// `6n + 2`.
    pub depth: i64,
    #[serde(default = "d_classes")]
    pub num_classes: i64,
    #[serde(default = "d_shortcut")]
    pub shortcut: ShortcutKind,
    #[serde(default)]
    pub plain: bool,
    #[serde(default = "super::resnet::d_in_channels")]
    pub in_channels: i64,
}

fn d_classes() -> i64 {
    10
}
fn d_shortcut() -> ShortcutKind {
    ShortcutKind::A
}

impl CifarResNetConfig {
    /// Blocks per stage, `(depth - 2) / 6`.
    pub fn blocks_per_stage(&self) -> i64 {
        (self.depth - 2) / 6
    }

    pub fn validate(&self) -> Result<()> {
        if self.depth < 8 || (self.depth - 2) % 6 != 0 {
            bail!(
                "depth: must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {}",
                self.depth
            );
        }
        at_least(
            1,
            [
                ("num_classes", self.num_classes),
                ("in_channels", self.in_channels),
            ],
        )
    }
}

/// The paper's CIFAR ResNet (see the module doc); names follow torchvision (`conv1`, `bn1`,
/// `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`).
#[derive(Debug)]
pub struct CifarResNet {
    pub conv1: Conv2d,
    pub bn1: Norm2d,
    pub layer1: Vec<Block>,
    pub layer2: Vec<Block>,
    pub layer3: Vec<Block>,
    pub fc: nn::Linear,
}

impl CifarResNet {
    pub fn new(path: nn::Path, c: &CifarResNetConfig) -> Result<Self> {
        c.validate()?;
        let s = BlockSettings {
            kind: BlockKind::Basic,
            groups: 1,
            width_per_group: 64,
            norm: NormKind::BatchNorm,
            shortcut: c.shortcut,
            plain: c.plain,
        };
        let n = c.blocks_per_stage();
        let mut builder = StageBuilder::new(s, 16);
        let layer1 = builder.stage(&(&path / "layer1"), 16, n, 1, false);
        let layer2 = builder.stage(&(&path / "layer2"), 32, n, 2, false);
        let layer3 = builder.stage(&(&path / "layer3"), 64, n, 2, false);
        Ok(Self {
            conv1: conv3x3(&path / "conv1", c.in_channels, 16, 1, 1, 1),
            bn1: Norm2d::new(&path / "bn1", NormKind::BatchNorm, 16),
            layer1,
            layer2,
            layer3,
            fc: layers::linear(&path / "fc", 64, c.num_classes, Some(BiasInit::Uniform)),
        })
    }

    /// Folds every batch norm into the convolution before it, for eval-mode inference only; see
    /// [`Norm2d::fold_into`]; with `pack` the convolutions are packed for oneDNN.
    pub fn fold_batch_norm(&mut self, pack: bool) {
        self.bn1.fold_into(&mut self.conv1, pack);
        let stages = [&mut self.layer1, &mut self.layer2, &mut self.layer3];
        for block in stages.into_iter().flatten() {
            block.fold_batch_norm(pack);
        }
    }

    /// The outputs of `layer1` .. `layer3`.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let h = stem(&self.conv1, &self.bn1, x, train)?;
        let layers = [&self.layer1, &self.layer2, &self.layer3];
        run_stages(&layers.map(Vec::as_slice), h, train)
    }

    /// Pooled features `[B, 64]`.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let stages = self.forward_stages(x, train)?;
        Ok(global_pool(&stages[2]))
    }

    /// Logits `[B, num_classes]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_features(x, train)?.apply(&self.fc))
    }
}

impl Model for CifarResNet {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.forward_t(input(inputs, "input")?, train)
    }

    fn forward_features(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        CifarResNet::forward_features(self, input(inputs, "input")?, train)
    }

    fn fold_batch_norm(&mut self, pack: bool) -> Result<()> {
        CifarResNet::fold_batch_norm(self, pack);
        Ok(())
    }
}
