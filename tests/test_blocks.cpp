// Blocks: gradient checks (input and every parameter, train and eval) for SEBlock,
// BasicResidualBlock (identity, stride-2 downsampling, channel change) and ContextBlock; their
// forward against the spec's computation composed from the children; parameter names.
#include <gtest/gtest.h>

#include <cmath>

#include "layers/blocks.h"
#include "tests/module_gradcheck.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kCpu = Stream::cpu();

// A weight of a block moves every output, so with h = 1e-2 some ReLU or max-pool input nearly
// always crosses its kink and bends the central difference by a few percent. A small step and
// a tight kink test (a crossing that moves the central difference by > 1% makes the one-sided
// differences disagree by > 2%) keep the check at tol = 1e-2; float noise stays well below it.
ModuleCheckOptions block_options() {
  ModuleCheckOptions o;
  o.h = 3e-4;
  o.kink = 0.02;
  return o;
}

void check_both_modes(Module& m, const Shape& x_shape, const std::string& what, ModuleCheckOptions o = block_options()) {
  randomize_batchnorms(m, 100);
  m.train();
  check_module_gradients(m, x_shape, what, o);
  m.eval();
  check_module_gradients(m, x_shape, what, o);
}

std::vector<std::string> state_names(Module& m) {
  std::vector<std::string> out;
  for (auto& e : m.state_dict()) out.push_back(e.first);
  return out;
}

Tensor relu_of_sum(const Tensor& a, const Tensor& b) {
  Tensor y = Tensor::empty(a.shape());
  const std::vector<float> av = a.to_vector(), bv = b.to_vector();
  float* p = y.data<float>();
  for (size_t i = 0; i < av.size(); ++i) p[i] = std::max(0.0f, av[i] + bv[i]);
  return y;
}

void expect_close(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const std::vector<float> av = a.to_vector(), bv = b.to_vector();
  for (size_t i = 0; i < av.size(); ++i) ASSERT_NEAR(av[i], bv[i], 1e-5 * std::max(1.0f, std::fabs(bv[i]))) << what << "[" << i << "]";
}

// Parameter gradients with and without the input gradient must agree.
void expect_input_grad_optional(Module& m, const Shape& x_shape) {
  Tensor x = random_tensor(x_shape, 3);
  SavedPtr ctx;
  Tensor y = m.forward(x, &ctx, kCpu);
  Tensor r = random_tensor(y.shape(), 4);
  m.zero_grad();
  EXPECT_TRUE(m.backward(r, *ctx, true, kCpu).defined());
  std::vector<std::vector<float>> with;
  for (auto& p : m.named_parameters()) with.push_back(p.second->grad.to_vector());
  m.zero_grad();
  EXPECT_FALSE(m.backward(r, *ctx, false, kCpu).defined());
  auto params = m.named_parameters();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_EQ(params[i].second->grad.to_vector(), with[i]) << params[i].first;
}

}  // namespace

// ---- SEBlock --------------------------------------------------------------------------------

TEST(SEBlock, HiddenWidthAndNames) {
  std::mt19937_64 rng(1);
  EXPECT_EQ(SEBlock(rng, 64, 16).hidden(), 4);
  EXPECT_EQ(SEBlock(rng, 4, 16).hidden(), 1);  // max(1, C / r)
  SEBlock se(rng, 8, 4);
  EXPECT_EQ(state_names(se), (std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  EXPECT_EQ(se.state_dict()[0].second->shape(), (Shape{2, 8}));
  EXPECT_EQ(se.state_dict()[2].second->shape(), (Shape{8, 2}));
}

TEST(SEBlock, ForwardIsTheSpecsGate) {
  std::mt19937_64 rng(2);
  const int N = 2, C = 8, H = 3, W = 4, h = 2;
  SEBlock se(rng, C, 4);
  Tensor x = random_tensor({N, C, H, W}, 5);
  Tensor y = se.forward(x, nullptr, kCpu);
  const auto xv = x.to_vector(), yv = y.to_vector();
  const auto w1 = se.state_dict()[0].second->to_vector(), b1 = se.state_dict()[1].second->to_vector();
  const auto w2 = se.state_dict()[2].second->to_vector(), b2 = se.state_dict()[3].second->to_vector();
  for (int n = 0; n < N; ++n) {
    std::vector<double> s(C, 0.0), hid(h, 0.0);
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < H * W; ++i) s[c] += xv[(n * C + c) * H * W + i] / (H * W);
    for (int j = 0; j < h; ++j) {
      double a = b1[j];
      for (int c = 0; c < C; ++c) a += w1[j * C + c] * s[c];
      hid[j] = std::max(0.0, a);
    }
    for (int c = 0; c < C; ++c) {
      double a = b2[c];
      for (int j = 0; j < h; ++j) a += w2[c * h + j] * hid[j];
      const double g = 1.0 / (1.0 + std::exp(-a));
      for (int i = 0; i < H * W; ++i) {
        const int k = (n * C + c) * H * W + i;
        EXPECT_NEAR(yv[k], xv[k] * g, 1e-5);
      }
    }
  }
}

TEST(SEBlock, GradientCheck) {
  std::mt19937_64 rng(3);
  SEBlock se(rng, 8, 4);
  check_both_modes(se, {2, 8, 3, 4}, "se");
  SEBlock narrow(rng, 4, 16);
  check_both_modes(narrow, {3, 4, 2, 2}, "se h=1");
}

// ---- BasicResidualBlock ---------------------------------------------------------------------

TEST(BasicResidualBlock, NamesAndShortcutChoice) {
  std::mt19937_64 rng(4);
  BasicResidualBlock identity(rng, 8, 8, 1, 4);
  EXPECT_FALSE(identity.has_downsample());
  const std::vector<std::string> base{"conv1.weight",   "bn1.weight",       "bn1.bias",        "bn1.running_mean",
                                      "bn1.running_var", "conv2.weight",     "bn2.weight",      "bn2.bias",
                                      "bn2.running_mean", "bn2.running_var", "se.fc1.weight",   "se.fc1.bias",
                                      "se.fc2.weight",   "se.fc2.bias"};
  EXPECT_EQ(state_names(identity), base);
  BasicResidualBlock down(rng, 4, 8, 2, 4);
  EXPECT_TRUE(down.has_downsample());
  std::vector<std::string> with_down = base;
  for (const char* n : {"down.0.weight", "down.1.weight", "down.1.bias", "down.1.running_mean", "down.1.running_var"})
    with_down.push_back(n);
  EXPECT_EQ(state_names(down), with_down);
  auto sd = down.state_dict();
  EXPECT_EQ(sd[0].second->shape(), (Shape{8, 4, 3, 3}));
  EXPECT_EQ(sd[5].second->shape(), (Shape{8, 8, 3, 3}));
  EXPECT_EQ(sd[14].second->shape(), (Shape{8, 4, 1, 1}));
  EXPECT_TRUE(BasicResidualBlock(rng, 4, 6, 1, 4).has_downsample());  // channel change only
  EXPECT_TRUE(BasicResidualBlock(rng, 4, 4, 2, 4).has_downsample());  // stride only
}

TEST(BasicResidualBlock, ForwardIsTheSpecsComputation) {
  std::mt19937_64 rng(5);
  for (int stride : {1, 2}) {
    BasicResidualBlock blk(rng, 4, stride == 1 ? 4 : 6, stride, 2);
    randomize_batchnorms(blk, 20);
    for (bool training : {false, true}) {
      blk.train(training);
      blk.apply([](const std::string&, Module& m) {
        if (auto* bn = dynamic_cast<BatchNorm2d*>(&m)) bn->set_update_running_stats(false);
      });
      Tensor x = random_tensor({2, 4, 7, 9}, 6);
      ReLU relu;
      Tensor h = relu.forward(blk.child("bn1")->forward(blk.child("conv1")->forward(x, nullptr, kCpu), nullptr, kCpu),
                              nullptr, kCpu);
      Tensor y = blk.child("bn2")->forward(blk.child("conv2")->forward(h, nullptr, kCpu), nullptr, kCpu);
      y = blk.child("se")->forward(y, nullptr, kCpu);
      Tensor shortcut = blk.has_downsample() ? blk.child("down")->forward(x, nullptr, kCpu) : x;
      expect_close(blk.forward(x, nullptr, kCpu), relu_of_sum(y, shortcut),
                   "block stride " + std::to_string(stride) + (training ? " train" : " eval"));
    }
  }
}

TEST(BasicResidualBlock, GradientCheckIdentity) {
  std::mt19937_64 rng(6);
  BasicResidualBlock blk(rng, 4, 4, 1, 2);
  check_both_modes(blk, {2, 4, 6, 7}, "block identity");
}

TEST(BasicResidualBlock, GradientCheckDownsampleStride2) {
  std::mt19937_64 rng(7);
  BasicResidualBlock blk(rng, 4, 8, 2, 4);
  check_both_modes(blk, {2, 4, 7, 9}, "block 4->8 s2");
  expect_input_grad_optional(blk, {2, 4, 7, 9});
}

TEST(BasicResidualBlock, GradientCheckChannelChange) {
  std::mt19937_64 rng(8);
  BasicResidualBlock blk(rng, 4, 6, 1, 16);
  check_both_modes(blk, {2, 4, 5, 6}, "block 4->6 s1");
}

// ---- ContextBlock ---------------------------------------------------------------------------

TEST(ContextBlock, NamesAndShapes) {
  std::mt19937_64 rng(9);
  ContextBlock ctx(rng, 16, 2);
  auto sd = ctx.state_dict();
  ASSERT_EQ(sd.size(), 25u);  // 4 x (conv + 4 BN entries) + conv + 4 BN entries
  EXPECT_EQ(sd[0].first, "branches.0.0.weight");
  EXPECT_EQ(sd[0].second->shape(), (Shape{2, 16, 1, 1}));
  EXPECT_EQ(sd[1].first, "branches.0.1.weight");
  EXPECT_EQ(sd[15].first, "branches.3.0.weight");
  EXPECT_EQ(sd[15].second->shape(), (Shape{2, 16, 3, 3}));
  EXPECT_EQ(sd[20].first, "project.0.weight");
  EXPECT_EQ(sd[20].second->shape(), (Shape{16, 8, 1, 1}));
  EXPECT_EQ(sd[24].first, "project.1.running_var");
  for (int k = 1; k <= 3; ++k) {
    auto* conv = dynamic_cast<Conv2d*>(ctx.child("branches")->child(std::to_string(k))->child("0"));
    ASSERT_NE(conv, nullptr);
    EXPECT_EQ(conv->params().dilation_h, k);
    EXPECT_EQ(conv->params().pad_w, k);
  }
}

TEST(ContextBlock, ForwardIsTheSpecsComputation) {
  std::mt19937_64 rng(10);
  ContextBlock ctx(rng, 8, 3);
  randomize_batchnorms(ctx, 30);
  ctx.eval();
  Tensor x = random_tensor({2, 8, 5, 6}, 7);
  std::vector<Tensor> outs;
  for (int k = 0; k < 4; ++k) outs.push_back(ctx.child("branches")->child(std::to_string(k))->forward(x, nullptr, kCpu));
  // Concatenate along channels, branch 0 first.
  Tensor cat = Tensor::empty({2, 12, 5, 6});
  float* c = cat.data<float>();
  for (int n = 0; n < 2; ++n)
    for (int k = 0; k < 4; ++k) {
      const auto v = outs[k].to_vector();
      std::copy(v.begin() + n * 3 * 30, v.begin() + (n + 1) * 3 * 30, c + (n * 12 + k * 3) * 30);
    }
  Tensor p = ctx.child("project")->forward(cat, nullptr, kCpu);
  expect_close(ctx.forward(x, nullptr, kCpu), relu_of_sum(p, x), "context");
}

TEST(ContextBlock, GradientCheck) {
  std::mt19937_64 rng(11);
  ContextBlock ctx(rng, 8, 2);
  check_both_modes(ctx, {2, 8, 5, 6}, "context");
  expect_input_grad_optional(ctx, {2, 8, 5, 6});
}
