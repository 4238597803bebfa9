//! timm's ResNet variants (timm 1.0 `models/resnet.py`), state_dict-compatible with timm:
//!
//! * the deep stems of the c/d/s/t variants, `conv1.0` (3x3/2), `conv1.1` (norm), `conv1.3`
//!   (3x3), `conv1.4` (norm), `conv1.6` (3x3), each conv but the last followed by norm and ReLU;
//! * the average-pool shortcut of the d/t variants: `downsample.0` a 2x2 average pool (no
//!   parameters), `.1` a 1x1 conv, `.2` a norm;
//! * squeeze-and-excitation (`se.fc1`, `se.fc2`) at the end of the residual branch of
//!   `seresnet*` / `seresnext*`;
//! * [`TIMM`], timm's ResNet constructors built from these parts, each a config
//!   `{"arch": "timm", "name": "resnet50d", ...}`.
//!
//! The networks are [`super::resnet::ResNet`] with these options set.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::Tensor;

use super::layers::{conv2d_no_bias, conv3x3, Conv2d, Conv2dSpec, Norm2d, NormKind};
use super::resnet::{Architecture, BlockKind, Constructor};

/// The stem's convolutions (timm's `stem_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StemType {
    /// One 7x7/2 conv with `stem_width` output channels (torchvision's stem).
    #[default]
    Default,
    /// Three 3x3 convs (the first strided) of `stem_width`, `stem_width`, `2 * stem_width`
    /// channels (timm's `deep`: c, d and s variants).
    Deep,
    /// As `Deep` but the first conv has `3 * (stem_width / 4)` channels (timm's `deep_tiered`:
    /// t variants).
    DeepTiered,
}

impl StemType {
    /// The widths of the deep stem's three convs (`conv1.0`, `conv1.3`, `conv1.6`).
    pub fn deep_widths(self, stem_width: i64) -> Option<[i64; 3]> {
        match self {
            StemType::Default => None,
            StemType::Deep => Some([stem_width, stem_width, 2 * stem_width]),
            StemType::DeepTiered => Some([3 * (stem_width / 4), stem_width, 2 * stem_width]),
        }
    }

    /// The stem's output channels (the input of `layer1`).
    pub fn out_channels(self, stem_width: i64) -> i64 {
        self.deep_widths(stem_width).map_or(stem_width, |w| w[2])
    }
}

/// timm's deep stem, `[B, C, H, W] -> [B, 2 * stem_width, ceil(H / 2), ceil(W / 2)]` (the stem's
/// own norm and ReLU after `conv1.6` are the network's `bn1`).
#[derive(Debug)]
pub struct DeepStem {
    /// `conv1.0`, 3x3 stride 2.
    pub conv0: Conv2d,
    /// `conv1.1`.
    pub bn1: Norm2d,
    /// `conv1.3`, 3x3.
    pub conv3: Conv2d,
    /// `conv1.4`.
    pub bn4: Norm2d,
    /// `conv1.6`, 3x3.
    pub conv6: Conv2d,
}

impl DeepStem {
    /// The stem under `path` (`conv1`) with conv widths `widths`.
    pub fn new(path: &nn::Path, in_channels: i64, widths: [i64; 3], norm: NormKind) -> Self {
        let [w0, w1, w2] = widths;
        Self {
            conv0: conv3x3(path / 0, in_channels, w0, 2, 1, 1),
            bn1: Norm2d::new(path / 1, norm, w0),
            conv3: conv3x3(path / 3, w0, w1, 1, 1, 1),
            bn4: Norm2d::new(path / 4, norm, w1),
            conv6: conv3x3(path / 6, w1, w2, 1, 1, 1),
        }
    }
}

impl DeepStem {
    /// The three convs with `conv1.1`/`conv1.4` and ReLU between them; errors name the norm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = x.apply(&self.conv0);
        let h = self.bn1.forward_t(&h, train).context("conv1.1")?.relu();
        let h = h.apply(&self.conv3);
        let h = self.bn4.forward_t(&h, train).context("conv1.4")?.relu();
        Ok(h.apply(&self.conv6))
    }
}

/// The attention module at the end of each residual branch (timm's `block_args.attn_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnLayer {
    /// None.
    #[default]
    None,
    /// timm's `SEModule` with its defaults (`rd_ratio` 1/16, `rd_divisor` 8).
    Se,
}

/// timm's `make_divisible(v, divisor, round_limit=0.)`: `v` rounded to the nearest multiple of
/// `divisor`, at least `divisor`.
pub fn make_divisible(v: f64, divisor: i64) -> i64 {
    let rounded = (v + divisor as f64 / 2.0) as i64 / divisor * divisor;
    rounded.max(divisor)
}

/// The squeeze channels of timm's `SEModule(channels)`.
pub fn se_channels(channels: i64) -> i64 {
    make_divisible(channels as f64 / 16.0, 8)
}

/// timm's `SEModule`: `x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`, with `fc1`, `fc2` 1x1 convs
/// with bias; `[B, C, H, W] -> [B, C, H, W]`.
#[derive(Debug)]
pub struct SqueezeExcite {
    pub fc1: nn::Conv2D,
    pub fc2: nn::Conv2D,
}

impl SqueezeExcite {
    pub fn new(path: &nn::Path, channels: i64) -> Self {
        let squeezed = se_channels(channels);
        Self {
            fc1: conv1x1_bias(path / "fc1", channels, squeezed),
            fc2: conv1x1_bias(path / "fc2", squeezed, channels),
        }
    }
}

impl nn::Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.mean_dim(&[2i64, 3][..], true, None);
        let gate = s.apply(&self.fc1).relu().apply(&self.fc2).sigmoid();
        x * gate
    }
}

/// `nn.Conv2d(in, out, 1)` with timm's ResNet init: weight N(0, 2 / out), PyTorch's default bias
/// U(-1/sqrt(in), 1/sqrt(in)).
fn conv1x1_bias(path: nn::Path, in_ch: i64, out_ch: i64) -> nn::Conv2D {
    let bound = 1.0 / (in_ch as f64).sqrt();
    let config = nn::ConvConfig {
        ws_init: Init::Randn {
            mean: 0.0,
            stdev: (2.0 / out_ch as f64).sqrt(),
        },
        bs_init: Init::Uniform {
            lo: -bound,
            up: bound,
        },
        ..Default::default()
    };
    nn::conv2d(path, in_ch, out_ch, 1, config)
}

/// The pool in front of an average-pool shortcut's 1x1 conv (`downsample.0`, timm's
/// `downsample_avg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortcutPool {
    /// `nn.Identity()`: neither stride nor dilation.
    Identity,
    /// `nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`.
    Strided(i64),
    /// timm's `AvgPool2dSame(2, 1)` in a dilated stage: one zero row and column appended
    /// (bottom, right), then a 2x2 mean at stride 1.
    Same,
}

impl ShortcutPool {
    /// The pool of a shortcut at `stride` in a stage of dilation `dilation`.
    pub fn new(stride: i64, dilation: i64) -> Self {
        match (stride, dilation) {
            (s, _) if s > 1 => ShortcutPool::Strided(s),
            (_, 1) => ShortcutPool::Identity,
            _ => ShortcutPool::Same,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match *self {
            ShortcutPool::Identity => x.shallow_clone(),
            ShortcutPool::Strided(s) => x.avg_pool2d([2, 2], [s, s], [0, 0], true, false, None),
            ShortcutPool::Same => x.constant_pad_nd([0, 1, 0, 1]).avg_pool2d(
                [2, 2],
                [1, 1],
                [0, 0],
                true,
                false,
                None,
            ),
        }
    }
}

/// The 1x1 conv of a shortcut (`downsample.1`); the pool before it does the striding.
pub fn shortcut_conv(path: nn::Path, in_ch: i64, out_ch: i64) -> Conv2d {
    let spec = Conv2dSpec {
        kernel: 1,
        stride: 1,
        padding: 0,
        groups: 1,
        dilation: 1,
    };
    conv2d_no_bias(path, in_ch, out_ch, spec)
}

/// timm's variants of a constructor, as timm's `model_args` spell them.
impl Constructor {
    const fn timm(name: &'static str, block: BlockKind, layers: [i64; 4]) -> Self {
        Constructor {
            name,
            architecture: Architecture::torchvision(block, layers, 1, 64),
        }
    }

    const fn cardinality(mut self, groups: i64, base_width: i64) -> Self {
        self.architecture.groups = groups;
        self.architecture.width_per_group = base_width;
        self
    }

    const fn stem(mut self, stem_type: StemType, stem_width: i64, avg_down: bool) -> Self {
        self.architecture.stem_type = stem_type;
        self.architecture.stem_width = stem_width;
        self.architecture.avg_down = avg_down;
        self
    }

    /// `stem_width=32, stem_type='deep'`.
    const fn c(self) -> Self {
        self.stem(StemType::Deep, 32, false)
    }

    /// `stem_width=32, stem_type='deep', avg_down=True`.
    const fn d(self) -> Self {
        self.stem(StemType::Deep, 32, true)
    }

    /// `stem_width=64, stem_type='deep'`.
    const fn s(self) -> Self {
        self.stem(StemType::Deep, 64, false)
    }

    /// `stem_width=32, stem_type='deep_tiered', avg_down=True`.
    const fn t(self) -> Self {
        self.stem(StemType::DeepTiered, 32, true)
    }

    /// `block_args=dict(attn_layer='se')`.
    const fn se(mut self) -> Self {
        self.architecture.attn_layer = AttnLayer::Se;
        self
    }
}

/// timm's ResNet constructors whose parts this crate has (timm 1.0.31 `models/resnet.py`):
/// adding one is one line here. Not here: ECA, blur / anti-aliased pooling, ResNet-RS stems,
/// SENet-154's 3x3 shortcuts and halved first convs, mixed block types.
pub const TIMM: &[Constructor] = {
    use BlockKind::{Basic, Bottleneck};
    const fn r(name: &'static str, block: BlockKind, layers: [i64; 4]) -> Constructor {
        Constructor::timm(name, block, layers)
    }
    const R50: [i64; 4] = [3, 4, 6, 3];
    const R101: [i64; 4] = [3, 4, 23, 3];
    const R152: [i64; 4] = [3, 8, 36, 3];
    const R200: [i64; 4] = [3, 24, 36, 3];
    const R269: [i64; 4] = [3, 30, 48, 8];
    &[
        r("resnet10t", Basic, [1, 1, 1, 1]).t(),
        r("resnet14t", Bottleneck, [1, 1, 1, 1]).t(),
        r("resnet18", Basic, [2, 2, 2, 2]),
        r("resnet18d", Basic, [2, 2, 2, 2]).d(),
        r("resnet34", Basic, [3, 4, 6, 3]),
        r("resnet34d", Basic, [3, 4, 6, 3]).d(),
        r("resnet26", Bottleneck, [2, 2, 2, 2]),
        r("resnet26t", Bottleneck, [2, 2, 2, 2]).t(),
        r("resnet26d", Bottleneck, [2, 2, 2, 2]).d(),
        r("resnet50", Bottleneck, R50),
        r("resnet50c", Bottleneck, R50).c(),
        r("resnet50d", Bottleneck, R50).d(),
        r("resnet50s", Bottleneck, R50).s(),
        r("resnet50t", Bottleneck, R50).t(),
        r("resnet101", Bottleneck, R101),
        r("resnet101c", Bottleneck, R101).c(),
        r("resnet101d", Bottleneck, R101).d(),
        r("resnet101s", Bottleneck, R101).s(),
        r("resnet152", Bottleneck, R152),
        r("resnet152c", Bottleneck, R152).c(),
        r("resnet152d", Bottleneck, R152).d(),
        r("resnet152s", Bottleneck, R152).s(),
        r("resnet200", Bottleneck, R200),
        r("resnet200d", Bottleneck, R200).d(),
        r("wide_resnet50_2", Bottleneck, R50).cardinality(1, 128),
        r("wide_resnet101_2", Bottleneck, R101).cardinality(1, 128),
        r("resnext50_32x4d", Bottleneck, R50).cardinality(32, 4),
        r("resnext50d_32x4d", Bottleneck, R50)
            .cardinality(32, 4)
            .d(),
        r("resnext101_32x4d", Bottleneck, R101).cardinality(32, 4),
        r("resnext101_32x8d", Bottleneck, R101).cardinality(32, 8),
        r("resnext101_32x16d", Bottleneck, R101).cardinality(32, 16),
        r("resnext101_32x32d", Bottleneck, R101).cardinality(32, 32),
        r("resnext101_64x4d", Bottleneck, R101).cardinality(64, 4),
        r("seresnet18", Basic, [2, 2, 2, 2]).se(),
        r("seresnet34", Basic, [3, 4, 6, 3]).se(),
        r("seresnet50", Bottleneck, R50).se(),
        r("seresnet50t", Bottleneck, R50).t().se(),
        r("seresnet101", Bottleneck, R101).se(),
        r("seresnet152", Bottleneck, R152).se(),
        r("seresnet152d", Bottleneck, R152).d().se(),
        r("seresnet200d", Bottleneck, R200).d().se(),
        r("seresnet269d", Bottleneck, R269).d().se(),
        r("seresnext26d_32x4d", Bottleneck, [2, 2, 2, 2])
            .cardinality(32, 4)
            .d()
            .se(),
        r("seresnext26t_32x4d", Bottleneck, [2, 2, 2, 2])
            .cardinality(32, 4)
            .t()
            .se(),
        r("seresnext50_32x4d", Bottleneck, R50)
            .cardinality(32, 4)
            .se(),
        r("seresnext101_32x4d", Bottleneck, R101)
            .cardinality(32, 4)
            .se(),
        r("seresnext101_32x8d", Bottleneck, R101)
            .cardinality(32, 8)
            .se(),
        r("seresnext101d_32x8d", Bottleneck, R101)
            .cardinality(32, 8)
            .d()
            .se(),
        r("seresnext101_64x4d", Bottleneck, R101)
            .cardinality(64, 4)
            .se(),
    ]
};

/// The timm constructor called `name`.
pub fn named(name: &str) -> Option<&'static Constructor> {
    TIMM.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_rounds_like_timm() {
        // timm: make_divisible(c / 16, 8, round_limit=0.) for the SE widths of its ResNets.
        for (channels, expected) in [
            (64, 8),
            (128, 8),
            (256, 16),
            (512, 32),
            (1024, 64),
            (2048, 128),
            (200, 16),
            (1, 8),
        ] {
            assert_eq!(se_channels(channels), expected, "{channels}");
        }
        assert_eq!(make_divisible(11.9, 8), 8);
        assert_eq!(make_divisible(12.0, 8), 16);
    }

    #[test]
    fn stems_have_timms_widths() {
        assert_eq!(StemType::Deep.deep_widths(32), Some([32, 32, 64]));
        assert_eq!(StemType::DeepTiered.deep_widths(32), Some([24, 32, 64]));
        assert_eq!(StemType::Deep.out_channels(64), 128);
        assert_eq!(StemType::Default.out_channels(64), 64);
    }

    #[test]
    fn shortcut_pools_follow_stride_then_dilation() {
        assert_eq!(ShortcutPool::new(2, 1), ShortcutPool::Strided(2));
        assert_eq!(ShortcutPool::new(1, 1), ShortcutPool::Identity);
        assert_eq!(ShortcutPool::new(1, 2), ShortcutPool::Same);
        let x = Tensor::arange(9, (tch::Kind::Float, tch::Device::Cpu)).view([1, 1, 3, 3]);
        // ceil_mode keeps the last half window; count_include_pad=False averages what it covers.
        let y = ShortcutPool::Strided(2).forward(&x);
        assert_eq!(
            Vec::<f32>::try_from(y.view([-1])).unwrap(),
            [2.0, 3.5, 6.5, 8.0]
        );
        // The appended zeros count: the bottom-right output is 8 / 4.
        let y = ShortcutPool::Same.forward(&x);
        assert_eq!(y.size(), [1, 1, 3, 3]);
        assert_eq!(y.double_value(&[0, 0, 2, 2]), 2.0);
        assert_eq!(y.double_value(&[0, 0, 0, 0]), 2.0);
    }

    /// timm's plain ResNets are torchvision's: same architecture, same keys.
    #[test]
    fn timms_plain_resnets_are_torchvisions() {
        for tv in crate::models::resnet::TORCHVISION {
            let timm = named(tv.name).unwrap_or_else(|| panic!("{} missing", tv.name));
            assert_eq!(timm.architecture, tv.architecture, "{}", tv.name);
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = TIMM.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TIMM.len());
    }
}
