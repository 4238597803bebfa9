//! Images per second of the image-folder training pipeline alone (decoding, RandomResizedCrop,
//! horizontal flip, optionally TrivialAugmentWide, normalisation to float batches; no model), for
//! python_ref/bench_pipeline.py.
//!
//! `bench_pipeline DIR SIZE BATCH WORKERS [EPOCHS] [trivial]`: DIR holds one folder per class;
//! prints one JSON line per epoch after the first batch (workers started, queues filling).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use residual::data::{AutoAugment, FolderStream, ImageFolder, Normalizer, TrainTransform};
use residual::preprocess::{IMAGENET_MEAN, IMAGENET_STD};
use tch::Device;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_pipeline DIR SIZE BATCH WORKERS [EPOCHS] [trivial]";
    let arg = |i: usize| args.get(i).context(usage);
    let folder = ImageFolder::scan(arg(0)?.as_ref())?;
    let size: usize = arg(1)?.parse()?;
    let batch: i64 = arg(2)?.parse()?;
    let workers: usize = arg(3)?.parse()?;
    let epochs: u64 = args.get(4).map_or(Ok(1), |e| e.parse())?;
    let trivial = args.get(5).is_some_and(|a| a == "trivial");
    let stream = FolderStream {
        folder: Arc::new(folder),
        transform: TrainTransform {
            auto_augment: trivial.then(AutoAugment::trivial_augment_wide),
            ..TrainTransform::default()
        },
        size,
        workers,
        prefetch: 2,
    };
    let norm = Normalizer::new(IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec(), Device::Cpu);
    for epoch in 0..epochs {
        let mut batches = stream.epoch(&norm, batch, 0, epoch, Device::Cpu);
        let (first, _) = batches.next_batch()?.context("no images")?;
        let start = Instant::now();
        let mut images = 0i64;
        while let Some((x, _)) = batches.next_batch()? {
            images += x.size()[0];
        }
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "epoch": epoch,
                "images": images,
                "seconds": seconds,
                "images_per_second": images as f64 / seconds,
                "batch_shape": first.size(),
                "unreadable": batches.unreadable.len(),
            })
        );
    }
    Ok(())
}
