//! Inflation bombs: small checkpoints whose deflated storages inflate to GiBs are refused (or read
//! only as far as their tensors reach) before anything large is allocated. The peak resident size
//! is measured (VmHWM, reset through /proc/self/clear_refs), so this file holds a single test: no
//! other test of this process runs beside it.

mod bomb;
mod common;

use std::path::Path;
use std::time::Instant;

use residual::checkpoint::{
    self, load_state_dict, pickle::pickle_state_dict, Checkpoint, DType, ReadOptions, StateDict,
};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::Device;

/// The most the resident size may grow while a bomb is handled.
const PEAK_BOUND_MB: f64 = 50.0;

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// What `f` gives, and the MB its peak resident size added.
fn measured<T>(f: impl FnOnce() -> T) -> (T, f64) {
    std::fs::write("/proc/self/clear_refs", "5").expect("cannot reset the peak resident size");
    let base = status_kb("VmRSS:");
    let out = f();
    (
        out,
        status_kb("VmHWM:").saturating_sub(base) as f64 / 1024.0,
    )
}

/// What `f` gives, asserting that its peak resident size stays within [`PEAK_BOUND_MB`].
fn peak_of<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let (out, peak) = measured(f);
    println!(
        "{what}: peak RSS +{peak:.1} MB in {:.3} s",
        start.elapsed().as_secs_f64()
    );
    assert!(peak < PEAK_BOUND_MB, "{what}: peak RSS +{peak:.1} MB");
    out
}

fn error_of<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    format!("{:#}", result.unwrap_err())
}

#[test]
fn inflation_bombs_are_refused_before_allocating() {
    common::disable_transparent_huge_pages();
    // The measure itself: 80 MB written is seen.
    let ((), control) = measured(|| drop(std::hint::black_box(vec![1u8; 80 << 20])));
    assert!(control > 75.0, "the peak measure saw {control:.1} MB of 80");
    let dir = common::temp_dir("bombs");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    // 4 MB inflating to 4 GiB (2^30 - 1024 fp32 zeros).
    let numel = (1i64 << 30) - 1024;
    let big = write("bomb.pth", &bomb::torch_zip_bomb("conv1.weight", numel));
    assert!(std::fs::metadata(&big).unwrap().len() < 5 << 20);
    let plain = ReadOptions::default();

    // Into a model: the table's shape does not fit, nothing is inflated.
    let vs = VarStore::new(Device::Cpu);
    ModelConfig::from_json(r#"{"arch": "resnet18"}"#)
        .unwrap()
        .build(vs.root())
        .unwrap();
    let msg = peak_of("4 GiB bomb into resnet18", || {
        error_of(Checkpoint::open(&big, &plain).and_then(|c| load_state_dict(&vs, &c, true)))
    });
    assert!(
        msg.contains("conv1.weight: checkpoint [1073740800], model [64, 3, 7, 7]"),
        "{msg}"
    );
    let report = peak_of("4 GiB bomb into resnet18, not strict", || {
        let checkpoint = Checkpoint::open(&big, &plain).unwrap();
        load_state_dict(&vs, &checkpoint, false).unwrap()
    });
    assert_eq!(report.shape_mismatches.len(), 1);

    // As a state_dict, within a limit: refused naming the entry and the sizes.
    let limited = ReadOptions {
        inflate_limit: Some(64 << 20),
        ..ReadOptions::default()
    };
    let msg = peak_of("4 GiB bomb read under a 64 MiB limit", || {
        error_of(StateDict::read(&big, &limited))
    });
    assert!(
        msg.contains("storage record `archive/data/0` would inflate to 4294963200 bytes")
            && msg.contains("limit of 67108864 bytes"),
        "{msg}"
    );
    let msg = peak_of("4 GiB bomb parsed under a 64 MiB limit", || {
        error_of(checkpoint::parse_bytes(
            &std::fs::read(&big).unwrap(),
            &limited,
        ))
    });
    assert!(msg.contains("over the limit"), "{msg}");

    // inspect reads the table alone.
    let summary = peak_of("4 GiB bomb inspected", || {
        residual::inspect::inspect(&big, &plain, false).unwrap()
    });
    assert_eq!(summary.bytes, numel * 4);

    // A 4 GiB stream behind a tensor of 6 elements: 24 bytes are inflated, not 4 GiB.
    let small = pickle_state_dict(&[("w".to_string(), DType::F32, vec![2, 3])]);
    let mut zip = bomb::ZipWriter::default();
    zip.stored("a/data.pkl", &small);
    zip.deflated(
        "a/data/0",
        &bomb::deflated_zeros(numel as usize * 4),
        (numel * 4) as u32,
    );
    let padded = write("padded.pth", &zip.finish());
    let state = peak_of("6 floats over a 4 GiB stream", || {
        StateDict::read(&padded, &plain).unwrap()
    });
    assert_eq!(
        Vec::<f32>::try_from(state.get("w").unwrap().reshape([-1])).unwrap(),
        [0.0; 6]
    );

    // A header that under-states what the stream holds is refused by the tensor's extent.
    let mut zip = bomb::ZipWriter::default();
    zip.stored("a/data.pkl", &small);
    zip.deflated("a/data/0", &bomb::deflated_zeros(1 << 20), 8);
    let msg = error_of(StateDict::read(&write("short.pth", &zip.finish()), &plain));
    assert!(msg.contains("storage `0` holds 8 bytes"), "{msg}");

    // Several deflated storages within the limit each but not together.
    let two = pickle_state_dict(&[
        ("a".to_string(), DType::F32, vec![10 << 20]),
        ("b".to_string(), DType::F32, vec![10 << 20]),
    ]);
    let mut zip = bomb::ZipWriter::default();
    zip.stored("a/data.pkl", &two);
    for key in ["0", "1"] {
        zip.deflated(
            &format!("a/data/{key}"),
            &bomb::deflated_zeros(40 << 20),
            40 << 20,
        );
    }
    let msg = peak_of("two 40 MiB storages under a 64 MiB limit", || {
        error_of(StateDict::read(&write("two.pth", &zip.finish()), &limited))
    });
    assert!(msg.contains("inflate to 83886080 bytes together"), "{msg}");

    // Nested archives: a data.pkl that inflates past the pickle bound is refused on its header;
    // a torch.save file zipped again is not a torch.save file, and its inner zip is never opened.
    let mut zip = bomb::ZipWriter::default();
    zip.deflated("a/data.pkl", &bomb::deflated_zeros(1 << 30), 1 << 30);
    let msg = peak_of("1 GiB data.pkl", || {
        error_of(StateDict::read(
            &write("pickle_bomb.pth", &zip.finish()),
            &plain,
        ))
    });
    assert!(msg.contains("data.pkl holds more than"), "{msg}");
    let mut zip = bomb::ZipWriter::default();
    let inner = std::fs::read(&big).unwrap();
    zip.deflated("bomb.pth", &bomb::deflate(&inner, 6), inner.len() as u32);
    let msg = peak_of("a bomb zipped in a zip", || {
        error_of(StateDict::read(&write("nested.zip", &zip.finish()), &plain))
    });
    assert!(msg.contains("no data.pkl"), "{msg}");
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
