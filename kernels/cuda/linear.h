// cuda/linear.h — the CUDA twins of kernels/linear.h (cuBLASLt), same arguments and contract.
//
// x, w, y, dy, dx, dw share one dtype (f32, f16 or bf16; products accumulate in f32, TF32 for
// f32 only when allow_tf32() in kernels/conv.h); b and db are f32. No CUDA header here, so
// kernels/linear.cpp can include it.
#pragma once
#include "kernels/linear.h"

namespace lancet::cuda {

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, const Stream& s);
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor& db,
                     const Stream& s);

}  // namespace lancet::cuda
