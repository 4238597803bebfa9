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
//! gradient routed through one side of each unit. [`probed`] fits the crate's residual models to
//! it: the CIFAR nets, torchvision's and timm's ResNets, the ConvSDS head and the SiD classifier.

pub mod gradients;
pub mod lesion;
pub mod paths;
pub mod plot;
pub mod probed;
pub mod study;

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use crate::models::Inputs;

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

/// A network as Veit et al. see it: a stem, stages of units, a head.
pub trait Probed {
    /// The tensor the first unit reads (`x`: the model's named inputs, `input` for images).
    fn stem_t(&self, x: &Inputs, train: bool) -> Result<Tensor>;
    /// The units, stage by stage, with their state_dict prefixes (`layer2.0`). A stage is a chain
    /// of units (units may be reordered only within one).
    fn stages(&self) -> Vec<Vec<(String, &dyn Unit)>>;
    /// From the stem's output to the head's input; `next(h)` runs the next unit in run order and
    /// must be called once per unit. The default runs the units as one chain; a model whose units
    /// sit inside other computations (SiD) overrides it.
    fn body_t(
        &self,
        stem: &Tensor,
        _train: bool,
        next: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let n: usize = self.stages().iter().map(Vec::len).sum();
        (0..n).try_fold(stem.shallow_clone(), |h, _| next(&h))
    }
    /// From the last unit's output to the logits.
    fn head_t(&self, h: &Tensor, train: bool) -> Result<Tensor>;
    /// The stem's and the head's weights, named (`conv1.weight`, `fc.weight`).
    fn stem_weights(&self) -> Vec<(String, &Tensor)>;
    fn head_weights(&self) -> Vec<(String, &Tensor)>;
    /// Every layer weight the gradient probe reports, named, input side first: by default the
    /// stem's, the units' branches', the head's.
    fn weights(&self) -> Vec<(String, &Tensor)> {
        let mut all = self.stem_weights();
        for (name, unit) in self.stages().into_iter().flatten() {
            all.extend(probed::unit_weights(&name, unit));
        }
        all.extend(self.head_weights());
        all
    }
    /// Whether the units have shortcuts (false: a plain net).
    fn residual(&self) -> bool;
    /// Whether the units form one chain from the stem to the head, every path from the stem's
    /// output passing through each unit (its branch or its shortcut): then the network unravels
    /// into the 2^n paths of Veit et al. that the path analysis measures.
    fn chain(&self) -> bool {
        true
    }
    /// Whether training mode draws random numbers (dropout, stochastic depth); the gradient probe
    /// then runs in eval mode, so that it measures one network.
    fn stochastic(&self) -> bool {
        false
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
pub fn forward(net: &dyn Probed, x: &Inputs, train: bool, edit: &Edit) -> Result<Trace> {
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
    let mut outputs = Vec::with_capacity(n);
    let mut next = |h: &Tensor| -> Result<Tensor> {
        let Some(&i) = order.get(outputs.len()) else {
            bail!("the network ran more than its {n} units");
        };
        let (_, name, unit) = &units[i];
        let out = if edit.deleted.contains(&i) {
            unit.skip_t(h, train)
        } else {
            let route = edit.routes.get(i).copied().unwrap_or_default();
            run_routed(*unit, h, train, route)
        }
        .with_context(|| name.clone())?;
        outputs.push(out.shallow_clone());
        Ok(out)
    };
    let h = net.body_t(&stem, train, &mut next)?;
    if outputs.len() != n {
        bail!("the network ran {} of its {n} units", outputs.len());
    }
    let logits = net.head_t(&h, train)?;
    Ok(Trace {
        logits,
        stem,
        outputs,
    })
}

/// The mean cross-entropy of `logits` `[B, C]` (or `[B, L, C]`, per position) against class
/// indices `y` `[B]` (`[B, L]`): `F.cross_entropy(logits.flatten(0, -2), y.flatten())`.
pub fn loss(logits: &Tensor, y: &Tensor) -> Tensor {
    logits
        .to_kind(tch::Kind::Float)
        .flatten(0, -2)
        .cross_entropy_loss::<Tensor>(&y.flatten(0, -1), None, tch::Reduction::Mean, -100, 0.0)
}

/// The batch size of `x` (its first tensor's first dimension; 0 without tensors).
pub fn batch_size(x: &Inputs) -> i64 {
    x.values()
        .next()
        .map_or(0, |t| t.size().first().copied().unwrap_or(1))
}

/// `x` as the named inputs of an image model (`input`).
pub fn image(x: &Tensor) -> Inputs {
    Inputs::from([("input".to_string(), x.shallow_clone())])
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
/// reproducible) and, if given, loads `weights` (strict). The probes take every residual model
/// the crate builds: the paper's CIFAR nets (plain or residual), torchvision's and timm's ResNets,
/// the ConvSDS head and the SiD classifier; a lone ConvSDS layer or SiD block is refused.
pub fn load(
    config: &crate::ModelConfig,
    weights: Option<&std::path::Path>,
    device: tch::Device,
    seed: u64,
) -> Result<Loaded> {
    use crate::checkpoint::{load_state_dict, Checkpoint, ReadOptions};
    use crate::models::{
        cifar::CifarResNet, conv_sds::ConvSdsHead, resnet::ResNet, sid::SidClassifier,
    };
    use crate::ModelConfig;
    config.validate()?;
    tch::manual_seed(seed as i64);
    let vs = tch::nn::VarStore::new(device);
    let root = vs.root();
    let net: Box<dyn Probed> = match config {
        ModelConfig::CifarResnet(c) => Box::new(CifarResNet::new(root, c)?),
        ModelConfig::Resnet(c) => Box::new(ResNet::new(root, &c.resolve(None)?)),
        ModelConfig::Torchvision {
            constructor,
            config,
        }
        | ModelConfig::Timm {
            constructor,
            config,
        } => Box::new(ResNet::new(root, &config.resolve(Some(constructor))?)),
        ModelConfig::ConvSdsHead(c) => Box::new(ConvSdsHead::new(root, c)),
        ModelConfig::SidClassifier(c) => Box::new(SidClassifier::new(root, c)?),
        ModelConfig::ConvSdsLayer(_) | ModelConfig::SidResidualBlock(_) => bail!(
            "{} is a single residual unit without a head or a loss: probe the model it belongs \
             to (conv_sds_head, sid_classifier)",
            config.arch()
        ),
    };
    if let Some(w) = weights {
        let state = Checkpoint::open(w, &ReadOptions::default())?;
        load_state_dict(&vs, &state, true)
            .with_context(|| format!("cannot load {} into the model", w.display()))?;
    }
    Ok(Loaded { vs, net })
}

/// The image channels an image model takes (`None`: not an image model).
pub fn image_channels(config: &crate::ModelConfig) -> Option<i64> {
    use crate::ModelConfig;
    match config {
        ModelConfig::CifarResnet(c) => Some(c.in_channels),
        ModelConfig::Resnet(c)
        | ModelConfig::Torchvision { config: c, .. }
        | ModelConfig::Timm { config: c, .. } => Some(c.in_channels),
        _ => None,
    }
}

/// The first `n` images of `data`, normalised, as named inputs, with their labels.
pub fn first_batch(
    data: &crate::data::Dataset,
    normalizer: &crate::data::Normalizer,
    n: i64,
) -> Result<(Inputs, Tensor)> {
    let (x, y) = crate::data::Batches::new(data, normalizer, n, None, None)
        .next_batch()?
        .context("no images in the data set")?;
    Ok((image(&x), y))
}

/// Seeded random inputs of `n` examples for `config`'s model, with random labels: SiD's
/// categories within each feature's range, standard normal numbers and text vectors, labels
/// `[n]`; ConvSDS `[n, L, H]` normal, labels `[n, L]` (one per position); image models
/// `[n, C, 32, 32]` normal, labels `[n]`.
pub fn random_batch(
    config: &crate::ModelConfig,
    n: i64,
    seed: u64,
    device: tch::Device,
) -> Result<(Inputs, Tensor)> {
    use crate::ModelConfig;
    use tch::Kind;
    tch::manual_seed(seed as i64);
    let opts = (Kind::Float, device);
    let labels =
        |classes: i64, shape: &[i64]| Tensor::randint(classes, shape, (Kind::Int64, device));
    let mut inputs = Inputs::new();
    let y = match config {
        ModelConfig::SidClassifier(c) => {
            let columns: Vec<Tensor> = c
                .num_categories_list
                .iter()
                .map(|&k| Tensor::randint(k.max(1), [n, 1], (Kind::Int64, device)))
                .collect();
            let categorical = if columns.is_empty() {
                Tensor::zeros([n, 0], (Kind::Int64, device))
            } else {
                Tensor::cat(&columns, 1)
            };
            inputs.insert("categorical".into(), categorical);
            inputs.insert(
                "numerical".into(),
                Tensor::randn([n, c.num_numerical_features], opts),
            );
            inputs.insert(
                "text".into(),
                Tensor::randn([n, c.num_text_features, c.text_input_size], opts),
            );
            labels(c.classifier_labels()?, &[n])
        }
        ModelConfig::ConvSdsHead(c) => {
            inputs.insert(
                "input".into(),
                Tensor::randn([n, c.input_size, c.hidden_size], opts),
            );
            labels(c.num_labels, &[n, c.input_size])
        }
        ModelConfig::CifarResnet(crate::models::cifar::CifarResNetConfig {
            in_channels,
            num_classes,
            ..
        })
        | ModelConfig::Resnet(crate::models::resnet::ResNetConfig {
            in_channels,
            num_classes,
            ..
        })
        | ModelConfig::Torchvision {
            config:
                crate::models::resnet::ResNetConfig {
                    in_channels,
                    num_classes,
                    ..
                },
            ..
        }
        | ModelConfig::Timm {
            config:
                crate::models::resnet::ResNetConfig {
                    in_channels,
                    num_classes,
                    ..
                },
            ..
        } => {
            inputs.insert(
                "input".into(),
                Tensor::randn([n, *in_channels, 32, 32], opts),
            );
            labels(*num_classes, &[n])
        }
        other => bail!("no random inputs for {}", other.arch()),
    };
    Ok((inputs, y))
}
