//! Links the binaries against the libtorch that `torch-sys` compiled against, so that they run
//! without `LD_LIBRARY_PATH` and see CUDA on a GPU machine.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");

    let lib_dir = match libtorch_lib_dir() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!(
                "error: {why}: run `make test` (it sets up the pinned PyTorch) or set LIBTORCH"
            );
            std::process::exit(1);
        }
    };
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    compile_shim(&lib_dir);
    compile_jit(&lib_dir);
    compile_distributed(&lib_dir);
    compile_cuda(&lib_dir);
    println!("cargo:rerun-if-changed={}", lib_dir.display());
    // Every test, example and binary finds libtorch through its run path (`residual-inspect` gets
    // one too, but needs no library from it).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!(
        "cargo:rustc-env=RESIDUAL_LIBTORCH_LIB={}",
        lib_dir.display()
    );
    // The C++ objects that `residual-inspect` links (their Rust callers share codegen units
    // with table code) define inline functions libtorch also exports; exported, they would stay
    // live and keep libtorch_cpu and libc10 needed. Hidden, the linker drops them as unused.
    println!("cargo:rustc-link-arg-bin=residual-inspect=-Wl,--exclude-libs=ALL");
    if lib_dir.join("libtorch_cuda.so").exists() {
        // rustc links with `--as-needed`; nothing references libtorch_cuda's symbols directly, so the
        // linker would drop it and `tch::Cuda::is_available()` would be false on a GPU machine.
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        cuda_link_arg("-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-env=RESIDUAL_TORCH_CUDA_LINKED=1");
    } else {
        println!("cargo:rustc-env=RESIDUAL_TORCH_CUDA_LINKED=0");
    }
}

/// Passes `arg` to the linker of the `residual` binary, the integration tests and the examples,
/// not to `residual-inspect` (which must not load libtorch: its start-up costs ~0.4 s), as
/// `rustc-link-arg` would. Cargo gives `-tests` args to no unit-test harness but `residual`'s:
/// the library's unit tests run without libtorch_cuda (none of them uses CUDA).
fn cuda_link_arg(arg: &str) {
    println!("cargo:rustc-link-arg-bin=residual={arg}");
    // (Cargo refuses `-benches` in a package without benchmarks.)
    for kind in ["tests", "examples"] {
        println!("cargo:rustc-link-arg-{kind}={arg}");
    }
}

/// The `lib/` folder of the libtorch named by `LIBTORCH` (or `LIBTORCH_LIB`), as torch-sys reads them.
fn libtorch_lib_dir() -> Result<PathBuf, String> {
    let root = std::env::var("LIBTORCH").map_err(|_| "LIBTORCH is not set".to_string())?;
    let lib = match std::env::var("LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib).join("lib"),
        Err(_) => Path::new(&root).join("lib"),
    };
    if lib.join("libtorch_cpu.so").exists() {
        Ok(lib)
    } else {
        Err(format!(
            "libtorch not found (no libtorch_cpu.so in {})",
            lib.display()
        ))
    }
}

/// A C++17 build of `source` against libtorch's headers (`$LIBTORCH_INCLUDE/include`, else the
/// `include` folder beside `lib_dir`) with its C++ ABI (`LIBTORCH_CXX11_ABI`, default 1).
fn torch_cpp(lib_dir: &Path, source: &str) -> cc::Build {
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib_dir.parent().unwrap_or(lib_dir);
    let include = std::env::var("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.to_path_buf())
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file(source);
    build
}

/// Compiles `csrc/backend.cpp` (libtorch switches tch lacks) against the same libtorch headers.
fn compile_shim(lib_dir: &Path) {
    torch_cpp(lib_dir, "csrc/backend.cpp").compile("residual_shim");
}

/// Compiles `csrc/jit.cpp` (TorchScript freeze and optimize_for_inference, which tch lacks).
fn compile_jit(lib_dir: &Path) {
    torch_cpp(lib_dir, "csrc/jit.cpp").compile("residual_jit");
}

/// Compiles `csrc/distributed.cpp` (c10d process groups): Gloo when gloo's headers exist (Debian's
/// `libgloo-dev`; the code runs from libtorch_cpu), NCCL when libtorch_cuda, `nccl.h` and the CUDA
/// headers exist (the pip wheels' `nvidia/` folders). A backend whose headers do not compile is
/// left out with a warning rather than failing the build. Sets `residual_gloo` / `residual_nccl`.
fn compile_distributed(lib_dir: &Path) {
    println!("cargo::rustc-check-cfg=cfg(residual_gloo)");
    println!("cargo::rustc-check-cfg=cfg(residual_nccl)");
    println!("cargo:rerun-if-env-changed=RESIDUAL_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=RESIDUAL_NCCL_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let root = lib_dir.parent().unwrap_or(lib_dir);
    let gloo = std::env::var("RESIDUAL_GLOO_INCLUDE")
        .map_or_else(|_| PathBuf::from("/usr/include"), PathBuf::from);
    // Watching gloo's folder, or while it is missing the folder it would appear in, notices gloo
    // being installed or changed later (a missing path would rerun this script on every build).
    let watched = if gloo.join("gloo").exists() {
        gloo.join("gloo")
    } else {
        gloo.clone()
    };
    println!("cargo:rerun-if-changed={}", watched.display());
    let gloo = gloo.join("gloo/config.h").exists().then_some(gloo);
    if gloo.is_none() {
        println!(
            "cargo:warning=gloo headers not found: building without the Gloo backend (apt-get install libgloo-dev)"
        );
    }
    let nccl = if lib_dir.join("libtorch_cuda.so").exists() {
        nccl_includes(root)
    } else {
        None
    };
    let attempts = [
        (gloo.is_some(), nccl.is_some()),
        (gloo.is_some(), false),
        (false, false),
    ];
    let mut tried = Vec::new();
    for (with_gloo, with_nccl) in attempts {
        if tried.contains(&(with_gloo, with_nccl)) {
            continue;
        }
        tried.push((with_gloo, with_nccl));
        let mut build = torch_cpp(lib_dir, "csrc/distributed.cpp");
        if let (true, Some(dir)) = (with_gloo, &gloo) {
            build
                .include(dir)
                .define("USE_C10D_GLOO", None)
                .define("RESIDUAL_WITH_GLOO", None);
        }
        if let (true, Some(dirs)) = (with_nccl, &nccl) {
            for dir in dirs {
                build.include(dir);
            }
            build
                .define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .define("RESIDUAL_WITH_NCCL", None);
        }
        match build.try_compile("residual_distributed") {
            Ok(()) => {
                if with_gloo {
                    println!("cargo:rustc-cfg=residual_gloo");
                }
                if with_nccl {
                    println!("cargo:rustc-cfg=residual_nccl");
                }
                return;
            }
            Err(e) => println!(
                "cargo:warning=csrc/distributed.cpp with gloo={with_gloo} nccl={with_nccl} did not compile ({e}); trying with less"
            ),
        }
    }
    eprintln!("error: csrc/distributed.cpp does not compile even without Gloo and NCCL");
    std::process::exit(1);
}

/// Compiles `csrc/cuda.cpp` (CUDA streams and graphs for inference) with `RESIDUAL_WITH_CUDA`
/// when libtorch_cuda and the CUDA runtime headers ([`cuda_runtime_includes`]) are there, else as
/// stubs that fail with a message, so a CPU-only build links the same symbols. It calls libtorch
/// only (c10_cuda, torch_cuda), never libcudart, so the binaries need no CUDA library of their own.
fn compile_cuda(lib_dir: &Path) {
    let root = lib_dir.parent().unwrap_or(lib_dir);
    let cuda = if lib_dir.join("libtorch_cuda.so").exists() {
        cuda_runtime_includes(root)
    } else {
        None
    };
    for with_cuda in [cuda.is_some(), false] {
        let mut build = torch_cpp(lib_dir, "csrc/cuda.cpp");
        if let (true, Some(dirs)) = (with_cuda, &cuda) {
            for dir in dirs {
                build.include(dir);
            }
            build
                .define("USE_CUDA", None)
                .define("RESIDUAL_WITH_CUDA", None);
        }
        match build.try_compile("residual_cuda") {
            Ok(()) => {
                if with_cuda {
                    // The stream pool (libtorch_cuda, which has CUDAGraph, is linked above).
                    println!("cargo:rustc-link-lib=dylib=c10_cuda");
                }
                return;
            }
            Err(e) if with_cuda => println!(
                "cargo:warning=csrc/cuda.cpp with CUDA did not compile ({e}); building its CPU-only stubs"
            ),
            Err(e) => {
                eprintln!("error: csrc/cuda.cpp does not compile even without CUDA: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Include folders for NCCL: `nccl.h` (`RESIDUAL_NCCL_INCLUDE` or a pip torch's
/// `site-packages/nvidia/nccl` wheel) and the CUDA runtime headers ([`cuda_runtime_includes`]).
fn nccl_includes(torch_root: &Path) -> Option<Vec<PathBuf>> {
    let site = torch_root.parent()?;
    let nccl = std::env::var("RESIDUAL_NCCL_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| site.join("nvidia/nccl/include"));
    if !nccl.join("nccl.h").exists() {
        println!(
            "cargo:warning=libtorch_cuda found but no nccl.h in {}: building without NCCL",
            nccl.display()
        );
        return None;
    }
    let mut dirs = vec![nccl];
    dirs.extend(cuda_runtime_includes(torch_root)?);
    Some(dirs)
}

/// Include folders for the CUDA runtime headers, from `CUDA_HOME`, `/usr/local/cuda` or a pip
/// torch's `site-packages/nvidia/` wheels (whose CUDA 13 runtime headers lack `crt/`; triton's
/// copy of the CUDA headers supplies it).
fn cuda_runtime_includes(torch_root: &Path) -> Option<Vec<PathBuf>> {
    let site = torch_root.parent()?;
    let candidates: Vec<PathBuf> = std::env::var("CUDA_HOME")
        .ok()
        .map(|h| Path::new(&h).join("include"))
        .into_iter()
        .chain([
            PathBuf::from("/usr/local/cuda/include"),
            site.join("nvidia/cu13/include"),
            site.join("nvidia/cuda_runtime/include"),
        ])
        .collect();
    let cuda = candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists())?;
    let mut dirs = vec![cuda.clone()];
    // The CUDA 13 wheel's headers need `crt/` (triton ships it) and CCCL's `nv/target` (the
    // `nvidia-cuda-cccl` wheel, which torch does not install).
    for (needed, extra) in [
        (
            "crt/host_config.h",
            site.join("triton/backends/nvidia/include"),
        ),
        ("nv/target", site.join("nvidia/cu13/include/cccl")),
    ] {
        if cuda.join(needed).exists() {
            continue;
        }
        if !extra.join(needed).exists() {
            println!(
                "cargo:warning=CUDA headers in {} lack {needed}: building without CUDA headers (set CUDA_HOME to a CUDA toolkit, or pip install nvidia-cuda-cccl)",
                cuda.display()
            );
            return None;
        }
        dirs.push(extra);
    }
    Some(dirs)
}
