// GPU tests for conv2d (cuDNN, kernels/cuda/conv.cu) and linear (cuBLASLt, kernels/cuda/linear.cu)
// against their CPU twins: forward, dx, dw, db over the model's shapes and odd ones (1x1, 3x3,
// the 7x7/2 stem on one channel, dilation 2 and 3, groups 2, depthwise, batch 1, odd H/W,
// channel counts 1/3/5/13, sizes needing several blocks), the accumulate contract (backward runs
// twice: dx overwritten, dw and db accumulated), channels_last inputs and weights in either
// format, autotune vs heuristics (and the algorithm cache), TF32, f16/bf16, and device errors.
// The public ops are called, so the LANCET_CUDA_TWIN dispatch is exercised too.
//
// Tolerances: |gpu - cpu| <= tol * (|cpu| + sqrt(R)), R the number of products summed into an
// element (K = Cin/groups * KH * KW for y, N * Ho * Wo for dw and db, ...). Inputs are uniform
// in [-1, 1], so sums are about sqrt(R) / 3 in size; an indexing, layout or accumulation bug
// is off by that much, while the same sums in another order (cuDNN's implicit GEMM, Winograd
// or FFT algorithms against the CPU's im2col/Winograd sgemm) differ by ~1e-6 of it. f32 uses
// tol 1e-4 (FMA math: no TF32). For f16/bf16 the inputs are rounded to the dtype first, so the
// CPU computes in f32 on exactly the values the GPU sees; the GPU multiplies exactly and adds
// in f32, then rounds each output once (dw converted from another format: twice): tol is 4
// ulps of the dtype (f16 2^-9, bf16 2^-6). TF32 rounds the inputs to 10 bits: tol 4e-3.
//
// Tensors move with Tensor::to (cudaMemcpy on the legacy default stream), so the ops run on
// that stream (kGpu, native null) unless a test synchronises explicitly.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/conv.h"
#include "kernels/linear.h"
#include "tests/gpu_util.h"
#include "tests/gradcheck.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/conv.h"
#endif

namespace lancet {
namespace {

using testing::expect_close;
using testing::expect_error;
using testing::random_tensor;
using testing::rounded;
using testing::to_cpu_nchw_f32;
using testing::to_gpu;
using testing::to_gpu_as;

const Stream kCpu = Stream::cpu();
const Stream kGpu{Device::cuda(0), nullptr};  // the legacy default stream, ordered with Tensor copies
constexpr MemoryFormat kNchw = MemoryFormat::nchw, kNhwc = MemoryFormat::channels_last;

double tol_for(DType dt) { return dt == DType::f32 ? 1e-4 : dt == DType::f16 ? 1.0 / 512 : 1.0 / 64; }

void expect_close_r(const Tensor& cpu, const Tensor& gpu, double tol, int64_t R, const std::string& what) {
  expect_close(cpu, gpu, tol, tol * std::sqrt(static_cast<double>(R)), what);
}

// Restores the process-wide convolution settings a test changes.
struct SettingsGuard {
  bool autotune = conv_autotune(), tf32 = allow_tf32();
  ~SettingsGuard() {
    set_conv_autotune(autotune);
    set_allow_tf32(tf32);
  }
};

// ---- conv2d -------------------------------------------------------------------------------

Conv2dParams params(int sh, int sw, int ph, int pw, int dh = 1, int dw = 1, int groups = 1) {
  Conv2dParams p;
  p.stride_h = sh, p.stride_w = sw, p.pad_h = ph, p.pad_w = pw, p.dilation_h = dh, p.dilation_w = dw;
  p.groups = groups;
  return p;
}

struct ConvCase {
  std::string name;
  Shape x, w;
  Conv2dParams p;
  bool bias = true, want_dx = true;
};

const std::vector<ConvCase>& conv_cases() {
  static const std::vector<ConvCase> cases = {
      {"1x1", {2, 5, 9, 7}, {13, 5, 1, 1}, params(1, 1, 0, 0)},
      {"3x3 pad 1", {2, 3, 13, 11}, {5, 3, 3, 3}, params(1, 1, 1, 1)},
      {"3x3 pad 1, 16 channels", {2, 16, 12, 10}, {16, 16, 3, 3}, params(1, 1, 1, 1)},  // CPU Winograd
      {"stem 7x7 stride 2 pad 3", {2, 1, 33, 29}, {8, 1, 7, 7}, params(2, 2, 3, 3)},
      {"dilation 2", {2, 5, 13, 11}, {6, 5, 3, 3}, params(1, 1, 2, 2, 2, 2)},
      {"dilation 3 stride 2", {2, 4, 17, 15}, {5, 4, 3, 3}, params(2, 2, 3, 3, 3, 3)},
      {"groups 2", {2, 6, 11, 9}, {10, 3, 3, 3}, params(1, 1, 1, 1, 1, 1, 2)},
      {"depthwise stride 2", {2, 13, 13, 11}, {13, 1, 3, 3}, params(2, 2, 1, 1, 1, 1, 13)},
      {"batch 1", {1, 13, 13, 11}, {16, 13, 3, 3}, params(1, 1, 1, 1)},
      {"3x5 kernel, stride 1x2, pad 0x2", {3, 5, 10, 13}, {7, 5, 3, 5}, params(1, 2, 0, 2)},
      {"no bias, no dx", {2, 3, 9, 9}, {4, 3, 3, 3}, params(2, 2, 1, 1), false, false},
      {"several blocks", {4, 16, 64, 64}, {32, 16, 3, 3}, params(1, 1, 1, 1)},
  };
  return cases;
}

// Runs forward and backward (twice, from random dw and db) on the CPU in f32 and through the
// public ops on the GPU in dtype dt, with x, y, dy, dx in format xf and w, dw in wf; compares.
void check_conv(const ConvCase& c, DType dt, MemoryFormat xf, MemoryFormat wf, double tol) {
  SCOPED_TRACE(c.name + " " + dtype_name(dt) + (xf == kNhwc ? " x channels_last" : "") +
               (wf == kNhwc ? " w channels_last" : ""));
  const Shape ys = conv2d_output_shape(c.p, c.x, c.w);
  const int64_t Co = c.w[0];
  const Tensor x = rounded(random_tensor(c.x, 1), dt), w = rounded(random_tensor(c.w, 2), dt);
  const Tensor b = c.bias ? random_tensor({Co}, 3) : Tensor();
  const Tensor dy = rounded(random_tensor(ys, 4), dt), dw0 = rounded(random_tensor(c.w, 5), dt);
  const Tensor db0 = random_tensor({Co}, 6);

  Tensor y = Tensor::empty(ys), dx = c.want_dx ? Tensor::empty(c.x) : Tensor(), dw = dw0.clone(), db = db0.clone();
  conv2d_forward(c.p, x, w, b, y, kCpu);
  for (int i = 0; i < 2; ++i) conv2d_backward(c.p, x, w, dy, dx, dw, db, kCpu);

  const Device gpu = Device::cuda(0);
  const Tensor gx = to_gpu_as(x, dt, xf), gw = to_gpu_as(w, dt, wf), gb = to_gpu(b), gdy = to_gpu_as(dy, dt, xf);
  Tensor gy = Tensor::empty(ys, dt, gpu, xf), gdx = c.want_dx ? Tensor::empty(c.x, dt, gpu, xf) : Tensor();
  Tensor gdw = to_gpu_as(dw0, dt, wf), gdb = to_gpu(db0);
  conv2d_forward(c.p, gx, gw, gb, gy, kGpu);
  for (int i = 0; i < 2; ++i) conv2d_backward(c.p, gx, gw, gdy, gdx, gdw, gdb, kGpu);

  const int64_t K = c.w[1] * c.w[2] * c.w[3], Kx = Co / c.p.groups * c.w[2] * c.w[3], P = shape_numel(ys) / Co;
  expect_close_r(y, to_cpu_nchw_f32(gy), tol, K, "y");
  if (c.want_dx) expect_close_r(dx, to_cpu_nchw_f32(gdx), tol, Kx, "dx");
  expect_close_r(dw, to_cpu_nchw_f32(gdw), tol, 2 * P, "dw");
  expect_close_r(db, to_cpu_nchw_f32(gdb), tol, 2 * P, "db");
}

TEST(GpuConv, MatchesCpuF32) {
  LANCET_REQUIRE_GPU();
  for (const ConvCase& c : conv_cases()) check_conv(c, DType::f32, kNchw, kNchw, tol_for(DType::f32));
}

TEST(GpuConv, ChannelsLastMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const ConvCase& c : conv_cases()) {
    check_conv(c, DType::f32, kNhwc, kNhwc, tol_for(DType::f32));
    check_conv(c, DType::f32, kNhwc, kNchw, tol_for(DType::f32));  // weight converted both ways
  }
  check_conv(conv_cases()[1], DType::f32, kNchw, kNhwc, tol_for(DType::f32));
}

TEST(GpuConv, HalfAndBfloat16MatchCpuOnRoundedInputs) {
  LANCET_REQUIRE_GPU();
  for (DType dt : {DType::f16, DType::bf16}) {
    for (const ConvCase& c : conv_cases()) {
      check_conv(c, dt, kNchw, kNchw, tol_for(dt));
      check_conv(c, dt, kNhwc, kNhwc, tol_for(dt));  // the tensor-core layout
    }
    check_conv(conv_cases()[2], dt, kNhwc, kNchw, tol_for(dt));
  }
}

#ifdef LANCET_WITH_CUDA
TEST(GpuConv, AutotuneAgreesWithHeuristicsAndCachesPerShape) {
  LANCET_REQUIRE_GPU();
  SettingsGuard restore;
  cuda::clear_conv_algo_cache();
  EXPECT_EQ(cuda::conv_algo_cache_size(), 0u);
  const ConvCase& c = conv_cases()[2];
  set_conv_autotune(false);
  check_conv(c, DType::f32, kNchw, kNchw, tol_for(DType::f32));
  EXPECT_EQ(cuda::conv_algo_cache_size(), 3u);  // forward, backward data, backward filter
  check_conv(c, DType::f32, kNchw, kNchw, tol_for(DType::f32));
  EXPECT_EQ(cuda::conv_algo_cache_size(), 3u);  // cached, not searched again
  set_conv_autotune(true);
  check_conv(c, DType::f32, kNchw, kNchw, tol_for(DType::f32));
  EXPECT_EQ(cuda::conv_algo_cache_size(), 6u);
  check_conv(c, DType::f16, kNhwc, kNhwc, tol_for(DType::f16));
  EXPECT_EQ(cuda::conv_algo_cache_size(), 9u);
  check_conv(conv_cases()[3], DType::f32, kNchw, kNchw, tol_for(DType::f32));
  EXPECT_EQ(cuda::conv_algo_cache_size(), 12u);
  check_conv(c, DType::f32, kNchw, kNchw, tol_for(DType::f32));
  EXPECT_EQ(cuda::conv_algo_cache_size(), 12u);
  cuda::clear_conv_algo_cache();
  EXPECT_EQ(cuda::conv_algo_cache_size(), 0u);
}
#endif

TEST(GpuConv, Tf32WithinItsPrecision) {
  LANCET_REQUIRE_GPU();
  SettingsGuard restore;
  set_allow_tf32(true);
  for (const ConvCase& c : conv_cases()) check_conv(c, DType::f32, kNchw, kNchw, 4e-3);
}

TEST(GpuConv, RunsOnANonDefaultStream) {
  LANCET_REQUIRE_GPU();
#ifdef LANCET_WITH_CUDA
  const ConvCase& c = conv_cases()[1];
  const Tensor x = random_tensor(c.x, 1), w = random_tensor(c.w, 2), b = random_tensor({c.w[0]}, 3);
  Tensor y = Tensor::empty(conv2d_output_shape(c.p, c.x, c.w));
  conv2d_forward(c.p, x, w, b, y, kCpu);
  const Tensor gx = to_gpu(x), gw = to_gpu(w), gb = to_gpu(b);
  Tensor gy = Tensor::empty(y.shape(), DType::f32, Device::cuda(0));
  synchronize(kGpu);  // the copies above are ordered on the default stream only
  CudaStream stream(Device::cuda(0));
  conv2d_forward(c.p, gx, gw, gb, gy, stream.stream());
  stream.synchronize();
  expect_close_r(y, to_cpu_nchw_f32(gy), tol_for(DType::f32), c.w[1] * 9, "y");
#endif
}

TEST(GpuConv, DeviceAndFormatErrors) {
  LANCET_REQUIRE_GPU();
  const Conv2dParams p = params(1, 1, 1, 1);
  const Tensor gx = to_gpu(random_tensor({1, 3, 8, 8}, 1)), w = random_tensor({4, 3, 3, 3}, 2);
  Tensor gy = Tensor::empty({1, 4, 8, 8}, DType::f32, Device::cuda(0));
  expect_error([&] { conv2d_forward(p, gx, w, Tensor(), gy, kGpu); },
               {"conv2d_forward", "[4, 3, 3, 3] is on cpu", "is on cuda:0"});
  expect_error([&] { conv2d_forward(p, gx, to_gpu(w), Tensor(), gy, kCpu); }, {"conv2d_forward", "stream is on cpu"});
  Tensor gy_nhwc = Tensor::empty({1, 4, 8, 8}, DType::f32, Device::cuda(0), kNhwc);
  expect_error([&] { conv2d_forward(p, gx, to_gpu(w), Tensor(), gy_nhwc, kGpu); },
               {"conv2d_forward", "output", "channels_last"});
  Tensor gy_half = Tensor::empty({1, 4, 8, 8}, DType::f16, Device::cuda(0));
  expect_error([&] { conv2d_forward(p, gx, to_gpu(w), Tensor(), gy_half, kGpu); }, {"conv2d_forward", "f16"});
  Tensor dx, dw = to_gpu(random_tensor({4, 3, 3, 3}, 3)), db;
  const Tensor gdy = to_gpu(random_tensor({1, 4, 7, 7}, 4));
  expect_error([&] { conv2d_backward(p, gx, to_gpu(w), gdy, dx, dw, db, kGpu); },
               {"conv2d_backward", "dy [1, 4, 7, 7]", "[1, 4, 8, 8]"});
}

// ---- linear -------------------------------------------------------------------------------

struct LinearCase {
  int64_t N, in, out;
  bool bias;
  int64_t x_offset = 0;  // x starts this many rows into a larger storage (an unaligned view)
};

void check_linear(const LinearCase& c, DType dt, double tol) {
  SCOPED_TRACE("linear N " + std::to_string(c.N) + " in " + std::to_string(c.in) + " out " + std::to_string(c.out) +
               (c.bias ? " bias " : " ") + dtype_name(dt) + (c.x_offset ? " offset view" : ""));
  const Tensor x = rounded(random_tensor({c.N, c.in}, 11), dt), w = rounded(random_tensor({c.out, c.in}, 12), dt);
  const Tensor b = c.bias ? random_tensor({c.out}, 13) : Tensor();
  const Tensor dy = rounded(random_tensor({c.N, c.out}, 14), dt), dw0 = rounded(random_tensor({c.out, c.in}, 15), dt);
  const Tensor db0 = random_tensor({c.out}, 16);
  Tensor y = Tensor::empty({c.N, c.out}), dx = Tensor::empty({c.N, c.in}), dw = dw0.clone(), db = db0.clone();
  linear_forward(x, w, b, y, kCpu);
  for (int i = 0; i < 2; ++i) linear_backward(x, w, dy, dx, dw, db, kCpu);

  const Device gpu = Device::cuda(0);
  Tensor gx = to_gpu_as(x, dt);
  if (c.x_offset > 0) {  // the same values at a misaligned address inside a bigger buffer
    Tensor big = Tensor::zeros({c.N + c.x_offset, c.in}, DType::f32);
    for (int64_t i = 0; i < x.numel(); ++i) big.data<float>()[c.x_offset * c.in + i] = x.data<float>()[i];
    gx = to_gpu_as(big, dt).narrow(c.x_offset, c.N);
  }
  const Tensor gw = to_gpu_as(w, dt), gb = to_gpu(b), gdy = to_gpu_as(dy, dt);
  Tensor gy = Tensor::empty({c.N, c.out}, dt, gpu), gdx = Tensor::empty({c.N, c.in}, dt, gpu);
  Tensor gdw = to_gpu_as(dw0, dt), gdb = to_gpu(db0);
  linear_forward(gx, gw, gb, gy, kGpu);
  for (int i = 0; i < 2; ++i) linear_backward(gx, gw, gdy, gdx, gdw, gdb, kGpu);

  expect_close_r(y, to_cpu_nchw_f32(gy), tol, c.in, "y");
  expect_close_r(dx, to_cpu_nchw_f32(gdx), tol, c.out, "dx");
  expect_close_r(dw, to_cpu_nchw_f32(gdw), tol, 2 * c.N, "dw");
  expect_close_r(db, to_cpu_nchw_f32(gdb), tol, 2 * c.N, "db");
}

// N = 1, sizes not multiples of 8, several row chunks of the db reduction (N 1500), and x at
// an address aligned to 4 bytes (f32) or 2 (f16/bf16) only.
const std::vector<LinearCase> kLinearCases = {
    {4, 13, 5, true},     {1, 7, 3, false},     {1, 64, 10, true},        {33, 100, 70, true},
    {1500, 24, 40, true}, {5, 13, 7, true, 1},  {16, 256, 128, false, 3},
};

TEST(GpuLinear, MatchesCpuF32) {
  LANCET_REQUIRE_GPU();
  for (const LinearCase& c : kLinearCases) check_linear(c, DType::f32, tol_for(DType::f32));
}

TEST(GpuLinear, HalfAndBfloat16MatchCpuOnRoundedInputs) {
  LANCET_REQUIRE_GPU();
  for (DType dt : {DType::f16, DType::bf16})
    for (const LinearCase& c : kLinearCases) check_linear(c, dt, tol_for(dt));
}

TEST(GpuLinear, Tf32WithinItsPrecision) {
  LANCET_REQUIRE_GPU();
  SettingsGuard restore;
  set_allow_tf32(true);
  for (const LinearCase& c : kLinearCases) check_linear(c, DType::f32, 4e-3);
}

TEST(GpuLinear, DeviceErrors) {
  LANCET_REQUIRE_GPU();
  const Tensor gx = to_gpu(random_tensor({2, 5}, 1)), w = random_tensor({3, 5}, 2);
  Tensor gy = Tensor::empty({2, 3}, DType::f32, Device::cuda(0));
  expect_error([&] { linear_forward(gx, w, Tensor(), gy, kGpu); },
               {"linear_forward", "[3, 5] is on cpu", "is on cuda:0"});
  Tensor gy_bad = Tensor::empty({2, 4}, DType::f32, Device::cuda(0));
  expect_error([&] { linear_forward(gx, to_gpu(w), Tensor(), gy_bad, kGpu); },
               {"linear_forward", "output [2, 4]", "expected [2, 3]"});
}

}  // namespace
}  // namespace lancet
