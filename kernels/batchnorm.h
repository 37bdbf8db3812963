// batchnorm.h — BatchNorm2d with PyTorch semantics (see conv.h for the common contract).
//
// x, y, dx: [N, C, H, W]; gamma, beta, running_mean, running_var, saved_mean, saved_invstd: [C].
// Training: batch mean and biased variance normalise; when update_running is set,
//   running = (1 - momentum) * running + momentum * batch, with the UNBIASED variance
//   (n / (n - 1)) for running_var, as torch does.
// saved_mean / saved_invstd are written by the forward (training: batch statistics;
// eval: running_mean and 1/sqrt(running_var + eps)) and read by the backward.
#pragma once
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

}  // namespace lancet
