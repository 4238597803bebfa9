//! `residual::Predictor`: one model shared by many threads gives exactly the single-threaded
//! model's outputs, shares its weights, and answers bad input and shutdown with errors.

use std::sync::Arc;

use residual::models::{for_inference, InferenceOptions, Inputs};
use residual::{ModelConfig, Predictor, PredictorOptions};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Compile-time: a `Predictor` may be shared by threads (`Arc<Predictor>` across `spawn`).
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Predictor>();
};

const CIFAR8: &str = r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 10, "in_channels": 1}"#;

/// A cifar_resnet8 with seeded random weights and random batch-norm statistics (fresh ones are
/// the identity, which folds to nothing).
fn weights(config: &ModelConfig) -> VarStore {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
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

/// A `[2, 1, 12, 12]` batch that differs by `seed`, without the global generator (tests and
/// client threads run at once).
fn image(seed: i64) -> Tensor {
    let x = Tensor::arange(288, (Kind::Float, Device::Cpu)).view([2, 1, 12, 12]);
    ((x + 37.0 * seed as f64) * 0.7).sin()
}

fn options(workers: usize) -> PredictorOptions {
    PredictorOptions {
        workers,
        ..PredictorOptions::default()
    }
}

#[test]
fn eight_threads_sharing_one_predictor_get_the_single_threaded_outputs() {
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config);
    let predictor = Arc::new(Predictor::with_weights(&config, &vs, &options(3)).unwrap());
    assert_eq!(predictor.input_names(), ["input"]);

    // The same weights, one model, this thread.
    let mut single_vs = VarStore::new(Device::Cpu);
    let single = config.build(single_vs.root()).unwrap();
    single_vs.copy(&vs).unwrap();
    let single = for_inference(single, &InferenceOptions::default()).unwrap();
    let (threads, calls) = (8, 5);
    let want: Vec<Tensor> = (0..threads * calls)
        .map(|seed| {
            let inputs = Inputs::from([("input".to_string(), image(seed))]);
            tch::no_grad(|| single.forward_named(&inputs, false)).unwrap()
        })
        .collect();
    // Every input gives its own output, so a reply sent to the wrong caller would show.
    assert!((&want[0] - &want[1]).abs().max().double_value(&[]) > 0.0);

    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let predictor = Arc::clone(&predictor);
            std::thread::spawn(move || {
                (0..calls)
                    .map(|call| {
                        let seed = thread * calls + call;
                        (seed, predictor.predict_input(image(seed)).unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut checked = 0;
    for handle in handles {
        for (seed, got) in handle.join().unwrap() {
            let want = &want[seed as usize];
            assert_eq!(got.size(), [2, 10]);
            assert_eq!(got.device(), Device::Cpu);
            let diff = (&got - want).abs().max().double_value(&[]);
            assert_eq!(
                diff, 0.0,
                "call {seed}: differs from the single-threaded model"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, threads * calls);
}

#[test]
fn the_workers_share_the_callers_weights() {
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config);
    for plain in [false, true] {
        let options = PredictorOptions {
            workers: 2,
            plain,
            ..PredictorOptions::default()
        };
        let predictor = Predictor::with_weights(&config, &vs, &options).unwrap();
        let before = predictor.predict_input(image(0)).unwrap();
        assert!(before.abs().max().double_value(&[]) > 0.0);
        // An in-place change to the caller's classifier reaches both replicas: no copies.
        let variables = vs.variables();
        let saved: Vec<Tensor> = ["fc.weight", "fc.bias"]
            .iter()
            .map(|name| variables[*name].copy())
            .collect();
        tch::no_grad(|| {
            let _ = variables["fc.weight"].shallow_clone().zero_();
            let _ = variables["fc.bias"].shallow_clone().fill_(0.25);
        });
        for _ in 0..4 {
            let got = predictor.predict_input(image(0)).unwrap();
            let off = (got - 0.25).abs().max().double_value(&[]);
            assert_eq!(off, 0.0, "plain {plain}: a worker kept its own classifier");
        }
        tch::no_grad(|| {
            for (name, saved) in ["fc.weight", "fc.bias"].iter().zip(&saved) {
                variables[*name].shallow_clone().copy_(saved);
            }
        });
        let after = predictor.predict_input(image(0)).unwrap();
        assert_eq!((after - before).abs().max().double_value(&[]), 0.0);
    }
}

#[test]
fn bad_input_is_an_error_and_the_predictor_keeps_working() {
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config);
    let predictor = Predictor::with_weights(&config, &vs, &options(2)).unwrap();
    let good = predictor.predict_input(image(7)).unwrap();

    let bad: [(Inputs, &str); 4] = [
        (
            Inputs::from([(
                "input".into(),
                Tensor::zeros([2, 3, 12, 12], (Kind::Float, Device::Cpu)),
            )]),
            "expected shape",
        ),
        (
            Inputs::from([(
                "input".into(),
                Tensor::zeros([2, 1, 12, 12], (Kind::Int64, Device::Cpu)),
            )]),
            "expected Float",
        ),
        (
            Inputs::from([(
                "input".into(),
                Tensor::zeros([2, 1, 0, 0], (Kind::Float, Device::Cpu)),
            )]),
            "H, W >= 1",
        ),
        (
            Inputs::from([("image".into(), image(7))]),
            "missing input `input`",
        ),
    ];
    for (inputs, problem) in bad {
        let err = format!("{:#}", predictor.predict(inputs).unwrap_err());
        println!("{err}");
        assert!(
            err.contains(problem),
            "expected an error about {problem:?}, got {err}"
        );
    }
    let again = predictor.predict_input(image(7)).unwrap();
    assert_eq!((again - good).abs().max().double_value(&[]), 0.0);

    predictor.shutdown().unwrap();
    let err = format!("{:#}", predictor.predict_input(image(7)).unwrap_err());
    assert!(err.contains("shut down"), "{err}");
}

#[test]
fn weights_of_another_model_and_zero_workers_are_refused() {
    let config = ModelConfig::from_json(CIFAR8).unwrap();
    let vs = weights(&config);
    let deeper = ModelConfig::from_json(
        r#"{"arch": "cifar_resnet", "depth": 14, "num_classes": 10, "in_channels": 1}"#,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        Predictor::with_weights(&deeper, &vs, &options(2)).unwrap_err()
    );
    assert!(
        err.contains("the weights lack 36 variables that cifar_resnet has: layer1.1.bn1.bias,"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        Predictor::with_weights(&config, &vs, &options(0)).unwrap_err()
    );
    assert!(err.contains("at least 1 worker"), "{err}");
}
