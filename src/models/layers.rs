//! Layer builders with PyTorch's initialisation (tch's defaults differ: its Linear/Conv weights use
//! a ReLU-gain Kaiming bound of sqrt(6 / fan_in) where PyTorch uses 1 / sqrt(fan_in)).

use std::sync::OnceLock;

use anyhow::{bail, Result};
use tch::nn::{self, Init};
use tch::Tensor;

use crate::backend::{conv_pointwise, ConvGeometry};

/// How a layer's bias starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasInit {
    /// PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Uniform,
    /// Zeros (models that re-initialise their linears, like SiD).
    Zeros,
}

fn uniform_bound(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `nn.Linear(in_dim, out_dim, bias)`: weight `[out, in]` as `kaiming_uniform_(a=sqrt(5))`.
pub fn linear(path: nn::Path, in_dim: i64, out_dim: i64, bias: Option<BiasInit>) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: uniform_bound(in_dim),
        bs_init: Some(match bias {
            Some(BiasInit::Zeros) => Init::Const(0.0),
            _ => uniform_bound(in_dim),
        }),
        bias: bias.is_some(),
    };
    nn::linear(path, in_dim, out_dim, config)
}

/// `nn.Linear` whose inference form may run through oneDNN on a weight packed once
/// ([`Linear::pack`]); `[*, in] -> [*, out]`. Derefs to tch's `nn::Linear` (`ws`, `bs`).
#[derive(Debug)]
pub struct Linear {
    linear: nn::Linear,
    /// `Some` once packing is asked for; filled on the first forward, whose row count chooses
    /// the layout.
    packed: Option<OnceLock<Tensor>>,
}

impl From<nn::Linear> for Linear {
    fn from(linear: nn::Linear) -> Self {
        Self {
            linear,
            packed: None,
        }
    }
}

impl std::ops::Deref for Linear {
    type Target = nn::Linear;
    fn deref(&self) -> &nn::Linear {
        &self.linear
    }
}

impl Linear {
    /// Runs every later forward of a float32 CPU input through oneDNN's linear on the weight
    /// reordered once into its layout, where libtorch has oneDNN (a no-op elsewhere). At small
    /// batches MKL's sgemm spends most of its time packing the weight on every call (SiD at
    /// batch 4: 58% of the time in `sgemm_scopy`); oneDNN's linear on the packed weight does not.
    pub fn pack(&mut self) {
        if packable(&self.linear.ws) {
            self.packed = Some(OnceLock::new());
        }
    }

    /// Whether float32 CPU forwards run on the packed weight.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    fn forward_packed(&self, cell: &OnceLock<Tensor>, xs: &Tensor) -> Result<Tensor> {
        let rows = xs.numel() as i64 / xs.size().last().copied().unwrap_or(1).max(1);
        let w = match cell.get() {
            Some(w) => w,
            None => {
                let w = crate::backend::reorder_linear_weight(&self.linear.ws, rows.max(1))?;
                cell.get_or_init(|| w)
            }
        };
        crate::backend::linear_pointwise(xs, w, self.linear.bs.as_ref())
    }
}

impl nn::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.packed {
            // Only float32 CPU inputs of at least one row take the oneDNN path; what libtorch
            // refuses there panics, as tch's own `linear` does.
            Some(cell)
                if xs.device() == tch::Device::Cpu
                    && xs.kind() == tch::Kind::Float
                    && xs.dim() >= 1
                    && xs.numel() > 0 =>
            {
                self.forward_packed(cell, xs)
                    .unwrap_or_else(|e| panic!("{e:#}"))
            }
            _ => xs.apply(&self.linear),
        }
    }
}

/// `nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding)` with PyTorch's init.
pub fn conv1d(path: nn::Path, in_ch: i64, out_ch: i64, kernel: i64, padding: i64) -> nn::Conv1D {
    let fan_in = in_ch * kernel;
    let config = nn::ConvConfig {
        padding,
        ws_init: uniform_bound(fan_in),
        bs_init: uniform_bound(fan_in),
        ..Default::default()
    };
    nn::conv1d(path, in_ch, out_ch, kernel, config)
}

/// `nn.LayerNorm(size)`: weight 1, bias 0, eps 1e-5.
pub fn layer_norm(path: nn::Path, size: i64) -> nn::LayerNorm {
    nn::layer_norm(path, vec![size], Default::default())
}

/// The geometry of a square 2-D convolution.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dSpec {
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
    pub groups: i64,
    pub dilation: i64,
}

/// `nn.Conv2d(in, out, kernel, stride, padding, dilation, groups, bias=False)` with torchvision's
/// ResNet init, `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / (out * k * k)).
pub fn conv2d_no_bias(path: nn::Path, in_ch: i64, out_ch: i64, spec: Conv2dSpec) -> Conv2d {
    let fan_out = (out_ch * spec.kernel * spec.kernel) as f64;
    let config = nn::ConvConfig {
        stride: spec.stride,
        padding: spec.padding,
        dilation: spec.dilation,
        groups: spec.groups,
        bias: false,
        ws_init: Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out).sqrt(),
        },
        ..Default::default()
    };
    Conv2d {
        conv: nn::conv2d(path, in_ch, out_ch, spec.kernel, config),
        spec,
        packed: None,
    }
}

/// A 2-D convolution (`nn.Conv2d`): tch's, which it derefs to (`ws`, `bs`), plus its geometry and,
/// once packed for CPU inference ([`Conv2d::pack`]), its weight reordered into oneDNN's blocked
/// layout, which every forward then uses (PyTorch's frozen TorchScript and Inductor pre-pack the
/// same way).
#[derive(Debug)]
pub struct Conv2d {
    conv: nn::Conv2D,
    pub spec: Conv2dSpec,
    /// `Some` once packing is asked for; filled on the first forward, whose input size chooses
    /// the layout (without it oneDNN picks one that makes resnet50 ~35% slower).
    packed: Option<OnceLock<Tensor>>,
}

impl std::ops::Deref for Conv2d {
    type Target = nn::Conv2D;
    fn deref(&self) -> &nn::Conv2D {
        &self.conv
    }
}

impl std::ops::DerefMut for Conv2d {
    /// Changing the weights drops the packed copy.
    fn deref_mut(&mut self) -> &mut nn::Conv2D {
        self.packed = None;
        &mut self.conv
    }
}

impl Conv2d {
    fn geometry(&self) -> ConvGeometry {
        let s = &self.spec;
        ConvGeometry {
            padding: [s.padding; 2],
            stride: [s.stride; 2],
            dilation: [s.dilation; 2],
            groups: s.groups,
        }
    }

    /// Runs every later forward on the weight reordered into oneDNN's blocked layout, where that
    /// can run it: a float32 CPU weight on a libtorch built with oneDNN (a no-op elsewhere). The
    /// reorder happens on the first forward, for its input's size.
    pub fn pack(&mut self) {
        if packable(&self.conv.ws) {
            self.packed = Some(OnceLock::new());
        }
    }

    /// The packed weight, reordered for inputs of `x`'s size on first use.
    fn packed_weight(&self, cell: &OnceLock<Tensor>, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = cell.get() {
            return Ok(w.shallow_clone());
        }
        let g = self.geometry();
        let w = tch::no_grad(|| {
            self.conv
                .ws
                .detach()
                .f_to_mkldnn(tch::Kind::Float)?
                .f_mkldnn_reorder_conv2d_weight(
                    g.padding,
                    g.stride,
                    g.dilation,
                    g.groups,
                    Some(x.size().as_slice()),
                )
        })?;
        Ok(cell.get_or_init(|| w).shallow_clone())
    }

    /// Whether the forward runs on the packed weight.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// `relu(conv(x) + add)` (each part when asked), fused into the convolution when packed.
    pub fn forward_fused(&self, x: &Tensor, relu: bool, add: Option<&Tensor>) -> Result<Tensor> {
        let Some(cell) = &self.packed else {
            let mut out = x.apply(&self.conv);
            if let Some(add) = add {
                out += add;
            }
            return Ok(if relu { out.relu() } else { out });
        };
        let packed = &self.packed_weight(cell, x)?;
        let geometry = self.geometry();
        let bias = self.conv.bs.as_ref();
        match conv_pointwise(x, packed, bias, &geometry, relu, add) {
            Ok(out) => Ok(out),
            // oneDNN cannot build the fused addition for some layouts (1x1 feature maps with a
            // packed weight, libtorch 2.11): add after the fused convolution instead.
            Err(err) => match add {
                Some(add) => {
                    let out = conv_pointwise(x, packed, bias, &geometry, false, None)? + add;
                    Ok(if relu { out.relu() } else { out })
                }
                None => Err(err),
            },
        }
    }

    /// `relu(conv(x) + add)` (ReLU when asked) taking `add` by value: when packed, the sum is
    /// written into `add`'s memory where no other handle shares it
    /// ([`crate::backend::conv_pointwise_add_into`]), else as [`Conv2d::forward_fused`].
    pub fn forward_fused_into(&self, x: &Tensor, relu: bool, add: Tensor) -> Result<Tensor> {
        let Some(cell) = &self.packed else {
            return self.forward_fused(x, relu, Some(&add));
        };
        let packed = &self.packed_weight(cell, x)?;
        let bias = self.conv.bs.as_ref();
        let geometry = self.geometry();
        match crate::backend::conv_pointwise_add_into(x, packed, bias, &geometry, relu, add)? {
            Ok(out) => Ok(out),
            Err(add) => self.forward_fused(x, relu, Some(&add)),
        }
    }
}

impl nn::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.packed {
            // Shapes, dtype and device are checked before a model's first convolution; what
            // libtorch refuses beyond that panics, as tch's own `conv2d` does.
            Some(_) => self
                .forward_fused(xs, false, None)
                .unwrap_or_else(|e| panic!("{e:#}")),
            None => xs.apply(&self.conv),
        }
    }
}

/// torchvision's `conv3x3`: padding = dilation.
pub fn conv3x3(
    path: nn::Path,
    in_ch: i64,
    out_ch: i64,
    stride: i64,
    groups: i64,
    dilation: i64,
) -> Conv2d {
    let spec = Conv2dSpec {
        kernel: 3,
        stride,
        padding: dilation,
        groups,
        dilation,
    };
    conv2d_no_bias(path, in_ch, out_ch, spec)
}

/// torchvision's `conv1x1`.
pub fn conv1x1(path: nn::Path, in_ch: i64, out_ch: i64, stride: i64) -> Conv2d {
    let spec = Conv2dSpec {
        kernel: 1,
        stride,
        padding: 0,
        groups: 1,
        dilation: 1,
    };
    conv2d_no_bias(path, in_ch, out_ch, spec)
}

/// The normalisation layer of a convolutional network, chosen by config.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NormKind {
    /// `nn.BatchNorm2d` (eps 1e-5, momentum 0.1).
    #[default]
    BatchNorm,
    /// `torchvision.ops.FrozenBatchNorm2d`: fixed statistics and affine values, all buffers.
    FrozenBatchNorm,
    /// `nn.GroupNorm(num_groups, C)`.
    GroupNorm { num_groups: i64 },
}

/// A normalisation layer over `[B, C, H, W]`; variables named as PyTorch's (`weight`, `bias`,
/// `running_mean`, `running_var`, `num_batches_tracked`).
#[derive(Debug)]
pub enum Norm2d {
    Batch {
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        /// int64 scalar, +1 per training-mode forward.
        num_batches_tracked: Tensor,
    },
    Frozen {
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
    },
    Group {
        num_groups: i64,
        weight: Tensor,
        bias: Tensor,
    },
    /// A batch norm folded into the convolution before it ([`Norm2d::fold_into`]): passes its
    /// input through, in eval mode only.
    Folded,
}

/// Whether oneDNN can run on `weight` reordered into its blocked layout: float32 on the CPU, with a
/// libtorch built with oneDNN.
fn packable(weight: &Tensor) -> bool {
    weight.device() == tch::Device::Cpu
        && weight.kind() == tch::Kind::Float
        && tch::utils::has_mkldnn()
}

const NORM_EPS: f64 = 1e-5;
/// Output channels folded at a time ([`Norm2d::fold_into`]).
const FOLD_BLOCK: i64 = 32;
const BN_MOMENTUM: f64 = 0.1;

impl Norm2d {
    /// Weight 1, bias 0, running mean 0, running variance 1 (torchvision's init).
    pub fn new(path: nn::Path, kind: NormKind, channels: i64) -> Self {
        let c = [channels];
        match kind {
            NormKind::BatchNorm => Norm2d::Batch {
                weight: path.ones("weight", &c),
                bias: path.zeros("bias", &c),
                running_mean: path.zeros_no_train("running_mean", &c),
                running_var: path.ones_no_train("running_var", &c),
                num_batches_tracked: path.add(
                    "num_batches_tracked",
                    Tensor::zeros([], (tch::Kind::Int64, path.device())),
                    false,
                ),
            },
            NormKind::FrozenBatchNorm => Norm2d::Frozen {
                weight: path.ones_no_train("weight", &c),
                bias: path.zeros_no_train("bias", &c),
                running_mean: path.zeros_no_train("running_mean", &c),
                running_var: path.ones_no_train("running_var", &c),
            },
            NormKind::GroupNorm { num_groups } => Norm2d::Group {
                num_groups,
                weight: path.ones("weight", &c),
                bias: path.zeros("bias", &c),
            },
        }
    }

    /// The affine scale (`weight`), e.g. for zero-initialising the last norm of a residual branch;
    /// `None` once folded.
    pub fn weight(&self) -> Option<&Tensor> {
        match self {
            Norm2d::Batch { weight, .. }
            | Norm2d::Frozen { weight, .. }
            | Norm2d::Group { weight, .. } => Some(weight),
            Norm2d::Folded => None,
        }
    }

    /// Folds an eval-mode batch norm (running statistics; frozen ones too) into `conv`, the
    /// convolution feeding it, which then computes `norm(conv(x))` alone: per output channel
    /// `w' = w * s`, `b' = (b or 0) * s + beta - mean * s` with `s = gamma / sqrt(var + eps)`,
    /// computed in float64. The norm becomes [`Norm2d::Folded`]; a group norm, which depends on
    /// its input's statistics, stays as it is. New tensors replace `conv`'s: the variables the
    /// model was built in are left untouched (and no longer drive it).
    ///
    /// With `pack`, the folded convolution is then packed for oneDNN ([`Conv2d::pack`]).
    pub fn fold_into(&mut self, conv: &mut Conv2d, pack: bool) {
        let (weight, bias, mean, var) = match self {
            Norm2d::Batch {
                weight,
                bias,
                running_mean,
                running_var,
                ..
            }
            | Norm2d::Frozen {
                weight,
                bias,
                running_mean,
                running_var,
            } => (weight, bias, running_mean, running_var),
            Norm2d::Group { .. } | Norm2d::Folded => return,
        };
        tch::no_grad(|| {
            let kind = conv.ws.kind();
            let wide = |t: &Tensor| t.to_kind(tch::Kind::Double);
            let scale = wide(weight) * (wide(var) + NORM_EPS).rsqrt();
            let shift = wide(bias) - wide(mean) * &scale;
            let bias = match &conv.bs {
                Some(b) => wide(b) * &scale + shift,
                None => shift,
            };
            // In blocks of output channels: the float64 temporaries stay small next to the
            // weight (whole, they were 4x its size: 38 MB for resnet18's largest).
            let folded = conv.ws.empty_like();
            let channels = conv.ws.size()[0];
            for start in (0..channels).step_by(FOLD_BLOCK as usize) {
                let len = FOLD_BLOCK.min(channels - start);
                let block = wide(&conv.ws.narrow(0, start, len))
                    * scale.narrow(0, start, len).view([-1, 1, 1, 1]);
                folded.narrow(0, start, len).copy_(&block.to_kind(kind));
            }
            conv.ws = folded;
            conv.bs = Some(bias.to_kind(kind));
        });
        *self = Norm2d::Folded;
        if pack {
            conv.pack();
        }
    }
}

impl Norm2d {
    /// `[B, C, H, W] -> [B, C, H, W]`. Refuses what `F.batch_norm` (training mode) and
    /// `F.group_norm` refuse: one value per normalised group, whose variance is undefined.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match self {
            Norm2d::Batch {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            } => {
                if train {
                    more_than_one_value("BatchNorm2d in training mode", "channel", xs, 1)?;
                    tch::no_grad(|| {
                        let mut n = num_batches_tracked.shallow_clone();
                        let _ = n.f_add_scalar_(1);
                    });
                    // `--sync-bn` under torchrun: the global batch's statistics.
                    if let Some(out) = crate::distributed::sync_batch_norm(
                        xs,
                        weight,
                        bias,
                        running_mean,
                        running_var,
                        BN_MOMENTUM,
                        NORM_EPS,
                    )? {
                        return Ok(out);
                    }
                }
                Tensor::batch_norm(
                    xs,
                    Some(weight),
                    Some(bias),
                    Some(running_mean),
                    Some(running_var),
                    train,
                    BN_MOMENTUM,
                    NORM_EPS,
                    true,
                )
            }
            Norm2d::Frozen {
                weight,
                bias,
                running_mean,
                running_var,
            } => {
                let shape = [1, -1, 1, 1];
                let scale = weight.view(shape) * (running_var.view(shape) + NORM_EPS).rsqrt();
                let shift = bias.view(shape) - running_mean.view(shape) * &scale;
                xs * scale + shift
            }
            Norm2d::Group {
                num_groups,
                weight,
                bias,
            } => {
                let per_group = xs.size().get(1).map_or(1, |c| c / num_groups);
                more_than_one_value("GroupNorm", "group", xs, per_group)?;
                xs.group_norm(*num_groups, Some(weight), Some(bias), NORM_EPS, true)
            }
            Norm2d::Folded if train => bail!(
                "this batch norm is folded into its convolution for inference; training needs \
                 the model as built"
            ),
            Norm2d::Folded => xs.shallow_clone(),
        })
    }
}

/// `relu(norm(conv(x)))`: one fused oneDNN op when `norm` is folded into a packed `conv`.
pub fn conv_norm_relu(conv: &Conv2d, norm: &Norm2d, x: &Tensor, train: bool) -> Result<Tensor> {
    match norm {
        Norm2d::Folded if !train && conv.is_packed() => conv.forward_fused(x, true, None),
        _ => Ok(norm.forward_t(&x.apply(conv), train)?.relu()),
    }
}

/// `relu(norm(conv(x)) + other)` (a residual block's end): one fused oneDNN op when `norm` is
/// folded into a packed `conv`.
pub fn conv_norm_add_relu(
    conv: &Conv2d,
    norm: &Norm2d,
    x: &Tensor,
    other: &Tensor,
    train: bool,
) -> Result<Tensor> {
    match norm {
        Norm2d::Folded if !train && conv.is_packed() => conv.forward_fused(x, true, Some(other)),
        _ => Ok((norm.forward_t(&x.apply(conv), train)? + other).relu()),
    }
}

/// PyTorch's `_verify_batch_size`: fails when `B * channels_per_group * H * W` is 1.
fn more_than_one_value(norm: &str, per: &str, xs: &Tensor, channels_per_group: i64) -> Result<()> {
    let size = xs.size();
    let values = size.iter().skip(2).product::<i64>() * size.first().unwrap_or(&1);
    if values * channels_per_group == 1 {
        bail!(
            "{norm} needs more than 1 value per {per}, got input of size {size:?} (PyTorch \
             refuses it too)"
        );
    }
    Ok(())
}
