// gpu_util.h — what the test_gpu_*.cpp files share: skipping without a GPU, moving tensors
// (in either memory format), rounding to and widening from f16/bf16, and comparing a CUDA result
// with its CPU twin's (within a tolerance; bit for bit: expect_same_bits in kernel_test_util.h).
//
// Every GPU test starts with LANCET_REQUIRE_GPU(); it skips with a message on a machine (or a
// build) without CUDA devices, so the `gpu` label passes everywhere and means something only
// where a GPU exists.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/elementwise.h"
#include "kernels/tensor.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace lancet::testing {

inline bool gpu_available() {
#ifdef LANCET_WITH_CUDA
  return !cuda_devices().empty();
#else
  return false;
#endif
}

inline const char* no_gpu_reason() {
#ifdef LANCET_WITH_CUDA
  return "no CUDA device on this machine (the gpu label needs one)";
#else
  return "this build has no CUDA (LANCET_CUDA=OFF)";
#endif
}

#define LANCET_REQUIRE_GPU()                                                            \
  do {                                                                                  \
    if (!::lancet::testing::gpu_available()) GTEST_SKIP() << ::lancet::testing::no_gpu_reason(); \
  } while (0)

inline Tensor to_gpu(const Tensor& t) { return t.defined() ? t.to(Device::cuda(0)) : Tensor(); }
inline Tensor to_cpu(const Tensor& t) { return t.defined() ? t.to(Device::cpu()) : Tensor(); }
// The CPU f32 tensor `t` stored as dtype dt (f32, f16, bf16) on the GPU in memory format f, each
// value converted by half_t / bfloat16_t (round to nearest even); undefined stays undefined. The
// layout is converted on the CPU (to_format), so only the upload touches the GPU.
inline Tensor to_gpu_as(const Tensor& t, DType dt, MemoryFormat f = MemoryFormat::nchw) {
  if (!t.defined()) return Tensor();
  Tensor h = t;
  if (dt != DType::f32) {
    h = Tensor::empty(t.shape(), dt, Device::cpu(), t.format());
    const float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      if (dt == DType::f16)
        h.data<half_t>()[i] = half_t(p[i]);
      else
        h.data<bfloat16_t>()[i] = bfloat16_t(p[i]);
    }
  }
  return to_gpu(to_format(h, f, Stream::cpu()));
}

// A CPU f32 tensor rounded to what `dt` holds (f32: an exact copy): the CPU reference's input
// for a run in dt (same memory format).
inline Tensor rounded(const Tensor& t, DType dt) {
  Tensor r = t.clone();
  round_to_dtype_inplace(r.data<float>(), r.numel(), dt);
  return r;
}

// A tensor of any float dtype (f32, f16, bf16) on either device as a CPU f32 tensor in the same
// memory format (16-bit values widen exactly).
inline Tensor to_cpu_f32(const Tensor& t) {
  const Tensor h = to_cpu(t);
  if (h.dtype() == DType::f32) return h;
  Tensor f = Tensor::empty(h.shape(), DType::f32, Device::cpu(), h.format());
  for (int64_t i = 0; i < h.numel(); ++i)
    f.data<float>()[i] = h.dtype() == DType::f16 ? static_cast<float>(h.data<half_t>()[i])
                                                 : static_cast<float>(h.data<bfloat16_t>()[i]);
  return f;
}

// A tensor of any float dtype and either memory format, on either device, as a CPU f32 nchw
// tensor (the layout of a CPU reference result).
inline Tensor to_cpu_nchw_f32(const Tensor& t) {
  return to_cpu_f32(to_format(to_cpu(t), MemoryFormat::nchw, Stream::cpu()));
}

// Element-wise |gpu - cpu| <= atol + rtol * |cpu| for f32 tensors (gpu may be on either
// device), compared in memory order: give both one memory format (to_cpu_nchw_f32); reports the
// first few failures with their flat index, and the worst one.
inline void expect_close(const Tensor& cpu, const Tensor& gpu, double rtol, double atol, const std::string& what) {
  ASSERT_TRUE(cpu.defined() && gpu.defined()) << what << ": undefined tensor";
  ASSERT_EQ(cpu.shape(), gpu.shape()) << what << ": shape " << cpu.shape_str() << " vs " << gpu.shape_str();
  const std::vector<float> a = cpu.to_vector(), b = gpu.to_vector();
  int reported = 0;
  double worst = 0;
  int64_t worst_i = -1;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    const double lim = atol + rtol * std::fabs(static_cast<double>(a[i]));
    if (!(d <= lim)) {  // NaN fails too
      if (reported++ < 5)
        ADD_FAILURE() << what << "[" << i << "]: cpu " << a[i] << " gpu " << b[i] << " (|diff| " << d << " > " << lim
                      << ")";
      if (!(d <= worst)) {
        worst = d;
        worst_i = static_cast<int64_t>(i);
      }
    }
  }
  if (reported > 0)
    ADD_FAILURE() << what << ": " << reported << " of " << a.size() << " elements differ; worst at " << worst_i;
}

}  // namespace lancet::testing
