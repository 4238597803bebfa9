//! Runs on image-folder datasets: the splits decoded with the run's transforms, and the files a
//! run folder keeps so that `residual infer` names the classes and preprocesses alike
//! (`classes.txt`, `preprocess.json`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::options::TrainOptions;
use super::run_data::RunData;
use crate::config::ModelConfig;
use crate::data::{
    decode_all, folder_splits, Augment, Batches, Dataset, EpochBatches, FolderOptions,
    FolderStream, ImageFolder, Normalizer,
};
use crate::fs::write_atomic;
use crate::preprocess::Preprocess;

/// The class names of a run, one per line, index order.
pub const CLASSES_FILE: &str = "classes.txt";
/// The evaluation transform of a run (`Preprocess` JSON).
pub const PREPROCESS_FILE: &str = "preprocess.json";

impl RunData {
    /// The splits of the image-folder dataset `dir` (see [`folder_splits`]), each image decoded
    /// and put through the evaluation transform of `options.image_folder`; `subset` and
    /// `test_subset` draw that many images at random (seeded). Unreadable files are reported by
    /// path, skipped and counted.
    pub fn from_image_folder(dir: &Path, options: &TrainOptions, device: Device) -> Result<Self> {
        options.validate()?;
        let folder = image_folder_options(options)?;
        folder.validate()?;
        if options.validation.is_some() {
            bail!(
                "--validation holds out the last N images, which in an image folder are one \
                 class: use --val-fraction, or a val/ folder"
            );
        }
        let (train, test) = folder_splits(dir, folder.val_fraction, options.seed)?;
        let pick = |f: ImageFolder, n: Option<i64>| match n {
            Some(n) => f.sample(n.max(0) as usize, options.seed),
            None => f,
        };
        let (train, test) = (pick(train, options.subset), pick(test, options.test_subset));
        let preprocess = folder.eval_preprocess();
        let threads = folder.threads();
        let size = preprocess.input_size[1];
        let (train_data, skipped_train, stream) = match &folder.train_transform {
            // Streamed each epoch: only the shape is kept in memory.
            Some(transform) => {
                let empty = Dataset::new(
                    Tensor::zeros([0, 3, size, size], (Kind::Uint8, Device::Cpu)),
                    Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
                    train.classes.len() as i64,
                )?;
                let stream = FolderStream {
                    folder: Arc::new(train.clone()),
                    transform: transform.clone(),
                    size: size as usize,
                    workers: threads,
                    prefetch: folder.prefetch,
                };
                (empty, Vec::new(), Some(stream))
            }
            None => {
                let (data, skipped) = decode_all(&train, &preprocess, threads)?;
                (data, skipped, None)
            }
        };
        let (test_data, skipped_test) = decode_all(&test, &preprocess, threads)?;
        let skipped = skipped_train.len() + skipped_test.len();
        if skipped > 0 {
            eprintln!(
                "{}: skipped {skipped} unreadable file(s) of {}",
                dir.display(),
                train.len() + test.len()
            );
        }
        if (train_data.is_empty() && stream.is_none()) || test_data.is_empty() {
            bail!(
                "{}: no readable images in the training or the held-out split",
                dir.display()
            );
        }
        Ok(Self {
            train: train_data.to_device(device),
            validation: None,
            test: test_data.to_device(device),
            normalizer: Normalizer::new(folder.mean.clone(), folder.std.clone(), device),
            classes: Some(train.classes.clone()),
            skipped: skipped_train.into_iter().chain(skipped_test).collect(),
            stream,
        })
    }

    /// The batches of training epoch `epoch` for data-parallel rank `shard.0` of `shard.1`
    /// (`(0, 1)` alone; `epoch` `None` only counts them), the rank's `DistributedSampler` shard
    /// of the epoch's order: streamed through the workers for an image folder with a training
    /// transform, else cut from the training set in memory with `augment`.
    pub fn train_batches(
        &self,
        batch_size: i64,
        seed: u64,
        epoch: Option<u64>,
        augment: Option<Augment>,
        shard: (usize, usize),
    ) -> Result<Box<dyn EpochBatches + '_>> {
        Ok(match &self.stream {
            Some(s) => Box::new(s.epoch_sharded(
                &self.normalizer,
                batch_size,
                seed,
                epoch.unwrap_or(0),
                self.test.images.device(),
                shard,
            )),
            None => Box::new(Batches::sharded(
                &self.train,
                &self.normalizer,
                batch_size,
                epoch.map(|e| (seed, e)),
                augment,
                shard,
            )),
        })
    }

    /// Writes `classes.txt` and `preprocess.json` into the run folder `run` (image-folder runs
    /// only), after checking that the model has one output per class.
    pub fn write_run_files(
        &self,
        run: &Path,
        config: &ModelConfig,
        options: &TrainOptions,
    ) -> Result<()> {
        let Some(classes) = &self.classes else {
            return Ok(());
        };
        let outputs = serde_json::to_value(config)?
            .get("num_classes")
            .and_then(serde_json::Value::as_i64);
        if let Some(k) = outputs {
            if k != classes.len() as i64 {
                bail!(
                    "the data has {} classes ({}) but the model config has num_classes {k}",
                    classes.len(),
                    classes.join(", ")
                );
            }
        }
        let mut text = classes.join("\n");
        text.push('\n');
        write_atomic(&run.join(CLASSES_FILE), text.as_bytes())?;
        let preprocess = image_folder_options(options)?.eval_preprocess();
        write_atomic(
            &run.join(PREPROCESS_FILE),
            serde_json::to_string_pretty(&preprocess)?.as_bytes(),
        )
    }
}

fn image_folder_options(options: &TrainOptions) -> Result<&FolderOptions> {
    options
        .image_folder
        .as_ref()
        .context("the run's options have no image_folder settings")
}

/// The run folder that trained the weights file `weights` (`RUN/checkpoints/step-N/model.pth`),
/// or the folder holding `weights` when it has a `classes.txt` of its own.
pub fn run_folder_of(weights: &Path) -> Option<PathBuf> {
    let parent = weights.parent()?;
    if parent.join(CLASSES_FILE).is_file() {
        return Some(parent.to_path_buf());
    }
    let run = parent.parent()?.parent()?;
    run.join("run.json").is_file().then(|| run.to_path_buf())
}

/// The class names and evaluation transform a run folder saved, when it has them.
pub fn run_files(run: &Path) -> Result<(Option<Vec<String>>, Option<Preprocess>)> {
    let classes = run.join(CLASSES_FILE);
    let classes = if classes.is_file() {
        Some(crate::infer::read_labels(&classes)?)
    } else {
        None
    };
    let preprocess = run.join(PREPROCESS_FILE);
    let preprocess = if preprocess.is_file() {
        Some(Preprocess::from_file(&preprocess)?)
    } else {
        None
    };
    Ok((classes, preprocess))
}
