// Host side of src/cuda/group_norm.cu: checks the tensors, loads the kernels and launches them on the
// thread's current stream (so they are recorded inside a CUDA graph capture like libtorch's own).
//
// The kernels come as a fatbin that build.rs made with nvcc and the Rust side embeds. They are loaded
// with the driver's library API (cuLibraryLoadData: context-independent, one load for every device),
// reached through the libcuda.so.1 that libtorch already loaded, so the binary links no CUDA library of
// its own, as with shim.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>

#include "common.h"

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace {

struct Driver {
    decltype(&cuGetErrorString) get_error_string = nullptr;
    decltype(&cuLibraryLoadData) library_load_data = nullptr;
    decltype(&cuLibraryGetKernel) library_get_kernel = nullptr;
    decltype(&cuLaunchKernel) launch_kernel = nullptr;
    decltype(&cuCtxGetCurrent) ctx_get_current = nullptr;
    decltype(&cuCtxSetCurrent) ctx_set_current = nullptr;
    decltype(&cuDeviceGet) device_get = nullptr;
    decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
    std::string error;

    Driver() {
        void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (handle == nullptr) handle = dlopen("libcuda.so.1", RTLD_NOW);
        if (handle == nullptr) {
            error = "libcuda.so.1 not found";
            return;
        }
        bool ok = find(handle, "cuGetErrorString", get_error_string) &&
                  find(handle, "cuLibraryLoadData", library_load_data) &&
                  find(handle, "cuLibraryGetKernel", library_get_kernel) &&
                  find(handle, "cuLaunchKernel", launch_kernel) &&
                  find(handle, "cuCtxGetCurrent", ctx_get_current) &&
                  find(handle, "cuCtxSetCurrent", ctx_set_current) && find(handle, "cuDeviceGet", device_get) &&
                  find(handle, "cuDevicePrimaryCtxRetain", primary_ctx_retain);
        if (!ok) error = std::string("libcuda.so.1 lacks ") + missing;
    }

    template <typename F>
    bool find(void* handle, const char* name, F& out) {
        out = reinterpret_cast<F>(dlsym(handle, name));
        if (out == nullptr) missing = name;
        return out != nullptr;
    }

    void check(CUresult result, const char* what) const {
        if (result == CUDA_SUCCESS) return;
        const char* text = nullptr;
        if (get_error_string == nullptr || get_error_string(result, &text) != CUDA_SUCCESS || text == nullptr) {
            text = "unknown CUDA error";
        }
        TORCH_CHECK(false, what, ": ", text, " (", static_cast<int>(result), ")");
    }

    const char* missing = "";
};

const Driver& driver() {
    static const Driver instance;
    TORCH_CHECK(instance.error.empty(), instance.error);
    return instance;
}

// The kernels of one fatbin, looked up by name once.
class Library {
  public:
    CUkernel kernel(const void* fatbin, const std::string& name) {
        std::lock_guard<std::mutex> lock(mutex_);
        const Driver& cuda = driver();
        // A failed load is not retried: the same fatbin would fail the same way at every call.
        TORCH_CHECK(load_error_.empty(), load_error_);
        if (library_ == nullptr) {
            try {
                cuda.check(cuda.library_load_data(&library_, fatbin, nullptr, nullptr, 0, nullptr, nullptr, 0),
                           "loading the group-norm kernels");
            } catch (const c10::Error& e) {
                load_error_ = e.what_without_backtrace();
                library_ = nullptr;
                throw;
            }
        }
        auto found = kernels_.find(name);
        if (found != kernels_.end()) return found->second;
        CUkernel kernel = nullptr;
        cuda.check(cuda.library_get_kernel(&kernel, library_, name.c_str()), name.c_str());
        kernels_.emplace(name, kernel);
        return kernel;
    }

  private:
    std::mutex mutex_;
    CUlibrary library_ = nullptr;
    std::string load_error_;
    std::map<std::string, CUkernel> kernels_;
};

Library& library() {
    static Library instance;
    return instance;
}

// The thread's current device for a scope. (c10's CUDAGuard would inline CUDA runtime calls, which the
// binary does not link: only libtorch's and c10's exported functions are called here.)
class DeviceScope {
  public:
    explicit DeviceScope(c10::DeviceIndex device) : previous_(c10::cuda::current_device()) {
        if (previous_ != device) c10::cuda::set_device(device);
    }
    ~DeviceScope() {
        try {
            c10::cuda::set_device(previous_);
        } catch (...) {
        }
    }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

  private:
    c10::DeviceIndex previous_;
};

// A kernel launches into the current context; a thread that has only used the runtime API through
// libtorch normally has the device's primary context current, and gets it here otherwise.
void make_context_current(int device) {
    const Driver& cuda = driver();
    CUcontext current = nullptr;
    cuda.check(cuda.ctx_get_current(&current), "cuCtxGetCurrent");
    if (current != nullptr) return;
    CUdevice handle = 0;
    cuda.check(cuda.device_get(&handle, device), "cuDeviceGet");
    CUcontext primary = nullptr;
    cuda.check(cuda.primary_ctx_retain(&primary, handle), "cuDevicePrimaryCtxRetain");
    cuda.check(cuda.ctx_set_current(primary), "cuCtxSetCurrent");
}

void launch(const void* fatbin, const std::string& name, dim3 grid, dim3 block, unsigned shared, CUstream stream,
            void** arguments) {
    CUkernel kernel = library().kernel(fatbin, name);
    const Driver& cuda = driver();
    cuda.check(cuda.launch_kernel(reinterpret_cast<CUfunction>(kernel), grid.x, grid.y, grid.z, block.x, block.y,
                                  block.z, shared, stream, arguments, nullptr),
               name.c_str());
}

// Rows of one sample per chunk of the statistics: fixed, so that a sample's statistics (and their
// rounding) do not depend on the batch it is in.
constexpr int kRowsPerChunk = 256;
constexpr int kThreads = 256;
constexpr size_t kMaxShared = 48 * 1024;

}  // namespace

extern "C" {

// y = silu?(group_norm(x + addend)), x channels-last [B, C, H, W] on CUDA, addend (nullable) [B, C],
// weight and bias [C], all of x's dtype (float32, float16 or bfloat16). *out receives a new tensor.
int ddpm_group_norm_nhwc(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                         const at::Tensor* addend, int64_t groups, double eps, int silu, const void* fatbin,
                         at::Tensor** out, char** error) {
    return guarded(error, [&] {
        const at::Tensor& xs = *x;
        TORCH_CHECK(xs.is_cuda() && xs.dim() == 4, "group norm kernel: x must be a 4-D CUDA tensor");
        TORCH_CHECK(xs.is_contiguous(at::MemoryFormat::ChannelsLast), "group norm kernel: x must be channels-last");
        const char* suffix = nullptr;
        switch (xs.scalar_type()) {
            case at::kFloat: suffix = "f32"; break;
            case at::kHalf: suffix = "f16"; break;
            case at::kBFloat16: suffix = "bf16"; break;
            default: TORCH_CHECK(false, "group norm kernel: unsupported dtype ", xs.scalar_type());
        }
        const int64_t batch = xs.size(0), channels = xs.size(1), hw = xs.size(2) * xs.size(3);
        const int64_t width = 16 / static_cast<int64_t>(xs.element_size());
        TORCH_CHECK(groups > 0 && channels % groups == 0, "group norm kernel: ", channels, " channels in ", groups,
                    " groups");
        TORCH_CHECK(channels % width == 0 && channels / width <= 1024,
                    "group norm kernel: channels must be a multiple of ", width, " up to ", width * 1024);
        TORCH_CHECK(reinterpret_cast<uintptr_t>(xs.data_ptr()) % 16 == 0, "group norm kernel: x is not 16-byte aligned");
        TORCH_CHECK(hw * channels < (int64_t{1} << 31) && batch < 65536, "group norm kernel: tensor too large");
        for (const at::Tensor* p : {weight, bias}) {
            TORCH_CHECK(p->scalar_type() == xs.scalar_type() && p->device() == xs.device() && p->is_contiguous() &&
                            p->numel() == channels,
                        "group norm kernel: weight and bias must be [C] of x's dtype and device");
        }
        at::Tensor add;
        if (addend != nullptr) {
            add = addend->reshape({batch, channels}).contiguous();
            TORCH_CHECK(add.scalar_type() == xs.scalar_type() && add.device() == xs.device(),
                        "group norm kernel: addend must be [B, C] of x's dtype and device");
        }

        const int device = xs.get_device();
        DeviceScope scope(xs.device().index());
        make_context_current(device);
        CUstream stream = c10::cuda::getCurrentCUDAStream(device).stream();

        const int per_row = static_cast<int>(channels / width);
        const int rows = std::max(1, kThreads / per_row);
        const size_t shared = (2 * static_cast<size_t>(rows) * channels) * sizeof(float) + rows * sizeof(int);
        TORCH_CHECK(shared <= kMaxShared, "group norm kernel: too many channels (", channels, ")");
        const int chunks = static_cast<int>((hw + kRowsPerChunk - 1) / kRowsPerChunk);

        auto floats = xs.options().dtype(at::kFloat);
        at::Tensor partial = at::empty({batch * chunks * groups * 2}, floats);
        at::Tensor scale = at::empty({batch * channels}, floats);
        at::Tensor shift = at::empty({batch * channels}, floats);
        at::Tensor y = at::empty_like(xs, at::MemoryFormat::ChannelsLast);

        const void* x_ptr = xs.data_ptr();
        const void* add_ptr = add.defined() ? add.data_ptr() : nullptr;
        void* partial_ptr = partial.data_ptr();
        void* scale_ptr = scale.data_ptr();
        void* shift_ptr = shift.data_ptr();
        const void* weight_ptr = weight->data_ptr();
        const void* bias_ptr = bias->data_ptr();
        void* y_ptr = y.data_ptr();
        int b = static_cast<int>(batch), c = static_cast<int>(channels), g = static_cast<int>(groups);
        int hw_int = static_cast<int>(hw), rows_per_chunk = kRowsPerChunk, chunks_int = chunks;
        float eps_float = static_cast<float>(eps);
        const std::string name = suffix;

        void* moments_args[] = {&x_ptr, &add_ptr, &partial_ptr, &hw_int, &c, &g, &rows_per_chunk};
        launch(fatbin, "ddpm_gn_moments_" + name, dim3(chunks, b), dim3(per_row, rows), shared, stream, moments_args);

        void* finalize_args[] = {&partial_ptr, &weight_ptr, &bias_ptr,   &add_ptr,        &scale_ptr, &shift_ptr,
                                 &hw_int,      &c,          &g,          &chunks_int,     &rows_per_chunk, &eps_float};
        launch(fatbin, "ddpm_gn_finalize_" + name, dim3(b * g), dim3(32), 0, stream, finalize_args);

        // Enough blocks per sample to fill the GPU several times over at batch 1; more only stride.
        const int64_t per_sample = hw * channels / width;
        const int64_t blocks = std::min<int64_t>((per_sample + kThreads - 1) / kThreads, 4096);
        void* apply_args[] = {&x_ptr, &scale_ptr, &shift_ptr, &y_ptr, &hw_int, &c};
        launch(fatbin, (silu ? "ddpm_gn_apply_silu_" : "ddpm_gn_apply_") + name,
               dim3(static_cast<unsigned>(blocks), b), dim3(kThreads), 0, stream, apply_args);

        *out = new at::Tensor(std::move(y));
    });
}

}  // extern "C"
