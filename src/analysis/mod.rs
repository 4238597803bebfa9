//! Why residual networks train: the measurements of Veit, Wilber and Belongie, "Residual Networks
//! Behave Like Ensembles of Relatively Shallow Networks" (NeurIPS 2016), on this crate's models.
//!
//! * [`gradients`]: the norm of the loss gradient at every block's output and every layer's
//!   weights, input side first (does the gradient reach the first blocks?).
//! * [`lesion`]: test error with blocks deleted (one at a time, `k` at random) or reordered
//!   (Veit et al. figures 3–5).
//! * [`paths`]: the distribution of path lengths and the gradient each length carries (figure 6).
//! * [`plot`]: their PNG plots.
//!
//! Everything runs through [`Probed`], a network seen as a stem, stages of residual [`Unit`]s and
//! a head, and [`forward`], which runs it with an [`Edit`]: units deleted, reordered, or with the
//! gradient routed through one side of each unit.

pub mod gradients;
pub mod lesion;
pub mod masked;
pub mod paths;
pub mod plot;
pub mod study;

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use crate::models::cifar::CifarResNet;
use crate::models::conv_sds::ConvSdsHead;
use crate::models::resnet::{global_pool, stem, Block};

/// One residual unit, `join(branch(x), shortcut(x))`.
pub trait Unit {
    /// The residual branch `F(x)`.
    fn branch_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// The shortcut `s(x)` (for a plain unit, what stands in when it is deleted).
    fn shortcut_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Combines both into the unit's output.
    fn join(&self, branch: Tensor, shortcut: Tensor) -> Tensor;
    /// The output with the unit deleted: its branch removed, the shortcut kept.
    fn skip_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Whether the output's shape differs from the input's (such units cannot be reordered).
    fn reshapes(&self) -> bool;
    /// The branch's layer weights, input side first, named relative to the unit.
    fn weights(&self) -> Vec<(&'static str, &Tensor)>;
}

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

/// A network as Veit et al. see it: a stem, stages of units, a head.
pub trait Probed {
    /// The tensor the first unit reads.
    fn stem_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// The units, stage by stage, with their state_dict prefixes (`layer2.0`).
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>>;
    /// From the last unit's output to the logits.
    fn head_t(&self, h: &Tensor, train: bool) -> Result<Tensor>;
    /// The stem's and the head's weights, named (`conv1.weight`, `fc.weight`).
    fn stem_weights(&self) -> Vec<(String, &Tensor)>;
    fn head_weights(&self) -> Vec<(String, &Tensor)>;
    /// Whether the units have shortcuts (false: a plain net).
    fn residual(&self) -> bool;
}

impl Probed for CifarResNet {
    fn stem_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        stem(&self.conv1, &self.bn1, x, train)
    }
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>> {
        [&self.layer1, &self.layer2, &self.layer3]
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

/// A `ConvSDSLayer` is `layer_norm(x + relu(conv2(conv1(x))))`: its branch is
/// `relu(conv2(conv1(x)))`, its shortcut the identity; deleted, it is `layer_norm(x)`.
impl Unit for crate::models::conv_sds::ConvSdsLayer {
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

/// The ConvSDS head: no stem (its input is checked by [`ConvSdsHead::features`]' rules), the
/// `convs` as one stage, the classifier as head.
impl Probed for ConvSdsHead {
    fn stem_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let c = &self.config;
        if x.dim() != 3 || x.size()[1..] != [c.input_size, c.hidden_size] {
            bail!(
                "input: expected [B, {}, {}], got {:?}",
                c.input_size,
                c.hidden_size,
                x.size()
            );
        }
        Ok(x.shallow_clone())
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

/// Which side of a unit the backward pass goes through; the forward values stay the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// Both, as in the network.
    #[default]
    Both,
    /// The residual branch only (the shortcut's input is detached).
    Branch,
    /// The shortcut only (the branch's output is detached).
    Shortcut,
}

/// How to run a network differently from how it was built. Units are numbered input side first
/// over all stages (`0..n`).
#[derive(Debug, Clone, Default)]
pub struct Edit {
    /// Units replaced by their shortcut ([`Unit::skip_t`]).
    pub deleted: BTreeSet<usize>,
    /// The order to run units in, a permutation of `0..n` that keeps each unit in its stage and
    /// every shape-changing unit in place; empty: as built.
    pub order: Vec<usize>,
    /// Per unit (by number), where the gradient flows; empty: [`Route::Both`] everywhere.
    pub routes: Vec<Route>,
}

/// What [`forward`] computed.
#[derive(Debug)]
pub struct Trace {
    pub logits: Tensor,
    /// The stem's output, the first unit's input.
    pub stem: Tensor,
    /// Each run position's output (deleted units included).
    pub outputs: Vec<Tensor>,
}

/// The units of `net`, numbered, with their stage.
pub fn units(net: &dyn Probed) -> Vec<(usize, String, &dyn Unit)> {
    net.stages()
        .into_iter()
        .enumerate()
        .flat_map(|(s, stage)| stage.into_iter().map(move |(n, u)| (s, n, u)))
        .collect()
}

/// Runs `net` on `x` with `edit`.
pub fn forward(net: &dyn Probed, x: &Tensor, train: bool, edit: &Edit) -> Result<Trace> {
    let units = units(net);
    let n = units.len();
    let order: Vec<usize> = if edit.order.is_empty() {
        (0..n).collect()
    } else {
        check_order(&units, &edit.order)?;
        edit.order.clone()
    };
    if let Some(&bad) = edit.deleted.iter().find(|&&i| i >= n) {
        bail!("cannot delete unit {bad}: the network has {n}");
    }
    if !edit.routes.is_empty() && edit.routes.len() != n {
        bail!("{} routes given for {n} units", edit.routes.len());
    }
    let stem = net.stem_t(x, train).context("stem")?;
    let mut h = stem.shallow_clone();
    let mut outputs = Vec::with_capacity(n);
    for &i in &order {
        let (_, name, unit) = &units[i];
        h = if edit.deleted.contains(&i) {
            unit.skip_t(&h, train)
        } else {
            run_routed(
                *unit,
                &h,
                train,
                edit.routes.get(i).copied().unwrap_or_default(),
            )
        }
        .with_context(|| name.clone())?;
        outputs.push(h.shallow_clone());
    }
    let logits = net.head_t(&h, train)?;
    Ok(Trace {
        logits,
        stem,
        outputs,
    })
}

fn run_routed(unit: &dyn Unit, x: &Tensor, train: bool, route: Route) -> Result<Tensor> {
    let branch = unit.branch_t(x, train)?;
    let shortcut = unit.shortcut_t(x, train)?;
    Ok(match route {
        Route::Both => unit.join(branch, shortcut),
        Route::Branch => unit.join(branch, shortcut.detach()),
        Route::Shortcut => unit.join(branch.detach(), shortcut),
    })
}

/// Checks that `order` permutes units only within their stage and leaves shape-changing ones
/// where they are.
fn check_order(units: &[(usize, String, &dyn Unit)], order: &[usize]) -> Result<()> {
    let n = units.len();
    let mut seen = vec![false; n];
    if order.len() != n {
        bail!(
            "order: expected a permutation of {n} units, got {} entries",
            order.len()
        );
    }
    for &i in order {
        if i >= n || std::mem::replace(&mut seen[i], true) {
            bail!("order: {order:?} is not a permutation of 0..{n}");
        }
    }
    for (position, &i) in order.iter().enumerate() {
        let (stage, name, unit) = &units[i];
        if *stage != units[position].0 {
            bail!("order: {name} cannot leave its stage");
        }
        if i != position && (unit.reshapes() || units[position].2.reshapes()) {
            bail!("order: {name} changes the shape and must stay in place");
        }
    }
    Ok(())
}

/// The adjacent pairs `(i, i + 1)` of units that may be swapped: same stage, neither changes
/// the shape.
pub fn swappable_pairs(net: &dyn Probed) -> Vec<usize> {
    let units = units(net);
    (0..units.len().saturating_sub(1))
        .filter(|&i| {
            let (a, b) = (&units[i], &units[i + 1]);
            a.0 == b.0 && !a.2.reshapes() && !b.2.reshapes()
        })
        .collect()
}

/// The state_dict prefixes of the units, input side first.
pub fn unit_names(net: &dyn Probed) -> Vec<String> {
    units(net).into_iter().map(|(_, n, _)| n).collect()
}

/// SplitMix64, the seeded generator of the random draws (deleted units, swaps, paths).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Self {
        Self(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n >= 1`; the modulo bias is below 2^-50 for the sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `k` distinct numbers below `n`.
    pub fn choose(&mut self, n: usize, k: usize) -> BTreeSet<usize> {
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below((n - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.into_iter().take(k).collect()
    }
}

/// A probed model with the variables it was built in.
pub struct Loaded {
    pub vs: tch::nn::VarStore,
    pub net: Box<dyn Probed>,
}

/// Builds the model of `config` on `device` (from seed `seed`, so that "at initialisation" is
/// reproducible) and, if given, loads `weights` (strict). The probes take the paper's CIFAR nets
/// (`cifar_resnet`, plain or residual) and the ConvSDS head (`conv_sds_head`).
pub fn load(
    config: &crate::ModelConfig,
    weights: Option<&std::path::Path>,
    device: tch::Device,
    seed: u64,
) -> Result<Loaded> {
    use crate::checkpoint::{load_state_dict, Checkpoint, ReadOptions};
    use crate::ModelConfig;
    config.validate()?;
    tch::manual_seed(seed as i64);
    let vs = tch::nn::VarStore::new(device);
    let net: Box<dyn Probed> = match config {
        ModelConfig::CifarResnet(c) => Box::new(CifarResNet::new(vs.root(), c)?),
        ModelConfig::ConvSdsHead(c) => Box::new(ConvSdsHead::new(vs.root(), c)),
        other => bail!(
            "the probes take cifar_resnet and conv_sds_head models, not {}",
            other.arch()
        ),
    };
    if let Some(w) = weights {
        let state = Checkpoint::open(w, &ReadOptions::default())?;
        load_state_dict(&vs, &state, true)
            .with_context(|| format!("cannot load {} into the model", w.display()))?;
    }
    Ok(Loaded { vs, net })
}

/// The first `n` images of `data`, normalised, with their labels.
pub fn first_batch(
    data: &crate::data::Dataset,
    normalizer: &crate::data::Normalizer,
    n: i64,
) -> Result<(Tensor, Tensor)> {
    crate::data::Batches::new(data, normalizer, n, None, None)
        .next_batch()?
        .context("no images in the data set")
}
