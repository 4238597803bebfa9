//! The splits a run trains and evaluates on, on its device.

use anyhow::Result;
use tch::Device;

use super::options::TrainOptions;
use crate::data::{Dataset, Normalizer};

/// The data of a run, on its device.
pub struct RunData {
    pub train: Dataset,
    pub validation: Option<Dataset>,
    pub test: Dataset,
    pub normalizer: Normalizer,
    /// The class names of an image-folder dataset, index order.
    pub classes: Option<Vec<String>>,
    /// Files that could not be read (image folders), skipped.
    pub skipped: Vec<std::path::PathBuf>,
    /// An image folder's training split, streamed through its training transform each epoch
    /// (`train` is then empty).
    pub stream: Option<crate::data::FolderStream>,
}

impl RunData {
    /// Splits and moves `train`/`test` as `options` ask; normalisation statistics come from the
    /// full training set, so evaluation can recompute them.
    pub fn prepare(
        train: Dataset,
        test: Dataset,
        options: &TrainOptions,
        device: Device,
    ) -> Result<Self> {
        options.validate()?;
        let normalizer = Normalizer::fit(&train, device);
        let (train, validation) = match options.validation {
            Some(n) => {
                let (t, v) = train.split_last(n)?;
                (t, Some(v))
            }
            None => (train, None),
        };
        let train = match options.subset {
            Some(n) => train.take(n),
            None => train,
        };
        let test = match options.test_subset {
            Some(n) => test.take(n),
            None => test,
        };
        Ok(Self {
            train: train.to_device(device),
            validation: validation.map(|v| v.to_device(device)),
            test: test.to_device(device),
            normalizer,
            classes: None,
            skipped: Vec::new(),
            stream: None,
        })
    }
}
