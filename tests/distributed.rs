//! Data-parallel training on c10d: collectives between two local processes, a dead peer named in
//! the error, and `residual train` under torchrun matching one process and PyTorch DDP.

mod common;

use std::process::{Command, Output};

/// A port no one listens on now (the store binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `residual ARGS` as ranks 0..world of one group on 127.0.0.1, the way torchrun sets them.
fn spawn_ranks(world: usize, args: &[&str], env: &[(&str, &str)]) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(common::residual_bin());
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RESIDUAL_DIST_TIMEOUT", "20");
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn gloo_or_skip() -> bool {
    if !residual::distributed::backends().gloo {
        println!("skipped: this build has no Gloo backend (install libgloo-dev and rebuild)");
        return false;
    }
    true
}

#[test]
fn two_processes_allreduce_broadcast_and_pass_a_barrier() {
    if !gloo_or_skip() {
        return;
    }
    let out = spawn_ranks(2, &["doctor", "--collectives"], &[]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    let report = text(&out[0].stdout);
    // Rank 0 holds 1 and rank 1 holds 2: both end with 3.
    assert!(
        report.contains("allreduce sum of rank+1: 3 on every rank"),
        "{report}"
    );
    // What libtorch's Gloo (compiled against Debian's older gloo headers) was verified to do.
    for line in [
        "allreduce of 16777216 floats (64 MB): exact",
        "allreduce sum, product, min, max (and average for floats) of 8 dtypes: exact",
        "broadcast from rank 1: arrived",
        "allgather: every rank's tensor in rank order",
    ] {
        assert!(report.contains(line), "{line} missing from {report}");
    }
    assert!(
        report.contains("200 allreduces in a row: exact"),
        "{report}"
    );
    assert!(report.contains("barrier: passed"), "{report}");
}

#[test]
fn a_dead_peer_is_an_error_that_names_its_rank() {
    if !gloo_or_skip() {
        return;
    }
    let start = std::time::Instant::now();
    // Rank 1 joins the group and exits before the first allreduce.
    let out = spawn_ranks(
        2,
        &["doctor", "--collectives"],
        &[("RESIDUAL_FAULT_EXIT", "1:1")],
    );
    assert_eq!(out[1].status.code(), Some(17));
    assert!(!out[0].status.success());
    let err = text(&out[0].stderr);
    assert!(
        err.contains("allreduce failed on rank 0 of 2") && err.contains("rank 1 has exited"),
        "{err}"
    );
    // The closed connection is noticed at once, long before the 20 s timeout.
    assert!(start.elapsed().as_secs() < 15, "took {:?}", start.elapsed());
}

#[test]
fn a_peer_dead_during_the_backward_is_an_error_that_names_its_rank() {
    if !gloo_or_skip() {
        return;
    }
    let dir = common::temp_dir("ddp-dead-backward");
    let data = dir.join("data");
    write_idx_data(&data, 32);
    // Group norms keep no buffers, so no broadcast comes before the gradient buckets: the first
    // collective after rank 1's exit is an allreduce launched from the backward's hooks.
    std::fs::write(
        dir.join("model.json"),
        r#"{"arch": "resnet", "block": "basic", "layers": [1, 1, 1, 1], "channels": [4, 8, 8, 8],
            "stem_width": 4, "in_channels": 1, "num_classes": 10,
            "norm": {"group_norm": {"num_groups": 2}}}"#,
    )
    .unwrap();
    let run = dir.join("run");
    case_trainer(&run, &dir, 1, 4).save_checkpoint().unwrap();
    let out = spawn_ranks(
        2,
        &train_args(run.to_str().unwrap(), data.to_str().unwrap()),
        &[("RESIDUAL_FAULT_EXIT", "1:2"), ("OMP_NUM_THREADS", "1")],
    );
    assert_eq!(out[1].status.code(), Some(17), "{}", text(&out[1].stderr));
    assert!(!out[0].status.success());
    let err = text(&out[0].stderr);
    assert!(
        err.contains("averaging gradients: allreduce failed on rank 0 of 2")
            && err.contains("rank 1 has exited"),
        "{err}"
    );
    let line = err.lines().find(|l| l.contains("averaging gradients"));
    println!("rank 0 after rank 1's exit: {}", line.unwrap_or_default());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nccl_collectives_and_a_training_run_on_cuda() {
    let gpus = tch::Cuda::device_count();
    if gpus == 0 {
        println!("skipped: no CUDA device");
        return;
    }
    assert!(
        residual::distributed::backends().nccl,
        "a CUDA host runs a build without NCCL"
    );
    // Every GPU of the host (at most 2) as one rank; world size 1 exercises the whole path.
    let world = gpus.min(2) as usize;
    let out = spawn_ranks(world, &["doctor", "--collectives", "--device", "cuda"], &[]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    let report = text(&out[0].stdout);
    assert!(
        report.contains(&format!("Nccl, world size {world}")),
        "{report}"
    );
    assert!(
        report.contains("200 allreduces in a row: exact"),
        "{report}"
    );

    let dir = common::temp_dir("ddp-nccl");
    let run = dir.join("run");
    run_from_reference(&run, 1);
    let data = ddp_reference().join("data");
    let mut args = train_args(run.to_str().unwrap(), data.to_str().unwrap());
    let cpu = args.iter().position(|a| *a == "cpu").unwrap();
    args[cpu] = "cuda";
    let out = spawn_ranks(world, &args, &[]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    std::fs::remove_dir_all(&dir).unwrap();

    // SyncBatchNorm over NCCL needs 2 ranks (one rank is a plain batch norm); cuDNN's
    // convolutions round differently with the batch size, hence the looser bound.
    if world == 2 {
        sync_bn_matches_one_process("cuda", 1e-4);
    } else {
        println!("--sync-bn on NCCL skipped: one GPU");
    }
}

/// `python -m torch.distributed.run` (torchrun) with `nproc` local processes running
/// `residual ARGS`, on a free port of 127.0.0.1.
fn torchrun(nproc: usize, extra: &[&str], args: &[&str], env: &[(&str, &str)]) -> Output {
    let python =
        std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
    let mut cmd = Command::new(python);
    cmd.args(["-m", "torch.distributed.run"])
        .arg(format!("--nproc_per_node={nproc}"))
        .args(["--master_addr=127.0.0.1"])
        .arg(format!("--master_port={}", free_port()))
        .args(extra)
        .arg("--no-python")
        .arg(common::residual_bin())
        .args(args)
        .env("RESIDUAL_DIST_TIMEOUT", "60");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ddp_reference() -> std::path::PathBuf {
    common::reference_dir("ddp", "final.safetensors")
}

/// A run folder at step 0 holding the reference's initial weights and training options.
fn run_from_reference(run: &std::path::Path, epochs: u64) {
    run_from_case(run, &ddp_reference(), epochs, 8);
}

/// As [`run_from_reference`], for the reference case in folder `reference`.
fn run_from_case(run: &std::path::Path, reference: &std::path::Path, epochs: u64, batch_size: i64) {
    let trainer = case_trainer(run, reference, epochs, batch_size);
    let init = residual::checkpoint::StateDict::read(
        &reference.join("init.safetensors"),
        &Default::default(),
    )
    .unwrap();
    let report = residual::checkpoint::load_state_dict(&trainer.vs, &init, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
    trainer.save_checkpoint().unwrap();
}

/// A new run in `run` for the model of `reference/model.json`, with `python_ref/ddp_ref.py`'s
/// training options.
fn case_trainer(
    run: &std::path::Path,
    reference: &std::path::Path,
    epochs: u64,
    batch_size: i64,
) -> residual::train::Trainer {
    use residual::train::{Schedule, TrainOptions, Trainer};
    let config = residual::ModelConfig::from_file(&reference.join("model.json")).unwrap();
    let options = TrainOptions {
        epochs,
        batch_size,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        schedule: Schedule::Step,
        milestones: vec![100],
        seed: 3,
        augment: None,
        ..Default::default()
    };
    Trainer::create(run, config, options, tch::Device::Cpu).unwrap()
}

/// `python_ref/ddp_ref.py`'s `seeded_init` (initial weights not stored with the reference): the
/// k-th entry with 2 or more dimensions in sorted key order uniform in ±sqrt(6 / fan_in) from
/// SplitMix64(seed, k), computed in f64 and rounded to f32 once; biases 0; batch norms as built.
fn seeded_init(vs: &tch::nn::VarStore, seed: u64) {
    let mut state = residual::checkpoint::StateDict::from_var_store(vs);
    let _no_grad = tch::no_grad_guard();
    let mut stream = 0;
    for (key, t) in state.entries.iter_mut() {
        if t.dim() >= 2 {
            let n = t.numel();
            let bound = (6.0 / (n / t.size()[0] as usize) as f64).sqrt();
            let mut rng = residual::data::SplitMix::new(seed, stream);
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let u = (rng.next_u64() >> 11) as f64 * 2f64.powi(-53);
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect();
            t.copy_(&tch::Tensor::from_slice(&values).view(t.size().as_slice()));
            stream += 1;
        } else if key.ends_with(".bias") {
            let _ = t.zero_();
        }
    }
}

fn final_weights(run: &std::path::Path) -> residual::checkpoint::StateDict {
    let path = residual::train::latest_weights(run).unwrap();
    residual::checkpoint::StateDict::read(&path, &Default::default()).unwrap()
}

/// The largest |a - b| over the entries of two state_dicts with the same keys.
fn max_abs_diff(a: &residual::checkpoint::StateDict, b: &residual::checkpoint::StateDict) -> f64 {
    assert_eq!(a.len(), b.len());
    a.entries
        .iter()
        .map(|(k, v)| {
            let w = b.get(k).unwrap_or_else(|| panic!("{k} missing"));
            (v.to_kind(tch::Kind::Double) - w.to_kind(tch::Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// `train --resume run` on 2 ranks of one intra-op thread each, as torchrun starts them (and as
/// the references ran), without its start-up time; every rank must succeed.
fn train_two_ranks(run: &std::path::Path, data: &std::path::Path) -> Vec<Output> {
    let args = train_args(run.to_str().unwrap(), data.to_str().unwrap());
    let out = spawn_ranks(2, &args, &[("OMP_NUM_THREADS", "1")]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    out
}

/// PyTorch DDP's final state in `reference/final.safetensors`.
fn final_reference(reference: &std::path::Path) -> residual::checkpoint::StateDict {
    residual::checkpoint::StateDict::read(&reference.join("final.safetensors"), &Default::default())
        .unwrap()
}

fn train_args<'a>(run: &'a str, data: &'a str) -> Vec<&'a str> {
    vec![
        "train", "--resume", run, "--data", data, "--device", "cpu", "--quiet",
    ]
}

#[test]
fn two_ranks_match_pytorch_ddp_on_cifar_resnet20() {
    if !gloo_or_skip() {
        return;
    }
    let reference = common::reference_dir("ddp/cifar_resnet20", "final.safetensors");
    let dir = common::temp_dir("ddp-parity");
    let run = dir.join("run");
    let trainer = case_trainer(&run, &reference, 2, 8);
    seeded_init(&trainer.vs, 3);
    trainer.save_checkpoint().unwrap();
    let init = residual::checkpoint::StateDict::from_var_store(&trainer.vs);
    drop(trainer);
    let data = ddp_reference().join("data");
    // The ranks as torchrun starts them (one intra-op thread each), without its 2-3 s of
    // start-up: the restart test below runs under torchrun itself.
    let out = train_two_ranks(&run, &data);
    // Its 1.1 MB of gradients fill 2 buckets (DDP's first one holds 1 MB), each allreduced from
    // the backward's hooks as soon as its gradients are in.
    let log = text(&out[0].stderr);
    assert_eq!(
        log.matches("8 of 8 gradient buckets started during the backward")
            .count(),
        2,
        "{log}"
    );
    // Rank 0 alone wrote the metrics: one line per epoch.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    let pytorch = final_reference(&reference);
    let rust = final_weights(&run);
    let diff = max_abs_diff(&rust, &pytorch);
    let buffers = rust
        .entries
        .iter()
        .filter(|(k, _)| k.ends_with("running_mean") || k.ends_with("running_var"))
        .map(|(k, v)| (v - pytorch.get(k).unwrap()).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    println!(
        "cifar_resnet20: max |Δ| between Rust DDP and PyTorch DDP after 8 steps: {diff:e} (BatchNorm running statistics {buffers:e})"
    );
    // One intra-op thread per rank on both sides (torchrun's OMP_NUM_THREADS=1): the same
    // kernels summing in the same order, so the same bits (0 here), up to a last-bit slip.
    assert!(diff <= 1e-6, "max |Δ| {diff}");
    let moved = max_abs_diff(&init, &pytorch);
    assert!(moved > 1e-3, "the weights barely moved: {moved}");

    // Each epoch's training loss is the mean over both ranks' (padded) shards, as PyTorch's.
    let losses: Vec<Vec<f64>> =
        serde_json::from_str(&std::fs::read_to_string(reference.join("losses.json")).unwrap())
            .unwrap();
    let sizes = [8.0, 8.0, 8.0, 2.0]; // 26 indices per rank and epoch, in batches of 8
    for (epoch, line) in metrics.lines().enumerate() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let sum: f64 = losses
            .iter()
            .flat_map(|rank| rank[epoch * 4..epoch * 4 + 4].iter().zip(sizes))
            .map(|(l, n)| l * n)
            .sum();
        let want = sum / 52.0;
        let got = m["train_loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "epoch {epoch}: {got} vs {want}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_ranks_match_pytorch_ddp_on_a_narrow_resnet18() {
    if !gloo_or_skip() {
        return;
    }
    let reference = ddp_reference().join("resnet18");
    let dir = common::temp_dir("ddp-resnet18");
    let run = dir.join("run");
    run_from_case(&run, &reference, 1, 9);
    let data = ddp_reference().join("data");
    // The ranks as torchrun would start them (one intra-op thread each, as torchrun sets and
    // the reference uses), without its start-up time.
    train_two_ranks(&run, &data);
    let pytorch = final_reference(&reference);
    let diff = max_abs_diff(&final_weights(&run), &pytorch);
    println!(
        "resnet18 (widths 4-32): max |Δ| between Rust DDP and PyTorch DDP after 3 steps: {diff:e}"
    );
    assert!(diff <= 1e-6, "max |Δ| {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_ends_as_an_uninterrupted_run() {
    if !gloo_or_skip() {
        return;
    }
    let reference = ddp_reference();
    let dir = common::temp_dir("ddp-elastic");
    let run = dir.join("run");
    run_from_reference(&run, 2);
    let data = reference.join("data");
    // Rank 1 exits after global step 6 of 8 (the middle of epoch 2) on the first attempt; torchrun
    // restarts both ranks, which resume from the checkpoint of step 4.
    let out = torchrun(
        2,
        &["--max-restarts=1"],
        &train_args(run.to_str().unwrap(), data.to_str().unwrap()),
        &[("RESIDUAL_FAULT_EXIT", "1:6")],
    );
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("RESIDUAL_FAULT_EXIT: exiting after step 6"),
        "{log}"
    );
    // The uninterrupted run is PyTorch DDP's (the depth-8 reference run).
    let pytorch = final_reference(&reference);
    let diff = max_abs_diff(&final_weights(&run), &pytorch);
    println!(
        "CIFAR ResNet-8 restarted under torchrun: max |Δ| from PyTorch DDP after 8 steps: {diff:e}"
    );
    assert!(diff <= 1e-6, "max |Δ| {diff}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes an IDX data set of `n_train` and 8 test images (1 x 12 x 12, labels 0..10) to `dir`.
fn write_idx_data(dir: &std::path::Path, n_train: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let idx = |dims: &[usize], body: Vec<u8>| {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&(*d as u32).to_be_bytes());
        }
        out.extend(body);
        out
    };
    for (prefix, n, salt) in [("train", n_train, 7usize), ("t10k", 8, 11)] {
        let labels: Vec<u8> = (0..n).map(|i| ((i * salt + 3) % 10) as u8).collect();
        let images: Vec<u8> = (0..n * 144)
            .map(|k| {
                let (i, p) = (k / 144, k % 144);
                let bright = p / 12 < 4 && (p % 12) / 2 == labels[i] as usize % 6;
                ((k * 37 + salt) % 90) as u8 + if bright { 150 } else { 0 }
            })
            .collect();
        let write = |kind: &str, bytes: Vec<u8>| {
            std::fs::write(dir.join(format!("{prefix}-{kind}-ubyte")), bytes).unwrap()
        };
        write("images-idx3", idx(&[n, 12, 12], images));
        write("labels-idx1", idx(&[n], labels));
    }
}

#[test]
fn two_ranks_with_sync_bn_train_as_one_process_on_the_whole_batch() {
    if !gloo_or_skip() {
        return;
    }
    // PyTorch 2.11's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"),
    // so the CPU check is the definition.
    sync_bn_matches_one_process("cpu", 1e-5);
}

/// 2 ranks with batches of 4 and synchronised batch norms compute what one process does with
/// the concatenated batches of 8 (same batch statistics, same averaged gradients, same running
/// statistics), up to float rounding (`tolerance`).
fn sync_bn_matches_one_process(device: &str, tolerance: f64) {
    let dir = common::temp_dir(&format!("ddp-syncbn-{device}"));
    let data = dir.join("data");
    write_idx_data(&data, 32);
    let (single, synced) = (dir.join("single"), dir.join("synced"));
    run_from_case(&single, &ddp_reference(), 1, 8);
    run_from_case(&synced, &ddp_reference(), 1, 4);
    let (single_dir, synced_dir, data_dir) = (
        single.to_str().unwrap(),
        synced.to_str().unwrap(),
        data.to_str().unwrap(),
    );
    let mut single_args = train_args(single_dir, data_dir);
    let mut args = train_args(synced_dir, data_dir);
    for a in [&mut single_args, &mut args] {
        let cpu = a.iter().position(|x| *x == "cpu").unwrap();
        a[cpu] = device;
    }
    args.push("--sync-bn");
    // The single process runs beside the two ranks; one thread each.
    let one = Command::new(common::residual_bin())
        .args(&single_args)
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = spawn_ranks(2, &args, &[("OMP_NUM_THREADS", "1")]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    let one = one.wait_with_output().unwrap();
    assert!(one.status.success(), "{}", text(&one.stderr));
    let (a, b) = (final_weights(&single), final_weights(&synced));
    let diff = max_abs_diff(&a, &b);
    let stats = a
        .entries
        .iter()
        .filter(|(k, _)| k.ends_with("running_mean") || k.ends_with("running_var"))
        .map(|(k, v)| (v - b.get(k).unwrap()).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    println!(
        "--sync-bn on {device}, 2 ranks x 4 vs 1 process x 8, 4 steps: max |Δ| {diff:e} (running stats {stats:e})"
    );
    assert!(diff <= tolerance, "max |Δ| {diff}");
    let loss = |run: &std::path::Path| {
        let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let m: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
        m["train_loss"].as_f64().unwrap()
    };
    let (l1, l2) = (loss(&single), loss(&synced));
    assert!((l1 - l2).abs() <= tolerance * l1, "train loss {l1} vs {l2}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes an image folder to `dir`: `train/` with `per_class[c]` PNGs (8 x 8 RGB, every image
/// different) in class folders `c0`, `c1`, ..., and `val/` with 2 per class.
fn write_png_folder(dir: &std::path::Path, per_class: &[usize]) {
    for (split, counts) in [
        ("train", per_class.to_vec()),
        ("val", vec![2; per_class.len()]),
    ] {
        for (c, &n) in counts.iter().enumerate() {
            let class = dir.join(split).join(format!("c{c}"));
            std::fs::create_dir_all(&class).unwrap();
            for i in 0..n {
                let salt = (c * 31 + i * 7 + split.len()) as u32;
                let image = image::RgbImage::from_fn(8, 8, |x, y| {
                    // A bright row per class, so that there is something to learn.
                    let bright = if y as usize == 2 * c { 120 } else { 0 };
                    image::Rgb([
                        ((x * 17 + y * 5 + salt * 13) % 120 + bright) as u8,
                        ((x * 3 + y * 11 + salt * 29) % 120 + bright) as u8,
                        ((x * 7 + y * 19 + salt * 5) % 120) as u8,
                    ])
                });
                image.save(class.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

/// The whole image (no crop, no flip, no resize of 8 x 8 images): the same pixels on every rank
/// and in every process count.
fn identity_transform() -> residual::data::TrainTransform {
    residual::data::TrainTransform {
        scale: [1.0, 1.0],
        ratio: [1.0, 1.0],
        flip: false,
        ..Default::default()
    }
}

/// A run folder at step 0 training a depth-8 CIFAR ResNet for 3 classes on an image folder of
/// 8 x 8 images streamed through [`identity_transform`], with `python_ref/ddp_ref.py`'s options;
/// its initial weights are `init`'s, or seeded (every such run starts from the same weights).
fn folder_run(run: &std::path::Path, batch_size: i64, epochs: u64, init: Option<&std::path::Path>) {
    use residual::train::{Schedule, TrainOptions, Trainer};
    let config = residual::ModelConfig::from_json(
        r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 3, "in_channels": 3}"#,
    )
    .unwrap();
    let options = TrainOptions {
        epochs,
        batch_size,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        schedule: Schedule::Step,
        milestones: vec![100],
        seed: 3,
        augment: None,
        image_folder: Some(residual::data::FolderOptions {
            workers: 1,
            train_transform: Some(identity_transform()),
            ..residual::data::FolderOptions::with_size(8)
        }),
        ..Default::default()
    };
    let trainer = Trainer::create(run, config, options, tch::Device::Cpu).unwrap();
    if let Some(init) = init {
        let init = residual::checkpoint::StateDict::read(init, &Default::default()).unwrap();
        let report = residual::checkpoint::load_state_dict(&trainer.vs, &init, true).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }
    trainer.save_checkpoint().unwrap();
}

#[test]
fn two_ranks_stream_disjoint_shards_of_an_image_folder_that_cover_it() {
    use residual::data::{FolderStream, ImageFolder, Normalizer};
    let dir = common::temp_dir("ddp-folder-shards");
    // 7 images: DistributedSampler pads the order to 8 by repeating its first index on rank 1.
    write_png_folder(&dir, &[4, 3]);
    let stream = FolderStream {
        folder: std::sync::Arc::new(ImageFolder::scan(&dir.join("train")).unwrap()),
        transform: identity_transform(),
        size: 8,
        workers: 2,
        prefetch: 1,
    };
    let norm = Normalizer::new(vec![0.5; 3], vec![0.25; 3], tch::Device::Cpu);
    let images = |batch_size: i64, shard: (usize, usize)| -> Vec<tch::Tensor> {
        let mut batches = stream.epoch_sharded(&norm, batch_size, 5, 1, tch::Device::Cpu, shard);
        let mut out = Vec::new();
        while let Some((x, _)) = batches.next_host().unwrap() {
            out.extend(x.split(1, 0));
        }
        out
    };
    let whole = images(1, (0, 1));
    let ranks = [images(3, (0, 2)), images(3, (1, 2))];
    assert_eq!(whole.len(), 7);
    for i in 0..7 {
        for j in 0..i {
            assert!(!whole[i].equal(&whole[j]), "images {i} and {j} are alike");
        }
    }
    // Rank r reads entries r, r + 2, ... of the padded epoch order.
    for (r, shard) in ranks.iter().enumerate() {
        assert_eq!(shard.len(), 4, "rank {r}");
        for (k, x) in shard.iter().enumerate() {
            assert!(x.equal(&whole[(r + 2 * k) % 7]), "rank {r}, image {k}");
        }
    }
    // Together they read every image once, plus the one padding repeat.
    let seen = |x: &tch::Tensor| ranks.iter().flatten().filter(|y| y.equal(x)).count();
    let counts: Vec<usize> = whole.iter().map(seen).collect();
    assert_eq!(counts, [2, 1, 1, 1, 1, 1, 1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_ranks_with_sync_bn_on_an_image_folder_train_as_one_process_on_the_whole_batch() {
    if !gloo_or_skip() {
        return;
    }
    let dir = common::temp_dir("ddp-folder");
    let data = dir.join("data");
    // 16 training images: 2 batches of 8 for one process, of 4 on each of 2 ranks.
    write_png_folder(&data, &[6, 5, 5]);
    let (single, ranks) = (dir.join("single"), dir.join("ranks"));
    folder_run(&single, 8, 2, None);
    folder_run(&ranks, 4, 2, None);
    let init = final_weights(&single);
    let data_dir = data.to_str().unwrap();
    let one = Command::new(common::residual_bin())
        .args(train_args(single.to_str().unwrap(), data_dir))
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut args = train_args(ranks.to_str().unwrap(), data_dir);
    args.push("--sync-bn");
    let out = spawn_ranks(2, &args, &[("OMP_NUM_THREADS", "1")]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    let one = one.wait_with_output().unwrap();
    assert!(one.status.success(), "{}", text(&one.stderr));
    let diff = max_abs_diff(&final_weights(&single), &final_weights(&ranks));
    println!("image folder, --sync-bn, 2 ranks x 4 vs 1 process x 8, 4 steps: max |Δ| {diff:e}");
    assert!(diff <= 1e-6, "max |Δ| {diff}");
    let moved = max_abs_diff(&init, &final_weights(&single));
    assert!(moved > 1e-3, "the weights barely moved: {moved}");
    // Rank 0 alone wrote the run folder's metrics.
    let metrics = std::fs::read_to_string(ranks.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_files_of_every_rank_are_counted_once_by_rank_0() {
    if !gloo_or_skip() {
        return;
    }
    let dir = common::temp_dir("ddp-folder-corrupt");
    let data = dir.join("data");
    write_png_folder(&data, &[2, 2, 2]);
    // Two corrupt files among 8: one batch of 4 per rank, never all unreadable (a rank that
    // passed over a whole batch would take one step fewer than its peer).
    for c in ["c0", "c1"] {
        std::fs::write(data.join("train").join(c).join("broken.png"), b"not a png").unwrap();
    }
    let run = dir.join("run");
    folder_run(&run, 4, 1, None);
    let out = train_two_ranks(&run, &data);
    let (first, second) = (text(&out[0].stderr), text(&out[1].stderr));
    // Each rank names the files it skipped (with seed 3 both are in rank 1's shard); rank 0
    // alone gives the epoch's total over ranks.
    assert_eq!(
        first.matches("broken.png").count() + second.matches("broken.png").count(),
        2,
        "{first}{second}"
    );
    assert!(
        first.contains("epoch 1: skipped 2 unreadable file(s)"),
        "{first}"
    );
    assert!(!second.contains("unreadable file(s)"), "{second}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_ranks_streaming_an_image_folder_match_pytorch_ddp_on_torchvisions_image_folder() {
    if !gloo_or_skip() {
        return;
    }
    let reference = common::reference_dir("ddp/image_folder", "final.safetensors");
    let dir = common::temp_dir("ddp-folder-parity");
    let run = dir.join("run");
    folder_run(&run, 4, 2, Some(&reference.join("init.safetensors")));
    let data = reference.join("data");
    train_two_ranks(&run, &data);
    let pytorch = final_reference(&reference);
    let diff = max_abs_diff(&final_weights(&run), &pytorch);
    println!(
        "image folder: max |Δ| between Rust DDP and PyTorch DDP (ImageFolder, DistributedSampler) after 4 steps: {diff:e}"
    );
    assert!(diff <= 1e-6, "max |Δ| {diff}");
    let init = residual::checkpoint::StateDict::read(
        &reference.join("init.safetensors"),
        &Default::default(),
    )
    .unwrap();
    let moved = max_abs_diff(&init, &pytorch);
    assert!(moved > 1e-3, "the weights barely moved: {moved}");
    // Rank 0 wrote the class names ImageFolder found.
    let classes = std::fs::read_to_string(run.join("classes.txt")).unwrap();
    assert_eq!(classes, "c0\nc1\nc2\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
