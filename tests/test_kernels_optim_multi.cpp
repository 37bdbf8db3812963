// Tests for the multi-tensor optimizer steps (sgd_step_multi, adam_step_multi) on the CPU:
// bit-identical to the per-tensor ops step after step, the fused gradient unscale bit-identical
// to unscale_and_check_finite followed by the step, and the list checks.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <vector>

#include "kernels/optim.h"
#include "tests/gradcheck.h"

namespace lancet {
namespace {

using testing::expect_error;
using testing::random_tensor;

const Stream kCpu = Stream::cpu();

// Odd sizes, a size with no elements, and one larger than a parallel task (kElementwiseGrain).
const std::vector<Shape> kShapes = {{7}, {1}, {3, 5}, {0}, {16, 3, 3, 3}, {100003}, {64}, {10, 64}};

std::vector<Tensor> random_list(uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::vector<Tensor> out;
  for (size_t i = 0; i < kShapes.size(); ++i)
    out.push_back(random_tensor(kShapes[i], seed + 101 * static_cast<uint32_t>(i), lo, hi));
  return out;
}

std::vector<Tensor> clones(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.clone());
  return out;
}

std::vector<Tensor*> ptrs(std::vector<Tensor>& ts) {
  std::vector<Tensor*> out;
  for (Tensor& t : ts) out.push_back(&t);
  return out;
}

std::vector<const Tensor*> cptrs(const std::vector<Tensor>& ts) {
  std::vector<const Tensor*> out;
  for (const Tensor& t : ts) out.push_back(&t);
  return out;
}

void expect_same_bits(const std::vector<Tensor>& want, const std::vector<Tensor>& got, const char* what, int step) {
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(want[i].shape(), got[i].shape());
    EXPECT_EQ(std::memcmp(want[i].raw_data(), got[i].raw_data(), want[i].nbytes()), 0)
        << what << " tensor " << i << " " << want[i].shape_str() << " differs after step " << step;
  }
}

// Runs `steps` SGD steps both ways (per tensor on one copy, multi on the other) with fresh
// gradients each step, checking parameters and buffers after every step.
void check_sgd(const SgdParams& sp, bool with_bufs, int steps) {
  std::vector<Tensor> p1 = random_list(1), p2 = clones(p1);
  std::vector<Tensor> b1, b2;
  for (const Shape& s : kShapes) b1.push_back(Tensor::zeros(s));
  b2 = clones(b1);
  for (int t = 0; t < steps; ++t) {
    const std::vector<Tensor> g = random_list(1000 + 17 * t);
    Tensor none;
    for (size_t i = 0; i < p1.size(); ++i) sgd_step(sp, t == 0, p1[i], g[i], with_bufs ? b1[i] : none, kCpu);
    std::vector<Tensor*> bufs = with_bufs ? ptrs(b2) : std::vector<Tensor*>{};
    sgd_step_multi(sp, t == 0, ptrs(p2), cptrs(g), bufs, kCpu);
    expect_same_bits(p1, p2, "param", t);
    expect_same_bits(b1, b2, "momentum buffer", t);
  }
}

TEST(OptimMulti, SgdEqualsPerTensor) {
  SgdParams a;
  a.lr = 0.1f, a.momentum = 0.9f, a.dampening = 0.1f, a.weight_decay = 0.01f;
  check_sgd(a, true, 3);
  SgdParams n;
  n.lr = 0.05f, n.momentum = 0.8f, n.nesterov = true, n.weight_decay = 1e-4f;
  check_sgd(n, true, 3);
  SgdParams plain;
  plain.lr = 0.1f, plain.momentum = 0.f;
  check_sgd(plain, false, 2);  // no buffers at all: an empty list
  check_sgd(plain, true, 2);   // buffers given but unused
}

void check_adam(const AdamParams& ap, int steps) {
  std::vector<Tensor> p1 = random_list(2), p2 = clones(p1);
  std::vector<Tensor> m1, v1;
  for (const Shape& s : kShapes) {
    m1.push_back(Tensor::zeros(s));
    v1.push_back(Tensor::zeros(s));
  }
  std::vector<Tensor> m2 = clones(m1), v2 = clones(v1);
  for (int t = 1; t <= steps; ++t) {
    const std::vector<Tensor> g = random_list(2000 + 13 * t);
    for (size_t i = 0; i < p1.size(); ++i) adam_step(ap, t, p1[i], g[i], m1[i], v1[i], kCpu);
    adam_step_multi(ap, t, ptrs(p2), cptrs(g), ptrs(m2), ptrs(v2), kCpu);
    expect_same_bits(p1, p2, "param", t);
    expect_same_bits(m1, m2, "exp_avg", t);
    expect_same_bits(v1, v2, "exp_avg_sq", t);
  }
}

TEST(OptimMulti, AdamAndAdamWEqualPerTensor) {
  AdamParams adam;
  check_adam(adam, 4);
  adam.lr = 0.01f, adam.weight_decay = 0.1f;
  check_adam(adam, 4);
  AdamParams adamw = adam;
  adamw.decoupled = true;
  check_adam(adamw, 4);
  AdamParams low_beta;  // 1 - beta1 >= 0.5: the other branch of torch's lerp
  low_beta.beta1 = 0.3f;
  check_adam(low_beta, 3);
}

// grad_scale_inv == unscale_and_check_finite on a copy of the gradients, then the plain step;
// the gradients passed in are left as they were.
TEST(OptimMulti, GradScaleInvEqualsUnscaleThenStep) {
  const float inv = 1.0f / 3.0f;  // not a power of two: the product rounds
  const std::vector<Tensor> g = random_list(3, -3000.f, 3000.f);
  std::vector<Tensor> unscaled = clones(g);
  ASSERT_TRUE(unscale_and_check_finite(ptrs(unscaled), inv, kCpu));
  const std::vector<Tensor> g_before = clones(g);

  SgdParams sp;
  sp.lr = 0.1f, sp.momentum = 0.9f, sp.weight_decay = 0.01f;
  std::vector<Tensor> p1 = random_list(4), p2 = clones(p1), b1, b2;
  for (const Shape& s : kShapes) b1.push_back(Tensor::zeros(s));
  b2 = clones(b1);
  for (int t = 0; t < 2; ++t) {
    sgd_step_multi(sp, t == 0, ptrs(p1), cptrs(unscaled), ptrs(b1), kCpu);
    sgd_step_multi(sp, t == 0, ptrs(p2), cptrs(g), ptrs(b2), kCpu, inv);
    expect_same_bits(p1, p2, "sgd param", t);
    expect_same_bits(b1, b2, "sgd momentum buffer", t);
  }

  AdamParams ap;
  ap.weight_decay = 0.05f, ap.decoupled = true;
  std::vector<Tensor> q1 = random_list(5), q2 = clones(q1), m1, v1;
  for (const Shape& s : kShapes) {
    m1.push_back(Tensor::zeros(s));
    v1.push_back(Tensor::zeros(s));
  }
  std::vector<Tensor> m2 = clones(m1), v2 = clones(v1);
  for (int t = 1; t <= 2; ++t) {
    adam_step_multi(ap, t, ptrs(q1), cptrs(unscaled), ptrs(m1), ptrs(v1), kCpu);
    adam_step_multi(ap, t, ptrs(q2), cptrs(g), ptrs(m2), ptrs(v2), kCpu, inv);
    expect_same_bits(q1, q2, "adam param", t);
    expect_same_bits(m1, m2, "adam exp_avg", t);
    expect_same_bits(v1, v2, "adam exp_avg_sq", t);
  }
  expect_same_bits(g_before, g, "gradients (must be unchanged)", 2);
}

TEST(OptimMulti, EmptyListsDoNothing) {
  sgd_step_multi({}, true, {}, {}, {}, kCpu);
  adam_step_multi({}, 1, {}, {}, {}, {}, kCpu, 0.5f);
}

TEST(OptimMulti, Errors) {
  Tensor p = Tensor::zeros({4}), g = Tensor::zeros({4}), g5 = Tensor::zeros({5}), buf = Tensor::zeros({4});
  Tensor m = Tensor::zeros({4}), v = Tensor::zeros({4});
  SgdParams sp;
  expect_error([&] { sgd_step_multi(sp, true, {&p}, {&g, &g}, {&buf}, kCpu); },
               {"sgd_step_multi", "2 grads for 1 parameters"});
  expect_error([&] { sgd_step_multi(sp, true, {&p}, {&g}, {}, kCpu); },
               {"sgd_step_multi", "0 momentum buffers for 1 parameters"});
  expect_error([&] { sgd_step_multi(sp, true, {&p}, {nullptr}, {&buf}, kCpu); }, {"null tensor pointer"});
  expect_error([&] { sgd_step_multi(sp, true, {&p}, {&g5}, {&buf}, kCpu, 0.5f); }, {"grad [5]", "param [4]"});
  expect_error([&] { adam_step_multi({}, 1, {&p, &p}, {&g, &g}, {&m, &m}, {&v}, kCpu); },
               {"adam_step_multi", "1 exp_avg_sqs for 2 parameters"});
  expect_error([&] { adam_step_multi({}, 0, {&p}, {&g}, {&m}, {&v}, kCpu); }, {"step counts from 1"});
}

}  // namespace
}  // namespace lancet
