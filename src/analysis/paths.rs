//! Path analysis (Veit et al. 2016, §5, figure 6). A network of `n` residual units unravels into
//! `2^n` paths, `C(n, k)` of them through `k` residual branches. The gradient one path of length
//! `k` carries is measured by their method: draw `k` units at random, let the backward pass go
//! through those units' branches and the other units' shortcuts only (the forward values stay
//! those of the whole network), and take the norm of the gradient that reaches the first unit's
//! input. Times the number of such paths, it gives the share of the whole gradient that paths of
//! each length carry.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{forward, loss, units, Edit, Probed, Rng, Route};
use crate::models::Inputs;

/// One path length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathLength {
    pub k: usize,
    /// `C(n, k) / 2^n`: the share of all paths with this length.
    pub paths: f64,
    /// Mean over the draws of `|dL/d input|` through one path of this length.
    pub gradient: f64,
    pub gradient_min: f64,
    pub gradient_max: f64,
    /// `C(n, k) * gradient`, normalised over `k`: the share of the total gradient.
    pub total: f64,
}

/// The analysis of one network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paths {
    pub units: usize,
    pub draws: usize,
    pub images: i64,
    pub lengths: Vec<PathLength>,
    /// Mean path length, `n / 2`.
    pub mean_length: f64,
    /// The gradient-weighted mean path length.
    pub gradient_mean_length: f64,
    /// The shortest range of lengths `[lo, hi]` carrying at least [`EFFECTIVE_SHARE`] of the
    /// gradient.
    pub effective: (usize, usize),
}

/// The share of the gradient the effective range carries.
pub const EFFECTIVE_SHARE: f64 = 0.9;

/// `C(n, k)` as a float (exact up to 2^53).
pub fn binomial(n: usize, k: usize) -> f64 {
    (0..k.min(n - k.min(n))).fold(1.0, |c, i| c * (n - i) as f64 / (i + 1) as f64)
}

/// Measures every path length `0..=n` of `net` on inputs `x`, labels `y` (eval mode),
/// `draws` random unit sets per length.
pub fn analyse(net: &dyn Probed, x: &Inputs, y: &Tensor, draws: usize, seed: u64) -> Result<Paths> {
    if !net.residual() {
        bail!("path analysis needs a residual network: a plain net has one path");
    }
    if !net.chain() {
        bail!(
            "path analysis needs the residual units to form one chain (Veit et al.'s unravelled \
             view, 2^n paths through n units); this model's units do not: in SiD the embeddings \
             reach every layer directly and the residual blocks sit inside the layers' attention \
             and transform branches, so the gradient does not split into those 2^n paths (the \
             gradient probe and the lesion study do apply)"
        );
    }
    let n = units(net).len();
    let mut rng = Rng::new(seed, 6);
    let draws = draws.max(1);
    let mut lengths = Vec::with_capacity(n + 1);
    for k in 0..=n {
        // One set exists for k = 0 and k = n.
        let draws_k = if k == 0 || k == n { 1 } else { draws };
        let mut norms = Vec::with_capacity(draws_k);
        for _ in 0..draws_k {
            let through = rng.choose(n, k);
            let routes = (0..n)
                .map(|i| {
                    if through.contains(&i) {
                        Route::Branch
                    } else {
                        Route::Shortcut
                    }
                })
                .collect();
            let edit = Edit {
                routes,
                ..Edit::default()
            };
            let trace = forward(net, x, false, &edit)?;
            let loss = loss(&trace.logits, y);
            let grad = Tensor::f_run_backward(&[&loss], &[&trace.stem], false, false)?;
            norms.push(grad[0].to_kind(Kind::Double).norm().double_value(&[]));
        }
        let mean = norms.iter().sum::<f64>() / norms.len() as f64;
        lengths.push(PathLength {
            k,
            paths: binomial(n, k) / 2f64.powi(n as i32),
            gradient: mean,
            gradient_min: norms.iter().copied().fold(f64::INFINITY, f64::min),
            gradient_max: norms.iter().copied().fold(0.0, f64::max),
            total: binomial(n, k) * mean,
        });
    }
    let sum: f64 = lengths.iter().map(|l| l.total).sum();
    for l in &mut lengths {
        l.total /= sum;
    }
    let gradient_mean_length = lengths.iter().map(|l| l.k as f64 * l.total).sum();
    let shares: Vec<f64> = lengths.iter().map(|l| l.total).collect();
    Ok(Paths {
        units: n,
        draws,
        images: super::batch_size(x),
        mean_length: n as f64 / 2.0,
        gradient_mean_length,
        effective: shortest_range(&shares, EFFECTIVE_SHARE),
        lengths,
    })
}

/// The shortest index range `[lo, hi]` whose values sum to at least `share` (the first one among
/// equally short ones with the largest sum).
pub fn shortest_range(values: &[f64], share: f64) -> (usize, usize) {
    let total: f64 = values.iter().sum();
    let mut best = (0, values.len().saturating_sub(1));
    let mut best_sum = f64::NEG_INFINITY;
    for lo in 0..values.len() {
        let mut sum = 0.0;
        for (hi, v) in values.iter().enumerate().skip(lo) {
            sum += v;
            if sum >= share * total {
                let shorter = hi - lo < best.1 - best.0;
                if shorter || (hi - lo == best.1 - best.0 && sum > best_sum) {
                    best = (lo, hi);
                    best_sum = sum;
                }
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomials_and_ranges() {
        assert_eq!(binomial(54, 0), 1.0);
        assert_eq!(binomial(5, 2), 10.0);
        assert_eq!(binomial(30, 15), 155_117_520.0);
        assert_eq!(shortest_range(&[0.0, 0.05, 0.5, 0.4, 0.05], 0.9), (2, 3));
        assert_eq!(shortest_range(&[0.2, 0.2, 0.2, 0.2, 0.2], 0.9), (0, 4));
    }
}
