//! `residual bench-infer`: it times any model from its config (ConvSDS and SiD included, on
//! random inputs of the shapes the config fixes) and reports what python_ref/bench_infer.py reads;
//! and no memory retained per call over repeated inference: the anonymous resident memory (the
//! heap, where a kept tensor or autograd graph would live) stays flat over thousands of eval-mode
//! forwards of the plain model and of its inference form (`bench-infer --rss-at` reports the
//! process's whole resident set at 100 and 10,000 calls for `make bench`).

mod common;

use std::process::Command;
use std::time::Instant;

use residual::models::{for_inference, Model};
use residual::train::{bench_inputs, BenchSettings};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Growth allowed over the measured window: room for the allocator's own bookkeeping, far below
/// what keeping anything per call would cost (one 1x1x28x28 input alone is 3 kB, so 1,500 calls
/// keeping one grow by 4.5 MB; a kept activation or autograd graph by far more).
const BOUND_KB: u64 = 3 * 1024;
/// Calls before the window opens (caches that fill once, such as oneDNN's primitive cache, are
/// full by then) and the window's length.
const WARM_CALLS: u64 = 1500;
const WINDOW_CALLS: u64 = 1500;

/// `RssAnon` of /proc/self/status in kB: resident anonymous memory. Pages of the mapped libraries
/// (file-backed, faulted in as code first runs) are left out; they are not held memory.
fn anon_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Anonymous RSS after the warm-up calls and after the window, for the model as built (`fast`
/// false) or its inference form, at batch 1.
fn anon_before_after(fast: bool) -> Option<(u64, u64)> {
    let config =
        ModelConfig::from_json(r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1}"#)
            .unwrap();
    let settings = BenchSettings::one_call(1, 28);
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let model: Box<dyn Model> = config.build(vs.root()).unwrap();
    let model = if fast {
        for_inference(model, &Default::default()).unwrap()
    } else {
        model
    };
    let inputs = bench_inputs(&config, &settings).unwrap();
    let mut sum = 0.0;
    let mut forwards = |n: u64| {
        tch::no_grad(|| {
            for _ in 0..n {
                let out = model.forward_named(&inputs, false).unwrap();
                sum += out.double_value(&[0, 0]);
            }
        })
    };
    forwards(WARM_CALLS);
    let before = anon_kb()?;
    forwards(WINDOW_CALLS);
    let after = anon_kb()?;
    assert!(sum.is_finite());
    Some((before, after))
}

#[test]
fn inference_memory_stays_flat() {
    common::disable_transparent_huge_pages();
    tch::set_num_threads(1);
    for fast in [true, false] {
        let Some((before, after)) = anon_before_after(fast) else {
            eprintln!("skipped: no /proc/self/status to read the resident memory from");
            return;
        };
        let growth = after.saturating_sub(before);
        eprintln!(
            "fast path {fast}: anonymous RSS {before} kB after {WARM_CALLS} calls, \
             {after} kB after {WINDOW_CALLS} more"
        );
        assert!(
            growth <= BOUND_KB,
            "fast path {fast}: anonymous RSS grew by {growth} kB over {WINDOW_CALLS} calls \
             (bound {BOUND_KB} kB)"
        );
    }
    // The measure sees memory that is held: 16 MB written grows it by about that much.
    let before = anon_kb().unwrap();
    let held = Tensor::ones([4 << 20], (Kind::Float, Device::Cpu));
    let after = anon_kb().unwrap();
    assert!(
        after >= before + 12 * 1024,
        "anonymous RSS {before} kB -> {after} kB after writing a 16 MB tensor of {} elements",
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
        let started = Instant::now();
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
        let process_ms = started.elapsed().as_secs_f64() * 1e3;
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
        // The per-batch figure is the timed loop's wall time over the steps: it holds the timed
        // calls (and the final read-back), and it fits in the life of the process.
        assert!(
            reported >= mean * 0.99 && reported * 3.0 <= process_ms,
            "{name}: {report} from a process that ran {process_ms:.1} ms"
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
