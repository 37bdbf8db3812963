// optim.cpp — CPU SGD and Adam/AdamW steps, following torch.optim's single-tensor code path
// operation by operation (same float roundings where it matters; scalars in double as Python does).
#include "kernels/optim.h"

#include <cmath>

#include "kernels/cpu_util.h"

namespace lancet {
namespace {

template <typename F>
void for_each_index(int64_t n, F&& fn) {
  parallel_for(n, cpu::kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

}  // namespace

void sgd_step(const SgdParams& p, bool first_step, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const Stream& s) {
  const char* op = "sgd_step";
  cpu::require_cpu(op, s, param, {&grad, &momentum_buf});
  cpu::require_dtype(op, "param", param, DType::f32);
  cpu::require_like(op, "grad", grad, param, "param");
  const bool use_momentum = p.momentum != 0.f;
  if (use_momentum) cpu::require_like(op, "momentum buffer", momentum_buf, param, "param");
  LANCET_CHECK(!p.nesterov || (use_momentum && p.dampening == 0.f),
               op << ": Nesterov momentum requires a momentum and zero dampening");
  float* w = param.data<float>();
  const float* g = grad.data<float>();
  float* buf = use_momentum ? momentum_buf.data<float>() : nullptr;
  const float wd = p.weight_decay, mom = p.momentum, lr = p.lr;
  const float keep = static_cast<float>(1.0 - static_cast<double>(p.dampening));
  for_each_index(param.numel(), [&](int64_t i) {
    float d = wd != 0.f ? g[i] + wd * w[i] : g[i];
    if (buf) {
      buf[i] = first_step ? d : buf[i] * mom + keep * d;
      d = p.nesterov ? d + mom * buf[i] : buf[i];
    }
    w[i] = w[i] + (-lr) * d;
  });
}

void adam_step(const AdamParams& p, int64_t step, Tensor& param, const Tensor& grad, Tensor& exp_avg,
               Tensor& exp_avg_sq, const Stream& s) {
  const char* op = "adam_step";
  cpu::require_cpu(op, s, param, {&grad, &exp_avg, &exp_avg_sq});
  cpu::require_dtype(op, "param", param, DType::f32);
  cpu::require_like(op, "grad", grad, param, "param");
  cpu::require_like(op, "exp_avg", exp_avg, param, "param");
  cpu::require_like(op, "exp_avg_sq", exp_avg_sq, param, "param");
  LANCET_CHECK(step >= 1, op << ": step counts from 1, got " << step);
  const double bc1 = 1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(step));
  const float step_size = static_cast<float>(p.lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float decay = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);  // AdamW
  const float w1 = static_cast<float>(1.0 - static_cast<double>(p.beta1));                   // lerp weight
  const float w2 = static_cast<float>(1.0 - static_cast<double>(p.beta2));
  const float wd = p.weight_decay, beta2 = p.beta2, eps = p.eps;
  const bool decoupled = p.decoupled;
  float* w = param.data<float>();
  const float* g = grad.data<float>();
  float* m = exp_avg.data<float>();
  float* v = exp_avg_sq.data<float>();
  for_each_index(param.numel(), [&](int64_t i) {
    float gi = g[i];
    if (wd != 0.f) {
      if (decoupled)
        w[i] = w[i] * decay;
      else
        gi = gi + wd * w[i];
    }
    m[i] = w1 < 0.5f ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * (1.f - w1);  // torch's lerp_
    v[i] = v[i] * beta2 + w2 * gi * gi;
    const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    w[i] = w[i] + (-step_size) * (m[i] / denom);
  });
}

}  // namespace lancet
