// optim.cpp — CPU SGD and Adam/AdamW steps, following torch.optim's single-tensor code path
// operation by operation (same float roundings where it matters; scalars in double as Python does).
#include "kernels/optim.h"

#include <cmath>
#include <utility>

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

// ---- gradient clipping --------------------------------------------------------------------

namespace {

constexpr int64_t kNormBlock = 1 << 15;  // elements per partial sum; fixed so sums never depend on threads

// The defined tensors of `tensors`, checked (f32, on the stream's CPU device).
std::vector<const Tensor*> checked_list(const char* op, const std::vector<const Tensor*>& tensors, const Stream& s) {
  std::vector<const Tensor*> out;
  for (const Tensor* t : tensors) {
    LANCET_CHECK(t != nullptr, op << ": null tensor pointer in the list");
    if (!t->defined()) continue;
    cpu::require_cpu(op, s, *t);
    cpu::require_dtype(op, "tensor", *t, DType::f32);
    out.push_back(t);
  }
  return out;
}

// Calls block_fn(tensor index, begin, end) -> double for every kNormBlock-element block of
// every tensor (in parallel) and returns the per-block results in list order.
template <typename F>
std::vector<double> map_blocks(const std::vector<const Tensor*>& ts, F&& block_fn) {
  std::vector<std::pair<size_t, int64_t>> blocks;  // (tensor, first element)
  for (size_t i = 0; i < ts.size(); ++i)
    for (int64_t b = 0; b < ts[i]->numel(); b += kNormBlock) blocks.emplace_back(i, b);
  std::vector<double> out(blocks.size());
  parallel_for(static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [i, b] = blocks[static_cast<size_t>(k)];
      out[static_cast<size_t>(k)] = block_fn(i, b, std::min(b + kNormBlock, ts[i]->numel()));
    }
  });
  return out;
}

}  // namespace

double global_l2_norm(const std::vector<const Tensor*>& tensors, const Stream& s) {
  const auto ts = checked_list("global_l2_norm", tensors, s);
  const auto partial = map_blocks(ts, [&ts](size_t t, int64_t begin, int64_t end) {
    const float* x = ts[t]->data<float>();
    double acc = 0;
    for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(x[i]) * x[i];
    return acc;
  });
  double total = 0;
  for (double p : partial) total += p;
  return std::sqrt(total);
}

bool all_finite(const std::vector<const Tensor*>& tensors, const Stream& s) {
  const auto ts = checked_list("all_finite", tensors, s);
  const auto partial = map_blocks(ts, [&ts](size_t t, int64_t begin, int64_t end) {
    const float* x = ts[t]->data<float>();
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) ok &= std::isfinite(x[i]);
    return ok ? 1.0 : 0.0;
  });
  for (double p : partial)
    if (p == 0.0) return false;
  return true;
}

bool unscale_and_check_finite(const std::vector<Tensor*>& grads, float inv_scale, const Stream& s) {
  const auto ts = checked_list("unscale_and_check_finite", std::vector<const Tensor*>(grads.begin(), grads.end()), s);
  std::vector<Tensor*> out;  // the same defined tensors, writable
  for (Tensor* g : grads)
    if (g->defined()) out.push_back(g);
  const auto partial = map_blocks(ts, [&out, inv_scale](size_t t, int64_t begin, int64_t end) {
    float* x = out[t]->data<float>();
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) {
      ok &= std::isfinite(x[i]);  // checked before scaling, as torch does
      x[i] = x[i] * inv_scale;
    }
    return ok ? 1.0 : 0.0;
  });
  for (double p : partial)
    if (p == 0.0) return false;
  return true;
}

float clip_grad_norm(const std::vector<Tensor*>& grads, float max_norm, const Stream& s) {
  LANCET_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be positive, got " << max_norm);
  const std::vector<const Tensor*> list(grads.begin(), grads.end());
  const float total = static_cast<float>(global_l2_norm(list, s));
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (NaN stays NaN), in float32.
  const float coef = max_norm / (total + 1e-6f);
  if (coef >= 1.f) return total;
  for (Tensor* g : grads) {
    if (!g->defined()) continue;
    float* x = g->data<float>();
    for_each_index(g->numel(), [&](int64_t i) { x[i] = x[i] * coef; });
  }
  return total;
}

}  // namespace lancet
