//! Image-folder datasets against torchvision (python_ref/image_folder.py writes a tiny folder and
//! what `ImageFolder` and its transforms make of it): class order, file order, decoded pixels,
//! the evaluation transform; corrupt files skipped and counted; training from a folder and
//! `infer` naming the classes.

mod common;

/// TrivialAugmentWide, RandAugment, ColorJitter's hue, mixup and cutmix (same fixture).
#[path = "image_folder/augment.rs"]
mod augment;

use std::path::{Path, PathBuf};
use std::process::Command;

use residual::checkpoint::{ReadOptions, StateDict};
use std::sync::Arc;

use residual::data::{
    decode_all, decode_rgb, random_resized_crop_params, resized_crop, sample_rng, AutoAugment,
    FolderOptions, FolderStream, ImageFolder, Mix, Normalizer, SplitMix, TrainTransform,
};
use residual::preprocess::{Preprocess, RgbImage};
use residual::train::{OptimizerKind, RunData, TrainOptions, Trainer};
use residual::ModelConfig;
use serde::Deserialize;
use tch::{Device, Tensor};

#[derive(Deserialize)]
struct Expected {
    classes: Vec<String>,
    samples: Vec<(String, i64)>,
    corrupt: String,
    crops: Vec<Crop>,
    random_resized_crop: CropStats,
}

/// Means over torchvision's `RandomResizedCrop.get_params` draws on a 30x50 image.
#[derive(Deserialize)]
struct CropStats {
    mean_area: f64,
    mean_log_ratio: f64,
    mean_top: f64,
    mean_left: f64,
}

#[derive(Deserialize)]
struct Crop {
    index: usize,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
}

/// The folder and torchvision's findings, written once per test binary.
fn fixture() -> &'static (PathBuf, Expected) {
    static FIXTURE: std::sync::OnceLock<(PathBuf, Expected)> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = common::temp_dir("image-folder");
        let python = std::env::var("RESIDUAL_PYTHON")
            .expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
        let out = Command::new(python)
            .arg(common::source_dir().join("python_ref/image_folder.py"))
            .arg(&dir)
            .output()
            .expect("cannot run python");
        assert!(
            out.status.success(),
            "python_ref/image_folder.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: Expected =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        (dir, expected)
    })
}

/// The pixels torchvision produced (expected.safetensors).
fn expected_tensors(dir: &Path) -> StateDict {
    StateDict::read(&dir.join("expected.safetensors"), &ReadOptions::default()).unwrap()
}

fn hwc(image: &RgbImage) -> Tensor {
    Tensor::from_slice(&image.data).view([image.height as i64, image.width as i64, 3])
}

#[test]
fn classes_and_files_are_listed_as_torchvision_lists_them() {
    let (dir, expected) = fixture();
    let data = dir.join("data");
    let folder = ImageFolder::scan(&data).unwrap();
    assert_eq!(folder.classes, expected.classes);
    let samples: Vec<(String, i64)> = folder
        .samples
        .iter()
        .map(|(p, t)| {
            let rel = p.strip_prefix(&data).unwrap();
            (rel.to_string_lossy().into_owned(), *t)
        })
        .collect();
    assert_eq!(samples, expected.samples);
    assert_eq!(folder.classes, ["Dog", "bird", "cat"]);
}

#[test]
fn decoded_pixels_and_the_eval_transform_are_pils() {
    let (dir, expected) = fixture();
    let tensors = expected_tensors(dir);
    let folder = ImageFolder::scan(&dir.join("data")).unwrap();
    let eval = FolderOptions {
        resize: 11,
        ..FolderOptions::with_size(9)
    }
    .eval_preprocess();
    let mut compared = 0;
    for (i, (path, _)) in folder.samples.iter().enumerate() {
        let Some(want) = tensors.get(&format!("decoded.{i}")) else {
            continue;
        };
        let image = decode_rgb(path).unwrap();
        let have = hwc(&image);
        assert_eq!(have.size(), want.size(), "{}", path.display());
        if path.extension().is_some_and(|e| e == "jpg") {
            // The EXIF rotation shows in the shape (24x16 stored, 16x24 shown); JPEG decoders
            // differ by a few grey levels.
            assert_eq!(have.size(), [16, 24, 3]);
            let diff = (have.to_kind(tch::Kind::Float) - want.to_kind(tch::Kind::Float)).abs();
            let mean = diff.mean(tch::Kind::Float).double_value(&[]);
            assert!(mean < 2.0, "{}: mean |diff| {mean}", path.display());
            continue;
        }
        assert!(have.equal(want), "{}: pixels differ", path.display());
        let pixels = eval.pixels(&image).unwrap();
        assert!(
            hwc(&pixels).equal(tensors.get(&format!("eval.{i}")).unwrap()),
            "{}: Resize + CenterCrop differ",
            path.display()
        );
        compared += 1;
    }
    assert_eq!(
        compared,
        expected.samples.len() - 2,
        "all but the JPEG and the corrupt file"
    );
}

#[test]
fn corrupt_files_are_skipped_and_reported() {
    let (dir, expected) = fixture();
    let folder = ImageFolder::scan(&dir.join("data")).unwrap();
    let eval = FolderOptions::with_size(8).eval_preprocess();
    let (data, skipped) = decode_all(&folder, &eval, 2).unwrap();
    assert_eq!(skipped, [dir.join("data").join(&expected.corrupt)]);
    assert_eq!(data.len() as usize, folder.len() - 1);
    assert_eq!(data.image_shape(), [3, 8, 8]);
    let labels: Vec<i64> = Vec::try_from(&data.labels).unwrap();
    let mut want: Vec<i64> = expected
        .samples
        .iter()
        .filter(|(p, _)| p != &expected.corrupt)
        .map(|s| s.1)
        .collect();
    assert_eq!(labels, want);
    want.dedup();
    assert_eq!(want, [0, 1, 2]);
    let err = decode_rgb(&dir.join("data").join(&expected.corrupt)).unwrap_err();
    assert!(format!("{err:#}").contains("z_corrupt.png"), "{err:#}");
}

fn residual(args: &[&str]) -> std::process::Output {
    let out = Command::new(common::residual_bin())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "residual {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_run_on_an_image_folder_saves_its_classes_for_infer() {
    let (dir, _) = fixture();
    let run = common::temp_dir("image-folder-run");
    let config = run.join("model.config.json");
    std::fs::write(
        &config,
        r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 3, "in_channels": 3}"#,
    )
    .unwrap();
    let out_dir = run.join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = residual(&[
        "train",
        "--config",
        &s(&config),
        "--out",
        &s(&out_dir),
        "--data",
        &s(&dir.join("data")),
        "--image-size",
        "12",
        "--val-fraction",
        "0.3",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("z_corrupt.png"), "{stderr}");
    assert!(stderr.contains("skipped 1 unreadable file"), "{stderr}");
    assert!(
        stderr.contains("epoch 1:") || stderr.contains("data: skipped"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("classes.txt")).unwrap(),
        "Dog\nbird\ncat\n"
    );
    let p = Preprocess::from_file(&out_dir.join("preprocess.json")).unwrap();
    assert_eq!(p.input_size, [3, 12, 12]);
    let weights = residual::train::latest_weights(&out_dir).unwrap();
    let out = residual(&[
        "infer",
        "--config",
        &s(&out_dir.join("model.json")),
        "--weights",
        &s(&weights),
        "--image",
        &s(&dir.join("data/cat/01.png")),
        "--topk",
        "3",
        "--device",
        "cpu",
        "--json",
    ]);
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut labels: Vec<&str> = printed[0]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    labels.sort_unstable();
    assert_eq!(labels, ["Dog", "bird", "cat"]);
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn a_fixed_resized_crop_gives_torchvisions_pixels() {
    let (dir, expected) = fixture();
    let tensors = expected_tensors(dir);
    let folder = ImageFolder::scan(&dir.join("data")).unwrap();
    let mut compared = 0;
    for c in &expected.crops {
        let path = &folder.samples[c.index].0;
        if path.extension().is_some_and(|e| e == "jpg") {
            continue;
        }
        let image = decode_rgb(path).unwrap();
        let out = resized_crop(&image, c.top, c.left, c.height, c.width, 7, 6);
        let want = tensors.get(&format!("crop.{}", c.index)).unwrap();
        assert!(
            hwc(&out).equal(want),
            "{}: resized_crop differs",
            path.display()
        );
        compared += 1;
    }
    assert_eq!(compared, expected.crops.len() - 1);
}

#[test]
fn random_resized_crops_draw_as_torchvisions() {
    let (_, expected) = fixture();
    let want = &expected.random_resized_crop;
    let n = 20000;
    let (mut area, mut log_ratio, mut top, mut left) = (0.0, 0.0, 0.0, 0.0);
    let mut rng = SplitMix::new(5, 0);
    for _ in 0..n {
        let (t, l, h, w) =
            random_resized_crop_params(30, 50, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert!(t + h <= 30 && l + w <= 50 && h >= 1 && w >= 1);
        area += (h * w) as f64 / 1500.0;
        log_ratio += (w as f64 / h as f64).ln();
        top += t as f64;
        left += l as f64;
    }
    let n = n as f64;
    let have = [area / n, log_ratio / n, top / n, left / n];
    let want = [
        want.mean_area,
        want.mean_log_ratio,
        want.mean_top,
        want.mean_left,
    ];
    // Standard errors of 20000 draws (both sides): about 0.003, 0.003, 0.04, 0.15.
    for ((h, w), tol) in have.iter().zip(want).zip([0.012, 0.012, 0.2, 0.6]) {
        assert!(
            (h - w).abs() < tol,
            "means {have:?}, torchvision's {want:?}"
        );
    }
}

fn stream(folder: ImageFolder, workers: usize, jitter: bool) -> FolderStream {
    FolderStream {
        folder: Arc::new(folder),
        transform: TrainTransform {
            color_jitter: jitter.then_some([0.4, 0.4, 0.4]),
            ..TrainTransform::default()
        },
        size: 8,
        workers,
        prefetch: 2,
    }
}

fn epoch_batches(s: &FolderStream, epoch: u64, skip: i64) -> Vec<(Tensor, Tensor)> {
    let norm = Normalizer::new(vec![0.5; 3], vec![0.25; 3], Device::Cpu);
    let mut batches = s.epoch(&norm, 3, 9, epoch, Device::Cpu);
    batches.skip_batches(skip);
    let mut out = Vec::new();
    while let Some(b) = batches.next_host().unwrap() {
        out.push(b);
    }
    out
}

#[test]
fn the_stream_is_seeded_per_image_not_per_worker() {
    let (dir, _) = fixture();
    let folder = ImageFolder::scan(&dir.join("data")).unwrap();
    let one = epoch_batches(&stream(folder.clone(), 1, true), 0, 0);
    let three = epoch_batches(&stream(folder.clone(), 3, true), 0, 0);
    // 11 files, one corrupt: batches of 3, 3, 3 and 1 readable images (the corrupt one dropped).
    let sizes: Vec<i64> = one.iter().map(|(_, y)| y.size()[0]).collect();
    assert_eq!(sizes.iter().sum::<i64>(), folder.len() as i64 - 1);
    assert_eq!(one.len(), three.len());
    for ((x1, y1), (x3, y3)) in one.iter().zip(&three) {
        assert!(x1.equal(x3) && y1.equal(y3));
    }
    // A resumed epoch skips batches and draws the same images.
    let resumed = epoch_batches(&stream(folder.clone(), 2, true), 0, 2);
    assert_eq!(resumed.len(), one.len() - 2);
    assert!(resumed[0].0.equal(&one[2].0));
    let next = epoch_batches(&stream(folder, 2, true), 1, 0);
    assert!(!next[0].0.equal(&one[0].0), "another epoch, other draws");
}

#[test]
fn flips_and_jitter_happen_as_often_as_asked() {
    let image = RgbImage {
        height: 4,
        width: 4,
        data: (0..48).map(|v| (v * 4) as u8).collect(),
    };
    let t = TrainTransform {
        scale: [1.0, 1.0],
        ratio: [1.0, 1.0],
        flip: true,
        color_jitter: None,
        hue: None,
        auto_augment: None,
        mix: None,
    };
    let plain = resized_crop(&image, 0, 0, 4, 4, 4, 4);
    let n = 2000;
    let flipped = (0..n)
        .filter(|&i| t.apply(&image, 4, &mut sample_rng(1, 0, i)) != plain)
        .count();
    let share = flipped as f64 / n as f64;
    assert!((share - 0.5).abs() < 0.04, "flipped {share}");
    // Brightness alone: the mean factor is 1, its spread uniform in [0.6, 1.4].
    let jitter = TrainTransform {
        flip: false,
        color_jitter: Some([0.4, 0.0, 0.0]),
        ..t
    };
    let mean = |im: &RgbImage| im.data.iter().map(|&v| v as f64).sum::<f64>() / 48.0;
    let base = mean(&image);
    let factors: Vec<f64> = (0..n)
        .map(|i| mean(&jitter.apply(&image, 4, &mut sample_rng(2, 0, i))) / base)
        .collect();
    let avg = factors.iter().sum::<f64>() / n as f64;
    let (lo, hi) = factors
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &f| (a.min(f), b.max(f)));
    // Truncation to integers pulls the mean a little below 1; 255 clips the top.
    assert!((avg - 0.99).abs() < 0.03, "mean factor {avg}");
    assert!(
        lo > 0.58 && lo < 0.65 && hi > 1.3 && hi <= 1.41,
        "{lo} {hi}"
    );
}

#[test]
fn resumed_image_folder_runs_with_adamw_end_bit_identical() {
    let (dir, _) = fixture();
    let root = common::temp_dir("image-folder-resume");
    let config = ModelConfig::from_json(
        r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 3, "in_channels": 3}"#,
    )
    .unwrap();
    let options = TrainOptions {
        epochs: 2,
        batch_size: 4,
        lr: 0.01,
        weight_decay: 0.05,
        seed: 3,
        // AdamW's moments and step count travel through the checkpoint too.
        optimizer: OptimizerKind::adamw(),
        image_folder: Some(FolderOptions {
            val_fraction: Some(0.3),
            workers: 2,
            // Every random transform, mixup/cutmix (soft targets) included, replays on resume.
            train_transform: Some(TrainTransform {
                color_jitter: Some([0.2, 0.2, 0.2]),
                hue: Some(0.1),
                auto_augment: Some(AutoAugment::trivial_augment_wide()),
                mix: Some(Mix::new(0.2, 1.0)),
                ..TrainTransform::default()
            }),
            ..FolderOptions::with_size(8)
        }),
        ..Default::default()
    };
    let data = RunData::from_image_folder(&dir.join("data"), &options, Device::Cpu).unwrap();
    assert!(data.stream.is_some());
    let train = |run: &Path, options: TrainOptions| {
        let mut t = Trainer::create(run, config.clone(), options, Device::Cpu).unwrap();
        t.quiet = true;
        t.run(&data).unwrap();
    };
    train(&root.join("straight"), options.clone());
    train(
        &root.join("resumed"),
        TrainOptions {
            epochs: 1,
            ..options
        },
    );
    let mut rest = Trainer::resume(&root.join("resumed"), Device::Cpu, Some(2)).unwrap();
    rest.quiet = true;
    rest.run(&data).unwrap();
    let weights = |run: &str| {
        let path = residual::train::latest_weights(&root.join(run)).unwrap();
        StateDict::read(&path, &ReadOptions::default()).unwrap()
    };
    let (a, b) = (weights("straight"), weights("resumed"));
    assert_eq!(a.len(), b.len());
    for (key, t) in &a.entries {
        assert!(t.equal(b.get(key).unwrap()), "{key} differs after resume");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
