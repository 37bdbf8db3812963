// elementwise.cpp — CPU add/axpy/scale, channel concat, SE channel scale and reductions.
#include "kernels/elementwise.h"

#include <cmath>
#include <cstring>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/elementwise.h"
#endif

namespace lancet {
namespace {

template <typename F>
void for_each_index(int64_t n, F&& fn) {
  parallel_for(n, cpu::kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

// Reductions sum fixed blocks (independent of the thread count) and then the block partials
// in order, so the result is the same for any set_num_threads.
template <typename T, typename F>
std::vector<T> block_partials(int64_t n, F&& block_fn) {
  constexpr int64_t kBlock = 1 << 16;
  std::vector<T> part(static_cast<size_t>(cpu::ceil_div(n, kBlock)));
  parallel_for(static_cast<int64_t>(part.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) part[b] = block_fn(b * kBlock, std::min(n, (b + 1) * kBlock));
  });
  return part;
}

void check_f32(const char* op, const char* name, const Tensor& t) {
  cpu::require_defined(op, name, t);
  cpu::require_dtype(op, name, t, DType::f32);
}

struct Nchw {
  int64_t N, C, HW;
};
Nchw nchw_of(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.ndim() == 4, op << ": " << name << " must be 4-D [N, C, H, W], got " << t.shape_str());
  return {t.dim(0), t.dim(1), t.dim(2) * t.dim(3)};
}

}  // namespace

void fill(Tensor& y, float value, const Stream& s) {
  LANCET_CUDA_TWIN(y, fill(y, value, s));
  cpu::require_cpu("fill", s, y);
  check_f32("fill", "y", y);
  float* yp = y.data<float>();
  for_each_index(y.numel(), [&](int64_t i) { yp[i] = value; });
}

void add(const Tensor& a, const Tensor& b, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(a, add(a, b, y, s));
  cpu::require_cpu("add", s, a, {&b, &y});
  check_f32("add", "a", a);
  cpu::require_like("add", "b", b, a, "a");
  cpu::require_like("add", "y", y, a, "a");
  const float* ap = a.data<float>();
  const float* bp = b.data<float>();
  float* yp = y.data<float>();
  for_each_index(a.numel(), [&](int64_t i) { yp[i] = ap[i] + bp[i]; });
}

void add_inplace(Tensor& y, const Tensor& x, const Stream& s) {
  LANCET_CUDA_TWIN(x, add_inplace(y, x, s));
  cpu::require_cpu("add_inplace", s, x, {&y});
  check_f32("add_inplace", "x", x);
  cpu::require_like("add_inplace", "y", y, x, "x");
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_index(x.numel(), [&](int64_t i) { yp[i] += xp[i]; });
}

void axpy(float alpha, const Tensor& x, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, axpy(alpha, x, y, s));
  cpu::require_cpu("axpy", s, x, {&y});
  check_f32("axpy", "x", x);
  cpu::require_like("axpy", "y", y, x, "x");
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_index(x.numel(), [&](int64_t i) { yp[i] += alpha * xp[i]; });
}

void scale_inplace(Tensor& y, float alpha, const Stream& s) {
  LANCET_CUDA_TWIN(y, scale_inplace(y, alpha, s));
  cpu::require_cpu("scale_inplace", s, y);
  check_f32("scale_inplace", "y", y);
  float* yp = y.data<float>();
  for_each_index(y.numel(), [&](int64_t i) { yp[i] *= alpha; });
}

namespace {

// Copies between y [N, sum C_i, HW] and the parts xs[i] [N, C_i, HW]; to_y picks the direction.
void concat_copy(const char* op, const std::vector<Tensor>& xs, const Tensor& y, bool to_y, const Stream& s) {
  cpu::require_cpu(op, s, y);
  check_f32(op, "concatenated tensor", y);
  const Nchw d = nchw_of(op, "concatenated tensor", y);
  LANCET_CHECK(!xs.empty(), op << ": no parts to concatenate into " << y.shape_str());
  int64_t total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    cpu::require_cpu(op, s, y, {&x});
    check_f32(op, "part", x);
    LANCET_CHECK(x.ndim() == 4 && x.dim(0) == d.N && x.dim(2) * x.dim(3) == d.HW && x.dim(2) == y.dim(2),
                 op << ": part " << i << " " << x.shape_str() << " does not fit the concatenated tensor "
                    << y.shape_str() << " (N, H, W must match)");
    total += x.dim(1);
  }
  LANCET_CHECK(total == d.C, op << ": parts have " << total << " channels in all but the concatenated tensor "
                                << y.shape_str() << " has " << d.C);
  std::vector<int64_t> first(xs.size());
  for (size_t i = 1; i < xs.size(); ++i) first[i] = first[i - 1] + xs[i - 1].dim(1);
  // One task per (image, part) keeps every copy a contiguous C_i * HW block.
  const int64_t parts = static_cast<int64_t>(xs.size());
  // Tensors are handles: the destination side is written through raw_data() (checked f32 above).
  float* yp = static_cast<float*>(y.raw_data());
  std::vector<float*> xp(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) xp[i] = static_cast<float*>(xs[i].raw_data());
  parallel_for(d.N * parts, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, d.C * d.HW / parts)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t t = begin; t < end; ++t) {
                   const int64_t n = t / parts, i = t % parts, ci = xs[i].dim(1);
                   float* ys = yp + (n * d.C + first[i]) * d.HW;
                   float* xsb = xp[i] + n * ci * d.HW;
                   const size_t bytes = static_cast<size_t>(ci * d.HW) * sizeof(float);
                   if (to_y)
                     std::memcpy(ys, xsb, bytes);
                   else
                     std::memcpy(xsb, ys, bytes);
                 }
               });
}

}  // namespace

void concat_channels_forward(const std::vector<Tensor>& xs, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(y, concat_channels_forward(xs, y, s));
  concat_copy("concat_channels_forward", xs, y, true, s);
}

void concat_channels_backward(const Tensor& dy, std::vector<Tensor>& dxs, const Stream& s) {
  LANCET_CUDA_TWIN(dy, concat_channels_backward(dy, dxs, s));
  concat_copy("concat_channels_backward", dxs, dy, false, s);
}

void channel_scale_forward(const Tensor& x, const Tensor& g, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, channel_scale_forward(x, g, y, s));
  const char* op = "channel_scale_forward";
  cpu::require_cpu(op, s, x, {&g, &y});
  check_f32(op, "x", x);
  const Nchw d = nchw_of(op, "x", x);
  cpu::require_shape(op, "g", g, {d.N, d.C}, cpu::desc("x", x));
  cpu::require_dtype(op, "g", g, DType::f32);
  cpu::require_like(op, "y", y, x, "x");
  const float* xp = x.data<float>();
  const float* gp = g.data<float>();
  float* yp = y.data<float>();
  parallel_for(d.N * d.C, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, d.HW)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t pl = begin; pl < end; ++pl)
                   for (int64_t i = 0; i < d.HW; ++i) yp[pl * d.HW + i] = xp[pl * d.HW + i] * gp[pl];
               });
}

void channel_scale_backward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                            const Stream& s) {
  LANCET_CUDA_TWIN(x, channel_scale_backward(x, g, dy, dx, dg, s));
  const char* op = "channel_scale_backward";
  cpu::require_cpu(op, s, x, {&g, &dy, &dx, &dg});
  check_f32(op, "x", x);
  const Nchw d = nchw_of(op, "x", x);
  cpu::require_shape(op, "g", g, {d.N, d.C}, cpu::desc("x", x));
  cpu::require_dtype(op, "g", g, DType::f32);
  cpu::require_like(op, "dy", dy, x, "x");
  if (dx.defined()) cpu::require_like(op, "dx", dx, x, "x");
  if (dg.defined()) cpu::require_like(op, "dg", dg, g, "g");
  const float* xp = x.data<float>();
  const float* gp = g.data<float>();
  const float* dyp = dy.data<float>();
  float* dxp = dx.defined() ? dx.data<float>() : nullptr;
  float* dgp = dg.defined() ? dg.data<float>() : nullptr;
  parallel_for(d.N * d.C, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, d.HW)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t pl = begin; pl < end; ++pl) {
                   const float* xq = xp + pl * d.HW;
                   const float* dq = dyp + pl * d.HW;
                   if (dgp) {
                     double sum = 0;
                     for (int64_t i = 0; i < d.HW; ++i) sum += static_cast<double>(dq[i]) * xq[i];
                     dgp[pl] = static_cast<float>(sum);
                   }
                   if (dxp)
                     for (int64_t i = 0; i < d.HW; ++i) dxp[pl * d.HW + i] = dq[i] * gp[pl];
                 }
               });
}

namespace {

float to_float(float v) { return v; }
float to_float(half_t v) { return static_cast<float>(v); }
float to_float(bfloat16_t v) { return static_cast<float>(v); }
template <typename D> D from_float(float v) { return D(v); }
template <> float from_float<float>(float v) { return v; }

template <typename S, typename D>
void cast_elements(const Tensor& src, Tensor& dst) {
  const S* sp = src.data<S>();
  D* dp = dst.data<D>();
  for_each_index(src.numel(), [&](int64_t i) { dp[i] = from_float<D>(to_float(sp[i])); });
}

template <typename S>
void cast_from(const Tensor& src, Tensor& dst) {
  switch (dst.dtype()) {
    case DType::f32: cast_elements<S, float>(src, dst); return;
    case DType::f16: cast_elements<S, half_t>(src, dst); return;
    case DType::bf16: cast_elements<S, bfloat16_t>(src, dst); return;
    default: break;
  }
}

void check_float_dtype(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f16 || t.dtype() == DType::bf16,
               op << ": " << name << " " << t.shape_str() << " is " << dtype_name(t.dtype())
                  << " (expected f32, f16 or bf16)");
}

}  // namespace

void cast(const Tensor& src, Tensor& dst, const Stream& s) {
  LANCET_CUDA_TWIN(src, cast(src, dst, s));
  const char* op = "cast";
  cpu::require_cpu(op, s, src, {&dst});
  cpu::require_defined(op, "dst", dst);
  check_float_dtype(op, "src", src);
  check_float_dtype(op, "dst", dst);
  LANCET_CHECK(dst.shape() == src.shape() && dst.format() == src.format(),
               op << ": dst " << dst.shape_str() << " does not match src " << src.shape_str()
                  << " (same shape and memory format)");
  if (src.numel() == 0) return;
  if (src.dtype() == dst.dtype()) {
    std::memcpy(dst.raw_data(), src.raw_data(), src.nbytes());
    return;
  }
  switch (src.dtype()) {
    case DType::f32: cast_from<float>(src, dst); return;
    case DType::f16: cast_from<half_t>(src, dst); return;
    case DType::bf16: cast_from<bfloat16_t>(src, dst); return;
    default: return;  // checked above
  }
}

Tensor cast_to(const Tensor& src, DType t, const Stream& s) {
  LANCET_CHECK(src.defined(), "cast_to: undefined tensor");
  if (src.dtype() == t) return src;
  Tensor dst = Tensor::empty(src.shape(), t, src.device(), src.format());
  cast(src, dst, s);
  return dst;
}

double sum_squares(const Tensor& x, const Stream& s) {
  LANCET_CUDA_TWIN(x, sum_squares(x, s));
  cpu::require_cpu("sum_squares", s, x);
  check_f32("sum_squares", "x", x);
  const float* xp = x.data<float>();
  const auto part = block_partials<double>(x.numel(), [&](int64_t b, int64_t e) {
    double sum = 0;
    for (int64_t i = b; i < e; ++i) sum += static_cast<double>(xp[i]) * xp[i];
    return sum;
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

bool all_finite(const Tensor& x, const Stream& s) {
  LANCET_CUDA_TWIN(x, all_finite(x, s));
  cpu::require_cpu("all_finite", s, x);
  check_f32("all_finite", "x", x);
  const float* xp = x.data<float>();
  const auto part = block_partials<char>(x.numel(), [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t i = b; i < e; ++i) ok &= std::isfinite(xp[i]);
    return static_cast<char>(ok);
  });
  for (char ok : part)
    if (!ok) return false;
  return true;
}

}  // namespace lancet
