//! Any bytes as a `data.pkl`: the restricted unpickler (inert objects, memo, limits), then the
//! search for the weights (nested dicts, pickled nn.Modules, prefixes). It must return records or
//! an error, never panic, abort, or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use residual::checkpoint::{locate_records, ReadOptions};

fuzz_target!(|data: &[u8]| {
    let _ = locate_records(data, &ReadOptions::default());
});
