//! Any bytes through the checkpoint reader (torch.save zip and legacy, TorchScript archives,
//! safetensors): it must return tensors or an error, never panic, abort, or allocate without
//! bound. The input's length picks where the reader looks for the weights (without consuming any
//! byte, so that real checkpoints seed the corpus), so that `--key` descents into dicts, objects
//! and modules are fuzzed too. The reader is the lazy one: the table (names, shapes, storage
//! places) first, then each storage read from the input or inflated by streaming, within a 64 MiB
//! limit on inflated bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use residual::checkpoint::{parse_bytes, ReadOptions};

const KEYS: [Option<&str>; 4] = [None, Some("model"), Some("state_dict"), Some("model/module")];

fuzz_target!(|data: &[u8]| {
    let options = ReadOptions {
        key: KEYS[data.len() % KEYS.len()].map(str::to_string),
        inflate_limit: Some(64 << 20),
        ..ReadOptions::default()
    };
    let _ = parse_bytes(data, &options);
});
