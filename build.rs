//! Build steps:
//! - gRPC code for `proto/` (package `ddpm.v1`), compiled with protox so no `protoc` binary is needed; the
//!   file descriptor set is kept in OUT_DIR for server reflection. `google.rpc.Status` is tonic-types'.
//! - An rpath to the directory torch-sys linked against (the project venv's `torch/lib`), so binaries run
//!   without `LD_LIBRARY_PATH`, and libtorch_cuda kept as a dependency so CUDA is found at run time (the
//!   linker would drop it as unused otherwise). `DDPM_RPATH` replaces that build-machine path with one
//!   of the install, e.g. `$ORIGIN/../lib/ddpm-worker` for a container image that ships libtorch beside
//!   the binary.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
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
        }
    }
    Ok(())
}
