// elementwise.cpp — CPU add/axpy/scale, channel concat, SE channel scale, reductions and
// memory-format conversion. Both memory formats: the elementwise ops run over memory; the
// per-channel ops walk planes (cpu::Planes) or channel rows (cpu::ChannelView) in the same
// logical order in either format, so every result is bitwise the same.
#include "kernels/elementwise.h"

#include <cmath>
#include <cstring>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/conv_util.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/runtime.h"
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

cpu::Planes planes_4d(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.ndim() == 4, op << ": " << name << " must be 4-D [N, C, H, W], got " << t.shape_str());
  return cpu::planes_of(t);
}

// Calls fn(k) with the memory index k of the logical (nchw-order) elements [begin, end) of t,
// in that order: reductions over a channels_last tensor add in the order nchw would.
template <typename F>
void for_each_logical(const Tensor& t, int64_t begin, int64_t end, F&& fn) {
  if (t.format() == MemoryFormat::nchw) {
    for (int64_t i = begin; i < end; ++i) fn(i);
    return;
  }
  const cpu::Planes d = cpu::planes_of(t);
  int64_t i = begin % d.HW, c = begin / d.HW % d.C, n = begin / (d.HW * d.C);
  for (int64_t k = begin; k < end; ++k) {
    fn(d.offset(n, c) + i * d.step);
    if (++i == d.HW) {
      i = 0;
      if (++c == d.C) c = 0, ++n;
    }
  }
}

}  // namespace

void fill(Tensor& y, float value, const Stream& s) {
  LANCET_CUDA_TWIN(y, fill(y, value, s));
  cpu::require_cpu_any_format("fill", s, y);
  check_f32("fill", "y", y);
  float* yp = y.data<float>();
  for_each_index(y.numel(), [&](int64_t i) { yp[i] = value; });
}

void add(const Tensor& a, const Tensor& b, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(a, add(a, b, y, s));
  cpu::require_cpu_any_format("add", s, a, {&b, &y});
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
  cpu::require_cpu_any_format("add_inplace", s, x, {&y});
  check_f32("add_inplace", "x", x);
  cpu::require_like("add_inplace", "y", y, x, "x");
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_index(x.numel(), [&](int64_t i) { yp[i] += xp[i]; });
}

void axpy(float alpha, const Tensor& x, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, axpy(alpha, x, y, s));
  cpu::require_cpu_any_format("axpy", s, x, {&y});
  check_f32("axpy", "x", x);
  cpu::require_like("axpy", "y", y, x, "x");
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_index(x.numel(), [&](int64_t i) { yp[i] += alpha * xp[i]; });
}

void scale_inplace(Tensor& y, float alpha, const Stream& s) {
  LANCET_CUDA_TWIN(y, scale_inplace(y, alpha, s));
  cpu::require_cpu_any_format("scale_inplace", s, y);
  check_f32("scale_inplace", "y", y);
  float* yp = y.data<float>();
  for_each_index(y.numel(), [&](int64_t i) { yp[i] *= alpha; });
}

namespace {

// Copies between y [N, sum C_i, H, W] and the parts xs[i] [N, C_i, H, W], all in one memory
// format; to_y picks the direction. Seen as [outer, C, inner] (cpu::ChannelView), part i of
// outer row o is one contiguous block of C_i * inner floats in both tensors.
void concat_copy(const char* op, const std::vector<Tensor>& xs, const Tensor& y, bool to_y, const Stream& s) {
  cpu::require_cpu_any_format(op, s, y);
  check_f32(op, "concatenated tensor", y);
  const cpu::Planes d = planes_4d(op, "concatenated tensor", y);
  LANCET_CHECK(!xs.empty(), op << ": no parts to concatenate into " << y.shape_str());
  int64_t total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    cpu::require_cpu_any_format(op, s, y, {&x});
    check_f32(op, "part", x);
    LANCET_CHECK(x.ndim() == 4 && x.dim(0) == d.N && x.dim(2) * x.dim(3) == d.HW && x.dim(2) == y.dim(2),
                 op << ": part " << i << " " << x.shape_str() << " does not fit the concatenated tensor "
                    << y.shape_str() << " (N, H, W must match)");
    cpu::require_same_format(op, ("part " + std::to_string(i)).c_str(), x, y, "the concatenated tensor");
    total += x.dim(1);
  }
  LANCET_CHECK(total == d.C, op << ": parts have " << total << " channels in all but the concatenated tensor "
                                << y.shape_str() << " has " << d.C);
  std::vector<int64_t> first(xs.size());
  for (size_t i = 1; i < xs.size(); ++i) first[i] = first[i - 1] + xs[i - 1].dim(1);
  // One task per (outer row, part): nchw (image, part) with a C_i * HW block, channels_last
  // (pixel, part) with C_i floats.
  const cpu::ChannelView v = cpu::channel_view(y);
  const int64_t parts = static_cast<int64_t>(xs.size());
  // Tensors are handles: the destination side is written through raw_data() (checked f32 above).
  float* yp = static_cast<float*>(y.raw_data());
  std::vector<float*> xp(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) xp[i] = static_cast<float*>(xs[i].raw_data());
  const int64_t grain = std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, v.C * v.inner / parts));
  parallel_for(v.outer * parts, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / parts, i = t % parts, ci = xs[i].dim(1);
      float* ys = yp + (o * v.C + first[i]) * v.inner;
      float* xsb = xp[i] + o * ci * v.inner;
      const size_t bytes = static_cast<size_t>(ci * v.inner) * sizeof(float);
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
  cpu::require_cpu_any_format(op, s, x, {&g, &y});
  check_f32(op, "x", x);
  const cpu::Planes d = planes_4d(op, "x", x);
  cpu::require_shape(op, "g", g, {d.N, d.C}, cpu::desc("x", x));
  cpu::require_dtype(op, "g", g, DType::f32);
  cpu::require_like(op, "y", y, x, "x");
  const float* xp = x.data<float>();
  const float* gp = g.data<float>();
  float* yp = y.data<float>();
  parallel_for(d.N * d.C, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, d.HW)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t pl = begin; pl < end; ++pl) {
                   const int64_t o = d.offset(pl / d.C, pl % d.C), st = d.step;
                   for (int64_t i = 0; i < d.HW; ++i) yp[o + i * st] = xp[o + i * st] * gp[pl];
                 }
               });
}

void channel_scale_backward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                            const Stream& s) {
  LANCET_CUDA_TWIN(x, channel_scale_backward(x, g, dy, dx, dg, s));
  const char* op = "channel_scale_backward";
  cpu::require_cpu_any_format(op, s, x, {&g, &dy, &dx, &dg});
  check_f32(op, "x", x);
  const cpu::Planes d = planes_4d(op, "x", x);
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
                   const int64_t o = d.offset(pl / d.C, pl % d.C), st = d.step;
                   const float* xq = xp + o;
                   const float* dq = dyp + o;
                   if (dgp) {
                     double sum = 0;
                     for (int64_t i = 0; i < d.HW; ++i) sum += static_cast<double>(dq[i * st]) * xq[i * st];
                     dgp[pl] = static_cast<float>(sum);
                   }
                   if (dxp)
                     for (int64_t i = 0; i < d.HW; ++i) dxp[o + i * st] = dq[i * st] * gp[pl];
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
  cpu::require_cpu_any_format(op, s, src, {&dst});
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
  cpu::require_cpu_any_format("sum_squares", s, x);
  check_f32("sum_squares", "x", x);
  const float* xp = x.data<float>();
  // Blocks of the logical order, so a channels_last tensor's sum equals its nchw twin's.
  const auto part = block_partials<double>(x.numel(), [&](int64_t b, int64_t e) {
    double sum = 0;
    for_each_logical(x, b, e, [&](int64_t i) { sum += static_cast<double>(xp[i]) * xp[i]; });
    return sum;
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

bool all_finite(const Tensor& x, const Stream& s) {
  LANCET_CUDA_TWIN(x, all_finite(x, s));
  cpu::require_cpu_any_format("all_finite", s, x);
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

namespace {

// dst's element (n, c, i) = src's, each tensor in its own format; T only carries the bytes.
template <typename T>
void relayout(const Tensor& src, Tensor& dst) {
  const cpu::Planes sp = cpu::planes_of(src), dp = cpu::planes_of(dst);
  const T* sd = static_cast<const T*>(src.raw_data());
  T* dd = static_cast<T*>(dst.raw_data());
  parallel_for(sp.N * sp.C, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, sp.HW)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t pl = begin; pl < end; ++pl) {
                   const T* sq = sd + sp.offset(pl / sp.C, pl % sp.C);
                   T* dq = dd + dp.offset(pl / sp.C, pl % sp.C);
                   for (int64_t i = 0; i < sp.HW; ++i) dq[i * dp.step] = sq[i * sp.step];
                 }
               });
}

}  // namespace

void convert_format(const Tensor& src, Tensor& dst, const Stream& s) {
  const char* op = "convert_format";
  cpu::require_defined(op, "src", src);
  cpu::require_defined(op, "dst", dst);
  LANCET_CHECK(dst.shape() == src.shape() && dst.dtype() == src.dtype(),
               op << ": dst " << dst.shape_str() << " " << dtype_name(dst.dtype()) << " does not match src "
                  << src.shape_str() << " " << dtype_name(src.dtype()) << " (same shape and dtype)");
  LANCET_CHECK(dst.device() == src.device() && s.device == src.device(),
               op << ": src " << src.shape_str() << " is on " << src.device().str() << ", dst on "
                  << dst.device().str() << ", the stream on " << s.device.str() << " (expected one device)");
  const char* sb = static_cast<const char*>(src.raw_data());
  const char* db = static_cast<const char*>(dst.raw_data());
  LANCET_CHECK(src.nbytes() == 0 || db + dst.nbytes() <= sb || sb + src.nbytes() <= db,
               op << ": dst " << dst.shape_str() << " overlaps src");
  if (src.numel() == 0) return;
#ifdef LANCET_WITH_CUDA
  if (src.device().is_cuda()) {
    CudaDeviceGuard guard(s.device.index);
    if (src.format() == dst.format())
      copy_async(dst.raw_data(), dst.device(), src.raw_data(), src.device(), src.nbytes(), s);
    else
      cuda::convert_format(src, dst, /*accumulate=*/false, s);
    return;
  }
#endif
  cpu::require_cpu_any_format(op, s, src, {&dst});
  if (src.format() == dst.format()) {
    std::memcpy(dst.raw_data(), src.raw_data(), src.nbytes());
    return;
  }
  switch (dtype_size(src.dtype())) {
    case 1: relayout<uint8_t>(src, dst); return;
    case 2: relayout<uint16_t>(src, dst); return;
    case 4: relayout<uint32_t>(src, dst); return;
    case 8: relayout<uint64_t>(src, dst); return;
    default: LANCET_FAIL(op << ": elements of " << dtype_size(src.dtype()) << " bytes");
  }
}

Tensor to_format(const Tensor& x, MemoryFormat f, const Stream& s) {
  LANCET_CHECK(x.defined(), "to_format: undefined tensor");
  if (x.format() == f) return x;
  LANCET_CHECK(x.ndim() == 4, "to_format: channels_last needs a 4-D tensor, got " << x.shape_str());
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device(), f);
  convert_format(x, y, s);
  return y;
}

}  // namespace lancet
