// optim.cpp — CPU SGD and Adam/AdamW steps, following torch.optim's single-tensor code path
// operation by operation (same float roundings where it matters; scalars in double as Python does).
// Tensors on a GPU go to the CUDA twins in kernels/cuda/optim.cu.
#include "kernels/optim.h"

#include <cmath>
#include <utility>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/optim.h"
#endif

namespace lancet {
namespace {

template <typename F>
void for_each_index(int64_t n, F&& fn) {
  parallel_for(n, cpu::kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

// The tensor a list op dispatches on: the first defined one (an undefined tensor when there is
// none, so an empty list stays on the CPU path).
template <typename TensorPtr>
const Tensor& first_defined(const std::vector<TensorPtr>& ts) {
  static const Tensor none;
  for (const Tensor* t : ts)
    if (t != nullptr && t->defined()) return *t;
  return none;
}

void check_multi_lists(const char* op, size_t n, std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (const auto& [name, size] : lists)
    LANCET_CHECK(size == n, op << ": " << size << " " << name << " for " << n << " parameters");
}

template <typename TensorPtr>
void check_no_null(const char* op, const std::vector<TensorPtr>& ts) {
  for (const Tensor* t : ts) LANCET_CHECK(t != nullptr, op << ": null tensor pointer in the list");
}

// grad * scale_inv in a new CPU tensor (one float rounding per element, as
// unscale_and_check_finite); `grad` itself when scale_inv is 1 or the per-tensor op will reject
// the gradient anyway (undefined, not f32, not on the CPU), so it reports the error.
Tensor scaled_grad(const Tensor& grad, float scale_inv) {
  if (scale_inv == 1.f || !grad.defined() || grad.dtype() != DType::f32 || !grad.device().is_cpu()) return grad;
  Tensor out = Tensor::empty(grad.shape(), DType::f32, Device::cpu());
  const float* g = grad.data<float>();
  float* o = out.data<float>();
  for_each_index(grad.numel(), [&](int64_t i) { o[i] = g[i] * scale_inv; });
  return out;
}

}  // namespace

void sgd_step(const SgdParams& p, bool first_step, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const Stream& s) {
  LANCET_CUDA_TWIN(param, sgd_step(p, first_step, param, grad, momentum_buf, s));
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

namespace {

// One Adam/AdamW update over [begin, end), torch.optim's single-tensor arithmetic element by
// element. Restrict-qualified and free of captured references so that the compiler vectorizes
// it (with -fno-math-errno, CMakeLists.txt: the sqrt an instruction): 4x faster than the same
// loop in a lambda over the tensors, and the same bits (IEEE sqrt and division are exact).
struct AdamConsts {
  float step_size, bc2_sqrt, decay, w1, w2, wd, beta2, eps;
  bool decoupled;
};
void adam_range(int64_t begin, int64_t end, const AdamConsts& k, float* __restrict w, const float* __restrict g,
                float* __restrict m, float* __restrict v) {
  const float step_size = k.step_size, bc2_sqrt = k.bc2_sqrt, decay = k.decay, w1 = k.w1, w2 = k.w2, wd = k.wd,
              beta2 = k.beta2, eps = k.eps;
  const bool decoupled = k.decoupled;
  for (int64_t i = begin; i < end; ++i) {
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
  }
}

}  // namespace

void adam_step(const AdamParams& p, int64_t step, Tensor& param, const Tensor& grad, Tensor& exp_avg,
               Tensor& exp_avg_sq, const Stream& s) {
  LANCET_CUDA_TWIN(param, adam_step(p, step, param, grad, exp_avg, exp_avg_sq, s));
  const char* op = "adam_step";
  cpu::require_cpu(op, s, param, {&grad, &exp_avg, &exp_avg_sq});
  cpu::require_dtype(op, "param", param, DType::f32);
  cpu::require_like(op, "grad", grad, param, "param");
  cpu::require_like(op, "exp_avg", exp_avg, param, "param");
  cpu::require_like(op, "exp_avg_sq", exp_avg_sq, param, "param");
  LANCET_CHECK(step >= 1, op << ": step counts from 1, got " << step);
  const double bc1 = 1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(step));
  AdamConsts k;
  k.step_size = static_cast<float>(p.lr / bc1);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  k.decay = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);  // AdamW
  k.w1 = static_cast<float>(1.0 - static_cast<double>(p.beta1));                   // lerp weight
  k.w2 = static_cast<float>(1.0 - static_cast<double>(p.beta2));
  k.wd = p.weight_decay;
  k.beta2 = p.beta2;
  k.eps = p.eps;
  k.decoupled = p.decoupled;
  float* w = param.data<float>();
  const float* g = grad.data<float>();
  float* m = exp_avg.data<float>();
  float* v = exp_avg_sq.data<float>();
  LANCET_CHECK(w != g && w != m && w != v && g != m && g != v && m != v,
               op << ": param, grad, exp_avg and exp_avg_sq must be four different buffers");
  parallel_for(param.numel(), cpu::kElementwiseGrain,
               [&](int64_t begin, int64_t end) { adam_range(begin, end, k, w, g, m, v); });
}

void sgd_step_multi(const SgdParams& p, bool first_step, const std::vector<Tensor*>& params,
                    const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& momentum_bufs,
                    const Stream& s, float grad_scale_inv) {
  LANCET_CUDA_TWIN(first_defined(params),
                   sgd_step_multi(p, first_step, params, grads, momentum_bufs, s, grad_scale_inv));
  const char* op = "sgd_step_multi";
  const bool no_bufs = momentum_bufs.empty() && p.momentum == 0.f;  // allowed: plain SGD keeps no state
  check_multi_lists(op, params.size(),
                    {{"grads", grads.size()}, {"momentum buffers", no_bufs ? params.size() : momentum_bufs.size()}});
  check_no_null(op, params);
  check_no_null(op, grads);
  check_no_null(op, momentum_bufs);
  Tensor none;
  for (size_t i = 0; i < params.size(); ++i)
    sgd_step(p, first_step, *params[i], scaled_grad(*grads[i], grad_scale_inv), no_bufs ? none : *momentum_bufs[i],
             s);
}

void adam_step_multi(const AdamParams& p, int64_t step, const std::vector<Tensor*>& params,
                     const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& exp_avgs,
                     const std::vector<Tensor*>& exp_avg_sqs, const Stream& s, float grad_scale_inv) {
  LANCET_CUDA_TWIN(first_defined(params),
                   adam_step_multi(p, step, params, grads, exp_avgs, exp_avg_sqs, s, grad_scale_inv));
  const char* op = "adam_step_multi";
  check_multi_lists(op, params.size(),
                    {{"grads", grads.size()}, {"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()}});
  check_no_null(op, params);
  check_no_null(op, grads);
  check_no_null(op, exp_avgs);
  check_no_null(op, exp_avg_sqs);
  for (size_t i = 0; i < params.size(); ++i)
    adam_step(p, step, *params[i], scaled_grad(*grads[i], grad_scale_inv), *exp_avgs[i], *exp_avg_sqs[i], s);
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
    // A GPU tensor after a CPU one: name the devices (require_cpu would say the kernel is missing).
    LANCET_CHECK(t->device() == s.device,
                 op << ": stream is on " << s.device.str() << " but the input is on " << t->device().str());
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

namespace {
// The sum of squares of the checked list (errors name `op`), blocks added in list order.
double squares(const char* op, const std::vector<const Tensor*>& tensors, const Stream& s) {
  const auto ts = checked_list(op, tensors, s);
  const auto partial = map_blocks(ts, [&ts](size_t t, int64_t begin, int64_t end) {
    const float* x = ts[t]->data<float>();
    double acc = 0;
    for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(x[i]) * x[i];
    return acc;
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}
}  // namespace

double sum_of_squares(const std::vector<const Tensor*>& tensors, const Stream& s) {
  LANCET_CUDA_TWIN(first_defined(tensors), sum_of_squares(tensors, s));
  return squares("sum_of_squares", tensors, s);
}

double global_l2_norm(const std::vector<const Tensor*>& tensors, const Stream& s) {
  LANCET_CUDA_TWIN(first_defined(tensors), global_l2_norm(tensors, s));
  return std::sqrt(squares("global_l2_norm", tensors, s));
}

bool all_finite(const std::vector<const Tensor*>& tensors, const Stream& s) {
  LANCET_CUDA_TWIN(first_defined(tensors), all_finite(tensors, s));
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
  LANCET_CUDA_TWIN(first_defined(grads), unscale_and_check_finite(grads, inv_scale, s));
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
  LANCET_CUDA_TWIN(first_defined(grads), clip_grad_norm(grads, max_norm, s));
  LANCET_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be positive, got " << max_norm);
  const std::vector<const Tensor*> list(grads.begin(), grads.end());
  const float total = static_cast<float>(global_l2_norm(list, s));
  clip_grads_to_norm(grads, max_norm, total, s);
  return total;
}

void clip_grads_to_norm(const std::vector<Tensor*>& grads, float max_norm, float total_norm, const Stream& s) {
  LANCET_CUDA_TWIN(first_defined(grads), clip_grads_to_norm(grads, max_norm, total_norm, s));
  LANCET_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be positive, got " << max_norm);
  checked_list("clip_grad_norm", std::vector<const Tensor*>(grads.begin(), grads.end()), s);
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (NaN stays NaN), in float32.
  const float coef = max_norm / (total_norm + 1e-6f);
  if (coef >= 1.f) return;
  for (Tensor* g : grads) {
    if (!g->defined()) continue;
    float* x = g->data<float>();
    for_each_index(g->numel(), [&](int64_t i) { x[i] = x[i] * coef; });
  }
}

}  // namespace lancet
