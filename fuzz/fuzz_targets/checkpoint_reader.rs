//! Any bytes through the checkpoint reader (torch.save zip and legacy, safetensors): it must return
//! tensors or an error, never panic, abort, or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use residual::checkpoint::{parse_bytes, ReadOptions};

fuzz_target!(|data: &[u8]| {
    let _ = parse_bytes(data, &ReadOptions::default());
});
