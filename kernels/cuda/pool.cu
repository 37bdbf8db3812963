// cuda/pool.cu — CUDA MaxPool2d and global average pooling (see cuda/pool.h).
// maxpool: one thread per output element (forward) or input element (backward, a gather), in
// the tensors' memory order (channels_last: adjacent threads take adjacent channels of one
// pixel, so every window read is coalesced); the scan and the gather order are the same in both
// layouts, so y, argmax and dx are too.
// global_avgpool: nchw, one block per (n, c) plane; channels_last, a ColumnGrid (common.cuh)
// over [N, H * W, C]; sums in double like the CPU twin.
#include <limits>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/pool.h"

namespace lancet::cuda {
namespace {

// The CPU twins' check: "maxpool2d_forward: output [1, 1, 2, 2] does not match input [1, 1, 5, 5]
// (expected [1, 1, 3, 3])".
void require_shape(const char* op, const char* name, const Tensor& t, const Shape& expected, const char* ctx_name,
                   const Tensor& ctx) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
  LANCET_CHECK(t.shape() == expected, op << ": " << name << " " << t.shape_str() << " does not match " << ctx_name
                                         << " " << ctx.shape_str() << " (expected " << shape_str(expected) << ")");
}

struct PoolDims {
  int64_t H, W, Ho, Wo;
  int kernel, stride, pad;
};

// One thread per output element; the CPU twin's row-major scan and rule: strict '>' (the first
// maximum wins) or NaN (a NaN wins, and a later NaN replaces an earlier one).
template <typename T>
__global__ void maxpool2d_forward_kernel(PoolDims d, const T* x, T* y, int32_t* argmax, int64_t total) {
  const int64_t P = d.Ho * d.Wo;
  for (int64_t o = first_index(); o < total; o += grid_stride()) {
    const int64_t plane = o / P, r = o - plane * P, oh = r / d.Wo, ow = r - oh * d.Wo;
    const int64_t hs = oh * d.stride - d.pad, ws = ow * d.stride - d.pad;
    const int64_t h0 = hs > 0 ? hs : 0, h1 = hs + d.kernel < d.H ? hs + d.kernel : d.H;
    const int64_t w0 = ws > 0 ? ws : 0, w1 = ws + d.kernel < d.W ? ws + d.kernel : d.W;
    const T* xq = x + plane * d.H * d.W;
    float best = -INFINITY;  // the padding
    int64_t idx = h0 * d.W + w0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) {
        const float v = load_f(xq[h * d.W + w]);
        if (v > best || isnan(v)) best = v, idx = h * d.W + w;
      }
    y[o] = store_f<T>(best);  // exact: best is -inf or an element of x
    argmax[o] = static_cast<int32_t>(idx);
  }
}

// One thread per input element: the windows (oh, ow) containing (h, w) are those with
// oh*stride - pad <= h < oh*stride - pad + kernel, i.e. oh in [lo(h), hi(h)] below. Summing the
// dy of those whose argmax is this element, in row-major window order from 0, performs the same
// float additions in the same order as the CPU scatter (which walks windows row-major).
template <typename T>
__global__ void maxpool2d_backward_kernel(PoolDims d, const T* dy, const int32_t* argmax, T* dx, int64_t total) {
  const int64_t HW = d.H * d.W, P = d.Ho * d.Wo;
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t plane = i / HW, r = i - plane * HW, h = r / d.W, w = r - h * d.W;
    const int64_t hp = h + d.pad, wp = w + d.pad;
    const int64_t oh0 = hp < d.kernel ? 0 : (hp - d.kernel) / d.stride + 1;
    const int64_t ow0 = wp < d.kernel ? 0 : (wp - d.kernel) / d.stride + 1;
    const int64_t oh1 = hp / d.stride < d.Ho - 1 ? hp / d.stride : d.Ho - 1;  // inclusive
    const int64_t ow1 = wp / d.stride < d.Wo - 1 ? wp / d.stride : d.Wo - 1;
    const T* dq = dy + plane * P;
    const int32_t* aq = argmax + plane * P;
    float sum = 0.f;
    for (int64_t oh = oh0; oh <= oh1; ++oh)
      for (int64_t ow = ow0; ow <= ow1; ++ow)
        if (aq[oh * d.Wo + ow] == r) sum += load_f(dq[oh * d.Wo + ow]);
    dx[i] = store_f<T>(sum);
  }
}

// One block per (n, c) plane (blockIdx.x).
template <typename T>
__global__ void global_avgpool_forward_kernel(const T* x, T* y, int64_t hw) {
  __shared__ double shared[32];
  const T* xq = x + static_cast<int64_t>(blockIdx.x) * hw;
  double sum = 0;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) sum += load_f(xq[i]);
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) y[blockIdx.x] = store_f<T>(static_cast<float>(sum / static_cast<double>(hw)));
}

// The channels_last twins: element (n, h, w, c) of x [N, C, H, W] is at ((n * H + h) * W + w) * C
// + c; output element o = ((n * Ho + oh) * Wo + ow) * C + c. The window scan (rows h, then w;
// the same rule) and argmax's meaning (h * W + w within the (n, c) plane) are nchw's.
template <typename T>
__global__ void maxpool2d_forward_nhwc_kernel(PoolDims d, int64_t C, const T* x, T* y, int32_t* argmax,
                                              int64_t total) {
  for (int64_t o = first_index(); o < total; o += grid_stride()) {
    const int64_t c = o % C, pix = o / C;  // pix = (n * Ho + oh) * Wo + ow
    const int64_t ow = pix % d.Wo, nh = pix / d.Wo, oh = nh % d.Ho, n = nh / d.Ho;
    const int64_t hs = oh * d.stride - d.pad, ws = ow * d.stride - d.pad;
    const int64_t h0 = hs > 0 ? hs : 0, h1 = hs + d.kernel < d.H ? hs + d.kernel : d.H;
    const int64_t w0 = ws > 0 ? ws : 0, w1 = ws + d.kernel < d.W ? ws + d.kernel : d.W;
    const T* xq = x + n * d.H * d.W * C + c;  // (h, w) of this (n, c) at xq[(h * W + w) * C]
    float best = -INFINITY;
    int64_t idx = h0 * d.W + w0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) {
        const float v = load_f(xq[(h * d.W + w) * C]);
        if (v > best || isnan(v)) best = v, idx = h * d.W + w;
      }
    y[o] = store_f<T>(best);
    argmax[o] = static_cast<int32_t>(idx);
  }
}

// maxpool2d_backward_kernel's gather for dx element i = ((n * H + h) * W + w) * C + c; dy and
// argmax of window (oh, ow) at ((n * Ho + oh) * Wo + ow) * C + c.
template <typename T>
__global__ void maxpool2d_backward_nhwc_kernel(PoolDims d, int64_t C, const T* dy, const int32_t* argmax, T* dx,
                                               int64_t total) {
  const int64_t P = d.Ho * d.Wo;
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t c = i % C, pix = i / C;  // pix = (n * H + h) * W + w
    const int64_t w = pix % d.W, nh = pix / d.W, h = nh % d.H, n = nh / d.H;
    const int64_t r = h * d.W + w;  // what argmax holds for this element
    const int64_t hp = h + d.pad, wp = w + d.pad;
    const int64_t oh0 = hp < d.kernel ? 0 : (hp - d.kernel) / d.stride + 1;
    const int64_t ow0 = wp < d.kernel ? 0 : (wp - d.kernel) / d.stride + 1;
    const int64_t oh1 = hp / d.stride < d.Ho - 1 ? hp / d.stride : d.Ho - 1;  // inclusive
    const int64_t ow1 = wp / d.stride < d.Wo - 1 ? wp / d.stride : d.Wo - 1;
    const T* dq = dy + n * P * C + c;  // window (oh, ow) at dq[(oh * Wo + ow) * C]
    const int32_t* aq = argmax + n * P * C + c;
    float sum = 0.f;
    for (int64_t oh = oh0; oh <= oh1; ++oh)
      for (int64_t ow = ow0; ow <= ow1; ++ow) {
        const int64_t j = (oh * d.Wo + ow) * C;
        if (aq[j] == r) sum += load_f(dq[j]);
      }
    dx[i] = store_f<T>(sum);
  }
}

// y[n, c] = mean over the rows of x [N, HW, C] (ColumnGrid with B = N, R = HW).
template <typename T>
__global__ void global_avgpool_forward_nhwc_kernel(const T* x, ColumnGrid g, double* partials, T* y) {
  __shared__ double shared[kBlock];
  const int64_t c = column_channel();
  double sum = 0;
  for_column_rows(
      g, [&](int64_t o) { return load_f(x[o]); }, [&](int64_t, float v) { sum += v; });
  sum = column_sum(sum, shared);
  if (threadIdx.y == 0 && c < g.C) store_column_result(sum, column_output(g, c), static_cast<double>(g.R), partials, y);
}

// dx element i = (n * HW + r) * C + c gets dy[n, c] * inv (hwc = HW * C).
template <typename T>
__global__ void global_avgpool_backward_nhwc_kernel(const T* dy, T* dx, float inv, int64_t C, int64_t hwc,
                                                    int64_t total) {
  for (int64_t i = first_index(); i < total; i += grid_stride())
    dx[i] = store_f<T>(load_f(dy[(i / hwc) * C + i % C]) * inv);
}

template <typename T>
__global__ void global_avgpool_backward_kernel(const T* dy, T* dx, float inv, int64_t hw, int64_t total) {
  for (int64_t i = first_index(); i < total; i += grid_stride()) dx[i] = store_f<T>(load_f(dy[i / hw]) * inv);
}

}  // namespace

void maxpool2d_forward(const MaxPool2dParams& p, const Tensor& x, Tensor& y, Tensor& argmax, const Stream& s) {
  const char* op = "maxpool2d_forward";
  require_cuda(op, s, x, {&y, &argmax});
  const Shape ys = maxpool2d_output_shape(p, x.shape());
  require_shape(op, "output", y, ys, "input", x);
  require_dtype(op, "output", y, x.dtype());
  require_format_of(op, "output", y, "the input", x);
  require_shape(op, "argmax", argmax, ys, "input", x);
  require_dtype(op, "argmax", argmax, DType::i32);
  require_format_of(op, "argmax", argmax, "the input", x);
  const PoolDims d{x.dim(2), x.dim(3), ys[2], ys[3], p.kernel, p.stride, p.pad};
  LANCET_CHECK(d.H * d.W <= std::numeric_limits<int32_t>::max(),
               op << ": plane of " << x.shape_str() << " too large for i32 argmax");
  const int64_t total = y.numel();
  if (total == 0) return;
  CudaDeviceGuard g(s.device.index);
  const bool nhwc = x.format() == MemoryFormat::channels_last;
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    if (nhwc)
      maxpool2d_forward_nhwc_kernel<<<grid_for(total), kBlock, 0, native(s)>>>(
          d, x.dim(1), ptr<scalar_t>(x), ptr<scalar_t>(y), ptr<int32_t>(argmax), total);
    else
      maxpool2d_forward_kernel<<<grid_for(total), kBlock, 0, native(s)>>>(d, ptr<scalar_t>(x), ptr<scalar_t>(y),
                                                                          ptr<int32_t>(argmax), total);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void maxpool2d_backward(const MaxPool2dParams& p, const Tensor& dy, const Tensor& argmax, Tensor& dx,
                        const Stream& s) {
  const char* op = "maxpool2d_backward";
  require_cuda(op, s, dy, {&argmax, &dx});
  LANCET_CHECK(dx.defined(), op << ": dx is an undefined tensor");
  require_dtype(op, "dx", dx, dy.dtype());
  const Shape ys = maxpool2d_output_shape(p, dx.shape());
  require_shape(op, "dy", dy, ys, "dx", dx);
  require_shape(op, "argmax", argmax, ys, "dx", dx);
  require_dtype(op, "argmax", argmax, DType::i32);
  require_format_of(op, "dx", dx, "dy", dy);
  require_format_of(op, "argmax", argmax, "dy", dy);
  const PoolDims d{dx.dim(2), dx.dim(3), ys[2], ys[3], p.kernel, p.stride, p.pad};
  const int64_t total = dx.numel();
  if (total == 0) return;
  CudaDeviceGuard g(s.device.index);
  const bool nhwc = dx.format() == MemoryFormat::channels_last;
  LANCET_CUDA_FLOAT_TYPES(dy.dtype(), op, {
    if (nhwc)
      maxpool2d_backward_nhwc_kernel<<<grid_for(total), kBlock, 0, native(s)>>>(
          d, dx.dim(1), ptr<scalar_t>(dy), ptr<int32_t>(argmax), ptr<scalar_t>(dx), total);
    else
      maxpool2d_backward_kernel<<<grid_for(total), kBlock, 0, native(s)>>>(d, ptr<scalar_t>(dy),
                                                                           ptr<int32_t>(argmax), ptr<scalar_t>(dx),
                                                                           total);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void global_avgpool_forward(const Tensor& x, Tensor& y, const Stream& s) {
  const char* op = "global_avgpool_forward";
  require_cuda(op, s, x, {&y});
  LANCET_CHECK(x.ndim() == 4, op << ": input must be 4-D [N, C, H, W], got " << x.shape_str());
  require_shape(op, "output", y, {x.dim(0), x.dim(1)}, "input", x);
  require_dtype(op, "output", y, x.dtype());
  const int64_t planes = y.numel(), HW = x.dim(2) * x.dim(3);
  if (planes == 0) return;
  // Empty planes (HW == 0) take the nchw kernel below in either layout: it reads nothing and
  // writes 0 / 0, as the CPU twin does.
  if (x.format() == MemoryFormat::channels_last && HW > 0) {
    CudaDeviceGuard g(s.device.index);
    const ColumnGrid cg = column_grid(x.dim(0), HW, x.dim(1));
    Tensor partials = column_partials_scratch(cg, s.device);
    LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
      for_each_column_launch(cg, [&](const ColumnGrid& part) {
        global_avgpool_forward_nhwc_kernel<<<column_blocks(part), column_threads(part), 0, native(s)>>>(
            ptr<scalar_t>(x), part, column_partials_ptr(partials), ptr<scalar_t>(y));
        LANCET_CUDA_LAUNCH_CHECK();
      });
      finish_column_sum(cg, column_partials_ptr(partials), static_cast<double>(HW), ptr<scalar_t>(y), native(s));
    });
    return;
  }
  LANCET_CHECK(planes <= 0x7fffffffLL, op << ": " << x.shape_str() << " has too many planes for one grid");
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    global_avgpool_forward_kernel<<<static_cast<unsigned>(planes), plane_block(HW), 0, native(s)>>>(
        ptr<scalar_t>(x), ptr<scalar_t>(y), HW);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void global_avgpool_backward(const Tensor& dy, Tensor& dx, const Stream& s) {
  const char* op = "global_avgpool_backward";
  require_cuda(op, s, dy, {&dx});
  LANCET_CHECK(dx.defined(), op << ": dx is an undefined tensor");
  require_dtype(op, "dx", dx, dy.dtype());
  LANCET_CHECK(dx.ndim() == 4, op << ": dx must be 4-D [N, C, H, W], got " << dx.shape_str());
  require_shape(op, "dy", dy, {dx.dim(0), dx.dim(1)}, "dx", dx);
  const int64_t HW = dx.dim(2) * dx.dim(3), total = dx.numel();
  if (total == 0) return;
  const float inv = 1.f / static_cast<float>(HW);  // the CPU twin's factor (HW > 0 here)
  CudaDeviceGuard g(s.device.index);
  const bool nhwc = dx.format() == MemoryFormat::channels_last;
  LANCET_CUDA_FLOAT_TYPES(dy.dtype(), op, {
    if (nhwc)
      global_avgpool_backward_nhwc_kernel<<<grid_for(total), kBlock, 0, native(s)>>>(
          ptr<scalar_t>(dy), ptr<scalar_t>(dx), inv, dx.dim(1), HW * dx.dim(1), total);
    else
      global_avgpool_backward_kernel<<<grid_for(total), kBlock, 0, native(s)>>>(ptr<scalar_t>(dy),
                                                                                ptr<scalar_t>(dx), inv, HW, total);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

}  // namespace lancet::cuda
