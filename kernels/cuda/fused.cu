// cuda/fused.cu — CUDA twins of the SE excite-scale + residual add + ReLU (cuda/fused.h); the
// fused BatchNorm+ReLU twins are in batchnorm.cu.
//
// Work decomposition: a 2-D grid, blockIdx.x = plane p = n * C + c (its HW elements are
// contiguous, and g[p] is its gate), blockIdx.y = split. A plane is cut into tiles of
// blockDim.x consecutive elements (one per thread: coalesced); split y takes tiles y,
// y + splits, ... . Block size and split count depend on the shape only, so dg (a per-plane sum
// in double: block partials, then a second kernel adding a plane's partials in split order) is
// deterministic. Forward and backward are one pass each over the activations.
// channels_last: a ColumnGrid (common.cuh) over [N, H * W, C]: thread (n = b0 + blockIdx.z, c) keeps
// its gate g[n, c] in a register and walks its rows of the block's chunk (reads along C:
// coalesced); dg[n, c] is the chunk sums (column_sum, a fixed tree) added in chunk order, so it
// is deterministic too. The per-element arithmetic is the nchw kernels'.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fused.h"

namespace lancet::cuda {
namespace {

struct PlaneGrid {
  int64_t planes, HW;
  int64_t tiles;  // per plane: ceil(HW / block)
  int block;      // threads per block: a multiple of 32, at most kBlock
  int splits;     // blocks per plane (gridDim.y)
};

constexpr int64_t kTargetBlocks = 2048;  // fills a large GPU (H200: 132 SMs) a few times over
constexpr int64_t kMinTilesPerSplit = 4;

// Requires planes * HW > 0.
PlaneGrid plane_grid(int64_t planes, int64_t HW) {
  PlaneGrid g{};
  g.planes = planes;
  g.HW = HW;
  g.block = static_cast<int>(std::min<int64_t>(kBlock, (HW + 31) / 32 * 32));  // small planes: fewer idle threads
  g.tiles = (HW + g.block - 1) / g.block;
  const int64_t want = (kTargetBlocks + planes - 1) / planes;
  g.splits = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({want, (g.tiles + kMinTilesPerSplit - 1) / kMinTilesPerSplit, 65535})));
  return g;
}

dim3 grid_of(const PlaneGrid& g) { return dim3(static_cast<unsigned>(g.planes), static_cast<unsigned>(g.splits)); }

// Calls f(offset) for each element of plane blockIdx.x in this block's tiles. No barrier.
template <typename F>
__device__ __forceinline__ void for_plane_elements(const PlaneGrid& g, F&& f) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * g.HW;
  for (int64_t t = blockIdx.y; t < g.tiles; t += gridDim.y) {
    const int64_t i = t * blockDim.x + threadIdx.x;
    if (i < g.HW) f(base + i);
  }
}

template <typename T>
__global__ void se_forward_kernel(const T* x, const T* gate, const T* shortcut, PlaneGrid g, T* y) {
  const float gv = load_f(gate[blockIdx.x]);
  for_plane_elements(g, [&](int64_t o) {
    const float v = load_f(x[o]) * gv + load_f(shortcut[o]);
    y[o] = store_f<T>(v < 0.f ? 0.f : v);  // std::max(v, 0.f) of relu_forward: NaN passes
  });
}

// t = dy * (y > 0): dshortcut = t, dx = t * g (each when non-null); when partials is non-null,
// this block's sum of t * x (double) goes to partials[plane * splits + split].
template <typename T>
__global__ void se_backward_kernel(const T* x, const T* gate, const T* y, const T* dy, PlaneGrid g, T* dx,
                                   T* dshortcut, double* partials) {
  __shared__ double shared[32];
  const float gv = load_f(gate[blockIdx.x]);
  double sum = 0;
  for_plane_elements(g, [&](int64_t o) {
    const float t = load_f(y[o]) > 0.f ? load_f(dy[o]) : 0.f;
    if (dshortcut) dshortcut[o] = store_f<T>(t);
    if (dx) dx[o] = store_f<T>(t * gv);
    if (partials) sum += static_cast<double>(t) * static_cast<double>(load_f(x[o]));
  });
  if (!partials) return;  // uniform over the block: the barriers below are reached by all or none
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partials[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = sum;
}

// dg[p] = sum of plane p's partials in split order.
template <typename T>
__global__ void se_dg_kernel(const double* partials, int splits, int64_t planes, T* dg) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < planes;
       p += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    double sum = 0;
    for (int k = 0; k < splits; ++k) sum += partials[p * splits + k];
    dg[p] = store_f<T>(static_cast<float>(sum));
  }
}

// se_forward_kernel in channels_last.
template <typename T>
__global__ void se_forward_nhwc_kernel(const T* x, const T* gate, const T* shortcut, ColumnGrid cg, T* y) {
  const int64_t c = column_channel();
  if (c >= cg.C) return;
  const float gv = load_f(gate[column_output(cg, c)]);
  for_column_rows(
      cg, [&](int64_t i) { return make_float2(load_f(x[i]), load_f(shortcut[i])); },
      [&](int64_t i, float2 a) {
        const float v = a.x * gv + a.y;
        y[i] = store_f<T>(v < 0.f ? 0.f : v);
      });
}

// se_backward_kernel in channels_last; dg (non-null: partials from column_partials_scratch)
// through store_column_result. dx, dshortcut, dg may be null (uniform over the grid).
template <typename T>
__global__ void se_backward_nhwc_kernel(const T* x, const T* gate, const T* y, const T* dy, ColumnGrid cg, T* dx,
                                        T* dshortcut, T* dg, double* partials) {
  __shared__ double shared[kBlock];
  const int64_t c = column_channel(), o = column_output(cg, c);
  const float gv = c < cg.C ? load_f(gate[o]) : 0.f;
  double sum = 0;
  for_column_rows(
      cg, [&](int64_t i) { return make_float2(load_f(y[i]) > 0.f ? load_f(dy[i]) : 0.f, dg ? load_f(x[i]) : 0.f); },
      [&](int64_t i, float2 v) {  // {t, x}
        if (dshortcut) dshortcut[i] = store_f<T>(v.x);
        if (dx) dx[i] = store_f<T>(v.x * gv);
        if (dg) sum += static_cast<double>(v.x) * static_cast<double>(v.y);
      });
  if (!dg) return;  // uniform over the block: the barriers below are reached by all or none
  sum = column_sum(sum, shared);
  if (threadIdx.y == 0 && c < cg.C) store_column_result(sum, o, 1.0, partials, dg);
}

// ---- argument checks (channel_scale_*'s messages) ---------------------------------------------

struct Nchw {
  int64_t N, C, HW;
};

// t: defined, with ref's shape, x's dtype and (4-D) ref's memory format.
void require_like(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name,
                  DType dt) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
  LANCET_CHECK(t.shape() == ref.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match " << ref_name << " " << ref.shape_str());
  require_dtype(op, name, t, dt);
  require_format_of(op, name, t, ref_name, ref);
}

void require_distinct(const char* op, const char* out_name, const Tensor& out, const char* in_name, const Tensor& in) {
  LANCET_CHECK(!out.defined() || !in.defined() || in.numel() == 0 || out.raw_data() != in.raw_data(),
               op << ": " << out_name << " " << out.shape_str() << " must not alias " << in_name);
}

// Device, x [N, C, H, W] (either format) of a float dtype and g [N, C] of x's dtype. The other
// activations' formats are checked with their shapes (require_like).
Nchw check_se(const char* op, const Tensor& x, const Tensor& g, const Stream& s,
              std::initializer_list<const Tensor*> all) {
  require_cuda(op, s, x, all);
  LANCET_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f16 || x.dtype() == DType::bf16,
               op << ": x " << x.shape_str() << " must be f32, f16 or bf16, got " << dtype_name(x.dtype()));
  LANCET_CHECK(x.ndim() == 4, op << ": x must be 4-D [N, C, H, W], got " << x.shape_str());
  const Nchw d{x.dim(0), x.dim(1), x.dim(2) * x.dim(3)};
  LANCET_CHECK(g.defined(), op << ": g is an undefined tensor");
  LANCET_CHECK(g.shape() == (Shape{d.N, d.C}), op << ": g " << g.shape_str() << " does not match x " << x.shape_str()
                                                  << " (expected [" << d.N << ", " << d.C << "])");
  require_dtype(op, "g", g, x.dtype());
  LANCET_CHECK(d.N * d.C <= 0x7fffffff, op << ": " << d.N * d.C << " planes exceed the grid of one launch");
  return d;
}

template <typename T> T* mptr(Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; }

}  // namespace

void se_scale_residual_relu_forward(const Tensor& x, const Tensor& g, const Tensor& shortcut, Tensor& y,
                                    const Stream& s) {
  const char* op = "se_scale_residual_relu_forward";
  const Nchw d = check_se(op, x, g, s, {&g, &shortcut, &y});
  require_like(op, "shortcut", shortcut, x, "x", x.dtype());
  require_like(op, "y", y, x, "x", x.dtype());
  require_distinct(op, "y", y, "x", x);
  require_distinct(op, "y", y, "shortcut", shortcut);
  if (x.numel() == 0) return;
  CudaDeviceGuard guard(s.device.index);
  if (x.format() == MemoryFormat::channels_last) {
    const ColumnGrid cg = column_grid(d.N, d.HW, d.C);
    LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
      for_each_column_launch(cg, [&](const ColumnGrid& part) {
        se_forward_nhwc_kernel<scalar_t><<<column_blocks(part), column_threads(part), 0, native(s)>>>(
            ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(shortcut), part, ptr<scalar_t>(y));
        LANCET_CUDA_LAUNCH_CHECK();
      });
    });
    return;
  }
  const PlaneGrid pg = plane_grid(d.N * d.C, d.HW);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    se_forward_kernel<scalar_t><<<grid_of(pg), pg.block, 0, native(s)>>>(
        ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(shortcut), pg, ptr<scalar_t>(y));
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

void se_scale_residual_relu_backward(const Tensor& x, const Tensor& g, const Tensor& y, const Tensor& dy, Tensor& dx,
                                     Tensor& dg, Tensor& dshortcut, const Stream& s) {
  const char* op = "se_scale_residual_relu_backward";
  const Nchw d = check_se(op, x, g, s, {&g, &y, &dy, &dx, &dg, &dshortcut});
  require_like(op, "y", y, x, "x", x.dtype());
  require_like(op, "dy", dy, x, "x", x.dtype());
  if (dx.defined()) require_like(op, "dx", dx, x, "x", x.dtype());
  if (dg.defined()) require_like(op, "dg", dg, g, "g", x.dtype());
  if (dshortcut.defined()) require_like(op, "dshortcut", dshortcut, x, "x", x.dtype());
  for (const Tensor* in : {&x, &g, &y, &dy}) {
    require_distinct(op, "dx", dx, "an input", *in);
    require_distinct(op, "dg", dg, "an input", *in);
    require_distinct(op, "dshortcut", dshortcut, "an input", *in);
  }
  require_distinct(op, "dshortcut", dshortcut, "dx", dx);
  if (d.N * d.C == 0 || (!dx.defined() && !dg.defined() && !dshortcut.defined())) return;
  CudaDeviceGuard guard(s.device.index);
  const cudaStream_t st = native(s);
  if (d.HW == 0) {  // empty planes: dg is a sum over nothing
    if (dg.defined()) LANCET_CUDA_CHECK(cudaMemsetAsync(dg.raw_data(), 0, dg.nbytes(), st));
    return;
  }
  if (x.format() == MemoryFormat::channels_last) {
    const ColumnGrid cg = column_grid(d.N, d.HW, d.C);
    Tensor partials = dg.defined() ? column_partials_scratch(cg, s.device) : Tensor();
    LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
      for_each_column_launch(cg, [&](const ColumnGrid& part) {
        se_backward_nhwc_kernel<scalar_t><<<column_blocks(part), column_threads(part), 0, st>>>(
            ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(y), ptr<scalar_t>(dy), part, mptr<scalar_t>(dx),
            mptr<scalar_t>(dshortcut), mptr<scalar_t>(dg), column_partials_ptr(partials));
        LANCET_CUDA_LAUNCH_CHECK();
      });
      if (dg.defined()) finish_column_sum(cg, column_partials_ptr(partials), 1.0, ptr<scalar_t>(dg), st);
    });
    return;
  }
  const PlaneGrid pg = plane_grid(d.N * d.C, d.HW);
  // Partials: one double per (plane, split), in i64 storage (there is no f64 DType).
  Tensor partials = dg.defined() ? Tensor::empty({pg.planes * pg.splits}, DType::i64, s.device) : Tensor();
  double* pp = dg.defined() ? static_cast<double*>(partials.raw_data()) : nullptr;
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    se_backward_kernel<scalar_t><<<grid_of(pg), pg.block, 0, st>>>(
        ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(y), ptr<scalar_t>(dy), pg, mptr<scalar_t>(dx),
        mptr<scalar_t>(dshortcut), pp);
    LANCET_CUDA_LAUNCH_CHECK();
    if (pp) {
      se_dg_kernel<scalar_t><<<grid_for(pg.planes), kBlock, 0, st>>>(pp, pg.splits, pg.planes, ptr<scalar_t>(dg));
      LANCET_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace lancet::cuda
