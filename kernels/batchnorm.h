// batchnorm.h — BatchNorm2d with PyTorch semantics (see conv.h for the common contract).
//
// x, y, dy, dx: [N, C, H, W], all nchw or all channels_last (on the CPU, channels_last results
// equal the nchw ones bit for bit: the same per-channel sums in the same order);
// gamma, beta, running_mean, running_var, saved_mean, saved_invstd: [C].
// Training: batch mean and biased variance normalise; when update_running is set,
//   running = (1 - momentum) * running + momentum * batch, with the UNBIASED variance
//   (n / (n - 1)) for running_var, as torch does.
// saved_mean / saved_invstd are written by the forward (training: batch statistics;
// eval: running_mean and 1/sqrt(running_var + eps)) and read by the backward.
#pragma once
#include <vector>

#include "kernels/tensor.h"

namespace lancet {

struct BatchNormParams {
  float eps = 1e-5f;
  float momentum = 0.1f;
};

void batchnorm2d_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                               Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                               Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

void batchnorm2d_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                              const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                              Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

// batch_stats = true: the gradient through batch statistics (training mode);
// false: the statistics are constants (eval mode), dx = dy * gamma * invstd.
// dx overwritten (may be undefined); dgamma, dbeta accumulated.
void batchnorm2d_backward(bool batch_stats, const Tensor& x, const Tensor& dy, const Tensor& gamma,
                          const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx, Tensor& dgamma,
                          Tensor& dbeta, const Stream& s);

// ---- the pieces SyncBatchNorm assembles around a cross-replica sum -------------------------
// Training-mode statistics over several replicas' batches: each replica computes its local
// per-channel sums, the sums are added over replicas, and every replica normalises with the
// global statistics (batchnorm2d_forward_eval with the global mean and biased variance does
// the normalisation). Sums are in double; the vectors are host memory.

// out (2C + 1 values): out[c] = sum of x over N, H, W; out[C + c] = sum of x^2; out[2C] = the
// count N * H * W.
void batchnorm2d_channel_sums(const Tensor& x, std::vector<double>& out, const Stream& s);

// out (2C values): out[c] = sum dy; out[C + c] = sum dy * (x - mean) * invstd — the local
// dbeta and dgamma.
void batchnorm2d_backward_sums(const Tensor& x, const Tensor& dy, const Tensor& mean, const Tensor& invstd,
                               std::vector<double>& out, const Stream& s);

// dx = gamma * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count) with the sums (as
// batchnorm2d_backward_sums lays them out) and count taken over every replica. dx overwritten.
void batchnorm2d_backward_dx(const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& mean,
                             const Tensor& invstd, const std::vector<double>& global_sums, double count, Tensor& dx,
                             const Stream& s);

}  // namespace lancet
