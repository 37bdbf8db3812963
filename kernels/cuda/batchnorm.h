// cuda/batchnorm.h — the CUDA twins of kernels/batchnorm.h (same arguments and contract; see
// that header). Host-only: no CUDA header, so kernels/batchnorm.cpp can include it.
//
// Element types: x, y, dy, dx are f32, f16 or bf16, all of x's dtype (arithmetic in float);
// gamma, beta, running_mean, running_var, saved_mean, saved_invstd, dgamma, dbeta stay f32
// (the mixed-precision rule: BatchNorm statistics in f32). Per-channel sums accumulate in
// double, as the CPU twin's do.
// Layout: x in nchw or channels_last; the 4-D tensors of a call (x, y, dy, dx) share x's memory
// format, else the op throws naming both ("...: dx [..] is nchw but the input [..] is
// channels_last"). channels_last reads run along C (coalesced); both layouts give the same
// results up to the order of the double sums. Every reduction uses a launch geometry that
// depends on the shape and layout alone and sums its partials in a fixed order, so results are
// deterministic run to run.
// All ops are asynchronous on `s` except channel_sums and backward_sums, which return host
// vectors: they copy the sums back and synchronise `s`. backward_dx copies its host sums to the
// device and synchronises `s` until that pageable copy is done (the caller may free them).
// The fused BatchNorm+ReLU twins (kernels/cuda/fused.h) are defined in batchnorm.cu too: they
// are these kernels with the ReLU folded in.
#pragma once
#include <vector>

#include "kernels/batchnorm.h"
#include "kernels/tensor.h"

namespace lancet::cuda {

void batchnorm2d_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                               Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                               Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

void batchnorm2d_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                              const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                              Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

void batchnorm2d_backward(bool batch_stats, const Tensor& x, const Tensor& dy, const Tensor& gamma,
                          const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx, Tensor& dgamma,
                          Tensor& dbeta, const Stream& s);

void batchnorm2d_channel_sums(const Tensor& x, std::vector<double>& out, const Stream& s);

void batchnorm2d_backward_sums(const Tensor& x, const Tensor& dy, const Tensor& mean, const Tensor& invstd,
                               std::vector<double>& out, const Stream& s);

void batchnorm2d_backward_dx(const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& mean,
                             const Tensor& invstd, const std::vector<double>& global_sums, double count, Tensor& dx,
                             const Stream& s);

}  // namespace lancet::cuda
