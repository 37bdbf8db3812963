// cuda/conv_util.cu — see conv_util.h. Every kernel is a grid-stride loop or a fixed tiling
// whose results do not depend on the grid size, so sums are reproducible run to run.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv_util.h"

namespace lancet::cuda {
namespace {

// Elements of one channel summed by one block of the partial-sum kernels (a fixed function of
// the shape, so the summation order is too). At most kMaxChunks chunks per channel.
constexpr int64_t kChunk = 4096;      // inner > 1: elements per (channel, chunk) block
constexpr int64_t kRowChunk = 512;    // inner == 1: rows per (32 channels, chunk) block
constexpr int64_t kMaxChunks = 1024;  // also bounds gridDim.y

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T>
__global__ void add_bias_kernel(T* __restrict__ y, const float* __restrict__ b, int64_t n, int64_t C, int64_t inner) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) y[i] = store_f<T>(load_f(y[i]) + b[(i / inner) % C]);
}

// partial[c * chunks + k] = sum of channel c's elements j in [k * chunk, (k + 1) * chunk) of
// the outer * inner elements of that channel (j = o * inner + i). Block (c, k), any size that
// is a multiple of 32.
template <typename T>
__global__ void channel_partials_kernel(const T* __restrict__ dy, float* __restrict__ partial, int64_t outer,
                                        int64_t C, int64_t inner, int64_t chunk) {
  __shared__ float shared[32];
  const int64_t c = blockIdx.x, k = blockIdx.y, m = outer * inner;
  const int64_t j0 = k * chunk, j1 = min(m, j0 + chunk);
  float v = 0.f;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const int64_t o = j / inner, i = j - o * inner;
    v += load_f(dy[(o * C + c) * inner + i]);
  }
  v = block_sum(v, shared);
  if (threadIdx.x == 0) partial[c * gridDim.y + k] = v;
}

// The same for inner == 1 (rows of C channels): a 32 x 8 block covers 32 adjacent channels so
// that each warp reads 32 consecutive elements of a row; rows [k * chunk, (k + 1) * chunk).
template <typename T>
__global__ void channel_partials_rows_kernel(const T* __restrict__ dy, float* __restrict__ partial, int64_t rows,
                                             int64_t C, int64_t chunk) {
  __shared__ float tile[8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x, k = blockIdx.y;
  const int64_t r0 = k * chunk, r1 = min(rows, r0 + chunk);
  float v = 0.f;
  if (c < C)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) v += load_f(dy[r * C + c]);
  tile[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
    for (int q = 0; q < 8; ++q) t += tile[q][threadIdx.x];
    partial[c * gridDim.y + k] = t;
  }
}

__global__ void add_partials_kernel(const float* __restrict__ partial, float* __restrict__ db, int64_t C,
                                    int64_t chunks) {
  for (int64_t c = global_thread(); c < C; c += grid_threads()) {
    double t = 0;
    for (int64_t k = 0; k < chunks; ++k) t += partial[c * chunks + k];
    db[c] += static_cast<float>(t);
  }
}

// The index in the other layout of element i of an [N, C, H, W] tensor laid out NHWC (nhwc)
// or NCHW (!nhwc).
__device__ __forceinline__ int64_t other_layout_index(int64_t i, int64_t C, int64_t H, int64_t W, bool nhwc) {
  int64_t r = i;
  if (nhwc) {  // i = ((n * H + h) * W + w) * C + c
    const int64_t c = r % C; r /= C;
    const int64_t w = r % W; r /= W;
    const int64_t h = r % H, n = r / H;
    return ((n * C + c) * H + h) * W + w;
  }
  // i = ((n * C + c) * H + h) * W + w
  const int64_t w = r % W; r /= W;
  const int64_t h = r % H; r /= H;
  const int64_t c = r % C, n = r / C;
  return ((n * H + h) * W + w) * C + c;
}

// dst[i] (= or +=) src[j] where i indexes dst's layout and j the same [n, c, h, w] in src's
// (the other one). One thread per dst element: writes coalesced, reads gathered.
template <typename T>
__global__ void convert_format_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t N, int64_t C,
                                      int64_t H, int64_t W, bool dst_nhwc, bool accumulate) {
  const int64_t n_all = N * C * H * W;
  for (int64_t i = global_thread(); i < n_all; i += grid_threads()) {
    const int64_t j = other_layout_index(i, C, H, W, dst_nhwc);
    dst[i] = accumulate ? store_f<T>(load_f(dst[i]) + load_f(src[j])) : src[j];
  }
}

// dst[i] += src[j], dst f32 in its layout, src of type S in its own (the same index when the
// layouts agree).
template <typename S>
__global__ void accumulate_f32_kernel(const S* __restrict__ src, float* __restrict__ dst, int64_t N, int64_t C,
                                      int64_t H, int64_t W, bool dst_nhwc, bool src_nhwc) {
  const int64_t n_all = N * C * H * W;
  for (int64_t i = global_thread(); i < n_all; i += grid_threads()) {
    const int64_t j = dst_nhwc == src_nhwc ? i : other_layout_index(i, C, H, W, dst_nhwc);
    dst[i] += load_f(src[j]);
  }
}

template <typename T>
__global__ void cast_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) dst[i] = store_f<T>(src[i]);
}

int64_t chunks_for(int64_t m, int64_t per_chunk, int64_t* chunk) {
  int64_t count = std::max<int64_t>(1, (m + per_chunk - 1) / per_chunk);
  if (count > kMaxChunks) count = kMaxChunks;
  *chunk = (m + count - 1) / count;
  return (m + *chunk - 1) / *chunk;  // every chunk non-empty
}

}  // namespace

ChannelView channel_view(const Tensor& t) {
  if (t.ndim() == 2) return {t.dim(0), t.dim(1), 1};
  LANCET_CHECK(t.ndim() == 4, "channel_view: expected a 2-D or 4-D tensor, got " << t.shape_str());
  if (t.format() == MemoryFormat::channels_last) return {t.dim(0) * t.dim(2) * t.dim(3), t.dim(1), 1};
  return {t.dim(0), t.dim(1), t.dim(2) * t.dim(3)};
}

void add_channel_bias(Tensor& y, const Tensor& b, const Stream& s) {
  const ChannelView v = channel_view(y);
  const int64_t n = y.numel();
  if (n == 0) return;
  LANCET_CUDA_FLOAT_TYPES(y.dtype(), "add_channel_bias", {
    add_bias_kernel<scalar_t><<<grid_for(n), kBlock, 0, native(s)>>>(ptr<scalar_t>(y), ptr<float>(b), n, v.channels,
                                                                     v.inner);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

void accumulate_channel_sum(const Tensor& dy, Tensor& db, const Stream& s) {
  const ChannelView v = channel_view(dy);
  const int64_t m = v.outer * v.inner;  // elements per channel
  if (m == 0 || v.channels == 0) return;
  int64_t chunk = 0;
  const int64_t chunks = chunks_for(m, v.inner == 1 ? kRowChunk : kChunk, &chunk);
  Tensor partial = Tensor::empty({v.channels * chunks}, DType::f32, dy.device());
  LANCET_CUDA_FLOAT_TYPES(dy.dtype(), "accumulate_channel_sum", {
    if (v.inner == 1) {
      const dim3 grid(static_cast<unsigned>((v.channels + 31) / 32), static_cast<unsigned>(chunks));
      channel_partials_rows_kernel<scalar_t>
          <<<grid, dim3(32, 8), 0, native(s)>>>(ptr<scalar_t>(dy), ptr<float>(partial), v.outer, v.channels, chunk);
    } else {
      const dim3 grid(static_cast<unsigned>(v.channels), static_cast<unsigned>(chunks));
      channel_partials_kernel<scalar_t><<<grid, kBlock, 0, native(s)>>>(ptr<scalar_t>(dy), ptr<float>(partial), v.outer,
                                                                        v.channels, v.inner, chunk);
    }
    LANCET_CUDA_LAUNCH_CHECK();
  });
  add_partials_kernel<<<grid_for(v.channels), kBlock, 0, native(s)>>>(ptr<float>(partial), ptr<float>(db), v.channels,
                                                                      chunks);
  LANCET_CUDA_LAUNCH_CHECK();
}

void convert_format(const Tensor& src, Tensor& dst, bool accumulate, const Stream& s) {
  LANCET_CHECK(src.ndim() == 4 && src.shape() == dst.shape() && src.dtype() == dst.dtype() &&
                   src.format() != dst.format(),
               "convert_format: " << src.shape_str() << " " << dtype_name(src.dtype()) << " into " << dst.shape_str()
                                  << " " << dtype_name(dst.dtype()) << " (same shape and dtype, other format)");
  const int64_t n = src.numel();
  if (n == 0) return;
  const bool dst_nhwc = dst.format() == MemoryFormat::channels_last;
  LANCET_CUDA_FLOAT_TYPES(src.dtype(), "convert_format", {
    convert_format_kernel<scalar_t><<<grid_for(n), kBlock, 0, native(s)>>>(
        ptr<scalar_t>(src), ptr<scalar_t>(dst), src.dim(0), src.dim(1), src.dim(2), src.dim(3), dst_nhwc, accumulate);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

void accumulate_into_f32(const Tensor& src, Tensor& dst, const Stream& s) {
  LANCET_CHECK(src.ndim() == 4 && src.shape() == dst.shape() && dst.dtype() == DType::f32,
               "accumulate_into_f32: " << src.shape_str() << " " << dtype_name(src.dtype()) << " into "
                                       << dst.shape_str() << " " << dtype_name(dst.dtype())
                                       << " (same 4-D shape, dst f32)");
  const int64_t n = src.numel();
  if (n == 0) return;
  const bool dst_nhwc = dst.format() == MemoryFormat::channels_last;
  const bool src_nhwc = src.format() == MemoryFormat::channels_last;
  LANCET_CUDA_FLOAT_TYPES(src.dtype(), "accumulate_into_f32", {
    accumulate_f32_kernel<scalar_t><<<grid_for(n), kBlock, 0, native(s)>>>(
        ptr<scalar_t>(src), ptr<float>(dst), src.dim(0), src.dim(1), src.dim(2), src.dim(3), dst_nhwc, src_nhwc);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

void cast_from_f32(const Tensor& src, Tensor& dst, const Stream& s) {
  LANCET_CHECK(src.dtype() == DType::f32 && src.numel() == dst.numel(),
               "cast_from_f32: " << src.shape_str() << " " << dtype_name(src.dtype()) << " into " << dst.shape_str());
  const int64_t n = src.numel();
  if (n == 0) return;
  LANCET_CUDA_FLOAT_TYPES(dst.dtype(), "cast_from_f32", {
    cast_kernel<scalar_t><<<grid_for(n), kBlock, 0, native(s)>>>(ptr<float>(src), ptr<scalar_t>(dst), n);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace lancet::cuda
