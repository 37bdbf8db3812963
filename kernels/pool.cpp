// pool.cpp — CPU MaxPool2d and global average pooling, parallel over (n, c) planes. Either
// memory format: a plane's elements are visited in h * W + w order through cpu::Planes
// (contiguous in nchw, stride C in channels_last), so both formats give the same results.
#include "kernels/pool.h"

#include <atomic>
#include <cmath>
#include <limits>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/pool.h"
#endif

namespace lancet {
namespace {

// Planes per task: enough elements to amortise a parallel region.
int64_t plane_grain(int64_t plane) {
  return std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, plane));
}

}  // namespace

Shape maxpool2d_output_shape(const MaxPool2dParams& p, const Shape& x) {
  LANCET_CHECK(x.size() == 4, "maxpool2d: input must be 4-D [N, C, H, W], got " << shape_str(x));
  LANCET_CHECK(p.kernel >= 1 && p.stride >= 1 && p.pad >= 0 && 2 * p.pad <= p.kernel,
               "maxpool2d: invalid kernel " << p.kernel << ", stride " << p.stride << ", padding " << p.pad
                                            << " (padding must be at most half the kernel)");
  const int64_t ho = (x[2] + 2 * p.pad - p.kernel) / p.stride + 1, wo = (x[3] + 2 * p.pad - p.kernel) / p.stride + 1;
  LANCET_CHECK(x[2] + 2 * p.pad >= p.kernel && x[3] + 2 * p.pad >= p.kernel,
               "maxpool2d: kernel " << p.kernel << " is larger than the padded input " << shape_str(x));
  return {x[0], x[1], ho, wo};
}

void maxpool2d_forward(const MaxPool2dParams& p, const Tensor& x, Tensor& y, Tensor& argmax, const Stream& s) {
  LANCET_CUDA_TWIN(x, maxpool2d_forward(p, x, y, argmax, s));
  const char* op = "maxpool2d_forward";
  cpu::require_cpu_any_format(op, s, x, {&y, &argmax});
  cpu::require_dtype(op, "input", x, DType::f32);
  const Shape ys = maxpool2d_output_shape(p, x.shape());
  cpu::require_shape(op, "output", y, ys, cpu::desc("input", x));
  cpu::require_dtype(op, "output", y, DType::f32);
  cpu::require_same_format(op, "output", y, x, "input");
  cpu::require_shape(op, "argmax", argmax, ys, cpu::desc("input", x));
  cpu::require_dtype(op, "argmax", argmax, DType::i32);
  cpu::require_same_format(op, "argmax", argmax, x, "input");
  const int64_t H = x.dim(2), W = x.dim(3), Ho = ys[2], Wo = ys[3];
  LANCET_CHECK(H * W <= std::numeric_limits<int32_t>::max(),
               op << ": plane of " << x.shape_str() << " too large for i32 argmax");
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  int32_t* ap = argmax.data<int32_t>();
  const cpu::Planes px = cpu::planes_of(x), py = cpu::planes_of(y);  // argmax is laid out as y
  const int64_t xst = px.step, yst = py.step;
  parallel_for(ys[0] * ys[1], plane_grain(H * W), [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const int64_t n = pl / px.C, c = pl % px.C;
      const float* xq = xp + px.offset(n, c);
      float* yq = yp + py.offset(n, c);
      int32_t* aq = ap + py.offset(n, c);
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const int64_t h0 = std::max<int64_t>(0, oh * p.stride - p.pad),
                      h1 = std::min(H, oh * p.stride - p.pad + p.kernel);
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t w0 = std::max<int64_t>(0, ow * p.stride - p.pad),
                        w1 = std::min(W, ow * p.stride - p.pad + p.kernel);
          float best = -std::numeric_limits<float>::infinity();
          int64_t idx = h0 * W + w0;
          // Row-major scan with torch's rule: strict '>' (the first maximum wins) or NaN.
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) {
              const float v = xq[(h * W + w) * xst];
              if (v > best || std::isnan(v)) best = v, idx = h * W + w;
            }
          yq[(oh * Wo + ow) * yst] = best;
          aq[(oh * Wo + ow) * yst] = static_cast<int32_t>(idx);
        }
      }
    }
  });
}

void maxpool2d_backward(const MaxPool2dParams& p, const Tensor& dy, const Tensor& argmax, Tensor& dx, const Stream& s) {
  LANCET_CUDA_TWIN(dy, maxpool2d_backward(p, dy, argmax, dx, s));
  const char* op = "maxpool2d_backward";
  cpu::require_cpu_any_format(op, s, dy, {&argmax, &dx});
  cpu::require_dtype(op, "dy", dy, DType::f32);
  cpu::require_defined(op, "dx", dx);
  cpu::require_dtype(op, "dx", dx, DType::f32);
  const Shape ys = maxpool2d_output_shape(p, dx.shape());
  cpu::require_shape(op, "dy", dy, ys, cpu::desc("dx", dx));
  cpu::require_same_format(op, "dx", dx, dy, "dy");
  cpu::require_shape(op, "argmax", argmax, ys, cpu::desc("dx", dx));
  cpu::require_dtype(op, "argmax", argmax, DType::i32);
  cpu::require_same_format(op, "argmax", argmax, dy, "dy");
  const int64_t HW = dx.dim(2) * dx.dim(3), P = ys[2] * ys[3];
  const float* dyp = dy.data<float>();
  const int32_t* ap = argmax.data<int32_t>();
  float* dxp = dx.data<float>();
  const cpu::Planes px = cpu::planes_of(dx), py = cpu::planes_of(dy);  // argmax is laid out as dy
  const int64_t xst = px.step, yst = py.step;
  std::atomic<bool> bad_index{false};  // no throwing inside a parallel region
  parallel_for(ys[0] * ys[1], plane_grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const int64_t n = pl / px.C, c = pl % px.C;
      float* dq = dxp + px.offset(n, c);
      const float* gq = dyp + py.offset(n, c);
      const int32_t* aq = ap + py.offset(n, c);
      for (int64_t i = 0; i < HW; ++i) dq[i * xst] = 0.f;
      for (int64_t i = 0; i < P; ++i) {
        const int32_t a = aq[i * yst];
        if (a < 0 || a >= HW) {
          bad_index = true;
          continue;
        }
        dq[a * xst] += gq[i * yst];
      }
    }
  });
  LANCET_CHECK(!bad_index, op << ": argmax holds indices out of range for dx " << dx.shape_str());
}

void global_avgpool_forward(const Tensor& x, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, global_avgpool_forward(x, y, s));
  const char* op = "global_avgpool_forward";
  cpu::require_cpu_any_format(op, s, x, {&y});
  cpu::require_dtype(op, "input", x, DType::f32);
  LANCET_CHECK(x.ndim() == 4, op << ": input must be 4-D [N, C, H, W], got " << x.shape_str());
  cpu::require_shape(op, "output", y, {x.dim(0), x.dim(1)}, cpu::desc("input", x));
  cpu::require_dtype(op, "output", y, DType::f32);
  const int64_t HW = x.dim(2) * x.dim(3);
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  const cpu::Planes d = cpu::planes_of(x);
  parallel_for(y.numel(), plane_grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const float* xq = xp + d.offset(pl / d.C, pl % d.C);
      double sum = 0;
      for (int64_t i = 0; i < HW; ++i) sum += xq[i * d.step];
      yp[pl] = static_cast<float>(sum / static_cast<double>(HW));
    }
  });
}

void global_avgpool_backward(const Tensor& dy, Tensor& dx, const Stream& s) {
  LANCET_CUDA_TWIN(dy, global_avgpool_backward(dy, dx, s));
  const char* op = "global_avgpool_backward";
  cpu::require_cpu_any_format(op, s, dy, {&dx});
  cpu::require_dtype(op, "dy", dy, DType::f32);
  cpu::require_defined(op, "dx", dx);
  cpu::require_dtype(op, "dx", dx, DType::f32);
  LANCET_CHECK(dx.ndim() == 4, op << ": dx must be 4-D [N, C, H, W], got " << dx.shape_str());
  cpu::require_shape(op, "dy", dy, {dx.dim(0), dx.dim(1)}, cpu::desc("dx", dx));
  const int64_t HW = dx.dim(2) * dx.dim(3);
  const float inv = HW > 0 ? 1.f / static_cast<float>(HW) : 0.f;
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
  const cpu::Planes d = cpu::planes_of(dx);
  parallel_for(dy.numel(), plane_grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      float* dq = dxp + d.offset(pl / d.C, pl % d.C);
      const float v = dyp[pl] * inv;
      for (int64_t i = 0; i < HW; ++i) dq[i * d.step] = v;
    }
  });
}

}  // namespace lancet
