//! Image-folder datasets against torchvision (python_ref/image_folder.py writes a tiny folder and
//! what `ImageFolder` and its transforms make of it): class order, file order, decoded pixels,
//! the evaluation transform; corrupt files skipped and counted; training from a folder and
//! `infer` naming the classes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use residual::checkpoint::{ReadOptions, StateDict};
use residual::data::{decode_all, decode_rgb, FolderOptions, ImageFolder};
use residual::preprocess::{Preprocess, RgbImage};
use serde::Deserialize;
use tch::Tensor;

#[derive(Deserialize)]
#[allow(dead_code)] // `crops`: the pipeline tests
struct Expected {
    classes: Vec<String>,
    samples: Vec<(String, i64)>,
    corrupt: String,
    crops: Vec<Crop>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
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
