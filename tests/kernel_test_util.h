// kernel_test_util.h — what the kernel tests (test_kernels_*.cpp on the CPU, test_gpu_*.cpp
// against the CPU) share beyond gradcheck.h: a bit-for-bit tensor comparison that reads either
// device and either memory format, and the arguments several of them build (a Conv2dParams from
// stride, padding, dilation and groups; one BatchNorm's parameters and running statistics).
#pragma once
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "kernels/conv.h"
#include "kernels/elementwise.h"
#include "kernels/tensor.h"
#include "tests/gradcheck.h"

namespace lancet::testing {

// Same shape, same dtype and the same bits in every logical element [n, c, h, w] (so -0 vs +0
// and NaN payloads count): either tensor may be on either device and in either memory format.
// Reports the first few differences by their nchw flat index (f32: with both values).
inline void expect_same_bits(const Tensor& want, const Tensor& got, const std::string& what) {
  ASSERT_TRUE(want.defined() && got.defined()) << what << ": undefined tensor";
  ASSERT_EQ(want.shape(), got.shape()) << what;
  ASSERT_EQ(want.dtype(), got.dtype()) << what;
  const Tensor a = to_format(want.to(Device::cpu()), MemoryFormat::nchw, Stream::cpu());
  const Tensor b = to_format(got.to(Device::cpu()), MemoryFormat::nchw, Stream::cpu());
  const size_t es = dtype_size(a.dtype());
  const auto* pa = static_cast<const unsigned char*>(a.raw_data());
  const auto* pb = static_cast<const unsigned char*>(b.raw_data());
  int64_t bad = 0;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(pa + i * es, pb + i * es, es) != 0 && bad++ < 5) {
      if (a.dtype() == DType::f32)
        ADD_FAILURE() << what << "[" << i << "]: " << a.data<float>()[i] << " vs " << b.data<float>()[i];
      else
        ADD_FAILURE() << what << "[" << i << "] differs";
    }
  EXPECT_EQ(bad, 0) << what << ": elements that differ, of " << a.numel();
}

// Square stride, padding and dilation; `groups` channel groups.
inline Conv2dParams conv_params(int stride, int pad, int dilation = 1, int groups = 1) {
  Conv2dParams p;
  p.stride_h = p.stride_w = stride;
  p.pad_h = p.pad_w = pad;
  p.dilation_h = p.dilation_w = dilation;
  p.groups = groups;
  return p;
}

// One convolution to test: its parameters, input and weight shapes, and a name for the trace
// (may be left out).
struct ConvCase {
  Conv2dParams p;
  Shape x, w;
  std::string name = "";
};

// One BatchNorm's parameters and running statistics over C channels, from fixed seeds (two
// BnParams of one C hold the same values); `affine` false leaves gamma and beta undefined.
struct BnParams {
  Tensor gamma, beta, rm, rv;
  BnParams(int64_t C, bool affine) {
    if (affine) {
      gamma = random_tensor({C}, 7, 0.5f, 1.5f);
      beta = random_tensor({C}, 8);
    }
    rm = random_tensor({C}, 9, -0.5f, 0.5f);
    rv = random_tensor({C}, 10, 0.5f, 2.f);
  }
};

}  // namespace lancet::testing
