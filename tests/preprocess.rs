//! Image preprocessing against the Python libraries (python_ref/preprocess.py): the pixels after
//! resize and crop must be the libraries' own, grey level for grey level, and the normalised
//! tensors equal to float rounding, for timm's transform, torchvision's preset and transformers'
//! image processors (both backends), on RGB, grayscale, RGBA, palette and grey+alpha PNGs.

mod common;

use std::path::{Path, PathBuf};

use residual::checkpoint::{ReadOptions, StateDict};
use residual::parity::max_abs_diff;
use residual::preprocess::{for_model_folder, pil, Interpolation, Pipeline, Preprocess, RgbImage};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    versions: serde_json::Value,
    cases: Vec<Case>,
    pil_resize: Vec<PilResize>,
}

/// `PIL.Image.resize` alone.
#[derive(Deserialize)]
struct PilResize {
    image: String,
    height: usize,
    width: usize,
    interpolation: Interpolation,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    library: String,
    backend: String,
    image: String,
    config: String,
    shape: Vec<i64>,
    pixels_stride: i64,
    output: bool,
}

fn references() -> PathBuf {
    common::reference_dir("preprocess", "cases.json")
}

fn read_cases(dir: &Path) -> Cases {
    serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap()
}

/// The case's preprocessing as a user gets it: `--preprocess FILE` recognises the file, and the
/// transformers PIL backend is chosen by pipeline.
fn preprocess_of(dir: &Path, case: &Case) -> Preprocess {
    let mut p = Preprocess::from_file(&dir.join(&case.config))
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
    let expected = match (case.library.as_str(), case.backend.as_str()) {
        ("timm", "pil") => Pipeline::Timm,
        ("torchvision", "tensor") => Pipeline::Torchvision,
        ("transformers", "torchvision") => Pipeline::Transformers,
        ("transformers", "pil") => {
            p.pipeline = Pipeline::TransformersPil;
            Pipeline::TransformersPil
        }
        other => panic!("{}: unknown library/backend {other:?}", case.name),
    };
    assert_eq!(p.pipeline, expected, "{}", case.name);
    p
}

#[test]
fn preprocessing_matches_timm_torchvision_and_transformers() {
    let dir = references();
    let cases = read_cases(&dir);
    let refs =
        StateDict::read(&dir.join("references.safetensors"), &ReadOptions::default()).unwrap();
    println!("references from {}", cases.versions);
    println!(
        "{:<34} {:<13} {:>13} {:>10} {:>12}",
        "case", "library", "shape", "|Δ| pixels", "|Δ| output"
    );
    let mut worst_output = 0f64;
    let mut outputs = 0;
    for case in &cases.cases {
        let p = preprocess_of(&dir, case);
        let image = RgbImage::load(&dir.join(&case.image)).unwrap();
        let pixels = p
            .pixels(&image)
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let ours = pixels.to_chw();
        assert_eq!(ours.size(), case.shape, "{}", case.name);
        let stride = case.pixels_stride;
        let ours_sampled = ours
            .slice(1, 0, None, stride)
            .slice(2, 0, None, stride)
            .to_kind(tch::Kind::Int);
        let theirs = refs.get(&format!("{}.pixels", case.name)).unwrap();
        let pixel_diff = max_abs_diff(&ours_sampled, &theirs.to_kind(tch::Kind::Int)).unwrap();
        let output_diff = if case.output {
            let input = p.to_input(&pixels);
            let theirs = refs.get(&format!("{}.output", case.name)).unwrap();
            let d = max_abs_diff(&input, theirs).unwrap();
            worst_output = worst_output.max(d);
            outputs += 1;
            format!("{d:e}")
        } else {
            "-".into()
        };
        println!(
            "{:<34} {:<13} {:>13} {:>10} {:>12}",
            case.name,
            format!("{}/{}", case.library, case.backend),
            format!("{:?}", case.shape),
            pixel_diff,
            output_diff
        );
        assert_eq!(pixel_diff, 0.0, "{}: pixels differ", case.name);
    }
    println!(
        "{} cases, pixels identical; {outputs} outputs, max |Δ| {worst_output:e}",
        cases.cases.len()
    );
    assert!(outputs >= 30, "only {outputs} outputs compared");
    assert!(
        worst_output <= 1e-6,
        "normalised outputs differ by {worst_output}"
    );
}

#[test]
fn pillow_resize_is_reproduced_exactly() {
    let dir = references();
    let cases = read_cases(&dir);
    let refs =
        StateDict::read(&dir.join("references.safetensors"), &ReadOptions::default()).unwrap();
    assert!(cases.pil_resize.len() >= 60);
    for (i, r) in cases.pil_resize.iter().enumerate() {
        let image = RgbImage::load(&dir.join(&r.image)).unwrap();
        let filter = match r.interpolation {
            Interpolation::Nearest => pil::Filter::Nearest,
            Interpolation::Bilinear => pil::Filter::Bilinear,
            Interpolation::Bicubic => pil::Filter::Bicubic,
            Interpolation::Box => pil::Filter::Box,
            Interpolation::Hamming => pil::Filter::Hamming,
            Interpolation::Lanczos => pil::Filter::Lanczos,
        };
        let ours = pil::resize(&image, r.height, r.width, filter).to_chw();
        let theirs = refs.get(&format!("pil_resize.{i}")).unwrap();
        let diff = max_abs_diff(
            &ours.to_kind(tch::Kind::Int),
            &theirs.to_kind(tch::Kind::Int),
        )
        .unwrap();
        assert_eq!(
            diff, 0.0,
            "{} {}x{} -> {}x{} {:?}",
            r.image, image.height, image.width, r.height, r.width, r.interpolation
        );
    }
    println!("{} Pillow resizes identical", cases.pil_resize.len());
}

#[test]
fn apply_is_pixels_then_input() {
    let dir = references();
    let cases = read_cases(&dir);
    let case = cases
        .cases
        .iter()
        .find(|c| c.name == "timm_bilinear_rgba_90x90")
        .unwrap();
    let p = preprocess_of(&dir, case);
    let path = dir.join(&case.image);
    let applied = p.apply(&path).unwrap();
    let stepwise = p.to_input(&p.pixels(&RgbImage::load(&path).unwrap()).unwrap());
    assert_eq!(max_abs_diff(&applied, &stepwise).unwrap(), 0.0);
    assert_eq!(applied.size(), [3, 40, 40]);
}

#[test]
fn model_folders_state_their_preprocessing() {
    let dir = references();
    // A timm folder: config.json with pretrained_cfg (resnet50d's: 224, bicubic, crop_pct 0.875).
    let timm = for_model_folder(&dir.join("timm_resnet50d_default"))
        .unwrap()
        .expect("timm config.json");
    assert_eq!(timm.pipeline, Pipeline::Timm);
    assert_eq!(timm.input_size, [3, 224, 224]);
    assert_eq!(timm.resized_size(150, 200).unwrap(), (256, 341));
    // A Hugging Face folder: preprocessor_config.json.
    let hf = for_model_folder(&dir.join("hf_legacy_resnet50"))
        .unwrap()
        .expect("preprocessor_config.json");
    assert_eq!(hf.pipeline, Pipeline::Transformers);
    assert_eq!(hf.input_size, [3, 224, 224]);
    // Neither file: no statement.
    assert!(for_model_folder(&dir.join("images")).unwrap().is_none());
}
