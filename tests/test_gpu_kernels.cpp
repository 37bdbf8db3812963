// CUDA twins of activation, elementwise, pool and loss against their CPU twins (issue 3):
// random inputs, odd shapes (batch 1, odd H/W, channel counts not multiples of 8, sizes that
// are not multiples of the block and that need many blocks), bit-identical dropout masks,
// maxpool ties, the fused softmax cross-entropy's options, f16/bf16 storage and error paths.
//
// Tolerances: ops whose GPU arithmetic is the CPU's float arithmetic in the same order (relu,
// add, scale, copies, dropout, maxpool, channel_scale forward and dx, avgpool backward) must
// match exactly. GPU float differs where the compiler contracts a*b+c into one FMA (axpy:
// one rounding fewer, <= 1 ulp: rtol 1e-6) and in expf (<= 2 ulp vs glibc: sigmoid rtol 2e-6).
// Sums accumulate in double on both sides in different orders, then round to float: equal
// or 1 float ulp apart (rtol 1e-6 plus an atol for sums that cancel to ~0). The softmax
// cross-entropy is computed in double on both sides (CUDA exp/log are within 1 double ulp):
// loss and probs to 1e-6, dlogits to 1e-5 relative.
//
// GPU calls run on the legacy default stream, which orders them with Tensor::to's copies
// (cudaMemcpy); one test uses a non-blocking CudaStream for the ops that return host values.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "kernels/loss.h"
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
using testing::to_gpu;
using testing::to_gpu_as;

const Stream kCpu = Stream::cpu();
const Stream kGpu{Device::cuda(0), nullptr};

Tensor gpu_empty(const Shape& shape, DType dt = DType::f32) { return Tensor::empty(shape, dt, Device::cuda(0)); }

// Odd shapes: a single element, odd H/W and channels, a size needing ~1200 blocks of 256.
const std::vector<Shape> kShapes = {{1, 1, 1, 1}, {2, 3, 5, 7}, {1, 13, 17, 19}, {3, 11, 97, 93}};

// ---- activation ------------------------------------------------------------------------------

TEST(GpuActivation, ReluAndSigmoidMatchCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    const std::string at = " at " + shape_str(sh);
    const Tensor x = random_tensor(sh, 1, -4.f, 4.f), dy = random_tensor(sh, 2);
    Tensor y = Tensor::empty(sh), dx = Tensor::empty(sh);
    Tensor gx = to_gpu(x), gdy = to_gpu(dy), gy = gpu_empty(sh), gdx = gpu_empty(sh);
    relu_forward(x, y, kCpu);
    relu_forward(gx, gy, kGpu);
    expect_same_bits(y, gy, "relu_forward" + at);
    relu_backward(y, dy, dx, kCpu);
    relu_backward(gy, gdy, gdx, kGpu);
    expect_same_bits(dx, gdx, "relu_backward" + at);
    relu_forward(gx, gx, kGpu);  // in place
    expect_same_bits(y, gx, "relu_forward in place" + at);

    sigmoid_forward(x, y, kCpu);
    sigmoid_forward(to_gpu(x), gy, kGpu);
    expect_close(y, gy, 2e-6, 0, "sigmoid_forward" + at);
    sigmoid_backward(y, dy, dx, kCpu);
    sigmoid_backward(to_gpu(y), gdy, gdx, kGpu);  // the CPU y, so only the backward is compared
    expect_close(dx, gdx, 1e-6, 0, "sigmoid_backward" + at);
  }
}

TEST(GpuActivation, DropoutMasksAreBitIdentical) {
  LANCET_REQUIRE_GPU();
  const Shape shapes[] = {{1}, {3, 333}, {(1 << 20) + 3}};
  const uint64_t offsets[] = {0, 12345, (uint64_t{1} << 40) + 7};
  for (const Shape& sh : shapes)
    for (float p : {0.f, 0.1f, 0.5f, 1.f})
      for (uint64_t offset : offsets) {
        const std::string at = " p=" + std::to_string(p) + " offset=" + std::to_string(offset) + " " + shape_str(sh);
        const Tensor x = random_tensor(sh, 3), dy = random_tensor(sh, 4);
        Tensor y = Tensor::empty(sh), mask = Tensor::empty(sh, DType::u8), dx = Tensor::empty(sh);
        Tensor gy = gpu_empty(sh), gmask = gpu_empty(sh, DType::u8), gdx = gpu_empty(sh);
        dropout_forward(p, 42, offset, x, y, mask, kCpu);
        dropout_forward(p, 42, offset, to_gpu(x), gy, gmask, kGpu);
        expect_same_bits(mask, gmask, "dropout mask" + at);
        expect_same_bits(y, gy, "dropout_forward" + at);
        dropout_backward(p, mask, dy, dx, kCpu);
        dropout_backward(p, gmask, to_gpu(dy), gdx, kGpu);
        expect_same_bits(dx, gdx, "dropout_backward" + at);
      }
}

// ---- elementwise -----------------------------------------------------------------------------

TEST(GpuElementwise, ArithmeticMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    const std::string at = " at " + shape_str(sh);
    const Tensor a = random_tensor(sh, 5), b = random_tensor(sh, 6);
    Tensor y = Tensor::empty(sh), gy = gpu_empty(sh);
    Tensor ga = to_gpu(a), gb = to_gpu(b);
    add(a, b, y, kCpu);
    add(ga, gb, gy, kGpu);
    expect_same_bits(y, gy, "add" + at);
    add(ga, gb, ga, kGpu);  // y aliases a
    expect_same_bits(y, ga, "add aliased" + at);

    Tensor acc = a.clone(), gacc = to_gpu(a);
    add_inplace(acc, b, kCpu);
    add_inplace(gacc, gb, kGpu);
    expect_same_bits(acc, gacc, "add_inplace" + at);
    axpy(-0.37f, b, acc, kCpu);
    axpy(-0.37f, gb, gacc, kGpu);
    expect_close(acc, gacc, 1e-6, 1e-7, "axpy" + at);
    Tensor gs = to_gpu(acc);  // the CPU values, so scale_inplace alone is compared
    scale_inplace(acc, 1.7f, kCpu);
    scale_inplace(gs, 1.7f, kGpu);
    expect_same_bits(acc, gs, "scale_inplace" + at);
    fill(y, -2.5f, kCpu);
    fill(gy, -2.5f, kGpu);
    expect_same_bits(y, gy, "fill" + at);
  }
}

TEST(GpuElementwise, ConcatChannelsMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& hw : {Shape{1, 7, 5}, Shape{3, 33, 33}}) {
    const int64_t N = hw[0], H = hw[1], W = hw[2];
    std::vector<Tensor> xs, gxs;
    int64_t C = 0;
    for (int64_t c : {1, 3, 8, 5}) {
      xs.push_back(random_tensor({N, c, H, W}, static_cast<uint32_t>(10 + c)));
      gxs.push_back(to_gpu(xs.back()));
      C += c;
    }
    Tensor y = Tensor::empty({N, C, H, W}), gy = gpu_empty({N, C, H, W});
    concat_channels_forward(xs, y, kCpu);
    concat_channels_forward(gxs, gy, kGpu);
    expect_same_bits(y, gy, "concat_channels_forward");
    const Tensor dy = random_tensor(y.shape(), 20);
    std::vector<Tensor> dxs, gdxs;
    for (const Tensor& x : xs) dxs.push_back(Tensor::empty(x.shape())), gdxs.push_back(gpu_empty(x.shape()));
    concat_channels_backward(dy, dxs, kCpu);
    concat_channels_backward(to_gpu(dy), gdxs, kGpu);
    for (size_t i = 0; i < dxs.size(); ++i) expect_same_bits(dxs[i], gdxs[i], "concat_channels_backward part");
  }
}

TEST(GpuElementwise, ChannelScaleMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& sh : {Shape{1, 1, 1, 1}, Shape{2, 3, 5, 7}, Shape{3, 13, 33, 31}, Shape{2, 5, 64, 64}}) {
    const std::string at = " at " + shape_str(sh);
    const Tensor x = random_tensor(sh, 7), g = random_tensor({sh[0], sh[1]}, 8), dy = random_tensor(sh, 9);
    Tensor y = Tensor::empty(sh), gy = gpu_empty(sh);
    Tensor gx = to_gpu(x), gg = to_gpu(g), gdy = to_gpu(dy);
    channel_scale_forward(x, g, y, kCpu);
    channel_scale_forward(gx, gg, gy, kGpu);
    expect_same_bits(y, gy, "channel_scale_forward" + at);
    Tensor dx = Tensor::empty(sh), dg = Tensor::empty(g.shape()), gdx = gpu_empty(sh), gdg = gpu_empty(g.shape());
    channel_scale_backward(x, g, dy, dx, dg, kCpu);
    channel_scale_backward(gx, gg, gdy, gdx, gdg, kGpu);
    expect_same_bits(dx, gdx, "channel_scale_backward dx" + at);
    expect_close(dg, gdg, 1e-6, 1e-9, "channel_scale_backward dg" + at);
    Tensor none, gdg2 = gpu_empty(g.shape()), gdx2 = gpu_empty(sh);
    channel_scale_backward(gx, gg, gdy, none, gdg2, kGpu);  // dx undefined
    expect_same_bits(gdg, gdg2, "channel_scale_backward dg without dx" + at);
    channel_scale_backward(gx, gg, gdy, gdx2, none, kGpu);  // dg undefined
    expect_same_bits(dx, gdx2, "channel_scale_backward dx without dg" + at);
  }
}

TEST(GpuElementwise, SumSquaresAndAllFiniteMatchCpu) {
  LANCET_REQUIRE_GPU();
  for (int64_t n : {int64_t{1}, int64_t{255}, int64_t{257}, int64_t{10'000'000}}) {
    Tensor x = random_tensor({n}, 11, -3.f, 3.f);
    const Tensor gx = to_gpu(x);
    const double want = sum_squares(x, kCpu), got = sum_squares(gx, kGpu);
    EXPECT_NEAR(got, want, 1e-10 * want) << "sum_squares of " << n;
    EXPECT_EQ(got, sum_squares(gx, kGpu)) << "sum_squares is deterministic";
    EXPECT_TRUE(all_finite(gx, kGpu)) << n;
    for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
      x.data<float>()[n - 1] = bad;
      EXPECT_FALSE(all_finite(to_gpu(x), kGpu)) << bad << " as the last of " << n;
    }
  }
}

#ifdef LANCET_WITH_CUDA
// The host-value ops synchronise the stream they ran on, not the device: a non-blocking stream.
TEST(GpuElementwise, HostValuesOnANonBlockingStream) {
  LANCET_REQUIRE_GPU();
  const Tensor x = random_tensor({1000003}, 12);
  const Tensor gx = to_gpu(x);
  synchronize(kGpu);  // the upload (legacy stream) is complete before another stream reads it
  CudaStream cs(Device::cuda(0));
  const Stream s = cs.stream();
  Tensor gy = gpu_empty(x.shape());
  add(gx, gx, gy, s);  // queued ahead of the reduction on the same stream
  const double want = 4 * sum_squares(x, kCpu);
  EXPECT_NEAR(sum_squares(gy, s), want, 1e-10 * want);
  EXPECT_TRUE(all_finite(gy, s));
  const Tensor logits = random_tensor({9, 35}, 13), labels = Tensor::from_labels({0, 1, 2, 3, 4, 5, 6, 7, 34});
  Tensor none;
  const float l = softmax_cross_entropy(logits, labels, none, 0.f, none, none, kCpu);
  const Tensor gl = to_gpu(logits), glab = to_gpu(labels);
  synchronize(kGpu);
  EXPECT_NEAR(softmax_cross_entropy(gl, glab, none, 0.f, none, none, s), l, 1e-6 * l);
}
#endif

// ---- pooling ---------------------------------------------------------------------------------

void check_maxpool(const MaxPool2dParams& p, const Tensor& x, const std::string& what) {
  const Shape ys = maxpool2d_output_shape(p, x.shape());
  Tensor y = Tensor::empty(ys), am = Tensor::empty(ys, DType::i32);
  Tensor gy = gpu_empty(ys), gam = gpu_empty(ys, DType::i32);
  maxpool2d_forward(p, x, y, am, kCpu);
  maxpool2d_forward(p, to_gpu(x), gy, gam, kGpu);
  expect_same_bits(y, gy, "maxpool2d_forward " + what);
  expect_same_bits(am, gam, "maxpool2d argmax " + what);
  const Tensor dy = random_tensor(ys, 14);
  Tensor dx = Tensor::empty(x.shape()), gdx = gpu_empty(x.shape());
  fill(gdx, 7.f, kGpu);  // overwritten, not accumulated
  maxpool2d_backward(p, dy, am, dx, kCpu);
  maxpool2d_backward(p, to_gpu(dy), gam, gdx, kGpu);
  expect_same_bits(dx, gdx, "maxpool2d_backward " + what);  // same additions in the same order
}

TEST(GpuPool, MaxPoolMatchesCpu) {
  LANCET_REQUIRE_GPU();
  const MaxPool2dParams params[] = {{3, 2, 1}, {2, 2, 0}, {3, 1, 1}, {1, 1, 0}, {4, 3, 2}};
  for (const MaxPool2dParams& p : params)
    for (const Shape& sh : {Shape{1, 1, 2, 2}, Shape{1, 3, 7, 9}, Shape{2, 13, 33, 31}, Shape{4, 16, 64, 65}}) {
      const std::string what = "k" + std::to_string(p.kernel) + " s" + std::to_string(p.stride) + " p" +
                               std::to_string(p.pad) + " " + shape_str(sh);
      check_maxpool(p, random_tensor(sh, 15), what);
      check_maxpool(p, Tensor::full(sh, 0.5f), "constant " + what);  // ties everywhere: first wins
      Tensor coarse = random_tensor(sh, 16);                         // ties among a few values
      for (int64_t i = 0; i < coarse.numel(); ++i) coarse.data<float>()[i] = std::round(coarse.data<float>()[i]);
      check_maxpool(p, coarse, "coarse " + what);
    }
  Tensor nan = random_tensor({1, 2, 9, 9}, 17);  // NaN wins its windows, as on the CPU
  nan.data<float>()[40] = nan.data<float>()[41] = nan.data<float>()[100] = std::nanf("");
  check_maxpool({3, 2, 1}, nan, "with NaN");
}

TEST(GpuPool, GlobalAvgPoolMatchesCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& sh : {Shape{1, 1, 1, 1}, Shape{2, 3, 7, 7}, Shape{3, 10, 33, 31}, Shape{1, 2, 128, 128}}) {
    const std::string at = " at " + shape_str(sh);
    const Tensor x = random_tensor(sh, 18);
    Tensor y = Tensor::empty({sh[0], sh[1]}), gy = gpu_empty({sh[0], sh[1]});
    global_avgpool_forward(x, y, kCpu);
    global_avgpool_forward(to_gpu(x), gy, kGpu);
    expect_close(y, gy, 1e-6, 1e-9, "global_avgpool_forward" + at);
    const Tensor dy = random_tensor(y.shape(), 19);
    Tensor dx = Tensor::empty(sh), gdx = gpu_empty(sh);
    global_avgpool_backward(dy, dx, kCpu);
    global_avgpool_backward(to_gpu(dy), gdx, kGpu);
    expect_same_bits(dx, gdx, "global_avgpool_backward" + at);
  }
}

// ---- softmax cross-entropy -------------------------------------------------------------------

void check_cross_entropy(int64_t N, int64_t K, bool weighted, float smoothing, uint32_t seed) {
  const std::string what = "N=" + std::to_string(N) + " K=" + std::to_string(K) + (weighted ? " weighted" : "") +
                           " smoothing=" + std::to_string(smoothing);
  const Tensor logits = random_tensor({N, K}, seed, -5.f, 5.f);
  std::vector<int64_t> y(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) y[i] = (i * 7 + seed) % K;
  const Tensor labels = Tensor::from_labels(y);
  const Tensor w = weighted ? random_tensor({K}, seed + 1, 0.2f, 2.f) : Tensor();
  Tensor dz = Tensor::empty({N, K}), pr = Tensor::empty({N, K});
  Tensor gdz = gpu_empty({N, K}), gpr = gpu_empty({N, K}), none;
  const float want = softmax_cross_entropy(logits, labels, w, smoothing, dz, pr, kCpu);
  const Tensor gz = to_gpu(logits), gy = to_gpu(labels), gw = to_gpu(w);
  const float got = softmax_cross_entropy(gz, gy, gw, smoothing, gdz, gpr, kGpu);
  EXPECT_NEAR(got, want, 1e-6 * std::fabs(want)) << what;
  expect_close(dz, gdz, 1e-5, 1e-9, "dlogits " + what);
  expect_close(pr, gpr, 1e-6, 1e-9, "probs " + what);
  EXPECT_EQ(softmax_cross_entropy(gz, gy, gw, smoothing, none, none, kGpu), got) << "without outputs, " << what;
}

TEST(GpuLoss, SoftmaxCrossEntropyMatchesCpu) {
  LANCET_REQUIRE_GPU();
  uint32_t seed = 30;
  for (const auto& nk : {std::pair<int64_t, int64_t>{1, 2}, {1, 35}, {37, 2}, {37, 35}, {300, 35}, {5, 1000}})
    for (bool weighted : {false, true})
      for (float smoothing : {0.f, 0.1f}) check_cross_entropy(nk.first, nk.second, weighted, smoothing, ++seed);
}

// ---- errors ----------------------------------------------------------------------------------

TEST(GpuErrors, BadInputsThrowLikeTheCpu) {
  LANCET_REQUIRE_GPU();
  const Tensor logits = to_gpu(random_tensor({6, 5}, 40));
  Tensor none;
  const Tensor bad = to_gpu(Tensor::from_labels({0, 1, 2, 7, 4, -1}));
  expect_error([&] { softmax_cross_entropy(logits, bad, none, 0.f, none, none, kGpu); },
               {"softmax_cross_entropy", "label 7 of sample 3", "out of range for 5 classes"});
  const Tensor cpu_labels = Tensor::from_labels({0, 1, 2, 3, 4, 0});
  expect_error([&] { softmax_cross_entropy(logits, cpu_labels, none, 0.f, none, none, kGpu); }, {"cpu", "cuda:0"});

  const Tensor a = to_gpu(random_tensor({2, 3}, 41)), b_cpu = random_tensor({2, 3}, 42);
  Tensor y = gpu_empty({2, 3});
  expect_error([&] { add(a, b_cpu, y, kGpu); }, {"add", "cpu", "cuda:0"});
  expect_error([&] { relu_forward(a, y, kCpu); }, {"relu_forward", "stream is on cpu"});
  Tensor y_wrong = gpu_empty({3, 2});
  expect_error([&] { add(a, a, y_wrong, kGpu); }, {"y [3, 2]", "a [2, 3]"});
  Tensor y_half = gpu_empty({2, 3}, DType::f16);
  expect_error([&] { add(a, a, y_half, kGpu); }, {"must be f32", "got f16"});
  Tensor y_pool = gpu_empty({1, 1, 2, 2}), am = gpu_empty({1, 1, 3, 3}, DType::i32);
  expect_error([&] { maxpool2d_forward({3, 2, 1}, to_gpu(random_tensor({1, 1, 5, 5}, 43)), y_pool, am, kGpu); },
               {"output [1, 1, 2, 2]", "input [1, 1, 5, 5]", "expected [1, 1, 3, 3]"});
}

// ---- f16 / bf16 storage ----------------------------------------------------------------------

TEST(GpuLowPrecision, ReluAddChannelScaleMaxPoolMatchCpuOnRoundedInputs) {
  LANCET_REQUIRE_GPU();
  for (DType dt : {DType::f16, DType::bf16}) {
    const std::string name = dtype_name(dt);
    const Shape sh{2, 13, 17, 19};
    const Tensor x = rounded(random_tensor(sh, 50, -3.f, 3.f), dt), b = rounded(random_tensor(sh, 51), dt);
    const Tensor g = rounded(random_tensor({2, 13}, 52), dt), dy = rounded(random_tensor(sh, 53), dt);
    const Tensor gx = to_gpu_as(x, dt), gb = to_gpu_as(b, dt), gg = to_gpu_as(g, dt), gdy = to_gpu_as(dy, dt);
    Tensor y = Tensor::empty(sh), gy = gpu_empty(sh, dt);
    // The GPU computes in float like the CPU and rounds once on store: the CPU result rounded.
    relu_forward(x, y, kCpu);
    relu_forward(gx, gy, kGpu);
    expect_same_bits(rounded(y, dt), to_cpu_f32(gy), "relu " + name);
    add(x, b, y, kCpu);
    add(gx, gb, gy, kGpu);
    expect_same_bits(rounded(y, dt), to_cpu_f32(gy), "add " + name);
    channel_scale_forward(x, g, y, kCpu);
    channel_scale_forward(gx, gg, gy, kGpu);
    expect_same_bits(rounded(y, dt), to_cpu_f32(gy), "channel_scale_forward " + name);
    Tensor dx = Tensor::empty(sh), dg = Tensor::empty(g.shape());
    Tensor gdx = gpu_empty(sh, dt), gdg = gpu_empty(g.shape(), dt);
    channel_scale_backward(x, g, dy, dx, dg, kCpu);
    channel_scale_backward(gx, gg, gdy, gdx, gdg, kGpu);
    expect_same_bits(rounded(dx, dt), to_cpu_f32(gdx), "channel_scale_backward dx " + name);
    const double half_ulp = dt == DType::f16 ? 1.0 / 1024 : 1.0 / 128;  // a rounding tie could go either way
    expect_close(rounded(dg, dt), to_cpu_f32(gdg), half_ulp, 1e-6, "channel_scale_backward dg " + name);
    const MaxPool2dParams p{3, 2, 1};
    const Shape ps = maxpool2d_output_shape(p, sh);
    Tensor py = Tensor::empty(ps), pam = Tensor::empty(ps, DType::i32);
    Tensor gpy = gpu_empty(ps, dt), gpam = gpu_empty(ps, DType::i32);
    maxpool2d_forward(p, x, py, pam, kCpu);
    maxpool2d_forward(p, gx, gpy, gpam, kGpu);
    expect_same_bits(py, to_cpu_f32(gpy), "maxpool2d_forward " + name);
    expect_same_bits(pam, gpam, "maxpool2d argmax " + name);
  }
}

}  // namespace
}  // namespace lancet
