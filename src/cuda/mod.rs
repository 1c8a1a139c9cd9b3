//! CUDA graphs (`torch.cuda.CUDAGraph`): a fixed-shape UNet call is captured once and replayed at every
//! step, so the CPU issues one launch per step instead of hundreds of kernels. libtorch has the graph
//! type but tch does not bind it; `shim.cpp` does, when build.rs found a CUDA libtorch and the CUDA
//! runtime headers (`cfg(ddpm_cuda_graphs)`). Elsewhere [`CudaGraph::new`] says why not.

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("CUDA graphs are unavailable: {0}")]
    Unavailable(&'static str),
    #[error("CUDA graph {op}: {message}")]
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
) -> Result<(), GraphError> {
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
    Err(GraphError::Cuda { op, message })
}

#[cfg(ddpm_cuda_graphs)]
impl CudaGraph {
    pub fn new(device: usize) -> Result<Self, GraphError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: the shim writes either a graph or an error message.
        call("create", |e| {
            raw = unsafe { ffi::ddpm_graph_new(device as std::ffi::c_int, e) };
            i32::from(raw.is_null())
        })?;
        std::ptr::NonNull::new(raw)
            .map(|ptr| Self { ptr })
            .ok_or(GraphError::Cuda { op: "create", message: "no graph returned".into() })
    }

    /// Records what `work` issues on this thread instead of running it. `work` must use only tensors
    /// that outlive the graph at fixed addresses, and no host synchronisation.
    pub fn capture<T>(&mut self, work: impl FnOnce() -> T) -> Result<T, GraphError> {
        // SAFETY: `self.ptr` is a live graph owned by `self`.
        call("capture begin", |e| unsafe { ffi::ddpm_graph_capture_begin(self.ptr.as_ptr(), e) })?;
        let out = work();
        call("capture end", |e| unsafe { ffi::ddpm_graph_capture_end(self.ptr.as_ptr(), e) })?;
        Ok(out)
    }

    pub fn replay(&mut self) -> Result<(), GraphError> {
        // SAFETY: as above.
        call("replay", |e| unsafe { ffi::ddpm_graph_replay(self.ptr.as_ptr(), e) })
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
    pub fn new(_device: usize) -> Result<Self, GraphError> {
        Err(GraphError::Unavailable("built without a CUDA libtorch and CUDA runtime headers"))
    }

    pub fn capture<T>(&mut self, _work: impl FnOnce() -> T) -> Result<T, GraphError> {
        Err(GraphError::Unavailable("built without a CUDA libtorch and CUDA runtime headers"))
    }

    pub fn replay(&mut self) -> Result<(), GraphError> {
        Err(GraphError::Unavailable("built without a CUDA libtorch and CUDA runtime headers"))
    }
}

/// Whether this build can capture graphs at all (the device must also be CUDA).
pub const GRAPHS_BUILT: bool = cfg!(ddpm_cuda_graphs);
