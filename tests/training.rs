//! Data readers, batching, and training: learning, metrics, checkpoints PyTorch reads, bit-exact
//! resume, Ctrl-C, NaN, the experiment report, and the CUDA path when there is a GPU.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use residual::data::{self, Augment, Batches, DataFormat, Dataset, Normalizer};
use residual::train::{RunData, Schedule, TrainOptions, Trainer};
use residual::ModelConfig;
use tch::{Device, Kind, Tensor};

/// A learnable toy problem: noise plus a bright 6x6 patch whose position gives the class.
fn toy_images(n: usize, side: usize, channels: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut pixels = vec![0u8; n * channels * side * side];
    let mut labels = vec![0u8; n];
    for i in 0..n {
        let label = (next() % 10) as usize;
        labels[i] = label as u8;
        let (py, px) = (2 + (label / 5) * 12, 2 + (label % 5) * 5);
        for c in 0..channels {
            for y in 0..side {
                for x in 0..side {
                    let inside = y >= py && y < py + 6 && x >= px && x < px + 4;
                    let v = if inside {
                        200 + next() % 56
                    } else {
                        next() % 80
                    };
                    pixels[((i * channels + c) * side + y) * side + x] = v as u8;
                }
            }
        }
    }
    (pixels, labels)
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes an IDX data folder (train gzipped, test plain) and returns it.
fn write_idx(dir: &Path, train: usize, test: usize) -> PathBuf {
    for (prefix, n, gz, seed) in [("train", train, true, 1), ("t10k", test, false, 2)] {
        let (pixels, labels) = toy_images(n, 28, 1, seed);
        let images = idx_bytes(&[n as u32, 28, 28], &pixels);
        let labels = idx_bytes(&[n as u32], &labels);
        let (images, labels, ext) = if gz {
            (gzip(&images), gzip(&labels), ".gz")
        } else {
            (images, labels, "")
        };
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), images).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), labels).unwrap();
    }
    dir.to_path_buf()
}

fn write_cifar10(dir: &Path, per_batch: usize) {
    let record = |pixels: &[u8], labels: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        for (i, l) in labels.iter().enumerate() {
            out.push(*l);
            out.extend_from_slice(&pixels[i * 3072..(i + 1) * 3072]);
        }
        out
    };
    for (name, seed) in [
        ("data_batch_1.bin", 1),
        ("data_batch_2.bin", 2),
        ("data_batch_3.bin", 3),
        ("data_batch_4.bin", 4),
        ("data_batch_5.bin", 5),
        ("test_batch.bin", 6),
    ] {
        let (pixels, labels) = toy_images(per_batch, 32, 3, seed);
        std::fs::write(dir.join(name), record(&pixels, &labels)).unwrap();
    }
}

#[test]
fn idx_reader_reads_gzipped_and_plain_files_and_rejects_bad_ones() {
    let dir = common::temp_dir("idx");
    write_idx(&dir, 50, 20);
    assert_eq!(DataFormat::detect(&dir).unwrap(), DataFormat::Idx);
    let (train, test) = data::load(&dir, None).unwrap();
    assert_eq!(train.images.size(), vec![50, 1, 28, 28]);
    assert_eq!(test.labels.size(), vec![20]);
    let (pixels, labels) = toy_images(50, 28, 1, 1);
    assert_eq!(
        Vec::<u8>::try_from(train.images.reshape([-1])).unwrap(),
        pixels
    );
    assert_eq!(
        Vec::<i64>::try_from(&train.labels).unwrap(),
        labels.iter().map(|l| *l as i64).collect::<Vec<_>>()
    );

    let bad = |bytes: Vec<u8>| {
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), bytes).unwrap();
        format!("{:#}", data::load(&dir, Some(DataFormat::Idx)).unwrap_err())
    };
    assert!(bad(vec![1, 2, 3, 4, 5]).contains("bad magic number"));
    assert!(bad(idx_bytes(&[20, 28, 28], &[0; 100])).contains("header says [20, 28, 28]"));
    assert!(bad(vec![0, 0, 0x0d, 3]).contains("element type 0x0d"));
    assert!(bad(idx_bytes(&[19, 28, 28], &[0; 19 * 784])).contains("19 images but 20 labels"));
    assert!(
        format!("{:#}", data::load(&dir.join("nope"), None).unwrap_err())
            .contains("does not exist")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cifar_reader_reads_the_binary_batches() {
    let dir = common::temp_dir("cifar");
    write_cifar10(&dir, 8);
    assert_eq!(DataFormat::detect(&dir).unwrap(), DataFormat::Cifar10);
    let (train, test) = data::load(&dir, None).unwrap();
    assert_eq!(train.images.size(), vec![40, 3, 32, 32]);
    assert_eq!(test.images.size(), vec![8, 3, 32, 32]);
    let (pixels, labels) = toy_images(8, 32, 3, 6);
    assert_eq!(
        Vec::<u8>::try_from(test.images.reshape([-1])).unwrap(),
        pixels
    );
    assert_eq!(test.labels.int64_value(&[3]), labels[3] as i64);
    std::fs::write(dir.join("test_batch.bin"), vec![0u8; 3000]).unwrap();
    let msg = format!("{:#}", data::load(&dir, None).unwrap_err());
    assert!(
        msg.contains("not a whole number of 3073-byte CIFAR records"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn toy_dataset(n: usize) -> Dataset {
    let (pixels, labels) = toy_images(n, 28, 1, 9);
    let labels: Vec<i64> = labels.iter().map(|l| *l as i64).collect();
    Dataset::new(
        Tensor::from_slice(&pixels).view([n as i64, 1, 28, 28]),
        Tensor::from_slice(&labels),
        10,
    )
    .unwrap()
}

#[test]
fn batches_are_seeded_augmented_and_normalised() {
    let data = toy_dataset(100);
    let norm = Normalizer::fit(&data, Device::Cpu);
    let plain = Batches::new(&data, &norm, 32, None, None)
        .next_batch()
        .unwrap()
        .unwrap()
        .0;
    let expected = norm.apply(&data.images.narrow(0, 0, 32));
    assert!(plain.equal(&expected));
    let mean = plain.mean(Kind::Float).double_value(&[]);
    assert!(mean.abs() < 0.3, "normalised mean {mean}");

    let draw = |seed, epoch, aug| {
        let mut b = Batches::new(&data, &norm, 32, Some((seed, epoch)), aug);
        assert_eq!(b.len(), 4);
        b.next_batch().unwrap().unwrap()
    };
    let aug = Some(Augment { pad: 4, flip: true });
    let (a, la) = draw(7, 0, aug);
    let (b, lb) = draw(7, 0, aug);
    assert!(
        a.equal(&b) && la.equal(&lb),
        "same seed and epoch, same batch"
    );
    let (_, lc) = draw(7, 1, aug);
    assert!(!la.equal(&lc), "another epoch, another order");
    assert_eq!(a.size(), vec![32, 1, 28, 28]);

    // Flip only: every image is its source or its mirror image.
    let (flipped, labels) = draw(3, 0, Some(Augment { pad: 0, flip: true }));
    let (unaugmented, labels2) = draw(3, 0, None);
    assert!(labels.equal(&labels2));
    let same = flipped
        .eq_tensor(&unaugmented)
        .all_dim(1, false)
        .all_dim(1, false)
        .all_dim(1, false);
    let mirrored = flipped
        .eq_tensor(&unaugmented.flip([3]))
        .all_dim(1, false)
        .all_dim(1, false)
        .all_dim(1, false);
    assert!(same.logical_or(&mirrored).all().int64_value(&[]) == 1);
    let flips = mirrored
        .logical_and(&same.logical_not())
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!((4..=28).contains(&flips), "about half flipped: {flips}");

    // Crop only: each image is a 28x28 window of its source zero-padded by 4 (zero: the
    // normalised value of a black pixel).
    let (cropped, _) = draw(
        5,
        0,
        Some(Augment {
            pad: 4,
            flip: false,
        }),
    );
    let (unaugmented, _) = draw(5, 0, None);
    let zero = norm
        .apply(&Tensor::zeros([1, 1, 1, 1], (Kind::Uint8, Device::Cpu)))
        .double_value(&[0, 0, 0, 0]);
    let mut shifted = 0;
    for i in 0..16 {
        let img = cropped.get(i);
        let padded = (unaugmented.get(i) - zero).constant_pad_nd([4, 4, 4, 4]) + zero;
        let window = (0..9)
            .flat_map(|y| (0..9).map(move |x| (y, x)))
            .find(|(y, x)| {
                let window = padded.narrow(1, *y, 28).narrow(2, *x, 28);
                (window - &img).abs().max().double_value(&[]) < 1e-5
            });
        let (y, x) =
            window.unwrap_or_else(|| panic!("image {i} is not a crop of its padded source"));
        shifted += ((y, x) != (4, 4)) as i32;
    }
    assert!(shifted >= 10, "crops should mostly move: {shifted} of 16");
}

#[test]
fn schedules() {
    let o = TrainOptions {
        epochs: 100,
        lr: 0.1,
        ..Default::default()
    };
    assert_eq!(o.lr_at(0.0), 0.1);
    assert!((o.lr_at(50.0) - 0.01).abs() < 1e-12);
    assert!((o.lr_at(80.0) - 0.001).abs() < 1e-12);
    let o = TrainOptions {
        epochs: 100,
        schedule: Schedule::Cosine,
        warmup: 5.0,
        ..Default::default()
    };
    assert!((o.lr_at(2.5) - 0.05).abs() < 1e-12);
    assert!((o.lr_at(50.0) - 0.05).abs() < 1e-12);
    assert!(o.lr_at(100.0).abs() < 1e-12);
    let o = TrainOptions {
        epochs: 10,
        milestones: vec![3],
        ..Default::default()
    };
    assert!((o.lr_at(3.0) - 0.01).abs() < 1e-12 && o.lr_at(2.99) == 0.1);
    for bad in [
        TrainOptions {
            lr: -1.0,
            ..Default::default()
        },
        TrainOptions {
            momentum: 1.0,
            ..Default::default()
        },
        TrainOptions {
            epochs: 0,
            ..Default::default()
        },
    ] {
        assert!(bad.validate().is_err());
    }
}

fn cifar20() -> ModelConfig {
    ModelConfig::from_json(r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1}"#).unwrap()
}

fn small_options(epochs: u64) -> TrainOptions {
    TrainOptions {
        epochs,
        batch_size: 32,
        lr: 0.05,
        subset: Some(192),
        seed: 11,
        ..Default::default()
    }
}

fn run_data(dir: &Path, options: &TrainOptions) -> RunData {
    let (train, test) = data::load(dir, None).unwrap();
    RunData::prepare(train, test, options, Device::Cpu).unwrap()
}

#[test]
fn training_steps_reduce_the_loss() {
    let dir = common::temp_dir("learn");
    write_idx(&dir, 256, 64);
    // The class is the patch position, so no crops or flips here.
    let options = TrainOptions {
        epochs: 4,
        lr: 0.1,
        subset: Some(512),
        schedule: Schedule::Cosine,
        augment: None,
        ..small_options(4)
    };
    let data = run_data(&dir, &options);
    let mut trainer = Trainer::create(&dir.join("run"), cifar20(), options, Device::Cpu).unwrap();
    trainer.quiet = true;
    let (before, _) = trainer.evaluate(&data.train, &data.normalizer).unwrap();
    trainer.run(&data).unwrap();
    let (after, error) = trainer.evaluate(&data.train, &data.normalizer).unwrap();
    assert!(after < before * 0.8, "loss {before} -> {after}");
    assert!(error < 0.7, "training error {error}");
    let metrics = trainer.run.read_metrics().unwrap();
    assert_eq!(metrics.len(), 4);
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m.epoch, i as u64 + 1);
        assert!(
            m.train_loss.is_finite()
                && m.test_error.is_some()
                && m.images_per_second > 0.0
                && m.seconds > 0.0
        );
    }
    assert!(metrics[3].train_loss < metrics[0].train_loss);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A quiet depth-8 CIFAR net trained on `data` into `run` on the CPU.
fn train(run: &Path, options: TrainOptions, data: &RunData) -> Trainer {
    let mut trainer = Trainer::create(run, cifar20(), options, Device::Cpu).unwrap();
    trainer.quiet = true;
    trainer.run(data).unwrap();
    trainer
}

fn final_weights(run: &Path) -> residual::checkpoint::StateDict {
    let path = residual::train::latest_weights(run).unwrap();
    residual::checkpoint::StateDict::read(&path, &Default::default()).unwrap()
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (a, b) = (final_weights(a), final_weights(b));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a.entries {
        assert!(b.get(k).is_some_and(|t| t.equal(v)), "{k} differs");
    }
}

#[test]
fn resumed_runs_end_bit_identical_and_checkpoints_load_in_pytorch() {
    let dir = common::temp_dir("resume");
    write_idx(&dir, 256, 32);
    let options = small_options(3);
    let data = run_data(&dir, &options);
    let mut straight = Trainer::create(
        &dir.join("straight"),
        cifar20(),
        options.clone(),
        Device::Cpu,
    )
    .unwrap();
    straight.quiet = true;
    straight.run(&data).unwrap();

    let mut first = Trainer::create(
        &dir.join("resumed"),
        cifar20(),
        TrainOptions {
            epochs: 1,
            ..options.clone()
        },
        Device::Cpu,
    )
    .unwrap();
    first.quiet = true;
    first.run(&data).unwrap();
    let mut rest = Trainer::resume(&dir.join("resumed"), Device::Cpu, Some(3)).unwrap();
    rest.quiet = true;
    assert_eq!(rest.state.epoch, 1);
    rest.run(&data).unwrap();
    assert_same_weights(&dir.join("straight"), &dir.join("resumed"));

    // The checkpoint is a state_dict PyTorch loads with weights_only=True.
    let python =
        std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
    let weights = residual::train::latest_weights(&dir.join("straight")).unwrap();
    let out = Command::new(python)
        .args(["-c", "import sys, torch; sd = torch.load(sys.argv[1], weights_only=True); print(len(sd), int(sd['bn1.num_batches_tracked']))"])
        .arg(&weights)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = final_weights(&dir.join("straight")).len();
    assert_eq!(stdout.trim(), format!("{n} 18"), "3 epochs of 6 batches");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn residual_bin(args: &[&str]) -> Command {
    let mut c = Command::new(common::residual_bin());
    c.args(args);
    c
}

#[test]
fn ctrl_c_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one() {
    let dir = common::temp_dir("sigint");
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    write_idx(&data_dir, 1024, 32);
    let config = dir.join("model.json");
    std::fs::write(
        &config,
        r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1}"#,
    )
    .unwrap();
    // Explicit milestones make the schedule independent of --epochs, so a run started for 1000
    // epochs (which cannot finish before the signal) follows the 3-epoch run step for step.
    let common = |out: &Path, epochs: &str| -> Vec<String> {
        [
            "train",
            "--config",
            config.to_str().unwrap(),
            "--data",
            data_dir.to_str().unwrap(),
            "--epochs",
            epochs,
            "--milestones",
            "1,2",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = dir.join("straight");
    let status = residual_bin(
        &common(&straight, "3")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let interrupted = dir.join("interrupted");
    let child = residual_bin(
        &common(&interrupted, "1000")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Wait for the first epoch to finish, then interrupt somewhere in the second.
    let metrics = interrupted.join("metrics.jsonl");
    let start = std::time::Instant::now();
    // Generous: on a loaded machine the first epoch can take minutes.
    while !metrics.exists() && start.elapsed().as_secs() < 900 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(metrics.exists(), "the first epoch did not finish in 900 s");
    std::thread::sleep(std::time::Duration::from_millis(300));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: checkpoint written"),
        "{stderr}"
    );
    let state: residual::train::RunState = serde_json::from_str(
        &std::fs::read_to_string(
            residual::train::RunDir::new(&interrupted)
                .latest()
                .unwrap()
                .unwrap()
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        state.epoch >= 1 && state.epoch < 3,
        "interrupted after epoch 1 and before the end of epoch 3: {state:?}"
    );
    let resumed = residual_bin(&[
        "train",
        "--resume",
        interrupted.to_str().unwrap(),
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--quiet",
        "--data",
        data_dir.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_same_weights(&straight, &interrupted);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = common::temp_dir("nan");
    write_idx(&dir, 128, 16);
    let options = TrainOptions {
        epochs: 1,
        ..small_options(1)
    };
    let data = run_data(&dir, &options);
    let run = dir.join("run");
    train(&run, options, &data);
    let good = residual::train::latest_weights(&run).unwrap();
    let before = std::fs::read(&good).unwrap();
    // Continue with an absurd learning rate.
    let run_json = run.join("run.json");
    let mut options: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&run_json).unwrap()).unwrap();
    options["lr"] = serde_json::json!(1e30);
    options["schedule"] = serde_json::json!("cosine");
    std::fs::write(&run_json, options.to_string()).unwrap();
    let mut trainer = Trainer::resume(&run, Device::Cpu, Some(3)).unwrap();
    trainer.quiet = true;
    let msg = format!("{:#}", trainer.run(&data).unwrap_err());
    assert!(
        msg.contains("the loss became") && msg.contains("last good checkpoint is kept"),
        "{msg}"
    );
    assert_eq!(residual::train::latest_weights(&run).unwrap(), good);
    assert_eq!(std::fs::read(&good).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_prints_error_and_confusion_matrix() {
    let dir = common::temp_dir("eval");
    write_idx(&dir, 128, 40);
    let options = small_options(1);
    let data = run_data(&dir, &options);
    let trainer = train(&dir.join("run"), options, &data);
    let out = residual_bin(&[
        "eval",
        "--run",
        dir.join("run").to_str().unwrap(),
        "--data",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let matrix = report["confusion"].as_array().unwrap();
    assert_eq!(matrix.len(), 10);
    let total: i64 = matrix
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_i64().unwrap())
        .sum();
    assert_eq!(total, 40);
    let test_error = trainer.run.read_metrics().unwrap()[0].test_error.unwrap();
    assert!((report["test_error"].as_f64().unwrap() - test_error).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn degradation_experiment_writes_report_and_plots() {
    let dir = common::temp_dir("experiment");
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    write_idx(&data_dir, 160, 32);
    let out = dir.join("report");
    let result = residual_bin(&[
        "experiment",
        "degradation",
        "--depths",
        "8,14",
        "--seeds",
        "2",
        "--data",
        data_dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| plain | 14 | 2 |") && report.contains("| residual | 8 | 2 |"),
        "{report}"
    );
    // Every comparison is stated with its numbers, whichever way it went.
    for claim in [
        "degradation: plain-14 trains worse than plain-8: ",
        "with shortcuts depth helps: resnet-14 trains better than resnet-8: ",
        "shortcuts fix the deep net: resnet-14 trains better than plain-14: ",
    ] {
        assert!(report.contains(claim), "{claim} missing:\n{report}");
    }
    assert!(report.contains("of 2 seeds"), "{report}");
    assert!(
        report.contains("paper, CIFAR-10 test error") && report.contains("only the direction"),
        "{report}"
    );
    assert!(report.contains("| seed 0 | seed 1 |"), "{report}");
    assert!(report.contains("linear warmup over 1 epochs"), "{report}");
    for png in ["train_error.png", "test_error.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["curves"].as_array().unwrap().len(), 8);
    assert_eq!(results["networks"].as_array().unwrap().len(), 4);
    let comparisons = results["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 3);
    for c in comparisons {
        let (b, w) = (
            c["better_error"].as_f64().unwrap(),
            c["worse_error"].as_f64().unwrap(),
        );
        assert_eq!(c["holds_for_mean"], b < w, "{c}");
        assert_eq!(c["seeds"], 2);
    }
    // Finished runs are reused: a second call trains nothing and reports the same.
    let again = residual_bin(&[
        "experiment",
        "degradation",
        "--depths",
        "8,14",
        "--seeds",
        "2",
        "--data",
        data_dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("training 2 epochs"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_runs_on_cuda_when_present() {
    if !tch::Cuda::is_available() {
        let _ = writeln!(std::io::stderr(), "skipped: no CUDA device");
        return;
    }
    let dir = common::temp_dir("cuda");
    write_idx(&dir, 256, 64);
    let options = small_options(2);
    let (train, test) = data::load(&dir, None).unwrap();
    let data = RunData::prepare(train, test, &options, Device::Cuda(0)).unwrap();
    for amp in [
        None,
        Some(residual::backend::AutocastDtype::Bf16),
        Some(residual::backend::AutocastDtype::Fp16),
    ] {
        let run = dir.join(format!("run-{amp:?}"));
        let mut trainer = Trainer::create(
            &run,
            cifar20(),
            TrainOptions {
                amp,
                ..options.clone()
            },
            Device::Cuda(0),
        )
        .unwrap();
        trainer.quiet = true;
        trainer.run(&data).unwrap();
        let m = trainer.run.read_metrics().unwrap();
        assert!(
            m[1].train_loss < m[0].train_loss * 1.05 && m[1].train_loss.is_finite(),
            "{amp:?}: {m:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn channels_last_keeps_nhwc_weights_and_trains() {
    let dir = common::temp_dir("nhwc");
    write_idx(&dir, 128, 16);
    let options = TrainOptions {
        channels_last: true,
        ..small_options(1)
    };
    let data = run_data(&dir, &options);
    let trainer = train(&dir.join("run"), options, &data);
    // The batches reach the model in NHWC order too: [B, C, H, W] with channel stride 1.
    let (x, _) = Batches::new(&data.train, &data.normalizer, 8, None, None)
        .next_batch()
        .unwrap()
        .unwrap();
    assert_eq!(x.stride(), [784, 784, 28, 1], "batches come NCHW");
    let nhwc = trainer.input_layout(&x);
    assert_eq!(nhwc.stride(), [784, 1, 28, 1]);
    assert!(nhwc.equal(&x));
    let w = &trainer.vs.variables()["layer1.0.conv1.weight"];
    assert_eq!(
        w.stride()[1],
        1,
        "channels-last weights have unit channel stride: {:?}",
        w.stride()
    );
    assert!(trainer.run.read_metrics().unwrap()[0]
        .train_loss
        .is_finite());
    // The checkpoint is a plain (contiguous) state_dict all the same.
    let saved = final_weights(&dir.join("run"));
    assert!(saved
        .get("layer1.0.conv1.weight")
        .unwrap()
        .equal(&w.contiguous()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sgd_decays_what_it_should_and_validation_is_held_out() {
    use residual::train::Sgd;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = (&root / "layer").var("weight", &[2, 2], tch::nn::Init::Const(1.0));
    let b = (&root / "layer").var("bias", &[2], tch::nn::Init::Const(1.0));
    for decay_norm_and_bias in [true, false] {
        tch::no_grad(|| {
            let _ = w.shallow_clone().fill_(1.0);
            let _ = b.shallow_clone().fill_(1.0);
        });
        let mut sgd = Sgd::new(&vs, 0.0, 0.5, decay_norm_and_bias);
        sgd.zero_grad();
        (w.sum(Kind::Float) * 0.0 + b.sum(Kind::Float) * 0.0).backward();
        sgd.step(0.1);
        assert!(
            (w.double_value(&[0, 0]) - 0.95).abs() < 1e-6,
            "weights decay by lr * wd"
        );
        let expected_bias = if decay_norm_and_bias { 0.95 } else { 1.0 };
        assert!(
            (b.double_value(&[0]) - expected_bias).abs() < 1e-6,
            "bias with decay={decay_norm_and_bias}"
        );
    }
    // Momentum: the second step moves by lr * (1 + momentum) * g.
    let mut sgd = Sgd::new(&vs, 0.9, 0.0, true);
    tch::no_grad(|| {
        let _ = w.shallow_clone().fill_(0.0);
    });
    for _ in 0..2 {
        sgd.zero_grad();
        w.sum(Kind::Float).backward();
        sgd.step(0.1);
    }
    assert!((w.double_value(&[1, 1]) - -(0.1 + 0.1 * 1.9)).abs() < 1e-6);

    let dir = common::temp_dir("validation");
    write_idx(&dir, 200, 20);
    let options = TrainOptions {
        validation: Some(40),
        subset: None,
        test_subset: Some(7),
        label_smoothing: 0.1,
        ..small_options(1)
    };
    let data = run_data(&dir, &options);
    assert_eq!(
        (
            data.train.len(),
            data.validation.as_ref().unwrap().len(),
            data.test.len()
        ),
        (160, 40, 7)
    );
    let trainer = train(&dir.join("run"), options, &data);
    let m = &trainer.run.read_metrics().unwrap()[0];
    assert!(m.val_error.is_some() && m.val_loss.is_some());
    assert!(format!(
        "{:#}",
        Trainer::create(&dir.join("run"), cifar20(), small_options(1), Device::Cpu)
            .err()
            .unwrap()
    )
    .contains("already holds a run"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_training_loop_reads_from_the_device_only_every_few_batches() {
    let dir = common::temp_dir("reads");
    write_idx(&dir, 720, 16);
    let options = TrainOptions {
        batch_size: 16,
        subset: Some(720),
        ..small_options(1)
    };
    let data = run_data(&dir, &options);
    let trainer = train(&dir.join("run"), options, &data);
    let batches: u64 = 720 / 16;
    let windows = batches.div_ceil(residual::train::READ_EVERY as u64);
    assert_eq!(
        trainer.host_reads,
        2 * windows,
        "two scalar reads per window of {} batches",
        residual::train::READ_EVERY
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_fp16_loss_scale_halves_on_overflow_grows_back_and_is_saved() {
    use residual::train::LossScaler;
    let mut s = LossScaler::default();
    assert_eq!(s.scale, 65536.0, "torch.amp.GradScaler's init_scale");
    s.update(false);
    s.update(false);
    assert_eq!((s.scale, s.clean_steps), (16384.0, 0));
    for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
        s.update(true);
    }
    assert_eq!(s.scale, 16384.0, "not before 2000 clean steps");
    s.update(true);
    assert_eq!((s.scale, s.clean_steps), (32768.0, 0));
    for _ in 0..1500 {
        s.update(true);
    }
    s.update(false);
    assert_eq!(
        (s.scale, s.clean_steps),
        (16384.0, 0),
        "an overflow resets the count"
    );

    // The scaler travels with the checkpoint and comes back on resume.
    let dir = common::temp_dir("scaler");
    write_idx(&dir, 64, 16);
    let options = small_options(1);
    let mut trainer = Trainer::create(&dir.join("run"), cifar20(), options, Device::Cpu).unwrap();
    trainer.state.loss_scaler = LossScaler {
        scale: 1024.0,
        clean_steps: 17,
    };
    trainer.save_checkpoint().unwrap();
    let resumed = Trainer::resume(&dir.join("run"), Device::Cpu, None).unwrap();
    assert_eq!(resumed.state.loss_scaler, trainer.state.loss_scaler);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sgd_makes_its_step_scalars_once_on_cpu_and_cuda() {
    use residual::train::Sgd;
    let devices = if tch::Cuda::is_available() {
        vec![Device::Cpu, Device::Cuda(0)]
    } else {
        vec![Device::Cpu]
    };
    for device in devices {
        let vs = tch::nn::VarStore::new(device);
        let w = vs.root().var("weight", &[3, 2], tch::nn::Init::Const(1.0));
        let mut sgd = Sgd::new(&vs, 0.9, 0.01, true);
        let mut expected = 1.0f64;
        let mut buf = 0.0f64;
        for step in 0..30 {
            let lr = 0.1 * (1.0 + step as f64).recip();
            sgd.zero_grad();
            (w.sum(Kind::Float) * 2.0).backward();
            sgd.step(lr);
            let d = 2.0 + 0.01 * expected;
            buf = if step == 0 { d } else { 0.9 * buf + d };
            expected -= lr * buf;
        }
        let got = w.double_value(&[2, 1]);
        assert!(
            (got - expected).abs() < 1e-5 * expected.abs().max(1.0),
            "{device:?}: {got} vs {expected}"
        );
        assert_eq!(
            sgd.scalar_uploads(),
            1,
            "{device:?}: one upload for the whole run"
        );
    }
}
