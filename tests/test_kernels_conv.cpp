// Tests for kernels/conv: forward against PyTorch values and a direct (double) reference,
// finite-difference gradients over stride/padding/dilation/groups/1x1 configurations, the
// accumulate contract, thread-count independence, and error messages.
#include <gtest/gtest.h>

#include <cstring>

#include "kernels/conv.h"
#include "kernels/conv_winograd.h"
#include "kernels/parallel.h"
#include "tests/gradcheck.h"
#include "tests/kernel_test_util.h"

namespace lancet {
namespace {

using testing::check_gradient;
using testing::conv_params;
using testing::ConvCase;
using testing::dot;
using testing::expect_error;
using testing::expect_near_all;
using testing::random_tensor;
using testing::sin_tensor;

const Stream kCpu = Stream::cpu();

// Direct convolution in double: forward, and the input/weight gradients for a given dy.
struct Reference {
  std::vector<double> y, dx, dw;
};
Reference reference_conv(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& dy) {
  const Shape ys = conv2d_output_shape(p, x.shape(), w.shape());
  const int64_t N = x.dim(0), C = x.dim(1), H = x.dim(2), W = x.dim(3), Co = w.dim(0), Cg = w.dim(1), KH = w.dim(2),
                KW = w.dim(3), Ho = ys[2], Wo = ys[3], Cog = Co / p.groups;
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* dyp = dy.defined() ? dy.data<float>() : nullptr;
  Reference r;
  r.y.assign(static_cast<size_t>(N * Co * Ho * Wo), 0.0);
  r.dx.assign(static_cast<size_t>(x.numel()), 0.0);
  r.dw.assign(static_cast<size_t>(w.numel()), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t yi = ((n * Co + co) * Ho + oh) * Wo + ow;
          double acc = b.defined() ? b.data<float>()[co] : 0.0;
          for (int64_t cg = 0; cg < Cg; ++cg)
            for (int64_t kh = 0; kh < KH; ++kh)
              for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
                const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dilation_w;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                const int64_t c = (co / Cog) * Cg + cg;
                const int64_t xi = ((n * C + c) * H + ih) * W + iw, wi = ((co * Cg + cg) * KH + kh) * KW + kw;
                acc += double(xp[xi]) * wp[wi];
                if (dyp) {
                  r.dx[xi] += double(dyp[yi]) * wp[wi];
                  r.dw[wi] += double(dyp[yi]) * xp[xi];
                }
              }
          r.y[yi] = acc;
        }
  return r;
}

void expect_close(const Tensor& t, const std::vector<double>& ref, double tol, const std::string& what) {
  ASSERT_EQ(t.numel(), static_cast<int64_t>(ref.size())) << what;
  const float* p = t.data<float>();
  double max_err = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    max_err = std::max(max_err, std::fabs(p[i] - ref[i]) / std::max(1.0, std::fabs(ref[i])));
  EXPECT_LE(max_err, tol) << what;
}

// Forward and backward against the direct reference; dw/db are accumulated onto ones.
void check_against_reference(const Conv2dParams& p, const Shape& xs, const Shape& ws, bool bias, uint32_t seed) {
  SCOPED_TRACE("x " + shape_str(xs) + " w " + shape_str(ws));
  Tensor x = random_tensor(xs, seed), w = random_tensor(ws, seed + 1);
  Tensor b = bias ? random_tensor({ws[0]}, seed + 2) : Tensor();
  const Shape ys = conv2d_output_shape(p, xs, ws);
  Tensor dy = random_tensor(ys, seed + 3);
  const Reference ref = reference_conv(p, x, w, b, dy);
  Tensor y = Tensor::empty(ys);
  conv2d_forward(p, x, w, b, y, kCpu);
  expect_close(y, ref.y, 3e-4, "y");
  Tensor dx = Tensor::full(xs, 7.f), dw = Tensor::full(ws, 1.f), db = bias ? Tensor::full({ws[0]}, 1.f) : Tensor();
  conv2d_backward(p, x, w, dy, dx, dw, db, kCpu);
  expect_close(dx, ref.dx, 3e-4, "dx");  // overwritten: the 7s are gone
  std::vector<double> dw1 = ref.dw;
  for (double& v : dw1) v += 1.0;
  expect_close(dw, dw1, 3e-4, "dw");  // accumulated onto 1
  if (bias) {
    std::vector<double> db1(static_cast<size_t>(ws[0]), 1.0);
    const float* dyp = dy.data<float>();
    for (int64_t i = 0; i < dy.numel(); ++i) db1[(i / (ys[2] * ys[3])) % ys[1]] += dyp[i];
    expect_close(db, db1, 3e-4, "db");
  }
}

void check_conv_gradients(const Conv2dParams& p, const Shape& xs, const Shape& ws, bool bias, uint32_t seed) {
  SCOPED_TRACE("x " + shape_str(xs) + " w " + shape_str(ws));
  Tensor x = random_tensor(xs, seed), w = random_tensor(ws, seed + 1);
  Tensor b = bias ? random_tensor({ws[0]}, seed + 2) : Tensor();
  const Shape ys = conv2d_output_shape(p, xs, ws);
  Tensor y = Tensor::empty(ys), r = random_tensor(ys, seed + 3);
  auto loss = [&] {
    conv2d_forward(p, x, w, b, y, kCpu);
    return dot(y, r);
  };
  Tensor dx = Tensor::empty(xs), dw = Tensor::zeros(ws), db = bias ? Tensor::zeros({ws[0]}) : Tensor();
  conv2d_backward(p, x, w, r, dx, dw, db, kCpu);
  check_gradient("dx", x, dx, loss);
  check_gradient("dw", w, dw, loss);
  if (bias) check_gradient("db", b, db, loss);
}

TEST(Conv2d, ForwardMatchesTorch) {
  // torch.nn.functional.conv2d(x, w, b, stride=2, padding=1) with x = sin(0.37 i + 0.1) [1,2,5,5],
  // w = 0.5 sin(0.53 i + 0.2) [3,2,3,3], b = [0.1, -0.2, 0.3] (torch 2.x, one python run).
  Tensor x = sin_tensor({1, 2, 5, 5}, 0.37, 0.1), w = sin_tensor({3, 2, 3, 3}, 0.53, 0.2, 0.5);
  Tensor b = Tensor::from_vector({0.1f, -0.2f, 0.3f}, {3});
  Tensor y = Tensor::empty({1, 3, 3, 3});
  conv2d_forward(conv_params(2, 1), x, w, b, y, kCpu);
  expect_near_all(y, {-1.0096273f, -0.85728365f, 0.4554638f,    2.0173042f,   0.97741562f,   -0.88901258f, -0.83413088f,
                      0.17371386f, 0.94759363f,  0.893206f,     0.89646143f,  -0.42215109f,  -2.1444027f,  -1.2880963f,
                      0.67715484f, 0.84407616f,  -0.070179105f, -0.97495681f, -0.76228696f,  -0.92109871f, 0.38589221f,
                      2.2457156f,  1.5843471f,   -0.45366454f,  -0.84017551f, -0.031634063f, 0.99204302f},
                  1e-5, "y");
}

TEST(Conv2d, GroupedDilatedForwardMatchesTorch) {
  // conv2d(x, w, None, padding=2, dilation=2, groups=2)[0, :, 1, :] with x = sin(0.37 i + 0.1)
  // [2,4,5,5], w = 0.5 sin(0.53 i + 0.2) [4,2,3,3] (torch 2.x, one python run).
  Tensor x = sin_tensor({2, 4, 5, 5}, 0.37, 0.1), w = sin_tensor({4, 2, 3, 3}, 0.53, 0.2, 0.5);
  Tensor y = Tensor::empty({2, 4, 5, 5});
  conv2d_forward(conv_params(1, 2, 2, 2), x, w, Tensor(), y, kCpu);
  std::vector<float> row;  // y[0, :, 1, :]
  for (int c = 0; c < 4; ++c)
    for (int j = 0; j < 5; ++j) row.push_back(y.data<float>()[(c * 5 + 1) * 5 + j]);
  const std::vector<float> expected = {0.17069364f,   -0.16521542f, 0.25638917f,  0.15417635f,   -0.38176081f,
                                       -0.05085643f,  0.23160049f,  -0.20274068f, -0.085329048f, 0.41320053f,
                                       0.15236092f,   -0.08264143f, 0.48718485f,  0.44389835f,   -0.010288513f,
                                       0.0093308305f, 0.19925955f,  -0.36768442f, -0.33506024f,  0.077895679f};
  for (size_t i = 0; i < row.size(); ++i) EXPECT_NEAR(row[i], expected[i], 1e-5) << i;
}

TEST(Conv2d, MatchesReferenceAcrossConfigurations) {
  check_against_reference(conv_params(1, 1), {2, 3, 7, 7}, {4, 3, 3, 3}, true, 1);
  check_against_reference(conv_params(2, 1), {2, 3, 9, 7}, {5, 3, 3, 3}, false, 2);
  check_against_reference(conv_params(1, 2, 2), {1, 2, 9, 9}, {3, 2, 3, 3}, true, 3);
  check_against_reference(conv_params(1, 3, 3), {2, 2, 8, 8}, {2, 2, 3, 3}, false, 4);
  check_against_reference(conv_params(1, 1, 1, 2), {2, 4, 6, 6}, {6, 2, 3, 3}, true, 5);
  check_against_reference(conv_params(2, 2, 2, 3), {2, 6, 9, 9}, {3, 2, 3, 3}, false, 6);
  check_against_reference(conv_params(1, 0), {2, 5, 4, 4}, {3, 5, 1, 1}, true, 7);    // 1x1
  check_against_reference(conv_params(2, 0), {2, 4, 5, 5}, {6, 4, 1, 1}, false, 8);   // 1x1 downsample
  check_against_reference(conv_params(2, 3), {1, 3, 11, 11}, {4, 3, 7, 7}, true, 9);  // stem-like
  Conv2dParams odd;                                                                   // non-square everything
  odd.stride_h = 1, odd.stride_w = 2, odd.pad_h = 0, odd.pad_w = 2, odd.dilation_h = 1, odd.dilation_w = 2;
  check_against_reference(odd, {2, 3, 6, 9}, {2, 3, 2, 3}, true, 10);
}

TEST(Conv2d, MatchesReferenceOnEveryWorkSplit) {
  // Planes split into blocks within an image (large P), with a 1x1 variant.
  check_against_reference(conv_params(1, 1), {2, 3, 20, 20}, {4, 3, 3, 3}, true, 11);
  check_against_reference(conv_params(1, 0), {2, 8, 20, 20}, {5, 8, 1, 1}, false, 12);
  // Many small images batched into one GEMM, with a partial last chunk; 1x1 and grouped too.
  check_against_reference(conv_params(1, 1), {40, 8, 2, 2}, {6, 8, 3, 3}, true, 13);
  check_against_reference(conv_params(1, 0), {40, 8, 2, 2}, {6, 8, 1, 1}, false, 14);
  check_against_reference(conv_params(1, 1, 1, 2), {24, 8, 4, 4}, {4, 4, 3, 3}, true, 15);
  // dx split into input-channel blocks (dcol above the workspace target).
  check_against_reference(conv_params(1, 1), {1, 32, 64, 64}, {4, 32, 3, 3}, false, 16);
  // dw from per-task partials: one image per step, several images per step (dy gathered),
  // grouped, and several steps per task.
  check_against_reference(conv_params(1, 1), {3, 3, 64, 64}, {64, 3, 3, 3}, false, 17);
  check_against_reference(conv_params(1, 1), {16, 4, 6, 6}, {2, 4, 3, 3}, true, 18);
  check_against_reference(conv_params(1, 1, 1, 2), {16, 4, 6, 6}, {4, 2, 3, 3}, false, 19);
  check_against_reference(conv_params(1, 1), {16, 32, 64, 64}, {8, 32, 3, 3}, false, 20);
  // dw by row blocks reduced over several image chunks, the last one partial.
  check_against_reference(conv_params(1, 1), {4, 8, 32, 32}, {300, 8, 3, 3}, false, 21);
}

TEST(Conv2d, WinogradPathMatchesReference) {
  // 3x3 stride-1 convs that take the Winograd path: even and odd planes, padding 0 to 3 and
  // asymmetric, a 2x2 plane (one tile per image), several image chunks, bias.
  Conv2dParams asym = conv_params(1, 1);
  asym.pad_w = 0;
  const std::vector<ConvCase> cases = {
      {conv_params(1, 1), {8, 16, 6, 6}, {16, 16, 3, 3}},  {conv_params(1, 1), {10, 16, 7, 5}, {24, 16, 3, 3}},
      {conv_params(1, 0), {10, 20, 7, 8}, {16, 20, 3, 3}}, {conv_params(1, 2), {6, 16, 5, 5}, {16, 16, 3, 3}},
      {conv_params(1, 1), {56, 64, 2, 2}, {32, 64, 3, 3}}, {conv_params(1, 1), {3, 64, 64, 64}, {16, 64, 3, 3}},
      {asym, {13, 16, 5, 6}, {16, 16, 3, 3}},
      {conv_params(1, 3), {6, 16, 4, 4}, {16, 16, 3, 3}}};  // the input gradient pads by 2 - 3 < 0
  uint32_t seed = 51;
  for (const ConvCase& c : cases) {
    EXPECT_TRUE(cpu::winograd_applies(c.p, c.x, c.w)) << shape_str(c.x);
    check_against_reference(c.p, c.x, c.w, seed % 2 == 1, seed);
    ++seed;
  }
  EXPECT_FALSE(cpu::winograd_applies(conv_params(1, 1), {32, 512, 2, 2}, {512, 512, 3, 3}));  // im2col is cheaper
  EXPECT_FALSE(cpu::winograd_applies(conv_params(2, 1), {32, 64, 16, 16}, {64, 64, 3, 3}));
  EXPECT_FALSE(cpu::winograd_applies(conv_params(1, 2, 2), {32, 64, 16, 16}, {64, 64, 3, 3}));
}

TEST(Conv2d, GradientsMatchFiniteDifferences) {
  check_conv_gradients(conv_params(1, 1), {2, 3, 5, 5}, {4, 3, 3, 3}, true, 21);
  check_conv_gradients(conv_params(2, 1), {2, 2, 7, 6}, {3, 2, 3, 3}, true, 22);        // stride 2, odd sizes
  check_conv_gradients(conv_params(1, 2, 2), {1, 2, 7, 7}, {2, 2, 3, 3}, false, 23);    // dilation 2, batch 1
  check_conv_gradients(conv_params(1, 3, 3), {2, 2, 7, 7}, {2, 2, 3, 3}, true, 24);     // dilation 3
  check_conv_gradients(conv_params(1, 1, 1, 2), {2, 4, 5, 5}, {4, 2, 3, 3}, true, 25);  // groups 2
  check_conv_gradients(conv_params(1, 0), {2, 4, 3, 3}, {3, 4, 1, 1}, true, 26);        // 1x1
  check_conv_gradients(conv_params(2, 0), {2, 4, 5, 5}, {3, 4, 1, 1}, false, 27);       // 1x1 stride 2
  check_conv_gradients(conv_params(2, 3), {1, 3, 9, 9}, {2, 3, 7, 7}, false, 28);       // stem-like
  ASSERT_TRUE(cpu::winograd_applies(conv_params(1, 1), {13, 16, 5, 4}, {16, 16, 3, 3}));
  check_conv_gradients(conv_params(1, 1), {13, 16, 5, 4}, {16, 16, 3, 3}, true, 29);  // Winograd path
}

TEST(Conv2d, BackwardSkipsUndefinedOutputs) {
  const Conv2dParams p = conv_params(1, 1);
  Tensor x = random_tensor({2, 3, 5, 5}, 31), w = random_tensor({4, 3, 3, 3}, 32), dy = random_tensor({2, 4, 5, 5}, 33);
  Tensor dx = Tensor::empty({2, 3, 5, 5}), dw = Tensor::zeros({4, 3, 3, 3}), none;
  conv2d_backward(p, x, w, dy, none, dw, none, kCpu);  // first layer: no dx
  Tensor dw2 = Tensor::zeros({4, 3, 3, 3});
  conv2d_backward(p, x, w, dy, dx, dw2, none, kCpu);
  EXPECT_EQ(dw.to_vector(), dw2.to_vector());
  conv2d_backward(p, x, w, dy, dx, none, none, kCpu);  // frozen weights: dx only
}

// Forward and backward of MedicalCNN-like shapes, bit-identical on 1 and 2 threads.
TEST(Conv2d, IdenticalOnOneAndTwoThreads) {
  const std::vector<ConvCase> cases = {
      {conv_params(2, 3), {2, 3, 64, 64}, {64, 3, 7, 7}},    {conv_params(1, 1), {4, 64, 16, 16}, {64, 64, 3, 3}},
      {conv_params(2, 0), {4, 64, 16, 16}, {128, 64, 1, 1}}, {conv_params(1, 1), {8, 256, 2, 2}, {256, 256, 3, 3}},
      {conv_params(1, 1), {16, 64, 4, 4}, {64, 64, 3, 3}},  // Winograd
      {conv_params(1, 2, 2), {8, 64, 4, 4}, {16, 64, 3, 3}}};
  const int saved = num_threads();
  for (const ConvCase& c : cases) {
    SCOPED_TRACE("x " + shape_str(c.x) + " w " + shape_str(c.w));
    Tensor x = random_tensor(c.x, 41), w = random_tensor(c.w, 42), b = random_tensor({c.w[0]}, 43);
    const Shape ys = conv2d_output_shape(c.p, c.x, c.w);
    Tensor dy = random_tensor(ys, 44);
    std::vector<std::vector<float>> out[2];
    for (int t : {1, 2}) {
      set_num_threads(t);
      Tensor y = Tensor::empty(ys), dx = Tensor::empty(c.x), dw = Tensor::zeros(c.w), db = Tensor::zeros({c.w[0]});
      conv2d_forward(c.p, x, w, b, y, kCpu);
      conv2d_backward(c.p, x, w, dy, dx, dw, db, kCpu);
      out[t - 1] = {y.to_vector(), dx.to_vector(), dw.to_vector(), db.to_vector()};
    }
    for (size_t k = 0; k < 4; ++k) EXPECT_TRUE(out[0][k] == out[1][k]) << "output " << k << " differs";
  }
  set_num_threads(saved);
}

TEST(Conv2d, OutputShapeAndErrors) {
  EXPECT_EQ(conv2d_output_shape(conv_params(2, 3), {32, 3, 64, 64}, {64, 3, 7, 7}), (Shape{32, 64, 32, 32}));
  EXPECT_EQ(conv2d_output_shape(conv_params(1, 3, 3), {1, 512, 2, 2}, {64, 512, 3, 3}), (Shape{1, 64, 2, 2}));
  expect_error([] { conv2d_output_shape(conv_params(1, 1), {2, 3, 8, 8}, {4, 2, 3, 3}); },
               {"[2, 3, 8, 8]", "[4, 2, 3, 3]"});
  expect_error(
      [] {
        conv2d_output_shape(conv_params(1, 1, 1, 2), {2, 4, 8, 8}, {3, 2, 3, 3});
      },
      {"[2, 4, 8, 8]", "[3, 2, 3, 3]"});
  expect_error([] { conv2d_output_shape(conv_params(1, 0), {2, 3, 4, 4}, {4, 3, 5, 5}); },
               {"[2, 3, 4, 4]", "[4, 3, 5, 5]"});
  expect_error([] { conv2d_output_shape(conv_params(1, 0), {3, 4, 4}, {4, 3, 3, 3}); }, {"[3, 4, 4]", "[4, 3, 3, 3]"});
  expect_error([] { conv2d_output_shape(conv_params(0, 0), {1, 3, 4, 4}, {4, 3, 3, 3}); }, {"stride 0"});

  Tensor x = Tensor::zeros({2, 3, 8, 8}), w = Tensor::zeros({4, 3, 3, 3});
  Tensor bad_y = Tensor::empty({2, 4, 7, 7}), none;
  expect_error([&] { conv2d_forward(conv_params(1, 1), x, w, none, bad_y, kCpu); }, {"[2, 4, 7, 7]", "[2, 4, 8, 8]"});
  Tensor bad_b = Tensor::zeros({3}), y = Tensor::empty({2, 4, 8, 8});
  expect_error([&] { conv2d_forward(conv_params(1, 1), x, w, bad_b, y, kCpu); }, {"bias [3]", "[4]"});
  Tensor xi = Tensor::zeros({2, 3, 8, 8}, DType::i32);
  expect_error([&] { conv2d_forward(conv_params(1, 1), xi, w, none, y, kCpu); }, {"[2, 3, 8, 8]", "f32", "i32"});
  Tensor bad_dx = Tensor::empty({2, 3, 8, 7}), dw = Tensor::zeros({4, 3, 3, 3});
  expect_error([&] { conv2d_backward(conv_params(1, 1), x, w, y, bad_dx, dw, none, kCpu); },
               {"[2, 3, 8, 7]", "[2, 3, 8, 8]"});
  expect_error([&] { conv2d_backward(conv_params(1, 1), x, w, bad_y, bad_dx, dw, none, kCpu); },
               {"[2, 4, 7, 7]", "[2, 4, 8, 8]"});
}

}  // namespace
}  // namespace lancet
