//! Build steps:
//! - gRPC code for `proto/` (package `ddpm.v1`), compiled with protox so no `protoc` binary is needed; the
//!   file descriptor set is kept in OUT_DIR for server reflection. `google.rpc.Status` is tonic-types'.
//! - An rpath to the directory torch-sys linked against (the project venv's `torch/lib`), so binaries run
//!   without `LD_LIBRARY_PATH`, and libtorch_cuda kept as a dependency so CUDA is found at run time (the
//!   linker would drop it as unused otherwise). `DDPM_RPATH` replaces that build-machine path with one
//!   of the install, e.g. `$ORIGIN/../lib/ddpm-worker` for a container image that ships libtorch beside
//!   the binary.
//! - `src/cuda/shim.cpp` (CUDA graphs, which tch does not expose), compiled against the same libtorch
//!   when it is a CUDA build and the CUDA runtime headers are found (the torch wheel's `nvidia/*/include`,
//!   or `CUDA_HOME`); it sets `cfg(ddpm_cuda_graphs)`. Without it, graph capture reports that it is
//!   unavailable and sampling runs eagerly.
//! - `src/cuda/group_norm.cu` (fused channels-last group norm), compiled by nvcc into a fatbin that the
//!   binary embeds and `src/cuda/kernels.cpp` loads at run time, when the shim is built and nvcc is found
//!   (the `nvidia-cuda-nvcc` wheel beside torch, or `CUDA_HOME`); it sets `cfg(ddpm_cuda_kernels)`.
//!   Without it the channels-last norm runs as libtorch ops.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo::rustc-check-cfg=cfg(ddpm_cuda_graphs)");
    println!("cargo::rustc-check-cfg=cfg(ddpm_cuda_kernels)");
    let descriptors = protox::compile(["ddpm/v1/worker.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ddpm_v1_descriptor.bin"), descriptors.encode_to_vec())?;
    // BTreeMap for map fields: their encoding is then deterministic, so a request hashes the same every time.
    tonic_prost_build::configure()
        .btree_map(".")
        .extern_path(".google.rpc.Status", "::tonic_types::Status")
        .compile_fds(descriptors)?;

    println!("cargo:rerun-if-env-changed=DDPM_RPATH");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let rpath = std::env::var("DDPM_RPATH").unwrap_or_else(|_| lib.clone());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{rpath}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
            build_cuda_shim(std::path::Path::new(&lib));
        }
    }
    Ok(())
}

fn build_cuda_shim(lib: &std::path::Path) {
    for file in ["shim.cpp", "kernels.cpp", "common.h"] {
        println!("cargo:rerun-if-changed=src/cuda/{file}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(torch) = lib.parent() else { return };
    let include = torch.join("include");
    // The torch wheel's CUDA packages (nvidia/cu13/{include,bin}, or nvidia/cuda_runtime/include in older
    // wheels) sit beside it in site-packages; a libtorch download relies on CUDA_HOME.
    let cuda_dirs: Vec<PathBuf> = torch
        .parent()
        .and_then(|site| std::fs::read_dir(site.join("nvidia")).ok())
        .map(|dirs| dirs.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let cuda_home = std::env::var("CUDA_HOME").ok().map(PathBuf::from);
    let cuda_include = cuda_dirs
        .iter()
        .chain(cuda_home.iter())
        .map(|dir| dir.join("include"))
        .find(|include| include.join("cuda_runtime_api.h").is_file());
    let Some(cuda_include) = cuda_include else {
        println!("cargo:warning=no CUDA runtime headers found (set CUDA_HOME): CUDA graphs are unavailable");
        return;
    };
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/cuda/shim.cpp")
        .file("src/cuda/kernels.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(cuda_include)
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("ddpm_cuda_shim");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=ddpm_cuda_graphs");

    let nvcc = cuda_dirs.iter().chain(cuda_home.iter()).map(|dir| dir.join("bin/nvcc")).find(|p| p.is_file());
    match nvcc {
        Some(nvcc) => build_kernels(&nvcc),
        None => println!(
            "cargo:warning=nvcc not found (pip install nvidia-cuda-nvcc, or set CUDA_HOME): the fused \
             group-norm kernels are unavailable"
        ),
    }
}

/// SASS for the data-centre and consumer GPUs of CUDA 13 (Turing's sm_75 is its oldest), and PTX of the
/// oldest so that the driver can compile it for any newer one.
const CUDA_ARCHS: [&str; 6] = ["80", "86", "89", "90", "100", "120"];

fn build_kernels(nvcc: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/cuda/group_norm.cu");
    let Ok(out) = std::env::var("OUT_DIR") else { return };
    let fatbin = PathBuf::from(out).join("group_norm.fatbin");
    let mut command = std::process::Command::new(nvcc);
    command.args(["--fatbin", "-O3", "-std=c++17", "-o"]).arg(&fatbin).arg("src/cuda/group_norm.cu");
    for arch in CUDA_ARCHS {
        command.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    command.arg("-gencode=arch=compute_75,code=[sm_75,compute_75]");
    match command.output() {
        Ok(output) if output.status.success() => println!("cargo:rustc-cfg=ddpm_cuda_kernels"),
        Ok(output) => println!(
            "cargo:warning=nvcc failed, the fused group-norm kernels are unavailable: {}",
            String::from_utf8_lossy(&output.stderr).lines().take(5).collect::<Vec<_>>().join(" | ")
        ),
        Err(e) => {
            println!("cargo:warning=nvcc did not run ({e}): the fused group-norm kernels are unavailable")
        }
    }
}
