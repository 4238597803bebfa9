//! Layer builders with PyTorch's initialisation (tch's defaults differ: its Linear/Conv weights use
//! a ReLU-gain Kaiming bound of sqrt(6 / fan_in) where PyTorch uses 1 / sqrt(fan_in)).

use tch::nn::{self, Init};

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
