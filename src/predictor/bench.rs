//! Throughput of a [`Predictor`] driven by several client threads (`residual bench-infer
//! --workers N`).

use std::sync::Barrier;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{Predictor, PredictorOptions};
use crate::config::ModelConfig;

/// How to load a [`Predictor`] for [`throughput`].
#[derive(Debug, Clone)]
pub struct LoadTest {
    /// The predictor's workers, threads, device, plain or inference form.
    pub options: PredictorOptions,
    /// Threads calling `predict` at once, each waiting for its answer before the next call.
    pub clients: usize,
    /// Input batch `[B, C, H, W]`, random.
    pub shape: [i64; 4],
    /// Timed requests, all clients together (rounded up to a multiple of `clients`).
    pub requests: usize,
    /// Untimed requests per client first.
    pub warmup: usize,
}

/// What [`throughput`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub workers: usize,
    pub intra_op_threads: usize,
    pub clients: usize,
    pub requests: usize,
    /// Images answered per second of wall time, all clients together.
    pub images_per_second: f64,
    /// Mean time from a `predict` call to its answer, as a client sees it.
    pub ms_per_batch: f64,
}

/// Times a predictor of `config` (seeded random weights) under `test.clients` concurrent
/// clients sending random batches of `test.shape`.
pub fn throughput(config: &ModelConfig, test: &LoadTest) -> Result<Throughput> {
    if test.clients == 0 {
        bail!("the load test needs at least 1 client");
    }
    tch::manual_seed(0);
    let vs = VarStore::new(test.options.device);
    config.build(vs.root())?;
    let predictor = Predictor::with_weights(config, &vs, &test.options)?;
    drop(vs);
    let per_client = test.requests.div_ceil(test.clients).max(1);
    let input = Tensor::randn(test.shape, (Kind::Float, tch::Device::Cpu));
    let inputs: Vec<Tensor> = (0..test.clients).map(|_| input.copy()).collect();
    let start_line = Barrier::new(test.clients + 1);
    let (latencies, seconds) = std::thread::scope(|scope| -> Result<(Vec<f64>, f64)> {
        let clients: Vec<_> = inputs
            .into_iter()
            .map(|x| {
                let (predictor, start_line) = (&predictor, &start_line);
                scope.spawn(move || -> Result<Vec<f64>> {
                    let call = || predictor.predict_input(x.shallow_clone());
                    let warm = (0..test.warmup).try_for_each(|_| call().map(drop));
                    start_line.wait();
                    warm?;
                    (0..per_client)
                        .map(|_| {
                            let t = Instant::now();
                            drop(call()?);
                            Ok(t.elapsed().as_secs_f64())
                        })
                        .collect()
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let mut latencies = Vec::new();
        for client in clients {
            match client.join() {
                Ok(times) => latencies.extend(times?),
                Err(_) => bail!("a benchmark client panicked"),
            }
        }
        Ok((latencies, start.elapsed().as_secs_f64()))
    })?;
    let requests = latencies.len();
    Ok(Throughput {
        workers: predictor.workers(),
        intra_op_threads: predictor.intra_op_threads(),
        clients: test.clients,
        requests,
        images_per_second: (requests as i64 * test.shape[0]) as f64 / seconds,
        ms_per_batch: latencies.iter().sum::<f64>() / requests as f64 * 1e3,
    })
}
