// GPU tests of the channels_last (NHWC) paths of the per-channel CUDA kernels that are not
// BatchNorm: MaxPool2d and global average pooling, channel concat and the SE channel scale. Each
// op runs on the GPU with channels_last operands (f32, and f16 / bf16 where it takes them); its
// results, converted back to nchw, are compared with the CPU twin's nchw results on the same
// (rounded) inputs. Shapes cover N = 1, odd H and W, C = 1, C not a multiple of 8, C spanning
// several 32-channel tiles (40, 96, 200), and H * W large enough for many row chunks of the
// ColumnGrid (kernels/cuda/common.cuh), as well as single-chunk grids. Also: reductions with
// one output left out give the same bits, a batch over one grid's 65535 images (launched in
// slices) matches too, and a memory-format mismatch in any per-channel op
// (BatchNorm, the fused ops included) throws one line naming the op and both tensors. BatchNorm,
// its SyncBatchNorm pieces and the fused SE scale + residual + ReLU run in channels_last in
// test_gpu_batchnorm.cpp, parametrised over the memory format. Each test skips without a GPU.
//
// Tolerances (GPU channels_last vs CPU nchw):
// - Exact (bit for bit, after rounding the CPU result to the type): maxpool y, argmax and dx
//   (same scan, same additions in the same order), avgpool's dx (dy * (1 / HW) in float),
//   concat (copies), channel_scale's y and dx (one float operation each).
// - Sums over H * W (avgpool y, channel_scale dg) accumulate in double on both sides in
//   different orders and round once to float: equal or one float ulp apart (rtol 1e-6, atol for
//   sums that cancel); in f16 / bf16 one ulp of the type (the same double sum rounded to float,
//   then to the type, on both sides; a float-level difference at a tie rounds either way).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/batchnorm.h"
#include "kernels/elementwise.h"
#include "kernels/fused.h"
#include "kernels/pool.h"
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
constexpr MemoryFormat kCl = MemoryFormat::channels_last;
const float kNan = std::numeric_limits<float>::quiet_NaN();
const DType kLowPrecision[] = {DType::f16, DType::bf16};

// ---- tensors -----------------------------------------------------------------------------------

// The CPU f32 nchw 4-D tensor t on the GPU as dtype dt, channels_last (values rounded to dt).
Tensor gpu_cl(const Tensor& t, DType dt = DType::f32) { return to_gpu_as(t, dt, kCl); }
// A channels_last GPU tensor of NaNs: an element a kernel fails to write shows up.
Tensor gpu_cl_nan(const Shape& shape, DType dt = DType::f32) { return gpu_cl(Tensor::full(shape, kNan), dt); }
// A GPU tensor of any shape (nchw) full of NaNs.
Tensor gpu_nan(const Shape& shape, DType dt = DType::f32) { return to_gpu_as(Tensor::full(shape, kNan), dt); }

// One ulp of dt relative to the value, an upper bound (f32: the 1e-6 of double sums rounded once).
double ulp_rtol(DType dt) { return dt == DType::f16 ? 1.0 / 1024 : dt == DType::bf16 ? 1.0 / 128 : 1e-6; }

// ---- pooling ------------------------------------------------------------------------------------

void check_maxpool(const MaxPool2dParams& p, const Tensor& x_f32, DType dt, const std::string& what) {
  const Tensor x = rounded(x_f32, dt);
  const Shape ys = maxpool2d_output_shape(p, x.shape());
  Tensor y = Tensor::empty(ys), am = Tensor::empty(ys, DType::i32);
  Tensor gy = gpu_cl_nan(ys, dt), gam = Tensor::empty(ys, DType::i32, Device::cuda(0), kCl);
  maxpool2d_forward(p, x, y, am, kCpu);
  maxpool2d_forward(p, gpu_cl(x, dt), gy, gam, kGpu);
  expect_same_bits(y, to_cpu_nchw_f32(gy), "maxpool2d_forward " + what);  // an element of x: exact in dt
  expect_same_bits(am, gam, "maxpool2d argmax " + what);  // compared by logical element
  const Tensor dy = rounded(random_tensor(ys, 14), dt);
  Tensor dx = Tensor::empty(x.shape()), gdx = gpu_cl_nan(x.shape(), dt);  // overwritten, not accumulated
  maxpool2d_backward(p, dy, am, dx, kCpu);
  maxpool2d_backward(p, gpu_cl(dy, dt), gam, gdx, kGpu);
  expect_same_bits(rounded(dx, dt), to_cpu_nchw_f32(gdx), "maxpool2d_backward " + what);
}

TEST(GpuChannelsLast, MaxPoolMatchesCpu) {
  LANCET_REQUIRE_GPU();
  const MaxPool2dParams params[] = {{3, 2, 1}, {2, 2, 0}, {3, 1, 1}, {1, 1, 0}, {4, 3, 2}};
  for (const MaxPool2dParams& p : params)
    for (const Shape& sh : {Shape{1, 1, 2, 2}, Shape{1, 3, 7, 9}, Shape{2, 13, 33, 31}, Shape{2, 40, 16, 17}}) {
      const std::string what = "k" + std::to_string(p.kernel) + " s" + std::to_string(p.stride) + " p" +
                               std::to_string(p.pad) + " " + shape_str(sh);
      check_maxpool(p, random_tensor(sh, 15), DType::f32, what);
      check_maxpool(p, Tensor::full(sh, 0.5f), DType::f32, "constant " + what);  // ties: the first wins
      Tensor coarse = random_tensor(sh, 16);                                     // ties among a few values
      for (int64_t i = 0; i < coarse.numel(); ++i) coarse.data<float>()[i] = std::round(coarse.data<float>()[i]);
      check_maxpool(p, coarse, DType::f32, "coarse " + what);
    }
  Tensor nan = random_tensor({1, 2, 9, 9}, 17);  // NaN wins its windows, as on the CPU
  nan.data<float>()[40] = nan.data<float>()[41] = nan.data<float>()[100] = kNan;
  check_maxpool({3, 2, 1}, nan, DType::f32, "with NaN");
  for (DType dt : kLowPrecision) check_maxpool({3, 2, 1}, random_tensor({2, 40, 17, 19}, 18), dt, dtype_name(dt));
}

TEST(GpuChannelsLast, GlobalAvgPoolMatchesCpu) {
  LANCET_REQUIRE_GPU();
  // {2, 40, 64, 64}: 4096 rows per image, over a hundred chunks; the others a few or one.
  const Shape shapes[] = {{1, 1, 1, 1},    {2, 3, 7, 7},   {3, 10, 33, 31},
                          {2, 40, 64, 64}, {1, 200, 5, 5}, {4, 96, 14, 14}};
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (const Shape& sh : shapes) {
      const std::string at = std::string(" ") + dtype_name(dt) + " at " + shape_str(sh);
      const Tensor x = rounded(random_tensor(sh, 18), dt);
      Tensor y = Tensor::empty({sh[0], sh[1]}), gy = gpu_nan({sh[0], sh[1]}, dt);
      global_avgpool_forward(x, y, kCpu);
      global_avgpool_forward(gpu_cl(x, dt), gy, kGpu);
      expect_close(rounded(y, dt), to_cpu_f32(gy), ulp_rtol(dt), dt == DType::f32 ? 1e-9 : 1e-7,
                   "global_avgpool_forward" + at);
      const Tensor dy = rounded(random_tensor(y.shape(), 19), dt);
      Tensor dx = Tensor::empty(sh), gdx = gpu_cl_nan(sh, dt);
      global_avgpool_backward(dy, dx, kCpu);
      global_avgpool_backward(to_gpu_as(dy, dt), gdx, kGpu);
      expect_same_bits(rounded(dx, dt), to_cpu_nchw_f32(gdx), "global_avgpool_backward" + at);
    }
}

// ---- concat and SE channel scale ---------------------------------------------------------------

TEST(GpuChannelsLast, ConcatChannelsMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16})
    for (const Shape& hw : {Shape{1, 7, 5}, Shape{3, 33, 33}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + shape_str(hw));
      const int64_t N = hw[0], H = hw[1], W = hw[2];
      std::vector<Tensor> xs, gxs;
      int64_t C = 0;
      for (int64_t c : {1, 3, 8, 5, 40}) {
        xs.push_back(rounded(random_tensor({N, c, H, W}, static_cast<uint32_t>(10 + c)), dt));
        gxs.push_back(gpu_cl(xs.back(), dt));
        C += c;
      }
      Tensor y = Tensor::empty({N, C, H, W}), gy = gpu_cl_nan({N, C, H, W}, dt);
      concat_channels_forward(xs, y, kCpu);
      concat_channels_forward(gxs, gy, kGpu);
      expect_same_bits(y, to_cpu_nchw_f32(gy), "concat_channels_forward");
      const Tensor dy = rounded(random_tensor(y.shape(), 20), dt);
      std::vector<Tensor> dxs, gdxs;
      for (const Tensor& x : xs) dxs.push_back(Tensor::empty(x.shape())), gdxs.push_back(gpu_cl_nan(x.shape(), dt));
      concat_channels_backward(dy, dxs, kCpu);
      concat_channels_backward(gpu_cl(dy, dt), gdxs, kGpu);
      for (size_t i = 0; i < dxs.size(); ++i)
        expect_same_bits(dxs[i], to_cpu_nchw_f32(gdxs[i]), "concat_channels_backward part " + std::to_string(i));
    }
}

TEST(GpuChannelsLast, ChannelScaleMatchesCpu) {
  LANCET_REQUIRE_GPU();
  const Shape shapes[] = {{1, 1, 1, 1}, {2, 3, 5, 7}, {3, 13, 33, 31}, {2, 40, 64, 64}, {2, 200, 9, 9}};
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (const Shape& sh : shapes) {
      const std::string at = std::string(" ") + dtype_name(dt) + " at " + shape_str(sh);
      const Shape gs = {sh[0], sh[1]};
      const Tensor x = rounded(random_tensor(sh, 7), dt), g = rounded(random_tensor(gs, 8), dt);
      const Tensor dy = rounded(random_tensor(sh, 9), dt);
      const Tensor gx = gpu_cl(x, dt), gg = to_gpu_as(g, dt), gdy = gpu_cl(dy, dt);
      Tensor y = Tensor::empty(sh), gy = gpu_cl_nan(sh, dt);
      channel_scale_forward(x, g, y, kCpu);
      channel_scale_forward(gx, gg, gy, kGpu);
      expect_same_bits(rounded(y, dt), to_cpu_nchw_f32(gy), "channel_scale_forward" + at);
      Tensor dx = Tensor::empty(sh), dg = Tensor::empty(gs), gdx = gpu_cl_nan(sh, dt), gdg = gpu_nan(gs, dt);
      channel_scale_backward(x, g, dy, dx, dg, kCpu);
      channel_scale_backward(gx, gg, gdy, gdx, gdg, kGpu);
      expect_same_bits(rounded(dx, dt), to_cpu_nchw_f32(gdx), "channel_scale_backward dx" + at);
      expect_close(rounded(dg, dt), to_cpu_f32(gdg), ulp_rtol(dt), 1e-6, "channel_scale_backward dg" + at);
      Tensor none, gdg2 = gpu_nan(gs, dt), gdx2 = gpu_cl_nan(sh, dt);
      channel_scale_backward(gx, gg, gdy, none, gdg2, kGpu);  // dx undefined: the same sums
      expect_same_bits(gdg, gdg2, "channel_scale_backward dg without dx" + at);
      channel_scale_backward(gx, gg, gdy, gdx2, none, kGpu);  // dg undefined
      expect_same_bits(gdx, gdx2, "channel_scale_backward dx without dg" + at);
    }
}

// A batch over gridDim.z's 65535: the channels_last per-(n, c) kernels launch in slices of the
// batch (for_each_column_launch, common.cuh). Every image, those of the second slice too, matches
// the CPU; an image a slice missed would stay NaN.
TEST(GpuChannelsLast, BatchesBeyondOneGridMatchCpu) {
  LANCET_REQUIRE_GPU();
  const Shape sh = {65535 + 1234, 5, 2, 3}, gs = {sh[0], sh[1]};
  const Tensor x = random_tensor(sh, 31), g = random_tensor(gs, 32, 0.01f, 0.99f), dy = random_tensor(sh, 33);
  const Tensor sc = random_tensor(sh, 34);
  const Tensor gx = gpu_cl(x), gg = to_gpu(g), gdy = gpu_cl(dy), gsc = gpu_cl(sc);

  Tensor y = Tensor::empty(gs), gy = gpu_nan(gs);
  global_avgpool_forward(x, y, kCpu);
  global_avgpool_forward(gx, gy, kGpu);
  expect_close(y, to_cpu_f32(gy), 1e-6, 1e-9, "global_avgpool_forward");

  Tensor dx = Tensor::empty(sh), dg = Tensor::empty(gs), gdx = gpu_cl_nan(sh), gdg = gpu_nan(gs);
  channel_scale_backward(x, g, dy, dx, dg, kCpu);
  channel_scale_backward(gx, gg, gdy, gdx, gdg, kGpu);
  expect_same_bits(dx, to_cpu_nchw_f32(gdx), "channel_scale_backward dx");
  expect_close(dg, to_cpu_f32(gdg), 1e-6, 1e-6, "channel_scale_backward dg");

  Tensor sy = Tensor::empty(sh), gsy = gpu_cl_nan(sh);
  se_scale_residual_relu_forward(x, g, sc, sy, kCpu);
  se_scale_residual_relu_forward(gx, gg, gsc, gsy, kGpu);
  expect_close(sy, to_cpu_nchw_f32(gsy), 1e-6, 1e-6, "se_scale_residual_relu_forward");
  Tensor sdx = Tensor::empty(sh), sdg = Tensor::empty(gs), sds = Tensor::empty(sh);
  Tensor gsdx = gpu_cl_nan(sh), gsdg = gpu_nan(gs), gsds = gpu_cl_nan(sh);
  const Tensor gsy_exact = gpu_cl(sy);  // the ReLU mask both sides see
  se_scale_residual_relu_backward(x, g, sy, dy, sdx, sdg, sds, kCpu);
  se_scale_residual_relu_backward(gx, gg, gsy_exact, gdy, gsdx, gsdg, gsds, kGpu);
  expect_close(sdx, to_cpu_nchw_f32(gsdx), 1e-6, 1e-6, "se_scale_residual_relu_backward dx");
  expect_close(sdg, to_cpu_f32(gsdg), 1e-6, 1e-5, "se_scale_residual_relu_backward dg");
  expect_close(sds, to_cpu_nchw_f32(gsds), 0, 0, "se_scale_residual_relu_backward dshortcut");
}

// ---- memory-format mismatches --------------------------------------------------------------------

TEST(GpuChannelsLast, FormatMismatchesThrowNamingBothTensors) {
  LANCET_REQUIRE_GPU();
  const Shape xs = {2, 3, 4, 4};
  const Tensor x = random_tensor(xs, 13), dy = random_tensor(xs, 14);
  const Tensor gx = gpu_cl(x), gdy = gpu_cl(dy), gx_nchw = to_gpu(x);
  const Tensor ggamma = to_gpu(random_tensor({3}, 15, 0.5f, 1.5f)), gbeta = to_gpu(random_tensor({3}, 16));
  Tensor grm = to_gpu(random_tensor({3}, 17, -0.5f, 0.5f)), grv = to_gpu(random_tensor({3}, 18, 0.5f, 2.f));
  Tensor y_nchw = gpu_nan(xs), gm = gpu_nan({3}), gv = gpu_nan({3}), none;
  expect_error(
      [&] { batchnorm2d_forward_train({}, gx, ggamma, gbeta, grm, grv, true, y_nchw, gm, gv, kGpu); },
      {"batchnorm2d_forward_train", "output [2, 3, 4, 4] is nchw", "the input [2, 3, 4, 4] is channels_last"});
  expect_error([&] { batchnorm_relu_forward_eval({}, gx, ggamma, gbeta, grm, grv, y_nchw, gm, gv, kGpu); },
               {"batchnorm_relu_forward_eval", "output [2, 3, 4, 4] is nchw", "is channels_last"});
  Tensor gy = gpu_cl_nan(xs), gdx_nchw = gpu_nan(xs);
  expect_error([&] { batchnorm2d_backward(true, gx, gdy, ggamma, gm, gv, gdx_nchw, none, none, kGpu); },
               {"batchnorm2d_backward", "dx [2, 3, 4, 4] is nchw", "the input [2, 3, 4, 4] is channels_last"});
  Tensor gdx = gpu_cl_nan(xs);
  expect_error([&] { batchnorm2d_backward(true, gx_nchw, gdy, ggamma, gm, gv, none, none, none, kGpu); },
               {"batchnorm2d_backward", "dy [2, 3, 4, 4] is channels_last", "the input [2, 3, 4, 4] is nchw"});
  expect_error(
      [&] { batchnorm_relu_backward(true, gx, gx_nchw, gdy, ggamma, gm, gv, gdx, none, none, kGpu); },
      {"batchnorm_relu_backward", "y [2, 3, 4, 4] is nchw"});
  std::vector<double> sums;
  expect_error([&] { batchnorm2d_backward_sums(gx, to_gpu(dy), gm, gv, sums, kGpu); },
               {"batchnorm2d_backward_sums", "dy [2, 3, 4, 4] is nchw"});
  expect_error(
      [&] { batchnorm2d_backward_dx(gx, gdy, ggamma, gm, gv, std::vector<double>(6), 64, gdx_nchw, kGpu); },
      {"batchnorm2d_backward_dx", "dx [2, 3, 4, 4] is nchw"});

  const MaxPool2dParams p{3, 2, 1};
  const Shape ps = maxpool2d_output_shape(p, xs);
  Tensor py = gpu_cl_nan(ps), am_nchw = Tensor::empty(ps, DType::i32, Device::cuda(0));
  expect_error([&] { maxpool2d_forward(p, gx, py, am_nchw, kGpu); },
               {"maxpool2d_forward", "argmax [2, 3, 2, 2] is nchw", "the input [2, 3, 4, 4] is channels_last"});
  Tensor am = Tensor::empty(ps, DType::i32, Device::cuda(0), kCl);
  expect_error([&] { maxpool2d_backward(p, py, am, gdx_nchw, kGpu); },
               {"maxpool2d_backward", "dx [2, 3, 4, 4] is nchw", "dy [2, 3, 2, 2] is channels_last"});

  std::vector<Tensor> parts = {gpu_cl_nan({2, 1, 4, 4}), gpu_nan({2, 2, 4, 4})};
  expect_error(
      [&] { concat_channels_forward(parts, gy, kGpu); },
      {"concat_channels_forward", "part 1 [2, 2, 4, 4] is nchw", "concatenated tensor [2, 3, 4, 4] is channels_last"});
  const Tensor gg = gpu_nan({2, 3});
  expect_error([&] { channel_scale_forward(gx, gg, y_nchw, kGpu); },
               {"channel_scale_forward", "y [2, 3, 4, 4] is nchw", "x [2, 3, 4, 4] is channels_last"});
  expect_error([&] { channel_scale_backward(gx, gg, gdy, gdx_nchw, none, kGpu); },
               {"channel_scale_backward", "dx [2, 3, 4, 4] is nchw"});
  expect_error([&] { se_scale_residual_relu_forward(gx, gg, gx_nchw, gy, kGpu); },
               {"se_scale_residual_relu_forward", "shortcut [2, 3, 4, 4] is nchw", "x [2, 3, 4, 4] is channels_last"});
  expect_error([&] { se_scale_residual_relu_backward(gx, gg, gy, gdy, gdx_nchw, none, none, kGpu); },
               {"se_scale_residual_relu_backward", "dx [2, 3, 4, 4] is nchw"});
}

}  // namespace
}  // namespace lancet
