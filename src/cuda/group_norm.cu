// Group normalisation of channels-last (NHWC) activations, with the ops around it in the UNet fused in:
// an optional per-(sample, channel) addend before the norm (the ResNet block's time embedding,
// `norm2(h + temb)`) and an optional SiLU after it. Three kernels:
//
//   1. moments:  per (sample, chunk of rows, group), Welford mean and M2 of x (+ addend), in float32;
//   2. finalize: per (sample, group), the chunks merged in a fixed order (Chan et al. 1979), and from
//                them one scale and shift per (sample, channel): y = x·(γ/σ) + (β − μ·γ/σ) (Wu & He 2018, eq. 1),
//                with the addend a folded into the shift, (x + a)·s + t = x·s + (t + a·s);
//   3. apply:    y = silu(x·s + t), 16-byte vectors in and out (scale and shift as float4s).
//
// Each activation is read twice and written once, where the same work as libtorch ops (the add, the
// statistics, the affine, the SiLU) reads it five times and writes it three times. Every sum runs
// in a fixed order (no atomics) over chunks whose size does not depend on the batch, so results repeat
// bit for bit and a sample's statistics do not depend on what else is in its batch.
//
// Loaded at run time from the fatbin that build.rs makes with nvcc (src/cuda/kernels.cpp), so these are
// plain extern "C" kernels with raw pointers and sizes; the host side checks shapes and alignment.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Channels per 16-byte vector.
template <typename T> __host__ __device__ constexpr int vector_width() { return 16 / sizeof(T); }

template <typename T> union Vector {
    uint4 raw;
    T lanes[vector_width<T>()];
};

// Chan et al.'s pairwise update: (n, mean, m2) absorbs (nb, mean_b, m2_b).
__device__ __forceinline__ void merge(float& n, float& mean, float& m2, float nb, float mean_b, float m2_b) {
    if (nb == 0.f) return;
    float total = n + nb;
    float delta = mean_b - mean;
    float weight = nb / total;
    mean += delta * weight;
    m2 += m2_b + delta * delta * n * weight;
    n = total;
}

// Block: (C / V, rows) threads; grid: (chunks, batch). x is [B, HW, C]; addend (or null) [B, C];
// partial is [B, chunks, G] of (mean, M2). Dynamic shared memory: 2·rows·C floats + rows ints.
template <typename T>
__device__ void moments(const T* __restrict__ x, const T* __restrict__ addend, float2* __restrict__ partial,
                        int hw, int c, int groups, int rows_per_chunk) {
    constexpr int V = vector_width<T>();
    extern __shared__ float shared[];
    const int rows = blockDim.y;
    float* shared_mean = shared;
    float* shared_m2 = shared + rows * c;
    int* shared_n = reinterpret_cast<int*>(shared + 2 * rows * c);

    const int b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
    const int channel0 = threadIdx.x * V;
    const int row_begin = chunk * rows_per_chunk;
    const int row_end = min(row_begin + rows_per_chunk, hw);

    float add[V], mean[V], m2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
        add[i] = addend != nullptr ? to_float(addend[(int64_t)b * c + channel0 + i]) : 0.f;
        mean[i] = 0.f;
        m2[i] = 0.f;
    }
    int n = 0;
    const T* sample = x + (int64_t)b * hw * c + channel0;
    for (int row = row_begin + threadIdx.y; row < row_end; row += rows) {
        Vector<T> v;
        v.raw = *reinterpret_cast<const uint4*>(sample + (int64_t)row * c);
        ++n;
        const float inverse = 1.f / n;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            float value = to_float(v.lanes[i]) + add[i];
            float delta = value - mean[i];
            mean[i] += delta * inverse;
            m2[i] += delta * (value - mean[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
        shared_mean[threadIdx.y * c + channel0 + i] = mean[i];
        shared_m2[threadIdx.y * c + channel0 + i] = m2[i];
    }
    if (threadIdx.x == 0) shared_n[threadIdx.y] = n;
    __syncthreads();

    const int per_group = c / groups;
    const int thread = threadIdx.y * blockDim.x + threadIdx.x;
    for (int g = thread; g < groups; g += blockDim.x * blockDim.y) {
        float total = 0.f, group_mean = 0.f, group_m2 = 0.f;
        for (int r = 0; r < rows; ++r) {
            for (int j = 0; j < per_group; ++j) {
                const int at = r * c + g * per_group + j;
                merge(total, group_mean, group_m2, (float)shared_n[r], shared_mean[at], shared_m2[at]);
            }
        }
        partial[((int64_t)b * chunks + chunk) * groups + g] = make_float2(group_mean, group_m2);
    }
}

// One warp per (sample, group): each lane merges every 32nd chunk, the lanes are merged by a fixed
// shuffle tree, then scale and shift ([B, C] each) are written per channel.
template <typename T>
__device__ void finalize(const float2* __restrict__ partial, const T* __restrict__ weight,
                         const T* __restrict__ bias, const T* __restrict__ addend, float* __restrict__ scale,
                         float* __restrict__ shift, int hw, int c, int groups, int chunks, int rows_per_chunk,
                         float eps) {
    const int b = blockIdx.x / groups, g = blockIdx.x % groups, lane = threadIdx.x;
    const int per_group = c / groups;
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (int k = lane; k < chunks; k += 32) {
        const float2 p = partial[((int64_t)b * chunks + k) * groups + g];
        const int rows = min(rows_per_chunk, hw - k * rows_per_chunk);
        merge(n, mean, m2, (float)rows * per_group, p.x, p.y);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        const float n_b = __shfl_down_sync(0xffffffffu, n, offset);
        const float mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
        const float m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
        merge(n, mean, m2, n_b, mean_b, m2_b);
    }
    n = __shfl_sync(0xffffffffu, n, 0);
    mean = __shfl_sync(0xffffffffu, mean, 0);
    m2 = __shfl_sync(0xffffffffu, m2, 0);
    // Biased variance, as GroupNorm.
    const float rstd = rsqrtf(fmaxf(m2 / n, 0.f) + eps);
    for (int j = lane; j < per_group; j += 32) {
        const int channel = g * per_group + j;
        const int64_t at = (int64_t)b * c + channel;
        const float s = to_float(weight[channel]) * rstd;
        float t = to_float(bias[channel]) - mean * s;
        if (addend != nullptr) t += to_float(addend[at]) * s;
        scale[at] = s;
        shift[at] = t;
    }
}

// Grid: (blocks, B); each block strides over the 16-byte vectors of one sample of x ([B, HW, C]); y has
// the same layout.
template <typename T, bool Silu>
__device__ void apply(const T* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ shift,
                      T* __restrict__ y, int hw, int c) {
    constexpr int V = vector_width<T>();
    const int per_row = c / V;
    const int per_sample = hw * per_row;
    const int64_t b = blockIdx.y;
    const uint4* in = reinterpret_cast<const uint4*>(x + b * hw * c);
    uint4* out = reinterpret_cast<uint4*>(y + b * hw * c);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < per_sample; i += gridDim.x * blockDim.x) {
        const int channel0 = (i % per_row) * V;
        // V is a multiple of 4 and so is c: whole, aligned float4s.
        const float4* s4 = reinterpret_cast<const float4*>(scale + b * c + channel0);
        const float4* t4 = reinterpret_cast<const float4*>(shift + b * c + channel0);
        float s[V], t[V];
#pragma unroll
        for (int k = 0; k < V / 4; ++k) {
            const float4 a = s4[k], d = t4[k];
            s[4 * k] = a.x, s[4 * k + 1] = a.y, s[4 * k + 2] = a.z, s[4 * k + 3] = a.w;
            t[4 * k] = d.x, t[4 * k + 1] = d.y, t[4 * k + 2] = d.z, t[4 * k + 3] = d.w;
        }
        Vector<T> v;
        v.raw = in[i];
#pragma unroll
        for (int lane = 0; lane < V; ++lane) {
            float value = fmaf(to_float(v.lanes[lane]), s[lane], t[lane]);
            // SiLU as torch computes it in float: x / (1 + exp(-x)).
            if (Silu) value = value / (1.f + expf(-value));
            v.lanes[lane] = from_float<T>(value);
        }
        out[i] = v.raw;
    }
}

}  // namespace

#define DDPM_GROUP_NORM_KERNELS(T, suffix)                                                                    \
    extern "C" __global__ void ddpm_gn_moments_##suffix(const T* x, const T* addend, float2* partial, int hw,   \
                                                         int c, int groups, int rows_per_chunk) {              \
        moments<T>(x, addend, partial, hw, c, groups, rows_per_chunk);                                         \
    }                                                                                                           \
    extern "C" __global__ void ddpm_gn_finalize_##suffix(const float2* partial, const T* weight, const T* bias,  \
                                                          const T* addend, float* scale, float* shift, int hw,  \
                                                          int c, int groups, int chunks, int rows_per_chunk,    \
                                                          float eps) {                                          \
        finalize<T>(partial, weight, bias, addend, scale, shift, hw, c, groups, chunks, rows_per_chunk, eps);   \
    }                                                                                                           \
    extern "C" __global__ void ddpm_gn_apply_##suffix(const T* x, const float* scale, const float* shift, T* y, \
                                                       int hw, int c) {                                         \
        apply<T, false>(x, scale, shift, y, hw, c);                                                             \
    }                                                                                                           \
    extern "C" __global__ void ddpm_gn_apply_silu_##suffix(const T* x, const float* scale, const float* shift, \
                                                            T* y, int hw, int c) {                              \
        apply<T, true>(x, scale, shift, y, hw, c);                                                              \
    }

DDPM_GROUP_NORM_KERNELS(float, f32)
DDPM_GROUP_NORM_KERNELS(__half, f16)
DDPM_GROUP_NORM_KERNELS(__nv_bfloat16, bf16)
