// cuda/common.cuh — what every CUDA twin in kernels/cuda/*.cu shares (not a public API):
// argument checks with the CPU ops' message shape, the element types and their float
// conversions, launch sizes and the elementwise launch, warp/block reductions, and the
// channels_last column tiling of the per-channel kernels (ColumnGrid).
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

// The per-channel ops' layout rule: every 4-D operand of a call shares the memory format of
// `ref` (the op's input). Undefined tensors and tensors of another rank (statistics [C], gates
// [N, C]: always nchw) are not checked here; their shape checks cover them. The message names
// the op and both tensors: "op: output [2, 3, 4, 4] is channels_last but the input [..] is nchw"
// (ref_name "the input"), worded as the CPU twins' (cpu::require_same_format).
inline void require_format_of(const char* op, const char* name, const Tensor& t, const char* ref_name,
                              const Tensor& ref) {
  if (!t.defined() || t.ndim() != 4) return;
  LANCET_CHECK(t.format() == ref.format(), op << ": " << name << " " << t.shape_str() << " is "
                                              << memory_format_name(t.format()) << " but " << ref_name << " "
                                              << ref.shape_str() << " is " << memory_format_name(ref.format()));
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

// ---- channels_last column reductions -----------------------------------------------------------
// A channels_last activation is rows of C contiguous channels: [N, C, H, W] stored N, H, W, C is
// [B, R, C] with B = N, R = H * W (per-(n, c) ops: average pooling, SE gates) or B = 1,
// R = N * H * W (BatchNorm's per-channel statistics). A ColumnGrid tiles it so that reads run
// along C: block (blockDim.x = ct, blockDim.y = rp) with ct * rp = kBlock; thread (tx, ty) of
// block (x, y, z) owns channel c = x * ct + tx of batch b = b0 + z and the rows r0 + ty, r0 + ty + rp,
// ... below r1, where [r0, r1) = [y * chunk, min(R, (y + 1) * chunk)) is chunk y of the rows. A
// warp thus reads 32 / ct consecutive rows' ct adjacent channels: one contiguous run of memory
// when C <= ct, ct contiguous elements of each row otherwise.
// The geometry depends on (B, R, C) alone, so a reduction that sums each thread's rows in order,
// then the column over ty in a fixed tree (column_sum), then chunk y's partials in order is
// deterministic run to run.
struct ColumnGrid {
  int64_t B, R, C;
  int64_t chunk;    // rows per chunk (gridDim.y chunks; each non-empty)
  unsigned tiles;   // channel tiles: gridDim.x = ceil(C / ct)
  unsigned splits;  // row chunks: gridDim.y, at most 65535
  int ct, rp;       // blockDim: ct channels (a power of two <= 32) x rp rows, ct * rp = kBlock
  int64_t b0;       // this launch's first batch entry: a batch over gridDim.z's limit of
  unsigned bz;      // kMaxGridZ is launched in slices [b0, b0 + bz) (for_each_column_launch)
};
constexpr int64_t kMaxGridZ = 65535;

// Requires B, R, C > 0. About `target_blocks` blocks in all, each at least `min_passes` passes
// of rp rows where the rows allow it.
inline ColumnGrid column_grid(int64_t B, int64_t R, int64_t C, int64_t target_blocks = 2048, int64_t min_passes = 4) {
  ColumnGrid g{};
  g.B = B;
  g.R = R;
  g.C = C;
  g.ct = 1;
  while (g.ct < 32 && g.ct < C) g.ct *= 2;  // small C: whole rows per warp, few idle lanes
  g.rp = kBlock / g.ct;
  const int64_t tiles = (C + g.ct - 1) / g.ct;
  const int64_t want = (target_blocks + tiles * B - 1) / (tiles * B);
  const int64_t by_rows = (R + min_passes * g.rp - 1) / (min_passes * g.rp);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, by_rows, 65535}));
  g.chunk = (R + splits - 1) / splits;
  g.splits = static_cast<unsigned>((R + g.chunk - 1) / g.chunk);  // <= splits: every chunk non-empty
  g.tiles = static_cast<unsigned>(tiles);
  g.b0 = 0;
  g.bz = static_cast<unsigned>(std::min(B, kMaxGridZ));
  return g;
}
// The launches: for_each_column_launch(g, [&](const ColumnGrid& part) {
//   kernel<<<column_blocks(part), column_threads(part), 0, stream>>>(..., part, ...); });
// part is g for one slice of at most kMaxGridZ batch entries (one launch for B <= 65535). The
// slices write disjoint outputs and partials, so the result does not depend on the slicing.
template <typename Launch> void for_each_column_launch(const ColumnGrid& g, Launch&& launch) {
  for (int64_t b0 = 0; b0 < g.B; b0 += kMaxGridZ) {
    ColumnGrid part = g;
    part.b0 = b0;
    part.bz = static_cast<unsigned>(std::min(g.B - b0, kMaxGridZ));
    launch(static_cast<const ColumnGrid&>(part));
  }
}
inline dim3 column_blocks(const ColumnGrid& g) { return dim3(g.tiles, g.splits, g.bz); }
inline dim3 column_threads(const ColumnGrid& g) {
  return dim3(static_cast<unsigned>(g.ct), static_cast<unsigned>(g.rp));
}

// This thread's channel (may be >= C in the last tile: such threads load nothing but still
// take part in column_sum) and its (b, c) index into a [B, C] output.
__device__ __forceinline__ int64_t column_channel() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t column_batch(const ColumnGrid& g) { return g.b0 + blockIdx.z; }
__device__ __forceinline__ int64_t column_output(const ColumnGrid& g, int64_t c) {
  return column_batch(g) * g.C + c;
}
// The slot of this block's partial for output `o` ([B, C] index) among gridDim.y chunks:
// partials of one output are contiguous, in chunk order.
__device__ __forceinline__ int64_t column_partial(int64_t o) { return o * gridDim.y + blockIdx.y; }

// Walks this thread's rows in row order, offset o = (b * R + r) * C + c: use(o, load(o)) for
// each. Rows go in batches of kColumnBatch whose loads are all issued before the first use, so a
// thread has several loads in flight even when use() stores (which the compiler may not move a
// later load above: outputs may alias inputs). load(o) reads the row's inputs (a float or a
// small struct); use(o, v) computes, stores and accumulates — in row order, so sums are
// deterministic. An element is loaded before it is used, so an output may be its input. Nothing
// for a channel >= C. Contains no barrier.
constexpr int kColumnBatch = 4;
template <typename Load, typename Use>
__device__ __forceinline__ void for_column_rows(const ColumnGrid& g, Load&& load, Use&& use) {
  const int64_t c = column_channel();
  if (c >= g.C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * g.chunk;
  const int64_t r1 = r0 + g.chunk < g.R ? r0 + g.chunk : g.R;
  const int64_t base = column_batch(g) * g.R * g.C + c;
  const int64_t step = blockDim.y;
  int64_t r = r0 + threadIdx.y;
  for (; r + (kColumnBatch - 1) * step < r1; r += kColumnBatch * step) {  // kColumnBatch whole rows
    decltype(load(base)) v[kColumnBatch];
#pragma unroll
    for (int k = 0; k < kColumnBatch; ++k) v[k] = load(base + (r + k * step) * g.C);
#pragma unroll
    for (int k = 0; k < kColumnBatch; ++k) use(base + (r + k * step) * g.C, v[k]);
  }
  for (; r < r1; r += step) use(base + r * g.C, load(base + r * g.C));  // the last few
}

// The sum of v over the block's threads with this threadIdx.x (its column of rp rows), in a
// fixed tree (blockDim.y a power of two); every thread gets its column's sum. `shared` holds
// blockDim.x * blockDim.y values. Contains __syncthreads: call from all threads.
template <typename A> __device__ A column_sum(A v, A* shared) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  __syncthreads();  // `shared` may still be read by a previous call
  shared[t] = v;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.y) < s) shared[t] += shared[t + s * blockDim.x];
    __syncthreads();
  }
  return shared[threadIdx.x];
}

// The end of this thread's one-sum column reduction for output o (call where threadIdx.y == 0
// and c < C): with one chunk (gridDim.y == 1) the result itself, out[o] = sum / divisor rounded
// to T; otherwise the chunk's partial, for column_partials_sum_kernel (partials: B * C * splits).
template <typename T>
__device__ __forceinline__ void store_column_result(double sum, int64_t o, double divisor, double* partials, T* out) {
  if (gridDim.y == 1)
    out[o] = store_f<T>(static_cast<float>(sum / divisor));
  else
    partials[column_partial(o)] = sum;
}

// out[o] = (sum of output o's `splits` partials, in chunk order) / divisor, rounded to T; the
// second pass of a [B, C] column reduction (o = b * C + c), launched when splits > 1; with one
// chunk store_column_result has written the same value (0 + sum: exact).
template <typename T>
__global__ void column_partials_sum_kernel(const double* partials, int64_t splits, int64_t outputs, double divisor,
                                           T* out) {
  for (int64_t o = first_index(); o < outputs; o += grid_stride()) {
    double sum = 0;
    for (int64_t k = 0; k < splits; ++k) sum += partials[o * splits + k];
    out[o] = store_f<T>(static_cast<float>(sum / divisor));
  }
}

// The host side of a one-sum column reduction: scratch for its partials (B * C * splits doubles
// in i64 storage, from the caching allocator; none with one chunk), and the second pass.
inline Tensor column_partials_scratch(const ColumnGrid& g, Device device) {
  static_assert(sizeof(double) == sizeof(int64_t), "doubles are stored in i64 tensors");
  return g.splits > 1 ? Tensor::empty({g.B * g.C * static_cast<int64_t>(g.splits)}, DType::i64, device) : Tensor();
}
inline double* column_partials_ptr(Tensor& scratch) {
  return scratch.defined() ? static_cast<double*>(scratch.raw_data()) : nullptr;
}
template <typename T>
void finish_column_sum(const ColumnGrid& g, const double* partials, double divisor, T* out, cudaStream_t st) {
  if (g.splits == 1) return;
  const int64_t outputs = g.B * g.C;
  column_partials_sum_kernel<T><<<grid_for(outputs), kBlock, 0, st>>>(partials, g.splits, outputs, divisor, out);
  LANCET_CUDA_LAUNCH_CHECK();
}

}  // namespace lancet::cuda
