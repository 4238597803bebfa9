//! Inference from files: preprocessing parity with torchvision, and `residual infer` end to end
//! (`--image` with the preprocessing of timm's and Hugging Face's weights: tests/preprocess.rs has
//! the pixel parity itself).
//! The CPU tests pin `--device cpu` (the default, `auto`, would pick a GPU where there is one);
//! `infer_on_cuda_matches_the_cpu_references` covers CUDA, with TF32 off.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use residual::checkpoint::{ReadOptions, StateDict};
use residual::parity::max_abs_diff;

fn fixtures() -> PathBuf {
    common::reference_dir("checkpoints", "image.png")
}

fn tensor(path: &Path, key: &str) -> tch::Tensor {
    StateDict::read(path, &ReadOptions::default())
        .unwrap()
        .get(key)
        .unwrap()
        .shallow_clone()
}

#[test]
fn image_preprocessing_matches_torchvision() {
    let fx = fixtures();
    let ours = residual::infer::preprocess_image(&fx.join("image.png"), 256, 224).unwrap();
    let theirs = tensor(&fx.join("image_preprocessed.safetensors"), "image");
    let diff = max_abs_diff(&ours, &theirs).unwrap();
    // Same antialiased resize, same rounding back to grey levels, same crop: identical pixels.
    println!("preprocessing: max |Δ| = {diff:e}");
    assert!(diff <= 1e-6, "{diff}");
    let jpeg = residual::infer::preprocess_image(&fx.join("image.jpg"), 256, 224).unwrap();
    assert_eq!(jpeg.size(), vec![3, 224, 224]);
    let not_an_image = residual::infer::preprocess_image(&fx.join("resnet50.pth"), 256, 224)
        .map(|_| ())
        .unwrap_err();
    let message = format!("{not_an_image:#}");
    assert!(
        message.starts_with("cannot decode image") && message.contains("resnet50.pth"),
        "{message}"
    );
    let small = residual::infer::preprocess_image(&fx.join("image.png"), 200, 224)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        format!("{small:#}"),
        "--resize 200 is smaller than the crop 224"
    );
}

fn residual(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::residual_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `residual infer --config CONFIG --weights WEIGHTS --device cpu` followed by `rest`.
fn infer(config: &Path, weights: &Path, rest: &[&str]) -> (bool, String, String) {
    infer_on("cpu", config, weights, rest)
}

/// `residual infer` on `device`.
fn infer_on(device: &str, config: &Path, weights: &Path, rest: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "infer",
        "--config",
        s(config),
        "--weights",
        s(weights),
        "--device",
        device,
    ];
    args.extend_from_slice(rest);
    residual(&args)
}

/// max |a - b| / max |b|: the CUDA comparisons, whose errors scale with the outputs' magnitude.
fn max_rel_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]);
    assert!(scale > 0.0, "all-zero reference");
    max_abs_diff(a, b).unwrap() / scale
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn infer_runs_pytorch_checkpoints_end_to_end() {
    let fx = fixtures();
    let dir = common::temp_dir("resnet");
    let config = dir.join("resnet50.json");
    std::fs::write(&config, r#"{"arch": "resnet50"}"#).unwrap();
    let io = fx.join("resnet50_io.safetensors");
    let out = dir.join("out.safetensors");
    let (ok, stdout, stderr) = infer(
        &config,
        &fx.join("resnet50_wrapped_ddp.pth"),
        &["--input", s(&io), "--output", s(&out), "--plain"],
    );
    assert!(ok, "{stdout}{stderr}");
    let diff = max_abs_diff(&tensor(&out, "output"), &tensor(&io, "logits")).unwrap();
    assert!(diff <= 1e-5, "logits differ by {diff}");

    // The default, folded batch norms: other fp32 rounding, which this random, uncalibrated
    // resnet50 amplifies through depth as it does other kernels' (5e-5 relative measured).
    let (ok, stdout, stderr) = infer(
        &config,
        &fx.join("resnet50_wrapped_ddp.pth"),
        &["--input", s(&io), "--output", s(&out)],
    );
    assert!(ok, "{stdout}{stderr}");
    let rel = max_rel_diff(&tensor(&out, "output"), &tensor(&io, "logits"));
    assert!(rel <= 1e-4, "folded logits differ by {rel:e} relative");

    // Batches of one take other kernels: equal up to float rounding, relative to |logits| ~ 600.
    let (ok, _, stderr) = infer(
        &config,
        &fx.join("resnet50.safetensors"),
        &["--input", s(&io), "--output", s(&out), "--batch-size", "1"],
    );
    assert!(ok, "{stderr}");
    assert!(max_abs_diff(&tensor(&out, "output"), &tensor(&io, "logits")).unwrap() < 1e-2);

    let (ok, stdout, _) = infer(
        &config,
        &fx.join("resnet50.pth"),
        &[
            "--input",
            s(&io),
            "--output",
            s(&out),
            "--features",
            "--json",
        ],
    );
    assert!(ok && stdout.contains("[2,2048]"), "{stdout}");
    assert_eq!(tensor(&out, "output").size(), vec![2, 2048]);

    // The wrong architecture: every mismatch named, nothing written.
    std::fs::remove_file(&out).unwrap();
    let r18 = dir.join("resnet18.json");
    std::fs::write(&r18, r#"{"arch": "resnet18"}"#).unwrap();
    let (ok, _, stderr) = infer(
        &r18,
        &fx.join("resnet50.pth"),
        &["--input", s(&io), "--output", s(&out)],
    );
    assert!(
        !ok && stderr.contains("unexpected keys") && stderr.contains("layer1.0.conv3.weight"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fc.weight: checkpoint [1000, 2048], model [1000, 512]"),
        "{stderr}"
    );
    assert!(!out.exists());

    let (ok, _, stderr) = infer(
        &config,
        &fx.join("resnet50.pth"),
        &[
            "--input",
            s(&io),
            "--input-key",
            "pixels",
            "--output",
            s(&out),
        ],
    );
    assert!(
        !ok && stderr.contains("no tensor `pixels`") && stderr.contains("\"input\""),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Parity cases whose models take named inputs other than one image batch, or none.
const NAMED_INPUT_CASES: [&str; 3] = [
    "sid_classifier_small_eval",
    "conv_sds_head_small_eval",
    "cifar_resnet20_b",
];

/// `residual infer` on a parity case's state_dict and inputs: (its output, PyTorch's).
fn infer_case(device: &str, dir: &Path, name: &str) -> (tch::Tensor, tch::Tensor) {
    let manifest = residual::parity::Manifest::load(&residual::parity::default_artifacts_dir())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let case = manifest.case(name).unwrap();
    let config = dir.join(format!("{name}.json"));
    std::fs::write(&config, case.config.to_string()).unwrap();
    let case_dir = manifest.case_dir(case);
    let out = dir.join(format!("{name}.safetensors"));
    let (ok, stdout, stderr) = infer_on(
        device,
        &config,
        &case_dir.join("state_dict.pth"),
        &[
            "--input",
            s(&case_dir.join("inputs.safetensors")),
            "--output",
            s(&out),
        ],
    );
    assert!(ok, "{name} on {device}: {stdout}{stderr}");
    (
        tensor(&out, "output"),
        tensor(&case_dir.join("outputs.safetensors"), "output"),
    )
}

#[test]
fn infer_reads_every_models_named_inputs() {
    let dir = common::temp_dir("named");
    for name in NAMED_INPUT_CASES {
        let (output, expected) = infer_case("cpu", &dir, name);
        let diff = max_abs_diff(&output, &expected).unwrap();
        assert!(diff <= 1e-6, "{name}: {diff}");
        // The CPU row of infer_matches_the_references_on (which skips these on the CPU).
        let rel = max_rel_diff(&output, &expected);
        assert!(rel <= 1e-5, "{name}: {rel:e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn infer_classifies_images_with_imagenet_labels() {
    let fx = fixtures();
    let dir = common::temp_dir("image");
    let config = dir.join("resnet50.json");
    std::fs::write(&config, r#"{"arch": "resnet50"}"#).unwrap();
    let (ok, stdout, stderr) = infer(
        &config,
        &fx.join("resnet50.pth"),
        &[
            "--image",
            s(&fx.join("image.png")),
            s(&fx.join("image.jpg")),
            "--topk",
            "3",
            "--json",
        ],
    );
    assert!(ok, "{stderr}");
    let results: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 2);
    let top = &results[0]["top"];
    assert_eq!(top.as_array().unwrap().len(), 3);
    let logits = tensor(&fx.join("image_preprocessed.safetensors"), "logits");
    let probs = logits.softmax(-1, tch::Kind::Float);
    let best = probs.argmax(0, false).int64_value(&[]);
    assert_eq!(top[0]["index"].as_i64().unwrap(), best);
    let p = top[0]["probability"].as_f64().unwrap();
    assert!((p - probs.double_value(&[best])).abs() < 1e-5, "{p}");
    let label = residual::infer::IMAGENET_CLASSES
        .lines()
        .nth(best as usize)
        .unwrap();
    assert_eq!(top[0]["label"], label);

    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "only\ntwo\n").unwrap();
    let (ok, stdout, _) = infer(
        &config,
        &fx.join("resnet50.pth"),
        &["--image", s(&fx.join("image.png")), "--labels", s(&labels)],
    );
    assert!(
        ok && stdout.contains("image.png") && stdout.contains("%"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small model for the preprocessing tests, whose point is the input tensor, not the model (each
/// `residual infer` loads it, ~100x less to read than resnet50): the parity case
/// `cifar_resnet20_b` (any image size, 10 classes), its config written to `dir`: (config, weights).
fn small_model(dir: &Path) -> (PathBuf, PathBuf) {
    let manifest = residual::parity::Manifest::load(&residual::parity::default_artifacts_dir())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let case = manifest.case("cifar_resnet20_b").unwrap();
    let config = dir.join("cifar_resnet20_b.json");
    std::fs::write(&config, case.config.to_string()).unwrap();
    (config, manifest.case_dir(case).join("state_dict.pth"))
}

fn load(config: &Path, weights: &Path) -> residual::infer::LoadedModel {
    residual::infer::LoadedModel::load(
        residual::ModelConfig::from_file(config).unwrap(),
        weights,
        tch::Device::Cpu,
        &residual::infer::LoadSettings::default(),
    )
    .unwrap()
}

/// `into_one_forward` (what `infer` runs on images) gives the model's outputs, frees the
/// variables folding replaced, and a Predictor can no longer be made from the emptied store.
#[test]
fn one_forward_form_matches_the_model_and_releases_its_variables() {
    let dir = common::temp_dir("one_forward");
    let (config, weights) = small_model(&dir);
    let plain = load(&config, &weights);
    let once = load(&config, &weights).into_one_forward().unwrap();
    assert!(once.vs.variables().is_empty());
    assert_eq!(once.kind(), tch::Kind::Float);
    let err = residual::Predictor::from_loaded(&once, &Default::default()).unwrap_err();
    assert!(format!("{err:#}").contains("released"), "{err:#}");
    tch::manual_seed(3);
    let mut inputs = residual::Inputs::new();
    inputs.insert(
        "input".into(),
        tch::Tensor::randn([3, 3, 20, 20], tch::kind::FLOAT_CPU),
    );
    let want = plain.run(&inputs, None, false).unwrap();
    let got = once.run(&inputs, None, false).unwrap();
    let scale = want.abs().max().double_value(&[]);
    let diff = max_abs_diff(&got, &want).unwrap();
    assert!(diff <= 1e-4 * scale, "max |diff| {diff} at scale {scale}");
}

/// The preprocessing references of python_ref/preprocess.py.
fn preprocess_references() -> PathBuf {
    common::reference_dir("preprocess", "cases.json")
}

/// Every way of stating a preprocessing on the command line (a timm config.json, a Hugging Face
/// preprocessor_config.json, the flags alone) classifies as the model does on the tensor the
/// Python library itself made of the image.
#[test]
fn infer_image_preprocessing_follows_the_weights() {
    let pre = preprocess_references();
    let refs =
        StateDict::read(&pre.join("references.safetensors"), &ReadOptions::default()).unwrap();
    let dir = common::temp_dir("preprocess");
    let (config, weights) = small_model(&dir);
    // What `infer` runs for images classified in one forward.
    let model = load(&config, &weights).into_one_forward().unwrap();
    let file = |case: &str, name: &str| pre.join(case).join(name).to_str().unwrap().to_string();
    let cases: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "timm_bilinear_rgba_90x90",
            "rgba_90x90",
            vec![
                "--preprocess".into(),
                file("timm_bilinear_rgba_90x90", "config.json"),
            ],
        ),
        (
            "timm_bilinear_rgba_90x90",
            "rgba_90x90",
            "--pipeline timm --interpolation bilinear --crop-pct 0.95 --input-size 3,40,40"
                .split(' ')
                .map(String::from)
                .collect(),
        ),
        (
            "timm_border_gray",
            "gray_37x61",
            "--pipeline timm --interpolation bicubic --crop-pct 0.95 --crop-mode border \
             --input-size 40x56 --mean 0.5 --std 0.5"
                .split_whitespace()
                .map(String::from)
                .collect(),
        ),
        (
            "timm_hamming",
            "rgb_200x150",
            "--pipeline timm --interpolation hamming --input-size 32 --mean 0.5,0.4,0.3 \
             --std 0.2,0.25,0.3"
                .split_whitespace()
                .map(String::from)
                .collect(),
        ),
        (
            "hf_convnext_gray_37x61_pil",
            "gray_37x61",
            vec![
                "--preprocess".into(),
                file("hf_convnext_gray_37x61", "preprocessor_config.json"),
                "--pipeline".into(),
                "transformers_pil".into(),
            ],
        ),
        (
            "hf_bit",
            "rgb_200x150",
            vec![
                "--preprocess".into(),
                file("hf_bit", "preprocessor_config.json"),
            ],
        ),
        (
            "torchvision_bilinear_rgb",
            "rgb_200x150",
            "--resize 57 --crop 48"
                .split(' ')
                .map(String::from)
                .collect(),
        ),
        (
            "torchvision_bicubic_tiny",
            "rgb_13x9",
            "--resize 45 --crop 40 --interpolation bicubic"
                .split(' ')
                .map(String::from)
                .collect(),
        ),
    ];
    for (case, image, flags) in &cases {
        let image = pre.join("images").join(format!("{image}.png"));
        let mut args = vec!["--image", s(&image), "--topk", "5", "--json"];
        args.extend(flags.iter().map(String::as_str));
        let (ok, stdout, stderr) = infer(&config, &weights, &args);
        assert!(ok, "{case} {flags:?}: {stderr}");
        let results: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let top = results[0]["top"].as_array().unwrap();
        let mut inputs = residual::Inputs::new();
        let reference = refs.get(&format!("{case}.output")).unwrap();
        inputs.insert("input".into(), reference.unsqueeze(0));
        let logits = model.run(&inputs, None, false).unwrap();
        let expected = residual::infer::predictions(&logits.get(0), 5, &[]).unwrap();
        for (got, want) in top.iter().zip(&expected) {
            assert_eq!(
                got["index"].as_i64().unwrap(),
                want.index,
                "{case} {flags:?}"
            );
            let p = got["probability"].as_f64().unwrap();
            assert!(
                (p - want.probability).abs() <= 1e-9,
                "{case} {flags:?}: {p} vs {}",
                want.probability
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn infer_image_preprocessing_errors_name_the_problem() {
    let pre = preprocess_references();
    let dir = common::temp_dir("preprocess-errors");
    let (config, weights) = small_model(&dir);
    let detr = dir.join("preprocessor_config.json");
    std::fs::write(&detr, r#"{"image_processor_type": "DetrImageProcessor"}"#).unwrap();
    let typo = dir.join("preprocess.json");
    std::fs::write(&typo, r#"{"crop_pcct": 0.9}"#).unwrap();
    let image = pre.join("images/rgb_13x9.png");
    for (flags, expected) in [
        (
            vec!["--preprocess", s(&detr)],
            "DetrImageProcessor is not supported",
        ),
        (vec!["--preprocess", s(&typo)], "unknown field `crop_pcct`"),
        (
            vec!["--input-size", "1,28,28"],
            "only 3-channel (RGB) inputs",
        ),
        (
            vec!["--crop-pct", "0"],
            "crop_pct must be a positive number",
        ),
        (
            vec!["--interpolation", "lanczos"],
            "needs Pillow's resize: use the timm or transformers_pil pipeline",
        ),
        (
            vec!["--crop", "300"],
            "--resize 256 is smaller than the crop 300",
        ),
    ] {
        let mut args = vec!["--image", s(&image)];
        args.extend(flags.iter().copied());
        let (ok, _, stderr) = infer(&config, &weights, &args);
        assert!(!ok && stderr.contains(expected), "{flags:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_and_convert() {
    let fx = fixtures();
    let (ok, stdout, _) = residual(&["inspect", s(&fx.join("resnet50_wrapped_ddp.pth")), "--json"]);
    assert!(ok);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        summary["architecture"],
        "torchvision resnet50, 1000 classes"
    );
    assert_eq!(summary["parameters"], 25_557_032);
    assert_eq!(summary["tensors"], 320);
    assert_eq!(
        summary["config"],
        serde_json::json!({
            "arch": "resnet50", "num_classes": 1000, "in_channels": 3, "include_fc": true,
            "norm": "batch_norm", "shortcut": "B", "plain": false, "zero_init_residual": false,
            "replace_stride_with_dilation": [false, false, false],
        })
    );
    assert!(summary.get("no_match").is_none(), "{stdout}");
    assert_eq!(
        summary["layout"],
        "torch.save file, weights under `state_dict`; also holds epoch (int), arch (str), \
         optimizer (dict), best_acc1 (tensor); stripped `module.`"
    );

    // Where the weights are, named for each layout a training script or torch.save(model) writes.
    for (file, layout, matches) in [
        (
            "tv_train.pth",
            "torch.save file, weights under `model`; also holds optimizer (dict), lr_scheduler (dict), \
             epoch (int), args (argparse.Namespace)",
            "matches: CIFAR ResNet-8",
        ),
        (
            "lightning.ckpt",
            "weights under `state_dict`",
            "matches: CIFAR ResNet-8",
        ),
        (
            "resnet18_module.pth",
            "torch.save file (a pickled nn.Module of class torchvision.models.resnet.ResNet)",
            "matches: torchvision resnet18, 1000 classes",
        ),
        (
            "resnet18_scripted.pt",
            "TorchScript archive (module class __torch__.torchvision.models.resnet.ResNet)",
            "matches: torchvision resnet18, 1000 classes",
        ),
    ] {
        let (ok, stdout, stderr) = residual(&["inspect", s(&fx.join(file))]);
        assert!(ok, "{file}: {stderr}");
        assert!(
            stdout.starts_with("file: ") && stdout.contains(layout) && stdout.contains(matches),
            "{file}: {stdout}"
        );
    }
    let (_, stdout, _) = residual(&["inspect", s(&fx.join("lightning.ckpt"))]);
    assert!(stdout.contains("; stripped `model.`"), "{stdout}");

    let (ok, stdout, _) = residual(&[
        "inspect",
        s(&fx.join("resnet50_lightning.ckpt")),
        "--strip-prefix",
        "model.",
    ]);
    assert!(
        ok && stdout.contains("matches: torchvision resnet50"),
        "{stdout}"
    );

    // Not a model: said so, and why.
    let (ok, stdout, _) = residual(&["inspect", s(&fx.join("layouts.pth"))]);
    assert!(
        ok && stdout.contains("matches: no known architecture")
            && stdout.contains("why: none of the keys that mark a known family"),
        "{stdout}"
    );
    let (ok, stdout, _) = residual(&["inspect", s(&fx.join("layouts.pth")), "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(ok && summary["config"].is_null(), "{stdout}");
    assert!(
        summary["no_match"]
            .as_str()
            .is_some_and(|why| why.starts_with("none of the keys")),
        "{stdout}"
    );

    let dir = common::temp_dir("convert");
    let st = dir.join("w.safetensors");
    let pth = dir.join("w.pth");
    let ot = dir.join("w.ot");
    for (from, to) in [
        (fx.join("resnet50_legacy.pth"), &st),
        (st.clone(), &pth),
        (pth.clone(), &ot),
    ] {
        let (ok, stdout, stderr) = residual(&["convert", s(&from), s(to)]);
        assert!(
            ok && stdout.contains("wrote 320 tensors"),
            "{stdout}{stderr}"
        );
    }
    let reference =
        StateDict::read(&fx.join("resnet50.safetensors"), &ReadOptions::default()).unwrap();
    for file in [&st, &pth, &ot] {
        let back = StateDict::read(file, &ReadOptions::default()).unwrap();
        assert_eq!(back.len(), reference.len());
        for (k, v) in &reference.entries {
            assert!(
                back.get(k).is_some_and(|t| t.equal(v)),
                "{}: {k}",
                file.display()
            );
        }
    }
    let (ok, _, stderr) = residual(&["convert", s(&st), s(&dir.join("w.npz"))]);
    assert!(!ok && stderr.contains(".safetensors"), "{stderr}");
    let (ok, _, stderr) = residual(&["inspect", s(&dir.join("missing.pth"))]);
    assert!(!ok && stderr.contains("cannot open checkpoint"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `residual infer --device cuda` against the CPU references: TF32 off (the default), so the only
/// differences are fp32 rounding in other kernels, judged relative to the outputs' scale
/// (resnet50's logits are ~600); with `--tf32`, only a sanity bound.
#[test]
fn infer_on_cuda_matches_the_cpu_references() {
    if common::cuda_or_skip().is_some() {
        infer_matches_the_references_on("cuda", "cuda:0");
    }
}

/// The same comparison on the CPU, so that everything but the numbers is exercised where there is
/// no GPU.
#[test]
fn infer_device_comparison_runs_on_the_cpu() {
    infer_matches_the_references_on("cpu", "cpu");
}

fn infer_matches_the_references_on(device: &str, name: &str) {
    let cuda = device != "cpu";
    let fx = fixtures();
    let dir = common::temp_dir(device);
    let config = dir.join("resnet50.json");
    std::fs::write(&config, r#"{"arch": "resnet50"}"#).unwrap();
    let io = fx.join("resnet50_io.safetensors");
    let logits = tensor(&io, "logits");
    let out = dir.join("out.safetensors");
    for extra in [&[][..], &["--batch-size", "1"][..], &["--tf32"][..]] {
        let tf32 = extra.contains(&"--tf32");
        // The model as built: these bounds are PyTorch's eager rounding (tests/inference.rs
        // checks the folded model against it).
        let mut rest = vec!["--input", s(&io), "--output", s(&out), "--json", "--plain"];
        rest.extend_from_slice(extra);
        let (ok, stdout, stderr) = infer_on(device, &config, &fx.join("resnet50.pth"), &rest);
        assert!(ok, "{extra:?}: {stdout}{stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["device"], name, "{report}");
        // TF32 exists only on CUDA; `--tf32` changes nothing elsewhere.
        assert_eq!(report["tf32"], cuda && tf32, "{report}");
        let rel = max_rel_diff(&tensor(&out, "output"), &logits);
        println!("resnet50 on {device} {extra:?}: max|Δ|/max|ref| = {rel:e}");
        // Batch 1 runs other convolution algorithms than the batched reference did (oneDNN and
        // cuDNN pick by shape), and this fixture's random, uncalibrated resnet50 amplifies their
        // fp32 rounding through depth (logits ~600): up to ~2e-5 measured on the CPU.
        let tolerance = match (cuda && tf32, extra.contains(&"1")) {
            (true, _) => 1e-2,
            (false, true) => 1e-4,
            (false, false) => 1e-5,
        };
        assert!(rel <= tolerance, "{extra:?}: {rel:e} > {tolerance:e}");
    }

    // On the CPU, infer_reads_every_models_named_inputs runs these cases with both bounds.
    let named_cases: &[&str] = if cuda { &NAMED_INPUT_CASES } else { &[] };
    for &case_name in named_cases {
        let (output, expected) = infer_case(device, &dir, case_name);
        let rel = max_rel_diff(&output, &expected);
        println!("{case_name} on {device}: max|Δ|/max|ref| = {rel:e}");
        assert!(rel <= 1e-5, "{case_name}: {rel:e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without CUDA, `--device cuda` fails before loading anything, and says why.
#[test]
fn infer_refuses_a_missing_gpu() {
    if tch::Cuda::is_available() {
        return;
    }
    let fx = fixtures();
    let (ok, _, stderr) = infer_on(
        "cuda",
        &fx.join("missing.json"),
        &fx.join("resnet50.pth"),
        &["--image", s(&fx.join("image.png"))],
    );
    assert!(
        !ok && stderr.contains("device cuda:0 requested but no CUDA device is available"),
        "{stderr}"
    );
}
