//! CUDA graphs (`torch.cuda.CUDAGraph`): a fixed-shape UNet call is captured once and replayed at every
//! step, so the CPU issues one launch per step instead of hundreds of kernels. libtorch has the graph
//! type but tch does not bind it; `shim.cpp` does, when build.rs found a CUDA libtorch and the CUDA
//! runtime headers (`cfg(ddpm_cuda_graphs)`). Elsewhere [`CudaGraph::new`] says why not.
//!
//! Also the fused channels-last group norm ([`group_norm_nhwc`], `group_norm.cu`), where build.rs found
//! nvcc as well (`cfg(ddpm_cuda_kernels)`).

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    #[error("CUDA {op}: {message}")]
    Cuda { op: &'static str, message: String },
}

#[cfg(ddpm_cuda_graphs)]
mod ffi {
    use std::ffi::{c_char, c_int};

    #[repr(C)]
    pub struct Graph {
        _private: [u8; 0],
    }

    unsafe extern "C" {
        pub fn ddpm_graph_new(device: c_int, error: *mut *mut c_char) -> *mut Graph;
        pub fn ddpm_graph_capture_begin(graph: *mut Graph, error: *mut *mut c_char) -> c_int;
        pub fn ddpm_graph_capture_end(graph: *mut Graph, error: *mut *mut c_char) -> c_int;
        pub fn ddpm_graph_replay(graph: *mut Graph, error: *mut *mut c_char) -> c_int;
        pub fn ddpm_graph_free(graph: *mut Graph);
        pub fn ddpm_free_message(message: *mut c_char);
        pub fn ddpm_use_own_stream(device: c_int, error: *mut *mut c_char) -> c_int;
        pub fn ddpm_stream_synchronize(device: c_int, error: *mut *mut c_char) -> c_int;
        #[cfg(ddpm_cuda_kernels)]
        pub fn ddpm_group_norm_nhwc(
            x: *const torch_sys::C_tensor,
            weight: *const torch_sys::C_tensor,
            bias: *const torch_sys::C_tensor,
            addend: *const torch_sys::C_tensor,
            groups: i64,
            eps: f64,
            silu: c_int,
            fatbin: *const std::ffi::c_void,
            out: *mut *mut torch_sys::C_tensor,
            error: *mut *mut c_char,
        ) -> c_int;
    }
}

/// One captured sequence of CUDA work on one device.
#[cfg(ddpm_cuda_graphs)]
pub struct CudaGraph {
    ptr: std::ptr::NonNull<ffi::Graph>,
}

// The graph is used by one thread at a time (its device thread); libtorch's CUDAGraph has no thread
// affinity beyond the stream it was captured on.
#[cfg(ddpm_cuda_graphs)]
unsafe impl Send for CudaGraph {}

#[cfg(ddpm_cuda_graphs)]
fn call(
    op: &'static str,
    f: impl FnOnce(*mut *mut std::ffi::c_char) -> std::ffi::c_int,
) -> Result<(), CudaError> {
    let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
    if f(&mut error) == 0 {
        return Ok(());
    }
    let message = if error.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: the shim returns a NUL-terminated malloc'd string that we own and free once.
        let text = unsafe { std::ffi::CStr::from_ptr(error) }.to_string_lossy().into_owned();
        unsafe { ffi::ddpm_free_message(error) };
        text
    };
    Err(CudaError::Cuda { op, message })
}

#[cfg(ddpm_cuda_graphs)]
impl CudaGraph {
    pub fn new(device: usize) -> Result<Self, CudaError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: the shim writes either a graph or an error message.
        call("graph create", |e| {
            raw = unsafe { ffi::ddpm_graph_new(device as std::ffi::c_int, e) };
            i32::from(raw.is_null())
        })?;
        std::ptr::NonNull::new(raw)
            .map(|ptr| Self { ptr })
            .ok_or(CudaError::Cuda { op: "graph create", message: "no graph returned".into() })
    }

    /// Records what `work` issues on this thread instead of running it. `work` must use only tensors
    /// that outlive the graph at fixed addresses, and no host synchronisation.
    pub fn capture<T>(&mut self, work: impl FnOnce() -> T) -> Result<T, CudaError> {
        // SAFETY: `self.ptr` is a live graph owned by `self`.
        call("graph capture begin", |e| unsafe { ffi::ddpm_graph_capture_begin(self.ptr.as_ptr(), e) })?;
        // The stream leaves capture mode whatever `work` does: a panic inside it (a libtorch error
        // surfaces as one) ends the capture before unwinding further, or the stream would stay capturing
        // and every later call on it fail, losing the device.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        // SAFETY: as above.
        let ended =
            call("graph capture end", |e| unsafe { ffi::ddpm_graph_capture_end(self.ptr.as_ptr(), e) });
        match out {
            Ok(out) => ended.map(|()| out),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub fn replay(&mut self) -> Result<(), CudaError> {
        // SAFETY: as above.
        call("graph replay", |e| unsafe { ffi::ddpm_graph_replay(self.ptr.as_ptr(), e) })
    }
}

#[cfg(ddpm_cuda_graphs)]
impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: created by ddpm_graph_new and freed only here.
        unsafe { ffi::ddpm_graph_free(self.ptr.as_ptr()) }
    }
}

/// Stand-in where the shim was not built: every call says so.
#[cfg(not(ddpm_cuda_graphs))]
pub struct CudaGraph {
    _private: (),
}

#[cfg(not(ddpm_cuda_graphs))]
impl CudaGraph {
    pub fn new(_device: usize) -> Result<Self, CudaError> {
        Err(CudaError::Unavailable("CUDA graphs: built without a CUDA libtorch and CUDA runtime headers"))
    }

    pub fn capture<T>(&mut self, _work: impl FnOnce() -> T) -> Result<T, CudaError> {
        Err(CudaError::Unavailable("CUDA graphs: built without a CUDA libtorch and CUDA runtime headers"))
    }

    pub fn replay(&mut self) -> Result<(), CudaError> {
        Err(CudaError::Unavailable("CUDA graphs: built without a CUDA libtorch and CUDA runtime headers"))
    }
}

/// Bytes at a 16-byte boundary: `include_bytes!` only guarantees byte alignment, and the driver reads a
/// fatbin's headers as 8-byte words.
#[cfg(ddpm_cuda_kernels)]
#[repr(C, align(16))]
struct Aligned<B: ?Sized>(B);

/// The kernels of `group_norm.cu`, as nvcc compiled them at build time.
#[cfg(ddpm_cuda_kernels)]
static GROUP_NORM_FATBIN: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/group_norm.fatbin")));

/// Whether this build has the fused group-norm kernels (the device must also be CUDA).
pub const KERNELS_BUILT: bool = cfg!(ddpm_cuda_kernels);

/// `silu?(group_norm(x + addend))` for a channels-last CUDA `x` `[B, C, H, W]` in float32, float16 or
/// bfloat16, in three kernels (`group_norm.cu`): statistics in float32 over the NHWC memory, one scale
/// and shift per (sample, channel) with the addend folded in, and one pass that applies them (and the
/// SiLU), channels-last out. `addend` is `[B, C]` (the ResNet block's time embedding); `weight` and
/// `bias` are `[C]`, all of `x`'s dtype. Shapes the kernels do not take (channels not a multiple of
/// 16 bytes, say) are an error, for the caller to run libtorch's ops instead.
#[cfg(ddpm_cuda_kernels)]
pub fn group_norm_nhwc(
    x: &tch::Tensor,
    weight: &tch::Tensor,
    bias: &tch::Tensor,
    addend: Option<&tch::Tensor>,
    groups: i64,
    eps: f64,
    silu: bool,
) -> Result<tch::Tensor, CudaError> {
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let addend = addend.map_or(std::ptr::null(), |a| a.as_ptr());
    call("group norm", |e| {
        // SAFETY: the tensors are live for the call; the shim writes either a new tensor or an error.
        unsafe {
            ffi::ddpm_group_norm_nhwc(
                x.as_ptr(),
                weight.as_ptr(),
                bias.as_ptr(),
                addend,
                groups,
                eps,
                std::ffi::c_int::from(silu),
                GROUP_NORM_FATBIN.0.as_ptr().cast(),
                &mut out,
                e,
            )
        }
    })?;
    if out.is_null() {
        return Err(CudaError::Cuda { op: "group norm", message: "no tensor returned".into() });
    }
    // SAFETY: a tensor allocated by the shim for us, owned from here on.
    Ok(unsafe { tch::Tensor::from_ptr(out) })
}

#[cfg(not(ddpm_cuda_kernels))]
pub fn group_norm_nhwc(
    _x: &tch::Tensor,
    _weight: &tch::Tensor,
    _bias: &tch::Tensor,
    _addend: Option<&tch::Tensor>,
    _groups: i64,
    _eps: f64,
    _silu: bool,
) -> Result<tch::Tensor, CudaError> {
    Err(CudaError::Unavailable("built without nvcc: no fused group-norm kernels"))
}

/// Sends this thread's work on `device` to a stream of its own from now on, so that threads sharing a
/// GPU (lanes, device threads on one GPU) overlap instead of queueing on the default stream. Call it
/// first thing on the thread. Nothing on the CPU, or where the shim was not built (everything then
/// runs on the default stream, as before).
pub fn use_own_stream(device: tch::Device) -> Result<(), CudaError> {
    match device {
        #[cfg(ddpm_cuda_graphs)]
        // SAFETY: the shim writes an error message or nothing.
        tch::Device::Cuda(i) => {
            call("stream", |e| unsafe { ffi::ddpm_use_own_stream(i as std::ffi::c_int, e) })
        }
        _ => Ok(()),
    }
}

/// Waits for the work this thread issued on `device` (its current stream), not for the whole device,
/// which would also wait on other threads and break a graph capture in progress on one of them.
/// Nothing on the CPU; where the shim was not built, libtorch's device-wide synchronize.
pub fn synchronize(device: tch::Device) -> Result<(), CudaError> {
    match device {
        #[cfg(ddpm_cuda_graphs)]
        // SAFETY: the shim writes an error message or nothing.
        tch::Device::Cuda(i) => {
            call("synchronize", |e| unsafe { ffi::ddpm_stream_synchronize(i as std::ffi::c_int, e) })
        }
        #[cfg(not(ddpm_cuda_graphs))]
        tch::Device::Cuda(i) => {
            tch::Cuda::synchronize(i as i64);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether this build can capture graphs at all (the device must also be CUDA).
pub const GRAPHS_BUILT: bool = cfg!(ddpm_cuda_graphs);

#[cfg(all(test, ddpm_cuda_kernels))]
mod tests {
    #[test]
    fn the_embedded_fatbin_starts_on_a_16_byte_boundary() {
        assert_eq!(super::GROUP_NORM_FATBIN.0.as_ptr() as usize % 16, 0);
        assert!(!super::GROUP_NORM_FATBIN.0.is_empty());
    }
}
