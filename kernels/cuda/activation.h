// cuda/activation.h — the CUDA twins of kernels/activation.h (same arguments and contract;
// see that header). Host-only: no CUDA header, so kernels/activation.cpp can include it.
// Element types: x, y, dy, dx are f32, f16 or bf16, all of one dtype (arithmetic in float);
// the dropout mask stays u8. Tensors of one call share one memory format (the ops are
// elementwise over memory, so nchw and channels_last both work).
// Every op is asynchronous on `s`; none synchronises with the host.
#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace lancet::cuda {

void relu_forward(const Tensor& x, Tensor& y, const Stream& s);
void relu_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s);
void sigmoid_forward(const Tensor& x, Tensor& y, const Stream& s);
void sigmoid_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s);
// The mask equals the CPU twin's bit for bit for the same (p, seed, offset): both evaluate
// the counter-based hash of activation.h with the same 64-bit integer arithmetic.
void dropout_forward(float p, uint64_t seed, uint64_t offset, const Tensor& x, Tensor& y, Tensor& mask,
                     const Stream& s);
void dropout_backward(float p, const Tensor& mask, const Tensor& dy, Tensor& dx, const Stream& s);

}  // namespace lancet::cuda
