// Tests for kernels/fused (CPU twins): every fused op equals its unfused composition BIT FOR
// BIT (every element compared with memcmp semantics), on shapes with N = 1, odd H/W and channel
// counts that are not multiples of 8; and the argument errors name the op and the shapes.
#include <gtest/gtest.h>

#include "kernels/activation.h"
#include "kernels/batchnorm.h"
#include "kernels/elementwise.h"
#include "kernels/fused.h"
#include "tests/gradcheck.h"
#include "tests/kernel_test_util.h"

namespace lancet {
namespace {

using testing::BnParams;
using testing::expect_error;
using testing::expect_same_bits;
using testing::random_tensor;

const Stream kCpu = Stream::cpu();

const std::vector<Shape> kShapes = {{2, 3, 4, 5}, {1, 5, 7, 9}, {3, 13, 1, 1}, {1, 13, 33, 17}, {4, 8, 16, 16}};

std::string name_of(const Shape& s) { return shape_str(s); }

TEST(FusedBatchNormRelu, ForwardTrainEqualsBatchNormThenRelu) {
  for (const Shape& xs : kShapes)
    for (bool affine : {true, false})
      for (bool update : {true, false}) {
        SCOPED_TRACE(name_of(xs) + (affine ? " affine" : " plain") + (update ? " update" : ""));
        const int64_t C = xs[1];
        Tensor x = random_tensor(xs, 1, -2.f, 2.f);
        BnParams a(C, affine), b(C, affine);
        Tensor y0 = Tensor::empty(xs), m0 = Tensor::empty({C}), v0 = Tensor::empty({C});
        batchnorm2d_forward_train({}, x, a.gamma, a.beta, a.rm, a.rv, update, y0, m0, v0, kCpu);
        relu_forward(y0, y0, kCpu);
        Tensor y1 = Tensor::empty(xs), m1 = Tensor::empty({C}), v1 = Tensor::empty({C});
        batchnorm_relu_forward_train({}, x, b.gamma, b.beta, b.rm, b.rv, update, y1, m1, v1, kCpu);
        expect_same_bits(y0, y1, "y");
        expect_same_bits(m0, m1, "saved_mean");
        expect_same_bits(v0, v1, "saved_invstd");
        expect_same_bits(a.rm, b.rm, "running_mean");
        expect_same_bits(a.rv, b.rv, "running_var");
      }
}

TEST(FusedBatchNormRelu, ForwardEvalEqualsBatchNormThenRelu) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(name_of(xs));
    const int64_t C = xs[1];
    Tensor x = random_tensor(xs, 2, -2.f, 2.f);
    BnParams p(C, true);
    Tensor y0 = Tensor::empty(xs), m0 = Tensor::empty({C}), v0 = Tensor::empty({C});
    batchnorm2d_forward_eval({}, x, p.gamma, p.beta, p.rm, p.rv, y0, m0, v0, kCpu);
    relu_forward(y0, y0, kCpu);
    Tensor y1 = Tensor::empty(xs), m1 = Tensor::empty({C}), v1 = Tensor::empty({C});
    batchnorm_relu_forward_eval({}, x, p.gamma, p.beta, p.rm, p.rv, y1, m1, v1, kCpu);
    expect_same_bits(y0, y1, "y");
    expect_same_bits(m0, m1, "saved_mean");
    expect_same_bits(v0, v1, "saved_invstd");
  }
}

TEST(FusedBatchNormRelu, BackwardEqualsReluBackwardThenBatchNormBackward) {
  for (const Shape& xs : kShapes)
    for (bool batch_stats : {true, false})
      for (bool with_dx : {true, false}) {
        SCOPED_TRACE(name_of(xs) + (batch_stats ? " train" : " eval") + (with_dx ? " dx" : " no dx"));
        const int64_t C = xs[1];
        Tensor x = random_tensor(xs, 3, -2.f, 2.f), dy = random_tensor(xs, 4);
        BnParams p(C, true);
        Tensor y = Tensor::empty(xs), mean = Tensor::empty({C}), invstd = Tensor::empty({C});
        batchnorm_relu_forward_train({}, x, p.gamma, p.beta, p.rm, p.rv, false, y, mean, invstd, kCpu);
        // Unfused: the masked gradient, then the BatchNorm backward; parameter gradients
        // accumulate onto the same non-zero start on both sides.
        Tensor t = Tensor::empty(xs);
        relu_backward(y, dy, t, kCpu);
        Tensor dx0 = with_dx ? Tensor::empty(xs) : Tensor();
        Tensor dg0 = random_tensor({C}, 5), db0 = random_tensor({C}, 6);
        batchnorm2d_backward(batch_stats, x, t, p.gamma, mean, invstd, dx0, dg0, db0, kCpu);
        Tensor dx1 = with_dx ? Tensor::empty(xs) : Tensor();
        Tensor dg1 = random_tensor({C}, 5), db1 = random_tensor({C}, 6);
        batchnorm_relu_backward(batch_stats, x, y, dy, p.gamma, mean, invstd, dx1, dg1, db1, kCpu);
        if (with_dx) expect_same_bits(dx0, dx1, "dx");
        expect_same_bits(dg0, dg1, "dgamma");
        expect_same_bits(db0, db1, "dbeta");
      }
}

TEST(FusedBatchNormRelu, BackwardWithoutParameterGradients) {
  const Shape xs = {2, 5, 3, 7};
  Tensor x = random_tensor(xs, 11, -2.f, 2.f), dy = random_tensor(xs, 12);
  BnParams p(5, false);
  Tensor y = Tensor::empty(xs), mean = Tensor::empty({5}), invstd = Tensor::empty({5});
  batchnorm_relu_forward_train({}, x, p.gamma, p.beta, p.rm, p.rv, false, y, mean, invstd, kCpu);
  Tensor t = Tensor::empty(xs), dx0 = Tensor::empty(xs), dx1 = Tensor::empty(xs), none;
  relu_backward(y, dy, t, kCpu);
  batchnorm2d_backward(true, x, t, p.gamma, mean, invstd, dx0, none, none, kCpu);
  batchnorm_relu_backward(true, x, y, dy, p.gamma, mean, invstd, dx1, none, none, kCpu);
  expect_same_bits(dx0, dx1, "dx");
}

// The SE gate lies in (0, 1) (a sigmoid); the shortcut has either sign so ReLU cuts.
struct Se {
  Tensor x, g, shortcut;
  explicit Se(const Shape& xs, uint32_t seed)
      : x(random_tensor(xs, seed, -2.f, 2.f)),
        g(random_tensor({xs[0], xs[1]}, seed + 1, 0.01f, 0.99f)),
        shortcut(random_tensor(xs, seed + 2, -1.f, 1.f)) {}
};

TEST(FusedSeResidualRelu, ForwardEqualsChannelScaleAddRelu) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(name_of(xs));
    Se se(xs, 20);
    Tensor y0 = Tensor::empty(xs);
    channel_scale_forward(se.x, se.g, y0, kCpu);
    add(y0, se.shortcut, y0, kCpu);
    relu_forward(y0, y0, kCpu);
    Tensor y1 = Tensor::empty(xs);
    se_scale_residual_relu_forward(se.x, se.g, se.shortcut, y1, kCpu);
    expect_same_bits(y0, y1, "y");
  }
}

TEST(FusedSeResidualRelu, BackwardEqualsReluBackwardThenChannelScaleBackward) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(name_of(xs));
    Se se(xs, 30);
    Tensor y = Tensor::empty(xs), dy = random_tensor(xs, 33);
    se_scale_residual_relu_forward(se.x, se.g, se.shortcut, y, kCpu);
    Tensor t = Tensor::empty(xs), dx0 = Tensor::empty(xs), dg0 = Tensor::empty(se.g.shape());
    relu_backward(y, dy, t, kCpu);
    channel_scale_backward(se.x, se.g, t, dx0, dg0, kCpu);
    // Outputs start as garbage: all three are overwritten.
    Tensor dx1 = Tensor::full(xs, 7.f), dg1 = Tensor::full(se.g.shape(), 7.f), ds1 = Tensor::full(xs, 7.f);
    se_scale_residual_relu_backward(se.x, se.g, y, dy, dx1, dg1, ds1, kCpu);
    expect_same_bits(t, ds1, "dshortcut");
    expect_same_bits(dx0, dx1, "dx");
    expect_same_bits(dg0, dg1, "dg");
    // Each output may be left out; the others do not change.
    Tensor none, dx2 = Tensor::empty(xs), dg2 = Tensor::empty(se.g.shape()), ds2 = Tensor::empty(xs);
    se_scale_residual_relu_backward(se.x, se.g, y, dy, none, dg2, none, kCpu);
    expect_same_bits(dg0, dg2, "dg alone");
    se_scale_residual_relu_backward(se.x, se.g, y, dy, dx2, none, none, kCpu);
    expect_same_bits(dx0, dx2, "dx alone");
    se_scale_residual_relu_backward(se.x, se.g, y, dy, none, none, ds2, kCpu);
    expect_same_bits(t, ds2, "dshortcut alone");
  }
}

TEST(FusedOps, ErrorsNameTheOpAndShapes) {
  const Shape xs = {2, 3, 4, 4};
  Tensor x = Tensor::zeros(xs), y = Tensor::empty(xs), c3 = Tensor::zeros({3}), c4 = Tensor::zeros({4});
  Tensor m = Tensor::empty({3}), v = Tensor::empty({3}), none;
  expect_error([&] { batchnorm_relu_forward_train({}, x, c4, c3, c3, c3, true, y, m, v, kCpu); },
               {"batchnorm_relu_forward_train", "gamma [4]", "[2, 3, 4, 4]"});
  expect_error([&] { batchnorm_relu_forward_train({}, x, c3, c3, c3, c3, true, x, m, v, kCpu); },
               {"batchnorm_relu_forward_train", "must not alias"});
  Tensor one = Tensor::zeros({1, 3, 1, 1}), y1 = Tensor::empty({1, 3, 1, 1});
  expect_error([&] { batchnorm_relu_forward_train({}, one, c3, c3, c3, c3, true, y1, m, v, kCpu); },
               {"more than 1 value per channel", "[1, 3, 1, 1]"});
  Tensor bad_y = Tensor::empty({2, 3, 4, 5});
  expect_error([&] { batchnorm_relu_forward_eval({}, x, c3, c3, c3, c3, bad_y, m, v, kCpu); },
               {"batchnorm_relu_forward_eval", "[2, 3, 4, 5]", "[2, 3, 4, 4]"});
  Tensor dx = Tensor::empty(xs), bad_dy = Tensor::zeros({2, 3, 2, 2});
  expect_error([&] { batchnorm_relu_backward(true, x, y, bad_dy, c3, m, v, dx, none, none, kCpu); },
               {"batchnorm_relu_backward", "dy [2, 3, 2, 2]", "[2, 3, 4, 4]"});
  expect_error([&] { batchnorm_relu_backward(true, x, none, x, c3, m, v, dx, none, none, kCpu); },
               {"batchnorm_relu_backward", "y is an undefined tensor"});

  Tensor g = Tensor::zeros({2, 3}), bad_g = Tensor::zeros({3, 2}), sc = Tensor::zeros(xs);
  expect_error([&] { se_scale_residual_relu_forward(x, bad_g, sc, y, kCpu); },
               {"se_scale_residual_relu_forward", "g [3, 2]", "[2, 3, 4, 4]"});
  expect_error([&] { se_scale_residual_relu_forward(x, g, sc, sc, kCpu); },
               {"se_scale_residual_relu_forward", "must not alias shortcut"});
  expect_error([&] { se_scale_residual_relu_forward(x, g, Tensor::zeros({2, 3, 4, 5}), y, kCpu); },
               {"shortcut [2, 3, 4, 5]", "[2, 3, 4, 4]"});
  Tensor dg = Tensor::empty({2, 3}), bad_dg = Tensor::empty({2, 4});
  expect_error([&] { se_scale_residual_relu_backward(x, g, y, y, dx, bad_dg, none, kCpu); },
               {"se_scale_residual_relu_backward", "dg [2, 4]", "g [2, 3]"});
  expect_error([&] { se_scale_residual_relu_backward(x, g, y, Tensor::zeros({1, 3, 4, 4}), dx, dg, none, kCpu); },
               {"dy [1, 3, 4, 4]", "[2, 3, 4, 4]"});
  Tensor dy = Tensor::zeros(xs);
  expect_error([&] { se_scale_residual_relu_backward(x, g, y, dy, dy, dg, none, kCpu); },
               {"se_scale_residual_relu_backward", "dx", "must not alias"});
}

}  // namespace
}  // namespace lancet
