// common.cuh: helpers shared by every kernel file.
//
// Storage types are f32 and bf16; all arithmetic is f32. This header uses only standard CUDA
// (cuda_bf16.h conversions, __shfl_xor_sync, __syncthreads, shared memory) and no inline PTX, so
// the same code also compiles as C++ for the emulated GPU (crates/emu).
//
// Conventions for kernels that include it:
// - entry points are `extern "C" __global__` and named `<op>_<dtype>`;
// - 16-byte vector accesses are used only where the kernel has checked alignment at run time
//   (`aligned16`), with a scalar path for everything else, so any pointer offset and any column
//   count is correct;
// - element counts and offsets are 64-bit.
#pragma once

#include <cuda_bf16.h>

namespace ou {

typedef __nv_bfloat16 bf16;
typedef long long i64;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte vector.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / (int)sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// A 16-byte register vector viewed as N elements of T (one ld/st.global.v4 each way).
template <typename T> union Pack16 {
    uint4 raw;
    T e[Vec16<T>::N];
};

// Loads N (= 16 / sizeof(T)) elements at a 16-byte aligned address, as f32.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[Vec16<T>::N]) {
    Pack16<T> pk;
    pk.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) v[i] = to_f32(pk.e[i]);
}

// Stores N f32 values as T at a 16-byte aligned address (bf16: round to nearest even).
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[Vec16<T>::N]) {
    Pack16<T> pk;
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) pk.e[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = pk.raw;
}

// K consecutive elements (one 16-byte vector, or one element when K == 1) kept in their storage type,
// for a kernel that holds a row across several passes (the norms): 8 bf16 are 4 registers, not the 8
// of their f32 values, and registers bound those kernels' blocks per SM (ada_layernorm_bf16 needed 78
// with f32 items: 6 blocks of 128 threads; 64 with these: 8). Each pass converts again (exact, a few
// ALU instructions). load() needs a 16-byte aligned address when K is the vector width.
template <typename T, int K> struct CachedItem {
    Pack16<T> p;
    __device__ __forceinline__ void load(const T* src) { p.raw = *reinterpret_cast<const uint4*>(src); }
    __device__ __forceinline__ float operator[](int j) const { return to_f32(p.e[j]); }
};
template <typename T> struct CachedItem<T, 1> {
    T v;
    __device__ __forceinline__ void load(const T* src) { v = src[0]; }
    __device__ __forceinline__ float operator[](int) const { return to_f32(v); }
};

// Loads / stores K consecutive elements starting at p: one vector when K is the vector width
// (p must then be 16-byte aligned), K scalars when K == 1.
template <typename T, int K>
__device__ __forceinline__ void load_k(const T* p, float (&v)[K]) {
    if constexpr (K == 1) {
        v[0] = to_f32(p[0]);
    } else {
        static_assert(K == Vec16<T>::N, "K is 1 or the vector width");
        load_vec<T>(p, v);
    }
}

template <typename T, int K>
__device__ __forceinline__ void store_k(T* p, const float (&v)[K]) {
    if constexpr (K == 1) {
        p[0] = from_f32<T>(v[0]);
    } else {
        static_assert(K == Vec16<T>::N, "K is 1 or the vector width");
        store_vec<T>(p, v);
    }
}

// Sum over groups of `width` consecutive lanes (width a power of two <= 32). Every lane of the
// warp must call it; each lane gets its own group's sum.
__device__ __forceinline__ float warp_sum(float v, int width) {
    for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the blockDim.x threads that share threadIdx.y (one "row group"). Every thread of the
// block must call it (it may contain barriers). blockDim.x is either a power of two <= 32 (the
// sum stays within the warp, no barrier) or a multiple of 32 (partial sums of each warp go
// through `red`, which holds at least 32 floats of shared memory). The order of the additions is
// fixed, so results are deterministic.
__device__ __forceinline__ float row_group_sum(float v, float* red) {
    const int tx = blockDim.x;
    if (tx <= 32) return warp_sum(v, tx);
    v = warp_sum(v, 32);
    const int warps = tx >> 5;
    const int base = threadIdx.y * warps;
    if ((threadIdx.x & 31) == 0) red[base + (threadIdx.x >> 5)] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += red[base + i];
    __syncthreads();  // `red` is reused by the next call
    return s;
}

}  // namespace ou
