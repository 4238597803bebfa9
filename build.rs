//! Links the binaries against the libtorch that `torch-sys` compiled against, so that they run
//! without `LD_LIBRARY_PATH` and see CUDA on a GPU machine.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/backend.cpp");

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
    println!("cargo:rerun-if-changed={}", lib_dir.display());
    // Every test, example and binary finds libtorch through its run path.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!(
        "cargo:rustc-env=RESIDUAL_LIBTORCH_LIB={}",
        lib_dir.display()
    );
    if lib_dir.join("libtorch_cuda.so").exists() {
        // rustc links with `--as-needed`; nothing references libtorch_cuda's symbols directly, so the
        // linker would drop it and `tch::Cuda::is_available()` would be false on a GPU machine.
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-env=RESIDUAL_TORCH_CUDA_LINKED=1");
    } else {
        println!("cargo:rustc-env=RESIDUAL_TORCH_CUDA_LINKED=0");
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

/// Compiles `csrc/backend.cpp` (libtorch switches tch lacks) against the same libtorch headers.
fn compile_shim(lib_dir: &Path) {
    let root = lib_dir.parent().unwrap_or(lib_dir);
    let include = std::env::var("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.to_path_buf())
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("csrc/backend.cpp")
        .compile("residual_shim");
}
