//! Training through libtorch on CPU or CUDA: SGD with momentum and weight decay, step or cosine
//! schedules with warmup, label smoothing, mixed precision on CUDA, per-epoch evaluation, a run
//! folder with metrics and atomic checkpoints, bit-exact resume, Ctrl-C and NaN handling.
//!
//! A run folder holds `model.json` (the model config), `run.json` (these options),
//! `metrics.jsonl` (one line per epoch) and `checkpoints/step-N/` (`model.pth`, a state_dict
//! PyTorch loads; `optimizer.safetensors`, the momentum buffers; `state.json`, where the run is),
//! with `checkpoints/LATEST` naming the newest complete one.
//!
//! Files: `options` (what shapes a run), `schedule` (the learning rate over time), `loss`
//! (cross-entropy and fp16 loss scaling), `sgd` (the optimiser), `adamw` (AdamW), `optimizer` (the
//! choice between them), `clip` (gradient clipping), `ema` (the weights' moving average), `run_data` (the splits on
//! their device), `folder_data` (image-folder datasets and the files their runs keep), `run_dir` (the folder layout and checkpoints), `metrics` (what an epoch
//! measured), `finetune` (starting from a checkpoint, frozen parts, the backbone's rate), `trainer` (the loop), `eval` (evaluation of a trained model), `bench` (speed
//! of the training step and of inference), `memory_format` (channels-last tensors).

mod adamw;
mod bench;
mod clip;
mod ema;
mod eval;
mod finetune;
mod folder_data;
mod loss;
mod memory_format;
mod metrics;
mod optimizer;
mod options;
mod run_data;
mod run_dir;
mod schedule;
mod sgd;
mod trainer;

pub use adamw::AdamW;
pub use bench::{
    bench_config, bench_inference, bench_inputs, benchmark, resident_set_kb, BenchSettings,
    InferenceBench,
};
pub use clip::{clip_grad_norm, clip_grad_value, Clip};
pub use ema::{Ema, EmaOptions};
pub use eval::{confusion, load_model};
pub use finetune::{
    finetune_config, init_from, init_run, is_head, read_init_weights, FineTune, InitReport,
    HEAD_PREFIX, INIT_REPORT_FILE,
};
pub use folder_data::{run_files, run_folder_of, CLASSES_FILE, PREPROCESS_FILE};
pub use loss::{logits_loss, LossScaler};
pub use memory_format::channels_last;
pub use metrics::EpochMetrics;
pub use optimizer::{Optimizer, OptimizerKind};
pub use options::TrainOptions;
pub use run_data::RunData;
pub use run_dir::{latest_weights, RunDir, RunState};
pub use schedule::Schedule;
pub use sgd::{is_norm_or_bias, Sgd};
pub use trainer::{Outcome, Trainer, INTERRUPTED, READ_EVERY};
