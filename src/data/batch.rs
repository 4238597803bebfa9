//! Mini-batches cut on the data's device: a seeded shuffle, the paper's augmentation (zero-pad by
//! 4, random crop back to size, random horizontal flip) applied to the whole batch at once, and
//! per-channel normalisation.
//!
//! All randomness comes from a small counter-based generator seeded by `(seed, epoch)`: it draws
//! the epoch's order and one seed per batch, from which the crops and flips are hashed with
//! integer tensor ops on the data's device (no per-batch host-to-device copy, and no shared
//! global generator). Epoch `e` thus draws the same order and augmentations whether the run
//! started at epoch 0 or resumed mid-epoch.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::Dataset;

/// SplitMix64: a tiny, well-mixed generator; state is just a counter.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut g = SplitMix(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        g.next_u64();
        g
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The training augmentation of the ResNet paper (§4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Zero padding before the random crop (4 in the paper; 0 turns cropping off).
    pub pad: i64,
    /// Random horizontal flips (off for digits, whose mirror images are other symbols).
    pub flip: bool,
}

/// `(x / 255 - mean) / std` per channel.
#[derive(Debug)]
pub struct Normalizer {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    mean_t: Tensor,
    std_t: Tensor,
}

impl Normalizer {
    pub fn new(mean: Vec<f64>, std: Vec<f64>, device: Device) -> Self {
        let c = mean.len() as i64;
        let as_tensor = |v: &[f64]| {
            Tensor::from_slice(v)
                .to_kind(Kind::Float)
                .view([1, c, 1, 1])
                .to_device(device)
        };
        let (mean_t, std_t) = (as_tensor(&mean), as_tensor(&std));
        Self {
            mean,
            std,
            mean_t,
            std_t,
        }
    }

    /// Statistics of a training set.
    pub fn fit(data: &Dataset, device: Device) -> Self {
        let x = data.images.to_kind(Kind::Double) / 255.0;
        let c = x.size()[1];
        let per_channel = x.transpose(0, 1).reshape([c, -1]);
        let mean: Vec<f64> =
            Vec::try_from(per_channel.mean_dim(1, false, Kind::Double)).unwrap_or_default();
        let std: Vec<f64> = Vec::try_from(per_channel.std_dim(1, false, false)).unwrap_or_default();
        let std = std
            .into_iter()
            .map(|s| if s > 0.0 { s } else { 1.0 })
            .collect();
        Self::new(mean, std, device)
    }

    pub fn apply(&self, images: &Tensor) -> Tensor {
        (images.to_kind(Kind::Float) / 255.0 - &self.mean_t) / &self.std_t
    }
}

/// Rank `shard.0`'s share of an epoch's `order` among `shard.1` data-parallel processes, as
/// PyTorch's `DistributedSampler` cuts it: the order padded by repeating its start to a multiple
/// of the world size, then every `world`-th entry from the rank on (one rank: `order` itself).
pub fn distributed_shard<T: Copy>(order: Vec<T>, shard: (usize, usize)) -> Vec<T> {
    let (rank, world) = (shard.0, shard.1.max(1));
    if world == 1 || order.is_empty() {
        return order;
    }
    let total = order.len().div_ceil(world) * world;
    (rank..total)
        .step_by(world)
        .map(|i| order[i % order.len()])
        .collect()
}

/// Batches of one epoch, in a seeded order.
pub struct Batches<'a> {
    data: &'a Dataset,
    order: Tensor,
    batch_size: i64,
    position: i64,
    augment: Option<Augment>,
    rng: SplitMix,
    normalizer: &'a Normalizer,
}

impl<'a> Batches<'a> {
    /// The order of epoch `epoch` of `n` examples that [`Batches::new`] draws for `(seed, epoch)`.
    pub fn shuffled_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = SplitMix::new(seed, epoch);
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }

    /// `shuffle_seed`: `Some((seed, epoch))` for a training epoch, `None` for evaluation order.
    pub fn new(
        data: &'a Dataset,
        normalizer: &'a Normalizer,
        batch_size: i64,
        shuffle_seed: Option<(u64, u64)>,
        augment: Option<Augment>,
    ) -> Self {
        Self::sharded(data, normalizer, batch_size, shuffle_seed, augment, (0, 1))
    }

    /// As [`Batches::new`], for rank `shard.0` of `shard.1` data-parallel processes, with
    /// `DistributedSampler`'s semantics: every rank draws the same order, pads it by repeating
    /// its start to a multiple of the world size, and takes every `world`-th index from its
    /// rank on (one rank: the order itself).
    pub fn sharded(
        data: &'a Dataset,
        normalizer: &'a Normalizer,
        batch_size: i64,
        shuffle_seed: Option<(u64, u64)>,
        augment: Option<Augment>,
        shard: (usize, usize),
    ) -> Self {
        let n = data.len();
        let (order, rng) = match shuffle_seed {
            Some((seed, epoch)) => {
                let mut rng = SplitMix::new(seed, epoch);
                let mut order: Vec<i64> = (0..n).collect();
                for i in (1..order.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    order.swap(i, j);
                }
                (order, rng)
            }
            None => ((0..n).collect(), SplitMix::new(0, 0)),
        };
        let order =
            Tensor::from_slice(&distributed_shard(order, shard)).to_device(data.images.device());
        Self {
            data,
            order,
            batch_size: batch_size.max(1),
            position: 0,
            augment,
            rng,
            normalizer,
        }
    }

    /// Batches in an epoch.
    pub fn len(&self) -> i64 {
        (self.order.size()[0] + self.batch_size - 1) / self.batch_size
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Skips `n` batches (resuming inside an epoch), drawing the same randomness they would have.
    pub fn skip_batches(&mut self, n: i64) -> Result<()> {
        for _ in 0..n {
            if self.position >= self.order.size()[0] {
                break;
            }
            self.position += self.batch_size;
            self.rng.next_u64();
        }
        Ok(())
    }

    /// The next `(images [B, C, H, W] float normalised, labels [B])`, or `None` at the end.
    pub fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        let n = self.order.size()[0];
        if self.position >= n {
            return Ok(None);
        }
        let len = self.batch_size.min(n - self.position);
        let idx = self.order.narrow(0, self.position, len);
        self.position += len;
        let batch_seed = self.rng.next_u64();
        let mut images = self.data.images.index_select(0, &idx);
        let labels = self.data.labels.index_select(0, &idx);
        if let Some(aug) = self.augment {
            images = augment_batch(images, aug, batch_seed);
        }
        Ok(Some((self.normalizer.apply(&images), labels)))
    }
}

/// `n` pseudo-random integers in `0..modulo` on `device`, a pure function of `(seed, stream)`:
/// a few rounds of a 31-bit multiplicative hash over `0..n` (products stay below 2^62).
fn hashed(seed: u64, stream: u64, n: i64, modulo: i64, device: tch::Device) -> Tensor {
    const MASK: i64 = 0x7fff_ffff;
    let mut g = SplitMix::new(seed, stream);
    let mut x = Tensor::arange(n, (Kind::Int64, device));
    for _ in 0..3 {
        let (a, c) = ((g.next_u64() as i64 & MASK) | 1, g.next_u64() as i64 & MASK);
        x = (x * a + c).bitwise_and(MASK);
        x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(13));
    }
    x.remainder(modulo)
}

/// Pads, crops at random offsets and flips a `[B, C, H, W]` batch; the draws are hashed from
/// `seed` on the batch's device.
fn augment_batch(images: Tensor, aug: Augment, seed: u64) -> Tensor {
    let [b, c, h, w]: [i64; 4] = images.size().try_into().expect("images are 4-D");
    let device = images.device();
    let mut images = images;
    if aug.pad > 0 {
        let p = aug.pad;
        let offsets = |stream: u64, size: i64| {
            hashed(seed, stream, b, 2 * p + 1, device).view([b, 1])
                + Tensor::arange(size, (Kind::Int64, device)).view([1, size])
        };
        let rows = offsets(1, h)
            .view([b, 1, h, 1])
            .expand([b, c, h, w + 2 * p], false);
        let cols = offsets(2, w).view([b, 1, 1, w]).expand([b, c, h, w], false);
        images = images
            .constant_pad_nd([p, p, p, p])
            .gather(2, &rows, false)
            .gather(3, &cols, false);
    }
    if aug.flip {
        let mask = hashed(seed, 3, b, 2, device).view([b, 1, 1, 1]).eq(1);
        images = images.flip([3]).where_self(&mask, &images);
    }
    images
}
