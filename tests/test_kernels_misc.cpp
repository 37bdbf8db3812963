// Tests for kernels/elementwise, activation (incl. dropout), linear, loss and optim: PyTorch
// values, finite-difference gradients, thread-count independence and error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "kernels/linear.h"
#include "kernels/loss.h"
#include "kernels/optim.h"
#include "kernels/parallel.h"
#include "tests/gradcheck.h"

namespace lancet {
namespace {

using testing::check_gradient;
using testing::dot;
using testing::expect_error;
using testing::expect_near_all;
using testing::random_tensor;
using testing::sin_tensor;

const Stream kCpu = Stream::cpu();
constexpr double kHalfPi = 1.5707963267948966;

// ---- elementwise -----------------------------------------------------------------------------

TEST(Elementwise, ArithmeticAndReductions) {
  Tensor a = sin_tensor({3, 5}, 0.3, 0.2), b = sin_tensor({3, 5}, 0.7, 0.1), y = Tensor::empty({3, 5});
  add(a, b, y, kCpu);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(y.data<float>()[i], a.data<float>()[i] + b.data<float>()[i]);
  add(y, b, y, kCpu);  // aliasing output and input
  Tensor acc = a.clone();
  add_inplace(acc, b, kCpu);
  axpy(1.f, b, acc, kCpu);
  EXPECT_EQ(acc.to_vector(), y.to_vector());
  scale_inplace(acc, 0.5f, kCpu);
  EXPECT_FLOAT_EQ(acc.data<float>()[4], 0.5f * y.data<float>()[4]);
  fill(acc, 2.f, kCpu);
  EXPECT_DOUBLE_EQ(sum_squares(acc, kCpu), 60.0);
  EXPECT_TRUE(all_finite(acc, kCpu));
  acc.data<float>()[7] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(all_finite(acc, kCpu));
  acc.data<float>()[7] = std::nanf("");
  EXPECT_FALSE(all_finite(acc, kCpu));
  Tensor bad = Tensor::empty({5, 3});
  expect_error([&] { add(a, bad, y, kCpu); }, {"b [5, 3]", "a [3, 5]"});
  expect_error([&] { axpy(2.f, a, bad, kCpu); }, {"y [5, 3]", "x [3, 5]"});
}

TEST(Elementwise, ConcatChannelsRoundTrips) {
  std::vector<Tensor> xs = {random_tensor({2, 1, 3, 3}, 1), random_tensor({2, 3, 3, 3}, 2),
                            random_tensor({2, 2, 3, 3}, 3)};
  Tensor y = Tensor::empty({2, 6, 3, 3});
  concat_channels_forward(xs, y, kCpu);
  const int offsets[] = {0, 1, 4};
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 3; ++i)
      for (int64_t c = 0; c < xs[i].dim(1); ++c)
        for (int k = 0; k < 9; ++k)
          EXPECT_EQ(y.data<float>()[(n * 6 + offsets[i] + c) * 9 + k],
                    xs[i].data<float>()[(n * xs[i].dim(1) + c) * 9 + k]);
  std::vector<Tensor> dxs = {Tensor::empty({2, 1, 3, 3}), Tensor::empty({2, 3, 3, 3}), Tensor::empty({2, 2, 3, 3})};
  concat_channels_backward(y, dxs, kCpu);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(dxs[i].to_vector(), xs[i].to_vector()) << i;
  Tensor small = Tensor::empty({2, 5, 3, 3});
  expect_error([&] { concat_channels_forward(xs, small, kCpu); }, {"6 channels", "[2, 5, 3, 3]"});
  std::vector<Tensor> wrong = {random_tensor({2, 1, 3, 4}, 4)};
  expect_error([&] { concat_channels_forward(wrong, y, kCpu); }, {"[2, 1, 3, 4]", "[2, 6, 3, 3]"});
}

TEST(Elementwise, ChannelScaleGradients) {
  const Shape xs = {2, 3, 4, 4};
  Tensor x = random_tensor(xs, 5), g = random_tensor({2, 3}, 6), y = Tensor::empty(xs), r = random_tensor(xs, 7);
  auto loss = [&] {
    channel_scale_forward(x, g, y, kCpu);
    return dot(y, r);
  };
  loss();
  EXPECT_EQ(y.data<float>()[16 * 4 + 3], x.data<float>()[16 * 4 + 3] * g.data<float>()[4]);
  Tensor dx = Tensor::empty(xs), dg = Tensor::full({2, 3}, 9.f);  // dg overwritten
  channel_scale_backward(x, g, r, dx, dg, kCpu);
  check_gradient("dx", x, dx, loss);
  check_gradient("dg", g, dg, loss);
  Tensor bad_g = Tensor::empty({2, 4});
  expect_error([&] { channel_scale_forward(x, bad_g, y, kCpu); }, {"g [2, 4]", "[2, 3, 4, 4]"});
}

// ---- activations -----------------------------------------------------------------------------

TEST(Activation, ReluAndSigmoid) {
  Tensor x = random_tensor({3, 4, 5}, 11), y = Tensor::empty({3, 4, 5}), r = random_tensor({3, 4, 5}, 12);
  auto relu_loss = [&] {
    relu_forward(x, y, kCpu);
    return dot(y, r);
  };
  relu_loss();
  Tensor dx = Tensor::empty({3, 4, 5});
  relu_backward(y, r, dx, kCpu);
  check_gradient("relu dx", x, dx, relu_loss, 1e-3);
  Tensor inplace = x.clone();
  relu_forward(inplace, inplace, kCpu);
  EXPECT_EQ(inplace.to_vector(), y.to_vector());

  auto sig_loss = [&] {
    sigmoid_forward(x, y, kCpu);
    return dot(y, r);
  };
  sig_loss();
  sigmoid_backward(y, r, dx, kCpu);
  check_gradient("sigmoid dx", x, dx, sig_loss);
  Tensor v = Tensor::from_vector({0.f, 2.f, -100.f, 100.f}, {4}), s = Tensor::empty({4});
  sigmoid_forward(v, s, kCpu);
  expect_near_all(s, {0.5f, 0.88079708f, 0.f, 1.f}, 1e-7, "sigmoid");
  Tensor bad = Tensor::empty({3, 4, 6});
  expect_error([&] { relu_forward(x, bad, kCpu); }, {"y [3, 4, 6]", "x [3, 4, 5]"});
}

TEST(Dropout, UniformIsTheDocumentedHash) {
  // Values of the formula in activation.h computed independently in python (integers mod 2^64).
  EXPECT_EQ(dropout_uniform(0, 0), 0.8833107948303223f);
  EXPECT_EQ(dropout_uniform(1, 2), 0.43828386068344116f);
  EXPECT_EQ(dropout_uniform(12345, 678), 0.7321202754974365f);
  EXPECT_EQ(dropout_uniform(~uint64_t{0}, uint64_t{1} << 40), 0.5151470303535461f);
}

TEST(Dropout, DeterministicKeepRateAndGradient) {
  const float p = 0.3f;
  const Shape xs = {200, 1000};
  Tensor x = random_tensor(xs, 13), y = Tensor::empty(xs), mask = Tensor::empty(xs, DType::u8);
  dropout_forward(p, 42, 1000, x, y, mask, kCpu);
  int64_t kept = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const bool k = mask.data<uint8_t>()[i] != 0;
    kept += k;
    EXPECT_EQ(y.data<float>()[i], k ? x.data<float>()[i] * (1.f / 0.7f) : 0.f);
    if (i < 1000) {
      EXPECT_EQ(k, dropout_uniform(42, 1000 + i) >= p) << i;
    }
  }
  EXPECT_NEAR(double(kept) / double(x.numel()), 0.7, 0.004);  // ~4 sigma
  // The mask of rows [100, 200) is the mask of the whole at offset + 100 * 1000.
  Tensor tail = x.narrow(100, 100), ty = Tensor::empty({100, 1000}), tm = Tensor::empty({100, 1000}, DType::u8);
  dropout_forward(p, 42, 1000 + 100 * 1000, tail, ty, tm, kCpu);
  EXPECT_EQ(0, std::memcmp(tm.raw_data(), mask.narrow(100, 100).raw_data(), 100 * 1000));
  Tensor other = Tensor::empty(xs, DType::u8);
  dropout_forward(p, 43, 1000, x, y, other, kCpu);
  EXPECT_NE(0, std::memcmp(other.raw_data(), mask.raw_data(), size_t(x.numel())));

  Tensor dy = random_tensor(xs, 14), dx = Tensor::empty(xs);
  dropout_backward(p, mask, dy, dx, kCpu);
  for (int64_t i = 0; i < 5000; ++i)
    EXPECT_EQ(dx.data<float>()[i], mask.data<uint8_t>()[i] ? dy.data<float>()[i] * (1.f / 0.7f) : 0.f);

  dropout_forward(0.f, 42, 0, x, y, mask, kCpu);
  EXPECT_EQ(y.to_vector(), x.to_vector());
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(mask.data<uint8_t>()[i], 1);
  dropout_forward(1.f, 42, 0, x, y, mask, kCpu);
  EXPECT_EQ(sum_squares(y, kCpu), 0.0);
  expect_error([&] { dropout_forward(1.5f, 1, 0, x, y, mask, kCpu); }, {"[0, 1]", "1.5"});
  Tensor fmask = Tensor::empty(xs);
  expect_error([&] { dropout_forward(0.5f, 1, 0, x, y, fmask, kCpu); }, {"mask [200, 1000]", "u8", "f32"});
}

// ---- linear ----------------------------------------------------------------------------------

TEST(Linear, MatchesTorch) {
  // F.linear(x, w, b) with x = sin(0.37 i + 0.1) [2,3], w = 0.5 sin(0.53 i + 0.2) [4,3],
  // b = [0.1, -0.2, 0.3, 0.4], then y.backward(cos(0.29 i) [2,4]) (torch 2.x, one python run).
  Tensor x = sin_tensor({2, 3}, 0.37, 0.1), w = sin_tensor({4, 3}, 0.53, 0.2, 0.5);
  Tensor b = Tensor::from_vector({0.1f, -0.2f, 0.3f, 0.4f}, {4}), y = Tensor::empty({2, 4});
  linear_forward(x, w, b, y, kCpu);
  expect_near_all(
      y, {0.61540878f, 0.12156527f, -0.22775847f, 0.098703265f, 0.96858662f, 0.75624174f, -0.6053111f, -0.52147329f},
      1e-6, "y");
  Tensor dy = sin_tensor({2, 4}, 0.29, kHalfPi), dx = Tensor::empty({2, 3});
  Tensor dw = Tensor::zeros({4, 3}), db = Tensor::full({4}, 1.f);
  linear_backward(x, w, dy, dx, dw, db, kCpu);
  expect_near_all(dx, {0.15645006f, 0.16612041f, 0.13020962f, 0.33266601f, 0.39214888f, 0.34403166f}, 1e-6, "dx");
  expect_near_all(dw,
                  {0.47346187f, 0.85220885f, 1.1156135f, 0.20840907f, 0.55447316f, 0.82549191f, -0.074048415f,
                   0.21043217f, 0.46643171f, -0.35032201f, -0.15118253f, 0.068418711f},
                  1e-6, "dw");
  expect_near_all(db, {2.3993396f, 2.0787466f, 1.66806525f, 1.20159212f}, 1e-6, "db (accumulated onto 1)");
}

TEST(Linear, GradientsAndThreads) {
  Tensor x = random_tensor({5, 7}, 21), w = random_tensor({6, 7}, 22), b = random_tensor({6}, 23);
  Tensor y = Tensor::empty({5, 6}), r = random_tensor({5, 6}, 24);
  auto loss = [&] {
    linear_forward(x, w, b, y, kCpu);
    return dot(y, r);
  };
  Tensor dx = Tensor::empty({5, 7}), dw = Tensor::zeros({6, 7}), db = Tensor::zeros({6});
  linear_backward(x, w, r, dx, dw, db, kCpu);
  check_gradient("dx", x, dx, loss);
  check_gradient("dw", w, dw, loss);
  check_gradient("db", b, db, loss);
  // The MedicalCNN head (512 -> 256, batch 32) is large enough to run in parallel.
  Tensor hx = random_tensor({32, 512}, 25), hw = random_tensor({256, 512}, 26), hb = random_tensor({256}, 27);
  Tensor hdy = random_tensor({32, 256}, 28);
  const int saved = num_threads();
  std::vector<std::vector<float>> out[2];
  for (int t : {1, 2}) {
    set_num_threads(t);
    Tensor hy = Tensor::empty({32, 256}), hdx = Tensor::empty({32, 512}), hdw = Tensor::zeros({256, 512});
    Tensor hdb = Tensor::zeros({256});
    linear_forward(hx, hw, hb, hy, kCpu);
    linear_backward(hx, hw, hdy, hdx, hdw, hdb, kCpu);
    out[t - 1] = {hy.to_vector(), hdx.to_vector(), hdw.to_vector(), hdb.to_vector()};
  }
  set_num_threads(saved);
  for (size_t k = 0; k < 4; ++k) EXPECT_TRUE(out[0][k] == out[1][k]) << "output " << k << " differs";
  Tensor bad_w = Tensor::empty({6, 8});
  expect_error([&] { linear_forward(x, bad_w, Tensor(), y, kCpu); }, {"[5, 7]", "[6, 8]"});
  Tensor bad_y = Tensor::empty({5, 5});
  expect_error([&] { linear_forward(x, w, b, bad_y, kCpu); }, {"[5, 5]", "[5, 7]", "[6, 7]"});
}

// ---- loss ------------------------------------------------------------------------------------

TEST(CrossEntropy, MatchesTorchWithWeightsAndSmoothing) {
  // F.cross_entropy(z, [0, 2, 1, 2], weight=[0.5, 1, 2], label_smoothing=0.1) with
  // z = 2 sin(0.37 i + 0.1) [4,3], and its gradient; plus the plain loss (torch 2.x, one run).
  Tensor z = sin_tensor({4, 3}, 0.37, 0.1, 2.0), labels = Tensor::from_labels({0, 2, 1, 2});
  Tensor w = Tensor::from_vector({0.5f, 1.f, 2.f}, {3}), dz = Tensor::empty({4, 3}), probs = Tensor::empty({4, 3});
  const float l = softmax_cross_entropy(z, labels, w, 0.1f, dz, probs, kCpu);
  EXPECT_NEAR(l, 1.4079467f, 1e-6);
  expect_near_all(dz,
                  {-0.069372632f, 0.025294792f, 0.044077847f, 0.10851678f, 0.12080522f, -0.22932197f, 0.098226584f,
                   -0.11366086f, 0.015434286f, 0.18656749f, 0.092437811f, -0.27900532f},
                  1e-6, "dlogits");
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(probs.data<float>()[3 * i] + probs.data<float>()[3 * i + 1] + probs.data<float>()[3 * i + 2], 1.f,
                1e-6);
  Tensor none;
  EXPECT_NEAR(softmax_cross_entropy(z, labels, none, 0.f, none, none, kCpu), 1.4986343f, 1e-6);
}

TEST(CrossEntropy, GradientAndStability) {
  Tensor z = random_tensor({6, 5}, 31, -3.f, 3.f), labels = Tensor::from_labels({0, 4, 2, 2, 1, 3});
  Tensor w = random_tensor({5}, 32, 0.2f, 2.f), none, dz = Tensor::empty({6, 5});
  auto loss = [&] { return double(softmax_cross_entropy(z, labels, w, 0.2f, none, none, kCpu)); };
  softmax_cross_entropy(z, labels, w, 0.2f, dz, none, kCpu);
  check_gradient("dlogits", z, dz, loss, 1e-2, 1e-2);
  // Huge logits: losses 1000 and 1003 (up to e^-1000), no overflow in the softmax.
  Tensor big = Tensor::from_vector({1000.f, 0.f, -1000.f, 3.f}, {2, 2}), dbig = Tensor::empty({2, 2});
  EXPECT_NEAR(softmax_cross_entropy(big, Tensor::from_labels({1, 0}), none, 0.f, dbig, none, kCpu), 1001.5, 1e-3);
  expect_near_all(dbig, {0.5f, -0.5f, -0.5f, 0.5f}, 1e-6, "dlogits of saturated rows");
}

TEST(CrossEntropy, Errors) {
  Tensor z = Tensor::zeros({3, 4}), none;
  expect_error(
      [&] {
        softmax_cross_entropy(z, Tensor::from_labels({0, 4, 1}), none, 0.f, none, none, kCpu);
      },
      {"label 4", "sample 1", "4 classes"});
  expect_error(
      [&] {
        softmax_cross_entropy(z, Tensor::from_labels({0, -1, 1}), none, 0.f, none, none, kCpu);
      },
      {"label -1", "sample 1"});
  expect_error(
      [&] {
        softmax_cross_entropy(z, Tensor::from_labels({0, 1}), none, 0.f, none, none, kCpu);
      },
      {"labels [2]", "[3, 4]"});
  Tensor w = Tensor::zeros({3});
  expect_error(
      [&] {
        softmax_cross_entropy(z, Tensor::from_labels({0, 1, 2}), w, 0.f, none, none, kCpu);
      },
      {"weights [3]", "[3, 4]"});
}

// ---- optimizers ------------------------------------------------------------------------------

// Three steps on p = sin(0.37 i + 0.1) [5] with gradients cos(0.7 i + t), t = 0, 1, 2.
template <typename Step>
std::vector<float> three_steps(Step&& step) {
  Tensor p = sin_tensor({5}, 0.37, 0.1);
  for (int t = 0; t < 3; ++t) step(p, sin_tensor({5}, 0.7, t + kHalfPi), t);
  return p.to_vector();
}

void expect_vec_near(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-6) << what << "[" << i << "]";
}

TEST(Optim, SgdMatchesTorch) {
  // torch.optim.SGD on the three_steps() problem (torch 2.x, one python run):
  //   lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01 | same with nesterov, dampening 0 | lr=0.1 only.
  auto sgd = [](SgdParams sp) {
    Tensor buf = Tensor::zeros({5});
    return three_steps([&](Tensor& p, const Tensor& g, int t) { sgd_step(sp, t == 0, p, g, buf, kCpu); });
  };
  SgdParams a;
  a.lr = 0.1f, a.momentum = 0.9f, a.dampening = 0.1f, a.weight_decay = 0.01f;
  expect_vec_near(sgd(a), {-0.22625008f, 0.34685659f, 0.9077282f, 1.2897885f, 1.3769788f}, "sgd");
  SgdParams n = a;
  n.dampening = 0.f, n.nesterov = true;
  expect_vec_near(sgd(n), {-0.31099862f, 0.39364922f, 1.0636421f, 1.4808166f, 1.5124253f}, "nesterov");
  SgdParams plain;
  plain.lr = 0.1f, plain.momentum = 0.f;
  Tensor none;
  expect_vec_near(three_steps([&](Tensor& p, const Tensor& g, int t) { sgd_step(plain, t == 0, p, g, none, kCpu); }),
                  {-0.012582131f, 0.47969371f, 0.89806551f, 1.1434965f, 1.1645268f}, "plain");
}

TEST(Optim, AdamAndAdamWMatchTorch) {
  // torch.optim.Adam(lr=0.01, weight_decay=0.1) and AdamW(lr=0.01, weight_decay=0.1) on the
  // three_steps() problem (torch 2.x, one python run).
  auto adam = [](bool decoupled) {
    AdamParams ap;
    ap.lr = 0.01f, ap.weight_decay = 0.1f, ap.decoupled = decoupled;
    Tensor m = Tensor::zeros({5}), v = Tensor::zeros({5});
    return three_steps([&](Tensor& p, const Tensor& g, int t) { adam_step(ap, t + 1, p, g, m, v, kCpu); });
  };
  expect_vec_near(adam(false), {0.075651996f, 0.43850669f, 0.74656159f, 0.96458566f, 1.0262997f}, "adam");
  expect_vec_near(adam(true), {0.075481892f, 0.43833253f, 0.74594152f, 0.9620086f, 1.0240406f}, "adamw");
}

TEST(Optim, Errors) {
  Tensor p = Tensor::zeros({4}), g = Tensor::zeros({5}), buf = Tensor::zeros({4});
  expect_error([&] { sgd_step({}, true, p, g, buf, kCpu); }, {"grad [5]", "param [4]"});
  Tensor m = Tensor::zeros({4}), v = Tensor::zeros({3}), g4 = Tensor::zeros({4});
  expect_error([&] { adam_step({}, 1, p, g4, m, v, kCpu); }, {"exp_avg_sq [3]", "param [4]"});
  expect_error([&] { adam_step({}, 0, p, g4, m, m, kCpu); }, {"step"});
}

// ---- threads ---------------------------------------------------------------------------------

TEST(Misc, ElementwiseIdenticalOnOneAndTwoThreads) {
  const Shape xs = {16, 64, 32, 32};
  Tensor x = random_tensor(xs, 41), g = random_tensor({16, 64}, 42);
  const int saved = num_threads();
  std::vector<std::vector<float>> out[2];
  double ss[2];
  for (int t : {1, 2}) {
    set_num_threads(t);
    Tensor y = Tensor::empty(xs), mask = Tensor::empty(xs, DType::u8), s = Tensor::empty(xs);
    Tensor dx = Tensor::empty(xs), dg = Tensor::empty({16, 64});
    dropout_forward(0.5f, 7, 3, x, y, mask, kCpu);
    sigmoid_forward(x, s, kCpu);
    channel_scale_backward(x, g, s, dx, dg, kCpu);
    ss[t - 1] = sum_squares(x, kCpu);
    out[t - 1] = {y.to_vector(), s.to_vector(), dx.to_vector(), dg.to_vector()};
  }
  set_num_threads(saved);
  EXPECT_EQ(ss[0], ss[1]);
  for (size_t k = 0; k < out[0].size(); ++k) EXPECT_TRUE(out[0][k] == out[1][k]) << "output " << k << " differs";
}

}  // namespace
}  // namespace lancet
