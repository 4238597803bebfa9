//! The Veit et al. probes: deleting and reordering blocks (`residual::analysis`), the gradient
//! norms against PyTorch's, the lesion study and the path analysis on tiny nets.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

mod common;

use residual::analysis::{self, forward, image, Edit, Probed};
use residual::models::cifar::{CifarResNet, CifarResNetConfig};
use residual::models::conv_sds::{ConvSdsHead, ConvSdsHeadConfig};
use residual::models::layers::{self, conv3x3, BiasInit, Norm2d, NormKind};
use residual::models::resnet::{BlockKind, BlockSettings, ShortcutKind, StageBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn config(plain: bool) -> CifarResNetConfig {
    CifarResNetConfig {
        depth: 14,
        num_classes: 3,
        shortcut: ShortcutKind::A,
        plain,
        in_channels: 1,
    }
}

/// A CIFAR net with `blocks[s]` blocks in stage `s`, built as [`CifarResNet::new`] builds them.
fn cifar_with(vs: &VarStore, plain: bool, blocks: [i64; 3]) -> CifarResNet {
    let path = vs.root();
    let s = BlockSettings {
        kind: BlockKind::Basic,
        groups: 1,
        width_per_group: 64,
        norm: NormKind::BatchNorm,
        shortcut: ShortcutKind::A,
        plain,
    };
    let mut builder = StageBuilder::new(s, 16);
    let layer1 = builder.stage(&(&path / "layer1"), 16, blocks[0], 1, false);
    let layer2 = builder.stage(&(&path / "layer2"), 32, blocks[1], 2, false);
    let layer3 = builder.stage(&(&path / "layer3"), 64, blocks[2], 2, false);
    CifarResNet {
        conv1: conv3x3(&path / "conv1", 1, 16, 1, 1, 1),
        bn1: Norm2d::new(&path / "bn1", NormKind::BatchNorm, 16),
        layer1,
        layer2,
        layer3,
        fc: layers::linear(&path / "fc", 64, 3, Some(BiasInit::Uniform)),
    }
}

/// Copies `from`'s variables into `to`, renaming the prefixes in `renames` (`layer1.1.` ->
/// `layer1.0.`, or to `None`: not copied); variables `to` lacks are skipped (a deleted block's).
fn copy_renamed(from: &VarStore, to: &VarStore, renames: &[(&str, Option<&str>)]) {
    let target = to.variables();
    let mut copied = BTreeSet::new();
    tch::no_grad(|| {
        for (name, t) in from.variables() {
            let renamed = match renames.iter().find(|(a, _)| name.starts_with(a)) {
                Some((_, None)) => continue,
                Some((a, Some(b))) => format!("{b}{}", &name[a.len()..]),
                None => name.clone(),
            };
            if let Some(dst) = target.get(&renamed) {
                dst.shallow_clone().copy_(&t);
                assert!(copied.insert(renamed), "{name} copied twice");
            }
        }
    });
    assert_eq!(
        copied.len(),
        target.len(),
        "every variable of the smaller net is set"
    );
}

/// Running statistics away from 0 / 1, so that eval mode is not the identity.
fn randomize_stats(vs: &VarStore) {
    tch::no_grad(|| {
        for (name, t) in vs.variables() {
            if name.ends_with("running_var") || name.ends_with("bn2.weight") {
                t.shallow_clone().copy_(&(t.rand_like() + 0.5));
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                t.shallow_clone().copy_(&(t.rand_like() - 0.5));
            }
        }
    });
}

fn images() -> Tensor {
    Tensor::randn([3, 1, 8, 8], (Kind::Float, Device::Cpu))
}

#[test]
fn a_deleted_block_is_the_network_built_without_it() {
    tch::manual_seed(7);
    let x = images();
    for plain in [false, true] {
        let vs = VarStore::new(Device::Cpu);
        let net = CifarResNet::new(vs.root(), &config(plain)).unwrap();
        randomize_stats(&vs);
        // Units: layer1.0 layer1.1 layer2.0 layer2.1 layer3.0 layer3.1; delete layer1.0 and
        // layer3.1 (neither changes the shape).
        let small_vs = VarStore::new(Device::Cpu);
        let small = cifar_with(&small_vs, plain, [1, 2, 1]);
        copy_renamed(
            &vs,
            &small_vs,
            &[("layer1.0.", None), ("layer1.1.", Some("layer1.0."))],
        );
        let edit = Edit {
            deleted: BTreeSet::from([0, 5]),
            ..Edit::default()
        };
        for train in [false, true] {
            let edited = forward(&net, &image(&x), train, &edit).unwrap().logits;
            let built = small.forward_t(&x, train).unwrap();
            assert_eq!(edited.size(), [3, 3]);
            assert!(
                edited.equal(&built),
                "plain {plain}, train {train}: {edited} vs {built}"
            );
            let whole = net.forward_t(&x, train).unwrap();
            assert!(
                !edited.allclose(&whole, 1e-3, 1e-3, false),
                "the edit changed nothing"
            );
            let unedited = forward(&net, &image(&x), train, &Edit::default())
                .unwrap()
                .logits;
            assert!(unedited.equal(&whole));
        }
    }
}

#[test]
fn a_deleted_downsampling_block_keeps_its_shortcut() {
    tch::manual_seed(8);
    let vs = VarStore::new(Device::Cpu);
    let net = CifarResNet::new(vs.root(), &config(false)).unwrap();
    let h = net.forward_stages(&images(), false).unwrap().remove(0);
    // Option A: every other pixel, 8 zero channels on each side.
    let skipped = net.layer2[0].skip_t(&h, false).unwrap();
    let expected = h
        .slice(2, 0, None, 2)
        .slice(3, 0, None, 2)
        .constant_pad_nd([0, 0, 0, 0, 8, 8]);
    assert!(skipped.equal(&expected));
    // A plain block has no shortcut: deleted, it becomes the same parameter-free one.
    let plain = CifarResNet::new(vs.root() / "plain", &config(true)).unwrap();
    assert!(plain.layer2[0].skip_t(&h, false).unwrap().equal(&expected));
}

#[test]
fn swapped_blocks_are_the_network_built_with_their_weights_swapped() {
    tch::manual_seed(9);
    let x = images();
    let vs = VarStore::new(Device::Cpu);
    let net = CifarResNet::new(vs.root(), &config(false)).unwrap();
    randomize_stats(&vs);
    let swapped_vs = VarStore::new(Device::Cpu);
    let swapped = CifarResNet::new(swapped_vs.root(), &config(false)).unwrap();
    copy_renamed(
        &vs,
        &swapped_vs,
        &[
            ("layer1.0.", Some("layer1.1.")),
            ("layer1.1.", Some("layer1.0.")),
        ],
    );
    assert_eq!(analysis::swappable_pairs(&net), vec![0]);
    let edit = Edit {
        order: vec![1, 0, 2, 3, 4, 5],
        ..Edit::default()
    };
    let edited = forward(&net, &image(&x), false, &edit).unwrap().logits;
    assert!(edited.equal(&swapped.forward_t(&x, false).unwrap()));
    // layer2.0 changes the shape: it cannot move.
    let bad = Edit {
        order: vec![0, 1, 3, 2, 4, 5],
        ..Edit::default()
    };
    let err = forward(&net, &image(&x), false, &bad).unwrap_err();
    assert!(format!("{err:#}").contains("must stay in place"), "{err:#}");
    let err = forward(
        &net,
        &image(&x),
        false,
        &Edit {
            order: vec![0, 1, 2, 3, 5, 5],
            ..Edit::default()
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("not a permutation"), "{err:#}");
}

#[test]
fn a_deleted_conv_sds_layer_leaves_its_layer_norm() {
    tch::manual_seed(10);
    let c = ConvSdsHeadConfig {
        n_layers: 3,
        input_size: 4,
        hidden_size: 6,
        num_labels: 2,
    };
    let vs = VarStore::new(Device::Cpu);
    let head = ConvSdsHead::new(vs.root(), &c);
    let x = Tensor::randn([2, 4, 6], (Kind::Float, Device::Cpu));
    let whole = forward(&head, &image(&x), false, &Edit::default())
        .unwrap()
        .logits;
    assert!(whole.allclose(&head.try_forward(&x).unwrap(), 1e-6, 1e-6, false));
    let edit = Edit {
        deleted: BTreeSet::from([1]),
        ..Edit::default()
    };
    let edited = forward(&head, &image(&x), false, &edit).unwrap().logits;
    let h = x.apply(&head.convs[0]);
    let h = h.apply(&head.convs[1].layer_norm).apply(&head.convs[2]);
    assert!(edited.allclose(&h.apply(&head.classifier), 1e-6, 1e-6, false));
    assert_eq!(head.stages()[0].len(), 3);
}

/// `ours` against PyTorch's `{name}.json`: the loss, the output norms in order, the weight
/// norms by name (the same set); returns the largest relative difference.
fn compare_norms(dir: &Path, name: &str, ours: &analysis::gradients::Gradients) -> f64 {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut worst = 0f64;
    let mut close = |a: f64, b: f64, what: &str| {
        let rel = (a - b).abs() / b.abs().max(1e-12);
        assert!(rel <= 1e-5, "{name} {what}: ours {a}, PyTorch {b}");
        worst = worst.max(rel);
    };
    close(ours.loss, theirs["loss"].as_f64().unwrap(), "loss");
    let outputs = theirs["outputs"].as_array().unwrap();
    assert_eq!(ours.outputs.len(), outputs.len(), "{name} outputs");
    for (o, t) in ours.outputs.iter().zip(outputs) {
        assert_eq!(o.name, t["name"].as_str().unwrap(), "{name} outputs");
        close(o.norm, t["norm"].as_f64().unwrap(), &o.name);
    }
    let weights: std::collections::BTreeMap<&str, f64> = theirs["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap(), w["norm"].as_f64().unwrap()))
        .collect();
    assert_eq!(ours.weights.len(), weights.len(), "{name} weights");
    for o in &ours.weights {
        let t = *weights
            .get(o.name.as_str())
            .unwrap_or_else(|| panic!("{name}: PyTorch has no {}", o.name));
        close(o.norm, t, &o.name);
    }
    worst
}

/// The probe's norms against PyTorch's (`python_ref/probe_cases.py`) for the same weights and
/// batch: CIFAR nets (training-mode batch norms), the ConvSDS head and the SiD classifier (eval).
#[test]
fn gradient_norms_match_pytorch() {
    use residual::checkpoint::StateDict;
    use residual::ModelConfig;
    let dir = residual::parity::default_artifacts_dir().join("probe");
    assert!(
        dir.join("sid3.json").exists(),
        "{} missing: run `make artifacts`",
        dir.display()
    );
    let conv_sds = ModelConfig::from_value(serde_json::json!({
        "arch": "conv_sds_head", "n_layers": 3, "input_size": 4, "hidden_size": 6, "num_labels": 2
    }))
    .unwrap();
    let cases = [
        ("cifar14_residual", ModelConfig::CifarResnet(config(false))),
        ("cifar14_plain", ModelConfig::CifarResnet(config(true))),
        ("conv_sds3", conv_sds),
        ("sid3", sid_config()),
    ];
    for (name, model) in cases {
        let weights = dir.join(format!("{name}.safetensors"));
        let net = analysis::load(&model, Some(&weights), Device::Cpu, 0).unwrap();
        let mut inputs: residual::models::Inputs =
            StateDict::read_safetensors(&dir.join(format!("{name}_input.safetensors")))
                .unwrap()
                .entries
                .into_iter()
                .collect();
        let y = inputs.remove("y").unwrap();
        let x = match inputs.remove("x") {
            Some(x) => image(&x),
            None => inputs,
        };
        let train = name.starts_with("cifar");
        assert_eq!(net.net.stochastic(), name == "sid3");
        let ours = analysis::gradients::probe(net.net.as_ref(), &x, &y, train).unwrap();
        let worst = compare_norms(&dir, name, &ours);
        println!("{name}: largest relative difference to PyTorch {worst:.2e}");
        let (first, last) = (&ours.outputs[1], ours.outputs.last().unwrap());
        assert_eq!(ours.first_to_last, first.norm / last.norm);
        if train {
            assert_eq!((ours.outputs.len(), ours.weights.len()), (7, 14));
        }
    }
}

/// The largest difference between the whole gradient at the stem's output and the sum of the
/// gradients of all 2^n route sets of the path analysis, relative to the largest gradient value.
fn route_sum_error(net: &dyn Probed, x: &residual::models::Inputs, y: &Tensor) -> f64 {
    use analysis::Route;
    let n = analysis::units(net).len();
    let grad = |routes: Vec<Route>| {
        let edit = Edit {
            routes,
            ..Edit::default()
        };
        let trace = forward(net, x, false, &edit).unwrap();
        let loss = analysis::loss(&trace.logits, y);
        Tensor::run_backward(&[&loss], &[&trace.stem], false, false).remove(0)
    };
    let whole = grad(Vec::new());
    let mut sum = whole.zeros_like();
    for set in 0..1u32 << n {
        let routes = (0..n)
            .map(|i| {
                if set >> i & 1 == 1 {
                    Route::Branch
                } else {
                    Route::Shortcut
                }
            })
            .collect();
        sum += grad(routes);
    }
    let scale = whole.abs().max().double_value(&[]);
    assert!(scale > 0.0);
    (&sum - &whole).abs().max().double_value(&[]) / scale
}

/// With the forward values fixed (eval mode, fixed ReLU masks), the backward pass is linear and a
/// chain of n residual units unravels exactly into its 2^n paths: the gradients of all path sets
/// routed as in the path analysis sum to the whole network's gradient (CIFAR net, ConvSDS head).
/// SiD's blocks are no chain (the embeddings reach every layer): there the sum is off, which is
/// why the path analysis refuses SiD.
#[test]
fn the_gradients_of_all_paths_sum_to_the_whole_gradient() {
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let net = CifarResNet::new(
        vs.root(),
        &CifarResNetConfig {
            depth: 8,
            ..config(false)
        },
    )
    .unwrap();
    randomize_stats(&vs);
    let y = Tensor::from_slice(&[0i64, 1, 2]);
    let e = route_sum_error(&net, &image(&images()), &y);
    assert!(e <= 1e-5, "CIFAR: {e}");

    let conv_sds = residual::ModelConfig::from_value(serde_json::json!({
        "arch": "conv_sds_head", "n_layers": 4, "input_size": 4, "hidden_size": 6
    }))
    .unwrap();
    let head = analysis::load(&conv_sds, None, Device::Cpu, 1).unwrap();
    let (x, y) = analysis::random_batch(&conv_sds, 3, 2, Device::Cpu).unwrap();
    assert_eq!(y.size(), [3, 4]);
    let e = route_sum_error(head.net.as_ref(), &x, &y);
    assert!(e <= 1e-5, "ConvSDS: {e}");

    let sid = analysis::load(&sid_config(), None, Device::Cpu, 1).unwrap();
    perturb(&sid.vs);
    let (x, y) = analysis::random_batch(&sid_config(), 6, 2, Device::Cpu).unwrap();
    let e = route_sum_error(sid.net.as_ref(), &x, &y);
    assert!(e > 0.05, "SiD: {e}");
    let err = analysis::paths::analyse(sid.net.as_ref(), &x, &y, 1, 0).unwrap_err();
    assert!(format!("{err:#}").contains("one chain"), "{err:#}");
}

#[test]
fn lesion_study_and_path_analysis_on_a_tiny_net() {
    use residual::analysis::{lesion, paths};
    use residual::data::{Dataset, Normalizer};
    tch::manual_seed(12);
    let vs = VarStore::new(Device::Cpu);
    let net = CifarResNet::new(vs.root(), &config(false)).unwrap();
    randomize_stats(&vs);
    let images = Tensor::randint(256, [10, 1, 8, 8], (Kind::Uint8, Device::Cpu));
    let labels = Tensor::randint(3, [10], (Kind::Int64, Device::Cpu));
    let data = Dataset::new(images, labels, 3).unwrap();
    let normalizer = Normalizer::new(vec![0.5], vec![0.25], Device::Cpu);
    let plan = lesion::LesionPlan {
        draws: 2,
        seed: 3,
        batch_size: 4,
    };
    let l = lesion::study(&net, &data, &normalizer, &plan).unwrap();
    assert_eq!(
        (l.units, l.images, l.deleted.len(), l.deleted_k.len()),
        (6, 10, 6, 6)
    );
    assert_eq!(l.deleted[3].name, "layer2.1");
    // Only layer1.0 and layer1.1 may trade places: the other stages open with a downsampling block.
    assert_eq!(l.swapped.len(), 1);
    assert_eq!(l.swapped[0].name, "layer1.0<->layer1.1");
    let all = Edit {
        deleted: (0..6).collect(),
        ..Edit::default()
    };
    let everything = lesion::error(&net, &data, &normalizer, 4, &all).unwrap();
    let last = &l.deleted_k[5];
    assert_eq!(
        (last.k, last.mean, last.min, last.max),
        (6, everything, everything, everything)
    );
    let one = Edit {
        deleted: BTreeSet::from([2]),
        ..Edit::default()
    };
    assert_eq!(
        l.deleted[2].error,
        lesion::error(&net, &data, &normalizer, 4, &one).unwrap()
    );

    let (x, y) = analysis::first_batch(&data, &normalizer, 4).unwrap();
    let p = paths::analyse(&net, &x, &y, 2, 5).unwrap();
    assert_eq!(p.lengths.len(), 7);
    assert_eq!(p.lengths[3].paths, 20.0 / 64.0);
    let total: f64 = p.lengths.iter().map(|l| l.total).sum();
    assert!((total - 1.0).abs() < 1e-12);
    assert!(p.effective.0 <= p.effective.1 && p.effective.1 <= 6);
    let plain_vs = VarStore::new(Device::Cpu);
    let plain = CifarResNet::new(plain_vs.root(), &config(true)).unwrap();
    assert!(paths::analyse(&plain, &x, &y, 2, 5).is_err());
}

/// A tiny SiD classifier config (3 layers of hidden size 8: units
/// `model.layers.0.transform.0`, `model.layers.{1,2}.{attention,transform}.0`).
fn sid_config() -> residual::ModelConfig {
    residual::ModelConfig::from_value(sid_config_json()).unwrap()
}

fn sid_config_json() -> serde_json::Value {
    serde_json::json!({
        "arch": "sid_classifier",
        "num_categories_list": [3, 5],
        "num_numerical_features": 2,
        "num_text_features": 1,
        "text_input_size": 4,
        "embedding_size": 4,
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": 3,
        "num_labels": 3
    })
}

/// Adds small random values to every float variable (SiD zero-initialises its biases, which
/// would hide a wrong deletion).
fn perturb(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, t) in vs.variables() {
            if t.is_floating_point() {
                t.shallow_clone().copy_(&(&t + t.rand_like() * 0.1));
            }
        }
    });
}

/// SiD: the probes' unravelled forward is the model's; a deleted block is the model built
/// without it, for a transform and an attention block.
#[test]
fn a_deleted_sid_block_is_the_model_without_it() {
    use residual::models::sid::SidClassifier;
    use residual::models::Model;
    let config = sid_config();
    let residual::ModelConfig::SidClassifier(c) = &config else {
        panic!("not SiD")
    };
    tch::manual_seed(13);
    let vs = VarStore::new(Device::Cpu);
    let mut sid = SidClassifier::new(vs.root(), c).unwrap();
    perturb(&vs);
    let (inputs, _) = analysis::random_batch(&config, 16, 3, Device::Cpu).unwrap();
    assert_eq!(
        analysis::unit_names(&sid),
        [
            "model.layers.0.transform.0",
            "model.layers.1.attention.0",
            "model.layers.1.transform.0",
            "model.layers.2.attention.0",
            "model.layers.2.transform.0"
        ]
    );
    assert!(sid.stochastic());
    let own = |m: &SidClassifier| m.forward_named(&inputs, false).unwrap();
    let run = |m: &SidClassifier, deleted: &[usize]| {
        let edit = Edit {
            deleted: deleted.iter().copied().collect(),
            ..Edit::default()
        };
        forward(m, &inputs, false, &edit).unwrap().logits
    };
    let whole = own(&sid);
    assert!(run(&sid, &[]).equal(&whole));
    let (no_transform, no_attention) = (run(&sid, &[2]), run(&sid, &[1, 3]));
    assert!(!no_transform.allclose(&whole, 1e-4, 1e-4, false));
    assert!(!no_attention.allclose(&whole, 1e-4, 1e-4, false));
    let transform = sid.model.layers[1].transform.remove(0);
    assert!(no_transform.equal(&own(&sid)));
    sid.model.layers[1].transform.insert(0, transform);
    for layer in &mut sid.model.layers[1..] {
        layer.attention.as_mut().unwrap().blocks.clear();
    }
    assert!(no_attention.equal(&own(&sid)));
    // Each chain holds one block: nothing to swap.
    assert!(analysis::swappable_pairs(&sid).is_empty());
}

/// `residual probe gradients|paths` and `residual lesion` on the ConvSDS head and the SiD
/// classifier, on random inputs (no data format fits them).
#[test]
fn probes_run_on_conv_sds_and_sid_from_the_command_line() {
    let dir = common::temp_dir("probe-other");
    let conv_sds = dir.join("conv_sds.json");
    std::fs::write(
        &conv_sds,
        r#"{"arch": "conv_sds_head", "n_layers": 4, "input_size": 4, "hidden_size": 6}"#,
    )
    .unwrap();
    let sid = dir.join("sid.json");
    std::fs::write(&sid, sid_config_json().to_string()).unwrap();
    let run = |args: &[&str], config: &Path, out: &Path| {
        let output = std::process::Command::new(common::residual_bin())
            .args(args)
            .args(["--device", "cpu", "--config", config.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };

    let out = dir.join("conv_sds");
    let (ok, text) = run(
        &["probe", "gradients", "--batch-size", "3"],
        &conv_sds,
        &out,
    );
    assert!(ok, "{text}");
    assert!(text.contains("| ConvSDS-4 init |"), "{text}");
    let g = json(out.join("gradients.json"));
    let outputs = g[0]["gradients"]["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["stem", "convs.0", "convs.1", "convs.2", "convs.3"]);
    assert!(outputs.iter().all(|o| o["norm"].as_f64().unwrap() > 0.0));
    assert_eq!(g[0]["gradients"]["weights"].as_array().unwrap().len(), 9);
    let (ok, text) = run(
        &["probe", "paths", "--batch-size", "3", "--draws", "2"],
        &conv_sds,
        &out,
    );
    assert!(ok, "{text}");
    let p = json(out.join("paths.json"));
    let lengths = p["lengths"].as_array().unwrap();
    assert_eq!(lengths.len(), 5);
    // Binomial(4, 1/2): 1, 4, 6, 4, 1 of 16 paths; the gradient shares sum to 1.
    for (l, c) in lengths.iter().zip([1.0, 4.0, 6.0, 4.0, 1.0]) {
        assert_eq!(l["paths"].as_f64().unwrap(), c / 16.0);
    }
    let share: f64 = lengths.iter().map(|l| l["total"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-12, "{share}");
    for png in ["gradients.png", "paths.png"] {
        assert!(std::fs::read(out.join(png))
            .unwrap()
            .starts_with(b"\x89PNG"));
    }

    let out = dir.join("sid");
    let (ok, text) = run(
        &["lesion", "--test-subset", "32", "--draws", "2"],
        &sid,
        &out,
    );
    assert!(ok, "{text}");
    assert!(text.contains("on 32 random inputs"), "{text}");
    let l = json(out.join("lesion.json"));
    let lesion = &l[0][1];
    assert_eq!(l[0][0], "SiD-3 init");
    assert_eq!(
        (lesion["units"].as_u64(), lesion["baseline"].as_f64()),
        (Some(5), Some(0.0))
    );
    let deleted = lesion["deleted"].as_array().unwrap();
    assert_eq!(deleted[1]["name"], "model.layers.1.attention.0");
    assert!(deleted
        .iter()
        .all(|d| (0.0..=1.0).contains(&d["error"].as_f64().unwrap())));
    let (ok, text) = run(&["probe", "paths"], &sid, &out);
    assert!(!ok && text.contains("one chain"), "{text}");
    let (ok, text) = run(
        &["probe", "gradients", "--data", "/nonexistent"],
        &sid,
        &out,
    );
    assert!(!ok && text.contains("leave out --data"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// torchvision's and timm's ResNets are probed too: blocks by stage, the deep stem's weights,
/// the plain twin; the lesion study on random inputs.
#[test]
fn probes_run_on_torchvision_and_timm_resnets() {
    use residual::analysis::{gradients, lesion, paths, study};
    use residual::ModelConfig;
    let small = ModelConfig::from_value(serde_json::json!({
        "arch": "resnet", "block": "basic", "layers": [1, 1, 1, 1], "num_classes": 4
    }))
    .unwrap();
    let (x, y) = analysis::random_batch(&small, 2, 1, Device::Cpu).unwrap();
    let net = analysis::load(&small, None, Device::Cpu, 0).unwrap();
    let names = analysis::unit_names(net.net.as_ref());
    assert_eq!(names, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]);
    let g = gradients::probe(net.net.as_ref(), &x, &y, true).unwrap();
    assert_eq!(g.outputs.len(), 5);
    assert_eq!(g.weights.len(), 1 + 4 * 2 + 1);
    let p = paths::analyse(net.net.as_ref(), &x, &y, 1, 0).unwrap();
    assert_eq!(p.lengths[2].paths, 6.0 / 16.0);
    let plan = lesion::LesionPlan {
        draws: 1,
        seed: 0,
        batch_size: 2,
    };
    let l = lesion::study_changes(net.net.as_ref(), &x, &plan).unwrap();
    assert_eq!((l.units, l.baseline, l.deleted.len()), (4, 0.0, 4));
    let plain = study::twin(&small).unwrap();
    assert_eq!(study::name(&plain), "plain resnet 1-1-1-1");
    let plain = analysis::load(&plain, None, Device::Cpu, 0).unwrap();
    assert!(!plain.net.residual());
    assert!(paths::analyse(plain.net.as_ref(), &x, &y, 1, 0).is_err());

    let timm = ModelConfig::from_value(serde_json::json!({
        "arch": "timm", "name": "resnet18d", "num_classes": 4
    }))
    .unwrap();
    let net = analysis::load(&timm, None, Device::Cpu, 0).unwrap();
    let g = gradients::probe(net.net.as_ref(), &x, &y, true).unwrap();
    let weights: Vec<&str> = g.weights.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        weights[..3],
        ["conv1.0.weight", "conv1.3.weight", "conv1.6.weight"]
    );
    assert_eq!(weights.last(), Some(&"fc.weight"));
    assert_eq!(g.outputs.len(), 9);
    assert_eq!(study::name(&timm), "timm resnet18d");
    let lone = ModelConfig::from_value(serde_json::json!({
        "arch": "conv_sds_layer", "input_size": 4, "hidden_dim": 6
    }))
    .unwrap();
    let err = analysis::load(&lone, None, Device::Cpu, 0).err().unwrap();
    assert!(
        format!("{err:#}").contains("single residual unit"),
        "{err:#}"
    );
}

/// `n` random 28x28 images with labels 0..10 as uncompressed IDX files `{prefix}-*-idx?-ubyte`.
fn write_idx(dir: &Path, prefix: &str, n: usize, seed: u64) {
    let header = |magic: u32, dims: &[u32]| -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b
    };
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u8
    };
    let mut images = header(0x0803, &[n as u32, 28, 28]);
    images.extend((0..n * 784).map(|_| next()));
    let mut labels = header(0x0801, &[n as u32]);
    labels.extend((0..n).map(|i| (i % 10) as u8));
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn experiment_veit_writes_report_and_plots_and_reuses_its_runs() {
    let dir = common::temp_dir("veit");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 64, 1);
    write_idx(&data, "t10k", 20, 2);
    let out = dir.join("report");
    let args = [
        "experiment",
        "veit",
        "--depth",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--draws",
        "1",
        "--probe-batch",
        "8",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let run = || {
        std::process::Command::new(common::residual_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let first = run();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains("Deleting one block raised the test error of the trained ResNet-8"));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for part in [
        "![gradients](gradients.png)",
        "![lesion](lesion.png)",
        "![paths](paths.png)",
        "| ResNet-8 init |",
        "| plain-8 trained |",
        "| layer3.0 |",
    ] {
        assert!(report.contains(part), "{part} missing:\n{report}");
    }
    for png in ["gradients.png", "lesion.png", "paths.png"] {
        assert!(
            std::fs::read(out.join(png))
                .unwrap()
                .starts_with(b"\x89PNG"),
            "{png}"
        );
    }
    let paths: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("paths.json")).unwrap()).unwrap();
    assert_eq!(paths["lengths"].as_array().unwrap().len(), 4);
    let again = run();
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("training 1 epochs"));
    std::fs::remove_dir_all(&dir).unwrap();
}
