// cuda/fused.h — the CUDA twins of kernels/fused.h (same arguments and contract; see that
// header). Host-only: no CUDA header, so kernels/fused.cpp can include it.
//
// Element types: activations (x, y, dy, dx, shortcut, dshortcut, and the SE gate g, dg) are
// f32, f16 or bf16, all of x's dtype, with arithmetic in float and each result rounded once;
// BatchNorm's parameters and statistics stay f32 (see cuda/batchnorm.h).
// Where defined: the BatchNorm+ReLU twins in batchnorm.cu (the BatchNorm kernels with the
// ReLU folded in: the mask is applied to dy as it is loaded, nothing is materialised); the SE
// twins in fused.cu. All are asynchronous on `s`.
// Layout: nchw or channels_last, shared by every 4-D tensor of a call (else the op throws naming
// both); channels_last kernels read along C and give the nchw results up to the order of the
// double sums (BatchNorm statistics and gradients, dg).
#pragma once
#include "kernels/fused.h"

namespace lancet::cuda {

void batchnorm_relu_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                  Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                                  Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

void batchnorm_relu_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                                 Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

void batchnorm_relu_backward(bool batch_stats, const Tensor& x, const Tensor& y, const Tensor& dy,
                             const Tensor& gamma, const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx,
                             Tensor& dgamma, Tensor& dbeta, const Stream& s);

void se_scale_residual_relu_forward(const Tensor& x, const Tensor& g, const Tensor& shortcut, Tensor& y,
                                    const Stream& s);

void se_scale_residual_relu_backward(const Tensor& x, const Tensor& g, const Tensor& y, const Tensor& dy, Tensor& dx,
                                     Tensor& dg, Tensor& dshortcut, const Stream& s);

}  // namespace lancet::cuda
