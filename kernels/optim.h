// optim.h — optimizer update kernels with PyTorch's torch.optim semantics, per tensor and over
// a whole parameter list at once (the *_multi ops: on a GPU a few fused launches for all
// parameters, like torch's foreach/fused optimizers; on the CPU a loop over the per-tensor op).
// All state tensors have the parameter's shape and are f32 (master weights). Parameters and
// state are updated in place; gradients are only read (the clipping and loss-scaling ops below
// modify them, as their names say). Ops returning a host value (a norm, a finite flag) wait
// for their stream on a GPU: one synchronisation per call.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/tensor.h"

namespace lancet {

struct SgdParams {
  float lr = 0.01f, momentum = 0.9f, dampening = 0.0f, weight_decay = 0.0f;
  bool nesterov = false;
};
// torch.optim.SGD: g = grad + wd*param; buf = momentum*buf + (1-dampening)*g (buf = g on the
// first step, signalled by first_step); g = nesterov ? g + momentum*buf : buf; param -= lr*g.
void sgd_step(const SgdParams& p, bool first_step, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const Stream& s);

struct AdamParams {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f;
  bool decoupled = false;  // false: Adam (L2 added to the gradient); true: AdamW (param *= 1 - lr*wd)
};
// torch.optim.Adam / AdamW with bias correction; step is 1 on the first update.
void adam_step(const AdamParams& p, int64_t step, Tensor& param, const Tensor& grad, Tensor& exp_avg,
               Tensor& exp_avg_sq, const Stream& s);

// The same updates over lists of parameters: element i of every list belongs to params[i]
// (same shape); the lists have params.size() entries (momentum_bufs may also be empty when
// p.momentum is 0). Results equal calling the per-tensor op on each parameter in turn, bit for
// bit on the CPU. grad_scale_inv: every gradient element is multiplied by it (one float
// rounding, as unscale_and_check_finite does) as it is read, so a mixed-precision unscale pass
// can be fused into the step; the gradients themselves are left unchanged. An empty list does
// nothing.
void sgd_step_multi(const SgdParams& p, bool first_step, const std::vector<Tensor*>& params,
                    const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& momentum_bufs,
                    const Stream& s, float grad_scale_inv = 1.0f);
void adam_step_multi(const AdamParams& p, int64_t step, const std::vector<Tensor*>& params,
                     const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& exp_avgs,
                     const std::vector<Tensor*>& exp_avg_sqs, const Stream& s, float grad_scale_inv = 1.0f);

// Gradient clipping (torch.nn.utils.clip_grad_norm_ with norm_type 2). The lists hold f32
// tensors on the stream's device; undefined entries are skipped (a parameter without a
// gradient). Sums of squares accumulate in double over fixed-size blocks (32K elements on the
// CPU, 64K on a GPU) that are added in list order, so the result is the same for any thread
// count and on every run; CPU and GPU agree to about 1e-15 relative, not bit for bit.
// The L2 norm of all elements of all tensors together, sqrt(sum over tensors of |t|^2).
double global_l2_norm(const std::vector<const Tensor*>& tensors, const Stream& s);
// The sum under that root: global_l2_norm(l) == sqrt(sum_of_squares(l)) bit for bit. With
// tensors on several devices (a model spread over two GPUs), the global norm is the root of the
// per-device sums added on the host.
double sum_of_squares(const std::vector<const Tensor*>& tensors, const Stream& s);
// True when no element is NaN or +-inf.
bool all_finite(const std::vector<const Tensor*>& tensors, const Stream& s);
// Dynamic loss scaling (torch's _amp_foreach_non_finite_check_and_unscale_): multiplies every
// element by inv_scale in place and returns true when every element was finite before that
// (one pass; the check never depends on the thread count).
bool unscale_and_check_finite(const std::vector<Tensor*>& grads, float inv_scale, const Stream& s);
// Scales every gradient in place by clip_coef = max_norm / (total_norm + 1e-6) when that is
// below 1 (float32 arithmetic as torch, so a NaN or inf norm turns the gradients NaN / zero as
// there) and returns total_norm, the norm before clipping (rounded to float as torch returns
// it). max_norm must be positive.
float clip_grad_norm(const std::vector<Tensor*>& grads, float max_norm, const Stream& s);
// Its second half, for a total norm computed over several devices: scales the gradients by
// max_norm / (total_norm + 1e-6) when that is below 1, as clip_grad_norm does.
void clip_grads_to_norm(const std::vector<Tensor*>& grads, float max_norm, float total_norm, const Stream& s);

}  // namespace lancet
