//! `residual bench-infer`: it times any model from its config (ConvSDS and SiD included, on
//! random inputs of the shapes the config fixes) and reports what python_ref/bench_infer.py reads;
//! and no memory growth over repeated inference: the resident set size after a few thousand
//! eval-mode forwards (`residual::train::bench_inference`, the path `bench-infer` times; its
//! `--rss-at` reports the same figures at 100 and 10,000 calls for `make bench`) stays within a
//! bound of the size after the first hundred.

mod common;

use std::process::Command;

use residual::train::{bench_inference, resident_set_kb, BenchSettings};
use residual::ModelConfig;
use tch::{Device, Kind, Tensor};

/// Growth allowed between call 100 and the last call: room for the allocator's own bookkeeping,
/// far below what keeping anything per call would cost (one 1x1x28x28 input alone is 3 kB, so
/// 1,500 calls keeping one grow by 4.5 MB; a kept autograd graph by far more).
const BOUND_KB: u64 = 3 * 1024;
const CALLS: u64 = 1500;

fn growth_kb(fast: bool) -> Option<(u64, u64)> {
    let config =
        ModelConfig::from_json(r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1}"#)
            .unwrap();
    let settings = BenchSettings {
        batch_size: 1,
        image_size: 28,
        steps: CALLS,
        warmup: 0,
        device: Device::Cpu,
        amp: None,
        channels_last: false,
        rss_at: vec![100, CALLS],
    };
    let bench = bench_inference(&config, &settings, fast).unwrap();
    match bench.rss_kb[..] {
        [(100, first), (CALLS, last)] => Some((first, last)),
        [] => None,
        ref other => panic!("RSS read after calls {other:?}, asked for 100 and {CALLS}"),
    }
}

#[test]
fn inference_memory_stays_flat() {
    tch::set_num_threads(1);
    for fast in [true, false] {
        let Some((first, last)) = growth_kb(fast) else {
            eprintln!("skipped: no /proc/self/status to read the resident set size from");
            return;
        };
        let growth = last.saturating_sub(first);
        eprintln!("fast path {fast}: RSS {first} kB after 100 calls, {last} kB after {CALLS}");
        assert!(
            growth <= BOUND_KB,
            "fast path {fast}: RSS grew by {growth} kB from call 100 to call {CALLS} (bound {BOUND_KB} kB)"
        );
    }
    // The measure sees memory that is held: 16 MB written grows it by about that much.
    let before = resident_set_kb().unwrap();
    let held = Tensor::ones([4 << 20], (Kind::Float, Device::Cpu));
    let after = resident_set_kb().unwrap();
    assert!(
        after >= before + 12 * 1024,
        "RSS {before} kB -> {after} kB after writing a 16 MB tensor of {} elements",
        held.numel()
    );
}

/// `bench-infer --config` on small ConvSDS and SiD configs: one timed call per step, the RSS at
/// the calls asked for, and a loud warning from a debug build (none from a release build).
#[test]
fn bench_infer_times_models_from_their_config() {
    let dir = common::temp_dir("bench-infer");
    for (name, config, batch) in [
        (
            "conv_sds_head",
            r#"{"arch": "conv_sds_head", "n_layers": 2, "input_size": 16, "hidden_size": 24, "num_labels": 2}"#,
            2,
        ),
        (
            "sid_classifier",
            r#"{"arch": "sid_classifier", "num_categories_list": [3, 7, 5], "num_numerical_features": 4,
                "num_text_features": 2, "text_input_size": 24, "embedding_size": 16, "hidden_size": 48,
                "intermediate_size": 80, "num_hidden_layers": 3, "num_labels": 5}"#,
            3,
        ),
    ] {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, config).unwrap();
        let out = Command::new(common::residual_bin())
            .args(["bench-infer", "--config", path.to_str().unwrap(), "--json"])
            .args([
                "--batch-size",
                &batch.to_string(),
                "--steps",
                "3",
                "--warmup",
                "1",
            ])
            .args(["--rss-at", "2,4"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert_eq!(
            stderr.contains("WARNING: this is a debug build"),
            cfg!(debug_assertions),
            "{name}: {stderr}"
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let samples = report["ms_samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3, "{name}: {report}");
        assert!(
            samples.iter().all(|ms| ms.as_f64().unwrap() > 0.0),
            "{report}"
        );
        let mean = samples.iter().map(|ms| ms.as_f64().unwrap()).sum::<f64>() / 3.0;
        let reported = report["ms_per_batch"].as_f64().unwrap();
        // The mean also counts the loop and the final read-back, so it is a little above.
        assert!(
            reported >= mean * 0.99 && reported < mean * 1.5 + 1.0,
            "{name}: {report}"
        );
        let rss = report["rss_kb"].as_object().unwrap();
        let calls: Vec<&str> = rss.keys().map(String::as_str).collect();
        assert_eq!(calls, ["2", "4"], "{name}: {report}");
        assert!(
            rss.values().all(|kb| kb.as_u64().unwrap() > 1024),
            "{report}"
        );
    }
    // Training needs an image classifier's logits.
    let out = Command::new(common::residual_bin())
        .args([
            "bench-train",
            "--config",
            dir.join("sid_classifier.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bench-train times image classifiers, not a sid_classifier model"),
        "{stderr}"
    );
}
