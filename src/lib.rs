//! `residual`: residual networks from PyTorch, ported to tch (libtorch), with parity against the
//! PyTorch code they mirror.
//!
//! * [`models`]: the modules, one file per family, named like their PyTorch state_dict keys.
//! * [`config`]: typed model configs (`{"arch": ...}`) and the one builder from config to model.
//! * [`checkpoint`]: state_dicts by name, strict loading.
//! * [`parity`]: the parity cases against the `python_ref/` exports, shared by tests and the CLI.
//! * [`backend`]: libtorch switches tch lacks (TF32, determinism), through a small C++ shim.
//! * [`device`], [`doctor`]: device selection and the environment report.
//! * [`distributed`]: c10d process groups (Gloo, NCCL) and DDP's gradient averaging.
//! * [`memory`]: what the C allocator does with freed memory (kept for loops, trimmed after
//!   one-off work).
//! * [`fs`]: atomic file writes, shared by checkpoints, training runs and experiment reports.
//! * [`predictor`]: [`Predictor`], one model served to many threads (`Send + Sync`), with a
//!   pool of workers.
//! * [`preprocess`]: image preprocessing with the pixels of torchvision's, timm's and
//!   transformers' evaluation transforms.
//! * [`validate`]: config value checks whose errors name the field.

pub mod analysis;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod data;
pub mod device;
pub mod distributed;
pub mod doctor;
pub mod experiment;
pub mod fs;
pub mod infer;
pub mod inspect;
pub mod memory;
pub mod models;
pub mod parity;
pub mod predictor;
pub mod preprocess;
pub mod train;
pub mod validate;

pub use config::ModelConfig;
pub use models::{Inputs, Model};
pub use predictor::{Predictor, PredictorOptions};
