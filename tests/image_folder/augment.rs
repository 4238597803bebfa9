//! The automatic augmentations and ColorJitter's hue against torchvision (python_ref/augment.py,
//! run by image_folder.py into the fixture's `augment/`, applies every op of `TrivialAugmentWide` and `RandAugment` at fixed magnitudes, and the
//! ColorJitter ops at fixed factors, to tiny PIL images); the random draws by their statistics;
//! mixup and cutmix by their statistics and an exact small batch.

use std::collections::HashMap;
use std::path::PathBuf;

use residual::checkpoint::{ReadOptions, StateDict};
use std::sync::Arc;

use residual::data::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, batch_rng, mix_batch,
    sample_rng, AugmentOp, AutoAugment, FolderStream, ImageFolder, Mix, MixDraw, Normalizer,
    SplitMix, TrainTransform,
};
use residual::preprocess::RgbImage;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
    tables: HashMap<String, HashMap<AugmentOp, Vec<f64>>>,
    hue: Vec<Factor>,
    brightness: Vec<Factor>,
    contrast: Vec<Factor>,
    saturation: Vec<Factor>,
}

#[derive(Deserialize)]
struct Case {
    image: String,
    op: AugmentOp,
    magnitude: f64,
    key: String,
}

#[derive(Deserialize)]
struct Factor {
    factor: f64,
    key: String,
}

/// torchvision's images by key (expected.safetensors).
type Images = HashMap<String, RgbImage>;

fn fixture() -> &'static (PathBuf, Expected, Images) {
    static FIXTURE: std::sync::OnceLock<(PathBuf, Expected, Images)> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = super::fixture().0.join("augment");
        let expected: Expected =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let tensors =
            StateDict::read(&dir.join("expected.safetensors"), &ReadOptions::default()).unwrap();
        let images = tensors
            .entries
            .iter()
            .map(|(k, t)| {
                let s = t.size();
                let image = RgbImage {
                    height: s[0] as usize,
                    width: s[1] as usize,
                    data: Vec::<u8>::try_from(t.flatten(0, -1)).unwrap(),
                };
                (k.clone(), image)
            })
            .collect();
        (dir, expected, images)
    })
}

fn image(images: &Images, key: &str) -> RgbImage {
    images[key].clone()
}

/// The largest |difference| between our output and torchvision's (`key`).
fn max_diff(have: &RgbImage, images: &Images, key: &str) -> i64 {
    let want = &images[key];
    assert_eq!(
        (have.height, have.width),
        (want.height, want.width),
        "{key}"
    );
    have.data
        .iter()
        .zip(&want.data)
        .map(|(&a, &b)| (a as i64 - b as i64).abs())
        .max()
        .unwrap_or(0)
}

#[test]
fn every_op_at_a_fixed_magnitude_gives_torchvisions_pixels() {
    let (_, expected, tensors) = fixture();
    let mut worst: HashMap<AugmentOp, i64> = HashMap::new();
    for c in &expected.cases {
        let input = image(tensors, &format!("input.{}", c.image));
        // The magnitudes are float32 values (serde_json may parse a float64 one unit off).
        let m = c.magnitude as f32 as f64;
        let d = max_diff(&c.op.apply(&input, m), tensors, &c.key);
        let w = worst.entry(c.op).or_default();
        *w = (*w).max(d);
    }
    println!("max |diff| per op: {worst:?}");
    assert_eq!(worst.len(), AugmentOp::ALL.len());
    for (op, d) in &worst {
        assert_eq!(*d, 0, "{op:?} differs from torchvision by up to {d}");
    }
    assert!(expected.cases.len() > 200, "{}", expected.cases.len());
}

#[test]
fn magnitude_tables_are_torchvisions() {
    let (_, expected, tensors) = fixture();
    let rect = image(tensors, "input.rect");
    for (name, policy) in [
        ("ta", AutoAugment::trivial_augment_wide()),
        ("ra", AutoAugment::rand_augment()),
    ] {
        let want = &expected.tables[name];
        for op in AugmentOp::ALL {
            // float32 values: serde_json may parse a float64 one unit off.
            let f32s = |t: &Vec<f64>| t.iter().map(|&v| v as f32).collect::<Vec<_>>();
            let have = policy.magnitudes(op, rect.height, rect.width);
            assert_eq!(
                have.map(|t| f32s(&t)),
                want.get(&op).map(f32s),
                "{name} {op:?}"
            );
        }
    }
}

#[test]
fn colour_jitter_ops_at_fixed_factors_give_torchvisions_pixels() {
    let (_, expected, tensors) = fixture();
    let rect = image(tensors, "input.rect");
    let mut worst = Vec::new();
    for (name, cases) in [
        ("hue", &expected.hue),
        ("brightness", &expected.brightness),
        ("contrast", &expected.contrast),
        ("saturation", &expected.saturation),
    ] {
        let mut m = 0;
        for c in cases {
            let out = match name {
                "hue" => adjust_hue(&rect, c.factor),
                "brightness" => adjust_brightness(&rect, c.factor as f32),
                "contrast" => adjust_contrast(&rect, c.factor as f32),
                _ => adjust_saturation(&rect, c.factor as f32),
            };
            m = m.max(max_diff(&out, tensors, &c.key));
        }
        worst.push((name, m));
    }
    println!("max |diff|: {worst:?}");
    assert!(worst.iter().all(|(_, d)| *d == 0), "{worst:?}");
}

/// Share of `n` draws per op, per sign and per magnitude bin.
#[test]
fn trivial_augment_draws_ops_bins_and_signs_uniformly() {
    let policy = AutoAugment::trivial_augment_wide();
    let n = 28000;
    let mut ops: HashMap<AugmentOp, usize> = HashMap::new();
    let (mut negative, mut signed) = (0, 0);
    let mut bins = [0usize; 31];
    let rotate = policy.magnitudes(AugmentOp::Rotate, 8, 8).unwrap();
    let mut rotations = 0;
    for i in 0..n {
        let drawn = policy.draw(8, 8, &mut sample_rng(4, 1, i));
        assert_eq!(drawn.len(), 1);
        let (op, m) = drawn[0];
        *ops.entry(op).or_default() += 1;
        if op.signed() {
            signed += 1;
            negative += usize::from(m < 0.0 || (m == 0.0 && m.is_sign_negative()));
        }
        if op == AugmentOp::Rotate {
            rotations += 1;
            bins[rotate.iter().position(|&r| r == m.abs()).unwrap()] += 1;
        }
    }
    // 1/14 of 28000 is 2000, standard deviation 43.
    for op in AugmentOp::ALL {
        let k = ops[&op];
        assert!((k as f64 - 2000.0).abs() < 200.0, "{op:?}: {k} of {n}");
    }
    let share = negative as f64 / signed as f64;
    assert!((share - 0.5).abs() < 0.015, "negative share {share}");
    // About 65 a bin out of ~2000 rotations: every bin drawn, none more than twice its share.
    let per_bin = rotations as f64 / 31.0;
    assert!(
        bins.iter()
            .all(|&b| b as f64 > 0.4 * per_bin && (b as f64) < 1.6 * per_bin),
        "{bins:?}"
    );
}

#[test]
fn rand_augment_draws_its_ops_at_its_magnitude() {
    let policy = AutoAugment::rand_augment();
    let n = 14000;
    let mut ops: HashMap<AugmentOp, usize> = HashMap::new();
    for i in 0..n {
        let drawn = policy.draw(13, 17, &mut sample_rng(5, 0, i));
        assert_eq!(drawn.len(), 2);
        for (op, m) in drawn {
            *ops.entry(op).or_default() += 1;
            let want = policy.magnitudes(op, 13, 17).map_or(0.0, |t| t[9]);
            assert_eq!(m.abs(), want, "{op:?}");
        }
    }
    for op in AugmentOp::ALL {
        let k = ops[&op];
        assert!(
            (k as f64 - 2000.0).abs() < 200.0,
            "{op:?}: {k} of {}",
            2 * n
        );
    }
    // The same (seed, epoch, index) draws the same ops: resumed runs replay them.
    let a = policy.draw(13, 17, &mut sample_rng(5, 0, 7));
    assert_eq!(a, policy.draw(13, 17, &mut sample_rng(5, 0, 7)));
    let mut other = SplitMix::new(1, 2);
    let image = RgbImage {
        height: 5,
        width: 6,
        data: (0..90).map(|v| (v * 2) as u8).collect(),
    };
    let out = policy.apply(image, &mut other);
    assert_eq!((out.height, out.width, out.data.len()), (5, 6, 90));
}

#[test]
fn mixup_lambdas_follow_beta_alpha_alpha() {
    let mix = Mix::new(0.2, 0.0);
    let n = 20000;
    let lams: Vec<f64> = (0..n)
        .map(|b| {
            let d = mix.draw(8, 8, &mut batch_rng(3, 0, b));
            assert!(d.cutmix_box.is_none() && (0.0..=1.0).contains(&d.lam));
            d.lam
        })
        .collect();
    let mean = lams.iter().sum::<f64>() / n as f64;
    let var = lams.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n as f64;
    // Beta(0.2, 0.2): mean 1/2, variance 1 / (4 * 1.4) = 0.1786; standard errors 0.003, 0.001.
    assert!((mean - 0.5).abs() < 0.015, "mean {mean}");
    assert!((var - 0.1786).abs() < 0.006, "variance {var}");
    let extreme = lams
        .iter()
        .filter(|&&l| !(0.05..=0.95).contains(&l))
        .count() as f64;
    // P(lam < 0.05 or > 0.95) = 0.580 for Beta(0.2, 0.2) (numpy, 200000 draws).
    assert!((extreme / n as f64 - 0.580).abs() < 0.02, "{extreme}");
}

#[test]
fn cutmix_boxes_cover_one_minus_lambda_and_batches_switch_evenly() {
    let mix = Mix::new(0.2, 1.0);
    let (n, side) = (20000, 32);
    let (mut cut, mut lam_sum) = (0, 0.0);
    for b in 0..n {
        let d = mix.draw(side, side, &mut batch_rng(8, 2, b));
        let Some((top, bottom, left, right)) = d.cutmix_box else {
            continue;
        };
        cut += 1;
        lam_sum += d.lam;
        let area = ((bottom - top) * (right - left)) as f64 / (side * side) as f64;
        assert_eq!(area, 1.0 - d.lam, "box {:?}", d.cutmix_box);
        assert!(bottom <= side && right <= side);
    }
    let share = cut as f64 / n as f64;
    assert!((share - 0.5).abs() < 0.015, "cutmix share {share}");
    // lam ~ U(0, 1) before the box is truncated and clipped to the image, which shrinks it: the
    // corrected mean is 0.701 (timm's rand_bbox at 32x32 in numpy, 200000 draws; standard
    // error here 0.003).
    let mean = lam_sum / cut as f64;
    assert!((mean - 0.701).abs() < 0.012, "mean lam {mean}");
}

#[test]
fn a_small_batch_mixes_exactly() {
    // Three one-channel 2x2 images with labels 0, 1, 2 of 3 classes.
    let images: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let labels = [0, 1, 2];
    let mut mixed = images.clone();
    let draw = MixDraw {
        lam: 0.25,
        cutmix_box: None,
    };
    let targets = mix_batch(&mut mixed, &labels, 3, 2, 2, draw);
    // Image 0 is 0.25 * itself + 0.75 * image 2; image 1 is mixed with itself.
    assert_eq!(&mixed[..4], &[6.0, 7.0, 8.0, 9.0]);
    assert_eq!(&mixed[4..8], &images[4..8]);
    assert_eq!(&mixed[8..], &[2.0, 3.0, 4.0, 5.0]);
    assert_eq!(targets, [0.25, 0.0, 0.75, 0.0, 1.0, 0.0, 0.75, 0.0, 0.25]);
    let mut cut = images.clone();
    let draw = MixDraw {
        lam: 0.75,
        cutmix_box: Some((0, 1, 1, 2)),
    };
    let targets = mix_batch(&mut cut, &labels, 3, 2, 2, draw);
    // The top-right pixel comes from the mirrored image.
    assert_eq!(
        cut,
        [0.0, 9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0, 10.0, 11.0]
    );
    assert_eq!(targets, [0.75, 0.0, 0.25, 0.0, 1.0, 0.0, 0.25, 0.0, 0.75]);
}

#[test]
fn hue_jitter_turns_red_uniformly_around_the_colour_circle() {
    // A pure red image: the hue byte shifts by k = int(f * 255) for f uniform in [-0.5, 0.5]
    // (k = 0 twice as likely, +-127 half); red stays the strongest channel for k in -43..=42,
    // green for 43..=127 and blue for -127..=-44 (Pillow's HSV round trip): 87, 84.5 and 83.5
    // of 255.
    let red = RgbImage {
        height: 4,
        width: 4,
        data: [255u8, 0, 0].repeat(16),
    };
    let t = TrainTransform {
        scale: [1.0, 1.0],
        ratio: [1.0, 1.0],
        flip: false,
        hue: Some(0.5),
        ..TrainTransform::default()
    };
    let n = 6000;
    let mut strongest = [0usize; 3];
    for i in 0..n {
        let out = t.apply(&red, 4, &mut sample_rng(7, 0, i));
        let px = &out.data[..3];
        assert!(out.data.chunks_exact(3).all(|p| p == px), "uniform image");
        let c = (0..3).max_by_key(|&c| px[c]).unwrap();
        strongest[c] += 1;
    }
    for (c, k) in strongest.iter().enumerate() {
        let share = *k as f64 / n as f64;
        // Standard error 0.006.
        let want = [87.0, 84.5, 83.5][c] / 255.0;
        assert!(
            (share - want).abs() < 0.025,
            "channel {c}: {share}, want {want}"
        );
    }
}

#[test]
fn mixed_stream_batches_carry_soft_targets() {
    let (dir, _) = super::fixture();
    let folder = ImageFolder::scan(&dir.join("data")).unwrap();
    let stream = FolderStream {
        folder: Arc::new(folder),
        transform: TrainTransform {
            mix: Some(Mix::new(0.4, 1.0)),
            ..TrainTransform::default()
        },
        size: 8,
        workers: 2,
        prefetch: 2,
    };
    let norm = Normalizer::new(vec![0.5; 3], vec![0.25; 3], tch::Device::Cpu);
    let mut batches = stream.epoch(&norm, 4, 1, 0, tch::Device::Cpu);
    let mut seen = 0;
    while let Some((x, y)) = batches.next_host().unwrap() {
        let b = x.size()[0];
        assert_eq!(y.size(), [b, 3]);
        let sums = Vec::<f32>::try_from(y.sum_dim_intlist(1, false, tch::Kind::Float)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        seen += b as usize;
    }
    assert_eq!(seen, stream.folder.len() - 1, "one corrupt file");
}
