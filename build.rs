//! Lets the binaries find libtorch without `LD_LIBRARY_PATH`: an rpath to the directory torch-sys linked
//! against (the project venv's `torch/lib`), and libtorch_cuda kept as a dependency so CUDA is found at
//! run time (the linker would drop it as unused otherwise).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
