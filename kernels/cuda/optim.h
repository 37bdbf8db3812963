// cuda/optim.h — CUDA twins of the optimizer ops in kernels/optim.h (same arguments and
// contracts; reached through LANCET_CUDA_TWIN in kernels/optim.cpp, not called directly).
//
// Every op works on f32 tensors on the stream's GPU and is issued on that stream. The step
// ops and the gradient scaling are asynchronous; global_l2_norm, sum_of_squares, all_finite,
// unscale_and_check_finite and clip_grad_norm copy their few bytes of result back and wait for
// the stream once. List ops launch one kernel per table of up to a few dozen tensors (see
// optim.cu), so a whole model's parameters take a handful of launches.
// Includes no CUDA header.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/optim.h"

namespace lancet::cuda {

void sgd_step(const SgdParams& p, bool first_step, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const Stream& s);
void adam_step(const AdamParams& p, int64_t step, Tensor& param, const Tensor& grad, Tensor& exp_avg,
               Tensor& exp_avg_sq, const Stream& s);
void sgd_step_multi(const SgdParams& p, bool first_step, const std::vector<Tensor*>& params,
                    const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& momentum_bufs,
                    const Stream& s, float grad_scale_inv = 1.0f);
void adam_step_multi(const AdamParams& p, int64_t step, const std::vector<Tensor*>& params,
                     const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& exp_avgs,
                     const std::vector<Tensor*>& exp_avg_sqs, const Stream& s, float grad_scale_inv = 1.0f);
double global_l2_norm(const std::vector<const Tensor*>& tensors, const Stream& s);
double sum_of_squares(const std::vector<const Tensor*>& tensors, const Stream& s);
bool all_finite(const std::vector<const Tensor*>& tensors, const Stream& s);
bool unscale_and_check_finite(const std::vector<Tensor*>& grads, float inv_scale, const Stream& s);
float clip_grad_norm(const std::vector<Tensor*>& grads, float max_norm, const Stream& s);
void clip_grads_to_norm(const std::vector<Tensor*>& grads, float max_norm, float total_norm, const Stream& s);

}  // namespace lancet::cuda
