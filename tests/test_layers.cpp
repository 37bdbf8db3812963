// Layers: gradient checks (input and every parameter, train and eval), initialisation, the
// Module contract (accumulating parameter gradients, need_input_grad, saved contexts,
// state_dict order) and the layers' own behaviour (BatchNorm running statistics, dropout masks).
#include <gtest/gtest.h>

#include <cmath>

#include "layers/layers.h"
#include "tests/module_gradcheck.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kCpu = Stream::cpu();

// Checks m in train mode and then in eval mode.
void check_both_modes(Module& m, const Shape& x_shape, const std::string& what, ModuleCheckOptions o = {}) {
  m.train();
  check_module_gradients(m, x_shape, what, o);
  m.eval();
  check_module_gradients(m, x_shape, what, o);
}

std::vector<std::string> names(const std::vector<std::pair<std::string, Tensor*>>& v) {
  std::vector<std::string> out;
  for (auto& e : v) out.push_back(e.first);
  return out;
}

}  // namespace

// ---- gradient checks ------------------------------------------------------------------------

TEST(Conv2dLayer, GradientCheck) {
  std::mt19937_64 rng(1);
  Conv2d plain(rng, 3, 4, 3, 1, 1, 1, 1, true);
  check_both_modes(plain, {2, 3, 6, 7}, "conv 3x3");
  Conv2d strided(rng, 4, 6, 3, 2, 1, 1, 1, false);
  check_both_modes(strided, {2, 4, 7, 9}, "conv 3x3 s2");
  Conv2d dilated(rng, 4, 3, 3, 1, 2, 2, 1, false);
  check_both_modes(dilated, {1, 4, 7, 6}, "conv 3x3 d2");
  Conv2d pointwise(rng, 4, 5, 1, 2, 0, 1, 1, true);
  check_both_modes(pointwise, {2, 4, 5, 5}, "conv 1x1 s2");
  Conv2d grouped(rng, 4, 6, 3, 1, 1, 1, 2, true);
  check_both_modes(grouped, {2, 4, 5, 5}, "conv groups 2");
  Conv2d stem(rng, 3, 4, 7, 2, 3, 1, 1, false);
  check_both_modes(stem, {2, 3, 11, 9}, "conv 7x7 s2");
}

TEST(BatchNorm2dLayer, GradientCheck) {
  BatchNorm2d bn(3);
  randomize_batchnorms(bn, 7);
  check_both_modes(bn, {2, 3, 4, 5}, "batchnorm");
  check_both_modes(bn, {4, 3, 1, 1}, "batchnorm 1x1");
}

// BatchNorm2d with the ReLU folded in gives exactly BatchNorm2d followed by ReLU: outputs,
// input gradients, parameter gradients and running statistics, in both modes.
TEST(BatchNorm2dLayer, FusedReluIsBatchNormThenReluBitForBit) {
  for (const bool training : {true, false}) {
    SCOPED_TRACE(training ? "train" : "eval");
    Sequential plain;
    auto& bn_plain = plain.emplace<BatchNorm2d>(5);
    plain.emplace<ReLU>();
    BatchNorm2d fused(5);
    fused.set_fused_relu(true);
    randomize_batchnorms(plain, 3);
    randomize_batchnorms(fused, 3);
    plain.train(training);
    fused.train(training);
    const Tensor x = random_tensor({3, 5, 7, 6}, 11), dy = random_tensor({3, 5, 7, 6}, 12);
    SavedPtr sp, sf;
    const Tensor yp = plain.forward(x, &sp, kCpu), yf = fused.forward(x, &sf, kCpu);
    EXPECT_EQ(yp.to_vector(), yf.to_vector());
    const Tensor dxp = plain.backward(dy, *sp, true, kCpu), dxf = fused.backward(dy, *sf, true, kCpu);
    EXPECT_EQ(dxp.to_vector(), dxf.to_vector());
    EXPECT_EQ(bn_plain.weight().grad.to_vector(), fused.weight().grad.to_vector());
    EXPECT_EQ(bn_plain.bias().grad.to_vector(), fused.bias().grad.to_vector());
    EXPECT_EQ(bn_plain.running_mean().to_vector(), fused.running_mean().to_vector());
    EXPECT_EQ(bn_plain.running_var().to_vector(), fused.running_var().to_vector());
  }
  BatchNorm2d bn(3);
  bn.set_fused_relu(true);
  randomize_batchnorms(bn, 7);
  check_both_modes(bn, {2, 3, 4, 5}, "batchnorm + relu");
}

TEST(ReLULayer, GradientCheckWithKinks) {
  ReLU relu;
  check_both_modes(relu, {2, 3, 5, 5}, "relu");  // points within h of 0 are skipped as kinks
}

TEST(MaxPool2dLayer, GradientCheckWithKinks) {
  MaxPool2d pool(3, 2, 1);
  check_both_modes(pool, {2, 3, 7, 9}, "maxpool 3 s2 p1");
  MaxPool2d pool2(2, 2, 0);
  check_both_modes(pool2, {1, 2, 6, 5}, "maxpool 2 s2");
}

TEST(GlobalAvgPoolLayer, GradientCheckAndShape) {
  GlobalAvgPool pool;
  Tensor y = pool.forward(random_tensor({2, 5, 3, 4}, 1), nullptr, kCpu);
  EXPECT_EQ(y.shape(), (Shape{2, 5}));
  check_both_modes(pool, {2, 5, 3, 4}, "global avg pool");
}

TEST(LinearLayer, GradientCheck) {
  std::mt19937_64 rng(2);
  Linear fc(rng, 7, 5);
  check_both_modes(fc, {3, 7}, "linear");
  Linear nobias(rng, 4, 3, false);
  EXPECT_EQ(nobias.bias(), nullptr);
  check_both_modes(nobias, {2, 4}, "linear without bias");
}

TEST(DropoutLayer, GradientCheckWithFixedMask) {
  Dropout drop(0.4f);
  drop.set_seed(123);
  ModuleCheckOptions o;
  o.before_forward = [&drop] { drop.set_counter(0); };  // the same mask for every forward
  check_both_modes(drop, {3, 8}, "dropout", o);
}

TEST(SequentialLayer, GradientCheck) {
  std::mt19937_64 rng(3);
  Sequential seq;
  seq.emplace<Conv2d>(rng, 3, 4, 3, 1, 1, 1, 1, false);
  seq.emplace<BatchNorm2d>(4);
  seq.emplace<ReLU>(true);
  seq.emplace<MaxPool2d>(3, 2, 1);
  randomize_batchnorms(seq, 11);
  ModuleCheckOptions o;  // a conv weight moves every output: see block_options() in test_blocks.cpp
  o.h = 3e-4;
  o.kink = 0.02;
  check_both_modes(seq, {2, 3, 7, 8}, "conv-bn-relu-pool", o);
}

// ---- initialisation -------------------------------------------------------------------------

TEST(Init, KaimingUniformBoundsAsPyTorch) {
  std::mt19937_64 rng(4);
  Conv2d conv(rng, 16, 32, 3, 1, 1, 1, 1, true);
  const double bound = 1.0 / std::sqrt(16.0 * 9.0);  // kaiming_uniform(a = sqrt(5)) = 1/sqrt(fan_in)
  for (Tensor* t : {&conv.weight().value, &conv.bias()->value}) {
    double lo = 1, hi = -1, mean = 0;
    for (float v : t->to_vector()) {
      lo = std::min<double>(lo, v);
      hi = std::max<double>(hi, v);
      mean += v / t->numel();
    }
    EXPECT_GE(lo, -bound);
    EXPECT_LT(hi, bound);
    EXPECT_LT(lo, -0.8 * bound);
    EXPECT_GT(hi, 0.8 * bound);
    EXPECT_LT(std::fabs(mean), 0.2 * bound);
  }
  Linear fc(rng, 100, 10);
  for (float v : fc.weight().value.to_vector()) EXPECT_LE(std::fabs(v), 0.1f);
}

TEST(Init, SameSeedSameWeights) {
  std::mt19937_64 a(9), b(9);
  Conv2d ca(a, 3, 4, 3), cb(b, 3, 4, 3);
  EXPECT_EQ(ca.weight().value.to_vector(), cb.weight().value.to_vector());
  EXPECT_EQ(ca.bias()->value.to_vector(), cb.bias()->value.to_vector());
}

TEST(Init, BatchNormDefaults) {
  BatchNorm2d bn(3);
  EXPECT_EQ(bn.weight().value.to_vector(), std::vector<float>(3, 1.0f));
  EXPECT_EQ(bn.bias().value.to_vector(), std::vector<float>(3, 0.0f));
  EXPECT_EQ(bn.running_mean().to_vector(), std::vector<float>(3, 0.0f));
  EXPECT_EQ(bn.running_var().to_vector(), std::vector<float>(3, 1.0f));
}

// ---- the Module contract --------------------------------------------------------------------

TEST(ModuleContract, ParameterGradientsAccumulateAndInputGradIsOptional) {
  std::mt19937_64 rng(5);
  Sequential seq;
  seq.emplace<Conv2d>(rng, 2, 3, 3, 1, 1, 1, 1, true);
  seq.emplace<BatchNorm2d>(3);
  Tensor x = random_tensor({2, 2, 4, 4}, 1);
  SavedPtr ctx;
  Tensor y = seq.forward(x, &ctx, kCpu);
  Tensor r = random_tensor(y.shape(), 2);
  seq.zero_grad();
  Tensor dx = seq.backward(r, *ctx, true, kCpu);
  ASSERT_TRUE(dx.defined());
  EXPECT_EQ(dx.shape(), x.shape());
  std::vector<std::vector<float>> once;
  for (auto& p : seq.named_parameters()) once.push_back(p.second->grad.to_vector());
  Tensor none = seq.backward(r, *ctx, false, kCpu);
  EXPECT_FALSE(none.defined());
  auto params = seq.named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<float> twice = params[i].second->grad.to_vector();
    for (size_t k = 0; k < twice.size(); ++k) EXPECT_FLOAT_EQ(twice[k], 2 * once[i][k]) << params[i].first;
  }
  seq.zero_grad();
  for (auto& p : seq.named_parameters())
    for (float v : p.second->grad.to_vector()) EXPECT_EQ(v, 0.0f);
}

TEST(ModuleContract, StateDictOrderIsPyTorchs) {
  std::mt19937_64 rng(6);
  Sequential seq;
  seq.emplace<Conv2d>(rng, 2, 3, 3, 1, 1, 1, 1, true);
  auto& inner = seq.emplace<Sequential>();
  inner.emplace<BatchNorm2d>(3);
  inner.emplace<ReLU>();
  seq.emplace<Linear>(rng, 3, 2);
  EXPECT_EQ(names(seq.state_dict()),
            (std::vector<std::string>{"0.weight", "0.bias", "1.0.weight", "1.0.bias", "1.0.running_mean",
                                      "1.0.running_var", "2.weight", "2.bias"}));
  EXPECT_EQ(names(seq.named_buffers()), (std::vector<std::string>{"1.0.running_mean", "1.0.running_var"}));
  EXPECT_EQ(seq.named_parameters().size(), 6u);
  EXPECT_EQ(seq.num_parameters(), 2 * 3 * 9 + 3 + 3 + 3 + 3 * 2 + 2);
  EXPECT_EQ(seq.child("1")->child("0")->type_name(), std::string("BatchNorm2d"));
  EXPECT_EQ(seq.child("3"), nullptr);
}

TEST(ModuleContract, ModeIsRecursive) {
  Sequential seq;
  auto& inner = seq.emplace<Sequential>();
  auto& bn = inner.emplace<BatchNorm2d>(2);
  seq.eval();
  EXPECT_FALSE(bn.training());
  seq.train();
  EXPECT_TRUE(bn.training());
  seq.eval();
  auto& added = seq.emplace<BatchNorm2d>(2);  // a module added later takes the container's mode
  EXPECT_FALSE(added.training());
}

TEST(ModuleContract, ErrorsNameTheProblem) {
  std::mt19937_64 rng(8);
  Conv2d conv(rng, 3, 4, 3);
  expect_error([&] { conv.forward(random_tensor({2, 5, 8, 8}, 1), nullptr, kCpu); },
               {"Conv2d", "[N, 3, H, W]", "[2, 5, 8, 8]"});
  Linear fc(rng, 4, 2);
  EXPECT_THROW(fc.forward(random_tensor({2, 3}, 1), nullptr, kCpu), Error);
  // A context saved by one module cannot drive another's backward.
  SavedPtr ctx;
  Tensor y = fc.forward(random_tensor({2, 4}, 1), &ctx, kCpu);
  BatchNorm2d bn(2);
  EXPECT_THROW(bn.backward(y, *ctx, true, kCpu), Error);
  // The gradient must have the output's shape.
  EXPECT_THROW(fc.backward(random_tensor({2, 3}, 1), *ctx, true, kCpu), Error);
  ModuleList list;
  EXPECT_THROW(list.forward(y, nullptr, kCpu), Error);
  EXPECT_THROW(list[0], Error);
}

// ---- behaviour of individual layers ---------------------------------------------------------

TEST(BatchNorm2dLayer, RunningStatisticsFollowTheSwitch) {
  BatchNorm2d bn(2);
  Tensor x = random_tensor({3, 2, 4, 4}, 3, 1.0f, 3.0f);
  bn.set_update_running_stats(false);
  bn.forward(x, nullptr, kCpu);
  EXPECT_EQ(bn.running_mean().to_vector(), std::vector<float>(2, 0.0f));
  EXPECT_EQ(bn.running_var().to_vector(), std::vector<float>(2, 1.0f));
  bn.set_update_running_stats(true);
  bn.forward(x, nullptr, kCpu);
  for (float m : bn.running_mean().to_vector()) EXPECT_NEAR(m, 0.1 * 2.0, 0.05);  // momentum 0.1, mean ~2
  // Eval normalises with the running statistics: y = (x - rm) / sqrt(rv + eps) * w + b.
  bn.eval();
  Tensor y = bn.forward(x, nullptr, kCpu);
  const std::vector<float> xv = x.to_vector(), yv = y.to_vector(), rm = bn.running_mean().to_vector(),
                           rv = bn.running_var().to_vector();
  for (int64_t i : {0, 17, 40, 95}) {
    const int c = static_cast<int>((i / 16) % 2);
    EXPECT_NEAR(yv[i], (xv[i] - rm[c]) / std::sqrt(rv[c] + 1e-5f), 1e-5);
  }
}

TEST(BatchNorm2dLayer, TrainingNeedsMoreThanOneValuePerChannel) {
  BatchNorm2d bn(2);
  EXPECT_THROW(bn.forward(random_tensor({1, 2, 1, 1}, 1), nullptr, kCpu), Error);
  bn.eval();
  EXPECT_NO_THROW(bn.forward(random_tensor({1, 2, 1, 1}, 1), nullptr, kCpu));
}

TEST(ReLULayer, InplaceOverwritesItsInput) {
  Tensor x = random_tensor({2, 3}, 4);
  Tensor copy = x.clone();
  ReLU out_of_place;
  Tensor y = out_of_place.forward(x, nullptr, kCpu);
  EXPECT_EQ(x.to_vector(), copy.to_vector());
  ReLU inplace(true);
  Tensor z = inplace.forward(x, nullptr, kCpu);
  EXPECT_EQ(x.to_vector(), y.to_vector());
  EXPECT_EQ(z.to_vector(), y.to_vector());
}

TEST(DropoutLayer, MaskDependsOnSeedAndCounter) {
  Dropout drop(0.5f);
  drop.set_seed(42);
  Tensor x = Tensor::full({4, 64}, 1.0f);
  Tensor a = drop.forward(x, nullptr, kCpu);
  EXPECT_EQ(drop.counter(), 256u);  // advances by numel per training forward
  Tensor b = drop.forward(x, nullptr, kCpu);
  EXPECT_NE(a.to_vector(), b.to_vector());
  int zeros = 0;
  for (float v : a.to_vector()) {
    EXPECT_TRUE(v == 0.0f || v == 2.0f) << v;  // inverted dropout scales by 1 / (1 - p)
    zeros += v == 0.0f;
  }
  EXPECT_GT(zeros, 80);
  EXPECT_LT(zeros, 176);
  drop.set_counter(0);
  EXPECT_EQ(drop.forward(x, nullptr, kCpu).to_vector(), a.to_vector());  // resumable from (seed, counter)
  drop.set_counter(0);
  drop.set_seed(43);
  EXPECT_NE(drop.forward(x, nullptr, kCpu).to_vector(), a.to_vector());
}

TEST(DropoutLayer, IdentityInEvalOrWhenDisabled) {
  Dropout drop(0.5f);
  Tensor x = random_tensor({3, 10}, 5);
  drop.set_enabled(false);
  EXPECT_EQ(drop.forward(x, nullptr, kCpu).to_vector(), x.to_vector());
  EXPECT_EQ(drop.counter(), 0u);
  drop.set_enabled(true);
  drop.eval();
  SavedPtr ctx;
  EXPECT_EQ(drop.forward(x, &ctx, kCpu).to_vector(), x.to_vector());
  EXPECT_EQ(drop.counter(), 0u);
  Tensor dy = random_tensor({3, 10}, 6);
  Tensor dx = drop.backward(dy, *ctx, true, kCpu);
  EXPECT_EQ(dx.to_vector(), dy.to_vector());
  EXPECT_NE(dx.raw_data(), dy.raw_data());  // input gradients are fresh tensors
  EXPECT_THROW(Dropout(1.0f), Error);
  EXPECT_THROW(Dropout(-0.1f), Error);
}
