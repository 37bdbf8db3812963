// fused.h — fused ops for the blocks' hot paths (see conv.h for the common contract): one pass
// over the activations where the unfused composition makes two or three.
//
// Each op is defined as an unfused composition of public ops, and the CPU twin gives results
// BIT-IDENTICAL to that composition (tests/test_kernels_fused.cpp checks every element), so a
// layer may switch between fused and unfused without changing a training result on the CPU.
// The CUDA twins (kernels/cuda/fused.h) fold the pieces into one kernel and agree with the CPU
// to rounding.
// Memory formats: the 4-D tensors of one call (x, y, dy, dx, shortcut, dshortcut) are all nchw or
// all channels_last; on the CPU channels_last results equal the nchw ones bit for bit.
#pragma once
#include "kernels/batchnorm.h"
#include "kernels/tensor.h"

namespace lancet {

// ---- BatchNorm2d followed by ReLU ------------------------------------------------------------
// y = relu(batchnorm2d(x)): the same arguments and statistics as batchnorm2d_forward_train /
// batchnorm2d_forward_eval (saved_mean, saved_invstd, running stats as there), then
// relu_forward(y, y). y must not alias x (the backward needs both).
void batchnorm_relu_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                  Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                                  Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

void batchnorm_relu_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                                 Tensor& saved_mean, Tensor& saved_invstd, const Stream& s);

// The backward of the above from its input x and output y:
//   relu_backward(y, dy, t); batchnorm2d_backward(batch_stats, x, t, gamma, ..., dx, dgamma, dbeta)
// i.e. dy masked by (y > 0) inside the BatchNorm backward. dx overwritten (may be undefined);
// dgamma, dbeta accumulated (may be undefined). No output may alias an input.
void batchnorm_relu_backward(bool batch_stats, const Tensor& x, const Tensor& y, const Tensor& dy,
                             const Tensor& gamma, const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx,
                             Tensor& dgamma, Tensor& dbeta, const Stream& s);

// ---- squeeze-excitation scale + residual add + ReLU ------------------------------------------
// y[n,c,h,w] = relu(x[n,c,h,w] * g[n,c] + shortcut[n,c,h,w]); x, shortcut, y [N, C, H, W],
// g [N, C] (on the GPU g has x's dtype). The composition:
//   channel_scale_forward(x, g, y); add(y, shortcut, y); relu_forward(y, y)
// y must alias neither x nor shortcut.
void se_scale_residual_relu_forward(const Tensor& x, const Tensor& g, const Tensor& shortcut, Tensor& y,
                                    const Stream& s);

// Its backward from x, g and the forward's output y, with m = (y > 0):
//   dshortcut = dy * m                  (overwritten; may be undefined)
//   dx        = dy * m * g[n,c]         (overwritten; may be undefined)
//   dg[n,c]   = sum_hw dy * m * x       (overwritten; may be undefined)
// The composition: relu_backward(y, dy, t); channel_scale_backward(x, g, t, dx, dg) and
// dshortcut = t. No output may alias an input or another output.
void se_scale_residual_relu_backward(const Tensor& x, const Tensor& g, const Tensor& y, const Tensor& dy, Tensor& dx,
                                     Tensor& dg, Tensor& dshortcut, const Stream& s);

}  // namespace lancet
