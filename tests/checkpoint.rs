//! Reading the files PyTorch writes, loading them strictly, writing files PyTorch reads, and
//! surviving hostile input.

mod bomb;
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use residual::checkpoint::{self, load_state_dict, Checkpoint, ReadOptions, StateDict};
use residual::models::Inputs;
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    common::reference_dir("checkpoints", "resnet50.pth")
}

fn read(path: &Path, options: &ReadOptions) -> anyhow::Result<StateDict> {
    StateDict::read(path, options)
}

fn resnet(arch: &str) -> (VarStore, Box<dyn residual::Model>) {
    let vs = VarStore::new(Device::Cpu);
    let model = ModelConfig::from_json(&format!(r#"{{"arch": "{arch}"}}"#))
        .unwrap()
        .build(vs.root())
        .unwrap();
    (vs, model)
}

/// Loads `file` (in the fixtures, or a path) strictly into resnet50 on `device`, lazily (storages
/// read straight into the variables) and returns max |logits - PyTorch's `reference`|.
fn logits_diff_on(file: &str, options: &ReadOptions, reference: &str, device: Device) -> f64 {
    let dir = fixtures();
    let state =
        Checkpoint::open(&dir.join(file), options).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    let vs = VarStore::new(device);
    let model = ModelConfig::from_json(r#"{"arch": "resnet50"}"#)
        .unwrap()
        .build(vs.root())
        .unwrap();
    let report = load_state_dict(&vs, &state, true).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    assert!(report.is_clean());
    let io = StateDict::read(
        &dir.join("resnet50_io.safetensors"),
        &ReadOptions::default(),
    )
    .unwrap();
    let mut inputs = Inputs::new();
    inputs.insert("input".into(), io.get("input").unwrap().to_device(device));
    let logits = tch::no_grad(|| model.forward_named(&inputs, false)).unwrap();
    let diff =
        residual::parity::max_abs_diff(&logits.to_device(Device::Cpu), io.get(reference).unwrap())
            .unwrap();
    println!("{file} on {device:?}: max |Δ logits| = {diff:e}");
    diff
}

fn logits_diff(file: &str, options: &ReadOptions, reference: &str) -> f64 {
    logits_diff_on(file, options, reference, Device::Cpu)
}

#[test]
fn torch_save_files_load_and_give_pytorchs_logits() {
    let plain = ReadOptions::default();
    for file in [
        "resnet50.pth",
        "resnet50_legacy.pth",
        "resnet50_wrapped_ddp.pth",
        "resnet50_compiled.pth",
        "resnet50_ema.pth",
        "resnet50.safetensors",
    ] {
        assert!(logits_diff(file, &plain, "logits") <= 1e-5, "{file}");
    }
    let lightning = ReadOptions {
        strip_prefixes: vec!["model.".into()],
        ..Default::default()
    };
    assert!(logits_diff("resnet50_lightning.ckpt", &lightning, "logits") <= 1e-5);
    // Half-precision weights are converted to the fp32 model, as load_state_dict does.
    assert!(logits_diff("resnet50_half.pth", &plain, "logits_from_half") <= 1e-5);
    // Deflated records (zip tools other than torch.save write them) inflate into the variables.
    let deflated = common::temp_dir("deflated-resnet50").join("resnet50_deflated.pth");
    let bytes = std::fs::read(fixtures().join("resnet50.pth")).unwrap();
    std::fs::write(&deflated, bomb::deflated_copy(&bytes, 0)).unwrap();
    assert!(logits_diff(deflated.to_str().unwrap(), &plain, "logits") <= 1e-5);
}

#[test]
fn lazy_loads_onto_cuda_straight_from_the_mapping() {
    let Some(device) = common::cuda_or_skip() else {
        return;
    };
    let plain = ReadOptions::default();
    for file in [
        "resnet50.pth",
        "resnet50_legacy.pth",
        "resnet50.safetensors",
    ] {
        assert!(
            logits_diff_on(file, &plain, "logits", device) <= 1e-3,
            "{file}"
        );
    }
    let half = logits_diff_on("resnet50_half.pth", &plain, "logits_from_half", device);
    assert!(half <= 1e-3, "{half}");
}

#[test]
fn nesting_and_prefix_errors_are_explained() {
    let dir = fixtures();
    // A Lightning checkpoint's `model.` (the LightningModule's attribute) goes without options.
    let (state, layout) = StateDict::read_described(
        &dir.join("resnet50_lightning.ckpt"),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(state.len(), 320);
    assert!(state.get("conv1.weight").is_some());
    assert_eq!(layout.lightning.as_deref(), Some("2.4.0"));
    assert_eq!(layout.stripped, ["model."]);
    assert_eq!(layout.key, ["state_dict"]);
    // Any other prefix stays: the strict load names the keys on both sides.
    let state = StateDict {
        entries: read(&dir.join("resnet50.pth"), &ReadOptions::default())
            .unwrap()
            .entries
            .into_iter()
            .map(|(k, t)| (format!("net.{k}"), t))
            .collect(),
    };
    let (vs, _) = resnet("resnet50");
    let msg = format!("{:#}", load_state_dict(&vs, &state, true).unwrap_err());
    assert!(
        msg.contains("unexpected keys (320)") && msg.contains("net.conv1.weight"),
        "{msg}"
    );
    assert!(msg.contains("missing keys (320)"), "{msg}");
    // An explicit key that is not there lists what is.
    let options = ReadOptions {
        key: Some("weights".into()),
        ..Default::default()
    };
    let msg = format!(
        "{:#}",
        read(&dir.join("resnet50_wrapped_ddp.pth"), &options).unwrap_err()
    );
    assert!(
        msg.contains("no entry `weights`") && msg.contains("state_dict: dict"),
        "{msg}"
    );
    let options = ReadOptions {
        key: Some("state_dict".into()),
        ..Default::default()
    };
    assert_eq!(
        read(&dir.join("resnet50_wrapped_ddp.pth"), &options)
            .unwrap()
            .len(),
        320
    );
}

#[test]
fn every_dtype_and_layout_reads_bit_exact() {
    let dir = fixtures();
    let expected = read(&dir.join("layouts.safetensors"), &ReadOptions::default()).unwrap();
    let original = std::fs::read(dir.join("layouts.pth")).unwrap();
    let deflated = bomb::deflated_copy(&original, 6);
    let deflated_path = common::temp_dir("deflated-layouts").join("layouts_deflated.pth");
    std::fs::write(&deflated_path, &deflated).unwrap();
    assert_eq!(
        checkpoint::parse_bytes(&deflated, &ReadOptions::default()).unwrap(),
        checkpoint::parse_bytes(&original, &ReadOptions::default()).unwrap()
    );
    let deflated_name = deflated_path.to_str().unwrap();
    for file in ["layouts.pth", "layouts_legacy.pth", deflated_name] {
        let got = read(&dir.join(file), &ReadOptions::default()).unwrap();
        // Views of one storage share it, as torch.load's do.
        let base = got.get("base").unwrap();
        let start = base.data_ptr() as usize;
        for view in ["transposed", "row", "column", "strided"] {
            let at = got.get(view).unwrap().data_ptr() as usize;
            assert!((start..start + 24 * 4).contains(&at), "{file}: {view}");
        }
        assert_eq!(got.len(), expected.len(), "{file}");
        for (key, want) in &expected.entries {
            let have = got
                .get(key)
                .unwrap_or_else(|| panic!("{file}: {key} missing"));
            assert_eq!(
                (have.kind(), have.size()),
                (want.kind(), want.size()),
                "{file}: {key}"
            );
            assert!(have.equal(want), "{file}: {key} values differ");
        }
    }
}

/// Lazy loads into variables (`load_state_dict` over a [`Checkpoint`]) of every dtype, and of
/// views that share one storage (transposed, a row, a column, strided), from a zip with stored
/// and with deflated entries, a legacy file and safetensors: bit-exact to what torch.load gives.
#[test]
fn lazy_loads_of_shared_storages_into_variables_are_bit_exact() {
    let dir = fixtures();
    let expected = read(&dir.join("layouts.safetensors"), &ReadOptions::default()).unwrap();
    let deflated = common::temp_dir("lazy-layouts").join("layouts_deflated.pth");
    let original = std::fs::read(dir.join("layouts.pth")).unwrap();
    std::fs::write(&deflated, bomb::deflated_copy(&original, 6)).unwrap();
    for file in [
        dir.join("layouts.pth"),
        dir.join("layouts_legacy.pth"),
        deflated.clone(),
        dir.join("layouts.safetensors"),
    ] {
        let vs = VarStore::new(Device::Cpu);
        for (key, want) in &expected.entries {
            let _ = vs.root().add(key, want.ones_like(), false);
        }
        let checkpoint = Checkpoint::open(&file, &ReadOptions::default()).unwrap();
        let report = load_state_dict(&vs, &checkpoint, true).unwrap();
        assert!(report.is_clean(), "{}: {report}", file.display());
        let vars = vs.variables();
        for (key, want) in &expected.entries {
            assert!(vars[key].equal(want), "{}: {key}", file.display());
        }
    }
    let _ = std::fs::remove_dir_all(deflated.parent().unwrap());
}

/// Python → Rust → Python and Rust → Python → Rust, with PyTorch doing its half.
#[test]
fn round_trips_through_pytorch_are_bit_exact() {
    let python =
        std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
    let script = common::source_dir().join("python_ref/roundtrip.py");
    let run = |args: &[&str]| {
        let out = Command::new(&python)
            .arg(&script)
            .args(args)
            .output()
            .expect("cannot run python");
        assert!(
            out.status.success(),
            "python {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dir = common::temp_dir("roundtrip");
    let fx = fixtures();

    // Python's file, read and re-written by Rust in both formats, then checked by PyTorch.
    let state = read(&fx.join("resnet50.pth"), &ReadOptions::default()).unwrap();
    let rust_pth = dir.join("from_rust.pth");
    state.save(&rust_pth).unwrap();
    let reference = fx.join("resnet50.safetensors");
    run(&[
        "check",
        "resnet50",
        rust_pth.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    let rust_st = dir.join("from_rust.safetensors");
    state.save(&rust_st).unwrap();
    let back = read(&rust_st, &ReadOptions::default()).unwrap();
    assert_eq!(back.len(), state.len());
    for (key, value) in &state.entries {
        assert!(back.get(key).is_some_and(|t| t.equal(value)), "{key}");
    }

    // A Rust model's state, re-saved by PyTorch, read back by Rust.
    let (vs, _) = resnet("resnet18");
    let mine = StateDict::from_var_store(&vs);
    let mine_path = dir.join("rust_model.pth");
    mine.save(&mine_path).unwrap();
    let resaved = dir.join("resaved_by_torch.pth");
    run(&[
        "resave",
        mine_path.to_str().unwrap(),
        resaved.to_str().unwrap(),
    ]);
    let back = read(&resaved, &ReadOptions::default()).unwrap();
    assert_eq!(back.len(), mine.len());
    for (key, value) in &mine.entries {
        let other = back.get(key).unwrap();
        assert_eq!(other.kind(), value.kind(), "{key}");
        assert!(other.equal(value), "{key}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn saving_is_atomic_and_keeps_the_old_file_on_failure() {
    let dir = common::temp_dir("atomic");
    let path = dir.join("weights.pth");
    std::fs::write(&path, b"old contents").unwrap();
    let bad = StateDict {
        entries: vec![(
            "x".into(),
            Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)),
        )],
    };
    assert!(bad.save(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    let good = StateDict {
        entries: vec![("x".into(), Tensor::from_slice(&[1.0f32, 2.0]))],
    };
    good.save(&path).unwrap();
    assert!(read(&path, &ReadOptions::default())
        .unwrap()
        .get("x")
        .unwrap()
        .equal(&Tensor::from_slice(&[1.0f32, 2.0])));
    assert!(good
        .save(&dir.join("weights.txt"))
        .unwrap_err()
        .to_string()
        .contains(".safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Builds a torch.save-style zip by hand.
fn zip_with(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in records {
        zip.start_file(*name, options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// The `data.pkl` record of a `torch.save` zip.
fn data_pkl(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let mut archive = checkpoint::formats::open_zip(&bytes).unwrap();
    let name = archive
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("/data.pkl"))
        .unwrap()
        .to_string();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name(&name).unwrap(), &mut out).unwrap();
    out
}

fn parse_error(bytes: &[u8]) -> String {
    match checkpoint::parse_bytes(bytes, &ReadOptions::default()) {
        Ok(entries) => panic!("parsed {} entries from hostile input", entries.len()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn forbidden_globals_are_refused_by_name() {
    for (module, name) in [
        ("os", "system"),
        ("builtins", "eval"),
        ("subprocess", "Popen"),
    ] {
        let mut pkl = vec![0x80, 2, b'c'];
        pkl.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        pkl.extend_from_slice(b"X\x05\x00\x00\x00touch\x85R.");
        let file = zip_with(&[("a/data.pkl", &pkl), ("a/version", b"3\n")]);
        let msg = parse_error(&file);
        assert!(
            msg.contains(&format!("refusing global `{module}.{name}`")),
            "{msg}"
        );
    }
    // Legacy format too.
    let mut legacy = vec![0x80, 2, b'c'];
    legacy.extend_from_slice(b"posix\nsystem\n)R.");
    assert!(parse_error(&legacy).contains("refusing global `posix.system`"));
}

#[test]
fn damaged_files_fail_with_a_message_and_never_crash() {
    let fx = fixtures();
    let good = std::fs::read(fx.join("layouts.pth")).unwrap();
    let legacy = std::fs::read(fx.join("layouts_legacy.pth")).unwrap();
    let st = std::fs::read(fx.join("layouts.safetensors")).unwrap();
    let module = std::fs::read(fx.join("tiny_module.pth")).unwrap();
    let scripted = std::fs::read(fx.join("tiny_scripted.pt")).unwrap();
    for source in [&good, &module, &scripted] {
        assert!(checkpoint::parse_bytes(source, &ReadOptions::default()).is_ok());
    }
    let sources = [&good, &legacy, &st, &module, &scripted];

    // Truncated anywhere.
    for source in sources {
        for cut in (0..source.len()).step_by(source.len() / 97 + 1) {
            let _ = checkpoint::parse_bytes(&source[..cut], &ReadOptions::default()).map(|_| ());
            if cut < source.len() / 2 {
                assert!(
                    checkpoint::parse_bytes(&source[..cut], &ReadOptions::default()).is_err(),
                    "cut {cut}"
                );
            }
        }
    }
    // Bit flips: every outcome is a value or an error, never a panic.
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for source in sources {
        for _ in 0..400 {
            let mut bytes = source.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] ^= 1 << (next() % 8);
            }
            let _ = checkpoint::parse_bytes(&bytes, &ReadOptions::default());
        }
    }
    // The same on the pickles alone (inert objects, modules, memo), past the zip's checksums.
    for file in [
        "tiny_module.pth",
        "tiny_module_in_dict.pth",
        "lightning.ckpt",
    ] {
        let pickle = data_pkl(&fx.join(file));
        assert!(checkpoint::locate_records(&pickle, &ReadOptions::default()).is_ok());
        for _ in 0..2000 {
            let mut bytes = pickle.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] ^= 1 << (next() % 8);
            }
            let _ = checkpoint::locate_records(&bytes, &ReadOptions::default());
        }
    }
    // Random bytes and empty input.
    for len in [0usize, 1, 7, 64, 4096] {
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        assert!(checkpoint::parse_bytes(&bytes, &ReadOptions::default()).is_err());
    }
    assert!(parse_error(&[]).contains("empty"));
}

#[test]
fn missing_storages_and_bad_records_are_named() {
    let pkl = {
        let specs = vec![("w".to_string(), checkpoint::DType::F32, vec![2i64, 3])];
        checkpoint::pickle::pickle_state_dict(&specs)
    };
    let missing = zip_with(&[("a/data.pkl", &pkl), ("a/version", b"3\n")]);
    assert!(parse_error(&missing).contains("no storage record `a/data/0`"));
    let short = zip_with(&[("a/data.pkl", &pkl), ("a/data/0", &[0u8; 8])]);
    let msg = parse_error(&short);
    assert!(
        msg.contains("storage `0` holds 8 bytes") && msg.contains("`w`"),
        "{msg}"
    );
    let ok = zip_with(&[("a/data.pkl", &pkl), ("a/data/0", &[0u8; 24])]);
    let parsed = checkpoint::parse_bytes(&ok, &ReadOptions::default()).unwrap();
    assert_eq!(parsed[0].1.shape, vec![2, 3]);
    let big_endian = zip_with(&[
        ("a/data.pkl", &pkl),
        ("a/byteorder", b"big"),
        ("a/data/0", &[0u8; 24]),
    ]);
    assert!(parse_error(&big_endian).contains("big-endian"));
    let no_pickle = zip_with(&[("a/version", b"3\n")]);
    assert!(parse_error(&no_pickle).contains("no data.pkl"));
}

#[test]
fn wrong_dtypes_and_shapes_are_named_at_load() {
    let (vs, _) = resnet("resnet18");
    let mut state = StateDict::from_var_store(&vs);
    for (k, t) in state.entries.iter_mut() {
        if k == "fc.bias" {
            *t = Tensor::zeros([1000], (Kind::Int64, Device::Cpu));
        }
        if k == "layer1.0.conv1.weight" {
            *t = Tensor::zeros([64, 64, 1, 1], (Kind::Float, Device::Cpu));
        }
    }
    let msg = format!("{:#}", load_state_dict(&vs, &state, true).unwrap_err());
    assert!(
        msg.contains("fc.bias: checkpoint dtype Int64, model dtype Float"),
        "{msg}"
    );
    assert!(
        msg.contains("layer1.0.conv1.weight: checkpoint [64, 64, 1, 1], model [64, 64, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn pickle_bombs_are_bounded() {
    // 100k nested lists built on the stack, then folded into each other by APPEND.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');
    assert!(parse_error(&deep).contains("levels deep"));
    // TUPLE1 wrapping: one level per byte.
    let mut wrapped = vec![0x80, 2, b'N'];
    wrapped.extend(std::iter::repeat_n(0x85u8, 100_000));
    wrapped.push(b'.');
    assert!(parse_error(&wrapped).contains("levels deep"));
    // A list doubled through the memo on every step.
    let mut doubling = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..64 {
        doubling.extend_from_slice(&[b'(', b'h', 0, b'h', 0, b'l', b'q', 0, b'0']);
    }
    doubling.extend_from_slice(&[b'h', 0, b'.']);
    let msg = parse_error(&doubling);
    assert!(
        msg.contains("copies more than") || msg.contains("levels deep"),
        "{msg}"
    );
}

/// Reads `file` and checks it against `expected` (`torch.save` of the state_dict PyTorch gives):
/// same keys in the same order, same dtypes, shapes and values.
fn assert_reads_as(file: &str, options: &ReadOptions, expected: &str) -> checkpoint::Layout {
    let dir = fixtures();
    let (got, layout) = StateDict::read_described(&dir.join(file), options)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    let want = read(&dir.join(expected), &ReadOptions::default()).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{file}: keys or their order differ from PyTorch's state_dict"
    );
    for ((key, have), (_, want)) in got.entries.iter().zip(&want.entries) {
        assert_eq!(
            (have.kind(), have.size()),
            (want.kind(), want.size()),
            "{file}: {key}"
        );
        assert!(have.equal(want), "{file}: {key} values differ");
    }
    println!("{file}: {} tensors; {layout}", got.len());
    layout
}

fn with_key(key: &str) -> ReadOptions {
    ReadOptions {
        key: Some(key.into()),
        ..Default::default()
    }
}

fn other_kinds(layout: &checkpoint::Layout) -> Vec<(&str, &str)> {
    layout
        .others
        .iter()
        .map(|(k, kind)| (k.as_str(), kind.as_str()))
        .collect()
}

#[test]
fn training_script_checkpoints_give_pytorchs_state_dict() {
    use checkpoint::Holder;
    let plain = ReadOptions::default();

    // torchvision references/classification/train.py.
    let layout = assert_reads_as("tv_train.pth", &plain, "tv_train.expected.pth");
    assert_eq!(layout.key, ["model"]);
    assert_eq!(layout.holder, Holder::StateDict);
    assert_eq!(
        other_kinds(&layout),
        [
            ("optimizer", "dict"),
            ("lr_scheduler", "dict"),
            ("epoch", "int"),
            ("args", "argparse.Namespace"),
            ("model_ema", "dict"),
            ("scaler", "dict"),
        ]
    );
    assert!(layout.to_string().contains("args (argparse.Namespace)"));
    // Its AveragedModel: `n_averaged` left out, `module.` stripped.
    let layout = assert_reads_as(
        "tv_train.pth",
        &with_key("model_ema"),
        "tv_train_ema.expected.pth",
    );
    assert_eq!(layout.dropped, ["n_averaged"]);
    assert_eq!(layout.stripped, ["module."]);

    // timm's train.py (CheckpointSaver).
    let layout = assert_reads_as("timm_train.pth.tar", &plain, "timm_train.expected.pth");
    assert_eq!(layout.key, ["state_dict"]);
    assert!(other_kinds(&layout).contains(&("args", "argparse.Namespace")));
    assert_reads_as(
        "timm_train.pth.tar",
        &with_key("state_dict_ema"),
        "timm_train.expected.pth",
    );

    // Lightning: `model.` recognised, user classes among the hyper-parameters left alone.
    let layout = assert_reads_as("lightning.ckpt", &plain, "lightning.expected.pth");
    assert_eq!(layout.stripped, ["model."]);
    assert_eq!(layout.lightning.as_deref(), Some("2.4.0"));
    let hparams = layout.others.iter().find(|(k, _)| k == "hyper_parameters");
    assert!(
        hparams.is_some_and(|(_, kind)| kind.ends_with(".AttributeDict")),
        "{hparams:?}"
    );
}

#[test]
fn whole_module_pickles_give_pytorchs_state_dict() {
    use checkpoint::Holder;
    let plain = ReadOptions::default();
    let class = |layout: &checkpoint::Layout| match &layout.holder {
        Holder::Module { class } => class.clone(),
        other => panic!("not a module: {other:?}"),
    };
    // Non-persistent buffer and None entries left out, nested containers, a shared submodule
    // listed under both names.
    let layout = assert_reads_as("tiny_module.pth", &plain, "tiny_module.expected.pth");
    assert!(class(&layout).ends_with(".TinyNet"), "{layout:?}");
    let layout = assert_reads_as(
        "tiny_module_in_dict.pth",
        &plain,
        "tiny_module.expected.pth",
    );
    assert_eq!(layout.key, ["model"]);
    let layout = assert_reads_as("tiny_ema_module.pth", &plain, "tiny_module.expected.pth");
    assert!(class(&layout).ends_with(".ModelEmaV2"), "{layout:?}");
    assert_eq!(layout.stripped, ["module."]);
    let layout = assert_reads_as(
        "resnet18_module.pth",
        &plain,
        "resnet18_module.expected.pth",
    );
    assert_eq!(class(&layout), "torchvision.models.resnet.ResNet");
}

#[test]
fn torchscript_archives_give_the_scripted_state_dict() {
    use checkpoint::Holder;
    let plain = ReadOptions::default();
    // TorchScript keeps the non-persistent buffer (`mask`), as `scripted.state_dict()` does.
    let layout = assert_reads_as("tiny_scripted.pt", &plain, "tiny_scripted.expected.pth");
    assert!(
        matches!(&layout.holder, Holder::TorchScript { class } if class.ends_with("TinyNet")),
        "{layout:?}"
    );
    let layout = assert_reads_as(
        "resnet18_scripted.pt",
        &plain,
        "resnet18_scripted.expected.pth",
    );
    assert_eq!(
        layout.holder,
        Holder::TorchScript {
            class: "__torch__.torchvision.models.resnet.ResNet".into()
        }
    );
    let msg = format!(
        "{:#}",
        read(&fixtures().join("tiny_scripted.pt"), &with_key("stem")).unwrap_err()
    );
    assert!(msg.contains("--key does not apply"), "{msg}");
}

#[test]
fn found_weights_load_strictly_into_the_rust_models() {
    let dir = fixtures();
    let cifar8 = || {
        let vs = VarStore::new(Device::Cpu);
        let config = r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 10, "shortcut": "A"}"#;
        ModelConfig::from_json(config)
            .unwrap()
            .build(vs.root())
            .unwrap();
        vs
    };
    for file in ["tv_train.pth", "timm_train.pth.tar", "lightning.ckpt"] {
        let state = read(&dir.join(file), &ReadOptions::default()).unwrap();
        let report =
            load_state_dict(&cifar8(), &state, true).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert!(report.is_clean(), "{file}: {report}");
    }
    for file in ["resnet18_module.pth", "resnet18_scripted.pt"] {
        let state = read(&dir.join(file), &ReadOptions::default()).unwrap();
        let (vs, _) = resnet("resnet18");
        load_state_dict(&vs, &state, true).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}

#[test]
fn asking_for_an_opaque_object_names_its_class() {
    let dir = fixtures();
    let msg = format!(
        "{:#}",
        read(&dir.join("tv_train.pth"), &with_key("args")).unwrap_err()
    );
    assert!(
        msg.contains("argparse.Namespace object") && msg.contains("does not run"),
        "{msg}"
    );
    let msg = format!(
        "{:#}",
        read(
            &dir.join("lightning.ckpt"),
            &with_key("hyper_parameters/augmentation")
        )
        .unwrap_err()
    );
    assert!(msg.contains(".Augmentation object"), "{msg}");
    // The default search looks past such entries.
    let msg = format!(
        "{:#}",
        read(&dir.join("tv_train.pth"), &with_key("lr_scheduler")).unwrap_err()
    );
    assert!(msg.contains("no state_dict found"), "{msg}");
}

/// Writes pickles opcode by opcode, for hostile inputs.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![op::PROTO, 2])
    }

    fn op(mut self, code: u8) -> Self {
        self.0.push(code);
        self
    }

    fn global(mut self, module: &str, name: &str) -> Self {
        self.0.push(op::GLOBAL);
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }

    fn str(mut self, s: &str) -> Self {
        self.0.push(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    fn int(self, v: u8) -> Self {
        self.op(op::BININT1).op(v)
    }

    /// An inert object of `module.name`, built as protocol 2 builds instances.
    fn object(self, module: &str, name: &str) -> Self {
        self.global(module, name).op(op::EMPTY_TUPLE).op(op::NEWOBJ)
    }

    /// `_rebuild_tensor_v2` of the 2 floats in storage `0`.
    fn tensor(self) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(op::MARK)
            .op(op::MARK)
            .str("storage")
            .global("torch", "FloatStorage")
            .str("0")
            .str("cpu")
            .int(2)
            .op(op::TUPLE)
            .op(op::BINPERSID)
            .int(0)
            .int(2)
            .op(op::TUPLE1)
            .int(1)
            .op(op::TUPLE1)
            .op(op::NEWFALSE)
            .op(op::TUPLE)
            .op(op::REDUCE)
    }

    fn file(self) -> Vec<u8> {
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        zip_with(&[("a/data.pkl", &self.op(op::STOP).0), ("a/data/0", &data)])
    }
}

use checkpoint::pickle::opcodes as op;

#[test]
fn inert_objects_can_never_be_called() {
    let cases = [
        // REDUCE with a placeholder as the callable.
        (
            Pickle::new()
                .object("argparse", "Namespace")
                .op(op::EMPTY_TUPLE)
                .op(op::REDUCE),
            "REDUCE on a argparse.Namespace",
        ),
        // A placeholder as the class of NEWOBJ, NEWOBJ_EX and OBJ.
        (
            Pickle::new()
                .object("evil", "Factory")
                .op(op::EMPTY_TUPLE)
                .op(op::NEWOBJ),
            "NEWOBJ on a evil.Factory",
        ),
        (
            Pickle::new()
                .object("evil", "Factory")
                .op(op::EMPTY_TUPLE)
                .op(op::EMPTY_DICT)
                .op(op::NEWOBJ_EX),
            "NEWOBJ on a evil.Factory",
        ),
        (
            Pickle::new()
                .op(op::MARK)
                .object("evil", "Factory")
                .op(op::OBJ),
            "OBJ on a evil.Factory",
        ),
        // A placeholder where a rebuilder wants a storage, or as the rebuilder itself.
        (
            Pickle::new()
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(op::MARK)
                .object("evil", "Storage")
                .int(0)
                .op(op::EMPTY_TUPLE)
                .op(op::EMPTY_TUPLE)
                .op(op::TUPLE)
                .op(op::REDUCE),
            "expected a storage",
        ),
        (
            Pickle::new()
                .global("torch._utils", "_rebuild_from_type_v2")
                .op(op::MARK)
                .global("evil", "rebuild")
                .global("torch", "Tensor")
                .op(op::EMPTY_TUPLE)
                .op(op::EMPTY_DICT)
                .op(op::TUPLE)
                .op(op::REDUCE),
            "expected (a tensor rebuilder",
        ),
        // Functions the reader implements cannot be instantiated, nor classes given state.
        (
            Pickle::new()
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(op::EMPTY_TUPLE)
                .op(op::NEWOBJ),
            "is a function",
        ),
        (
            Pickle::new()
                .global("evil", "Thing")
                .op(op::EMPTY_DICT)
                .op(op::BUILD),
            "BUILD on the class `evil.Thing`",
        ),
        // Code-running globals stay refused by name, however they are reached.
        (
            Pickle::new()
                .str("builtins")
                .str("getattr")
                .op(op::STACK_GLOBAL),
            "refusing global `builtins.getattr`",
        ),
    ];
    for (i, (pickle, expected)) in cases.into_iter().enumerate() {
        let msg = parse_error(&pickle.file());
        assert!(msg.contains(expected), "case {i}: {msg}");
    }
    // INST names its class inline, as lines.
    let mut inst = Pickle::new().op(op::MARK).str("id").op(op::INST).0;
    inst.extend_from_slice(b"subprocess\ncheck_output\n");
    inst.push(op::STOP);
    let msg = parse_error(&zip_with(&[("a/data.pkl", &inst)]));
    assert!(
        msg.contains("refusing global `subprocess.check_output`"),
        "{msg}"
    );
}

#[test]
fn inert_objects_keep_what_the_pickle_gave_them_and_run_nothing() {
    // {"model": {"w": tensor}, "hook": evil.Thing with a `__setstate__` and `__reduce__` in its
    // state, a list subclass with items, a dict subclass with entries, and keyword arguments}.
    let pickle = Pickle::new()
        .op(op::EMPTY_DICT)
        .op(op::MARK)
        .str("model")
        .op(op::EMPTY_DICT)
        .str("w")
        .tensor()
        .op(op::SETITEM)
        .str("hook")
        .object("evil", "Thing")
        .op(op::EMPTY_DICT)
        .str("__setstate__")
        .global("evil", "setstate")
        .op(op::SETITEM)
        .str("__reduce__")
        .global("evil", "reduce")
        .op(op::SETITEM)
        .op(op::BUILD)
        .op(op::EMPTY_DICT)
        .str("again")
        .int(1)
        .op(op::SETITEM)
        .op(op::BUILD)
        .str("items")
        .object("evil", "List")
        .op(op::MARK)
        .int(1)
        .int(2)
        .op(op::APPENDS)
        .str("entries")
        .object("evil", "Dict")
        .str("k")
        .int(3)
        .op(op::SETITEM)
        .str("kwargs")
        .global("evil", "WithKeywords")
        .op(op::EMPTY_TUPLE)
        .op(op::EMPTY_DICT)
        .str("x")
        .int(4)
        .op(op::SETITEM)
        .op(op::NEWOBJ_EX)
        .op(op::SETITEMS);
    let pickle_bytes = pickle
        .0
        .iter()
        .copied()
        .chain([op::STOP])
        .collect::<Vec<u8>>();
    let bytes = pickle.file();
    let (entries, layout) = checkpoint::parse_described(&bytes, &ReadOptions::default()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, "w");
    assert_eq!(layout.key, ["model"]);
    assert_eq!(
        other_kinds(&layout),
        [
            ("hook", "evil.Thing"),
            ("items", "evil.List"),
            ("entries", "evil.Dict"),
            ("kwargs", "evil.WithKeywords")
        ]
    );
    // The objects are data: their state, items, entries and keywords as written.
    let (value, _) = checkpoint::pickle::unpickle(&pickle_bytes).unwrap();
    let checkpoint::pickle::Value::Dict(top) = value else {
        panic!("{value:?}")
    };
    let object = |name: &str| match checkpoint::pickle::entry(&top, name) {
        Some(checkpoint::pickle::Value::Object(o)) => o.clone(),
        other => panic!("{name}: {other:?}"),
    };
    let hook = object("hook");
    let state: Vec<&str> = hook
        .attributes()
        .unwrap()
        .iter()
        .filter_map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(state, ["__setstate__", "__reduce__", "again"]);
    assert_eq!(object("items").items.len(), 2);
    assert_eq!(object("entries").entries.len(), 1);
    assert_eq!(object("kwargs").kwargs.len(), 1);
}

#[test]
fn objects_memoised_before_they_are_filled_are_read_complete() {
    // {"state_dict": sd, "state_dict_ema": sd}, the second a memo reference to the first, which
    // was memoised while still empty (as Python's pickler does).
    let pickle = Pickle::new()
        .op(op::EMPTY_DICT)
        .op(op::MARK)
        .str("state_dict")
        .global("collections", "OrderedDict")
        .op(op::EMPTY_TUPLE)
        .op(op::REDUCE)
        .op(op::BINPUT)
        .op(7)
        .str("w")
        .tensor()
        .op(op::SETITEM)
        .str("state_dict_ema")
        .op(op::BINGET)
        .op(7)
        .op(op::SETITEMS);
    let parsed = checkpoint::parse_bytes(&pickle.file(), &with_key("state_dict_ema")).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].0, "w");
    assert_eq!(parsed[0].1.shape, vec![2]);
}

#[test]
fn object_bombs_are_bounded() {
    // 100k objects folded into each other's state by BUILD.
    let mut deep = Pickle::new();
    for _ in 0..100_000 {
        deep = deep.object("m", "C");
    }
    for _ in 0..99_999 {
        deep = deep.op(op::BUILD);
    }
    assert!(parse_error(&deep.file()).contains("levels deep"));
    // An object doubled through the memo on every step, by its items.
    let mut doubling = Pickle::new().object("m", "C").op(op::BINPUT).op(0);
    for _ in 0..64 {
        doubling = doubling
            .object("m", "C")
            .op(op::MARK)
            .op(op::BINGET)
            .op(0)
            .op(op::BINGET)
            .op(0)
            .op(op::APPENDS)
            .op(op::BINPUT)
            .op(0)
            .op(op::POP);
    }
    let msg = parse_error(&doubling.op(op::BINGET).op(0).file());
    assert!(
        msg.contains("copies more than") || msg.contains("levels deep"),
        "{msg}"
    );
}
