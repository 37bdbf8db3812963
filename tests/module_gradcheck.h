// module_gradcheck.h — gradient checks of whole modules (layers, blocks, models) on top of
// gradcheck.h: the input and every parameter against central differences of
// loss = sum(forward(x) * r) for a fixed random r.
#pragma once
#include <functional>
#include <string>

#include "layers/layers.h"
#include "tests/gradcheck.h"

namespace lancet::testing {

struct ModuleCheckOptions {
  double h = 1e-2;
  double tol = 1e-2;
  double kink = 0.1;  // see check_gradient
  int max_checks = 48;
  uint32_t seed = 1;
  bool check_input = true;
  // Runs before every forward (e.g. rewinding a dropout counter so each forward draws the same mask).
  std::function<void()> before_forward;
};

// Gives every BatchNorm2d in m non-trivial affine parameters and running statistics, so that
// eval-mode checks do not see the identity and train-mode checks see gamma != 1.
inline void randomize_batchnorms(Module& m, uint32_t seed) {
  m.apply([&seed](const std::string&, Module& sub) {
    auto* bn = dynamic_cast<BatchNorm2d*>(&sub);
    if (!bn) return;
    fill_uniform(bn->weight().value, seed++, 0.5f, 1.5f);
    fill_uniform(bn->bias().value, seed++, -0.5f, 0.5f);
    fill_uniform(bn->running_mean(), seed++, -0.5f, 0.5f);
    fill_uniform(bn->running_var(), seed++, 0.5f, 2.0f);
  });
}

// Checks d loss / d x and d loss / d p for every parameter p of m, in m's current mode.
inline void check_module_gradients(Module& m, const Shape& x_shape, const std::string& what,
                                   const ModuleCheckOptions& o = {}) {
  const Stream s = Stream::cpu();
  Tensor x = random_tensor(x_shape, o.seed);
  auto run = [&](SavedPtr* saved) {
    if (o.before_forward) o.before_forward();
    return m.forward(x, saved, s);
  };
  SavedPtr ctx;
  Tensor y = run(&ctx);
  Tensor r = random_tensor(y.shape(), o.seed + 1);
  m.zero_grad();
  Tensor dx = m.backward(r, *ctx, o.check_input, s);
  ctx.reset();
  const std::string mode = m.training() ? " (train)" : " (eval)";
  auto f = [&] { return dot(run(nullptr), r); };
  if (o.check_input) check_gradient(what + mode + " input", x, dx, f, o.h, o.tol, o.max_checks, o.kink);
  for (auto& [name, p] : m.named_parameters())
    check_gradient(what + mode + " " + name, p->value, p->grad, f, o.h, o.tol, o.max_checks, o.kink);
}

}  // namespace lancet::testing
