//! CUDA inference: float16/bfloat16 weights against the float32 model, CUDA graphs against the
//! eager forward, a multi-worker CUDA `Predictor` (one stream per worker) against one thread, and,
//! on any host, clear errors where CUDA is missing or not asked for. The CUDA tests print
//! `skipped: no CUDA device` without a GPU; the GPU bundle runs them (`make gpu-check`).

mod common;

use std::sync::Arc;

use residual::backend::{self, AutocastDtype};
use residual::cuda::{self, CudaGraph, StreamGuard};
use residual::models::{for_inference, InferenceOptions, Inputs};
use residual::{ModelConfig, Predictor, PredictorOptions};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const CIFAR8: &str = r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 10, "in_channels": 3}"#;

/// A cifar_resnet8 on `device` with seeded random weights and batch-norm statistics (fresh ones
/// fold to nothing).
fn weights(config: &ModelConfig, device: Device) -> VarStore {
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    config.build(vs.root()).unwrap();
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            let range = if !var.is_floating_point() {
                continue;
            } else if name.ends_with("running_var") {
                (0.5, 2.0)
            } else if name.ends_with("running_mean") || name.contains("bn") {
                (-0.5, 0.5)
            } else {
                continue;
            };
            let _ = var.shallow_clone().uniform_(range.0, range.1);
        }
    });
    vs
}

/// A `[batch, 3, 16, 16]` batch that differs by `seed`, without the global generator.
fn image(seed: i64, batch: i64) -> Tensor {
    let x = Tensor::arange(batch * 768, (Kind::Float, Device::Cpu)).view([batch, 3, 16, 16]);
    ((x + 37.0 * seed as f64) * 0.7).sin()
}

fn inputs(x: &Tensor, device: Device) -> Inputs {
    Inputs::from([("input".to_string(), x.to_device(device))])
}

/// The float32 reference setting: no TF32, no cuDNN benchmark (its choice may vary by run).
fn fp32_options() -> InferenceOptions {
    InferenceOptions {
        cudnn_benchmark: false,
        ..InferenceOptions::default()
    }
}

/// `(max |a - b|, that over max |b|)`.
fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let abs = (a - b).abs().max().double_value(&[]);
    (abs, abs / b.abs().max().double_value(&[]).max(1e-12))
}

fn no_cuda_here() -> bool {
    !tch::Cuda::is_available()
}

#[test]
fn cuda_calls_are_errors_without_a_cuda_device() {
    let err = format!("{:#}", StreamGuard::new(Device::Cpu).unwrap_err());
    assert!(err.contains("Cpu is not a CUDA device"), "{err}");
    let err = format!(
        "{:#}",
        CudaGraph::capture(Device::Cpu, || Ok(())).unwrap_err()
    );
    assert!(err.contains("Cpu is not a CUDA device"), "{err}");
    let (missing, expected) = if no_cuda_here() {
        (Device::Cuda(0), "no CUDA device is available")
    } else {
        (Device::Cuda(99), "CUDA device 99 does not exist")
    };
    if !cuda::shim_built() {
        // A build without the CUDA headers says so instead.
        let err = format!("{:#}", cuda::synchronize(missing).unwrap_err());
        assert!(err.contains("built without its CUDA shim"), "{err}");
        return;
    }
    for err in [
        StreamGuard::new(missing).map(|_| ()).unwrap_err(),
        cuda::synchronize(missing).unwrap_err(),
        cuda::current_stream_id(missing).map(|_| ()).unwrap_err(),
        CudaGraph::capture(missing, || Ok(()))
            .map(|_| ())
            .unwrap_err(),
    ] {
        let err = format!("{err:#}");
        println!("{err}");
        assert!(err.contains(expected), "{err}");
    }
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config, Device::Cpu);
    let options = PredictorOptions {
        device: missing,
        ..PredictorOptions::default()
    };
    let err = format!(
        "{:#}",
        Predictor::with_weights(&config, &vs, &options).unwrap_err()
    );
    println!("{err}");
    assert!(err.contains(expected), "{err}");
}

#[test]
fn cuda_options_are_refused_by_a_cpu_predictor_and_ignored_by_cpu_inputs() {
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config, Device::Cpu);
    for inference in [
        InferenceOptions {
            cuda_weights: Some(AutocastDtype::Fp16),
            ..InferenceOptions::default()
        },
        InferenceOptions {
            cuda_graph: true,
            ..InferenceOptions::default()
        },
    ] {
        let options = PredictorOptions {
            inference,
            ..PredictorOptions::default()
        };
        let err = format!(
            "{:#}",
            Predictor::with_weights(&config, &vs, &options).unwrap_err()
        );
        assert!(err.contains("need a CUDA device"), "{err}");
    }

    // The options parse from JSON, and the inference form on the CPU runs exactly as without them.
    let cuda_opts: InferenceOptions =
        serde_json::from_str(r#"{"cuda_weights": "bf16", "cuda_graph": true}"#).unwrap();
    assert_eq!(cuda_opts.cuda_weights, Some(AutocastDtype::Bf16));
    assert!(cuda_opts.cuda_graph);
    let build = |opts: &InferenceOptions| {
        let mut model_vs = VarStore::new(Device::Cpu);
        let model = config.build(model_vs.root()).unwrap();
        model_vs.copy(&vs).unwrap();
        for_inference(model, opts).unwrap()
    };
    let x = inputs(&image(1, 2), Device::Cpu);
    let replays = cuda::graph_replays();
    let want = build(&InferenceOptions::default())
        .forward_named(&x, false)
        .unwrap();
    let got = build(&cuda_opts).forward_named(&x, false).unwrap();
    assert_eq!(got.kind(), Kind::Float);
    assert_eq!(diff(&got, &want).0, 0.0);
    assert_eq!(
        cuda::graph_replays(),
        replays,
        "a CPU forward replayed a graph"
    );
}

#[test]
fn half_precision_weights_match_the_fp32_model_on_cuda() {
    let Some(device) = common::cuda_or_skip() else {
        return;
    };
    backend::strict_fp32().unwrap();
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config, device);
    let x = image(3, 4);
    let mut reference_vs = VarStore::new(device);
    let reference = config.build(reference_vs.root()).unwrap();
    reference_vs.copy(&vs).unwrap();
    let reference = for_inference(reference, &fp32_options()).unwrap();
    let want = reference
        .forward_named(&inputs(&x, device), false)
        .unwrap()
        .to_device(Device::Cpu);
    // float16: 11 significant bits; bfloat16: 8, through a few layers of rounding.
    for (dtype, kind, tolerance) in [
        (AutocastDtype::Fp16, Kind::Half, 1e-2),
        (AutocastDtype::Bf16, Kind::BFloat16, 6e-2),
    ] {
        let opts = InferenceOptions {
            cuda_weights: Some(dtype),
            ..fp32_options()
        };
        // The library path: the caller casts its weights, the inference form casts the input.
        let mut half_vs = VarStore::new(device);
        let model = config.build(half_vs.root()).unwrap();
        half_vs.copy(&vs).unwrap();
        half_vs.set_kind(kind);
        let model = for_inference(model, &opts).unwrap();
        let got = model.forward_named(&inputs(&x, device), false).unwrap();
        assert_eq!(got.kind(), Kind::Float, "{dtype:?}: output dtype");
        let got = got.to_device(Device::Cpu);
        let (abs, rel) = diff(&got, &want);
        println!("{dtype:?} weights vs fp32, for_inference: max abs {abs:.3e}, relative {rel:.3e}");
        assert!(
            rel <= tolerance,
            "{dtype:?}: relative {rel:.3e} > {tolerance}"
        );
        assert!(
            abs > 0.0,
            "{dtype:?}: bit-identical to fp32, so not run in {kind:?}"
        );

        // The Predictor casts the shared weights itself.
        let options = PredictorOptions {
            device,
            workers: 2,
            inference: opts,
            ..PredictorOptions::default()
        };
        let predictor = Predictor::with_weights(&config, &vs, &options).unwrap();
        assert_eq!(predictor.kind(), kind);
        let got = predictor.predict_input(x.shallow_clone()).unwrap();
        assert_eq!(got.kind(), Kind::Float);
        let (abs, rel) = diff(&got, &want);
        println!("{dtype:?} weights vs fp32, Predictor: max abs {abs:.3e}, relative {rel:.3e}");
        assert!(
            rel <= tolerance,
            "{dtype:?}: relative {rel:.3e} > {tolerance}"
        );
    }
}

#[test]
fn a_cuda_graph_replays_the_eager_forward() {
    let Some(device) = common::cuda_or_skip() else {
        return;
    };
    backend::strict_fp32().unwrap();
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config, device);
    let build = |opts: &InferenceOptions| {
        let mut model_vs = VarStore::new(device);
        let model = config.build(model_vs.root()).unwrap();
        model_vs.copy(&vs).unwrap();
        for_inference(model, opts).unwrap()
    };
    let eager = build(&fp32_options());
    let graphed = build(&InferenceOptions {
        cuda_graph: true,
        ..fp32_options()
    });
    let before = cuda::graph_replays();
    // Several inputs of the captured shape (each copied into the graph), then another shape,
    // which runs eagerly.
    let cases: Vec<(Tensor, bool)> = (0..4)
        .map(|seed| (image(seed, 2), true))
        .chain([(image(9, 3), false), (image(5, 2), true)])
        .collect();
    let mut outputs = Vec::new();
    for (x, replayed) in &cases {
        let replays = cuda::graph_replays();
        let want = eager.forward_named(&inputs(x, device), false).unwrap();
        let got = graphed.forward_named(&inputs(x, device), false).unwrap();
        assert_eq!(
            cuda::graph_replays() - replays,
            u64::from(*replayed),
            "shape {:?}: replayed",
            x.size()
        );
        let (abs, rel) = diff(&got.to_device(Device::Cpu), &want.to_device(Device::Cpu));
        println!(
            "shape {:?}, graph {replayed}: max abs {abs:.3e}, relative {rel:.3e}",
            x.size()
        );
        assert!(rel <= 1e-6, "graph vs eager: relative {rel:.3e}");
        outputs.push(got);
    }
    assert_eq!(cuda::graph_replays() - before, 5);
    // Each call got its own output tensor, not the graph's static one.
    let (first, second) = (&outputs[0], &outputs[1]);
    assert!(diff(first, second).0 > 0.0);
}

#[test]
fn threads_on_a_multi_worker_cuda_predictor_match_one_thread() {
    let Some(device) = common::cuda_or_skip() else {
        return;
    };
    backend::strict_fp32().unwrap();
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config, device);
    let mut single_vs = VarStore::new(device);
    let single = config.build(single_vs.root()).unwrap();
    single_vs.copy(&vs).unwrap();
    let single = for_inference(single, &fp32_options()).unwrap();
    let (threads, calls, workers) = (6, 4, 3);
    let want: Vec<Tensor> = (0..threads * calls)
        .map(|seed| {
            single
                .forward_named(&inputs(&image(seed, 2), device), false)
                .unwrap()
                .to_device(Device::Cpu)
        })
        .collect();
    assert!(diff(&want[0], &want[1]).0 > 0.0);

    for graph in [false, true] {
        let options = PredictorOptions {
            device,
            workers,
            inference: InferenceOptions {
                cuda_graph: graph,
                ..fp32_options()
            },
            ..PredictorOptions::default()
        };
        let predictor = Arc::new(Predictor::with_weights(&config, &vs, &options).unwrap());
        let mut streams = predictor.cuda_streams().to_vec();
        println!("graph {graph}: worker streams {streams:?}");
        streams.sort();
        streams.dedup();
        assert_eq!(streams.len(), workers, "one stream per worker");
        assert!(
            !streams.contains(&cuda::current_stream_id(device).unwrap()),
            "a worker runs on this thread's (default) stream"
        );
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let predictor = Arc::clone(&predictor);
                std::thread::spawn(move || {
                    (0..calls)
                        .map(|call| {
                            let seed = thread * calls + call;
                            (seed, predictor.predict_input(image(seed, 2)).unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut worst: f64 = 0.0;
        for handle in handles {
            for (seed, got) in handle.join().unwrap() {
                let (abs, _) = diff(&got, &want[seed as usize]);
                worst = worst.max(abs);
                assert_eq!(
                    abs, 0.0,
                    "graph {graph}, call {seed}: differs from one thread"
                );
            }
        }
        println!("graph {graph}: {threads} threads x {calls} calls, max abs diff {worst:.3e}");
    }
}

#[test]
fn bench_infer_cuda_graph_refuses_the_cpu_and_plain() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_residual"))
            .args([
                "bench-infer",
                "--arch",
                "cifar_resnet20",
                "--cuda-graph",
                "--steps",
                "1",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--device", "cpu"]);
    assert!(
        err.contains("timing CUDA graphs needs a CUDA device: Cpu is not a CUDA device"),
        "{err}"
    );
    let err = run(&["--plain"]);
    assert!(err.contains("cannot be used with"), "{err}");
}
