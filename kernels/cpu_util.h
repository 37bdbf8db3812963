// cpu_util.h — internal helpers shared by the CPU kernels in kernels/*.cpp (not a public API).
//
// Argument checks: every op validates its tensors with the `require_*` functions so that all
// messages have one shape: "<op>: <what> ..." naming the offending shapes.
// Memory formats: require_cpu refuses channels_last; an op that supports it checks devices with
// require_cpu_any_format, requires one format across its 4-D operands (require_like,
// require_same_format) and walks them with Planes or ChannelView.
// Threading: see BlasSerial. Workspace: see scratch().
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/blas.h"
#include "kernels/error.h"
#include "kernels/parallel.h"
#include "kernels/tensor.h"

namespace lancet::cpu {

// Device dispatch for ops that have only a CPU implementation so far. `x` is the tensor the op
// dispatches on; every other defined tensor and the stream must be on the same device. Either
// memory format passes: an op that accepts channels_last then checks that its 4-D operands
// agree (require_same_format, require_like).
inline void require_cpu_any_format(const char* op, const Stream& s, const Tensor& x,
                                   std::initializer_list<const Tensor*> others = {}) {
  LANCET_CHECK(x.defined(), op << ": input is an undefined tensor");
  if (x.device().is_cuda()) LANCET_FAIL(op << ": CUDA kernel not built yet");
  LANCET_CHECK(s.device == x.device(),
               op << ": stream is on " << s.device.str() << " but the input is on " << x.device().str());
  for (const Tensor* t : others) {
    if (!t->defined()) continue;
    LANCET_CHECK(t->device() == x.device(), op << ": tensor " << t->shape_str() << " is on " << t->device().str()
                                               << " but the input " << x.shape_str() << " is on " << x.device().str());
  }
}

// The same for ops that take nchw only: a channels_last tensor is refused by name.
inline void require_cpu(const char* op, const Stream& s, const Tensor& x,
                        std::initializer_list<const Tensor*> others = {}) {
  require_cpu_any_format(op, s, x, others);
  LANCET_CHECK(x.format() == MemoryFormat::nchw,
               op << ": channels_last input " << x.shape_str() << " is not supported on the CPU");
  for (const Tensor* t : others)
    LANCET_CHECK(!t->defined() || t->format() == MemoryFormat::nchw,
                 op << ": channels_last tensor " << t->shape_str() << " is not supported on the CPU");
}

// `t` must have `ref`'s memory format (both defined): "conv2d_forward: output [1, 4, 8, 8] is
// channels_last but input [1, 3, 8, 8] is nchw".
inline void require_same_format(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                                const char* ref_name) {
  LANCET_CHECK(t.format() == ref.format(), op << ": " << name << " " << t.shape_str() << " is "
                                              << memory_format_name(t.format()) << " but " << ref_name << " "
                                              << ref.shape_str() << " is " << memory_format_name(ref.format()));
}

inline void require_dtype(const char* op, const char* name, const Tensor& t, DType dt) {
  LANCET_CHECK(t.dtype() == dt, op << ": " << name << " " << t.shape_str() << " must be " << dtype_name(dt) << ", got "
                                   << dtype_name(t.dtype()));
}

inline void require_defined(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
}

// `t` must have shape `expected`, which follows from `context` (the operands it derives from,
// with their shapes), e.g. "maxpool2d_forward: output [1, 1, 2, 2] does not match input
// [1, 1, 5, 5] (expected [1, 1, 3, 3])".
inline void require_shape(const char* op, const char* name, const Tensor& t, const Shape& expected,
                          const std::string& context) {
  require_defined(op, name, t);
  LANCET_CHECK(t.shape() == expected, op << ": " << name << " " << t.shape_str() << " does not match " << context
                                         << " (expected " << shape_str(expected) << ")");
}

// A defined f32 tensor with the shape and memory format of `ref`: "add: b [2, 4] does not match
// a [2, 3]".
inline void require_like(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  require_defined(op, name, t);
  LANCET_CHECK(t.shape() == ref.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match " << ref_name << " " << ref.shape_str());
  require_dtype(op, name, t, DType::f32);
  require_same_format(op, name, t, ref, ref_name);
}

// "input [2, 3, 8, 8]" for messages.
inline std::string desc(const char* name, const Tensor& t) { return std::string(name) + " " + t.shape_str(); }

// A 4-D tensor's (n, c) planes in its memory format: element (n, c, i = h * W + w) lies at
// offset(n, c) + i * step; nchw planes are contiguous (step 1), channels_last ones strided
// (step C). Per-plane and per-channel kernels (pools, SE scale, BatchNorm) walk a plane in the
// same order i = 0, 1, ... in either format, so their sums, and results, agree bit for bit.
struct Planes {
  int64_t N, C, HW, step;
  bool channels_last;
  int64_t offset(int64_t n, int64_t c) const { return channels_last ? n * HW * C + c : (n * C + c) * HW; }
};
inline Planes planes_of(const Tensor& t) {
  const bool cl = t.format() == MemoryFormat::channels_last;
  return {t.dim(0), t.dim(1), t.dim(2) * t.dim(3), cl ? t.dim(1) : 1, cl};
}

// A 4-D tensor as [outer, C, inner] in memory, element (o, c, i) at (o * C + c) * inner + i:
// nchw is outer N, inner H * W; channels_last is outer N * H * W, inner 1 (as
// kernels/cuda/conv_util.h's ChannelView). Channel slices of one outer row are contiguous.
struct ChannelView {
  int64_t outer, C, inner;
};
inline ChannelView channel_view(const Tensor& t) {
  if (t.format() == MemoryFormat::channels_last) return {t.dim(0) * t.dim(2) * t.dim(3), t.dim(1), 1};
  return {t.dim(0), t.dim(1), t.dim(2) * t.dim(3)};
}

// Calling sgemm from inside a parallel region: OpenBLAS (pthreads build) would start its own
// workers in every call and oversubscribe the cores. Kernels that split a product into tasks
// themselves hold a BlasSerial for the duration of the region, so each task's sgemm runs on
// the calling worker only; the BLAS thread count is restored afterwards. Tasks are cut by
// shape only, never by thread count, so results are bit-identical for any set_num_threads.
class BlasSerial {
 public:
  BlasSerial() : restore_(num_threads()) {
    if (restore_ > 1) blas_set_num_threads(1);
  }
  ~BlasSerial() {
    if (restore_ > 1) blas_set_num_threads(restore_);
  }
  BlasSerial(const BlasSerial&) = delete;
  BlasSerial& operator=(const BlasSerial&) = delete;

 private:
  int restore_;
};

// A grow-only per-thread workspace: `slot` (0-3) distinguishes buffers needed at the same time.
// The pointer stays valid until the next scratch() call with the same slot on this thread.
// A kernel may hold slots of the calling thread across a parallel region only if its tasks
// (which also run on the calling thread) use other slots; conv.cpp and conv_winograd.cpp say
// which.
inline float* scratch(int slot, size_t n) {
  thread_local std::vector<float> bufs[4];
  std::vector<float>& b = bufs[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of elements per task for elementwise loops: big enough to amortise a parallel region.
constexpr int64_t kElementwiseGrain = 1 << 15;

}  // namespace lancet::cpu
