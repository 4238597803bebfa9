//! `residual-inspect`, the binary that does not load libtorch: the same output as `residual
//! inspect` (text, `--json`, errors) on checkpoints of each format and layout.

mod common;

use std::process::{Command, Output};

/// Runs `binary` with `args` and no `LD_LIBRARY_PATH`: `residual` finds libtorch through its run
/// path; `residual-inspect` has none and starts only because it needs no libtorch.
fn run(binary: &std::path::Path, args: &[&str]) -> Output {
    let out = Command::new(binary)
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("error while loading shared libraries"),
        "{} did not start: {stderr}",
        binary.display()
    );
    out
}

#[test]
fn residual_inspect_prints_what_inspect_prints() {
    let lite = std::path::PathBuf::from(env!("CARGO_BIN_EXE_residual-inspect"));
    if !lite.exists() {
        // The GPU bundle (RESIDUAL_BIN) ships `residual` only.
        println!("skipped: {} not built here", lite.display());
        return;
    }
    let fx = common::reference_dir("checkpoints", "image.png");
    let refs = fx.parent().unwrap();
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let missing = path(fx.join("missing.pth"));
    let cases: Vec<Vec<String>> = [
        // Nested, `module.` stripped; the JSON summary.
        vec![path(fx.join("resnet50_wrapped_ddp.pth")), "--json".into()],
        // A training script's checkpoint, every key listed.
        vec![path(fx.join("tv_train.pth")), "--all".into()],
        vec![path(fx.join("layouts_legacy.pth"))],
        // No known architecture: why.
        vec![path(fx.join("layouts.pth")), "--json".into()],
        // SiD's sizes come from its offsets tensor: the one tensor inspect reads.
        vec![
            path(refs.join("sid_classifier_small_eval/state_dict.safetensors")),
            "--json".into(),
        ],
        vec![path(
            refs.join("conv_sds_head_small_eval/state_dict.safetensors"),
        )],
        vec![missing],
    ]
    .into();
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let lite_out = run(&lite, &args);
        let mut full_args = vec!["inspect"];
        full_args.extend(&args);
        let full_out = run(&common::residual_bin(), &full_args);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert_eq!(
            text(&lite_out.stdout),
            text(&full_out.stdout),
            "stdout of {args:?}"
        );
        assert_eq!(
            text(&lite_out.stderr),
            text(&full_out.stderr),
            "stderr of {args:?}"
        );
        assert_eq!(lite_out.status.code(), full_out.status.code(), "{args:?}");
    }
    // The loader's own listing (what `ldd` prints): no libtorch library at all.
    let libraries = Command::new(&lite)
        .env("LD_TRACE_LOADED_OBJECTS", "1")
        .output()
        .unwrap();
    let libraries = String::from_utf8_lossy(&libraries.stdout);
    assert!(
        libraries.contains("libc.so")
            && !libraries.contains("libtorch")
            && !libraries.contains("libc10"),
        "{libraries}"
    );
    // The cases above are not vacuous: they name architectures, SiD's included, and fail where
    // the file is missing.
    let sid = run(
        &lite,
        &[&path(
            refs.join("sid_classifier_small_eval/state_dict.safetensors"),
        )],
    );
    let sid = String::from_utf8_lossy(&sid.stdout);
    assert!(sid.contains("matches: SiD classifier"), "{sid}");
    let failed = run(&lite, &[&path(fx.join("missing.pth"))]);
    assert_eq!(failed.status.code(), Some(1));
}
