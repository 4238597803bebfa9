//! The ResNet family (He et al. 2015), state_dict-compatible with torchvision 0.26's
//! `models/resnet.py`, plus the paper's plain networks and shortcut options.
//!
//! * [`BasicBlock`] (two 3x3 convs) and [`Bottleneck`] (1x1, 3x3, 1x1; the stride sits on the 3x3
//!   conv, torchvision's "v1.5"), each `relu(branch(x) + shortcut(x))`.
//! * Shortcuts (paper §3.3): option A, identity with the new channels zero-padded and a strided
//!   subsample (no parameters); option B, a 1x1 projection + norm where the shape changes
//!   (torchvision's choice); option C, a projection on every block. `plain` removes the shortcut.
//! * [`ResNet`]: 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool, `fc`;
//!   `[B, C, H, W] -> [B, num_classes]` for any `H, W >= 1`, as in PyTorch (every stride rounds
//!   up, so a 1x1 image reaches `fc` as 1x1 features).
//! * Options for the networks of timm ([`super::timm`]: deep stems, average-pool shortcuts,
//!   squeeze-and-excitation) and Hugging Face ([`super::huggingface`]: the stride on the
//!   bottleneck's first 1x1 conv, a strided first stage), and free stage widths (`channels`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::layers::{
    self, conv1x1, conv2d_no_bias, conv3x3, conv_norm_add_relu, conv_norm_relu, BiasInit, Conv2d,
    Conv2dSpec, Norm2d, NormKind,
};
use super::timm::{shortcut_conv, AttnLayer, DeepStem, ShortcutPool, SqueezeExcite, StemType};
use super::{input, Dtype, Expect, Inputs, Model};
use crate::validate::at_least;

/// Which residual block a network stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3x3 convs; expansion 1.
    Basic,
    /// 1x1, 3x3 (grouped, strided), 1x1; expansion 4.
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The shortcut options of the paper (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ShortcutKind {
    /// Identity; where the shape changes, strided subsample and zero-padded channels.
    A,
    /// Identity; a 1x1 projection + norm where the shape changes (torchvision).
    #[default]
    B,
    /// A 1x1 projection + norm on every block.
    C,
}

/// The settings every block of a network shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    pub kind: BlockKind,
    pub groups: i64,
    pub width_per_group: i64,
    pub norm: NormKind,
    pub shortcut: ShortcutKind,
    pub plain: bool,
}

/// The block variations of timm and Hugging Face, shared by every block of a network.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockVariant {
    /// Shortcut projections pool first, then apply an unstrided 1x1 conv (timm's `avg_down`).
    pub avg_down: bool,
    /// What closes the residual branch, after its last norm (timm's `attn_layer`).
    pub attn_layer: AttnLayer,
    /// A bottleneck's stride sits on its first 1x1 conv, not on the 3x3 (ResNet v1; Hugging
    /// Face's `downsample_in_bottleneck`).
    pub stride_in_1x1: bool,
}

/// Where a block sits: its channels, its stride and dilations.
#[derive(Debug, Clone, Copy)]
pub struct BlockPlace {
    pub inplanes: i64,
    pub planes: i64,
    pub stride: i64,
    /// The dilation of the block's strided 3x3 conv (the previous stage's for a stage's first
    /// block, as torchvision and timm do).
    pub dilation: i64,
    /// The stage's dilation, which an average-pool shortcut follows.
    pub stage_dilation: i64,
}

/// The shortcut branch (`downsample` in torchvision) of a block that does not use the identity.
#[derive(Debug)]
pub enum Downsample {
    /// `downsample.0` (1x1 conv, strided) and `downsample.1` (norm).
    Projection { conv: Conv2d, norm: Norm2d },
    /// timm's average-pool shortcut: `downsample.0` (pool, no parameters), `downsample.1` (1x1
    /// conv), `downsample.2` (norm).
    AvgProjection {
        pool: ShortcutPool,
        conv: Conv2d,
        norm: Norm2d,
    },
    /// Option A: `x[:, :, ::stride, ::stride]` with `front` zero channels before and `back` after.
    Pad { stride: i64, front: i64, back: i64 },
}

impl Downsample {
    /// The shortcut a block from `inplanes` to `outplanes` channels at `stride` gets, if not the
    /// identity; projections pool first with `pool` when given (timm's `avg_down`).
    fn new(
        path: &nn::Path,
        s: &BlockSettings,
        inplanes: i64,
        outplanes: i64,
        stride: i64,
        pool: Option<ShortcutPool>,
    ) -> Option<Self> {
        if s.plain {
            return None;
        }
        let changes = stride != 1 || inplanes != outplanes;
        let sub = path / "downsample";
        let projection = || match pool {
            Some(pool) => Downsample::AvgProjection {
                pool,
                conv: shortcut_conv(&sub / 1, inplanes, outplanes),
                norm: Norm2d::new(&sub / 2, s.norm, outplanes),
            },
            None => Self::projection(&sub, s.norm, inplanes, outplanes, stride),
        };
        match s.shortcut {
            ShortcutKind::C => Some(projection()),
            ShortcutKind::B if changes => Some(projection()),
            ShortcutKind::A if changes => {
                let front = (outplanes - inplanes) / 2;
                Some(Downsample::Pad {
                    stride,
                    front,
                    back: outplanes - inplanes - front,
                })
            }
            _ => None,
        }
    }

    fn projection(
        path: &nn::Path,
        norm: NormKind,
        inplanes: i64,
        outplanes: i64,
        stride: i64,
    ) -> Self {
        Downsample::Projection {
            conv: conv1x1(path / 0, inplanes, outplanes, stride),
            norm: Norm2d::new(path / 1, norm, outplanes),
        }
    }

    fn fold_batch_norm(&mut self, pack: bool) {
        match self {
            Downsample::Projection { conv, norm }
            | Downsample::AvgProjection { conv, norm, .. } => norm.fold_into(conv, pack),
            Downsample::Pad { .. } => {}
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match self {
            Downsample::Projection { conv, norm } => norm.forward_t(&x.apply(conv), train)?,
            Downsample::AvgProjection { pool, conv, norm } => {
                norm.forward_t(&pool.forward(x).apply(conv), train)?
            }
            Downsample::Pad {
                stride,
                front,
                back,
            } => {
                let x = if *stride == 1 {
                    x.shallow_clone()
                } else {
                    x.slice(2, 0, None, *stride).slice(3, 0, None, *stride)
                };
                x.constant_pad_nd([0, 0, 0, 0, *front, *back])
            }
        })
    }
}

/// `se(out)`, or `out` without squeeze-and-excitation.
fn excite(se: &Option<SqueezeExcite>, out: Tensor) -> Tensor {
    match se {
        Some(se) => out.apply(se),
        None => out,
    }
}

/// The end of a residual branch: `relu(se(norm(conv(out))) + shortcut(x))`, or without the
/// shortcut for plain networks; one fused op where `conv` is packed and nothing comes between,
/// which writes the sum into the shortcut's memory where `x` (or the projection of it) has no other
/// handle ([`Conv2d::forward_fused_into`]).
#[allow(clippy::too_many_arguments)]
fn close(
    conv: &Conv2d,
    norm: &Norm2d,
    out: &Tensor,
    se: &Option<SqueezeExcite>,
    x: Tensor,
    downsample: &Option<Downsample>,
    plain: bool,
    train: bool,
) -> Result<Tensor> {
    if plain && se.is_none() {
        return conv_norm_relu(conv, norm, out, train);
    }
    let branch = || -> Result<Tensor> { Ok(excite(se, norm.forward_t(&out.apply(conv), train)?)) };
    if plain {
        return Ok(branch()?.relu());
    }
    let identity = match downsample {
        Some(d) => d.forward_t(&x, train)?,
        None => x,
    };
    match (se, norm) {
        (None, Norm2d::Folded) if !train && conv.is_packed() => {
            conv.forward_fused_into(out, true, identity)
        }
        (None, _) => conv_norm_add_relu(conv, norm, out, &identity, train),
        (Some(_), _) => Ok((branch()? + identity).relu()),
    }
}

/// torchvision's `BasicBlock`: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`,
/// `[B, inplanes, H, W] -> [B, planes, H / stride, W / stride]`.
#[derive(Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: Norm2d,
    pub conv2: Conv2d,
    pub bn2: Norm2d,
    /// timm's squeeze-and-excitation after `bn2`.
    pub se: Option<SqueezeExcite>,
    pub downsample: Option<Downsample>,
    pub plain: bool,
    /// The block's stride (on `conv1`, or on the 3x3 conv of a bottleneck).
    pub stride: i64,
}

/// torchvision's `Bottleneck`: 1x1 to `width`, 3x3 (stride, groups, dilation), 1x1 to
/// `4 * planes`, with `width = floor(planes * width_per_group / 64) * groups`.
#[derive(Debug)]
pub struct Bottleneck {
    pub conv1: Conv2d,
    pub bn1: Norm2d,
    pub conv2: Conv2d,
    pub bn2: Norm2d,
    pub conv3: Conv2d,
    pub bn3: Norm2d,
    /// timm's squeeze-and-excitation after `bn3`.
    pub se: Option<SqueezeExcite>,
    pub downsample: Option<Downsample>,
    pub plain: bool,
    /// The block's stride (on `conv1`, or on the 3x3 conv of a bottleneck).
    pub stride: i64,
}

/// One residual block of either kind.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // built once per network; boxing would only add indirection
pub enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    /// Builds block `path` (e.g. `layer2.0`) from `inplanes` to `planes * expansion` channels.
    pub fn new(path: &nn::Path, s: &BlockSettings, v: &BlockVariant, at: BlockPlace) -> Self {
        let BlockPlace {
            inplanes,
            planes,
            stride,
            dilation,
            stage_dilation,
        } = at;
        let out = planes * s.kind.expansion();
        let pool = v
            .avg_down
            .then(|| ShortcutPool::new(stride, stage_dilation));
        let downsample = Downsample::new(path, s, inplanes, out, stride, pool);
        let se = match v.attn_layer {
            AttnLayer::Se => Some(SqueezeExcite::new(&(path / "se"), out)),
            AttnLayer::None => None,
        };
        match s.kind {
            BlockKind::Basic => Block::Basic(BasicBlock {
                conv1: conv3x3(path / "conv1", inplanes, planes, stride, 1, 1),
                bn1: Norm2d::new(path / "bn1", s.norm, planes),
                conv2: conv3x3(path / "conv2", planes, planes, 1, 1, 1),
                bn2: Norm2d::new(path / "bn2", s.norm, planes),
                se,
                downsample,
                plain: s.plain,
                stride,
            }),
            BlockKind::Bottleneck => {
                let width = bottleneck_width(planes, s.width_per_group, s.groups);
                let (stride1, stride3) = if v.stride_in_1x1 {
                    (stride, 1)
                } else {
                    (1, stride)
                };
                Block::Bottleneck(Bottleneck {
                    conv1: conv1x1(path / "conv1", inplanes, width, stride1),
                    bn1: Norm2d::new(path / "bn1", s.norm, width),
                    conv2: conv3x3(path / "conv2", width, width, stride3, s.groups, dilation),
                    bn2: Norm2d::new(path / "bn2", s.norm, width),
                    conv3: conv1x1(path / "conv3", width, out, 1),
                    bn3: Norm2d::new(path / "bn3", s.norm, out),
                    se,
                    downsample,
                    plain: s.plain,
                    stride,
                })
            }
        }
    }

    /// Folds every batch norm of the block into its convolution ([`Norm2d::fold_into`]).
    pub fn fold_batch_norm(&mut self, pack: bool) {
        let downsample = match self {
            Block::Basic(b) => {
                b.bn1.fold_into(&mut b.conv1, pack);
                b.bn2.fold_into(&mut b.conv2, pack);
                &mut b.downsample
            }
            Block::Bottleneck(b) => {
                b.bn1.fold_into(&mut b.conv1, pack);
                b.bn2.fold_into(&mut b.conv2, pack);
                b.bn3.fold_into(&mut b.conv3, pack);
                &mut b.downsample
            }
        };
        if let Some(d) = downsample {
            d.fold_batch_norm(pack);
        }
    }

    /// The norm closing the residual branch (`bn2` / `bn3`), zeroed by `zero_init_residual`.
    pub fn last_norm(&self) -> &Norm2d {
        match self {
            Block::Basic(b) => &b.bn2,
            Block::Bottleneck(b) => &b.bn3,
        }
    }
}

/// `int(planes * (width_per_group / 64.)) * groups`, as torchvision computes it.
pub fn bottleneck_width(planes: i64, width_per_group: i64, groups: i64) -> i64 {
    ((planes as f64) * (width_per_group as f64 / 64.0)) as i64 * groups
}

impl Block {
    /// `[B, inplanes, H, W] -> [B, planes * expansion, H', W']`, `H' = ceil(H / stride)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_owned(x.shallow_clone(), train)
    }

    /// [`Block::forward_t`] taking `x` by value: where `x` is its tensor's only handle, the
    /// inference form adds the branch into `x`'s memory instead of a new tensor.
    pub fn forward_owned(&self, x: Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Basic(b) => {
                let out = conv_norm_relu(&b.conv1, &b.bn1, &x, train)?;
                close(
                    &b.conv2,
                    &b.bn2,
                    &out,
                    &b.se,
                    x,
                    &b.downsample,
                    b.plain,
                    train,
                )
            }
            Block::Bottleneck(b) => {
                let out = conv_norm_relu(&b.conv1, &b.bn1, &x, train)?;
                let out = conv_norm_relu(&b.conv2, &b.bn2, &out, train)?;
                close(
                    &b.conv3,
                    &b.bn3,
                    &out,
                    &b.se,
                    x,
                    &b.downsample,
                    b.plain,
                    train,
                )
            }
        }
    }
}

/// The parts of a block taken apart, for lesion studies and gradient-path analysis
/// (`crate::analysis`): the forward is `join(branch(x), shortcut(x))`.
impl Block {
    /// The residual branch before the join, `F(x)`: `bn2(conv2(relu(bn1(conv1(x)))))` (basic),
    /// with squeeze-and-excitation where built.
    pub fn branch_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match self {
            Block::Basic(b) => {
                let out = b.bn1.forward_t(&x.apply(&b.conv1), train)?.relu();
                excite(&b.se, b.bn2.forward_t(&out.apply(&b.conv2), train)?)
            }
            Block::Bottleneck(b) => {
                let out = b.bn1.forward_t(&x.apply(&b.conv1), train)?.relu();
                let out = b.bn2.forward_t(&out.apply(&b.conv2), train)?.relu();
                excite(&b.se, b.bn3.forward_t(&out.apply(&b.conv3), train)?)
            }
        })
    }

    /// The shortcut `s(x)`: identity, projection or option-A pad. A plain block has none; there
    /// this is the parameter-free option-A shortcut (identity when the shape stays), which is what
    /// a deleted plain block leaves in place.
    pub fn shortcut_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let downsample = match self {
            Block::Basic(b) => &b.downsample,
            Block::Bottleneck(b) => &b.downsample,
        };
        match downsample {
            Some(d) if !self.is_plain() => d.forward_t(x, train),
            _ => {
                let (inplanes, outplanes) = self.channels();
                let stride = self.stride();
                if stride == 1 && inplanes == outplanes {
                    return Ok(x.shallow_clone());
                }
                let front = (outplanes - inplanes) / 2;
                if front < 0 {
                    bail!("a block from {inplanes} to {outplanes} channels has no parameter-free shortcut");
                }
                Downsample::Pad {
                    stride,
                    front,
                    back: outplanes - inplanes - front,
                }
                .forward_t(x, train)
            }
        }
    }

    /// `relu(branch + shortcut)`, or `relu(branch)` for a plain block.
    pub fn join(&self, branch: Tensor, shortcut: Tensor) -> Tensor {
        if self.is_plain() {
            branch.relu()
        } else {
            (branch + shortcut).relu()
        }
    }

    /// The block deleted (Veit et al. 2016): its residual branch removed, `relu(s(x))`, which is
    /// `x` itself after a ReLU for the identity and option-A shortcuts. Plain blocks become the
    /// parameter-free shortcut of [`Block::shortcut_t`].
    pub fn skip_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.shortcut_t(x, train)?.relu())
    }

    pub fn is_plain(&self) -> bool {
        match self {
            Block::Basic(b) => b.plain,
            Block::Bottleneck(b) => b.plain,
        }
    }

    /// `(in, out)` channels.
    pub fn channels(&self) -> (i64, i64) {
        match self {
            Block::Basic(b) => (b.conv1.ws.size()[1], b.conv2.ws.size()[0]),
            Block::Bottleneck(b) => (b.conv1.ws.size()[1], b.conv3.ws.size()[0]),
        }
    }

    /// The block's total stride.
    pub fn stride(&self) -> i64 {
        match self {
            Block::Basic(b) => b.stride,
            Block::Bottleneck(b) => b.stride,
        }
    }

    /// Whether the block changes its input's shape (channels or resolution).
    pub fn reshapes(&self) -> bool {
        let (i, o) = self.channels();
        i != o || self.stride() != 1
    }

    /// The convolution weights of the residual branch, input side first, with their names
    /// relative to the block (`conv1.weight`, ...).
    pub fn conv_weights(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Block::Basic(b) => vec![("conv1.weight", &b.conv1.ws), ("conv2.weight", &b.conv2.ws)],
            Block::Bottleneck(b) => vec![
                ("conv1.weight", &b.conv1.ws),
                ("conv2.weight", &b.conv2.ws),
                ("conv3.weight", &b.conv3.ws),
            ],
        }
    }
}

/// Builds stages the way torchvision's `ResNet._make_layer` does, carrying its running state:
/// the channels entering the next stage (`inplanes`) and the current dilation.
#[derive(Debug, Clone, Copy)]
pub struct StageBuilder {
    pub settings: BlockSettings,
    /// timm's and Hugging Face's variations (none by default).
    pub variant: BlockVariant,
    pub inplanes: i64,
    pub dilation: i64,
}

impl StageBuilder {
    pub fn new(settings: BlockSettings, inplanes: i64) -> Self {
        Self {
            settings,
            variant: BlockVariant::default(),
            inplanes,
            dilation: 1,
        }
    }

    /// `blocks` blocks under `path` (`layer1`, ...) with `planes` channels (times the expansion);
    /// the first one has `stride`, or, when `dilate`, keeps stride 1 and the dilation grows by
    /// `stride` for the blocks after it.
    pub fn stage(
        &mut self,
        path: &nn::Path,
        planes: i64,
        blocks: i64,
        stride: i64,
        dilate: bool,
    ) -> Vec<Block> {
        let previous_dilation = self.dilation;
        let stride = if dilate {
            self.dilation *= stride;
            1
        } else {
            stride
        };
        (0..blocks)
            .map(|i| {
                let (st, dil) = if i == 0 {
                    (stride, previous_dilation)
                } else {
                    (1, self.dilation)
                };
                let at = BlockPlace {
                    inplanes: self.inplanes,
                    planes,
                    stride: st,
                    dilation: dil,
                    stage_dilation: self.dilation,
                };
                let block = Block::new(&(path / i), &self.settings, &self.variant, at);
                self.inplanes = planes * self.settings.kind.expansion();
                block
            })
            .collect()
    }
}

/// Zeroes the last norm's weight of every block (torchvision's `zero_init_residual`).
pub fn zero_init_residual<'a>(blocks: impl Iterator<Item = &'a Block>) {
    tch::no_grad(|| {
        for b in blocks {
            if let Some(weight) = b.last_norm().weight() {
                let _ = weight.shallow_clone().f_zero_();
            }
        }
    });
}

/// The stem of a network: `relu(bn1(conv1(x)))` on a checked image batch; errors name the layer.
pub fn stem(conv1: &Conv2d, bn1: &Norm2d, x: &Tensor, train: bool) -> Result<Tensor> {
    check_image(x, conv1)?;
    conv_norm_relu(conv1, bn1, x, train).context("bn1")
}

/// Runs `layer1`, `layer2`, ... from `h` and returns each one's output; errors name the block.
pub fn run_stages(layers: &[&[Block]], mut h: Tensor, train: bool) -> Result<Vec<Tensor>> {
    let mut outputs = Vec::with_capacity(layers.len());
    for (s, blocks) in layers.iter().enumerate() {
        for (i, block) in blocks.iter().enumerate() {
            h = block
                .forward_owned(h, train)
                .with_context(|| format!("layer{}.{i}", s + 1))?;
        }
        outputs.push(h.shallow_clone());
    }
    Ok(outputs)
}

/// The configuration of an ImageNet-style ResNet, torchvision's constructor arguments plus the
/// paper's options and the architecture options of timm and Hugging Face. A named constructor
/// (`{"arch": "resnet50"}`, `{"arch": "timm", "name": "resnet50d"}`) fixes every field of
/// [`Architecture`]; `{"arch": "resnet"}` takes them from the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width_per_group: Option<i64>,
    /// Planes of each stage (default `[64, 128, 256, 512]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<[i64; 4]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stem_type: Option<StemType>,
    /// Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stem_width: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_down: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_layer: Option<AttnLayer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride_in_1x1: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downsample_in_first_stage: Option<bool>,
    #[serde(default = "d_num_classes")]
    pub num_classes: i64,
    #[serde(default)]
    pub zero_init_residual: bool,
    #[serde(default)]
    pub replace_stride_with_dilation: [bool; 3],
    #[serde(default)]
    pub norm: NormKind,
    #[serde(default)]
    pub shortcut: ShortcutKind,
    #[serde(default)]
    pub plain: bool,
    #[serde(default = "d_in_channels")]
    pub in_channels: i64,
    /// `false` drops `fc`: the model returns the pooled features (`[B, channels[3] * expansion]`).
    #[serde(default = "d_true")]
    pub include_fc: bool,
}

fn d_num_classes() -> i64 {
    1000
}
pub(super) fn d_in_channels() -> i64 {
    3
}
fn d_true() -> bool {
    true
}

impl Default for ResNetConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// torchvision's stage widths.
pub const CHANNELS: [i64; 4] = [64, 128, 256, 512];

/// What a named constructor fixes: torchvision's `ResNet(block, layers, groups=,
/// width_per_group=)`, timm's `model_args`, or what a Hugging Face config implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    pub block: BlockKind,
    pub layers: [i64; 4],
    pub groups: i64,
    pub width_per_group: i64,
    /// Planes of each stage; stage `i` outputs `channels[i] * expansion` channels.
    pub channels: [i64; 4],
    pub stem_type: StemType,
    /// The 7x7 stem's output channels, or the deep stems' base width (timm's `stem_width`).
    pub stem_width: i64,
    /// See [`BlockVariant`].
    pub avg_down: bool,
    pub attn_layer: AttnLayer,
    pub stride_in_1x1: bool,
    /// The first stage strides by 2 as well (Hugging Face's `downsample_in_first_stage`).
    pub downsample_in_first_stage: bool,
}

impl Architecture {
    /// torchvision's `ResNet(block, layers, groups=groups, width_per_group=width_per_group)`.
    pub const fn torchvision(
        block: BlockKind,
        layers: [i64; 4],
        groups: i64,
        width_per_group: i64,
    ) -> Self {
        Self {
            block,
            layers,
            groups,
            width_per_group,
            channels: CHANNELS,
            stem_type: StemType::Default,
            stem_width: 64,
            avg_down: false,
            attn_layer: AttnLayer::None,
            stride_in_1x1: false,
            downsample_in_first_stage: false,
        }
    }

    /// The stem's output channels.
    pub fn stem_channels(&self) -> i64 {
        self.stem_type.out_channels(self.stem_width)
    }

    /// The channels of the features `fc` reads.
    pub fn features(&self) -> i64 {
        self.channels[3] * self.block.expansion()
    }

    /// The block variations every block shares.
    pub fn variant(&self) -> BlockVariant {
        BlockVariant {
            avg_down: self.avg_down,
            attn_layer: self.attn_layer,
            stride_in_1x1: self.stride_in_1x1,
        }
    }
}

/// A named constructor: one of torchvision's `models/resnet.py` (`resnet50()` is
/// `ResNet(Bottleneck, [3, 4, 6, 3])`; its name is the config's `arch`) or of timm's
/// ([`super::timm::TIMM`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Constructor {
    pub name: &'static str,
    pub architecture: Architecture,
}

const fn tv(
    name: &'static str,
    block: BlockKind,
    layers: [i64; 4],
    groups: i64,
    width: i64,
) -> Constructor {
    Constructor {
        name,
        architecture: Architecture::torchvision(block, layers, groups, width),
    }
}

/// torchvision's ResNet constructors: adding one is one line here.
pub const TORCHVISION: &[Constructor] = {
    use BlockKind::{Basic, Bottleneck};
    &[
        tv("resnet18", Basic, [2, 2, 2, 2], 1, 64),
        tv("resnet34", Basic, [3, 4, 6, 3], 1, 64),
        tv("resnet50", Bottleneck, [3, 4, 6, 3], 1, 64),
        tv("resnet101", Bottleneck, [3, 4, 23, 3], 1, 64),
        tv("resnet152", Bottleneck, [3, 8, 36, 3], 1, 64),
        tv("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], 32, 4),
        tv("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], 32, 8),
        tv("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], 64, 4),
        tv("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], 1, 128),
        tv("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], 1, 128),
    ]
};

impl Constructor {
    /// The torchvision constructor called `name`.
    pub fn named(name: &str) -> Option<&'static Constructor> {
        TORCHVISION.iter().find(|c| c.name == name)
    }
}

/// A [`ResNetConfig`] with its architecture settled and every value checked.
#[derive(Debug, Clone)]
pub struct ResolvedResNet {
    pub architecture: Architecture,
    pub config: ResNetConfig,
}

/// A field's name, its value in a config (if given) and in an architecture, as JSON.
type FieldValues = (&'static str, Option<serde_json::Value>, serde_json::Value);

fn field<G: Serialize, F: Serialize>(
    name: &'static str,
    given: Option<&G>,
    fixed: &F,
) -> FieldValues {
    (name, given.map(to_json), to_json(fixed))
}

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("plain data serialises")
}

impl ResNetConfig {
    /// Settles the architecture, `constructor`'s or (`None`, `{"arch": "resnet"}`) the config's
    /// own, and checks every value.
    pub fn resolve(&self, constructor: Option<&Constructor>) -> Result<ResolvedResNet> {
        let architecture = match constructor {
            Some(c) => self.fixed_by(c)?,
            None => self.given()?,
        };
        self.validate(&architecture)?;
        Ok(ResolvedResNet {
            architecture,
            config: self.clone(),
        })
    }

    /// The config with every architecture field set to `a`'s, as `{"arch": "resnet"}` gives it.
    pub fn with_architecture(mut self, a: &Architecture) -> Self {
        self.block = Some(a.block);
        self.layers = Some(a.layers.to_vec());
        self.groups = Some(a.groups);
        self.width_per_group = Some(a.width_per_group);
        self.channels = Some(a.channels);
        self.stem_type = Some(a.stem_type);
        self.stem_width = Some(a.stem_width);
        self.avg_down = Some(a.avg_down);
        self.attn_layer = Some(a.attn_layer);
        self.stride_in_1x1 = Some(a.stride_in_1x1);
        self.downsample_in_first_stage = Some(a.downsample_in_first_stage);
        self
    }

    /// Each architecture field: its name, the config's value if given, and `a`'s.
    fn architecture_fields(&self, a: &Architecture) -> [FieldValues; 11] {
        [
            field("block", self.block.as_ref(), &a.block),
            field("layers", self.layers.as_ref(), &a.layers),
            field("groups", self.groups.as_ref(), &a.groups),
            field(
                "width_per_group",
                self.width_per_group.as_ref(),
                &a.width_per_group,
            ),
            field("channels", self.channels.as_ref(), &a.channels),
            field("stem_type", self.stem_type.as_ref(), &a.stem_type),
            field("stem_width", self.stem_width.as_ref(), &a.stem_width),
            field("avg_down", self.avg_down.as_ref(), &a.avg_down),
            field("attn_layer", self.attn_layer.as_ref(), &a.attn_layer),
            field(
                "stride_in_1x1",
                self.stride_in_1x1.as_ref(),
                &a.stride_in_1x1,
            ),
            field(
                "downsample_in_first_stage",
                self.downsample_in_first_stage.as_ref(),
                &a.downsample_in_first_stage,
            ),
        ]
    }

    /// `c`'s architecture; the config may repeat what `c` fixes but not change it.
    fn fixed_by(&self, c: &Constructor) -> Result<Architecture> {
        for (field, given, fixed) in self.architecture_fields(&c.architecture) {
            if given.is_some_and(|g| g != fixed) {
                bail!(
                    "{field}: {} fixes it to {fixed}; use \"arch\": \"resnet\" to choose",
                    c.name
                );
            }
        }
        Ok(c.architecture)
    }

    /// The architecture of `{"arch": "resnet"}`: `block` and `layers` given, the rest as
    /// torchvision's `ResNet` unless given.
    fn given(&self) -> Result<Architecture> {
        let block = self
            .block
            .context("block: required for \"arch\": \"resnet\" (basic or bottleneck)")?;
        let layers = self
            .layers
            .as_deref()
            .context("layers: required for \"arch\": \"resnet\"")?;
        let layers: [i64; 4] = layers
            .try_into()
            .map_err(|_| anyhow::anyhow!("layers: needs 4 stage depths, got {}", layers.len()))?;
        let d = Architecture::torchvision(block, layers, 1, 64);
        Ok(Architecture {
            groups: self.groups.unwrap_or(d.groups),
            width_per_group: self.width_per_group.unwrap_or(d.width_per_group),
            channels: self.channels.unwrap_or(d.channels),
            stem_type: self.stem_type.unwrap_or(d.stem_type),
            stem_width: self.stem_width.unwrap_or(d.stem_width),
            avg_down: self.avg_down.unwrap_or(d.avg_down),
            attn_layer: self.attn_layer.unwrap_or(d.attn_layer),
            stride_in_1x1: self.stride_in_1x1.unwrap_or(d.stride_in_1x1),
            downsample_in_first_stage: self
                .downsample_in_first_stage
                .unwrap_or(d.downsample_in_first_stage),
            ..d
        })
    }

    /// What torchvision's `ResNet.__init__` and its blocks refuse, plus empty stages and widths.
    fn validate(&self, a: &Architecture) -> Result<()> {
        let stages = a.layers.iter().enumerate();
        at_least(1, stages.map(|(i, n)| (format!("layers[{i}]"), *n)))?;
        let widths = a.channels.iter().enumerate();
        at_least(1, widths.map(|(i, c)| (format!("channels[{i}]"), *c)))?;
        at_least(
            1,
            [
                ("groups", a.groups),
                ("width_per_group", a.width_per_group),
                ("stem_width", a.stem_width),
                ("num_classes", self.num_classes),
                ("in_channels", self.in_channels),
            ],
        )?;
        if a.stem_type == StemType::DeepTiered && a.stem_width < 4 {
            bail!(
                "stem_width: deep_tiered needs at least 4, got {}",
                a.stem_width
            );
        }
        let (groups, width) = (a.groups, a.width_per_group);
        if a.block == BlockKind::Basic {
            if groups != 1 || width != 64 {
                bail!("groups/width_per_group: BasicBlock only supports groups=1 and width_per_group=64");
            }
            if self.replace_stride_with_dilation.iter().any(|d| *d) {
                bail!("replace_stride_with_dilation: dilation > 1 is not supported by BasicBlock");
            }
            if a.stride_in_1x1 {
                bail!("stride_in_1x1: BasicBlock has no 1x1 conv");
            }
        }
        let narrowest = a.channels.iter().min().copied().unwrap_or(1);
        if bottleneck_width(narrowest, width, groups) < 1 {
            bail!("width_per_group: {width} gives an empty bottleneck");
        }
        if let NormKind::GroupNorm { num_groups } = self.norm {
            let mut channels = vec![a.stem_channels()];
            channels.extend(a.stem_type.deep_widths(a.stem_width).unwrap_or_default());
            for planes in a.channels {
                channels.push(planes * a.block.expansion());
                if a.block == BlockKind::Bottleneck {
                    channels.push(bottleneck_width(planes, width, groups));
                }
            }
            if let Some(c) = channels
                .iter()
                .find(|c| num_groups < 1 || *c % num_groups != 0)
            {
                bail!("norm.group_norm.num_groups: {num_groups} does not divide {c} channels");
            }
        }
        Ok(())
    }
}

/// The stem's convolutions (`conv1`): torchvision's 7x7/2 conv or timm's deep stem.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per network; boxing would only add indirection
pub enum Stem {
    Conv(Conv2d),
    Deep(DeepStem),
}

impl Stem {
    /// The first convolution: its weight fixes the input's channels and dtype.
    pub fn first_conv(&self) -> &Conv2d {
        match self {
            Stem::Conv(conv) => conv,
            Stem::Deep(stem) => &stem.conv0,
        }
    }

    /// `conv1(x)` on a checked image batch `[B, C, H, W]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_image(x, self.first_conv())?;
        match self {
            Stem::Conv(conv) => Ok(x.apply(conv)),
            Stem::Deep(stem) => stem.forward_t(x, train).context("conv1"),
        }
    }
}

/// torchvision's `ResNet`, with the paper's shortcut options and plain variant, and timm's and
/// Hugging Face's architecture options.
#[derive(Debug)]
pub struct ResNet {
    pub conv1: Stem,
    pub bn1: Norm2d,
    pub layer1: Vec<Block>,
    pub layer2: Vec<Block>,
    pub layer3: Vec<Block>,
    pub layer4: Vec<Block>,
    /// `None` when built without a classifier (`include_fc: false`).
    pub fc: Option<nn::Linear>,
}

impl ResNet {
    pub fn new(path: nn::Path, r: &ResolvedResNet) -> Self {
        let (a, c) = (&r.architecture, &r.config);
        let s = BlockSettings {
            kind: a.block,
            groups: a.groups,
            width_per_group: a.width_per_group,
            norm: c.norm,
            shortcut: c.shortcut,
            plain: c.plain,
        };
        let stem_channels = a.stem_channels();
        let mut builder = StageBuilder::new(s, stem_channels);
        builder.variant = a.variant();
        let [d2, d3, d4] = c.replace_stride_with_dilation;
        let first_stride = if a.downsample_in_first_stage { 2 } else { 1 };
        let [c1, c2, c3, c4] = a.channels;
        let layer1 = builder.stage(&(&path / "layer1"), c1, a.layers[0], first_stride, false);
        let layer2 = builder.stage(&(&path / "layer2"), c2, a.layers[1], 2, d2);
        let layer3 = builder.stage(&(&path / "layer3"), c3, a.layers[2], 2, d3);
        let layer4 = builder.stage(&(&path / "layer4"), c4, a.layers[3], 2, d4);
        let features = a.features();
        let conv1 = match a.stem_type.deep_widths(a.stem_width) {
            Some(widths) => Stem::Deep(DeepStem::new(
                &(&path / "conv1"),
                c.in_channels,
                widths,
                c.norm,
            )),
            None => Stem::Conv(conv2d_no_bias(
                &path / "conv1",
                c.in_channels,
                stem_channels,
                Conv2dSpec {
                    kernel: 7,
                    stride: 2,
                    padding: 3,
                    groups: 1,
                    dilation: 1,
                },
            )),
        };
        let model = Self {
            conv1,
            bn1: Norm2d::new(&path / "bn1", c.norm, stem_channels),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: c.include_fc.then(|| {
                layers::linear(
                    &path / "fc",
                    features,
                    c.num_classes,
                    Some(BiasInit::Uniform),
                )
            }),
        };
        if c.zero_init_residual {
            zero_init_residual(model.blocks());
        }
        model
    }

    /// Folds every batch norm into the convolution before it (stem, blocks, shortcuts), for
    /// eval-mode inference only; see [`Norm2d::fold_into`].
    /// With `pack`, the convolutions are packed for oneDNN ([`Conv2d::pack`]).
    pub fn fold_batch_norm(&mut self, pack: bool) {
        let last_stem_conv = match &mut self.conv1 {
            Stem::Conv(conv) => conv,
            Stem::Deep(stem) => {
                stem.bn1.fold_into(&mut stem.conv0, pack);
                stem.bn4.fold_into(&mut stem.conv3, pack);
                &mut stem.conv6
            }
        };
        self.bn1.fold_into(last_stem_conv, pack);
        let stages = [
            &mut self.layer1,
            &mut self.layer2,
            &mut self.layer3,
            &mut self.layer4,
        ];
        for block in stages.into_iter().flatten() {
            block.fold_batch_norm(pack);
        }
    }

    /// Every block, stage by stage.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
    }

    /// The outputs of `layer1` .. `layer4` (strides 4, 8, 16, 32 without dilation), for detection
    /// and segmentation heads.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let h = match &self.conv1 {
            // One fused op where bn1 is folded into a packed conv1.
            Stem::Conv(conv1) => stem(conv1, &self.bn1, x, train)?,
            Stem::Deep(_) => {
                let h = self.conv1.forward_t(x, train)?;
                self.bn1.forward_t(&h, train).context("bn1")?.relu()
            }
        };
        let h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let layers = [&self.layer1, &self.layer2, &self.layer3, &self.layer4];
        run_stages(&layers.map(Vec::as_slice), h, train)
    }

    /// The pooled features before `fc`: `[B, channels[3] * expansion]`.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.forward_stages(x, train)?.pop().context("no stages")?;
        Ok(global_pool(&last))
    }

    /// Logits `[B, num_classes]`, or the pooled features when built without `fc`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let features = self.forward_features(x, train)?;
        Ok(match &self.fc {
            Some(fc) => features.apply(fc),
            None => features,
        })
    }
}

/// `flatten(adaptive_avg_pool2d(x, 1), 1)`: `[B, C, H, W] -> [B, C]`.
pub fn global_pool(x: &Tensor) -> Tensor {
    x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
}

/// Checks an image batch `[B, C, H, W]` for the stem `conv1`: as PyTorch, any `B` (0 too) and
/// any `H, W >= 1`, `C` and dtype the stem's, on its device. (PyTorch's conv alone would take an
/// unbatched `[C, H, W]`; torchvision's BatchNorm after it refuses it.)
pub fn check_image(x: &Tensor, conv1: &Conv2d) -> Result<()> {
    let channels = conv1.ws.size()[1];
    Expect {
        name: "input",
        dims: vec![None, Some(channels), None, None],
        labels: &["B", "C", "H", "W"],
        unbatched: false,
        dtype: Dtype::Model,
        weight: &conv1.ws,
    }
    .check(x)?;
    let size = x.size();
    if size[2] < 1 || size[3] < 1 {
        bail!(
            "input `input`: expected shape [B, {channels}, H, W] with H, W >= 1 (an empty image \
             is smaller than any kernel; PyTorch refuses it too), got {size:?}"
        );
    }
    Ok(())
}

impl Model for ResNet {
    fn input_names(&self) -> &'static [&'static str] {
        &["input"]
    }

    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        self.forward_t(input(inputs, "input")?, train)
    }

    fn forward_features(&self, inputs: &Inputs, train: bool) -> Result<Tensor> {
        ResNet::forward_features(self, input(inputs, "input")?, train)
    }

    fn fold_batch_norm(&mut self, pack: bool) -> Result<()> {
        ResNet::fold_batch_norm(self, pack);
        Ok(())
    }
}
