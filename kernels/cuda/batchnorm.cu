// cuda/batchnorm.cu — CUDA BatchNorm2d (cuda/batchnorm.h) and the fused BatchNorm+ReLU
// (cuda/fused.h): the same formulas as kernels/batchnorm.cpp, statistics in double.
//
// Work decomposition of the kernels that touch activations: a 2-D grid, blockIdx.x = channel c,
// blockIdx.y = split. Channel c's elements are N planes of HW (nchw); each plane is cut into
// tiles of blockDim.x consecutive elements (one per thread: coalesced), giving N * tiles work
// units per channel, and split y takes units y, y + splits, y + 2 splits, ... . Block size and
// split count come from the shape alone (ChannelGrid), so every reduction is deterministic:
// each thread adds its elements in a fixed order, block_sum has a fixed tree, and a second
// kernel (one block per channel) adds the splits' partials in a fixed order.
//
// channels_last: x is N * H * W rows of C contiguous channels, tiled by a ColumnGrid
// (common.cuh; B = 1, R = N * H * W): blockIdx.x = a tile of ct adjacent channels (the lanes of
// a warp read adjacent channels: coalesced), blockIdx.y = a chunk of consecutive rows. Each
// thread adds its rows in order, column_sum adds a tile column in a fixed tree, and the block
// writes its partials where the nchw kernels put theirs ((c * splits + chunk) * 2), so the same
// per-channel finalising kernels add them, again in a fixed order. The geometry depends on
// (N * H * W, C) alone: deterministic too. Both layouts compute the same per-element formulas;
// only the order of the double sums differs.
//
// Training statistics are one pass of shifted sums in double: d = x - x[0, c, 0, 0] (any value
// of the channel keeps d near the spread, so sum d^2 - (sum d)^2 / m does not cancel), which is
// as stable as the CPU's two passes and reads x once.
#include <algorithm>

#include "kernels/cuda/batchnorm.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fused.h"

namespace lancet::cuda {
namespace {

// ---- argument checks (kernels/batchnorm.cpp's messages) --------------------------------------

struct Dims {
  int64_t N, C, HW;
};

void require_defined(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
}

void require_channel_vec(const char* op, const char* name, const Tensor& t, int64_t C, const Tensor& x) {
  require_defined(op, name, t);
  LANCET_CHECK(t.shape() == Shape{C}, op << ": " << name << " " << t.shape_str()
                                         << " does not match the channels of input " << x.shape_str() << " (expected ["
                                         << C << "])");
  require_dtype(op, name, t, DType::f32);
}

// An activation-shaped tensor: defined, x's shape, dtype and memory format.
void require_like_input(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  require_defined(op, name, t);
  LANCET_CHECK(t.shape() == x.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match input " << x.shape_str());
  require_dtype(op, name, t, x.dtype());
  require_format_of(op, name, t, "the input", x);
}

// Device and the checks every op shares; `all` lists every tensor argument. gamma and beta may
// be undefined (affine = false: 1 and 0); y (named `y_name`) is checked when defined. x may be
// nchw or channels_last; the activations of a call share its format (require_like_input).
Dims check_common(const char* op, const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& y,
                  const char* y_name, const Stream& s, std::initializer_list<const Tensor*> all) {
  require_cuda(op, s, x, all);
  LANCET_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f16 || x.dtype() == DType::bf16,
               op << ": input " << x.shape_str() << " must be f32, f16 or bf16, got " << dtype_name(x.dtype()));
  LANCET_CHECK(x.ndim() == 4, op << ": input must be 4-D [N, C, H, W], got " << x.shape_str());
  const Dims d{x.dim(0), x.dim(1), x.dim(2) * x.dim(3)};
  LANCET_CHECK(d.C <= 0x7fffffff, op << ": " << d.C << " channels exceed the grid of one launch");
  if (gamma.defined()) require_channel_vec(op, "gamma", gamma, d.C, x);
  if (beta.defined()) require_channel_vec(op, "beta", beta, d.C, x);
  if (y.defined()) require_like_input(op, y_name, y, x);
  return d;
}

// The fused forward's output may not overwrite x: its backward reads both.
void require_not_alias(const char* op, const Tensor& y, const Tensor& x) {
  LANCET_CHECK(x.numel() == 0 || y.raw_data() != x.raw_data(),
               op << ": output must not alias the input " << x.shape_str());
}

template <typename T> const T* cptr(const Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; }
template <typename T> T* mptr(Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; }

// Device scratch of n doubles (there is no f64 DType: i64 storage of the same size), from the
// caching allocator; freed when the handle goes, reused in stream order.
static_assert(sizeof(double) == sizeof(int64_t), "doubles are stored in i64 tensors");
Tensor double_scratch(int64_t n, Device dev) { return Tensor::empty({std::max<int64_t>(n, 1)}, DType::i64, dev); }
double* dptr(Tensor& t) { return static_cast<double*>(t.raw_data()); }

// ---- launch geometry -------------------------------------------------------------------------

struct ChannelGrid {
  int64_t N, C, HW;
  int64_t tiles;  // per plane: ceil(HW / block)
  int block;      // threads per block: a multiple of 32, at most kBlock
  int splits;     // blocks per channel (gridDim.y)
};

constexpr int64_t kTargetBlocks = 2048;  // fills a large GPU (H200: 132 SMs) a few times over
constexpr int64_t kMinUnitsPerSplit = 4;  // each block does at least a few tiles of work
constexpr int kReduceBlock = 128;         // the per-channel finalising kernels

// Requires C > 0 (it divides by C; a grid of 0 blocks is a launch error) and N * HW > 0.
ChannelGrid channel_grid(const Dims& d) {
  ChannelGrid g{};
  g.N = d.N;
  g.C = d.C;
  g.HW = d.HW;
  g.block = static_cast<int>(std::min<int64_t>(kBlock, (d.HW + 31) / 32 * 32));  // small planes: fewer idle threads
  g.tiles = (d.HW + g.block - 1) / g.block;
  const int64_t units = d.N * g.tiles;
  const int64_t want = (kTargetBlocks + d.C - 1) / d.C;
  g.splits = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({want, (units + kMinUnitsPerSplit - 1) / kMinUnitsPerSplit, 65535})));
  return g;
}

dim3 grid_of(const ChannelGrid& g) { return dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(g.splits)); }

// One call's geometry in x's layout: nchw planes (g) or channels_last rows (cg, B = 1).
struct BnGrid {
  bool nhwc;
  ChannelGrid g;
  ColumnGrid cg;
  int splits() const { return nhwc ? static_cast<int>(cg.splits) : g.splits; }  // partials per channel
};

// Requires C > 0 and N * HW > 0, as channel_grid.
BnGrid bn_grid(const Tensor& x, const Dims& d) {
  BnGrid b{};
  b.nhwc = x.format() == MemoryFormat::channels_last;
  if (b.nhwc)
    b.cg = column_grid(1, d.N * d.HW, d.C, kTargetBlocks, kMinUnitsPerSplit);
  else
    b.g = channel_grid(d);
  return b;
}

// Calls f(offset) for each element of channel blockIdx.x in this block's units (see the top of
// the file). Units advance by gridDim.y = dn planes and dt tiles, carrying one plane when the
// tile index passes the end (t, dt < tiles, so one carry suffices). Contains no barrier.
template <typename F>
__device__ __forceinline__ void for_channel_elements(const ChannelGrid& g, F&& f) {
  const int64_t c = blockIdx.x;
  const int64_t dn = gridDim.y / g.tiles, dt = gridDim.y % g.tiles;
  int64_t n = blockIdx.y / g.tiles, t = blockIdx.y % g.tiles;
  while (n < g.N) {
    const int64_t i = t * blockDim.x + threadIdx.x;
    if (i < g.HW) f((n * g.C + c) * g.HW + i);
    n += dn;
    t += dt;
    if (t >= g.tiles) {
      t -= g.tiles;
      ++n;
    }
  }
}

// ---- kernels ---------------------------------------------------------------------------------

// dy, masked by relu_backward's (y > 0) when kRelu.
template <bool kRelu, typename T>
__device__ __forceinline__ float masked_dy(const T* dy, const T* y, int64_t o) {
  if constexpr (kRelu)
    return load_f(y[o]) > 0.f ? load_f(dy[o]) : 0.f;
  else
    return load_f(dy[o]);
}

// Writes channel blockIdx.x / split blockIdx.y's two sums to partials[(c * splits + split) * 2].
__device__ __forceinline__ void store_partials(double a, double b, double* partials) {
  __shared__ double shared[32];
  a = block_sum(a, shared);
  b = block_sum(b, shared);
  if (threadIdx.x == 0) {
    double* p = partials + (static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * 2;
    p[0] = a;
    p[1] = b;
  }
}

// Channel blockIdx.x's two sums over its `splits` partials, in a fixed order; valid in thread 0
// (every thread must call: block_sum has barriers). partials null: zeros.
__device__ __forceinline__ void reduce_partials(const double* partials, int splits, double& a, double& b) {
  __shared__ double shared[32];
  a = 0;
  b = 0;
  if (partials) {
    const double* p = partials + static_cast<int64_t>(blockIdx.x) * splits * 2;
    for (int k = threadIdx.x; k < splits; k += blockDim.x) {
      a += p[2 * k];
      b += p[2 * k + 1];
    }
  }
  a = block_sum(a, shared);
  b = block_sum(b, shared);
}

// Partial sums of d = x - shift and d^2, shift = the channel's first element when `shifted`
// (training statistics) or 0 (channel_sums: the raw sum of x and of x^2).
template <typename T>
__global__ void stats_partials_kernel(const T* x, ChannelGrid g, bool shifted, double* partials) {
  const int64_t c = blockIdx.x;
  const double shift = shifted ? static_cast<double>(load_f(x[c * g.HW])) : 0.0;
  double s1 = 0, s2 = 0;
  for_channel_elements(g, [&](int64_t o) {
    const double v = static_cast<double>(load_f(x[o])) - shift;
    s1 += v;
    s2 += v * v;
  });
  store_partials(s1, s2, partials);
}

// Partial sums of dy and dy * (x - mean) (dy masked by y > 0 when kRelu).
template <typename T, bool kRelu>
__global__ void backward_partials_kernel(const T* x, const T* dy, const T* y, const float* mean, ChannelGrid g,
                                         double* partials) {
  const double mu = mean[blockIdx.x];
  double s_dy = 0, s_dy_xmu = 0;
  for_channel_elements(g, [&](int64_t o) {
    const double d = masked_dy<kRelu>(dy, y, o);
    s_dy += d;
    s_dy_xmu += d * (static_cast<double>(load_f(x[o])) - mu);
  });
  store_partials(s_dy, s_dy_xmu, partials);
}

// One block per channel: sums[c] = sum a, sums[C + c] = sum b * (scale_b ? scale_b[c] : 1).
__global__ void channel_sums_kernel(const double* partials, int splits, const float* scale_b, double* sums) {
  double a, b;
  reduce_partials(partials, splits, a, b);
  if (threadIdx.x != 0) return;
  const int64_t c = blockIdx.x;
  sums[c] = a;
  sums[gridDim.x + c] = scale_b ? b * static_cast<double>(scale_b[c]) : b;
}

// One block per channel: the training statistics from the shifted sums, as the CPU twin's.
// The shift is x[0, c, 0, 0] = x[c * shift_stride] (nchw: HW; channels_last: 1).
template <typename T>
__global__ void train_stats_kernel(const double* partials, int splits, const T* x, int64_t shift_stride, double m,
                                   float eps, float momentum, float* saved_mean, float* saved_invstd,
                                   float* running_mean, float* running_var) {
  double s1, s2;
  reduce_partials(partials, splits, s1, s2);
  if (threadIdx.x != 0) return;
  const int64_t c = blockIdx.x;
  const double dmean = s1 / m;
  const double mean = static_cast<double>(load_f(x[c * shift_stride])) + dmean;
  double ss = s2 - s1 * dmean;  // sum (x - mean)^2
  if (ss < 0) ss = 0;            // rounding; a NaN (non-finite input) stays NaN, as on the CPU
  const double invstd = 1.0 / sqrt(ss / m + eps);  // biased variance normalises
  saved_mean[c] = static_cast<float>(mean);
  saved_invstd[c] = static_cast<float>(invstd);
  if (running_mean) {
    running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * mean);
    running_var[c] = static_cast<float>((1.0 - momentum) * running_var[c] + momentum * ss / (m - 1));
  }
}

__global__ void eval_stats_kernel(const float* running_mean, const float* running_var, float eps, int64_t C,
                                  float* saved_mean, float* saved_invstd) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    saved_mean[c] = running_mean[c];
    saved_invstd[c] = static_cast<float>(1.0 / sqrt(static_cast<double>(running_var[c]) + eps));
  }
}

// y = x * scale + shift per channel (then ReLU when kRelu), scale and shift as the CPU's.
template <typename T, bool kRelu>
__global__ void normalize_kernel(const T* x, const float* gamma, const float* beta, const float* mean,
                                 const float* invstd, ChannelGrid g, T* y) {
  const int64_t c = blockIdx.x;
  const float scale = invstd[c] * (gamma ? gamma[c] : 1.f);
  const float shift = (beta ? beta[c] : 0.f) - mean[c] * scale;
  for_channel_elements(g, [&](int64_t o) {
    float v = load_f(x[o]) * scale + shift;
    if constexpr (kRelu) v = v < 0.f ? 0.f : v;  // std::max(v, 0.f) of relu_forward: NaN passes
    y[o] = store_f<T>(v);
  });
}

// dx = k * (dy - mdy - (x - mean) * proj) with coef = {k, mdy, proj} per channel.
__device__ __forceinline__ void store_coef(float* coef, int64_t c, double gamma, double invstd, double sum_dy,
                                           double sum_dy_xhat, double count, bool batch_stats) {
  coef[3 * c] = static_cast<float>(gamma * invstd);
  coef[3 * c + 1] = batch_stats ? static_cast<float>(sum_dy / count) : 0.f;
  coef[3 * c + 2] = batch_stats ? static_cast<float>(sum_dy_xhat / count * invstd) : 0.f;  // per (x - mean)
}

// One block per channel: dgamma += sum dy * xhat, dbeta += sum dy (each when non-null), and the
// dx coefficients (when coef is non-null). partials null: the sums are not needed (eval mode,
// no parameter gradients).
__global__ void backward_params_kernel(const double* partials, int splits, double m, bool batch_stats,
                                       const float* gamma, const float* invstd, float* dgamma, float* dbeta,
                                       float* coef) {
  double sum_dy, sum_dy_xmu;
  reduce_partials(partials, splits, sum_dy, sum_dy_xmu);
  if (threadIdx.x != 0) return;
  const int64_t c = blockIdx.x;
  const double inv = invstd[c];
  const double sum_dy_xhat = sum_dy_xmu * inv;
  if (dgamma) dgamma[c] += static_cast<float>(sum_dy_xhat);
  if (dbeta) dbeta[c] += static_cast<float>(sum_dy);
  if (coef) store_coef(coef, c, gamma ? gamma[c] : 1.0, inv, sum_dy, sum_dy_xhat, m, batch_stats);
}

// backward_dx's coefficients from the global sums (laid out as backward_sums returns them).
__global__ void global_coef_kernel(const double* sums, double count, const float* gamma, const float* invstd,
                                   int64_t C, float* coef) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(blockDim.x) * gridDim.x)
    store_coef(coef, c, gamma ? gamma[c] : 1.0, invstd[c], sums[c], sums[C + c], count, true);
}

template <typename T, bool kRelu>
__global__ void backward_dx_kernel(const T* x, const T* dy, const T* y, const float* mean, const float* coef,
                                   ChannelGrid g, T* dx) {
  const int64_t c = blockIdx.x;
  const float k = coef[3 * c], mdy = coef[3 * c + 1], proj = coef[3 * c + 2], mu = mean[c];
  for_channel_elements(g, [&](int64_t o) {
    dx[o] = store_f<T>(k * (masked_dy<kRelu>(dy, y, o) - mdy - (load_f(x[o]) - mu) * proj));
  });
}

// ---- channels_last kernels (see the top of the file) ------------------------------------------
// Thread (tx, ty) owns channel c = column_channel() (idle when c >= C, but present at every
// column_sum) and its rows of the block's chunk; element (r, c) is at r * C + c.

// Writes this thread's column sums (channel c, this block's chunk) to partials[(c * splits +
// chunk) * 2]: the nchw kernels' layout. Every thread must call (column_sum has barriers).
__device__ __forceinline__ void store_column_partials(const ColumnGrid& g, double a, double b, double* partials) {
  __shared__ double shared[kBlock];
  const int64_t c = column_channel();
  a = column_sum(a, shared);
  b = column_sum(b, shared);
  if (threadIdx.y == 0 && c < g.C) {
    double* p = partials + column_partial(column_output(g, c)) * 2;  // B = 1: output c
    p[0] = a;
    p[1] = b;
  }
}

// stats_partials_kernel over rows; the shift x[0, c, 0, 0] is x[c] (row 0).
template <typename T>
__global__ void stats_partials_nhwc_kernel(const T* x, ColumnGrid g, bool shifted, double* partials) {
  const int64_t c = column_channel();
  const double shift = shifted && c < g.C ? static_cast<double>(load_f(x[c])) : 0.0;
  double s1 = 0, s2 = 0;
  for_column_rows(
      g, [&](int64_t o) { return load_f(x[o]); },
      [&](int64_t, float xv) {
        const double v = static_cast<double>(xv) - shift;
        s1 += v;
        s2 += v * v;
      });
  store_column_partials(g, s1, s2, partials);
}

// backward_partials_kernel over rows.
template <typename T, bool kRelu>
__global__ void backward_partials_nhwc_kernel(const T* x, const T* dy, const T* y, const float* mean, ColumnGrid g,
                                              double* partials) {
  const int64_t c = column_channel();
  const double mu = c < g.C ? static_cast<double>(mean[c]) : 0.0;
  double s_dy = 0, s_dy_xmu = 0;
  for_column_rows(
      g, [&](int64_t o) { return make_float2(masked_dy<kRelu>(dy, y, o), load_f(x[o])); },
      [&](int64_t, float2 v) {  // {dy, x}
        const double d = v.x;
        s_dy += d;
        s_dy_xmu += d * (static_cast<double>(v.y) - mu);
      });
  store_column_partials(g, s_dy, s_dy_xmu, partials);
}

// normalize_kernel over rows (no barrier: idle threads leave).
template <typename T, bool kRelu>
__global__ void normalize_nhwc_kernel(const T* x, const float* gamma, const float* beta, const float* mean,
                                      const float* invstd, ColumnGrid g, T* y) {
  const int64_t c = column_channel();
  if (c >= g.C) return;
  const float scale = invstd[c] * (gamma ? gamma[c] : 1.f);
  const float shift = (beta ? beta[c] : 0.f) - mean[c] * scale;
  for_column_rows(
      g, [&](int64_t o) { return load_f(x[o]); },
      [&](int64_t o, float xv) {
        float v = xv * scale + shift;
        if constexpr (kRelu) v = v < 0.f ? 0.f : v;
        y[o] = store_f<T>(v);
      });
}

// backward_dx_kernel over rows.
template <typename T, bool kRelu>
__global__ void backward_dx_nhwc_kernel(const T* x, const T* dy, const T* y, const float* mean, const float* coef,
                                        ColumnGrid g, T* dx) {
  const int64_t c = column_channel();
  if (c >= g.C) return;
  const float k = coef[3 * c], mdy = coef[3 * c + 1], proj = coef[3 * c + 2], mu = mean[c];
  for_column_rows(
      g, [&](int64_t o) { return make_float2(masked_dy<kRelu>(dy, y, o), load_f(x[o])); },
      [&](int64_t o, float2 v) { dx[o] = store_f<T>(k * (v.x - mdy - (v.y - mu) * proj)); });  // {dy, x}
}

// ---- launches in either layout ------------------------------------------------------------------

template <typename T>
void launch_stats_partials(const BnGrid& b, const T* x, bool shifted, double* partials, cudaStream_t st) {
  if (b.nhwc)
    stats_partials_nhwc_kernel<T><<<column_blocks(b.cg), column_threads(b.cg), 0, st>>>(x, b.cg, shifted, partials);
  else
    stats_partials_kernel<T><<<grid_of(b.g), b.g.block, 0, st>>>(x, b.g, shifted, partials);
  LANCET_CUDA_LAUNCH_CHECK();
}

template <typename T, bool kRelu>
void launch_backward_partials(const BnGrid& b, const T* x, const T* dy, const T* y, const float* mean,
                              double* partials, cudaStream_t st) {
  if (b.nhwc)
    backward_partials_nhwc_kernel<T, kRelu>
        <<<column_blocks(b.cg), column_threads(b.cg), 0, st>>>(x, dy, y, mean, b.cg, partials);
  else
    backward_partials_kernel<T, kRelu><<<grid_of(b.g), b.g.block, 0, st>>>(x, dy, y, mean, b.g, partials);
  LANCET_CUDA_LAUNCH_CHECK();
}

template <typename T, bool kRelu>
void launch_backward_dx(const BnGrid& b, const T* x, const T* dy, const T* y, const float* mean, const float* coef,
                        T* dx, cudaStream_t st) {
  if (b.nhwc)
    backward_dx_nhwc_kernel<T, kRelu>
        <<<column_blocks(b.cg), column_threads(b.cg), 0, st>>>(x, dy, y, mean, coef, b.cg, dx);
  else
    backward_dx_kernel<T, kRelu><<<grid_of(b.g), b.g.block, 0, st>>>(x, dy, y, mean, coef, b.g, dx);
  LANCET_CUDA_LAUNCH_CHECK();
}

template <typename T, bool kRelu>
void launch_normalize(const BnGrid& b, const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                      const Tensor& invstd, Tensor& y, cudaStream_t st) {
  if (b.nhwc)
    normalize_nhwc_kernel<T, kRelu><<<column_blocks(b.cg), column_threads(b.cg), 0, st>>>(
        ptr<T>(x), cptr<float>(gamma), cptr<float>(beta), ptr<float>(mean), ptr<float>(invstd), b.cg, ptr<T>(y));
  else
    normalize_kernel<T, kRelu><<<grid_of(b.g), b.g.block, 0, st>>>(
        ptr<T>(x), cptr<float>(gamma), cptr<float>(beta), ptr<float>(mean), ptr<float>(invstd), b.g, ptr<T>(y));
  LANCET_CUDA_LAUNCH_CHECK();
}

template <typename T>
void launch_normalize(bool relu, const BnGrid& b, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                      const Tensor& mean, const Tensor& invstd, Tensor& y, cudaStream_t st) {
  if (relu)
    launch_normalize<T, true>(b, x, gamma, beta, mean, invstd, y, st);
  else
    launch_normalize<T, false>(b, x, gamma, beta, mean, invstd, y, st);
}

// ---- the ops, with and without the ReLU --------------------------------------------------------

void forward_train(const char* op, bool relu, const BatchNormParams& p, const Tensor& x, const Tensor& gamma,
                   const Tensor& beta, Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                   Tensor& saved_mean, Tensor& saved_invstd, const Stream& s) {
  const Dims d = check_common(op, x, gamma, beta, y, "output", s,
                              {&gamma, &beta, &y, &running_mean, &running_var, &saved_mean, &saved_invstd});
  require_defined(op, "output", y);
  require_channel_vec(op, "saved_mean", saved_mean, d.C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, d.C, x);
  if (update_running) {
    require_channel_vec(op, "running_mean", running_mean, d.C, x);
    require_channel_vec(op, "running_var", running_var, d.C, x);
  }
  const int64_t m = d.N * d.HW;
  LANCET_CHECK(m > 1, op << ": expected more than 1 value per channel when training, got input " << x.shape_str());
  if (relu) require_not_alias(op, y, x);
  if (d.C == 0) return;  // no channels: nothing to compute (channel_grid needs C > 0)
  CudaDeviceGuard guard(s.device.index);
  const cudaStream_t st = native(s);
  const BnGrid b = bn_grid(x, d);
  Tensor partials = double_scratch(d.C * b.splits() * 2, s.device);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    launch_stats_partials<scalar_t>(b, ptr<scalar_t>(x), true, dptr(partials), st);
    train_stats_kernel<scalar_t><<<static_cast<unsigned>(d.C), kReduceBlock, 0, st>>>(
        dptr(partials), b.splits(), ptr<scalar_t>(x), b.nhwc ? 1 : d.HW, static_cast<double>(m), p.eps,
        p.momentum, ptr<float>(saved_mean), ptr<float>(saved_invstd),
        update_running ? ptr<float>(running_mean) : nullptr, update_running ? ptr<float>(running_var) : nullptr);
    LANCET_CUDA_LAUNCH_CHECK();
    launch_normalize<scalar_t>(relu, b, x, gamma, beta, saved_mean, saved_invstd, y, st);
  });
}

void forward_eval(const char* op, bool relu, const BatchNormParams& p, const Tensor& x, const Tensor& gamma,
                  const Tensor& beta, const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                  Tensor& saved_mean, Tensor& saved_invstd, const Stream& s) {
  const Dims d = check_common(op, x, gamma, beta, y, "output", s,
                              {&gamma, &beta, &y, &running_mean, &running_var, &saved_mean, &saved_invstd});
  require_defined(op, "output", y);
  require_channel_vec(op, "running_mean", running_mean, d.C, x);
  require_channel_vec(op, "running_var", running_var, d.C, x);
  require_channel_vec(op, "saved_mean", saved_mean, d.C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, d.C, x);
  if (relu) require_not_alias(op, y, x);
  if (d.C == 0) return;
  CudaDeviceGuard guard(s.device.index);
  const cudaStream_t st = native(s);
  eval_stats_kernel<<<grid_for(d.C), kBlock, 0, st>>>(ptr<float>(running_mean), ptr<float>(running_var), p.eps, d.C,
                                                       ptr<float>(saved_mean), ptr<float>(saved_invstd));
  LANCET_CUDA_LAUNCH_CHECK();
  if (d.N * d.HW == 0) return;
  const BnGrid b = bn_grid(x, d);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op,
                          launch_normalize<scalar_t>(relu, b, x, gamma, beta, saved_mean, saved_invstd, y, st));
}

template <typename T, bool kRelu>
void launch_backward(bool batch_stats, const Tensor& x, const Tensor& y, const Tensor& dy, const Tensor& gamma,
                     const Tensor& mean, const Tensor& invstd, Tensor& dx, Tensor& dgamma, Tensor& dbeta,
                     const Dims& d, const BnGrid& b, const Stream& s) {
  const cudaStream_t st = native(s);
  const bool need_sums = (batch_stats && dx.defined()) || dgamma.defined() || dbeta.defined();
  if (!need_sums && !dx.defined()) return;
  Tensor partials = need_sums ? double_scratch(d.C * b.splits() * 2, s.device) : Tensor();
  Tensor coef = dx.defined() ? Tensor::empty({3 * d.C}, DType::f32, s.device) : Tensor();
  if (need_sums)
    launch_backward_partials<T, kRelu>(b, ptr<T>(x), ptr<T>(dy), cptr<T>(y), ptr<float>(mean), dptr(partials), st);
  backward_params_kernel<<<static_cast<unsigned>(d.C), kReduceBlock, 0, st>>>(
      need_sums ? dptr(partials) : nullptr, b.splits(), static_cast<double>(d.N * d.HW), batch_stats,
      cptr<float>(gamma), ptr<float>(invstd), mptr<float>(dgamma), mptr<float>(dbeta), mptr<float>(coef));
  LANCET_CUDA_LAUNCH_CHECK();
  if (!dx.defined()) return;
  launch_backward_dx<T, kRelu>(b, ptr<T>(x), ptr<T>(dy), cptr<T>(y), ptr<float>(mean), ptr<float>(coef), ptr<T>(dx),
                               st);
}

// y: the forward's output for the ReLU mask (relu); undefined otherwise.
void backward(const char* op, bool relu, bool batch_stats, const Tensor& x, const Tensor& y, const Tensor& dy,
              const Tensor& gamma, const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx, Tensor& dgamma,
              Tensor& dbeta, const Stream& s) {
  const Dims d =
      check_common(op, x, gamma, Tensor(), dx, "dx", s,
                   {&y, &dy, &gamma, &saved_mean, &saved_invstd, &dx, &dgamma, &dbeta});
  require_like_input(op, "dy", dy, x);
  if (relu) require_like_input(op, "y", y, x);
  require_channel_vec(op, "saved_mean", saved_mean, d.C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, d.C, x);
  if (dgamma.defined()) require_channel_vec(op, "dgamma", dgamma, d.C, x);
  if (dbeta.defined()) require_channel_vec(op, "dbeta", dbeta, d.C, x);
  if (d.C == 0 || d.N * d.HW == 0) return;  // nothing to add, nothing to write
  CudaDeviceGuard guard(s.device.index);
  const BnGrid b = bn_grid(x, d);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    if (relu)
      launch_backward<scalar_t, true>(batch_stats, x, y, dy, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, d, b,
                                      s);
    else
      launch_backward<scalar_t, false>(batch_stats, x, y, dy, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, d,
                                       b, s);
  });
}

// The host-side per-channel sums (channel_sums, backward_sums), for d.C > 0 and N * HW > 0:
// launch_partials(T{}, b, partials, stream), T the CUDA type of x, launches the split partials
// kernel over grid b (x's layout); channel_sums_kernel adds each channel's splits in a fixed order
// (the second sum scaled by scale_b[c] when non-null) and out[0, 2C) receives them. Waits for
// the copy (the only sync here).
template <typename LaunchPartials>
void channel_sums_to_host(const char* op, const Tensor& x, const Dims& d, const float* scale_b, double* out,
                          const Stream& s, LaunchPartials&& launch_partials) {
  CudaDeviceGuard guard(s.device.index);
  const cudaStream_t st = native(s);
  const BnGrid b = bn_grid(x, d);
  Tensor partials = double_scratch(d.C * b.splits() * 2, s.device);
  Tensor sums = double_scratch(2 * d.C, s.device);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, launch_partials(scalar_t{}, b, dptr(partials), st));
  channel_sums_kernel<<<static_cast<unsigned>(d.C), kReduceBlock, 0, st>>>(dptr(partials), b.splits(), scale_b,
                                                                            dptr(sums));
  LANCET_CUDA_LAUNCH_CHECK();
  LANCET_CUDA_CHECK(cudaMemcpyAsync(out, dptr(sums), static_cast<size_t>(2 * d.C) * sizeof(double),
                                    cudaMemcpyDeviceToHost, st));
  LANCET_CUDA_CHECK(cudaStreamSynchronize(st));
}

}  // namespace

// ---- BatchNorm2d -------------------------------------------------------------------------------

void batchnorm2d_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                               Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                               Tensor& saved_mean, Tensor& saved_invstd, const Stream& s) {
  forward_train("batchnorm2d_forward_train", false, p, x, gamma, beta, running_mean, running_var, update_running, y,
                saved_mean, saved_invstd, s);
}

void batchnorm2d_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                              const Tensor& running_mean, const Tensor& running_var, Tensor& y, Tensor& saved_mean,
                              Tensor& saved_invstd, const Stream& s) {
  forward_eval("batchnorm2d_forward_eval", false, p, x, gamma, beta, running_mean, running_var, y, saved_mean,
               saved_invstd, s);
}

void batchnorm2d_backward(bool batch_stats, const Tensor& x, const Tensor& dy, const Tensor& gamma,
                          const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx, Tensor& dgamma,
                          Tensor& dbeta, const Stream& s) {
  backward("batchnorm2d_backward", false, batch_stats, x, Tensor(), dy, gamma, saved_mean, saved_invstd, dx, dgamma,
           dbeta, s);
}

void batchnorm2d_channel_sums(const Tensor& x, std::vector<double>& out, const Stream& s) {
  const char* op = "batchnorm2d_channel_sums";
  const Dims d = check_common(op, x, Tensor(), Tensor(), Tensor(), "output", s, {});
  out.assign(static_cast<size_t>(2 * d.C + 1), 0.0);
  out[static_cast<size_t>(2 * d.C)] = static_cast<double>(d.N * d.HW);
  if (d.C == 0 || d.N * d.HW == 0) return;
  channel_sums_to_host(op, x, d, nullptr, out.data(), s,
                       [&](auto t, const BnGrid& b, double* partials, cudaStream_t st) {
                         using T = decltype(t);
                         launch_stats_partials<T>(b, ptr<T>(x), false, partials, st);
                       });
}

void batchnorm2d_backward_sums(const Tensor& x, const Tensor& dy, const Tensor& mean, const Tensor& invstd,
                               std::vector<double>& out, const Stream& s) {
  const char* op = "batchnorm2d_backward_sums";
  const Dims d = check_common(op, x, Tensor(), Tensor(), Tensor(), "output", s, {&dy, &mean, &invstd});
  require_like_input(op, "dy", dy, x);
  require_channel_vec(op, "mean", mean, d.C, x);
  require_channel_vec(op, "invstd", invstd, d.C, x);
  out.assign(static_cast<size_t>(2 * d.C), 0.0);
  if (d.C == 0 || d.N * d.HW == 0) return;
  channel_sums_to_host(op, x, d, ptr<float>(invstd), out.data(), s,
                       [&](auto t, const BnGrid& b, double* partials, cudaStream_t st) {
                         using T = decltype(t);
                         launch_backward_partials<T, false>(b, ptr<T>(x), ptr<T>(dy), nullptr, ptr<float>(mean),
                                                            partials, st);
                       });
}

void batchnorm2d_backward_dx(const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& mean,
                             const Tensor& invstd, const std::vector<double>& global_sums, double count, Tensor& dx,
                             const Stream& s) {
  const char* op = "batchnorm2d_backward_dx";
  const Dims d = check_common(op, x, gamma, Tensor(), dx, "dx", s, {&dy, &gamma, &mean, &invstd, &dx});
  require_defined(op, "dx", dx);
  require_like_input(op, "dy", dy, x);
  require_channel_vec(op, "mean", mean, d.C, x);
  require_channel_vec(op, "invstd", invstd, d.C, x);
  LANCET_CHECK(static_cast<int64_t>(global_sums.size()) == 2 * d.C,
               op << ": global_sums has " << global_sums.size() << " values, expected 2 x " << d.C << " channels");
  LANCET_CHECK(count > 1, op << ": count must exceed 1, got " << count);
  if (d.C == 0 || d.N * d.HW == 0) return;
  CudaDeviceGuard guard(s.device.index);
  const cudaStream_t st = native(s);
  const BnGrid b = bn_grid(x, d);
  Tensor sums = double_scratch(2 * d.C, s.device);
  // From pageable memory: CUDA does not promise that an async copy from pageable memory has
  // read the source when the call returns ("might be synchronous"), and the caller may free
  // global_sums as soon as we return. So wait for the copy (2C doubles; SyncBatchNorm has just
  // synchronised in backward_sums anyway, so the stream is nearly idle).
  LANCET_CUDA_CHECK(cudaMemcpyAsync(dptr(sums), global_sums.data(), global_sums.size() * sizeof(double),
                                    cudaMemcpyHostToDevice, st));
  LANCET_CUDA_CHECK(cudaStreamSynchronize(st));
  Tensor coef = Tensor::empty({3 * d.C}, DType::f32, s.device);
  global_coef_kernel<<<grid_for(d.C), kBlock, 0, st>>>(dptr(sums), count, cptr<float>(gamma), ptr<float>(invstd), d.C,
                                                        ptr<float>(coef));
  LANCET_CUDA_LAUNCH_CHECK();
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    launch_backward_dx<scalar_t, false>(b, ptr<scalar_t>(x), ptr<scalar_t>(dy), nullptr, ptr<float>(mean),
                                        ptr<float>(coef), ptr<scalar_t>(dx), st);
  });
}

// ---- BatchNorm2d + ReLU (kernels/fused.h) ------------------------------------------------------

void batchnorm_relu_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                  Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                                  Tensor& saved_mean, Tensor& saved_invstd, const Stream& s) {
  forward_train("batchnorm_relu_forward_train", true, p, x, gamma, beta, running_mean, running_var, update_running, y,
                saved_mean, saved_invstd, s);
}

void batchnorm_relu_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, Tensor& y, Tensor& saved_mean,
                                 Tensor& saved_invstd, const Stream& s) {
  forward_eval("batchnorm_relu_forward_eval", true, p, x, gamma, beta, running_mean, running_var, y, saved_mean,
               saved_invstd, s);
}

void batchnorm_relu_backward(bool batch_stats, const Tensor& x, const Tensor& y, const Tensor& dy,
                             const Tensor& gamma, const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx,
                             Tensor& dgamma, Tensor& dbeta, const Stream& s) {
  backward("batchnorm_relu_backward", true, batch_stats, x, y, dy, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta,
           s);
}

}  // namespace lancet::cuda
