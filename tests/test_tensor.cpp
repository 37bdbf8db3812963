// Tensor, dtype and allocator basics.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "kernels/allocator.h"
#include "kernels/parallel.h"
#include "kernels/tensor.h"

using namespace lancet;

TEST(Tensor, ShapeDtypeAndViews) {
  Tensor t = Tensor::zeros({2, 3, 4, 5});
  EXPECT_EQ(t.numel(), 120);
  EXPECT_EQ(t.dim(-1), 5);
  EXPECT_EQ(t.nbytes(), 480u);
  EXPECT_EQ(t.dtype(), DType::f32);
  EXPECT_TRUE(t.device().is_cpu());
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor v = t.view({6, 20});
  EXPECT_EQ(v.data<float>(), t.data<float>());  // shares storage
  Tensor row = t.narrow(1, 1);
  EXPECT_EQ(row.shape(), (Shape{1, 3, 4, 5}));
  EXPECT_EQ(row.data<float>()[0], 60.f);
  Tensor c = t.clone();
  c.data<float>()[0] = -1;
  EXPECT_EQ(t.data<float>()[0], 0.f);
  EXPECT_THROW(t.view({7, 7}), Error);
  EXPECT_THROW(t.narrow(1, 2), Error);
  EXPECT_THROW(t.dim(4), Error);
  EXPECT_THROW(t.data<int64_t>(), Error);
  Tensor scalar = Tensor::empty({});
  EXPECT_EQ(scalar.numel(), 1);
}

TEST(Tensor, ShapeMismatchNamesBothShapes) {
  Tensor a = Tensor::zeros({2, 3});
  Tensor b = Tensor::zeros({3, 2});
  try {
    a.copy_from(b);
    FAIL() << "no throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("[2, 3]"), std::string::npos) << m;
    EXPECT_NE(m.find("[3, 2]"), std::string::npos) << m;
  }
}

TEST(Tensor, AllocatorCountsBytes) {
  Allocator& a = allocator_for(Device::cpu());
  const size_t before = a.current_bytes();
  {
    Tensor t = Tensor::empty({1000});
    EXPECT_EQ(a.current_bytes(), before + 4000);
    EXPECT_GE(a.peak_bytes(), before + 4000);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
  }
  EXPECT_EQ(a.current_bytes(), before);
}

TEST(Tensor, CudaDeviceWithoutGpuIsAClearError) {
  EXPECT_EQ(parse_device("cuda:1").index, 1);
  EXPECT_THROW(parse_device("tpu"), Error);
#ifdef LANCET_WITH_CUDA
  // On a machine with no GPU, asking for one says so instead of crashing.
  try {
    Tensor t = Tensor::empty({4}, DType::f32, Device::cuda(7));
    SUCCEED();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:7"), std::string::npos) << e.what();
  }
#else
  EXPECT_THROW(Tensor::empty({4}, DType::f32, Device::cuda(0)), Error);
#endif
}

TEST(DType, HalfAndBfloat16RoundTrip) {
  const float cases[] = {0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f /*min normal*/, 5.9604645e-08f /*min subnormal*/,
                         3.14159265f, 1e-3f};
  for (float f : cases) {
    const float h = static_cast<float>(half_t(f));
    EXPECT_NEAR(h, f, std::fabs(f) * 1e-3 + 1e-7) << f;
  }
  EXPECT_TRUE(std::isinf(static_cast<float>(half_t(1e6f))));
  EXPECT_TRUE(std::isnan(static_cast<float>(half_t(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(half_t(1.0f).bits, 0x3c00);
  EXPECT_EQ(half_t(65504.f).bits, 0x7bff);
  EXPECT_EQ(half_t(5.9604645e-08f).bits, 0x0001);
  EXPECT_EQ(half_t(1.00048828125f).bits, 0x3c00);  // exactly halfway between 1 and next: ties to even
  EXPECT_EQ(bfloat16_t(1.0f).bits, 0x3f80);
  EXPECT_EQ(static_cast<float>(bfloat16_t(3.0f)), 3.0f);
  EXPECT_NEAR(static_cast<float>(bfloat16_t(3.14159265f)), 3.140625f, 1e-6);
  EXPECT_TRUE(std::isnan(static_cast<float>(bfloat16_t(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Threads, SettingIsHonoured) {
  set_num_threads(1);
  EXPECT_EQ(num_threads(), 1);
  set_num_threads(2);
  EXPECT_EQ(num_threads(), 2);
  EXPECT_THROW(set_num_threads(0), Error);
}
