//! `residual doctor`: what this process runs on.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

/// The tch version this crate pins (`tch = "=0.24.0"`).
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch release tch 0.24 is written against.
pub const EXPECTED_LIBTORCH: &str = "2.11.";

/// The environment as `residual doctor` reports it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub tch_version: &'static str,
    pub libtorch_path: Option<PathBuf>,
    pub libtorch_version: Option<String>,
    pub libtorch_header_version: String,
    pub libtorch_cuda_linked: bool,
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cuda_devices: Vec<String>,
    pub cudnn_available: bool,
    pub cudnn_version: Option<i64>,
    pub threads: i32,
    pub tf32_cudnn: bool,
    pub tf32_cublas: bool,
    /// The c10d backends this build has (`residual train` under torchrun).
    pub distributed: crate::distributed::Backends,
}

/// Paths of the shared libraries mapped into this process.
fn loaded_libraries() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    libs.dedup();
    libs
}

/// The version of the libtorch installed at `lib_dir` (a pip `torch/lib` or a libtorch zip `lib`).
fn libtorch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("build-version")) {
        return Some(text.trim().to_string());
    }
    let text = std::fs::read_to_string(root.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_string())
}

impl Report {
    pub fn collect() -> Self {
        // Touch libtorch so that it and the CUDA libraries are mapped.
        let cuda_device_count = tch::Cuda::device_count();
        let libs = loaded_libraries();
        let find = |name: &str| {
            libs.iter()
                .find(|p| p.file_name().is_some_and(|f| f == name))
        };
        let libtorch_path = find("libtorch_cpu.so")
            .and_then(|p| p.parent())
            .map(Path::to_path_buf);
        let libtorch_version = libtorch_path.as_deref().and_then(libtorch_version);
        let cudnn_available = tch::Cuda::cudnn_is_available();
        Report {
            tch_version: TCH_VERSION,
            libtorch_version,
            libtorch_path,
            libtorch_header_version: crate::backend::header_version(),
            libtorch_cuda_linked: find("libtorch_cuda.so").is_some(),
            cuda_available: tch::Cuda::is_available(),
            cuda_device_count,
            cuda_devices: (0..cuda_device_count.max(0) as usize)
                .map(|i| crate::backend::cuda_device_name(i).unwrap_or_else(|| "unknown".into()))
                .collect(),
            cudnn_available,
            cudnn_version: cudnn_available.then(tch::utils::version_cudnn),
            threads: tch::get_num_threads(),
            tf32_cudnn: crate::backend::flag(crate::backend::Flag::AllowTf32Cudnn).unwrap_or(false),
            tf32_cublas: crate::backend::flag(crate::backend::Flag::AllowTf32Cublas)
                .unwrap_or(false),
            distributed: crate::distributed::backends(),
        }
    }

    /// Fails unless the loaded libtorch is the 2.11 release tch 0.24 expects.
    pub fn check(&self) -> Result<()> {
        match &self.libtorch_version {
            Some(v) if v.starts_with(EXPECTED_LIBTORCH) => Ok(()),
            Some(v) => bail!("loaded libtorch is {v}, but tch {TCH_VERSION} needs 2.11.x"),
            None => bail!("cannot tell which libtorch is loaded (no version file next to it)"),
        }
    }

    /// Human-readable lines.
    pub fn lines(&self) -> Vec<String> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
        vec![
            format!("tch               {}", self.tch_version),
            format!(
                "libtorch          {} at {}",
                opt(&self.libtorch_version),
                self.libtorch_path
                    .as_ref()
                    .map_or("unknown".into(), |p| p.display().to_string())
            ),
            format!("headers           {}", self.libtorch_header_version),
            format!(
                "libtorch_cuda     {}",
                if self.libtorch_cuda_linked {
                    "linked"
                } else {
                    "not linked"
                }
            ),
            format!(
                "CUDA              {} device(s){}",
                self.cuda_device_count,
                if self.cuda_devices.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.cuda_devices.join(", "))
                }
            ),
            format!(
                "cuDNN             {}",
                match self.cudnn_version {
                    Some(v) => format!("available (version {v})"),
                    None => "not available".into(),
                }
            ),
            format!(
                "TF32              cuDNN {}, cuBLAS {}",
                self.tf32_cudnn, self.tf32_cublas
            ),
            format!("threads           {}", self.threads),
            format!(
                "distributed       Gloo {}, NCCL {}",
                if self.distributed.gloo {
                    "built"
                } else {
                    "not built (no gloo headers at build time)"
                },
                if self.distributed.nccl {
                    "built"
                } else {
                    "not built (needs libtorch_cuda, nccl.h and full CUDA headers at build time)"
                }
            ),
        ]
    }
}
