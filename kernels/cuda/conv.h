// cuda/conv.h — the CUDA twins of kernels/conv.h (cuDNN), same arguments and contract.
//
// x, w, y, dy, dx, dw share one dtype (f32, f16 or bf16; cuDNN computes in f32); b and db are
// f32. x's memory format (nchw or channels_last) decides the convolution's layout: y, dy and
// dx must have it too; w and dw may have either (they are converted when they differ).
// Algorithms: see set_conv_autotune / set_allow_tf32 in kernels/conv.h. No CUDA header here,
// so kernels/conv.cpp can include it.
#pragma once
#include <cstddef>

#include "kernels/conv.h"

namespace lancet::cuda {

void conv2d_forward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y,
                    const Stream& s);
void conv2d_backward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx,
                     Tensor& dw, Tensor& db, const Stream& s);

// The process-wide cache of chosen algorithms (one entry per shape key and direction), for
// benchmarks and tests.
size_t conv_algo_cache_size();
void clear_conv_algo_cache();

}  // namespace lancet::cuda
