//! `residual-inspect`: `residual inspect` without `--check`, in a binary that does not load
//! libtorch. Loading libtorch (its static initialisers and the CUDA libraries it maps) costs
//! ~0.4 s before `main`, twenty times what reading a checkpoint's table takes; this binary
//! links none of it, so it needs no `LD_LIBRARY_PATH` either.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use residual::checkpoint::ReadOptions;
use residual::inspect;

/// List a checkpoint's tensors and name the architecture its keys fit (the output of
/// `residual inspect` without --check; model folders need `residual inspect`).
#[derive(Parser)]
#[command(name = "residual-inspect", version)]
struct Args {
    weights: PathBuf,
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
    /// the available memory); only SiD's offsets tensor is ever read.
    #[arg(long = "inflate-limit", value_name = "BYTES")]
    inflate_limit: Option<u64>,
    /// List every key (default: the first 20).
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = ReadOptions {
        key: if args.ema {
            Some("state_dict_ema".to_string())
        } else {
            args.key
        },
        strip_prefixes: args.strip_prefix,
        inflate_limit: args.inflate_limit,
    };
    let printed = inspect::inspect_table(&args.weights, &options).and_then(|summary| {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            print!("{}", inspect::format_summary(&summary, args.all));
        }
        Ok(())
    });
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
