//! What the runs found: final errors per network over seeds, and the paper's three comparisons.

use serde::Serialize;

use super::network_name;
use crate::train::EpochMetrics;

/// One trained network of the experiment (one depth, plain or residual, one seed).
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub name: String,
    pub depth: i64,
    pub plain: bool,
    pub seed: u64,
    /// Iterations (batches) per epoch, for the paper's iteration axis.
    pub steps_per_epoch: u64,
    pub metrics: Vec<EpochMetrics>,
}

impl Curve {
    pub(super) fn last(&self) -> Option<&EpochMetrics> {
        self.metrics.last()
    }
}

/// Mean and spread of one figure over seeds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Some(Self {
            mean,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            std: var.sqrt(),
        })
    }

    pub(super) fn pct(&self) -> String {
        format!(
            "{:.2}% ± {:.2} ({:.2}–{:.2})",
            100.0 * self.mean,
            100.0 * self.std,
            100.0 * self.min,
            100.0 * self.max
        )
    }
}

/// One network over all its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Network {
    pub name: String,
    pub depth: i64,
    pub plain: bool,
    pub seeds: Vec<u64>,
    pub final_train_error: Spread,
    pub final_test_error: Option<Spread>,
    pub seconds: f64,
}

/// A comparison of final training error between two networks, as the paper makes it: `better`
/// should end lower than `worse`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What the paper expects, in words.
    pub claim: String,
    pub better: String,
    pub worse: String,
    /// Mean final training errors of the two.
    pub better_error: f64,
    pub worse_error: f64,
    /// The claim holds for the means.
    pub holds_for_mean: bool,
    /// Seeds (paired: the same seed for both networks) for which it holds, of how many.
    pub seeds_holding: usize,
    pub seeds: usize,
}

impl Comparison {
    pub(super) fn sentence(&self) -> String {
        let verdict = if self.holds_for_mean {
            "holds"
        } else {
            "does NOT hold"
        };
        format!(
            "{}: {verdict} for the mean ({} {:.2}% vs {} {:.2}% final training error) and for {} of {} seeds",
            self.claim,
            self.better,
            100.0 * self.better_error,
            self.worse,
            100.0 * self.worse_error,
            self.seeds_holding,
            self.seeds
        )
    }
}

/// What the experiment found.
#[derive(Debug, Serialize)]
pub struct Findings {
    pub curves: Vec<Curve>,
    pub networks: Vec<Network>,
    pub comparisons: Vec<Comparison>,
    /// The deepest plain net ends with higher training error than the shallowest plain net
    /// (mean over seeds).
    pub plain_degrades: bool,
    /// The deepest residual net ends with training error no higher than the shallowest one.
    pub residual_improves: bool,
    /// At the deepest depth, the residual net ends below the plain one.
    pub residual_beats_plain: bool,
    pub summary: String,
}

fn networks(curves: &[Curve]) -> Vec<Network> {
    let mut keys: Vec<(i64, bool)> = curves.iter().map(|c| (c.depth, !c.plain)).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|(depth, residual)| {
            let runs: Vec<&Curve> = curves
                .iter()
                .filter(|c| c.depth == depth && c.plain != residual)
                .collect();
            let last: Vec<&EpochMetrics> = runs.iter().filter_map(|c| c.last()).collect();
            let train: Vec<f64> = last.iter().map(|m| m.train_error).collect();
            let test: Vec<f64> = last.iter().filter_map(|m| m.test_error).collect();
            Some(Network {
                name: runs.first()?.name.clone(),
                depth,
                plain: !residual,
                seeds: runs.iter().map(|c| c.seed).collect(),
                final_train_error: Spread::of(&train)?,
                final_test_error: Spread::of(&test),
                seconds: runs
                    .iter()
                    .flat_map(|c| c.metrics.iter().map(|m| m.seconds))
                    .sum(),
            })
        })
        .collect()
}

/// `better` should end with lower training error than `worse`, over the seeds both have.
fn compare(
    curves: &[Curve],
    claim: &str,
    better: (i64, bool),
    worse: (i64, bool),
) -> Option<Comparison> {
    let error = |(depth, plain): (i64, bool), seed: u64| {
        curves
            .iter()
            .find(|c| c.depth == depth && c.plain == plain && c.seed == seed)
            .and_then(|c| c.last())
            .map(|m| m.train_error)
    };
    let pairs: Vec<(f64, f64)> = seeds(curves)
        .iter()
        .filter_map(|&s| Some((error(better, s)?, error(worse, s)?)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let better_error = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let worse_error = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    Some(Comparison {
        claim: claim.to_string(),
        better: network_name(better.0, better.1),
        worse: network_name(worse.0, worse.1),
        better_error,
        worse_error,
        holds_for_mean: better_error < worse_error,
        seeds_holding: pairs.iter().filter(|(b, w)| b < w).count(),
        seeds: pairs.len(),
    })
}

pub(super) fn judge(curves: Vec<Curve>) -> Findings {
    let depths: Vec<i64> = curves.iter().map(|c| c.depth).collect();
    let (shallow, deep) = (
        *depths.iter().min().unwrap_or(&0),
        *depths.iter().max().unwrap_or(&0),
    );
    let plain = compare(
        &curves,
        &format!("degradation: plain-{deep} trains worse than plain-{shallow}"),
        (shallow, true),
        (deep, true),
    );
    let residual = compare(
        &curves,
        &format!("with shortcuts depth helps: resnet-{deep} trains better than resnet-{shallow}"),
        (deep, false),
        (shallow, false),
    );
    let versus = compare(
        &curves,
        &format!("shortcuts fix the deep net: resnet-{deep} trains better than plain-{deep}"),
        (deep, false),
        (deep, true),
    );
    let holds = |c: &Option<Comparison>| c.as_ref().is_some_and(|c| c.holds_for_mean);
    let (plain_degrades, residual_improves, residual_beats_plain) =
        (holds(&plain), holds(&residual), holds(&versus));
    let comparisons: Vec<Comparison> = [plain, residual, versus].into_iter().flatten().collect();
    let all_seeds = comparisons
        .iter()
        .all(|c| c.holds_for_mean && c.seeds_holding == c.seeds);
    let verdict = if comparisons.len() < 3 {
        "Networks are missing, so the comparisons are incomplete.".to_string()
    } else if all_seeds {
        "All three comparisons go the paper's way, for the mean and for every seed.".to_string()
    } else if plain_degrades && residual_improves && residual_beats_plain {
        "All three comparisons go the paper's way for the mean, but not for every seed.".to_string()
    } else {
        "This run does NOT reproduce the paper: at least one comparison went the other way."
            .to_string()
    };
    let sentences: Vec<String> = comparisons.iter().map(Comparison::sentence).collect();
    Findings {
        networks: networks(&curves),
        curves,
        comparisons,
        plain_degrades,
        residual_improves,
        residual_beats_plain,
        summary: format!("{verdict} {}.", sentences.join("; ")),
    }
}

/// The seeds of `curves`, ascending, once each.
pub(super) fn seeds(curves: &[Curve]) -> Vec<u64> {
    let mut seeds: Vec<u64> = curves.iter().map(|c| c.seed).collect();
    seeds.sort();
    seeds.dedup();
    seeds
}
