//! The subcommands, one file each: an `Args` struct (clap) and its `run`. Shared here: where the
//! weights are inside a checkpoint, library enums parsed by their serde names, Ctrl-C.

pub mod bench;
pub mod convert;
pub mod doctor;
pub mod eval;
pub mod experiment;
mod folder;
pub mod infer;
pub mod inspect;
pub mod parity;
pub mod probe;
pub mod train;

mod serde_enum;

use residual::checkpoint::ReadOptions;
pub use serde_enum::serde_enum;

/// Where the weights are inside a checkpoint.
#[derive(clap::Args)]
pub struct WeightOptions {
    /// The entry holding the state_dict in a nested checkpoint (`a/b` for deeper ones); by default
    /// the file itself, then state_dict, model_state_dict, model, module, ema, ...
    #[arg(long)]
    key: Option<String>,
    /// The weights' moving average of a training checkpoint: `--key state_dict_ema`.
    #[arg(long, conflicts_with = "key")]
    ema: bool,
    /// A key prefix to strip, e.g. `net.` (`module.`, `_orig_mod.` and a Lightning checkpoint's
    /// `model.` are stripped without asking when every key has them). Repeatable.
    #[arg(long = "strip-prefix")]
    strip_prefix: Vec<String>,
    /// The most bytes deflated storages may inflate to (default: RESIDUAL_INFLATE_LIMIT, else
    /// the available memory); larger ones are refused before anything is allocated.
    #[arg(long = "inflate-limit", value_name = "BYTES")]
    inflate_limit: Option<u64>,
}

impl WeightOptions {
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            key: if self.ema {
                Some("state_dict_ema".to_string())
            } else {
                self.key.clone()
            },
            strip_prefixes: self.strip_prefix.clone(),
            inflate_limit: self.inflate_limit,
        }
    }
}

/// First Ctrl-C: checkpoint at the next batch and stop.
pub fn install_ctrl_c() {
    // The handler is a convenience: failing to install it cannot fail the run.
    let _ = ctrlc::set_handler(|| {
        residual::train::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst)
    });
}
