// MedicalCNN: the spec's parameter count and names, its configuration JSON, a whole-model
// gradient check on a tiny configuration, micro-batches in flight, determinism from the seed,
// input checks, and running the model as a chain of units (pipeline stages).
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "kernels/elementwise.h"
#include "layers/medicalcnn.h"
#include "tests/module_gradcheck.h"
#include "tests/tiny_medicalcnn.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kCpu = Stream::cpu();

MedicalCNNConfig tiny_config() { return tiny_medicalcnn_config(2, 3, {4, 8, 8, 16}, 8); }

std::map<std::string, Shape> shapes(MedicalCNN& m) {
  std::map<std::string, Shape> out;
  for (auto& e : m.state_dict()) out[e.first] = e.second->shape();
  return out;
}

std::vector<std::vector<float>> grads(MedicalCNN& m) {
  std::vector<std::vector<float>> out;
  for (auto& p : m.named_parameters()) out.push_back(p.second->grad.to_vector());
  return out;
}

}  // namespace

// ---- the reference model's figures and names ------------------------------------------------

TEST(MedicalCNN, DefaultMatchesTheSpec) {
  MedicalCNN m(MedicalCNNConfig{}, 0);
  EXPECT_EQ(m.num_parameters(), 22627822);
  const auto sd = m.state_dict();
  // 191 trainable tensors + 2 running statistics for each of the 41 BatchNorms.
  EXPECT_EQ(m.named_parameters().size(), 191u);
  EXPECT_EQ(m.named_buffers().size(), 82u);
  ASSERT_EQ(sd.size(), 273u);
  EXPECT_EQ(sd.front().first, "stem.0.weight");
  EXPECT_EQ(sd.back().first, "head.4.bias");
  const auto s = shapes(m);
  const std::map<std::string, Shape> expected{
      {"stem.0.weight", {64, 3, 7, 7}},
      {"stem.1.weight", {64}},
      {"stem.1.bias", {64}},
      {"stem.1.running_mean", {64}},
      {"stem.1.running_var", {64}},
      {"stages.0.0.conv1.weight", {64, 64, 3, 3}},
      {"stages.0.2.bn2.running_var", {64}},
      {"stages.1.0.conv1.weight", {128, 64, 3, 3}},
      {"stages.1.0.down.0.weight", {128, 64, 1, 1}},
      {"stages.1.0.down.1.running_mean", {128}},
      {"stages.2.5.se.fc1.weight", {16, 256}},
      {"stages.2.5.se.fc1.bias", {16}},
      {"stages.2.5.se.fc2.weight", {256, 16}},
      {"stages.3.2.conv2.weight", {512, 512, 3, 3}},
      {"context.branches.0.0.weight", {64, 512, 1, 1}},
      {"context.branches.3.0.weight", {64, 512, 3, 3}},
      {"context.branches.3.1.running_var", {64}},
      {"context.project.0.weight", {512, 256, 1, 1}},
      {"context.project.1.running_var", {512}},
      {"head.1.weight", {256, 512}},
      {"head.1.bias", {256}},
      {"head.4.weight", {2, 256}},
      {"head.4.bias", {2}},
  };
  for (auto& [name, shape] : expected) {
    ASSERT_TRUE(s.count(name)) << name;
    EXPECT_EQ(s.at(name), shape) << name;
  }
  for (const char* absent : {"stages.0.0.down.0.weight", "stages.3.3.conv1.weight", "stem.1.num_batches_tracked"})
    EXPECT_FALSE(s.count(absent)) << absent;
}

TEST(MedicalCNN, DefaultForwardShape) {
  MedicalCNN m(MedicalCNNConfig{}, 0);
  m.eval();
  Tensor y = m.forward(random_tensor({1, 3, 32, 32}, 1), nullptr, kCpu);
  EXPECT_EQ(y.shape(), (Shape{1, 2}));
  EXPECT_TRUE(all_finite(y, kCpu));
}

// ---- configuration --------------------------------------------------------------------------

TEST(MedicalCNNConfig, JsonDefaultsAndRoundTrip) {
  const auto c = MedicalCNNConfig::from_json(nlohmann::json::parse(
      R"({"name": "medicalcnn", "in_channels": 1, "num_classes": 3, "widths": [16, 32, 64, 128], "depths": [1, 2, 2, 1]})"));
  EXPECT_EQ(c.in_channels, 1);
  EXPECT_EQ(c.num_classes, 3);
  EXPECT_EQ(c.widths, (std::vector<int>{16, 32, 64, 128}));
  EXPECT_EQ(c.depths, (std::vector<int>{1, 2, 2, 1}));
  EXPECT_EQ(c.se_reduction, 16);
  EXPECT_EQ(c.head_hidden, 256);
  EXPECT_EQ(c.dropout, (std::vector<float>{0.5f, 0.3f}));
  EXPECT_EQ(c.resolved_context_width(), 16);
  const nlohmann::json j = c.to_json();
  EXPECT_EQ(j["name"], "medicalcnn");
  EXPECT_EQ(j["context_width"], 16);
  EXPECT_EQ(MedicalCNNConfig::from_json(j).to_json(), j);
  EXPECT_EQ(MedicalCNNConfig::from_json(nlohmann::json::object()).to_json(), MedicalCNNConfig{}.to_json());
  EXPECT_EQ(MedicalCNNConfig{}.to_json()["context_width"], 64);
  MedicalCNNConfig narrow;
  narrow.widths = {4, 4, 4, 4};
  EXPECT_EQ(narrow.resolved_context_width(), 1);  // widths[-1] / 8, at least 1
}

TEST(MedicalCNNConfig, BadJsonIsRejectedNamingTheKey) {
  auto parse = [](const char* text) {
    return [text] { MedicalCNNConfig::from_json(nlohmann::json::parse(text)); };
  };
  expect_error(parse(R"({"width": [1, 2]})"), {"unknown key 'width'"});
  expect_error(parse(R"({"name": "resnet18"})"), {"'name'", "resnet18"});
  expect_error(parse(R"({"widths": [8, 16], "depths": [1, 1, 1]})"), {"[8, 16]", "[1, 1, 1]", "same length"});
  expect_error(parse(R"({"widths": [8, 0], "depths": [1, 1]})"), {"widths", "positive"});
  expect_error(parse(R"({"depths": [3, 4, -6, 3]})"), {"depths", "positive"});
  expect_error(parse(R"({"in_channels": "3"})"), {"'in_channels' must be an integer"});
  expect_error(parse(R"({"num_classes": 2.5})"), {"'num_classes' must be an integer"});
  expect_error(parse(R"({"dropout": [0.5]})"), {"dropout", "two probabilities"});
  expect_error(parse(R"({"dropout": [0.5, 1.0]})"), {"dropout", "[0, 1)"});
  expect_error(parse(R"({"se_reduction": 0})"), {"se_reduction"});
  expect_error(parse(R"([1, 2])"), {"JSON object"});
  MedicalCNNConfig bad;
  bad.depths = {1, 1};
  expect_error([&] { MedicalCNN(bad, 0); }, {"widths", "depths"});
}

// ---- gradients ------------------------------------------------------------------------------

// The whole model in train mode (batch statistics), dropout off. 33x35 rather than 17x19: at
// 17x19 the last stage is 1x1, so its BatchNorms see two values per channel and map them to
// +-1, a nearly flat, sharply bent function that central differences cannot resolve.
// Parameters are sampled from every part after stage 0's first conv: a weight of the stem or of
// stages.0.0.conv1 moves thousands of ReLU and max-pool inputs, so the loss has a kink every
// ~1e-4 along it, below what float32 differences can step over (the stem alone is checked in
// test_layers' conv-bn-relu-pool case, each block in test_blocks).
TEST(MedicalCNN, TinyModelGradientCheck) {
  MedicalCNN m(tiny_config(), 3);
  randomize_batchnorms(m, 50);
  m.train();
  m.set_dropout_enabled(false);
  m.set_update_running_stats(false);
  Tensor x = random_tensor({2, 2, 33, 35}, 4);
  SavedPtr ctx;
  Tensor y = m.forward(x, &ctx, kCpu);
  ASSERT_EQ(y.shape(), (Shape{2, 3}));
  Tensor r = random_tensor(y.shape(), 5);
  m.zero_grad();
  Tensor dx = m.backward(r, *ctx, true, kCpu);
  auto f = [&] { return dot(m.forward(x, nullptr, kCpu), r); };
  const double h = 3e-4, tol = 1e-2, kink = 0.02;  // as block_options() in test_blocks.cpp
  check_gradient("input", x, dx, f, h, tol, 24, kink);
  std::map<std::string, Parameter*> params;
  for (auto& p : m.named_parameters()) params[p.first] = p.second;
  for (const char* name : {"stages.0.0.bn1.bias", "stages.0.0.conv2.weight", "stages.0.0.se.fc1.weight",
                           "stages.1.0.conv1.weight", "stages.1.0.down.0.weight", "stages.1.0.down.1.weight",
                           "stages.2.0.bn2.bias", "stages.3.0.conv2.weight", "stages.3.0.se.fc2.bias",
                           "context.branches.3.0.weight", "context.branches.0.1.bias", "context.project.1.weight",
                           "head.1.weight", "head.4.bias"}) {
    ASSERT_TRUE(params.count(name)) << name;
    check_gradient(name, params[name]->value, params[name]->grad, f, h, tol, 12, kink);
  }
}

TEST(MedicalCNN, MicroBatchesInFlightMatchOneAtATime) {
  MedicalCNN a(tiny_config(), 11), b(tiny_config(), 11);
  Tensor x = random_tensor({4, 2, 17, 19}, 6);
  Tensor x1 = x.narrow(0, 2), x2 = x.narrow(2, 2);
  Tensor r1 = random_tensor({2, 3}, 7), r2 = random_tensor({2, 3}, 8);
  // a: two forwards before either backward (GPipe); b: one micro-batch at a time.
  SavedPtr c1, c2;
  Tensor ya1 = a.forward(x1, &c1, kCpu);
  Tensor ya2 = a.forward(x2, &c2, kCpu);
  Tensor da1 = a.backward(r1, *c1, true, kCpu);
  Tensor da2 = a.backward(r2, *c2, true, kCpu);
  Tensor yb1 = b.forward(x1, &c1, kCpu);
  Tensor db1 = b.backward(r1, *c1, true, kCpu);
  Tensor yb2 = b.forward(x2, &c2, kCpu);
  Tensor db2 = b.backward(r2, *c2, true, kCpu);
  EXPECT_EQ(ya1.to_vector(), yb1.to_vector());
  EXPECT_EQ(ya2.to_vector(), yb2.to_vector());
  EXPECT_EQ(da1.to_vector(), db1.to_vector());
  EXPECT_EQ(da2.to_vector(), db2.to_vector());
  EXPECT_EQ(grads(a), grads(b));
  auto sa = a.state_dict(), sb = b.state_dict();
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_EQ(sa[i].second->to_vector(), sb[i].second->to_vector()) << sa[i].first;
  for (size_t k = 0; k < a.dropouts().size(); ++k) EXPECT_EQ(a.dropouts()[k]->counter(), b.dropouts()[k]->counter());
}

TEST(MedicalCNN, UnitsRunAsAChainLikeTheModel) {
  MedicalCNN m(tiny_config(), 12);
  m.set_dropout_enabled(false);
  m.set_update_running_stats(false);
  const auto& units = m.units();
  ASSERT_EQ(units.size(), 1u + 4u + 3u);
  EXPECT_EQ(units.front().first, "stem");
  EXPECT_EQ(units[1].first, "stages.0.0");
  EXPECT_EQ(units[4].first, "stages.3.0");
  EXPECT_EQ(units.back().first, "head");
  // Two pipeline stages, cut after stages.1.0.
  std::vector<Module*> first, second;
  for (size_t i = 0; i < units.size(); ++i) (i < 3 ? first : second).push_back(units[i].second);
  Tensor x = random_tensor({2, 2, 17, 19}, 9);
  Tensor r = random_tensor({2, 3}, 10);
  SavedPtr c, c1, c2;
  Tensor y = m.forward(x, &c, kCpu);
  m.zero_grad();
  Tensor dx = m.backward(r, *c, true, kCpu);
  const auto whole = grads(m);
  Tensor y2 = chain_forward(second, chain_forward(first, x, &c1, kCpu), &c2, kCpu);
  m.zero_grad();
  Tensor dx2 = chain_backward(first, chain_backward(second, r, *c2, true, kCpu), *c1, true, kCpu);
  EXPECT_EQ(y.to_vector(), y2.to_vector());
  EXPECT_EQ(dx.to_vector(), dx2.to_vector());
  EXPECT_EQ(grads(m), whole);
}

// ---- determinism, modes, input checks -------------------------------------------------------

TEST(MedicalCNN, SameSeedSameWeights) {
  MedicalCNN a(tiny_config(), 21), b(tiny_config(), 21), c(tiny_config(), 22);
  auto sa = a.state_dict(), sb = b.state_dict(), sc = c.state_dict();
  ASSERT_EQ(sa.size(), sb.size());
  bool any_differs = false;
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(sa[i].first, sb[i].first);
    EXPECT_EQ(sa[i].second->to_vector(), sb[i].second->to_vector()) << sa[i].first;
    any_differs |= sa[i].second->to_vector() != sc[i].second->to_vector();
  }
  EXPECT_TRUE(any_differs);
  EXPECT_NE(a.dropouts()[0]->seed(), a.dropouts()[1]->seed());
  EXPECT_EQ(a.dropouts()[0]->seed(), b.dropouts()[0]->seed());
}

TEST(MedicalCNN, ModesAndSwitches) {
  MedicalCNN m(tiny_config(), 31);
  Tensor x = random_tensor({2, 2, 17, 19}, 11);
  // Train mode with dropout off and running statistics frozen: deterministic, nothing written.
  m.set_dropout_enabled(false);
  m.set_update_running_stats(false);
  Tensor a = m.forward(x, nullptr, kCpu);
  EXPECT_EQ(m.forward(x, nullptr, kCpu).to_vector(), a.to_vector());
  for (auto& b : m.named_buffers()) {
    const float want = b.first.find("running_var") != std::string::npos ? 1.0f : 0.0f;
    for (float v : b.second->to_vector()) ASSERT_EQ(v, want) << b.first;
  }
  EXPECT_EQ(m.dropouts()[0]->counter(), 0u);
  // Dropout on: the head's dropouts draw masks and advance their counters.
  m.set_dropout_enabled(true);
  Tensor d = m.forward(x, nullptr, kCpu);
  EXPECT_NE(d.to_vector(), a.to_vector());
  EXPECT_EQ(m.dropouts()[0]->counter(), 2u * 16u);
  EXPECT_EQ(m.dropouts()[1]->counter(), 2u * 8u);
  // Eval: running statistics, no dropout.
  m.eval();
  Tensor e = m.forward(x, nullptr, kCpu);
  EXPECT_EQ(m.forward(x, nullptr, kCpu).to_vector(), e.to_vector());
  EXPECT_EQ(m.dropouts()[0]->counter(), 2u * 16u);
}

TEST(MedicalCNN, WrongInputIsAClearError) {
  MedicalCNN m(tiny_config(), 41);
  expect_error([&] { m.forward(random_tensor({2, 3, 17, 19}, 1), nullptr, kCpu); },
               {"MedicalCNN", "[N, 2, H, W]", "[2, 3, 17, 19]"});
  EXPECT_THROW(m.forward(random_tensor({2, 17, 19}, 1), nullptr, kCpu), Error);
  EXPECT_THROW(m.forward(Tensor::empty({0, 2, 17, 19}), nullptr, kCpu), Error);
}
