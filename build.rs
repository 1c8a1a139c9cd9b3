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

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo::rustc-check-cfg=cfg(ddpm_cuda_graphs)");
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
    println!("cargo:rerun-if-changed=src/cuda/shim.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(torch) = lib.parent() else { return };
    let include = torch.join("include");
    // The torch wheel's CUDA packages (nvidia/cu13/include, or nvidia/cuda_runtime/include in older
    // wheels) sit beside it in site-packages; a libtorch download relies on CUDA_HOME.
    let wheel_cuda = torch.parent().map(|site| site.join("nvidia")).and_then(|nvidia| {
        std::fs::read_dir(nvidia)
            .ok()?
            .flatten()
            .map(|e| e.path().join("include"))
            .find(|i| i.join("cuda_runtime_api.h").is_file())
    });
    let cuda_include = wheel_cuda.or_else(|| {
        let home = PathBuf::from(std::env::var("CUDA_HOME").ok()?).join("include");
        home.join("cuda_runtime_api.h").is_file().then_some(home)
    });
    let Some(cuda_include) = cuda_include else {
        println!("cargo:warning=no CUDA runtime headers found (set CUDA_HOME): CUDA graphs are unavailable");
        return;
    };
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/cuda/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(cuda_include)
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("ddpm_cuda_shim");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=ddpm_cuda_graphs");
}
