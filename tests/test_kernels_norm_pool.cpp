// Tests for kernels/batchnorm and kernels/pool: PyTorch values, finite-difference gradients,
// the accumulate contract, thread-count independence and error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "kernels/batchnorm.h"
#include "kernels/parallel.h"
#include "kernels/pool.h"
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

// One BatchNorm2d's tensors, with saved statistics.
struct Bn {
  Tensor x, gamma, beta, rm, rv, y, mean, invstd;
  Bn(const Shape& xs, Tensor x_in) : x(std::move(x_in)) {
    const int64_t C = xs[1];
    gamma = random_tensor({C}, 7, 0.5f, 1.5f);
    beta = random_tensor({C}, 8);
    rm = random_tensor({C}, 9, -0.5f, 0.5f);
    rv = random_tensor({C}, 10, 0.5f, 2.f);
    y = Tensor::empty(xs), mean = Tensor::empty({C}), invstd = Tensor::empty({C});
  }
  void train() { batchnorm2d_forward_train({}, x, gamma, beta, rm, rv, false, y, mean, invstd, kCpu); }
  void eval() { batchnorm2d_forward_eval({}, x, gamma, beta, rm, rv, y, mean, invstd, kCpu); }
};

TEST(BatchNorm2d, TrainingMatchesTorch) {
  // torch.nn.functional.batch_norm(x, rm=0, rv=1, gamma=[1, .5, -1.5], beta=[.1, .2, .3],
  // training=True, momentum=0.1, eps=1e-5) with x = 2 sin(0.37 i + 0.1) + 0.5 [2,3,2,2], then
  // y.backward(cos(0.29 i)) (torch 2.x, one python run).
  Tensor x = sin_tensor({2, 3, 2, 2}, 0.37, 0.1, 2.0, 0.5);
  Tensor gamma = Tensor::from_vector({1.f, 0.5f, -1.5f}, {3}), beta = Tensor::from_vector({0.1f, 0.2f, 0.3f}, {3});
  Tensor rm = Tensor::zeros({3}), rv = Tensor::full({3}, 1.f);
  Tensor y = Tensor::empty({2, 3, 2, 2}), mean = Tensor::empty({3}), invstd = Tensor::empty({3});
  batchnorm2d_forward_train({}, x, gamma, beta, rm, rv, true, y, mean, invstd, kCpu);
  expect_near_all(
      y, {0.42890188f,  0.90133953f,  1.2917539f,  1.5473043f,  0.79990494f, 0.71134531f, 0.46595529f,  0.096947365f,
          0.63631713f,  1.4124129f,   2.1068633f,  2.6256776f,  -1.0230057f, -1.0167975f, -0.83300185f, -0.49649435f,
          -0.77190596f, -0.31441459f, 0.12507817f, 0.48708913f, -1.1802276f, -1.3114513f, -1.155658f,   -0.73393399f},
      1e-5, "y");
  expect_near_all(rm, {0.020808985f, 0.15380321f, 0.098015025f}, 1e-6, "running_mean");
  expect_near_all(rv, {1.1552939f, 0.97345221f, 1.1286613f}, 1e-6, "running_var (unbiased)");

  Tensor dy = sin_tensor({2, 3, 2, 2}, 0.29, kHalfPi);  // cos(0.29 i)
  Tensor dx = Tensor::empty({2, 3, 2, 2}), dg = Tensor::full({3}, 1.f), db = Tensor::full({3}, 1.f);
  batchnorm2d_backward(true, x, dy, gamma, mean, invstd, dx, dg, db, kCpu);
  expect_near_all(dx, {0.44973195f,  0.19390689f,   -0.075895861f, -0.32738316f,   0.070823565f,  -0.091195807f,
                       -0.23844466f, -0.36033285f,  0.54943436f,   0.2583054f,     -0.058349825f, -0.35168457f,
                       -0.15012263f, -0.063247249f, -0.016832029f, -0.010157989f,  -0.012404094f, 0.10595832f,
                       0.21549121f,  0.31010434f,   0.018707829f,  -0.0012975547f, -0.1130181f,   -0.30209783f},
                  1e-5, "dx");
  expect_near_all(dg, {1 + 5.7675376f, 1 + 0.86071086f, 1 + 7.0426145f}, 1e-5, "dgamma (accumulated onto 1)");
  expect_near_all(db, {1 + 0.72568822f, 1 + 1.2535628f, 1 + 0.27550602f}, 1e-5, "dbeta (accumulated onto 1)");
}

TEST(BatchNorm2d, EvalUsesRunningStatistics) {
  Bn bn({2, 3, 2, 2}, random_tensor({2, 3, 2, 2}, 1));
  bn.eval();
  const float* x = bn.x.data<float>();
  for (int64_t i = 0; i < bn.x.numel(); ++i) {
    const int64_t c = (i / 4) % 3;
    const double expect =
        (x[i] - bn.rm.data<float>()[c]) / std::sqrt(bn.rv.data<float>()[c] + 1e-5) * bn.gamma.data<float>()[c] +
        bn.beta.data<float>()[c];
    EXPECT_NEAR(bn.y.data<float>()[i], expect, 1e-5) << i;
  }
  EXPECT_EQ(bn.mean.to_vector(), bn.rm.to_vector());
}

TEST(BatchNorm2d, TrainingGradientsMatchFiniteDifferences) {
  const Shape xs = {3, 4, 3, 3};
  Bn bn(xs, random_tensor(xs, 2, -2.f, 2.f));
  Tensor r = random_tensor(xs, 3);
  auto loss = [&] {
    bn.train();
    return dot(bn.y, r);
  };
  loss();
  Tensor dx = Tensor::empty(xs), dg = Tensor::zeros({4}), db = Tensor::zeros({4});
  batchnorm2d_backward(true, bn.x, r, bn.gamma, bn.mean, bn.invstd, dx, dg, db, kCpu);
  check_gradient("dx", bn.x, dx, loss, 1e-2, 1e-2);
  check_gradient("dgamma", bn.gamma, dg, loss);
  check_gradient("dbeta", bn.beta, db, loss);
}

TEST(BatchNorm2d, EvalGradientsMatchFiniteDifferences) {
  const Shape xs = {2, 3, 3, 3};
  Bn bn(xs, random_tensor(xs, 4, -2.f, 2.f));
  Tensor r = random_tensor(xs, 5);
  auto loss = [&] {
    bn.eval();
    return dot(bn.y, r);
  };
  loss();
  Tensor dx = Tensor::empty(xs), dg = Tensor::zeros({3}), db = Tensor::zeros({3});
  batchnorm2d_backward(false, bn.x, r, bn.gamma, bn.mean, bn.invstd, dx, dg, db, kCpu);
  check_gradient("dx", bn.x, dx, loss);
  check_gradient("dgamma", bn.gamma, dg, loss);
  check_gradient("dbeta", bn.beta, db, loss);
}

TEST(BatchNorm2d, ErrorsNameBothShapes) {
  Tensor x = Tensor::zeros({2, 3, 4, 4}), y = Tensor::empty({2, 3, 4, 4}), c3 = Tensor::zeros({3});
  Tensor c4 = Tensor::zeros({4}), m = Tensor::empty({3}), v = Tensor::empty({3});
  expect_error([&] { batchnorm2d_forward_train({}, x, c4, c3, c3, c3, true, y, m, v, kCpu); },
               {"gamma [4]", "[2, 3, 4, 4]"});
  Tensor bad_y = Tensor::empty({2, 3, 4, 5});
  expect_error([&] { batchnorm2d_forward_eval({}, x, c3, c3, c3, c3, bad_y, m, v, kCpu); },
               {"[2, 3, 4, 5]", "[2, 3, 4, 4]"});
  Tensor one = Tensor::zeros({1, 3, 1, 1}), y1 = Tensor::empty({1, 3, 1, 1});
  expect_error([&] { batchnorm2d_forward_train({}, one, c3, c3, c3, c3, true, y1, m, v, kCpu); },
               {"more than 1 value per channel", "[1, 3, 1, 1]"});
  Tensor dx = Tensor::empty({2, 3, 4, 4}), none, bad_dy = Tensor::zeros({2, 3, 2, 2});
  expect_error([&] { batchnorm2d_backward(true, x, bad_dy, c3, m, v, dx, none, none, kCpu); },
               {"dy [2, 3, 2, 2]", "[2, 3, 4, 4]"});
}

TEST(MaxPool2d, MatchesTorch) {
  // torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True) with x = sin(0.37 i + 0.1)
  // [1,1,5,5] (torch 2.x, one python run).
  Tensor x = sin_tensor({1, 1, 5, 5}, 0.37, 0.1);
  const MaxPool2dParams p;
  ASSERT_EQ(maxpool2d_output_shape(p, x.shape()), (Shape{1, 1, 3, 3}));
  Tensor y = Tensor::empty({1, 1, 3, 3}), idx = Tensor::empty({1, 1, 3, 3}, DType::i32);
  maxpool2d_forward(p, x, y, idx, kCpu);
  expect_near_all(y,
                  {0.92895973f, 0.93561602f, 0.99995762f, 0.92895973f, 0.73223144f, 0.74917436f, 0.99987173f,
                   0.99987173f, 0.74917436f},
                  1e-6, "y");
  const std::vector<int32_t> expected_idx = {5, 3, 4, 5, 6, 19, 21, 21, 19};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(idx.data<int32_t>()[i], expected_idx[i]) << i;
}

TEST(MaxPool2d, FirstMaximumWinsAndPaddingIsMinusInfinity) {
  const MaxPool2dParams p;
  Tensor y = Tensor::empty({1, 1, 2, 2}), idx = Tensor::empty({1, 1, 2, 2}, DType::i32);
  Tensor flat = Tensor::full({1, 1, 4, 4}, 0.25f);  // every window is a tie
  maxpool2d_forward(p, flat, y, idx, kCpu);
  // Windows start at (-1,-1), (-1,1), (1,-1), (1,1): the first in-bounds element wins.
  const std::vector<int32_t> first = {0, 1, 4, 5};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(idx.data<int32_t>()[i], first[i]) << i;
  Tensor neg = sin_tensor({1, 1, 4, 4}, 0.1, 0.0, 1.0, -5.0);  // all negative: padding must not win
  maxpool2d_forward(p, neg, y, idx, kCpu);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y.data<float>()[i], neg.data<float>()[idx.data<int32_t>()[i]]);
  for (int i = 0; i < 4; ++i) EXPECT_LT(y.data<float>()[i], -3.f);
}

TEST(MaxPool2d, GradientMatchesFiniteDifferences) {
  for (const MaxPool2dParams& p : {MaxPool2dParams{3, 2, 1}, MaxPool2dParams{2, 2, 0}, MaxPool2dParams{3, 1, 1}}) {
    const Shape xs = {2, 3, 7, 6};
    Tensor x = random_tensor(xs, 11);
    const Shape ys = maxpool2d_output_shape(p, xs);
    Tensor y = Tensor::empty(ys), idx = Tensor::empty(ys, DType::i32), r = random_tensor(ys, 12);
    auto loss = [&] {
      maxpool2d_forward(p, x, y, idx, kCpu);
      return dot(y, r);
    };
    loss();
    Tensor dx = Tensor::full(xs, 3.f);  // overwritten
    maxpool2d_backward(p, r, idx, dx, kCpu);
    check_gradient("maxpool dx k" + std::to_string(p.kernel), x, dx, loss, 1e-3, 1e-2, 128);
  }
}

TEST(MaxPool2d, ErrorsNameBothShapes) {
  const MaxPool2dParams p;
  Tensor x = Tensor::zeros({1, 2, 5, 5}), y = Tensor::empty({1, 2, 2, 2}),
         idx = Tensor::empty({1, 2, 3, 3}, DType::i32);
  expect_error([&] { maxpool2d_forward(p, x, y, idx, kCpu); }, {"[1, 2, 2, 2]", "[1, 2, 5, 5]", "[1, 2, 3, 3]"});
  Tensor y3 = Tensor::empty({1, 2, 3, 3}), idx_f = Tensor::empty({1, 2, 3, 3});
  expect_error([&] { maxpool2d_forward(p, x, y3, idx_f, kCpu); }, {"argmax [1, 2, 3, 3]", "i32", "f32"});
  expect_error([] { maxpool2d_output_shape({3, 2, 2}, {1, 1, 4, 4}); }, {"padding"});
}

TEST(GlobalAvgPool, ForwardAndGradient) {
  const Shape xs = {2, 3, 4, 5};
  Tensor x = random_tensor(xs, 21), y = Tensor::empty({2, 3});
  global_avgpool_forward(x, y, kCpu);
  for (int pl = 0; pl < 6; ++pl) {
    double s = 0;
    for (int i = 0; i < 20; ++i) s += x.data<float>()[pl * 20 + i];
    EXPECT_NEAR(y.data<float>()[pl], s / 20, 1e-6);
  }
  Tensor r = random_tensor({2, 3}, 22);
  auto loss = [&] {
    global_avgpool_forward(x, y, kCpu);
    return dot(y, r);
  };
  Tensor dx = Tensor::empty(xs);
  global_avgpool_backward(r, dx, kCpu);
  check_gradient("avgpool dx", x, dx, loss);
  Tensor bad = Tensor::empty({2, 4});
  expect_error([&] { global_avgpool_forward(x, bad, kCpu); }, {"[2, 4]", "[2, 3, 4, 5]"});
}

TEST(NormPool, IdenticalOnOneAndTwoThreads) {
  const Shape xs = {8, 64, 16, 16};
  Tensor x = random_tensor(xs, 31, -2.f, 3.f), dy = random_tensor(xs, 32);
  const MaxPool2dParams mp;
  const Shape ps = maxpool2d_output_shape(mp, xs);
  Tensor pdy = random_tensor(ps, 33);
  const int saved = num_threads();
  std::vector<std::vector<float>> out[2];
  for (int t : {1, 2}) {
    set_num_threads(t);
    Bn bn(xs, x);
    batchnorm2d_forward_train({}, bn.x, bn.gamma, bn.beta, bn.rm, bn.rv, true, bn.y, bn.mean, bn.invstd, kCpu);
    Tensor dx = Tensor::empty(xs), dg = Tensor::zeros({64}), db = Tensor::zeros({64});
    batchnorm2d_backward(true, x, dy, bn.gamma, bn.mean, bn.invstd, dx, dg, db, kCpu);
    Tensor py = Tensor::empty(ps), idx = Tensor::empty(ps, DType::i32), pdx = Tensor::empty(xs),
           avg = Tensor::empty({8, 64});
    maxpool2d_forward(mp, x, py, idx, kCpu);
    maxpool2d_backward(mp, pdy, idx, pdx, kCpu);
    global_avgpool_forward(x, avg, kCpu);
    out[t - 1] = {bn.y.to_vector(), bn.rm.to_vector(), bn.rv.to_vector(), dx.to_vector(), dg.to_vector(),
                  db.to_vector(),   py.to_vector(),    pdx.to_vector(),   avg.to_vector()};
  }
  set_num_threads(saved);
  for (size_t k = 0; k < out[0].size(); ++k) EXPECT_TRUE(out[0][k] == out[1][k]) << "output " << k << " differs";
}

}  // namespace
}  // namespace lancet
