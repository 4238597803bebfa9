//! The training input pipeline of image folders: decoding and torchvision's training transforms
//! (`RandomResizedCrop`, `RandomHorizontalFlip`, `ColorJitter`) in worker threads, each worker
//! filling a bounded queue of whole batches, as `DataLoader(num_workers=W, prefetch_factor=P)`.
//!
//! Every random draw of an image comes from a generator seeded by `(seed, epoch, index)`, so an
//! epoch's batches do not depend on the number of workers, and a resumed run draws what the
//! uninterrupted one drew.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::augment::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, AutoAugment,
};
use super::batch::{distributed_shard, Batches, Normalizer, SplitMix};
use super::folder::{decode_rgb, to_chw_bytes, ImageFolder};
use super::mix::{mix_batch, Mix};
use crate::preprocess::pil::{self, Filter};
use crate::preprocess::RgbImage;

/// torchvision's training transforms on a PIL image, in this order: `RandomResizedCrop(size,
/// scale, ratio)` (bilinear), `RandomHorizontalFlip()` when `flip`, `TrivialAugmentWide()` or
/// `RandAugment()` when `auto_augment` is given, `ColorJitter(brightness, contrast, saturation,
/// hue)` when `color_jitter` is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTransform {
    /// The crop's share of the image area, drawn uniformly from this range.
    pub scale: [f64; 2],
    /// The crop's aspect ratio (width / height), drawn log-uniformly from this range.
    pub ratio: [f64; 2],
    pub flip: bool,
    /// Brightness, contrast and saturation strengths (factors drawn from `[max(0, 1 - s), 1 + s]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_jitter: Option<[f64; 3]>,
    /// ColorJitter's hue strength (the hue factor drawn from `[-hue, hue]`, `hue <= 0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hue: Option<f64>,
    /// TrivialAugmentWide or RandAugment, after the flip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_augment: Option<AutoAugment>,
    /// Batch-level mixup/cutmix (soft targets) on the normalised batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<Mix>,
}

impl Default for TrainTransform {
    /// torchvision's defaults: scale (0.08, 1), ratio (3/4, 4/3), flips, no colour jitter.
    fn default() -> Self {
        Self {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip: true,
            color_jitter: None,
            hue: None,
            auto_augment: None,
            mix: None,
        }
    }
}

impl TrainTransform {
    pub fn validate(&self) -> Result<()> {
        let [s0, s1] = self.scale;
        let [r0, r1] = self.ratio;
        ensure!(
            s0 > 0.0 && s0 <= s1 && s1.is_finite(),
            "scale must be a range 0 < min <= max, got {:?}",
            self.scale
        );
        ensure!(
            r0 > 0.0 && r0 <= r1 && r1.is_finite(),
            "ratio must be a range 0 < min <= max, got {:?}",
            self.ratio
        );
        if let Some(j) = self.color_jitter {
            ensure!(
                j.iter().all(|s| s.is_finite() && *s >= 0.0),
                "color jitter strengths must be >= 0, got {j:?}"
            );
        }
        if let Some(h) = self.hue {
            ensure!(
                (0.0..=0.5).contains(&h),
                "hue strength must be in [0, 0.5], got {h}"
            );
        }
        if let Some(a) = &self.auto_augment {
            a.validate()?;
        }
        if let Some(m) = &self.mix {
            m.validate()?;
        }
        Ok(())
    }

    /// The transformed `size x size` image, with the draws of `rng`.
    pub fn apply(&self, image: &RgbImage, size: usize, rng: &mut SplitMix) -> RgbImage {
        let (top, left, h, w) =
            random_resized_crop_params(image.height, image.width, self.scale, self.ratio, rng);
        let mut out = resized_crop(image, top, left, h, w, size, size);
        // RandomHorizontalFlip: `torch.rand(1) < p`.
        if self.flip && uniform_f32(rng) < 0.5 {
            out = hflip(&out);
        }
        if let Some(a) = &self.auto_augment {
            out = a.apply(out, rng);
        }
        if self.color_jitter.is_some() || self.hue.is_some() {
            out = color_jitter(&out, self.color_jitter.unwrap_or([0.0; 3]), self.hue, rng);
        }
        out
    }
}

/// `torch.rand(1)`: a float32 in [0, 1) with 24 random bits.
fn uniform_f32(rng: &mut SplitMix) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32
}

/// `torch.empty(1).uniform_(a, b)` in float32.
fn uniform_in(rng: &mut SplitMix, a: f32, b: f32) -> f32 {
    a + (b - a) * uniform_f32(rng)
}

/// `RandomResizedCrop.get_params`: `(top, left, height, width)` of a crop of an `height x width`
/// image covering a share of its area drawn from `scale`, with an aspect ratio drawn
/// log-uniformly from `ratio` (float32 draws, as torch's); 10 tries, then the central crop of
/// the image clamped to the ratio range.
pub fn random_resized_crop_params(
    height: usize,
    width: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut SplitMix,
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let log_ratio = [(ratio[0] as f32).ln(), (ratio[1] as f32).ln()];
    for _ in 0..10 {
        let target_area = area * uniform_in(rng, scale[0] as f32, scale[1] as f32) as f64;
        let aspect = uniform_in(rng, log_ratio[0], log_ratio[1]).exp() as f64;
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let (h, w) = (h as usize, w as usize);
            let top = rng.below((height - h + 1) as u64) as usize;
            let left = rng.below((width - w + 1) as u64) as usize;
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (min, max) = (ratio[0].min(ratio[1]), ratio[0].max(ratio[1]));
    let (h, w) = if in_ratio < min {
        (((width as f64) / min).round_ties_even() as usize, width)
    } else if in_ratio > max {
        (height, ((height as f64) * max).round_ties_even() as usize)
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// `F.resized_crop` on a PIL image: the crop at (`top`, `left`) of `h x w`, resized to
/// `out_h x out_w` by Pillow's bilinear filter.
pub fn resized_crop(
    image: &RgbImage,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> RgbImage {
    let mut data = Vec::with_capacity(h * w * 3);
    for y in top..top + h {
        let row = (y * image.width + left) * 3;
        data.extend_from_slice(&image.data[row..row + 3 * w]);
    }
    let crop = RgbImage {
        height: h,
        width: w,
        data,
    };
    pil::resize(&crop, out_h, out_w, Filter::Bilinear)
}

fn hflip(image: &RgbImage) -> RgbImage {
    let mut data = Vec::with_capacity(image.data.len());
    for row in image.data.chunks_exact(image.width * 3) {
        for px in row.chunks_exact(3).rev() {
            data.extend_from_slice(px);
        }
    }
    RgbImage {
        data,
        ..image.clone()
    }
}

/// torchvision's `ColorJitter` on a PIL image: the brightness, contrast, saturation factors
/// (`[max(0, 1 - s), 1 + s]`) and the hue factor (`[-hue, hue]`) drawn first, then the ops applied
/// in a random order (torchvision's `randperm`).
fn color_jitter(
    image: &RgbImage,
    strengths: [f64; 3],
    hue: Option<f64>,
    rng: &mut SplitMix,
) -> RgbImage {
    let factors = strengths
        .map(|s| (s > 0.0).then(|| uniform_in(rng, (1.0 - s).max(0.0) as f32, (1.0 + s) as f32)));
    let hue = hue
        .filter(|&h| h > 0.0)
        .map(|h| uniform_in(rng, -h as f32, h as f32));
    // Without hue the permutation is of three ops, as before hue existed (same draws).
    let mut order = [0usize, 1, 2, 3];
    let n = if hue.is_some() { 4 } else { 3 };
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut out = image.clone();
    for &op in &order[..n] {
        out = match op {
            0 => match factors[0] {
                Some(f) => adjust_brightness(&out, f),
                None => continue,
            },
            1 => match factors[1] {
                Some(f) => adjust_contrast(&out, f),
                None => continue,
            },
            2 => match factors[2] {
                Some(f) => adjust_saturation(&out, f),
                None => continue,
            },
            _ => match hue {
                Some(h) => adjust_hue(&out, h as f64),
                None => continue,
            },
        };
    }
    out
}

/// The generator of image `index` in `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> SplitMix {
    let mut g = SplitMix::new(seed, epoch.wrapping_add(0x1_0000));
    SplitMix::new(g.next_u64(), index as u64)
}

/// The generator of batch `batch` in `epoch` (mixup/cutmix draws).
pub fn batch_rng(seed: u64, epoch: u64, batch: usize) -> SplitMix {
    let mut g = SplitMix::new(seed, epoch.wrapping_add(0x2_0000));
    SplitMix::new(g.next_u64(), batch as u64)
}

/// An image folder's training split streamed through [`TrainTransform`] by worker threads.
#[derive(Debug, Clone)]
pub struct FolderStream {
    pub folder: Arc<ImageFolder>,
    pub transform: TrainTransform,
    /// Side of the square output.
    pub size: usize,
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub prefetch: usize,
}

/// One batch as a worker hands it over: `3 x size x size` normalised floats per image.
struct RawBatch {
    pixels: Vec<f32>,
    labels: Vec<i64>,
    /// Soft targets `[B, classes]` when mixed.
    targets: Option<Vec<f32>>,
    unreadable: Vec<PathBuf>,
}

impl FolderStream {
    /// The transformed image `index` of `epoch` as `3 x size x size` bytes.
    pub fn sample(&self, index: usize, seed: u64, epoch: u64) -> Result<Vec<u8>> {
        let image = decode_rgb(&self.folder.samples[index].0)?;
        let mut rng = sample_rng(seed, epoch, index);
        Ok(to_chw_bytes(
            &self.transform.apply(&image, self.size, &mut rng),
        ))
    }

    /// The batches of `epoch` in the seeded order of [`Batches`].
    pub fn epoch<'a>(
        &'a self,
        normalizer: &'a Normalizer,
        batch_size: i64,
        seed: u64,
        epoch: u64,
        device: Device,
    ) -> StreamBatches<'a> {
        self.epoch_sharded(normalizer, batch_size, seed, epoch, device, (0, 1))
    }

    /// As [`FolderStream::epoch`], for data-parallel rank `shard.0` of `shard.1`: the workers
    /// decode only the rank's [`distributed_shard`] of the epoch's order. Each image keeps its
    /// own `(seed, epoch, index)` draws, whichever rank reads it.
    pub fn epoch_sharded<'a>(
        &'a self,
        normalizer: &'a Normalizer,
        batch_size: i64,
        seed: u64,
        epoch: u64,
        device: Device,
        shard: (usize, usize),
    ) -> StreamBatches<'a> {
        let order = distributed_shard(
            Batches::shuffled_order(self.folder.len(), seed, epoch),
            shard,
        );
        StreamBatches {
            stream: self,
            normalizer,
            device,
            batch_size: batch_size.max(1) as usize,
            seed,
            epoch,
            order: Arc::new(order),
            next: 0,
            running: None,
            unreadable: Vec::new(),
        }
    }
}

/// An epoch of [`FolderStream`]: the workers start at the first [`next_batch`] call (after any
/// [`skip_batches`]) and stop when it is dropped.
///
/// [`next_batch`]: StreamBatches::next_batch
/// [`skip_batches`]: StreamBatches::skip_batches
pub struct StreamBatches<'a> {
    stream: &'a FolderStream,
    normalizer: &'a Normalizer,
    device: Device,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    order: Arc<Vec<usize>>,
    /// The next batch to hand out.
    next: usize,
    running: Option<Workers>,
    /// Files that could not be decoded this epoch (reported as they come, counted at the end).
    pub unreadable: Vec<PathBuf>,
}

struct Workers {
    /// Worker `w` makes batches `first + w`, `first + w + W`, ...
    first: usize,
    receivers: Vec<Receiver<RawBatch>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl StreamBatches<'_> {
    pub fn len(&self) -> i64 {
        self.order.len().div_ceil(self.batch_size) as i64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Skips `n` batches (resuming inside an epoch); the draws are per image, so nothing else
    /// needs replaying.
    pub fn skip_batches(&mut self, n: i64) {
        self.running = None;
        self.next = (self.next + n.max(0) as usize).min(self.len() as usize);
    }

    fn start(&self) -> Workers {
        let workers = self.stream.workers.max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let (mut receivers, mut handles) = (Vec::new(), Vec::new());
        let total = self.len() as usize;
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.stream.prefetch.max(1));
            let (stream, order, stop) = (self.stream.clone(), self.order.clone(), stop.clone());
            // `(x / 255 - mean) / std` in float32, as the normaliser, done here so that the
            // consumer only copies (libtorch's own kernels would add its thread pool).
            let stats: Vec<(f32, f32)> = (0..3)
                .map(|c| {
                    let m = self.normalizer.mean[c.min(self.normalizer.mean.len() - 1)];
                    let s = self.normalizer.std[c.min(self.normalizer.std.len() - 1)];
                    (m as f32, s as f32)
                })
                .collect();
            let (seed, epoch, bs, first) = (self.seed, self.epoch, self.batch_size, self.next);
            handles.push(std::thread::spawn(move || {
                let mut b = first + w;
                while b < total && !stop.load(Ordering::Relaxed) {
                    let indices = &order[b * bs..((b + 1) * bs).min(order.len())];
                    let mut batch = RawBatch {
                        pixels: Vec::with_capacity(indices.len() * 3 * stream.size * stream.size),
                        labels: Vec::with_capacity(indices.len()),
                        targets: None,
                        unreadable: Vec::new(),
                    };
                    for &i in indices {
                        match stream.sample(i, seed, epoch) {
                            Ok(p) => {
                                let plane = stream.size * stream.size;
                                for (c, chunk) in p.chunks_exact(plane).enumerate() {
                                    let (m, s) = stats[c];
                                    batch.pixels.extend(
                                        chunk.iter().map(|&v| (f32::from(v) / 255.0 - m) / s),
                                    );
                                }
                                batch.labels.push(stream.folder.samples[i].1);
                            }
                            Err(e) => {
                                eprintln!("skipping {e:#}");
                                batch.unreadable.push(stream.folder.samples[i].0.clone());
                            }
                        }
                    }
                    if let (Some(mix), false) = (stream.transform.mix, batch.labels.is_empty()) {
                        let s = stream.size;
                        let draw = mix.draw(s, s, &mut batch_rng(seed, epoch, b));
                        let classes = stream.folder.classes.len();
                        batch.targets = Some(mix_batch(
                            &mut batch.pixels,
                            &batch.labels,
                            classes,
                            s,
                            s,
                            draw,
                        ));
                    }
                    if tx.send(batch).is_err() {
                        return;
                    }
                    b += workers;
                }
            }));
            receivers.push(rx);
        }
        Workers {
            first: self.next,
            receivers,
            handles,
            stop,
        }
    }

    /// The next `(normalised images [B, 3, size, size], labels [B])` on the host, or soft targets
    /// `[B, classes]` (float) with mixup/cutmix; `None` at the end. A batch whose images were all
    /// unreadable is passed over.
    pub fn next_host(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        loop {
            if self.next >= self.len() as usize {
                return Ok(None);
            }
            if self.running.is_none() {
                self.running = Some(self.start());
            }
            let workers = self.running.as_ref().expect("started above");
            let slot = (self.next - workers.first) % workers.receivers.len();
            let batch = workers.receivers[slot]
                .recv()
                .map_err(|_| anyhow::anyhow!("an input worker thread stopped"))?;
            self.next += 1;
            self.unreadable.extend(batch.unreadable);
            if batch.labels.is_empty() {
                continue;
            }
            let s = self.stream.size as i64;
            let b = batch.labels.len() as i64;
            let images = Tensor::from_slice(&batch.pixels).view([b, 3, s, s]);
            let targets = match &batch.targets {
                Some(t) => Tensor::from_slice(t).view([b, -1]),
                None => Tensor::from_slice(&batch.labels),
            };
            return Ok(Some((images, targets)));
        }
    }

    /// The next normalised batch on the device, as [`Batches::next_batch`].
    pub fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(self
            .next_host()?
            .map(|(x, y)| (x.to_device(self.device), y.to_device(self.device))))
    }
}

/// The batches of one training epoch, whichever source they come from.
pub trait EpochBatches {
    /// Batches in the epoch.
    fn len(&self) -> i64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Skips `n` batches (resuming inside an epoch).
    fn skip_batches(&mut self, n: i64) -> Result<()>;
    /// The next `(images [B, C, H, W] float normalised, labels [B])` on the device; the labels
    /// are soft targets `[B, classes]` (float) when the batch was mixed.
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>>;
    /// Files that could not be read so far this epoch.
    fn unreadable(&self) -> &[PathBuf] {
        &[]
    }
}

impl EpochBatches for Batches<'_> {
    fn len(&self) -> i64 {
        Batches::len(self)
    }
    fn skip_batches(&mut self, n: i64) -> Result<()> {
        Batches::skip_batches(self, n)
    }
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        Batches::next_batch(self)
    }
}

impl EpochBatches for StreamBatches<'_> {
    fn len(&self) -> i64 {
        StreamBatches::len(self)
    }
    fn skip_batches(&mut self, n: i64) -> Result<()> {
        StreamBatches::skip_batches(self, n);
        Ok(())
    }
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        StreamBatches::next_batch(self)
    }
    fn unreadable(&self) -> &[PathBuf] {
        &self.unreadable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_is_the_central_crop_clamped_to_the_ratio() {
        let mut rng = SplitMix::new(1, 2);
        // A scale above 1 never fits: every try fails.
        let params = |h, w, rng: &mut SplitMix| {
            random_resized_crop_params(h, w, [2.0, 3.0], [0.75, 4.0 / 3.0], rng)
        };
        // 100 / 0.75 = 133.33 -> 133 rows of 200, centred.
        assert_eq!(params(200, 100, &mut rng), (33, 0, 133, 100));
        // 50 * 4/3 = 66.67 -> 67 columns of 300.
        assert_eq!(params(50, 300, &mut rng), (0, 116, 50, 67));
        assert_eq!(params(40, 45, &mut rng), (0, 0, 40, 45));
    }

    #[test]
    fn flips_and_jitter_keep_the_shape() {
        let image = RgbImage {
            height: 1,
            width: 2,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(hflip(&image).data, [4, 5, 6, 1, 2, 3]);
        let mut rng = SplitMix::new(3, 4);
        let out = color_jitter(&image, [0.4, 0.4, 0.4], Some(0.1), &mut rng);
        assert_eq!(out.data.len(), 6);
        assert_ne!(out.data, image.data);
    }
}
