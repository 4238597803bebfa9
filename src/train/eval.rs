//! Evaluation in eval mode: a run's loss and error per epoch, and the confusion matrix of a
//! trained model (`residual eval`).

use std::path::Path;

use anyhow::Result;
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use super::metrics::Tally;
use super::trainer::Trainer;
use crate::checkpoint::{load_state_dict, Checkpoint, ReadOptions};
use crate::config::ModelConfig;
use crate::data::{Batches, Dataset, Normalizer};
use crate::models::{Inputs, Model};

impl Trainer {
    /// Mean loss and error of `data` in eval mode.
    pub fn evaluate(&self, data: &Dataset, normalizer: &Normalizer) -> Result<(f64, f64)> {
        let mut tally = Tally::default();
        let mut batches = Batches::new(
            data,
            normalizer,
            self.options.batch_size.max(256),
            None,
            None,
        );
        tch::no_grad(|| -> Result<()> {
            while let Some((x, y)) = batches.next_batch()? {
                let logits = self.forward(&x, false)?;
                let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                    &y,
                    None,
                    Reduction::Sum,
                    -100,
                    0.0,
                );
                let wrong = logits
                    .argmax(1, false)
                    .ne_tensor(&y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                tally.add(loss.double_value(&[]), wrong, y.size()[0]);
            }
            Ok(())
        })?;
        Ok((tally.mean_loss(), tally.error()))
    }
}

/// Test error and the confusion matrix (`[true class][predicted class]` counts) of a model.
pub fn confusion(
    model: &dyn Model,
    data: &Dataset,
    normalizer: &Normalizer,
    batch_size: i64,
) -> Result<(f64, Vec<Vec<i64>>)> {
    let k = data.num_classes;
    let counts = Tensor::zeros([k * k], (Kind::Int64, Device::Cpu));
    let mut batches = Batches::new(data, normalizer, batch_size, None, None);
    tch::no_grad(|| -> Result<()> {
        while let Some((x, y)) = batches.next_batch()? {
            let mut inputs = Inputs::new();
            inputs.insert("input".into(), x);
            let pred = model.forward_named(&inputs, false)?.argmax(1, false);
            let cells = (y * k + pred).to_device(Device::Cpu);
            let _ = counts
                .shallow_clone()
                .index_add_(0, &cells, &cells.ones_like());
        }
        Ok(())
    })?;
    let flat: Vec<i64> = Vec::try_from(&counts)?;
    let matrix: Vec<Vec<i64>> = flat.chunks(k as usize).map(|r| r.to_vec()).collect();
    let total: i64 = flat.iter().sum();
    let correct: i64 = (0..k as usize).map(|i| matrix[i][i]).sum();
    Ok((1.0 - correct as f64 / total.max(1) as f64, matrix))
}

/// Loads weights into a fresh model on `device` (strict): the file's state_dict, or with `ema`
/// its `state_dict_ema` (a run trained with `--ema-decay`).
pub fn load_model(
    config: &ModelConfig,
    weights: &Path,
    device: Device,
    ema: bool,
) -> Result<(VarStore, Box<dyn Model>)> {
    let vs = VarStore::new(device);
    let model = config.build(vs.root())?;
    let options = ReadOptions {
        key: ema.then(|| super::run_dir::STATE_DICT_EMA.to_string()),
        ..Default::default()
    };
    let state = Checkpoint::open(weights, &options)?;
    load_state_dict(&vs, &state, true)?;
    Ok((vs, model))
}
