// cuda/common.cuh — what every CUDA twin in kernels/cuda/*.cu shares (not a public API):
// argument checks with the CPU ops' message shape, the element types and their float
// conversions, launch sizes and the elementwise launch, warp/block reductions.
//
// Element types: kernels are templates over T in {float, __half, __nv_bfloat16} (the storage of
// DType f32, f16, bf16); arithmetic is in float (load_f / store_f), statistics and reductions
// accumulate in float or double as their CPU twins do. LANCET_CUDA_FLOAT_TYPES dispatches a
// DType to the template. Every launch is followed by LANCET_CUDA_LAUNCH_CHECK().
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/runtime.h"
#include "kernels/error.h"
#include "kernels/tensor.h"

#define LANCET_CUDA_LAUNCH_CHECK() LANCET_CUDA_CHECK(cudaGetLastError())

// Runs the statement block with `scalar_t` bound to the CUDA type of `dtype` (f32, f16, bf16);
// any other dtype throws naming the op.
#define LANCET_CUDA_FLOAT_TYPES(dtype, op, ...)                                                 \
  do {                                                                                         \
    switch (dtype) {                                                                           \
      case ::lancet::DType::f32: { using scalar_t = float; __VA_ARGS__; } break;               \
      case ::lancet::DType::f16: { using scalar_t = __half; __VA_ARGS__; } break;              \
      case ::lancet::DType::bf16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; } break;      \
      default: LANCET_FAIL(op << ": dtype " << ::lancet::dtype_name(dtype) << " (expected f32, f16 or bf16)"); \
    }                                                                                          \
  } while (0)

namespace lancet::cuda {

inline cudaStream_t native(const Stream& s) { return static_cast<cudaStream_t>(s.native); }

// The CUDA twin of cpu::require_cpu: `x` and every defined tensor in `others` on the stream's
// GPU. Sets nothing; callers hold a CudaDeviceGuard for the launch.
inline void require_cuda(const char* op, const Stream& s, const Tensor& x,
                         std::initializer_list<const Tensor*> others = {}) {
  LANCET_CHECK(x.defined(), op << ": input is an undefined tensor");
  LANCET_CHECK(s.device == x.device(),
               op << ": stream is on " << s.device.str() << " but the input is on " << x.device().str());
  for (const Tensor* t : others) {
    if (!t->defined()) continue;
    LANCET_CHECK(t->device() == x.device(), op << ": tensor " << t->shape_str() << " is on " << t->device().str()
                                               << " but the input " << x.shape_str() << " is on " << x.device().str());
  }
}

inline void require_nchw(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    LANCET_CHECK(!t->defined() || t->format() == MemoryFormat::nchw,
                 op << ": channels_last tensor " << t->shape_str() << " is not supported by this kernel");
}

inline void require_dtype(const char* op, const char* name, const Tensor& t, DType dt) {
  LANCET_CHECK(t.dtype() == dt, op << ": " << name << " " << t.shape_str() << " must be " << dtype_name(dt)
                                   << ", got " << dtype_name(t.dtype()));
}

// `t` matches `ref` in shape, dtype and memory format (elementwise over memory needs all three).
inline void require_same(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
  LANCET_CHECK(t.shape() == ref.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match " << ref_name << " " << ref.shape_str());
  require_dtype(op, name, t, ref.dtype());
  LANCET_CHECK(t.format() == ref.format(), op << ": " << name << " " << t.shape_str() << " and " << ref_name << " "
                                              << ref.shape_str() << " differ in memory format");
}

// ---- element types --------------------------------------------------------------------------
__device__ __forceinline__ float load_f(float v) { return v; }
__device__ __forceinline__ float load_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float load_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store_f(float v);
template <> __device__ __forceinline__ float store_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The CUDA type of a Tensor's storage, for typed access from host code.
template <typename T> T* ptr(Tensor& t) { return static_cast<T*>(t.raw_data()); }
template <typename T> const T* ptr(const Tensor& t) { return static_cast<const T*>(t.raw_data()); }

// ---- launch sizes ---------------------------------------------------------------------------
constexpr int kBlock = 256;
// Blocks for a grid-stride loop over n elements: enough to fill the GPU, never more than n needs.
inline unsigned grid_for(int64_t n, int block = kBlock) {
  const int64_t b = (n + block - 1) / block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(b, 65535LL * 8)));
}

// Threads for a one-block-per-plane kernel: a warp for small planes, up to 256 (multiples of 32,
// as block_sum needs).
inline int plane_block(int64_t hw) { return hw <= 32 ? 32 : hw <= 64 ? 64 : hw <= 128 ? 128 : 256; }

// Grid-stride loops: for (int64_t i = first_index(); i < n; i += grid_stride()).
__device__ __forceinline__ int64_t first_index() { return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(blockDim.x) * gridDim.x; }

// The launch of a grid-stride elementwise kernel over n elements.
struct ElementwiseLaunch {
  unsigned grid;
  int block;
  cudaStream_t stream;
};

// The launch every elementwise twin shares (after its argument checks): nothing when n == 0;
// otherwise, with s's device current, launch(T{}, L) with T the CUDA type of `dtype` (f32, f16,
// bf16; any other throws naming op), which launches its kernel <<<L.grid, L.block, 0, L.stream>>>;
// then the launch check. In the lambda: `using T = decltype(t);`.
template <typename Launch>
void launch_elementwise(const char* op, DType dtype, int64_t n, const Stream& s, Launch&& launch) {
  if (n == 0) return;
  CudaDeviceGuard guard(s.device.index);
  const ElementwiseLaunch L{grid_for(n), kBlock, native(s)};
  LANCET_CUDA_FLOAT_TYPES(dtype, op, launch(scalar_t{}, L));
  LANCET_CUDA_LAUNCH_CHECK();
}

// ---- reductions -----------------------------------------------------------------------------
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds at least 32 values. Contains __syncthreads: call from all threads.
template <typename A> __device__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : A(0);
  return warp_sum(v);
}

}  // namespace lancet::cuda
