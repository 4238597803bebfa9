//! libtorch's global switches (TF32, determinism, cuDNN benchmark, autocast dtype). They hold for
//! the whole process, so every test that changes them lives in this binary and takes `LOCK`:
//! nothing else runs while they are changed, and each test leaves them as it found them.

use std::sync::Mutex;

use residual::backend::{self, AutocastDtype, Flag, SwitchGuard, Switches};
use residual::data::Dataset;
use residual::train::{RunData, TrainOptions, Trainer};
use residual::ModelConfig;
use tch::{Device, Kind, Tensor};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn libtorch_switches_read_back_and_the_guard_restores_them() {
    let _lock = lock();
    let before = Switches::current().unwrap();
    {
        let _guard = SwitchGuard::new().unwrap();
        for flag in [
            Flag::AllowTf32Cudnn,
            Flag::AllowTf32Cublas,
            Flag::DeterministicAlgorithms,
            Flag::DeterministicCudnn,
            Flag::BenchmarkCudnn,
        ] {
            let original = backend::flag(flag).unwrap();
            backend::set_flag(flag, !original).unwrap();
            assert_eq!(backend::flag(flag).unwrap(), !original, "{flag:?}");
        }
        backend::strict_fp32().unwrap();
        assert!(!backend::flag(Flag::AllowTf32Cudnn).unwrap());
        assert!(!backend::flag(Flag::AllowTf32Cublas).unwrap());
        for dtype in [AutocastDtype::Bf16, AutocastDtype::Fp16] {
            backend::set_autocast_dtype(dtype).unwrap();
            assert_eq!(backend::autocast_dtype().unwrap(), dtype);
        }
        let flipped = Switches {
            tf32_cudnn: !before.tf32_cudnn,
            tf32_cublas: !before.tf32_cublas,
            deterministic_algorithms: !before.deterministic_algorithms,
            deterministic_cudnn: !before.deterministic_cudnn,
            benchmark_cudnn: !before.benchmark_cudnn,
            autocast_dtype: match before.autocast_dtype {
                AutocastDtype::Bf16 => AutocastDtype::Fp16,
                AutocastDtype::Fp16 => AutocastDtype::Bf16,
            },
        };
        flipped.apply().unwrap();
        assert_eq!(Switches::current().unwrap(), flipped);
    }
    assert_eq!(Switches::current().unwrap(), before);
    assert_eq!(backend::header_version(), "2.11.0");
}

fn tiny_run_data(options: &TrainOptions) -> RunData {
    let n = 64;
    let images = Tensor::randint(256, [n, 1, 12, 12], (Kind::Uint8, Device::Cpu));
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(10);
    let train = Dataset::new(images.shallow_clone(), labels.shallow_clone(), 10).unwrap();
    let test = Dataset::new(images, labels, 10).unwrap();
    RunData::prepare(train, test, options, Device::Cpu).unwrap()
}

#[test]
fn a_training_run_sets_the_switches_it_asks_for_and_restores_them_after() {
    let _lock = lock();
    let before = Switches::current().unwrap();
    let dir = std::env::temp_dir().join(format!("residual-switches-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config =
        ModelConfig::from_json(r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1}"#)
            .unwrap();
    let options = TrainOptions {
        epochs: 1,
        batch_size: 32,
        deterministic: true,
        tf32: true,
        cudnn_benchmark: true,
        augment: None,
        ..Default::default()
    };
    let data = tiny_run_data(&options);
    let mut trainer = Trainer::create(&dir, config, options, Device::Cpu).unwrap();
    trainer.quiet = true;
    let wanted = trainer.switches(before);
    assert!(wanted.deterministic_algorithms && wanted.deterministic_cudnn);
    assert!(wanted.tf32_cudnn && wanted.tf32_cublas);
    assert!(
        !wanted.benchmark_cudnn,
        "determinism overrides cuDNN benchmark"
    );
    assert_eq!(wanted.autocast_dtype, before.autocast_dtype);
    let strict = Trainer::create(
        &dir.join("strict"),
        trainer.config.clone(),
        TrainOptions {
            amp: Some(AutocastDtype::Bf16),
            ..Default::default()
        },
        Device::Cpu,
    )
    .unwrap()
    .switches(before);
    assert!(!strict.tf32_cudnn && !strict.tf32_cublas, "fp32 means fp32");
    assert_eq!(strict.autocast_dtype, AutocastDtype::Bf16);

    trainer.run(&data).unwrap();
    assert_eq!(
        Switches::current().unwrap(),
        before,
        "the run restores the switches it changed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
