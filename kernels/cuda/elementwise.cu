// cuda/elementwise.cu — CUDA add/axpy/scale, channel concat, SE channel scale and the two
// reductions (see cuda/elementwise.h). Elementwise kernels are grid-stride loops over memory;
// per-plane reductions use one block per (n, c) plane (nchw) or a ColumnGrid over [N, H * W, C]
// (channels_last, common.cuh); sum_squares is a two-pass reduction whose grid depends on numel
// only, so its result is the same on every run and GPU.
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/elementwise.h"

namespace lancet::cuda {
namespace {

struct Nchw {
  int64_t N, C, HW;
};
Nchw nchw_of(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.ndim() == 4, op << ": " << name << " must be 4-D [N, C, H, W], got " << t.shape_str());
  return {t.dim(0), t.dim(1), t.dim(2) * t.dim(3)};
}

// ---- elementwise (outputs may alias inputs: each thread reads element i before writing it) ----
template <typename T>
__global__ void fill_kernel(T* y, float value, int64_t n) {
  const T v = store_f<T>(value);
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = v;
}

template <typename T>
__global__ void add_kernel(const T* a, const T* b, T* y, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = store_f<T>(load_f(a[i]) + load_f(b[i]));
}

// y += alpha * x (add_inplace is alpha = 1: 1 * x is exact).
template <typename T>
__global__ void axpy_kernel(float alpha, const T* x, T* y, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = store_f<T>(load_f(y[i]) + alpha * load_f(x[i]));
}

// dst[i] = src[i] rounded once to D (__float2half_rn / __float2bfloat16_rn: nearest even, as
// half_t / bfloat16_t on the CPU; from a 16-bit type to f32 exact).
template <typename S, typename D>
__global__ void cast_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) dst[i] = store_f<D>(load_f(src[i]));
}

template <typename T>
__global__ void scale_kernel(T* y, float alpha, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = store_f<T>(load_f(y[i]) * alpha);
}

// `rows` rows of `row_len` contiguous elements from src (rows src_stride apart) to dst (rows
// dst_stride apart): one part of a channel concat, in either direction.
template <typename T>
__global__ void copy_rows_kernel(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t rows,
                                 int64_t row_len) {
  const int64_t total = rows * row_len;
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t r = i / row_len, c = i - r * row_len;
    dst[r * dst_stride + c] = src[r * src_stride + c];
  }
}

template <typename T>
__global__ void channel_scale_forward_kernel(const T* x, const T* g, T* y, int64_t hw, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = store_f<T>(load_f(x[i]) * load_f(g[i / hw]));
}

// channels_last: element i = (n * HW + r) * C + c scales by g[n, c] (hwc = HW * C).
template <typename T>
__global__ void channel_scale_forward_nhwc_kernel(const T* x, const T* g, T* y, int64_t C, int64_t hwc, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride())
    y[i] = store_f<T>(load_f(x[i]) * load_f(g[(i / hwc) * C + i % C]));
}

// One block per (n, c) plane (blockIdx.x); dx or dg may be null (uniform per launch, so every
// thread reaches block_sum or none does).
template <typename T>
__global__ void channel_scale_backward_kernel(const T* x, const T* g, const T* dy, T* dx, T* dg, int64_t hw) {
  __shared__ double shared[32];
  const int64_t plane = blockIdx.x;
  const T* xq = x + plane * hw;
  const T* dq = dy + plane * hw;
  const float gv = load_f(g[plane]);
  double sum = 0;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
    const float d = load_f(dq[i]);
    if (dg) sum += static_cast<double>(d) * load_f(xq[i]);
    if (dx) dx[plane * hw + i] = store_f<T>(d * gv);
  }
  if (dg) {
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) dg[plane] = store_f<T>(static_cast<float>(sum));
  }
}

// channels_last: a ColumnGrid over [N, HW, C]; thread (n = b0 + blockIdx.z, c) walks its rows of the
// block's chunk, writing dx and adding dy * x in double; dg[n, c] through store_column_result
// (and column_partials_sum_kernel when the rows are split). dx or dg may be null (uniform).
template <typename T>
__global__ void channel_scale_backward_nhwc_kernel(const T* x, const T* g, const T* dy, T* dx, T* dg, ColumnGrid cg,
                                                   double* partials) {
  __shared__ double shared[kBlock];
  const int64_t c = column_channel(), o = column_output(cg, c);
  const float gv = c < cg.C ? load_f(g[o]) : 0.f;
  double sum = 0;
  for_column_rows(
      cg, [&](int64_t i) { return make_float2(load_f(dy[i]), dg ? load_f(x[i]) : 0.f); },
      [&](int64_t i, float2 v) {  // {dy, x}
        if (dg) sum += static_cast<double>(v.x) * v.y;
        if (dx) dx[i] = store_f<T>(v.x * gv);
      });
  if (!dg) return;
  sum = column_sum(sum, shared);
  if (threadIdx.y == 0 && c < cg.C) store_column_result(sum, o, 1.0, partials, dg);
}

// ---- reductions ----
constexpr int kMaxPartials = 1024;  // blocks of the first pass (fixed by numel: deterministic)

template <typename T>
__global__ void sum_squares_partials_kernel(const T* x, int64_t n, double* partials) {
  __shared__ double shared[32];
  double sum = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const double v = load_f(x[i]);
    sum += v * v;
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// One block: each thread sums a fixed stride of partials, then the block tree.
__global__ void sum_partials_kernel(const double* partials, int m, double* out) {
  __shared__ double shared[32];
  double sum = 0;
  for (int i = threadIdx.x; i < m; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) *out = sum;
}

// *found becomes 1 when any element is NaN or infinite (zeroed by the caller). One atomic per
// thread at most, however many elements are bad.
template <typename T>
__global__ void find_nonfinite_kernel(const T* x, int64_t n, int* found) {
  bool bad = false;
  for (int64_t i = first_index(); i < n; i += grid_stride()) bad |= !isfinite(load_f(x[i]));
  if (bad) atomicOr(found, 1);
}

void axpy_impl(const char* op, float alpha, const Tensor& x, Tensor& y, const Stream& s) {
  require_cuda(op, s, x, {&y});
  require_same(op, "y", y, x, "x");
  const int64_t n = x.numel();
  launch_elementwise(op, x.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    axpy_kernel<<<L.grid, L.block, 0, L.stream>>>(alpha, ptr<T>(x), ptr<T>(y), n);
  });
}

// Copies between y [N, sum C_i, H, W] and the parts xs[i] [N, C_i, H, W]; to_y picks the
// direction. In memory y is `outer` rows of C * inner elements and part i `outer` rows of
// C_i * inner, the part's slice of a y row starting at first_i * inner: nchw outer N, inner HW;
// channels_last outer N * HW, inner 1 (conv_util.h's channel view).
void concat_copy(const char* op, const std::vector<Tensor>& xs, const Tensor& y, bool to_y, const Stream& s) {
  require_cuda(op, s, y);
  const Nchw d = nchw_of(op, "concatenated tensor", y);
  LANCET_CHECK(!xs.empty(), op << ": no parts to concatenate into " << y.shape_str());
  int64_t total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    LANCET_CHECK(x.defined(), op << ": part " << i << " is an undefined tensor");
    require_cuda(op, s, y, {&x});
    require_dtype(op, "part", x, y.dtype());
    LANCET_CHECK(x.ndim() == 4 && x.dim(0) == d.N && x.dim(2) * x.dim(3) == d.HW && x.dim(2) == y.dim(2),
                 op << ": part " << i << " " << x.shape_str() << " does not fit the concatenated tensor "
                    << y.shape_str() << " (N, H, W must match)");
    require_format_of(op, ("part " + std::to_string(i)).c_str(), x, "the concatenated tensor", y);
    total += x.dim(1);
  }
  LANCET_CHECK(total == d.C, op << ": parts have " << total << " channels in all but the concatenated tensor "
                                << y.shape_str() << " has " << d.C);
  CudaDeviceGuard g(s.device.index);
  const bool nhwc = y.format() == MemoryFormat::channels_last;
  const int64_t outer = nhwc ? d.N * d.HW : d.N, inner = nhwc ? 1 : d.HW;
  int64_t first = 0;  // first channel of part i in y
  for (const Tensor& x : xs) {
    const int64_t ci = x.dim(1), len = ci * inner;
    if (len > 0 && outer > 0) {
      LANCET_CUDA_FLOAT_TYPES(y.dtype(), op, {
        // Tensors are handles: the destination side is written through raw_data().
        scalar_t* yp = static_cast<scalar_t*>(y.raw_data()) + first * inner;
        scalar_t* xp = static_cast<scalar_t*>(x.raw_data());
        if (to_y)
          copy_rows_kernel<<<grid_for(outer * len), kBlock, 0, native(s)>>>(xp, len, yp, d.C * inner, outer, len);
        else
          copy_rows_kernel<<<grid_for(outer * len), kBlock, 0, native(s)>>>(yp, d.C * inner, xp, len, outer, len);
      });
      LANCET_CUDA_LAUNCH_CHECK();
    }
    first += ci;
  }
}

// `t` like x (require_same); a memory format other than x's is reported in the per-channel ops'
// words ("dy [..] is nchw but x [..] is channels_last").
void require_like_x(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  if (t.defined() && t.shape() == x.shape()) require_format_of(op, name, t, "x", x);
  require_same(op, name, t, x, "x");
}

// The checks of both channel_scale ops: x [N, C, H, W] (either format), g [N, C] of x's dtype.
Nchw check_channel_scale(const char* op, const Tensor& x, const Tensor& g) {
  const Nchw d = nchw_of(op, "x", x);
  LANCET_CHECK(g.defined(), op << ": g is an undefined tensor");
  LANCET_CHECK(g.shape() == Shape({d.N, d.C}), op << ": g " << g.shape_str() << " does not match x " << x.shape_str()
                                                  << " (expected " << shape_str({d.N, d.C}) << ")");
  require_dtype(op, "g", g, x.dtype());
  return d;
}

}  // namespace

void fill(Tensor& y, float value, const Stream& s) {
  const char* op = "fill";
  require_cuda(op, s, y);
  const int64_t n = y.numel();
  launch_elementwise(op, y.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    fill_kernel<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(y), value, n);
  });
}

void add(const Tensor& a, const Tensor& b, Tensor& y, const Stream& s) {
  const char* op = "add";
  require_cuda(op, s, a, {&b, &y});
  require_same(op, "b", b, a, "a");
  require_same(op, "y", y, a, "a");
  const int64_t n = a.numel();
  launch_elementwise(op, a.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    add_kernel<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(a), ptr<T>(b), ptr<T>(y), n);
  });
}

void add_inplace(Tensor& y, const Tensor& x, const Stream& s) { axpy_impl("add_inplace", 1.f, x, y, s); }

void axpy(float alpha, const Tensor& x, Tensor& y, const Stream& s) { axpy_impl("axpy", alpha, x, y, s); }

void scale_inplace(Tensor& y, float alpha, const Stream& s) {
  const char* op = "scale_inplace";
  require_cuda(op, s, y);
  const int64_t n = y.numel();
  launch_elementwise(op, y.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    scale_kernel<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(y), alpha, n);
  });
}

void cast(const Tensor& src, Tensor& dst, const Stream& s) {
  const char* op = "cast";
  require_cuda(op, s, src, {&dst});
  LANCET_CHECK(dst.defined(), op << ": dst is an undefined tensor");
  LANCET_CHECK(dst.shape() == src.shape() && dst.format() == src.format(),
               op << ": dst " << dst.shape_str() << " does not match src " << src.shape_str()
                  << " (same shape and memory format)");
  const int64_t n = src.numel();
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(src.dtype(), op, {
    using S = scalar_t;
    LANCET_CUDA_FLOAT_TYPES(dst.dtype(), op, {
      if (n == 0) return;
      if (src.dtype() == dst.dtype()) {
        LANCET_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.nbytes(), cudaMemcpyDeviceToDevice,
                                          native(s)));
        return;
      }
      cast_kernel<S, scalar_t><<<grid_for(n), kBlock, 0, native(s)>>>(ptr<S>(src), ptr<scalar_t>(dst), n);
      LANCET_CUDA_LAUNCH_CHECK();
    });
  });
}

void concat_channels_forward(const std::vector<Tensor>& xs, Tensor& y, const Stream& s) {
  concat_copy("concat_channels_forward", xs, y, true, s);
}

void concat_channels_backward(const Tensor& dy, std::vector<Tensor>& dxs, const Stream& s) {
  concat_copy("concat_channels_backward", dxs, dy, false, s);
}

void channel_scale_forward(const Tensor& x, const Tensor& g, Tensor& y, const Stream& s) {
  const char* op = "channel_scale_forward";
  require_cuda(op, s, x, {&g, &y});
  const Nchw d = check_channel_scale(op, x, g);
  require_like_x(op, "y", y, x);
  const int64_t n = x.numel();
  const bool nhwc = x.format() == MemoryFormat::channels_last;
  launch_elementwise(op, x.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    if (nhwc)
      channel_scale_forward_nhwc_kernel<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(x), ptr<T>(g), ptr<T>(y), d.C,
                                                                           d.HW * d.C, n);
    else
      channel_scale_forward_kernel<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(x), ptr<T>(g), ptr<T>(y), d.HW, n);
  });
}

void channel_scale_backward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                            const Stream& s) {
  const char* op = "channel_scale_backward";
  require_cuda(op, s, x, {&g, &dy, &dx, &dg});
  const Nchw d = check_channel_scale(op, x, g);
  require_like_x(op, "dy", dy, x);
  if (dx.defined()) require_like_x(op, "dx", dx, x);
  if (dg.defined()) require_same(op, "dg", dg, g, "g");
  const int64_t planes = d.N * d.C;
  if (planes == 0 || (!dx.defined() && !dg.defined())) return;
  // Empty planes (HW == 0) take the nchw kernel in either layout: it reads nothing, dg = 0.
  if (x.format() == MemoryFormat::channels_last && d.HW > 0) {
    CudaDeviceGuard guard(s.device.index);
    const ColumnGrid cg = column_grid(d.N, d.HW, d.C);
    Tensor partials = dg.defined() ? column_partials_scratch(cg, s.device) : Tensor();
    LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
      scalar_t* dxp = dx.defined() ? ptr<scalar_t>(dx) : nullptr;
      scalar_t* dgp = dg.defined() ? ptr<scalar_t>(dg) : nullptr;
      for_each_column_launch(cg, [&](const ColumnGrid& part) {
        channel_scale_backward_nhwc_kernel<<<column_blocks(part), column_threads(part), 0, native(s)>>>(
            ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(dy), dxp, dgp, part, column_partials_ptr(partials));
        LANCET_CUDA_LAUNCH_CHECK();
      });
      if (dgp) finish_column_sum(cg, column_partials_ptr(partials), 1.0, dgp, native(s));
    });
    return;
  }
  LANCET_CHECK(planes <= 0x7fffffffLL, op << ": " << x.shape_str() << " has too many planes for one grid");
  CudaDeviceGuard guard(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    scalar_t* dxp = dx.defined() ? ptr<scalar_t>(dx) : nullptr;
    scalar_t* dgp = dg.defined() ? ptr<scalar_t>(dg) : nullptr;
    channel_scale_backward_kernel<<<static_cast<unsigned>(planes), plane_block(d.HW), 0, native(s)>>>(
        ptr<scalar_t>(x), ptr<scalar_t>(g), ptr<scalar_t>(dy), dxp, dgp, d.HW);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

double sum_squares(const Tensor& x, const Stream& s) {
  const char* op = "sum_squares";
  require_cuda(op, s, x);
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  const int blocks = static_cast<int>(std::min<int64_t>(kMaxPartials, (n + kBlock - 1) / kBlock));
  // blocks partials and the total, as 8-byte slots (doubles) of an i64 scratch tensor from the
  // caching allocator; it returns to the cache only after the sync below.
  Tensor scratch = Tensor::empty({blocks + 1}, DType::i64, s.device);
  double* partials = static_cast<double*>(scratch.raw_data());
  double total = 0;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    sum_squares_partials_kernel<<<blocks, kBlock, 0, native(s)>>>(ptr<scalar_t>(x), n, partials);
  });
  LANCET_CUDA_LAUNCH_CHECK();
  sum_partials_kernel<<<1, kBlock, 0, native(s)>>>(partials, blocks, partials + blocks);
  LANCET_CUDA_LAUNCH_CHECK();
  LANCET_CUDA_CHECK(cudaMemcpyAsync(&total, partials + blocks, sizeof(double), cudaMemcpyDeviceToHost, native(s)));
  LANCET_CUDA_CHECK(cudaStreamSynchronize(native(s)));
  return total;
}

bool all_finite(const Tensor& x, const Stream& s) {
  const char* op = "all_finite";
  require_cuda(op, s, x);
  const int64_t n = x.numel();
  if (n == 0) return true;
  Tensor flag = Tensor::empty({1}, DType::i32, s.device);  // kept until the sync below
  int* found = ptr<int>(flag);
  int host_found = 0;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_CHECK(cudaMemsetAsync(found, 0, sizeof(int), native(s)));
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    find_nonfinite_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(ptr<scalar_t>(x), n, found);
  });
  LANCET_CUDA_LAUNCH_CHECK();
  LANCET_CUDA_CHECK(cudaMemcpyAsync(&host_found, found, sizeof(int), cudaMemcpyDeviceToHost, native(s)));
  LANCET_CUDA_CHECK(cudaStreamSynchronize(native(s)));
  return host_found == 0;
}

}  // namespace lancet::cuda
