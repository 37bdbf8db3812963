// GPU tests for kernels/cuda/batchnorm and kernels/cuda/fused: every op's CUDA twin against its
// CPU twin on the same inputs, with the GPU operands in each memory format (the tests run once in
// nchw and once in channels_last; the CPU reference stays nchw and GPU results come back to a CPU
// nchw tensor to be compared). Shapes: odd ones, N = 1, C = 1, channels that are not multiples of
// 8 or that span several 32-channel tiles (40, 96, 200), planes smaller and larger than a block, a
// 1x64x112x112 plane that needs many blocks per channel, and N * H * W of 8192 and 16384 rows
// (hundreds of row chunks of the channels_last ColumnGrid, kernels/cuda/common.cuh). Also f16/bf16
// activations against the CPU in f32 on the same rounded inputs, bitwise determinism, and the
// device errors (the channels_last format mismatches: test_gpu_channels_last.cpp). Each test
// skips without a GPU.
//
// Tolerances, f32: the GPU evaluates the CPU's formulas with the statistics in double (other
// summation order, one-pass shifted sums instead of two passes), so saved statistics and
// parameter gradients agree to a float rounding (rtol 1e-5); activations and dx differ only by
// FMA contraction of a few float operations on values of order 1-10 (1e-5 absolute plus 1e-5
// relative; dx 1e-4). The host sums of the SyncBatchNorm pieces are doubles (1e-9 relative). The
// memory format changes only the order of the double sums, so both formats share these bounds.
// f16/bf16: the inputs are rounded to the type first and the CPU runs on the rounded values, so
// the only extra error is the final rounding of each output: half an ulp, 2^-11 (f16) or 2^-8
// (bf16) relative, one ulp where a float-level difference meets a rounding tie (2e-3, 1e-2);
// statistics and f32 gradients stay at f32 tolerance. The SE op: y and dx as above (1e-6 in
// f32: one float operation each), dshortcut exact (a masked copy), dg a double sum rounded once
// (1e-6 relative plus 1e-5 for sums that cancel; f16/bf16 as their activations).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/activation.h"
#include "kernels/batchnorm.h"
#include "kernels/fused.h"
#include "tests/gpu_util.h"
#include "tests/gradcheck.h"
#include "tests/kernel_test_util.h"

namespace lancet {
namespace {

using testing::expect_close;
using testing::expect_error;
using testing::expect_same_bits;
using testing::random_tensor;
using testing::rounded;
using testing::to_cpu_f32;
using testing::to_cpu_nchw_f32;
using testing::to_gpu;
using testing::to_gpu_as;

const Stream kCpu = Stream::cpu();
// The legacy default stream: ordered with the synchronous copies Tensor::to makes.
const Stream kGpu{Device::cuda(0), nullptr};
constexpr MemoryFormat kNchw = MemoryFormat::nchw;

// Every test below but the errors runs once per memory format of the GPU operands.
class GpuBatchNorm : public ::testing::TestWithParam<MemoryFormat> {};
class GpuFusedSe : public ::testing::TestWithParam<MemoryFormat> {};

std::string format_param_name(const ::testing::TestParamInfo<MemoryFormat>& info) {
  return memory_format_name(info.param);
}

// N = 1, C = 1, odd H/W, C % 8 != 0, HW = 1, planes smaller and larger than a block, C over
// several 32-channel tiles (40, 96, 200), and N * H * W of 8192 and 16384 rows (hundreds of row
// chunks in channels_last; two channel tiles for C = 64).
const std::vector<Shape> kShapes = {{2, 3, 4, 5},    {1, 5, 7, 9},    {3, 1, 5, 3},    {3, 13, 1, 1},
                                    {2, 13, 17, 61}, {16, 5, 3, 3},   {8, 3, 64, 64},  {1, 6, 1, 300},
                                    {2, 40, 9, 7},   {1, 200, 5, 5},  {4, 96, 14, 14}, {8, 24, 32, 32},
                                    {16, 64, 32, 32}};
const std::vector<Shape> kLowPrecisionShapes = {{2, 13, 17, 61}, {1, 5, 7, 9}, {16, 5, 3, 3}, {3, 1, 5, 3},
                                                {4, 96, 14, 14}};

// ---- tensors in any float dtype and format ------------------------------------------------------

// A GPU tensor of NaNs (dtype dt, format f): any element a kernel fails to write shows up in the
// comparison.
Tensor gpu_nan(const Shape& shape, DType dt = DType::f32, MemoryFormat f = kNchw) {
  return to_gpu_as(Tensor::full(shape, std::numeric_limits<float>::quiet_NaN()), dt, f);
}

// Output tolerance of an activation stored in dt (the f32 figure plus half an ulp of dt).
double act_tol(DType dt, double f32_tol) {
  return dt == DType::f16 ? 2e-3 : dt == DType::bf16 ? 1e-2 : f32_tol;
}

// ---- one BatchNorm's CPU and GPU state ------------------------------------------------------------

struct Bn {
  Shape xs;
  int64_t C;
  MemoryFormat f;
  DType dt;
  Tensor x, gamma, beta, rm, rv, dy;        // CPU f32 nchw (x, dy rounded to dt)
  Tensor gx, ggamma, gbeta, grm, grv, gdy;  // GPU: gx, gdy in dt and format f
  Bn(const Shape& shape, MemoryFormat format, uint32_t seed, DType dtype = DType::f32, bool affine = true,
     float offset = 0.f)
      : xs(shape), C(shape[1]), f(format), dt(dtype) {
    x = rounded(random_tensor(xs, seed, offset - 2.f, offset + 2.f), dt);
    dy = rounded(random_tensor(xs, seed + 1), dt);
    if (affine) {
      gamma = random_tensor({C}, seed + 2, 0.5f, 1.5f);
      beta = random_tensor({C}, seed + 3);
    }
    rm = random_tensor({C}, seed + 4, -0.5f, 0.5f);
    rv = random_tensor({C}, seed + 5, 0.5f, 2.f);
    gx = gpu_act(x), gdy = gpu_act(dy);
    ggamma = to_gpu(gamma), gbeta = to_gpu(beta), grm = to_gpu(rm), grv = to_gpu(rv);
  }
  // A GPU activation (x-shaped, dtype dt, format f): the CPU tensor t's values, or NaNs.
  Tensor gpu_act(const Tensor& t) const { return to_gpu_as(t, dt, f); }
  Tensor gpu_act_nan() const { return gpu_nan(xs, dt, f); }
  Tensor cpu_vec() const { return Tensor::empty({C}); }
  Tensor gpu_vec() const { return gpu_nan({C}); }
};

// Both twins of a forward (relu: the fused op), compared: y, saved statistics, running stats.
void check_forward(Bn& b, bool train, bool update, bool relu, double ytol) {
  const BatchNormParams p{};
  Tensor y = Tensor::empty(b.xs), m = b.cpu_vec(), v = b.cpu_vec();
  Tensor gy = b.gpu_act_nan(), gm = b.gpu_vec(), gv = b.gpu_vec();
  if (train && relu) {
    batchnorm_relu_forward_train(p, b.x, b.gamma, b.beta, b.rm, b.rv, update, y, m, v, kCpu);
    batchnorm_relu_forward_train(p, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, update, gy, gm, gv, kGpu);
  } else if (train) {
    batchnorm2d_forward_train(p, b.x, b.gamma, b.beta, b.rm, b.rv, update, y, m, v, kCpu);
    batchnorm2d_forward_train(p, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, update, gy, gm, gv, kGpu);
  } else if (relu) {
    batchnorm_relu_forward_eval(p, b.x, b.gamma, b.beta, b.rm, b.rv, y, m, v, kCpu);
    batchnorm_relu_forward_eval(p, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, gy, gm, gv, kGpu);
  } else {
    batchnorm2d_forward_eval(p, b.x, b.gamma, b.beta, b.rm, b.rv, y, m, v, kCpu);
    batchnorm2d_forward_eval(p, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, gy, gm, gv, kGpu);
  }
  const double at = act_tol(b.dt, ytol);
  expect_close(y, to_cpu_nchw_f32(gy), at, at, "y");
  expect_close(m, gm, 1e-5, 1e-6, "saved_mean");
  expect_close(v, gv, 1e-5, 1e-6, "saved_invstd");
  expect_close(b.rm, b.grm, 1e-5, 1e-6, "running_mean");
  expect_close(b.rv, b.grv, 1e-5, 1e-6, "running_var");
}

TEST_P(GpuBatchNorm, ForwardTrainMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& xs : kShapes)
    for (bool affine : {true, false})
      for (bool update : {true, false})
        for (bool relu : {false, true}) {
          SCOPED_TRACE(shape_str(xs) + (affine ? " affine" : "") + (update ? " update" : "") + (relu ? " relu" : ""));
          Bn b(xs, GetParam(), 1, DType::f32, affine);
          check_forward(b, true, update, relu, 1e-5);
        }
}

TEST_P(GpuBatchNorm, ForwardTrainIsStableForALargeMean) {
  LANCET_REQUIRE_GPU();
  // mean 1000, std ~1: naive sum x^2 - (sum x)^2 / m in float would lose the variance.
  Bn b({4, 5, 9, 11}, GetParam(), 2, DType::f32, true, 1000.f);
  check_forward(b, true, true, false, 1e-3);  // y: x - mean loses 1000 * 2^-24 per element
}

TEST_P(GpuBatchNorm, ForwardEvalMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& xs : kShapes)
    for (bool relu : {false, true}) {
      SCOPED_TRACE(shape_str(xs) + (relu ? " relu" : ""));
      Bn b(xs, GetParam(), 3);
      check_forward(b, false, false, relu, 1e-5);
    }
}

// Saved statistics from the CPU forward, then both backwards twice: dgamma and dbeta start from
// random values and accumulate (+=) both calls; dx is overwritten.
void check_backward(Bn& b, bool batch_stats, bool with_dx, bool with_params, bool relu, double dxtol) {
  Tensor y = Tensor::empty(b.xs), m = b.cpu_vec(), v = b.cpu_vec();
  batchnorm_relu_forward_train({}, b.x, b.gamma, b.beta, b.rm, b.rv, false, y, m, v, kCpu);
  y = rounded(y, b.dt);  // the mask both sides see
  Tensor gy = b.gpu_act(y), gm = to_gpu(m), gv = to_gpu(v);
  Tensor dx = with_dx ? Tensor::empty(b.xs) : Tensor(), gdx = with_dx ? b.gpu_act_nan() : Tensor();
  Tensor dg, db, gdg, gdb;
  if (with_params) {
    dg = random_tensor({b.C}, 40), db = random_tensor({b.C}, 41);
    gdg = to_gpu(dg), gdb = to_gpu(db);
  }
  for (int call = 0; call < 2; ++call) {
    if (relu) {
      batchnorm_relu_backward(batch_stats, b.x, y, b.dy, b.gamma, m, v, dx, dg, db, kCpu);
      batchnorm_relu_backward(batch_stats, b.gx, gy, b.gdy, b.ggamma, gm, gv, gdx, gdg, gdb, kGpu);
    } else {
      batchnorm2d_backward(batch_stats, b.x, b.dy, b.gamma, m, v, dx, dg, db, kCpu);
      batchnorm2d_backward(batch_stats, b.gx, b.gdy, b.ggamma, gm, gv, gdx, gdg, gdb, kGpu);
    }
  }
  const double at = act_tol(b.dt, dxtol);
  if (with_dx) expect_close(dx, to_cpu_nchw_f32(gdx), at, at, "dx");
  if (with_params) {
    expect_close(dg, gdg, 1e-5, 1e-5, "dgamma (accumulated twice)");
    expect_close(db, gdb, 1e-5, 1e-5, "dbeta (accumulated twice)");
  }
}

TEST_P(GpuBatchNorm, BackwardMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& xs : kShapes)
    for (bool batch_stats : {true, false})
      for (bool relu : {false, true}) {
        SCOPED_TRACE(shape_str(xs) + (batch_stats ? " train" : " eval") + (relu ? " relu" : ""));
        Bn b(xs, GetParam(), 4);
        check_backward(b, batch_stats, true, true, relu, 1e-4);
        check_backward(b, batch_stats, false, true, relu, 1e-4);  // parameter gradients only
        check_backward(b, batch_stats, true, false, relu, 1e-4);  // dx only
      }
}

TEST_P(GpuBatchNorm, BackwardWithoutAffine) {
  LANCET_REQUIRE_GPU();
  Bn b({3, 7, 5, 3}, GetParam(), 5, DType::f32, false);
  check_backward(b, true, true, false, false, 1e-4);
  check_backward(b, true, true, false, true, 1e-4);
}

// Host sums of the SyncBatchNorm pieces: doubles from float inputs, 1e-9 relative.
void expect_same_sums(const std::vector<double>& s, const std::vector<double>& gs, const std::string& what) {
  ASSERT_EQ(s.size(), gs.size()) << what;
  for (size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(s[i], gs[i], 1e-9 * (1 + std::fabs(s[i]))) << what << " " << i;
}

TEST_P(GpuBatchNorm, SyncBatchNormPiecesMatchCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    Bn b(xs, GetParam(), 6);
    std::vector<double> s, gs;
    batchnorm2d_channel_sums(b.x, s, kCpu);
    batchnorm2d_channel_sums(b.gx, gs, kGpu);
    expect_same_sums(s, gs, "channel_sums");

    Tensor y = Tensor::empty(xs), m = b.cpu_vec(), v = b.cpu_vec();
    batchnorm2d_forward_train({}, b.x, b.gamma, b.beta, b.rm, b.rv, false, y, m, v, kCpu);
    Tensor gm = to_gpu(m), gv = to_gpu(v);
    batchnorm2d_backward_sums(b.x, b.dy, m, v, s, kCpu);
    batchnorm2d_backward_sums(b.gx, b.gdy, gm, gv, gs, kGpu);
    expect_same_sums(s, gs, "backward_sums");

    // As if two replicas had the same batch: global sums doubled over twice the count.
    std::vector<double> global = s;
    for (double& g : global) g *= 2;
    const double count = 2.0 * xs[0] * xs[2] * xs[3];
    Tensor dx = Tensor::empty(xs), gdx = b.gpu_act_nan();
    batchnorm2d_backward_dx(b.x, b.dy, b.gamma, m, v, global, count, dx, kCpu);
    batchnorm2d_backward_dx(b.gx, b.gdy, b.ggamma, gm, gv, global, count, gdx, kGpu);
    expect_close(dx, to_cpu_nchw_f32(gdx), 1e-4, 1e-4, "backward_dx");
  }
}

// ---- SE excite-scale + residual + ReLU ---------------------------------------------------------

// x, shortcut, y, dy, dx and dshortcut in format f; the gate g and dg are [N, C].
void check_se(const Shape& xs, MemoryFormat f, DType dt, uint32_t seed) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " SE " + shape_str(xs));
  const Shape gs = {xs[0], xs[1]};
  Tensor x = rounded(random_tensor(xs, seed, -2.f, 2.f), dt);
  Tensor g = rounded(random_tensor(gs, seed + 1, 0.01f, 0.99f), dt);
  Tensor sc = rounded(random_tensor(xs, seed + 2), dt), dy = rounded(random_tensor(xs, seed + 3), dt);
  Tensor gx = to_gpu_as(x, dt, f), gg = to_gpu_as(g, dt), gsc = to_gpu_as(sc, dt, f), gdy = to_gpu_as(dy, dt, f);
  Tensor y = Tensor::empty(xs), gy = gpu_nan(xs, dt, f);
  se_scale_residual_relu_forward(x, g, sc, y, kCpu);
  se_scale_residual_relu_forward(gx, gg, gsc, gy, kGpu);
  const double at = act_tol(dt, 1e-6);
  expect_close(y, to_cpu_nchw_f32(gy), at, at, "SE y");

  y = rounded(y, dt);  // the mask both sides see
  gy = to_gpu_as(y, dt, f);
  Tensor dx = Tensor::empty(xs), dg = Tensor::empty(gs), ds = Tensor::empty(xs);
  se_scale_residual_relu_backward(x, g, y, dy, dx, dg, ds, kCpu);
  Tensor gdx = gpu_nan(xs, dt, f), gdg = gpu_nan(gs, dt), gds = gpu_nan(xs, dt, f), none;
  se_scale_residual_relu_backward(gx, gg, gy, gdy, gdx, gdg, gds, kGpu);
  expect_close(ds, to_cpu_nchw_f32(gds), 0, 0, "SE dshortcut (a masked copy: exact)");
  expect_close(dx, to_cpu_nchw_f32(gdx), at, 1e-6, "SE dx");
  expect_close(dg, to_cpu_f32(gdg), dt == DType::f32 ? 1e-6 : at, 1e-5, "SE dg");
  // Each output alone: the same values, bit for bit (the same grid and sums either way).
  Tensor gdg2 = gpu_nan(gs, dt), gdx2 = gpu_nan(xs, dt, f), gds2 = gpu_nan(xs, dt, f);
  se_scale_residual_relu_backward(gx, gg, gy, gdy, none, gdg2, none, kGpu);
  expect_same_bits(gdg, gdg2, "SE dg alone");
  se_scale_residual_relu_backward(gx, gg, gy, gdy, gdx2, none, none, kGpu);
  expect_same_bits(gdx, gdx2, "SE dx alone");
  se_scale_residual_relu_backward(gx, gg, gy, gdy, none, none, gds2, kGpu);
  expect_same_bits(gds, gds2, "SE dshortcut alone");
}

TEST_P(GpuFusedSe, MatchesCpu) {
  LANCET_REQUIRE_GPU();
  // {2, 40, 64, 64}: 4096 rows per image, over a hundred chunks in channels_last.
  for (const Shape& xs : kShapes) check_se(xs, GetParam(), DType::f32, 50);
  check_se({2, 40, 64, 64}, GetParam(), DType::f32, 50);
  for (DType dt : {DType::f16, DType::bf16})
    for (const Shape& xs : {Shape{2, 13, 17, 19}, Shape{2, 40, 64, 64}}) check_se(xs, GetParam(), dt, 60);
}

// ---- f16 / bf16 activations --------------------------------------------------------------------

TEST_P(GpuBatchNorm, HalfAndBfloat16MatchCpuOnRoundedInputs) {
  LANCET_REQUIRE_GPU();
  const MemoryFormat f = GetParam();
  for (DType dt : {DType::f16, DType::bf16})
    for (const Shape& xs : kLowPrecisionShapes) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + shape_str(xs));
      for (bool relu : {false, true}) {
        Bn t(xs, f, 7, dt);
        check_forward(t, true, true, relu, 0);
        Bn e(xs, f, 8, dt);
        check_forward(e, false, false, relu, 0);
        Bn b(xs, f, 9, dt);
        check_backward(b, true, true, true, relu, 0);
        check_backward(b, false, true, true, relu, 0);
      }
      std::vector<double> s, gs;
      Bn b(xs, f, 10, dt);
      batchnorm2d_channel_sums(b.x, s, kCpu);
      batchnorm2d_channel_sums(b.gx, gs, kGpu);
      expect_same_sums(s, gs, "channel_sums");
      check_se(xs, f, dt, 60);
    }
}

// ---- big planes, another stream, determinism ----------------------------------------------------

TEST_P(GpuBatchNorm, LargePlaneOnANonBlockingStream) {
  LANCET_REQUIRE_GPU();
#ifdef LANCET_WITH_CUDA
  const Shape xs = {1, 64, 112, 112};  // 12544 values per channel: many blocks per channel
  Bn b(xs, GetParam(), 11);
  Tensor y = Tensor::empty(xs), m = b.cpu_vec(), v = b.cpu_vec();
  Tensor dx = Tensor::empty(xs), dg = Tensor::zeros({64}), db = Tensor::zeros({64});
  // Every device tensor first: the uploads run on the legacy stream, and the caching allocator
  // reuses blocks in the order of one stream only, so nothing is allocated outside `st` while
  // it has work in flight.
  Tensor gy = b.gpu_act_nan(), gm = b.gpu_vec(), gv = b.gpu_vec();
  Tensor gdx = b.gpu_act_nan(), gdg = to_gpu(dg), gdb = to_gpu(db);
  synchronize(kGpu);
  CudaStream cs(Device::cuda(0));
  const Stream st = cs.stream();
  batchnorm_relu_forward_train({}, b.x, b.gamma, b.beta, b.rm, b.rv, true, y, m, v, kCpu);
  batchnorm_relu_backward(true, b.x, y, b.dy, b.gamma, m, v, dx, dg, db, kCpu);
  batchnorm_relu_forward_train({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, true, gy, gm, gv, st);
  batchnorm_relu_backward(true, b.gx, gy, b.gdy, b.ggamma, gm, gv, gdx, gdg, gdb, st);
  cs.synchronize();
  expect_close(y, to_cpu_nchw_f32(gy), 1e-5, 1e-5, "y");
  expect_close(m, gm, 1e-5, 1e-6, "saved_mean");
  expect_close(v, gv, 1e-5, 1e-6, "saved_invstd");
  expect_close(b.rm, b.grm, 1e-5, 1e-6, "running_mean");
  expect_close(b.rv, b.grv, 1e-5, 1e-6, "running_var");
  expect_close(dx, to_cpu_nchw_f32(gdx), 1e-4, 1e-4, "dx");
  expect_close(dg, gdg, 1e-5, 1e-5, "dgamma");
  expect_close(db, gdb, 1e-5, 1e-5, "dbeta");
  check_se(xs, GetParam(), DType::f32, 70);
#endif
}

// The same forward and backward twice: every output bit for bit (fixed grids, fixed orders).
TEST_P(GpuBatchNorm, RepeatedCallsAreBitIdentical) {
  LANCET_REQUIRE_GPU();
  // {8, 96, 28, 28}: 6272 rows, hundreds of chunks over three channel tiles in channels_last.
  for (const Shape& xs : {Shape{8, 3, 64, 64}, Shape{8, 96, 28, 28}})
    for (DType dt : {DType::f32, DType::bf16})
      for (bool relu : {false, true}) {
        SCOPED_TRACE(shape_str(xs) + " " + dtype_name(dt) + (relu ? " relu" : ""));
        Bn b(xs, GetParam(), 12, dt);
        std::vector<Tensor> first;
        for (int run = 0; run < 2; ++run) {
          Tensor gy = b.gpu_act_nan(), gm = b.gpu_vec(), gv = b.gpu_vec(), gdx = b.gpu_act_nan();
          // Without the ReLU dbeta is not asked for: that path is repeated too.
          Tensor gdg = to_gpu(Tensor::zeros({b.C})), gdb = relu ? to_gpu(Tensor::zeros({b.C})) : Tensor();
          if (relu) {
            batchnorm_relu_forward_train({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, false, gy, gm, gv, kGpu);
            batchnorm_relu_backward(true, b.gx, gy, b.gdy, b.ggamma, gm, gv, gdx, gdg, gdb, kGpu);
          } else {
            batchnorm2d_forward_train({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, false, gy, gm, gv, kGpu);
            batchnorm2d_backward(true, b.gx, b.gdy, b.ggamma, gm, gv, gdx, gdg, gdb, kGpu);
          }
          const std::vector<Tensor> outs = {gy, gm, gv, gdx, gdg, gdb};
          if (run == 0) {
            first = outs;
            continue;
          }
          const char* names[] = {"y", "saved_mean", "saved_invstd", "dx", "dgamma", "dbeta"};
          for (size_t i = 0; i < outs.size(); ++i)
            if (outs[i].defined()) expect_same_bits(first[i], outs[i], names[i]);
        }
      }
}

INSTANTIATE_TEST_SUITE_P(AnyFormat, GpuBatchNorm, ::testing::Values(MemoryFormat::nchw, MemoryFormat::channels_last),
                         format_param_name);
INSTANTIATE_TEST_SUITE_P(AnyFormat, GpuFusedSe, ::testing::Values(MemoryFormat::nchw, MemoryFormat::channels_last),
                         format_param_name);

// ---- errors --------------------------------------------------------------------------------------

TEST(GpuBatchNormErrors, DeviceAndDtype) {
  LANCET_REQUIRE_GPU();
  const Shape xs = {2, 3, 4, 4};
  Bn b(xs, kNchw, 13);
  Tensor gy = gpu_nan(xs), gm = b.gpu_vec(), gv = b.gpu_vec(), none;
  expect_error([&] { batchnorm2d_forward_train({}, b.gx, b.gamma, b.gbeta, b.grm, b.grv, true, gy, gm, gv, kGpu); },
               {"batchnorm2d_forward_train", "cpu", "cuda:0"});
  expect_error([&] { batchnorm2d_forward_eval({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, gy, gm, gv, kCpu); },
               {"batchnorm2d_forward_eval", "stream is on cpu", "cuda:0"});
  Tensor gy16 = gpu_nan(xs, DType::f16);
  expect_error([&] { batchnorm2d_forward_eval({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, gy16, gm, gv, kGpu); },
               {"batchnorm2d_forward_eval", "output", "f16"});
  Tensor gm16 = gpu_nan({3}, DType::f16);
  expect_error([&] { batchnorm2d_forward_train({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, true, gy, gm16, gv, kGpu); },
               {"saved_mean", "must be f32"});
  expect_error(
      [&] { batchnorm_relu_forward_train({}, b.gx, b.ggamma, b.gbeta, b.grm, b.grv, true, b.gx, gm, gv, kGpu); },
      {"batchnorm_relu_forward_train", "must not alias"});
  std::vector<double> sums;
  expect_error([&] { batchnorm2d_backward_sums(b.gx, b.dy, gm, gv, sums, kGpu); },
               {"batchnorm2d_backward_sums", "cpu", "cuda:0"});
  Tensor gg = to_gpu(random_tensor({2, 3}, 1)), gsc = to_gpu(random_tensor(xs, 2)), cpu_g = random_tensor({2, 3}, 1);
  expect_error([&] { se_scale_residual_relu_forward(b.gx, cpu_g, gsc, gy, kGpu); },
               {"se_scale_residual_relu_forward", "cpu", "cuda:0"});
  Tensor gg16 = to_gpu_as(random_tensor({2, 3}, 1), DType::f16);
  expect_error([&] { se_scale_residual_relu_forward(b.gx, gg16, gsc, gy, kGpu); },
               {"se_scale_residual_relu_forward", "g [2, 3]", "f16"});
  Tensor gdx = gpu_nan(xs);
  expect_error([&] { se_scale_residual_relu_backward(b.gx, gg, gy, b.gdy, gdx, none, b.gdy, kGpu); },
               {"se_scale_residual_relu_backward", "dshortcut", "must not alias"});
}

}  // namespace
}  // namespace lancet
